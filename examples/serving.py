"""What the bring-your-own-models examples share: serve a bundle as `make serve` does, and stop it.

    from examples.serving import served
    with served(bundle, work / "serve.log") as url:
        httpx.post(url + "/predict", json={"inputs": ...})

The server is `python -m service.serve` (`bentoml serve` plus the ready line) on a free loopback port,
in its own process group, with its A/B state beside the bundle; it is stopped with SIGTERM (SIGKILL
after 30 s) when the block ends, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(bundle: Path, log_path: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """(process, base URL) once /readyz answers 200; SystemExit with the log's tail if it never does."""
    port = port or free_port()
    env = {**os.environ, "FUSION_BUNDLE": str(bundle), "BENTOML_DO_NOT_TRACK": "true",
           "FUSION_STATE_DIR": str(Path(bundle).parent / "state"), "FUSION_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "service.serve", "service.app:FusionService", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=Path(log_path).open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log: {log_path}\n"
                             f"{Path(log_path).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:  # not listening yet, or 503 while the bundle loads
            pass
        time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S:.0f} s; its log: {log_path}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it drains), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def served(bundle: Path, log_path: Path, port: int | None = None) -> Iterator[str]:
    """The bundle served for the duration of the block; yields its base URL."""
    proc, url = start(bundle, log_path, port)
    try:
        yield url
    finally:
        stop(proc)
