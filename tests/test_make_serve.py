"""`make serve`: it serves the bundle the user names (FUSION_BUNDLE, the documented setting, or
BUNDLE=... on the make command line), and it tells the user when it is ready and how to call it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_n(tmp_path, *args: str, env: dict | None = None) -> str:
    """`make -n serve ...`: prints the commands without running them."""
    base = {k: v for k, v in os.environ.items() if k not in ("FUSION_BUNDLE", "BUNDLE", "MAKEFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "-n", "--no-print-directory", "serve", *args], cwd=ROOT, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def serve_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "service.app:FusionService" in line]
    assert len(lines) == 1, f"expected one serve command in `make -n serve`; got:\n{out}"
    return lines[0]


@pytest.fixture
def bundles(tmp_path):
    """Two bundle directories with a manifest each, so make sees nothing to build."""
    out = []
    for name in ("one", "two"):
        d = tmp_path / name / "bundle"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        out.append(d)
    return out


def test_make_serve_honours_fusion_bundle(tmp_path, bundles):
    line = serve_line(make_n(tmp_path, env={"FUSION_BUNDLE": str(bundles[0])}))
    assert f"FUSION_BUNDLE={bundles[0]} " in line, line


def test_make_serve_bundle_on_the_command_line_wins(tmp_path, bundles):
    line = serve_line(make_n(tmp_path, f"BUNDLE={bundles[1]}", env={"FUSION_BUNDLE": str(bundles[0])}))
    assert f"FUSION_BUNDLE={bundles[1]} " in line, line


def test_make_serve_defaults_to_artifacts_bundle(tmp_path):
    out = make_n(tmp_path)
    assert "FUSION_BUNDLE=artifacts/bundle " in serve_line(out)


def test_make_serve_refuses_a_missing_bundle_other_than_the_default(tmp_path):
    """A FUSION_BUNDLE / BUNDLE that names no bundle is refused with what to run, and nothing is built there
    (a typo must not turn into minutes of training a default bundle at the typo's path)."""
    base = {k: v for k, v in os.environ.items() if k not in ("FUSION_BUNDLE", "BUNDLE", "MAKEFLAGS", "MAKELEVEL")}
    missing = tmp_path / "typo" / "bundle"
    for args, env in (([f"BUNDLE={missing}"], {}), ([], {"FUSION_BUNDLE": str(missing)})):
        proc = subprocess.run(["make", "--no-print-directory", "serve", *args], cwd=ROOT, env={**base, **env},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"expected a bundle at {missing} (a directory with manifest.json); got none" in proc.stderr
        assert f"make bundle BUNDLE={missing}" in proc.stderr and "service.app" not in proc.stdout
    assert not (tmp_path / "typo").exists()


def _stub_bin(tmp_path) -> Path:
    """BIN for a real `make` run: a `fusion` that records its arguments and writes the manifest it was asked
    for, and a `python` that records its command line, so that the recipes' shell runs as written."""
    stub = tmp_path / "stub-bin"
    stub.mkdir()
    (stub / "fusion").write_text('#!/bin/sh\necho "fusion $*" >> "$(dirname "$0")/calls"\n'
                                 'out=""; while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done\n'
                                 'mkdir -p "$out" && echo "{}" > "$out/manifest.json"\n')
    (stub / "python").write_text('#!/bin/sh\necho "FUSION_BUNDLE=$FUSION_BUNDLE python $*" >> "$(dirname "$0")/calls"\n')
    for f in ("fusion", "python"):
        (stub / f).chmod(0o755)
    return stub


def _make(stub: Path, *args: str) -> subprocess.CompletedProcess:
    """`make` for real, with BIN=stub; the install stamps taken as up to date (-o), so nothing installs."""
    base = {k: v for k, v in os.environ.items() if k not in ("FUSION_BUNDLE", "BUNDLE", "MAKEFLAGS", "MAKELEVEL")}
    olds = [a for stamp in (".installed", ".installed-build", ".installed-dev") for a in ("-o", f".venv/{stamp}")]
    return subprocess.run(["make", "--no-print-directory", *olds, *args, f"BIN={stub}"], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=60)


def test_make_bundle_builds_a_named_bundle_and_serve_builds_only_the_default_one(tmp_path):
    stub = _stub_bin(tmp_path)
    named = tmp_path / "new" / "bundle"
    proc = _make(stub, "bundle", f"BUNDLE={named}")  # `make bundle` builds wherever it is told
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (named / "manifest.json").is_file() and f"fusion build --out {named}" in (stub / "calls").read_text()
    # the default bundle, when missing, is built by `make serve` itself, then served (DEFAULT_BUNDLE pointed at
    # a fresh path, so that the checkout's own artifacts/bundle does not matter)
    fresh = tmp_path / "default" / "bundle"
    proc = _make(stub, "serve", f"DEFAULT_BUNDLE={fresh}", "PORT=3999")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (stub / "calls").read_text().splitlines()
    assert calls[-2:] == [f"fusion build --out {fresh}",
                          f"FUSION_BUNDLE={fresh} python -m service.serve service.app:FusionService --host 127.0.0.1 --port 3999"]
    # and a missing non-default one is refused before anything runs
    proc = _make(stub, "serve", f"BUNDLE={tmp_path / 'typo'}")
    assert proc.returncode == 2 and "expected a bundle at" in proc.stderr
    assert (stub / "calls").read_text().splitlines() == calls


# ---- the ready line ------------------------------------------------------------------------------------


def test_address_follows_bentoml_serve_options():
    from service.config import load
    from service.serve import address

    assert address(["service.app:FusionService", "--host", "127.0.0.1", "--port", "3101"], load({}).serve) == "http://127.0.0.1:3101"
    assert address(["x"], load({}).serve) == "http://127.0.0.1:3000"  # bentoml's defaults: 0.0.0.0:3000, called via loopback
    assert address(["x"], load({"BENTOML_PORT": "4000", "BENTOML_HOST": "10.0.0.5"}).serve) == "http://10.0.0.5:4000"
    assert address(["x", "-p", "81", "--ssl-certfile", "c.pem"], load({}).serve) == "https://127.0.0.1:81"


def test_ready_lines_name_the_token_variable_never_its_value(tiny_bundle):
    from service.config import load
    from service.serve import READY_PREFIX, ready_lines

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    ready, curl = ready_lines("http://127.0.0.1:9", tiny_bundle, load({"FUSION_INFERENCE_TOKEN": "s3cret"}).tokens)
    assert ready.startswith(READY_PREFIX) and manifest["bundle_version"] in ready
    assert "s3cret" not in curl and '"Authorization: Bearer $FUSION_INFERENCE_TOKEN"' in curl
    row = json.loads(curl.split(" -d ")[1].strip("'"))["inputs"][0]
    assert row == manifest["probe"]["inputs"][0]
    _, plain = ready_lines("http://127.0.0.1:9", tiny_bundle, load({}).tokens)
    assert "Authorization" not in plain


@pytest.mark.server
def test_make_serve_prints_a_ready_line_whose_curl_works(tiny_bundle, tmp_path):
    """`make serve` (FUSION_BUNDLE from the environment) prints one ready line once /readyz is 200; the curl
    it prints answers with the bundle's own prediction for that row."""
    import httpx

    from service.serve import READY_PREFIX
    from tests.server import free_port

    port, venv = free_port(), Path(sys.prefix)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "BUNDLE")},
           "FUSION_BUNDLE": str(tiny_bundle), "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true",
           "FUSION_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    # -o: take the venv as installed (never pip install from a test); VENV: this interpreter's environment
    cmd = ["make", "--no-print-directory", "-o", f"{venv}/.installed", "serve", f"VENV={venv}", f"PORT={port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while READY_PREFIX not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"make serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no ready line within 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/readyz", timeout=5).status_code == 200
        lines = log.read_text(errors="replace").splitlines()
        i = next(i for i, line in enumerate(lines) if line.startswith(READY_PREFIX))
        ready, curl = lines[i], lines[i + 1].strip()
        manifest = json.loads((tiny_bundle / "manifest.json").read_text())
        assert f"{url} serves bundle {manifest['bundle_version']} from {tiny_bundle}" in ready, ready
        answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
        body = json.loads(answer.stdout)
        expected = manifest["probe"]["outputs"]["ensemble"][0]
        assert body["predictions"] == [manifest["classes"][expected.index(max(expected))]], body
        assert sum(line.startswith(READY_PREFIX) for line in lines) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session: make, its shell and the server it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.mark.parametrize("make", ["text_bundle", "tensor_bundle", "image_bundle"])
def test_ready_line_example_is_a_valid_request_for_named_input_bundles(tmp_path, make):
    """The ready line's curl for a bring-your-own-models bundle: a string for text, zeros of the right
    shape for tensors (parsed by the service's own input parser), a PNG file for an image input."""
    import json
    import shlex

    from fusion.bundle import read_bundle
    from service.config import load
    from service.inputs import Inputs, Limits
    from service.serve import ready_lines
    from tests import byo_bundles

    out = tmp_path / "bundle"
    getattr(byo_bundles, make)(out)
    _, curl = ready_lines("http://127.0.0.1:9", out, load({}).tokens)
    args = shlex.split(curl)
    content_type = args[args.index("-H") + 1]
    if make == "image_bundle":
        assert content_type == "Content-Type: image/png" and "--data-binary" in args
        return
    assert content_type == "Content-Type: application/json"
    body = json.loads(args[args.index("-d") + 1])
    feeds = Inputs.load(read_bundle(out)).parse(body["inputs"], Limits())
    assert feeds and all(len(v) == 1 for v in feeds.values())  # one row per graph input
