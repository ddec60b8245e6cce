"""Cases 5 and 6: bad bundles at start, and hostile model files.

5. A corrupted or missing file at start: the digest check catches it before anything is parsed; the
   server stays up and not ready (503 on /readyz and /v2/health/ready, 503 on /predict in the one
   error shape, with no server path in it); the log names the file and both digests.
6. Hostile model files (external data via `../`, an absolute path, a link, the bundle itself or the
   server's working directory; an operator from a custom domain; a pickle where an ONNX file or
   safetensors weights belong; a link or a `../` path in the manifest): all refused, by the service
   at start or on swap (test_load_and_swap.py::test_10) and by the offline loader; the canary file a
   pickle payload would create never appears.
"""

from __future__ import annotations

import hashlib
import json
import re
import time

import httpx
import pytest

from fusion.errors import BundleError
from tests.reliability import bundles
from tests.reliability.harness import ROOT, env_threads, get_status, record
from tests.server import Server


@pytest.fixture(scope="module")
def hostile(v1, tmp_path_factory):
    where = tmp_path_factory.mktemp("hostile")
    canary = where / "CANARY"
    return bundles.hostile_bundles(v1, where / "bundles", canary), canary


# ---- case 5: at start ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_servers(hostile):
    found, canary = hostile
    names = ("corrupt_file", "missing_file", "pickle_manifest_entry")
    servers = {n: Server(found[n][0], env=env_threads(), wait_ready=False) for n in names}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait("/livez", 200)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.mark.server
def test_05_bad_bundle_at_start_stays_not_ready(bad_servers, hostile):
    found, canary = hostile
    time.sleep(1.0)  # past the load attempt
    figures = {}
    for name, srv in bad_servers.items():
        bundle, must_name = found[name]
        seen = {"/readyz": set(), "/v2/health/ready": set()}
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # stays 503, not just once
            for path in seen:
                seen[path].add(get_status(srv.url + path))
            time.sleep(0.2)
        r = httpx.post(srv.url + "/predict", json={"inputs": [[0.0] * 64]}, timeout=5)
        body = r.json()
        log = srv.log()
        assert seen == {"/readyz": {503}, "/v2/health/ready": {503}}, (name, seen)
        assert get_status(srv.url + "/livez") == 200 and srv.proc.poll() is None
        assert r.status_code == 503 and set(body) == {"error", "request_id"}, (name, body)
        assert str(bundle) not in body["error"] and str(ROOT) not in body["error"], body["error"]  # no server path to clients
        assert must_name in log, (name, log[-2000:])
        if name == "corrupt_file":
            declared = json.loads((bundle / "manifest.json").read_text())["members"]["mlp_2"]["sha256"]
            actual = hashlib.sha256((bundle / must_name).read_bytes()).hexdigest()
            assert declared in log and actual in log, "the log must name both digests"
        assert "Traceback" not in log
        figures[name] = {"readyz": sorted(seen["/readyz"]), "v2_ready": sorted(seen["/v2/health/ready"]),
                         "predict": r.status_code, "log_line": next((ln[-240:] for ln in log.splitlines() if must_name in ln), None)}
    record("05_bad_bundle_at_start", servers=figures, canary_created=canary.exists())
    assert not canary.exists()


# ---- case 6: hostile model files, offline and in-process ------------------------------------


def test_06_hostile_bundles_refused_before_parsing(hostile):
    """Every hostile bundle: `runtime.load` (what the service's start and swap call) raises a
    BundleError naming the file; the engine stays not ready; no payload runs."""
    from service import runtime
    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy

    found, canary = hostile
    refused = {}
    for name, (path, must_name) in found.items():
        with pytest.raises(BundleError) as err:
            runtime.load(path)
        assert must_name in str(err.value), (name, str(err.value))
        engine = Engine(EngineConfig(bundle=str(path)), RoutingPolicy())
        engine.start()
        assert not engine.ready and must_name in engine.error
        refused[name] = f"{type(err.value).__name__}: {str(err.value)[:160]}"
    record("06_hostile_model_files", refused=refused, canary_created=canary.exists())
    assert not canary.exists(), "a pickle payload was unpickled"


def test_06_pickle_where_safetensors_weights_belong(tmp_path):
    """`fusion.zoo.load_member` reads weights with safetensors only: a pickle (plain, or torch.save's
    zip) named `.safetensors` is refused without being unpickled."""
    torch = pytest.importorskip("torch")
    from fusion.zoo import MemberSpec, load_member, load_zoo

    canary = tmp_path / "CANARY"
    spec = MemberSpec(name="evil", arch="mlp", args={"in_features": 64, "hidden": [8], "n_outputs": 10}, seed=0)
    refused = {}
    for kind in ("pickle", "torch_save_zip"):
        zoo = tmp_path / kind
        zoo.mkdir()
        weights = zoo / "evil.safetensors"
        if kind == "pickle":
            weights.write_bytes(bundles.pickle_payload(canary))
        else:
            torch.save({"layers.0.weight": bundles.CanaryPayload(canary)}, weights)
        (zoo / "evil.json").write_text(spec.to_json())
        with pytest.raises(Exception) as err:
            load_member(weights)
        with pytest.raises(Exception):
            load_zoo(zoo)
        refused[kind] = f"{type(err.value).__name__}: {str(err.value)[:120]}"
    record("06_pickle_as_safetensors", refused=refused, canary_created=canary.exists())
    assert not canary.exists(), "a pickle payload was unpickled"


UNSAFE = [
    (r"\bpickle\.loads?\(", "pickle.load"),
    (r"\b(c?P|p)ickle\.Unpickler\(", "an Unpickler"),
    (r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"\b(joblib|dill|cloudpickle|shelve)\b", "a pickle-based loader"),
    (r"\byaml\.load\(", "yaml.load (unsafe loader)"),
    (r"register_custom_ops_library", "a custom-op library"),
]


def test_06_no_code_path_unpickles_or_loads_native_ops():
    """No module of the product can unpickle model files or load a custom-op library."""
    hits = []
    for folder in ("fusion", "service"):
        for py in sorted((ROOT / folder).rglob("*.py")):
            text = py.read_text(errors="replace")
            for pattern, what in UNSAFE:
                for m in re.finditer(pattern, text):
                    line = text.count("\n", 0, m.start()) + 1
                    hits.append(f"{py.relative_to(ROOT)}:{line}: {what}")
    assert not hits, hits
