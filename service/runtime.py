"""onnxruntime sessions for a verified bundle: providers, device placement, thread settings."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from fusion.bundle import MAX_MANIFEST_BYTES, Bundle, Manifest, read_bundle
from fusion.errors import BundleError, InputError, UnavailableError
from service.inputs import Inputs, n_rows
from service.onnx_check import check_model
from service.tuning import AUTO, AUTO_BATCH_ROWS, COSTLY_S, CURVE_BUDGET_S, CURVE_ROWS, Decision, available_cores, choose_batch_rows, decide

log = logging.getLogger("fusion.service")


@dataclass(frozen=True)
class RuntimeConfig:
    """Thread and device settings; every default is explicit (onnxruntime would take all cores per session)."""

    # AUTO (FUSION_INTRA_OP_THREADS=auto): 1 for a cheap variant, every core for a costly one (service/tuning.py)
    intra_op_threads: int = AUTO
    member_threads: int = 1  # per-member sessions never get more: N pools on shared cores blow up p99
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    gpu_ids: tuple[int, ...] = ()
    max_manifest_bytes: int = MAX_MANIFEST_BYTES  # a larger manifest.json is refused before it is parsed
    run_timeout_s: float = 30.0  # one onnxruntime run past this is stopped (RunDeadline); <= 0: never
    inline_budget_s: float = 0.5e-3  # a small call may run on the event loop if expected to take at most this (CallCost)
    cuda_tf32: bool = False  # TF32 matmuls/convolutions on the CUDA provider: faster, not float32 (providers_for)
    processes: int = 1  # worker processes sharing the cores (FUSION_WORKERS): auto threads divide them
    # FUSION_BATCH_MAX_ROWS=auto: time a costly model at batch 1..32 at load (tuning.choose_batch_rows)
    batch_curve: bool = True

    def use_cuda(self) -> bool:
        if self.device == "cpu":
            return False
        available = "CUDAExecutionProvider" in ort.get_available_providers()
        if self.device == "cuda" and not available:
            raise UnavailableError("FUSION_DEVICE=cuda but onnxruntime has no CUDAExecutionProvider")
        return available


def providers_for(cfg: RuntimeConfig, device_id: int | None) -> list:
    if device_id is not None and cfg.use_cuda():
        # onnxruntime's CUDA provider multiplies in TF32 by default on Ampere and later. On an H200 that
        # moved a synthetic MLP ensemble's probabilities by 2e-3 from the CPU's (bench/gpu_check.py) and
        # an image ensemble's by 2.5e-5 while halving its batch-32 time (bench/gpu_models.py). The
        # bundle's parity gate was passed in float32, so float32 is the default; FUSION_CUDA_TF32=1 opts in.
        return [("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": "1" if cfg.cuda_tf32 else "0"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model: bytes, threads: int, providers: list, spinning: bool = True) -> ort.InferenceSession:
    """A session over already-verified bytes (parsed exactly as they were hashed). `spinning=False`: the
    intra-op pool's threads sleep between kernels and calls instead of spinning (auto threads, below).

    One session runs its graph sequentially: the fused graph's members are independent subgraphs, but
    ORT_PARALLEL (inter-op threads 3 x intra-op 1) took 1.04x (image) and 2.1x (text) the batch-1 time
    of one thread on 2 shared cores, where 2 intra-op threads without spinning took 0.64-1.14x (image)
    and 0.41-1.04x (text): less the busier the other core was (issue 18's ensembles, in-process,
    interleaved rounds, 1-minute load average 3.4-10 from other processes)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # always parse as ONNX: bytes with "ORTM" at offset 4 would otherwise be read as onnxruntime's own
    # flatbuffers format, which service/onnx_check.py does not walk (docs/RELIABILITY.md, finding 1)
    opts.add_session_config_entry("session.load_model_format", "ONNX")
    return ort.InferenceSession(model, opts, providers=providers)


INLINE_ROWS = 32  # calls of at most this many rows may run on the event loop, if cheap (RuntimeConfig.inline_budget_s)


