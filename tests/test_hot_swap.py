"""Hot swap through a real server: under a steady stream of requests, swap bundle versions back and
forth with zero failed requests, every response tagged with exactly one version whose offline outputs
it equals; corrupted bundles are refused (naming the file) while the old version keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fusion.bundle import manifest_version
from tests.server import Server
from tests.serving_util import Oracle, assert_error_shape, rows_json, wait_for

ADMIN = "swap-" + secrets.token_hex(12)
ATOL = 1e-5
BATCH = 4
MAX_STREAM = 20_000  # bound on requests per streaming thread


@pytest.fixture(scope="module")
def bundle_v2(tiny_recipe, tmp_path_factory) -> Path:
    """A second version of the bundle: same zoo, hard voting instead of soft voting."""
    from fusion.build import build_bundle
    from fusion.recipe import override

    r = override(tiny_recipe, "ensemble", combiner="hard_vote")
    r = override(r, "build", out=str(tmp_path_factory.mktemp("bundle_v2") / "bundle"), compare=False)
    build_bundle(r)
    return Path(r.build.out)


@pytest.fixture(scope="module")
def oracles(tiny_bundle, bundle_v2):
    o1, o2 = Oracle(tiny_bundle), Oracle(bundle_v2)
    assert o1.version != o2.version
    return {o1.version: o1, o2.version: o2}


@pytest.fixture(scope="module")
def X(digits):
    return np.ascontiguousarray(digits.X_test[:200], dtype=np.float32)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    # every bundle of this module lies below pytest's base temp dir; by default swaps could only load
    # the siblings of tiny_bundle (FUSION_BUNDLE_ROOT defaults to the served bundle's directory)
    env = {"FUSION_ADMIN_TOKEN": ADMIN, "FUSION_BUNDLE_ROOT": str(tmp_path_factory.getbasetemp())}
    with Server(tiny_bundle, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120) as c:
        yield c


class Stream:
    """Background threads sending requests continuously; each result keeps its send time."""

    def __init__(self, url: str, X: np.ndarray, threads: int = 2):
        self.url, self.X = url, X
        self.stop = threading.Event()
        self.results: list[dict] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(t,), daemon=True) for t in range(threads)]

    def run(self, t: int) -> None:
        kinds = ("predict", "members", "oip")
        with httpx.Client(base_url=self.url, timeout=30) as c:
            for i in range(MAX_STREAM):
                if self.stop.is_set():
                    return
                kind = kinds[(i + t) % 3]
                start = (i * BATCH) % (len(self.X) - BATCH)
                rows = self.X[start:start + BATCH]
                sent = time.monotonic()
                try:
                    if kind == "oip":
                        r = c.post("/v2/models/ensemble/infer", json={"inputs": [
                            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]})
                    else:
                        headers = {"X-Variant": "members"} if kind == "members" else {}
                        r = c.post("/predict", json={"inputs": rows_json(rows)}, headers=headers)
                    result = {"kind": kind, "start": start, "sent": sent, "status": r.status_code, "body": r.json(),
                              "header_version": r.headers.get("x-bundle-version")}
                except Exception as exc:  # noqa: BLE001 - a transport failure is a failed request too
                    result = {"kind": kind, "start": start, "sent": sent, "status": None, "body": repr(exc)}
                with self.lock:
                    self.results.append(result)

    def count(self, version: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.results if version is None or version_of(r) == version)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def version_of(result: dict) -> str | None:
    body = result["body"]
    if not isinstance(body, dict):
        return None
    if result["kind"] == "oip":
        return body.get("model_version")
    return body.get("bundle_version")


def probabilities(result: dict) -> np.ndarray:
    body = result["body"]
    if result["kind"] == "oip":
        out = next(o for o in body["outputs"] if o["name"] == "probabilities")
        return np.reshape(out["data"], out["shape"])
    return np.asarray(body["probabilities"])


def swap(admin: httpx.Client, path) -> httpx.Response:
    return admin.post("/admin/bundle", json={"path": str(path)})


def tampered_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    target = dst / "members" / "mlp_0.onnx"
    if how == "flip":  # a changed file, the manifest untouched
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif how == "manifest":  # the manifest's digest edited
        manifest["variants"]["ensemble"]["sha256"] = "0" * 64
        (dst / "manifest.json").write_text(json.dumps(manifest))
    elif how == "garbage":  # not ONNX at all, with a digest (and so a version) that matches: the ONNX check must refuse it
        target.write_bytes(b"this is not an onnx model" * 10)
        manifest["members"]["mlp_0"]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
        manifest["bundle_version"] = manifest_version(manifest)
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.server
def test_hot_swap_under_a_steady_stream(server, admin, tiny_bundle, bundle_v2, oracles, X, tmp_path):
    v1, v2 = Oracle(tiny_bundle).version, Oracle(bundle_v2).version
    # the two versions really answer differently on these rows (so the version tags are checkable)
    assert np.abs(oracles[v1]("ensemble", X) - oracles[v2]("ensemble", X)).max() > 1e-2
    assert_error_shape(httpx.post(server.url + "/admin/bundle", json={"path": str(bundle_v2)}), 401)

    swaps = []  # (time the swap was sent, time it returned, version now served)
    refusals = []
    with Stream(server.url, X) as stream:
        wait_for(lambda: stream.count(v1) >= 30, timeout=60, what="traffic on v1")
        for target, version in ((bundle_v2, v2), (tiny_bundle, v1), (bundle_v2, v2)):
            t_sent = time.monotonic()
            r = swap(admin, target)
            assert r.status_code == 200, r.text
            assert r.json()["bundle_version"] == version
            swaps.append((t_sent, time.monotonic(), version))
            n = stream.count(version)
            wait_for(lambda: stream.count(version) >= n + 30, timeout=60, what=f"traffic on {version}")
        # corrupted versions are refused, naming the file, while v2 keeps serving
        for how, name, why in (("flip", "members/mlp_0.onnx", "sha256"), ("manifest", "ensemble.onnx", "sha256"),
                               ("garbage", "members/mlp_0.onnx", "onnx")):
            r = swap(admin, tampered_copy(bundle_v2, tmp_path / how, how))
            body = assert_error_shape(r, 503)
            assert name in body["error"] and why in body["error"].lower().replace(name, ""), body
            refusals.append(body["error"])
        r = swap(admin, tmp_path / "no-such-bundle")  # the caller's mistake: 400, not a 503 clients would retry
        assert "manifest.json" in assert_error_shape(r, 400, echoed_path=str(tmp_path / "no-such-bundle"))["error"]
        n = stream.count(v2)
        wait_for(lambda: stream.count(v2) >= n + 30, timeout=60, what="traffic after the refusals")

    results = stream.results
    assert len(results) >= 200
    failed = [r for r in results if r["status"] != 200]
    assert not failed, failed[:3]
    seen = {version_of(r) for r in results}
    assert seen == {v1, v2}
    for r in results:
        version = version_of(r)
        assert r["header_version"] == version  # exactly one version per response, header and body agree
        o = oracles[version]
        rows = X[r["start"]:r["start"] + BATCH]
        np.testing.assert_allclose(probabilities(r), o("ensemble", rows), atol=ATOL, err_msg=f"{r['kind']} on {version}")
    # every request sent after a swap returned was answered by the new version (until the next swap)
    for k, (_, t_done, version) in enumerate(swaps):
        t_next = swaps[k + 1][0] if k + 1 < len(swaps) else float("inf")
        after = [r for r in results if t_done < r["sent"] < t_next]
        assert after and {version_of(r) for r in after} == {version}
    assert len(refusals) == 3
    # after the refusals, the server still answers with v2 and reports it
    info = admin.get("/info").json()
    assert info["bundle_version"] == v2
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200


def test_a_swapped_out_version_lets_go_of_its_member_threads(tiny_bundle, bundle_v2, X):
    """In process: the old version is not closed under running requests, yet its member threads go
    once nothing holds it (no thread leak per swap)."""
    import gc
    import weakref

    from service.config import EngineConfig
    from service.engine import Engine
    from service.routing import RoutingPolicy

    root = os.path.commonpath([tiny_bundle, bundle_v2])  # two pytest temp dirs: allow swaps between them
    eng = Engine(EngineConfig(bundle=str(tiny_bundle), bundle_root=root), RoutingPolicy())
    eng.start()
    assert eng.ready, eng.error
    old = eng.current()
    out_v1 = asyncio.run(eng.predict(X[:4], variant="members", key=None, request_id="a"))
    threads = [t for t in threading.enumerate() if t.name.startswith("member")]
    assert threads
    pool = weakref.ref(old.members.pool)
    # a request that took the old version before the swap still completes on it after the swap
    eng.swap(str(bundle_v2))
    late = asyncio.run(eng.predict(X[:4], variant="members", key=None, request_id="late", served=old))
    assert late.version == old.version
    out_late = late.output
    np.testing.assert_allclose(out_late, out_v1.output, atol=ATOL)
    assert asyncio.run(eng.predict(X[:4], variant="members", key=None, request_id="b")).version == eng.current().version != old.version
    del old, out_late, late
    gc.collect()
    wait_for(lambda: pool() is None and not any(t.is_alive() for t in threads), timeout=10, what="old member threads exit")
