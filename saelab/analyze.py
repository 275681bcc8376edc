"""The analysis pass: one streaming pass over corpus tokens → every feature's story in features.db.

Per batch of sequences: model forward to the hook (stopping there), SAE encode (the sparse top-k path
for topk SAEs), and the batch's non-zero latents feed the streaming statistics of :mod:`saelab.mining`
(counts, max/mean, histograms, top-K / quantile / random examples with token windows, co-activation).
BOS tokens (attention sinks with outlier norms) are left out of everything when ``skip_bos``.

Tokens come from the SAE's corpus: by default (``split="auto"``) its validation split first, then its
train split once validation runs out (the stdlib validation split has ~450k tokens, less than the
default 1M); ``split="validation"`` stops at the end of the held-out text and says so in the meta table.

After the pass: logit effects (direct path, :func:`direct_logit_directions`), decoder and co-activation
neighbours, the map (:mod:`saelab.fmap`), offline explanations with detection scores (``saelab.explain``
when present), all written atomically to features.db. Inspecting a text and concept search live in
:mod:`saelab.textfeatures`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from saelab.corpus import CorpusSpec, bos_token_id
from saelab.dashboard import band_rows, correlation_rows, logit_histograms
from saelab.explain import explain_and_score, record_from_db
from saelab.featuredb import FeatureDB, build, sae_identity
from saelab.fmap import decoder_neighbours, layout
from saelab.hooks import capture, final_norm, resolve, run_to_hooks
from saelab.locks import exclusive
from saelab.mining import Batch, Stats, coact_rows, example_rows, histogram_rows, pool_rows, sparse_latents
from saelab.positions import PositionRule
from saelab.progress import bar as progress_bar
from saelab.provenance import Provenance, stage_inputs
from saelab.stage_config import AnalyzeConfig, with_overrides
from saelab.runtime import tune_allocator
from saelab.session import RunFolder, features_db_beside, open_run
from saelab.token_cache import sequences

FINAL_RMS_SEQS = 2
"""Sequences of the first batch run through the whole model to measure the final residual's mean RMS."""


# -- the pass ----------------------------------------------------------------------------------------


class Setup(NamedTuple):
    sae: object
    lm: object
    hook: str
    corpus: str
    sae_path: Path | None


def resolve_inputs(sae, model=None, corpus=None, hook: str | None = None) -> Setup:
    """Accept an SAE, its folder or an opened run (:func:`saelab.session.open_run`); default the model, hook
    and corpus from the SAE's provenance."""
    run = sae if isinstance(sae, RunFolder) else open_run(sae, model, db=False)
    inputs = run.inputs(hook=hook, corpus=corpus)
    return Setup(run.sae, run.model(), inputs.hook, inputs.corpus.source, run.sae_path)


def token_batches(lm, corpus: str, cfg: AnalyzeConfig, context: int) -> Iterator[tuple[torch.Tensor, str]]:
    """``[B, context]`` id batches and the split they came from, until ``cfg.tokens`` tokens."""
    splits = ["validation", "train"] if cfg.split == "auto" else [cfg.split]
    n_seqs = math.ceil(cfg.tokens / context)
    seqs = itertools.chain.from_iterable(
        ((s, split) for s in sequences(CorpusSpec(corpus, split), lm.tokenizer, context, cfg.seed))
        for split in splits)
    seqs = itertools.islice(seqs, n_seqs)
    while chunk := list(itertools.islice(seqs, cfg.batch_size)):
        yield torch.stack([s for s, _ in chunk]), chunk[-1][1]


