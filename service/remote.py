"""Remote members (issue 19): a member of the ensemble served by another OIP v2 server (another
fusion-serve, Triton, KServe), called by the front in members mode and combined like a local member.

One `RemoteMember` per member of the served bundle whose manifest entry has `remote` set:
- binary tensors both ways (the OIP binary-data extension: a JSON header whose length is in the
  `Inference-Header-Content-Length` header, then raw little-endian tensors): no float formatting;
- one pooled keep-alive `httpx.Client` per origin (scheme, host, port) for the whole process, so a hot
  swap keeps the warm connections;
- the member deadline (FUSION_MEMBER_DEADLINE_MS) bounds each call, retries included; a connection
  error (refused, reset, a stale keep-alive connection closed by the peer) is retried once if time is
  left: inference is idempotent. A timeout is never retried (the deadline is spent);
- a circuit breaker (`Breaker`): after `breaker_failures` consecutive failed calls the member is not
  called for `breaker_reset_s`; then one trial call goes through (half-open): success closes the
  breaker, failure opens it for another `breaker_reset_s`. While it is open a call fails at once, so a
  dead member costs the quorum nothing but its share (no connect timeouts per request);
- its answers are checked: the declared output (`output`: "logits" | "probabilities"; `output_name`:
  the OIP output to read, "probabilities" by default), shape (B, n_classes), finite values.

Before a member serves (at start-up and after every hot swap: service/bundles.py) `verify_members` runs
the bundle's probe rows through it and refuses a member whose answers differ from the bundle's record
(max |Δ| > PROBE_ATOL): a URL pointing at another model, or the same name with other weights. A member
that cannot be reached then is waited for (`startup_wait_s`); under `quorum:k` the front may start with
at least k verified members, and the others verify themselves on their first call that reaches them.
A member whose answers later carry another `model_version` (the member server was hot-swapped) is
verified again before its answer is used.

Settings (environment, read once at start by service/config.py through `RemoteConfig.from_env`):
  FUSION_MEMBER_URL_<NAME>         a member's URL, overriding the manifest's (NAME upper-cased, other
                                   characters than A-Z and 0-9 as `_`): the same bundle on one host or many
  FUSION_REMOTE_BREAKER_FAILURES   consecutive failures that open the breaker (default 5; 0: never opens)
  FUSION_REMOTE_BREAKER_RESET_S    seconds the breaker stays open before one trial call (default 5)
  FUSION_REMOTE_MAX_CONNECTIONS    pooled connections per member origin (default 32)
  FUSION_REMOTE_CONNECT_TIMEOUT_S  connect timeout, within the deadline (default 0.5)
  FUSION_REMOTE_STARTUP_WAIT_S     how long loading waits for an unreachable member (default 30)
  FUSION_REMOTE_TOKEN              bearer token sent to the members (default FUSION_INFERENCE_TOKEN: members
                                   that share the front's Secret accept the front; empty: none sent)
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from fusion.errors import BundleError, ConfigError, UnavailableError
from service.errors import DeadlineError
from service.metrics import REMOTE_BREAKER, REMOTE_ERRORS, REMOTE_LATENCY

log = logging.getLogger("fusion.service")

OUTPUTS = ("logits", "probabilities")
DEFAULT_OUTPUT_NAME = "probabilities"  # what a fusion-serve member answers (service/oip.py OUTPUT_PROBS)
PROBE_ATOL = 1e-4  # as service/runtime.check_probe: the member's answers against the bundle's record
# connection errors worth one retry: nothing (or nothing usable) came back, and inference is idempotent
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}  # the REMOTE_BREAKER gauge's values


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool = False, minimum: float = 0.0) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        value = None
    if value is None or not value >= minimum or value == float("inf"):
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{name}: expected {what} >= {minimum:g}; got {text!r:.40}")
    return value


@dataclass(frozen=True)
class RemoteConfig:
    """Settings of every remote member of a process (see the module docstring for the variables)."""

    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    max_connections: int = 32
    connect_timeout_s: float = 0.5
    startup_wait_s: float = 30.0
    token: str = field(default="", repr=False)
    member_urls: dict = field(default_factory=dict)  # FUSION_MEMBER_URL_<NAME> -> URL, as set

    VARIABLES = ("FUSION_REMOTE_BREAKER_FAILURES", "FUSION_REMOTE_BREAKER_RESET_S", "FUSION_REMOTE_MAX_CONNECTIONS",
                 "FUSION_REMOTE_CONNECT_TIMEOUT_S", "FUSION_REMOTE_STARTUP_WAIT_S", "FUSION_REMOTE_TOKEN")
    URL_PREFIX = "FUSION_MEMBER_URL_"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RemoteConfig":
        """The settings from an environment mapping (service/config.py passes the process's); a bad value is
        a ConfigError naming its variable."""
        d = cls
        return cls(
            breaker_failures=int(_number(env, "FUSION_REMOTE_BREAKER_FAILURES", d.breaker_failures, integer=True)),
            breaker_reset_s=_number(env, "FUSION_REMOTE_BREAKER_RESET_S", d.breaker_reset_s, minimum=0.001),
            max_connections=int(_number(env, "FUSION_REMOTE_MAX_CONNECTIONS", d.max_connections, integer=True, minimum=1)),
            connect_timeout_s=_number(env, "FUSION_REMOTE_CONNECT_TIMEOUT_S", d.connect_timeout_s, minimum=0.001),
            startup_wait_s=_number(env, "FUSION_REMOTE_STARTUP_WAIT_S", d.startup_wait_s),
            token=(env.get("FUSION_REMOTE_TOKEN") or env.get("FUSION_INFERENCE_TOKEN") or "").strip(),
            member_urls={k: v for k, v in env.items() if k.startswith(cls.URL_PREFIX) and v.strip()},
        )


def url_variable(name: str) -> str:
    """The environment variable that overrides member `name`'s URL: FUSION_MEMBER_URL_<NAME>."""
    return "FUSION_MEMBER_URL_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def member_url(name: str, declared: str, env: Mapping[str, str]) -> str:
    """Member `name`'s OIP model URL: FUSION_MEMBER_URL_<NAME> if set, else the manifest's; checked."""
    var = url_variable(name)
    url = env.get(var, "").strip() or declared
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:  # not a number, or past 65535
        port_ok = False
    # a path prefix (a gateway routing by path) and /versions/V are OIP; the request goes to URL + "/infer",
    # so no query or fragment; no credentials either: they would show in /info and errors (FUSION_REMOTE_TOKEN)
    if (parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment
            or "?" in url or "#" in url or parts.username is not None
            or not re.fullmatch(r"(/[^?#]*)?/v2/models/[^/]+(/versions/[^/]+)?", parts.path.rstrip("/"))):
        where = var if env.get(var, "").strip() else "the manifest's 'remote'"
        raise ConfigError(f"member '{name}': expected a URL http(s)://HOST:PORT[/PREFIX]/v2/models/NAME[/versions/V], without "
                          f"query, fragment or credentials ({where}); got {url!r:.120}")
    return url.rstrip("/")


class Breaker:
    """Consecutive-failure circuit breaker: closed -> (failures reach `threshold`) open -> (after
    `reset_s`) half-open, one trial call -> closed on success, open again on failure. `threshold` 0:
    never opens. `clock` is injectable for tests.

    `allow()` hands each admitted call a ticket (truthy; 0 when refused) to pass to `success`/`failure`:
    calls run concurrently, and the result of one admitted before the breaker last opened is stale and
    ignored (as open breakers usually do): a slow call answering late neither closes an open breaker
    before its reset period nor re-opens a half-open one, nor frees the one trial slot."""

    def __init__(self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None):
        self.threshold, self.reset_s, self.clock = threshold, reset_s, clock
        self.on_change = on_change or (lambda state: None)
        self.state = "closed"
        self.failures = 0  # consecutive
        self.opened_at = 0.0
        self.trial = False  # a half-open trial call is in flight
        self.epoch = 0  # times opened: a ticket is epoch + 1
        self._lock = threading.Lock()

    def allow(self) -> int:
        """A ticket if a call may go out now (in half-open state: only the one trial call), else 0."""
        with self._lock:
            if self.state == "closed":
                return self.epoch + 1
            if self.state == "open" and self.clock() - self.opened_at >= self.reset_s:
                self._set("half_open")
            if self.state == "half_open" and not self.trial:
                self.trial = True
                return self.epoch + 1
            return 0

    def retry_in_s(self) -> float:
        return max(0.0, self.reset_s - (self.clock() - self.opened_at)) if self.state == "open" else 0.0

    def _stale(self, ticket: int | None) -> bool:
        return ticket is not None and ticket != self.epoch + 1

    def success(self, ticket: int | None = None) -> None:
        with self._lock:
            if self._stale(ticket):
                return
            self.failures, self.trial = 0, False
            if self.state != "closed":
                self._set("closed")

    def failure(self, ticket: int | None = None) -> None:
        with self._lock:
            if self._stale(ticket):
                return
            self.failures += 1
            if self.state == "open":  # a call admitted in this epoch, before it opened: counted, no change
                return
            self.trial = False
            if self.state == "half_open" or (self.threshold > 0 and self.failures >= self.threshold):
                self.opened_at = self.clock()
                self.epoch += 1
                self._set("open")

    def _set(self, state: str) -> None:
        self.state = state
        self.on_change(state)


_CLIENTS: dict[tuple, httpx.Client] = {}  # (scheme, host, port) -> one pooled keep-alive client per process
_CLIENTS_LOCK = threading.Lock()


def client_for(url: str, cfg: RemoteConfig) -> httpx.Client:
    parts = urlsplit(url)
    key = (parts.scheme, parts.hostname, parts.port)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections)
            client = _CLIENTS[key] = httpx.Client(limits=limits, http2=False, follow_redirects=False)
        return client


