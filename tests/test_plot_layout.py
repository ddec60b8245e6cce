"""Every plot the project writes is readable: no text over other text, no legend over a curve.

Each figure is drawn with matplotlib's Agg renderer and measured in display space: every visible
text (titles, axis labels, the tick labels inside the view, point labels, legend entries) against
every other, each inside the canvas; every legend against every plotted line and marker; every
point label against every marker. The inputs are the README's own figures (the comparison table of
docs/comparison.md, the barrier of two MLPs), a real comparison from the tiny bundle's build, and
shapes that stress the layout (a dense cluster, five decades of latency, one batch size).
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.legend import Legend  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402

MIN_OVERLAP_PX2 = 1.0  # boxes touching within a pixel's area are not an overlap


# ---- the measuring ----------------------------------------------------------------------------


def _box(t: Text, renderer):
    if isinstance(t, Annotation):  # the text itself: an Annotation's extent includes its leader line
        t.update_positions(renderer)
    return Text.get_window_extent(t, renderer)


def _tick_labels_out_of_view(fig) -> set[int]:
    """ids of tick labels whose tick lies outside its axis's view (matplotlib does not draw them)."""
    out = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = hi - lo
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo - 1e-9 * span <= tick.get_loc() <= hi + 1e-9 * span:
                    out |= {id(tick.label1), id(tick.label2)}
    return out


def visible_texts(fig, renderer) -> list[tuple[str, object]]:
    hidden = _tick_labels_out_of_view(fig)
    out = []
    for t in fig.findobj(Text):
        if id(t) in hidden or not t.get_visible() or not t.get_text().strip():
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        out.append((t.get_text(), _box(t, renderer)))
    return out


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _data_paths(ax) -> list[tuple[MplPath, bool]]:
    """(display path, drawn as a line) of every plotted line and errorbar segment of `ax`."""
    out = []
    for line in ax.lines:
        if line.get_visible():
            drawn = line.get_linestyle() not in ("None", "none", "", " ")
            out.append((line.get_transform().transform_path(line.get_path()), drawn))
    for coll in ax.collections:
        if hasattr(coll, "get_segments"):
            out += [(MplPath(coll.get_transform().transform(s)), True) for s in coll.get_segments() if len(s) >= 2]
    return out


def _markers(ax) -> list[tuple[float, float]]:
    pts = []
    for line in ax.lines:
        if line.get_visible() and line.get_marker() not in (None, "None", "none", ""):
            pts += [tuple(p) for p in line.get_transform().transform(np.asarray(line.get_xydata(), float))]
    return pts


