// The history page: runs newest first, filtered by phase and name, refreshed live.
"use strict";
(() => {
  const { el, visible, clipped, phaseBadge, fmtTime, fmtDuration, api, showWho, showUnlessSame } = window.flowsdk;
  const PHASES = ["RUNNING", "STOPPING", "SUCCEEDED", "FAILED", "ABORTED", "STOPPED", "CRASHED"];
  const select = document.getElementById("phase");
  const name = document.getElementById("name");
  const body = document.getElementById("runs");
  const status = document.getElementById("status");
  for (const p of PHASES) select.append(el("option", null, p));
  const params = new URLSearchParams(location.search);
  select.value = params.get("phase") || "";
  name.value = params.get("name") || "";

  async function refresh() {
    const query = new URLSearchParams({ limit: "200" });
    if (select.value) query.set("phase", select.value);
    if (name.value) query.set("name", name.value);
    const { status: code, data } = await api("GET", "/api/runs?" + query);
    if (code !== 200) {
      status.textContent = visible(data ? data.message : "HTTP " + code);
      return;
    }
    status.textContent = "";
    const rows = data.map((run) => {
      // Stored text is cut to its column (whole in the title; the run's page shows it all),
      // so that no text widens the table past the window.
      const link = clipped("a", null, run.name);
      link.href = "/runs/" + encodeURIComponent(run.name);
      const row = el(
        "tr", null,
        el("td", null, link),
        el("td", null, phaseBadge(run.phase)),
        clipped("td", "mono", run.task || "-"),
        el("td", "num", run.attempt),
        el("td", null, fmtTime(run.started_at)),
        el("td", "num", fmtDuration(run.started_at, run.ended_at)),
        reasonCell(run)
      );
      row.dataset.run = run.name;
      return row;
    });
    showUnlessSame(body, rows); // a link being clicked or text being selected stays put
    document.getElementById("count").textContent = data.length + (data.length === 1 ? " run" : " runs");
  }

  // Why the run ended early, as `flowsdk runs` says it: a stop's mode and reason, or, for
  // a run recorded CRASHED (only crash detection records one), that its runner is gone.
  function reasonCell(run) {
    if (run.stop) return clipped("td", "muted stop", run.stop.mode + (run.stop.reason ? ": " + run.stop.reason : ""));
    return el("td", "muted stop", run.phase === "CRASHED" ? "runner gone" : null);
  }

  function filtersChanged() {
    const query = new URLSearchParams();
    if (select.value) query.set("phase", select.value);
    if (name.value) query.set("name", name.value);
    history.replaceState(null, "", query.toString() ? "?" + query : "/");
    refresh();
  }
  select.addEventListener("change", filtersChanged);
  name.addEventListener("input", filtersChanged);
  showWho().then(refresh);
  setInterval(refresh, 2000);
})();
