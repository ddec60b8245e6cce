"""Bundle versions and hot swap: which bundle version is served, and replacing it atomically.

A request takes one `Served` (current()) and keeps it to the end, so that a swap in the middle of a
request never mixes two versions. Knows nothing about routing beyond a `check` callable the engine
gives it (the live routing policy must accept a version before it is installed).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fusion.bundle import MANIFEST
from fusion.errors import BundleError, ConfigError, FusionError, InputError, UnavailableError
from service import preflight, remote, runtime
from service.config import EngineConfig
from service.members import FailurePolicy, MembersEnsemble
from service.metrics import BUNDLE
from service.preflight import LoadLimits
from service.runtime import RuntimeConfig, check_probe

log = logging.getLogger("fusion.service")

MEMBERS = "members"  # the mode that runs the ensemble's members and combines them in numpy


@dataclass
class Served:
    """One loaded bundle version and what is built on it; requests take one and keep it to the end."""

    loaded: runtime.LoadedBundle
    members: MembersEnsemble | None

    @property
    def version(self) -> str:
        return self.loaded.version

    def names(self) -> set[str]:
        extra = {MEMBERS} if self.members else set()
        if self.members and self.members.remotes and "ensemble" in self.loaded.manifest.variants:
            extra.add("ensemble")  # a split front (issue 19): its ensemble is its remote members, combined
        return set(self.loaded.models) | extra

    def close(self) -> None:
        if self.members:
            self.members.close()


def check_front(loaded: runtime.LoadedBundle, members: MembersEnsemble) -> None:
    """A split front (its ensemble has no file: `fusion build --split`): the members, combined here, must
    reproduce the ensemble's recorded probe outputs (skipped when some member is not verified yet)."""
    probe = loaded.manifest.probe or {}
    expected = probe.get("outputs", {}).get("ensemble")
    if expected is None or not all(r.health.verified for r in members.remotes.values()):
        return
    got, extra = members(np.asarray(probe["inputs"], dtype=np.float32))
    diff = float(np.abs(got - np.asarray(expected, dtype=np.float32)).max()) if got.shape == np.shape(expected) else float("inf")
    if extra["degraded"] or not diff <= runtime.PROBE_ATOL:
        raise UnavailableError(f"the members combined do not reproduce the ensemble's recorded probe outputs "
                               f"(max |Δ| = {diff:.3g} > {runtime.PROBE_ATOL}; failed: {extra.get('members_failed', {})})")


