"""The serving engine: what app.py talks to. Knows nothing about HTTP: app.py parses and formats.

A thin composition, one concept per module:
- service/bundles.py: the served bundle version and hot swaps (BundleHolder, Served);
- service/router.py: the live routing policy (Router);
- service/predictor.py: one prediction end to end, scheduling included (Predictor, Result);
- service/shadow.py: shadow runs off the response path (ShadowRunner);
- service/ab.py / service/feedback.py: the A/B statistics and the records awaiting feedback.
Nothing here reads the environment: service/config.py reads it once and passes the settings down.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import numpy as np

from fusion.errors import InputError, UnknownNameError
from service.ab import Stats
from service.abstore import open_store
from service.bundles import MEMBERS, BundleHolder, Served
from service.config import EngineConfig, RolloutConfig
from service.errors import NonFiniteOutputError
from service.feedback import check_labels
from service.members import FailurePolicy
from service.predictor import Predictor, Result
from service.preflight import LoadLimits
from service.remote import RemoteConfig
from service.rollout import MemoryRolloutState, RolloutController, RolloutStore, split
from service.router import Router
from service.routing import CASCADE, RoutingPolicy
from service.runtime import PROBE_ATOL, RuntimeConfig, check_probe  # noqa: F401 - re-exported: the probe lives with the load
from service.tuning import AUTO

__all__ = ["Engine", "EngineConfig", "MEMBERS", "Result", "Served"]


class Engine:
    def __init__(self, cfg: EngineConfig, policy: RoutingPolicy, *, runtime: RuntimeConfig | None = None,
                 load_limits: LoadLimits | None = None, rollout: RolloutConfig | None = None,
                 rollout_store: RolloutStore | None = None, remote: RemoteConfig | None = None):
        self.cfg = cfg
        self.failure_policy = FailurePolicy.parse(cfg.failure_policy, cfg.member_deadline_ms)
        # the shared, durable A/B store (service/abstore.py; None: FUSION_AB_STORE=memory, per-process figures)
        self.ab_store = open_store(cfg.ab_store_config())
        self.stats = Stats(store=self.ab_store)
        self.stats.rule = cfg.ab_test  # the verdict's margin and alpha (fusion/sequential.py)
        if runtime is None:  # FUSION_BATCH_MAX_ROWS=auto times costly models at batch 1..32 when they load
            runtime = RuntimeConfig(batch_curve=cfg.batch_max_rows == AUTO)
        self.bundles = BundleHolder(cfg, self.failure_policy, self._check_served, runtime_cfg=runtime, load_limits=load_limits,
                                    remote_cfg=remote)
        self.router = Router(policy, self.bundles.install_lock)
        self.predictor = Predictor(cfg, self.router, self.stats, self.bundles.current)
        # [answered, failed] requests per variant in this worker (`outcomes()`); the rollout's guardrail reads the
        # report's `outcomes` instead: every worker's and replica's with a shared store (Stats.observe_outcome)
        self._outcomes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._outcomes_lock = threading.Lock()
        self.rollout: RolloutController | None = None
        rc = rollout or RolloutConfig()
        if rc.plan is not None:
            # the shared A/B store's rollout_get/rollout_cas (service/abstore.py): every worker and replica follows
            # one decision; with FUSION_AB_STORE=memory, this process's memory (one worker only)
            store = rollout_store or self.ab_store or MemoryRolloutState()
            plan = rc.plan
            self.rollout = RolloutController(
                plan, rc.limits, store, report=lambda: self.report(rollout=False),
                apply=lambda percent: self.set_policy({"weights": split(self.policy.weights, plan.candidate, percent)}))

    def _check_served(self, served: Served) -> None:
        """ConfigError unless the routing policy and the rollout's candidate can run on `served` (a load or swap)."""
        self.router.check_against(served)
        if self.rollout is not None:
            self.rollout.plan.check_against(served.names())

    # ---- versions ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the configured bundle; on failure stay up, not ready, with the reason kept (`error`).
        Then the rollout's evaluator starts (every FUSION_ROLLOUT_PERIOD_S; it follows the stored stage)."""
        self.bundles.start()
        if self.rollout is not None:
            self.rollout.start()

    def swap(self, path: str) -> dict:
        """Load a new bundle version beside the old one, then swap atomically; a failure keeps the old."""
        return self.bundles.swap(path)

    def current(self) -> Served:
        """The served version (UnavailableError when none): a request reads it once and keeps it."""
        return self.bundles.current()

    @property
    def ready(self) -> bool:
        return self.bundles.ready

    @property
    def served(self) -> Served | None:
        """The served version or None, without raising (/echo, /docs.json); requests use current()."""
        return self.bundles.served

    @property
    def error(self) -> str | None:
        """Why no bundle is served (None once one is)."""
        return self.bundles.error

    # ---- routing ---------------------------------------------------------------------------------

    @property
    def policy(self) -> RoutingPolicy:
        return self.router.policy

    def set_policy(self, body: dict) -> RoutingPolicy:
        """Check and install a routing policy (Router.set_policy: the install lock only, never the swap lock)."""
        return self.router.set_policy(body, self.bundles.current)

    # ---- prediction --------------------------------------------------------------------------------

    async def predict(self, X: np.ndarray, *, variant: str | None, key: str | None, request_id: str,
                      client: str = "", client_chose_id: bool = False, served: Served | None = None) -> Result:
        """Answer X (B, F), or named feeds (service/inputs.py): the one entry point (Predictor.predict: resolution, scheduling, running,
        the finiteness check, statistics and shadow runs). The variant is resolved here so that a
        failure is counted against it (the rollout's error-rate guardrail)."""
        served = served or self.current()
        policy = self.router.policy  # read once per request (Predictor.predict uses the same one)
        name = self.router.resolve(served, variant, key, policy)
        try:
            result = await self.predictor.predict(X, variant=name, key=key, request_id=request_id, client=client,
                                                  client_chose_id=client_chose_id, served=served, policy=policy)
        except (InputError, asyncio.CancelledError) as exc:
            # the client's input (its token ids past the table, say) or its leaving: not the variant's failure,
            # so one client cannot roll a candidate back; a NaN/Inf answer on finite rows still counts
            if isinstance(exc, NonFiniteOutputError):
                self._outcome(name, True, served)
            raise
        except Exception:
            self._outcome(name, True, served)  # server-side: the variant's failure
            raise
        self._outcome(name, False, served)
        return result

    def _outcome(self, name: str, failed: bool, served: Served) -> None:
        with self._outcomes_lock:
            self._outcomes[name][int(failed)] += 1
        # the report's `outcomes` (every worker's with a shared store): the rollout's error-rate guardrail
        self.stats.observe_outcome(name, failed, served.version)

    def outcomes(self) -> dict[str, tuple[int, int]]:
        """(answered, failed) requests per variant in this worker (once the variant was chosen), since it started."""
        with self._outcomes_lock:
            return {k: (v[0], v[1]) for k, v in self._outcomes.items()}

    def rollout_action(self, action: str) -> dict:
        """POST /admin/rollout: pause, resume or abort the configured rollout (compare-and-set in its store)."""
        if self.rollout is None:
            raise UnknownNameError("no rollout is configured; set FUSION_ROLLOUT (e.g. distilled:1,5,25,50,100)")
        self.rollout.act(action)
        return self.rollout.state()

    def feedback(self, request_id: str, labels: list, *, client: str = "", by_feedback_id: bool = False) -> dict:
        """Score a record: `request_id` is its feedback id or (unless `by_feedback_id`) the X-Request-ID
        `client` sent with it. A label must be one of the classes with its JSON type (feedback.check_labels)."""
        manifest = self.current().loaded.manifest
        try:
            check_labels(labels, manifest.classes, manifest.task)
            return self.stats.feedback(request_id, labels, client=client, alias=not by_feedback_id)
        except KeyError:
            field_name = "feedback_id" if by_feedback_id else "request_id"
            raise UnknownNameError(
                f"expected the feedback_id (or request_id) of a /predict answer that awaits its label; got "
                f"{field_name} {request_id!a:.80}: never served{' by this worker' if self.ab_store is None else ''}, "
                f"already labelled, or evicted (or past the A/B store's retention)"
            ) from None
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def report(self, rollout: bool = True) -> dict:
        """`/ab/report`; `rollout`: with the rollout's stage, status and history (None when none is configured)."""
        served = self.bundles.served
        return {
            "bundle_version": served.version if served else None,
            "routing": self.policy.to_dict(),
            **self.stats.report(),
            **({"rollout": self.rollout.state() if self.rollout else None} if rollout else {}),
        }

    def describe(self, served: Served | None = None) -> dict:
        """The served bundle for GET /info: version, input spec, classes, variants and members with their
        offline metrics and device, the modes that answer, and the routing policy."""
        served = served or self.current()
        m, loaded = served.loaded.manifest, served.loaded
        policy = self.policy

        remotes = served.members.remotes if served.members is not None else {}

        def entry(name, e):
            local = loaded.models.get(name)
            return {"kind": e.kind, "file": e.file, "sha256": e.sha256, "metrics": e.metrics,
                    "device": local.device if local is not None else "remote",
                    "combiner": e.combiner, "method": e.method, "n_parameters": e.n_parameters, "members": list(e.members),
                    # a remote member (issue 19): URL, health, latency, errors, circuit breaker (service/remote.py)
                    **({"remote": remotes[name].status()} if name in remotes else {})}

        return {
            "bundle_version": m.bundle_version, "created": m.created, "task": m.task,
            "input": {"name": m.input.name, "shape": m.input.shape, "dtype": m.input.dtype, "scaling": m.input.scaling.get("kind")},
            # a bundle with named inputs (service/inputs.py): each client-facing input, its kind and what it accepts
            **({"inputs": loaded.inputs.describe()} if loaded.inputs is not None else {}),
            "classes": list(m.classes),
            "variants": {k: entry(k, e) for k, e in m.variants.items()},
            "members": {k: entry(k, e) for k, e in m.members.items()},
            "modes": [MEMBERS] * (served.members is not None) + [CASCADE] * (policy.cascade is not None),
            "routing": policy.to_dict(),
            "comparison": m.comparison,
            "ensemble_selection": m.ensemble_selection,  # how `fusion build` chose the weights; `gate.warning` when it did not pay
        }

    def close(self) -> None:
        """Stop the rollout's evaluator, let the queued shadow runs finish and stop the shadow thread
        (tests; the process exit does it in service)."""
        if self.rollout is not None:
            self.rollout.stop()
        self.predictor.shadows.close(wait=True)
        self.stats.close()  # the shared A/B store: what is queued is written (or spooled), the writer stops