def layout_problems(fig) -> list[str]:
    """What a reader would see wrong in `fig`: overlapping texts, texts off the canvas, legends on data."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    texts = visible_texts(fig, renderer)
    assert texts, "expected a figure with text"
    canvas = fig.bbox
    for s, b in texts:
        if b.x0 < canvas.x0 - 0.5 or b.y0 < canvas.y0 - 0.5 or b.x1 > canvas.x1 + 0.5 or b.y1 > canvas.y1 + 0.5:
            problems.append(f"text {s!r} leaves the canvas: {b.extents.round(1)} outside {canvas.extents.round(1)}")
    for (s1, b1), (s2, b2) in itertools.combinations(texts, 2):
        if (area := _overlap(b1, b2)) > MIN_OVERLAP_PX2:
            problems.append(f"text {s1!r} overlaps text {s2!r} ({area:.0f} px²)")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for path, drawn in _data_paths(ax):
                if drawn and path.intersects_bbox(box, filled=False):
                    problems.append(f"the legend {box.extents.round(1)} covers a line of '{ax.get_title() or ax.get_xlabel()}'")
                    break
            inside = [p for p in _markers(ax) if box.x0 <= p[0] <= box.x1 and box.y0 <= p[1] <= box.y1]
            if inside:
                problems.append(f"the legend covers {len(inside)} data markers")
    for ax in fig.axes:
        pts = _markers(ax)
        for t in ax.texts:
            if not isinstance(t, Annotation) or not t.get_visible():
                continue
            b = _box(t, renderer).padded(1.0)
            covered = [p for p in pts if b.x0 <= p[0] <= b.x1 and b.y0 <= p[1] <= b.y1]
            if covered:
                problems.append(f"label {t.get_text()!r} covers {len(covered)} data markers")
    return problems


def _legend_of(fig) -> Legend:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert len(legends) == 1, f"expected one legend; got {len(legends)}"
    return legends[0]


# ---- inputs -----------------------------------------------------------------------------------

# docs/comparison.md's table (the README's): name, kind, accuracy %, 95 % CI, b=1 and b=64 median ms
DOCS_ROWS = [
    ("ensemble", "ensemble", 98.22, (96.5, 99.1), 0.156, 1.474), ("merged", "merged", 97.78, (96.0, 98.8), 0.028, 0.102),
    ("distilled", "distilled", 98.22, (96.5, 99.1), 0.027, 0.102), ("merged_int8", "quantized", 97.33, (95.4, 98.5), 0.027, 0.074),
    ("distilled_int8", "quantized", 98.22, (96.5, 99.1), 0.027, 0.074), ("cnn_0", "member", 99.11, (97.7, 99.7), 0.029, 0.358),
    ("cnn_1", "member", 99.33, (98.1, 99.8), 0.029, 0.358), ("cnn_2", "member", 98.67, (97.1, 99.4), 0.029, 0.360),
    ("mlp_0", "member", 97.56, (95.7, 98.6), 0.027, 0.103), ("mlp_1", "member", 98.00, (96.2, 98.9), 0.028, 0.104),
    ("mlp_2", "member", 97.56, (95.7, 98.6), 0.028, 0.104), ("mlp_3", "member", 97.78, (96.0, 98.8), 0.027, 0.103),
    ("mlp_4", "member", 97.78, (96.0, 98.8), 0.027, 0.103),
]


def _report(rows, batch_sizes=(1, 64), n=450) -> dict:
    return {"n": n, "split": "test", "latency_setup": {"batch_sizes": list(batch_sizes)}, "rows": [
        {"name": name, "kind": kind, "accuracy": acc / 100, "accuracy_ci95": [ci[0] / 100, ci[1] / 100],
         "latency_ms": {str(b): {"median_ms": ms} for b, ms in zip(batch_sizes, lat)}}
        for name, kind, acc, ci, *lat in rows]}


def _dense_rows(k: int = 18) -> list:
    """k members within 10 % of each other in latency and 1 point in accuracy, plus a far ensemble."""
    rng = np.random.default_rng(0)
    rows = [("ensemble", "ensemble", 98.0, (96.5, 99.0), 0.4, 3.0)]
    for i in range(k):
        acc = float(np.round(97 + rng.integers(0, 5) * 100 / 450, 2))
        rows.append((f"model_{i}", "member", acc, (acc - 1.5, acc + 1), *(0.03 * (1 + 0.1 * rng.random()) * f for f in (1, 4))))
    return rows


def _wide_rows() -> list:
    return [(f"m{i}", "member" if i else "ensemble", 90 + i, (89 + i, 91 + i), 10.0 ** (i - 2)) for i in range(6)]


COMPARISONS = {
    "docs": _report(DOCS_ROWS),
    "dense-cluster": _report(_dense_rows()),
    "five-decades-one-batch": _report(_wide_rows(), batch_sizes=(1,)),
}


def _path(loss, acc, barrier):
    return {"lambdas": [i / (len(loss) - 1) for i in range(len(loss))], "loss": loss, "accuracy": acc,
            "barrier": barrier, "loss_name": "cross_entropy"}


# the README's barrier plot (`fusion barrier mlp_0 mlp_1 --align`): a peaked naive path, a flat aligned one
NAIVE = _path([0.107, 0.097, 0.113, 0.194, 0.347, 0.440, 0.346, 0.190, 0.109, 0.089, 0.096],
              [0.9756, 0.98, 0.9778, 0.9756, 0.96, 0.9422, 0.9556, 0.9778, 0.9778, 0.9778, 0.98], 0.339)
ALIGNED = _path([0.107, 0.099, 0.094, 0.090, 0.087, 0.085, 0.085, 0.085, 0.087, 0.091, 0.096],
                [0.9756, 0.9733, 0.9756, 0.9756, 0.9778, 0.98, 0.98, 0.98, 0.98, 0.9778, 0.98], 0.006)
PATHS = {
    "docs": {"naive": NAIVE, "weight_matching": ALIGNED},
    "one-path-no-accuracy": {**NAIVE, "accuracy": None, "path": "naive"},
    "three-paths": {"naive": NAIVE, "weight_matching": ALIGNED,
                    "bezier": _path([0.107, 0.12, 0.13, 0.13, 0.12, 0.11, 0.105, 0.1, 0.1, 0.098, 0.096], None, 0.025)},
}


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMPARISONS))
def test_comparison_plot_has_no_overlaps(name):
    import matplotlib.pyplot as plt

    from fusion.compare import plot_figure

    report = COMPARISONS[name]
    fig = plot_figure(report)
    try:
        assert layout_problems(fig) == []
        labels = [t.get_text() for ax in fig.axes for t in ax.texts]
        for r in report["rows"]:  # every model named once per panel
            assert sum(r["name"] in s.split(", ") for s in labels) == len(report["latency_setup"]["batch_sizes"]), r["name"]
        for ax in fig.axes:  # the latency axis is labelled, in plain numbers
            ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
            assert len(ticks) >= 2 and all(re.fullmatch(r"[0-9.e+-]+", s) for s in ticks), ticks
    finally:
        plt.close(fig)


def test_comparison_plot_of_a_real_build(tiny_bundle):
    import matplotlib.pyplot as plt

    from fusion.compare import plot_figure

    comparison = json.loads((tiny_bundle / "manifest.json").read_text())["comparison"]
    assert comparison and comparison["rows"], "the tiny bundle's build ran no comparison"
    fig = plot_figure(comparison)
    try:
        assert layout_problems(fig) == []
    finally:
        plt.close(fig)


@pytest.mark.parametrize("name", list(PATHS))
def test_barrier_plot_legend_clear_of_the_curves(name):
    from fusion.connectivity import path_figure

    fig = path_figure(PATHS[name], title="mlp_0 -> mlp_1 (test split)")
    assert layout_problems(fig) == []
    legend = _legend_of(fig)
    entries = [t.get_text() for t in legend.get_texts()]
    series = PATHS[name] if "loss" not in PATHS[name] else {"naive": PATHS[name]}
    assert entries == [f"{k} (barrier {v['barrier']:.3f})" for k, v in series.items()]


def test_the_checker_sees_overlaps():
    """The measuring catches what the issue saw: labels over labels, colliding tick labels, a legend
    over a curve (the old barrier plot's legend inside the loss panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(NAIVE["lambdas"], NAIVE["loss"], marker="o", label="naive (barrier 0.339)")
    ax.plot(ALIGNED["lambdas"], ALIGNED["loss"], marker="o", label="weight_matching (barrier 0.006)")
    ax.legend(loc="center right")
    ax.annotate("merged", (0.5, 0.2))
    ax.annotate("mlp_3, mlp_4", (0.51, 0.2))
    problems = layout_problems(fig)
    assert any("'merged' overlaps text 'mlp_3, mlp_4'" in p for p in problems), problems
    assert any("legend" in p and "covers a line" in p for p in problems), problems

    fig = Figure(figsize=(1.6, 2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0.25, 0.45], [1, 2], "o")
    ax.set_xscale("log")  # matplotlib's own minor labels on a short log axis: "3×10⁻¹" against "4×10⁻¹"
    problems = layout_problems(fig)
    assert any(re.search(r"3\W*times10\^\{-1\}.* overlaps text .*4\W*times10\^\{-1\}", p) for p in problems), problems


def test_log_ticks_stay_readable_at_any_span():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from fusion.plot_labels import log_ticks

    for lo, hi in [(0.027, 0.16), (0.07, 2.3), (1e-4, 10.0), (1e-9, 1e3), (0.101, 0.104), (3.0, 3.3)]:
        fig = Figure(figsize=(4, 2.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot([lo, hi], [0, 1], "o")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = log_ticks(ax, "x")
        assert 2 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks), (lo, hi, ticks)
        assert layout_problems(fig) == [], (lo, hi)
        values = [float(t.get_text()) for t in ax.get_xticklabels() if t.get_text()]
        assert values == pytest.approx(ticks, rel=5e-3), (lo, hi)  # plain numbers that read as the ticks
