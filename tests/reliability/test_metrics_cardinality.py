"""Issue 13, finding 2: Prometheus label values are bounded, whatever paths clients send.

BentoML 1.4.40 labelled its HTTP metrics with the raw request path: every unknown path (a 404, or a
401 before any token check could help) made new series, in `/metrics` and in the multiprocess
directory, which grew on the pod's emptyDir until it was evicted. Here, on the shared server (both
tokens set, so 401s are covered too), 1,000+ requests with distinct unknown paths, unknown model
names under `/v2/models/<name>/...` and wrong tokens must leave the number of series, the size of
`/metrics` and the multiprocess directory flat, and no client string may appear in any label.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest

from service.metrics import OTHER, UNKNOWN, Bounded, EndpointLabels
from tests.reliability import bundles
from tests.reliability.harness import record

N_DISTINCT = 1000
MAX_NEW_SERIES = 5  # a new status code on a known endpoint may add a series or two; the paths must add none
MAX_METRICS_GROWTH = 8 << 10  # bytes: counters gain digits, nothing else
MAX_DIR_GROWTH = 64 << 10  # bytes: the mmap'd files only grow when a new series is written


def series(text: str) -> set[str]:
    """The sample names with their labels (values dropped) of a Prometheus text exposition."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def dir_bytes(path: Path) -> tuple[int, int]:
    """(bytes on disk, apparent bytes) of the files under `path`: the mmap'd files are sparse."""
    files = [p.stat() for p in path.rglob("*") if p.is_file()]
    return sum(s.st_blocks * 512 for s in files), sum(s.st_size for s in files)


def hostile_requests(client: httpx.Client, auth: dict, n: int) -> tuple[dict[int, int], list[str]]:
    """n requests, each with a fresh random string in its path; returns (statuses, the strings)."""
    statuses: dict[int, int] = {}
    sent: list[str] = []
    for i in range(n):
        tag = f"zz{secrets.token_hex(6)}"
        sent.append(tag)
        kind = i % 8
        if kind == 0:
            r = client.get(f"/{tag}")
        elif kind == 1:
            r = client.post(f"/{tag}/deeper/{i}", json={}, headers=auth["inference"])
        elif kind == 2:  # unknown model name, right token: 404 from our route
            r = client.post(f"/v2/models/{tag}/infer", json={}, headers=auth["inference"])
        elif kind == 3:  # unknown model name, no token: 401 before the name is looked at
            r = client.post(f"/v2/models/{tag}/infer", json={})
        elif kind == 4:
            r = client.get(f"/v2/models/{tag}", headers={"Authorization": f"Bearer {tag}"})  # wrong token: 401
        elif kind == 5:
            r = client.get(f"/v2/models/{tag}/ready", headers=auth["inference"])
        elif kind == 6:  # BentoML's static files: its own 404
            r = client.get(f"/static_content/{tag}.js")
        else:  # non-ASCII, percent-encoded
            r = client.delete(f"/%F0%9F%98%80{tag}/%00")
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return statuses, sent


