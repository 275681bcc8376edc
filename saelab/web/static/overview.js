"use strict";
// Overview plots: training curve (one panel per logged metric) and the log10 feature-density histogram.
(function () {
  const data = saelab.json("overview-data");
  const train = data.train;
  const trainNode = document.getElementById("train-plot");
  if (train && trainNode) {
    const names = Object.keys(train.series);
    const traces = names.map((name, i) => ({
      x: train.x, y: train.series[name], name: saelab.plotText(name), type: "scatter", mode: "lines",
      xaxis: "x" + (i + 1), yaxis: "y" + (i + 1),
    }));
    const layout = {
      margin: { l: 50, r: 10, t: 24, b: 40 }, showlegend: false,
      grid: { rows: 1, columns: Math.max(1, names.length), pattern: "independent" },
      annotations: names.map((name, i) => ({
        text: saelab.plotText(name), showarrow: false, xref: "x" + (i + 1) + " domain", yref: "y" + (i + 1) + " domain",
        x: 0.5, y: 1.08, font: { size: 12 },
      })),
    };
    names.forEach((name, i) => {
      layout["xaxis" + (i + 1)] = { title: { text: saelab.plotText(i === 0 ? train.xlabel : "") } };
      if (train.log.includes(name)) layout["yaxis" + (i + 1)] = { type: "log" };
    });
    Plotly.newPlot(trainNode, traces, layout, saelab.plotConfig);
  }
  const d = data.density;
  Plotly.newPlot("density-plot", [{
    x: d.centers, y: d.counts, type: "bar", width: d.width, marker: { color: "#2f6fde" },
    hovertemplate: "log10 density %{x:.2f}<br>%{y} features<extra></extra>",
  }], {
    margin: { l: 50, r: 10, t: 10, b: 44 }, bargap: 0.05,
    xaxis: { title: { text: "log10(feature density)" } }, yaxis: { title: { text: "features" } },
  }, saelab.plotConfig);
})();
