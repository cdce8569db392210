// The status page: GET api/status every few seconds, drawn as SVG line plots. No libraries, no CDN:
// the page works offline and behind the backend's basic auth. Every text from the store goes in
// through textContent, never as HTML (candidates are model output, prompts are user data).
"use strict";

const REFRESH_MS = 5000;
const COLORS = ["#3b82f6", "#f97316", "#10b981", "#a855f7", "#ef4444", "#0ea5e9", "#84cc16", "#eab308"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text = null, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function fmt(value, digits = 2) {
  return value === null || value === undefined || Number.isNaN(value) ? "n/a" : Number(value).toFixed(digits);
}

function timeLabel(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// series: [{name, points: [[x, y]], band: [[x, low, high]]?}]; x numbers (ms when opts.time)
function lineChart(container, series, opts = {}) {
  container.replaceChildren();
  const all = series.flatMap((s) => s.points).filter(([, y]) => y !== null && y !== undefined);
  if (!all.length) {
    container.appendChild(el("div", { class: "empty" }, opts.empty || "no data yet"));
    return;
  }
  const W = 600, H = 200, L = 44, R = 12, T = 24, B = 26;
  const xs = all.map(([x]) => x), ys = all.map(([, y]) => y);
  for (const s of series) for (const [, lo, hi] of s.band || []) ys.push(lo, hi);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [opts.yMin ?? Math.min(...ys), opts.yMax ?? Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || "" }, null, SVG);
  svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }, null, SVG));
  svg.appendChild(el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }, null, SVG));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(el("text", { x: L - 4, y: py(y) + 4, "text-anchor": "end" }, fmt(y, opts.yDigits ?? 2), SVG));
  }
  const xText = (x) => (opts.time ? timeLabel(x) : fmt(x, 0));
  svg.appendChild(el("text", { x: L, y: H - 8 }, xText(x0), SVG));
  svg.appendChild(el("text", { x: W - R, y: H - 8, "text-anchor": "end" }, xText(x1), SVG));
  if (opts.xLabel) svg.appendChild(el("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" }, opts.xLabel, SVG));
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    if (s.band && s.band.length) {
      const upper = s.band.map(([x, , hi]) => `${px(x)},${py(hi)}`);
      const lower = s.band.slice().reverse().map(([x, lo]) => `${px(x)},${py(lo)}`);
      svg.appendChild(el("polygon", { points: upper.concat(lower).join(" "), fill: color, "fill-opacity": 0.15 }, null, SVG));
    }
    const points = s.points.filter(([, y]) => y !== null && y !== undefined);
    svg.appendChild(el("polyline", { points: points.map(([x, y]) => `${px(x)},${py(y)}`).join(" "), fill: "none",
                                     stroke: color, "stroke-width": 2, "data-series": s.name,
                                     "data-count": points.length }, null, SVG));
    if (points.length <= 40) {
      for (const [x, y] of points) svg.appendChild(el("circle", { cx: px(x), cy: py(y), r: 3, fill: color }, null, SVG));
    }
    // the legend, in a row above the plot: never over a line
    svg.appendChild(el("text", { x: L + 110 * i, y: 12, style: `fill:${color}` }, `\u2014 ${s.name}`, SVG));
  });
  container.appendChild(svg);
}

function drawSignal(status) {
  const points = status.signal.map((p) => [Date.parse(p.at), p.pairs]);
  const annotations = status.signal.map((p) => [Date.parse(p.at), p.annotations]);
  lineChart(document.getElementById("signal-plot"), [{ name: "pairs", points }, { name: "annotations", points: annotations }],
            { time: true, yMin: 0, yDigits: 0, empty: "no rankings yet", label: "pairs over time" });
}

function drawReward(status) {
  const versions = status.reward_versions.filter((v) => v.held_out_accuracy !== null);
  lineChart(document.getElementById("reward-plot"), [{
    name: "held-out accuracy", points: versions.map((v) => [v.version, v.held_out_accuracy]),
    band: versions.filter((v) => v.accuracy_low !== null).map((v) => [v.version, v.accuracy_low, v.accuracy_high]),
  }], { yMin: 0, yMax: 1, xLabel: "version", empty: "no held-out pairs yet", label: "reward model accuracy" });
}

function updateName(update) {
  return update.version !== null ? `v${update.version}` : `${update.outcome} ${timeLabel(Date.parse(update.started_at))}`;
}

