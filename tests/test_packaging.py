"""The base install is the service: a fresh venv with `fusion-serve` alone (no `[build]` extra) serves a
bundle, answers /predict exactly as onnxruntime does in process, and never imports torch.

The package is installed from a copy of the source tree (pyproject.toml, README.md, fusion/, service/),
not editable, into a venv made by uv (PyPI through uv's cache: a few seconds once warm), and the
server runs from an empty directory, so the code that serves is the installed wheel's, not the checkout's.
Every process of the server (the arbiter and its workers) loads a sitecustomize that records any attempt
to import a build-stack module, so "never imports torch" is observed, not inferred from the missing package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fusion.cli import BUILD_MODULES
from tests.reliability import bundles
from tests.server import ROOT, Server

pytestmark = [pytest.mark.slow, pytest.mark.server]

UV = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

# loaded by every Python process of the server (PYTHONPATH): logs each build-stack import attempt, and
# that the hook ran at all (a pid file), so an absent log means "no attempt", not "no hook"
SITECUSTOMIZE = '''
import os, sys
_DIR, _WATCHED = {log_dir!r}, frozenset({watched!r})
open(os.path.join(_DIR, f"{{os.getpid()}}.started"), "w").close()

class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _WATCHED:
            with open(os.path.join(_DIR, f"{{os.getpid()}}.imports"), "a") as f:
                f.write(name + "\\n")
        return None

sys.meta_path.insert(0, _Watch())
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A fresh venv with the base install only; returns its python."""
    if UV is None:
        pytest.skip("uv is not installed (it is in the dev dependencies: make install-dev)")
    where = tmp_path_factory.mktemp("base-install")
    src = where / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("fusion", "service"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = where / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    made = _run([UV, "venv", "-q", "--python", sys.executable, str(venv)], env=env)
    assert made.returncode == 0, f"uv venv failed:\n{made.stderr}"
    python = venv / "bin" / "python"
    started = time.monotonic()
    installed = _run([UV, "pip", "install", "-q", "--python", str(python), str(src)], env=env)
    took = time.monotonic() - started
    assert installed.returncode == 0, f"expected the base install to succeed; uv said:\n{installed.stderr[-3000:]}"
    print(f"\nbase install of fusion-serve into a fresh venv: {took:.1f} s")  # -s shows it (docs' figure)
    return python


def _probe(python: Path, code: str) -> subprocess.CompletedProcess:
    return _run([str(python), "-c", code], cwd=python.parent, env={**os.environ, "PYTHONPATH": ""})


def test_base_install_has_no_build_stack(base_venv):
    missing = _probe(base_venv, "import torch")
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr, (
        f"expected `import torch` to fail in the base install; got rc={missing.returncode}:\n{missing.stderr}")
    # tqdm is also a dependency of huggingface-hub, which `tokenizers` (a base dependency since issue 15: text
    # inputs) needs; the rest of the build stack must stay out
    build = sorted(BUILD_MODULES - {"tqdm"})
    found = _probe(base_venv, "import importlib.util as u; print(sorted(m for m in %r if u.find_spec(m)))" % build)
    assert found.returncode == 0 and found.stdout.strip() == "[]", (
        f"expected none of the build stack ({build}) in the base install; got {found.stdout}{found.stderr}")


def test_base_install_ships_the_service_and_torch_free_fusion(base_venv):
    """Not editable: the modules and the dashboard's static files come from the venv's site-packages."""
    code = ("import fusion, fusion.bundle, fusion.errors, fusion.stats, service, pathlib; "
            "ui = pathlib.Path(service.__file__).parent / 'ui'; "
            "print(fusion.__version__, fusion.__file__, service.__file__, sorted(p.name for p in ui.iterdir()))")
    out = _probe(base_venv, code)
    assert out.returncode == 0, f"expected the torch-free modules to import from the base install:\n{out.stderr}"
    version, fusion_file, service_file, ui = out.stdout.split(" ", 3)
    site = str(base_venv.parent.parent)
    assert fusion_file.startswith(site) and service_file.startswith(site), (
        f"expected fusion and service installed under {site}; got {fusion_file}, {service_file}")
    assert all(f in ui for f in ("index.html", "app.js", "style.css")), f"expected the dashboard's files in the wheel; got {ui}"


def test_cli_names_the_extra_without_a_traceback(base_venv, tmp_path):
    out = _run([str(base_venv.parent / "fusion"), "build", "--out", str(tmp_path / "b")], cwd=tmp_path,
               env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 2, f"expected exit 2 (a clear error); got {out.returncode}:\n{out.stderr}"
    assert "fusion-serve[build]" in out.stderr and "Traceback" not in out.stderr, (
        f"expected one line naming fusion-serve[build]; got:\n{out.stderr}")


def test_base_install_serves_a_bundle_without_torch(base_venv, tmp_path):
    bundle = tmp_path / "bundle"
    bundles.make_bundle(bundle, seed=3)  # built by this (full) venv, served by the base one
    hooks, log_dir, run_dir = tmp_path / "hooks", tmp_path / "imports", tmp_path / "run"
    for d in (hooks, log_dir, run_dir):
        d.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE.format(log_dir=str(log_dir), watched=sorted(BUILD_MODULES)))
    X = bundles.digits_like(7, seed=5)
    # run_dir is empty: nothing shadows the installed service package (the checkout is not on the path)
    with Server(bundle, env={"PYTHONPATH": str(hooks)}, python=base_venv, cwd=run_dir, deadline_s=120) as srv:
        r = httpx.post(srv.url + "/predict", json={"inputs": X.tolist(), "variant": "ensemble"}, timeout=30)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["probabilities"]), bundles.offline(bundle, "ensemble", X), atol=1e-5)
    pids = sorted(p.stem for p in log_dir.glob("*.started"))
    assert len(pids) >= 2, f"expected the hook in the server and its worker(s); it ran in {pids}:\n{srv.log()[-2000:]}"
    attempts = {p.stem: p.read_text().split() for p in log_dir.glob("*.imports")}
    assert attempts == {}, f"expected no process of the base-install server to import the build stack; got {attempts}"