@torch.no_grad()
def run_pass(setup: Setup, cfg: AnalyzeConfig, context: int, progress: bool = True) -> tuple[Stats, dict]:
    """Stream the corpus through model → hook → SAE and accumulate :class:`Stats`."""
    sae, lm = setup.sae, setup.lm
    device = sae.W_dec.device
    prov = Provenance.of(sae)
    hint = prov.feature_max_act
    hint = torch.tensor(hint, dtype=torch.float32) if hint is not None and len(hint) == sae.d_sae else None
    stats = Stats(sae.d_sae, cfg, hint, device, cfg.seed)
    rule = prov.position_rule(lm.tokenizer, cfg.skip_bos)    # the SAE's sink rule; BOS as the config says
    warmup = max(1, math.ceil(cfg.tokens / context / cfg.batch_size) // 20)
    by_split: dict[str, int] = {}
    start, n_batches, final_rms = time.perf_counter(), 0, None
    with progress_bar(total=cfg.tokens, unit="tok", unit_scale=True, desc="analysing", disable=not progress) as bar:
        for ids, split in token_batches(lm, setup.corpus, cfg, context):
            if n_batches == 0 and lm.is_causal:      # the final norm's scale for the logit effects
                final_rms = mean_final_rms(lm, ids[:FINAL_RMS_SEQS], rule)
            x = run_to_hooks(lm.model, ids.to(lm.device), setup.hook)[setup.hook]  # (B, T, d_in)
            keep = rule.keep(ids.to(x.device), torch.linalg.vector_norm(x.float(), dim=-1)).reshape(-1).to(device)
            x = x.reshape(-1, x.shape[-1]).to(device, torch.float32)  # (B·T, d_in)
            if not torch.isfinite(x).all():
                raise ValueError(f"non-finite activations at hook {setup.hook} (batch {n_batches}); "
                                 "check the model weights and dtype")
            flat = ids.reshape(-1).to(device)
            tok, feat, val, top_m = sparse_latents(sae, x, keep, cfg.coact_top)
            b = Batch(tok, feat, val, flat, context, n_batches * cfg.batch_size, sae.d_sae, cfg.window_left,
                      cfg.window_right, tok * sae.d_sae + feat, val)  # entries are already sorted by key
            stats.add(b, top_m, keep, sample_bands=stats.hinted or n_batches >= warmup)
            stats.add_neurons(b, x, keep)
            by_split[split] = by_split.get(split, 0) + ids.numel()
            n_batches += 1
            bar.update(ids.numel())
    seconds = time.perf_counter() - start
    total = sum(by_split.values())
    info = {"tokens_analysed": stats.tokens, "tokens_read": total, "tokens_by_split": by_split,
            "seconds": round(seconds, 2), "tokens_per_s": round(total / max(seconds, 1e-9), 1),
            "final_rms": final_rms}
    if total < cfg.tokens:
        info["note"] = f"asked for {cfg.tokens} tokens but split {cfg.split!r} of {setup.corpus!r} has only {total}"
    return stats, info


# -- after the pass ------------------------------------------------------------------------------------


def token_strings(tokenizer, n_model: int = 0) -> list[str]:
    """The exact text of every token id on its own (raw; SentencePiece's ``▁`` restored as a space).
    Ids the model has beyond the tokenizer's vocabulary (padding rows) read ``<id N>``."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    out = []
    for i, piece in enumerate(pieces):
        s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if isinstance(piece, str) and piece.startswith("▁") and not s.startswith(" "):
            s = " " + s
        out.append(s)
    return out + [f"<id {i}>" for i in range(n, n_model)]


def direct_logit_directions(sae, lm, hook: str, rms: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(D [d_sae, d_model], W_U [vocab, d_model])`` with logit effects ``D @ W_Uᵀ``, or None.

    D is each decoder direction in the residual stream (mapped through the down projection for an
    ``mlp.hook_post``-style hook), through the final norm linearised at the residual's mean scale: times
    the norm's weight (``1 + w`` for Gemma; LayerNorm also centres it) and divided by ``rms``, the mean
    RMS (LayerNorm: standard deviation) of the final residual (:func:`mean_final_rms`). So an effect is
    in logits per unit of feature activation, for a token whose residual has the typical scale. The
    direct path only: the layers between the hook and the head are skipped (at a middle layer that is
    most of the story, which is why the feature page labels these "direct path").
    """
    model = lm.model
    head = model.get_output_embeddings() if lm.is_causal else None
    if head is None:
        return None
    W_U = head.weight.detach().float().to(sae.W_dec.device)
    D = sae.W_dec.detach().float()
    if D.shape[1] != W_U.shape[1]:
        point = resolve(model, hook)
        mod = model.get_submodule(point.module_path)
        w = getattr(mod, "weight", None)
        if point.io != "input" or w is None:
            return None
        w = w.detach().float().to(D.device)
        D = D @ (w.T if w.shape[1] == D.shape[1] else w)  # nn.Linear [out, in]; GPT-2 Conv1D [in, out]
        if D.shape[1] != W_U.shape[1]:
            return None
    norm = final_norm(model)
    if norm is not None and getattr(norm, "weight", None) is not None:
        if isinstance(norm, torch.nn.LayerNorm):
            D = D - D.mean(1, keepdim=True)
        scale = norm.weight.detach().float().to(D.device)
        D = D * (1 + scale if lm.family.startswith("gemma") else scale)
    if rms:
        D = D / rms
    return D, W_U


@torch.no_grad()
def mean_final_rms(lm, ids: torch.Tensor, rule: PositionRule) -> float | None:
    """Mean RMS (LayerNorm: standard deviation) of the residual entering the final norm over ``ids
    [B, T]``, at the positions ``rule`` keeps (a sink's residual is ~100× the rest). None without a norm."""
    norm = final_norm(lm.model)
    if norm is None:
        return None
    with capture(lm.model, [f"{_path_of(lm.model, norm)}:input"]) as acts:
        lm.model(input_ids=ids.to(lm.device), use_cache=False)
    h = next(iter(acts.values())).float()                                          # (B, T, d)
    if isinstance(norm, torch.nn.LayerNorm):
        h = h - h.mean(-1, keepdim=True)
    rms = h.pow(2).mean(-1).sqrt()                                                 # (B, T)
    keep = rule.keep(ids.to(h.device), torch.linalg.vector_norm(h, dim=-1))
    return float(rms[keep].mean()) if keep.any() else None


def _path_of(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def logit_effects(D: torch.Tensor, W_U: torch.Tensor, n: int = 10, block: int = 1024):
    """Top and bottom ``n`` logit effects of every row of ``D``: ``(pos_vals, pos_ids, neg_vals, neg_ids)``."""
    out = [[], [], [], []]
    for start in range(0, D.shape[0], block):
        eff = D[start:start + block] @ W_U.T  # (block, vocab)
        pv, pi = eff.topk(min(n, eff.shape[1]), dim=1)
        nv, ni = (-eff).topk(min(n, eff.shape[1]), dim=1)
        for acc, t in zip(out, (pv, pi, -nv, ni)):
            acc.append(t.cpu())
    return tuple(torch.cat(t) for t in out)


def summary_tokens(top_rows: list[dict], logit_tokens: list[str], n: int = 12) -> str:
    """Words for full-text search: the max tokens of the top examples (most frequent first), then the
    most promoted logit tokens."""
    freq: dict[str, int] = {}
    for r in top_rows:
        tok = r["tokens"][r["max_pos"]].strip()
        if tok:
            freq[tok] = freq.get(tok, 0) + 1
    words = sorted(freq, key=lambda t: -freq[t])[:n] + [t.strip() for t in logit_tokens[:5] if t.strip()]
    return " ".join(words)


def write_db(out: Path, setup: Setup, cfg: AnalyzeConfig, context: int, stats: Stats, info: dict,
             progress: bool) -> None:
    sae, lm = setup.sae, setup.lm
    vocab = getattr(lm.model.config, "vocab_size", 0) or 0
    strings, bos = token_strings(lm.tokenizer, vocab), bos_token_id(lm.tokenizer)
    left = cfg.window_left
    examples = list(example_rows(stats.top, "top", strings, bos, left))
    examples += example_rows(stats.quant, "quantile", strings, bos, left, cfg.n_quantiles)
    examples += example_rows(stats.rand, "random", strings, bos, left)
    examples += pool_rows(stats.pool, sae.d_sae, cfg.n_random, strings, bos, left, cfg.n_random, cfg.seed)
    top_by_feature: dict[int, list[dict]] = {}
    for r in examples:
        if r["kind"] == "top":
            top_by_feature.setdefault(r["feature"], []).append(r)
    logit_rows, pos_tokens = [], [[] for _ in range(sae.d_sae)]
    dirs = direct_logit_directions(sae, lm, setup.hook, info.get("final_rms"))
    if dirs is not None:
        pv, pi, nv, ni = logit_effects(*dirs, n=cfg.n_logits)
        for sign, vals, ids in ((1, pv, pi), (-1, nv, ni)):
            for f, (vrow, irow) in enumerate(zip(vals.tolist(), ids.tolist())):
                for r, (v, t) in enumerate(zip(vrow, irow)):
                    logit_rows.append((f, sign, r, t, strings[t], v))
                    if sign > 0:
                        pos_tokens[f].append(strings[t])
    count, mx = stats.count.cpu(), stats.max.cpu()
    mean = (stats.sum.cpu() / count.clamp_min(1)).tolist()
    features = [{"id": f, "count": int(count[f]), "density": int(count[f]) / max(stats.tokens, 1),
                 "max_act": float(mx[f]), "mean_act": mean[f],
                 "top_tokens": summary_tokens(top_by_feature.get(f, []), pos_tokens[f])} for f in range(sae.d_sae)]
    cos, idx = decoder_neighbours(sae.W_dec, cfg.n_neighbours)
    neigh = [(f, "decoder", r, o, c) for f, (orow, crow) in enumerate(zip(idx.tolist(), cos.tolist()))
             for r, (o, c) in enumerate(zip(orow, crow))]
    coact_neigh, coact_raw = coact_rows(stats, cfg.n_neighbours, cfg.coact_partners)
    fmap = layout(sae.W_dec, method=cfg.map, seed=cfg.seed) if cfg.map != "none" else None
    with build(out) as w:
        w.meta(**_meta(setup, cfg, context, info, dirs is not None, fmap))
        w.features(features)
        w.examples(examples)
        w.logit_effects(logit_rows)
        w.neighbours(neigh + coact_neigh)
        w.coactivation(coact_raw)
        w.histograms(histogram_rows(stats))
        w.bands(band_rows(stats))
        w.correlations(correlation_rows(stats, cfg.n_neighbours))
        if dirs is not None:
            w.logit_histograms(logit_histograms(*dirs))
        if fmap is not None:
            w.map(zip(range(sae.d_sae), fmap.x.tolist(), fmap.y.tolist(), fmap.cluster.tolist()))
        if cfg.explain:
            write_explanations(FeatureDB(w.conn, out), progress)


def _meta(setup: Setup, cfg: AnalyzeConfig, context: int, info: dict, logits: bool, fmap) -> dict:
    sae, lm = setup.sae, setup.lm
    prov = Provenance.of(sae)
    return {"model_name": lm.name, "model_weights_sha256": prov.model_weights_sha256,
            "hook_name": setup.hook, "sae_path": str(setup.sae_path) if setup.sae_path else None,
            **sae_identity(sae), "d_in": sae.d_in, "architecture": sae.cfg.architecture, "k": sae.cfg.k,
            "corpus": setup.corpus, "context": context, "config": asdict(cfg), **info,
            "map_method": fmap.method if fmap is not None else None,
            "logit_effects": ("direct path: W_U · (final-norm weight ⊙ W_dec[f]) / R, R = mean RMS of the final "
                              f"residual ({info.get('final_rms') or 0:.4g}); the layers after the hook are skipped"
                              if logits else None),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_explanations(db, progress: bool = True) -> int:
    """Offline explanations and detection scores (:mod:`saelab.explain`) for every live feature; returns the
    number written."""
    rows = []
    for f in progress_bar(db.live_features(), desc="explaining", unit="feat", disable=not progress):
        result = explain_and_score(record_from_db(db, f))
        rows.append((f, result.explanation, "offline", result.score))
    db.set_explanations(rows)
    return len(rows)


def analyze(sae, model=None, corpus=None, *, out: Path | str | None = None, hook: str | None = None,
            progress: bool = True, config: AnalyzeConfig | None = None, **overrides) -> Path:
    """Analyse an SAE (object or folder) over corpus tokens and write features.db; returns its path.

    ``model``/``corpus``/``hook`` default to the SAE's provenance. ``out`` defaults to
    ``<sae folder>/../features.db``. Any :class:`AnalyzeConfig` field can be given as a keyword
    (``tokens=``, ``context=``, ``batch_size=``, ``k_top=``, ``n_quantiles=``, ``seed=``, ``split=`` ...).
    """
    tune_allocator()   # long batch job: keep big blocks in the heap (saelab.runtime)
    cfg = with_overrides(AnalyzeConfig, config, overrides)
    setup = resolve_inputs(sae, model, corpus, hook)
    if out is None:
        if setup.sae_path is None:
            raise ValueError("give out=... for an in-memory SAE (there is no SAE folder to put features.db beside)")
        out = features_db_beside(setup.sae_path)
    context = stage_inputs(setup.sae, model=setup.lm.name, hook=setup.hook, corpus=setup.corpus,
                           context=cfg.context, max_positions=setup.lm.max_positions).context
    with exclusive(out, "analysis"):   # held for the whole pass, not only while the file is written
        stats, info = run_pass(setup, cfg, context, progress)
        write_db(Path(out), setup, cfg, context, stats, info, progress)
    return Path(out)
