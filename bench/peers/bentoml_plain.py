"""Peer: a plain BentoML service written the way BentoML's docs teach (a class with `@bentoml.service`, the
models loaded in `__init__`, one `@bentoml.api` method): each member's onnxruntime session run in turn, the
softmaxes averaged. Two services, served one at a time:

    bentoml serve bench.peers.bentoml_plain:Plain      # one request = one call
    bentoml serve bench.peers.bentoml_plain:Batched    # batchable=True: BentoML's adaptive batching

Sessions use onnxruntime's default options (what the docs' examples open; PEER_THREADS overrides).
"""

from __future__ import annotations

import bentoml
import numpy as np

from bench.peers.common import Decoder, load_spec, member_probs, session


class _Members:
    def __init__(self) -> None:
        spec = load_spec()
        self.decode = Decoder(spec)
        self.sessions = [session(m["onnx"]) for m in spec["members"]]

    def run(self, rows: list) -> np.ndarray:
        feeds = self.decode(rows)
        return np.mean([member_probs(s, feeds) for s in self.sessions], axis=0)


@bentoml.service(traffic={"timeout": 300})
class Plain:
    def __init__(self) -> None:
        self.members = _Members()

    @bentoml.api
    def predict(self, inputs: list) -> dict:
        return {"probabilities": self.members.run(inputs).tolist()}


@bentoml.service(traffic={"timeout": 300})
class Batched:
    def __init__(self) -> None:
        self.members = _Members()

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=60_000)
    def predict(self, inputs: list) -> list:
        return self.members.run(inputs).tolist()
