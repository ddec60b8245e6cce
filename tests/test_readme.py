"""The README tells a new user the truth: its curl example works and every route is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server import Server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def curl_examples() -> list[dict]:
    """The JSON bodies of the README's `curl ... /predict ... -d '{...}'` examples."""
    return [json.loads(m) for m in re.findall(r"curl -s -X POST localhost:3000/predict[^\n]*-d '(\{.*?\})'", README)]


def test_readme_curl_row_is_a_real_digit(digits):
    from sklearn.datasets import load_digits

    bodies = curl_examples()
    assert bodies, "the README has no /predict curl example"
    row = np.asarray(bodies[0]["inputs"][0])
    data = load_digits()
    match = np.flatnonzero((data.data == row).all(axis=1))
    assert match.size and data.target[match[0]] == 0  # the README says "this row is a 0"


def test_readme_documents_every_route():
    from service.app import routes

    for route in routes.routes:
        if not getattr(route, "include_in_schema", True):  # the catch-all 404 route
            continue
        path = route.path.replace("{name}", "")
        assert path.rstrip("/") in README or route.path.startswith("/v2"), f"{route.path} is not in the README"
    assert "/v2/" in README


@pytest.mark.server
def test_readme_curl_example_against_a_real_server(tiny_bundle):
    body = curl_examples()[0]
    with Server(tiny_bundle) as srv:
        r = httpx.post(srv.url + "/predict", json=body, timeout=10)
    assert r.status_code == 200
    out = r.json()
    assert out["predictions"] == [0] and out["variant"] == "ensemble"
    assert set(out) >= {"predictions", "probabilities", "variant", "bundle_version", "request_id"}
    assert abs(sum(out["probabilities"][0]) - 1) < 1e-5


def endpoint_examples() -> str:
    """The README's shell block that exercises every endpoint."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return next(b for b in blocks if b.startswith("ROW="))


@pytest.mark.server
def test_readme_endpoint_examples_run_against_a_real_server(tiny_bundle, tmp_path):
    """Every curl line of the README's endpoint block succeeds (curl -f: no 4xx/5xx) on a real server."""
    import subprocess

    with Server(tiny_bundle, env={"FUSION_BUNDLE_ROOT": str(Path(tiny_bundle).parent)}) as srv:
        host = srv.url.removeprefix("http://")
        script = (endpoint_examples().replace("localhost:3000", host).replace("curl -s ", "curl -sf ")
                  .replace('"path": "artifacts/bundle"', f'"path": "{tiny_bundle}"'))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert '"variant":"distilled"' in proc.stdout and '"model_name":"fusion"' in proc.stdout
    assert "fusion_requests_total" in proc.stdout
