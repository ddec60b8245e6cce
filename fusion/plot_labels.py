"""Readable matplotlib figures: point labels that never overlap, log-axis ticks that never collide.

`place_labels` is a deterministic cousin of adjustText's repulsion: each label tries offsets on
rings of growing radius around its point (right first, then left, above, below, the diagonals) and
takes the first one whose measured text box stays inside the axes and clear of every label placed
before it, every data marker and every line in `ax.lines`/`ax.collections` (a label without a
leader line must also sit nearer its own marker than any other); offsets beyond the first ring get
a thin leader line. (adjustText iterates repulsion forces with no guarantee of a clear result; this
search is deterministic, and tests/test_plot_layout.py checks the result.) Boxes are measured with
the figure's renderer, so the layout must be final first: `freeze_layout(fig)` runs the layout
engine once and turns it off (a later re-layout would move the axes under labels placed in display
units).

`log_ticks` labels a log axis at 1-2-3-5 or 1-2-5 steps (fewer when crowded, more when the axis
spans less than one step) in plain numbers ("0.03", "0.1", "2"), with unlabelled minor ticks:
matplotlib's default labels minor ticks as "3×10⁻¹", which collide on a short axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.path import Path as MplPath
from matplotlib.text import Text
from matplotlib.transforms import Bbox

# directions tried on each ring, in order of preference (degrees; 0 = right of the point)
ANGLES = (0, 180, 20, -20, 160, -160, 45, -45, 135, -135, 90, -90, 70, -70, 110, -110,
          10, -10, 170, -170, 30, -30, 150, -150, 60, -60, 120, -120, 80, -80, 100, -100)
RADII_PT = (5, 11, 20, 32, 46, 62, 80, 100, 125, 155, 190, 230, 280)  # ring radii, points
LEADER_FROM_PT = 5  # offsets beyond the first ring get a leader line back to the point
MARKER_HALF_PX = 4.5  # half the side of the box kept clear around each marker, pixels at 100 dpi
MARKER_CORE_PX = 2.5  # a leader line may graze another marker's edge, never its centre
GAP_PX = 1.5  # clearance between a label and anything else


def freeze_layout(fig: Figure) -> None:
    """Run the layout engine (tight / constrained) once and switch it off, so that axes keep the
    positions the labels are measured against."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


def _boxes_overlap(a: Bbox, b: Bbox, gap: float) -> bool:
    return a.x0 < b.x1 + gap and b.x0 < a.x1 + gap and a.y0 < b.y1 + gap and b.y0 < a.y1 + gap


def _line_paths(ax: Axes) -> list[MplPath]:
    """Every plotted line (and errorbar segment) of `ax` as a display-space path."""
    paths = []
    for line in ax.lines:
        if line.get_visible() and line.get_linestyle() not in ("None", "none", "", " "):
            paths.append(line.get_transform().transform_path(line.get_path()))
    for coll in ax.collections:
        if coll.get_visible() and hasattr(coll, "get_segments"):
            t = coll.get_transform()
            paths += [MplPath(t.transform(seg)) for seg in coll.get_segments() if len(seg) >= 2]
    return paths


def text_box(text: Text, renderer) -> Bbox:
    """The display-space box of a text's own glyphs: for an annotation without its arrow (an
    Annotation's get_window_extent includes the arrow; Text's alone needs the position updated)."""
    if hasattr(text, "update_positions"):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


def _distance(p: tuple[float, float], box: Bbox) -> float:
    """From a display point to the nearest point of a box (0 inside)."""
    return math.hypot(max(box.x0 - p[0], 0, p[0] - box.x1), max(box.y0 - p[1], 0, p[1] - box.y1))


def _crosses(paths: Sequence[MplPath], box: Bbox) -> bool:
    return any(p.intersects_bbox(box, filled=False) for p in paths)


