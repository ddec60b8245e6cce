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
