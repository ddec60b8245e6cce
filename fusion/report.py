"""`fusion report`: a bundle's offline comparison as one self-contained HTML file.

The comparison comes from the manifest's `comparison` (written by `fusion build` / `fusion compare`,
see fusion/compare.py), else from `comparison.json` beside it; the plot (`comparison.png`) is
embedded as base64, after its sha256 is checked against the manifest's `comparison.artifacts` when
listed there. The file loads nothing: inline CSS, no scripts, no links out. A bundle without a
comparison still gets a report: the offline metrics its manifest records per model, and a note
saying how to add the comparison.

The table is read the same way as the dashboard does (`service/ui/app.js`, `readComparison`), so
both print the same figures: the columns of `fusion compare` (accuracy with its 95 % interval, NLL,
ECE, agreement, McNemar, size, latency per batch size) formatted as in comparison.md, and any other
per-model field flattened into columns of its own (integers as they are, floats to 4 significant
digits). This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fusion.bundle import MANIFEST, read_manifest_json, sha256_bytes
from fusion.errors import IntegrityError, ManifestError

ROW_KEYS = ("rows", "table", "models", "variants", "entries", "results")
NAME_KEYS = ("name", "variant", "model")
HIDDEN = {"file", "accuracy_ci95"}  # shown elsewhere (accuracy) or not worth a column
PLOT = "comparison.png"
DIVERSITY_PLOT = "diversity.png"  # the members' pairwise diversity heat maps (fusion/diversity.py), when written
COMPARISON_JSON = "comparison.json"


@dataclass(frozen=True)
class Table:
    """A table ready to print: `columns` headers (after the name column), `rows` as (name, cells)."""

    columns: list[str]
    rows: list[tuple[str, list[str]]]


@dataclass(frozen=True)
class Comparison:
    """A comparison read for display: the main table, notes (label, text) and further tables (title, table)."""

    table: Table
    notes: list[tuple[str, str]] = field(default_factory=list)
    extra: list[tuple[str, Table]] = field(default_factory=list)


# ---- reading the bundle -------------------------------------------------------------------------


def read_manifest(bundle: str | Path) -> dict:
    """The raw manifest JSON of a bundle directory (the report parses no model file, so none is hashed)."""
    return read_manifest_json(bundle)


def load_comparison(bundle: str | Path, manifest: dict | None = None) -> tuple[dict | None, str]:
    """(comparison, where it came from): the manifest's `comparison`, else `comparison.json`, else (None, "")."""
    manifest = read_manifest(bundle) if manifest is None else manifest
    comparison = manifest.get("comparison")
    if isinstance(comparison, dict) and comparison:
        return comparison, f"{MANIFEST} (comparison)"
    path = Path(bundle) / COMPARISON_JSON
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and data:
            return data, COMPARISON_JSON
    return None, ""


def read_plot(bundle: str | Path, comparison: dict | None, name: str = PLOT) -> bytes | None:
    """The bytes of `name` (`comparison.png`) in the bundle directory (None when absent), checked against the
    sha256 the comparison lists for it under `artifacts`, when it lists one."""
    path = Path(bundle) / name
    if not path.is_file():
        return None
    data = path.read_bytes()
    expected = ((comparison or {}).get("artifacts") or {}).get(name)
    if isinstance(expected, str) and sha256_bytes(data) != expected:
        raise IntegrityError(f"{path}: sha256 mismatch: the manifest says {expected}, the file has {sha256_bytes(data)}")
    return data


# ---- formatting ---------------------------------------------------------------------------------


def _isnum(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_number(x: float | int) -> str:
    """Integers as they are; floats to 4 significant digits (1000 and above: rounded to an integer)."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if float(x).is_integer():
        return str(int(x))
    if abs(x) >= 1000:
        return str(math.floor(x + 0.5))  # halves up, like JavaScript's Math.round
    return f"{x:.4g}"


def fmt_cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (bool, int, float)):
        return fmt_number(v)
    if isinstance(v, list):
        if len(v) == 2 and all(_isnum(x) for x in v):
            return f"[{fmt_number(v[0])}, {fmt_number(v[1])}]"
        return ", ".join(fmt_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _fixed(x, digits: int, scale: float = 1.0) -> str:
    return f"{x * scale:.{digits}f}" if _isnum(x) else "—"


def _label(key: str) -> str:
    return key.replace("_", " ")


# ---- reading a comparison into tables -----------------------------------------------------------


def _flatten(obj: dict, prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    for k, v in obj.items():
        if isinstance(v, dict):
            _flatten(v, f"{prefix}{k} ", out)
        else:
            out[f"{prefix}{k}"] = v
    return out


def _records(value) -> list[tuple[str, dict]] | None:
    """(name, fields) per model from a list of objects with a name, or from name -> object."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        out = []
        for r in value:
            key = next((k for k in NAME_KEYS if k in r), None)
            out.append((str(r[key]) if key else "", {k: v for k, v in r.items() if k != key}))
        return out
    if isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
        return [(str(name), r) for name, r in value.items()]
    return None


def _generic_table(records: list[tuple[str, dict]]) -> Table:
    flat = [(name, _flatten(r)) for name, r in records]
    columns: list[str] = []
    for _, cells in flat:
        columns += [k for k in cells if k not in columns]
    return Table([_label(c) for c in columns], [(name, [fmt_cell(cells.get(c)) for c in columns]) for name, cells in flat])


def _batches(records: list[tuple[str, dict]]) -> list[str]:
    keys = {b for _, r in records if isinstance(r.get("latency_ms"), dict) for b in r["latency_ms"]}
    return sorted(keys, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))


