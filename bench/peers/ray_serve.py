"""Peer: Ray Serve model composition, as Ray's docs show it: one deployment per member (an onnxruntime
session, `@serve.batch` batching the calls of concurrent requests), and an ingress deployment that decodes
the request, calls every member's handle concurrently and averages their softmaxes.

    PEER_SPEC=.../spec.json python -m bench.peers.ray_serve --port 8000     # POST /predict

Each replica reserves 0.5 CPU (four deployments on a 2-core machine) and each member session one intra-op
thread (three actors share the cores: one thread each, as Ray sets OMP_NUM_THREADS per actor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np
from ray import serve
from starlette.requests import Request

from bench.peers.common import Decoder, load_spec, member_probs, session

MAX_BATCH = 32
WAIT_S = 0.01


def _concat(feeds_list: list[dict]) -> dict:
    """Feeds of several requests as one batch (text rows padded to the widest, mask 0)."""
    out = {}
    for k in feeds_list[0]:
        arrs = [f[k] for f in feeds_list]
        if arrs[0].ndim == 2 and len({a.shape[1] for a in arrs}) > 1:
            w = max(a.shape[1] for a in arrs)
            arrs = [np.pad(a, ((0, 0), (0, w - a.shape[1]))) for a in arrs]
        out[k] = np.concatenate(arrs)
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Member:
    def __init__(self, path: str):
        self.sess = session(path, threads=int(os.environ.get("PEER_THREADS") or 1))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
    async def __call__(self, feeds_list: list[dict]) -> list[np.ndarray]:
        probs = member_probs(self.sess, _concat(feeds_list))
        out, i = [], 0
        for f in feeds_list:
            n = len(next(iter(f.values())))
            out.append(probs[i:i + n])
            i += n
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Ensemble:
    def __init__(self, spec: dict, *members):
        self.decode = Decoder(spec)
        self.members = members

    async def __call__(self, request: Request) -> dict:
        feeds = self.decode((await request.json())["inputs"])
        outs = await asyncio.gather(*(m.remote(feeds) for m in self.members))
        return {"probabilities": np.mean(outs, axis=0).tolist()}


def app(spec: dict):
    return Ensemble.bind(spec, *(Member.bind(m["onnx"]) for m in spec["members"]))


if __name__ == "__main__":
    import ray

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    serve.run(app(load_spec()), route_prefix="/predict")
    print("READY", flush=True)
    while True:
        time.sleep(3600)
