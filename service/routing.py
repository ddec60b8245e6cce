"""A/B routing: weighted split, sticky keys, explicit choice, shadow and cascade settings.

Pure and stateless: a keyed request's variant is a function of the key and the weights only
(a SHA-256 of the key), so every process and every replica routes a key identically.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fusion.errors import ConfigError, UnknownNameError

CASCADE = "cascade"


def stable_unit(key: str) -> float:
    """Map a routing key to [0, 1) with SHA-256: the same on every machine, process and Python."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def parse_weights(text: str) -> dict[str, float]:
    """`"ensemble=0.5,merged=0.5"` -> {"ensemble": 0.5, "merged": 0.5}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise ConfigError(f"routing weights: expected name=number pairs like ensemble=0.5; got '{part}'") from None
    return weights


def unknown_variant(name: str, valid: Iterable[str], unavailable: Mapping[str, str] | None = None) -> UnknownNameError:
    """The error for a request that names a variant it cannot have: it lists every name that works
    (so a client can correct itself in one step) and, for each special name that does not work here
    (`members`, `cascade`), what it needs. A special name asked for gets its own reason first."""
    listed = f"expected one of {sorted(valid)}"
    unavailable = unavailable or {}
    if name in unavailable:
        return UnknownNameError(f"'{name}' needs {unavailable[name]}; {listed}")
    needs = "".join(f"; '{k}' needs {why}" for k, why in sorted(unavailable.items()))
    return UnknownNameError(f"unknown variant '{name}'; {listed}{needs}")


@dataclass(frozen=True)
class Cascade:
    """A cheap variant answers; rows whose top probability is below `threshold` escalate to `fallback`."""

    cheap: str
    threshold: float
    fallback: str = "ensemble"

    @classmethod
    def parse(cls, text: str) -> "Cascade | None":
        """`"distilled:0.9"` or `"distilled:0.9:ensemble"`; empty -> None."""
        if not text.strip():
            return None
        parts = text.split(":")
        try:
            c = cls(parts[0].strip(), float(parts[1]), parts[2].strip() if len(parts) > 2 else "ensemble")
        except (IndexError, ValueError):
            raise ConfigError(f"cascade: expected 'cheap_variant:threshold[:fallback]'; got '{text}'") from None
        return c.validated()

    def validated(self) -> "Cascade":
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"cascade: expected a threshold in [0, 1]; got {self.threshold}")
        if self.cheap == self.fallback:
            raise ConfigError(f"cascade: cheap and fallback variants must differ; got '{self.cheap}' twice")
        return self

    def to_dict(self) -> dict:
        return {"cheap": self.cheap, "threshold": self.threshold, "fallback": self.fallback}


@dataclass(frozen=True)
class RoutingPolicy:
    """Weights over variants (normalised), shadow variants, and an optional cascade.

    Replaced as a whole (one reference assignment) when an admin changes it: a request sees the
    old policy or the new one, never a mix.
    """

    weights: dict[str, float] = field(default_factory=lambda: {"ensemble": 1.0})
    shadow: tuple[str, ...] = ()
    cascade: Cascade | None = None

    def __post_init__(self):
        if not self.weights:
            raise ConfigError("routing weights: expected at least one variant; got none")
        bad = {k: v for k, v in self.weights.items() if not (v >= 0.0) or v == float("inf")}
        if bad:
            raise ConfigError(f"routing weights: expected finite non-negative numbers; got {bad}")
        total = sum(self.weights.values())
        if not math.isfinite(total) or total <= 0:
            raise ConfigError(f"routing weights: expected a positive total (finite); got {self.weights}")
        normalised = {k: v / total for k, v in sorted(self.weights.items())}
        object.__setattr__(self, "weights", normalised)
        if CASCADE in normalised and self.cascade is None:
            raise ConfigError("routing weights name 'cascade' but no cascade is configured (FUSION_CASCADE)")

    def check_against(self, available: set[str]) -> "RoutingPolicy":
        """Raise when a named variant is not served."""
        names = set(self.weights) - {CASCADE} | set(self.shadow)
        if self.cascade:
            names |= {self.cascade.cheap, self.cascade.fallback}
        missing = sorted(names - available)
        if missing:
            raise ConfigError(f"routing names variants {missing} that the bundle does not serve; it serves {sorted(available)} "
                              f"(and a weight on '{CASCADE}' routes to the cascade)")
        return self

    def choose(self, key: str | None, rng: random.Random | None = None) -> str:
        """The variant for a request: by stable hash of `key` when given, else at random."""
        u = stable_unit(key) if key else (rng or random).random()
        acc = 0.0
        items = [(k, w) for k, w in self.weights.items() if w > 0]
        for name, w in items:
            acc += w
            if u < acc:
                return name
        return items[-1][0]  # u within rounding of 1.0

    def to_dict(self) -> dict:
        return {
            "weights": dict(self.weights), "shadow": list(self.shadow),
            "cascade": self.cascade.to_dict() if self.cascade else None,
        }

    @classmethod
    def from_dict(cls, data: dict, current: "RoutingPolicy | None" = None) -> "RoutingPolicy":
        """From an admin request body; absent fields keep the current values. `request_id` is ignored, so that
        what `GET /admin/routing` answered posts back as it is."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object with weights/shadow/cascade; got {type(data).__name__}")
        unknown = sorted(set(data) - {"weights", "shadow", "cascade", "request_id"})
        if unknown:
            raise ConfigError(f"unexpected fields {unknown}; expected some of ['cascade', 'shadow', 'weights']")
        current = current or cls()
        weights = data.get("weights", current.weights)
        if isinstance(weights, str):
            weights = parse_weights(weights)
        if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights.values()):
            raise ConfigError(f"expected weights as an object of variant -> number; got {weights!r}")
        shadow = data.get("shadow", list(current.shadow))
        if not isinstance(shadow, list) or not all(isinstance(s, str) for s in shadow):
            raise ConfigError(f"expected shadow as a list of variant names; got {shadow!r}")
        cascade = current.cascade
        if "cascade" in data:
            c = data["cascade"]
            if c is None:
                cascade = None
            elif isinstance(c, dict) and set(c) <= {"cheap", "threshold", "fallback"} and "cheap" in c and "threshold" in c:
                try:
                    threshold = float(c["threshold"])
                except (TypeError, ValueError):
                    raise ConfigError(f"cascade: expected a number threshold; got {c['threshold']!r}") from None
                # validated() outside the try: its ConfigError is a ValueError and must keep its own message
                cascade = Cascade(str(c["cheap"]), threshold, str(c.get("fallback", "ensemble"))).validated()
            else:
                raise ConfigError(f"expected cascade as {{cheap, threshold[, fallback]}} or null; got {c!r}")
        return cls(weights=dict(weights), shadow=tuple(shadow), cascade=cascade)