def _model_table(c: dict, records: list[tuple[str, dict]]) -> Table:
    """The `fusion compare` columns (as in comparison.md) for the fields present, then any other field."""
    ref = str(c.get("reference", "ensemble"))
    bins = c.get("ece_bins")
    batches = _batches(records)

    def accuracy(r):
        a, ci = r.get("accuracy"), r.get("accuracy_ci95")
        if not _isnum(a):
            return fmt_cell(a)
        if isinstance(ci, list) and len(ci) == 2 and all(_isnum(x) for x in ci):
            return f"{100 * a:.2f} ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})"
        return f"{100 * a:.2f}"

    def mcnemar(r):
        m = r.get("mcnemar")
        if isinstance(m, dict) and _isnum(m.get("p_value")):
            return f"{m.get('b', '?')}/{m.get('c', '?')}, {m['p_value']:.3g}"
        return fmt_cell(m)

    def latency(b):
        def get(r):
            v = (r.get("latency_ms") or {}).get(b)
            if isinstance(v, dict) and _isnum(v.get("median_ms")) and _isnum(v.get("p99_ms")):
                return f"{v['median_ms']:.3f} / {v['p99_ms']:.3f}"
            return fmt_cell(v)
        return get

    b1 = batches[0] if batches else "1"
    known = [
        ("kind", "kind", lambda r: fmt_cell(r.get("kind"))),
        ("accuracy", "accuracy % (95 % CI)", accuracy),
        ("nll", "NLL", lambda r: _fixed(r.get("nll"), 4)),
        ("ece", f"ECE ({bins} bins)" if _isnum(bins) else "ECE", lambda r: _fixed(r.get("ece"), 4)),
        ("agreement", f"agree % w/ {ref}", lambda r: _fixed(r.get("agreement"), 2, 100)),
        ("mcnemar", "McNemar b/c, p", mcnemar),
        ("n_parameters", "params", lambda r: f"{r['n_parameters']:,}" if isinstance(r.get("n_parameters"), int) else fmt_cell(r.get("n_parameters"))),
        ("flops_per_sample", "MFLOPs/sample", lambda r: "n/a" if r.get("flops_per_sample") is None else _fixed(r["flops_per_sample"], 3, 1e-6)),
        ("size_bytes", "ONNX KiB", lambda r: _fixed(r.get("size_bytes"), 1, 1 / 1024)),
        *[("latency_ms", f"b={b} median / p99 ms", latency(b)) for b in batches],
        ("latency_vs_reference_b1", f"b={b1} latency ÷ {ref}", lambda r: _fixed(r.get("latency_vs_reference_b1"), 3)),
    ]
    present = {k for _, r in records for k in r}
    specs = [(h, f) for k, h, f in known if k in present]
    known_keys = {k for k, _, _ in known} | HIDDEN
    others: list[str] = []
    for _, r in records:
        for k, v in _flatten({k: v for k, v in r.items() if k not in known_keys}).items():
            if k not in others:
                others.append(k)
    columns = [h for h, _ in specs] + [_label(k) for k in others]
    rows = []
    for name, r in records:
        flat = _flatten({k: v for k, v in r.items() if k not in known_keys})
        rows.append((name, [f(r) for _, f in specs] + [fmt_cell(flat.get(k)) for k in others]))
    return Table(columns, rows)


