"""Issue 13, finding 6: a hostile bundle cannot hang or kill the worker at load time.

Every new bundle (at start and on a hot swap) is first verified, loaded, warmed up and probed in a
child process with a wall-clock limit (FUSION_LOAD_TIMEOUT_S) and an address-space limit
(FUSION_LOAD_MAX_MEMORY_MB); the manifest is refused over FUSION_MAX_MANIFEST_BYTES before it is
parsed, and its bundle_version is recomputed. The bundles (tests/reliability/bundles.py `load_bombs`,
every file digest valid): a `Loop` of 2^62 iterations, an `Expand` to 256 GB and one to the memory
limit + 1 GiB, a manifest over the size cap, a forged version, an edited manifest that kept its version.

(a) In process: `Engine.start` and `Engine.swap` refuse each with a BundleError naming the limit or
    the version, within a bounded time, and a started engine keeps serving v1 correctly.
(b) Against `bentoml serve`: started at the Loop bundle the service stays up, not ready, with the
    reason; hot swaps to each bundle are refused (503 in the error shape) while v1 keeps answering
    every request correctly, the worker process stays the same and /livez answers 200 throughout.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest

from fusion.errors import BundleError
from tests.reliability import bundles
from tests.reliability.harness import ROOT, Load, env_threads, get_status, record, workers
from tests.server import Server

TIMEOUT_S = 8  # the load limit the tests set: the good bundles load in well under 1 s
MEMORY_MB = 2048  # the address-space limit the tests set; the good bundles' check peaks far below it
LIMITS = {"FUSION_LOAD_TIMEOUT_S": str(TIMEOUT_S), "FUSION_LOAD_MAX_MEMORY_MB": str(MEMORY_MB)}
BOUND_S = TIMEOUT_S + 60  # a refusal later than this counts as a hang (generous: 2 shared cores)
NAMES = ("loop_2_62", "expand_256gb", "expand_over_limit", "manifest_too_large", "version_forged", "content_edited")
ATOL = 1e-5


@pytest.fixture(scope="module")
def bomb_root(v1, tmp_path_factory):
    """<root>/v1 (a copy of the good bundle) and every load bomb beside it: the server's bundle root."""
    root = tmp_path_factory.mktemp("load-bombs")
    shutil.copytree(v1, root / "v1")
    return root


@pytest.fixture(scope="module")
def bombs(bomb_root) -> dict:
    return bundles.load_bombs(bomb_root / "v1", bomb_root, over_limit_mb=MEMORY_MB)


@pytest.fixture
def limits(monkeypatch):
    for k, v in LIMITS.items():
        monkeypatch.setenv(k, v)


