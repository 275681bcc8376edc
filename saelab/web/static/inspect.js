"use strict";
// Inspect: per-token features of the user's text. Click a token for its top features (with their
// explanations); click a feature's row to follow it over every token of the text; its link opens its page.
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
      const tr = saelab.el("tr", { class: "clickable", title: "follow #" + f.id + " over the whole text" });
      tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") follow(f.id); });
      tr.appendChild(saelab.el("td")).appendChild(saelab.featureLink(f.id));
      tr.appendChild(saelab.el("td", {}, f.act.toFixed(3)));
      tr.appendChild(saelab.el("td", { class: "expl" }, f.explanation || ""));
      table.appendChild(tr);
    }
  }

  async function follow(id) {
    saelab.status("inspect-status", "following #" + id + "…");
    try {
      const r = await saelab.api("/api/features/" + id + "/activations", { text: result.text, chat: result.chat });
      document.getElementById("follow-title").textContent = "Feature #" + id + " on every token";
      const expl = document.getElementById("follow-explanation");
      saelab.clear(expl);
      expl.appendChild(saelab.featureLink(id));
      expl.appendChild(document.createTextNode(" " + (r.explanation || "no explanation")));
      saelab.activationText(document.getElementById("follow-tokens"), r.tokens, r.max_act);
      document.getElementById("follow").hidden = false;
      const fired = r.tokens.filter((t) => t.act > 0).length;
      saelab.status("inspect-status", "#" + id + " fires on " + fired + " of " + r.tokens.length + " tokens");
    } catch (e) {
      saelab.status("inspect-status", e.message, true);
    }
  }

  function render() {
    saelab.clear(tokensNode);
    result.tokens.forEach((t, i) => {
      const top = t.features.length ? t.features[0] : null;
      const span = saelab.tokenSpan(t.text, top ? top.act : 0, result.max_act);
      span.classList.add("clickable");
      span.title = top ? "#" + top.id + " " + top.act.toFixed(3) + (top.explanation ? " — " + top.explanation : "")
        : "no active features";
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
      const text = document.getElementById("inspect-text").value;
      result = await saelab.api("/api/inspect", {
        text: text, top: Number(document.getElementById("inspect-top").value),
        chat: document.getElementById("inspect-chat").checked,
      });
      result.text = text;
      result.chat = document.getElementById("inspect-chat").checked;
      document.getElementById("follow").hidden = true;
      render();
      saelab.status("inspect-status", result.tokens.length + " tokens");
    } catch (e) {
      saelab.status("inspect-status", e.message, true);
    } finally {
      button.disabled = false;
    }
  });
})();
