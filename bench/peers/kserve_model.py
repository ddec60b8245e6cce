"""Peer: KServe's Python ModelServer with the ensemble as one custom `kserve.Model` (KServe's docs: "custom
model"), V1 protocol: POST /v1/models/ensemble:predict {"instances": [ROW, ...]} -> {"predictions": [...]}.

    PEER_SPEC=.../spec.json python -m bench.peers.kserve_model --http_port 8080

`load()` opens one onnxruntime session per member (default options); `predict()` runs them in turn and
averages the softmaxes. One uvicorn worker, gRPC off.
"""

from __future__ import annotations

import argparse

import numpy as np
from kserve import Model, ModelServer

from bench.peers.common import Decoder, load_spec, member_probs, session


class Ensemble(Model):
    def __init__(self, name: str):
        super().__init__(name)
        self.load()

    def load(self) -> bool:
        spec = load_spec()
        self.decode = Decoder(spec)
        self.sessions = [session(m["onnx"]) for m in spec["members"]]
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict | None = None) -> dict:
        feeds = self.decode(payload["instances"])
        probs = np.mean([member_probs(s, feeds) for s in self.sessions], axis=0)
        return {"predictions": probs.tolist()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http_port", type=int, default=8080)
    a, _ = p.parse_known_args()
    ModelServer(http_port=a.http_port, workers=1, enable_grpc=False).start([Ensemble("ensemble")])
