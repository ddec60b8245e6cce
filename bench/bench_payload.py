"""What a served request costs over the in-process inference, by payload format, in one run.

At batch 1 and 256, on one server: JSON `/predict`, JSON tensors and binary tensors on the Open
Inference Protocol (`/v2/models/ensemble/infer`, binary-data extension), each ÷ the in-process
onnxruntime call on the same rows with the same thread count. Also checks that every format
returns the same predictions.

    python -m bench.bench_payload [--bundle DIR] [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench import missing_bundle


def binary_request(X: np.ndarray) -> tuple[bytes, dict]:
    head = orjson.dumps({
        "inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "parameters": {"binary_data_size": X.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    })
    return head + X.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def decode_binary(r: httpx.Response, shape) -> np.ndarray:
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.content[n:], dtype="<f4").reshape(shape)


def run(bundle: str, smoke: bool = False) -> dict:
    import onnxruntime as ort

    from fusion.bundle import read_bundle
    from fusion.data import load_digits
    from tests.server import Server

    rounds = 5 if smoke else 60
    digits = load_digits()
    b = read_bundle(bundle)
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(b.read_verified("ensemble"), o, providers=["CPUExecutionProvider"])
    out: dict = {"rows": []}
    with Server(bundle, env={"FUSION_INTRA_OP_THREADS": "1"}) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for batch in (1, 256):
            X = np.ascontiguousarray(np.resize(digits.X_test, (batch, 64)), dtype=np.float32)
            ref = sess.run(None, {"input": X})[0]
            jbody = orjson.dumps({"inputs": X.tolist()})
            oip_json = orjson.dumps({"inputs": [{"name": "input", "shape": list(X.shape), "datatype": "FP32", "data": X.reshape(-1).tolist()}]})
            bbody, bheaders = binary_request(X)
            calls = {
                "in_process": lambda: sess.run(None, {"input": X})[0],
                "json_predict": lambda: np.asarray(orjson.loads(c.post("/predict", content=jbody, headers={"Content-Type": "application/json"}).content)["probabilities"], dtype=np.float32),
                "oip_json": lambda: np.asarray(orjson.loads(c.post("/v2/models/ensemble/infer", content=oip_json, headers={"Content-Type": "application/json"}).content)["outputs"][0]["data"], dtype=np.float32).reshape(ref.shape),
                "oip_binary": lambda: decode_binary(c.post("/v2/models/ensemble/infer", content=bbody, headers=bheaders), ref.shape),
            }
            agree = {k: bool((fn().argmax(-1) == ref.argmax(-1)).all()) for k, fn in calls.items()}
            samples = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    t = time.perf_counter_ns()
                    fn()
                    samples[k].append((time.perf_counter_ns() - t) / 1e3)
            med = {k: float(np.median(v)) for k, v in samples.items()}
            out["rows"].append({"batch": batch, "median_us": med, "same_predictions": agree,
                                "over_in_process": {k: med[k] / med["in_process"] for k in calls}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if missing_bundle(a.bundle):
        return 2
    res = run(a.bundle, a.smoke)
    for r in res["rows"]:
        print(f"batch {r['batch']:4d}: " + "  ".join(f"{k} {v:8.0f} µs ({r['over_in_process'][k]:.1f}x)" for k, v in r["median_us"].items()))
        print(f"            same predictions: {r['same_predictions']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
