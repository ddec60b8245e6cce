"""The store of records awaiting labels (service/feedback.py), through its interface alone: put, find,
pop, attach, len, rows, evicted, summary. Issue 20 will put a shared store behind the same interface;
these are the properties it must keep. Eviction is checked against a naive reference (a list in
arrival order, the weights recomputed from scratch at every eviction)."""

from __future__ import annotations

import random
import threading

import pytest

from service.feedback import FeedbackStore, Record


def rec(client: str = "", rows: int = 1, alias: str | None = None, variant: str = "ensemble") -> Record:
    return Record(variant, [0] * rows, client, alias)


class NaiveStore:
    """The eviction rule written the obvious way: records in arrival order; while over a bound, the
    clients of the greatest weight (sum over their records of max(rows, unit)) are the candidates, and
    each may lose only its oldest record. Ties between equally heavy clients may go either way, so the
    check accepts the store's evictions if some order of them follows the rule (`put`)."""

    def __init__(self, max_records: int, max_rows: int):
        self.max_records, self.max_rows = max_records, max_rows
        self.unit = max(1, -(-max_rows // max_records))
        self.items: list[tuple[str, str, int]] = []  # (key, client, rows), oldest first

    def candidates(self) -> set[str]:
        weight: dict[str, int] = {}
        for _, client, rows in self.items:
            weight[client] = weight.get(client, 0) + max(rows, self.unit)
        top = max(weight.values())
        return {next(k for k, c, _ in self.items if c == client) for client, w in weight.items() if w == top}

    def over(self) -> bool:
        return len(self.items) > self.max_records or sum(r for _, _, r in self.items) > self.max_rows

    def put(self, key: str, client: str, rows: int, evicted_by_store: set[str]) -> None:
        """Add the record, then replay the store's evictions: some order of them must, one at a time
        while over a bound, take a candidate each and stop within the bounds (ties make the order free,
        so the orders are searched)."""
        if rows > self.max_rows:
            assert not evicted_by_store, f"expected an oversized record to evict nothing; got {sorted(evicted_by_store)}"
            return
        self.items.append((key, client, rows))
        order = self._replay(self.items, frozenset(evicted_by_store))
        assert order is not None, (f"expected the store to evict, while over a bound, the oldest record of a "
                                   f"heaviest client each time; it evicted {sorted(evicted_by_store)} from "
                                   f"{[(k, c, r) for k, c, r in self.items]}")
        self.items = [item for item in self.items if item[0] not in evicted_by_store]

    def _replay(self, items: list, left: frozenset) -> list | None:
        saved, self.items = self.items, items
        try:
            if not self.over():
                return [] if not left else None
            for key in sorted(self.candidates() & left):
                rest = self._replay([item for item in items if item[0] != key], left - {key})
                if rest is not None:
                    return [key, *rest]
            return None
        finally:
            self.items = saved


@pytest.mark.parametrize("seed", range(6))
def test_eviction_matches_the_naive_reference(seed):
    rnd = random.Random(seed)
    max_records, max_rows = rnd.choice([(8, 40), (20, 30), (5, 1000), (50, 60)])
    store, naive = FeedbackStore(max_records, max_rows), NaiveStore(max_records, max_rows)
    clients = [f"c{i}" for i in range(rnd.randint(1, 6))]
    evicted = 0
    for i in range(400):
        before = set(store.records)
        rows, client = rnd.choice([1, 1, 2, 3, 7, max_rows // 2, max_rows + 1]), rnd.choice(clients)
        key = store.put(f"k{i}", rec(client, rows))
        assert key == f"k{i}", f"expected the free key k{i} to be kept; got {key}"
        kept = rows <= max_rows  # a record larger than the store is answered, never kept (nor evicted)
        gone = (before | ({key} if kept else set())) - set(store.records)  # it may be the one evicted
        evicted += len(gone)
        naive.put(key, client, rows, gone)
        assert set(store.records) == {k for k, _, _ in naive.items}
        assert len(store) == len(naive.items) and store.rows == sum(r for _, _, r in naive.items)
        assert len(store) <= max_records and store.rows <= max_rows
    assert store.evicted == evicted


def test_a_client_under_its_fair_share_is_never_evicted_by_a_flood():
    store = FeedbackStore(max_records=100, max_rows=1000)
    mine = [store.put(None, rec("small", 2)) for _ in range(10)]
    flood = [store.put(None, rec("flood", 3)) for _ in range(1000)]
    assert all(k in store for k in mine), "a client holding less than its share lost records to another's flood"
    assert store.evicted == 10 + 1000 - 100
    kept = [k for k in flood if k in store]
    assert kept == flood[-90:], "expected the flood to lose its own oldest records first"


def test_an_alias_names_a_record_only_for_the_client_that_sent_it():
    store = FeedbackStore()
    key = store.put(None, rec("alice", alias="req-1"))
    assert store.find("req-1", client="alice") == key
    with pytest.raises(KeyError):
        store.find("req-1", client="mallory")
    with pytest.raises(KeyError):
        store.find("req-1", client="alice", alias=False)  # the server's key only
    with pytest.raises(KeyError):
        store.pop("req-1", client="mallory")
    assert key in store, "a failed pop by another client removed the record"
    assert store.find(key, client="mallory") == key  # the server's key is the capability, whoever holds it


def test_a_reused_alias_is_ambiguous_and_never_replaces_a_record():
    store = FeedbackStore()
    first = store.put(None, rec("c", alias="same", variant="a"))
    second = store.put(None, rec("c", alias="same", variant="b"))
    other = store.put(None, rec("d", alias="same", variant="c"))
    assert len({first, second, other}) == 3 and len(store) == 3
    assert store.summary() == {"records": 3, "rows": 3, "clients": 2, "reused_client_ids": 1}
    with pytest.raises(ValueError, match="expected the 'feedback_id'"):
        store.pop("same", client="c")
    assert store.pop("same", client="d").variant == "c"  # d's alias names one record
    assert store.pop(first).variant == "a"
    assert store.pop("same", client="c").variant == "b"  # unambiguous again
    assert len(store) == 0 and store.rows == 0 and store.summary()["clients"] == 0


def test_a_taken_key_gets_a_fresh_one_and_an_oversized_record_is_not_kept():
    store = FeedbackStore(max_records=10, max_rows=5)
    assert store.put("k", rec("c", variant="first")) == "k"
    fresh = store.put("k", rec("c", variant="second"))
    assert fresh != "k" and len(fresh) == 32 and store.pop("k").variant == "first"
    big = store.put(None, rec("c", rows=6))
    assert big not in store and len(store) == 1 and store.rows == 1 and store.evicted == 0


def test_pop_checks_the_row_count_and_removes_once():
    store = FeedbackStore()
    key = store.put(None, rec("c", rows=2))
    with pytest.raises(ValueError, match="expected 2 labels for request .*; got 3"):
        store.pop(key, rows=3)
    assert key in store and store.rows == 2, "a wrong-length pop must leave the record"
    assert store.attach(key, "shadow", [1, 1]) is True
    popped = store.pop(key, rows=2)
    assert popped.others == {"shadow": [1, 1]} and popped.predictions == [0, 0]
    with pytest.raises(KeyError):
        store.pop(key, rows=2)
    assert store.attach(key, "late", [1, 1]) is False and len(store) == 0 and store.rows == 0


def test_concurrent_pops_of_one_record_score_it_once():
    store = FeedbackStore()
    keys = [store.put(None, rec(f"c{i % 3}", alias=f"a{i}")) for i in range(200)]
    wins: list[str] = []
    misses = [0]
    start = threading.Barrier(8)
    lock = threading.Lock()

    def worker(n: int) -> None:
        start.wait()
        for i, key in enumerate(keys):
            name, client = (key, "") if n % 2 else (f"a{i}", f"c{i % 3}")  # half by key, half by alias
            try:
                store.pop(name, client=client)
                with lock:
                    wins.append(key)
            except KeyError:
                with lock:
                    misses[0] += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(keys), "expected every record popped exactly once"
    assert misses[0] == 7 * len(keys) and len(store) == 0 and store.summary()["clients"] == 0
