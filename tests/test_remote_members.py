"""Remote members over OIP v2 (issue 19): `fusion split`, service/remote.py, and a front combining
three real member servers (`bentoml serve` on loopback) under `strict` and `quorum:2`.

Oracles: the single-process bundle's member ONNX files run in onnxruntime and soft-voted in numpy
(tests/serving_util.Oracle), and its fused `ensemble` graph. A stub OIP server in this file proxies to a
real member and can hang or fail on command (the hung member and the circuit breaker).
Servers are module-scoped and started in parallel: 3 members, a strict front and a quorum:2 front.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from fusion.bundle import manifest_version, read_bundle
from fusion.errors import ConfigError
from fusion.split import member_host, split_bundle
from service.remote import Breaker, MismatchError, RemoteConfig, member_url, url_variable
from tests.server import ROOT, Server
from tests.serving_util import Oracle, assert_error_shape, rows_json

NAMES = ["mlp_0", "mlp_1", "mlp_2"]
DEADLINE_MS = 800
MARGIN_S = 2.0  # loopback, five servers and a loaded 2-core machine
HANG_S = 5.0  # well past DEADLINE + MARGIN: "cut at the deadline" stays distinguishable from "waited for the hang"
# the reset period must outlast the few loopback calls of the breaker test that expect it still open
BREAKER_FAILURES, BREAKER_RESET_S = 2, 3.0
TOKEN = "remote-members-test-token"  # members require it; the front sends its own (FUSION_INFERENCE_TOKEN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMPOSE = ROOT / "deploy" / "compose-split.yaml"

# ---- pure ----------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_n_failures_then_half_opens_one_trial():
    clock, states = Clock(), []
    b = Breaker(3, 5.0, clock, on_change=states.append)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed" and b.allow()
    b.success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.state == "open" and not b.allow() and b.retry_in_s() == pytest.approx(5.0)
    clock.t += 4.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow() and b.state == "half_open"
    assert not b.allow()  # one trial call at a time
    b.failure()  # the trial failed: open for another period
    assert b.state == "open" and not b.allow()
    clock.t += 5.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.failures == 0
    assert states == ["open", "half_open", "open", "half_open", "closed"]


def test_breaker_ignores_calls_admitted_before_it_opened():
    """Concurrent calls: one admitted while closed answers after the breaker opened. Its late success must not close
    the breaker before its reset period, and its late failure must not re-open a half-open breaker nor free the
    one trial slot (a second trial would go out); only the calls admitted since the last opening count."""
    clock = Clock()
    b = Breaker(2, 5.0, clock)
    slow_ok, slow_fail = b.allow(), b.allow()  # in flight while the member starts failing
    for _ in range(2):
        b.failure(b.allow())
    assert b.state == "open"
    b.success(slow_ok)
    assert b.state == "open" and not b.allow()
    clock.t += 5.0
    trial = b.allow()
    assert trial and b.state == "half_open"
    b.failure(slow_fail)
    assert b.state == "half_open" and not b.allow()  # the trial is still the only call out
    b.success(trial)
    assert b.state == "closed" and b.failures == 0 and b.allow()


def test_breaker_threshold_zero_never_opens():
    b = Breaker(0, 1.0, Clock())
    for _ in range(50):
        b.failure()
    assert b.state == "closed" and b.allow()


def test_remote_config_from_env():
    cfg = RemoteConfig.from_env({"FUSION_REMOTE_BREAKER_FAILURES": "7", "FUSION_REMOTE_BREAKER_RESET_S": "2.5",
                                 "FUSION_REMOTE_MAX_CONNECTIONS": "4", "FUSION_REMOTE_STARTUP_WAIT_S": "0"})
    assert (cfg.breaker_failures, cfg.breaker_reset_s, cfg.max_connections, cfg.startup_wait_s) == (7, 2.5, 4, 0.0)
    assert RemoteConfig.from_env({}) == RemoteConfig()
    assert RemoteConfig.from_env({"FUSION_INFERENCE_TOKEN": "t1"}).token == "t1"  # members share the front's Secret
    assert RemoteConfig.from_env({"FUSION_INFERENCE_TOKEN": "t1", "FUSION_REMOTE_TOKEN": "t2"}).token == "t2"
    assert "t1" not in repr(RemoteConfig.from_env({"FUSION_INFERENCE_TOKEN": "t1"}))
    # service/config.py reads them with every other setting
    from service import config

    cfg = config.load({"FUSION_REMOTE_BREAKER_FAILURES": "3", "FUSION_MEMBER_URL_MLP_0": "http://h:1/v2/models/mlp_0"}).remote
    assert cfg.breaker_failures == 3 and cfg.member_urls == {"FUSION_MEMBER_URL_MLP_0": "http://h:1/v2/models/mlp_0"}
    with pytest.raises(ConfigError, match="FUSION_REMOTE_BREAKER_FAILURES"):
        config.load({"FUSION_REMOTE_BREAKER_FAILURES": "-1"})
    with pytest.raises(ConfigError, match="FUSION_REMOTE_BREAKER_RESET_S: expected a number >= 0.001; got 'soon'"):
        RemoteConfig.from_env({"FUSION_REMOTE_BREAKER_RESET_S": "soon"})
    with pytest.raises(ConfigError, match="FUSION_REMOTE_MAX_CONNECTIONS: expected an integer >= 1; got '0'"):
        RemoteConfig.from_env({"FUSION_REMOTE_MAX_CONNECTIONS": "0"})


def test_member_url_env_override_and_checks():
    declared = "http://member-mlp-0:3000/v2/models/mlp_0"
    assert url_variable("mlp_0") == "FUSION_MEMBER_URL_MLP_0"
    assert member_url("mlp_0", declared, {}) == declared
    assert member_url("mlp_0", declared, {"FUSION_MEMBER_URL_MLP_0": "https://10.0.0.5:8000/v2/models/m/"}) == \
        "https://10.0.0.5:8000/v2/models/m"
    with pytest.raises(ConfigError, match=r"FUSION_MEMBER_URL_MLP_0\); got 'ftp://x/v2/models/m'"):
        member_url("mlp_0", declared, {"FUSION_MEMBER_URL_MLP_0": "ftp://x/v2/models/m"})
    with pytest.raises(ConfigError, match="expected a URL http"):
        member_url("mlp_0", "http://host:3000/predict", {})
    assert member_host("MLP_0") == "mlp-0" and member_host("3d.net") == "d-net"


class FakeOIP:
    """A foreign OIP v2 server (a Triton stand-in): JSON outputs only, named `logits`; `answer(X)` decides them."""

    def __init__(self, answer):
        self.answer, self.status, self.requests, self.version = answer, 200, [], "7"
        self.drop = 0  # requests still to be dropped: connection closed without an answer
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                n = int(self.headers["inference-header-content-length"])
                head = json.loads(body[:n])
                fake.requests.append((self.path, head, dict(self.headers)))
                if fake.drop:
                    fake.drop -= 1
                    self.close_connection = True  # no response at all: the client sees the peer hang up
                    return
                (inp,) = head["inputs"]
                X = np.frombuffer(body[n:], dtype="<f4").reshape(inp["shape"])
                out = fake.answer(X)
                content = json.dumps({"model_name": "m", "model_version": fake.version, "outputs": [
                    {"name": "logits", "datatype": "FP32", "shape": list(out.shape), "data": out.reshape(-1).tolist()}]}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/models/m"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_foreign_oip_server_with_declared_logits():
    """Any OIP v2 server: JSON outputs, its own output name, logits declared (softmaxed by members mode); answers of
    the wrong width, non-finite ones and error statuses are failures with clear messages."""
    from types import SimpleNamespace

    from service.members import FailurePolicy, MembersEnsemble
    from service.remote import RemoteError, RemoteMember

    W = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    fake = FakeOIP(lambda X: X @ W)
    X = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    try:
        m = RemoteMember("m", fake.url, "logits", "logits", "input", 3, 2.0, RemoteConfig(token="tok"), (X, X @ W))
        m.verify()
        np.testing.assert_allclose(m(X), X @ W, rtol=1e-6)
        path, head, headers = fake.requests[-1]
        assert path == "/v2/models/m/infer" and head["outputs"] == [{"name": "logits", "parameters": {"binary_data": True}}]
        assert headers["Authorization"] == "Bearer tok" and head["inputs"][0]["parameters"]["binary_data_size"] == X.nbytes
        assert m.status()["model_version"] == "7" and m.status()["health"] == "up"
        # a connection dropped without an answer is retried once, within the deadline; twice in a row fails
        fake.drop, before = 1, len(fake.requests)
        np.testing.assert_allclose(m(X), X @ W, rtol=1e-6)
        assert len(fake.requests) - before == 2 and m.breaker.failures == 0
        fake.drop = 2
        with pytest.raises(RemoteError, match="RemoteProtocolError.*retried once"):
            m(X)
        assert m.breaker.failures == 1
        # members mode softmaxes a member declared "logits"
        entry = SimpleNamespace(members=("m",), combiner={"name": "soft_vote", "weights": None}, method=None)
        manifest = SimpleNamespace(variants={"ensemble": entry}, members={"m": SimpleNamespace(output="logits", output_name="logits")},
                                   task="classification")
        ens = MembersEnsemble(SimpleNamespace(manifest=manifest, model=None), FailurePolicy.parse("strict", 2000), {"m": m})
        z = (X @ W).astype(np.float64)
        want = np.exp(z - z.max(-1, keepdims=True))
        np.testing.assert_allclose(ens(X)[0], want / want.sum(-1, keepdims=True), atol=1e-6)
        ens.close()
        # the member server is hot-swapped to another model: its new model_version triggers a new check, refused
        fake.version, fake.answer = "8", lambda X: 2 * X @ W
        with pytest.raises(MismatchError, match="answers differently from the bundle's record"):
            m(X)
        fake.answer = lambda X: X @ W  # swapped back to the bundle's model under version 8: verified again, served
        np.testing.assert_allclose(m(X), X @ W, rtol=1e-6)
        assert m.status()["model_version"] == "8"
        fake.answer = lambda X: np.ones((len(X), 4), dtype=np.float32)
        with pytest.raises(RemoteError, match=r"expected output shape \(5, 3\) \(the bundle's classes\); got \(5, 4\)"):
            m(X)
        fake.answer = lambda X: np.full((len(X), 3), 1e39)  # valid JSON, past float32: inf once read
        with pytest.raises(RemoteError, match="non-finite"):
            m(X)
        fake.status = 503
        with pytest.raises(RemoteError, match="answered HTTP 503; expected 200"):
            m(X)
        with pytest.raises(ConfigError, match=r"expected its output declared as one of \['logits', 'probabilities'\]"):
            RemoteMember("m", fake.url, "", "logits", "input", 3, 2.0, RemoteConfig())
    finally:
        fake.close()


def test_a_call_waiting_for_another_calls_verification_keeps_its_deadline():
    """Concurrent first calls to an unverified member queue on its verification; each waits at most its own
    deadline (not the sum of the calls ahead of it, each of which may spend a whole deadline on a hung member)."""
    from service.errors import DeadlineError
    from service.remote import RemoteMember

    W = np.eye(3, dtype=np.float32)
    fake = FakeOIP(lambda X: X @ W)
    X = np.ones((2, 3), dtype=np.float32)
    m = RemoteMember("m", fake.url, "logits", "logits", "input", 3, 0.2, RemoteConfig(), (X, X @ W))
    got = {}

    def call():
        try:
            got["out"] = m(X)
        except Exception as exc:  # noqa: BLE001 - what the call raised is the assertion
            got["exc"] = exc

    m._verify_lock.acquire()  # another request is verifying the member (and its probe call hangs)
    try:
        t = threading.Thread(target=call, daemon=True)
        t.start()
        t.join(10.0)  # the deadline is 0.2 s: a generous bound
        returned_while_held = not t.is_alive()
    finally:
        m._verify_lock.release()
        t.join(30.0)
        fake.close()
    assert returned_while_held, "the call waited on the other verification past its deadline"
    assert isinstance(got.get("exc"), DeadlineError) and "deadline" in str(got["exc"]), got


def test_member_url_forms():
    """A path prefix before /v2/models/NAME (an ingress or gateway routing by path) and a version are served;
    a query, a fragment, credentials in the URL (they would show in /info and errors: FUSION_REMOTE_TOKEN is the
    way) and a bad port are refused as the URL's error, not as a crash later."""
    env = "FUSION_MEMBER_URL_M"
    for ok in ("https://gw.example:443/serving/ns/m/v2/models/m", "http://h:8000/v2/models/m/versions/3"):
        assert member_url("m", "http://x:1/v2/models/m", {env: ok}) == ok
    for bad in ("http://h:1/v2/models/m?x=1", "http://h:1/v2/models/m#f", "http://u:secret@h:1/v2/models/m",
                "http://h:99999/v2/models/m", "http://h:port/v2/models/m", "http://h:1/v2/models/m/infer"):
        with pytest.raises(ConfigError, match=r"member 'm': expected a URL http\(s\)://HOST:PORT"):
            member_url("m", "http://x:1/v2/models/m", {env: bad})


