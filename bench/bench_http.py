"""Served overhead: `/predict` (ensemble, batch 1) vs the trivial `/echo` endpoint on the same server,
and requests/s at 8 concurrent connections, in one run on one server.

`/echo` parses and returns the same JSON body through the same middleware, auth and body-limit
code, with no model: predict ÷ echo is what the model and the serving logic add over the
framework's floor (goal: median ≤ 1.25x). Measured in interleaved rounds (the order rotates every
round) so that machine drift hits all alike, with a third endpoint beside them: `/predict` of one
single-model variant (`merged`, else `distilled`, else a member; chosen with the `X-Variant`
header, so the body is the same): what serving costs when the model is cheap. The server's own
histogram of model time (`fusion_request_latency_seconds`) gives the third figure: the mean
/predict round trip less the model's mean time in the server, ÷ echo, i.e. everything that is not
the model.

Latency uses one keep-alive `http.client` connection (the lightest Python client, so that the
ratio shows the server, not the client). Throughput uses the load generator of bench/loadgen.py
(wrk when installed) at 8 connections. Client and server share this machine's cores: compare the
endpoints' figures with each other, not with other machines.

    python -m bench.bench_http [--bundle DIR] [--smoke] [--json OUT] [--with-batching]
    python bench/bench_http.py --bundle artifacts/bundle --rounds 10 --requests 200 [--env FUSION_INTRA_OP_THREADS=1]

Every latency response is checked: /predict's probabilities against the bundle's model run offline
in onnxruntime, /echo's body against what was sent; throughput runs count every non-2xx answer.
Exit status 1 if any request failed or was wrong.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL = 1.25
CONNECTIONS = 8
HEADERS = {"Content-Type": "application/json"}


def offline(bundle: Path, X: np.ndarray, name: str = "ensemble") -> np.ndarray:
    """The bundle's model `name` run directly in onnxruntime: the reference for /predict."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["variants"].get(name) or manifest["members"][name]
    sess = ort.InferenceSession(str(bundle / entry["file"]), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(X, dtype=np.float32)})[0]


def single_model_variant(bundle: Path) -> str:
    """The cheap model served beside the ensemble: merged, else distilled, else the first member."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("merged", "distilled"):
        if name in manifest["variants"]:
            return name
    if manifest["members"]:
        return next(iter(manifest["members"]))
    raise SystemExit(f"{bundle}: no single-model variant (merged, distilled) and no members to compare with")


def bench_rows(bundle: Path, n: int = 64) -> np.ndarray:
    """Rows to send: the digits test split when the bundle was built on digits, else seeded random rows."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    n_features = int(manifest["input"]["shape"][1])
    if manifest.get("dataset", {}).get("name") == "digits":
        from sklearn.datasets import load_digits

        X = load_digits().data.astype(np.float32)
        if X.shape[1] == n_features:
            return X[:n]
    return np.random.default_rng(0).normal(size=(n, n_features)).astype(np.float32)


class Checker:
    """Counts failed and wrong responses (thread-safe). expected: variant -> (rows, C) offline outputs."""

    def __init__(self, expected: dict[str, np.ndarray]):
        self.expected = expected
        self.failed = 0
        self.wrong = 0
        self.examples: list[str] = []
        self._lock = threading.Lock()

    def _bad(self, kind: str, what: str) -> None:
        with self._lock:
            if kind == "failed":
                self.failed += 1
            else:
                self.wrong += 1
            if len(self.examples) < 5:
                self.examples.append(what[:300])

    def predict(self, status: int, data: bytes, i: int, variant: str = "ensemble") -> None:
        if status != 200:
            return self._bad("failed", f"/predict {status}: {data[:200]!r}")
        body = json.loads(data)
        expected = self.expected[variant]
        probs = np.asarray(body.get("probabilities", [[np.nan]]), dtype=np.float32)
        if body.get("variant") != variant or probs.shape != (1, expected.shape[1]) \
                or not np.allclose(probs[0], expected[i], atol=1e-5):
            self._bad("wrong", f"/predict ({variant}) row {i}: {body}")

    def echo(self, status: int, data: bytes, sent: dict) -> None:
        if status != 200:
            return self._bad("failed", f"/echo {status}: {data[:200]!r}")
        if json.loads(data) != sent:
            self._bad("wrong", f"/echo returned {data[:200]!r}")


