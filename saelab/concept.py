"""Name a concept by examples, get its features and a calibrated dial.

1. **Rank** every feature by how well its activation separates positive from negative texts: each text is
   scored by the feature's max activation over its tokens (the concept shows somewhere in a positive
   text, not at every token), and features are ranked by the AUROC of those scores on a training split.
2. **Select** a small set by forward selection: at each step add the candidate that most improves the set's
   separation on the training split, and keep it only if the separation on a *held-out* split improves
   too (AUROC by ``min_gain``, or d′ by ``min_rel_gain`` at no loss of AUROC). The set's score of a text
   is the mean of its features' normalised max activations (:class:`saelab.measures.ConceptClassifier`).
   The set stops growing when adding stops helping, so its size is not fixed.
3. **Calibrate** one dial for the set (every feature clamped to the same multiple of its max activation):
   a short sweep on a few neutral prompts picks the smallest value whose concept rate reaches
   ``target_rate`` while the answers stay fluent (NLL ≤ ``max_nll_ratio`` × the default's, repetition ≤
   ``max_repetition``); if none reaches it, the fluent value with the highest concept rate.
4. **Grow the dial's set for steering** (:func:`steering_set`): a set that *detects* a concept need not be
   the set that *writes* it. One feature can separate the texts perfectly (held-out AUROC 1.0, so step 2
   stops), while clamping it alone moves no answer, and several of the concept's features clamped together
   do (Templeton et al. clamp one feature of a 34M dictionary; a small dictionary spreads a concept over a
   few). So the dial's set grows from the detection set along the ranking, one feature at a time,
   calibrating each size, until the target is reached or the best fluent concept rate has not improved for
   ``patience`` sizes; the smallest size with the best rate wins.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from saelab.formats import feature_max_activations
from saelab.measures import ConceptClassifier, DialValue, concept_curve, fit_threshold
from saelab.steer import sae_hook_name
from saelab.textfeatures import auroc, text_latents


@dataclass
class ConceptConfig:
    """How features are selected for a concept and how its dial is calibrated."""

    holdout: float = 0.3
    """Share of each class's texts held out to decide whether a feature joins the set."""
    candidates: int = 24
    """Best-ranked features (by training AUROC) that forward selection considers."""
    max_features: int = 8
    """Upper bound on the set's size (selection usually stops before)."""
    min_gain: float = 0.01
    """Held-out AUROC gain that admits a feature."""
    min_rel_gain: float = 0.1
    """Relative held-out d′ gain that admits a feature when the AUROC does not fall."""
    values: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
    """Dial values (× each feature's max activation) of the calibration sweep."""
    target_rate: float = 0.8
    """Concept rate the calibration aims for."""
    max_nll_ratio: float = 1.5
    """Fluency: the steered answers' NLL may be at most this multiple of the default answers'."""
    max_repetition: float = 0.3
    """Fluency: at most this share of repeated token 3-grams."""
    max_new_tokens: int = 32
    """Tokens per answer in the calibration sweep (greedy)."""
    seed: int = 0
    """Seed of the train/held-out split."""
    keywords: list[str] = field(default_factory=list)
    """If given, an answer is on concept when it contains one of them (instead of the feature classifier)."""
    steer_max_features: int = 6
    """Upper bound on the dial's set when it is grown for steering (:func:`steering_set`)."""
    patience: int = 2
    """Sizes without a better fluent concept rate after which the dial's set stops growing."""


class Separation(NamedTuple):
    auroc: float
    dprime: float
    """(mean_pos − mean_neg) / pooled standard deviation of the set's scores."""


