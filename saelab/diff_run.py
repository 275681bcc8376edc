"""``saelab diff``: load the two models, run :mod:`saelab.diff` over the texts, and write the report.

The report folder holds ``report.html`` + ``report.png`` + ``results.json`` (house style, :mod:`saelab.report`)
and ``texts.safetensors``: the per-text sums (:class:`saelab.diff.TextStats`) from which every figure was
computed, so that a later look (a new concept, fewer texts) needs no model.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from safetensors.torch import load_file

from saelab import atomic
from saelab.adapters import is_adapter, with_adapter
from saelab.diff import (Baselines, Concept, ConceptRise, DiffConfig, FeatureDiff, TextStats, baselines,
                         check_comparable, concept_list, concept_rise, feature_diff, gate, sae_inputs, scales,
                         text_ids, text_stats)
from saelab.evaluate import evaluate
from saelab.models import LoadedModel, load_model
from saelab.report import Series, Table, plot_png, write_report

STATS_FILE = "texts.safetensors"


def load_pair(base: str, tuned: str, adapter: str | None = None) -> tuple[LoadedModel, LoadedModel]:
    """The base model and the tuned one: a model name/folder/GGUF, or a PEFT adapter folder (applied to the
    base), or ``--adapter`` applied to TUNED."""
    base_lm = load_model(base)
    if adapter is not None:
        return base_lm, with_adapter(load_model(tuned) if tuned != base else base_lm, adapter)
    if is_adapter(tuned):
        return base_lm, with_adapter(base_lm, tuned)
    return base_lm, load_model(tuned)


class DiffResult(NamedTuple):
    base: str
    tuned: str
    hook: str
    corpus: str
    config: DiffConfig
    stats: TextStats
    features: FeatureDiff
    baselines: Baselines
    fit: dict
    """Per model (``base``, ``tuned``): the SAE's FVU and CE recovered (saelab.evaluate) on the first texts."""
    concepts: list[ConceptRise]


def fit_on(sae, lm: LoadedModel, ids: torch.Tensor, tokens: int, batch_size: int) -> dict:
    """Does the dictionary still fit: FVU, CE recovered and CE clean/spliced of ``sae`` on ``lm``."""
    rep = evaluate(sae, lm, ids, tokens=tokens, batch_size=batch_size, progress=False, name=lm.name)
    d = rep.downstream
    return {"fvu": rep.reconstruction.fvu, "tokens": rep.reconstruction.tokens,
            "ce_recovered": d.ce_recovered_zero if d else None, "ce_clean": d.ce_clean if d else None,
            "ce_spliced": d.ce_spliced if d else None}


def run_diff(sae, base: LoadedModel, tuned: LoadedModel, corpus, cfg: DiffConfig | None = None,
             concepts: Sequence[Concept] = (), eval_tokens: int = 4096, progress=None) -> DiffResult:
    """The whole diff: ``corpus`` is a corpus source (its validation split), a CorpusSpec or ids ``[S, T]``."""
    cfg = cfg or DiffConfig()
    sae.eval()
    hook, context, rule = sae_inputs(sae, base.tokenizer, cfg.context)
    check_comparable(base, tuned, hook)
    concept_list(concepts, sae.d_sae)
    if isinstance(corpus, torch.Tensor):
        ids, name = corpus[:max(1, math.ceil(cfg.tokens / corpus.shape[1]))].long(), "token ids"
    else:
        ids, name = text_ids(corpus, base.tokenizer, context, cfg.tokens, cfg.seed), str(corpus)
    st = text_stats(sae, base, tuned, ids, hook, rule, cfg.batch_size, progress)
    scale = scales(sae)
    fit = {}
    if eval_tokens > 0:
        fit = {k: fit_on(sae, lm, ids, min(eval_tokens, ids.numel()), cfg.batch_size)
               for k, lm in (("base", base), ("tuned", tuned))}
    return DiffResult(base.name, tuned.name, hook, name, cfg, st, feature_diff(st, scale, cfg),
                      baselines(st, cfg), fit, [concept_rise(st, scale, c, cfg) for c in concepts])


# -- what the report says -----------------------------------------------------------------------------

def feature_row(fd: FeatureDiff, f: int) -> dict:
    return {"feature": f, "rate_base": float(fd.rate[0, f]), "rate_tuned": float(fd.rate[1, f]),
            "d_rate": float(fd.d_rate[f]), "d_rate_ci": [float(fd.d_rate_ci[0, f]), float(fd.d_rate_ci[1, f])],
            "mean_base": float(fd.mean[0, f]), "mean_tuned": float(fd.mean[1, f]),
            "score": float(fd.score[f]), "score_ci": [float(fd.score_ci[0, f]), float(fd.score_ci[1, f])]}


def text_preview(tokenizer, ids: torch.Tensor, chars: int = 160) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return " ".join(text.split())[:chars]


