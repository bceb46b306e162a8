// Charts: an app's requests/s, latency and replicas over the last hour, from the history
// this agent keeps in memory (GET /v1/apps/NAME/history), redrawn at each new sample.
import { api, appPicker, clearError, h, showError } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const HOUR = 3600;
const W = 600;
const H = 160;
const PAD = { l: 44, r: 8, t: 10, b: 20 };
const box = document.getElementById("charts");
const note = document.getElementById("chart-note");
let app = null;
let timer = null;

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  el.append(...children);
  return el;
}

function fmt(v) {
  if (Number.isInteger(v)) return String(v);
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

// One line chart: series [{name, cls, values: [[t, v|null]]}], time from now-span to now.
function chart(id, title, unit, series, now, span) {
  const all = series.flatMap((s) => s.values.map(([, v]) => v)).filter((v) => v !== null);
  const top = Math.max(1, ...all);
  const max = top * 1.1;
  const x = (t) => PAD.l + ((t - (now - span)) / span) * (W - PAD.l - PAD.r);
  const y = (v) => H - PAD.b - (v / max) * (H - PAD.t - PAD.b);
  const lines = series.map((s) => {
    // A gap (null: no request, so no latency) breaks the line.
    const runs = [[]];
    for (const [t, v] of s.values) {
      if (v === null) runs.push([]);
      else runs[runs.length - 1].push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    }
    return runs.filter((r) => r.length).map((r) => svg("polyline", { class: `line ${s.cls}`, points: r.join(" ") }));
  });
  const axes = [
    svg("line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }),
    svg("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }),
    svg("line", { class: "axis", x1: PAD.l - 3, y1: y(top), x2: PAD.l, y2: y(top) }),
    svg("text", { class: "tick", x: PAD.l - 4, y: y(top) + 3, "text-anchor": "end" }, fmt(top)),
    svg("text", { class: "tick", x: PAD.l - 4, y: H - PAD.b, "text-anchor": "end" }, "0"),
    svg("text", { class: "tick", x: PAD.l, y: H - 4 }, span >= HOUR ? "1 h ago" : `${Math.round(span / 60)} min ago`),
    svg("text", { class: "tick", x: W - PAD.r, y: H - 4, "text-anchor": "end" }, "now"),
  ];
  const latest = series.map((s) => {
    const last = s.values.length ? s.values[s.values.length - 1][1] : null;
    return h("span", { class: `key ${s.cls}` }, `${s.name} ${last === null ? "—" : fmt(last)}${unit}`);
  });
  return h("figure", { id, class: "chart" }, h("figcaption", {}, title, " ", latest),
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title }, ...axes, ...lines.flat()));
}

async function draw() {
  clearTimeout(timer);
  if (!app) return;
  let data;
  try {
    data = await api("GET", `/v1/apps/${encodeURIComponent(app)}/history?since=${Date.now() / 1000 - HOUR}`);
  } catch (e) {
    showError(`Reading ${app}'s history`, e);
    timer = setTimeout(draw, 10000);
    return;
  }
  clearError();
  const now = Date.now() / 1000;
  const s = data.samples;
  const pick = (k) => s.map((p) => [p.t, p[k]]);
  // The last hour, or less while the history is younger (at least 5 minutes).
  const span = Math.min(HOUR, Math.max(300, s.length ? now - s[0].t : 0));
  note.textContent = s.length
    ? `${s.length} samples, one every ${data.interval_s} s, kept in memory on this node`
    : `no sample yet: one is taken every ${data.interval_s} s`;
  box.replaceChildren(
    chart("chart-rps", "Requests/s", "", [{ name: "req/s", cls: "a", values: pick("rps") }], now, span),
    chart("chart-latency", "Latency", " ms", [{ name: "p50", cls: "a", values: pick("p50_ms") },
      { name: "p99", cls: "b", values: pick("p99_ms") }], now, span),
    chart("chart-replicas", "Replicas", "", [{ name: "wanted", cls: "b", values: pick("replicas") },
      { name: "healthy", cls: "a", values: pick("healthy") }], now, span),
  );
  timer = setTimeout(draw, Math.max(2, data.interval_s) * 1000);
}

appPicker((name) => {
  app = name;
  draw();
});