def auroc1(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(positive score > negative score) + ½ P(tie) for 1-d scores."""
    gt = (pos[:, None] > neg[None, :]).float().mean()
    eq = (pos[:, None] == neg[None, :]).float().mean()
    return float(gt + 0.5 * eq)


def separation(pos: torch.Tensor, neg: torch.Tensor) -> Separation:
    pooled = ((pos.var(unbiased=False) + neg.var(unbiased=False)) / 2).sqrt().clamp_min(1e-3)
    return Separation(auroc1(pos, neg), float((pos.mean() - neg.mean()) / pooled))


@torch.no_grad()
def text_max_acts(sae, lm, texts: Sequence[str], hook: str) -> torch.Tensor:
    """Per text, every feature's max activation over the text's tokens: ``[n_texts, d_sae]``."""
    return torch.stack([text_latents(sae, lm, t, hook)[1].max(0).values.cpu() for t in texts])


def split(n: int, holdout: float, rng: random.Random) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    rng.shuffle(idx)
    k = max(1, round(n * holdout))
    return idx[k:], idx[:k]


class ConceptResult(NamedTuple):
    features: list[int]
    classifier: ConceptClassifier
    ranking: list[dict]
    """Best candidates: feature, train AUROC, mean normalised max activation on positive/negative texts."""
    steps: list[dict]
    """Forward selection, step by step: the candidate tried, its held-out separation, and whether it joined."""


def rank_features(S: torch.Tensor, n_pos: int, train: tuple[list[int], list[int]], scales: torch.Tensor,
                  top: int) -> list[dict]:
    """Features ranked by training AUROC (ties: relative mean difference); only those higher on positives."""
    P, N = S[:n_pos][train[0]] / scales, S[n_pos:][train[1]] / scales  # normalised (n, d_sae)
    au = torch.cat([auroc(P[:, i:i + 2048], N[:, i:i + 2048]) for i in range(0, S.shape[1], 2048)])
    diff = P.mean(0) - N.mean(0)
    key = au + 1e-6 * diff.clamp(-1, 1)  # AUROC first; the mean difference only breaks ties
    order = [int(f) for f in key.argsort(descending=True) if diff[f] > 0][:top]
    return [{"feature": f, "auroc": float(au[f]), "mean_pos": float(P[:, f].mean()), "mean_neg": float(N[:, f].mean())}
            for f in order]


def select_features(S: torch.Tensor, n_pos: int, scales: torch.Tensor, cfg: ConceptConfig) -> ConceptResult:
    """Rank, then grow the set greedily while the held-out separation improves (see the module docstring)."""
    n_neg = S.shape[0] - n_pos
    if n_pos < 4 or n_neg < 4:
        raise ValueError(f"a concept needs at least 4 positive and 4 negative texts (got {n_pos} and {n_neg}): a "
                         f"held-out share of them decides when the feature set stops growing")
    rng = random.Random(cfg.seed)
    (tr_p, ho_p), (tr_n, ho_n) = split(n_pos, cfg.holdout, rng), split(n_neg, cfg.holdout, rng)
    ranking = rank_features(S, n_pos, (tr_p, tr_n), scales, cfg.candidates)
    if not ranking:
        raise ValueError("no feature is more active on the positive texts than on the negative ones: give texts where "
                         "the concept is plainer, or more of them")
    X = S / scales  # (n_texts, d_sae) normalised
    Xp, Xn = X[:n_pos], X[n_pos:]

    def sep(feats: list[int], p_idx, n_idx) -> Separation:
        return separation(Xp[p_idx][:, feats].mean(1), Xn[n_idx][:, feats].mean(1))

    chosen = [ranking[0]["feature"]]
    held = sep(chosen, ho_p, ho_n)
    steps = [{"feature": chosen[0], "heldout_auroc": held.auroc, "heldout_dprime": held.dprime, "joined": True}]
    pool = [r["feature"] for r in ranking[1:]]
    while pool and len(chosen) < cfg.max_features:
        best = max(pool, key=lambda f: sep(chosen + [f], tr_p, tr_n))  # best training separation (AUROC, then d′)
        new = sep(chosen + [best], ho_p, ho_n)
        # a d′ gain counts only for a set that separates the right way (d′ > 0), and is relative to |d′|
        joined = new.auroc >= held.auroc + cfg.min_gain or (
            new.auroc >= held.auroc and new.dprime > 0 and new.dprime > held.dprime + cfg.min_rel_gain * abs(held.dprime))
        steps.append({"feature": best, "heldout_auroc": new.auroc, "heldout_dprime": new.dprime, "joined": joined})
        if not joined:
            break
        chosen.append(best)
        pool.remove(best)
        held = new
    score = X[:, chosen].mean(1)  # (n_texts,)
    thr = fit_threshold(score[:n_pos].tolist(), score[n_pos:].tolist())
    classifier = ConceptClassifier(chosen, [float(scales[f]) for f in chosen], thr)
    return ConceptResult(chosen, classifier, ranking, steps)


def feature_scales(sae, S: torch.Tensor, db=None) -> torch.Tensor:
    """Each feature's max activation (features.db, else the SAE's provenance), else its max over these texts."""
    if db is not None:
        table = torch.tensor([float(db.feature(i)["max_act"] or 0.0) for i in range(sae.cfg.d_sae)])
    else:
        try:
            table = feature_max_activations(sae).float().cpu()
        except ValueError:
            table = torch.zeros(S.shape[1])
    return torch.where(table > 0, table, S.max(0).values).clamp_min(1e-6)


class Calibration(NamedTuple):
    strength: float
    reached: bool
    """Whether ``strength`` reaches the target concept rate while fluent."""
    sweep: list[DialValue]


def is_fluent(point: DialValue, default: DialValue, cfg: ConceptConfig) -> bool:
    """NLL ≤ ``max_nll_ratio`` × the default's and repetition ≤ ``max_repetition``."""
    return point.nll <= cfg.max_nll_ratio * max(default.nll, 1e-6) and point.repetition <= cfg.max_repetition