def to_json(r: DiffResult, tokenizer=None, top: int = 100) -> dict:
    fd, b = r.features, r.baselines
    preview = (lambda i: text_preview(tokenizer, r.stats.ids[i])) if tokenizer is not None else (lambda i: "")
    return {
        "base": r.base, "tuned": r.tuned, "hook": r.hook, "corpus": r.corpus, "config": asdict(r.config),
        "texts": int(len(r.stats.n)), "positions": int(r.stats.n.sum()),
        "interval": "95% percentile bootstrap over texts (paired: the same resampled texts for both models)",
        "fit": r.fit,
        "baselines": {"mean_diff_norm": b.mean_diff_norm, "mean_diff_ci": list(b.mean_diff_ci),
                      "mean_diff_relative": b.mean_diff_relative, "kl": b.kl, "kl_ci": list(b.kl_ci),
                      "nll_base": b.nll[0], "nll_tuned": b.nll[1]},
        "rising": [feature_row(fd, f) for f in fd.rising[:top]],
        "falling": [feature_row(fd, f) for f in fd.falling[:top]],
        "n_rising": len(fd.rising), "n_falling": len(fd.falling),
        "appear": fd.appear[:top], "vanish": fd.vanish[:top],
        "concepts": [{**c._asdict(), "rise_ci": list(c.rise_ci),
                      "top_texts": [{"text": i, "increase": v, "preview": preview(i)} for i, v in c.top_texts]}
                     for c in r.concepts],
    }


def gate_message(rise: ConceptRise, max_rise: float, preview: str, corpus: str) -> str:
    """The gate's one line (failed or passed)."""
    verdict = "rose" if gate(rise, max_rise) else "stayed within the limit:"
    where = f"; most on text {rise.top_texts[0][0]} of {corpus}: {preview!r}" if rise.top_texts else ""
    return (f"concept {rise.name!r} (features {','.join(map(str, rise.features[:8]))}"
            f"{'…' if len(rise.features) > 8 else ''}) {verdict} {rise.rise:.2f}× (95% CI {rise.rise_ci[0]:.2f}–"
            f"{rise.rise_ci[1]:.2f}×, limit {max_rise:g}×; {rise.base:.4f} → {rise.tuned:.4f} per position){where}")


def write_diff(out: Path | str, r: DiffResult, command: str, tokenizer=None, labels: dict[int, str] | None = None,
               top: int = 30) -> Path:
    """``report.html``, ``report.png``, ``results.json`` and ``texts.safetensors`` in ``out``."""
    out = Path(out)
    res = to_json(r, tokenizer)
    labels = labels or {}
    res["labels"] = {str(f): labels[f] for f in r.features.rising[:100] + r.features.falling[:100] if f in labels}
    out.mkdir(parents=True, exist_ok=True)
    save_stats(out / STATS_FILE, r.stats)
    rows = lambda key: [[x["feature"], labels.get(x["feature"], ""), x["score"],
                         f"{x['score_ci'][0]:.3g} – {x['score_ci'][1]:.3g}", x["rate_base"], x["rate_tuned"]]
                        for x in res[key][:top]]
    head = ["feature", "explanation", "Δ mean / max act", "95% CI", "rate base", "rate tuned"]
    fit = [[k, v["fvu"], v["ce_recovered"], v["ce_clean"], v["ce_spliced"]] for k, v in r.fit.items()]
    tables = [Table("Features that rose most (by the low end of the interval)", head, rows("rising")),
              Table("Features that fell most (by the high end of the interval)", head, rows("falling")),
              Table("Does the dictionary still fit?", ["model", "FVU", "CE recovered", "CE clean", "CE spliced"], fit),
              Table("Watched concepts", ["concept", "features", "base", "tuned", "rise", "95% CI"],
                    [[c["name"], ",".join(map(str, c["features"])), c["base"], c["tuned"], c["rise"],
                      f"{c['rise_ci'][0]:.3g} – {c['rise_ci'][1]:.3g}"] for c in res["concepts"]])]
    b = res["baselines"]
    summary = [f"{r.tuned} against {r.base} at {r.hook}, the base model's SAE on both; {res['texts']} texts "
               f"({res['positions']:,} positions) of {r.corpus}. Intervals: {res['interval']}.",
               f"{res['n_rising']} features rose and {res['n_falling']} fell beyond their interval; "
               f"{len(r.features.appear)} appeared, {len(r.features.vanish)} vanished.",
               f"Without the SAE: ‖Δ mean activation‖ = {b['mean_diff_norm']:.3g} (95% CI {b['mean_diff_ci'][0]:.3g}–"
               f"{b['mean_diff_ci'][1]:.3g}; {b['mean_diff_relative']:.2%} of ‖mean base activation‖); "
               f"KL(tuned ‖ base) = {b['kl']:.4f} nats/token (95% CI {b['kl_ci'][0]:.4f}–{b['kl_ci'][1]:.4f})."]
    examples = [(f"concept {c['name']}: text {t['text']} (+{t['increase']:.3g} per position)", t["preview"])
                for c in res["concepts"] for t in c["top_texts"][:2]]
    return write_report(out, "Model diff through the feature basis", summary, tables, _plot(r.features), res,
                        command, examples)


def _plot(fd: FeatureDiff, n: int = 40) -> bytes | None:
    feats = fd.rising[:n]
    if not feats:
        return None
    xs = list(range(1, len(feats) + 1))
    return plot_png([Series("Δ mean / max act", xs, [float(fd.score[f]) for f in feats]),
                     Series("low end of 95% CI", xs, [float(fd.score_ci[0, f]) for f in feats], style="points")],
                    "rank among rising features", "Δ mean activation / max activation",
                    title="Features that rose, tuned vs base")


def save_stats(path: Path, st: TextStats) -> None:
    atomic.write_tensors(path, {k: v.contiguous() for k, v in st._asdict().items()})


def load_stats(path: Path | str) -> TextStats:
    t = load_file(str(path))
    return TextStats(**{k: t[k] for k in TextStats._fields})
