"""The serving engine: routing, cascade, members mode, shadow runs, statistics and hot swap.

Knows nothing about HTTP: app.py parses requests and formats responses around it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion.bundle import MANIFEST
from fusion.errors import BundleError, ConfigError, FusionError, InputError, UnavailableError, UnknownNameError
from service import preflight, runtime
from service.members import FailurePolicy, Fault, MembersEnsemble
from service.routing import CASCADE, RoutingPolicy, unknown_variant
from service.runtime import PROBE_ATOL, check_probe  # noqa: F401 - re-exported: the probe lives with the load
from service.config import EngineConfig  # noqa: F401 - re-exported until every caller imports it from config
from service.stats import BUNDLE, Stats, check_labels

log = logging.getLogger("fusion.service")

MEMBERS = "members"


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
        return set(self.loaded.models) | extra

    def close(self) -> None:
        if self.members:
            self.members.close()


@dataclass(frozen=True)
class Result:
    variant: str
    output: np.ndarray  # (B, C) probabilities (or regression values)
    version: str
    classes: tuple
    task: str
    extra: dict = field(default_factory=dict)

    def labels(self) -> list:
        """The predicted class label per row (the value per row for regression); computed once."""
        cached = self.__dict__.get("_labels")
        if cached is None:
            if self.task == "regression":
                cached = self.output[:, 0].tolist()
            else:
                cached = np.asarray(self.classes)[self.output.argmax(-1)].tolist()  # ties -> lowest class index
            object.__setattr__(self, "_labels", cached)  # frozen: memoised beside the fields
        return cached


class Engine:
    def __init__(self, cfg: EngineConfig, env=os.environ):
        self.cfg = cfg
        self.policy_failure = FailurePolicy.parse(cfg.failure_policy, cfg.member_deadline_ms)
        self.faults = Fault.parse(env.get("FUSION_FAULT", ""))
        self.env_policy = RoutingPolicy.from_env(env)
        self.policy: RoutingPolicy = self.env_policy
        self.stats = Stats()
        self.served: Served | None = None
        self.error: str | None = None
        self._swap_lock = threading.Lock()  # held by a swap for its whole load, probe and warm-up
        self._install_lock = threading.Lock()  # held only to check a policy and install: never waits on a load
        self.shadow_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()

    # ---- loading and hot swap -------------------------------------------------------------

    def open(self, path: str | Path) -> Served:
        """Verify, load, warm up and probe a bundle; nothing is swapped in here. The same load runs
        first in a child process bounded in time and memory (service/preflight.py): a bundle that
        would hang or exhaust this worker is refused there, and this process then parses exactly
        the manifest (hence the files) the child checked."""
        try:
            checked = preflight.check(path)
            loaded = runtime.load(path, manifest_sha256=checked.manifest_sha256)
            check_probe(loaded)
        except FusionError:
            raise
        except (Exception, RecursionError) as exc:  # a malformed manifest with valid digests
            raise BundleError(f"the bundle is malformed: {type(exc).__name__}: {exc}"[:400]) from None
        members = None
        ens = loaded.manifest.variants.get("ensemble")
        if ens is not None and ens.members and all(m in loaded.models for m in ens.members):
            members = MembersEnsemble(loaded, self.policy_failure, self.faults)
        return Served(loaded, members)

    def start(self) -> None:
        """Load the configured bundle; on failure stay up, not ready, with the reason kept."""
        try:
            served = self.open(self.cfg.bundle)
            self.policy.check_against(served.names())
        except Exception as exc:  # noqa: BLE001 - any failure leaves the service not ready, never crashing
            # clients see this in every 503 until a bundle loads: no server path in it (the log has it)
            text = f"{type(exc).__name__}: {exc}"
            for form in {str(self.cfg.bundle), str(Path(self.cfg.bundle)), str(Path(self.cfg.bundle).resolve())}:
                text = text.replace(form, "<bundle>")  # the log keeps the path; clients never see it
            self.error = text
            log.error("could not load bundle %s: %s", self.cfg.bundle, exc)
            return
        self._install(served)

    def _install(self, served: Served) -> Served | None:
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
        with self._swap_lock:  # one swap at a time; requests keep flowing on the current version
            try:
                served = self.open(target)
            except OSError as exc:  # not a BundleError: e.g. a name too long, a permission denied
                if isinstance(exc, BundleError):
                    raise
                raise BundleError(f"cannot read a bundle at '{path}': {exc.strerror or type(exc).__name__}") from None
            try:
                with self._install_lock:  # the policy cannot change between this check and the install
                    self.policy.check_against(served.names())
                    old = self._install(served)
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

    def set_policy(self, body: dict) -> RoutingPolicy:
        """Check and install a routing policy. Takes the install lock only: a swap holds it for its
        install step, not for its load, so this never waits seconds (issue 13, finding 5: it took the
        swap lock on the event loop and froze the worker for a whole load and warm-up)."""
        with self._install_lock:  # never checked against a bundle that a concurrent swap is installing
            policy = RoutingPolicy.from_dict(body, self.policy)
            policy.check_against(self.current().names())
            self.policy = policy  # one reference assignment: atomic for readers
        return policy

    # ---- prediction ----------------------------------------------------------------------

    def choose(self, explicit: str | None, key: str | None) -> str:
        return explicit or self.policy.choose(key)

    def run(self, served: Served, variant: str, X: np.ndarray) -> tuple[np.ndarray, dict]:
        """One variant on X (B, F) -> (B, C) plus extra response fields."""
        if variant == MEMBERS:
            if served.members is None:
                raise UnknownNameError("members mode needs an 'ensemble' variant whose members are in the bundle")
            return served.members(X)
        if variant == CASCADE:
            return self._cascade(served, X)
        return served.loaded.model(variant)(X), {}

    def _cascade(self, served: Served, X: np.ndarray) -> tuple[np.ndarray, dict]:
        c = self.policy.cascade
        if c is None:
            raise UnknownNameError("no cascade is configured (FUSION_CASCADE or POST /admin/routing)")
        out = served.loaded.model(c.cheap)(X)
        escalate = out.max(-1) < c.threshold  # (B,) rows the cheap model is unsure of
        if escalate.any():
            out = out.copy()
            out[escalate] = self.run(served, c.fallback, np.ascontiguousarray(X[escalate]))[0]
        n_esc = int(escalate.sum())
        self.stats.observe_cascade(len(X) - n_esc, n_esc)
        return out, {"escalated": escalate.tolist(), "cascade": c.to_dict()}

    def resolve(self, variant: str | None, key: str | None, served: Served | None = None) -> tuple[Served, str]:
        """The bundle version and the variant a request will use (both fixed for the whole request).
        An explicit variant that cannot answer is refused here, with every name that can."""
        served = served or self.current()
        if variant:
            self.check_variant(served, variant)
        return served, self.choose(variant, key)

    def check_variant(self, served: Served, name: str) -> None:
        """Raise UnknownNameError unless `name` answers on `served` under the current policy; the error
        lists the variants and members, `members` when members mode runs, `cascade` when configured."""
        cascade = self.policy.cascade is not None
        valid = served.names() | ({CASCADE} if cascade else set())
        if name not in valid:
            unavailable = {} if served.members else {MEMBERS: "an 'ensemble' variant whose members are all in the bundle"}
            if not cascade:
                unavailable[CASCADE] = "a cascade configured (FUSION_CASCADE or POST /admin/routing)"
            raise unknown_variant(name, valid, unavailable)

    def finish(self, served: Served, name: str, X: np.ndarray, out: np.ndarray, extra: dict,
               elapsed: float, request_id: str, *, client: str = "", client_chose_id: bool = False) -> Result:
        """Record the answer and start the shadow runs; returns what the client gets.

        The record awaiting feedback is keyed by the server: the request id when the server made it,
        else a fresh id; a client's own X-Request-ID (`client_chose_id`) is only an alias of it, for the
        same `client` (issue 13, finding 9). The key is `extra["feedback_id"]`.
        """
        finite = np.isfinite(out).all(axis=tuple(range(1, out.ndim)))  # (B,): never answer 200 with NaN/Inf
        if not finite.all():
            raise InputError(f"rows {np.flatnonzero(~finite)[:5].tolist()}: '{name}' gave non-finite outputs; "
                             "expected inputs within the range the model handles (finite inputs can still overflow it)")
        manifest = served.loaded.manifest
        result = Result(name, out, served.version, manifest.classes, manifest.task, extra)
        labels = result.labels()
        fid = self.stats.observe(name, len(X), elapsed, None if client_chose_id else request_id, labels, client=client,
                                 alias=request_id if client_chose_id else None, version=served.version)
        extra["feedback_id"] = fid
        for shadow in self.policy.shadow:
            if shadow != name:
                self._submit_shadow(served, shadow, name, X, labels, fid)
        return result

    def predict(self, X: np.ndarray, *, variant: str | None, key: str | None, request_id: str) -> Result:
        served, name = self.resolve(variant, key)
        t0 = time.perf_counter()
        out, extra = self.run(served, name, X)
        return self.finish(served, name, X, out, extra, time.perf_counter() - t0, request_id)

    def _submit_shadow(self, served: Served, shadow: str, primary: str, X: np.ndarray, labels: list, rid: str) -> None:
        """Run `shadow` on the same rows off the response path; a full queue drops the run (counted)."""
        with self._shadow_lock:
            if self._shadow_pending >= self.cfg.shadow_queue:
                self.stats.shadow_failed(shadow, "queue_full")
                return
            self._shadow_pending += 1

        def job():
            try:
                t0 = time.perf_counter()
                out, _ = self.run(served, shadow, X)
                shadow_labels = Result(shadow, out, served.version, served.loaded.manifest.classes,
                                       served.loaded.manifest.task).labels()
                self.stats.observe_shadow(rid, primary, shadow, labels, shadow_labels, time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - a failing shadow never reaches the client
                log.warning("shadow %s failed for request %s: %s", shadow, rid, exc)
                self.stats.shadow_failed(shadow, type(exc).__name__)
            finally:
                with self._shadow_lock:
                    self._shadow_pending -= 1

        self.shadow_pool.submit(job)

    def feedback(self, request_id: str, labels: list, *, client: str = "", by_feedback_id: bool = False) -> dict:
        """Score a record: `request_id` is its feedback id or (unless `by_feedback_id`) the X-Request-ID
        `client` sent with it. A label must be one of the classes with its JSON type (stats.check_labels)."""
        manifest = self.current().loaded.manifest
        try:
            check_labels(labels, manifest.classes, manifest.task)
            return self.stats.feedback(request_id, labels, client=client, alias=not by_feedback_id)
        except KeyError:
            field_name = "feedback_id" if by_feedback_id else "request_id"
            raise UnknownNameError(
                f"expected the feedback_id (or request_id) of a /predict answer of this worker that awaits its "
                f"label; got {field_name} {request_id!a:.80}: never served here, already labelled, or evicted"
            ) from None
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def report(self) -> dict:
        served = self.served
        return {
            "bundle_version": served.version if served else None,
            "routing": self.policy.to_dict(),
            **self.stats.report(),
        }