def read_comparison(c: dict) -> Comparison:
    """A comparison (manifest `comparison` or comparison.json) as tables and notes.

    The models are the first of `rows`/`table`/`models`/`variants`/`entries`/`results` that holds a
    list of named objects (or name -> object), else any such field, else the comparison itself.
    """
    records, used = None, None
    for key in (*ROW_KEYS, *c):
        if key in c and (records := _records(c[key])):
            used = key
            break
    if records is None and (records := _records(c)):
        used = "*"
    notes: list[tuple[str, str]] = []
    extra: list[tuple[str, Table]] = []
    if used != "*":
        for k, v in c.items():
            if k in (used, "artifacts"):
                continue
            if isinstance(v, dict) and isinstance(v.get("rows"), (dict, list)) and (sub := _records(v["rows"])):
                extra.append((_label(k) + "".join(f", {_label(a)} {fmt_cell(b)}" for a, b in v.items() if a != "rows" and not isinstance(b, (dict, list))),
                              _generic_table(sub)))
            elif isinstance(v, dict):
                notes += [(f"{_label(k)}: {_label(a)}", fmt_cell(b)) for a, b in _flatten(v).items()]
            elif v is not None and not (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
                notes.append((_label(k), fmt_cell(v)))
    return Comparison(_model_table(c, records or []), notes, extra)


def manifest_table(manifest: dict) -> Table:
    """The offline metrics the manifest records per variant and member (the table without a comparison)."""
    records = []
    for section in ("variants", "members"):
        for name, e in (manifest.get(section) or {}).items():
            if isinstance(e, dict):
                records.append((name, {"kind": e.get("kind"), **(e.get("metrics") or {}), "n_parameters": e.get("n_parameters")}))
    return _generic_table(records)


# ---- rendering ----------------------------------------------------------------------------------

CSS = """
body { margin: 0 auto; max-width: 1400px; padding: 24px; color: #1d2430; background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.muted { color: #6b7280; } code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; }
.note { background: #fffbeb; border: 1px solid #fde68a; border-radius: 8px; padding: 8px 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table { font-size: 13px; }
th, td { padding: 6px 9px; border-bottom: 1px solid #e3e6eb; text-align: right; white-space: nowrap; }
th { font-size: 12px; color: #6b7280; font-weight: 600; white-space: normal; vertical-align: bottom; }
th:first-child, td:first-child { text-align: left; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; font-size: 13px; }
dt { color: #6b7280; } dd { margin: 0; }
img { max-width: 100%; border: 1px solid #e3e6eb; border-radius: 6px; }
"""


def table_html(table: Table, first: str = "model") -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "\n".join(
        f'<tr data-model="{esc(name)}"><td>{esc(name)}</td>' + "".join(f"<td>{esc(v)}</td>" for v in cells) + "</tr>"
        for name, cells in table.rows
    )
    return f'<div class="scroll"><table>\n<thead><tr><th>{esc(first)}</th>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def render_html(bundle: str | Path) -> str:
    """The report for a bundle directory as one HTML string (no external reference of any kind)."""
    esc = html.escape
    manifest = read_manifest(bundle)
    comparison, source = load_comparison(bundle, manifest)
    version = str(manifest.get("bundle_version", "?"))
    parts = [
        f"<h1>Offline comparison · bundle <code>{esc(version)}</code></h1>",
        f'<p class="muted">task {esc(str(manifest.get("task", "?")))} · bundle created {esc(str(manifest.get("created", "?")))}'
        f" · report written {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        + (f" · from {esc(source)}" if source else "") + "</p>",
    ]
    if comparison is None:
        parts += [
            '<p class="note">This bundle has no offline comparison yet: <code>fusion build</code> runs it '
            "(or <code>fusion compare --bundle DIR --out-dir DIR</code>) and adds the table and the "
            "accuracy-vs-latency plot. Below: the offline metrics recorded in the manifest.</p>",
            "<h2>Offline metrics in the manifest</h2>", table_html(manifest_table(manifest)),
        ]
    else:
        c = read_comparison(comparison)
        parts.append("<h2>Comparison</h2>")
        parts.append(table_html(c.table) if c.table.rows else '<p class="note">The comparison has no table rows.</p>')
        for title, t in c.extra:
            parts += [f"<h2>{esc(title)}</h2>", table_html(t)]
    warning = ((manifest.get("ensemble_selection") or {}).get("gate") or {}).get("warning")
    if warning:  # `fusion build`'s gate: the ensemble does not beat its best member on validation
        parts.insert(2, f'<p class="note" id="ensemble-warning"><strong>Warning:</strong> {esc(warning)}.</p>')
    png = read_plot(bundle, comparison)
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts += ["<h2>Accuracy vs latency</h2>", f'<img alt="offline comparison plot" src="data:image/png;base64,{data}">']
    div_png = read_plot(bundle, comparison, DIVERSITY_PLOT) if comparison is not None and comparison.get("diversity") else None
    if div_png is not None:
        data = base64.b64encode(div_png).decode("ascii")
        parts += ["<h2>Member diversity</h2>", f'<img alt="member diversity heat maps" src="data:image/png;base64,{data}">']
    if comparison is not None and c.notes:
        parts.append("<h2>Setup</h2><dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in c.notes) + "</dl>")
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        f"<title>fusion-serve · offline comparison · {esc(version)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_report(bundle: str | Path, out: str | Path) -> Path:
    """Render the report for `bundle` into `out` (parent directories created, written atomically)."""
    text = render_html(bundle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