@dataclass
class CallCost:
    """Exponentially weighted mean wall time of a model's small calls (≤ INLINE_ROWS rows).

    The serving path runs a call on the event loop only when it is cheap: a thread hop costs
    ~0.05-0.1 ms, more than a small model, but an expensive call on the loop stalls every other
    request (parsing, health checks, and the batcher gathering the next batch). Updates from
    concurrent threads may race; a lost update of a running mean is harmless."""

    alpha: float = 0.2
    small_s: float = 0.0  # 0.0 until the first small call (warm-up makes one)
    small_rows: float = 1.0  # the same running mean of those calls' rows
    calls: int = 0

    def observe(self, rows: int, seconds: float) -> None:
        if rows <= INLINE_ROWS:
            if self.calls == 0:
                self.small_s, self.small_rows = seconds, float(rows)
            else:
                self.small_s += self.alpha * (seconds - self.small_s)
                self.small_rows += self.alpha * (rows - self.small_rows)
            self.calls += 1

    def expected_s(self, rows: int) -> float:
        """A call's expected wall time: the running mean, scaled up linearly for calls of more rows
        than usual (an overestimate where a fixed per-call cost dominates: errs towards a thread)."""
        return self.small_s * max(1.0, rows / max(self.small_rows, 1.0))


class RunDeadline:
    """Stops onnxruntime runs that take longer than `limit_s`: each run gets its own `RunOptions`, and
    one watchdog thread per process sets `terminate` on those past their deadline (onnxruntime then
    ends the run between kernels, Loop iterations included, with an error).

    The check before loading (service/preflight.py) bounds what a bundle does on zeros and on its probe
    rows; a graph whose work depends on the input's values (a Loop whose trip count is computed from
    the input, say) would otherwise hang a worker thread, or the event loop itself, on one crafted
    request. Costs ~3 µs per run; the watchdog wakes every `limit_s / 4` (at most 0.5 s) while runs
    are in flight, so a run is stopped within that much of its deadline.
    """

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.poll_s = min(0.5, limit_s / 4) if limit_s > 0 else 0.0
        self._active: dict[int, tuple[float, ort.RunOptions]] = {}  # id -> (deadline, its options)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, session: ort.InferenceSession, feeds: dict, what: str, until: float | None = None) -> list:
        """`session.run` stopped at `until` (time.monotonic(); default: limit_s from now). Several runs of one
        call (a one_row member's rows) share one `until`: the limit bounds the call, not each run."""
        if self.limit_s <= 0:
            return session.run(None, feeds)
        if until is not None and time.monotonic() >= until:
            raise self._late(what)
        options = ort.RunOptions()
        options.log_severity_level = 4  # a stopped run is reported here, not also as an ERROR line per run
        key = id(options)
        with self._lock:
            self._active[key] = (time.monotonic() + self.limit_s if until is None else until, options)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="run-deadline", daemon=True)
                self._thread.start()
        try:
            return session.run(None, feeds, options)
        except Exception:
            if options.terminate:
                raise self._late(what) from None
            raise
        finally:
            with self._lock:
                self._active.pop(key, None)

    def _late(self, what: str) -> Exception:
        from service.errors import DeadlineError  # lazy: the preflight child imports no web stack

        return DeadlineError(f"'{what}' ran past {self.limit_s:g} s (FUSION_RUN_TIMEOUT_S) and was stopped; "
                             "expected a model whose run time does not depend on the input's values")

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            now = time.monotonic()
            with self._lock:
                late = [k for k, (deadline, _) in self._active.items() if deadline <= now]
                for k in late:
                    self._active.pop(k)[1].terminate = True


_DEADLINES: dict[float, RunDeadline] = {}  # one watchdog per limit (in practice one per process)


def run_deadline(limit_s: float) -> RunDeadline:
    return _DEADLINES.setdefault(limit_s, RunDeadline(limit_s))


def softmax_rows(out: np.ndarray) -> np.ndarray:
    """(B, C) probabilities from a logits output ((B, C, 1, 1) flattened), in float64, returned as float32."""
    z = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@dataclass
