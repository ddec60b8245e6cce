"""The shared, durable A/B store (issue 20): every worker and replica writes its observations and labels
to one database, so `/feedback` finds a request served by any of them and `/ab/report` is the same
whichever answers, across restarts and hot swaps.

Two backends behind one interface, chosen by `FUSION_AB_STORE` (service/config.py):
- `sqlite:///path/ab.db` (the default; `sqlite:` alone means `<state dir>/ab.db`, where the state dir is
  FUSION_STATE_DIR or `.fusion-state/` in the bundle root): WAL mode and a busy timeout, shared by the
  workers of one host;
- `postgresql://user@host:port/db`: psycopg 3 with a connection pool, shared by replicas.
(`memory` keeps today's per-process figures: service/ab.py's in-memory Stats, no store.)

The schema is created and migrated by the service: `schema_version` holds the applied numbers of the
`MIGRATIONS` below (plain SQL, run in order under a lock, each once). No ORM.

Writes of observations are off the request path: `enqueue` puts them on a bounded queue and one
background thread writes them in batches (one transaction each, at most every `FLUSH_S`). When the
store is unreachable the batches go to a local spool file (JSON lines, never pickle) and are replayed
once it answers again; what cannot be kept (a full queue, a full spool) is counted in
`fusion_ab_store_lost` (service/metrics.py). Every write is idempotent (keyed by the feedback id or an
event id), so a replay after a partial write counts nothing twice.

Labels are written synchronously, in one transaction that finds the record, checks it and marks it
labelled (`label`): a 200 from /feedback means the label is in the store; when the store cannot be
reached /feedback answers 503 and nothing is lost silently. A /feedback that arrives right after its
/predict, before the serving worker's batch reached the store, flushes this worker's queue and waits up
to FUSION_AB_FEEDBACK_WAIT_MS for the other workers' (only for ids of the server's 32-hex form).

Scoring: a labelled record is scored (`scores`: per variant, rows and correct, and against the ensemble
the paired both-right / only-variant / only-ensemble / neither counts) in the same transaction as its
label, and rescored when a shadow run's predictions arrive after the label. The figures the report and
the statistics of service/ab.py need are sums over these tables.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import queue
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fusion.errors import ConfigError, UnavailableError
from service.metrics import AB_STORE_LOST, AB_STORE_REPLAYED, AB_STORE_SPOOLED, AB_STORE_WRITE_ERRORS, AB_STORE_WRITER_ERRORS

log = logging.getLogger("fusion.service")

ENSEMBLE = "ensemble"
LATENCY_WINDOW = 20_000  # latencies per variant the percentiles are computed over (the newest), as ab.Window
MAX_VERSIONS = 16  # bundle versions listed in the report (the newest by last request)
FLUSH_S = 0.02  # the writer writes what is queued at least this often
BATCH = 512  # operations per write transaction
SYNC_TIMEOUT_S = 1.5  # a request (/feedback, /ab/report) waits at most this long for a pooled connection while
#                      the writer finds the store unreachable (503 soon), else BUSY_TIMEOUT_S (a busy pool)
BUSY_TIMEOUT_S = 10.0
RETRY_S = 2.0  # while the store is unreachable, how often the writer tries it again
RETENTION_EVERY_S = 3600.0  # how often the writer deletes what is older than the retention
_FID = re.compile(r"^[0-9a-f]{32}$")  # the server's ids (FeedbackStore.new_key): worth waiting for

# ---- the schema: numbered migrations, each applied once, in order -------------------------------------------
# Portable SQL (SQLite >= 3.24 and PostgreSQL >= 11): `?` placeholders are rewritten to `%s` for psycopg.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "observations, shadow runs, scores, events, rollout state", """
CREATE TABLE observations (
    fid TEXT PRIMARY KEY,            -- the feedback id (server-made, 32 hex digits)
    t DOUBLE PRECISION NOT NULL,     -- when it was answered (Unix seconds)
    version TEXT NOT NULL,           -- the bundle version that answered
    variant TEXT NOT NULL,
    client TEXT NOT NULL,            -- who sent it (address [token digest]): aliases are per client
    alias TEXT,                      -- the client's own X-Request-ID, if any
    n_rows INTEGER NOT NULL,
    latency DOUBLE PRECISION NOT NULL,
    predictions TEXT NOT NULL,       -- JSON list, one class label (or value) per row
    labels TEXT,                     -- JSON list once labelled, else NULL
    labelled_at DOUBLE PRECISION
);
CREATE INDEX observations_alias ON observations (client, alias);
CREATE INDEX observations_variant_t ON observations (variant, t);
CREATE INDEX observations_t ON observations (t);
CREATE TABLE shadows (
    fid TEXT NOT NULL,
    variant TEXT NOT NULL,           -- the shadow variant
    t DOUBLE PRECISION NOT NULL,
    version TEXT NOT NULL,
    latency DOUBLE PRECISION NOT NULL,
    predictions TEXT NOT NULL,
    pair_variant TEXT,               -- the non-ensemble side of a pair with the ensemble, else NULL
    agree INTEGER NOT NULL,          -- rows on which the pair agrees
    compared INTEGER NOT NULL,       -- rows compared (0 without a pair)
    PRIMARY KEY (fid, variant)
);
CREATE INDEX shadows_t ON shadows (t);
CREATE TABLE scores (
    fid TEXT NOT NULL,
    variant TEXT NOT NULL,
    t DOUBLE PRECISION NOT NULL,
    version TEXT NOT NULL,
    n_rows INTEGER NOT NULL,
    correct INTEGER NOT NULL,
    both_right INTEGER,              -- against the ensemble on the same rows (NULL: no pair)
    only_variant INTEGER,
    only_ensemble INTEGER,
    neither INTEGER,
    PRIMARY KEY (fid, variant)
);
CREATE INDEX scores_t ON scores (t);
CREATE TABLE events (
    id TEXT PRIMARY KEY,             -- made by the writer: a replay inserts nothing twice
    t DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL,              -- cascade | shadow_failure
    name TEXT NOT NULL,              -- answered/escalated | variant:reason
    n BIGINT NOT NULL
);
CREATE INDEX events_t ON events (t);
CREATE TABLE rollout (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL,         -- compare-and-set: a write names the version it read
    state TEXT NOT NULL,             -- JSON object
    updated DOUBLE PRECISION NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""),
    (2, "covering indexes for the report's sums", """
CREATE INDEX shadows_variant_t ON shadows (variant, t);
CREATE INDEX shadows_pair ON shadows (pair_variant, agree, compared);
CREATE INDEX observations_variant_rows ON observations (variant, n_rows);
CREATE INDEX observations_version ON observations (version, t, n_rows);
CREATE INDEX observations_pending ON observations (client, n_rows) WHERE labels IS NULL;
"""),
    (3, "request outcomes (the rollout's fleet-wide error rate) and the confidence sequence's history", """
CREATE TABLE outcomes (
    id TEXT PRIMARY KEY,             -- made at enqueue: a replay inserts nothing twice
    t DOUBLE PRECISION NOT NULL,
    version TEXT NOT NULL,           -- the bundle version that served (or failed) it
    variant TEXT NOT NULL,
    failed INTEGER NOT NULL          -- 1: the request failed once its variant was chosen, 0: answered
);
CREATE INDEX outcomes_variant ON outcomes (variant, version, failed);
CREATE INDEX outcomes_t ON outcomes (t);
CREATE TABLE cs_history (
    variant TEXT NOT NULL,
    t DOUBLE PRECISION NOT NULL,     -- when the report (or a rollout evaluation) computed it
    analysis TEXT,                   -- paired | unpaired | agreement
    n BIGINT NOT NULL,
    estimate DOUBLE PRECISION,
    ci_low DOUBLE PRECISION,
    ci_high DOUBLE PRECISION,
    decision TEXT NOT NULL,
    PRIMARY KEY (variant, t)
);
"""),
]
_SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                 "applied DOUBLE PRECISION NOT NULL, description TEXT NOT NULL)")
_PG_LOCK = 0x46_55_53_49_4F_4E  # pg_advisory_xact_lock key of the migrations ("FUSION")


