// trainer dashboard: shared helpers, the SVG line chart, and view loading.
// No libraries: everything here is drawn by hand into SVG, so the page works offline.
"use strict";

const TD = {
  views: {},  // name -> {title, mount(container)}: each view's script registers itself
  token: document.querySelector('meta[name="trainer-token"]').content ||
         new URLSearchParams(location.search).get("token") || "",
  colors: ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00"],
};

TD.el = function (tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "circle", "g", "rect", "path"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag)
                   : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined)
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  return node;
};

TD.api = async function (path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
};

TD.post = async function (path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
    "X-Trainer-Token": TD.token}, body: JSON.stringify(body || {})});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || r.status);
  return data;
};

// The start of a text on one line, with an ellipsis when cut (a question's start says which
// question it is; profiles append their instructions at the end).
TD.clip = function (text, width) {
  const flat = text.split(/\s+/).filter(Boolean).join(" ");
  return flat.length <= width ? flat : flat.slice(0, width - 1) + "\u2026";
};

TD.fmt = function (v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (digits !== undefined) return v.toFixed(digits);
  if (a !== 0 && (a < 0.01 || a >= 1e6)) return v.toExponential(2);
  if (a >= 1000) return Math.round(v).toLocaleString("en");
  return v.toPrecision(4).replace(/\.?0+$/, "");
};

TD.duration = function (s) {
  if (s === null || s === undefined || !isFinite(s)) return "?";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  const p = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${p(m)}:${p(r)}` : `${p(m)}:${p(r)}`;
};

function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12; t += step) out.push(t);
  return out;
}

// Draw line series into an <svg>: series = [{points: [[x, y], ...], color, dash, label}].
// The svg gets data-points = the number of points drawn (tests read it).
TD.chart = function (svg, series, opts) {
  opts = opts || {};
  const W = 480, H = 170, L = 46, R = 8, T = 6, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[1]));
  svg.dataset.points = String(pts.length);
  if (!pts.length) {
    svg.append(TD.el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", text: "no data yet"}));
    return;
  }
  let xlo = 0, xhi = Math.max(opts.xmax || 0, ...pts.map((p) => p[0]), 1);
  let ylo = Math.min(...pts.map((p) => p[1])), yhi = Math.max(...pts.map((p) => p[1]));
  if (yhi - ylo < 1e-12) { ylo -= Math.abs(ylo) * 0.5 || 1; yhi += Math.abs(yhi) * 0.5 || 1; }
  const pad = (yhi - ylo) * 0.06; ylo -= pad; yhi += pad;
  const X = (x) => L + (W - L - R) * (x - xlo) / (xhi - xlo);
  const Y = (y) => T + (H - T - B) * (1 - (y - ylo) / (yhi - ylo));
  for (const t of ticks(ylo, yhi, 4)) {
    svg.append(TD.el("line", {x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "grid"}));
    svg.append(TD.el("text", {x: L - 4, y: Y(t) + 3, "text-anchor": "end", text: TD.fmt(t)}));
  }
  for (const t of ticks(xlo, xhi, 6))
    svg.append(TD.el("text", {x: X(t), y: H - 4, "text-anchor": "middle", text: TD.fmt(t)}));
  svg.append(TD.el("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  svg.append(TD.el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  for (const s of series) {
    const p = s.points.filter((q) => isFinite(q[1]));
    if (!p.length) continue;
    svg.append(TD.el("polyline", {points: p.map((q) => `${X(q[0]).toFixed(1)},${Y(q[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.color, "stroke-width": 1.6, "stroke-dasharray": s.dash || null,
      "vector-effect": "non-scaling-stroke"}));
    if (s.dots || p.length < 3)
      for (const q of p) svg.append(TD.el("circle", {cx: X(q[0]), cy: Y(q[1]), r: 2.5, fill: s.color}));
  }
};

TD.legend = function (series) {
  const div = TD.el("div", {class: "legend"});
  for (const s of series) {
    const i = TD.el("i"); i.style.background = s.color;
    div.append(i, s.label);
  }
  return div;
};

async function loadScript(src) {
  await new Promise((ok, fail) => {
    const s = TD.el("script", {src}); s.onload = ok; s.onerror = fail; document.body.append(s);
  });
}

async function start() {
  const names = JSON.parse(document.querySelector('meta[name="trainer-views"]').content);
  for (const n of names) await loadScript(`/static/${n}.js`);
  const nav = document.getElementById("views"), main = document.getElementById("main");
  let current = null;
  function show(name) {
    if (current && current.unmount) current.unmount();
    for (const a of nav.children) a.classList.toggle("active", a.dataset.view === name);
    main.replaceChildren();
    current = TD.views[name];
    current.mount(main);
  }
  for (const n of names) {
    const a = TD.el("a", {"data-view": n, text: TD.views[n].title});
    a.onclick = () => show(n);
    nav.append(a);
  }
  show(names[0]);
}

TD.setLive = function (on) {
  document.getElementById("conn").classList.toggle("live", on);
};

start();
