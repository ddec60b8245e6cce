"""Served overhead: `/predict` (ensemble, batch 1) vs the trivial `/echo` endpoint on the same server,
and requests/s at 8 concurrent connections, in one run on one server.

`/echo` parses and returns the same JSON body through the same middleware, auth and body-limit
code, with no model: predict ÷ echo is what the model and the serving logic add over the
framework's floor (goal: median ≤ 1.25x). The two are measured in interleaved rounds (the order
alternates every round) so that machine drift hits both alike.

Latency uses one keep-alive `http.client` connection (the lightest Python client, so that the
ratio shows the server, not the client). Throughput uses 8 threads, each with its own keep-alive
connection, closed loop. Client and server share this machine's cores: on a small machine the
client's own CPU time caps requests/s, so compare the two endpoints' figures, not absolute ones.

    python -m bench.bench_http [--bundle DIR] [--smoke] [--json OUT] [--with-batching]
    python bench/bench_http.py --bundle artifacts/bundle --rounds 10 --requests 200 [--env FUSION_INTRA_OP_THREADS=1]

Every response is checked: /predict's probabilities against the bundle's ensemble run offline in
onnxruntime, /echo's body against what was sent. Exit status 1 if any request failed or was wrong.
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


def offline_ensemble(bundle: Path, X: np.ndarray) -> np.ndarray:
    """The bundle's fused ensemble run directly in onnxruntime: the reference for /predict."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    sess = ort.InferenceSession(str(bundle / manifest["variants"]["ensemble"]["file"]), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(X, dtype=np.float32)})[0]


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
    """Counts failed and wrong responses (thread-safe)."""

    def __init__(self, expected: np.ndarray):
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

    def predict(self, status: int, data: bytes, i: int) -> None:
        if status != 200:
            return self._bad("failed", f"/predict {status}: {data[:200]!r}")
        body = json.loads(data)
        probs = np.asarray(body.get("probabilities", [[np.nan]]), dtype=np.float32)
        if body.get("variant") != "ensemble" or probs.shape != (1, self.expected.shape[1]) \
                or not np.allclose(probs[0], self.expected[i], atol=1e-5):
            self._bad("wrong", f"/predict row {i}: {body}")

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
            headers: dict) -> dict:
    """Interleaved rounds of n /predict and n /echo requests on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat: dict[str, list[float]] = {"predict": [], "echo": []}
    order = ["predict", "echo"]
    for r in range(rounds + 1):  # round 0 warms up and is not recorded
        for endpoint in (order if r % 2 else order[::-1]):
            for k in range(n):
                i = (r * n + k) % len(bodies)
                t0 = time.perf_counter()
                status, data = request(conn, "/" + endpoint, bodies[i], headers)
                dt = time.perf_counter() - t0
                if r:
                    lat[endpoint].append(dt)
                (check.predict(status, data, i) if endpoint == "predict" else check.echo(status, data, sent[i]))
    conn.close()

    def summary(xs: list[float]) -> dict:
        a = np.asarray(xs) * 1e3
        return {"n": len(xs), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)),
                "mean_ms": float(a.mean())}

    return {k: summary(v) for k, v in lat.items()}


def throughput(port: int, path: str, bodies: list[bytes], sent: list[dict], check: Checker, seconds: float,
               headers: dict, connections: int = CONNECTIONS, max_requests: int = 1_000_000) -> dict:
    """Closed loop: `connections` threads, each with its own keep-alive connection, for `seconds`."""
    counts = [0] * connections
    stop = time.perf_counter() + seconds

    def worker(w: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = w
        while time.perf_counter() < stop and counts[w] < max_requests // connections:
            k = i % len(bodies)
            status, data = request(conn, path, bodies[k], headers)
            (check.predict(status, data, k) if path == "/predict" else check.echo(status, data, sent[k]))
            counts[w] += 1
            i += connections
        conn.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    elapsed = time.perf_counter() - t0
    return {"requests": sum(counts), "seconds": elapsed, "rps": sum(counts) / elapsed, "connections": connections}


def run(bundle: Path, *, rounds: int, requests: int, seconds: float, with_batching: bool, token: str = "",
        server_env: dict | None = None) -> dict:
    from tests.server import Server

    X = bench_rows(bundle)
    expected = offline_ensemble(bundle, X)
    sent = [{"inputs": [row.tolist()]} for row in X]
    bodies = [json.dumps(s).encode() for s in sent]
    headers = {**HEADERS, **({"Authorization": f"Bearer {token}"} if token else {})}
    check = Checker(expected)
    env = {"FUSION_AB_WEIGHTS": "ensemble=1", "FUSION_MAX_CONCURRENCY": "256",
           **({"FUSION_INFERENCE_TOKEN": token} if token else {}), **(server_env or {})}
    out: dict = {"bundle": str(bundle), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "client": "http.client, keep-alive, same machine as the server", "server_env": server_env or {}}
    with Server(bundle, env={**env, "FUSION_BATCH_MAX_ROWS": "0"}) as srv:
        lat = latency(srv.port, bodies, sent, check, rounds, requests, headers)
        out["predict"], out["echo"] = lat["predict"], lat["echo"]
        out["predict_over_echo_median"] = lat["predict"]["median_ms"] / lat["echo"]["median_ms"]
        out["predict_over_echo_p99"] = lat["predict"]["p99_ms"] / lat["echo"]["p99_ms"]
        out["rps"] = {
            "predict": throughput(srv.port, "/predict", bodies, sent, check, seconds, headers),
            "echo": throughput(srv.port, "/echo", bodies, sent, check, seconds, headers),
        }
    if with_batching:
        with Server(bundle, env={**env, "FUSION_BATCH_MAX_ROWS": "256"}) as srv:
            throughput(srv.port, "/predict", bodies, sent, check, min(seconds, 1.0), headers)  # warm-up
            out["rps"]["predict_batching"] = throughput(srv.port, "/predict", bodies, sent, check, seconds, headers)
    out["goal"] = GOAL
    out["meets_goal"] = out["predict_over_echo_median"] <= GOAL
    out["failed"], out["wrong"], out["examples"] = check.failed, check.wrong, check.examples
    out["correct"] = check.failed == 0 and check.wrong == 0
    return out


def report(res: dict) -> str:
    p, e = res["predict"], res["echo"]
    lines = [
        f"bundle {res['bundle']}; {res['cpu_count']} cores shared by the client and the server ({res['client']})"
        + (f"; server env {res['server_env']}" if res["server_env"] else ""),
        f"  /predict (ensemble, batch 1): median {p['median_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms  (n={p['n']})",
        f"  /echo (same body)           : median {e['median_ms']:.3f} ms, p99 {e['p99_ms']:.3f} ms  (n={e['n']})",
        f"  predict ÷ echo: median {res['predict_over_echo_median']:.2f}x, p99 {res['predict_over_echo_p99']:.2f}x "
        f"(goal ≤ {res['goal']}x: {'met' if res['meets_goal'] else 'NOT met'})",
    ]
    for name, r in res["rps"].items():
        lines.append(f"  {r['connections']} concurrent connections, {name:16s}: {r['rps']:8.0f} req/s ({r['requests']} in {r['seconds']:.1f} s)")
    lines.append("  caveat: the client's threads take CPU from the server on this machine; requests/s is a floor")
    lines.append(f"  failed requests: {res['failed']}, wrong answers: {res['wrong']}")
    for ex in res["examples"]:
        lines.append(f"    e.g. {ex}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="artifacts/bundle")
    p.add_argument("--rounds", type=int, default=10, help="interleaved latency rounds (plus one warm-up round)")
    p.add_argument("--requests", type=int, default=200, help="requests per endpoint per round")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    p.add_argument("--with-batching", action="store_true", help="also requests/s with adaptive batching on (a second server)")
    p.add_argument("--token", default="", help="run the server with this inference token (auth on the path)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment, e.g. --env FUSION_INTRA_OP_THREADS=1 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="a quick check: 2 rounds of 25 requests, 0.5 s throughput runs")
    p.add_argument("--json", help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    bundle = Path(a.bundle)
    if not (bundle / "manifest.json").exists():
        print(f"no bundle at {bundle}: run `make bundle` (or `fusion build --out {bundle}`) first", file=sys.stderr)
        return 2
    if a.smoke:
        a.rounds, a.requests, a.seconds = 2, 25, 0.5
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
