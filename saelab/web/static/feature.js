"use strict";
// Feature page: the activation histogram (the examples are rendered, escaped, by the server).
(function () {
  const data = saelab.json("feature-data");
  const h = data.histogram;
  const node = document.getElementById("hist-plot");
  if (!h || !h.counts.length) {
    node.replaceWith(saelab.el("p", { class: "muted" }, "no histogram"));
    return;
  }
  Plotly.newPlot(node, [{
    x: h.centers, y: h.counts, width: h.widths, type: "bar", marker: { color: "#f08a24" },
    hovertemplate: "%{x:.3g}: %{y}<extra></extra>",
  }], {
    margin: { l: 44, r: 6, t: 6, b: 36 }, bargap: 0.02,
    xaxis: { title: { text: "activation" }, type: h.log_x ? "log" : "linear" },
    yaxis: { type: "log", title: { text: "tokens" } },
  }, saelab.plotConfig);
})();