class Model:
    """One servable ONNX model: a variant or a member."""

    name: str
    session: ort.InferenceSession
    input_name: str
    device: str
    cost: CallCost = field(default_factory=CallCost)
    deadline: RunDeadline = field(default_factory=lambda: run_deadline(0.0))
    inline_budget_s: float = RuntimeConfig.inline_budget_s  # from the RuntimeConfig the model was loaded with
    # named-input bundles (Manifest.inputs): [(the file's input, the bundle feed it reads)], and which output to return
    binds: tuple[tuple[str, str], ...] | None = None
    output_index: int = 0
    # a member whose file answers logits (ModelEntry.output "logits", classification): answered as (B, C)
    # probabilities, like every other variant, whether served alone (X-Variant) or in members mode
    softmax: bool = False
    # a member whose batch dimension is fixed at 1 (ModelEntry.fixed_batch "one_row", issue 15): one call per row
    one_row: bool = False
    threads: int = 1  # its session's intra-op threads
    # what FUSION_INTRA_OP_THREADS=auto measured and chose (service/tuning.py); None: threads set explicitly
    auto: Decision | None = None
    cores: int = 1  # the cores auto saw (the batcher runs at most cores // threads calls of it at once)
    probe_s: float = 0.0  # one batch-1 call at load (probe_feeds), on the session as first opened (1 thread under auto)
    # a costly model under FUSION_BATCH_MAX_ROWS=auto: {rows: seconds per call} timed at load on its final
    # session (probe_curve), and the batch size chosen from it with the reason (tuning.choose_batch_rows)
    batch_curve: dict[int, float] | None = None
    parallel_s: float | None = None  # seconds per row of batch-1 calls run at once, one per core (probe_parallel)
    batch_choice: tuple[int, str] | None = None

    def __call__(self, X) -> np.ndarray:
        """A client's rows -> (B, C). onnxruntime's InvalidArgument while running on them (token ids past the
        embedding table: Gather's bounds check) is the input's fault: an InputError (400), not a 500 that the
        rollout's guardrail would count against the variant. The load (warm-up, probe) calls `run`: there it
        is the bundle's fault."""
        try:
            return self.run(X)
        except InvalidArgument as exc:
            reason = str(exc).split("Status Message: ", 1)[-1].rsplit(" : ", 1)[-1].strip()
            raise InputError(f"'{self.name}' refused the input values; expected values the model accepts "
                             f"(e.g. ids within its vocabulary); onnxruntime: {reason:.200}") from None

    def run(self, X) -> np.ndarray:
        # X: (B, F) float32 C-contiguous, or named feeds {graph input: (B, ...)} -> (B, C) float32
        t0 = time.perf_counter()
        if self.binds is None:
            out = self._session_run({self.input_name: X})
            self.cost.observe(len(X), time.perf_counter() - t0)
            return softmax_rows(out) if self.softmax else out
        out = self._session_run({mine: X[feed] for mine, feed in self.binds})
        self.cost.observe(n_rows(X), time.perf_counter() - t0)
        return softmax_rows(out) if self.softmax else out

    def _session_run(self, feeds: dict) -> np.ndarray:
        """The chosen output on `feeds`: one session call, or one per row for a `one_row` member."""
        if not self.one_row:
            return self.deadline.run(self.session, feeds, self.name)[self.output_index]
        rows, until = len(next(iter(feeds.values()))), time.monotonic() + self.deadline.limit_s  # one deadline for the call
        return np.concatenate([self.deadline.run(self.session, {k: v[i:i + 1] for k, v in feeds.items()}, self.name, until)[self.output_index]
                               for i in range(rows)])

    def inline_ok(self, rows: int, budget_s: float | None = None) -> bool:
        """Whether a call on `rows` rows is cheap enough to run on the event loop (see CallCost); the
        budget is the model's own (FUSION_INLINE_BUDGET_MS when it was loaded) unless `budget_s` is given."""
        budget = self.inline_budget_s if budget_s is None else budget_s
        return rows <= INLINE_ROWS and self.cost.expected_s(rows) <= budget


@dataclass
class LoadedBundle:
    """A verified bundle with a session per variant and member, warmed up and ready."""

    bundle: Bundle
    models: dict[str, Model] = field(default_factory=dict)
    inputs: Inputs | None = None  # named inputs (Manifest.inputs) and their tokenizers; None: the flat `input`
    # the comparison plot (/ui/comparison.png), read and checked once at load: a bundle rebuilt in place while it
    # is served (whose report, measured again, differs) keeps serving the plot of the version it loaded
    plot: bytes | None = None
    plot_error: Exception | None = None  # why there is none (no plot, a digest mismatch): the route's answer

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def version(self) -> str:
        return self.manifest.bundle_version

    def model(self, name: str) -> Model:
        try:
            return self.models[name]
        except KeyError:
            from fusion.errors import UnknownNameError

            raise UnknownNameError(
                f"unknown variant '{name}'; expected one of {sorted(self.models)}"
            ) from None

    def predict(self, name: str, X: np.ndarray) -> np.ndarray:
        return self.model(name)(X)

    def comparison_plot(self) -> bytes:
        """The plot read at load, or why there is none, raised as a new exception each call (raising the stored
        one would chain every request's frames onto its traceback, for as long as the version is served)."""
        if self.plot is not None:
            return self.plot
        from fusion.errors import UnknownNameError

        err = self.plot_error or UnknownNameError("this bundle has no comparison plot")
        raise type(err)(*err.args) from None


