"""The shared, durable A/B store (service/abstore.py, issue 20), on SQLite and on a real PostgreSQL.

The figures a store-backed `Stats` reports are compared with the in-memory `Stats` (the independent
reference: the code the service used before, fed the same observations, shadows and labels)."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from prometheus_client import REGISTRY

from fusion.errors import ConfigError, UnavailableError
from service import config
from service.ab import Stats
from service.abstore import MIGRATIONS, ABStore, StoreConfig, StoreURL
from tests.pg import Postgres, pg_bin

VARIANTS = ("ensemble", "merged", "distilled")
CLASSES = (0, 1, 2)


@pytest.fixture(scope="module")
def postgres():
    if pg_bin() is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql: `make test` "
                    "installs Debian's postgresql package")
    pg = Postgres().start()
    yield pg
    pg.close()


_db_counter = iter(range(10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A fresh, empty store URL of each backend (a new database per test on the shared PostgreSQL)."""
    return _new_url(request.param, request, tmp_path)


def _new_url(kind: str, request, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/ab.db"
    pg = request.getfixturevalue("postgres")
    import psycopg

    name = f"t{next(_db_counter)}_{int(time.time() * 1000) % 10**8}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


def _store(url: str, tmp_path, **kw) -> ABStore:
    return ABStore(StoreConfig(url=url, state_dir=str(tmp_path / "state"), **kw))


def _comparable(report: dict) -> dict:
    """The figures, without what describes the process or the store (pid, uptime, scope, since)."""
    out = {k: v for k, v in report.items() if k not in ("uptime_s", "covers")}
    covers = report["covers"]
    out["bundle_versions"] = {v: {k: x for k, x in d.items() if k not in ("first_request", "last_request")}
                              for v, d in covers["bundle_versions"].items()}
    out["pending"] = covers["pending_feedback"]
    for entry in out["variants"].values():  # the confidence sequence's points: when each report computed them
        for point in entry.get("vs_ensemble", {}).get("history", []):
            point.pop("t")
    return out


def _traffic(stats_list: list[Stats], seed: int, n: int = 300) -> None:
    """The same random traffic to every Stats: requests of 1-3 rows on two versions, shadow runs (some
    after the label), labels for most, cascade counts and shadow failures."""
    rng = random.Random(seed)
    late = []
    for i in range(n):
        variant = rng.choice(VARIANTS)
        rows = rng.randint(1, 3)
        preds = [rng.choice(CLASSES) for _ in range(rows)]
        version = "v1" if i < n // 2 else "v2"
        key = f"{rng.getrandbits(128):032x}"
        client = f"10.0.0.{rng.randint(1, 4)}"
        latency = rng.uniform(0.001, 0.02)
        failed = rng.random() < 0.1  # a request that failed once its variant was chosen
        for st in stats_list:
            st.observe_outcome(variant, failed, version)
            if not failed:
                st.observe(variant, rows, latency, key, preds, client=client, version=version)
        if failed:
            continue
        shadows = [v for v in VARIANTS if v != variant and rng.random() < 0.6]
        labels = [rng.choice(CLASSES) for _ in range(rows)]
        for shadow in shadows:
            sp = [p if rng.random() < 0.8 else rng.choice(CLASSES) for p in preds]
            args = (key, variant, shadow, preds, sp, rng.uniform(0.001, 0.02))
            if rng.random() < 0.3:
                late.append(args)
            else:
                for st in stats_list:
                    st.observe_shadow(*args, version=version)
        if rng.random() < 0.8:
            for st in stats_list:
                if st.shared is not None:
                    st.shared.flush()
                st.feedback(key, labels, client=client)
        if rng.random() < 0.1:
            answered, escalated = rng.randint(0, 3), rng.randint(0, 2)
            for st in stats_list:
                st.observe_cascade(answered, escalated)
        if rng.random() < 0.05:
            for st in stats_list:
                st.shadow_failed("merged", "queue_full")
    for args in late:  # shadow runs that finish after their label (in-memory: no longer attachable)
        for st in stats_list:
            if st.shared is not None:
                st.observe_shadow(*args)


def test_url_parsing_and_config_validation(tmp_path):
    assert StoreURL.parse("") == StoreURL("sqlite") == StoreURL.parse("sqlite:")
    assert StoreURL.parse("sqlite:////var/lib/ab.db") == StoreURL("sqlite", "//var/lib/ab.db")
    assert StoreURL.parse("sqlite:///tmp/ab.db") == StoreURL("sqlite", "/tmp/ab.db")
    assert StoreURL.parse("postgresql://u:secret@db:5432/ab").describe() == "postgresql://db:5432/ab"
    assert StoreURL.parse("memory").kind == "memory"
    with pytest.raises(ConfigError, match="FUSION_AB_STORE: expected 'sqlite:///path/ab.db'.*got 'mysql://x'"):
        config.load({"FUSION_AB_STORE": "mysql://x"})
    with pytest.raises(ConfigError, match="FUSION_AB_RETENTION_DAYS"):
        config.load({"FUSION_AB_RETENTION_DAYS": "-1"})
    cfg = config.load({"FUSION_BUNDLE": str(tmp_path / "b")})
    assert cfg.engine.ab_store == "sqlite:"  # the server's default: SQLite in the state directory
    assert cfg.engine.state_path() == cfg.engine.root() / ".fusion-state"
    assert config.load({"FUSION_STATE_DIR": str(tmp_path / "s")}).engine.state_path() == tmp_path / "s"


def test_store_figures_match_the_in_memory_reference(url, tmp_path):
    """Every count of the report (traffic, rows, agreement, accuracy, paired tables and their tests,
    cascade, shadow failures, per-version counts, pending records) equals the in-memory Stats' on the
    same traffic; shadows that finish after their label are scored too (the in-memory one drops them)."""
    store = _store(url, tmp_path)
    shared, memory = Stats(store=store), Stats()
    _traffic([shared, memory], seed=1)
    store.flush()
    got, want = _comparable(shared.report()), _comparable(memory.report())
    assert got["variants"].keys() == want["variants"].keys()
    for name in want["variants"]:
        g, w = got["variants"][name], want["variants"][name]
        for field in ("requests", "rows", "latency_ms"):
            assert g[field] == pytest.approx(w[field]), (name, field)
        assert g["outcomes"] == w["outcomes"], name  # counts, and a ratio of the same counts
    assert got["cascade"] == want["cascade"] and got["shadow_failures"] == want["shadow_failures"]
    assert got["bundle_versions"] == want["bundle_versions"]
    assert got["pending"] == want["pending"]
    # the late shadows: the store scores them when they arrive, so it has at least the reference's labelled rows
    for name in want["variants"]:
        assert got["variants"][name]["labelled_rows"] >= want["variants"][name]["labelled_rows"]
    store.close()


def test_store_report_equals_the_in_memory_report(url, tmp_path):
    """Without late shadows the whole report (accuracy, intervals, paired tables and tests, agreement,
    percentiles, per-version counts) is the in-memory one."""
    store = _store(url, tmp_path)
    shared, memory = Stats(store=store), Stats()
    rng = random.Random(7)
    for i in range(200):
        variant = rng.choice(VARIANTS)
        preds = [rng.choice(CLASSES) for _ in range(rng.randint(1, 3))]
        key, version = f"{rng.getrandbits(128):032x}", "v1" if i % 3 else "v2"
        labels = [rng.choice(CLASSES) for _ in preds]
        for st in (shared, memory):
            st.observe_outcome(variant, False, version)  # answered: observed below (as the engine does)
            if i % 7 == 0:
                st.observe_outcome(variant, True, version)  # another request, which failed: never observed
            st.observe(variant, len(preds), 0.001 + i * 1e-5, key, preds, client="c", version=version)
            for shadow in VARIANTS:
                if shadow != variant:
                    st.observe_shadow(key, variant, shadow, preds, [p if j else 0 for j, p in enumerate(preds)], 0.002,
                                      version=version)
            if i % 4:
                if st.shared is not None:
                    st.shared.flush()
                st.feedback(key, labels, client="c")
    store.flush()
    got, want = _comparable(shared.report()), _comparable(memory.report())
    assert any(v.get("vs_ensemble", {}).get("test") == "mcnemar_exact" for v in want["variants"].values())
    _deep_close(got, want)
    store.close()


def _deep_close(a, b) -> bool:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        return all(_deep_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b)
        return all(_deep_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_labels_are_checked_and_taken_once(url, tmp_path):
    store = _store(url, tmp_path, feedback_wait_ms=50)
    st = Stats(store=store)
    a = st.observe("ensemble", 2, 0.01, None, [1, 2], client="c1", alias="mine", version="v1")
    st.observe("merged", 1, 0.01, None, [0], client="c1", alias="twice", version="v1")
    st.observe("merged", 1, 0.01, None, [0], client="c1", alias="twice", version="v1")
    with pytest.raises(ValueError, match="expected 2 labels for request .*; got 1"):
        st.feedback(a, [1])  # the record stays
    with pytest.raises(KeyError):
        st.feedback("mine", [1, 2], client="someone-else")  # an alias is its client's only
    with pytest.raises(ValueError, match="X-Request-ID of 2 pending requests"):
        st.feedback("twice", [0], client="c1")
    assert st.feedback("mine", [1, 0], client="c1") == {"variants": ["ensemble"], "rows": 2}
    with pytest.raises(KeyError):
        st.feedback(a, [1, 0])  # labelled once only
    with pytest.raises(KeyError):
        st.feedback("0" * 32, [1])  # never served: after the wait
    for weird in ("\ud800", "a\x00b"):  # what the database cannot hold is simply unknown, never a 500
        with pytest.raises(KeyError):
            st.feedback(weird, [1])
    rep = st.report()["variants"]["ensemble"]
    assert (rep["labelled_rows"], rep["accuracy"]) == (2, 0.5)
    store.close()


def test_concurrent_labels_of_one_record_score_it_once(url, tmp_path):
    stores = [_store(url, tmp_path) for _ in range(2)]
    stats = [Stats(store=s) for s in stores]
    key = stats[0].observe("ensemble", 1, 0.01, None, [1], version="v1")
    stores[0].flush()
    ok, errors = [], []

    def label(st):
        try:
            ok.append(st.feedback(key, [1]))
        except KeyError:
            errors.append(1)

    threads = [threading.Thread(target=label, args=(stats[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(ok), len(errors)) == (1, 7)
    assert stats[1].report()["variants"]["ensemble"]["labelled_rows"] == 1
    for s in stores:
        s.close()


def test_feedback_on_another_worker_right_after_predict(url, tmp_path):
    """Worker B labels what worker A answered before A's batch reached the store: B waits for it."""
    a, b = _store(url, tmp_path), _store(url, tmp_path)
    sa, sb = Stats(store=a), Stats(store=b)
    for i in range(50):
        key = sa.observe("ensemble", 1, 0.01, None, [i % 3], version="v1")
        assert sb.feedback(key, [i % 3]) == {"variants": ["ensemble"], "rows": 1}
    assert sb.report()["variants"]["ensemble"]["labelled_rows"] == 50
    a.close(), b.close()


def test_feedback_by_alias_right_after_predict_on_the_same_worker(url, tmp_path):
    """A client labels by its own X-Request-ID at once: the writer has taken the record off the queue and is
    still gathering its batch (FLUSH_S), so nothing is queued, yet the label must wait for that write."""
    store = _store(url, tmp_path, feedback_wait_ms=50)
    st = Stats(store=store)
    for i in range(20):
        st.observe("ensemble", 1, 0.01, None, [i % 3], client="c1", alias=f"q-{i}", version="v1")
        deadline = time.monotonic() + 5
        while store.queue.qsize() and time.monotonic() < deadline:  # the writer took it: nothing queued
            time.sleep(0.001)
        assert st.feedback(f"q-{i}", [i % 3], client="c1") == {"variants": ["ensemble"], "rows": 1}
    assert st.report()["variants"]["ensemble"]["labelled_rows"] == 20
    store.close()


def test_a_label_miss_waits_for_the_writer_only_when_something_is_on_its_way(url, tmp_path, monkeypatch):
    """An unknown alias costs no wait once everything this worker queued is written; while something is still
    on its way, the miss waits for it (the label may be for it)."""
    store = _store(url, tmp_path, feedback_wait_ms=50)
    st = Stats(store=store)
    st.observe("ensemble", 1, 0.01, None, [1], client="c1", alias="a-1", version="v1")
    assert store.flush() and store._settled == store._queued
    calls = []
    real = store.flush
    monkeypatch.setattr(store, "flush", lambda timeout=5.0: calls.append(timeout) or real(timeout))
    with pytest.raises(KeyError):
        st.feedback("typo", [1], client="c1")
    assert calls == []
    with store._count_lock:  # something queued and not yet written: the miss flushes
        store._queued += 1
    with pytest.raises(KeyError):
        st.feedback("typo", [1], client="c1")
    assert len(calls) == 1
    store._queued -= 1
    store.close()


def test_counts_survive_a_restart_and_migrations_run_once(url, tmp_path):
    store = _store(url, tmp_path)
    st = Stats(store=store)
    _traffic([st], seed=3, n=80)
    store.flush()
    before = _comparable(st.report())
    store.close()
    again = _store(url, tmp_path)
    assert again.schema_version() == MIGRATIONS[-1][0]
    assert _comparable(Stats(store=again).report()) == before
    again.close()


def test_retention_deletes_what_is_older(url, tmp_path):
    store = _store(url, tmp_path, retention_days=1)
    st = Stats(store=store)
    old = st.observe("ensemble", 1, 0.01, None, [1], version="v1")
    store.flush()
    st.feedback(old, [1])
    assert store.apply_retention(now=time.time() + 0.5 * 86400) == 0
    st.observe("ensemble", 1, 0.01, None, [1], version="v2")
    store.flush()
    assert store.apply_retention(now=time.time() + 1.5 * 86400) == 2
    assert st.report()["variants"] == {}
    store.close()


def test_rollout_compare_and_set(url, tmp_path):
    a, b = _store(url, tmp_path), _store(url, tmp_path)
    assert a.rollout_get("distilled") is None
    assert a.rollout_cas("distilled", 0, {"stage": 0}) is True
    assert b.rollout_cas("distilled", 0, {"stage": 9}) is False  # created already
    assert b.rollout_get("distilled") == (1, {"stage": 0})
    assert b.rollout_cas("distilled", 1, {"stage": 1}) is True
    assert a.rollout_cas("distilled", 1, {"stage": 2}) is False  # a stale version loses
    assert a.rollout_get("distilled") == (2, {"stage": 1})
    a.close(), b.close()


def _counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_store_down_spools_and_replays_and_refuses_labels(postgres, tmp_path):
    """PostgreSQL stopped: predictions are still observed (spooled to local JSON lines), labels answer
    UnavailableError (503: the client knows it was not recorded); once it is back the spool is replayed
    and nothing is lost."""
    import psycopg

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE spooltest")
    url = postgres.url.rsplit("/", 1)[0] + "/spooltest"
    store = _store(url, tmp_path, feedback_wait_ms=50)
    st = Stats(store=store)
    first = st.observe("ensemble", 1, 0.01, None, [1], version="v1")
    store.flush()
    assert st.feedback(first, [1])["rows"] == 1
    spooled0, replayed0 = _counter("fusion_ab_store_spooled_total"), _counter("fusion_ab_store_replayed_total")
    postgres.stop()
    try:
        keys = [st.observe("ensemble", 1, 0.01, None, [i % 3], version="v1") for i in range(40)]
        assert store.flush(timeout=30)
        assert store.down_since is not None and store.spool.exists()
        assert _counter("fusion_ab_store_spooled_total") - spooled0 == 40
        with pytest.raises(UnavailableError, match="cannot be reached"):
            st.feedback(keys[0], [0])
    finally:
        postgres.start()
    deadline = time.monotonic() + 30
    while store.down_since is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.down_since is None, "expected the writer to find PostgreSQL again within 30 s"
    assert _counter("fusion_ab_store_replayed_total") - replayed0 == 40
    assert not store.spool.exists()
    assert st.feedback(keys[0], [0])["rows"] == 1
    rep = st.report()["variants"]["ensemble"]
    assert (rep["requests"], rep["labelled_rows"]) == (41, 2)
    assert store.lost == 0
    store.close()


def test_a_spool_left_by_a_dead_process_is_replayed(tmp_path):
    """A worker that died with a spool: the next store on the same state directory claims and replays it."""
    url = f"sqlite:///{tmp_path}/ab.db"
    state = tmp_path / "state"
    state.mkdir()
    import json

    ops = [{"op": "obs", "fid": f"{i:032x}", "t": time.time(), "version": "v1", "variant": "merged", "client": "c",
            "alias": None, "latency": 0.01, "predictions": [1]} for i in range(5)]
    (state / "ab-spool-999999999-deadbeef.jsonl").write_text("".join(json.dumps(o) + "\n" for o in ops) + '{"cut')
    lost0 = _counter("fusion_ab_store_lost_total", reason="spool_unreadable")
    store = _store(url, tmp_path)
    deadline = time.monotonic() + 10
    while list(state.glob("ab-*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(state.glob("ab-*.jsonl"))
    assert Stats(store=store).report()["variants"]["merged"]["requests"] == 5
    assert _counter("fusion_ab_store_lost_total", reason="spool_unreadable") - lost0 == 1  # the cut line, counted
    store.close()


def test_a_full_queue_counts_what_it_loses(tmp_path):
    store = _store(f"sqlite:///{tmp_path}/ab.db", tmp_path, queue=1)
    release, writing = threading.Event(), threading.Event()
    write = store.write

    def slow_write(ops):
        writing.set()
        release.wait(30)
        write(ops)

    store.write = slow_write
    lost0 = _counter("fusion_ab_store_lost_total", reason="queue_full")
    keys = [f"{i:032x}" for i in range(6)]
    store.observe(keys[0], variant="ensemble", version="v1", client="", alias=None, latency=0.0, predictions=[1])
    assert writing.wait(10)  # the writer holds the first one; the queue takes one more
    for k in keys[1:]:
        store.observe(k, variant="ensemble", version="v1", client="", alias=None, latency=0.0, predictions=[1])
    release.set()
    store.flush()
    assert _counter("fusion_ab_store_lost_total", reason="queue_full") - lost0 == 4 == store.lost
    assert Stats(store=store).report()["variants"]["ensemble"]["requests"] == 2
    store.close()


def test_an_older_schema_is_migrated_in_place(url, tmp_path, monkeypatch):
    """A store created by an earlier release (migration 1 only) is brought to the newest on open, each
    migration once, its data kept."""
    import service.abstore as abstore

    monkeypatch.setattr(abstore, "MIGRATIONS", MIGRATIONS[:1])
    old = _store(url, tmp_path)
    key = Stats(store=old).observe("ensemble", 1, 0.01, None, [1], version="v1")
    old.flush()
    assert old.schema_version() == 1
    old.close()
    monkeypatch.setattr(abstore, "MIGRATIONS", MIGRATIONS)
    stores = [_store(url, tmp_path) for _ in range(2)]  # two workers opening it at once: one migrates
    assert [s.schema_version() for s in stores] == [MIGRATIONS[-1][0]] * 2
    with stores[0].db.tx(write=False) as tx:
        assert [n for (n,) in tx.rows("SELECT version FROM schema_version ORDER BY version")] == [m[0] for m in MIGRATIONS]
    assert Stats(store=stores[1]).feedback(key, [1]) == {"variants": ["ensemble"], "rows": 1}
    for s in stores:
        s.close()


def test_outcomes_are_summed_over_every_worker_per_variant_and_version(url, tmp_path):
    """Answered and failed requests (the rollout's error-rate guardrail) written by two workers are one
    fleet-wide figure in either worker's report, per variant and bundle version; a variant that only
    failed is listed; they survive a restart and go with the retention."""
    a, b = _store(url, tmp_path, retention_days=1), _store(url, tmp_path, retention_days=1)
    sa, sb = Stats(store=a), Stats(store=b)
    for i in range(30):
        sa.observe_outcome("distilled", i % 3 == 0, "v1")  # 10 of 30 failed on A
        if i % 3:  # an answered request is observed too (as the engine does): that is what counts it
            sa.observe("distilled", 1, 0.001, None, [1], version="v1")
        sb.observe_outcome("distilled", False, "v2")  # 30 answered on B
        sb.observe("distilled", 1, 0.001, None, [1], version="v2")
    sb.observe_outcome("merged", True, "v2")
    a.flush(), b.flush()
    want = {"answered": 50, "failed": 10, "error_rate": 10 / 60,
            "by_version": {"v1": {"answered": 20, "failed": 10}, "v2": {"answered": 30, "failed": 0}}}
    reports = [st.report()["variants"] for st in (sa, sb)]
    assert [r["distilled"]["outcomes"] for r in reports] == [want, want]
    assert reports[0]["merged"]["outcomes"]["failed"] == 1 and reports[0]["merged"]["requests"] == 0
    a.close(), b.close()
    again = _store(url, tmp_path, retention_days=1)
    assert Stats(store=again).report()["variants"]["distilled"]["outcomes"] == want
    again.apply_retention(now=time.time() + 1.5 * 86400)
    assert Stats(store=again).report()["variants"] == {}
    again.close()


def _labelled(st: Stats, n: int, start: int = 0) -> None:
    """n paired labelled rows (a shadow run of the ensemble on each distilled answer): both right."""
    for i in range(start, start + n):
        key = f"{i:032x}"
        st.observe("distilled", 1, 0.01, key, [1], version="v1")
        st.observe_shadow(key, "distilled", "ensemble", [1], [1], 0.01, version="v1")
        if st.shared is not None:
            st.shared.flush()
        st.feedback(key, [1])
    st.observe("ensemble", 1, 0.01, None, [1], version="v1")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "memory"])
def test_the_confidence_sequence_history_is_one_bounded_series(backend, request, tmp_path):
    """`vs_ensemble.history`: a point when a report finds the rows grown by history_step since the newest
    point (or a new decision), the newest history_max kept; reads without new labels change nothing, and
    with a shared store every worker reads the same series."""
    shared = backend != "memory"
    url = _new_url(backend, request, tmp_path) if shared else None
    stores = [_store(url, tmp_path) for _ in range(2)] if shared else [None]
    workers = [Stats(store=s) for s in stores]
    a, b = workers[0], workers[-1]
    for st in workers:
        st.history_step, st.history_max = 0.5, 3

    def history(st: Stats) -> list[dict]:
        return st.report()["variants"]["distilled"]["vs_ensemble"]["history"]

    _labelled(a, 20)
    first = a.report()["variants"]["distilled"]["vs_ensemble"]
    assert [(p["n"], p["analysis"]) for p in first["history"]] == [(20, "paired")]
    assert first["history"][0]["ci_low"] == first["ci_low"] and first["history"][0]["decision"] == first["decision"]
    _labelled(a, 9, start=100)
    assert history(b) == first["history"]  # 29 rows < 20 + 50 %: no point
    _labelled(a, 1, start=200)
    got = history(b)
    assert [p["n"] for p in got] == [20, 30]
    assert all(history(w) == got for w in workers * 3)  # no new labels: every read, every worker, the same
    for st in workers:
        st.history_step = 0.0  # every new row count: at least one row more
    for i, n in enumerate((35, 40, 45)):
        _labelled(a, 5, start=300 + 10 * i)
        assert [p["n"] for p in history(b)][-1] == n
    final = history(a)
    assert [p["n"] for p in final] == [35, 40, 45]  # the newest 3 of 20, 30, 35, 40, 45
    ts = [p["t"] for p in final]
    assert ts == sorted(ts) and all(p["ci_low"] <= p["estimate"] <= p["ci_high"] for p in final)
    for s in stores:
        if s is not None:
            s.close()


def test_the_writer_survives_an_operation_it_cannot_write(tmp_path):
    """A queued (or spooled) line that is valid JSON but not an operation used to end the writer thread
    silently (the queue then filled and labels found nothing): it is logged, counted and skipped (review s2)."""
    store = _store(f"sqlite:///{tmp_path}/ab.db", tmp_path)
    before = REGISTRY.get_sample_value("fusion_ab_store_writer_errors_total") or 0.0
    store._put({"not": "an operation"})
    assert store.flush()  # the bad batch is dropped, the writer goes on
    st = Stats(store=store)
    key = st.observe("ensemble", 1, 0.001, None, [1], version="v1")
    assert store.flush() and store._thread.is_alive()
    assert st.feedback(key, [1]) == {"variants": ["ensemble"], "rows": 1}
    assert REGISTRY.get_sample_value("fusion_ab_store_writer_errors_total") == before + 1
    assert store.lost == 1
    store.close()


def test_a_failed_commit_leaves_no_transaction_open(tmp_path):
    """COMMIT itself can fail (SQLITE_BUSY, a full disk): the connection is rolled back, not left inside the
    transaction, so its next BEGIN works (review s2)."""
    store = _store(f"sqlite:///{tmp_path}/ab.db", tmp_path)
    db = store.db
    conn = db._conn()
    # a deferred foreign-key violation fails at COMMIT, not at the statement: a real failing COMMIT
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (pid INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    import sqlite3
    with pytest.raises(sqlite3.IntegrityError):
        with db.tx() as tx:
            tx.run("INSERT INTO child (pid) VALUES (?)", (42,))
    assert not conn.in_transaction
    with db.tx() as tx:  # usable again
        tx.run("INSERT INTO parent (id) VALUES (?)", (1,))
    assert [r for r in conn.execute("SELECT id FROM parent")] == [(1,)]
    assert [r for r in conn.execute("SELECT pid FROM child")] == []
    store.close()


def test_an_answered_request_queues_one_operation(tmp_path, monkeypatch):
    """The hot path (review s2): an answered request queues its observation only (which implies the answered
    outcome); a failed one queues its outcome. The report's outcomes still count both."""
    store = _store(f"sqlite:///{tmp_path}/ab.db", tmp_path)
    ops = []
    real = store._put
    monkeypatch.setattr(store, "_put", lambda op: (ops.append(op["op"]), real(op)))
    st = Stats(store=store)
    st.observe_outcome("distilled", False, "v1")
    st.observe("distilled", 2, 0.001, None, [1, 2], version="v1")
    assert ops == ["obs"]
    st.observe_outcome("distilled", True, "v1")
    assert ops == ["obs", "outcome"]
    store.flush()
    assert st.report()["variants"]["distilled"]["outcomes"] == {
        "answered": 1, "failed": 1, "error_rate": 0.5, "by_version": {"v1": {"answered": 1, "failed": 1}}}
    store.close()


def test_a_spooled_line_that_is_no_operation_is_counted_and_the_rest_replayed(tmp_path):
    """A spool line that is valid JSON but no operation is skipped as `spool_unreadable` (else the file would be
    replayed, and fail, forever); the valid lines around it are written and the file removed (review s2)."""
    store = _store(f"sqlite:///{tmp_path}/ab.db", tmp_path)
    store.flush()
    good = {"op": "outcome", "id": "a" * 32, "t": time.time(), "version": "v1", "variant": "distilled", "failed": 1}
    spool = store.state_dir / "ab-spool-999999999-deadbeef.jsonl"  # a process that ended
    spool.write_text("\n".join(json.dumps(x) for x in ([1, 2], {"op": "obs"}, good, {"x": 1})) + "\n")
    lost = store.lost
    store._replay()
    assert not spool.exists() and store.lost == lost + 3
    assert Stats(store=store).report()["variants"]["distilled"]["outcomes"]["failed"] == 1
    store.close()