def test_a_malformed_binary_answer_is_a_remote_error():
    """An answer whose binary part does not decode is the member's failure (RemoteError, counted as `answer`), like
    every other malformed answer; not a numpy ValueError."""
    from service.remote import RemoteError, RemoteMember

    m = RemoteMember("m", "http://127.0.0.1:9/v2/models/m", "probabilities", "probabilities", "input", 2, 1.0, RemoteConfig())

    def answer(size, blob: bytes) -> httpx.Response:
        head = json.dumps({"outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2],
                                        "parameters": {"binary_data_size": size}}]}).encode()
        return httpx.Response(200, headers={"inference-header-content-length": str(len(head))}, content=head + blob)

    assert m._parse(answer(8, np.array([0.25, 0.75], "<f4").tobytes()), 1)[0].tolist() == [[0.25, 0.75]]
    for size, blob in ((7, b"\0" * 7), ("8", b"\0" * 8), (None, b"")):
        with pytest.raises(RemoteError, match="remote member 'm'"):
            m._parse(answer(size, blob), 1)


# ---- the split bundles -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tiny_recipe, tmp_path_factory) -> Path:
    """The single-process bundle: an ensemble of three MLP members (no other variant: a quick build)."""
    from fusion.build import build_bundle
    from fusion.recipe import override

    r = override(tiny_recipe, "zoo", members=tuple(NAMES))
    r = override(r, "distill", enabled=False)
    r = override(r, "merge", method="")
    r = override(r, "build", out=str(tmp_path_factory.mktemp("remote") / "single"), compare=False)
    build_bundle(r)
    return Path(r.build.out)


