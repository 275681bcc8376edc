"use strict";
// The feature map: every feature at its (x, y) from features.db, drawn with WebGL (scattergl) so that
// 100k points pan and zoom smoothly. Cluster names (from the members' explanations) are written at the
// clusters' centres, the largest first, never more than fit; zoomed in far enough, each point gets its own
// explanation. Hover shows the explanation, click opens the feature's page.
(function () {
  const cfg = saelab.json("map-config");
  const node = document.getElementById("map-plot");
  const card = document.getElementById("hover-card");
  const legend = document.querySelector("#map-legend tbody");
  // 20 distinguishable colours for the 20 largest clusters; every other cluster is grey, and the legend says so.
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                   "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
                   "#31a354", "#756bb1", "#636363", "#9c9ede"];
  const GREY = "#c0c4cc";
  // Family relations (saelab families), the same colours as the feature page's badges.
  const RELATION_COLOURS = { persist: "#1f77b4", split: "#ff7f0e", new: "#2ca02c", vanished: "#7f7f7f" };
  const RELATION_WORDS = {
    up: { persist: "persists from", split: "split off from", new: "no parent in" },
    down: { persist: "persists into", split: "splits into", vanished: "no child in" },
  };
  const MAX_CLUSTER_LABELS = 12;  // names drawn at once: more overlap into noise
  const MAX_POINT_LABELS = 40;    // points in view below which each point shows its explanation
  let points = null;
  let colourOf = new Map();  // cluster id -> colour
  let mode = "all";
  const briefs = new Map();

  function short(text, n) { return text.length > n ? text.slice(0, n - 1) + "…" : text; }

  // Marker style of the points idx (indices into points) under the colouring chosen.
  function markers(colorBy, idx) {
    const m = { size: points.ids.length > 20000 ? 3 : 6, opacity: 0.8 };
    if (colorBy === "family-up" || colorBy === "family-down") {
      const rel = points.family[colorBy === "family-up" ? "up" : "down"];
      m.color = idx.map((i) => RELATION_COLOURS[rel[i]] || GREY);
    } else if (colorBy === "density") {
      m.color = idx.map((i) => Math.log10(points.density[i]));
      m.colorscale = "Viridis";
      m.colorbar = { title: { text: saelab.plotText("log10 density") }, thickness: 12 };
    } else {
      m.color = idx.map((i) => colourOf.get(points.cluster[i]) || GREY);
    }
    return m;
  }

  // Which points trace 0 draws: all of them, except that coloured by density the dead ones (density 0, no
  // logarithm) go to a grey trace of their own instead of being painted as the rarest live ones.
  function shownIndices(colorBy) {
    const all = points.ids.map((_, i) => i);
    return colorBy === "density" ? all.filter((i) => points.density[i] > 0) : all;
  }

  // The label trace for the current view: cluster names at their centres, and per-point explanations
  // when few enough points are in view to read them.
  function labelsInView() {
    const L = node._fullLayout;
    const [x0, x1] = L.xaxis.range, [y0, y1] = L.yaxis.range;
    const inView = (x, y) => x >= Math.min(x0, x1) && x <= Math.max(x0, x1) && y >= Math.min(y0, y1) && y <= Math.max(y0, y1);
    const xs = [], ys = [], texts = [], sizes = [];  // one label each
    const named = points.clusters.filter((c) => c.name && inView(c.x, c.y)).slice(0, 4 * MAX_CLUSTER_LABELS);
    const visible = [];
    points.ids.forEach((id, i) => { if (inView(points.x[i], points.y[i])) visible.push(i); });
    if (visible.length <= MAX_POINT_LABELS) {
      for (const i of visible) {
        xs.push(points.x[i]); ys.push(points.y[i]); sizes.push(10);
        texts.push("#" + points.ids[i] + " " + short(points.label[i] || "", 40));
      }
    } else {
      // largest first; a name whose box would overlap one already placed is left out (zoom in to see it)
      const boxes = [];
      for (const c of named) {
        const text = short(c.name, 40), px = L.xaxis.l2p(c.x), py = L.yaxis.l2p(c.y);
        const box = [px - 3.6 * text.length, py - 9, px + 3.6 * text.length, py + 9];
        if (boxes.some((o) => box[0] < o[2] && o[0] < box[2] && box[1] < o[3] && o[1] < box[3])) continue;
        boxes.push(box);
        if (boxes.length > MAX_CLUSTER_LABELS) break;
        xs.push(c.x); ys.push(c.y); sizes.push(13); texts.push(text);
      }
    }
    // annotations, not a text trace: they are drawn above the WebGL points, on a white ground; Plotly reads
    // their text as markup, so explanations are escaped (an explanation may come from a steerable LLM)
    return xs.map((x, i) => ({
      x: x, y: ys[i], text: saelab.plotText(texts[i]), showarrow: false, font: { size: sizes[i], color: "#111827" },
      bgcolor: "rgba(255,255,255,0.85)", borderpad: 1, captureevents: false,
    }));
  }

  function updateLabels(ev) {
    if (mode !== "all" || !node._fullLayout || !node._fullLayout.xaxis) return;
    if (ev && Object.keys(ev).length && Object.keys(ev).every((k) => k.startsWith("annotations"))) return;  // our own
    Plotly.relayout(node, { annotations: labelsInView() });
  }

  function drawFamilyLegend(colorBy, title) {
    const side = colorBy === "family-up" ? "up" : "down";
    const other = side === "up" ? points.family.smaller : points.family.larger;
    title.textContent = "Family: " + points.family.size + (side === "up" ? " from " : " into ") + other;
    const rel = points.family[side];
    Object.keys(RELATION_WORDS[side]).forEach((r) => {
      const tr = legend.appendChild(saelab.el("tr", { "data-relation": r }));
      const td = tr.appendChild(saelab.el("td"));
      const sw = td.appendChild(saelab.el("span", { class: "swatch" }));
      sw.style.background = RELATION_COLOURS[r];
      td.appendChild(document.createTextNode(r + ": " + RELATION_WORDS[side][r] + " " + other));
      tr.appendChild(saelab.el("td", { class: "muted" }, rel.filter((x) => x === r).length));
    });
  }

  function drawLegend(colorBy) {
    saelab.clear(legend);
    const title = document.getElementById("legend-title");
    if (colorBy.startsWith("family-")) return drawFamilyLegend(colorBy, title);
    if (colorBy === "density") {
      title.textContent = "Density";
      const dead = points.density.filter((d) => !(d > 0)).length;
      const tr = legend.appendChild(saelab.el("tr"));
      tr.appendChild(saelab.el("td", { class: "muted" },
        "Colour: log10 of the fraction of analysed tokens on which a feature fires (yellow: often, purple: rarely). " +
        (dead ? dead + " features never fired; they are grey." : "Every feature fired.")));
      return;
    }
    title.textContent = points.clusters.length + " clusters";
    points.clusters.forEach((c) => {
      const tr = saelab.el("tr", { class: "clickable", "data-cluster": c.id });
      const sw = saelab.el("span", { class: "swatch" });
      sw.style.background = colourOf.get(c.id) || GREY;
      const td = tr.appendChild(saelab.el("td"));
      td.appendChild(sw);
      td.appendChild(saelab.el("a", { href: "/features?cluster=" + c.id }, c.name || "cluster " + c.id));
      tr.appendChild(saelab.el("td", { class: "muted" }, c.size));
      tr.addEventListener("mouseenter", () => { if (mode === "all") highlight(c.id); });
      tr.addEventListener("mouseleave", () => { if (mode === "all") highlight(null); });
      legend.appendChild(tr);
    });
    if (points.clusters.length > PALETTE.length) {
      const tr = legend.appendChild(saelab.el("tr"));
      tr.appendChild(saelab.el("td", { class: "muted", colspan: 2 },
        "The " + PALETTE.length + " largest clusters have their own colour; the other " +
        (points.clusters.length - PALETTE.length) + " are grey."));
    }
  }

  function highlight(cluster) {
    const colorBy = document.getElementById("color-by").value;
    const idx = shownIndices(colorBy);
    const base = markers(colorBy, idx);
    if (cluster !== null) base.opacity = idx.map((i) => (points.cluster[i] === cluster ? 1 : 0.12));
    Plotly.restyle(node, { marker: [base] }, [0]);
  }

  function drawAll() {
    mode = "all";
    const colorBy = document.getElementById("color-by").value;
    const idx = shownIndices(colorBy);
    const pick = (arr) => idx.map((i) => arr[i]);
    const kind = webgl() ? "scattergl" : "scatter";
    const traces = [{
      x: pick(points.x), y: pick(points.y), customdata: pick(points.ids), type: kind, mode: "markers",
      marker: markers(colorBy, idx), hovertemplate: "#%{customdata}<extra></extra>", name: "features",
    }];
    if (colorBy === "density") {
      const dead = points.ids.map((_, i) => i).filter((i) => !(points.density[i] > 0));
      if (dead.length) traces.push({
        x: dead.map((i) => points.x[i]), y: dead.map((i) => points.y[i]), customdata: dead.map((i) => points.ids[i]),
        type: kind, mode: "markers", name: "dead", marker: { size: 5, color: GREY, opacity: 0.8 },
        hovertemplate: "#%{customdata} (never fired)<extra></extra>",
      });
    }
    const focus = cfg.focus;
    if (focus !== null && focus !== undefined) {
      const i = points.index.get(Number(focus));
      if (i !== undefined) {
        traces.push({
          x: [points.x[i]], y: [points.y[i]], customdata: [focus], type: "scatter", mode: "markers+text",
          text: [saelab.plotText("#" + focus)], textposition: "top center", name: "selected",
          marker: { size: 16, color: "rgba(0,0,0,0)", line: { color: "#d62728", width: 3 } },
          hovertemplate: "#%{customdata}<extra></extra>",
        });
      }
    }
    Plotly.react(node, traces, {
      margin: { l: 10, r: 10, t: 10, b: 10 }, showlegend: false, dragmode: "pan", hovermode: "closest", annotations: [],
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
    }, Object.assign({ scrollZoom: true }, saelab.plotConfig));
    updateLabels();
    drawLegend(colorBy);
    saelab.status("map-status", points.ids.length + " features" + (webgl() ? "" : " (WebGL unavailable: slower SVG drawing)") +
      " · scroll to zoom, drag to pan, click a point to open it");
  }

  async function drawNeighbourhood(id, n) {
    saelab.status("map-status", "laying out the neighbourhood of #" + id + "…");
    const nb = await saelab.api("/api/map/neighbourhood/" + id + "?n=" + n);
    mode = "neighbourhood";
    nb.explanations.forEach((e, i) => briefs.set(nb.ids[i], e));
    // the centre and its nearest few carry their explanation on the plot; all of them are in the list
    const text = nb.ids.map((f, i) =>
      saelab.plotText("#" + f + (i < 8 && nb.explanations[i] ? " " + short(nb.explanations[i], 28) : "")));
    Plotly.react(node, [{
      x: nb.x, y: nb.y, customdata: nb.ids, type: "scatter", mode: "markers+text",
      text: text, textposition: "top center", textfont: { size: 10 },
      marker: {
        size: nb.ids.map((f) => (f === nb.center ? 18 : 10)), color: nb.similarity, colorscale: "Viridis",
        colorbar: { title: { text: saelab.plotText("cosine to #" + nb.center) }, thickness: 12 }, line: { color: "#333", width: 0.5 },
      },
      hovertemplate: "#%{customdata}<extra></extra>",
    }], {
      margin: { l: 10, r: 10, t: 10, b: 10 }, showlegend: false, hovermode: "closest", annotations: [],
      xaxis: { visible: false }, yaxis: { visible: false, scaleanchor: "x" },
    }, saelab.plotConfig);
    document.getElementById("legend-title").textContent = "Nearest to #" + nb.center;
    saelab.clear(legend);
    nb.ids.forEach((f, i) => {
      const tr = legend.appendChild(saelab.el("tr"));
      tr.appendChild(saelab.el("td")).appendChild(saelab.featureLink(f));
      tr.appendChild(saelab.el("td", { class: "muted" }, nb.similarity[i].toFixed(2)));
      tr.appendChild(saelab.el("td", { class: "expl" }, nb.explanations[i] || "no explanation"));
    });
    saelab.status("map-status", "the " + nb.ids.length + " features nearest #" + nb.center +
      " by decoder cosine, laid out locally · click one to open it");
  }

  let gl = null;
  function webgl() {
    if (gl === null) {
      try { gl = Boolean(document.createElement("canvas").getContext("webgl")); } catch (e) { gl = false; }
    }
    return gl;
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
    node.on("plotly_relayout", updateLabels);
  }

  async function main() {
    points = await saelab.api("/api/map");
    points.index = new Map(points.ids.map((id, i) => [id, i]));
    colourOf = new Map(points.clusters.slice(0, PALETTE.length).map((c, i) => [c.id, PALETTE[i]]));
    if (points.family) {  // a member of a sweep with families.json: colour by the relation to a neighbouring size
      const select = document.getElementById("color-by");
      if (points.family.smaller) select.appendChild(saelab.el("option", { value: "family-up" },
        "family: from " + points.family.smaller));
      if (points.family.larger) select.appendChild(saelab.el("option", { value: "family-down" },
        "family: into " + points.family.larger));
    }
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
