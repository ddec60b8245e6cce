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

import numpy as np

from fusion.errors import InputError, UnknownNameError
from service.ab import Stats
from service.bundles import MEMBERS, BundleHolder, Served
from service.config import EngineConfig
from service.feedback import check_labels
from service.members import FailurePolicy
from service.predictor import Predictor, Result
from service.preflight import LoadLimits
from service.router import Router
from service.routing import CASCADE, RoutingPolicy
from service.runtime import PROBE_ATOL, RuntimeConfig, check_probe  # noqa: F401 - re-exported: the probe lives with the load

__all__ = ["Engine", "EngineConfig", "MEMBERS", "Result", "Served"]


class Engine:
    def __init__(self, cfg: EngineConfig, policy: RoutingPolicy, *, runtime: RuntimeConfig | None = None,
                 load_limits: LoadLimits | None = None):
        self.cfg = cfg
        self.failure_policy = FailurePolicy.parse(cfg.failure_policy, cfg.member_deadline_ms)
        self.stats = Stats()
        self.bundles = BundleHolder(cfg, self.failure_policy, lambda served: self.router.check_against(served),
                                    runtime_cfg=runtime, load_limits=load_limits)
        self.router = Router(policy, self.bundles.install_lock)
        self.predictor = Predictor(cfg, self.router, self.stats, self.bundles.current)

    # ---- versions ------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the configured bundle; on failure stay up, not ready, with the reason kept (`error`)."""
        self.bundles.start()

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
        """Answer X (B, F): the one entry point (Predictor.predict: resolution, scheduling, running,
        the finiteness check, statistics and shadow runs)."""
        return await self.predictor.predict(X, variant=variant, key=key, request_id=request_id, client=client,
                                            client_chose_id=client_chose_id, served=served)

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
                f"expected the feedback_id (or request_id) of a /predict answer of this worker that awaits its "
                f"label; got {field_name} {request_id!a:.80}: never served here, already labelled, or evicted"
            ) from None
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def report(self) -> dict:
        served = self.bundles.served
        return {
            "bundle_version": served.version if served else None,
            "routing": self.policy.to_dict(),
            **self.stats.report(),
        }

    def describe(self, served: Served | None = None) -> dict:
        """The served bundle for GET /info: version, input spec, classes, variants and members with their
        offline metrics and device, the modes that answer, and the routing policy."""
        served = served or self.current()
        m, loaded = served.loaded.manifest, served.loaded
        policy = self.policy

        def entry(name, e):
            return {"kind": e.kind, "file": e.file, "sha256": e.sha256, "metrics": e.metrics, "device": loaded.models[name].device,
                    "combiner": e.combiner, "method": e.method, "n_parameters": e.n_parameters, "members": list(e.members)}

        return {
            "bundle_version": m.bundle_version, "created": m.created, "task": m.task,
            "input": {"name": m.input.name, "shape": m.input.shape, "dtype": m.input.dtype, "scaling": m.input.scaling["kind"]},
            "classes": list(m.classes),
            "variants": {k: entry(k, e) for k, e in m.variants.items()},
            "members": {k: entry(k, e) for k, e in m.members.items()},
            "modes": [MEMBERS] * (served.members is not None) + [CASCADE] * (policy.cascade is not None),
            "routing": policy.to_dict(),
            "comparison": m.comparison,
            "ensemble_selection": m.ensemble_selection,  # how `fusion build` chose the weights; `gate.warning` when it did not pay
        }

    def close(self) -> None:
        """Let the queued shadow runs finish and stop the shadow thread (tests; the process exit does it in service)."""
        self.predictor.shadows.close(wait=True)
