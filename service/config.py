"""Every setting of the service, read once from the environment and passed down.

The only module under service/ that reads the process environment (issue 14; tests/test_config.py checks it):
`load()` parses and validates every variable once and returns a frozen `ServiceConfig`; the
service's construction hands each part to the object that needs it (the engine, the runtime, the
bundle check, the token checks, admission and drain). A bad value is refused here, naming the
variable, what was expected and what was got, before anything is loaded or served.

service/app.py calls `load()` once, at import (`app.CONFIG`): `@bentoml.service(...)` needs the
workers, timeout, tracing and access-log settings when the class is defined. `python -m
service.serve` (make serve) and the bundle check's child process (`python -m service.preflight`)
are processes of their own and call `load()` once each.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from fusion.bundle import MAX_MANIFEST_BYTES
from fusion.errors import ConfigError
from fusion.sequential import NonInferiority
from service.auth import Tokens
from service.inputs import Limits as InputLimits
from service.preflight import LoadLimits, default_memory_mb
from service.remote import RemoteConfig
from service.rollout import RolloutLimits, RolloutPlan
from service.routing import Cascade, RoutingPolicy, parse_weights
from service.runtime import RuntimeConfig
from service.tuning import AUTO


@dataclass(frozen=True)
class EngineConfig:
    bundle: str = "artifacts/bundle"
    failure_policy: str = "strict"
    member_deadline_ms: float = 1000.0
    shadow_queue: int = 64  # shadow runs waiting beyond this are dropped (and counted), never queued forever
    # adaptive batching of concurrent requests per model, up to this many rows a call; 0 = off; AUTO (the
    # default, FUSION_BATCH_MAX_ROWS=auto): on, AUTO_BATCH_ROWS, for models whose batch-1 call is costly (service/tuning.py)
    batch_max_rows: int = AUTO
    batch_instances: int = 2  # calls of one model the batcher may run at once (Triton: model instances)
    bundle_root: str = ""  # hot swaps load bundles below this directory only; "" = the served bundle's parent
    # the shared A/B store (service/abstore.py): "memory" keeps per-process figures (in-process tests);
    # config.load() makes the default "sqlite:" (<state dir>/ab.db)
    ab_store: str = "memory"
    state_dir: str = ""  # FUSION_STATE_DIR; "" = `.fusion-state` in the bundle root (state_path())
    ab_retention_days: float = 30.0  # 0 = keep every observation
    ab_queue: int = 10_000
    ab_feedback_wait_ms: float = 1000.0
    ab_spool_max_mb: float = 64.0
    # the A/B verdict's rule (fusion/sequential.py): FUSION_AB_MARGIN_PP, FUSION_AB_AGREEMENT_MARGIN, FUSION_AB_ALPHA
    ab_test: NonInferiority = NonInferiority()

    def root(self) -> Path:
        """The directory hot swaps are confined to, links resolved: FUSION_BUNDLE_ROOT, or by default
        the directory that holds the served bundle (its versions' siblings), never "anywhere". A
        world-writable parent (a bundle served from /tmp) is no confinement: then only the bundle's
        own directory, until FUSION_BUNDLE_ROOT says otherwise."""
        if self.bundle_root:
            return Path(self.bundle_root).resolve()
        parent = Path(self.bundle).absolute().parent.resolve()
        try:
            shared = parent.stat().st_mode & stat.S_IWOTH
        except OSError:  # no such directory yet: nothing can be swapped in from it either
            shared = False
        return Path(self.bundle).resolve() if shared else parent

    def state_path(self) -> Path:
        """Where the service keeps its state (the default SQLite A/B store, its spool): FUSION_STATE_DIR,
        else `.fusion-state/` in the bundle root, beside the bundles it counts."""
        return Path(self.state_dir).expanduser() if self.state_dir else self.root() / ".fusion-state"

    def ab_store_config(self):
        """The A/B store's settings (service/abstore.py's StoreConfig)."""
        from service.abstore import StoreConfig

        return StoreConfig(url=self.ab_store, state_dir=str(self.state_path()), retention_days=self.ab_retention_days,
                           queue=self.ab_queue, feedback_wait_ms=self.ab_feedback_wait_ms, spool_max_mb=self.ab_spool_max_mb)


@dataclass(frozen=True)
class Settings:
    """The HTTP layer's settings (service/app.py): limits on requests, workers, timeout, tracing, logging."""

    max_rows: int = 1024
    max_body_bytes: int = 8 << 20
    max_small_body_bytes: int = 64 << 10  # /feedback and /admin/* bodies: a request id and labels, a path, a policy
    body_timeout_s: float = 5.0  # the whole body must arrive within this (408 otherwise; service/traffic.py)
    workers: int = 1
    timeout_s: float = 30.0
    max_concurrency: int = 64  # per service, split over the workers (service/traffic.py); 0 = no limit
    tracing: bool = False  # OpenTelemetry spans on the inference paths (BentoML's middleware: 2-3x the floor)
    access_log: bool = True  # BentoML's one INFO line per request
    log_level: str = "INFO"  # the "fusion" loggers' level (BentoML leaves the root at WARNING)
    drain_s: float = 0.0  # on SIGTERM, readiness is 503 for at least this long... (service/traffic.py)
    drain_max_s: float = 30.0  # ...and in-flight requests get at most this long to finish
    # named-input bundles (service/inputs.py): an image's pixels, read from its header before it is decoded
    # (a 16-megapixel PNG decodes to 48 MB of RGB), and a text input's characters per string
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 10_000
    # all the images of one request together (or its rows at the graph's own size, if more): ~1 s of decoding
    max_request_pixels: int = 4 * 4096 * 4096

    def input_limits(self) -> InputLimits:
        """The per-request bounds on named inputs (service/inputs.py)."""
        return InputLimits(self.max_rows, self.max_image_pixels, self.max_text_chars, self.max_request_pixels)


