"""The comparison report: every variant and member of a bundle, run from its ONNX file in onnxruntime.

Per model, on one split (the test split by default):

* accuracy with a 95 % Wilson score interval (Wilson 1927);
* NLL (probabilities clipped at 1e-12: hard-vote fractions can be exactly 0);
* top-label expected calibration error over 15 equal-width confidence bins (Guo et al. 2017,
  https://arxiv.org/abs/1706.04599; bin m holds confidences in (m/15, (m+1)/15]);
* argmax agreement with the reference variant (`ensemble`);
* over the members, pairwise diversity (label disagreement, Yule's Q, error correlation; fusion/diversity.py)
  as a table and heat maps (diversity.png);
* an exact McNemar test of each single model against the reference (McNemar 1947): under H0 the
  discordant pairs split 50/50, two-sided exact binomial p-value on b (model right, reference wrong)
  out of b + c;
* parameters (from the manifest), FLOPs per sample counted on the ONNX graph (2 × the multiply-
  accumulates of MatMul/Gemm/Conv and their integer forms; element-wise ops are not counted), file size;
* onnxruntime latency median and p99 at batch 1 and 64, all models measured side by side in one run:
  interleaved rounds in a seeded random order, one intra-op and one inter-op thread, CPU provider.

When the ensemble was built with temperature-scaled members, a calibration table shows each
member's and the ensemble's NLL/ECE before and after scaling, recomputed from the member ONNX files.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fusion.bundle import Manifest, ModelEntry, read_bundle
from fusion.data import Dataset
from fusion.errors import ConfigError
from fusion.stats import Z95, mcnemar_exact, wilson_interval  # noqa: F401 (shared with service/ab.py)

PROB_EPS = 1e-12
REPORT_FILES = ("comparison.md", "comparison.json", "comparison.png")
DIVERSITY_PLOT = "diversity.png"  # written beside them when the bundle has two or more members


@dataclass(frozen=True)
class CompareConfig:
    split: str = "test"  # "val" | "test"
    reference: str = "ensemble"
    batch_sizes: tuple[int, ...] = (1, 64)
    rounds: int = 300  # timed calls per model and batch size
    warmup: int = 10
    n_bins: int = 15
    seed: int = 0


# --- statistics (pure numpy; tested against scipy and hand computations) ------------------------
# wilson_interval and mcnemar_exact come from fusion/stats.py, shared with the service (issue 14).


def negative_log_likelihood(probs: np.ndarray, y: np.ndarray, eps: float = PROB_EPS) -> float:
    """Mean −log p[y]. probs: (N, C); y: (N,) class indices."""
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), eps, 1.0)
    return float(-np.log(p).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE = Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|, bins (m/M, (m+1)/M]. probs: (N, C); y: (N,)."""
    conf = probs.max(-1).astype(np.float64)  # (N,)
    correct = (probs.argmax(-1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (N,)
    ece = 0.0
    for m in range(n_bins):
        mask = bins == m
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def mcnemar_pairs(correct_model: np.ndarray, correct_ref: np.ndarray) -> dict:
    """Exact McNemar test on paired correctness: b = model right & reference wrong, c = the opposite;
    the two-sided binomial p on b of b + c is fusion.stats.mcnemar_exact(b, c), the service's own."""
    a, r = np.asarray(correct_model, bool), np.asarray(correct_ref, bool)
    b, c = int((a & ~r).sum()), int((~a & r).sum())
    return {"b": b, "c": c, "p_value": mcnemar_exact(b, c)}


# --- FLOPs from the ONNX graph -------------------------------------------------------------------

_MATMULS = {"MatMul": (0, 1), "MatMulInteger": (0, 1)}
_CONVS = {"Conv": 1, "ConvInteger": 1}


def count_flops(model) -> int | None:
    """FLOPs per sample = 2 × multiply-accumulates of MatMul, Gemm and Conv (and MatMulInteger,
    ConvInteger), with every shape fixed by ONNX shape inference at batch 1.

    model: an `onnx.ModelProto`. Returns None (rather than an undercount) when a counted node's shape
    cannot be inferred or the graph holds another matrix op or a subgraph.
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi in (*g.input, *g.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = 1  # the batch axis
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    g = m.graph
    shapes: dict[str, tuple[int, ...] | None] = {t.name: tuple(t.dims) for t in g.initializer}

    def from_value_info(vi) -> tuple[int, ...] | None:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            return None
        dims = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim)
        return None if any(d <= 0 for d in dims) else dims

    for vi in (*g.input, *g.value_info, *g.output):
        shapes.setdefault(vi.name, from_value_info(vi))
    macs = 0
    for node in g.node:
        op = node.op_type
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        if op in _MATMULS:
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a is None or out is None:
                return None
            macs += int(np.prod(out)) * a[-1]  # out (..., M, N), K = a[-1]
        elif op == "Gemm":
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a is None or out is None:
                return None
            trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
            macs += int(np.prod(out)) * (a[0] if trans_a else a[1])  # out (M, N)
        elif op in _CONVS:
            w, out = shapes.get(node.input[_CONVS[op]]), shapes.get(node.output[0])
            if w is None or out is None:
                return None
            macs += int(np.prod(out)) * int(np.prod(w[1:]))  # out (N, Cout, *S), w (Cout, Cin/g, *K)
        elif any(k in op for k in ("MatMul", "Gemm", "Conv", "Einsum", "Attention", "LSTM", "GRU", "RNN")):
            return None  # a matrix op this counter does not know: no number rather than a wrong one
    return 2 * macs


# --- running the ONNX files ----------------------------------------------------------------------


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def _run(sess, X, batch: int = 512, *, index: int = 0) -> np.ndarray:
    """Output `index` of `sess` over X (N, F) (its first input), or feeds {its input: (N, ...)} (`_bind`)."""
    feeds = X if isinstance(X, dict) else {sess.get_inputs()[0].name: X}
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[index]
                           for i in range(0, n, batch)])


def _bind(sess, entry: ModelEntry, X: dict) -> dict:
    """A named-input bundle's rows {bundle input: (N, ...)} as `sess`'s feeds: `entry.input_map`, else the
    input of the same name, else the one at the same position (as service/runtime.bind_inputs)."""
    names, out = list(X), {}
    for i, inp in enumerate(sess.get_inputs()):
        feed = entry.input_map.get(inp.name) or (inp.name if inp.name in X else names[i] if i < len(names) else None)
        if feed not in X:
            raise ConfigError(f"'{entry.file}': its input '{inp.name}' maps to {feed!r}; expected one of the data's "
                              f"inputs {names}")
        out[inp.name] = X[feed]
    return out


def _as_probabilities(out: np.ndarray, entry: ModelEntry) -> np.ndarray:
    """A file's answer as (N, C) probabilities: flattened, softmaxed for a member declared `output = "logits"`."""
    out = np.asarray(out).reshape(len(out), -1)
    if entry.kind != "member" or entry.output != "logits":
        return out
    z = out.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def measure_latency(
    sessions: dict[str, object], X: np.ndarray, *, batch_sizes: Sequence[int] = (1, 64),
    rounds: int = 300, warmup: int = 10, seed: int = 0, bound: dict[str, dict] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Median and p99 wall time (ms) of `session.run` per model and batch size, measured side by side.

    Each round runs every (model, batch size) pair once in a fresh seeded random order, so drifts of
    a shared machine hit every model alike. Batch-1 calls cycle through the rows of X (N, F); batch-b
    calls use b consecutive rows. Returns {name: {str(b): {"median_ms", "p99_ms"}}}.
    bound: {name: {its input: (N, ...)}} for named-input bundles (`_bind`), instead of X for every model.
    """
    if rounds < 1:
        raise ConfigError(f"expected at least 1 latency round; got {rounds}")
    if bound is None:
        X = np.ascontiguousarray(X, dtype=np.float32)
        bound = {n: {s.get_inputs()[0].name: X} for n, s in sessions.items()}

    def rows(arrays: dict, b: int) -> list[dict]:
        n = len(next(iter(arrays.values())))
        out = [{k: np.ascontiguousarray(v[(i * b) % n :][:b]) for k, v in arrays.items()} for i in range(max(1, n // b))]
        if any(len(next(iter(f.values()))) != b for f in out):  # fewer rows than b: repeat rows
            out = [{k: np.ascontiguousarray(np.resize(v, (b, *v.shape[1:]))) for k, v in arrays.items()}]
        return out

    feeds = {(n, b): rows(bound[n], b) for n in sessions for b in batch_sizes}
    pairs = [(n, b) for n in sessions for b in batch_sizes]
    times = {p: np.empty(rounds) for p in pairs}
    for n, b in pairs:
        for i in range(warmup):
            sessions[n].run(None, feeds[(n, b)][i % len(feeds[(n, b)])])
    rng = np.random.default_rng(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for k in rng.permutation(len(pairs)):
                n, b = pairs[k]
                feed = feeds[(n, b)][r % len(feeds[(n, b)])]
                t0 = time.perf_counter_ns()
                sessions[n].run(None, feed)
                times[(n, b)][r] = (time.perf_counter_ns() - t0) / 1e6
    finally:
        if gc_was_enabled:
            gc.enable()
    out: dict[str, dict[str, dict[str, float]]] = {n: {} for n in sessions}
    for (n, b), t in times.items():
        out[n][str(b)] = {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99))}
    return out


def _split(data: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        return data.X_test, data.y_test
    if split == "val":
        return data.X_val, data.y_val
    raise ConfigError(f"expected split 'val' or 'test'; got {split!r}")


def _check_data(manifest: Manifest, data: Dataset, cfg: CompareConfig) -> None:
    if manifest.task != "classification":
        raise ConfigError(f"the comparison report is for classification bundles; this bundle is {manifest.task}")
    if manifest.inputs:  # named inputs (issue 15): the data's arrays by input name
        want = [s.name for s in manifest.inputs]
        if not data.named or sorted(data.X_test) != sorted(want) or len(data.classes) != len(manifest.classes):
            got = sorted(data.X_test) if data.named else f"flat rows of {data.n_features} features"
            raise ConfigError(f"the data set does not fit the bundle: expected inputs {want} and {len(manifest.classes)} "
                              f"classes; got {got} and {len(data.classes)}")
    elif data.n_features != manifest.input.n_features or len(data.classes) != len(manifest.classes):
        raise ConfigError(
            f"the data set does not fit the bundle: expected {manifest.input.n_features} features and "
            f"{len(manifest.classes)} classes; got {data.n_features} and {len(data.classes)}"
        )
    expected = manifest.dataset.get(f"n_{cfg.split}")
    got = len(_split(data, cfg.split)[1])
    if expected is not None and expected != got:
        raise ConfigError(f"the bundle was built on {expected} {cfg.split} rows; this data set has {got}")
    if cfg.reference not in manifest.variants:
        raise ConfigError(f"reference variant '{cfg.reference}' not in the bundle; have {sorted(manifest.variants)}")


def _calibration(manifest: Manifest, probs: dict[str, np.ndarray], y: np.ndarray, n_bins: int) -> dict | None:
    """NLL/ECE before and after the ensemble's member temperature scaling, from the member ONNX outputs."""
    ens = manifest.variants.get("ensemble")
    method = (ens.method or {}) if ens else {}
    if method.get("calibration") != "temperature":
        return None
    import torch

    from fusion.ensemble import make_combiner

    temps = method["temperatures"]
    names = list(ens.members)

    def scaled(p: np.ndarray, t: float) -> np.ndarray:  # softmax(log p / T) = softmax(z / T)
        z = np.log(np.clip(p.astype(np.float64), PROB_EPS, 1.0)) / t
        z -= z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    rows = {}
    for n in names:
        before, after = probs[n], scaled(probs[n], temps[n])
        rows[n] = {
            "temperature": temps[n],
            "nll_before": negative_log_likelihood(before, y), "nll_after": negative_log_likelihood(after, y),
            "ece_before": expected_calibration_error(before, y, n_bins),
            "ece_after": expected_calibration_error(after, y, n_bins),
        }
    out_t = ens.combiner.get("temperature")  # the ensemble's output temperature (weights "auto"), if any
    comb = make_combiner(ens.combiner["name"], len(names), ens.combiner.get("weights"),
                         **({"temperature": out_t} if out_t is not None else {}))

    def combine(ps: list[np.ndarray]) -> np.ndarray:  # log p works as logits for the averaging combiners
        z = torch.from_numpy(np.log(np.clip(np.stack(ps), PROB_EPS, 1.0)).astype(np.float32))
        return comb(z).numpy()

    before = combine([probs[n] for n in names])
    rebuilt = combine([scaled(probs[n], temps[n]) for n in names])
    after = probs["ensemble"]
    rows["ensemble"] = {
        "temperature": None,
        "nll_before": negative_log_likelihood(before, y), "nll_after": negative_log_likelihood(after, y),
        "ece_before": expected_calibration_error(before, y, n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins),
    }
    # the exported graph must equal the combiner over the scaled member files: a cross-check, not a metric
    return {"method": "temperature", "fit_on": method.get("fit_on", "validation"), "rows": rows,
            "max_abs_diff_rebuilt_vs_graph": float(np.abs(rebuilt - after).max())}


def _selection(manifest: Manifest) -> dict | None:
    """How the ensemble's weights were chosen (the manifest's `ensemble_selection`), one row per candidate:
    its out-of-fold validation figures (what chose) and its test figures (recorded, never used to choose)."""
    s = manifest.ensemble_selection
    if not s:
        return None
    rows = {name: {"combiner": c["combiner"], "val_oof_nll": c["val_oof"]["nll"], "val_oof_accuracy": c["val_oof"]["accuracy"],
                   "test_nll": (c.get("test") or {}).get("nll"), "test_accuracy": (c.get("test") or {}).get("accuracy"),
                   "chosen": name == s["chosen"]}
            for name, c in s["candidates"].items()}
    gate = s.get("gate") or {}
    # the scalars title the table in the HTML report and the dashboard; the long texts sit under `about`
    return {"weights": s["weights"], "chosen": s["chosen"], "best_member": gate.get("best_member"), "rows": rows,
            "about": {"criterion": s["criterion"], "warning": gate.get("warning")}}


def _diversity(entries: dict[str, ModelEntry], probs: dict[str, np.ndarray], y: np.ndarray) -> dict | None:
    """Pairwise diversity of the bundle's members on the split (fusion/diversity.py); None with fewer than 2."""
    from fusion.diversity import diversity

    members = {n: probs[n] for n, e in entries.items() if e.kind == "member"}
    return diversity(members, y).to_json() if len(members) >= 2 else None


def compare_models(root: str | Path, manifest: Manifest, data: Dataset, cfg: CompareConfig = CompareConfig()) -> dict:
    """The report over every entry of `manifest` whose files lie under `root` (a bundle or a staging dir)."""
    import onnx
    import onnxruntime as ort

    root = Path(root)
    _check_data(manifest, data, cfg)
    X, y = _split(data, cfg.split)
    X = X if isinstance(X, dict) else np.ascontiguousarray(X, dtype=np.float32)
    if isinstance(X, dict) and any(s.kind == "text" for s in manifest.inputs):  # strings -> the graph's token feeds
        from fusion.text import tokenize_inputs

        X = tokenize_inputs(manifest.inputs, root, X)
    entries: dict[str, ModelEntry] = manifest.entries()
    sessions, probs, flops, sizes, bound = {}, {}, {}, {}, {}
    for name, e in entries.items():
        blob = (root / e.file).read_bytes()
        sessions[name] = _session(blob)
        bound[name] = _bind(sessions[name], e, X) if isinstance(X, dict) else X
        outs = [o.name for o in sessions[name].get_outputs()]
        index = outs.index(e.output_name) if e.output_name in outs else 0
        probs[name] = _as_probabilities(_run(sessions[name], bound[name], index=index), e)
        flops[name] = count_flops(onnx.load_from_string(blob))
        sizes[name] = len(blob)
    latency = measure_latency(
        sessions, X, batch_sizes=cfg.batch_sizes, rounds=cfg.rounds, warmup=cfg.warmup, seed=cfg.seed,
        bound=bound if isinstance(X, dict) else None,
    )
    ref_pred = probs[cfg.reference].argmax(-1)
    ref_correct = ref_pred == y
    ref_b1 = latency[cfg.reference][str(cfg.batch_sizes[0])]["median_ms"]
    rows = []
    for name, e in entries.items():
        p = probs[name]
        correct = p.argmax(-1) == y
        k = int(correct.sum())
        lo, hi = wilson_interval(k, len(y))
        b1 = latency[name][str(cfg.batch_sizes[0])]["median_ms"]
        rows.append({
            "name": name, "kind": e.kind, "file": e.file,
            "accuracy": k / len(y), "accuracy_ci95": [lo, hi],
            "nll": negative_log_likelihood(p, y), "ece": expected_calibration_error(p, y, cfg.n_bins),
            "agreement": float((p.argmax(-1) == ref_pred).mean()),
            "mcnemar": None if e.kind == "ensemble" else mcnemar_pairs(correct, ref_correct),
            "n_parameters": e.n_parameters, "flops_per_sample": flops[name], "size_bytes": sizes[name],
            "latency_ms": latency[name], "latency_vs_reference_b1": b1 / ref_b1,
        })
    return {
        "split": cfg.split, "n": int(len(y)), "reference": cfg.reference, "ece_bins": cfg.n_bins,
        "rows": rows,
        "calibration": _calibration(manifest, probs, y, cfg.n_bins),
        "ensemble_selection": _selection(manifest),
        "diversity": _diversity(entries, probs, y),
        "latency_setup": {
            "runtime": f"onnxruntime {ort.__version__}", "provider": "CPUExecutionProvider",
            "intra_op_threads": 1, "inter_op_threads": 1, "rounds": cfg.rounds, "warmup": cfg.warmup,
            "batch_sizes": list(cfg.batch_sizes),
            "order": "each round runs every model at every batch size once, in a seeded random order",
            "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} logical CPUs",
        },
    }


def compare_bundle(bundle_dir: str | Path, data: Dataset, cfg: CompareConfig = CompareConfig()) -> dict:
    """The report over a written bundle; every file's digest is verified first (`read_bundle`)."""
    bundle = read_bundle(bundle_dir)
    return compare_models(bundle.path, bundle.manifest, data, cfg)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- rendering -----------------------------------------------------------------------------------


def to_markdown(report: dict) -> str:
    """The report as Markdown tables (the README shows this)."""
    bs = report["latency_setup"]["batch_sizes"]
    head = ["model", "kind", "accuracy % (95% CI)", "NLL", f"ECE ({report['ece_bins']} bins)",
            f"agree % w/ {report['reference']}", "McNemar b/c, p", "params", "MFLOPs/sample", "ONNX KiB",
            *[f"b={b} median / p99 ms" for b in bs], f"b={bs[0]} latency ÷ {report['reference']}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]
    for r in report["rows"]:
        lo, hi = r["accuracy_ci95"]
        mc = r["mcnemar"]
        cells = [
            f"`{r['name']}`", r["kind"], f"{100 * r['accuracy']:.2f} ({100 * lo:.1f}–{100 * hi:.1f})",
            f"{r['nll']:.4f}", f"{r['ece']:.4f}", f"{100 * r['agreement']:.2f}",
            "—" if mc is None else f"{mc['b']}/{mc['c']}, {mc['p_value']:.3g}",
            f"{r['n_parameters']:,}", "n/a" if r["flops_per_sample"] is None else f"{r['flops_per_sample'] / 1e6:.3f}",
            f"{r['size_bytes'] / 1024:.1f}",
            *[f"{r['latency_ms'][str(b)]['median_ms']:.3f} / {r['latency_ms'][str(b)]['p99_ms']:.3f}" for b in bs],
            f"{r['latency_vs_reference_b1']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["latency_setup"]
    out = [
        f"Comparison on the {report['split']} split ({report['n']} rows); every number from the ONNX files "
        f"in {s['runtime']} ({s['provider']}, {s['intra_op_threads']} intra-op thread) on {s['machine']}. "
        f"Latency: {s['rounds']} rounds; {s['order']}. McNemar: b = model right and "
        f"{report['reference']} wrong, c = the opposite, exact two-sided binomial p. FLOPs: 2 × the "
        f"multiply-accumulates of MatMul/Gemm/Conv in the graph.",
        "", *lines,
    ]
    sel = report.get("ensemble_selection")
    if sel:
        out += ["", f"Ensemble weights `{sel['weights']}`: chose `{sel['chosen']}` by the {sel['about']['criterion']}. "
                "Test figures are recorded, never used to choose.", "",
                "| candidate | combiner | val NLL (out of fold) | val accuracy % (out of fold) | test NLL | test accuracy % |",
                "|---|---|--:|--:|--:|--:|"]
        for name, r in sel["rows"].items():
            test = ("—", "—") if r["test_nll"] is None else (f"{r['test_nll']:.4f}", f"{100 * r['test_accuracy']:.2f}")
            out.append(f"| `{name}`{' (chosen)' if r['chosen'] else ''} | {r['combiner']} | {r['val_oof_nll']:.4f} | "
                       f"{100 * r['val_oof_accuracy']:.2f} | {test[0]} | {test[1]} |")
        if sel["about"]["warning"]:
            out += ["", f"**Warning:** {sel['about']['warning']}."]
    div = report.get("diversity")
    if div:
        def f(v):
            return "—" if v is None else f"{v:.3f}"
        out += ["", f"Member diversity on the {report['split']} split ({div['n_members']} members): mean label "
                f"disagreement {f(div['mean_disagreement'])}, mean Yule's Q {f(div['mean_yule_q'])}, mean error "
                f"correlation {f(div['mean_error_correlation'])} (fusion/diversity.py; Q and the correlation on the 0/1 "
                "right/wrong outputs; — where undefined, e.g. a member never wrong).", "",
                "| pair | disagreement | Yule's Q | error correlation |", "|---|--:|--:|--:|"]
        for pair, r in div["rows"].items():
            out.append(f"| {pair} | {f(r['disagreement'])} | {f(r['yule_q'])} | {f(r['error_correlation'])} |")
    cal = report.get("calibration")
    if cal:
        out += ["", f"Temperature scaling of the members (fitted on {cal['fit_on']}), {report['split']} split:", "",
                "| model | T | NLL before → after | ECE before → after |", "|---|--:|--:|--:|"]
        for name, c in cal["rows"].items():
            t = "—" if c["temperature"] is None else f"{c['temperature']:.3f}"
            out.append(f"| `{name}` | {t} | {c['nll_before']:.4f} → {c['nll_after']:.4f} | "
                       f"{c['ece_before']:.4f} → {c['ece_after']:.4f} |")
    return "\n".join(out) + "\n"


PLOT_DPI = 120
SAME_SPOT_PX = 6.0  # markers closer than this (about a radius, at 100 dpi) cover each other: one label names them all


def plot(report: dict, path: str | Path) -> Path:
    """`plot_figure(report)` saved as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    path = Path(path)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def plot_figure(report: dict):
    """Accuracy against median latency at each measured batch size, one panel each (95 % CI bars
    for the variants; members as plain points). Models whose markers cover each other share one
    label; labels are placed clear of each other, of the markers and of the error bars
    (fusion.plot_labels), the latency axis is labelled in plain numbers at 1-2-5 steps, and the
    legend sits below the panels, off the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusion.plot_labels import freeze_layout, log_ticks, place_labels

    bs = report["latency_setup"]["batch_sizes"]
    colors = {"ensemble": "tab:red", "merged": "tab:purple", "distilled": "tab:green",
              "quantized": "tab:olive", "member": "tab:blue"}
    fig, axes = plt.subplots(1, len(bs), figsize=(6.5 * len(bs), 5.0), squeeze=False, layout="constrained", dpi=PLOT_DPI)
    for ax, b in zip(axes[0], bs):
        for r in report["rows"]:
            x, acc = r["latency_ms"][str(b)]["median_ms"], 100 * r["accuracy"]
            color = colors.get(r["kind"], "tab:gray")
            if r["kind"] == "member":
                ax.plot(x, acc, "o", color=color, alpha=0.6)
            else:
                lo, hi = (100 * v for v in r["accuracy_ci95"])
                ax.errorbar(x, acc, yerr=[[acc - lo], [hi - acc]], fmt="o", capsize=3, color=color, markersize=7)
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.06)
        ax.set_xlim(ax.get_xlim())  # final limits: the ticks and the labels are laid out on them
        log_ticks(ax, "x")
        ax.set_xlabel(f"median latency at batch {b} (ms; onnxruntime, 1 thread)")
        ax.set_ylabel(f"{report['split']} accuracy % (95% CI for variants)")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()
               if any(r["kind"] == k for r in report["rows"])]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"accuracy vs latency ({report['n']} {report['split']} rows)")
    freeze_layout(fig)
    for ax, b in zip(axes[0], bs):
        spots: list[tuple[float, float, list[str]]] = []  # (x, y, names) per group of covering markers
        for r in report["rows"]:
            x, acc = r["latency_ms"][str(b)]["median_ms"], 100 * r["accuracy"]
            px, py = ax.transData.transform((x, acc))
            for sx, sy, names in spots:
                qx, qy = ax.transData.transform((sx, sy))
                if math.hypot(px - qx, py - qy) <= SAME_SPOT_PX * fig.dpi / 100:
                    names.append(r["name"])
                    break
            else:
                spots.append((x, acc, [r["name"]]))
        place_labels(ax, [(x, y, ", ".join(names)) for x, y, names in spots], fontsize=7)
    return fig


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """comparison.md, comparison.json and comparison.png in out_dir, and diversity.png (the members'
    pairwise diversity heat maps) when the report has two or more members."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = (out_dir / f for f in REPORT_FILES)
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(report, indent=2))
    plot(report, png)
    paths = {"markdown": md, "json": js, "png": png}
    if report.get("diversity"):
        from fusion.diversity import plot_heatmaps

        paths["diversity_png"] = plot_heatmaps(report["diversity"], out_dir / DIVERSITY_PLOT)
    return paths
