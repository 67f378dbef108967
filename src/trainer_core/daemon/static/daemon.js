// The daemon view: a daemon home's state, the file in training (live loss), the queue in
// training order, the history of finished files, and pause / resume / skip.
"use strict";

(function () {
  const el = TD.el, C = TD.colors;
  const KEEP = 5000;  // metrics records kept in the page
  const S = {data: null, source: null, retry: null, root: null, busy: false};

  function when(t) {
    return t ? new Date(t * 1000).toLocaleTimeString("en-GB") : "–";
  }

  function state() {
    const st = S.data.status;
    let s = st.state || "unknown";
    if (st.paused && s !== "paused") s += " (pausing)";
    return s;
  }

  async function act(name, body) {
    if (S.busy) return;
    S.busy = true;
    const msg = S.root.querySelector("#dmsg");
    msg.textContent = name + "…";
    try {
      const r = await TD.post(`/api/daemon/${name}`, body);
      msg.textContent = r.result;
      msg.className = "muted";
    } catch (e) {
      msg.textContent = `${name}: ${e.message}`;
      msg.className = "error-text";
    } finally {
      S.busy = false;
    }
  }

  function button(id, text, onclick) {
    const b = el("button", {id, text, disabled: "disabled"});
    b.onclick = onclick;
    return b;
  }

  function skipCurrent() {
    const cur = S.data.status.current;
    if (cur && confirm(`Skip #${cur.id} ${cur.name}? The model is rolled back to before it.`))
      act("skip");
  }

  function renderHead() {
    const st = S.data.status, model = st.model || {}, rates = st.rates || {};
    const disk = st.disk || {}, cur = st.current;
    S.root.querySelector("#dinfo").replaceChildren(
      el("div", {class: "head"}, el("h1", {text: `daemon ${S.data.name}`}),
         el("span", {id: "dstate", class: "badge " + (st.state || ""), text: state(),
                     "data-state": st.state || "", "data-paused": st.paused ? "1" : "0"}),
         el("span", {class: "muted", text: S.data.home})),
      el("div", {class: "numbers"},
         el("span", {}, "model step ", el("b", {id: "dmodelstep", text: String(model.step ?? "–")})),
         el("span", {}, "tok/s ", el("b", {text: TD.fmt(rates.tokens_per_s)})),
         el("span", {}, "files last hour ", el("b", {text: String(rates.files_last_hour ?? "–")})),
         el("span", {}, "disk ", el("b", {text: disk.free_gb === undefined ? "–"
           : `${TD.fmt(disk.free_gb)} GB free (${disk.gate})`})),
         el("span", {}, "updated ", el("b", {text: when(st.updated_at)}))));
    // The buttons stay in place (a click never lands on a node being replaced).
    S.root.querySelector("#pause").disabled = !!st.paused;
    S.root.querySelector("#resume").disabled = !st.paused;
    S.root.querySelector("#skip").disabled = !cur;
    const box = S.root.querySelector("#dcurrent");
    if (cur) {
      const pct = cur.file_steps ? 100 * (cur.file_step || 0) / cur.file_steps : 0;
      const bar = el("div", {class: "progress"}, el("div"));
      bar.firstChild.style.width = pct.toFixed(1) + "%";
      box.replaceChildren(el("h2", {text: "training"}), el("div", {class: "head"},
        el("b", {id: "dcurname", "data-id": cur.id, text: `#${cur.id} ${cur.name}`}),
        el("span", {class: "muted", text: `${cur.priority}, attempt ${cur.attempt}`}), bar,
        el("span", {id: "dfilestep", text: `${cur.file_step ?? 0}/${cur.file_steps ?? "?"}`}),
        el("span", {}, "loss ", el("b", {text: TD.fmt(cur.loss)})),
        el("span", {}, "lr ", el("b", {text: TD.fmt(cur.lr)})),
        el("span", {}, "global step ", el("b", {text: String(cur.step ?? "–")}))));
    } else {
      const i = st.interrupted;
      box.replaceChildren(el("h2", {text: "training"}), el("div", {id: "dcurname",
        class: "muted", text: i ? `nothing (#${i.id} ${i.name} resumes at the next start)`
                                : "nothing"}));
    }
  }

  // Loss (and lr) against the global step, one series per file (the last few files).
  function renderCharts() {
    const byFile = new Map();
    for (const r of S.data.metrics) {
      if (!byFile.has(r.file_id)) byFile.set(r.file_id, []);
      byFile.get(r.file_id).push(r);
    }
    const names = new Map([...S.data.queue, ...S.data.history].map((f) => [f.id, f.name]));
    const cur = S.data.status.current;
    if (cur) names.set(cur.id, cur.name);
    const files = [...byFile.keys()].slice(-C.length);
    const series = (key) => files.map((id, i) => ({
      label: `#${id} ${names.get(id) || ""}`, color: C[i % C.length],
      points: byFile.get(id).filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]),
    }));
    for (const [id, key] of [["chart-dloss", "loss"], ["chart-dlr", "lr"]]) {
      const box = S.root.querySelector("#" + id), s = series(key);
      TD.chart(box.querySelector("svg"), s);
      box.querySelector(".legend").replaceWith(TD.legend(s));
    }
  }

  function renderQueue() {
    const box = S.root.querySelector("#dqueue"), q = S.data.queue;
    const rows = q.slice(0, 200).map((f) => {
      const skip = el("button", {class: "skip-queued", text: "skip"});
      skip.onclick = () => { if (confirm(`Skip #${f.id} ${f.name}?`)) act("skip", {id: f.id}); };
      return el("tr", {class: "queued", "data-id": f.id},
        el("td", {text: String(f.position)}), el("td", {text: `#${f.id}`}),
        el("td", {text: f.name}), el("td", {}, el("span", {class: "badge " + f.priority,
          text: f.priority})),
        el("td", {text: String(f.attempts)}),
        el("td", {class: "muted", text: f.error || ""}), el("td", {}, skip));
    });
    box.replaceChildren(el("h2", {text: `queue (${q.length}), next first`}), rows.length
      ? el("table", {}, el("tr", {}, ...["", "file", "name", "priority", "attempts",
                                          "last error", ""].map((t) => el("th", {text: t}))),
           ...rows)
      : el("div", {class: "muted", text: "empty: drop .jsonl files into inbox/"}));
  }

  function renderHistory() {
    const box = S.root.querySelector("#dhistory"), h = S.data.history;
    const rows = h.map((f) => el("tr", {class: "done", "data-id": f.id, "data-state": f.state},
      el("td", {text: when(f.finished_at)}), el("td", {text: `#${f.id}`}),
      el("td", {text: f.name}),
      el("td", {}, el("span", {class: "badge " + f.state, text: f.state})),
      el("td", {text: f.state === "completed"
        ? `${f.steps} steps (${f.step_before}→${f.step_after}), loss ${TD.fmt(f.loss_start)}` +
          ` → ${TD.fmt(f.loss_end)}` : (f.error || "")})));
    box.replaceChildren(el("h2", {text: "history, newest first"}), rows.length
      ? el("table", {}, el("tr", {}, ...["finished", "file", "name", "outcome", ""].map(
          (t) => el("th", {text: t}))), ...rows)
      : el("div", {class: "muted", text: "no finished files yet"}));
  }

  function renderAll() {
    renderHead(); renderCharts(); renderQueue(); renderHistory();
  }

  function listen() {
    const src = new EventSource(`/api/daemon/events?metrics=${S.data.offsets.metrics}`);
    S.source = src;
    src.onopen = () => TD.setLive(true);
    // On a broken stream, start again from a fresh snapshot (so no line is counted twice).
    src.onerror = () => {
      TD.setLive(false);
      src.close();
      if (S.source === src) S.retry = setTimeout(load, 2000);
    };
    src.addEventListener("metrics", (e) => {
      S.data.metrics.push(...JSON.parse(e.data));
      if (S.data.metrics.length > KEEP) S.data.metrics.splice(0, S.data.metrics.length - KEEP);
      renderCharts();
    });
    src.addEventListener("status", (e) => { S.data.status = JSON.parse(e.data); renderHead(); });
    src.addEventListener("queue", (e) => { S.data.queue = JSON.parse(e.data); renderQueue(); });
    src.addEventListener("history", (e) => {
      S.data.history = JSON.parse(e.data); renderHistory();
    });
  }

  async function load() {
    S.data = await TD.api("/api/daemon/state");
    renderAll();
    listen();
  }

  function chartBox(id, title) {
    return el("div", {class: "card chart", id}, el("h2", {text: title}), el("svg", {}),
              el("div", {class: "legend"}));
  }

  TD.views.daemon = {
    title: "daemon",
    async mount(root) {
      S.root = root;
      root.append(el("div", {class: "detail"},
        el("div", {class: "card", id: "dhead"},
          el("div", {id: "dinfo"}, el("span", {class: "muted", text: "loading…"})),
          el("div", {class: "actions"}, button("pause", "pause", () => act("pause")),
             button("resume", "resume", () => act("resume")),
             button("skip", "skip current file", skipCurrent),
             el("span", {id: "dmsg", class: "muted"}))),
        el("div", {class: "card", id: "dcurrent"}),
        el("div", {class: "charts"}, chartBox("chart-dloss", "loss by global step"),
           chartBox("chart-dlr", "learning rate")),
        el("div", {class: "card", id: "dqueue"}),
        el("div", {class: "card", id: "dhistory"})));
      await load();
    },
    unmount() {
      const src = S.source;
      S.source = null;
      if (src) src.close();
      clearTimeout(S.retry);
    },
  };
})();
