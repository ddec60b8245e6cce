"""The cost of the network hop (issue 19): a front + 3 remote members on loopback ÷ the fused single-process ensemble.

Builds a 3-member bundle from a zoo (no merged, distilled or comparison: a quick build) and splits it
(`fusion split`). Then, on loopback, side by side in alternating rounds, the same rows as binary tensors
(OIP `/v2/models/fusion/infer`) to
- one server of the whole bundle: the fused `ensemble` graph (the default route), and members mode
  (`/v2/models/members/infer`: the three member sessions in one process, combined in numpy);
- the front of the split layout, whose three members are `bentoml serve` processes of their own.
Batch 1 and 32; medians per request; the answers must agree (max |Δ| reported).

    python -m bench.bench_remote [--zoo artifacts/zoo/independent] [--members cnn_0,mlp_0,mlp_1] [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.bench_payload import binary_request, decode_binary

ROOT = Path(__file__).resolve().parents[1]


def build(zoo: str, members: list[str], out: Path) -> Path:
    from fusion.build import build_bundle
    from fusion.recipe import Recipe, override

    r = override(Recipe(), "zoo", dir=zoo, members=tuple(members))
    r = override(r, "ensemble", weights="equal")
    r = override(r, "distill", enabled=False)
    r = override(r, "merge", method="")
    r = override(r, "build", out=str(out), compare=False, quantize=False)
    build_bundle(r)
    return out


def timed(c: httpx.Client, path: str, body: bytes, headers: dict, shape) -> tuple[float, np.ndarray]:
    t = time.perf_counter()
    r = c.post(path, content=body, headers=headers)
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
    return dt, decode_binary(r, shape)


def run(zoo: str, members: list[str], smoke: bool = False) -> dict:
    from fusion.data import load_digits
    from fusion.split import split_bundle
    from service.remote import url_variable
    from tests.server import Server

    rounds = 5 if smoke else 200
    digits = load_digits()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    t = time.time()
    single = build(zoo, members, work / "single")
    layout = split_bundle(single, work / "split")
    build_s = time.time() - t
    threads = {"FUSION_INTRA_OP_THREADS": "1", "FUSION_MEMBER_THREADS": "1"}
    member_srv = {n: Server(work / "split" / m["bundle"], env={**threads, "FUSION_AB_WEIGHTS": f"{n}=1"}, wait_ready=False)
                  for n, m in layout["members"].items()}
    one = Server(single, env=threads, wait_ready=False)
    servers = [*member_srv.values(), one]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait("/readyz", 200)
        front = Server(work / "split" / "front", env={
            **threads, "FUSION_FAILURE_POLICY": "strict", "FUSION_MEMBER_DEADLINE_MS": "5000",
            **{url_variable(n): f"{s.url}/v2/models/{n}" for n, s in member_srv.items()}}).start()
        servers.append(front)
        rows = []
        with httpx.Client(base_url=one.url, timeout=30) as c1, httpx.Client(base_url=front.url, timeout=30) as cf:
            for batch in (1, 32):
                X = np.ascontiguousarray(np.resize(digits.X_test, (batch, 64)), dtype=np.float32)
                body, headers = binary_request(X)
                shape = (batch, len(digits.classes))
                calls = {"fused": (c1, "/v2/models/fusion/infer"), "members": (c1, "/v2/models/members/infer"),
                         "split": (cf, "/v2/models/fusion/infer")}
                for client, path in calls.values():  # warm: connections, first-call allocations
                    for _ in range(5):
                        timed(client, path, body, headers, shape)
                times = {k: [] for k in calls}
                outs = {}
                for _ in range(rounds):  # alternating: drift on a shared machine hits all three alike
                    for k, (client, path) in calls.items():
                        dt, outs[k] = timed(client, path, body, headers, shape)
                        times[k].append(dt)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                p99 = {k: float(np.percentile(v, 99)) * 1e3 for k, v in times.items()}
                rows.append({
                    "batch": batch, "fused_ms": med["fused"], "members_ms": med["members"], "split_ms": med["split"],
                    "p99_ms": p99, "split_over_fused": med["split"] / med["fused"],
                    "split_over_members": med["split"] / med["members"],
                    "max_abs_diff": float(max(np.abs(outs["split"] - outs["fused"]).max(),
                                              np.abs(outs["split"] - outs["members"]).max())),
                })
                print(f"batch {batch}: fused {med['fused']:.3f} ms, members mode {med['members']:.3f} ms, "
                      f"front + {len(members)} remote members {med['split']:.3f} ms: "
                      f"split ÷ fused {rows[-1]['split_over_fused']:.2f}, split ÷ members {rows[-1]['split_over_members']:.2f}",
                      flush=True)
    finally:
        for s in servers:
            s.stop()
    return {"members": members, "rounds": rounds, "rows": rows, "build_s": build_s, "transport": "OIP binary tensors, loopback"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", default="artifacts/zoo/independent", help="zoo directory with the members' checkpoints")
    p.add_argument("--members", default="cnn_0,mlp_0,mlp_1", help="three members of the zoo")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--bundle", help="ignored (bench/run.py passes it to every bundle benchmark)")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.members.split(",") if n.strip()]
    if not any(Path(a.zoo).glob("*.safetensors")):
        print(f"no checkpoints in {a.zoo}: run `make zoo` (or `fusion zoo`) first", file=sys.stderr)
        return 2
    result = run(a.zoo, names, a.smoke)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