def load(path: str | Path, cfg: RuntimeConfig | None = None, *, manifest_sha256: str | None = None) -> LoadedBundle:
    """Verify every digest and the bundle version, open one session per entry, and warm each up.

    Nothing here bounds time or memory: the service runs this first in a child process with limits
    (service/preflight.py) and then here with `manifest_sha256` set to the digest of the manifest the
    child checked, so that this process parses exactly the bytes the child did (the manifest fixes
    every file's digest, and each file is parsed from the bytes its digest was checked on)."""
    cfg = cfg or RuntimeConfig()  # the service passes its own (service/config.py)
    bundle = read_bundle(path, max_manifest_bytes=cfg.max_manifest_bytes, check_version=True,
                         manifest_sha256=manifest_sha256)
    cuda = cfg.use_cuda()
    gpus = cfg.gpu_ids or ((0,) if cuda else ())
    loaded = LoadedBundle(bundle)
    manifest = bundle.manifest
    if manifest.inputs:
        loaded.inputs = Inputs.load(bundle)  # tokenizers parsed once per bundle version, from verified bytes
    for i, (name, entry) in enumerate(manifest.entries().items()):
        if not entry.file:  # a remote member, or a split front's ensemble: served elsewhere (service/remote.py)
            continue
        is_member = entry.kind == "member"
        # members spread round-robin over the visible GPUs; variants on the first one
        device_id = (gpus[i % len(gpus)] if is_member else gpus[0]) if gpus else None
        threads = cfg.member_threads if is_member else cfg.intra_op_threads
        auto = threads == AUTO
        data, providers = bundle.read_verified(name), providers_for(cfg, device_id)
        check_model(data, entry.file)  # no external data, no custom-op domains: refused before parsing
        sess = _session(data, 1 if auto else threads, providers, entry.file)
        device = f"cuda:{device_id}" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
        if cfg.device == "cuda" and device == "cpu":  # onnxruntime falls back to CPU silently (no GPU, no CUDA libs)
            raise UnavailableError(f"FUSION_DEVICE=cuda but '{name}' got only {sess.get_providers()}")
        model = Model(name, sess, sess.get_inputs()[0].name, device, deadline=run_deadline(cfg.run_timeout_s),
                      inline_budget_s=cfg.inline_budget_s,
                      binds=bind_inputs(name, entry, sess, loaded.inputs) if loaded.inputs else None,
                      output_index=output_index(name, entry, sess),
                      softmax=is_member and entry.output == "logits" and manifest.task == "classification",
                      one_row=entry.fixed_batch == "one_row", threads=1 if auto else threads)
        # one batch-1 call, timed: what FUSION_INTRA_OP_THREADS=auto and FUSION_BATCH_MAX_ROWS=auto decide on
        model.probe_s = probe_cost(model, probe_feeds(loaded))
        if auto:
            model.cores = cores = available_cores(cfg.processes) if device == "cpu" else 1  # on a GPU: 1 CPU thread
            model.auto = decide(model.probe_s, cores)
            if model.auto.threads > 1:  # costly: the session again, on every core (the first one let go first)
                model.session = sess = None
                # without spinning: a spinning pool keeps every core busy between kernels and calls, which
                # the HTTP layer and the other requests need (measured: 1.35-1.95x the batch-1 time of one
                # thread on 2 loaded cores, where the same threads asleep took 0.41-1.14x)
                model.session = _session(data, model.auto.threads, providers, entry.file, spinning=False)
                model.threads = model.auto.threads
        if cfg.batch_curve and model.probe_s > COSTLY_S and not model.one_row:
            time_batch_sizes(model, probe_feeds(loaded), available_cores(cfg.processes) if device == "cpu" else 1)
        loaded.models[name] = model
    warm_up(loaded)
    loaded.plot, loaded.plot_error = _comparison_plot(bundle)
    return loaded