@dataclass(frozen=True)
class ServeSettings:
    """What `python -m service.serve` (make serve) needs besides the service's own settings: BentoML's
    default bind address (BENTOML_HOST/BENTOML_PORT, which `bentoml serve` reads too)."""

    host: str = "0.0.0.0"
    port: int = 3000


@dataclass(frozen=True)
class RolloutConfig:
    """Progressive rollout (service/rollout.py): the plan (None: no rollout), its guardrails and pace. Its
    state lives in the shared A/B store (FUSION_AB_STORE), or in the process with FUSION_AB_STORE=memory."""

    plan: RolloutPlan | None = None
    limits: RolloutLimits = field(default_factory=RolloutLimits)


@dataclass(frozen=True)
class ServiceConfig:
    http: Settings = field(default_factory=Settings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    load_limits: LoadLimits = field(default_factory=LoadLimits)
    tokens: Tokens = field(default_factory=Tokens)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)  # the initial policy; /admin/routing changes it
    rollout: "RolloutConfig" = field(default_factory=lambda: RolloutConfig())
    serve: ServeSettings = field(default_factory=ServeSettings)
    remote: RemoteConfig = field(default_factory=RemoteConfig)  # remote members (issue 19): service/remote.py


# ---- parsing: each reader names the variable, what it expects and what it got ------------------------

# Upper bounds: a value past these overflows what it is handed to (threading timeouts, setrlimit,
# datetime) and used to surface as a 500 or a refused bundle long after start (review of issue 14).
MAX_INT = 2**31 - 1
MAX_FLOAT = 1e9
DAY_S = 86_400.0


class _Reader:
    """Reads variables from one mapping and records their names (tests/test_config.py compares them
    with the documented ones)."""

    def __init__(self, env: Mapping[str, str]):
        self.env, self.names = env, set()

    def text(self, name: str, default: str = "") -> str:
        self.names.add(name)
        value = self.env.get(name)
        return default if value is None else value

    def _raw(self, name: str) -> str | None:
        text = self.text(name).strip()
        return text or None

    def int(self, name: str, default: int, minimum: int = 0, what: str = "a non-negative integer",
            maximum: int = MAX_INT) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise ConfigError(f"{name}: expected {what}; got {raw!r:.60}")
        if value > maximum:
            raise ConfigError(f"{name}: expected {what}, at most {maximum}; got {raw!r:.60}")
        return value

    def float(self, name: str, default: float, minimum: float = 0.0, strict: bool = False,
              what: str = "a non-negative number", maximum: float = MAX_FLOAT) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value <= minimum):
            raise ConfigError(f"{name}: expected {what}; got {raw!r:.60}")
        if value > maximum:
            raise ConfigError(f"{name}: expected {what}, at most {maximum:g}; got {raw!r:.60}")
        return value

    def int_or_auto(self, name: str, default: int, minimum: int, what: str) -> int:
        """An integer as `int`, or "auto" (any case) as AUTO (service/tuning.py)."""
        raw = self._raw(name)
        if raw is not None and raw.lower() == "auto":
            return AUTO
        return self.int(name, default, minimum, f"'auto' or {what}")

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected 1 or 0 (true/false, yes/no, on/off); got {raw!r:.60}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}; got {raw!r:.60}")
        return raw.lower()

    def items(self, name: str) -> frozenset[str]:
        """A comma-separated list, lower-cased, trailing slashes dropped (hosts, origins)."""
        return frozenset(p.strip().lower().rstrip("/") for p in self.text(name).split(",") if p.strip())

    def parsed(self, name: str, parse, default: str = ""):
        """`parse(text)` of the variable; its ConfigError/ValueError reworded to name the variable."""
        raw = self.text(name, default)
        try:
            return parse(raw)
        except (ConfigError, ValueError) as exc:
            text = str(exc) if "got" in str(exc) else f"{exc}; got {raw!r:.80}"
            raise ConfigError(f"{name}: {text}") from None


