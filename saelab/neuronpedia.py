"""Export a features.db for Neuronpedia: SAEDashboard batch files plus Neuronpedia explanation rows.

Layout of the output folder (README "Neuronpedia" walks through using it)::

    batch-N.json                   SAEDashboard's ``NeuronpediaDashboardBatch.to_dict()``, one per
                                   ``batch_size`` features: what Neuronpedia's converter
                                   (``convert-saedashboard-to-neuronpedia-export.py``) reads
    explanations/batch-N.jsonl.gz  rows of Neuronpedia's ``Explanation`` table, for its import route
    explanation_types.sql          the ``ExplanationType`` (and ``ExplanationModelType``) rows those
                                   explanations refer to; run once against the instance's database

Per feature, every key of ``NeuronpediaDashboardFeature`` is written with saelab's true values:

- ``neuron_alignment_*``: the largest entries of the decoder row ``W_dec[f]`` (indices into the SAE's
  input, values, and |value| / ‖W_dec[f]‖₁), from the SAE weights;
- ``correlated_neurons_*`` / ``correlated_features_*``: Pearson correlation and cosine (SAEDashboard
  stores the cosine under ``*_l1``) of the feature's activation with each input dimension / other
  feature over the analysed tokens (:mod:`saelab.dashboard`);
- ``pos_*`` / ``neg_*`` and ``logits_hist_*``: direct logit effects, strongest and as a 50-bin histogram;
- ``frac_nonzero`` and ``freq_hist_*``: density and the histogram of non-zero activations (saelab's bins
  are log-spaced, 10 per decade; ``*_values`` are the bins' geometric centres);
- ``activations``: the top examples (``bin_min = bin_contains = -1``, ``bin_max`` the feature's max),
  then the quantile bands from the highest (edges as sampled, ``bin_contains`` the share of analysed
  tokens on which the feature fires within the band; SAEDashboard's lowest interval, starting at 0,
  also counts the tokens where it does not fire), then uniformly random firing examples as the interval
  ``(0, max]`` with ``bin_contains`` the density;
- ``decoder_weights_dist`` (SAEDashboard: a per-attention-head split of ``W_dec[f]``, only for ``hook_z``
  SAEs, which saelab does not train) and ``vector`` (only for steering-vector sets) stay empty, as
  SAEDashboard writes them for residual-stream and MLP SAEs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch

from saelab.atomic import write_bytes
from saelab.featuredb import FeatureDB
from saelab.progress import bar as progress_bar
from saelab.session import open_run

DEFAULT_AUTHOR_ID = "clkht01d40000jv08hvalcvly"
"""The "bot" user that Neuronpedia's database seed (apps/webapp/prisma/seed.ts) creates on every fresh
instance; another instance needs its own user id (``--author-id``)."""

EXPLANATION_TYPES = {
    "offline": ("saelab-offline", "saelab offline explainer",
                "saelab's offline explainer (no LLM): the activation-weighted top tokens of the top and quantile "
                "examples, their common context and token patterns, and the promoted logit tokens."),
    "llm": ("saelab-llm", "saelab LLM explainer",
            "saelab's LLM explainer: an OpenAI-compatible chat model shown the top and quantile examples with the "
            "high-activation tokens marked, as in Bills et al. 2023."),
}


def export_neuronpedia(db: FeatureDB | Path | str, out: Path | str, *, sae=None, model_id: str | None = None,
                       layer: int | None = None, sae_set: str | None = None, sae_id_suffix: str | None = None,
                       author_id: str = DEFAULT_AUTHOR_ID, batch_size: int = 128, n_alignment: int = 10) -> list[Path]:
    """Write the Neuronpedia export of ``db`` into folder ``out``; returns the files written.

    ``sae``: the SAE (object or folder) the database describes, for the neuron alignment (default: the
    ``sae_path`` the database records). ``model_id`` (Neuronpedia model id, default the model's folder
    name), ``layer`` (default the first number in the hook name), ``sae_set`` (Neuronpedia source set,
    default ``saelab-<hook kind>-<width>``) and ``sae_id_suffix`` go into every batch; the explanations
    use the source id ``<layer>-<sae_set>[__<suffix>]`` that Neuronpedia's converter gives the features.
    ``author_id``: an existing Neuronpedia user id, the explanations' author.
    """
    db = db if isinstance(db, FeatureDB) else FeatureDB.open(db)
    info = db.sae_info()
    ident = _identity(info, model_id, layer, sae_set, sae_id_suffix)
    W_dec = _decoder(sae, info, db)
    out = Path(out)
    (out / "explanations").mkdir(parents=True, exist_ok=True)
    files, types = [], set()
    for n, start in enumerate(progress_bar(range(0, db.n_features, batch_size), desc="export neuronpedia",
                                           unit="batch")):
        ids = range(start, min(start + batch_size, db.n_features))
        batch = {"model_id": ident["model_id"], "layer": ident["layer"], "sae_set": ident["sae_set"],
                 "sae_id_suffix": ident["sae_id_suffix"],
                 "features": [dashboard_feature(db, i, info, W_dec[i], n_alignment) for i in ids]}
        files.append(out / f"batch-{n}.json")
        write_bytes(files[-1], json.dumps(batch, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        rows = [r for i in ids if (r := explanation_row(db.feature(i), ident, author_id, info)) is not None]
        if rows:
            types |= {(r["typeName"], r["explanationModelName"]) for r in rows}
            files.append(out / "explanations" / f"batch-{n}.jsonl.gz")
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_bytes(files[-1], gzip.compress(lines.encode("utf-8"), mtime=0))
    files.append(out / "explanation_types.sql")
    write_bytes(files[-1], explanation_types_sql(types, author_id).encode("utf-8"))
    return files


def _identity(info: dict, model_id, layer, sae_set, sae_id_suffix) -> dict:
    hook = str(info.get("hook_name", ""))
    if layer is None:
        m = re.search(r"\d+", hook)
        if m is None:
            raise ValueError(f"hook {hook!r} names no layer number; pass the Neuronpedia layer (--layer)")
        layer = int(m.group())
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"the Neuronpedia layer must be a layer number (0 or more), got {layer!r}")
    model_id = model_id or re.sub(r"[^a-z0-9._-]+", "-", Path(str(info.get("model_name", "model"))).name.lower())
    # ids become parts of paths and URLs on Neuronpedia's side: plain names only (no "/", no "..")
    for what, value in (("model id", model_id), ("source id suffix", sae_id_suffix)):
        if value is not None and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) or ".." in value):
            raise ValueError(f"Neuronpedia {what} {value!r} must be letters, digits, dots, dashes and underscores "
                             "(no '/' or '..'), e.g. gemma-2-2b")
    if sae_set is None:
        kind = re.sub(r"^.*?\d+\.", "", hook).removeprefix("hook_")
        d_sae = int(info.get("d_sae", 0))
        width = f"{d_sae // 1024}k" if d_sae >= 1024 and d_sae % 1024 == 0 else str(d_sae)
        sae_set = f"saelab-{re.sub(r'[^A-Za-z0-9]+', '-', kind).strip('-').lower() or 'sae'}-{width}"
    if not re.fullmatch(r"[A-Za-z0-9-]+", sae_set):
        raise ValueError(f"Neuronpedia source set {sae_set!r} must be letters, digits and dashes")
    source = f"{layer}-{sae_set}" + (f"__{sae_id_suffix}" if sae_id_suffix else "")
    return {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
            "source_id": source}


def _decoder(sae, info: dict, db: FeatureDB) -> torch.Tensor:
    """``W_dec [d_sae, d_in]`` of the SAE the database describes (checked against its feature count)."""
    if sae is None:
        sae = info.get("sae_path")
        if not sae or not Path(sae).is_dir():
            raise FileNotFoundError(f"{db.path} records no SAE folder that still exists ({sae!r}); pass the SAE "
                                    "folder (--sae) for the decoder-based neuron alignment")
    sae = open_run(sae, db=db.path).sae   # a features.db of another SAE is refused here
    W_dec = sae.W_dec.detach().float().cpu()
    if W_dec.shape[0] != db.n_features:
        raise ValueError(f"the SAE has {W_dec.shape[0]} features but {db.path} describes {db.n_features}; "
                         "pass the SAE this database was made from")
    return W_dec


def dashboard_feature(db: FeatureDB, i: int, info: dict, w_dec: torch.Tensor, n_alignment: int = 10) -> dict:
    """One ``NeuronpediaDashboardFeature.to_dict()`` for feature ``i`` (``w_dec [d_in]`` its decoder row)."""
    row, logits, hist, lh = db.feature(i), db.logit_effects(i), db.histogram(i), db.logit_histogram(i)
    align = w_dec.topk(min(n_alignment, len(w_dec)))  # largest, not largest |·|, as SAEDashboard ranks them
    l1 = float(w_dec.abs().sum())
    neurons, feats = db.correlations(i, "neuron"), db.correlations(i, "feature")
    width = (lh["hi"] - lh["lo"]) / max(len(lh["counts"]), 1)
    context = int(info.get("context") or 0)
    return {
        "feature_index": i,
        "neuron_alignment_indices": align.indices.tolist(),
        "neuron_alignment_values": align.values.tolist(),
        "neuron_alignment_l1": [abs(v) / l1 if l1 > 0 else 0.0 for v in align.values.tolist()],
        "correlated_neurons_indices": [c["other"] for c in neurons],
        "correlated_neurons_l1": [c["cosine"] for c in neurons],
        "correlated_neurons_pearson": [c["pearson"] for c in neurons],
        "correlated_features_indices": [c["other"] for c in feats],
        "correlated_features_l1": [c["cosine"] for c in feats],
        "correlated_features_pearson": [c["pearson"] for c in feats],
        "neg_str": [t for t, _ in logits["negative"]], "neg_values": [v for _, v in logits["negative"]],
        "pos_str": [t for t, _ in logits["positive"]], "pos_values": [v for _, v in logits["positive"]],
        "frac_nonzero": row["density"],
        "freq_hist_data_bar_values": [math.sqrt(a * b) for a, b in zip(hist["edges"][:-1], hist["edges"][1:])],
        "freq_hist_data_bar_heights": hist["counts"],
        "logits_hist_data_bar_heights": lh["counts"],
        "logits_hist_data_bar_values": [lh["lo"] + (k + 0.5) * width for k in range(len(lh["counts"]))],
        "n_prompts_total": int(info.get("tokens_read", 0)) // max(context, 1),
        "n_tokens_in_prompt": context,
        "dataset": str(info.get("corpus", "")),
        "decoder_weights_dist": [],
        "activations": dashboard_activations(db, i, row, info),
        "vector": [],
    }


def dashboard_activations(db: FeatureDB, i: int, row: dict, info: dict) -> list[dict]:
    """Feature ``i``'s examples as ``NeuronpediaDashboardActivation.to_dict()`` rows, grouped as described
    in the module docstring (each example's qualifying activation lies within its ``[bin_min, bin_max]``)."""
    def act(ex: dict, lo: float, hi: float, contains: float) -> dict:
        return {"bin_min": lo, "bin_max": hi, "bin_contains": contains, "tokens": ex["tokens"],
                "values": ex["acts"], "qualifying_token_index": ex["max_pos"]}

    out = [act(ex, -1.0, row["max_act"], -1.0) for ex in db.examples(i, "top")]
    bands = {b["band"]: b for b in db.bands(i)}
    n_bands = int((info.get("config") or {}).get("n_quantiles") or len(bands) or 1)
    for ex in sorted(db.examples(i, "quantile"), key=lambda e: -e["quantile"]):  # highest band first
        b = bands[round(ex["quantile"] * n_bands)]
        out.append(act(ex, b["lo"], b["hi"], b["count"] / max(b["tokens"], 1)))
    n_random = int((info.get("config") or {}).get("n_random", 0))
    for ex in db.examples(i, "random"):
        if ex["rank"] < n_random:  # the uniformly random firing tokens (later ranks: shared random windows)
            out.append(act(ex, 0.0, row["max_act"], row["density"]))
    return out


def explanation_row(row: dict, ident: dict, author_id: str, info: dict) -> dict | None:
    """Feature ``row``'s explanation as a row of Neuronpedia's ``Explanation`` table (None without one).

    Every NOT NULL column is set (``id``, ``modelId``, ``layer``, ``index``, ``description``, ``authorId``,
    ``scoreV1``, ``createdAt``, ``updatedAt``); every row has the same keys, since the import takes its
    column list from the first row. The id is a hash of the row's identity, so a re-import adds nothing.
    """
    if not row["explanation"]:
        return None
    source = row["explanation_source"] or "offline"
    kind, _, llm = source.partition(":")
    type_name = EXPLANATION_TYPES.get(kind, (f"saelab-{re.sub(r'[^A-Za-z0-9]+', '-', kind)}",))[0]
    key = "\x1f".join([ident["model_id"], ident["source_id"], str(row["id"]), type_name, row["explanation"]])
    created = str(info.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S"))
    score = "" if row["score"] is None else (f"; detection score {row['score']:.3f} (balanced accuracy on held-out"
                                             " firing and non-firing contexts, 0.5 = chance)")
    return {
        "id": "c" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24],
        "modelId": ident["model_id"], "layer": ident["source_id"], "index": str(row["id"]),
        "description": row["explanation"], "authorId": author_id, "triggeredByUserId": None,
        "notes": f"saelab explanation source {source}{score}",
        "typeName": type_name, "explanationModelName": llm or None,
        "scoreV1": 0.0, "scoreV2": None,
        "umap_x": row["x"], "umap_y": row["y"], "umap_cluster": row["cluster"],
        "umap_log_feature_sparsity": math.log10(row["density"]) if row["density"] > 0 else None,
        "createdAt": created, "updatedAt": created,
    }


def explanation_types_sql(types: set[tuple[str, str | None]], author_id: str) -> str:
    """SQL that creates the ``ExplanationType`` and ``ExplanationModelType`` rows the explanations refer to
    (their foreign keys), leaving existing rows alone. Run once: ``psql "$POSTGRES_URL" -f ...``."""
    def q(s: str | None) -> str:
        return "NULL" if s is None else "'" + s.replace("'", "''") + "'"

    lines = ["-- Explanation types for saelab's explanations (run before importing explanations/).", "BEGIN;"]
    descriptions = {name: (display, desc) for name, display, desc in EXPLANATION_TYPES.values()}
    for name in sorted({t for t, _ in types}):
        display, desc = descriptions.get(name, (name, f"saelab explanations ({name})"))
        lines.append('INSERT INTO "ExplanationType" ("name", "displayName", "description", "featured", "isAttention",'
                     ' "creatorName", "creatorId", "createdAt", "updatedAt") VALUES '
                     f"({q(name)}, {q(display)}, {q(desc)}, true, false, 'saelab', {q(author_id)}, now(), now()) "
                     'ON CONFLICT ("name") DO NOTHING;')
    for model in sorted({m for _, m in types if m}):
        lines.append('INSERT INTO "ExplanationModelType" ("name", "displayName", "description", "featured",'
                     ' "creatorName", "createdAt", "updatedAt") VALUES '
                     f"({q(model)}, {q(model)}, {q('chat model that wrote saelab LLM explanations')}, true, "
                     "'saelab', now(), now()) ON CONFLICT (\"name\") DO NOTHING;")
    return "\n".join(lines + ["COMMIT;", ""])