@pytest.fixture(scope="module")
def split(single, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "split"
    split_bundle(single, out)
    return out


def test_split_writes_a_front_and_one_bundle_per_member(single, split):
    layout = json.loads((split / "split.json").read_text())
    assert list(layout["members"]) == NAMES
    front = read_bundle(split / "front", check_version=True).manifest
    src = read_bundle(single).manifest
    assert front.variants["ensemble"].file == "" and front.variants["ensemble"].combiner == src.variants["ensemble"].combiner
    for name in NAMES:
        e = front.members[name]
        assert (e.file, e.sha256, e.output) == ("", "", "probabilities")
        assert e.remote == f"http://member-{member_host(name)}:3000/v2/models/{name}" == layout["members"][name]["url"]
        member = read_bundle(split / layout["members"][name]["bundle"], check_version=True).manifest
        assert list(member.members) == [name] and member.variants == {}
        assert member.members[name].sha256 == src.members[name].sha256  # the same file, byte for byte
        assert member.probe["outputs"] == {name: src.probe["outputs"][name]}
    assert not list((split / "front").rglob("*.onnx"))  # the front holds no member or ensemble file
    # `remote` counts in the bundle version only when set: older bundles keep theirs
    data = json.loads((single / "manifest.json").read_text())
    for e in data["members"].values():
        e["remote"] = ""
    assert manifest_version(data) == src.bundle_version


def test_split_refuses_a_bundle_without_an_ensemble(single, tmp_path):
    from dataclasses import replace

    from fusion.bundle import BundleWriter
    import shutil

    m = read_bundle(single).manifest
    with BundleWriter(tmp_path / "b") as w:
        (w.stage / "members").mkdir()
        shutil.copyfile(single / m.members["mlp_0"].file, w.stage / m.members["mlp_0"].file)
        w.commit(replace(m, variants={}, members={"mlp_0": m.members["mlp_0"]}, comparison=None))
    with pytest.raises(ConfigError, match="expected a bundle with an 'ensemble' variant"):
        split_bundle(tmp_path / "b", tmp_path / "out")


def test_split_refuses_a_bad_url_template_before_writing(single, tmp_path):
    """`fusion split --url-template` is not checked by the recipe: a template with another field, a malformed one or
    one giving URLs the front would refuse is a ConfigError naming the template, and nothing is written."""
    for bad in ("http://member-{host}:{port}/v2/models/{name}", "http://{host}:3000/v2/models/{name}?x={host}",
                "http://{host}:3000/predict/{name}", "member-{host}:3000/v2/models/{name}", "http://{host:3000/v2/models/{name}"):
        with pytest.raises(ConfigError, match=r"url template: expected .*; got '"):
            split_bundle(single, tmp_path / "s", bad)
    assert not (tmp_path / "s").exists()


# ---- servers ------------------------------------------------------------------------------------------------


class Stub:
    """A tiny OIP server on loopback that forwards to a real member, or hangs / fails on command; counts infer calls."""

    def __init__(self, target: str):
        self.target, self.mode, self.calls = target, "ok", 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                stub.calls += 1
                if stub.mode == "hang":
                    time.sleep(HANG_S)
                if stub.mode == "fail":
                    self._send(500, b'{"error": "stub failure"}', {"Content-Type": "application/json"})
                    return
                r = httpx.post(stub.target + self.path, content=body, headers={k: v for k, v in self.headers.items() if k.lower() in
                                                      ("content-type", "inference-header-content-length", "authorization")}, timeout=10)
                keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "inference-header-content-length")}
                try:
                    self._send(r.status_code, r.content, keep)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the front gave up at its deadline

            def _send(self, status, content, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def start_all(servers: list[Server]) -> list[Server]:
    for s in servers:
        s.wait_ready = False
        s.start()
    for s in servers:
        s.wait("/readyz", 200)
    return servers


def compose_env(service: str, split: Path) -> dict:
    """A service's environment in deploy/compose-split.yaml as compose resolves it with the shell's variables
    unset, its /bundles mount pointed at `split`; the harness keeps its own home and state per server."""
    svc = yaml.safe_load(COMPOSE.read_text())["services"][service]
    env = {k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(v)) for k, v in svc["environment"].items()
           if k not in ("BENTOML_HOME", "TMPDIR", "FUSION_STATE_DIR")}
    env["FUSION_BUNDLE"] = str(split / Path(env["FUSION_BUNDLE"]).relative_to("/bundles"))
    return {**env, "FUSION_INFERENCE_TOKEN": TOKEN}