_POLICY = re.compile(r"^(strict|quorum:[1-9][0-9]*)$")
_GPU_IDS = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*,?\s*$")


def _http(r: _Reader) -> Settings:
    d = Settings
    level = r.text("FUSION_LOG_LEVEL", d.log_level).strip().upper() or d.log_level
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"FUSION_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL; got {level!r:.60}")
    return Settings(
        max_rows=r.int("FUSION_MAX_ROWS", d.max_rows, 1, "a positive integer"),
        max_body_bytes=r.int("FUSION_MAX_BODY_BYTES", d.max_body_bytes, 1, "a positive integer (bytes)"),
        max_image_pixels=r.int("FUSION_MAX_IMAGE_PIXELS", d.max_image_pixels, 1, "a positive integer (width x height)"),
        max_text_chars=r.int("FUSION_MAX_TEXT_CHARS", d.max_text_chars, 1, "a positive integer (characters)"),
        max_request_pixels=r.int("FUSION_MAX_REQUEST_PIXELS", d.max_request_pixels, 1, "a positive integer (pixels)"),
        max_small_body_bytes=r.int("FUSION_MAX_SMALL_BODY_BYTES", d.max_small_body_bytes, 1, "a positive integer (bytes)"),
        body_timeout_s=r.float("FUSION_BODY_TIMEOUT_S", d.body_timeout_s, strict=True, what="a positive number of seconds",
                               maximum=DAY_S),
        workers=r.int("FUSION_WORKERS", d.workers, 1, "a positive integer", maximum=256),
        timeout_s=r.float("FUSION_TIMEOUT_S", d.timeout_s, strict=True, what="a positive number of seconds", maximum=DAY_S),
        max_concurrency=r.int("FUSION_MAX_CONCURRENCY", d.max_concurrency, 0, "a non-negative integer (0: no limit)"),
        tracing=r.flag("FUSION_TRACING", d.tracing),
        access_log=r.flag("FUSION_ACCESS_LOG", d.access_log),
        log_level=level,
        drain_s=r.float("FUSION_DRAIN_S", d.drain_s, what="a non-negative number of seconds", maximum=DAY_S),
        drain_max_s=r.float("FUSION_DRAIN_MAX_S", d.drain_max_s, what="a non-negative number of seconds", maximum=DAY_S),
    )


def _engine(r: _Reader) -> EngineConfig:
    d = EngineConfig
    policy = r.text("FUSION_FAILURE_POLICY", d.failure_policy).strip() or d.failure_policy
    if not _POLICY.match(policy):
        raise ConfigError(f"FUSION_FAILURE_POLICY: expected 'strict' or 'quorum:k' with k >= 1; got {policy!r:.60}")
    return EngineConfig(
        bundle=r.text("FUSION_BUNDLE", d.bundle).strip() or d.bundle,
        failure_policy=policy,
        member_deadline_ms=r.float("FUSION_MEMBER_DEADLINE_MS", d.member_deadline_ms, strict=True,
                                   what="a positive number of milliseconds", maximum=DAY_S * 1e3),
        shadow_queue=r.int("FUSION_SHADOW_QUEUE", d.shadow_queue, 0, "a non-negative integer"),
        batch_max_rows=r.int_or_auto("FUSION_BATCH_MAX_ROWS", d.batch_max_rows, 0, "a non-negative integer (0: no batching)"),
        batch_instances=r.int("FUSION_BATCH_INSTANCES", d.batch_instances, 1, "a positive integer"),
        bundle_root=r.text("FUSION_BUNDLE_ROOT").strip(),
        ab_store=r.parsed("FUSION_AB_STORE", _ab_store, "sqlite:"),
        state_dir=r.text("FUSION_STATE_DIR").strip(),
        ab_retention_days=r.float("FUSION_AB_RETENTION_DAYS", d.ab_retention_days,
                                  what="a non-negative number of days (0: keep everything)"),
        ab_queue=r.int("FUSION_AB_QUEUE", d.ab_queue, 1, "a positive integer"),
        ab_feedback_wait_ms=r.float("FUSION_AB_FEEDBACK_WAIT_MS", d.ab_feedback_wait_ms,
                                    what="a non-negative number of milliseconds"),
        ab_spool_max_mb=r.float("FUSION_AB_SPOOL_MAX_MB", d.ab_spool_max_mb, what="a non-negative number of MB"),
        ab_test=_ab_test(r),
    )