def bounded(fn, limit_s: float = BOUND_S) -> dict:
    """Run fn() in a daemon thread: {"value" | "error", "seconds"}; fails the test if it is still
    running after limit_s (a hang: the thread is left behind, as a hung worker would be)."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc
        box["seconds"] = round(time.monotonic() - t0, 2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit_s)
    if t.is_alive():
        pytest.fail(f"expected the load to end (refused) within {limit_s:.0f} s; it is still running")
    return box


def _engine(bundle):
    from service import config
    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy

    # the service's load limits (default: half the machine's memory), as FusionService passes them
    return Engine(EngineConfig(bundle=str(bundle)), RoutingPolicy(), load_limits=config.load().load_limits)


# ---- (a) in process --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_hostile_bundle_refused_in_process(name, bombs, bomb_root, limits):
    path, must = bombs[name]
    good = bomb_root / "v1"

    eng = _engine(path)  # start at the hostile bundle: not ready, with the reason, never raising
    start = bounded(eng.start)
    assert "error" not in start, start
    assert not eng.ready and eng.error and must in eng.error, f"expected a refusal naming {must!r}; got {eng.error!r}"
    assert "Traceback" not in eng.error

    eng = _engine(good)  # a hot swap to it: refused with a BundleError, v1 keeps serving
    eng.start()
    assert eng.ready, eng.error
    swap = bounded(lambda: eng.swap(str(path)))
    err = swap.get("error")
    assert isinstance(err, BundleError), f"expected a BundleError naming {must!r}; got {swap}"
    assert must in str(err), str(err)
    assert eng.current().version == bundles.version_of(good)
    X = bundles.digits_like(8, seed=3)
    got = asyncio.run(eng.predict(X, variant="ensemble", key=None, request_id="after-refusal")).output
    np.testing.assert_allclose(got, bundles.offline(good, "ensemble", X), atol=ATOL)
    record(f"sec6_in_process_{name}", start_refused_s=start["seconds"], swap_refused_s=swap["seconds"],
           error=str(err)[:300])


def test_real_bundle_loads_under_the_default_limits(v1, bomb_root, monkeypatch):
    """The limits refuse what is hostile, not Loop or Expand as such, and never a real bundle: with
    the default limits (no settings) v1 loads, and so do a Loop of 3 iterations and a 4 MB Expand."""
    from service import config, preflight

    for k in (*LIMITS, "FUSION_MAX_MANIFEST_BYTES"):
        monkeypatch.delenv(k, raising=False)
    benign = {
        "loop_3": bundles.rewrite(v1, bomb_root / "benign_loop", {"members/mlp_0.onnx": bundles.loop_model(3)}),
        "expand_4mb": bundles.rewrite(v1, bomb_root / "benign_expand", {"members/mlp_1.onnx": bundles.expand_model((1024, 1024))}),
    }
    for bundle in (v1, *benign.values()):
        eng = _engine(bundle)
        eng.start()
        assert eng.ready, eng.error
    # what the check costs: the child process alone, and a whole open (check + load in this process)
    checks, opens, cpu = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        report = preflight.check(v1, config.load().load_limits)
        checks.append(time.perf_counter() - t)
        cpu.append(report.cpu_s)
        t = time.perf_counter()
        _engine(v1).bundles.open(v1)
        opens.append(time.perf_counter() - t)
    assert report.bundle_version == bundles.version_of(v1)
    # the child stays cheap: it never imports torch or BentoML (what it imports, from -X importtime)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "service.preflight", "--timeout-s", "30",
                          "--max-memory-mb", "0", "--", str(v1)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and preflight.RESULT in out.stdout, out.stderr[-2000:]
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in out.stderr.splitlines() if ln.startswith("import time:")}
    assert "onnxruntime" in imported and not imported & {"torch", "bentoml"}, sorted(imported & {"torch", "bentoml"})
    limits = config.load().load_limits  # this test's environment, as the service reads it
    assert limits.max_memory_mb > report.peak_vm_mb, (limits, report)
    record("sec6_check_cost", check_s=[round(s, 3) for s in checks], check_cpu_s=cpu, open_s=[round(s, 3) for s in opens],
           child_peak_vm_mb=report.peak_vm_mb, child_peak_rss_mb=report.peak_rss_mb,
           default_timeout_s=limits.timeout_s, default_memory_mb=limits.max_memory_mb)


def _preflight_child(timeout_s: float = 20.0):
    """The running `python -m service.preflight` child of this process (polled until it appears)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in psutil.Process().children():
            try:
                if "service.preflight" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    pytest.fail(f"expected a `python -m service.preflight` child within {timeout_s:.0f} s; none appeared")