class BundleHolder:
    """The served version, its loading (start), and hot swaps.

    Two locks: the swap lock, held by a swap for its whole load, probe and warm-up (one swap at a
    time), and the install lock, held only to check the routing policy and install. The router takes
    the install lock too (Router.set_policy), so a policy change never waits on a load, and a policy
    is never checked against a version that a concurrent swap is installing.
    """

    def __init__(self, cfg: EngineConfig, failure_policy: FailurePolicy, check: Callable[[Served], None], *,
                 runtime_cfg: RuntimeConfig | None = None, load_limits: LoadLimits | None = None,
                 remote_cfg: remote.RemoteConfig | None = None):
        self.cfg = cfg
        self.remote_cfg = remote_cfg or remote.RemoteConfig()  # remote members (issue 19): service/remote.py
        self.failure_policy = failure_policy
        self.check = check  # raises ConfigError when the live routing policy cannot run on a version
        self.runtime_cfg = runtime_cfg
        self.load_limits = load_limits
        self.served: Served | None = None
        self.error: str | None = None
        self.swap_lock = threading.Lock()
        self.install_lock = threading.Lock()

    def open(self, path: str | Path) -> Served:
        """Verify, load, warm up and probe a bundle; nothing is swapped in here. The same load runs
        first in a child process bounded in time and memory (service/preflight.py): a bundle that
        would hang or exhaust this worker is refused there, and this process then parses exactly
        the manifest (hence the files) the child checked."""
        try:
            checked = preflight.check(path, self.load_limits)
            loaded = runtime.load(path, self.runtime_cfg, manifest_sha256=checked.manifest_sha256)
            check_probe(loaded)
        except FusionError:
            raise
        except (Exception, RecursionError) as exc:  # a malformed manifest with valid digests
            raise BundleError(f"the bundle is malformed: {type(exc).__name__}: {exc}"[:400]) from None
        members = None
        ens = loaded.manifest.variants.get("ensemble")
        remotes = remote.remote_members(loaded.manifest, self.failure_policy.deadline_s, self.remote_cfg)  # {} for most bundles
        if ens is not None and ens.members and all(m in loaded.models or m in remotes for m in ens.members):
            if remotes:  # each checked against the probe rows: a member serving another model is refused here
                remote.verify_members(remotes, self.failure_policy.quorum, len(ens.members), self.remote_cfg)
            members = MembersEnsemble(loaded, self.failure_policy, remotes)
            if remotes and "ensemble" not in loaded.models:
                check_front(loaded, members)
        return Served(loaded, members)

    def start(self) -> None:
        """Load the configured bundle; on failure stay up, not ready, with the reason kept."""
        try:
            served = self.open(self.cfg.bundle)
            self.check(served)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the service not ready, never crashing
            # clients see this in every 503 until a bundle loads: no server path in it (the log has it)
            text = f"{type(exc).__name__}: {exc}"
            for form in {str(self.cfg.bundle), str(Path(self.cfg.bundle)), str(Path(self.cfg.bundle).resolve())}:
                text = text.replace(form, "<bundle>")  # the log keeps the path; clients never see it
            self.error = text
            log.error("could not load bundle %s: %s", self.cfg.bundle, exc)
            return
        self.install(served)

    def install(self, served: Served) -> Served | None:
        old, self.served, self.error = self.served, served, None
        if old is not None:
            BUNDLE.labels(old.version).set(0)
        BUNDLE.labels(served.version).set(1)
        log.info("serving bundle %s with %d models", served.version, len(served.loaded.models))
        return old

    def swap(self, path: str) -> dict:
        """Load a new bundle version beside the old one, then swap atomically; a failure keeps the old."""
        if "\x00" in path:  # os calls raise ValueError on it: a 500 before this check
            raise InputError("expected a bundle directory path; got one with a NUL character")
        target = self.check_swap_path(path)  # resolved: the directory loaded is the one checked, not a link re-read later
        with self.swap_lock:  # one swap at a time; requests keep flowing on the current version
            try:
                served = self.open(target)
            except OSError as exc:  # not a BundleError: e.g. a name too long, a permission denied
                if isinstance(exc, BundleError):
                    raise
                raise BundleError(f"cannot read a bundle at '{path}': {exc.strerror or type(exc).__name__}") from None
            try:
                with self.install_lock:  # the policy cannot change between this check and the install
                    self.check(served)
                    old = self.install(served)
            except ConfigError:
                served.close()  # outside the install lock: it may wait for member threads
                raise
        # The old version is not closed here: requests that already took it (members mode runs in worker
        # threads) must finish on it; closing its member pool now failed them with 500. Its sessions and
        # member threads go when the last request lets go of it (an unreferenced ThreadPoolExecutor's
        # idle threads exit).
        return {"bundle_version": served.version, "previous_version": old.version if old else None}

    def check_swap_path(self, path: str) -> Path:
        """The resolved bundle directory `path` names; 400 for a path that names no bundle the server may load: outside the bundle root (links
        resolved, so a link inside the root that points out is refused too), or no manifest.json there.
        The caller's mistake, not the server being unavailable: a 503 would make clients retry it.
        The message names the setting, not the root's path (the log has it)."""
        root = self.cfg.root()
        try:
            target = Path(path).resolve()
            inside = target.is_relative_to(root)
        except (OSError, RuntimeError) as exc:  # a link loop, a name too long
            raise InputError(f"expected a bundle directory path; '{path}' cannot be resolved ({type(exc).__name__})") from None
        if not inside:
            log.warning("refused a swap to %s: outside the bundle root %s", target, root)
            where = "FUSION_BUNDLE_ROOT" if self.cfg.bundle_root else "FUSION_BUNDLE_ROOT, by default the directory holding the served bundle"
            raise InputError(f"expected a bundle directory below the bundle root ({where}); got '{path}', which is outside it")
        try:
            if (target / MANIFEST).is_file():
                return target
            found = ("no such directory" if not target.exists() else "not a directory" if not target.is_dir()
                     else f"a directory without {MANIFEST}")
        except OSError as exc:  # e.g. permission denied
            found = exc.strerror or type(exc).__name__
        raise InputError(f"expected a bundle directory (one with {MANIFEST}, built by `fusion build`) at '{path}'; got {found}")

    def current(self) -> Served:
        served = self.served
        if served is None:
            raise UnavailableError(f"no bundle is loaded: {self.error or 'still loading'}")
        return served

    @property
    def ready(self) -> bool:
        return self.served is not None