def pick_strength(sweep: Sequence[DialValue], cfg: ConceptConfig) -> tuple[float, bool]:
    """The smallest fluent value reaching the target rate, else the fluent value with the highest rate."""
    default, points = sweep[0], list(sweep[1:])
    fluent = [p for p in points if is_fluent(p, default, cfg)]
    good = [p for p in fluent if p.concept_rate >= cfg.target_rate]
    if good:
        return min(p.value for p in good), True
    if fluent:
        best = max(fluent, key=lambda p: (p.concept_rate, -p.value))
        return best.value, False
    return min(p.value for p in points), False


def calibrate(lm, sae, features: Sequence[int], prompts: Sequence[str], classifier: ConceptClassifier | None,
              cfg: ConceptConfig, *, chat: bool = False, db=None, max_act=None, progress=None,
              default: DialValue | None = None) -> Calibration:
    """Sweep the set's dial over ``cfg.values`` on ``prompts`` and pick the calibrated strength (``default``: the
    unsteered point of an earlier sweep on the same prompts, reused)."""
    sweep = concept_curve(lm, sae, features, prompts, cfg.values, classifier=classifier, keywords=cfg.keywords,
                          chat=chat, max_new_tokens=cfg.max_new_tokens, db=db, max_act=max_act, progress=progress,
                          default=default)
    strength, reached = pick_strength(sweep, cfg)
    return Calibration(strength, reached, sweep)


def best_fluent_rate(cal: Calibration, cfg: ConceptConfig) -> float:
    """The concept rate at the calibrated strength when that value is fluent (else 0)."""
    point = next(p for p in cal.sweep[1:] if p.value == cal.strength)
    return point.concept_rate if is_fluent(point, cal.sweep[0], cfg) else 0.0


class SteeringSet(NamedTuple):
    features: list[int]
    calibration: Calibration
    growth: list[dict]
    """Per size tried: the features, the calibrated strength, its fluent concept rate, whether the target was reached."""


def steering_set(lm, sae, result: ConceptResult, prompts: Sequence[str], cfg: ConceptConfig, *, chat: bool = False,
                 db=None, max_act=None, progress=None) -> SteeringSet:
    """Grow the dial's set along the ranking while calibration says it helps (step 4 of the module docstring)."""
    order = list(result.features) + [r["feature"] for r in result.ranking if r["feature"] not in result.features]
    order = order[:max(cfg.steer_max_features, 1)]
    best: tuple[float, list[int], Calibration] | None = None
    growth, since_better, growth_default = [], 0, None
    for n in range(1, len(order) + 1):
        cal = calibrate(lm, sae, order[:n], prompts, result.classifier, cfg, chat=chat, db=db, max_act=max_act,
                        progress=progress, default=growth_default)
        growth_default = cal.sweep[0]  # the unsteered answers do not depend on the set: measured once
        rate_n = best_fluent_rate(cal, cfg)
        growth.append({"features": order[:n], "strength": cal.strength, "rate": rate_n, "reached": cal.reached})
        if best is None or rate_n > best[0]:
            best, since_better = (rate_n, order[:n], cal), 0
        else:
            since_better += 1
        if cal.reached or since_better >= cfg.patience:
            break
    return SteeringSet(best[1], best[2], growth)


def find_concept(lm, sae, positives: Sequence[str], negatives: Sequence[str], cfg: ConceptConfig | None = None, *,
                 hook: str | None = None, db=None) -> ConceptResult:
    """Rank features on the texts and select the concept's set (no generation)."""
    cfg = cfg or ConceptConfig()
    if sorted(positives) == sorted(negatives):
        raise ValueError("the positive and negative texts are the same texts, so they do not separate: give texts "
                         "with the concept and texts without it")
    S = text_max_acts(sae, lm, [*positives, *negatives], hook or sae_hook_name(sae))  # (n_texts, d_sae)
    return select_features(S, len(positives), feature_scales(sae, S, db), cfg)


def concept_json(result: ConceptResult, chosen: SteeringSet | None) -> dict:
    """``{"features": [...], "strength": x, ...}``: the dial's set and strength (without calibration: the detection
    set, strength None), the detection set and its classifier, the selection steps and the best-ranked features."""
    out = {"features": chosen.features if chosen else result.features,
           "strength": chosen.calibration.strength if chosen else None,
           "detection_features": result.features, "classifier": result.classifier.to_json(),
           "selection": result.steps, "ranking": result.ranking[:10]}
    if chosen:
        cal = chosen.calibration
        out["calibrated"] = cal.reached
        out["growth"] = chosen.growth
        out["sweep"] = [{"value": p.value, "concept_rate": p.concept_rate, "nll": p.nll, "repetition": p.repetition,
                         "example": p.answers[0].text if p.answers else ""} for p in cal.sweep]
    return out