class RemoteError(UnavailableError):
    """A remote member failed (unreachable, an error status, a malformed or mismatched answer)."""


class MismatchError(BundleError):
    """A remote member answered the probe rows differently from the bundle's record: it is refused."""


@dataclass
class Health:
    """What /info shows of a remote member (service/engine.describe)."""

    calls: int = 0
    errors: int = 0
    latency_ms: float = 0.0  # exponentially weighted mean of successful calls
    last_error: str = ""
    model_version: str = ""  # what the member reported when it was verified
    verified: bool = False


@dataclass
class RemoteMember:
    """One remote member: `member(X)` -> (B, C) as declared (`output`), within `deadline_s`."""

    name: str
    url: str
    output: str  # "logits" | "probabilities"
    output_name: str
    input_name: str
    n_classes: int  # 0: regression (any width)
    deadline_s: float
    cfg: RemoteConfig
    probe: tuple[np.ndarray, np.ndarray] | None = None  # (inputs, expected outputs) from the manifest
    clock: Callable[[], float] = time.monotonic
    health: Health = field(default_factory=Health)

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ConfigError(f"remote member '{self.name}': expected its output declared as one of {list(OUTPUTS)} "
                              f"(ModelEntry.output); got {self.output!r:.40}")
        self.client = client_for(self.url, self.cfg)
        self.breaker = Breaker(self.cfg.breaker_failures, self.cfg.breaker_reset_s, self.clock,
                               on_change=lambda s: REMOTE_BREAKER.labels(self.name).set(BREAKER_STATES[s]))
        REMOTE_BREAKER.labels(self.name).set(0)
        self._verify_lock = threading.Lock()

    # ---- one call ---------------------------------------------------------------------------------

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """X (B, F) float32 -> (B, C) float32 as the member declares it; raises RemoteError/DeadlineError."""
        deadline = self.clock() + self.deadline_s
        if not self.health.verified:
            self.verify(deadline)
        out, version = self._call(X, deadline)
        if version and self.health.model_version and version != self.health.model_version:
            # the member server now serves another version (hot-swapped): check it before its answer is used
            log.warning("remote member '%s' now answers as model version %s (verified %s): verifying again",
                        self.name, version, self.health.model_version)
            self.health.verified = False
            self.verify(deadline)
            out, _ = self._call(X, deadline)
        return out

    def _call(self, X: np.ndarray, deadline: float) -> tuple[np.ndarray, str]:
        ticket = self.breaker.allow()
        if not ticket:
            REMOTE_ERRORS.labels(self.name, "breaker_open").inc()
            raise RemoteError(f"remote member '{self.name}': circuit breaker open after {self.breaker.failures} consecutive "
                              f"failures (last: {self.health.last_error:.160}); next trial call in {self.breaker.retry_in_s():.1f} s")
        t0 = self.clock()
        self.health.calls += 1
        try:
            out, version = self._send(X, deadline)
        except Exception as exc:
            self.breaker.failure(ticket)
            self.health.errors += 1
            self.health.last_error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        self.breaker.success(ticket)
        ms = (self.clock() - t0) * 1e3
        REMOTE_LATENCY.labels(self.name).observe(ms / 1e3)
        h = self.health
        h.latency_ms = ms if h.calls <= 1 or h.latency_ms == 0 else h.latency_ms + 0.2 * (ms - h.latency_ms)
        return out, version

    def _send(self, X: np.ndarray, deadline: float) -> tuple[np.ndarray, str]:
        X = np.ascontiguousarray(X, dtype="<f4")
        blob = X.tobytes()
        head = orjson.dumps({
            "inputs": [{"name": self.input_name, "shape": list(X.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(blob)}}],
            "outputs": [{"name": self.output_name, "parameters": {"binary_data": True}}],
        })
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        for attempt in (0, 1):
            left = deadline - self.clock()
            if left <= 0:
                REMOTE_ERRORS.labels(self.name, "deadline").inc()
                raise DeadlineError(f"remote member '{self.name}': no answer within the {self.deadline_s * 1e3:.0f} ms deadline")
            timeout = httpx.Timeout(left, connect=min(left, self.cfg.connect_timeout_s))
            try:
                response = self.client.post(self.url + "/infer", content=head + blob, headers=headers, timeout=timeout)
                break
            except RETRYABLE as exc:  # before TimeoutException: a connect timeout is a connection error, retried
                REMOTE_ERRORS.labels(self.name, "connection").inc()
                if attempt == 1:
                    raise RemoteError(f"remote member '{self.name}' at {self.url}: {type(exc).__name__}: {exc} (retried once)") from None
            except httpx.TimeoutException:  # the request went out and no answer came: the deadline is spent
                REMOTE_ERRORS.labels(self.name, "deadline").inc()
                raise DeadlineError(f"remote member '{self.name}': no answer within the {self.deadline_s * 1e3:.0f} ms deadline") from None
            except httpx.HTTPError as exc:
                REMOTE_ERRORS.labels(self.name, "connection").inc()
                raise RemoteError(f"remote member '{self.name}' at {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            REMOTE_ERRORS.labels(self.name, "status").inc()
            raise RemoteError(f"remote member '{self.name}' answered HTTP {response.status_code}; expected 200: "
                              f"{response.text[:200]}")
        try:
            return self._parse(response, len(X))
        except RemoteError:
            REMOTE_ERRORS.labels(self.name, "answer").inc()
            raise

    def _parse(self, response: httpx.Response, rows: int) -> tuple[np.ndarray, str]:
        body = response.content
        length = response.headers.get("inference-header-content-length")
        try:
            n = int(length) if length is not None else len(body)
            head = orjson.loads(body[:n])
            outputs = {o["name"]: o for o in head["outputs"]}
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as exc:
            raise RemoteError(f"remote member '{self.name}': expected an OIP inference response; got {type(exc).__name__}: {exc}"[:300]) from None
        o = outputs.get(self.output_name)
        if o is None:
            raise RemoteError(f"remote member '{self.name}': expected output '{self.output_name}'; it answered {sorted(outputs)}")
        shape = o.get("shape")
        size = (o.get("parameters") or {}).get("binary_data_size")
        dtypes = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}
        if o.get("datatype") not in dtypes or not isinstance(shape, list):
            raise RemoteError(f"remote member '{self.name}': expected a floating-point output '{self.output_name}'; "
                              f"got datatype {o.get('datatype')!r:.20} shape {shape!r:.40}")
        if size is not None:
            try:  # a size that is no integer, or bytes that are no whole number of values: a malformed answer
                offset = n + sum(int((p.get("parameters") or {}).get("binary_data_size", 0))
                                 for p in head["outputs"][:head["outputs"].index(o)])
                if type(size) is not int or size < 0:
                    raise TypeError(f"binary_data_size {size!r:.20}")
                out = np.frombuffer(body[offset:offset + size], dtype=dtypes[o["datatype"]])
            except (ValueError, TypeError, AttributeError) as exc:
                raise RemoteError(f"remote member '{self.name}': expected binary output '{self.output_name}' of "
                                  f"binary_data_size bytes; got {type(exc).__name__}: {exc}"[:300]) from None
        else:
            try:
                out = np.asarray(o.get("data"), dtype=np.float64)
            except (ValueError, TypeError):
                raise RemoteError(f"remote member '{self.name}': expected numbers in output '{self.output_name}'") from None
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # past float32's range: inf, refused below
                out = out.astype(np.float32).reshape(shape)
        except (ValueError, TypeError):
            raise RemoteError(f"remote member '{self.name}': {out.size} values do not fill shape {shape!r:.60}") from None
        out = out.reshape(len(out), -1) if out.ndim > 1 else out.reshape(-1, 1)
        if out.shape[0] != rows or (self.n_classes and out.shape[1] != self.n_classes):
            want = f"({rows}, {self.n_classes})" if self.n_classes else f"({rows}, ...)"
            raise RemoteError(f"remote member '{self.name}': expected output shape {want} (the bundle's classes); got {out.shape}")
        if not np.isfinite(out).all():
            raise RemoteError(f"remote member '{self.name}': answered non-finite values")
        return out, str(head.get("model_version", ""))

    # ---- verification against the bundle's probe rows ---------------------------------------------

    def verify(self, deadline: float | None = None) -> None:
        """Run the probe rows and compare with the bundle's record; MismatchError if they differ,
        RemoteError/DeadlineError if the member cannot answer (then it stays unverified)."""
        # a call waiting for another call's verification (which may spend a whole deadline on a hung member)
        # waits within its own deadline, not behind every call queued ahead of it
        wait = -1 if deadline is None else max(0.0, deadline - self.clock())
        if not self._verify_lock.acquire(timeout=wait):
            REMOTE_ERRORS.labels(self.name, "deadline").inc()
            raise DeadlineError(f"remote member '{self.name}': no answer within the {self.deadline_s * 1e3:.0f} ms deadline "
                                f"(waiting for its check against the probe rows)")
        try:
            self._verify(deadline)
        finally:
            self._verify_lock.release()

    def _verify(self, deadline: float | None) -> None:
        if self.health.verified:
            return
        if self.probe is None:  # a bundle without probe rows: nothing to check against
            self.health.verified = True
            return
        X, expected = self.probe
        got, version = self._call(X, deadline if deadline is not None else self.clock() + max(self.deadline_s, 5.0))
        if got.shape != expected.shape:
            REMOTE_ERRORS.labels(self.name, "mismatch").inc()
            raise MismatchError(f"remote member '{self.name}' at {self.url} answered the probe rows with shape {got.shape}; "
                                f"the bundle recorded {expected.shape}: refused (is it serving another model?)")
        diff = float(np.abs(got - expected).max())
        if not diff <= PROBE_ATOL:
            REMOTE_ERRORS.labels(self.name, "mismatch").inc()
            raise MismatchError(f"remote member '{self.name}' at {self.url} answers differently from the bundle's record: "
                                f"max |Δ| = {diff:.3g} on the probe rows > {PROBE_ATOL}: refused (is it serving another "
                                f"model, or other weights?)")
        self.health.verified, self.health.model_version = True, version

    def status(self) -> dict:
        """/info: URL, health, latency, errors and breaker state."""
        h, b = self.health, self.breaker
        # down: the breaker is not closed; failing: closed, but the last calls failed; unverified: never answered the probe
        health = ("down" if b.state != "closed" else "unverified" if not h.verified else "failing" if b.failures else "up")
        return {"url": self.url, "output": self.output, "health": health,
                "breaker": self.breaker.state, "consecutive_failures": self.breaker.failures, "calls": h.calls,
                "errors": h.errors, "latency_ms": round(h.latency_ms, 3), "last_error": h.last_error,
                "model_version": h.model_version}


