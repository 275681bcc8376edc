"""Model diffing through the feature basis: what did fine-tuning change, named by the base model's SAE.

The same texts go through the base and the tuned model; the base model's SAE reads both at its hook.
Per text (a window of the corpus) and per feature the pass keeps the firing count and the sum of
activations on each model (:class:`TextStats`); every figure is then a ratio of sums over texts, and its
interval comes from a **paired bootstrap over texts** (the same resampled windows for both models;
percentile interval), because tokens of one window are not independent draws. From those sums:

- per feature, the change in firing rate and in mean activation (over all counted positions, zeros
  included), and the change in mean activation divided by the feature's max activation (``score``),
  which makes features comparable; features are ranked by the lower end of that interval (a feature
  ranks high when it *surely* rose a lot), and fall by its upper end;
- features that appear (the base fires on less than a tenth as many positions, the rise significant)
  or vanish (the reverse);
- concepts (a feature list with a name): the mean of ``Σ_f z_f / max_f`` on each model, their ratio
  ("rise") with its interval, and the texts where it rose most; :func:`gate` turns one into a CI check;
- baselines with no SAE: the norm of the difference of mean activations at the hook, and the mean KL
  divergence of the tuned model's next-token distribution from the base's.

Positions follow the SAE's rule (:mod:`saelab.positions`) on *both* models: a position counts only if
neither model's rule leaves it out, so both sides always average over the same positions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch.nn import functional as F

from saelab.conceptfile import load_concept
from saelab.corpus import CorpusSpec, bos_token_id, tokenizer_identity
from saelab.errors import SaelabError
from saelab.formats import feature_max_activations
from saelab.hooks import capture, hook_shapes
from saelab.positions import PositionRule
from saelab.provenance import Provenance
from saelab.token_cache import sequences


class DiffRefused(SaelabError, ValueError):
    """Two models that cannot be compared through one SAE (tokenizer, width at the hook)."""


@dataclass
class DiffConfig:
    """How many texts go through both models, and how the intervals are drawn."""

    tokens: int = 16_384
    """Tokens through each model (whole windows of ``context``)."""
    context: int | None = None
    """Window length (None: the SAE's training context, at most 256)."""
    batch_size: int = 4
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the corpus order and of the bootstrap."""
    resamples: int = 1000
    """Bootstrap resamples over texts."""
    min_texts: int = 8
    """Below this many texts no feature or concept is called changed: a percentile bootstrap over so few
    clusters gives intervals far too narrow (with 2 texts there are only 3 distinct resamples)."""
    appear_ratio: float = 10.0
    """A feature appears when the tuned model fires on at least this many times more positions (and vanishes
    when the base does), the rise significant."""


class TextStats(NamedTuple):
    """Per text (window) sums over its counted positions; everything else is computed from these."""

    n: torch.Tensor           # [S] counted positions
    fire: torch.Tensor        # [2, S, d_sae] positions where the feature fires (base, tuned)
    act: torch.Tensor         # [2, S, d_sae] sum of the feature's activation
    x: torch.Tensor           # [2, S, d_in] sum of the hook activation
    kl: torch.Tensor          # [S] sum of KL(tuned ‖ base) of the next-token distributions
    nll: torch.Tensor         # [2, S] sum of next-token NLL
    ids: torch.Tensor         # [S, T] the texts' token ids

    def take(self, rows) -> "TextStats":
        return TextStats(self.n[rows], self.fire[:, rows], self.act[:, rows], self.x[:, rows], self.kl[rows],
                         self.nll[:, rows], self.ids[rows])


# -- the pass over the texts ---------------------------------------------------------------------------

def check_comparable(base, tuned, hook: str) -> None:
    """One clear line when the two models cannot share an SAE: other tokenizers, or other widths at the hook."""
    a, b = tokenizer_identity(base.tokenizer), tokenizer_identity(tuned.tokenizer)
    if a["sha256"] != b["sha256"] or a["vocab_size"] != b["vocab_size"]:
        raise DiffRefused(f"models {base.name!r} and {tuned.name!r} have different tokenizers (vocabulary "
                          f"{a['vocab_size']} vs {b['vocab_size']}, sha256 {a['sha256'][:12]}… vs {b['sha256'][:12]}…): "
                          "the same text would be different tokens; diff a fine-tune against its own base")
    wa, wb = hook_shapes(base.model, [hook])[hook], hook_shapes(tuned.model, [hook])[hook]
    if wa != wb:
        raise DiffRefused(f"models {base.name!r} and {tuned.name!r} have different widths at {hook} ({wa} vs {wb}): "
                          "one SAE cannot read both; diff a fine-tune against its own base")


def text_ids(spec: CorpusSpec | str, tokenizer, context: int, tokens: int, seed: int) -> torch.Tensor:
    """``[S, context]`` BOS-led windows of the corpus (its validation split when given as a string)."""
    spec = CorpusSpec(spec, "validation") if isinstance(spec, str) else spec
    ids = list(islice(sequences(spec, tokenizer, context, seed), max(1, math.ceil(tokens / context))))
    if not ids:
        raise ValueError(f"corpus {spec.source!r} (split {spec.split!r}) has fewer than {context} tokens: "
                         "nothing to compare on; use a larger corpus or --context smaller")
    return torch.stack(ids)


def _forward(lm, hook: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x [B, T, d_in], log-probs [B, T, vocab] or None)`` of one batch."""
    with capture(lm.model, hook) as acts:
        out = lm.model(input_ids=ids, use_cache=False) if lm.is_causal else lm.model(input_ids=ids)
    logits = getattr(out, "logits", None)
    return acts[hook].float(), None if logits is None else F.log_softmax(logits.float(), -1)


@torch.no_grad()
def text_stats(sae, base, tuned, ids: torch.Tensor, hook: str, rule: PositionRule, batch_size: int = 4,
               progress=None) -> TextStats:
    """One pass of ``ids [S, T]`` through both models: the per-text sums of :class:`TextStats`."""
    S, d_sae, d_in = ids.shape[0], sae.d_sae, sae.d_in
    n, kl = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    fire, act = torch.zeros(2, S, d_sae, dtype=torch.float64), torch.zeros(2, S, d_sae, dtype=torch.float64)
    x_sum, nll = torch.zeros(2, S, d_in, dtype=torch.float64), torch.zeros(2, S, dtype=torch.float64)
    for start in range(0, S, batch_size):
        b = ids[start:start + batch_size].to(base.device)                       # (B, T)
        rows = torch.arange(start, start + b.shape[0])
        outs = [_forward(lm, hook, b) for lm in (base, tuned)]
        keep = rule.keep(b, outs[0][0].norm(dim=-1)) & rule.keep(b, outs[1][0].norm(dim=-1))  # (B, T)
        seq = rows.to(keep.device)[:, None].expand_as(keep)[keep].cpu()           # (n_kept,) text of each row
        n.index_add_(0, seq, torch.ones(len(seq), dtype=torch.float64))
        for m, (x, logp) in enumerate(outs):
            z = sae.encode(x[keep]).cpu()                                         # (n_kept, d_sae)
            fire[m].index_add_(0, seq, (z > 0).double())
            act[m].index_add_(0, seq, z.double())
            x_sum[m].index_add_(0, seq, x[keep].cpu().double())
            if logp is not None:
                nll[m].index_add_(0, seq, _next_nll(logp, b, keep).cpu().double())
        if outs[0][1] is not None:
            pt, pb = outs[1][1][keep], outs[0][1][keep]                           # (n_kept, vocab) each
            kl.index_add_(0, seq, (pt.exp() * (pt - pb)).sum(-1).cpu().double())
        if progress is not None:
            progress(b.numel())
    return TextStats(n, fire, act, x_sum, kl, nll, ids.cpu())


def _next_nll(logp: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[n_kept]`` NLL of the next token at each counted position (0 at a window's last position)."""
    nxt = torch.zeros_like(logp[..., 0])                                          # (B, T)
    nxt[:, :-1] = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return nxt[keep]


# -- statistics from the per-text sums ----------------------------------------------------------------

def bootstrap_weights(n_texts: int, resamples: int, seed: int) -> torch.Tensor:
    """``[R, S]`` how often each text is drawn in each resample (multinomial, with replacement)."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n_texts, (resamples, n_texts), generator=g)
    return torch.zeros(resamples, n_texts, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, n_texts, dtype=torch.float64))


def _ratio_ci(weights: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile 95% interval of ``Σ num / Σ den`` under the resampling ``weights [R, S]``; ``num [S, ...]``,
    ``den [S]``. Computed in float32 chunks of features (the [R, d_sae] product is the big one)."""
    den_r = (weights @ den).clamp_min(1e-12)                                       # (R,)
    flat = num.reshape(num.shape[0], -1)
    lo, hi = torch.empty(flat.shape[1], dtype=torch.float64), torch.empty(flat.shape[1], dtype=torch.float64)
    for c in range(0, flat.shape[1], 2048):
        r = (weights.float() @ flat[:, c:c + 2048].float()).double() / den_r[:, None]  # (R, chunk)
        q = torch.quantile(r, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
        lo[c:c + 2048], hi[c:c + 2048] = q[0], q[1]
    return lo.reshape(num.shape[1:]), hi.reshape(num.shape[1:])


class FeatureDiff(NamedTuple):
    """Per feature, base vs tuned (each ``[d_sae]``); rates per counted position, means over them."""

    rate: torch.Tensor        # [2, d_sae]
    d_rate: torch.Tensor
    d_rate_ci: torch.Tensor   # [2, d_sae] low, high
    mean: torch.Tensor        # [2, d_sae]
    d_mean: torch.Tensor
    score: torch.Tensor       # d_mean / max activation
    score_ci: torch.Tensor    # [2, d_sae]
    rising: list[int]
    """Features by the lower end of the score's interval, highest first (only those whose interval is above 0)."""
    falling: list[int]
    appear: list[int]
    vanish: list[int]


def feature_diff(st: TextStats, scale: torch.Tensor, cfg: DiffConfig) -> FeatureDiff:
    """The per-feature changes of :class:`FeatureDiff` with paired bootstrap intervals over texts."""
    N = st.n.sum().clamp_min(1)
    rate, mean = st.fire.sum(1) / N, st.act.sum(1) / N                             # (2, d_sae) each
    w = bootstrap_weights(len(st.n), cfg.resamples, cfg.seed)
    r_lo, r_hi = _ratio_ci(w, st.fire[1] - st.fire[0], st.n)
    scale = scale.double().clamp_min(1e-6)
    s_lo, s_hi = _ratio_ci(w, (st.act[1] - st.act[0]) / scale, st.n)
    score = (mean[1] - mean[0]) / scale
    enough = len(st.n) >= cfg.min_texts
    rising = [int(i) for i in torch.argsort(s_lo, descending=True) if s_lo[i] > 0] if enough else []
    falling = [int(i) for i in torch.argsort(s_hi) if s_hi[i] < 0] if enough else []
    ratio = cfg.appear_ratio
    appear = [i for i in rising if rate[0, i] * ratio <= rate[1, i] and r_lo[i] > 0]
    vanish = [i for i in falling if rate[1, i] * ratio <= rate[0, i] and r_hi[i] < 0]
    return FeatureDiff(rate, rate[1] - rate[0], torch.stack([r_lo, r_hi]), mean, mean[1] - mean[0], score,
                       torch.stack([s_lo, s_hi]), rising, falling, appear, vanish)


class Baselines(NamedTuple):
    """What changed, measured without the SAE."""

    mean_diff_norm: float
    """‖mean x_tuned − mean x_base‖ at the hook."""
    mean_diff_ci: tuple[float, float]
    mean_diff_relative: float
    """That norm over ‖mean x_base‖."""
    kl: float
    """Mean KL(tuned ‖ base) of the next-token distributions (nats/token); NaN without an LM head."""
    kl_ci: tuple[float, float]
    nll: tuple[float, float]
    """Mean next-token NLL of each model on the texts (base, tuned)."""
    direction: torch.Tensor
    """``[d_in]`` the difference of means itself."""


def baselines(st: TextStats, cfg: DiffConfig) -> Baselines:
    N = st.n.sum().clamp_min(1)
    mu = st.x.sum(1) / N                                                          # (2, d_in)
    delta = mu[1] - mu[0]
    w = bootstrap_weights(len(st.n), min(cfg.resamples, 400), cfg.seed)
    den = (w @ st.n).clamp_min(1e-12)[:, None]                                    # (R, 1)
    norms = ((w @ (st.x[1] - st.x[0])) / den).norm(dim=-1)                        # (R,)
    kls = (w @ st.kl) / den[:, 0]                                                 # (R,)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    nq, kq = torch.quantile(norms, q), torch.quantile(kls, q)
    return Baselines(float(delta.norm()), (float(nq[0]), float(nq[1])), float(delta.norm() / mu[0].norm().clamp_min(1e-12)),
                     float(st.kl.sum() / N), (float(kq[0]), float(kq[1])),
                     (float(st.nll[0].sum() / N), float(st.nll[1].sum() / N)), delta.float())


# -- concepts and the gate -----------------------------------------------------------------------------

class Concept(NamedTuple):
    name: str
    features: list[int]


def read_concept(path: Path | str, sae=None) -> Concept:
    """A concept to watch: a saelab concept file (``saelab concept --save``; with ``sae``, refused unless made
    for that SAE), any JSON with ``"features"`` (ids, or objects with ``"id"``/``"feature"``) and a ``"name"``
    (default: the file's stem), or a plain text list of feature ids (commas, spaces or lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "saelab_concept" in obj:
        concept = load_concept(path, sae)
        if not concept.features:
            raise ValueError(f"{path}: a {concept.method} dial has no SAE features to watch; the diff watches "
                             "features (save an SAE concept with 'saelab concept ... --save FILE')")
        return Concept(concept.name, list(concept.features))
    if isinstance(obj, dict):
        raw = obj.get("features")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{path}: a concept file needs a non-empty 'features' list")
        ids = [f.get("id", f.get("feature")) if isinstance(f, dict) else f for f in raw]
        name = obj.get("name") or path.stem
    else:
        ids, name = text.replace(",", " ").split(), path.stem
    try:
        return Concept(str(name), [int(i) for i in ids])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: feature ids must be integers, got {ids[:5]}") from None


class ConceptRise(NamedTuple):
    name: str
    features: list[int]
    base: float
    """Mean over counted positions of Σ_f z_f / max_f on the base model."""
    tuned: float
    rise: float
    """tuned / base (inf when the base never shows the concept)."""
    rise_ci: tuple[float, float]
    top_texts: list[tuple[int, float]]
    """(text index, per-position increase of the concept score) of the texts where it rose most."""
    texts: int
    """How many texts the rise is measured on."""
    min_texts: int
    """Fewer texts than this and the gate never fails (:attr:`DiffConfig.min_texts`)."""


def concept_rise(st: TextStats, scale: torch.Tensor, concept: Concept, cfg: DiffConfig, top: int = 3) -> ConceptRise:
    feats = torch.tensor(concept.features)
    per = (st.act[:, :, feats] / scale.double()[feats].clamp_min(1e-6)).sum(-1)    # (2, S)
    N = st.n.sum().clamp_min(1)
    base, tuned = float(per[0].sum() / N), float(per[1].sum() / N)
    w = bootstrap_weights(len(st.n), cfg.resamples, cfg.seed)
    rb, rt = w @ per[0], w @ per[1]                                                # (R,) each
    ratios = torch.where(rb > 0, rt / rb.clamp_min(1e-300), torch.full_like(rt, math.inf))
    q = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64))
    inc = (per[1] - per[0]) / st.n.clamp_min(1)                                    # (S,)
    tops = [(int(i), float(inc[i])) for i in torch.argsort(inc, descending=True)[:top]]
    return ConceptRise(concept.name, concept.features, base, tuned, tuned / base if base > 0 else math.inf,
                       (float(q[0]), float(q[1])), tops, len(st.n), cfg.min_texts)


def gate(rise: ConceptRise, max_rise: float) -> bool:
    """Whether the concept rose beyond ``max_rise`` ×: the point estimate above it and the rise itself
    significant (the interval's low end above 1, on enough texts), so sampling noise alone never fails a build."""
    return rise.rise > max_rise and rise.rise_ci[0] > 1.0 and rise.texts >= rise.min_texts


def sae_inputs(sae, tokenizer, context: int | None) -> tuple[str, int, PositionRule]:
    """The SAE's hook, the window length and its position rule (on the tokenizer's BOS), from its provenance."""
    prov = Provenance.of(sae)
    if not prov.hook_read:
        raise ValueError("the SAE does not name its hook (saelab.json / cfg.json metadata.hook_name)")
    return prov.hook_read, context or min(prov.context or 256, 256), PositionRule.of(prov, bos_token_id(tokenizer))


def scales(sae) -> torch.Tensor:
    """Per-feature max activation (saelab.json), or 1 for every feature when the SAE does not record it. A feature
    that never fired in training (max 0) gets the median of the others: divided by ~0 its first firing in a tuned
    model would outrank every real change."""
    try:
        out = feature_max_activations(sae).cpu()
    except ValueError:
        return torch.ones(sae.d_sae)
    alive = out[out > 0]
    return torch.where(out > 0, out, alive.median() if len(alive) else torch.tensor(1.0))


def concept_list(concepts: Sequence[Concept], d_sae: int) -> None:
    """Refuse feature ids outside the SAE."""
    for c in concepts:
        bad = [f for f in c.features if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"concept {c.name!r}: feature ids {bad[:5]} are outside the SAE's 0..{d_sae - 1}")