def _comparison_plot(bundle: Bundle) -> tuple[bytes | None, Exception | None]:
    """(the plot's bytes, None), or (None, why there is none, without a traceback). The plot is a report about
    the bundle: whatever goes wrong here never fails the load."""
    from fusion.errors import FusionError
    from service.ui import comparison_plot

    try:
        return comparison_plot(bundle.path, bundle.manifest.comparison), None
    except FusionError as exc:
        return None, exc.with_traceback(None)
    except Exception as exc:  # noqa: BLE001 - an unreadable file, a manifest `comparison` of another shape
        return None, BundleError(f"comparison.png could not be read ({type(exc).__name__}); the plot is not served")


def _session(data: bytes, threads: int, providers: list, file: str, spinning: bool = True) -> ort.InferenceSession:
    try:
        return make_session(data, threads, providers, spinning)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal: the bundle is unusable, say which file
        log.error("onnxruntime could not load %s: %s", file, exc)
        raise BundleError(f"{file}: onnxruntime could not load it: {str(exc).rsplit(' : ', 1)[-1]:.300}") from None


def probe_feeds(loaded: LoadedBundle):
    """One row as large as requests get, for timing a model at load (FUSION_INTRA_OP_THREADS=auto): zeros of
    the flat input, or the named inputs' warm-up row with every text feed at its full `max_length` (a
    request's text is padded to its own length only, so this is the costliest batch-1 call)."""
    named = loaded.inputs
    if named is None:
        return np.zeros((1, loaded.manifest.input.n_features), dtype=np.float32)
    feeds = named.example(1)
    for spec in named.specs.values():
        if spec.kind == "text":
            for g in named.graph_inputs[spec.name]:
                feeds[g] = np.full((1, int(spec.text["max_length"])), 1 if g == "attention_mask" else 0, dtype=np.int64)
    return feeds


def probe_cost(model: Model, X, calls: int = 5, budget_s: float = 0.5) -> float:
    """The wall time of one call on X: the least of up to `calls` timed calls (fewer once they add up to
    `budget_s`: a costly model is told apart in one or two) after one untimed one (first-call allocations).
    The least, so that a hiccup of a loaded machine cannot make a cheap model look costly. A model that
    fails here makes the bundle unusable (as in warm_up)."""
    model.run(X)
    best, spent = math.inf, 0.0
    for _ in range(calls):
        t0 = time.perf_counter()
        model.run(X)
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent >= budget_s:
            break
    return best


def time_batch_sizes(model: Model, feeds, cores: int) -> None:
    """FUSION_BATCH_MAX_ROWS=auto for a costly model: its curve (probe_curve), one batch-1 call per core at once
    (probe_parallel; unbatched concurrent requests run so), and the batch size chosen from them. A failure
    here (memory for 32 rows, the run deadline) is logged and leaves the model on the batch-1 cost rule."""
    model.cores = cores
    try:
        model.batch_curve = probe_curve(model, feeds)
        model.parallel_s = probe_parallel(model, feeds, cores) if cores > 1 else None
        model.batch_choice = choose_batch_rows(model.batch_curve, parallel_s=model.parallel_s)
    except Exception as exc:  # noqa: BLE001 - a probe that fails must not refuse a model that serves batch 1
        log.warning("'%s': timing batch sizes failed (%s); batching follows its batch-1 cost", model.name, exc)
        model.batch_curve = model.parallel_s = model.batch_choice = None


def probe_curve(model: Model, X, sizes=CURVE_ROWS, budget_s: float = CURVE_BUDGET_S) -> dict[int, float]:
    """{rows: seconds per call} of `model` on X's row repeated `rows` times, for rows in `sizes` (ascending,
    at most AUTO_BATCH_ROWS), each the least of two calls; a size is timed only while the time spent so far
    plus its expected cost (twice the last size's time per row x rows) fits in `budget_s`, so that a model
    of seconds a row stops early (its curve then has fewer sizes)."""
    curve: dict[int, float] = {}
    spent, per_row = 0.0, 0.0
    limit = model.deadline.limit_s if getattr(model, "deadline", None) is not None else 0.0
    for rows in (n for n in sizes if n <= AUTO_BATCH_ROWS):
        if curve and (spent + 2 * per_row * rows > budget_s or 0 < limit < 2 * per_row * rows):
            break  # over the budget, or a call that could come near the run deadline
        feeds = repeat_rows(X, rows)
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            model.run(feeds)
            took = time.perf_counter() - t0
            best, spent = min(best, took), spent + took
        curve[rows], per_row = best, best / rows
    return curve


