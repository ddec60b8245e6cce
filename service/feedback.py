"""The records awaiting feedback: what each answered request predicted, kept until its true labels
arrive in `/feedback` (or until evicted), and the check of those labels.

This module only stores and finds records; scoring them is service/ab.py's. It is the per-process
store (`Stats()` without a shared store: in-process use, FUSION_AB_STORE=memory); the server's default is
the shared, durable store of service/abstore.py (issue 20), which keeps the same rules for keys, aliases,
row counts and labelling once, and is bounded by its retention instead of by eviction.

A record is keyed by a server-generated id (`feedback_id`), never by a client's string: a client's
X-Request-ID is only an alias that the same client may use while it names one pending record, so a
reused or guessed id cannot overwrite, wipe or redirect anyone's record (issue 13, finding 9). The
store is bounded by records and by rows; when full, the oldest record of the client holding the most
goes (each record weighs its rows, at least max_rows / max_records), so a flood evicts its sender's own
records: a client holding less than its fair share (the cap over the clients holding records) is never
evicted by another.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

# ---- labels ---------------------------------------------------------------------------------------------

_JSON_KINDS = {bool: "a boolean", int: "an integer", float: "a number with a fraction", str: "a string"}


def _describe(value) -> str:
    """A value as the client wrote it, with its JSON type: `true (a boolean)`, `"1" (a string)`."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({_JSON_KINDS.get(type(value), 'a ' + type(value).__name__)})"


def check_labels(labels: list, classes: tuple, task: str) -> None:
    """Raise ValueError unless every label is one of the bundle's classes with that class's JSON type
    (classification), or a finite number (regression).

    Python's `true == 1` and `1.0 == 1` let `y in classes` take a boolean or a float as class 1 (issue 13,
    finding 9); "1" is not the class 1 either. Strict types keep feedback to what the model predicts.
    """
    if task != "classification":
        for i, y in enumerate(labels):
            if type(y) not in (int, float) or not math.isfinite(y):
                raise ValueError(f"expected finite numbers as labels (the bundle is a regression model); "
                                 f"got {_describe(y)} at row {i}")
        return
    allowed = {(type(c), c) for c in classes}
    bad = []
    for i, y in enumerate(labels):
        try:
            ok = (type(y), y) in allowed
        except TypeError:  # unhashable (a list or an object): never a class
            ok = False
        if not ok:
            bad.append(i)
    if not bad:
        return
    i, y = bad[0], labels[bad[0]]
    alike = next((c for c in classes if str(c) == str(y) or (type(y) in (bool, int, float) and c == y)), None)
    why = (f", but the class {json.dumps(alike)} is {_JSON_KINDS.get(type(alike), type(alike).__name__)}"
           if alike is not None else ", which is not one of them")
    more = f" ({len(bad)} of the {len(labels)} labels are not classes)" if len(bad) > 1 else ""
    raise ValueError(f"expected labels among the classes {list(classes)}, each of its class's JSON type; "
                     f"got {_describe(y)} at row {i}{why}{more}")


# ---- the store ------------------------------------------------------------------------------------------


@dataclass
class Record:
    """What a request predicted, kept until feedback arrives (bounded, evicted fairly between clients)."""

    variant: str
    predictions: list  # (n_rows,) class labels
    client: str = ""  # who sent the request (address, token): eviction is fair between clients
    alias: str | None = None  # the client's own X-Request-ID, if it sent one
    version: str | None = None  # the bundle version that answered
    others: dict = field(default_factory=dict)  # shadow variant -> predictions


