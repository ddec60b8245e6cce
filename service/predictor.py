"""One prediction, start to end: resolve the version and variant, schedule, run, check, record, shadow.

`Predictor.predict` is the only way a request is answered (POST /predict, OIP infer, the BentoML twin,
and the in-process tests), so the tests exercise the path production takes. Scheduling:
- the adaptive batcher (FUSION_BATCH_MAX_ROWS > 0, or auto and the model's batch-1 call is costly:
  service/tuning.py) when the variant is one onnxruntime session;
- else on the event loop when it is one session and the call is cheap (runtime.Model.inline_ok: few
  rows, and expected from the model's recent calls to take at most FUSION_INLINE_BUDGET_MS);
- else in a worker thread. Members mode and cascade always run in a thread: they wait on member
  threads up to the member deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from fusion.errors import InputError, UnknownNameError
from service import tuning
from service.ab import Stats
from service.batching import AdaptiveBatcher
from service.bundles import MEMBERS, Served
from service.config import EngineConfig
from service.errors import NonFiniteOutputError
from service.inputs import n_rows, take
from service.router import Router
from service.routing import CASCADE, RoutingPolicy
from service.shadow import ShadowRunner


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


class Predictor:
    def __init__(self, cfg: EngineConfig, router: Router, stats: Stats, current: Callable[[], Served]):
        self.router = router
        self.stats = stats
        self.current = current
        self.shadows = ShadowRunner(stats, cfg.shadow_queue)
        # FUSION_BATCH_MAX_ROWS: AUTO batches only the models whose batch-1 call is costly (service/tuning.py)
        self.batch_rows = cfg.batch_max_rows
        rows = tuning.AUTO_BATCH_ROWS if cfg.batch_max_rows == tuning.AUTO else cfg.batch_max_rows
        self.batcher = (AdaptiveBatcher(rows, instances=cfg.batch_instances, per_model_rows=cfg.batch_max_rows == tuning.AUTO)
                        if rows > 0 else None)

    def batches(self, model) -> bool:
        """Whether `model`'s requests go through the adaptive batcher: always when FUSION_BATCH_MAX_ROWS > 0,
        never when 0; under auto when the batch sizes timed at load found one that saves time per row
        (tuning.choose_batch_rows), or, not timed, when its batch-1 call cost more than tuning.COSTLY_S."""
        if self.batcher is None:
            return False
        if self.batch_rows != tuning.AUTO:
            return True
        choice = getattr(model, "batch_choice", None)
        return choice[0] > 0 if choice is not None else getattr(model, "probe_s", 0.0) > tuning.COSTLY_S

    def queues(self, model) -> bool:
        """Whether `model`'s requests go through the batcher's queue: when batched, and when auto chose not to
        batch a timed model (one request per call, no more calls at once than were timed: AdaptiveBatcher.unbatched)."""
        return self.batches(model) or (self.batcher is not None and self.batcher.unbatched(model))

    def tuning(self, served: Served) -> dict:
        """Each local model's effective intra-op threads and batching, and why (GET /info)."""
        members = served.loaded.manifest.members
        return {name: tuning.report(m, member=name in members, batch_rows=self.batch_rows, batched=self.batches(m),
                                    instances=self.batcher.instances_for(m) if self.batcher is not None else 0,
                                    queued=self.batcher is not None and self.batcher.unbatched(m))
                for name, m in served.loaded.models.items()}

    async def predict(self, X: np.ndarray, *, variant: str | None, key: str | None, request_id: str,
                      client: str = "", client_chose_id: bool = False, served: Served | None = None,
                      policy: RoutingPolicy | None = None) -> Result:
        """Answer X (B, F), or named feeds {graph input: (B, ...)} (service/inputs.py), on `served` (the
        version X was checked against; the current one if None).

        The record awaiting feedback is keyed by the server: the request id when the server made it,
        else a fresh id; a client's own X-Request-ID (`client_chose_id`) is only an alias of it, for the
        same `client` (issue 13, finding 9). The key is `result.extra["feedback_id"]`.
        """
        served = served or self.current()
        policy = policy or self.router.policy  # read once: a policy change mid-request never mixes two policies
        name = self.router.resolve(served, variant, key, policy)
        t0 = time.perf_counter()
        model = served.loaded.models.get(name)  # one onnxruntime session, no waiting on other threads
        # named feeds (Manifest.inputs) join too: concatenated when their other dimensions agree, text rows
        # re-padded to the longest of the call with the tokenizer's pad id (service/batching.py)
        if model is not None and self.queues(model):
            pads = served.loaded.inputs.pads if type(X) is dict and served.loaded.inputs is not None else None
            out, extra = await self.batcher.run(model, X, pads=pads), {}
        elif model is not None and model.inline_ok(len(X) if type(X) is not dict else n_rows(X)):
            out, extra = model(X), {}
        else:
            out, extra = await run_in_threadpool(self.run, served, name, X, policy)
        return self._finish(served, name, X, out, extra, time.perf_counter() - t0, request_id, client, client_chose_id,
                            policy)

    def run(self, served: Served, variant: str, X: np.ndarray,
            policy: RoutingPolicy | None = None) -> tuple[np.ndarray, dict]:
        """One variant on X (B, F) -> (B, C) plus extra response fields; blocking (a worker thread).
        `policy`: the routing policy the request read (its cascade); the live one if None."""
        if variant == MEMBERS or (variant == "ensemble" and served.members is not None and "ensemble" not in served.loaded.models):
            # (a split front's `ensemble` has no file: it is its remote members, combined: issue 19)
            if served.members is None:
                raise UnknownNameError("members mode needs an 'ensemble' variant whose members are in the bundle")
            return served.members(X)
        if variant == CASCADE:
            return self._cascade(served, X, policy or self.router.policy)
        return served.loaded.model(variant)(X), {}

    def _cascade(self, served: Served, X: np.ndarray, policy: RoutingPolicy) -> tuple[np.ndarray, dict]:
        c = policy.cascade
        if c is None:
            raise UnknownNameError("no cascade is configured (FUSION_CASCADE or POST /admin/routing)")
        out = served.loaded.model(c.cheap)(X)
        escalate = out.max(-1) < c.threshold  # (B,) rows the cheap model is unsure of
        if escalate.any():
            out = out.copy()
            out[escalate] = self.run(served, c.fallback, take(X, escalate))[0]  # text rows keep this request's padding
        n_esc = int(escalate.sum())
        self.stats.observe_cascade(len(out) - n_esc, n_esc)
        return out, {"escalated": escalate.tolist(), "cascade": c.to_dict()}

    def _finish(self, served: Served, name: str, X: np.ndarray, out: np.ndarray, extra: dict, elapsed: float,
                request_id: str, client: str, client_chose_id: bool, policy: RoutingPolicy) -> Result:
        """Check the answer, record it and start the shadow runs; returns what the client gets."""
        finite = np.isfinite(out).all(axis=tuple(range(1, out.ndim)))  # (B,): never answer 200 with NaN/Inf
        if not finite.all():
            raise NonFiniteOutputError(f"rows {np.flatnonzero(~finite)[:5].tolist()}: '{name}' gave non-finite outputs; "
                             "expected inputs within the range the model handles (finite inputs can still overflow it)")
        manifest = served.loaded.manifest
        result = Result(name, out, served.version, manifest.classes, manifest.task, extra)
        labels = result.labels()
        fid = self.stats.observe(name, len(out), elapsed, None if client_chose_id else request_id, labels, client=client,
                                 alias=request_id if client_chose_id else None, version=served.version)
        extra["feedback_id"] = fid
        for shadow in policy.shadow:
            if shadow != name and shadow in served.names():  # a policy for a newer version may name more
                self.shadows.submit(shadow, name, labels, fid, self._shadow_job(served, shadow, X), version=served.version)
        return result

    def _shadow_job(self, served: Served, shadow: str, X: np.ndarray) -> Callable[[], list]:
        def run() -> list:
            out, _ = self.run(served, shadow, X)  # a shadow is a variant or members, never the cascade
            manifest = served.loaded.manifest
            return Result(shadow, out, served.version, manifest.classes, manifest.task).labels()

        return run