def test_compose_split_matches_the_split_bundles(split):
    """deploy/compose-split.yaml: a service per member of the split layout at the host its URL names, serving its
    bundle with itself as the default route, unpublished; the front serves the front bundle and waits for them."""
    from urllib.parse import urlsplit

    layout = json.loads((split / "split.json").read_text())
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    hosts = [m["host"] for m in layout["members"].values()]
    assert set(services) == {"front", *hosts}
    for name, m in layout["members"].items():
        svc = services[m["host"]]
        url = urlsplit(m["url"])
        assert (url.hostname, url.port, url.path) == (m["host"], 3000, f"/v2/models/{name}")
        assert svc["environment"]["FUSION_BUNDLE"] == f"/bundles/{m['bundle']}"
        assert svc["environment"]["FUSION_AB_WEIGHTS"] == f"{name}=1"
        assert "ports" not in svc and svc["expose"] == ["3000"] and svc["networks"] == ["members"]
    front = services["front"]
    assert front["environment"]["FUSION_BUNDLE"] == "/bundles/front" and set(front["depends_on"]) == set(hosts)
    assert front["ports"] == ["127.0.0.1:3000:3000"] and set(front["networks"]) == {"default", "members"}
    assert yaml.safe_load(COMPOSE.read_text())["networks"]["members"]["internal"] is True


