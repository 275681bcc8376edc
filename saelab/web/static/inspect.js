"use strict";
// Inspect: per-token features of the user's text. Click a token for its top features; a feature
// link opens that feature's page.
(function () {
  const form = document.getElementById("inspect-form");
  const tokensNode = document.getElementById("inspect-tokens");
  const table = document.querySelector("#token-features tbody");
  let result = null;

  function showToken(i) {
    const t = result.tokens[i];
    tokensNode.querySelectorAll(".tok.selected").forEach((n) => n.classList.remove("selected"));
    tokensNode.children[i].classList.add("selected");
    document.getElementById("token-title").textContent = "Token " + i + ": " + JSON.stringify(t.text);
    saelab.clear(table);
    if (!t.features.length) {
      table.appendChild(saelab.el("tr")).appendChild(saelab.el("td", { class: "muted" }, "no active features"));
    }
    for (const f of t.features) {
      const tr = saelab.el("tr");
      tr.appendChild(saelab.el("td")).appendChild(saelab.featureLink(f.id));
      tr.appendChild(saelab.el("td", {}, f.act.toFixed(3)));
      tr.appendChild(saelab.el("td", { class: "expl" }, f.explanation || ""));
      table.appendChild(tr);
    }
  }

  function render() {
    saelab.clear(tokensNode);
    result.tokens.forEach((t, i) => {
      const top = t.features.length ? t.features[0] : null;
      const span = saelab.tokenSpan(t.text, top ? top.act : 0, result.max_act);
      span.classList.add("clickable");
      span.title = top ? "#" + top.id + " " + top.act.toFixed(3) : "no active features";
      span.dataset.index = String(i);
      span.addEventListener("click", () => showToken(i));
      tokensNode.appendChild(span);
    });
    if (result.tokens.length) showToken(result.tokens.reduce((best, t, i, all) =>
      (t.features.length && (!all[best].features.length || t.features[0].act > all[best].features[0].act) ? i : best), 0));
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = document.getElementById("inspect-run");
    button.disabled = true;
    saelab.status("inspect-status", "running the model…");
    try {
      result = await saelab.api("/api/inspect", {
        text: document.getElementById("inspect-text").value,
        top: Number(document.getElementById("inspect-top").value),
      });
      render();
      saelab.status("inspect-status", result.tokens.length + " tokens");
    } catch (e) {
      saelab.status("inspect-status", e.message, true);
    } finally {
      button.disabled = false;
    }
  });
})();