def test_check_process_is_limited_and_the_first_to_be_killed(bombs, limits):
    """The child runs under RLIMIT_AS = FUSION_LOAD_MAX_MEMORY_MB and with oom_score_adj 1000; if
    it is killed (as the OOM killer would kill it) the bundle is refused naming the signal."""
    from service import config, preflight

    box: dict = {}
    load_limits = config.load().load_limits  # FUSION_LOAD_* from the `limits` fixture, as the service reads them
    t = threading.Thread(target=lambda: box.update(bounded(lambda: preflight.check(bombs["loop_2_62"][0], load_limits))),
                         daemon=True)
    t.start()
    child = _preflight_child()
    deadline, applied = time.monotonic() + 20, None
    while time.monotonic() < deadline:  # the child sets its limits first thing, before any import
        applied = (child.rlimit(psutil.RLIMIT_AS)[0], int(open(f"/proc/{child.pid}/oom_score_adj").read()))
        if applied == (MEMORY_MB << 20, 1000):
            break
        time.sleep(0.05)
    child.kill()  # what the kernel's OOM killer does
    t.join(BOUND_S)
    err = box.get("error")
    assert applied == (MEMORY_MB << 20, 1000), f"expected RLIMIT_AS {MEMORY_MB << 20} and oom_score_adj 1000; got {applied}"
    assert isinstance(err, BundleError) and "SIGKILL" in str(err), box
    assert box["seconds"] < TIMEOUT_S, f"expected the refusal when the child died, not at the timeout; took {box['seconds']} s"


def test_bundle_changed_after_its_check_is_refused(bomb_root, limits, monkeypatch):
    """TOCTOU: the bundle is replaced (by the Loop bomb, re-digested and re-versioned) after the child
    checked it and before this process loads it: refused at once, the Loop never runs here."""
    from fusion.errors import IntegrityError
    from service import preflight

    v1 = bomb_root / "v1"  # the served bundle: swaps stay below its directory
    target = bundles.rewrite(v1, bomb_root / "toctou")
    real = preflight.check

    def check_then_replace(path, limits=None):
        report = real(path, limits)
        if str(path) == str(target):
            bundles.rewrite(v1, target, {"members/mlp_0.onnx": bundles.loop_model()})
        return report

    eng = _engine(v1)
    eng.start()
    monkeypatch.setattr(preflight, "check", check_then_replace)
    swap = bounded(lambda: eng.swap(str(target)), 30)
    err = swap.get("error")
    assert isinstance(err, IntegrityError) and "changed between the check and the load" in str(err), swap
    assert eng.current().version == bundles.version_of(v1)


def test_file_grown_or_made_a_fifo_after_verification_is_refused_unread(v1, tmp_path):
    """After `read_bundle` verified a file, a larger file or a FIFO in its place is refused by
    `read_verified` without reading it whole or blocking."""
    import os

    from fusion.bundle import read_bundle
    from fusion.errors import BundleError as Refused

    b = bundles.rewrite(v1, tmp_path / "b")
    verified = read_bundle(b)
    with open(b / "members/mlp_0.onnx", "ab") as fh:
        fh.write(b"\0" * (1 << 20))
    with pytest.raises(Refused, match=r"members/mlp_0.onnx: changed since it was verified"):
        verified.read_verified("mlp_0")
    (b / "members/mlp_1.onnx").unlink()
    os.mkfifo(b / "members/mlp_1.onnx")
    result = bounded(lambda: verified.read_verified("mlp_1"), 10)
    assert isinstance(result.get("error"), Refused) and "mlp_1.onnx" in str(result["error"]), result


# ---- (b) against a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(bombs, bomb_root, tokens):
    """A server started at the Loop bundle, with the test limits and hot swaps allowed below the bombs' root."""
    env = {**env_threads(), **LIMITS, "FUSION_BUNDLE_ROOT": str(bomb_root),
           "FUSION_INFERENCE_TOKEN": tokens["inference"], "FUSION_ADMIN_TOKEN": tokens["admin"]}
    srv = Server(bombs["loop_2_62"][0], env=env, wait_ready=False, deadline_s=BOUND_S + 60)
    srv.start()
    yield srv
    srv.stop()


def _pids(srv) -> set[int]:
    return {p.pid for p in workers(srv.proc.pid)}