# ---- the URL -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreURL:
    kind: str  # "memory" | "sqlite" | "postgresql"
    target: str = ""  # the SQLite file ("" = the default under the state dir) or the PostgreSQL conninfo URL

    @classmethod
    def parse(cls, text: str) -> "StoreURL":
        """`memory`, `sqlite:` / `sqlite:///abs/path.db` / `sqlite:///./rel.db`, or `postgresql://...`
        (`postgres://` too); ValueError says what was expected."""
        text = text.strip()
        if text in ("", "sqlite", "sqlite:", "sqlite://"):
            return cls("sqlite")
        if text == "memory":
            return cls("memory")
        if text.startswith("sqlite:///"):
            path = text[len("sqlite:///"):]
            if not path:
                return cls("sqlite")
            return cls("sqlite", path if path.startswith((".", "~")) else "/" + path)
        if text.startswith(("postgresql://", "postgres://")):
            if len(text.split("://", 1)[1]) == 0:
                raise ValueError("expected postgresql://[user[:password]@]host[:port]/database")
            return cls("postgresql", text)
        raise ValueError("expected 'sqlite:///path/ab.db', 'postgresql://user@host:port/db' or 'memory'")

    def describe(self) -> str:
        """The store without credentials (the report's `covers`, the logs)."""
        if self.kind != "postgresql":
            return f"{self.kind}:{self.target}" if self.target else self.kind
        rest = self.target.split("://", 1)[1]
        host = rest.rpartition("@")[2].split("?")[0]
        return f"postgresql://{host}"


@dataclass(frozen=True)
class StoreConfig:
    url: str = "memory"
    state_dir: str = ""  # where the default SQLite file and the spool live ("" = a temporary directory)
    retention_days: float = 30.0  # 0 = keep everything
    queue: int = 10_000  # observations waiting for the writer beyond this are lost (and counted)
    feedback_wait_ms: float = 1000.0
    spool_max_mb: float = 64.0


# ---- backends: a transaction that runs `?` SQL --------------------------------------------------------------


class _Tx:
    """One transaction's cursor with `?` placeholders on either backend."""

    def __init__(self, cur, pg: bool):
        self.cur, self.pg = cur, pg
        self.for_update = " FOR UPDATE" if pg else ""  # SQLite: BEGIN IMMEDIATE already serialises writers

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def run(self, sql: str, params: tuple | list = ()) -> int:
        self.cur.execute(self._sql(sql), params)
        return self.cur.rowcount

    def many(self, sql: str, rows: list) -> None:
        if rows:
            self.cur.executemany(self._sql(sql), rows)

    def rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        self.cur.execute(self._sql(sql), params)
        return self.cur.fetchall()