def request(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()


def latency(port: int, bodies: list[bytes], sent: list[dict], check: Checker, rounds: int, n: int,
            headers: dict, one: str) -> dict:
    """Interleaved rounds of n requests each: /predict (ensemble), /predict of the variant `one`
    (X-Variant header, same body) and /echo, on one keep-alive connection; the order rotates."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    calls = {
        "predict": ("/predict", headers, lambda st, d, i: check.predict(st, d, i)),
        "predict_one": ("/predict", {**headers, "X-Variant": one}, lambda st, d, i: check.predict(st, d, i, one)),
        "echo": ("/echo", headers, lambda st, d, i: check.echo(st, d, sent[i])),
    }
    lat: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(rounds):
        for endpoint in order[r % 3:] + order[: r % 3]:
            path, hdrs, verify = calls[endpoint]
            for k in range(n):
                i = (r * n + k) % len(bodies)
                t0 = time.perf_counter()
                status, data = request(conn, path, bodies[i], hdrs)
                lat[endpoint].append(time.perf_counter() - t0)
                verify(status, data, i)
    conn.close()

    def summary(xs: list[float]) -> dict:
        a = np.asarray(xs) * 1e3
        return {"n": len(xs), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)),
                "mean_ms": float(a.mean())}

    return {k: summary(v) for k, v in lat.items()}


def model_seconds(port: int, variant: str = "ensemble") -> tuple[float, float]:
    """(sum, count) of the server's model-time histogram for `variant` (fusion_request_latency_seconds)."""
    from bench import metric_sums

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    names = ("fusion_request_latency_seconds_sum", "fusion_request_latency_seconds_count")
    sums = metric_sums(text, names, variant=variant)
    return sums[names[0]], sums[names[1]]


def run(bundle: Path, *, rounds: int, requests: int, seconds: float, with_batching: bool, token: str = "",
        server_env: dict | None = None) -> dict:
    from bench.loadgen import run_load
    from tests.server import Server

    X = bench_rows(bundle)
    one = single_model_variant(bundle)
    sent = [{"inputs": [row.tolist()]} for row in X]
    bodies = [json.dumps(s, separators=(",", ":")).encode() for s in sent]
    headers = {**HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    check = Checker({"ensemble": offline(bundle, X), one: offline(bundle, X, one)})
    env = {"FUSION_AB_WEIGHTS": "ensemble=1", "FUSION_MAX_CONCURRENCY": "256",
           **({"FUSION_INFERENCE_TOKEN": token} if token else {}), **(server_env or {})}
    out: dict = {"bundle": str(bundle), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "client": "http.client, keep-alive, same machine as the server", "server_env": server_env or {},
                 "single_model_variant": one}
    with Server(bundle, env={**env, "FUSION_BATCH_MAX_ROWS": "0"}) as srv:
        latency(srv.port, bodies, sent, check, 1, min(requests, 50), headers, one)  # warm-up, not recorded
        s0, c0 = model_seconds(srv.port)
        lat = latency(srv.port, bodies, sent, check, rounds, requests, headers, one)
        s1, c1 = model_seconds(srv.port)
        out["predict"], out["predict_one"], out["echo"] = lat["predict"], lat["predict_one"], lat["echo"]
        out["predict_over_echo_median"] = lat["predict"]["median_ms"] / lat["echo"]["median_ms"]
        out["predict_over_echo_p99"] = lat["predict"]["p99_ms"] / lat["echo"]["p99_ms"]
        out["one_over_echo_median"] = lat["predict_one"]["median_ms"] / lat["echo"]["median_ms"]
        model_ms = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else float("nan")
        out["model_in_server_mean_ms"] = model_ms
        out["non_model_over_echo_mean"] = (lat["predict"]["mean_ms"] - model_ms) / lat["echo"]["mean_ms"]
        out["rps"] = {
            "predict": run_load(srv.url, "/predict", bodies, CONNECTIONS, seconds, headers),
            "echo": run_load(srv.url, "/echo", bodies, CONNECTIONS, seconds, headers),
        }
    if with_batching:
        with Server(bundle, env={**env, "FUSION_BATCH_MAX_ROWS": "256"}) as srv:
            run_load(srv.url, "/predict", bodies, CONNECTIONS, min(seconds, 1.0), headers)  # warm-up
            out["rps"]["predict_batching"] = run_load(srv.url, "/predict", bodies, CONNECTIONS, seconds, headers)
    out["goal"] = GOAL
    out["meets_goal"] = out["predict_over_echo_median"] <= GOAL
    throughput_errors = sum(r["errors"] for r in out["rps"].values())
    out["failed"], out["wrong"], out["examples"] = check.failed + throughput_errors, check.wrong, check.examples
    out["correct"] = out["failed"] == 0 and check.wrong == 0
    return out


def report(res: dict) -> str:
    p, o, e = res["predict"], res["predict_one"], res["echo"]
    one = f"/predict ({res['single_model_variant']})"
    lines = [
        f"bundle {res['bundle']}; {res['cpu_count']} cores shared by the client and the server ({res['client']})"
        + (f"; server env {res['server_env']}" if res["server_env"] else ""),
        f"  /predict (ensemble, batch 1): median {p['median_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms  (n={p['n']})",
        f"  {one:28s}: median {o['median_ms']:.3f} ms, p99 {o['p99_ms']:.3f} ms  (n={o['n']})",
        f"  /echo (same body)           : median {e['median_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms  (n={e['n']})",
        f"  predict ÷ echo: median {res['predict_over_echo_median']:.2f}x, p99 {res['predict_over_echo_p99']:.2f}x "
        f"(goal ≤ {res['goal']}x: {'met' if res['meets_goal'] else 'NOT met'})",
        f"  {one} ÷ echo: median {res['one_over_echo_median']:.2f}x",
        f"  ensemble's model time in the server: mean {res['model_in_server_mean_ms']:.3f} ms; "
        f"(predict − model) ÷ echo, means: {res['non_model_over_echo_mean']:.2f}x",
    ]
    for name, r in res["rps"].items():
        lines.append(f"  {r['connections']} concurrent connections ({r['tool']}), {name:16s}: {r['rps']:8.0f} req/s "
                     f"({r['requests']} in {r['seconds']:.1f} s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']})")
    lines.append("  caveat: client and server share the cores; compare the endpoints with each other")
    lines.append(f"  failed requests: {res['failed']}, wrong answers: {res['wrong']}")
    for ex in res["examples"]:
        lines.append(f"    e.g. {ex}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--rounds", type=int, default=12, help="interleaved latency rounds (after a warm-up round)")
    p.add_argument("--requests", type=int, default=200, help="requests per endpoint per round")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    p.add_argument("--with-batching", action="store_true", help="also requests/s with adaptive batching on (a second server)")
    p.add_argument("--token", default="", help="run the server with this inference token (auth on the path)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment, e.g. --env FUSION_INTRA_OP_THREADS=1 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a quick check: 3 rounds of 20 requests, 1 s throughput runs")
    p.add_argument("--json", help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    bundle = Path(a.bundle)
    from bench import missing_bundle

    if missing_bundle(bundle):
        return 2
    if a.smoke:
        a.rounds, a.requests, a.seconds = 3, 20, 1.0
    bad = [e for e in a.env if "=" not in e]
    if bad:
        print(f"expected --env KEY=VALUE; got {bad}", file=sys.stderr)
        return 2
    server_env = dict(e.split("=", 1) for e in a.env)
    res = run(bundle, rounds=a.rounds, requests=a.requests, seconds=a.seconds, with_batching=a.with_batching,
              token=a.token, server_env=server_env)
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0 if res["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