def place_labels(ax: Axes, points: Sequence[tuple[float, float, str]], *, fontsize: float = 7) -> list:
    """Annotate (x, y, text) points of `ax` without overlaps; returns the annotations.

    Call after everything else is drawn on the figure and `freeze_layout(fig)`; a label that finds
    no free spot takes the one with the fewest conflicts (tests/test_plot_layout.py checks none do).
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0  # points -> pixels
    half = MARKER_HALF_PX * fig.dpi / 100.0
    frame = ax.get_window_extent(renderer)
    frame = Bbox.from_extents(frame.x0 + 2, frame.y0 + 2, frame.x1 - 2, frame.y1 - 2)
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    markers = [Bbox.from_extents(px - half, py - half, px + half, py + half) for px, py in anchors]
    core = MARKER_CORE_PX * fig.dpi / 100.0
    cores = [Bbox.from_extents(px - core, py - core, px + core, py + core) for px, py in anchors]
    paths = _line_paths(ax)
    placed: list[Bbox] = []
    leaders: list[MplPath] = []
    out = []
    # crowded points choose first: the open side of a cluster goes to the labels inside it
    crowd = [sum(math.dist(a, b) < 40 * scale for b in anchors) for a in anchors]
    order = sorted(range(len(points)), key=lambda i: (-crowd[i], -anchors[i][1], anchors[i][0]))
    for i in order:
        x, y, text = points[i]
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize,
                          annotation_clip=False)
        best = None
        for r in RADII_PT:
            for deg in ANGLES:
                dx, dy = r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))
                c = math.cos(math.radians(deg))
                ann.set_horizontalalignment("left" if c > 0.3 else "right" if c < -0.3 else "center")
                ann.set_verticalalignment("center" if abs(dy) < 0.5 * r else "bottom" if dy > 0 else "top")
                ann.xyann = (dx, dy)
                box = text_box(ann, renderer)  # the text alone, not an arrow
                if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
                    continue
                bad = sum(_boxes_overlap(box, o, GAP_PX) for o in [*markers, *placed])
                padded = box.padded(GAP_PX)
                bad += _crosses(paths, padded) + _crosses(leaders, padded)
                leader = None
                if r <= LEADER_FROM_PT:
                    # no leader line: the label must sit nearer its own marker than any other one
                    own = _distance(anchors[i], box)
                    bad += sum(_distance(a, box) < own for a in anchors if a != anchors[i])
                else:
                    end = (min(max(anchors[i][0], box.x0), box.x1), min(max(anchors[i][1], box.y0), box.y1))
                    leader = MplPath([anchors[i], end])
                    bad += sum(leader.intersects_bbox(o.padded(-0.5), filled=True) for o in placed)
                    bad += sum(leader.intersects_bbox(m, filled=True) for j, m in enumerate(cores)
                               if anchors[j] != anchors[i])
                if best is None or bad < best[0]:
                    best = (bad, r, deg, ann.get_horizontalalignment(), ann.get_verticalalignment(), leader, box)
                if bad == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # no spot inside the axes at all: beside the point
            best = (1, RADII_PT[0], 0, "left", "center", None, None)
        _, r, deg, ha, va, leader, box = best
        ann.remove()  # the probe; the label is made once, with its leader line when it has one
        arrow = None if leader is None else dict(arrowstyle="-", color="0.45", lw=0.6, shrinkA=0, shrinkB=2)
        ann = ax.annotate(text, (x, y), xytext=(r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))),
                          textcoords="offset points", fontsize=fontsize, ha=ha, va=va, arrowprops=arrow,
                          annotation_clip=False)
        if leader is not None:
            leaders.append(leader)
        if box is not None:
            placed.append(text_box(ann, renderer))
        out.append(ann)
    return out


def _nice_ticks(lo: float, hi: float, subs: Sequence[float]) -> list[float]:
    ticks = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        ticks += [s * 10.0**k for s in subs if lo <= s * 10.0**k <= hi]
    return ticks


def log_ticks(ax: Axes, axis: str = "x", *, max_labels: int = 7) -> list[float]:
    """Plain-number major ticks on a log `axis` of `ax` at 1-2-3-5 or 1-2-5 steps (1 per decade, then every
    other decade, when more than `max_labels` would show; 1…9 when fewer than two would); minor
    ticks stay, unlabelled. Returns the labelled positions. Call once the limits are final."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(a.get_view_interval())
    ticks = []
    for subs in ((1, 2, 3, 5), (1, 2, 5), (1,), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = _nice_ticks(lo, hi, subs)
        if 2 <= len(ticks) <= max_labels or (subs == (1,) and len(ticks) > max_labels):
            break
    while len(ticks) > max_labels:
        ticks = ticks[::2]
    if len(ticks) < 2:  # less than one 1…9 step wide: three evenly spaced values
        ticks = [lo * (hi / lo) ** f for f in (0.1, 0.5, 0.9)]
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    else:
        a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_major_locator(FixedLocator(ticks))
    a.set_minor_locator(LogLocator(subs=tuple(range(2, 10))))
    a.set_minor_formatter(NullFormatter())
    return ticks


__all__ = ["freeze_layout", "log_ticks", "place_labels", "text_box"]