class FeedbackStore:
    """Thread-safe, bounded records awaiting labels, keyed by server-made ids (the module's docstring
    says why and how eviction is fair). Each method holds the store's own lock for its whole work, so
    `pop` finds, checks and removes a record at once: a record is labelled once only."""

    def __init__(self, max_records: int = 100_000, max_rows: int = 200_000):
        self._lock = threading.Lock()
        self.records: dict[str, Record] = {}  # feedback_id -> what it predicted
        self.max_records, self.max_rows = max_records, max_rows
        self.stored_rows = 0
        self.reused_ids = 0  # requests whose X-Request-ID a pending record of the same client already had
        self.evicted = 0  # records dropped to make room (never labelled)
        self._unit = max(1, -(-max_rows // max_records))  # the least weight of a record, in rows
        self._by_client: dict[str, OrderedDict[str, None]] = {}  # client -> its keys, oldest first
        self._weight: dict[str, int] = {}  # client -> the weight of its records
        self._heap: list[tuple[int, int, str]] = []  # (-weight, seq, client); stale entries skipped lazily
        self._seq = itertools.count()
        self._aliases: dict[tuple[str, str], dict[str, None]] = {}  # (client, its X-Request-ID) -> keys

    @staticmethod
    def new_key() -> str:
        """A fresh record id: 32 random hex digits (128 bits, as uuid4().hex): unguessable."""
        return os.urandom(16).hex()

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    @property
    def rows(self) -> int:
        """Rows held by the pending records."""
        return self.stored_rows

    def put(self, key: str | None, record: Record) -> str:
        """Keep `record` until labelled or evicted; returns its key.

        key: the server's id for it (None: a fresh one); one already taken gets a fresh one, so no record
        is ever replaced. A record of more rows than the whole store is not kept (its key is returned).
        When the store is over either bound, the oldest records of the heaviest clients go.
        """
        with self._lock:
            while key is None or key in self.records:
                key = self.new_key()
            n = len(record.predictions)
            if n > self.max_rows:  # larger than the whole store: answered, never kept
                return key
            client = record.client
            self.records[key] = record
            self.stored_rows += n
            self._by_client.setdefault(client, OrderedDict())[key] = None
            self._reweigh(client, max(n, self._unit))
            if record.alias is not None:
                same = self._aliases.setdefault((client, record.alias), {})
                self.reused_ids += bool(same)
                same[key] = None
            while len(self.records) > self.max_records or self.stored_rows > self.max_rows:
                self._drop(self._oldest_of_heaviest())
                self.evicted += 1
            return key

    def find(self, request_id: str, *, client: str = "", alias: bool = True) -> str:
        """The key of the pending record named by `request_id`: its key or, with `alias`, the X-Request-ID
        that `client` (and only that client) sent with it. Raises KeyError if none, ValueError if the alias
        names several."""
        with self._lock:
            return self._find(request_id, client, alias)

    def pop(self, request_id: str, *, client: str = "", alias: bool = True, rows: int | None = None) -> Record:
        """Remove and return the record `request_id` names (as `find`), to be scored once.

        rows: the number of labels it is to be scored against; another count than the record's is a
        ValueError and the record stays. KeyError if none (unknown, already labelled, or evicted).
        """
        with self._lock:
            key = self._find(request_id, client, alias)
            rec = self.records[key]
            if rows is not None and rows != len(rec.predictions):
                raise ValueError(f"expected {len(rec.predictions)} labels for request {request_id}; got {rows}")
            return self._drop(key)

    def attach(self, key: str, variant: str, predictions: list) -> bool:
        """Add a shadow variant's predictions to the pending record `key`, to be scored with it; False if
        the record is gone (labelled or evicted first)."""
        with self._lock:
            rec = self.records.get(key)
            if rec is None:
                return False
            rec.others[variant] = predictions
            return True

    def summary(self) -> dict:
        """What is pending, for the report's `covers`."""
        with self._lock:
            return {"records": len(self.records), "rows": self.stored_rows, "clients": len(self._by_client),
                    "reused_client_ids": self.reused_ids}

    # ---- under the lock ----

    def _find(self, request_id: str, client: str, alias: bool) -> str:
        if request_id in self.records:
            return request_id
        keys = self._aliases.get((client, request_id)) if alias else None
        if not keys:
            raise KeyError(request_id)
        if len(keys) > 1:
            raise ValueError(f"request_id '{request_id}' was the X-Request-ID of {len(keys)} pending requests from this "
                             "client; expected the 'feedback_id' of the /predict response to label (each has its own)")
        return next(iter(keys))

    def _reweigh(self, client: str, delta: int) -> None:
        """Change a client's weight. The heap holds, for every client, an entry at least its weight: an
        increase pushes one, a decrease leaves the old (now too high) entry to be corrected when it
        reaches the top."""
        weight = self._weight.get(client, 0) + delta
        if weight <= 0:
            self._weight.pop(client, None)
            return
        self._weight[client] = weight
        if delta > 0:
            heapq.heappush(self._heap, (-weight, next(self._seq), client))
            if len(self._heap) > 2 * len(self._weight) + 64:  # compact: stale entries would grow without bound
                self._heap = [(-w, next(self._seq), c) for c, w in self._weight.items()]
                heapq.heapify(self._heap)

    def _oldest_of_heaviest(self) -> str:
        """The oldest key of the client whose records weigh the most (O(log clients) amortised)."""
        while True:
            neg_weight, _, client = self._heap[0]
            weight = self._weight.get(client, 0)
            if weight == -neg_weight:  # the top entry is exact: no client weighs more
                return next(iter(self._by_client[client]))
            heapq.heappop(self._heap)  # too high (or the client is gone): correct it
            if weight:
                heapq.heappush(self._heap, (-weight, next(self._seq), client))

    def _drop(self, key: str) -> Record:
        rec = self.records.pop(key)
        n = len(rec.predictions)
        self.stored_rows -= n
        keys = self._by_client[rec.client]
        del keys[key]
        if not keys:
            del self._by_client[rec.client]
        self._reweigh(rec.client, -max(n, self._unit))
        if rec.alias is not None:
            same = self._aliases[(rec.client, rec.alias)]
            del same[key]
            if not same:
                del self._aliases[(rec.client, rec.alias)]
        return rec
