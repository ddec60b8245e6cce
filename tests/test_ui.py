"""The A/B dashboard (`GET /ui`) end to end in headless Chromium against a real server, and `fusion report`.

The browser tests drive the Debian `chromium` (/usr/bin/chromium) with Python `playwright` (no
`playwright install`: its own browser download is never used) and skip, saying why, where either is
missing; `make test` installs Chromium where it can. Every request the page makes must stay on the
server's origin (the machine has no internet; the page must not need it). The dashboard runs the
README's setup (ensemble / distilled / cascade at 40 / 40 / 20 %, the ensemble as shadow, each of the
450 test digits sent once and labelled) and no text on it may be cut, at a wide and a narrow window.

The screenshot lands in test-artifacts/ui.png. The README's docs/ui.png is the same screenshot of the
default bundle:

    FUSION_UI_BUNDLE=artifacts/bundle FUSION_UPDATE_SCREENSHOT=1 \
        .venv/bin/python -m pytest tests/test_ui.py -k verdict

(FUSION_UI_BUNDLE: serve that bundle instead of the tiny test one; FUSION_UPDATE_SCREENSHOT=1: also
write docs/ui.png.)
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server import ROOT, Server

CHROMIUM = Path(os.environ.get("FUSION_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "ui.png"
TOKEN = "ui-test-token-7f3a"
ROWS_PER_REQUEST = 4
WIDE, NARROW = {"width": 1500, "height": 1000}, {"width": 820, "height": 1000}


def _browser_missing() -> str | None:
    import importlib.util

    if not CHROMIUM.exists():
        return (f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium chromium-driver` as root "
                "(`make test` does it where it can)")
    if importlib.util.find_spec("playwright") is None:
        return ("Python package `playwright` not installed: pip install -e '.[dev]' (it drives /usr/bin/chromium; "
                "no `playwright install` needed)")
    return None


# checked before any fixture is built, so that a machine without a browser skips at once
needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
N_REQUESTS = 60


# ---- bundles ------------------------------------------------------------------------------------


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def compared_bundle(tiny_bundle, digits, tmp_path_factory) -> Path:
    """The tiny bundle with its offline comparison (added here, as `fusion build` does, when the
    build did not run it); FUSION_UI_BUNDLE names another bundle (the README's screenshot)."""
    if os.environ.get("FUSION_UI_BUNDLE"):
        chosen = Path(os.environ["FUSION_UI_BUNDLE"]).resolve()
        assert (chosen / "manifest.json").is_file(), f"FUSION_UI_BUNDLE: expected a bundle directory; got {chosen}"
        assert _manifest(chosen).get("comparison"), f"FUSION_UI_BUNDLE: expected a bundle with its comparison; {chosen} has none"
        return chosen
    m = _manifest(tiny_bundle)
    if m.get("comparison") and (tiny_bundle / "comparison.png").is_file():
        return tiny_bundle
    from fusion.bundle import read_bundle, sha256_file
    from fusion.compare import CompareConfig, compare_models, write_report

    out = tmp_path_factory.mktemp("compared") / "bundle"
    shutil.copytree(tiny_bundle, out)
    b = read_bundle(out)
    report = compare_models(out, b.manifest, digits, CompareConfig(rounds=5, warmup=1))
    paths = write_report(report, out)
    m["comparison"] = {**report, "artifacts": {p.name: sha256_file(p) for p in paths.values()}}
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


GATE_WARNING = "the ensemble does not beat its best member mlp_0 on validation (a test); consider serving mlp_0 alone"


@pytest.fixture(scope="module")
def plain_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle without any comparison (manifest field and files removed), whose build gate warned
    (a known warning written into `ensemble_selection`, the bundle version recomputed as the build does)."""
    from fusion.bundle import manifest_version

    out = tmp_path_factory.mktemp("plain") / "bundle"
    shutil.copytree(tiny_bundle, out)
    m = _manifest(out)
    m["comparison"] = None
    m["ensemble_selection"]["gate"]["warning"] = GATE_WARNING
    m["bundle_version"] = manifest_version(m)
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        (out / name).unlink(missing_ok=True)
    return out


# ---- the browser --------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """A Chromium context with a new, empty profile; yields (context, record) where record() lists the
    URLs requested so far. Requests off the local server are aborted (and recorded)."""
    if (missing := _browser_missing()) is not None:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    urls: list[str] = []

    def guard(route):
        url = route.request.url
        urls.append(url)
        if url.startswith(("http://127.0.0.1:", "blob:http://127.0.0.1:", "data:")):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=WIDE,
        )
        ctx.route("**/*", guard)
        try:
            yield ctx, lambda: list(urls)
        finally:
            ctx.close()


def _open(ctx, url: str):
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def _cells(page, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(selector, "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))")


def _assert_local_only(urls: list[str], srv: Server) -> None:
    off = [u for u in urls if not (u.startswith(srv.url + "/") or u.startswith("blob:" + srv.url + "/") or u.startswith("data:"))]
    assert not off, f"the page requested something off the server: {off}"


# ---- traffic ------------------------------------------------------------------------------------


def _send_traffic(client: httpx.Client, digits, n: int,
                  rows: int = ROWS_PER_REQUEST) -> tuple[dict[str, int], list[tuple[str, list[int]]]]:
    """n keyed requests of `rows` test rows; returns requests per variant and (request_id, labels)."""
    counts: dict[str, int] = {}
    sent = []
    for i in range(n):
        lo = (i * rows) % (len(digits.X_test) - rows + 1)
        r = client.post("/predict", json={"inputs": digits.X_test[lo:lo + rows].tolist(), "routing_key": f"user-{i}"})
        assert r.status_code == 200, r.text
        body = r.json()
        counts[body["variant"]] = counts.get(body["variant"], 0) + 1
        sent.append((body["request_id"], [int(y) for y in digits.y_test[lo:lo + rows]]))
    return counts, sent


def _wait_shadows(client: httpx.Client, variant: str, deadline_s: float = 20.0) -> dict:
    """The report once every row of `variant` has been compared with its ensemble shadow."""
    deadline = time.monotonic() + deadline_s
    while True:
        report = client.get("/ab/report").json()
        v = report["variants"][variant]
        if v["compared_rows"] == v["rows"] or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# Elements whose text the page cuts: overflow hidden/clip or an active ellipsis with content wider
# (or taller) than the box, and anything wider than the summary card it sits in. Read from the DOM.
CUT_TEXT_JS = """() => {
  const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.dataset.variant ? `[data-variant=${e.dataset.variant}]` : "")
    + (e.className && typeof e.className === "string" ? "." + e.className.trim().split(/\\s+/).join(".") : "");
  const out = [];
  for (const e of document.querySelectorAll("body *")) {
    if (e.closest("svg") || !e.getClientRects().length) continue;
    const cs = getComputedStyle(e);
    const wide = e.scrollWidth > e.clientWidth + 1, tall = e.scrollHeight > e.clientHeight + 1;
    const clips = (v) => v === "hidden" || v === "clip";
    if ((clips(cs.overflowX) && wide) || (clips(cs.overflowY) && tall) || (cs.textOverflow === "ellipsis" && wide))
      out.push(`${name(e)}: content ${e.scrollWidth}x${e.scrollHeight} px in a ${e.clientWidth}x${e.clientHeight} px box: "${e.textContent.trim().slice(0, 80)}"`);
  }
  for (const card of document.querySelectorAll(".card")) {
    const box = card.getBoundingClientRect();
    for (const e of card.querySelectorAll("*")) {
      const r = e.getBoundingClientRect();
      if (r.width && (r.left < box.left - 1 || r.right > box.right + 1))
        out.push(`${name(e)} spills out of its card: [${r.left}, ${r.right}] outside [${box.left}, ${box.right}]`);
    }
  }
  return out;
}"""


def _assert_texts_whole(page, expected: dict[str, str]) -> None:
    """Nothing on the page is cut, and each selector's text is there in full."""
    cut = page.evaluate(CUT_TEXT_JS)
    assert cut == [], "text cut on the dashboard:\n" + "\n".join(cut)
    for selector, text in expected.items():
        got = page.locator(selector).text_content()
        assert text in got, f"{selector}: expected the whole text {text!r}; got {got!r}"
        fits = page.eval_on_selector(selector, "e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
        assert fits, f"{selector} does not fit its box"


# ---- the dashboard ------------------------------------------------------------------------------


@needs_browser
@pytest.mark.server
def test_dashboard_with_token_shows_variants_and_verdict(browser, compared_bundle, digits):
    from playwright.sync_api import expect

    from fusion.report import read_comparison

    ctx, requested = browser
    manifest = _manifest(compared_bundle)
    cheap = "distilled" if "distilled" in manifest["variants"] else "mlp_0"
    weights = {"ensemble": 0.4, cheap: 0.4, "cascade": 0.2}  # the README's setup
    env = {"FUSION_AB_WEIGHTS": ",".join(f"{k}={v}" for k, v in weights.items()), "FUSION_SHADOW": "ensemble",
           "FUSION_CASCADE": f"{cheap}:0.9", "FUSION_INFERENCE_TOKEN": TOKEN}
    others = [cheap, "cascade"]
    with Server(compared_bundle, env=env) as srv, httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        counts, sent = _send_traffic(c, digits, len(digits.X_test), rows=1)  # each test digit once
        assert set(counts) == set(weights), counts
        for name in others:
            _wait_shadows(c, name)

        # the page itself is open; the plot behind it needs the token like every data endpoint
        page_resp = httpx.get(srv.url + "/ui")
        assert page_resp.status_code == 200 and page_resp.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page_resp.headers["content-security-policy"]
        assert httpx.get(srv.url + "/ui/comparison.png").status_code == 401
        png = c.get("/ui/comparison.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content == (compared_bundle / "comparison.png").read_bytes()

        page, errors = _open(ctx, srv.url + "/ui")
        expect(page.locator("#status")).to_contain_text("needs a token", timeout=10_000)
        page.fill("#token", TOKEN)
        page.click("#token-apply")
        expect(page.locator("#status")).to_contain_text("live", timeout=10_000)
        assert page.input_value("#token") == "", "the typed token stays out of the field after use"

        # every variant with its request count, weights and bundle version
        expect(page.locator("#bundle-version")).to_have_text(manifest["bundle_version"])
        for name, n in counts.items():
            row = page.locator(f'#variants tr[data-variant="{name}"]')
            expect(row.locator('[data-col="requests"]')).to_have_text(str(n), timeout=10_000)
            expect(row.locator('[data-col="weight"]')).to_have_text(_pct(weights[name]))
            expect(row.locator('[data-col="p50"]')).not_to_have_text("—")
            expect(row.locator('[data-col="accuracy"]')).to_have_text("—")
            expect(page.locator(f'#weights-bar [data-variant="{name}"]')).to_have_count(1)
            expect(page.locator(f'#weights-key [data-variant="{name}"]')).to_have_text(f"{name} {100 * weights[name]:.0f} %")
            expect(page.locator(f'#latency-chart rect[data-variant="{name}"]')).to_have_count(3)
        report = c.get("/ab/report").json()
        for name in others:
            expect(page.locator(f'#variants tr[data-variant="{name}"] [data-col="agreement"]')).to_contain_text(
                _pct(report["variants"][name]["agreement_with_ensemble"]))

        # the offline table: the figures `fusion report` prints, and the plot
        table = read_comparison(manifest["comparison"]).table
        expect(page.locator("#comparison tbody tr")).to_have_count(len(table.rows), timeout=10_000)
        assert _cells(page, "#comparison tbody tr") == [[name, *cells] for name, cells in table.rows]
        expect(page.locator("#comparison-plot")).to_be_visible(timeout=10_000)
        assert page.eval_on_selector("#comparison-plot", "img => img.naturalWidth") > 100
        # the build gate's warning (manifest `ensemble_selection`, via /info) shows exactly when there is one
        warning = ((manifest.get("ensemble_selection") or {}).get("gate") or {}).get("warning")
        if warning:
            expect(page.locator("#ensemble-warning")).to_have_text(f"Warning: {warning}.")
        else:
            expect(page.locator("#ensemble-warning")).to_be_hidden()

        # labels arrive: accuracy and the verdicts follow
        for rid, labels in sent:
            r = c.post("/feedback", json={"request_id": rid, "labels": labels})
            assert r.status_code == 200, r.text
        report = c.get("/ab/report").json()
        verdicts = {name: report["variants"][name]["vs_ensemble"]["verdict"] for name in others}
        # every variant has labelled rows beside an ensemble shadow: the paired anytime-valid analysis
        # (whose decision may well still be `collecting` on a few hundred rows with a 1 pp margin)
        assert all(report["variants"][n]["vs_ensemble"]["analysis"] == "paired" for n in others), verdicts
        for name in counts:
            acc = report["variants"][name]["accuracy"]
            expect(page.locator(f'#variants tr[data-variant="{name}"] [data-col="accuracy"]')).to_contain_text(
                _pct(acc), timeout=10_000)
            expect(page.locator(f'#accuracy-chart circle[data-variant="{name}"]')).to_have_count(1)
        for name, verdict in verdicts.items():
            expect(page.locator(f'#variants tr[data-variant="{name}"] [data-col="verdict"]')).to_contain_text(verdict)
            expect(page.locator(f'#verdicts [data-variant="{name}"]')).to_contain_text(verdict)
            expect(page.locator(f'#agreement-chart path[data-variant="{name}"]')).to_have_count(1)
            # the confidence sequence over rows (vs_ensemble.history, from the store): both bounds, and the margin
            expect(page.locator(f'#cs-chart path[data-variant="{name}"][data-bound="low"]')).to_have_count(1)
            expect(page.locator(f'#cs-chart path[data-variant="{name}"][data-bound="high"]')).to_have_count(1)
        history = report["variants"][others[0]]["vs_ensemble"]["history"]
        assert history and history[-1]["analysis"] == "paired", history  # the report just read recorded its point
        threshold = report["variants"][others[0]]["vs_ensemble"]["threshold"]
        assert threshold == pytest.approx(-report["variants"][others[0]]["vs_ensemble"]["margin_pp"] / 100)
        expect(page.locator(f'#cs-chart line.threshold[data-threshold="{threshold}"]')).to_have_count(1)

        # no text cut: the verdicts (with their p-values) and the weights' names and shares, in full,
        # in a wide window and a narrow one
        page.wait_for_timeout(300)  # let the last poll's charts settle
        whole = {f'#verdicts [data-variant="{n}"]': f"{n}: {v}" for n, v in verdicts.items()}
        whole |= {f'#weights-key [data-variant="{n}"]': f"{n} {100 * w:.0f} %" for n, w in weights.items()}
        for size in (NARROW, WIDE):
            page.set_viewport_size(size)
            page.wait_for_timeout(100)
            _assert_texts_whole(page, whole)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
        if os.environ.get("FUSION_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(ARTIFACTS / "ui.png", DOCS_SCREENSHOT)

        assert errors == [], errors
        urls = requested()
        _assert_local_only(urls, srv)
        assert srv.url + "/ab/report" in urls and srv.url + "/info" in urls
        assert not any(TOKEN in u for u in urls), "the token never travels in a URL"


@needs_browser
@pytest.mark.server
def test_dashboard_open_server_without_comparison(browser, plain_bundle, digits):
    from playwright.sync_api import expect

    ctx, requested = browser
    with Server(plain_bundle) as srv, httpx.Client(base_url=srv.url) as c:
        counts, _ = _send_traffic(c, digits, 5)
        assert counts == {"ensemble": 5}

        plot = httpx.get(srv.url + "/ui/comparison.png")
        assert plot.status_code == 404 and "comparison plot" in plot.json()["error"]
        js = httpx.get(srv.url + "/ui/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert httpx.get(srv.url + "/ui/../manifest.json").status_code == 404

        page, errors = _open(ctx, srv.url + "/ui")
        expect(page.locator('#variants tr[data-variant="ensemble"] [data-col="requests"]')).to_have_text("5", timeout=10_000)
        expect(page.locator("#status")).to_contain_text("live")
        expect(page.locator("#offline-note")).to_contain_text("no offline comparison")
        expect(page.locator("#ensemble-warning")).to_have_text(f"Warning: {GATE_WARNING}.")
        expect(page.locator('#comparison tbody tr[data-model="ensemble"]')).to_have_count(1)  # the manifest's metrics
        expect(page.locator("#comparison-plot")).to_be_hidden()
        expect(page.locator("#escalation-detail")).to_contain_text("no cascade")
        assert errors == [], errors
        _assert_local_only(requested(), srv)


# ---- fusion report ------------------------------------------------------------------------------

EXTERNAL = re.compile(r"""(https?:)?//[A-Za-z0-9]|<script|<link|@import|url\(""", re.I)


def _report(bundle: Path, out: Path, capsys) -> tuple[int, str, str]:
    from fusion.cli import main

    code = main(["report", "--bundle", str(bundle), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_is_self_contained_with_the_table_and_plot(compared_bundle, tmp_path, capsys):
    from fusion.report import read_comparison

    code, out, _ = _report(compared_bundle, tmp_path / "r" / "report.html", capsys)
    assert code == 0 and "report.html" in out
    text = (tmp_path / "r" / "report.html").read_text()
    outside = EXTERNAL.search(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text))
    assert outside is None, f"the report refers outside itself: {outside}"
    comparison = _manifest(compared_bundle)["comparison"]
    for row in comparison["rows"]:  # the numbers, recomputed from the comparison itself
        lo, hi = row["accuracy_ci95"]
        assert f'<tr data-model="{row["name"]}">' in text
        assert f"{100 * row['accuracy']:.2f} ({100 * lo:.1f}–{100 * hi:.1f})" in text
        assert f"{row['nll']:.4f}" in text and f"{row['ece']:.4f}" in text and f"{row['n_parameters']:,}" in text
    for name, cells in read_comparison(comparison).table.rows:
        assert all(f"<td>{v}</td>" in text for v in cells), name
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m and base64.b64decode(m.group(1)) == (compared_bundle / "comparison.png").read_bytes()


def test_report_without_comparison_lists_manifest_metrics(plain_bundle, tmp_path, capsys):
    code, _, _ = _report(plain_bundle, tmp_path / "report.html", capsys)
    assert code == 0
    text = (tmp_path / "report.html").read_text()
    assert "no offline comparison" in text and "data:image/png" not in text
    assert f'<p class="note" id="ensemble-warning"><strong>Warning:</strong> {html.escape(GATE_WARNING)}.</p>' in text
    m = _manifest(plain_bundle)
    for name, e in {**m["variants"], **m["members"]}.items():
        assert f'<tr data-model="{name}">' in text
        assert f"{e['metrics']['test_accuracy']:.4g}" in text


def test_report_reads_comparison_json_and_checks_the_plot(compared_bundle, tmp_path, capsys):
    b = tmp_path / "bundle"
    shutil.copytree(compared_bundle, b)
    m = _manifest(b)
    comparison = m.pop("comparison")
    (b / "manifest.json").write_text(json.dumps({**m, "comparison": None}))
    (b / "comparison.json").write_text(json.dumps({k: v for k, v in comparison.items() if k != "artifacts"}))
    code, _, _ = _report(b, tmp_path / "a.html", capsys)
    assert code == 0 and "comparison.json" in (tmp_path / "a.html").read_text()

    # a plot that does not match the digest the manifest lists is refused
    (b / "manifest.json").write_text(json.dumps({**m, "comparison": comparison}))
    (b / "comparison.png").write_bytes(b"\x89PNG\r\n\x1a\n not the plot")
    code, _, err = _report(b, tmp_path / "b.html", capsys)
    assert code == 2 and "sha256 mismatch" in err and not (tmp_path / "b.html").exists()
    code, _, err = _report(tmp_path / "nowhere", tmp_path / "c.html", capsys)
    assert code == 2 and "manifest.json" in err


def test_report_reads_other_comparison_shapes():
    from fusion.report import read_comparison

    c = read_comparison({"split": "val", "models": {"a": {"acc": 0.912345, "lat": {"p50": 1.5}}, "b": {"acc": 1, "lat": {"p50": 12345.6}}}})
    assert c.table.columns == ["acc", "lat p50"]
    assert c.table.rows == [("a", ["0.9123", "1.5"]), ("b", ["1", "12346"])]
    assert c.notes == [("split", "val")]
    c = read_comparison({"results": [{"model": "x", "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6], "note": None}]})
    assert c.table.columns == ["accuracy % (95 % CI)", "note"] and c.table.rows == [("x", ["50.00 (40.0–60.0)", "—"])]


def test_page_and_report_read_comparisons_alike(compared_bundle, tmp_path):
    """service/ui/app.js `readComparison` (run in node) and fusion/report.py `read_comparison` agree."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: the browser test covers the real comparison")
    from fusion.report import read_comparison

    shapes = [
        _manifest(compared_bundle)["comparison"],
        {"split": "val", "models": {"a": {"acc": 0.912345, "lat": {"p50": 1.5e-7}}, "b": {"acc": 1, "lat": {"p50": 12345.6}}}},
        {"results": [{"model": "x", "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6], "mcnemar": {"b": 1, "c": 9, "p_value": 2.1e-5}}],
         "calibration": {"method": "temperature", "rows": {"x": {"temperature": 1.25, "ece_before": 0.031}}}},
    ]
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    script = tmp_path / "run.js"
    script.write_text(
        'const fs = require("fs");\n'
        "global.document = { addEventListener() {} };\n"
        "global.sessionStorage = { getItem() { return null; } };\n"
        f"const src = fs.readFileSync({json.dumps(str(ROOT / 'service/ui/app.js'))}, 'utf8') + '\\nmodule.exports = {{ readComparison }};';\n"
        "const m = new module.constructor(); m._compile(src, 'app.js');\n"
        f"const shapes = JSON.parse(fs.readFileSync({json.dumps(str(tmp_path / 'shapes.json'))}, 'utf8'));\n"
        "console.log(JSON.stringify(shapes.map((c) => m.exports.readComparison(c))));\n"
    )
    got = json.loads(subprocess.run([node, str(script)], capture_output=True, text=True, check=True, timeout=60).stdout)
    for js, shape in zip(got, shapes):
        py = read_comparison(shape)
        assert js["table"]["columns"] == py.table.columns
        assert js["table"]["rows"] == [[n, cells] for n, cells in py.table.rows]
        assert js["notes"] == [list(n) for n in py.notes]
        assert [[t, x["columns"], x["rows"]] for t, x in js["extra"]] == [[t, x.columns, [[n, c] for n, c in x.rows]] for t, x in py.extra]


def test_the_plot_is_read_and_checked_once_at_load(compared_bundle, tmp_path):
    """The served plot is the one the loaded version had: rebuilding the bundle in place (a new report, new
    latencies, the same bundle version) leaves a running server's plot as it was; a plot that does not match
    its manifest at load is not served, with the reason."""
    import shutil

    from fusion.errors import IntegrityError
    from service import runtime

    copy = tmp_path / "bundle"
    shutil.copytree(compared_bundle, copy)
    original = (copy / "comparison.png").read_bytes()
    loaded = runtime.load(copy)
    assert loaded.plot == original and loaded.plot_error is None
    (copy / "comparison.png").write_bytes(original + b"rebuilt")  # what an in-place rebuild does to the file
    assert loaded.plot == original
    again = runtime.load(copy)  # a version loaded after that: the mismatch is its answer, the model still loads
    assert again.plot is None and isinstance(again.plot_error, IntegrityError)
    assert "sha256 mismatch" in str(again.plot_error) and again.version == loaded.version
    # each call raises a new exception, and the stored one keeps no traceback: nothing grows per request
    raised = []
    for _ in range(3):
        with pytest.raises(IntegrityError) as err:
            again.comparison_plot()
        raised.append(err.value)
    assert len({id(e) for e in raised}) == 3 and again.plot_error.__traceback__ is None
    assert loaded.comparison_plot() == original
    (copy / "comparison.png").unlink()
    assert "no comparison plot" in str(runtime.load(copy).plot_error)


@pytest.mark.parametrize("comparison", ["a string", ["a", "list"], {"artifacts": ["a list"]}, {"artifacts": {"comparison.png": 5}}])
def test_a_comparison_of_another_shape_means_no_plot_never_a_refused_bundle(compared_bundle, tmp_path, comparison):
    """`comparison` is a report, outside the bundle version: whatever its shape, the bundle loads and serves."""
    import shutil

    import numpy as np

    from fusion.errors import UnknownNameError
    from service import runtime

    copy = tmp_path / "bundle"
    shutil.copytree(compared_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["comparison"] = comparison
    (copy / "manifest.json").write_text(json.dumps(manifest))
    loaded = runtime.load(copy)
    assert loaded.plot is None and isinstance(loaded.plot_error, UnknownNameError)
    assert loaded.predict("ensemble", np.zeros((1, loaded.manifest.input.n_features), np.float32)).shape[0] == 1


def test_a_plot_past_the_size_cap_or_not_a_regular_file_is_not_read(compared_bundle, tmp_path, monkeypatch):
    import os
    import shutil

    from fusion.errors import BundleError, FusionError
    from service import runtime, ui

    copy = tmp_path / "bundle"
    shutil.copytree(compared_bundle, copy)
    monkeypatch.setattr(ui, "MAX_PLOT_BYTES", 1000)
    assert "at most" in str(runtime.load(copy).plot_error)
    (copy / "comparison.png").unlink()
    os.mkfifo(copy / "comparison.png")  # not a regular file: no plot, and the load never waits on it
    loaded = runtime.load(copy)
    assert loaded.plot is None and isinstance(loaded.plot_error, FusionError)
    # one swapped in after the is_file() check: opened non-blocking, refused as not a regular file
    from fusion import bundle

    real = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: True if self.name == "comparison.png" else real(self))
    monkeypatch.setattr(bundle.Path, "is_file", Path.is_file)
    loaded = runtime.load(copy)
    assert loaded.plot is None and isinstance(loaded.plot_error, BundleError) and "regular file" in str(loaded.plot_error)
