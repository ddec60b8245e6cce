"""Helpers for the serving tests: offline oracles (the bundle's ONNX files run directly in
onnxruntime, combined in numpy), the one-error-shape check, and a bounded poll."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class Oracle:
    """Offline outputs of a bundle: every ONNX file run by onnxruntime on raw features, no service code."""

    def __init__(self, bundle: str | Path):
        import onnxruntime as ort

        self.path = Path(bundle)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.version = self.manifest["bundle_version"]
        self.classes = list(self.manifest["classes"])
        self._sessions = {}
        for kind in ("variants", "members"):
            for name, entry in self.manifest[kind].items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                self._sessions[name] = ort.InferenceSession(str(self.path / entry["file"]), opts,
                                                            providers=["CPUExecutionProvider"])

    @property
    def members(self) -> list[str]:
        return list(self.manifest["variants"]["ensemble"]["members"])

    def __call__(self, name: str, X: np.ndarray) -> np.ndarray:
        sess = self._sessions[name]
        return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(X, dtype=np.float32)})[0]

    def soft_vote(self, members: list[str], X: np.ndarray) -> np.ndarray:
        """Equal-weight soft vote of `members` (the bundle's default combiner), renormalised over them."""
        combiner = self.manifest["variants"]["ensemble"]["combiner"] or {}
        assert combiner.get("name", "soft_vote") == "soft_vote" and combiner.get("weights") is None, combiner
        return np.mean([self(m, X) for m in members], axis=0)

    def labels(self, probs: np.ndarray) -> list:
        return [self.classes[i] for i in np.asarray(probs).argmax(-1)]


def assert_error_shape(response, status: int | None = None, echoed_path: str | None = None) -> dict:
    """Every 4xx/5xx body is exactly one JSON object {"error", "request_id"}, no traceback, no path.

    `echoed_path`: a path the client itself sent (an admin's bundle path), which the message may repeat."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.status_code >= 400
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = json.loads(response.content)  # one value, strictly JSON
    assert isinstance(body, dict), body
    assert set(body) == {"error", "request_id"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["request_id"] == response.headers["x-request-id"]
    text = response.text.replace(echoed_path, "<path>") if echoed_path else response.text
    for leak in ("Traceback", 'File "', "/work/", "site-packages", ".py\"", "/tmp/"):
        assert leak not in text, (leak, text)
    return body


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value, with a deadline (bounded loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s (last value {value!r})")
        time.sleep(interval)


def rows_json(X: np.ndarray) -> list:
    """Rows exactly as float32 values, so the server sees the same numbers as the oracle."""
    return np.asarray(X, dtype=np.float32).tolist()