def remote_members(manifest, deadline_s: float, cfg: RemoteConfig) -> dict[str, RemoteMember]:
    """A RemoteMember for every member of the manifest's ensemble that is remote ({} when none)."""
    ens = manifest.variants.get("ensemble")
    if ens is None:
        return {}
    probe = manifest.probe or None
    if manifest.inputs:
        remote = [n for n in ens.members if manifest.members.get(n) is not None and manifest.members[n].remote]
        if remote:
            raise ConfigError(f"remote members {remote}: the flat feature input is supported; this bundle has named inputs")
    out = {}
    for name in ens.members:
        entry = manifest.members.get(name)
        if entry is None or not entry.remote:
            continue
        rows = None
        if probe and name in probe.get("outputs", {}):
            rows = (np.asarray(probe["inputs"], dtype=np.float32), np.asarray(probe["outputs"][name], dtype=np.float32))
        out[name] = RemoteMember(
            name, member_url(name, entry.remote, cfg.member_urls), entry.output, entry.output_name or DEFAULT_OUTPUT_NAME,
            manifest.input.name, len(manifest.classes) if manifest.task == "classification" else 0,
            deadline_s, cfg, rows)
    return out


def verify_members(remotes: dict[str, RemoteMember], quorum: int | None, n_members: int, cfg: RemoteConfig,
                   clock: Callable[[], float] = time.monotonic) -> None:
    """Verify every remote member against the probe rows before the bundle serves.

    A member that answers differently is refused at once (MismatchError: the bundle is not loaded). One that
    cannot be reached is retried for up to `cfg.startup_wait_s` (members start beside the front); past that,
    under `strict` the bundle is refused, under `quorum:k` it loads when at least k members (local members
    count as verified by the bundle's own probe check) are verified, and the others verify on first contact."""
    give_up = clock() + cfg.startup_wait_s
    pending = dict(remotes)
    while True:
        for name, member in list(pending.items()):
            try:
                member.verify()
                pending.pop(name)
            except MismatchError:
                raise
            except Exception as exc:  # noqa: BLE001 - unreachable or failing: maybe not up yet
                member.health.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if not pending or clock() >= give_up:
            break
        time.sleep(min(0.5, max(0.0, give_up - clock())))
    if not pending:
        return
    verified = n_members - len(pending)
    why = "; ".join(f"'{n}' ({m.url}): {m.health.last_error}" for n, m in sorted(pending.items()))
    if quorum is None or verified < quorum:
        need = "every member (policy strict)" if quorum is None else f"{quorum} (quorum:{quorum})"
        raise UnavailableError(f"remote members could not be verified within {cfg.startup_wait_s:g} s "
                               f"(FUSION_REMOTE_STARTUP_WAIT_S): {verified} of {n_members} verified, needs {need}; {why}"[:1200])
    log.warning("starting with %d of %d members verified (quorum:%d); not yet verified: %s", verified, n_members, quorum, why)