@pytest.mark.server
def test_start_at_a_hostile_bundle_stays_up_not_ready(guarded, auth, bomb_root):
    t0 = time.monotonic()
    guarded.wait("/livez", 200)
    up_s = time.monotonic() - t0
    seen = set()
    for _ in range(10):
        seen.add(get_status(guarded.url + "/readyz"))
        time.sleep(0.2)
    r = httpx.post(guarded.url + "/predict", json={"inputs": [[0.0] * 64]}, headers=auth["inference"], timeout=10)
    body = r.json()
    assert seen == {503}, seen
    assert r.status_code == 503 and set(body) == {"error", "request_id"}, body
    assert "FUSION_LOAD_TIMEOUT_S" in body["error"] and str(bomb_root) not in body["error"], body["error"]
    assert guarded.proc.poll() is None
    # the same worker then loads a good bundle
    pids = _pids(guarded)
    swap = httpx.post(guarded.url + "/admin/bundle", json={"path": str(bomb_root / "v1")}, headers=auth["admin"], timeout=120)
    assert swap.status_code == 200, swap.text
    assert get_status(guarded.url + "/readyz") == 200 and _pids(guarded) == pids
    record("sec6_start_at_loop", livez_after_s=round(up_s, 1), readyz=sorted(seen), predict_status=r.status_code,
           error=body["error"][:300], then_swap_to_v1=swap.status_code)


class LivezPoller:
    """GET /livez every 0.2 s while a swap runs: statuses and latencies."""

    def __init__(self, url: str):
        self.url, self.statuses, self.latencies = url, [], []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5.0) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    self.statuses.append(c.get(self.url + "/livez").status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - t)
                self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_hot_swap_to_a_hostile_bundle_is_refused_while_v1_serves(name, guarded, auth, bombs, bomb_root):
    good = bomb_root / "v1"
    ver = bundles.version_of(good)
    guarded.wait("/livez", 200)
    admin = httpx.Client(base_url=guarded.url, headers=auth["admin"], timeout=BOUND_S + 60)
    if admin.get("/info").json().get("bundle_version") != ver:
        assert admin.post("/admin/bundle", json={"path": str(good)}).status_code == 200
    X = bundles.digits_like(64, seed=5)
    expected = bundles.offline(good, "ensemble", X)

    def make(i):
        a = i % 60
        return {"path": "/predict", "json": {"inputs": X[a:a + 4].tolist(), "variant": "ensemble"}, "rows": (a, a + 4)}

    def check(req, r):
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        a, b = req["rows"]
        body = r.json()
        if body["bundle_version"] != ver or not np.allclose(body["probabilities"], expected[a:b], atol=ATOL):
            return f"answer from {body['bundle_version']} differs from v1's offline output"
        return None

    pids = _pids(guarded)
    path, must = bombs[name]
    load = Load(guarded.url, make, concurrency=2, duration_s=BOUND_S + 30, max_requests=20_000,
                headers=auth["inference"], check=check).start()
    try:
        with LivezPoller(guarded.url) as livez:
            t = time.perf_counter()
            r = admin.post("/admin/bundle", json={"path": str(path)})
            refused_s = time.perf_counter() - t
            time.sleep(0.5)  # and just after
    finally:
        res = load.stop()
    body = r.json()
    record(f"sec6_swap_{name}", status=r.status_code, refused_s=round(refused_s, 2), error=body.get("error", "")[:300],
           livez=len(livez.statuses), livez_max_ms=round(1e3 * max(livez.latencies), 1), **res.summary())
    assert r.status_code == 503 and set(body) == {"error", "request_id"}, (r.status_code, body)
    assert must in body["error"] and "Traceback" not in body["error"], body["error"]
    assert refused_s < BOUND_S
    assert livez.statuses and set(livez.statuses) == {200}, livez.statuses
    assert _pids(guarded) == pids, "the worker process changed (it died and was respawned)"
    assert admin.get("/info").json()["bundle_version"] == ver
    assert res.failed == 0, res.failures[:5]
    assert res.sent > 0
