"""The A/B dashboard (`GET /ui`): static files served from this directory, and the bundle's offline plot.

The page is plain HTML + vanilla JavaScript (no build step, no third-party code, no external
requests: its Content-Security-Policy allows only this origin). It polls `/ab/report` and reads
`/info` with the bearer token typed into the page; the token stays in the browser tab.
"""

from __future__ import annotations

from pathlib import Path

from fusion.bundle import sha256_bytes
from fusion.errors import IntegrityError, UnknownNameError

HERE = Path(__file__).resolve().parent

# URL path -> (file in this directory, media type). A fixed table: no path reaches the filesystem.
FILES: dict[str, tuple[str, str]] = {
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PLOT = "comparison.png"  # what `fusion compare` / `fusion build` write next to manifest.json


def asset(path: str) -> tuple[bytes, str]:
    """The bytes and media type of a dashboard file by its URL path (one of FILES)."""
    name, media = FILES[path]
    return (HERE / name).read_bytes(), media


MAX_PLOT_BYTES = 16 << 20  # a comparison plot is ~100 KB; more is not read


def comparison_plot(bundle_dir: str | Path, comparison) -> bytes:
    """`comparison.png` of a bundle, checked against the sha256 the manifest's comparison lists for it
    (`artifacts`); UnknownNameError (404) when the bundle has none. `comparison` is not part of the bundle
    version and so not validated with it: any shape that is not the expected one means no plot. The file is
    opened as a regular file (never through a link out of the bundle, never a FIFO) and read up to
    MAX_PLOT_BYTES."""
    artifacts = comparison.get("artifacts") if isinstance(comparison, dict) else None
    expected = artifacts.get(PLOT) if isinstance(artifacts, dict) else None
    if not (Path(bundle_dir) / PLOT).is_file() or not isinstance(expected, str):
        raise UnknownNameError(f"this bundle has no comparison plot ({PLOT}) with a digest in its manifest; `fusion build` or `fusion compare` writes one")
    from fusion.bundle import _open_regular, _safe_path

    with _open_regular(_safe_path(Path(bundle_dir), PLOT), PLOT) as fh:
        data = fh.read(MAX_PLOT_BYTES + 1)
    if len(data) > MAX_PLOT_BYTES:
        raise IntegrityError(f"{PLOT}: expected at most {MAX_PLOT_BYTES >> 20} MiB; got more; the plot is not served")
    if sha256_bytes(data) != expected:
        raise IntegrityError(f"{PLOT}: sha256 mismatch with the manifest's comparison; the plot is not served")
    return data
