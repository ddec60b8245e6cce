"""Serve one ensemble with each peer and ours, check every answer against ours, drive each with the same load.

For each ensemble (bench/peers/ensembles.py) and each server, one at a time on this machine:
  1. start it (its own venv's interpreter; ours is `bentoml serve service.app:FusionService` of the bundle,
     every setting at its default) and wait until a real prediction answers 200;
  2. agreement: the same rows sent to it and to ours, max |p_peer - p_ours| over the probabilities;
  3. closed loop with wrk (bench/loadgen.py) at 1, 8 and 32 connections: requests/s, p50, p99;
  4. open loop (bench/loadgen.run_open_loop): a constant arrival rate, the same for every server of that
     ensemble (OPEN_FRACTION of ours' closed-loop requests/s at 32 clients): the tail under a fixed load.
Each request is one row (batch 1): a base64 PNG for images, one string of more than max_length words for text
(every row is max_length tokens). Results go to JSON; `render` writes docs/PEERS.md and docs/peers.png.

    python -m bench.peers.harness [--smoke] [--seconds 8] [--only image|text] [--peers ours,bentoml,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "artifacts" / "peers"
CONCURRENCY = (1, 8, 32)
OPEN_FRACTION = 0.5
AGREE_ATOL = 1e-3  # probabilities: onnxruntime vs onnxruntime agree to ~1e-6; torch eager vs onnxruntime to ~1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_python(name: str) -> Path:
    return PEERS_DIR / name / "bin" / "python"


@dataclass(frozen=True)
class Peer:
    """One server: how to start it on a port, where to POST, how to wrap rows and read the answer."""

    name: str
    label: str
    python: str  # "" = this interpreter (the product's venv)
    argv: tuple[str, ...]  # {port} is replaced
    path: str = "/predict"
    kserve: bool = False  # V1 protocol: {"instances": rows} -> {"predictions": ...}
    packages: tuple[str, ...] = ()
    settings: str = ""
    env: dict = field(default_factory=dict)
    make_target: str = ""
    concurrency: tuple[int, ...] = ()  # the closed-loop points this server runs (empty: all of CONCURRENCY)

    def interpreter(self) -> str:
        return self.python or sys.executable

    def missing(self) -> str | None:
        """Why this peer cannot run here (its venv is absent), or None."""
        if self.python and not (Path(self.python).parents[1] / ".installed").is_file():
            venv = Path(self.python).parents[1]
            venv = venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv
            return (f"no installed venv at {venv} (`make {self.make_target}` "
                    f"creates it; `make bench-peers` does)")
        return None

    def body(self, rows: list) -> bytes:
        return json.dumps({"instances": rows} if self.kserve else {"inputs": rows}, separators=(",", ":")).encode()

    def probs(self, answer) -> np.ndarray:
        if isinstance(answer, dict):
            answer = answer.get("predictions" if self.kserve else "probabilities", answer)
        return np.asarray(answer, np.float32)

    def command(self, port: int) -> list[str]:
        return [self.interpreter(), *(a.replace("{port}", str(port)) for a in self.argv)]


def peers() -> list[Peer]:
    bento = ("-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", "{port}")
    return [
        Peer("ours", "ours (fused bundle, defaults)", "", (*bento, "service.app:FusionService"),
             packages=("bentoml", "onnxruntime"), env={"FUSION_LOAD_TIMEOUT_S": "600"},
             settings="`bentoml serve service.app:FusionService`, FUSION_BUNDLE=the bundle, every FUSION_* setting at its "
                      "default (threads and adaptive batching chosen by the service from the model's cost: "
                      "FUSION_INTRA_OP_THREADS=auto, FUSION_BATCH_MAX_ROWS=auto) but FUSION_LOAD_TIMEOUT_S=600: a fixed "
                      "load-check budget, set when the default was a flat 20 s, which refused these ensembles' load + "
                      "warm-up + probe on 2 loaded cores (the default is now 20 s + 60 s per GB of its ONNX files, at most 240 s)"),
        Peer("ours_nobatch", "ours, adaptive batching off", "", (*bento, "service.app:FusionService"),
             packages=("bentoml", "onnxruntime"), env={"FUSION_LOAD_TIMEOUT_S": "600", "FUSION_BATCH_MAX_ROWS": "0"},
             concurrency=(max(CONCURRENCY),),
             settings="as ours, with FUSION_BATCH_MAX_ROWS=0 (adaptive batching off), at "
                      f"{max(CONCURRENCY)} clients only: the batching on ÷ off goal"),
        Peer("bentoml", "BentoML, docs style", "", (*bento, "bench.peers.bentoml_plain:Plain"),
             packages=("bentoml", "onnxruntime"),
             settings="one `@bentoml.api` (sync), 3 onnxruntime sessions (default options) run in turn, numpy mean"),
        Peer("bentoml_batch", "BentoML, batchable=True", "", (*bento, "bench.peers.bentoml_plain:Batched"),
             packages=("bentoml", "onnxruntime"),
             settings="as above with `batchable=True, max_batch_size=32` (BentoML's adaptive batching)"),
        Peer("fastapi", "FastAPI + torch eager", str(venv_python("fastapi")),
             ("-m", "uvicorn", "bench.peers.fastapi_torch:app", "--host", "127.0.0.1", "--port", "{port}",
              "--log-level", "warning"),
             packages=("fastapi", "uvicorn", "torch", "timm", "transformers"), make_target="peers-fastapi",
             settings="uvicorn, 1 worker, sync endpoint, 3 torch modules in `inference_mode`, torch's default threads"),
        Peer("ray", "Ray Serve composition", str(venv_python("ray")), ("-m", "bench.peers.ray_serve", "--port", "{port}"),
             packages=("ray", "onnxruntime"), make_target="peers-ray",
             settings="a deployment per member (`@serve.batch` max 32, wait 10 ms, 1 intra-op thread, 0.5 CPU) + an "
                      "ingress deployment gathering them"),
        Peer("kserve", "KServe ModelServer", str(venv_python("kserve")),
             ("-m", "bench.peers.kserve_model", "--http_port", "{port}"), path="/v1/models/ensemble:predict", kserve=True,
             packages=("kserve", "onnxruntime"), make_target="peers-kserve",
             settings="one custom `kserve.Model` (3 onnxruntime sessions, default options, run in turn), V1 protocol, "
                      "1 worker, gRPC off"),
    ]


def versions(peer: Peer) -> dict:
    code = ("import importlib.metadata as m, json, sys; out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    r = subprocess.run([peer.interpreter(), "-c", code, *peer.packages], capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}


# ---- serving ------------------------------------------------------------------------------------------------


class Running:
    """A peer's server process on a free port; `with Running(peer, spec_path, bundle) as r: r.post(rows)`."""

    def __init__(self, peer: Peer, spec_path: Path, bundle: str, deadline_s: float = 600.0):
        self.peer, self.port = peer, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = tempfile.mkdtemp(prefix=f"peer-{peer.name}-")
        self.log_path = Path(self.home) / "server.log"
        self.env = {**os.environ, "PEER_SPEC": str(spec_path), "PYTHONPATH": str(ROOT), "BENTOML_DO_NOT_TRACK": "true",
                    "BENTOML_HOME": self.home, "FUSION_BUNDLE": bundle, "FUSION_STATE_DIR": self.home,
                    "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", **peer.env}
        self.deadline_s = deadline_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Running":
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.peer.command(self.port), cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, rows: list) -> float:
        """Seconds until a real prediction of `rows` answered 200 (the server's own readiness is not enough:
        Ray and KServe answer before their models load)."""
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < self.deadline_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode} before answering; log:\n{self.log()}")
            try:
                r = httpx.post(self.url + self.peer.path, content=self.peer.body(rows),
                               headers={"Content-Type": "application/json"}, timeout=120)
                if r.status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.peer.name} did not answer a prediction within {self.deadline_s:.0f} s; log:\n{self.log()}")

    def post(self, rows: list) -> np.ndarray:
        import httpx

        r = httpx.post(self.url + self.peer.path, content=self.peer.body(rows),
                       headers={"Content-Type": "application/json"}, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"{self.peer.name}: expected 200 from {self.peer.path}; got {r.status_code}: {r.text[:300]}")
        return self.peer.probs(r.json())

    def log(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        try:  # bentoml's and ray's workers may sit in process groups of their own: end them by pid afterwards
            import psutil

            children = psutil.Process(self.proc.pid).children(recursive=True) if self.proc else []
        except Exception:  # noqa: BLE001 - psutil missing or the process gone: the group signal below still runs
            children = []
        self._stop_group()
        for c in children:
            try:
                c.terminate()
                c.wait(10)
            except Exception:  # noqa: BLE001 - already gone, or it ignores SIGTERM
                try:
                    c.kill()
                except Exception:  # noqa: BLE001
                    pass
        self._log.close()
        if self.peer.name == "ray":  # ray leaves its session files in /tmp/ray
            shutil.rmtree("/tmp/ray/session_latest", ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def _stop_group(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)


# ---- requests -----------------------------------------------------------------------------------------------


def rows_for(spec: dict, n: int, seed: int = 0) -> list[str]:
    """n request rows: base64 PNGs of the ensemble's size, or strings of 1.5 x max_length words."""
    from bench.peers import ensembles

    if spec["kind"] == "image":
        return [ensembles.png_b64(im) for im in ensembles.images(n, spec["px"], seed)]
    return ensembles.sentences(spec["vocab"], n, int(1.5 * spec["max_length"]), seed)


def agreement(run: Running, ours: dict[str, np.ndarray], rows: list) -> dict:
    """max |p_peer - p_ours| on `rows` sent one per request and all in one request (batch of len(rows))."""
    single = np.concatenate([run.post([r]) for r in rows])
    batch = run.post(rows)
    diff = max(float(np.abs(single - ours["single"]).max()), float(np.abs(batch - ours["batch"]).max()))
    same = bool((single.argmax(-1) == ours["single"].argmax(-1)).all())
    return {"max_abs_diff": diff, "argmax_equal": same, "ok": diff <= AGREE_ATOL and same}


MAX_POINT_S = 60.0  # one load point's longest run


def point_seconds(seconds: float, clients: int, rps1: float) -> float:
    """A steady-state window (bench/loadgen.run_steady, for a server too slow for wrk's window at this many
    clients): `seconds`, or long enough for ~20 answers at the 1-client rate and for 1.5 rounds of every client
    (a server without batching shares its cores among all requests, which then finish together, once a round:
    a shorter window may miss a round), at most MAX_POINT_S."""
    rate = max(rps1, 1e-3)
    return float(min(MAX_POINT_S, max(seconds, 20.0 / rate, 1.5 * clients / rate)))


def open_loop(run: Running, bodies: list[bytes], rate: float, seconds: float) -> dict:
    """The open-loop point: `rate` for `seconds` or long enough to send 20 requests (at most MAX_POINT_S)."""
    from bench.loadgen import run_open_loop

    secs = min(MAX_POINT_S, max(seconds, 20.0 / rate))
    return run_open_loop(run.url, run.peer.path, bodies, rate, secs, drain_s=30.0)


def ours_settings(url: str) -> dict:
    """What ours' /info says it chose (threads, batching, and why): the report quotes it."""
    import httpx

    try:
        info = httpx.get(url + "/info", timeout=30).json()
    except Exception as exc:  # noqa: BLE001 - the figures still stand without it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {k: v for k, v in info.items() if k in ("tuning", "runtime", "batching")}


def measure(run: Running, bodies: list[bytes], seconds: float, concurrency, rate: float | None) -> dict:
    from bench.loadgen import run_load, run_steady

    out = {"closed": {}}
    rps1 = None
    for c in concurrency:
        if rps1 is not None and c / max(rps1, 1e-3) > seconds / 4:  # the first wave would fill wrk's window
            out["closed"][str(c)] = run_steady(run.url, run.peer.path, bodies, c, point_seconds(seconds, c, rps1),
                                               warmup_max_s=150.0)
        else:
            out["closed"][str(c)] = run_load(run.url, run.peer.path, bodies, c, seconds)
        if c == 1:
            rps1 = out["closed"][str(c)]["rps"]
    if rate:
        out["open"] = open_loop(run, bodies, rate, seconds)
    return out


def bench_ensemble(spec_path: Path, chosen: list[Peer], seconds: float, concurrency, log=print) -> dict:
    spec = json.loads(spec_path.read_text())
    check_rows = rows_for(spec, 3, seed=7)
    bodies = [chosen[0].body([r]) for r in rows_for(spec, 16, seed=1)]
    res = {"kind": spec["kind"], "members": [m["name"] for m in spec["members"]], "peers": {}}
    ours_answers, rate = None, None
    # ours runs first (the reference answers, the open-loop rate) and again last: the machine's load drifts
    # over a run of several minutes (other processes), and the two ours rows bracket the peers
    again = [replace(chosen[0], name="ours_again", label="ours, again after the peers")] \
        if len(chosen) > 1 and chosen[0].name == "ours" else []
    for peer in [*chosen, *again]:
        why = peer.missing()
        if why:
            res["peers"][peer.name] = {"skipped": why}
            log(f"  {spec['kind']} {peer.name}: skipped ({why})")
            continue
        t0 = time.monotonic()
        try:
            with Running(peer, spec_path, spec["bundle"]) as run:
                startup = run.wait_ready(check_rows[:1])
                if peer.name == "ours" or (peer.name == "ours_again" and ours_answers is None):
                    ours_answers = {"single": np.concatenate([run.post([r]) for r in check_rows]),
                                    "batch": run.post(check_rows)}
                    agree = {"max_abs_diff": 0.0, "argmax_equal": True, "ok": True, "reference": True}
                elif ours_answers is not None:
                    agree = agreement(run, ours_answers, check_rows)
                else:
                    agree = {"ok": None, "note": "ours was not run first"}
                pbodies = [peer.body(json.loads(b)["inputs"]) for b in bodies]
                for b in pbodies[:2]:  # warm-up: first runs allocate
                    run.post(json.loads(b)["instances" if peer.kserve else "inputs"])
                if peer.name.startswith("ours"):
                    settings = ours_settings(run.url)
                r = measure(run, pbodies, seconds, peer.concurrency or concurrency, rate)
                if peer.name == "ours":
                    top = r["closed"][str(max(concurrency))]["rps"]
                    rate = round(max(0.2, OPEN_FRACTION * top), 2)
                    r["open"] = open_loop(run, pbodies, rate, seconds)
        except Exception as exc:  # one peer failing still reports the others
            res["peers"][peer.name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
            log(f"  {spec['kind']} {peer.name}: FAILED {type(exc).__name__}: {str(exc)[-600:]}")
            continue
        res["peers"][peer.name] = {"startup_s": round(startup, 1), "agreement": agree, **r,
                                   "wall_s": round(time.monotonic() - t0, 1),
                                   **({"settings": settings} if peer.name.startswith("ours") else {})}
        line = " | ".join(f"c={c}: {v['rps']:.1f} req/s p50 {v['p50_ms']:.0f} p99 {v['p99_ms']:.0f} ms"
                          for c, v in r["closed"].items())
        if "open" in r:
            o = r["open"]
            line += f" | open {o['rate']}/s: p50 {o['p50_ms']:.0f} p99 {o['p99_ms']:.0f} ms ({o['errors']} errors)"
        log(f"  {spec['kind']} {peer.name}: agree {agree.get('max_abs_diff')} | {line}", flush=True)
    res["open_rate"] = rate
    return res


def main(argv=None) -> int:
    from bench.peers import ensembles

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=PEERS_DIR / "work")
    p.add_argument("--size", choices=sorted(ensembles.SIZES), default="full")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--only", choices=("image", "text"))
    p.add_argument("--peers", default="", help="comma-separated names (ours always runs first)")
    p.add_argument("--json", type=Path, default=PEERS_DIR / "results.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "PEERS.md")
    p.add_argument("--smoke", action="store_true", help="tiny ensembles, 2 s runs, no doc (checks that it runs)")
    a = p.parse_args(argv)
    if a.smoke:
        a.size, a.seconds = "tiny", 2.0
        a.work = a.work.parent / "work-tiny" if a.work == PEERS_DIR / "work" else a.work
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    t0 = time.monotonic()
    specs = ensembles.build(a.work, a.size, a.only)
    names = [n for n in a.peers.split(",") if n]
    chosen = [pe for pe in peers() if not names or pe.name in names or pe.name == "ours"]
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": a.size, "seconds": a.seconds,
            "concurrency": list(CONCURRENCY), "open_fraction": OPEN_FRACTION, "machine": machine(),
            "build_s": round(time.monotonic() - t0, 1),
            "loadavg": {"start": " ".join(f"{x:.1f}" for x in os.getloadavg())},
            "peers": {pe.name: {"label": pe.label, "settings": pe.settings, "command": " ".join(pe.argv),
                                "python": str(Path(pe.python).relative_to(ROOT)) if pe.python else ".venv/bin/python",
                                "versions": versions(pe) if not pe.missing() else {}, "path": pe.path}
                      for pe in chosen},
            "ensembles": {}}
    if len(chosen) > 1 and "ours" in info["peers"]:
        info["peers"]["ours_again"] = {**info["peers"]["ours"], "label": "ours, again after the peers"}
    for kind, spec in specs.items():
        print(f"{kind}: {', '.join(m['name'] for m in spec['members'])}", flush=True)
        info["ensembles"][kind] = bench_ensemble(Path(spec["dir"]) / "spec.json", chosen, a.seconds, CONCURRENCY)
    info["total_s"] = round(time.monotonic() - t0, 1)
    info["loadavg"]["end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(info, indent=1))
    print(f"results: {a.json} ({info['total_s']:.0f} s)")
    if not a.smoke:
        from bench.peers.report import render

        render(info, a.doc)
        print(f"wrote {a.doc}")
        from bench.run import rerender

        # docs/BENCHMARKS.md carries the peers' tables and goals beside `make bench`'s figures
        (a.doc.parent / "peers.json").write_text(json.dumps(info, indent=1))
        rerender(a.doc.parent)
    bad = [f"{k}/{n}" for k, e in info["ensembles"].items() for n, v in e["peers"].items()
           if "error" in v or v.get("agreement", {}).get("ok") is False]
    if bad:
        print(f"failed or disagreeing: {bad}", file=sys.stderr)
    return 1 if bad else 0


def machine() -> str:
    try:
        import onnxruntime as ort

        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, onnxruntime {ort.__version__}"
    except Exception:  # noqa: BLE001
        return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
