"use strict";
// Feature page: the activation histogram, and "try your own text" (the feature's activation on every token
// of it). The examples are rendered, escaped, by the server.
(function () {
  const data = saelab.json("feature-data");
  const h = data.histogram;
  const node = document.getElementById("hist-plot");
  if (!h || !h.counts.length) {
    node.replaceWith(saelab.el("p", { class: "muted" }, "no histogram"));
  } else {
    Plotly.newPlot(node, [{
      x: h.centers, y: h.counts, width: h.widths, type: "bar", marker: { color: "#f08a24" },
      hovertemplate: "activation %{x:.3g}: %{y} tokens<extra></extra>",
    }], {
      margin: { l: 56, r: 8, t: 8, b: 44 }, bargap: 0.02, font: { size: 12 },
      xaxis: { title: { text: "activation (when it fires)" }, type: h.log_x ? "log" : "linear" },
      yaxis: { type: "log", title: { text: "tokens (log scale)" }, dtick: 1 },  // ticks at powers of 10 only
    }, saelab.plotConfig);
  }

  const form = document.getElementById("try-form");
  if (!form) return;
  const out = document.getElementById("try-tokens");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = document.getElementById("try-text").value;
    if (!text) { saelab.status("try-status", "type some text first", true); return; }
    const button = document.getElementById("try-run");
    button.disabled = true;
    saelab.status("try-status", "running the model…");
    try {
      const r = await saelab.api("/api/features/" + data.feature + "/activations", { text: text });
      saelab.activationText(out, r.tokens, data.max_act);
      out.hidden = false;
      const peak = Math.max(0, ...r.tokens.map((t) => t.act));
      const fired = r.tokens.filter((t) => t.act > 0).length;
      saelab.status("try-status", fired ? "fires on " + fired + " of " + r.tokens.length + " tokens, at most " +
        peak.toFixed(2) + " (" + Math.round(100 * peak / (data.max_act || 1)) + "% of its max on the corpus)"
        : "does not fire on any of the " + r.tokens.length + " tokens");
    } catch (e) {
      saelab.status("try-status", e.message, true);
    } finally {
      button.disabled = false;
    }
  });
})();
