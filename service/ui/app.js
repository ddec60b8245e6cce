// fusion-serve A/B dashboard: polls /ab/report every 2 s and reads /info for the offline comparison.
// Vanilla JS, no dependencies, no external requests. Every server string is set with textContent.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150; // agreement points kept per variant (5 minutes at 2 s)
const TOKEN_KEY = "fusion-serve-token";
const COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9", "#db2777", "#65a30d"];
const SVG = "http://www.w3.org/2000/svg";

const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  version: null, // bundle version whose /info was last rendered
  colors: {}, // variant -> colour, stable for the page's life
  history: {}, // variant -> [[time_ms, agreement]]
  timer: null,
  gen: 0, // the latest poll; an older one in flight does not schedule another
  plotUrl: null,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function colorOf(name) {
  if (!(name in state.colors)) state.colors[name] = COLORS[Object.keys(state.colors).length % COLORS.length];
  return state.colors[name];
}

// ---- formatting ---------------------------------------------------------------------------------

const isNum = (x) => typeof x === "number" && Number.isFinite(x);
const pct = (x, digits = 1) => (isNum(x) ? (100 * x).toFixed(digits) + " %" : "—");
function ms(x) {
  if (!isNum(x)) return "—";
  return x < 1 ? x.toFixed(3) : x < 10 ? x.toFixed(2) : x < 1000 ? x.toFixed(1) : x.toFixed(0);
}
// Python's format(x, ".{p}g"), so that the page and `fusion report` print the same figures.
function gfmt(x, p) {
  if (x === 0) return "0";
  const [m, e] = x.toExponential(p - 1).split("e");
  const exp = Number(e);
  const strip = (s) => (s.includes(".") ? s.replace(/\.?0+$/, "") : s);
  if (exp < -4 || exp >= p) return strip(m) + "e" + (exp < 0 ? "-" : "+") + String(Math.abs(exp)).padStart(2, "0");
  return strip(x.toFixed(Math.max(0, p - 1 - exp)));
}
// Generic numbers of the offline table: integers as they are, floats to 4 significant digits
// (the same rule as fusion/report.py `fmt_number`).
function num(x) {
  if (Number.isInteger(x)) return String(x);
  if (Math.abs(x) >= 1000) return Math.round(x).toString();
  return gfmt(x, 4);
}
function cell(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (isNum(v)) return num(v);
  if (Array.isArray(v)) {
    if (v.length === 2 && v.every(isNum)) return "[" + num(v[0]) + ", " + num(v[1]) + "]";
    return v.map(cell).join(", ");
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
function duration(s) {
  if (!isNum(s)) return "—";
  if (s < 60) return Math.floor(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

// ---- fetching -----------------------------------------------------------------------------------

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function get(path) {
  const r = await fetch(path, { headers: authHeaders(), cache: "no-store", credentials: "omit" });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return r;
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + kind;
}

async function poll() {
  clearTimeout(state.timer);
  const gen = ++state.gen;
  try {
    const report = await (await get("/ab/report")).json();
    renderReport(report);
    if (report.bundle_version !== state.version) await loadInfo(report.bundle_version);
    setStatus("live · updated " + new Date().toLocaleTimeString(), "ok");
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      setStatus("this server needs a token: type the inference token above (" + err.message + ")", "error");
      if (state.version === null) $("offline-note").textContent = "waiting for a token to read /info";
    } else {
      setStatus("cannot read /ab/report: " + err.message, "error");
    }
  } finally {
    if (gen === state.gen) state.timer = setTimeout(poll, POLL_MS);
  }
}

// ---- live report --------------------------------------------------------------------------------

function variantNames(report) {
  const names = new Set([...Object.keys(report.variants || {}), ...Object.keys((report.routing || {}).weights || {})]);
  return [...names].sort((a, b) => (a === "ensemble" ? -1 : b === "ensemble" ? 1 : a.localeCompare(b)));
}

// the anytime-valid decision (fusion/sequential.py): valid however often this page re-reads it
function verdictClass(vs) {
  const d = vs && vs.decision;
  if (!d) return "verdict-none";
  if (d === "superior" || d.startsWith("non-inferior")) return "verdict-better";
  if (d.startsWith("inferior")) return "verdict-worse";
  return "verdict-collecting";
}

function renderReport(report) {
  const routing = report.routing || {};
  const weights = routing.weights || {};
  const shadow = routing.shadow || [];
  const cascade = routing.cascade;
  const variants = report.variants || {};
  const names = variantNames(report);
  names.forEach(colorOf);

  $("bundle-version").textContent = report.bundle_version || "none loaded";
  $("uptime").textContent = duration(report.uptime_s);
  // the figures count every bundle version this worker served since it started (report.covers)
  const covers = report.covers || {};
  const counted = Object.keys(covers.bundle_versions || {});
  $("covers").hidden = !counted.some((v) => v !== report.bundle_version);
  $("covers").textContent = `· figures include versions ${counted.join(", ")}`;
  $("covers").title = covers.scope || "";
  let requests = 0;
  for (const v of Object.values(variants)) requests += v.requests || 0;
  $("total-requests").textContent = String(requests);
  const verdicts = names.filter((n) => variants[n] && variants[n].vs_ensemble).map((n) =>
    el("div", { "data-variant": n, title: variants[n].vs_ensemble.verdict }, el("span", { class: "swatch" }), n + ": ",
      el("span", { class: verdictClass(variants[n].vs_ensemble), text: variants[n].vs_ensemble.verdict })));
  verdicts.forEach((d) => { d.querySelector(".swatch").style.background = colorOf(d.dataset.variant); });
  if (verdicts.length) $("verdicts").replaceChildren(...verdicts);

  // cascade
  const c = report.cascade || {};
  $("escalation-rate").textContent = isNum(c.escalation_rate) ? pct(c.escalation_rate) : "—";
  $("escalation-detail").textContent = cascade
    ? `${cascade.cheap} answers, below ${cascade.threshold} → ${cascade.fallback || "ensemble"} · ${c.escalated || 0} of ${(c.answered || 0) + (c.escalated || 0)} rows escalated`
    : "no cascade configured (FUSION_CASCADE)";

  // weights bar: coloured segments only; their names and shares go in the key below it, where a
  // small share's label has room (inside a 20 % segment "cascade 20 %" was cut to "cascade 2…")
  const bar = $("weights-bar");
  const key = $("weights-key");
  bar.replaceChildren();
  key.replaceChildren();
  for (const [name, w] of Object.entries(weights)) {
    const seg = el("div", { "data-variant": name, title: `${name}: ${pct(w)}` });
    seg.style.flex = String(w);
    seg.style.background = colorOf(name);
    bar.append(seg);
    const item = el("span", { "data-variant": name }, el("span", { class: "swatch" }), `${name} ${pct(w, 0)}`);
    item.firstChild.style.background = colorOf(name);
    key.append(item);
  }
  $("routing-detail").textContent = "shadow: " + (shadow.length ? shadow.join(", ") : "none");
  renderRollout(report.rollout);

  // table
  const tbody = $("variants").tBodies[0];
  const rows = [];
  const now = Date.now();
  for (const name of names) {
    const v = variants[name] || {};
    const lat = v.latency_ms || {};
    const isEnsemble = name === "ensemble";
    const vs = v.vs_ensemble || null;

    const nameCell = el("td", { "data-col": "variant" }, el("span", { class: "swatch" }), name);
    nameCell.firstChild.style.background = colorOf(name);
    if (shadow.includes(name)) nameCell.append(el("span", { class: "tag", text: "shadow" }));
    if (cascade && cascade.cheap === name) nameCell.append(el("span", { class: "tag", text: "cascade: cheap" }));

    let agreement;
    if (isEnsemble) agreement = el("td", { class: "n", "data-col": "agreement", text: "reference" });
    else if (isNum(v.agreement_with_ensemble)) {
      agreement = el("td", { class: "n", "data-col": "agreement" }, pct(v.agreement_with_ensemble),
        el("span", { class: "small", text: `${v.compared_rows} rows compared` }));
      const h = (state.history[name] = state.history[name] || []);
      h.push([now, v.agreement_with_ensemble]);
      if (h.length > HISTORY) h.splice(0, h.length - HISTORY);
    } else {
      agreement = el("td", { class: "n muted", "data-col": "agreement", title: "needs shadow runs: FUSION_SHADOW=ensemble", text: "—" });
    }

    let accuracy;
    if (isNum(v.accuracy)) {
      const ci = v.accuracy_ci95 || [];
      accuracy = el("td", { class: "n", "data-col": "accuracy" }, pct(v.accuracy),
        el("span", { class: "small", text: `95 %: ${pct(ci[0])} – ${pct(ci[1])} · ${v.labelled_rows} labelled` }));
    } else {
      accuracy = el("td", { class: "n muted", "data-col": "accuracy", title: "needs POST /feedback", text: "—" });
    }

    let verdict;
    if (isEnsemble) verdict = el("td", { "data-col": "verdict", class: "muted", text: "reference" });
    else if (vs) {
      verdict = el("td", { "data-col": "verdict" }, el("span", { class: verdictClass(vs), text: vs.verdict }));
      if (vs.analysis) verdict.append(el("span", { class: "small", text: `${vs.analysis} · ${vs.n} rows · margin ${vs.margin_pp} pp · anytime-valid` }));
    } else verdict = el("td", { "data-col": "verdict", class: "muted", text: "—" });

    rows.push(el("tr", { "data-variant": name },
      nameCell,
      el("td", { class: "n", "data-col": "weight", text: name in weights ? pct(weights[name]) : "—" }),
      el("td", { class: "n", "data-col": "requests", text: String(v.requests || 0) }),
      el("td", { class: "n", "data-col": "rows", text: String(v.rows || 0) }),
      el("td", { class: "n", "data-col": "p50", text: ms(lat.p50) }),
      el("td", { class: "n", "data-col": "p95", text: ms(lat.p95) }),
      el("td", { class: "n", "data-col": "p99", text: ms(lat.p99) }),
      agreement, accuracy, verdict));
  }
  if (rows.length) tbody.replaceChildren(...rows);

  const withData = names.filter((n) => variants[n]);
  latencyChart(withData, variants);
  accuracyChart(withData, variants);
  agreementChart();
  csChart(names, variants);
}

// The progressive rollout (service/rollout.py): the candidate's stage and percent, then every transition
// with its time and reason, newest first (a rollback says why).
function renderRollout(r) {
  $("rollout-card").hidden = !r;
  if (!r) return;
  const stages = (r.stages || []).map((p) => `${p} %`).join(" → ");
  $("rollout-stage").textContent = `${r.candidate} ${r.percent} % · ${r.status.replace("_", " ")}`;
  $("rollout-detail").textContent = `stage ${r.stage + 1} of ${(r.stages || []).length}: ${stages}`;
  const items = (r.history || []).slice().reverse().map((h) =>
    el("li", { "data-status": h.status },
      el("span", { class: "small", text: new Date(h.time * 1000).toISOString().slice(11, 19) + " " }),
      `${h.percent} % ${h.status.replace("_", " ")}: ${h.reason}`));
  $("rollout-history").replaceChildren(...items);
}

// ---- charts (hand-drawn SVG) --------------------------------------------------------------------

const CHART = { w: 480, h: 240, left: 48, right: 12, top: 14, bottom: 42 };

// A round step for about `n` intervals over `span` (1, 2, 2.5 or 5 times a power of ten).
function niceStep(span, n = 4) {
  const raw = span / n;
  if (!(raw > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}

// Proportion ticks from a round value at or below `min` up to 1: [lo, step].
function proportionAxis(min) {
  const step = niceStep(Math.max(1 - min, 0.01));
  return [Math.max(0, Math.floor(min / step - 1e-9) * step), step];
}

function niceMax(x) {
  if (!(x > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

function emptyChart(svg, message) {
  svg.replaceChildren(svgEl("text", { x: CHART.w / 2, y: CHART.h / 2, "text-anchor": "middle" }, message));
}

function yAxis(svg, max, fmt, ticks = 4) {
  const { w, h, left, right, top, bottom } = CHART;
  for (let i = 0; i <= ticks; i++) {
    const value = (max * i) / ticks;
    const y = h - bottom - ((h - top - bottom) * i) / ticks;
    svg.append(svgEl("line", { x1: left, x2: w - right, y1: y, y2: y, class: i ? "grid" : "axis" }));
    svg.append(svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, fmt(value)));
  }
}

function latencyChart(names, variants) {
  const svg = $("latency-chart");
  const data = names.map((n) => [n, variants[n].latency_ms || {}]).filter(([, l]) => isNum(l.p50));
  if (!data.length) return emptyChart(svg, "no latency samples yet");
  svg.replaceChildren();
  const { w, h, left, right, top, bottom } = CHART;
  const max = niceMax(Math.max(...data.map(([, l]) => l.p99 || l.p50)));
  yAxis(svg, max, (v) => gfmt(v, 3));
  const group = (w - left - right) / data.length;
  const bw = Math.min(28, (group * 0.8) / 3);
  const shades = [1, 0.7, 0.45];
  data.forEach(([name, lat], i) => {
    const x0 = left + group * i + (group - 3 * bw) / 2;
    ["p50", "p95", "p99"].forEach((k, j) => {
      const v = lat[k];
      const bh = ((h - top - bottom) * v) / max;
      const rect = svgEl("rect", { x: x0 + j * bw, y: h - bottom - bh, width: bw - 2, height: Math.max(bh, 0.5),
        fill: colorOf(name), "fill-opacity": shades[j], "data-variant": name, "data-stat": k });
      rect.append(svgEl("title", {}, `${name} ${k}: ${ms(v)} ms`));
      svg.append(rect);
      if (bw >= 14) svg.append(svgEl("text", { x: x0 + j * bw + (bw - 2) / 2, y: h - bottom - bh - 3, "text-anchor": "middle", class: "value" }, gfmt(v, 2)));
    });
    svg.append(svgEl("text", { x: left + group * (i + 0.5), y: h - bottom + 14, "text-anchor": "middle" }, name));
  });
  ["p50", "p95", "p99"].forEach((k, j) => {
    svg.append(svgEl("rect", { x: left + j * 60, y: h - 16, width: 10, height: 10, fill: "#6b7280", "fill-opacity": shades[j] }));
    svg.append(svgEl("text", { x: left + j * 60 + 14, y: h - 7 }, k));
  });
}

function accuracyChart(names, variants) {
  const svg = $("accuracy-chart");
  const data = names.map((n) => [n, variants[n]]).filter(([, v]) => isNum(v.accuracy));
  if (!data.length) return emptyChart(svg, "no labels yet: POST /feedback {feedback_id, label}");
  svg.replaceChildren();
  const { w, h, top, right } = CHART;
  const left = 90, bottom = 28;
  const [lo, tick] = proportionAxis(Math.min(...data.map(([, v]) => (v.accuracy_ci95 || [v.accuracy])[0])));
  const x = (a) => left + ((w - left - right - 20) * (a - lo)) / (1 - lo || 1);
  for (let i = 0; lo + i * tick <= 1 + 1e-9; i++) {
    const a = lo + i * tick;
    svg.append(svgEl("line", { x1: x(a), x2: x(a), y1: top, y2: h - bottom, class: i ? "grid" : "axis" }));
    svg.append(svgEl("text", { x: x(a), y: h - bottom + 14, "text-anchor": "middle" }, gfmt(100 * a, 3) + " %"));
  }
  const ens = variants.ensemble;
  if (ens && isNum(ens.accuracy)) {
    svg.append(svgEl("line", { x1: x(ens.accuracy), x2: x(ens.accuracy), y1: top, y2: h - bottom, stroke: colorOf("ensemble"), "stroke-dasharray": "4 3" }));
  }
  const step = (h - top - bottom) / data.length;
  data.forEach(([name, v], i) => {
    const y = top + step * (i + 0.5);
    const [a, b] = v.accuracy_ci95 || [v.accuracy, v.accuracy];
    svg.append(svgEl("text", { x: left - 8, y: y + 4, "text-anchor": "end" }, name));
    svg.append(svgEl("line", { x1: x(a), x2: x(b), y1: y, y2: y, stroke: colorOf(name), "stroke-width": 3, "stroke-linecap": "round" }));
    const dot = svgEl("circle", { cx: x(v.accuracy), cy: y, r: 5, fill: colorOf(name), "data-variant": name });
    dot.append(svgEl("title", {}, `${name}: ${pct(v.accuracy)} [${pct(a)}, ${pct(b)}], ${v.labelled_rows} labelled rows`));
    svg.append(dot);
    svg.append(svgEl("text", { x: Math.min(x(b) + 6, w - 60), y: y - 7, class: "value" }, pct(v.accuracy)));
  });
}

function agreementChart() {
  const svg = $("agreement-chart");
  const series = Object.entries(state.history).filter(([, h]) => h.length);
  if (!series.length) return emptyChart(svg, "no shadow pairs yet: FUSION_SHADOW=ensemble");
  svg.replaceChildren();
  const { w, h, left, right, top, bottom } = CHART;
  const all = series.flatMap(([, pts]) => pts);
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]), t0 + POLL_MS);
  const [lo, step] = proportionAxis(Math.min(...all.map((p) => p[1])) - 0.01);
  const y = (a) => h - bottom - ((h - top - bottom) * (a - lo)) / (1 - lo || 1);
  const x = (t) => left + ((w - left - right) * (t - t0)) / (t1 - t0);
  for (let i = 0; lo + i * step <= 1 + 1e-9; i++) {
    const a = lo + i * step;
    svg.append(svgEl("line", { x1: left, x2: w - right, y1: y(a), y2: y(a), class: i ? "grid" : "axis" }));
    svg.append(svgEl("text", { x: left - 6, y: y(a) + 4, "text-anchor": "end" }, gfmt(100 * a, 3) + " %"));
  }
  svg.append(svgEl("text", { x: left, y: h - bottom + 14 }, new Date(t0).toLocaleTimeString()));
  svg.append(svgEl("text", { x: w - right, y: h - bottom + 14, "text-anchor": "end" }, new Date(t1).toLocaleTimeString()));
  series.forEach(([name, pts], i) => {
    const d = pts.map(([t, a], j) => (j ? "L" : "M") + x(t).toFixed(1) + " " + y(a).toFixed(1)).join(" ");
    svg.append(svgEl("path", { d, fill: "none", stroke: colorOf(name), "stroke-width": 2, "data-variant": name }));
    const [tl, al] = pts[pts.length - 1];
    svg.append(svgEl("circle", { cx: x(tl), cy: y(al), r: 3, fill: colorOf(name) }));
    svg.append(svgEl("rect", { x: left + i * 110, y: h - 16, width: 10, height: 10, fill: colorOf(name) }));
    svg.append(svgEl("text", { x: left + i * 110 + 14, y: h - 7 }, `${name} ${pct(al)}`));
  });
}

// The anytime-valid confidence sequence of each variant against the ensemble over the rows it rests on
// (`vs_ensemble.history`, kept in the A/B store: every worker draws the same series), and the threshold its
// lower bound must pass: −margin on the accuracy difference (labels), 1 − agreement margin (no labels).
// One scale: accuracy differences when any variant has labels, else agreement rates.
function csChart(names, variants) {
  const svg = $("cs-chart");
  const series = [];
  for (const name of names) {
    const vs = (variants[name] || {}).vs_ensemble;
    if (!vs || !vs.analysis || !isNum(vs.ci_low) || !isNum(vs.ci_high)) continue;
    const pts = (vs.history || []).filter((p) => p.analysis === vs.analysis && isNum(p.ci_low) && isNum(p.ci_high));
    const last = pts[pts.length - 1];
    if (!last || last.n !== vs.n) pts.push({ n: vs.n, ci_low: vs.ci_low, ci_high: vs.ci_high, estimate: vs.estimate });
    series.push([name, vs, pts]);
  }
  const labelled = series.filter(([, vs]) => vs.analysis !== "agreement");
  const shown = labelled.length ? labelled : series;
  if (!shown.length) return emptyChart(svg, "no variant compared with the ensemble yet");
  svg.replaceChildren();
  const diff = labelled.length > 0;
  const fmt = diff ? (v) => gfmt(100 * v, 3) + " pp" : (v) => gfmt(100 * v, 3) + " %";
  const { w, h, left, right, top, bottom } = CHART;
  const all = shown.flatMap(([, , pts]) => pts);
  const thresholds = [...new Set(shown.map(([, vs]) => vs.threshold).filter(isNum))];
  let lo = Math.min(...all.map((p) => p.ci_low), ...thresholds);
  let hi = Math.max(...all.map((p) => p.ci_high), ...thresholds);
  if (diff) [lo, hi] = [Math.min(lo, 0), Math.max(hi, 0)];
  const step = niceStep(Math.max(hi - lo, 0.001));
  lo = Math.floor(lo / step - 1e-9) * step;
  hi = Math.ceil(hi / step + 1e-9) * step;
  const n0 = Math.min(...all.map((p) => p.n)), n1 = Math.max(...all.map((p) => p.n), n0 + 1);
  const y = (v) => h - bottom - ((h - top - bottom) * (v - lo)) / (hi - lo);
  const x = (n) => left + ((w - left - right) * (n - n0)) / (n1 - n0);
  for (let i = 0; lo + i * step <= hi + 1e-9; i++) {
    const v = Math.abs(lo + i * step) < step * 1e-6 ? 0 : lo + i * step; // 0, not 1e-17
    svg.append(svgEl("line", { x1: left, x2: w - right, y1: y(v), y2: y(v), class: i ? "grid" : "axis" }));
    svg.append(svgEl("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
  }
  svg.append(svgEl("text", { x: left, y: h - bottom + 14 }, `${n0.toLocaleString()} rows`));
  svg.append(svgEl("text", { x: w - right, y: h - bottom + 14, "text-anchor": "end" }, `${n1.toLocaleString()} rows`));
  for (const t of thresholds) {
    const line = svgEl("line", { x1: left, x2: w - right, y1: y(t), y2: y(t), class: "threshold", "data-threshold": String(t) });
    line.append(svgEl("title", {}, diff ? `margin: the lower bound must stay above ${fmt(t)}` : `needs agreement above ${fmt(t)}`));
    svg.append(line);
    svg.append(svgEl("text", { x: w - right - 4, y: y(t) - 4, "text-anchor": "end", class: "value" }, (diff ? "margin " : "needs > ") + fmt(t)));
  }
  const path = (pts, key) => pts.map((p, j) => (j ? "L" : "M") + x(p.n).toFixed(1) + " " + y(p[key]).toFixed(1)).join(" ");
  shown.forEach(([name, vs, pts], i) => {
    const band = pts.map((p) => `${x(p.n).toFixed(1)},${y(p.ci_high).toFixed(1)}`)
      .concat(pts.slice().reverse().map((p) => `${x(p.n).toFixed(1)},${y(p.ci_low).toFixed(1)}`)).join(" ");
    svg.append(svgEl("polygon", { points: band, fill: colorOf(name), "fill-opacity": 0.12, stroke: "none" }));
    for (const key of ["ci_low", "ci_high"]) {
      svg.append(svgEl("path", { d: path(pts, key), fill: "none", stroke: colorOf(name), "stroke-width": 2,
        "data-variant": name, "data-bound": key === "ci_low" ? "low" : "high" }));
    }
    const p = pts[pts.length - 1];
    for (const key of ["ci_low", "ci_high"]) svg.append(svgEl("circle", { cx: x(p.n), cy: y(p[key]), r: 3, fill: colorOf(name) }));
    const slot = left + (i * (w - left - right)) / shown.length;
    const tip = svgEl("rect", { x: slot, y: h - 16, width: 10, height: 10, fill: colorOf(name) });
    tip.append(svgEl("title", {}, vs.verdict || ""));
    svg.append(tip);
    svg.append(svgEl("text", { x: slot + 14, y: h - 7 }, `${name} [${fmt(vs.ci_low)}, ${fmt(vs.ci_high)}]`));
  });
}

// ---- offline comparison (/info's `comparison`) --------------------------------------------------

const ROW_KEYS = ["rows", "table", "models", "variants", "entries", "results"];
const NAME_KEYS = ["name", "variant", "model"];
const HIDDEN = new Set(["file", "accuracy_ci95"]);
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const label = (k) => k.replace(/_/g, " ");
const fixed = (x, digits, scale = 1) => (isNum(x) ? (x * scale).toFixed(digits) : "—");

function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj)) {
    if (isObj(v)) flatten(v, prefix + k + " ", out);
    else out[prefix + k] = v;
  }
  return out;
}

// [name, fields] per model from a list of objects with a name, or from name -> object.
function records(value) {
  if (Array.isArray(value) && value.length && value.every(isObj)) {
    return value.map((r) => {
      const key = NAME_KEYS.find((k) => k in r);
      return [key ? String(r[key]) : "", Object.fromEntries(Object.entries(r).filter(([k]) => k !== key))];
    });
  }
  if (isObj(value) && Object.keys(value).length && Object.values(value).every(isObj)) return Object.entries(value);
  return null;
}

function genericTable(recs) {
  const flat = recs.map(([name, r]) => [name, flatten(r)]);
  const columns = [];
  for (const [, cells] of flat) for (const k of Object.keys(cells)) if (!columns.includes(k)) columns.push(k);
  return { columns: columns.map(label), rows: flat.map(([name, cells]) => [name, columns.map((k) => cell(cells[k]))]) };
}

// The `fusion compare` columns (as in comparison.md) for the fields present, then any other field.
// The same reading as fusion/report.py `_model_table`, so the page and `fusion report` agree.
function modelTable(c, recs) {
  const ref = String(c.reference ?? "ensemble");
  const batches = [...new Set(recs.flatMap(([, r]) => (isObj(r.latency_ms) ? Object.keys(r.latency_ms) : [])))]
    .sort((a, b) => (/^\d+$/.test(a) && /^\d+$/.test(b) ? Number(a) - Number(b) : a.localeCompare(b)));
  const b1 = batches[0] ?? "1";
  const accuracy = (r) => {
    const a = r.accuracy, ci = r.accuracy_ci95;
    if (!isNum(a)) return cell(a);
    if (Array.isArray(ci) && ci.length === 2 && ci.every(isNum)) return `${(100 * a).toFixed(2)} (${(100 * ci[0]).toFixed(1)}–${(100 * ci[1]).toFixed(1)})`;
    return (100 * a).toFixed(2);
  };
  const mcnemar = (r) => {
    const m = r.mcnemar;
    return isObj(m) && isNum(m.p_value) ? `${m.b ?? "?"}/${m.c ?? "?"}, ${gfmt(m.p_value, 3)}` : cell(m);
  };
  const latency = (b) => (r) => {
    const v = (r.latency_ms || {})[b];
    return isObj(v) && isNum(v.median_ms) && isNum(v.p99_ms) ? `${v.median_ms.toFixed(3)} / ${v.p99_ms.toFixed(3)}` : cell(v);
  };
  const known = [
    ["kind", "kind", (r) => cell(r.kind)],
    ["accuracy", "accuracy % (95 % CI)", accuracy],
    ["nll", "NLL", (r) => fixed(r.nll, 4)],
    ["ece", isNum(c.ece_bins) ? `ECE (${c.ece_bins} bins)` : "ECE", (r) => fixed(r.ece, 4)],
    ["agreement", `agree % w/ ${ref}`, (r) => fixed(r.agreement, 2, 100)],
    ["mcnemar", "McNemar b/c, p", mcnemar],
    ["n_parameters", "params", (r) => (Number.isInteger(r.n_parameters) ? r.n_parameters.toLocaleString("en-US") : cell(r.n_parameters))],
    ["flops_per_sample", "MFLOPs/sample", (r) => (r.flops_per_sample === null || r.flops_per_sample === undefined ? "n/a" : fixed(r.flops_per_sample, 3, 1e-6))],
    ["size_bytes", "ONNX KiB", (r) => fixed(r.size_bytes, 1, 1 / 1024)],
    ...batches.map((b) => ["latency_ms", `b=${b} median / p99 ms`, latency(b)]),
    ["latency_vs_reference_b1", `b=${b1} latency ÷ ${ref}`, (r) => fixed(r.latency_vs_reference_b1, 3)],
  ];
  const present = new Set(recs.flatMap(([, r]) => Object.keys(r)));
  const specs = known.filter(([k]) => present.has(k));
  const knownKeys = new Set([...known.map(([k]) => k), ...HIDDEN]);
  const rest = (r) => flatten(Object.fromEntries(Object.entries(r).filter(([k]) => !knownKeys.has(k))));
  const others = [];
  for (const [, r] of recs) for (const k of Object.keys(rest(r))) if (!others.includes(k)) others.push(k);
  return {
    columns: [...specs.map(([, h]) => h), ...others.map(label)],
    rows: recs.map(([name, r]) => { const f = rest(r); return [name, [...specs.map(([, , fn]) => fn(r)), ...others.map((k) => cell(f[k]))]]; }),
  };
}

// The same reading as fusion/report.py `read_comparison`: the main table, notes and further tables.
function readComparison(c) {
  let recs = null, used = null;
  for (const k of [...ROW_KEYS, ...Object.keys(c)]) if (k in c && (recs = records(c[k]))) { used = k; break; }
  if (!recs && (recs = records(c))) used = "*";
  const notes = [], extra = [];
  if (used !== "*") {
    for (const [k, v] of Object.entries(c)) {
      if (k === used || k === "artifacts") continue;
      let sub;
      if (isObj(v) && (Array.isArray(v.rows) || isObj(v.rows)) && (sub = records(v.rows))) {
        const title = label(k) + Object.entries(v).filter(([a, b]) => a !== "rows" && !isObj(b) && !Array.isArray(b)).map(([a, b]) => `, ${label(a)} ${cell(b)}`).join("");
        extra.push([title, genericTable(sub)]);
      } else if (isObj(v)) {
        for (const [a, b] of Object.entries(flatten(v))) notes.push([`${label(k)}: ${label(a)}`, cell(b)]);
      } else if (v !== null && v !== undefined && !(Array.isArray(v) && v.some(isObj))) {
        notes.push([label(k), cell(v)]);
      }
    }
  }
  return { table: modelTable(c, recs || []), notes, extra };
}

function renderTable(table, firstHeader, t) {
  const head = el("tr", {}, el("th", { text: firstHeader }), ...t.columns.map((h) => el("th", { class: "n", text: h })));
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...t.rows.map(([name, cells]) => el("tr", { "data-model": name },
    el("td", { text: name }), ...cells.map((v, i) => el("td", { class: "n", "data-col": t.columns[i], text: v })))));
}

async function loadInfo(version) {
  let info;
  try {
    info = await (await get("/info")).json();
  } catch (err) {
    $("offline-note").textContent = "cannot read /info: " + err.message;
    return;
  }
  state.version = version;
  // `fusion build`'s gate (manifest `ensemble_selection`): the ensemble does not beat its best member
  const warning = info.ensemble_selection?.gate?.warning, warn = $("ensemble-warning");
  warn.textContent = warning ? `Warning: ${warning}.` : "";
  warn.hidden = !warning;
  const note = $("offline-note"), meta = $("offline-meta"), table = $("comparison"), img = $("comparison-plot");
  meta.replaceChildren();
  img.hidden = true;
  if (state.plotUrl) { URL.revokeObjectURL(state.plotUrl); state.plotUrl = null; }

  const comparison = info.comparison;
  const extra = $("offline-extra");
  extra.replaceChildren();
  if (!isObj(comparison) || !Object.keys(comparison).length) {
    note.textContent = "This bundle has no offline comparison yet: `fusion build` runs it (or `fusion compare " +
      "--bundle DIR --out-dir DIR`) and adds the table and the accuracy-vs-latency plot. Below: the offline metrics " +
      "recorded in the manifest.";
    const recs = Object.entries({ ...info.variants, ...info.members }).map(([name, e]) =>
      [name, { kind: e.kind, ...(e.metrics || {}), n_parameters: e.n_parameters }]);
    renderTable(table, "model", genericTable(recs));
    return;
  }
  const c = readComparison(comparison);
  note.textContent = c.table.rows.length ? "" : "The manifest's comparison has no table rows.";
  renderTable(table, "model", c.table);
  for (const [title, t] of c.extra) {
    const tbl = el("table", {}, el("thead"), el("tbody"));
    renderTable(tbl, "model", t);
    extra.append(el("h3", { text: title }), el("div", { class: "scroll" }, tbl));
  }
  for (const [k, v] of c.notes) meta.append(el("dt", { text: k }), el("dd", { text: v }));
  try {
    const blob = await (await get("/ui/comparison.png")).blob();
    state.plotUrl = URL.createObjectURL(blob);
    img.src = state.plotUrl;
    img.hidden = false;
  } catch (err) {
    note.textContent += (note.textContent ? " " : "") + "No plot: " + err.message;
  }
}

// ---- token --------------------------------------------------------------------------------------

function showToken() {
  $("token-state").textContent = state.token ? "token set (this tab only)" : "no token";
}

function init() {
  $("auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    $("token").value = "";
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    state.version = null; // re-read /info with the new token
    showToken();
    poll();
  });
  $("token-forget").addEventListener("click", () => {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    showToken();
    poll();
  });
  showToken();
  emptyChart($("latency-chart"), "no latency samples yet");
  emptyChart($("accuracy-chart"), "no labels yet: POST /feedback {feedback_id, label}");
  emptyChart($("agreement-chart"), "no shadow pairs yet: FUSION_SHADOW=ensemble");
  poll();
}

document.addEventListener("DOMContentLoaded", init);
