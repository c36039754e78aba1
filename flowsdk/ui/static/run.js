// The run page: the live action tree, the timeline, the event log and the operator's buttons.
"use strict";
(() => {
  const { el, add, visible, lines, phaseBadge, fmtTime, fmtDuration, api, readStream, showWho, showUnlessSame, LIVE_PHASES } = window.flowsdk;
  const FOLD_AFTER = 12; // a parent with more children than this shows the first ones and a summary
  const NOTABLE = 20; // ... and, of the others, at most this many that did not succeed
  const MAX_ROWS = 1500; // rows drawn at most, whatever the run's size
  const MAX_EVENTS = 300;

  const runName = (() => {
    const raw = location.pathname.replace(/^\/runs\//, "");
    try {
      return decodeURIComponent(raw);
    } catch {
      return raw; // a malformed `%` escape: asked for as it is, and said not found
    }
  })();
  let run = null;
  let actions = new Map();
  let events = new Map(); // seq -> event: the latest the stream sent (its first picture has the last 300)
  let queued = []; // the control requests the runner has not answered (the stream's `queued`)
  let role = null;
  let live = false;
  const expanded = new Set();
  const openTracebacks = new Set(); // kept open across the live re-renders
  let scheduled = null;

  document.title = "flowsdk · " + visible(runName); // the address is untrusted text too
  document.getElementById("crumb").textContent = visible(runName);

  const can = {
    control: () => role === "operator",
    execute: () => role === "operator" || role === "executor",
  };

  function schedule() {
    if (scheduled === null) scheduled = setTimeout(() => { scheduled = null; render(); }, actions.size > 2000 ? 300 : 60);
  }

  // -- the dialogs -------------------------------------------------------------------------

  const dialog = document.getElementById("confirm");
  const reasonBox = document.getElementById("confirm-reason");
  const dialogOutcome = document.getElementById("confirm-outcome");
  let pending = null;

  function ask(title, text, act, withReason = true) {
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = visible(text);
    reasonBox.value = "";
    reasonBox.parentElement.hidden = !withReason;
    dialogOutcome.textContent = "";
    document.getElementById("confirm-ok").disabled = false;
    pending = act;
    dialog.showModal();
    if (withReason) reasonBox.focus();
  }

  document.getElementById("confirm-cancel").addEventListener("click", () => { pending = null; dialog.close(); });
  document.getElementById("confirm-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!pending) return;
    const ok = document.getElementById("confirm-ok");
    ok.disabled = true;
    const reason = reasonBox.value.trim() || null;
    const { status, data } = await pending(reason);
    ok.disabled = false;
    const text = data && data.outcome ? data.outcome + ": " + data.message
      : data && data.message ? data.message : status === 202 ? "started" : "HTTP " + status;
    if (status === 200 || status === 202 || (status === 409 && data && data.outcome)) {
      pending = null;
      dialog.close();
      const outcome = document.getElementById("outcome");
      outcome.textContent = visible(text);
      outcome.dataset.outcome = data && data.outcome ? data.outcome : "started";
      if (status === 202) follow();
    } else {
      dialogOutcome.textContent = visible(text);
    }
  });

  const post = (path, body) => (reason) => api("POST", "/api/runs/" + encodeURIComponent(runName) + path, body === undefined ? undefined : Object.assign({}, body, { reason }));

  function liveBelow(name) {
    let count = 0;
    const stack = [name];
    const kids = childrenOf();
    while (stack.length) {
      const n = stack.pop();
      for (const c of kids.get(n) || []) {
        if (LIVE_PHASES.has(actions.get(c).phase)) count++;
        stack.push(c);
      }
    }
    return count;
  }

  function liveCount() {
    let n = 0;
    for (const a of actions.values()) if (LIVE_PHASES.has(a.phase)) n++;
    return n;
  }

  function button(label, cls, onClick) {
    const b = el("button", cls, label);
    b.type = "button";
    b.dataset.label = label; // an attribute: a kept button is never patched into another
    b.addEventListener("click", onClick);
    return b;
  }

  // The run's buttons: kept across drawings like the rest (`showUnlessSame`); their
  // texts are read when clicked.
  function runButtons() {
    const box = document.getElementById("run-buttons");
    const buttons = [];
    if (run && LIVE_PHASES.has(run.phase) && can.control()) {
      buttons.push(button("Abort run", "danger", () => ask("Abort run",
        `Abort run ${runName}: its ${liveCount()} action(s) in progress get CancelledError and end ABORTED.`,
        post("/abort", { action: null, group: null }))));
      if (run.phase === "RUNNING") {
        buttons.push(button("Stop and wait", "warn", () => ask("Stop and wait",
          `Stop and wait: no new action starts; the ${liveCount()} action(s) in progress are allowed to finish, then the run ends STOPPED.`,
          post("/stop", { abandon: false }))));
      }
      buttons.push(button("Stop and abandon", "danger", () => ask("Stop and abandon",
        `Stop and abandon: ${liveCount()} action(s) in progress will be ABANDONED and their cleanup not waited for.`,
        post("/stop", { abandon: true }))));
    }
    if (run && !LIVE_PHASES.has(run.phase) && run.phase !== "SUCCEEDED" && can.execute()) {
      buttons.push(button("Retry", "primary", () => ask("Retry",
        `Retry run ${runName}: attempt ${run.attempt + 1} starts in a new process; actions that succeeded are replayed from their recorded results.`,
        post("/retry"), false)));
    }
    showUnlessSame(box, buttons);
  }

  // -- the tree ----------------------------------------------------------------------------

  let kidsCache = null;
  function childrenOf() {
    if (kidsCache) return kidsCache;
    const kids = new Map();
    for (const a of actions.values()) {
      const key = a.parent;
      if (!kids.has(key)) kids.set(key, []);
      kids.get(key).push(a.name);
    }
    kidsCache = kids;
    return kids;
  }

  // One line for consecutive folded children: how many, which, their phases.
  function gapRow(names, depth) {
    const row = el("div", "fold gap",
      "… " + names.length.toLocaleString() + " folded (" + names[0] + (names.length > 1 ? " … " + names[names.length - 1] : "") + "): " + summary(names));
    row.style.paddingLeft = (depth * 18 + 4) + "px";
    return row;
  }

  function summary(names) {
    const counts = new Map();
    for (const n of names) {
      const p = actions.get(n).phase;
      counts.set(p, (counts.get(p) || 0) + 1);
    }
    return [...counts].map(([p, c]) => c + " " + p).join(", ");
  }

  function actionRow(a, depth) {
    const row = el("div", "action");
    row.dataset.action = a.name;
    row.dataset.phase = a.phase;
    const head = el("div", "line");
    head.style.paddingLeft = (depth * 18 + 4) + "px";
    const tags = el("span", "tags");
    if (a.attempt > 1) add(tags, el("span", "tag", "attempt " + a.attempt));
    if (a.replayed) add(tags, el("span", "tag", "replayed"));
    if (a.executor && a.executor !== "local") add(tags, el("span", "tag", `on ${a.executor}`));
    if (a.cleanup_incomplete) add(tags, el("span", "tag bad", "cleanup incomplete"));
    add(head, 
      el("span", "name mono", a.name),
      el("span", "task mono", a.task),
      phaseBadge(a.phase),
      el("span", "dur num", fmtDuration(a.started_at, a.ended_at)),
      tags
    );
    if (LIVE_PHASES.has(a.phase) && can.control()) {
      const acts = el("span", "row-buttons");
      add(acts, 
        button("Abort action", "small danger", () => ask("Abort action",
          `Abort action ${a.name} (${a.task}): ${itAndBelow(liveBelow(a.name))} CancelledError and ${liveBelow(a.name) ? "end" : "ends"} ABORTED.`,
          post("/abort", { action: a.name, group: null }))),
        button("Mark as failed", "small warn", () => ask("Mark as failed",
          `Mark action ${a.name} (${a.task}) as failed: its body is cancelled, it ends FAILED and its parent gets RuntimeUserError.`,
          post("/fail", { action: a.name })))
      );
      add(head, acts);
    }
    add(row, head);
    const pad = (depth * 18 + 26) + "px";
    if (a.error) {
      const err = el("div", "error");
      err.style.paddingLeft = pad;
      add(err, el("span", "etype", a.error.type + ": "), el("span", null, a.error.message));
      if (a.error.traceback) {
        // Several lines, as `flowsdk show RUN ACTION` prints it: each line made visible.
        const tb = el("details", null, el("summary", null, "traceback"), el("pre", null, lines(a.error.traceback)));
        tb.open = openTracebacks.has(a.name);
        tb.addEventListener("toggle", () => {
          if (tb.open) openTracebacks.add(a.name);
          else openTracebacks.delete(a.name);
        });
        add(err, tb);
      }
      add(row, err);
    }
    if (a.abort) {
      const ab = el("div", "abort");
      ab.style.paddingLeft = pad;
      add(ab, 
        el("span", "cause", a.abort.cause),
        a.abort.reason ? el("span", "reason", "“" + a.abort.reason + "”") : null,
        a.abort.requested_by ? el("span", "muted", "by " + a.abort.requested_by) : null,
        a.abort.requested_at ? el("span", "muted", "at " + fmtTime(a.abort.requested_at)) : null
      );
      add(row, ab);
    }
    return row;
  }

  // The subjects of an abort dialog's sentence, counted in words.
  function liveActions(n) {
    return n === 1 ? "its 1 live action gets" : `its ${n} live actions get`;
  }
  function itAndBelow(n) {
    if (n === 0) return "it gets";
    return n === 1 ? "it and its 1 live descendant get" : `it and its ${n} live descendants get`;
  }

  function groupRow(group, names, depth) {
    const row = el("div", "group");
    row.dataset.group = group;
    row.style.paddingLeft = (depth * 18 + 4) + "px";
    const live = (n) => LIVE_PHASES.has(actions.get(n).phase);
    add(row, el("span", "muted", "stage"), el("span", "gname", group), el("span", "muted", summary(names)));
    if (names.some(live) && can.control()) {
      // Counted when clicked: the button outlives the drawing that made it.
      const liveInStage = () => [...actions.values()].filter((a) => a.group === group && live(a.name)).length;
      add(row, button("Abort stage", "small danger", () => ask("Abort stage",
        `Abort stage ${group}: ${liveActions(liveInStage())} CancelledError and ${liveInStage() === 1 ? "ends" : "end"} ABORTED.`,
        post("/abort", { action: null, group }))));
    }
    return row;
  }

  // The actions whose subtree holds one that did not succeed (itself included).
  function troubledSubtrees() {
    const marked = new Set();
    for (const a of actions.values()) {
      if (a.phase === "SUCCEEDED") continue;
      for (let n = a.name; n !== null && !marked.has(n); n = actions.get(n)?.parent ?? null) marked.add(n);
    }
    return marked;
  }

  function renderTree() {
    kidsCache = null;
    const kids = childrenOf();
    const troubled = troubledSubtrees();
    const rows = [];
    const order = [];
    const walk = (parent, depth) => {
      const names = kids.get(parent) || [];
      const byGroup = new Map();
      for (const n of names) {
        const g = actions.get(n).group;
        if (!byGroup.has(g)) byGroup.set(g, []);
        byGroup.get(g).push(n);
      }
      for (const [group, members] of byGroup) {
        if (rows.length >= MAX_ROWS) return;
        let d = depth;
        if (group !== null && group !== (parent !== null ? actions.get(parent)?.group : null)) {
          rows.push(groupRow(group, members, depth));
          d = depth + 1;
        }
        const key = String(parent) + "\u0000" + String(group);
        const folded = members.length > FOLD_AFTER && !expanded.has(key);
        let shown = members;
        let rest = [];
        if (folded) {
          // The first ones, then the first NOTABLE of the others whose subtree holds an
          // action that did not succeed (a failure, even one a child caught, is not folded
          // away while there is room): the rest are counted.
          const first = members.slice(0, FOLD_AFTER - 2);
          const notable = new Set();
          for (const n of members.slice(first.length)) {
            if (notable.size >= NOTABLE) break;
            if (troubled.has(n)) notable.add(n);
          }
          shown = first.concat([...notable]);
          rest = members.slice(first.length).filter((n) => !notable.has(n));
        }
        // In the children's order: each run of folded ones between two drawn ones is one
        // line where it stands (what it folds, from which to which), as `flowsdk show` does.
        const drawn = new Set(shown);
        let gap = [];
        for (const n of members) {
          if (!drawn.has(n)) {
            gap.push(n);
            continue;
          }
          if (rows.length >= MAX_ROWS) return;
          if (gap.length) rows.push(gapRow(gap, d));
          gap = [];
          rows.push(actionRow(actions.get(n), d));
          order.push(n);
          walk(n, d + 1);
        }
        if (gap.length && gap.length < rest.length) rows.push(gapRow(gap, d));
        if (folded && rest.length) {
          const fold = el("div", "fold");
          fold.dataset.fold = key; // what its button expands: part of its equality
          fold.style.paddingLeft = (d * 18 + 4) + "px";
          add(fold, 
            el("span", null, "… " + rest.length.toLocaleString() + " more actions: " + summary(rest)),
            button("Show all", "small", () => { expanded.add(key); render(); })
          );
          rows.push(fold);
        }
      }
    };
    walk(null, 0);
    if (rows.length >= MAX_ROWS) rows.push(el("div", "fold", "… more actions not drawn (" + actions.size.toLocaleString() + " in all)"));
    showUnlessSame(document.getElementById("tree"), rows);
    return order;
  }

  // -- the timeline ------------------------------------------------------------------------

  function renderTimeline(order) {
    const box = document.getElementById("timeline");
    if (!run) return;
    const t0 = new Date(run.started_at).getTime();
    let t1 = run.ended_at ? new Date(run.ended_at).getTime() : Date.now();
    for (const n of order) {
      const a = actions.get(n);
      if (a.ended_at) t1 = Math.max(t1, new Date(a.ended_at).getTime());
    }
    const span = Math.max(t1 - t0, 1);
    const rows = [];
    const axis = el("div", "axis", el("span", null, "0s"), el("span", null, fmtDuration(run.started_at, new Date(t1).toISOString())));
    rows.push(axis);
    for (const n of order.slice(0, 300)) {
      const a = actions.get(n);
      if (!a.started_at) continue;
      const start = new Date(a.started_at).getTime();
      const end = a.ended_at ? new Date(a.ended_at).getTime() : Date.now();
      const bar = el("div", "bar");
      bar.dataset.phase = a.phase;
      bar.style.left = ((start - t0) / span * 100).toFixed(3) + "%";
      bar.style.width = Math.max((end - start) / span * 100, 0.4).toFixed(3) + "%";
      bar.title = visible(a.name + " " + a.task + " " + a.phase + " " + fmtDuration(a.started_at, a.ended_at));
      const track = el("div", "track", bar);
      rows.push(el("div", "tl-row", el("span", "tl-name mono", a.name + " " + a.task.split(".").pop()), track));
    }
    if (order.length > 300) rows.push(el("div", "fold", "… the first 300 drawn actions are shown"));
    showUnlessSame(box, rows);
  }

  // -- progress curves and logs ------------------------------------------------------------

  // The SVG namespace, from an <svg> of the page (the HTML parser gives it its namespace).
  const SVG_NS = document.getElementById("svg-proto").namespaceURI;
  const MAX_CURVES = 200;
  const MAX_LOGS = 500;
  let progress = []; // the run's reports, oldest first
  let logs = []; // the latest log records, oldest first
  let logCursor = -1;
  let tracing = false;

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return add(node, ...children); // text made visible (a curve's title holds stored names)
  }

  async function loadTrace() {
    if (tracing || run === null) return; // nothing to read before the run is known to exist
    tracing = true;
    try {
      const base = "/api/runs/" + encodeURIComponent(runName);
      const attempt = run ? "attempt=" + run.attempt + "&" : "";
      const p = await api("GET", base + "/progress?" + attempt);
      if (p.status === 200) progress = p.data.progress;
      // Page on to the newest records (each answer holds at most 5,000); keep the last ones.
      for (let page = 0; page < 20; page++) {
        const l = await api("GET", base + "/logs?" + attempt + "after=" + logCursor);
        if (l.status !== 200 || !l.data.logs.length) break;
        logs = logs.concat(l.data.logs).slice(-MAX_LOGS);
        logCursor = l.data.logs[l.data.logs.length - 1].seq;
        if (l.data.logs.length < 5000) break;
      }
      schedule();
    } finally {
      tracing = false;
    }
  }

  function fmtValue(v) {
    return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : String(Math.round(v * 1e4) / 1e4);
  }

  function renderProgress() {
    const section = document.getElementById("progress-section");
    if (!progress.length) { section.hidden = true; return; }
    section.hidden = false;
    const series = new Map(); // "action name" -> {action, name, points}
    for (const r of progress) {
      const key = r.action + " " + r.name;
      if (!series.has(key)) {
        if (series.size >= MAX_CURVES) continue;
        series.set(key, { action: r.action, name: r.name, points: [] });
      }
      const s = series.get(key);
      s.points.push([r.step === null ? s.points.length : r.step, r.value]);
    }
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const s of series.values()) {
      for (const [x, y] of s.points) {
        if (!Number.isFinite(y)) continue;
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
      }
    }
    if (!Number.isFinite(x0)) { x0 = 0; x1 = 1; y0 = 0; y1 = 1; }
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    const W = 720, H = 260, L = 56, R = 12, T = 10, B = 28;
    const px = (x) => (L + (x - x0) / (x1 - x0) * (W - L - R)).toFixed(1);
    const py = (y) => (T + (1 - (y - y0) / (y1 - y0)) * (H - T - B)).toFixed(1);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "curves", role: "img", "aria-label": "progress curves" });
    chart.append(
      svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
      svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }),
      svg("text", { x: L - 4, y: T + 8, class: "tick", "text-anchor": "end" }, fmtValue(y1)),
      svg("text", { x: L - 4, y: H - B, class: "tick", "text-anchor": "end" }, fmtValue(y0)),
      svg("text", { x: L, y: H - 8, class: "tick" }, "step " + x0),
      svg("text", { x: W - R, y: H - 8, class: "tick", "text-anchor": "end" }, "step " + x1)
    );
    let i = 0;
    for (const s of series.values()) {
      const a = actions.get(s.action);
      const phase = a ? a.phase : "RUNNING";
      const finite = s.points.filter(([, y]) => Number.isFinite(y));
      const last = s.points[s.points.length - 1];
      let why = s.action + (a ? " " + a.task : "") + " · " + s.name + " · " + phase + " · last " + fmtValue(last[1]) + " at step " + last[0];
      if (a && a.abort) why += " · " + a.abort.cause + (a.abort.reason ? ": " + a.abort.reason : "");
      const color = `hsl(${(i * 137) % 360} 60% 42%)`;
      const pruned = phase === "ABORTED" ? " pruned" : "";
      // A line needs two points: a single report is drawn as a dot.
      const curve = finite.length === 1
        ? svg("circle", { cx: px(finite[0][0]), cy: py(finite[0][1]), r: 3.5, class: "point" + pruned, fill: color }, svg("title", null, why))
        : svg("polyline", { points: finite.map(([x, y]) => px(x) + "," + py(y)).join(" "), class: "curve" + pruned, stroke: color }, svg("title", null, why));
      curve.dataset.action = s.action;
      curve.dataset.phase = phase;
      chart.append(curve);
      i += 1;
    }
    const box = document.getElementById("progress");
    const note = series.size >= MAX_CURVES ? el("div", "fold", "… the first " + MAX_CURVES + " curves are drawn") : null;
    showUnlessSame(box, note ? [chart, note] : [chart]);
  }

  function renderLogs() {
    const section = document.getElementById("logs-section");
    if (!logs.length) { section.hidden = true; return; }
    section.hidden = false;
    const items = logs.map((r) => {
      const item = el("li", "log");
      item.dataset.level = r.level;
      add(item, el("span", "muted mono", fmtTime(r.at)), el("span", "mono", r.action), el("span", "kind", r.level), el("span", "muted", r.logger), el("span", "msg", lines(r.message)));
      return item;
    });
    showUnlessSame(document.getElementById("logs"), items);
  }

  // -- the header and the event log --------------------------------------------------------

  function renderHead() {
    document.getElementById("run-view").hidden = false;
    document.getElementById("run-name").textContent = visible(runName);
    const phase = document.getElementById("run-phase");
    phase.textContent = visible(run.phase);
    phase.dataset.phase = run.phase;
    document.getElementById("live").textContent = live ? "● live" : "";
    const facts = document.getElementById("run-facts");
    const fact = (k, v) => el("div", "fact", el("dt", null, k), el("dd", null, v)); // a <dl> may group in <div>
    showUnlessSame(facts, [
      fact("task", run.task || "-"), fact("attempt", run.attempt),
      fact("started", fmtTime(run.started_at)), fact("duration", fmtDuration(run.started_at, run.ended_at)),
    ]);
    const stop = run.stop ? [
      el("strong", null, "stop (" + run.stop.mode + ")"),
      run.stop.reason ? el("span", "reason", "“" + run.stop.reason + "”") : null,
      el("span", "muted", "by " + (run.stop.requested_by || "?") + " at " + fmtTime(run.stop.requested_at)),
    ].filter((node) => node !== null) : [];
    showUnlessSame(document.getElementById("run-stop"), stop);
    showUnlessSame(document.getElementById("run-queued"), queued.map(queuedLine));
    const counts = new Map();
    for (const a of actions.values()) counts.set(a.phase, (counts.get(a.phase) || 0) + 1);
    showUnlessSame(document.getElementById("counts"),
      [...counts].map(([p, c]) => { const b = phaseBadge(c.toLocaleString() + " " + p); b.dataset.phase = p; return b; })
    );
  }

  // What a queued request asks for, in the CLI's words (`flowsdk show RUN`).
  function asked(r) {
    if (r.type === "stop") return r.abandon ? "stop and abandon" : "stop and wait";
    if (r.type === "mark_failed") return "mark action " + r.action + " as failed";
    if (r.action !== null && r.action !== undefined) return "abort of action " + r.action;
    if (r.group !== null && r.group !== undefined) return "abort of group " + r.group;
    return "abort of the run";
  }

  // One line per request the runner has not applied yet (its loop is blocked, or its
  // process paused), as `flowsdk show RUN` prints it, so nobody asks again. Every part
  // of it (names, who asked, the reason) is untrusted: text nodes only.
  const REASON_SHOWN = 300; // characters; the whole reason is in the line's title
  function queuedLine(q) {
    const r = q.request;
    const line = el("div", "queued-request");
    line.dataset.request = q.id;
    line.dataset.taken = q.taken ? "true" : "false";
    let reason = null;
    if (r.reason) {
      const chars = Array.from(r.reason); // by character: never half a surrogate pair
      const cut = chars.length > REASON_SHOWN ? chars.slice(0, REASON_SHOWN).join("") + "…" : r.reason;
      reason = el("span", "reason", "\"" + cut + "\"");
      reason.title = visible(r.reason);
    }
    add(line,
      el("strong", null, "queued #" + q.id), " ",
      asked(r),
      r.requested_by ? " by " + r.requested_by : null,
      " at " + fmtTime(q.at),
      reason ? " (reason: " : null, reason, reason ? ")" : null,
      ", ",
      el("span", "muted", q.taken ? "taken by the runner, not yet applied" : "not yet taken by the runner")
    );
    return line;
  }

  function renderEvents() {
    const list = document.getElementById("events");
    const all = [...events.values()].sort((x, y) => x.seq - y.seq);
    const items = all.slice(-MAX_EVENTS).reverse().map((e) => { // newest first
      const item = el("li", "event");
      item.dataset.kind = e.kind;
      add(item, 
        el("span", "muted mono", fmtTime(e.at)),
        el("span", "kind", e.kind),
        e.action ? el("span", "mono", e.action) : null,
        e.phase ? phaseBadge(e.phase) : null,
        e.cause ? el("span", "cause", e.cause) : null,
        e.reason ? el("span", "reason", "“" + e.reason + "”") : null,
        e.requested_by ? el("span", "muted", "by " + e.requested_by) : null,
        e.message ? el("span", "msg", e.message) : null
      );
      return item;
    });
    showUnlessSame(list, items);
  }

  function render() {
    if (!run) return;
    renderHead();
    runButtons();
    const order = renderTree();
    renderTimeline(order);
    renderProgress();
    renderLogs();
    renderEvents();
  }

  // -- following the run -------------------------------------------------------------------

  // The stream sends changes from now on; the log so far is read once.
  function addEvent(e) {
    events.set(e.seq, e);
    if (events.size > 2 * MAX_EVENTS) { // keep the latest: the log shows MAX_EVENTS
      const keep = [...events.keys()].sort((x, y) => x - y).slice(-MAX_EVENTS);
      events = new Map(keep.map((seq) => [seq, events.get(seq)]));
    }
  }

  let following = false;
  async function follow() {
    if (following) return;
    following = true;
    try {
      for (;;) {
        live = true;
        let ended = false;
        queued = []; // each first picture sends the list when there is one
        await readStream("/api/runs/" + encodeURIComponent(runName) + "/stream", (kind, data) => {
          if (kind === "run") {
            if (run && data.attempt !== run.attempt) { actions = new Map(); events = new Map(); }
            run = data;
          } else if (kind === "queued") { // the whole list, each time it changes
            queued = data;
          } else if (kind === "action") { // one per action in the first picture, then changes
            actions.set(data.name, data);
          } else if (kind === "event") {
            addEvent(data);
          } else if (kind === "end") {
            run = data;
            queued = []; // an ended run's runner applies nothing more
            ended = true;
          }
          schedule();
        });
        if (ended) break;
        await new Promise((r) => setTimeout(r, 300)); // a new attempt began: follow it
      }
    } catch (e) {
      if (run === null) showInstead(e.message); // no run to draw: not found, or not allowed
      else document.getElementById("outcome").textContent = visible(e.message);
    } finally {
      live = false;
      following = false;
      if (run !== null) {
        loadTrace(); // what was reported and logged up to the end
        schedule();
      }
    }
  }

  // The page of a run it cannot show (`/runs/NOPE`): the answer's message (the CLI's
  // "no run named 'NOPE' in STORE", with the names it may have meant) and a way back,
  // instead of the frames of a run.
  function showInstead(message) {
    const back = el("a", null, "← all runs");
    back.href = "/";
    const box = document.getElementById("missing");
    showUnlessSame(box, [el("p", null, message), el("p", null, back)]);
    box.hidden = false;
    document.getElementById("run-view").hidden = true;
  }

  showWho().then((who) => {
    role = who ? who.role : null;
    follow();
  });
  setInterval(() => { if (live) { schedule(); loadTrace(); } }, 1000); // running durations advance
})();
