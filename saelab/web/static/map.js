"use strict";
// The feature map: every feature at its (x, y) from features.db, drawn with WebGL (scattergl) so that
// 100k points pan and zoom smoothly; hover shows the explanation, click opens the feature's page.
(function () {
  const cfg = saelab.json("map-config");
  const node = document.getElementById("map-plot");
  const card = document.getElementById("hover-card");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
  const webgl = (() => {
    try { return Boolean(document.createElement("canvas").getContext("webgl")); } catch (e) { return false; }
  })();
  let points = null;
  const briefs = new Map();

  function clusterColors(clusters) {
    return clusters.map((c) => (c === null || c < 0 ? "#c0c4cc" : PALETTE[c % PALETTE.length]));
  }

  function markers(ids, colorBy, extra) {
    const m = { size: ids.length > 20000 ? 3 : 6, opacity: 0.8 };
    if (colorBy === "density") {
      m.color = points.density.map((d) => Math.log10(Math.max(d, 1e-7)));
      m.colorscale = "Viridis";
      m.colorbar = { title: { text: "log10 density" }, thickness: 12 };
    } else {
      m.color = clusterColors(points.cluster);
    }
    return Object.assign(m, extra || {});
  }

  function drawAll() {
    const colorBy = document.getElementById("color-by").value;
    const traces = [{
      x: points.x, y: points.y, customdata: points.ids, type: webgl ? "scattergl" : "scatter", mode: "markers",
      marker: markers(points.ids, colorBy), hovertemplate: "#%{customdata}<extra></extra>", name: "features",
    }];
    const focus = cfg.focus;
    if (focus !== null && focus !== undefined) {
      const i = points.index.get(Number(focus));
      if (i !== undefined) {
        traces.push({
          x: [points.x[i]], y: [points.y[i]], customdata: [focus], type: "scatter", mode: "markers+text",
          text: ["#" + focus], textposition: "top center", name: "selected",
          marker: { size: 16, color: "rgba(0,0,0,0)", line: { color: "#d62728", width: 3 } },
          hovertemplate: "#%{customdata}<extra></extra>",
        });
      }
    }
    Plotly.react(node, traces, {
      margin: { l: 10, r: 10, t: 10, b: 10 }, showlegend: false, dragmode: "pan", hovermode: "closest",
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
    }, Object.assign({ scrollZoom: true }, saelab.plotConfig));
    saelab.status("map-status", points.ids.length + " features" + (webgl ? "" : " (WebGL unavailable: slower SVG drawing)") +
      " · scroll to zoom, drag to pan, click a point to open it");
  }

  async function drawNeighbourhood(id, n) {
    saelab.status("map-status", "laying out the neighbourhood of #" + id + "…");
    const nb = await saelab.api("/api/map/neighbourhood/" + id + "?n=" + n);
    nb.explanations.forEach((e, i) => briefs.set(nb.ids[i], e));
    Plotly.react(node, [{
      x: nb.x, y: nb.y, customdata: nb.ids, type: "scatter", mode: "markers+text",
      text: nb.ids.map((f) => "#" + f), textposition: "top center", textfont: { size: 10 },
      marker: {
        size: nb.ids.map((f) => (f === nb.center ? 18 : 10)), color: nb.similarity, colorscale: "Viridis",
        colorbar: { title: { text: "cosine to #" + nb.center }, thickness: 12 }, line: { color: "#333", width: 0.5 },
      },
      hovertemplate: "#%{customdata}<extra></extra>",
    }], {
      margin: { l: 10, r: 10, t: 10, b: 10 }, showlegend: false, hovermode: "closest",
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
    }, saelab.plotConfig);
    saelab.status("map-status", "the " + nb.ids.length + " features nearest #" + nb.center +
      " by decoder cosine, laid out locally · click one to open it");
  }

  async function showBrief(id) {
    if (!briefs.has(id)) {
      briefs.set(id, null);
      const f = await saelab.api("/api/features/" + id + "/summary").catch(() => null);
      briefs.set(id, f ? (f.explanation || "") : "");
    }
    const expl = briefs.get(id);
    saelab.clear(card);
    card.appendChild(saelab.el("strong", {}, "#" + id));
    card.appendChild(saelab.el("div", {}, expl === null ? "…" : (expl || "no explanation")));
    card.hidden = false;
  }

  function wire() {
    node.on("plotly_click", (ev) => {
      const p = ev.points && ev.points[0];
      if (p && p.customdata !== undefined) window.location.href = "/features/" + Number(p.customdata);
    });
    node.on("plotly_hover", (ev) => {
      const p = ev.points && ev.points[0];
      if (p && p.customdata !== undefined) showBrief(Number(p.customdata));
    });
    node.on("plotly_unhover", () => { card.hidden = true; });
  }

  async function main() {
    points = await saelab.api("/api/map");
    points.index = new Map(points.ids.map((id, i) => [id, i]));
    if (cfg.around !== null && cfg.around !== undefined) {
      await drawNeighbourhood(Number(cfg.around), Number(document.getElementById("focus-n").value));
    } else {
      drawAll();
    }
    wire();
    document.getElementById("color-by").addEventListener("change", drawAll);
    document.getElementById("show-all").addEventListener("click", () => { cfg.focus = null; drawAll(); });
    document.getElementById("show-neighbourhood").addEventListener("click", () => {
      const id = document.getElementById("focus-id").value;
      if (id !== "") drawNeighbourhood(Number(id), Number(document.getElementById("focus-n").value))
        .catch((e) => saelab.status("map-status", e.message, true));
    });
  }
  main().catch((e) => saelab.status("map-status", e.message, true));
})();