function drawPolicy(status) {
  const updates = status.policy_updates.filter((u) => u.steps.length);
  const curve = (key) => updates.map((u) => ({ name: updateName(u), points: u.steps.map((s) => [s.step, s[key]]) }));
  lineChart(document.getElementById("policy-reward-plot"), curve("reward"), { xLabel: "step", empty: "no policy update yet" });
  lineChart(document.getElementById("policy-kl-plot"), curve("kl"), { xLabel: "step", yMin: 0, empty: "no KL measured" });
  lineChart(document.getElementById("policy-nll-plot"), curve("nll_rise"), { xLabel: "step", empty: "no fluency measured" });
  const list = document.getElementById("verdicts");
  list.replaceChildren();
  for (const u of status.policy_updates.slice().reverse()) {
    const gain = u.held_out_gain === null ? "" : ` held-out gain ${fmt(u.held_out_gain, 3)} (+-${fmt(u.held_out_gain_se, 3)}).`;
    const steps = u.planned_steps ? `${u.steps.length}/${u.planned_steps}` : `${u.steps.length}`;
    const head = `${updateName(u)}: ${u.outcome} (${u.algorithm || "?"}, ${steps} steps).${gain} `;
    const item = el("li", { class: u.outcome });
    item.appendChild(el("strong", {}, head));
    item.appendChild(document.createTextNode(u.verdict));
    list.appendChild(item);
  }
}

function drawJobs(status) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  if (!status.jobs.length) {
    const row = el("tr");
    row.appendChild(el("td", { colspan: 5, class: "muted" }, "idle: nothing queued"));
    body.appendChild(row);
  }
  for (const job of status.jobs) {
    const row = el("tr");
    row.appendChild(el("td", {}, job.lane));
    row.appendChild(el("td", {}, `${job.kind} #${job.id}${job.project === null ? "" : ` (project ${job.project})`}`));
    row.appendChild(el("td", {}, job.attempts > 1 ? `${job.state}, attempt ${job.attempts}` : job.state));
    const progress = el("td");
    if (job.progress !== null) {
      const bar = el("div", { class: "bar" });
      bar.appendChild(el("span", { style: `width:${Math.round(job.progress * 100)}%` }));
      progress.appendChild(bar);
    }
    row.appendChild(progress);
    row.appendChild(el("td", {}, job.eta_seconds === null ? "" : `${Math.round(job.eta_seconds)} s`));
    body.appendChild(row);
  }
}

function drawAgreement(status) {
  const box = document.getElementById("agreement");
  box.replaceChildren();
  if (!status.agreement || !status.agreement.pairwise.compared) {
    box.appendChild(el("p", { class: "muted" }, "Needs tasks that two annotators ranked."));
    return;
  }
  const p = status.agreement.pairwise;
  box.appendChild(el("p", {}, `Pairwise agreement ${fmt(p.rate)} over ${p.compared} pairs two annotators both ordered.`));
  const table = el("table");
  const head = el("tr");
  ["annotator", "agrees with the others", "pairs compared"].forEach((h) => head.appendChild(el("th", {}, h)));
  table.appendChild(head);
  for (const [who, a] of Object.entries(status.agreement.annotators)) {
    const row = el("tr");
    [who, fmt(a.rate), String(a.compared)].forEach((v) => row.appendChild(el("td", {}, v)));
    table.appendChild(row);
  }
  box.appendChild(table);
}

function drawCandidates(id, candidates, title) {
  const box = document.getElementById(id);
  box.replaceChildren(el("h3", {}, candidates ? `${title}: policy v${candidates.version}` : `${title}: none yet`));
  for (const sample of candidates ? candidates.samples : []) {
    box.appendChild(el("div", { class: "prompt" }, sample.prompt));
    for (const text of sample.candidates) box.appendChild(el("div", { class: "candidate" }, text));
  }
}

function drawHeader(status) {
  const select = document.getElementById("project");
  const wanted = String(status.project ?? "");
  select.replaceChildren(...status.projects.map((p) => el("option", { value: p.id }, `${p.id} (${p.pairs} pairs)`)));
  select.value = wanted;
  document.getElementById("model-version").textContent = status.model_version || "no project connected yet";
  document.getElementById("workers").textContent = `workers alive ${status.workers.alive}, busy ${status.workers.busy}`;
  document.getElementById("updated").textContent = `updated ${new Date(status.generated_at).toLocaleTimeString()}`;
}

async function refresh() {
  const project = new URLSearchParams(location.search).get("project");
  const response = await fetch(`api/status${project ? `?project=${encodeURIComponent(project)}` : ""}`);
  if (!response.ok) {
    document.getElementById("updated").textContent = `status unavailable (${response.status})`;
    return;
  }
  const status = await response.json();
  drawHeader(status);
  drawSignal(status);
  drawReward(status);
  drawPolicy(status);
  drawJobs(status);
  drawAgreement(status);
  drawCandidates("serving", status.serving, "Serving");
  drawCandidates("previous", status.previous, "Previous");
  document.body.dataset.loaded = "true";
}

document.getElementById("project").addEventListener("change", (event) => {
  const url = new URL(location.href);
  url.searchParams.set("project", event.target.value);
  history.replaceState(null, "", url);
  refresh();
});
refresh();
setInterval(() => refresh().catch(() => {}), REFRESH_MS);