class _SQLite:
    pg = False

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")  # the other workers' writes: wait, do not fail
            conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a process crash
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def tx(self, write: bool = True, timeout: float | None = None) -> Iterator[_Tx]:
        conn = self._conn()  # timeout: PostgreSQL's pool wait; SQLite waits on its busy timeout
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _Tx(conn.cursor(), False)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        finally:  # a failed COMMIT (busy, disk full, a deferred constraint) leaves the transaction open
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def lock_migrations(self, tx: _Tx) -> None:
        pass  # BEGIN IMMEDIATE holds the database's write lock

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class _Postgres:
    pg = True

    def __init__(self, url: str):
        import psycopg  # noqa: F401 - imported here: only a PostgreSQL store needs it
        from psycopg_pool import ConnectionPool

        # open=False, then open(wait=False): the service starts (and predicts) while PostgreSQL is down;
        # check: a connection broken by a restart of PostgreSQL is replaced before it is handed out
        self.pool = ConnectionPool(url, min_size=1, max_size=8, open=False, timeout=5.0,
                                   check=ConnectionPool.check_connection,
                                   kwargs={"connect_timeout": 3, "application_name": "fusion-serve"})
        self.pool.open(wait=False)

    @contextlib.contextmanager
    def tx(self, write: bool = True, timeout: float | None = None) -> Iterator[_Tx]:
        with self.pool.connection(timeout=timeout) as conn:  # commits on success, rolls back on an exception
            with conn.cursor() as cur:
                yield _Tx(cur, True)

    def lock_migrations(self, tx: _Tx) -> None:
        tx.run("SELECT pg_advisory_xact_lock(?)", (_PG_LOCK,))

    def close(self) -> None:
        self.pool.close(timeout=2.0)


def _db_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error, OSError]
    try:
        import psycopg
        from psycopg_pool import PoolTimeout

        errors += [psycopg.Error, PoolTimeout]
    except ImportError:
        pass
    return tuple(errors)


# ---- the store ---------------------------------------------------------------------------------------------


