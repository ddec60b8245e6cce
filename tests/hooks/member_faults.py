"""Test-only fault injection on members-mode members: a member that raises or hangs.

Production code knows nothing of faults (issue 14). Unit tests wrap stub members with `with_faults`;
server tests set FUSION_FAULT="mlp_1=raise,cnn_0=hang:2.5" in the env of tests/server.py's `Server`,
which then puts tests/hooks on the child's PYTHONPATH: its sitecustomize.py calls `install_from_env()`,
and each MembersEnsemble built in that process runs its members through the faults.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

HOOKS_DIR = os.path.dirname(os.path.abspath(__file__))
VARIABLE = "FUSION_FAULT"


@dataclass(frozen=True)
class Fault:
    """A fault on one member: "raise" (RuntimeError) or "hang" for `seconds` before answering."""

    kind: str  # "raise" | "hang"
    seconds: float = 0.0

    def __call__(self, name: str) -> None:
        if self.kind == "hang":
            time.sleep(self.seconds)
        else:
            raise RuntimeError(f"injected fault in member '{name}'")


def parse(text: str) -> dict[str, Fault]:
    """`"mlp_1=raise, cnn_0=hang:2.5"` -> {"mlp_1": Fault("raise"), "cnn_0": Fault("hang", 2.5)}."""
    faults = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, spec = part.partition("=")
        kind, _, secs = spec.partition(":")
        if kind not in ("raise", "hang"):
            from fusion.errors import ConfigError  # not at import: sitecustomize runs before the repo is on sys.path

            raise ConfigError(f"{VARIABLE}: expected member=raise or member=hang:SECONDS; got '{part}'")
        faults[name.strip()] = Fault(kind, float(secs or 0))
    return faults


def faulty(model, name: str, fault: Fault | None):
    """`model` itself without a fault; else a callable that runs the fault, then the model."""
    if fault is None:
        return model

    def run(X):
        fault(name)
        return model(X)

    return run


def with_faults(loaded, spec: str):
    """A view of a loaded bundle (runtime.LoadedBundle or a stub) whose `model(name)` carries the faults."""
    faults = parse(spec)
    return SimpleNamespace(manifest=loaded.manifest,
                           model=lambda name: faulty(loaded.model(name), name, faults.get(name)))


def patch_members(module, faults: dict[str, Fault]) -> None:
    """Make every `module.MembersEnsemble` built from now on run its members through `faults`."""
    cls = module.MembersEnsemble
    original = cls.__init__

    def __init__(self, loaded, *args, **kwargs):
        original(self, loaded, *args, **kwargs)
        self.models = [faulty(m, n, faults.get(n)) for m, n in zip(self.models, self.names)]

    cls.__init__ = __init__


class _PatchOnImport:
    """A meta-path finder that patches service.members right after it is first executed."""

    def __init__(self, faults: dict[str, Fault]):
        self.faults = faults

    def find_spec(self, fullname, path, target=None):
        if fullname != "service.members":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module, faults = spec.loader.exec_module, self.faults

        def exec_and_patch(module) -> None:
            exec_module(module)
            patch_members(module, faults)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_from_env() -> bool:
    """In a test server's process: apply FUSION_FAULT to service.members (now, or when it is imported)."""
    faults = parse(os.environ.get(VARIABLE, ""))
    if not faults:
        return False
    if "service.members" in sys.modules:
        patch_members(sys.modules["service.members"], faults)
    else:
        sys.meta_path.insert(0, _PatchOnImport(faults))
    return True
