"use strict";
// Steer: one dial per feature (× its max activation; clamp, add or ablate), then the default and the steered
// continuations of the same prompt, streamed token by token from /api/steer/stream (server-sent events
// over a POST, read with fetch).
(function () {
  const cfg = saelab.json("steer-config");
  const dials = document.getElementById("dials");

  async function describe(row, id) {
    const expl = row.querySelector(".expl");
    expl.textContent = "";
    if (id === "") return;
    const f = await saelab.api("/api/features/" + Number(id) + "/summary").catch((e) => ({ explanation: e.message }));
    expl.textContent = f.explanation || "";
  }

  function addDial(spec) {
    const row = saelab.el("div", { class: "dial" });
    const id = saelab.el("input", { type: "number", min: 0, class: "narrow feature-id", placeholder: "feature", "aria-label": "feature id" });
    id.value = spec.id === undefined ? "" : spec.id;
    const slider = saelab.el("input", { type: "range", min: cfg.min, max: cfg.max, step: 0.5, "aria-label": "dial" });
    slider.value = spec.value === undefined ? cfg.default : spec.value;
    const shown = saelab.el("span", { class: "value" });
    const mode = saelab.el("select", { "aria-label": "mode" });
    for (const m of ["clamp", "add", "ablate"]) mode.appendChild(saelab.el("option", { value: m }, m));
    mode.value = spec.mode || "clamp";
    const remove = saelab.el("button", { type: "button", class: "secondary" }, "remove");
    const update = () => {
      const off = mode.value === "ablate";  // ablate has no strength: the feature is set to 0
      slider.disabled = off;
      shown.textContent = off ? "off" : Number(slider.value).toFixed(1) + "×";
    };
    slider.addEventListener("input", update);
    mode.addEventListener("change", update);
    id.addEventListener("change", () => describe(row, id.value));
    remove.addEventListener("click", () => row.remove());
    row.append(saelab.el("span", {}, "feature"), id, slider, shown, mode, remove, saelab.el("span", { class: "expl" }));
    dials.appendChild(row);
    update();
    describe(row, id.value);
  }

  function readDials() {
    return Array.from(dials.querySelectorAll(".dial"))
      .filter((row) => row.querySelector(".feature-id").value !== "")
      .map((row) => ({
        id: Number(row.querySelector(".feature-id").value),
        value: Number(row.querySelector("input[type=range]").value),
        mode: row.querySelector("select").value,
      }));
  }

  // The concept: a feature set sharing one dial (sent as `concept`, beside the single-feature dials).
  const conceptValue = document.getElementById("concept-value");
  const showConcept = () => { document.getElementById("concept-shown").textContent = Number(conceptValue.value).toFixed(2); };
  conceptValue.addEventListener("input", showConcept);
  showConcept();

  function readConcept() {
    const ids = document.getElementById("concept-features").value.split(/[\s,]+/).filter((s) => s !== "").map(Number);
    if (!ids.length) return null;
    return { features: ids, value: Number(conceptValue.value), mode: document.getElementById("concept-mode").value,
             unit: document.getElementById("concept-unit").value };
  }

  function startColumn(id, prompt) {
    const node = document.getElementById(id);
    saelab.clear(node);
    node.appendChild(saelab.el("span", { class: "prompt" }, prompt));
    const out = saelab.el("span", { class: "continuation" });
    node.appendChild(out);
    return out;
  }

  async function stream(body, columns) {
    const res = await fetch("/api/steer/stream", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    if (!res.ok) {
      const data = await res.json().catch(() => ({ detail: res.statusText }));
      throw new Error(saelab.detail(data, res.status));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let notes = {};
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const line = event.split("\n").find((l) => l.startsWith("data: "));
        if (!line) continue;
        const msg = JSON.parse(line.slice(6));
        if (msg.type === "token") columns[msg.side].appendChild(document.createTextNode(msg.text));
        else if (msg.type === "error") throw new Error(msg.detail);
        else if (msg.type === "status") saelab.status("steer-status", msg.text);
        else if (msg.type === "done") notes = msg.notes || {};
      }
    }
    return notes;
  }

  document.getElementById("add-dial").addEventListener("click", () => addDial({}));
  document.querySelectorAll(".example-prompt").forEach((b) => b.addEventListener("click", () => {
    document.getElementById("steer-prompt").value = b.textContent;
  }));
  document.getElementById("steer-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = document.getElementById("steer-run");
    const prompt = document.getElementById("steer-prompt").value;
    const body = {
      prompt: prompt, features: readDials(), concept: readConcept(),
      chat: document.getElementById("steer-chat").checked,
      max_new_tokens: Number(document.getElementById("steer-tokens").value),
      temperature: Number(document.getElementById("steer-temperature").value),
      seed: Number(document.getElementById("steer-seed").value),
    };
    const columns = { default: startColumn("out-default", prompt), steered: startColumn("out-steered", prompt) };
    const notice = document.getElementById("steer-notice");
    notice.hidden = true;
    button.disabled = true;
    saelab.status("steer-status", "generating…");
    try {
      const notes = await stream(body, columns) || {};
      saelab.status("steer-status", "done");
      const said = Object.entries(notes).map(([side, why]) => "The " + side + " continuation is " + why + ".");
      if (notes.steered) said.push("Try a lower dial: about 1–3× usually keeps the text readable.");
      notice.textContent = said.join(" ");
      notice.hidden = !said.length;
    } catch (e) {
      saelab.status("steer-status", e.message, true);
    } finally {
      button.disabled = false;
    }
  });

  (cfg.features.length || document.getElementById("concept-features").value ? cfg.features : [{}]).forEach(addDial);
})();