def test_kubernetes_split_overlay_matches_the_split_bundles(split):
    from tests.test_deploy import kustomize

    layout = json.loads((split / "split.json").read_text())
    docs = kustomize("split")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for name, m in layout["members"].items():
        assert services[m["host"]]["spec"]["ports"][0]["port"] == 3000
        env = {e["name"]: e["value"] for e in deps[m["host"]]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["FUSION_BUNDLE"].endswith(f"/bundle-split/{m['bundle']}") and env["FUSION_AB_WEIGHTS"] == f"{name}=1"


@pytest.fixture(scope="module")
def members(split):
    layout = json.loads((split / "split.json").read_text())
    servers = {n: Server(None, env=compose_env(layout["members"][n]["host"], split)) for n in NAMES}
    try:
        start_all(list(servers.values()))
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def stub(members):
    s = Stub(members["mlp_2"].url)
    yield s
    s.close()


def member_env(members, **override) -> dict:
    env = {url_variable(n): f"{members[n].url}/v2/models/{n}" for n in NAMES}
    return {**env, **override, "FUSION_MEMBER_DEADLINE_MS": str(DEADLINE_MS),
            "FUSION_REMOTE_BREAKER_FAILURES": str(BREAKER_FAILURES), "FUSION_REMOTE_BREAKER_RESET_S": str(BREAKER_RESET_S)}


@pytest.fixture(scope="module")
def fronts(split, members, stub):
    front = compose_env("front", split)  # as deploy/compose-split.yaml runs it, the members on loopback
    strict = Server(None, env={**front, **member_env(members), "FUSION_FAILURE_POLICY": "strict"})
    quorum = Server(None, env={**front, **member_env(members, **{url_variable("mlp_2"): stub.url + "/v2/models/mlp_2"}),
                               "FUSION_FAILURE_POLICY": "quorum:2"})
    try:
        start_all([strict, quorum])
        yield {k: httpx.Client(base_url=s.url, timeout=30, headers=AUTH) for k, s in (("strict", strict), ("quorum", quorum))}
    finally:
        strict.stop()
        quorum.stop()


@pytest.fixture(scope="module")
def oracle(single):
    return Oracle(single)


@pytest.fixture(scope="module")
def X(digits):
    return np.ascontiguousarray(digits.X_test[:64], dtype=np.float32)


def predict(c: httpx.Client, X: np.ndarray) -> httpx.Response:
    return c.post("/predict", json={"inputs": rows_json(X)})


@pytest.mark.server
def test_front_equals_the_single_process_ensemble(fronts, oracle, X):
    for c in fronts.values():
        r = predict(c, X)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["variant"] == "ensemble" and body["degraded"] is False and body["members_answered"] == NAMES
        np.testing.assert_allclose(body["probabilities"], oracle.soft_vote(NAMES, X), atol=1e-6, rtol=0)
        np.testing.assert_allclose(body["probabilities"], oracle("ensemble", X), atol=1e-5, rtol=0)  # the fused graph
        assert body["predictions"] == oracle.labels(oracle("ensemble", X))
    # the OIP endpoint of the front, binary tensors in and out
    blob = X.astype("<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    r = fronts["strict"].post("/v2/models/fusion/infer", content=head + blob,
                              headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    out = np.frombuffer(r.content[n:], dtype="<f4").reshape(len(X), -1)
    np.testing.assert_allclose(out, oracle.soft_vote(NAMES, X), atol=1e-6, rtol=0)


@pytest.mark.server
def test_info_and_metrics_show_each_remote_member(fronts, members):
    info = fronts["strict"].get("/info").json()
    for n in NAMES:
        st = info["members"][n]["remote"]
        assert info["members"][n]["device"] == "remote"
        assert st["url"] == f"{members[n].url}/v2/models/{n}"
        assert st["health"] == "up" and st["breaker"] == "closed" and st["calls"] >= 1 and st["errors"] == 0
        assert st["latency_ms"] > 0 and st["model_version"]
    assert "members" in info["modes"]
    # the members take only the token the front sends them
    r = httpx.post(f"{members['mlp_0'].url}/v2/models/mlp_0/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 401, r.text
    text = fronts["strict"].get("/metrics").text
    for n in NAMES:
        assert f'fusion_remote_breaker_state{{member="{n}"}} 0.0' in text
        assert f'fusion_remote_latency_seconds_count{{member="{n}"}}' in text


@pytest.mark.server
def test_a_member_serving_another_model_is_refused_at_start(split, members):
    """The front's load path (service/bundles.BundleHolder.start) with mlp_0's URL pointing at mlp_1's server."""
    from service import config
    from service.bundles import BundleHolder
    from service.config import EngineConfig
    from service.members import FailurePolicy

    env = {**member_env(members, **{url_variable("mlp_0"): f"{members['mlp_1'].url}/v2/models/mlp_1"}),
           "FUSION_REMOTE_STARTUP_WAIT_S": "0", "FUSION_REMOTE_TOKEN": TOKEN}
    holder = BundleHolder(EngineConfig(bundle=str(split / "front")), FailurePolicy.parse("quorum:1", DEADLINE_MS), lambda s: None,
                          remote_cfg=config.load(env).remote)  # as the service reads its environment
    holder.start()
    assert not holder.ready
    assert "remote member 'mlp_0'" in holder.error and "answers differently from the bundle's record" in holder.error
    # a member that cannot be reached: refused under strict once the start-up wait is over
    env[url_variable("mlp_0")] = "http://127.0.0.1:9/v2/models/mlp_0"
    holder = BundleHolder(EngineConfig(bundle=str(split / "front")), FailurePolicy.parse("strict", DEADLINE_MS), lambda s: None,
                          remote_cfg=config.load(env).remote)
    holder.start()
    assert not holder.ready and "2 of 3 verified, needs every member (policy strict)" in holder.error


@pytest.mark.server
def test_a_hot_swap_checks_the_new_fronts_members(single, members, tmp_path):
    """After a hot swap the members are checked again: a front whose mlp_0 URL names mlp_1's server is refused
    and the served version stays."""
    from service import config
    from service.bundles import BundleHolder
    from service.config import EngineConfig
    from service.members import FailurePolicy

    urls = {n: f"{members[n].url}/v2/models/{n}" for n in NAMES}
    # mlp_0's URL from each front bundle (no override): the good front names mlp_0's server, the bad one mlp_1's
    ok = split_bundle(single, tmp_path / "ok", url_template=members["mlp_0"].url + "/v2/models/{name}")
    split_bundle(single, tmp_path / "bad", url_template=urls["mlp_1"])
    env = {"FUSION_REMOTE_STARTUP_WAIT_S": "0", "FUSION_REMOTE_TOKEN": TOKEN, **{url_variable(n): urls[n] for n in ("mlp_1", "mlp_2")}}
    holder = BundleHolder(EngineConfig(bundle=str(tmp_path / "ok" / "front"), bundle_root=str(tmp_path)),
                          FailurePolicy.parse("strict", DEADLINE_MS), lambda s: None, remote_cfg=config.load(env).remote)
    holder.start()
    assert holder.ready, holder.error
    before = holder.current().version
    assert before == ok["front_version"]
    with pytest.raises(MismatchError, match="remote member 'mlp_0'.*answers differently from the bundle's record"):
        holder.swap(str(tmp_path / "bad" / "front"))
    assert holder.current().version == before


def wait_healthy(c: httpx.Client, X: np.ndarray, within_s: float = 15.0) -> dict:
    """Poll until an answer is not degraded (a breaker may need its reset period first)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        body = predict(c, X).json()
        if body.get("degraded") is False:
            return body
        time.sleep(0.3)
    raise AssertionError(f"still degraded after {within_s} s: {body}")


@pytest.mark.server
def test_a_hung_member_is_cut_at_its_deadline(fronts, stub, X, oracle):
    c = fronts["quorum"]
    wait_healthy(c, X[:4])
    stub.mode = "hang"
    try:
        t0 = time.monotonic()
        r = predict(c, X[:4])
        elapsed = time.monotonic() - t0
    finally:
        stub.mode = "ok"
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and body["members_answered"] == ["mlp_0", "mlp_1"]
    assert "deadline" in body["members_failed"]["mlp_2"], body
    assert DEADLINE_MS / 1e3 * 0.9 <= elapsed < DEADLINE_MS / 1e3 + MARGIN_S < HANG_S
    np.testing.assert_allclose(body["probabilities"], oracle.soft_vote(["mlp_0", "mlp_1"], X[:4]), atol=1e-6, rtol=0)


@pytest.mark.server
def test_the_circuit_breaker_opens_and_closes(fronts, stub, X):
    c = fronts["quorum"]
    wait_healthy(c, X[:2])
    stub.mode = "fail"
    try:
        before = stub.calls
        for _ in range(BREAKER_FAILURES):  # each reaches the stub and fails: the answer is degraded
            body = predict(c, X[:2]).json()
            assert body["degraded"] is True and "HTTP 500" in body["members_failed"]["mlp_2"], body
        assert stub.calls - before == BREAKER_FAILURES
        st = c.get("/info").json()["members"]["mlp_2"]["remote"]
        assert st["breaker"] == "open" and st["health"] == "down", st
        assert 'fusion_remote_breaker_state{member="mlp_2"} 2.0' in c.get("/metrics").text
        body = predict(c, X[:2]).json()  # open: the member is not called at all
        assert "circuit breaker open" in body["members_failed"]["mlp_2"] and stub.calls - before == BREAKER_FAILURES
        stub.mode = "ok"
        time.sleep(BREAKER_RESET_S + 0.2)  # half-open: one trial call, which succeeds and closes the breaker
        body = predict(c, X[:2]).json()
        assert body["degraded"] is False and stub.calls - before == BREAKER_FAILURES + 1, body
        st = c.get("/info").json()["members"]["mlp_2"]["remote"]
        assert st["breaker"] == "closed" and st["health"] == "up", st
    finally:
        stub.mode = "ok"


@pytest.mark.server
def test_quorum_starts_with_k_verified_and_the_rest_verify_on_first_contact(split, members, stub, X, oracle):
    from service import config
    from service.bundles import BundleHolder
    from service.config import EngineConfig
    from service.members import FailurePolicy

    env = {**member_env(members, **{url_variable("mlp_2"): stub.url + "/v2/models/mlp_2"}),
           "FUSION_REMOTE_STARTUP_WAIT_S": "0", "FUSION_REMOTE_TOKEN": TOKEN}
    stub.mode = "fail"  # mlp_2 cannot answer the probe rows while the front loads
    try:
        holder = BundleHolder(EngineConfig(bundle=str(split / "front")), FailurePolicy.parse("quorum:2", DEADLINE_MS),
                              lambda s: None, remote_cfg=config.load(env).remote)
        holder.start()
    finally:
        stub.mode = "ok"
    assert holder.ready, holder.error
    ens = holder.current().members
    assert [n for n, r in ens.remotes.items() if not r.health.verified] == ["mlp_2"]
    out, extra = ens(X[:4])  # mlp_2 answers now: checked against the probe rows first, then used
    assert extra["degraded"] is False and ens.remotes["mlp_2"].health.verified
    np.testing.assert_allclose(out, oracle.soft_vote(NAMES, X[:4]), atol=1e-6, rtol=0)
    holder.current().close()
    # the same under strict: refused (every member must be verified)
    stub.mode = "fail"
    try:
        strict = BundleHolder(EngineConfig(bundle=str(split / "front")), FailurePolicy.parse("strict", DEADLINE_MS),
                              lambda s: None, remote_cfg=config.load(env).remote)
        strict.start()
    finally:
        stub.mode = "ok"
    assert not strict.ready and "mlp_2" in strict.error and "HTTP 500" in strict.error


@pytest.mark.server
def test_killing_a_member_503_under_strict_degraded_under_quorum(fronts, members, X, oracle):
    """Last: it stops mlp_0's server for good."""
    members["mlp_0"].stop()
    t0 = time.monotonic()
    r = predict(fronts["strict"], X[:4])
    assert time.monotonic() - t0 < DEADLINE_MS / 1e3 + MARGIN_S
    body = assert_error_shape(r, 503)
    assert "member 'mlp_0' failed" in body["error"] and "policy strict" in body["error"], body
    t0 = time.monotonic()
    r = predict(fronts["quorum"], X[:4])
    assert time.monotonic() - t0 < DEADLINE_MS / 1e3 + MARGIN_S
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["degraded"] is True and body["members_answered"] == ["mlp_1", "mlp_2"]
    assert "ConnectError" in body["members_failed"]["mlp_0"] and "retried once" in body["members_failed"]["mlp_0"]
    np.testing.assert_allclose(body["probabilities"], oracle.soft_vote(["mlp_1", "mlp_2"], X[:4]), atol=1e-6, rtol=0)


def test_cli_split_and_the_url_template(single, tmp_path, capsys):
    from fusion.cli import SPLIT_URL_TEMPLATE, main
    from fusion.split import DEFAULT_URL_TEMPLATE

    assert SPLIT_URL_TEMPLATE == DEFAULT_URL_TEMPLATE
    assert main(["split", str(single), "--out", str(tmp_path / "s"), "--url-template", "https://{host}.ml.svc:8443/v2/models/{name}"]) == 0
    assert "split layout written" in capsys.readouterr().out
    front = read_bundle(tmp_path / "s" / "front", check_version=True).manifest
    assert front.members["mlp_1"].remote == "https://mlp-1.ml.svc:8443/v2/models/mlp_1"


def test_build_split_flag_parses():
    from fusion.cli import parser

    p = parser()
    assert p.parse_args(["build"]).split is None
    assert p.parse_args(["build", "--split"]).split == ""  # the default directory: OUT-split
    assert p.parse_args(["build", "--split", "d", "--url-template", "http://{host}:1/v2/models/{name}"]).split == "d"
