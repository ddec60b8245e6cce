"""`members` mode: the ensemble computed from one session per member, run concurrently and combined
in numpy, with a failure policy (`strict` or `quorum:k`) and a per-member deadline.

Used when members must sit on different GPUs, or to keep answering while a member fails.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass

import numpy as np

from fusion.errors import ConfigError, InputError, UnavailableError
from service.combine import calibrate, combine, member_weights
from service.errors import DeadlineError
from service.metrics import DEGRADED


@dataclass(frozen=True)
class FailurePolicy:
    """`strict`: any member failing fails the request. `quorum:k`: answer when at least k answered."""

    quorum: int | None = None  # None: strict
    deadline_s: float = 1.0

    @classmethod
    def parse(cls, text: str, deadline_ms: float) -> "FailurePolicy":
        text = text.strip() or "strict"
        if deadline_ms <= 0:
            raise ConfigError(f"member deadline: expected a positive number of ms; got {deadline_ms}")
        if text == "strict":
            return cls(None, deadline_ms / 1e3)
        name, _, k = text.partition(":")
        if name != "quorum" or not k.isdigit() or int(k) < 1:
            raise ConfigError(f"failure policy: expected 'strict' or 'quorum:k' with k >= 1; got '{text}'")
        return cls(int(k), deadline_ms / 1e3)


def _chosen_output(model, output_name: str):
    """`model` itself when it answers with `output_name` first (or none is named); otherwise a callable
    that runs it under the same deadline and returns that output (ModelEntry.output_name)."""
    session = getattr(model, "session", None)
    if not output_name or session is None or hasattr(model, "output_index"):
        return model  # a runtime.Model already answers with the manifest's output_name (runtime.output_index)
    names = [o.name for o in session.get_outputs()]
    if output_name not in names:
        raise ConfigError(f"member '{model.name}': the manifest names output '{output_name}'; the file has {names}")
    index = names.index(output_name)
    if index == 0:
        return model

    def run(X: np.ndarray) -> np.ndarray:
        return model.deadline.run(model.session, {model.input_name: X}, model.name)[index]

    return run


def _probabilities(out: np.ndarray, logits: bool) -> np.ndarray:
    """A member's answer as (B, C) probabilities: (B, C, 1, 1) outputs flattened, logits softmaxed."""
    out = np.asarray(out).reshape(len(out), -1)
    if not logits:
        return out
    z = out.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


class MembersEnsemble:
    """Run every member of the ensemble in its own session, concurrently; combine with the bundle's combiner."""

    def __init__(self, loaded, policy: FailurePolicy, remotes: dict | None = None):
        entry = loaded.manifest.variants["ensemble"]
        self.names = list(entry.members)
        # remote members (issue 19, service/remote.py): {name: RemoteMember}, called like a local member
        self.remotes = dict(remotes or {})
        # bring-your-own members (issue 15): a member file may output logits, or several outputs of which
        # the manifest names one; every member hands over (B, C) probabilities to combine()
        records = getattr(loaded.manifest, "members", {}) or {}
        self.models = [self.remotes[n] if n in self.remotes else
                       _chosen_output(loaded.model(n), getattr(records.get(n), "output_name", "")) for n in self.names]
        classify = getattr(loaded.manifest, "task", "classification") == "classification"
        # a runtime.Model of a logits member already answers probabilities (runtime.Model.softmax); a remote
        # member answers what it declares
        self.softmax = [classify and getattr(records.get(n), "output", "") == "logits"
                        and not getattr(self.remotes.get(n) or loaded.model(n), "softmax", False) for n in self.names]
        self.combiner = entry.combiner or {"name": "soft_vote", "weights": None}
        # temperature-calibrated ensembles divide each member's logits by T inside the fused graph;
        # on probabilities that is softmax(log p / T) (the per-row log-softmax offset cancels)
        method = getattr(entry, "method", None) or {}
        temps = method.get("temperatures") if method.get("calibration") == "temperature" else None
        self.temperatures = np.asarray([temps[n] for n in self.names], dtype=np.float64) if temps else None
        self.weights = member_weights(self.combiner, len(self.names))
        self.policy = policy
        if policy.quorum is not None and policy.quorum > len(self.names):
            raise ConfigError(f"quorum:{policy.quorum} needs at least {policy.quorum} members; the ensemble has {len(self.names)}")
        # one thread per member; a hung member holds its thread until it returns, so the pool is
        # bounded at 2x members and a request is refused (503) rather than queued when it is full
        self.pool = cf.ThreadPoolExecutor(max_workers=2 * len(self.names), thread_name_prefix="member")
        self.inflight = 0  # member runs submitted and not yet finished (hung ones included)
        self.max_inflight = 2 * len(self.names)
        self._lock = threading.Lock()

    def _run(self, i: int, X: np.ndarray) -> np.ndarray:
        return self.models[i](X)

    def __call__(self, X: np.ndarray) -> tuple[np.ndarray, dict]:
        """X (B, F) -> combined (B, C) and {"degraded": bool, "members_answered": [...], "members_failed": {...}}."""
        with self._lock:
            if self.inflight + len(self.names) > self.max_inflight:
                raise UnavailableError("members mode is saturated (members still busy with earlier requests); retry")
            self.inflight += len(self.names)
        futures = {self.pool.submit(self._run, i, X): i for i in range(len(self.names))}
        for fut in futures:
            fut.add_done_callback(self._release)
        done, pending = cf.wait(futures, timeout=self.policy.deadline_s)
        outputs, failed, refused = {}, {}, {}
        for fut in done:
            i = futures[fut]
            exc = fut.exception()
            if exc is None:
                outputs[i] = fut.result()
            else:
                failed[self.names[i]] = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, InputError):  # the member refused the client's values (runtime.Model)
                    refused[self.names[i]] = exc
        for fut in pending:
            failed[self.names[futures[fut]]] = f"no answer within the {self.policy.deadline_s * 1e3:.0f} ms deadline"
        unanswerable = (failed and (self.policy.quorum is None or self.combiner["name"] == "stacking")
                        or len(outputs) < (self.policy.quorum or len(self.names)))
        if unanswerable and refused:
            raise refused[min(refused)]  # the client's values are to blame (400), not the members (503)
        if failed and (self.policy.quorum is None or self.combiner["name"] == "stacking"):
            name, why = next(iter(sorted(failed.items())))
            err = DeadlineError if "deadline" in why else UnavailableError
            raise err(f"member '{name}' failed: {why} (policy strict; {len(failed)} of {len(self.names)} members failed)")
        if len(outputs) < (self.policy.quorum or len(self.names)):
            raise UnavailableError(
                f"only {len(outputs)} of {len(self.names)} members answered; quorum needs {self.policy.quorum} "
                f"(failed: {', '.join(sorted(failed))})"
            )
        idx = sorted(outputs)
        for name in failed:
            DEGRADED.labels(name).inc()
        if self.weights[idx].sum() <= 0:
            raise UnavailableError(f"the members that answered ({[self.names[i] for i in idx]}) all have weight 0")
        probs = np.stack([_probabilities(outputs[i], self.softmax[i]) for i in idx])  # (M', B, C)
        if self.temperatures is not None:
            probs = calibrate(probs, self.temperatures[idx])
        combined = combine(self.combiner, probs, self.weights[idx])
        return combined.astype(np.float32), {
            "degraded": bool(failed),
            "members_answered": [self.names[i] for i in idx],
            **({"members_failed": failed} if failed else {}),
        }

    def _release(self, _fut) -> None:
        with self._lock:
            self.inflight -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
