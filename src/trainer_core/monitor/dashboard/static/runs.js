// The runs view: the runs under DIR, and one run's live charts, alerts and previews.
"use strict";

(function () {
  const el = TD.el, C = TD.colors;
  const S = {runs: [], id: null, run: null, source: null, timer: null, root: null};

  function point(key) {
    return S.run.metrics.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  }

  function renderRuns() {
    const list = S.root.querySelector("#runs");
    list.replaceChildren();
    for (const r of S.runs) {
      const div = el("div", {class: "run" + (r.id === S.id ? " selected" : ""), "data-id": r.id},
        el("div", {class: "name", text: r.name}),
        el("div", {class: "meta"}, el("span", {class: "badge " + r.state, text: r.state}),
           ` ${r.step ?? "–"}/${r.total_steps ?? "–"}  loss ${TD.fmt(r.loss)}` +
           (r.alerts ? `  ⚠ ${r.alerts}` : "")));
      div.onclick = () => select(r.id);
      list.append(div);
    }
    if (!S.runs.length) list.append(el("div", {class: "run muted", text: "no runs yet"}));
  }

  const CHARTS = [
    {id: "chart-loss", title: "loss", series: () => [
      {label: "train", color: C[0], points: point("loss")},
      {label: "eval", color: C[1], points: point("eval_loss"), dash: "5,3", dots: true}]},
    {id: "chart-lr", title: "learning rate", series: () => [
      {label: "lr", color: C[2], points: point("lr")}]},
    {id: "chart-tps", title: "tokens/s", series: () => [
      {label: "tokens/s", color: C[3], points: point("tokens_per_s")}]},
    {id: "chart-grad", title: "gradient norm", series: () => [
      {label: "grad norm", color: C[4], points: point("grad_norm")}]},
  ];

  function renderCharts() {
    const xmax = S.run.status.total_steps || 0;
    for (const c of CHARTS) {
      const box = S.root.querySelector("#" + c.id);
      const series = c.series();
      TD.chart(box.querySelector("svg"), series, {xmax});
      box.querySelector(".legend").replaceWith(TD.legend(series));
    }
  }

  function renderHead() {
    const st = S.run.status, head = S.root.querySelector("#head");
    let state = st.state || "unknown";
    if (state === "running" && st.process_alive === false) state = "dead";
    else if (state === "running" && st.stalled) state = "stalled";
    const pct = st.total_steps ? 100 * (st.step || 0) / st.total_steps : 0;
    const bar = el("div", {class: "progress"}, el("div"));
    bar.firstChild.style.width = pct.toFixed(1) + "%";
    const stop = el("button", {id: "stop", text: "stop (checkpoint)"});
    stop.onclick = async () => {
      if (!confirm("Stop this run? It saves a checkpoint; continue later with --resume.")) return;
      try { await TD.post(`/api/runs/stop?id=${encodeURIComponent(S.id)}`); }
      catch (e) { alert("stop: " + e.message); }
    };
    head.replaceChildren(
      el("div", {class: "head"}, el("h1", {text: S.run.name}),
         el("span", {id: "state", class: "badge " + state, text: state}), bar,
         el("span", {id: "steps", text: `${st.step ?? 0}/${st.total_steps ?? "?"}`}),
         state === "running" ? stop : null),
      el("div", {class: "numbers"},
         el("span", {}, "loss ", el("b", {id: "loss", text: TD.fmt(st.loss)})),
         el("span", {}, "eval ", el("b", {text: TD.fmt(st.eval_loss)})),
         el("span", {}, "lr ", el("b", {text: TD.fmt(st.lr)})),
         el("span", {}, "tok/s ", el("b", {text: TD.fmt(st.tokens_per_s)})),
         el("span", {}, "trained ", el("b", {text: TD.fmt(st.tokens_trained)}), " tokens"),
         el("span", {}, "ETA ", el("b", {text: TD.duration(st.eta_s)})),
         S.run.manifest.profile ? el("span", {}, "profile ",
           el("b", {text: S.run.manifest.profile.name})) : null));
  }

  function renderAlerts() {
    const box = S.root.querySelector("#alerts");
    const active = S.run.status.alerts || [];
    const items = active.map((a) => el("div", {class: "alert " + (a.level || "warning"),
      "data-alert": a.alert}, el("span", {class: "name", text: a.alert}),
      el("span", {class: "muted", text: `step ${a.step} · `}), a.message || ""));
    const past = S.run.alert_log.slice(-6).reverse().map((a) => el("div", {class: "muted"},
      `step ${a.step}: ${a.alert} ${a.state}`));
    box.replaceChildren(el("h2", {text: `alerts (${active.length} active)`}),
      ...(items.length ? items : [el("div", {class: "muted", text: "none active"})]),
      ...(past.length ? [el("div", {class: "muted", text: "recent changes:"}), ...past] : []));
  }

  function renderPreviews() {
    const box = S.root.querySelector("#previews");
    const recs = S.run.previews.slice().sort((a, b) => b.step - a.step);
    const rows = recs.slice(0, 12).map((p) => el("tr", {class: "preview"},
      el("td", {text: String(p.step)}),
      el("td", {title: p.prompt || "", text: TD.clip(p.prompt || "", 120)}),
      el("td", {}, el("div", {class: "out", title: p.output || "", text: p.output || ""})),
      el("td", {}, el("div", {class: "out", title: p.reference || "", text: p.reference ?? "-"})),
      el("td", {}, ...Object.entries(p.scores || {}).map(([k, v]) =>
        el("span", {class: "score", text: `${k} ${typeof v === "number" ? TD.fmt(v) : v}`})))));
    box.replaceChildren(el("h2", {text: "previews"}), rows.length
      ? el("table", {}, el("tr", {}, el("th", {text: "step"}), el("th", {text: "question"}),
                           el("th", {text: "output"}), el("th", {text: "reference"}),
                           el("th", {text: "scores"})), ...rows)
      : el("div", {class: "muted", text: "no previews yet"}));
  }

  function renderRun() {
    renderHead(); renderCharts(); renderAlerts(); renderPreviews();
  }

  function listen() {
    if (S.source) S.source.close();
    const q = `id=${encodeURIComponent(S.id)}&metrics=${S.run.offsets.metrics}` +
              `&previews=${S.run.offsets.previews}`;
    const src = new EventSource(`/api/runs/events?${q}`);
    S.source = src;
    src.onopen = () => TD.setLive(true);
    src.onerror = () => TD.setLive(false);
    src.addEventListener("metrics", (e) => {
      S.run.metrics.push(...JSON.parse(e.data)); renderCharts();
    });
    src.addEventListener("alerts", (e) => {
      S.run.alert_log.push(...JSON.parse(e.data)); renderAlerts();
    });
    src.addEventListener("previews", (e) => {
      S.run.previews.push(...JSON.parse(e.data)); renderPreviews();
    });
    src.addEventListener("status", (e) => {
      S.run.status = JSON.parse(e.data); renderHead(); renderAlerts(); renderCharts();
    });
    src.addEventListener("runs", (e) => { S.runs = JSON.parse(e.data); renderRuns(); });
  }

  async function select(id) {
    S.id = id;
    renderRuns();
    S.run = await TD.api(`/api/runs/run?id=${encodeURIComponent(id)}`);
    renderRun();
    listen();
  }

  async function refreshRuns() {
    S.runs = await TD.api("/api/runs/list");
    renderRuns();
  }

  function chartBox(c) {
    return el("div", {class: "card chart", id: c.id}, el("h2", {text: c.title}),
      el("svg", {}), el("div", {class: "legend"}));
  }

  TD.views.runs = {
    title: "runs",
    async mount(root) {
      S.root = root;
      root.append(el("div", {id: "runs"}), el("div", {class: "detail"},
        el("div", {class: "card", id: "head"}, el("span", {class: "muted", text: "loading…"})),
        el("div", {class: "card", id: "alerts"}),
        el("div", {class: "charts"}, ...CHARTS.map(chartBox)),
        el("div", {class: "card", id: "previews"})));
      await refreshRuns();
      // Without a live run selected, pick up new runs as they appear.
      S.timer = setInterval(() => { if (!S.source) refreshRuns(); }, 5000);
      const first = S.runs.find((r) => r.state === "running") || S.runs[0];
      if (first) await select(first.id);
    },
    unmount() {
      if (S.source) S.source.close();
      clearInterval(S.timer);
      S.source = null;
    },
  };
})();
