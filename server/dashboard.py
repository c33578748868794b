"""The operator dashboard: a page served by the operator API that shows the runs, and for the
selected run its per-round metric, ε and participation curves, refreshed every few seconds.

The page and its script are public and hold no operator data: the script asks for an API key
(kept in the tab's ``sessionStorage``, gone when the tab closes), then reads ``/api/runs...``
with it in the ``X-API-Key`` header, exactly like any other client. So the rule "no operator
data without credentials" holds for the page too, and no key ever travels in a URL (where logs
and browser history would keep it). The page only reads: a read-only key is enough, and the
one to give it.

The charts are inline SVG drawn by the script; nothing loads from another origin (the page
works offline), and a Content-Security-Policy allows scripts, styles and requests from this
origin only. Run names and notes are inserted as text, never as HTML.
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations as objects.

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def dashboard_router(refresh_seconds: float = 5.0) -> APIRouter:
    """``GET /dashboard`` (the page), ``/dashboard/app.js``, ``/dashboard/app.css`` and
    ``/dashboard/favicon.svg``; the page reloads its data every ``refresh_seconds``."""
    router = APIRouter(tags=["dashboard"])
    page = PAGE.replace("__REFRESH_MS__", str(max(100, int(refresh_seconds * 1000))))

    @router.get("/dashboard", response_class=HTMLResponse, summary="The operator dashboard (asks for an API key; holds no data itself)")
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    @router.get("/dashboard/app.js", include_in_schema=False)
    def dashboard_script() -> Response:
        return Response(SCRIPT, media_type="text/javascript; charset=utf-8", headers=SECURITY_HEADERS)

    @router.get("/dashboard/app.css", include_in_schema=False)
    def dashboard_style() -> Response:
        return Response(STYLE, media_type="text/css; charset=utf-8", headers=SECURITY_HEADERS)

    @router.get("/dashboard/favicon.svg", include_in_schema=False)
    def dashboard_icon() -> Response:
        return Response(ICON, media_type="image/svg+xml", headers=SECURITY_HEADERS)

    return router


ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#1f3a5f"/>'
        '<polyline points="2,12 6,8 9,10 14,3" fill="none" stroke="#fff" stroke-width="2"/></svg>')

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedpref operator dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="/dashboard/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/dashboard/app.css"></head>
<body data-refresh-ms="__REFRESH_MS__">
<header><h1>fedpref operator dashboard</h1><span id="status" role="status"></span>
<button type="button" id="sign-out" hidden>Forget key</button></header>
<form id="login" hidden>
<label for="api-key">Operator API key</label>
<input id="api-key" name="api-key" type="password" autocomplete="off" required>
<button type="submit" id="sign-in">Open</button>
<p id="login-message" role="alert"></p>
<p class="hint">The key stays in this browser tab only and is sent to this server in the <code>X-API-Key</code> header.
A read-only key (<code>FEDPREF_READ_API_KEYS</code>) is all the dashboard needs.</p>
</form>
<main id="main" hidden>
<section><h2>Runs</h2>
<table id="runs"><thead><tr><th>id</th><th>name</th><th>status</th><th>devices</th><th>rounds</th><th>&epsilon;</th><th>budget left</th><th>started</th></tr></thead>
<tbody></tbody></table>
<p id="no-runs" hidden>No runs yet: they appear here when a ServerApp writes to this run store.</p>
</section>
<section id="run" hidden>
<h2 id="run-title"></h2>
<dl id="run-facts"></dl>
<div class="charts">
<figure><figcaption>Metric per round <select id="metric" aria-label="metric"></select></figcaption><div id="chart-metrics" class="chart"></div></figure>
<figure><figcaption>Privacy spent (&epsilon;) per round</figcaption><div id="chart-epsilon" class="chart"></div></figure>
<figure><figcaption>Participation per round <span class="legend"><span class="swatch participants"></span>participants <span class="swatch dropped"></span>dropped</span></figcaption><div id="chart-participation" class="chart"></div></figure>
</div>
</section>
</main>
<script src="/dashboard/app.js"></script>
</body></html>
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{display:flex;gap:1rem;align-items:baseline;padding:.6rem 1.2rem;background:#1f3a5f;color:#fff}
header h1{font-size:1.2rem;margin:0} #status{font-size:.85rem;opacity:.85;flex:1}
main,form{padding:0 1.2rem 2rem;max-width:80rem}
form{margin-top:2rem} form label{display:block;font-weight:600;margin-bottom:.3rem}
input[type=password]{padding:.4rem;width:22rem;max-width:90%} button{padding:.4rem .9rem}
#login-message{color:#b00020;min-height:1.2rem} .hint{font-size:.85rem;color:#555}
h2{font-size:1.05rem;margin-top:1.6rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9rem;background:#fff}
th,td{border-bottom:1px solid #eee;padding:.3rem .5rem;text-align:left}
tbody tr{cursor:pointer} tbody tr:hover{background:#eef3fa} tbody tr.selected{background:#dbe7f6}
.status-running{color:#0a6} .status-failed{color:#b00020} .status-stopped{color:#a60}
dl{display:grid;grid-template-columns:max-content auto;gap:.15rem 1rem;font-size:.9rem} dt{color:#555} dd{margin:0}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(26rem,1fr));gap:1rem}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:.5rem}
figcaption{font-size:.9rem;font-weight:600;margin-bottom:.3rem}
.chart svg{width:100%;height:auto;display:block} .empty{color:#777;font-size:.85rem}
.axis{stroke:#888;stroke-width:1} .grid{stroke:#eee;stroke-width:1} .tick{font-size:11px;fill:#555}
.series{fill:none;stroke-width:2} .point{stroke:#fff;stroke-width:1}
.series-0{stroke:#1f77b4} .point.series-0{fill:#1f77b4}
.series-1{stroke:#d62728} .point.series-1{fill:#d62728}
.target{stroke:#b00020;stroke-dasharray:5 4;stroke-width:1.5} .target-label{font-size:11px;fill:#b00020}
.bar.participants{fill:#2ca02c} .bar.dropped{fill:#ff7f0e}
.legend{font-weight:400;font-size:.8rem;margin-left:.6rem}
.swatch{display:inline-block;width:.7rem;height:.7rem;margin:0 .2rem 0 .5rem;vertical-align:middle}
.swatch.participants{background:#2ca02c} .swatch.dropped{background:#ff7f0e}
"""