def _j(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


OP_FIELDS = {  # what each queued (and spooled) operation holds: `write` reads every one of them
    "obs": ("fid", "t", "version", "variant", "client", "alias", "latency", "predictions"),
    "shadow": ("fid", "t", "version", "variant", "latency", "predictions", "pair_variant", "agree", "compared"),
    "event": ("id", "t", "kind", "name", "n"),
    "outcome": ("id", "t", "version", "variant", "failed"),
}


def _is_op(op: Any) -> bool:
    """A spooled line is an operation `write` can write (a JSON object with its op's fields)."""
    return isinstance(op, dict) and op.get("op") in OP_FIELDS and all(k in op for k in OP_FIELDS[op["op"]])


def _storable(text: str) -> bool:
    """A client's id the database can hold (no NUL for PostgreSQL, no lone surrogate for UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


POINT_KEYS = ("t", "analysis", "n", "estimate", "ci_low", "ci_high", "decision")  # one point of the confidence sequence


def _point(row: tuple) -> dict:
    """A cs_history row (POINT_KEYS order) as the report's dict; a database's numbers as floats/ints."""
    t, analysis, n, est, lo, hi, decision = row
    f = lambda x: None if x is None else float(x)  # noqa: E731
    return {"t": float(t), "analysis": analysis, "n": int(n), "estimate": f(est), "ci_low": f(lo), "ci_high": f(hi),
            "decision": decision}


def due_point(last: dict | None, point: dict, step: float) -> bool:
    """Whether `point` joins a confidence sequence's history whose newest point is `last`: the first, a new
    decision or analysis, or rows grown by `step` (a fraction of the last point's, at least one row)."""
    if last is None or (last["analysis"], last["decision"]) != (point["analysis"], point["decision"]):
        return True
    return point["n"] >= last["n"] + max(1, math.ceil(last["n"] * step))


def score(variant: str, predictions: list, others: dict[str, list], labels: list) -> dict[str, tuple]:
    """Per variant scored on `labels` (the primary `variant` and the shadows in `others`): (rows, correct,
    paired) with paired = [both right, only the variant right, only the ensemble right, neither] against
    the ensemble's predictions on the same rows, or None when the ensemble's are not known."""
    scored = {variant: predictions, **others}
    ens = scored.get(ENSEMBLE)
    out = {}
    for name, preds in scored.items():
        correct = sum(int(p == y) for p, y in zip(preds, labels))
        paired = None
        if ens is not None and name != ENSEMBLE:
            paired = [0, 0, 0, 0]
            for p, e, y in zip(preds, ens, labels):
                paired[(p != y) * 2 + (e != y)] += 1  # 0 both right, 1 only v right, 2 only e right, 3 neither
        out[name] = (len(labels), correct, paired)
    return out


class ABStore:
    """The durable store (module docstring): a background writer for observations, synchronous labels,
    the report's figures, and the rollout state (compare-and-set)."""

    def __init__(self, cfg: StoreConfig):
        url = StoreURL.parse(cfg.url)
        if url.kind == "memory":
            raise ConfigError("FUSION_AB_STORE: 'memory' has no shared store (service/ab.py keeps the figures in-process)")
        self.cfg = cfg
        self.state_dir = _state_dir(cfg.state_dir)
        if url.kind == "sqlite":
            path = Path(url.target).expanduser() if url.target else self.state_dir / "ab.db"
            url = StoreURL("sqlite", str(path.absolute()))
            self.db: _SQLite | _Postgres = _SQLite(path)
        else:
            self.db = _Postgres(url.target)
        self.url = url
        self._errors = _db_errors()
        self._schema_ok = False
        self._schema_lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self.spool = self.state_dir / f"ab-spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._spool_lock = threading.Lock()
        self.down_since: float | None = None  # the writer found the store unreachable at this time
        self.lost = 0
        # operations queued and operations the writer is done with (written, spooled or lost): equal when
        # nothing this worker queued is still on its way to the store (label() then need not flush)
        self._queued, self._settled = 0, 0
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ab-store-writer", daemon=True)
        try:
            self.ensure_schema()
        except self._errors as exc:  # unreachable now: the writer retries; predictions answer meanwhile
            log.warning("A/B store %s unreachable at start (%s); observations spool to %s until it answers",
                        self.url.describe(), exc, self.spool)
            self.down_since = time.time()
        self._thread.start()
        atexit.register(self.close)  # a worker that exits writes (or spools) what it still has queued

    # ---- schema --------------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Apply the migrations not yet applied (each once, under the migration lock)."""
        if self._schema_ok:
            return
        with self._schema_lock:
            if self._schema_ok:
                return
            with self.db.tx() as tx:
                tx.run(_SCHEMA_TABLE)
                self.db.lock_migrations(tx)
                done = {v for (v,) in tx.rows("SELECT version FROM schema_version")}
                for number, description, sql in MIGRATIONS:
                    if number in done:
                        continue
                    for statement in filter(str.strip, sql.split(";")):
                        tx.run(re.sub(r"--[^\n]*", "", statement))
                    tx.run("INSERT INTO schema_version (version, applied, description) VALUES (?, ?, ?)",
                           (number, time.time(), description))
                    if number == 1:
                        tx.run("INSERT INTO meta (key, value) VALUES ('created', ?)", (repr(time.time()),))
            self._schema_ok = True

    def schema_version(self) -> int:
        self.ensure_schema()
        with self.db.tx(write=False) as tx:
            return max((v for (v,) in tx.rows("SELECT version FROM schema_version")), default=0)

    # ---- observations: queued, written by the background thread ---------------------------------------

    def observe(self, fid: str, *, variant: str, version: str | None, client: str, alias: str | None,
                latency: float, predictions: list) -> None:
        """Queue an answered request (its record awaits /feedback in the store)."""
        self._put({"op": "obs", "fid": fid, "t": time.time(), "version": version or "", "variant": variant,
                   "client": client, "alias": alias, "latency": latency, "predictions": predictions})

    def observe_shadow(self, fid: str, *, variant: str, version: str | None, latency: float, predictions: list,
                       pair_variant: str | None, agree: int, compared: int) -> None:
        self._put({"op": "shadow", "fid": fid, "t": time.time(), "version": version or "", "variant": variant,
                   "latency": latency, "predictions": predictions, "pair_variant": pair_variant,
                   "agree": agree, "compared": compared})

    def event(self, kind: str, name: str, n: int) -> None:
        """A counted event (cascade rows answered/escalated, shadow failures by reason)."""
        if n:
            self._put({"op": "event", "id": uuid.uuid4().hex, "t": time.time(), "kind": kind, "name": name, "n": n})

    def outcome(self, *, variant: str, version: str | None, failed: bool) -> None:
        """A request whose variant was chosen: answered or failed (the rollout's error-rate guardrail,
        summed over every worker and replica). Only a failure is queued: every answered request is an
        observation already (`_figures` counts them as answered), so the hot path queues one entry, not two."""
        if not failed:
            return
        self._put({"op": "outcome", "id": uuid.uuid4().hex, "t": time.time(), "version": version or "",
                   "variant": variant, "failed": int(bool(failed))})

    def _put(self, op: dict) -> None:
        try:
            with self._count_lock:  # counted with the put, so that _settled never passes _queued
                self.queue.put_nowait(op)
                self._queued += 1
        except queue.Full:
            self._lose("queue_full", 1)

    def _lose(self, reason: str, n: int) -> None:
        self.lost += n
        AB_STORE_LOST.labels(reason).inc(n)
        log.warning("A/B store: %d observation(s) lost (%s)", n, reason)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what was queued before this call is written (or spooled); False on timeout."""
        if not self._thread.is_alive():
            return False
        deadline = time.monotonic() + timeout  # one deadline for getting into the queue and being written
        done = threading.Event()
        try:
            self.queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        next_retention = 0.0
        while not self._stop.is_set() or not self.queue.empty():
            batch, waiters = [], []
            try:
                batch, waiters = self._take()
                if batch:
                    self._write_or_spool(batch)
                elif self.down_since is None and self._spool_files():
                    self._replay()
                if self.down_since is not None and time.time() - self.down_since >= RETRY_S:
                    self._replay()
                if self.cfg.retention_days > 0 and self.down_since is None and time.time() >= next_retention:
                    next_retention = time.time() + RETENTION_EVERY_S
                    with contextlib.suppress(*self._errors):
                        self.apply_retention()
            except Exception:  # noqa: BLE001 - e.g. a malformed operation: the writer must outlive it, or the queue fills
                AB_STORE_WRITER_ERRORS.inc()
                if batch:
                    self._lose("writer_error", len(batch))
                log.exception("A/B store %s: the writer skipped a batch of %d operation(s) it could not write",
                              self.url.describe(), len(batch))
            finally:
                self._settled += len(batch)  # only this thread writes it
                for w in waiters:
                    w.set()

    def _take(self) -> tuple[list[dict], list[threading.Event]]:
        batch: list[dict] = []
        waiters: list[threading.Event] = []
        try:
            item = self.queue.get(timeout=0.25)
        except queue.Empty:
            return batch, waiters
        deadline = time.monotonic() + FLUSH_S
        while True:
            if isinstance(item, threading.Event):
                waiters.append(item)
                break  # write what precedes the flush request now
            batch.append(item)
            if len(batch) >= BATCH:
                break
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
        return batch, waiters

    def _write_or_spool(self, batch: list[dict]) -> None:
        if self.down_since is None:
            try:
                self.ensure_schema()
                self.write(batch)
                return
            except self._errors as exc:
                AB_STORE_WRITE_ERRORS.inc()
                log.warning("A/B store %s: write failed (%s); spooling to %s", self.url.describe(), exc, self.spool)
                self.down_since = time.time()
        self._spool(batch)

    def _spool(self, batch: list[dict]) -> None:
        limit = self.cfg.spool_max_mb * (1 << 20)
        with self._spool_lock:
            try:
                size = self.spool.stat().st_size if self.spool.exists() else 0
                lines = [_j(op) + "\n" for op in batch]
                keep = []
                for line in lines:
                    if size + len(line) > limit:
                        break
                    keep.append(line)
                    size += len(line)
                with self.spool.open("a", encoding="utf-8") as f:
                    f.writelines(keep)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                log.warning("A/B store: cannot spool to %s (%s)", self.spool, exc)
                keep = []
        AB_STORE_SPOOLED.inc(len(keep))
        if len(keep) < len(batch):
            self._lose("spool_full", len(batch) - len(keep))

    def _spool_files(self) -> list[Path]:
        """This process's spool and any left by a process that ended (claimed by renaming: one replayer)."""
        files = [self.spool] if self.spool.exists() else []
        for orphan in self.state_dir.glob("ab-spool-*.jsonl"):
            pid = orphan.name.split("-")[2]
            if orphan == self.spool or not pid.isdigit() or _alive(int(pid)):
                continue
            claimed = self.state_dir / f"ab-replay-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            with contextlib.suppress(OSError):
                orphan.rename(claimed)
                files.append(claimed)
        files += [p for p in self.state_dir.glob(f"ab-replay-{os.getpid()}-*.jsonl") if p not in files]
        return files

    def _replay(self) -> None:
        """Write the spooled operations, oldest first; a file is removed once all of it is written."""
        try:
            self.ensure_schema()
            with self.db.tx(write=False, timeout=SYNC_TIMEOUT_S) as tx:  # reachable? (even with nothing to replay)
                tx.rows("SELECT 1")
            with self._spool_lock:
                for path in self._spool_files():
                    ops, bad = [], 0
                    for line in path.read_text(encoding="utf-8").splitlines():
                        try:
                            op = json.loads(line)
                        except ValueError:  # a line cut by a crash mid-write
                            bad += 1
                            continue
                        if _is_op(op):
                            ops.append(op)
                        else:  # valid JSON but no operation: skipped, or the file would be replayed forever
                            bad += 1
                    for i in range(0, len(ops), BATCH):
                        self.write(ops[i:i + BATCH])
                    path.unlink()
                    AB_STORE_REPLAYED.inc(len(ops))
                    if bad:
                        self._lose("spool_unreadable", bad)
                    if ops:
                        log.info("A/B store %s: replayed %d spooled operation(s) from %s", self.url.describe(), len(ops), path.name)
            if self.down_since is not None:
                log.info("A/B store %s reachable again", self.url.describe())
            self.down_since = None
        except self._errors as exc:
            self.down_since = time.time()
            log.debug("A/B store still unreachable: %s", exc)

    def write(self, ops: list[dict]) -> None:
        """Write operations in one transaction (idempotent: a replay writes nothing twice)."""
        obs = [(o["fid"], o["t"], o["version"], o["variant"], o["client"], o["alias"], len(o["predictions"]),
                o["latency"], _j(o["predictions"])) for o in ops if o["op"] == "obs"]
        shadows = [o for o in ops if o["op"] == "shadow"]
        events = [(o["id"], o["t"], o["kind"], o["name"], o["n"]) for o in ops if o["op"] == "event"]
        outcomes = [(o["id"], o["t"], o["version"], o["variant"], o["failed"]) for o in ops if o["op"] == "outcome"]
        with self.db.tx() as tx:
            tx.many("INSERT INTO outcomes (id, t, version, variant, failed) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING", outcomes)
            tx.many("INSERT INTO observations (fid, t, version, variant, client, alias, n_rows, latency, predictions) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fid) DO NOTHING", obs)
            tx.many("INSERT INTO shadows (fid, variant, t, version, latency, predictions, pair_variant, agree, compared) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fid, variant) DO NOTHING",
                    [(o["fid"], o["variant"], o["t"], o["version"], o["latency"], _j(o["predictions"]),
                      o["pair_variant"], o["agree"], o["compared"]) for o in shadows])
            tx.many("INSERT INTO events (id, t, kind, name, n) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING", events)
            for fid in dict.fromkeys(o["fid"] for o in shadows):  # a shadow after its label: score it too
                row = tx.rows(f"SELECT labels FROM observations WHERE fid = ?{tx.for_update}", (fid,))
                if row and row[0][0] is not None:
                    self._rescore(tx, fid)

    # ---- labels: synchronous ------------------------------------------------------------------------

    def label(self, request_id: str, labels: list, *, client: str = "", alias: bool = True) -> dict:
        """Label the record `request_id` names (its feedback id or, with `alias`, the X-Request-ID `client`
        sent with it) and score it; returns {"variants", "rows", "correct": {variant: n}}.

        KeyError: unknown (after flushing this worker's queue and, for a server-made id, waiting for the
        other workers' writes), already labelled, or dropped by the retention. ValueError: an alias that
        names several pending records, or a label count other than the record's rows (the record stays).
        UnavailableError: the store cannot be reached (nothing was written; the client may retry)."""
        if not _storable(request_id) or not _storable(client):
            raise KeyError(request_id)
        deadline = time.monotonic() + self.cfg.feedback_wait_ms / 1e3
        flushed = False
        while True:
            try:
                self.ensure_schema()
                found = self._label_once(request_id, labels, client, alias)
            except self._errors as exc:
                self.down_since = self.down_since or time.time()  # the next requests wait briefly; the writer retries
                raise UnavailableError(f"the A/B store ({self.url.describe()}) cannot be reached ({type(exc).__name__}); "
                                       "expected it to answer: the label was not recorded, retry later") from None
            if found is not None:
                return found
            if not flushed:  # this worker's own batch may still be queued, or taken by the writer and not yet written
                flushed = True
                if self._settled != self._queued:
                    self.flush(timeout=max(0.1, deadline - time.monotonic()))
                continue
            if not _FID.match(request_id) or time.monotonic() >= deadline:
                raise KeyError(request_id)
            time.sleep(0.02)  # another worker's batch: written within FLUSH_S, unless its store is slow

    def _label_once(self, request_id: str, labels: list, client: str, alias: bool) -> dict | None:
        """None: no such record (yet). KeyError: labelled already."""
        sel = "SELECT fid, variant, predictions, labels, version FROM observations WHERE "
        with self.db.tx(timeout=self._wait_s()) as tx:
            rows = tx.rows(f"{sel}fid = ?{tx.for_update}", (request_id,))
            if not rows and alias:
                rows = tx.rows(f"{sel}client = ? AND alias = ? AND labels IS NULL{tx.for_update}", (client, request_id))
                if len(rows) > 1:
                    raise ValueError(f"request_id '{request_id}' was the X-Request-ID of {len(rows)} pending requests from "
                                     "this client; expected the 'feedback_id' of the /predict response to label (each has its own)")
            if not rows:
                return None
            fid, variant, preds, done, version = rows[0]
            if done is not None:
                raise KeyError(request_id)
            preds = json.loads(preds)
            if len(preds) != len(labels):
                raise ValueError(f"expected {len(preds)} labels for request {request_id}; got {len(labels)}")
            if tx.run("UPDATE observations SET labels = ?, labelled_at = ? WHERE fid = ? AND labels IS NULL",
                      (_j(labels), time.time(), fid)) != 1:
                raise KeyError(request_id)  # labelled meanwhile (not reachable under the row lock)
            scored = self._rescore(tx, fid)
        return {"variants": sorted(scored), "rows": len(labels), "correct": {v: c for v, (_, c, _) in scored.items()}}

    def _rescore(self, tx: _Tx, fid: str) -> dict[str, tuple]:
        """(Re)compute the record's scores from its predictions, its shadows' and its labels."""
        (variant, preds, labels, version), = tx.rows(
            "SELECT variant, predictions, labels, version FROM observations WHERE fid = ?", (fid,))
        others = {v: json.loads(p) for v, p in tx.rows("SELECT variant, predictions FROM shadows WHERE fid = ?", (fid,))}
        others.pop(variant, None)
        scored = score(variant, json.loads(preds), others, json.loads(labels))
        tx.run("DELETE FROM scores WHERE fid = ?", (fid,))
        now = time.time()
        tx.many("INSERT INTO scores (fid, variant, t, version, n_rows, correct, both_right, only_variant, only_ensemble, "
                "neither) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(fid, name, now, version, n, c, *(p if p is not None else (None,) * 4)) for name, (n, c, p) in scored.items()])
        return scored

    def _wait_s(self) -> float:
        """How long a request waits for a pooled connection: briefly while the store is known unreachable."""
        return SYNC_TIMEOUT_S if self.down_since is not None else BUSY_TIMEOUT_S

    # ---- the report's figures -----------------------------------------------------------------------

    def figures(self) -> dict:
        """Everything `/ab/report` shows, summed over the store (every worker and replica, every version
        within the retention). Latencies: the newest LATENCY_WINDOW per variant, in seconds."""
        try:
            self.ensure_schema()
            with self.db.tx(write=False, timeout=self._wait_s()) as tx:
                return self._figures(tx)
        except self._errors as exc:
            raise UnavailableError(f"the A/B store ({self.url.describe()}) cannot be reached ({type(exc).__name__}); "
                                   "expected it to answer: retry later") from None

    def _figures(self, tx: _Tx) -> dict:
        variants: dict[str, dict] = {}

        def v(name: str) -> dict:
            return variants.setdefault(name, {"requests": 0, "rows": 0, "latencies": [], "shadow_latencies": [],
                                              "agree": 0, "compared": 0, "correct": 0, "labelled": 0})

        for name, n, rows in tx.rows("SELECT variant, COUNT(*), SUM(n_rows) FROM observations GROUP BY variant"):
            v(name).update(requests=int(n), rows=int(rows or 0))
        for (name,) in tx.rows("SELECT DISTINCT variant FROM shadows"):
            v(name)
        for name, agree, compared in tx.rows("SELECT pair_variant, SUM(agree), SUM(compared) FROM shadows "
                                             "WHERE pair_variant IS NOT NULL GROUP BY pair_variant"):
            v(name).update(agree=int(agree or 0), compared=int(compared or 0))
        paired = {}
        for name, n, c, b, ov, oe, ne in tx.rows(
                "SELECT variant, SUM(n_rows), SUM(correct), SUM(both_right), SUM(only_variant), SUM(only_ensemble), "
                "SUM(neither) FROM scores GROUP BY variant"):
            v(name).update(labelled=int(n or 0), correct=int(c or 0))
            if b is not None:
                paired[name] = [int(b), int(ov), int(oe), int(ne)]
        outcomes: dict[str, dict] = {}
        # answered: the observations (one per answered request); failed: the outcomes table's failures (its
        # answered rows, written before the observation stood for them, would count twice: not read)
        for name, version, n in tx.rows("SELECT variant, version, COUNT(*) FROM observations GROUP BY variant, version"):
            outcomes.setdefault(name, {}).setdefault(version, [0, 0])[0] += int(n)
        for name, version, n in tx.rows(
                "SELECT variant, version, COUNT(*) FROM outcomes WHERE failed = 1 GROUP BY variant, version"):
            outcomes.setdefault(name, {}).setdefault(version, [0, 0])[1] += int(n)
        for name in outcomes:
            v(name)
        history: dict[str, list] = {}
        for row in tx.rows("SELECT variant, t, analysis, n, estimate, ci_low, ci_high, decision FROM cs_history "
                           "ORDER BY variant, t"):
            history.setdefault(row[0], []).append(_point(row[1:]))
        for name, d in variants.items():
            d["latencies"] = [x for (x,) in tx.rows(
                "SELECT latency FROM observations WHERE variant = ? ORDER BY t DESC, fid LIMIT ?", (name, LATENCY_WINDOW))]
            d["shadow_latencies"] = [x for (x,) in tx.rows(
                "SELECT latency FROM shadows WHERE variant = ? ORDER BY t DESC, fid LIMIT ?", (name, LATENCY_WINDOW))]
        cascade = {"answered": 0, "escalated": 0}
        failures = {}
        for kind, name, n in tx.rows("SELECT kind, name, SUM(n) FROM events GROUP BY kind, name ORDER BY kind, name"):
            if kind == "cascade":
                cascade[name] = int(n)
            else:
                failures[name] = int(n)
        versions = {}
        for version, n, rows, labelled, first, last in tx.rows(
                "SELECT version, COUNT(*), SUM(n_rows), SUM(CASE WHEN labels IS NULL THEN 0 ELSE n_rows END), MIN(t), MAX(t) "
                "FROM observations GROUP BY version ORDER BY MAX(t) DESC, version"):
            versions[version] = {"requests": int(n), "rows": int(rows or 0), "labelled_rows": int(labelled or 0),
                                 "first_request": float(first), "last_request": float(last)}
        listed = dict(reversed(list(versions.items())[:MAX_VERSIONS]))  # oldest first, as the in-memory report
        (pending, pending_rows, clients), = tx.rows(
            "SELECT COUNT(*), SUM(n_rows), COUNT(DISTINCT client) FROM observations WHERE labels IS NULL")
        (reused,), = tx.rows("SELECT COALESCE(SUM(c - 1), 0) FROM (SELECT COUNT(*) AS c FROM observations "
                             "WHERE labels IS NULL AND alias IS NOT NULL GROUP BY client, alias) AS g")
        created = tx.rows("SELECT value FROM meta WHERE key = 'created'")
        return {
            "variants": dict(sorted(variants.items())), "paired": paired, "cascade": cascade,
            "shadow_failures": failures, "versions": listed, "versions_dropped": max(0, len(versions) - MAX_VERSIONS),
            "pending": {"records": int(pending), "rows": int(pending_rows or 0), "clients": int(clients),
                        "reused_client_ids": int(reused)},
            "since": float(created[0][0]) if created else time.time(),
            "outcomes": outcomes, "history": history,
        }

    def record_history(self, points: dict[str, dict], step: float, keep: int) -> dict[str, list]:
        """Add each variant's point (POINT_KEYS) where `due_point` says so against the newest
        stored point, read under the write lock (so that workers reading at once add it once: all show the
        same series), keep the newest `keep` per variant; returns every variant's series after the write
        (oldest first)."""
        try:
            self.ensure_schema()
            with self.db.tx(timeout=self._wait_s()) as tx:
                for name, p in points.items():
                    last = tx.rows("SELECT t, analysis, n, estimate, ci_low, ci_high, decision FROM cs_history "
                                   f"WHERE variant = ? ORDER BY t DESC LIMIT 1{tx.for_update}", (name,))
                    if not due_point(_point(last[0]) if last else None, p, step):
                        continue
                    tx.run("INSERT INTO cs_history (variant, t, analysis, n, estimate, ci_low, ci_high, decision) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (variant, t) DO NOTHING",
                           (name, p["t"], p["analysis"], p["n"], p["estimate"], p["ci_low"], p["ci_high"], p["decision"]))
                    tx.run("DELETE FROM cs_history WHERE variant = ? AND t < (SELECT MIN(t) FROM (SELECT t FROM cs_history "
                           "WHERE variant = ? ORDER BY t DESC LIMIT ?) AS newest)", (name, name, keep))
                history: dict[str, list] = {}
                for row in tx.rows("SELECT variant, t, analysis, n, estimate, ci_low, ci_high, decision FROM cs_history "
                                   "ORDER BY variant, t"):
                    history.setdefault(row[0], []).append(_point(row[1:]))
                return history
        except self._errors as exc:
            raise UnavailableError(f"the A/B store ({self.url.describe()}) cannot be reached ({type(exc).__name__}); "
                                   "expected it to answer: retry later") from None

    def describe(self) -> dict:
        """The store, for the report's `covers`: where, since when, how long data is kept, its health."""
        return {"url": self.url.describe(), "retention_days": self.cfg.retention_days or None,
                "reachable": self.down_since is None, "queued": self.queue.qsize(),
                "spooled": sum(1 for _ in self._iter_spool_lines()), "lost_by_this_worker": self.lost}

    def _iter_spool_lines(self) -> Iterator[str]:
        with contextlib.suppress(OSError), self.spool.open(encoding="utf-8") as f:
            yield from f

    # ---- retention --------------------------------------------------------------------------------------

    def apply_retention(self, now: float | None = None) -> int:
        """Delete what is older than the retention (records, their shadows and scores, events); returns the
        number of records deleted."""
        if self.cfg.retention_days <= 0:
            return 0
        cutoff = (now or time.time()) - self.cfg.retention_days * 86400
        with self.db.tx() as tx:
            tx.run("DELETE FROM scores WHERE fid IN (SELECT fid FROM observations WHERE t < ?)", (cutoff,))
            tx.run("DELETE FROM shadows WHERE t < ?", (cutoff,))
            tx.run("DELETE FROM events WHERE t < ?", (cutoff,))
            tx.run("DELETE FROM outcomes WHERE t < ?", (cutoff,))
            tx.run("DELETE FROM cs_history WHERE t < ?", (cutoff,))
            return tx.run("DELETE FROM observations WHERE t < ?", (cutoff,))

    # ---- rollout state: compare-and-set, no leader --------------------------------------------------------

    def rollout_get(self, name: str) -> tuple[int, dict] | None:
        """(version, state) of the rollout `name`, or None if none was written. UnavailableError when the
        store cannot be reached."""
        try:
            self.ensure_schema()
            with self.db.tx(write=False, timeout=self._wait_s()) as tx:
                rows = tx.rows("SELECT version, state FROM rollout WHERE name = ?", (name,))
        except self._errors as exc:
            raise UnavailableError(f"the A/B store ({self.url.describe()}) cannot be reached ({type(exc).__name__})") from None
        return (int(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def rollout_cas(self, name: str, expected_version: int, state: dict) -> bool:
        """Write `state` as version expected_version + 1 if the stored version is `expected_version`
        (0: create, only if absent); True if written. Every replica may call it: one wins each step."""
        text, now = _j(state), time.time()
        try:
            self.ensure_schema()
            with self.db.tx(timeout=self._wait_s()) as tx:
                if expected_version == 0:
                    return tx.run("INSERT INTO rollout (name, version, state, updated) VALUES (?, 1, ?, ?) "
                                  "ON CONFLICT (name) DO NOTHING", (name, text, now)) == 1
                return tx.run("UPDATE rollout SET version = ?, state = ?, updated = ? WHERE name = ? AND version = ?",
                              (expected_version + 1, text, now, name, expected_version)) == 1
        except self._errors as exc:
            raise UnavailableError(f"the A/B store ({self.url.describe()}) cannot be reached ({type(exc).__name__})") from None

    # ---- shutdown -----------------------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Write (or spool) what is queued, stop the writer, close the connections (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout)
        self.db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_dir(configured: str) -> Path:
    """The state directory, created; a temporary one (with a warning) when it cannot be."""
    path = Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / f"fusion-state-{os.getuid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return path
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"fusion-state-{os.getuid()}"
        log.warning("state directory %s is not writable (%s); using %s (set FUSION_STATE_DIR)", path, exc, fallback)
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def open_store(cfg: StoreConfig) -> ABStore | None:
    """The configured store, or None for `memory` (service/ab.py then keeps per-process figures)."""
    if StoreURL.parse(cfg.url).kind == "memory":
        return None
    return ABStore(cfg)
