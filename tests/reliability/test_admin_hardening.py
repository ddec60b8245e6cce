"""Issue 13, findings 4, 5 (and issue 21, item 9): admin without a token, bundle root, swap lock.

4. Without `FUSION_ADMIN_TOKEN`, admin trusted any client whose socket address was loopback: a web
   page could reach it by DNS rebinding (any `Host` was accepted), by a cross-origin POST (no `Origin`
   check), or through any same-host proxy (the proxy connects from loopback), and hot swap loaded a
   bundle from anywhere on the server. Now loopback trust needs a direct connection (no proxy
   headers), a loopback `Host` (or one in FUSION_ALLOWED_HOSTS) and no foreign `Origin`; it can be
   switched off (FUSION_ADMIN_LOOPBACK=0, set in every file of deploy/); hot swaps stay below
   FUSION_BUNDLE_ROOT, by default the served bundle's own parent directory, links resolved.
5. `POST /admin/routing` took the swap lock on the event loop while a swap held it for the whole
   load and warm-up: the worker froze (`/livez` took 3.5 s). The policy change now waits only for the
   short install step of a swap, never for the load.
21.9. A swap to a path with no bundle (a missing directory, `/etc`) answered 503, which clients retry;
   it is the caller's mistake: 400.

The server tests run one `bentoml serve` without any token (a `make serve` user's setup); the rules
themselves are also checked in-process on `service.auth.Tokens`.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.reliability import bundles
from tests.reliability.harness import env_threads, record
from tests.server import Server

N = bundles.N_FEATURES
ROW = [1.0] * N
# The slow bundle: one member whose graph also runs K products of N x N matrices (values kept in
# (-1, 1) by tanh, result multiplied by 0), so loading it (4 warm-up calls) takes seconds of CPU.
SLOW_N, SLOW_K = 640, 50
MIN_SWAP_S = 1.5  # the slow swap must take at least this long, or the test proves nothing
LIVEZ_BOUND_S = 1.0  # generous: a free loop answers /livez in milliseconds even on 2 shared cores


# ---- in-process: the rules -------------------------------------------------------------------


def _tokens(**kw):
    from service.auth import Tokens

    return Tokens(**kw)


def _refused(tokens, headers, client="127.0.0.1", authorization=None, status=403) -> str:
    from service.errors import AuthError

    with pytest.raises(AuthError) as e:
        tokens.check(authorization, "admin", client, headers)
    assert e.value.status == status, (headers, e.value.status, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:3000", "localhost", "LOCALHOST:3000", "[::1]", "[::1]:3000",
                                  "127.0.0.2:80"])
def test_loopback_trust_accepts_loopback_hosts(host):
    _tokens().check(None, "admin", "127.0.0.1", {"host": host})


@pytest.mark.parametrize("host", ["rebind.attacker.example", "rebind.attacker.example:3000", "localhost.attacker.example",
                                  "127.0.0.1.nip.io:3000", "10.0.0.5:3000", "[::1", "localhost:3000:1", ""])
def test_loopback_trust_refuses_other_hosts(host):
    msg = _refused(_tokens(), {"host": host})
    assert "Host" in msg and "FUSION_ALLOWED_HOSTS" in msg, msg


def test_allowed_hosts_extend_loopback_trust():
    t = _tokens(allowed_hosts=frozenset({"fusion.internal", "box:8080"}))
    for host in ("fusion.internal", "FUSION.internal:3000", "box:8080", "localhost:3000"):
        t.check(None, "admin", "127.0.0.1", {"host": host})
    for host in ("box:9090", "evil.internal"):
        _refused(t, {"host": host})


@pytest.mark.parametrize("header", [{"x-forwarded-for": "127.0.0.1"}, {"forwarded": "for=127.0.0.1"},
                                    {"x-real-ip": "127.0.0.1"}, {"x-forwarded-host": "localhost"},
                                    {"via": "1.1 nginx"}])
def test_proxied_requests_get_no_loopback_trust(header):
    msg = _refused(_tokens(), {"host": "localhost:3000", **header})
    assert "proxy" in msg and next(iter(header)) in msg.lower(), msg


def test_a_proxied_request_whose_client_is_remote_is_told_why():
    """Behind a same-host proxy uvicorn takes the client address from X-Forwarded-For: the refusal says that
    the proxy header is why the client is not this machine."""
    msg = _refused(_tokens(), {"host": "localhost:3000", "x-forwarded-for": "203.0.113.9"}, client="203.0.113.9")
    assert "answer only loopback clients" in msg and "through a proxy (x-forwarded-for header)" in msg, msg
    assert "proxy" not in _refused(_tokens(), {"host": "localhost:3000"}, client="203.0.113.9")


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:8080", "http://127.0.0.1:3001"])
def test_foreign_origins_are_refused_with_or_without_a_token(origin):
    headers = {"host": "127.0.0.1:3000", "origin": origin}
    assert "Origin" in _refused(_tokens(), headers)
    assert "Origin" in _refused(_tokens(admin="adm"), headers, authorization="Bearer adm")


def test_same_origin_and_allowed_origins_pass():
    _tokens().check(None, "admin", "127.0.0.1", {"host": "127.0.0.1:3000", "origin": "http://127.0.0.1:3000"})
    t = _tokens(admin="adm", allowed_origins=frozenset({"https://ops.example"}))
    t.check("Bearer adm", "admin", "10.0.0.9", {"host": "fusion.example", "origin": "https://ops.example"})
    _refused(t, {"host": "fusion.example", "origin": "https://ops.example.evil"}, authorization="Bearer adm")


def test_loopback_trust_can_be_switched_off():
    msg = _refused(_tokens(admin_loopback=False), {"host": "127.0.0.1:3000"})
    assert "FUSION_ADMIN_LOOPBACK" in msg and "FUSION_ADMIN_TOKEN" in msg, msg


def test_with_a_token_host_is_checked_only_when_allowed_hosts_is_set():
    t = _tokens(admin="adm")
    t.check("Bearer adm", "admin", "10.0.0.9", {"host": "fusion.example.com"})  # a real hostname behind an ingress
    t.check("Bearer adm", "admin", "10.0.0.9", {"host": "x", "x-forwarded-for": "1.2.3.4"})  # proxies are fine with a token
    _refused(t, {"host": "fusion.example.com"}, client="10.0.0.9", authorization="Bearer nope", status=401)
    t = _tokens(admin="adm", allowed_hosts=frozenset({"fusion.example.com"}))
    t.check("Bearer adm", "admin", "10.0.0.9", {"host": "fusion.example.com:443"})
    assert "Host" in _refused(t, {"host": "other.example"}, client="10.0.0.9", authorization="Bearer adm")


def test_settings_from_the_environment():
    from service import config

    t = config.load({"FUSION_ADMIN_LOOPBACK": "0", "FUSION_ALLOWED_HOSTS": " a.example, B.example:8080 ,",
                     "FUSION_ALLOWED_ORIGINS": "https://Ops.example/"}).tokens
    assert t.admin_loopback is False
    assert t.allowed_hosts == frozenset({"a.example", "b.example:8080"})
    assert t.allowed_origins == frozenset({"https://ops.example"})
    assert config.load({}).tokens.admin_loopback is True
    with pytest.raises(ValueError, match="FUSION_ADMIN_LOOPBACK"):
        config.load({"FUSION_ADMIN_LOOPBACK": "maybe"})


def test_bundle_root_defaults_to_the_served_bundles_directory(tmp_path):
    from service import config
    from service.config import EngineConfig

    assert EngineConfig(bundle=str(tmp_path / "b" / "v1")).root() == (tmp_path / "b").resolve()
    assert EngineConfig(bundle="x", bundle_root=str(tmp_path)).root() == tmp_path.resolve()
    assert config.load({"FUSION_BUNDLE": str(tmp_path / "v1")}).engine.root() == tmp_path.resolve()
    shared = tmp_path / "shared"  # world-writable, like /tmp: its siblings are anyone's, so not the default root
    (shared / "v1").mkdir(parents=True)
    shared.chmod(0o1777)
    assert EngineConfig(bundle=str(shared / "v1")).root() == (shared / "v1").resolve()


# ---- a real server with no token ---------------------------------------------------------------


def slow_member(n: int = SLOW_N, k: int = SLOW_K, seed: int = 0) -> bytes:
    """mlp_3's graph plus k tanh(M @ M / n) products of an n x n matrix derived from the input
    (so nothing can be constant-folded), multiplied by 0 and added: same outputs, seconds of work."""
    from onnx import helper, numpy_helper

    nodes, inits = bundles._member_nodes("", bundles._weights(seed, 3), "base")
    inits += [numpy_helper.from_array(np.array([n, n], np.int64), "shape"),
              numpy_helper.from_array(np.array(1.0 / n, np.float32), "inv_n"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes += [helper.make_node("ReduceMean", ["input"], ["slow_s"], keepdims=1),
              helper.make_node("Add", ["slow_s", "one"], ["slow_s1"]),
              helper.make_node("Expand", ["slow_s1", "shape"], ["slow_m0"])]
    for i in range(k):
        nodes += [helper.make_node("MatMul", [f"slow_m{i}", f"slow_m{i}"], [f"slow_p{i}"]),
                  helper.make_node("Mul", [f"slow_p{i}", "inv_n"], [f"slow_q{i}"]),
                  helper.make_node("Tanh", [f"slow_q{i}"], [f"slow_m{i + 1}"])]
    nodes += [helper.make_node("ReduceMean", [f"slow_m{k}"], ["slow_r"], keepdims=1),
              helper.make_node("Mul", ["slow_r", "zero"], ["slow_z"]),
              helper.make_node("Add", ["base", "slow_z"], ["probabilities"])]
    return bundles._model(nodes, inits)


def make_slow_bundle(src: Path, out: Path) -> Path:
    """A copy of `src` whose mlp_3 is `slow_member()`, with fresh digests and bundle version."""
    from fusion.bundle import BundleWriter, read_bundle

    manifest = read_bundle(src).manifest
    with BundleWriter(out) as w:
        shutil.copytree(src, w.stage, dirs_exist_ok=True)
        (w.stage / "members/mlp_3.onnx").write_bytes(slow_member())
        w.commit(manifest)
    return out


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, Path]:
    """served/{v1,v2,slow,link -> ../elsewhere/v3}, elsewhere/v3: the served bundle is served/v1."""
    top = tmp_path_factory.mktemp("admin-hardening")
    served, elsewhere = top / "served", top / "elsewhere"
    bundles.make_bundle(served / "v1", seed=0)
    bundles.make_bundle(served / "v2", seed=1)
    bundles.make_bundle(elsewhere / "v3", seed=2)
    make_slow_bundle(served / "v1", served / "slow")
    (served / "link").symlink_to(elsewhere / "v3", target_is_directory=True)
    return {"served": served, "v1": served / "v1", "v2": served / "v2", "slow": served / "slow",
            "outside": elsewhere / "v3", "link": served / "link"}


@pytest.fixture(scope="module")
def open_server(layout):
    """No token at all, no FUSION_BUNDLE_ROOT: exactly what `make serve` starts; only the load check's
    time limit is raised, so that the deliberately slow bundle of case 5 is never refused as too slow
    on a busy machine (its load is checked in a child process, then loaded again: twice the work)."""
    with Server(layout["v1"], env={**env_threads(), "FUSION_LOAD_TIMEOUT_S": "120"}) as srv:
        yield srv


def routing(url: str) -> dict:
    r = httpx.get(url + "/admin/routing", timeout=10)
    assert r.status_code == 200, r.text
    return {k: v for k, v in r.json().items() if k != "request_id"}


def assert_refused(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == r.headers["x-request-id"], body
    for w in words:
        assert w in body["error"], (w, body["error"])
    return body["error"]


@pytest.mark.server
def test_04_loopback_admin_refuses_rebinding_cross_origin_and_proxied_requests(open_server, layout):
    url, port = open_server.url, open_server.port
    before = routing(url)
    change = {"weights": {"mlp_0": 1}}
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=10) as c:
        hostile = {
            "dns_rebinding_host": {"Host": "rebind.attacker.example"},
            "dns_rebinding_host_port": {"Host": f"rebind.attacker.example:{port}"},
            "lookalike_host": {"Host": f"localhost.attacker.example:{port}"},
            "cross_origin": {"Origin": "https://evil.example"},
            "opaque_origin": {"Origin": "null"},
            "other_local_origin": {"Origin": "http://localhost:8080"},
            "x_forwarded_for": {"X-Forwarded-For": "127.0.0.1"},
            "forwarded": {"Forwarded": "for=127.0.0.1"},
            "x_real_ip": {"X-Real-IP": "127.0.0.1"},
        }
        for name, headers in hostile.items():
            for method, path, body in (("POST", "/admin/routing", change), ("GET", "/admin/routing", None),
                                       ("POST", "/admin/bundle", {"path": str(layout["v2"])})):
                r = c.request(method, path, json=body, headers=headers)
                statuses[f"{name} {method} {path}"] = r.status_code
                assert_refused(r, 403)
        assert routing(url) == before, "a refused request changed the routing policy"
        assert c.get("/info").json()["bundle_version"] == bundles.version_of(layout["v1"]), "a refused swap swapped"
        # the default keeps working for a local user: loopback, a loopback Host, no Origin
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            r = c.post("/admin/routing", json=change, headers={"Host": host})
            statuses[f"loopback host {host}"] = r.status_code
            assert r.status_code == 200 and r.json()["weights"] == {"mlp_0": 1.0}, r.text
            assert c.post("/admin/routing", json=before).status_code == 200
        r = c.post("/admin/routing", json=change, headers={"Origin": url})  # the server's own origin (its /ui)
        assert r.status_code == 200, r.text
        assert c.post("/admin/routing", json=before).status_code == 200
    record("sec_04_admin_loopback", statuses=statuses)


@pytest.mark.server
def test_04_hot_swap_is_confined_to_the_served_bundles_directory(open_server, layout):
    url = open_server.url
    v1, v2 = bundles.version_of(layout["v1"]), bundles.version_of(layout["v2"])
    seen = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, path in (("outside", layout["outside"]), ("symlink_out", layout["link"]),
                           ("dotdot", layout["served"] / ".." / "elsewhere" / "v3"), ("etc", Path("/etc")),
                           ("root", Path("/"))):
            r = c.post("/admin/bundle", json={"path": str(path)})
            seen[name] = r.status_code
            assert_refused(r, 400, "FUSION_BUNDLE_ROOT", str(path))
            assert c.get("/info").json()["bundle_version"] == v1
        # inside the root: a sibling of the served bundle swaps, and back
        r = c.post("/admin/bundle", json={"path": str(layout["v2"])})
        assert r.status_code == 200 and r.json()["bundle_version"] == v2, r.text
        r = c.post("/admin/bundle", json={"path": str(layout["v1"])})
        assert r.status_code == 200 and r.json()["bundle_version"] == v1, r.text
    record("sec_04_bundle_root", refused=seen)


@pytest.mark.server
def test_21_9_a_path_with_no_bundle_is_the_callers_mistake(open_server, layout):
    """Not 503 (a client retries 503): 400, saying what was expected and what is there."""
    seen = {}
    empty = layout["served"] / "empty-dir"
    empty.mkdir(exist_ok=True)
    a_file = layout["served"] / "a-file"
    a_file.write_text("not a bundle")
    with httpx.Client(base_url=open_server.url, timeout=30) as c:
        for name, path, words in (("missing", layout["served"] / "no-such-bundle", ("manifest.json", "no such directory")),
                                  ("no_manifest", empty, ("manifest.json", "without")),
                                  ("a_file", a_file, ("manifest.json", "not a directory"))):
            r = c.post("/admin/bundle", json={"path": str(path)})
            seen[name] = r.status_code
            assert_refused(r, 400, *words)
            assert "retry-after" not in r.headers
    record("sec_21_9_missing_bundle", statuses=seen)


@pytest.mark.server
def test_05_routing_change_during_a_slow_swap_never_freezes_the_worker(open_server, layout):
    """While a swap loads a bundle for seconds, POST /admin/routing answers at once and /livez keeps
    answering fast (before: the routing call blocked the event loop until the swap was done)."""
    url = open_server.url
    before = routing(url)
    done: dict[str, float] = {}
    results: dict[str, httpx.Response] = {}
    t0 = time.monotonic()

    def swap():
        results["swap"] = httpx.post(url + "/admin/bundle", json={"path": str(layout["slow"])}, timeout=120)
        done["swap"] = time.monotonic() - t0

    def change_routing():
        results["routing"] = httpx.post(url + "/admin/routing", json={"weights": {"ensemble": 1, "mlp_1": 1}}, timeout=120)
        done["routing"] = time.monotonic() - t0

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    time.sleep(0.5)  # the swap is loading now (it takes seconds)
    router = threading.Thread(target=change_routing, daemon=True)
    router.start()
    livez: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while swapper.is_alive() and time.monotonic() - t0 < 120:
            t = time.perf_counter()
            assert c.get("/livez").status_code == 200
            livez.append(time.perf_counter() - t)
            time.sleep(0.05)
    swapper.join(5)
    router.join(30)
    try:
        assert results["swap"].status_code == 200, results["swap"].text
        assert results["routing"].status_code == 200, results["routing"].text
        assert done["swap"] >= MIN_SWAP_S, f"the slow swap took only {done['swap']:.2f} s; make slow_member() slower"
        assert done["routing"] < done["swap"], f"the routing change waited for the swap: {done}"
        assert max(livez) < LIVEZ_BOUND_S, f"/livez took {max(livez):.2f} s during the swap"
        assert len(livez) >= 5, livez
        assert routing(url)["weights"] == {"ensemble": 0.5, "mlp_1": 0.5}
    finally:
        record("sec_05_routing_during_swap", swap_s=round(done.get("swap", -1), 2),
               routing_answered_s=round(done.get("routing", -1), 2), livez_polls=len(livez),
               livez_max_ms=round(max(livez) * 1e3, 1) if livez else None,
               livez_p50_ms=round(float(np.median(livez)) * 1e3, 1) if livez else None)
        httpx.post(url + "/admin/bundle", json={"path": str(layout["v1"])}, timeout=120)
        httpx.post(url + "/admin/routing", json=before, timeout=30)