SCRIPT = r"""
"use strict";
const KEY = "fedpref-operator-key";
const REFRESH_MS = Number(document.body.dataset.refreshMs) || 5000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let selected = null;   // the run store id of the run shown below the table
let metric = null;     // the metric shown in the metric chart
let timer = null;
let drawn = null;      // what the charts show, to redraw them only when it changes

class AuthError extends Error {}

async function api(path) {
  const response = await fetch(path, {headers: {"X-API-Key": sessionStorage.getItem(KEY) || ""}, cache: "no-store"});
  if (response.status === 401) throw new AuthError("refused");
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${path}: HTTP ${response.status} ${typeof detail === "string" ? detail : ""}`);
  }
  return response.json();
}

function showLogin(message) {
  sessionStorage.removeItem(KEY);
  if (timer !== null) { clearTimeout(timer); timer = null; }
  $("main").hidden = true; $("sign-out").hidden = true; $("login").hidden = false;
  // Without a key, nothing the key showed stays in the page.
  $("runs").tBodies[0].replaceChildren();
  for (const id of ["run-title", "run-facts", "metric", "chart-metrics", "chart-epsilon", "chart-participation"]) $(id).replaceChildren();
  $("run").hidden = true;
  selected = null; metric = null; drawn = null;
  $("login-message").textContent = message || "";
  $("status").textContent = "";
  $("api-key").value = "";
  $("api-key").focus();
}

const fmt = (value, digits = 3) => (value === null || value === undefined) ? "\u2014" : Number(value).toFixed(digits);
const when = (iso) => iso ? new Date(iso).toLocaleString() : "\u2014";

const COLUMNS = ["id", "name", "status", "devices", "rounds", "epsilon", "budget-left", "started"];

// Rows are kept and updated in place (not rebuilt at each refresh): focus, hover and a click
// in progress survive the refresh.
function renderRuns(runs) {
  const body = $("runs").tBodies[0];
  $("no-runs").hidden = runs.length > 0;
  const existing = new Map([...body.rows].map((tr) => [Number(tr.dataset.runId), tr]));
  runs.forEach((run, index) => {
    let tr = existing.get(run.id);
    existing.delete(run.id);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.runId = String(run.id);
      tr.tabIndex = 0;
      for (const name of COLUMNS) { const td = document.createElement("td"); td.className = name; tr.appendChild(td); }
      const choose = () => { selected = Number(tr.dataset.runId); refresh(); };
      tr.addEventListener("click", choose);
      tr.addEventListener("keydown", (event) => { if (event.key === "Enter") choose(); });
    }
    const values = {
      "id": String(run.id), "name": run.name, "status": run.status, "devices": String(run.devices),
      "rounds": `${run.rounds_done} / ${run.rounds_planned}`, "epsilon": run.privacy.dp ? fmt(run.privacy.epsilon) : "no DP",
      "budget-left": fmt(run.privacy.budget_left), "started": when(run.started_at),
    };
    for (const td of tr.cells) {
      const name = td.classList[0];
      if (td.textContent !== values[name]) td.textContent = values[name];
    }
    const statusClass = "status status-" + run.status;
    if (tr.cells[2].className !== statusClass) tr.cells[2].className = statusClass;
    tr.classList.toggle("selected", run.id === selected);
    tr.setAttribute("aria-selected", String(run.id === selected));
    if (body.rows[index] !== tr) body.insertBefore(tr, body.rows[index] || null);
  });
  for (const tr of existing.values()) tr.remove();
}

function renderFacts(run) {
  const facts = [
    ["status", run.status], ["Flower run", run.flower_run_id ?? "\u2014"], ["devices", run.devices], ["items", run.items],
    ["rounds", `${run.rounds_done} / ${run.rounds_planned}`], ["secure aggregation", run.secure_aggregation ? "on" : "off"],
    ["differential privacy", run.privacy.dp ? "on" : "off"], ["\u03b5 spent", fmt(run.privacy.epsilon)], ["\u03b4", run.privacy.delta ?? "\u2014"],
    ["\u03b5 budget", fmt(run.privacy.target_epsilon)], ["budget left", fmt(run.privacy.budget_left)],
    ["started", when(run.started_at)], ["finished", when(run.finished_at)], ["latest model", run.latest_model_version ?? "\u2014"],
  ];
  if (run.resumed_from_round !== null) facts.push(["resumed after round", run.resumed_from_round]);
  if (run.note) facts.push(["note", run.note]);
  const list = $("run-facts");
  list.replaceChildren();
  for (const [name, value] of facts) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = String(value);
    list.append(dt, dd);
  }
}

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes || {})) element.setAttribute(key, String(value));
  if (parent) parent.appendChild(element);
  return element;
}

function label(value) {
  if (!Number.isFinite(value)) return "";
  const size = Math.abs(value);
  if (size === 0) return "0";
  if (size >= 1e6 || size < 0.001) return value.toExponential(1);
  return Number(value.toPrecision(3)).toString();
}

// Round numbers for an axis from lo to hi: a step of 1, 2 or 5 times a power of ten.
function niceTicks(lo, hi) {
  const raw = (hi - lo) / 4;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const first = Math.floor(lo / step) * step, last = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let v = first; v <= last + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// A frame of axes for rounds (x) against values (y); returns the scales and the svg.
// pad: rounds of room left and right of the first and last round (bars need half a round).
function frame(container, xs, ys, title, {zero = false, pad = 0} = {}) {
  const W = 560, H = 230, M = {left: 56, right: 14, top: 12, bottom: 34};
  let [x0, x1] = [Math.min(...xs) - pad, Math.max(...xs) + pad];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (zero) y0 = Math.min(0, y0);
  if (y0 === y1) { const room = Math.abs(y0) * 0.1 || 1; y0 -= room; y1 += room; }
  const ticks = niceTicks(y0, y1);
  [y0, y1] = [ticks[0], ticks[ticks.length - 1]];
  const x = (v) => M.left + (v - x0) / (x1 - x0) * (W - M.left - M.right);
  const y = (v) => H - M.bottom - (v - y0) / (y1 - y0) * (H - M.top - M.bottom);
  const svg = svgElement("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title});
  for (const v of ticks) {
    svgElement("line", {class: "grid", x1: M.left, x2: W - M.right, y1: y(v), y2: y(v)}, svg);
    svgElement("text", {class: "tick", x: M.left - 6, y: y(v) + 4, "text-anchor": "end"}, svg).textContent = label(v);
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  for (let r = Math.max(Math.ceil(x0), Math.min(...xs)); r <= x1; r += step) {
    svgElement("text", {class: "tick", x: x(r), y: H - M.bottom + 16, "text-anchor": "middle"}, svg).textContent = String(r);
  }
  svgElement("text", {class: "tick", x: (W + M.left) / 2, y: H - 4, "text-anchor": "middle"}, svg).textContent = "round";
  svgElement("line", {class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom}, svg);
  svgElement("line", {class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom}, svg);
  container.replaceChildren(svg);
  return {svg, x, y, W, M};
}

function empty(container, text) {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  container.replaceChildren(p);
}

function lineChart(container, title, points, {zero = false, target = null} = {}) {
  if (!points.length) { empty(container, "no data yet"); return; }
  const ys = points.map((p) => p[1]).concat(target !== null ? [target] : []);
  const {svg, x, y, W, M} = frame(container, points.map((p) => p[0]), ys, title, {zero});
  if (target !== null) {
    svgElement("line", {class: "target", x1: M.left, x2: W - M.right, y1: y(target), y2: y(target)}, svg);
    svgElement("text", {class: "target-label", x: W - M.right - 4, y: y(target) - 4, "text-anchor": "end"}, svg).textContent = `budget ${label(target)}`;
  }
  svgElement("polyline", {class: "series series-0", points: points.map(([r, v]) => `${x(r)},${y(v)}`).join(" ")}, svg);
  for (const [r, v] of points) {
    const dot = svgElement("circle", {class: "point series-0", cx: x(r), cy: y(v), r: 3.5, "data-round": r}, svg);
    svgElement("title", {}, dot).textContent = `round ${r}: ${label(v)}`;
  }
}

function participationChart(container, rounds) {
  const rows = rounds.filter((r) => r.participants !== null || r.dropped !== null);
  if (!rows.length) { empty(container, "no data yet"); return; }
  const totals = rows.map((r) => (r.participants || 0) + (r.dropped || 0));
  const {svg, x, y} = frame(container, rows.map((r) => r.round), totals.concat([0]), "participation", {zero: true, pad: 0.5});
  const width = Math.max(1, Math.min(24, (x(1) - x(0)) * 0.7));
  for (const r of rows) {
    const p = r.participants || 0, d = r.dropped || 0;
    const bar = svgElement("rect", {class: "bar participants", x: x(r.round) - width / 2, y: y(p), width, height: Math.max(0, y(0) - y(p)), "data-round": r.round}, svg);
    svgElement("title", {}, bar).textContent = `round ${r.round}: ${p} participants`;
    const top = svgElement("rect", {class: "bar dropped", x: x(r.round) - width / 2, y: y(p + d), width, height: Math.max(0, y(p) - y(p + d)), "data-round": r.round}, svg);
    svgElement("title", {}, top).textContent = `round ${r.round}: ${d} dropped`;
  }
}

function renderRun(run, rounds) {
  $("run").hidden = false;
  $("run-title").textContent = `Run ${run.id}: ${run.name}`;
  renderFacts(run);
  const names = [...new Set(rounds.flatMap((r) => Object.keys(r.metrics).filter((k) => typeof r.metrics[k] === "number")))].sort();
  if (!names.includes(metric)) metric = ["train-loss", "val-hr", "val-ndcg"].find((m) => names.includes(m)) || names[0] || null;
  const select = $("metric");
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((name) => { const o = document.createElement("option"); o.value = name; o.textContent = name; return o; }));
  }
  if (metric !== null) select.value = metric;
  const signature = JSON.stringify([run.id, metric, run.privacy.dp, run.privacy.target_epsilon, rounds]);
  if (signature === drawn) return;
  drawn = signature;
  const metricPoints = metric === null ? [] : rounds.filter((r) => typeof r.metrics[metric] === "number").map((r) => [r.round, r.metrics[metric]]);
  lineChart($("chart-metrics"), metric || "metric", metricPoints);
  lineChart($("chart-epsilon"), "epsilon", rounds.filter((r) => r.epsilon !== null).map((r) => [r.round, r.epsilon]),
            {zero: true, target: run.privacy.target_epsilon});
  if (!run.privacy.dp && !rounds.some((r) => r.epsilon !== null)) empty($("chart-epsilon"), "this run trains without differential privacy");
  participationChart($("chart-participation"), rounds);
}

async function refresh() {
  if (!sessionStorage.getItem(KEY)) { showLogin(); return; }
  try {
    const runs = await api("/api/runs");
    if (selected === null || !runs.some((r) => r.id === selected)) selected = runs.length ? runs[0].id : null;
    renderRuns(runs);
    if (selected !== null) {
      const [run, rounds] = await Promise.all([api(`/api/runs/${selected}`), api(`/api/runs/${selected}/rounds`)]);
      renderRun(run, rounds);
    } else {
      $("run").hidden = true;
    }
    $("login").hidden = true; $("main").hidden = false; $("sign-out").hidden = false;
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    if (error instanceof AuthError) { showLogin("The API refused this key."); return; }
    $("status").textContent = "refresh failed: " + error.message;
  }
}

async function loop() {
  if (timer !== null) { clearTimeout(timer); timer = null; }
  await refresh();
  if (sessionStorage.getItem(KEY)) timer = setTimeout(loop, REFRESH_MS);
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("login-message").textContent = "";
  loop();
});
$("sign-out").addEventListener("click", () => showLogin("Key forgotten."));
$("metric").addEventListener("change", (event) => { metric = event.target.value; refresh(); });
if (sessionStorage.getItem(KEY)) loop(); else showLogin();
"""
