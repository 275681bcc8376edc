// Shared helpers. Data from the server (model and corpus text) only ever reaches the page through
// textContent / createElement / setAttribute — never innerHTML — so it cannot become markup. Plotly is the
// exception: it reads its strings (annotations, text traces, titles, names, hover text) as pseudo-HTML
// (<a href>, <b>, style=), so every string handed to Plotly goes through saelab.plotText first.
"use strict";

const saelab = {
  el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  },
  clear(node) { while (node.firstChild) node.removeChild(node.firstChild); },
  json(id) {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  },
  async api(path, body) {
    const opts = body === undefined ? {} :
      { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
    const res = await fetch(path, opts);
    const data = await res.json().catch(() => ({ detail: res.statusText }));
    if (!res.ok) throw new Error(saelab.detail(data, res.status));
    return data;
  },
  detail(data, status) {
    const d = data && data.detail;
    if (Array.isArray(d)) return d.map((e) => (e.loc ? e.loc.slice(1).join(".") + ": " : "") + e.msg).join("; ");
    return (d || "request failed") + " (" + status + ")";
  },
  fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    return Number(v).toPrecision(digits || 3);
  },
  // A token span whose background shows activation a / max; the title shows the value on hover.
  tokenSpan(text, act, max) {
    const span = saelab.el("span", { class: "tok" }, text);
    const alpha = max > 0 ? Math.max(0, Math.min(1, act / max)) : 0;
    span.style.setProperty("--a", alpha.toFixed(3));
    if (act > 0) span.title = act.toFixed(3);
    return span;
  },
  // One feature over a whole text: each token shaded by act / max, with its value written after it when it fires.
  activationText(node, tokens, max) {
    saelab.clear(node);
    for (const t of tokens) {
      const span = saelab.tokenSpan(t.text, t.act, max);
      if (t.act > 0) span.appendChild(saelab.el("sub", { class: "v" }, t.act.toFixed(2)));
      node.appendChild(span);
    }
  },
  featureLink(id) { return saelab.el("a", { href: "/features/" + Number(id) }, "#" + Number(id)); },
  status(id, text, isError) {
    const node = document.getElementById(id);
    if (!node) return;
    node.textContent = text;
    node.classList.toggle("error", Boolean(isError));
  },
  // A string as Plotly draws it verbatim: its markup characters written as the entities Plotly decodes
  // after reading tags, so "<a href=…>" is shown as those characters, never a link or a style.
  plotText(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  },
  plotConfig: { displaylogo: false, responsive: true },
};
