"""Case 16: the installed dependencies, and the floors the project declares, are at or above the
versions with the known security fixes.

* bentoml >= 1.4.39: pickle content-type RCE (1.4.3), SSRF via URL inputs (1.4.19), path traversal
  (1.4.34), tar symlinks (1.4.36), containerize injections (1.4.37 / 1.4.39).
* onnx >= 1.21: external-data path checks (the service refuses external data outright anyway).
* torch >= 2.6: `torch.load` defaults to weights_only=True (the project uses safetensors only).
* onnxruntime >= 1.20: the floor the project declares; its external-data path validation is relied
  on by nobody here (service/onnx_check.py refuses external data before onnxruntime sees it).
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.reliability.harness import ROOT, record

FLOORS = {"bentoml": "1.4.39", "onnx": "1.21", "onnxruntime": "1.20", "torch": "2.6"}


def installed(name: str) -> Version:
    try:
        return Version(version(name))
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed")


def test_16_installed_versions_at_or_above_the_security_floors():
    got = {name: installed(name) for name in FLOORS}
    low = {n: str(v) for n, v in got.items() if Version(v.base_version) < Version(FLOORS[n])}
    record("16_dependency_floor", floors=FLOORS, installed={n: str(v) for n, v in got.items()}, below_floor=low)
    assert not low, f"below the security floor: {low} (floors {FLOORS})"


def lower_bound(req: Requirement) -> Version | None:
    """The lowest version a requirement's specifier allows (None: unbounded below)."""
    bounds = [Version(spec.version.removesuffix(".*")) for spec in req.specifier if spec.operator in (">=", ">", "==", "~=", "===")]
    return max(bounds) if bounds else None


def test_16_declared_requirements_cannot_resolve_below_the_floors():
    """pyproject.toml's own specifiers exclude every version under the floor (a fresh install is safe),
    and the installed versions satisfy them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["build"]  # torch and onnx: the [build] extra
    reqs = {Requirement(d).name.lower(): Requirement(d) for d in deps}
    problems = []
    for name, floor in FLOORS.items():
        req = reqs.get(name)
        if req is None:
            problems.append(f"{name}: not declared in pyproject.toml")
            continue
        lower = lower_bound(req)
        if lower is None or lower < Version(floor):
            problems.append(f"{name}: '{req}' allows versions below the floor {floor} (lowest allowed: {lower or 'any'})")
        if not req.specifier.contains(installed(name), prereleases=True):
            problems.append(f"{name}: installed {installed(name)} does not satisfy '{req}'")
    assert not problems, problems


def test_16_bento_pins_at_or_above_the_floors():
    """The packages pinned into the bento images (bentofile.yaml and the GPU flavour) respect the floors."""
    import yaml

    problems, seen = [], {}
    for path in (ROOT / "bentofile.yaml", ROOT / "deploy" / "bentofile.gpu.yaml"):
        if not path.is_file():
            continue
        python = yaml.safe_load(path.read_text()).get("python") or {}
        lines = list(python.get("packages") or [])
        if python.get("requirements_txt"):  # the lock file (deploy/lock.sh): `name==version \` + hash lines
            lines += [ln.split("#")[0].strip(" \\") for ln in (ROOT / python["requirements_txt"]).read_text().splitlines()
                      if ln.strip() and not ln.lstrip().startswith(("#", "--"))]
        for line in lines:
            req = Requirement(line)
            name = req.name.lower()
            if name in FLOORS:
                lower = lower_bound(req)
                seen[f"{path.name}:{name}"] = str(req.specifier)
                if lower is None or lower < Version(FLOORS[name]):
                    problems.append(f"{path.name}: '{line}' allows versions below {FLOORS[name]}")
    assert not problems, problems
    assert {"bentofile.yaml:bentoml", "bentofile.yaml:onnxruntime"} <= set(seen), f"nothing checked: {seen}"