@pytest.mark.server
def test_sec02_unknown_paths_make_no_new_series(main_server, auth):
    mp_dir = Path(main_server.home) / "prometheus_multiproc_dir"
    assert mp_dir.is_dir() and any(mp_dir.glob("*.db")), (
        f"expected BentoML's multiprocess directory with .db files at {mp_dir}; got {sorted(mp_dir.parent.iterdir())}")
    with httpx.Client(base_url=main_server.url, timeout=10) as client:
        warm_statuses, _ = hostile_requests(client, auth, 16)  # every kind of request once or twice: its series exist
        text0 = client.get("/metrics").text
        disk0, size0 = dir_bytes(mp_dir)
        statuses, sent = hostile_requests(client, auth, N_DISTINCT)
        text1 = client.get("/metrics").text
        disk1, size1 = dir_bytes(mp_dir)
        assert client.get("/readyz").status_code == 200
        # the routes still see the real path (only BentoML's metrics see the template)
        missing = client.get(f"/zz-{sent[0]}")
        assert missing.status_code == 404 and f"/zz-{sent[0]}" in missing.json()["error"], missing.text
        infer = client.post("/v2/models/mlp_0/infer", headers=auth["inference"], json={
            "inputs": [{"name": "input", "shape": [1, bundles.N_FEATURES], "datatype": "FP32", "data": [1.0] * bundles.N_FEATURES}]})
        assert infer.status_code == 200 and infer.json()["model_name"] == "mlp_0", infer.text
    s0, s1 = series(text0), series(text1)
    new = sorted(s1 - s0)
    leaked = sorted({tag for tag in sent if tag in text1})
    record("sec02_metrics_cardinality", requests_sent=N_DISTINCT, statuses=statuses, warmup_statuses=warm_statuses,
           series_before=len(s0), series_after=len(s1), new_series=len(new),
           metrics_bytes_before=len(text0), metrics_bytes_after=len(text1),
           multiproc_disk_bytes_before=disk0, multiproc_disk_bytes_after=disk1,
           multiproc_apparent_bytes_before=size0, multiproc_apparent_bytes_after=size1,
           client_strings_in_metrics=len(leaked))
    assert set(statuses) <= {401, 404, 405}, f"expected only 401/404/405 for unknown paths and names; got {statuses}"
    assert not leaked, f"expected no client-sent string in /metrics; got {len(leaked)} of {len(sent)}, e.g. {leaked[:3]}"
    assert len(new) <= MAX_NEW_SERIES, (
        f"expected at most {MAX_NEW_SERIES} new series after {N_DISTINCT} distinct unknown paths; "
        f"got {len(new)} ({len(s0)} -> {len(s1)}), e.g. {new[:3]}")
    assert len(text1) - len(text0) <= MAX_METRICS_GROWTH, (
        f"expected /metrics to grow by at most {MAX_METRICS_GROWTH} bytes; got {len(text0)} -> {len(text1)}")
    assert disk1 - disk0 <= MAX_DIR_GROWTH and size1 - size0 <= MAX_DIR_GROWTH, (
        f"expected the multiprocess directory to grow by at most {MAX_DIR_GROWTH} bytes; got {disk0} -> {disk1} on disk, "
        f"{size0} -> {size1} apparent")
    # the endpoints are still labelled, by template: the operator keeps per-endpoint figures
    assert 'endpoint="/v2/models/{name}/infer"' in text1, "expected the OIP infer requests labelled by their route template"


# ---- in-process: the label mapping and the bound ------------------------------------------------------


def test_sec02_endpoint_labels_are_route_templates_or_unknown():
    label = EndpointLabels(["/predict", "/v2/models/{name}", "/v2/models/{name}/infer", "/"], prefixes=["/static_content"])
    assert label("/predict") == "/predict" and label("/") == "/"
    assert label("/v2/models/fusion/infer") == label("/v2/models/zz9/infer") == "/v2/models/{name}/infer"
    assert label("/v2/models/a") == "/v2/models/{name}"
    assert label("/static_content/x/y.js") == "/static_content/{path}"
    for path in ("/predict/", "/predictx", "/v2/models//infer", "/v2/models/a/b/infer", "/%00", "/\ud800", ""):
        assert label(path) == UNKNOWN, (path, label(path))
    assert label.values() == {"/predict", "/", "/v2/models/{name}", "/v2/models/{name}/infer", "/static_content/{path}", UNKNOWN}


def test_sec02_bounded_labels_collapse_past_the_bound():
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    metric = Bounded(Counter("t_bounded", "test", ["variant", "reason"], registry=registry), max_values=3)
    for i in range(50):
        metric.labels(f"v{i % 5}", f"r{i}").inc()
    metric.labels(variant="v0", reason="r0").inc()  # by name, as prometheus_client allows
    samples = {(s.labels["variant"], s.labels["reason"]): s.value
               for s in registry.collect().__next__().samples if s.name == "t_bounded_total"}
    assert {v for v, _ in samples} == {"v0", "v1", "v2", OTHER}, samples
    assert {r for _, r in samples} == {"r0", "r1", "r2", OTHER}, samples
    assert sum(samples.values()) == 51  # nothing lost, only relabelled
    assert samples[("v0", "r0")] == 2
    with pytest.raises(ValueError, match="expected 2 label values"):
        metric.labels("only-one")
