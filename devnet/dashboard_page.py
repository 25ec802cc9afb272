"""The dashboard's single HTML page: inline CSS and vanilla JS, plots drawn as inline SVG.

Kept apart from the server (devnet/dashboard.py) because it is mostly page text. The page needs no
network beyond its own origin: no CDN, no fonts, no images. It polls `/api/state?since=N` (only new
snapshots travel) and redraws in place. Stable hooks for tests and scripts: `tr[data-uid]` rows,
`circle.loss-point`, `polyline.weight-line[data-uid]`, `rect.incentive-bar[data-uid]`, `text.y-tick` /
`text.x-tick`, `circle.vtrust-point` / `circle.spread-point` and `tr[data-validator]` (several validators),
and a `data-points` count on every plot's `<svg>`; `body[data-count]` is the number of
snapshots shown. Axes span the data (weights never beyond [0, 1]) with round ticks (1-2-2.5-5 steps,
whole windows); times are 24-hour HH:MM:SS, like the terminal's.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Crucible devnet</title>
<style>
  :root { --fg: #1d2330; --muted: #6b7280; --line: #e3e6ec; --card: #fff; --bg: #f4f5f8;
          --adv: #fff4d6; --adv-fg: #8a5a00; --ok: #1a7f37; --bad: #c0362c; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
  header { padding: 14px 20px; background: #1d2330; color: #fff; }
  h1 { margin: 0 0 8px; font-size: 18px; font-weight: 600; }
  h2 { margin: 0 0 8px; font-size: 14px; font-weight: 600; }
  .stats { display: flex; flex-wrap: wrap; gap: 22px; }
  .stat .label { display: block; font-size: 11px; text-transform: uppercase; color: #aab1c0; }
  .stat span:last-child { font-size: 18px; font-variant-numeric: tabular-nums; }
  #summary, #conn { margin-top: 6px; font-size: 12px; color: #aab1c0; }
  #status.running { color: #7ee2a0; } #status.stopped { color: #ffb86b; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px;
         padding: 14px 20px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px; }
  .wide { grid-column: 1 / -1; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
  th:nth-child(2), th:nth-child(3), th:nth-child(4),
  td:nth-child(2), td:nth-child(3), td:nth-child(4) { text-align: left; }
  th { font-size: 12px; color: var(--muted); font-weight: 600; }
  tr.adversary td { background: var(--adv); }
  .badge { padding: 1px 6px; border-radius: 3px; font-size: 12px; }
  .badge.adv { background: #f0c24b; color: #3d2a00; font-weight: 600; }
  .badge.honest { background: #dff3e4; color: var(--ok); }
  .badge.external { background: #e6e8ee; color: var(--muted); }
  .st-ok { color: var(--ok); } .st-copy { color: var(--adv-fg); }
  .st-bad { color: var(--bad); font-weight: 600; }
  .swatch { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: 4px; }
  svg { width: 100%; height: auto; display: block; }
  svg .frame { fill: none; stroke: #c9ced8; } svg .grid { stroke: #eef0f4; }
  svg .tick { font-size: 11px; fill: var(--muted); } svg .empty { font-size: 13px; fill: var(--muted); }
  svg .ref { stroke: #9aa1ad; stroke-dasharray: 3 3; } svg polyline { stroke-width: 2; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; margin-top: 6px; }
  #notes { margin: 0; padding: 0; list-style: none; font: 12px/1.5 ui-monospace, monospace;
           max-height: 260px; overflow: auto; }
  #notes .t { color: var(--muted); margin-right: 8px; }
</style>
</head>
<body data-count="0">
<header>
  <h1>Crucible devnet</h1>
  <div class="stats">
    <div class="stat"><span class="label">window</span><span id="window">-</span></div>
    <div class="stat"><span class="label">block</span><span id="block">-</span></div>
    <div class="stat"><span class="label">held-out loss</span><span id="loss">-</span></div>
    <div class="stat"><span class="label">windows scored</span><span id="scored">-</span></div>
    <div class="stat"><span class="label">run</span><span id="status">connecting</span></div>
  </div>
  <div id="summary"></div>
  <div id="conn"></div>
</header>
<main>
  <section class="card wide">
    <h2>Scoreboard (one row per miner uid; adversaries highlighted)</h2>
    <table id="scoreboard">
      <thead><tr><th>uid</th><th>name</th><th>kind</th><th>shard</th><th>sync</th><th>loss score</th>
        <th title="shrunk average relative score: what pays">value</th>
        <th title="memory factor: 0 = its update helps its own data no more than a coin flip">memory</th>
        <th>weight</th><th title="the miner's θ matched the digest in the window's signed record">in sync</th>
        <th>incentive</th></tr></thead>
      <tbody id="rows"></tbody>
    </table>
  </section>
  <section class="card"><h2>Held-out loss of the global model, per window</h2>
    <svg id="loss-plot" data-points="0" viewBox="0 0 560 240" role="img"></svg></section>
  <section class="card"><h2>Weight per uid, per window (dashed: adversaries)</h2>
    <svg id="weight-plot" data-points="0" viewBox="0 0 560 240" role="img"></svg>
    <div id="weight-legend" class="legend"></div></section>
  <section class="card"><h2>Incentive per uid (latest)</h2>
    <svg id="incentive-plot" data-points="0" viewBox="0 0 560 240" role="img"></svg></section>
  <section class="card" id="validators-card"><h2>Validators: trust (vtrust) per window</h2>
    <svg id="vtrust-plot" data-points="0" viewBox="0 0 560 240" role="img"></svg>
    <table id="validators">
      <thead><tr><th>validator</th><th>stake share</th><th>permit</th><th>vtrust</th><th>last weights</th></tr></thead>
      <tbody id="validator-rows"></tbody>
    </table></section>
  <section class="card"><h2>Spread between validators' weight vectors, per window (L1, 0 = agree, 2 = disjoint)</h2>
    <svg id="spread-plot" data-points="0" viewBox="0 0 560 240" role="img"></svg></section>
  <section class="card"><h2>Events</h2><ul id="notes"></ul></section>
</main>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const W = 560, H = 240, M = {l: 60, r: 12, t: 10, b: 30};
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf", "#bcbd22", "#7f7f7f"];
const S = {snaps: [], version: -1, poll: 1000, config: {}, status: "", validators: []};

function make(ns, tag, attrs, text) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
const svgEl = (tag, attrs, text) => make(NS, tag, attrs, text);
const htmlEl = (tag, attrs, text) => make(null, tag, attrs, text);
const fix = (v, d) => (v === null || v === undefined) ? "-" : Number(v).toFixed(d);
const sci = v => (v === null || v === undefined) ? "-" : Number(v).toExponential(2);
const isAdv = kind => kind !== "honest" && kind !== "external";
// 24-hour HH:MM:SS in the browser's time zone: the same clock the terminal prints (never a 12-hour locale).
const pad2 = v => String(v).padStart(2, "0");
function clock(seconds) {
  const d = new Date(seconds * 1000);
  return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
function setText(id, text) { document.getElementById(id).textContent = text; }

// "Nice" tick steps: 1, 2, 2.5 or 5 times a power of ten, about `n` of them over the span.
function niceStep(span, n) {
  const raw = span / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 2.5, 5]) if (m * mag >= raw - 1e-12) return m * mag;
  return 10 * mag;
}
function decimals(step) {
  let d = 0;
  while (d < 8 && Math.abs(Math.round(step * 10 ** d) - step * 10 ** d) > 1e-6) d++;
  return d;
}
function ticks(lo, hi, n, integer) {
  const step = integer ? Math.max(1, Math.round(niceStep(hi - lo, n))) : niceStep(hi - lo, n);
  const out = [];
  for (let k = Math.ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k++) out.push(k * step);
  return {values: out, digits: integer ? 0 : decimals(step)};
}

// The plot area spans exactly [x0, x1] x [y0, y1] (the callers clamp these to the data); ticks are round
// numbers inside it.
function frame(svg, x0, x1, y0, y1, xticks) {
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const sx = x => M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r);
  const sy = y => H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b);
  svg.appendChild(svgEl("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b,
                                 class: "frame"}));
  const ys = ticks(y0, y1, 5, false);
  for (const y of ys.values) {
    svg.appendChild(svgEl("line", {x1: M.l, x2: W - M.r, y1: sy(y), y2: sy(y), class: "grid"}));
    svg.appendChild(svgEl("text", {x: M.l - 6, y: sy(y) + 4, class: "tick y-tick", "text-anchor": "end"},
                          y.toFixed(ys.digits)));
  }
  if (xticks) {
    for (const x of ticks(x0, x1, 8, true).values) {
      const at = {x: sx(x), y: H - M.b + 16, class: "tick x-tick", "text-anchor": "middle"};
      svg.appendChild(svgEl("text", at, String(x)));
    }
  }
  return {sx, sy};
}

function empty(svg, text) {
  svg.appendChild(svgEl("text", {x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle"}, text));
  svg.dataset.points = "0";
}

// series: [{uid, label, color, dashed, pts: [[window, value], ...]}]; cls names the line and its points.
// The y axis spans the data (and the reference lines) plus 4 %, never beyond [floor, ceiling].
function linePlot(svg, series, cls, yfmt, refs, emptyText, floor, ceiling) {
  clear(svg);
  const all = series.flatMap(s => s.pts);
  if (!all.length) return empty(svg, emptyText);
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]).concat(refs.map(r => r.y));
  const y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = (y1 - y0) * 0.04;
  const low = floor === undefined ? y0 - pad : Math.max(floor, y0 - pad);
  const high = ceiling === undefined ? y1 + pad : Math.min(ceiling, y1 + pad);
  const {sx, sy} = frame(svg, Math.min(...xs), Math.max(...xs), low, high, true);
  for (const r of refs) {
    svg.appendChild(svgEl("line", {x1: M.l, x2: W - M.r, y1: sy(r.y), y2: sy(r.y), class: "ref"}));
    const at = {x: W - M.r - 4, y: sy(r.y) - 4, class: "tick", "text-anchor": "end"};
    svg.appendChild(svgEl("text", at, r.label));
  }
  let total = 0;
  for (const s of series) {
    const g = svgEl("g", {class: cls + "-series", "data-uid": s.uid === undefined ? "" : s.uid});
    if (s.pts.length > 1) {
      g.appendChild(svgEl("polyline", {
        points: s.pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "),
        class: cls + "-line", "data-uid": s.uid === undefined ? "" : s.uid, fill: "none", stroke: s.color,
        "stroke-dasharray": s.dashed ? "6 4" : "none"}));
    }
    for (const p of s.pts) {
      const c = svgEl("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3.5, class: cls + "-point", fill: s.color,
                                 "data-window": p[0], "data-value": p[1]});
      c.appendChild(svgEl("title", {}, s.label + ", window " + p[0] + ": " + yfmt(p[1])));
      g.appendChild(c);
      total++;
    }
    svg.appendChild(g);
  }
  svg.dataset.points = String(total);
}

function barPlot(svg, rows, colorOf) {
  clear(svg);
  if (!rows.length) return empty(svg, "no miners yet");
  const vals = rows.map(r => r.incentive === null ? 0 : r.incentive);
  const {sy} = frame(svg, 0, 1, 0, Math.min(1, Math.max(...vals, 1e-9) * 1.15), false);
  const bw = (W - M.l - M.r) / rows.length;
  rows.forEach((r, i) => {
    const v = vals[i], x = M.l + i * bw;
    const bar = svgEl("rect", {x: x + bw * 0.15, width: bw * 0.7, y: sy(v),
                               height: Math.max(0, sy(0) - sy(v)), fill: colorOf(r.uid),
                               class: "incentive-bar", "data-uid": r.uid, "data-value": v});
    bar.appendChild(svgEl("title", {}, "uid " + r.uid + " " + r.name + ": " + fix(r.incentive, 4)));
    svg.appendChild(bar);
    svg.appendChild(svgEl("text", {x: x + bw / 2, y: H - M.b + 16, class: "tick", "text-anchor": "middle"},
                          String(r.uid)));
    svg.appendChild(svgEl("text", {x: x + bw / 2, y: sy(v) - 4, class: "tick", "text-anchor": "middle"},
                          fix(r.incentive, 3)));
  });
  svg.dataset.points = String(rows.length);
}

function latestRows(snap) {
  const byUid = new Map();
  for (const r of (snap ? snap.rows : [])) byUid.set(r.uid, r);
  return [...byUid.values()].sort((a, b) => a.uid - b.uid);
}

function renderTable(rows) {
  const body = document.getElementById("rows");
  clear(body);
  for (const r of rows) {
    const adv = isAdv(r.kind);
    const tr = htmlEl("tr", {"data-uid": r.uid, "data-kind": r.kind, class: adv ? "adversary" : r.kind});
    if (r.why) tr.title = r.why;  // crucible explain: why the weight is what it is (hover the row)
    const status = r.status === "ok" ? "st-ok" : r.status.startsWith("copy") ? "st-copy"
      : ["missing", "late", "rejected"].includes(r.status) ? "st-bad" : "";
    const cells = [String(r.uid), r.name, null, r.status, fix(r.sync, 2), sci(r.loss_score), fix(r.value, 3),
                   fix(r.memory, 2), fix(r.weight, 3),
                   r.in_sync === true ? "yes" : r.in_sync === false ? "NO" : "-", fix(r.incentive, 3)];
    cells.forEach((text, i) => {
      const td = htmlEl("td", i === 3 && status ? {class: status} : i === 9 && r.in_sync === false ? {class: "st-bad"} : {});
      if (i === 2) {
        const badge = adv ? "\u26a0 " + r.kind : r.kind;
        td.appendChild(htmlEl("span", {class: "badge " + (adv ? "adv" : r.kind)}, badge));
      } else {
        td.textContent = text;
      }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
}

function render() {
  const snaps = S.snaps, last = snaps.length ? snaps[snaps.length - 1] : null;
  const rows = latestRows(last);
  const uids = [...new Set(snaps.flatMap(s => s.rows.map(r => r.uid)))].sort((a, b) => a - b);
  const colorOf = uid => PALETTE[Math.max(0, uids.indexOf(uid)) % PALETTE.length];
  const info = new Map();
  for (const s of snaps) for (const r of s.rows) info.set(r.uid, r);

  const losses = new Map();
  for (const s of snaps) {
    if (s.heldout_loss !== null && s.model_window !== null) losses.set(s.model_window, s.heldout_loss);
  }
  const lossPts = [...losses.entries()].sort((a, b) => a[0] - b[0]);
  const lastLoss = lossPts.length ? lossPts[lossPts.length - 1] : null;
  setText("window", last ? String(last.window) : "-");
  setText("block", last ? String(last.block) : "-");
  setText("loss", lastLoss ? lastLoss[1].toFixed(4) + " (\u03b8 of window " + lastLoss[0] + ")" : "-");
  setText("scored", snaps.length + (S.config.windows ? " / " + S.config.windows : ""));
  const st = document.getElementById("status");
  st.textContent = S.status;
  st.className = S.status.startsWith("stopped") ? "stopped" : S.status === "running" ? "running" : "";
  const shown = v => Array.isArray(v) ? (v.join(", ") || "none")
    : typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : String(v);
  setText("summary", Object.entries(S.config).map(([k, v]) => k + ": " + shown(v)).join("  \u00b7  "));

  renderTable(rows);
  const initial = S.config.initial_loss;
  const refs = typeof initial === "number" ? [{y: initial, label: "\u03b8\u2080 (initial model)"}] : [];
  linePlot(document.getElementById("loss-plot"), [{label: "held-out loss", color: PALETTE[0], pts: lossPts}],
           "loss", v => v.toFixed(4), refs, "no held-out loss yet");

  const series = uids.map(uid => {
    const byWindow = new Map();
    for (const s of snaps) {
      for (const r of s.rows) if (r.uid === uid && r.weight !== null) byWindow.set(s.window, r.weight);
    }
    const who = info.get(uid);
    return {uid, label: uid + " " + who.name, color: colorOf(uid), dashed: isAdv(who.kind),
            pts: [...byWindow.entries()].sort((a, b) => a[0] - b[0])};
  });
  linePlot(document.getElementById("weight-plot"), series, "weight", v => v.toFixed(3), [],
           "no weights yet", 0, 1);
  const legend = document.getElementById("weight-legend");
  clear(legend);
  for (const s of series) {
    const item = htmlEl("span", {"data-uid": s.uid});
    const sw = htmlEl("span", {class: "swatch"});
    const dashes = "repeating-linear-gradient(90deg," + s.color + " 0 6px,transparent 6px 9px)";
    sw.style.background = s.dashed ? dashes : s.color;
    item.appendChild(sw);
    item.appendChild(document.createTextNode(s.label + (s.dashed ? " (" + info.get(s.uid).kind + ")" : "")));
    legend.appendChild(item);
  }
  barPlot(document.getElementById("incentive-plot"), rows, colorOf);
  document.body.dataset.count = String(snaps.length);
}

// Several validators: vtrust per validator per window, the weight spread per window, the latest read as a table.
function renderValidators(reads) {
  const names = [...new Set(reads.flatMap(r => Object.keys(r.vtrust || {})))].sort();
  const series = names.map((name, i) => ({
    uid: name, label: name, color: PALETTE[i % PALETTE.length], dashed: false,
    pts: reads.filter(r => r.vtrust && r.vtrust[name] !== undefined && r.vtrust[name] !== null)
              .map(r => [r.window, r.vtrust[name]])}));
  linePlot(document.getElementById("vtrust-plot"), series, "vtrust", v => v.toFixed(3), [],
           "one validator: no consensus to trust", 0, 1);
  const spread = reads.filter(r => r.spread !== null && r.spread !== undefined).map(r => [r.window, r.spread]);
  linePlot(document.getElementById("spread-plot"), [{label: "weight spread", color: PALETTE[1], pts: spread}],
           "spread", v => v.toFixed(3), [], "fewer than two validators with weights", 0, 2);
  const body = document.getElementById("validator-rows");
  clear(body);
  const last = reads.length ? reads[reads.length - 1] : null;
  for (const name of names) {
    const tr = htmlEl("tr", {"data-validator": name});
    const trust = last && last.vtrust ? last.vtrust[name] : null;
    const cells = [name, fix(last && last.stake_share ? last.stake_share[name] : null, 3),
                   last && last.permit && last.permit[name] !== undefined ? (last.permit[name] ? "yes" : "no") : "-",
                   trust === undefined ? "-" : fix(trust, 3),
                   last && last.last_update && last.last_update[name] !== undefined
                     ? "block " + last.last_update[name] : "-"];
    cells.forEach(text => tr.appendChild(htmlEl("td", {}, text)));
    body.appendChild(tr);
  }
}

function renderNotes(notes) {
  const list = document.getElementById("notes");
  clear(list);
  for (const n of notes.slice(-100).reverse()) {
    const li = htmlEl("li");
    li.appendChild(htmlEl("span", {class: "t"}, clock(n.time)));
    li.appendChild(document.createTextNode(n.message));
    list.appendChild(li);
  }
}

async function poll() {
  try {
    const resp = await fetch("/api/state?since=" + S.snaps.length, {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const d = await resp.json();
    S.poll = d.poll_ms || S.poll;
    setText("conn", "");
    if (d.since !== S.snaps.length) {  // the server holds fewer snapshots (it restarted): start over
      S.snaps = []; S.version = -1;
    } else if (d.version !== S.version) {
      S.snaps.push(...d.snapshots);
      S.version = d.version; S.config = d.config || {}; S.status = d.status || "";
      S.validators = d.validators || [];
      render();
      renderValidators(S.validators);
      renderNotes(d.notes || []);
    }
  } catch (err) {
    setText("conn", "dashboard server not answering (" + err.message + "); the run may have ended");
  }
  setTimeout(poll, S.version >= 0 ? S.poll : 200);
}
poll();
</script>
</body>
</html>
"""