def probe_parallel(model: Model, X, calls: int, rounds: int = 2) -> float:
    """Seconds per row when `calls` batch-1 calls of `model` on X run at once (threads, as unbatched requests
    run in the service's worker threads): the least over `rounds` of the wall time of all of them ÷ `calls`.
    It is what no batching costs per row with every core busy, contention for the cores and caches included."""
    from concurrent.futures import ThreadPoolExecutor

    best = math.inf
    with ThreadPoolExecutor(calls, thread_name_prefix="probe") as pool:
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(lambda _: model.run(X), range(calls)))
            best = min(best, (time.perf_counter() - t0) / calls)
    return best


def repeat_rows(X, rows: int):
    """X's (first) row repeated `rows` times: the flat (rows, F) array, or every named feed (rows, ...)."""
    return {k: np.repeat(v, rows, axis=0) for k, v in X.items()} if isinstance(X, dict) else np.repeat(X, rows, axis=0)


def bind_inputs(name: str, entry, sess: ort.InferenceSession, inputs: Inputs) -> tuple[tuple[str, str], ...]:
    """Which bundle feed each of a file's inputs reads: `entry.input_map` ({file input: bundle feed}),
    else the feed of the same name, else the feed at the same position (a foreign member's own names)."""
    feeds, pairs = inputs.feed_names, []
    for i, inp in enumerate(sess.get_inputs()):
        feed = entry.input_map.get(inp.name) or (inp.name if inp.name in feeds else feeds[i] if i < len(feeds) else None)
        if feed not in feeds:
            raise BundleError(f"'{name}' ({entry.file}): its input '{inp.name}' maps to {feed!r:.60}; expected one of "
                              f"the bundle's inputs {list(feeds)} (ModelEntry.input_map)")
        pairs.append((inp.name, feed))
    return tuple(pairs)


def output_index(name: str, entry, sess: ort.InferenceSession) -> int:
    """The position of `entry.output_name` among the file's outputs (the first when unset)."""
    if not entry.output_name:
        return 0
    outs = [o.name for o in sess.get_outputs()]
    if entry.output_name not in outs:
        raise BundleError(f"'{name}' ({entry.file}): expected an output named '{entry.output_name}'; it has {outs}")
    return outs.index(entry.output_name)


def warm_up(loaded: LoadedBundle) -> None:
    """Run every model at batch 1 and 8 on zeros (named inputs: Inputs.example); a model that fails makes
    the bundle unusable. The last calls (batch 1, after the first-call allocations) seed each model's CallCost."""
    named = loaded.inputs
    n = loaded.manifest.input.n_features if named is None else 0
    examples = {b: named.example(b) if named else np.zeros((b, n), dtype=np.float32) for b in (1, 8)}
    for name, model in loaded.models.items():
        for i, b in enumerate((1, 8, 1, 1)):
            if i == 2:
                model.cost = CallCost()  # forget the first calls' one-off allocations
            out = model.run(examples[b])
            if out.shape[0] != b or not np.isfinite(out).all():
                raise UnavailableError(f"warm-up of '{name}' gave {out.shape} / non-finite output")


PROBE_ATOL = 1e-4


def check_probe(loaded: LoadedBundle) -> None:
    """Re-run the rows the build recorded in the manifest and compare with the recorded outputs.

    The parity/smoke check on the serving path: a bundle whose models do not reproduce their
    offline outputs in this runtime is refused before it serves a request.
    """
    probe = getattr(loaded.manifest, "probe", None)
    if not probe:
        return
    inputs = probe["inputs"]
    X = loaded.inputs.feeds_from_lists(inputs) if loaded.inputs else np.asarray(inputs, dtype=np.float32)
    for name, expected in probe["outputs"].items():
        if name not in loaded.models:
            continue
        got = loaded.models[name].run(X)
        expected = np.asarray(expected, dtype=np.float32)
        if got.shape != expected.shape:
            raise UnavailableError(f"'{name}' gave outputs of shape {got.shape} on the probe rows; the manifest recorded {expected.shape}")
        diff = float(np.abs(got - expected).max())
        if not diff <= PROBE_ATOL:
            raise UnavailableError(f"'{name}' does not reproduce its recorded outputs: max |Δ| = {diff:.3g} > {PROBE_ATOL}")
