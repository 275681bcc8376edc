"use strict";
// Monitor: a watchlist (kept in localStorage) and a scan of pasted text that lists the alerts.
(function () {
  const KEY = "saelab.watchlist";
  const table = document.querySelector("#watchlist tbody");
  const alerts = document.querySelector("#alerts tbody");
  const tokensNode = document.getElementById("scan-tokens");

  function load() {
    try {
      const items = JSON.parse(localStorage.getItem(KEY) || "[]");
      return Array.isArray(items) ? items.filter((w) => Number.isInteger(w.feature)) : [];
    } catch (e) { return []; }
  }
  let watch = load();
  const save = () => localStorage.setItem(KEY, JSON.stringify(watch));

  function renderWatchlist() {
    saelab.clear(table);
    if (!watch.length) {
      table.appendChild(saelab.el("tr")).appendChild(saelab.el("td", { colspan: 3, class: "muted" }, "empty: add features to watch"));
    }
    watch.forEach((w, i) => {
      const tr = saelab.el("tr");
      tr.appendChild(saelab.el("td")).appendChild(saelab.featureLink(w.feature));
      tr.appendChild(saelab.el("td", {}, w.threshold === null ? "default" : String(w.threshold)));
      const rm = saelab.el("button", { type: "button", class: "secondary" }, "×");
      rm.addEventListener("click", () => { watch.splice(i, 1); save(); renderWatchlist(); });
      tr.appendChild(saelab.el("td")).appendChild(rm);
      table.appendChild(tr);
    });
  }

  document.getElementById("watch-add").addEventListener("click", () => {
    const id = document.getElementById("watch-id").value;
    const th = document.getElementById("watch-threshold").value;
    if (id === "") return;
    watch = watch.filter((w) => w.feature !== Number(id));
    watch.push({ feature: Number(id), threshold: th === "" ? null : Number(th) });
    save();
    renderWatchlist();
  });

  function renderScan(res) {
    saelab.clear(tokensNode);
    const flagged = new Set(res.alerts.map((a) => a.token_index));
    res.tokens.forEach((t, i) => {
      const span = saelab.el("span", { class: flagged.has(i) ? "tok alert" : "tok" }, t);
      tokensNode.appendChild(span);
    });
    saelab.clear(alerts);
    if (!res.alerts.length) {
      alerts.appendChild(saelab.el("tr")).appendChild(saelab.el("td", { colspan: 6, class: "muted" }, "no alerts"));
    }
    for (const a of res.alerts) {
      const tr = saelab.el("tr");
      tr.appendChild(saelab.el("td", {}, a.offset));
      tr.appendChild(saelab.el("td")).appendChild(saelab.el("code", { class: "token" }, JSON.stringify(a.token)));
      tr.appendChild(saelab.el("td")).appendChild(saelab.featureLink(a.feature));
      tr.appendChild(saelab.el("td", {}, a.activation.toFixed(3)));
      tr.appendChild(saelab.el("td", {}, saelab.fmt(a.threshold)));
      tr.appendChild(saelab.el("td", { class: "expl" }, a.explanation || ""));
      alerts.appendChild(tr);
    }
  }

  document.getElementById("scan-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!watch.length) { saelab.status("scan-status", "add a feature to the watchlist first", true); return; }
    const button = document.getElementById("scan-run");
    button.disabled = true;
    saelab.status("scan-status", "scanning…");
    try {
      const res = await saelab.api("/api/monitor/scan", { text: document.getElementById("scan-text").value, watch: watch });
      renderScan(res);
      saelab.status("scan-status", res.alerts.length + " alert(s) over " + res.tokens.length + " tokens");
    } catch (e) {
      saelab.status("scan-status", e.message, true);
    } finally {
      button.disabled = false;
    }
  });
  renderWatchlist();
})();