def _ab_store(text: str) -> str:
    """FUSION_AB_STORE, checked: sqlite:///path, postgresql://..., or memory (service/abstore.py)."""
    from service.abstore import StoreURL

    StoreURL.parse(text)
    return text.strip() or "sqlite:"


def _ab_test(r: _Reader) -> NonInferiority:
    """The A/B verdict's non-inferiority rule (fusion/sequential.py; docs/AB.md § Statistics)."""
    d = NonInferiority
    checks = (("FUSION_AB_MARGIN_PP", d.margin_pp, 100.0, "a number of percentage points in (0, 100)"),
              ("FUSION_AB_AGREEMENT_MARGIN", d.agreement_margin, 1.0, "a fraction in (0, 1)"),
              ("FUSION_AB_ALPHA", d.alpha, 0.5, "a probability in (0, 0.5]"))
    values = []
    for name, default, top, what in checks:
        value = r.float(name, default, strict=True, what=what)
        if value > top or (value == top and name != "FUSION_AB_ALPHA"):
            raise ConfigError(f"{name}: expected {what}; got {r.text(name).strip()!r:.60}")
        values.append(value)
    return NonInferiority(*values)


def _runtime(r: _Reader, timeout_s: float, workers: int = 1) -> RuntimeConfig:
    d = RuntimeConfig
    gpus = r.text("FUSION_GPU_IDS").strip()
    if gpus and not _GPU_IDS.match(gpus):
        raise ConfigError(f"FUSION_GPU_IDS: expected comma-separated GPU indices (e.g. 0,1); got {gpus!r:.60}")
    return RuntimeConfig(
        # auto by default: 1 for a cheap model (at batch 1 a second thread costs more in wake-ups than it saves,
        # and p99 suffers when the cores are shared with HTTP handling), every core of this worker for a
        # model whose batch-1 call is costly (service/tuning.py; docs/BENCHMARKS.md)
        intra_op_threads=r.int_or_auto("FUSION_INTRA_OP_THREADS", d.intra_op_threads, 1, "a positive integer"),
        processes=workers,
        member_threads=r.int("FUSION_MEMBER_THREADS", d.member_threads, 1, "a positive integer"),
        device=r.choice("FUSION_DEVICE", d.device, ("auto", "cpu", "cuda")),
        gpu_ids=tuple(int(g) for g in gpus.split(",") if g.strip()),
        cuda_tf32=r.flag("FUSION_CUDA_TF32", d.cuda_tf32),
        max_manifest_bytes=r.int("FUSION_MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES, 1, "a positive integer (bytes)"),
        # a run the client stopped waiting for (FUSION_TIMEOUT_S -> 504) is not worth finishing
        run_timeout_s=r.float("FUSION_RUN_TIMEOUT_S", timeout_s, minimum=-math.inf,
                              what="a number of seconds (<= 0: no limit)", maximum=DAY_S),
        inline_budget_s=r.float("FUSION_INLINE_BUDGET_MS", d.inline_budget_s * 1e3,
                                what="a non-negative number of milliseconds") / 1e3,
    )


def _load_limits(r: _Reader, env: Mapping[str, str]) -> LoadLimits:
    timeout = r.float("FUSION_LOAD_TIMEOUT_S", LoadLimits.timeout_s, strict=True, what="a positive number of seconds",
                      maximum=DAY_S)
    memory = r.int("FUSION_LOAD_MAX_MEMORY_MB", -1, 0, "a non-negative integer of MB (0: no limit)", maximum=2**40)
    # the check's child process starts with this environment, less the metrics directory (service/preflight.py)
    child_env = tuple(sorted((k, v) for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"))
    scale = LoadLimits.s_per_gb if r._raw("FUSION_LOAD_TIMEOUT_S") is None else 0.0  # set: the whole budget
    return LoadLimits(timeout, default_memory_mb() if memory < 0 else memory, scale, child_env=child_env)


def _tokens(r: _Reader) -> Tokens:
    return Tokens(
        r.text("FUSION_INFERENCE_TOKEN"), r.text("FUSION_ADMIN_TOKEN"),
        admin_loopback=r.flag("FUSION_ADMIN_LOOPBACK", True),
        allowed_hosts=r.items("FUSION_ALLOWED_HOSTS"),
        allowed_origins=r.items("FUSION_ALLOWED_ORIGINS"),
    )


def _routing(r: _Reader) -> RoutingPolicy:
    weights = r.parsed("FUSION_AB_WEIGHTS", lambda t: parse_weights(t.strip() or "ensemble=1"))
    shadow = tuple(s.strip() for s in r.text("FUSION_SHADOW").split(",") if s.strip())
    return RoutingPolicy(weights=weights, shadow=shadow, cascade=r.parsed("FUSION_CASCADE", Cascade.parse))


def _rollout(r: _Reader) -> RolloutConfig:
    d = RolloutLimits
    limits = RolloutLimits(
        max_error_rate=r.float("FUSION_ROLLOUT_MAX_ERROR_RATE", d.max_error_rate, what="a fraction in [0, 1]"),
        max_p99_ratio=r.float("FUSION_ROLLOUT_MAX_P99_RATIO", d.max_p99_ratio, what="a non-negative ratio (0: no latency guardrail)"),
        min_stage_s=r.float("FUSION_ROLLOUT_MIN_STAGE_S", d.min_stage_s, what="a non-negative number of seconds"),
        min_stage_requests=r.int("FUSION_ROLLOUT_MIN_STAGE_REQUESTS", d.min_stage_requests, 1, "a positive integer"),
        period_s=r.float("FUSION_ROLLOUT_PERIOD_S", d.period_s, strict=True, what="a positive number of seconds"),
    )
    if limits.max_error_rate > 1:
        raise ConfigError(f"FUSION_ROLLOUT_MAX_ERROR_RATE: expected a fraction in [0, 1]; got {limits.max_error_rate:g}")
    return RolloutConfig(plan=r.parsed("FUSION_ROLLOUT", RolloutPlan.parse), limits=limits)


def _remote(r: _Reader) -> RemoteConfig:
    """Remote members' settings (service/remote.py parses them), and every FUSION_MEMBER_URL_<NAME> set."""
    r.names.update(RemoteConfig.VARIABLES)
    return RemoteConfig.from_env(r.env)


def _serve(r: _Reader) -> ServeSettings:
    return ServeSettings(host=r.text("BENTOML_HOST").strip() or ServeSettings.host,
                         port=r.int("BENTOML_PORT", ServeSettings.port, 1, "a TCP port (1-65535)", maximum=65535))


def read(env: Mapping[str, str]) -> tuple[ServiceConfig, frozenset[str]]:
    """`load(env)` and the names of every variable it read (for tests/test_config.py)."""
    r = _Reader(env)
    http = _http(r)
    engine = _engine(r)
    # FUSION_BATCH_MAX_ROWS=auto: the runtime times costly models at batch 1..32 when it loads them
    runtime = replace(_runtime(r, http.timeout_s, http.workers), batch_curve=engine.batch_max_rows == AUTO)
    cfg = ServiceConfig(http=http, engine=engine, runtime=runtime,
                        load_limits=_load_limits(r, env), tokens=_tokens(r), routing=_routing(r), serve=_serve(r),
                        rollout=_rollout(r), remote=_remote(r))
    if not 0 < cfg.serve.port < 65536:
        raise ConfigError(f"BENTOML_PORT: expected a TCP port (1-65535); got {cfg.serve.port}")
    return cfg, frozenset(r.names)


def load(env: Mapping[str, str] = os.environ) -> ServiceConfig:
    """Every setting, parsed and validated once; a bad value raises ConfigError naming its variable."""
    return read(env)[0]
