"""Start a real `bentoml serve` on a free loopback port, poll readiness with a deadline, stop by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.hooks import member_faults

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(bundle_dir, env={...}) as srv: httpx.post(srv.url + "/predict", ...)`."""

    def __init__(self, bundle: str | Path | None, env: dict | None = None, target: str = "service.app:FusionService",
                 deadline_s: float = 60.0, wait_ready: bool = True, args: list[str] | None = None,
                 python: str | Path | None = None, cwd: str | Path | None = None):
        """`python`: the interpreter that serves (another venv's, e.g. a base install's), default this one;
        `cwd`: where it runs, default the repository root (whose service/ then shadows an installed one)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = tempfile.mkdtemp(prefix="bentoml-home-")  # own home: two servers must not share metrics
        self.log_path = Path(tempfile.mkstemp(prefix="bentoml-serve-", suffix=".log")[1])
        # own state directory too (the default SQLite A/B store, service/abstore.py): two servers of one bundle
        # root must not add up each other's counts; a test of restarts passes the same FUSION_STATE_DIR again
        self.state_dir = tempfile.mkdtemp(prefix="fusion-state-")
        self.env = {
            **os.environ, "FUSION_STATE_DIR": self.state_dir, "BENTOML_DO_NOT_TRACK": "true", "BENTOML_HOME": self.home,
            "FUSION_DEVICE": os.environ.get("FUSION_DEVICE", "cpu"), "PYTHONUNBUFFERED": "1",
            **({"FUSION_BUNDLE": str(bundle)} if bundle is not None else {}), **(env or {}),
        }
        if self.env.get(member_faults.VARIABLE):  # test-only member faults: tests/hooks/sitecustomize.py
            self.env["PYTHONPATH"] = os.pathsep.join([member_faults.HOOKS_DIR, *filter(None, [self.env.get("PYTHONPATH")])])
        self.target, self.deadline_s, self.wait_ready, self.args = target, deadline_s, wait_ready, args or []
        self.python, self.cwd = str(python or sys.executable), cwd or ROOT
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.python, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1",
             "--port", str(self.port), *self.args],
            cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.wait_ready:
            try:
                self.wait("/readyz", 200)
            except BaseException:  # a server that never got ready is stopped, not left running after the error
                self.stop()
                raise
        return self

    def wait(self, path: str, status: int) -> None:
        deadline = time.monotonic() + self.deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} did not answer {status} within {self.deadline_s}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)
        finally:
            self._log.close()
            shutil.rmtree(self.home, ignore_errors=True)  # the log stays: tests read it after stopping

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
