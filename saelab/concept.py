"""Name a concept by examples, get the features that *write* it and a calibrated dial.

1. **Rank** every feature by how well its activation separates positive from negative texts: each text is
   scored by the feature's max activation over its tokens (the concept shows somewhere in a positive
   text, not at every token), and features are ranked by the AUROC of those scores on a training split.
2. **Detect**: a small set by forward selection: at each step add the candidate that most improves the set's
   separation on the training split, and keep it only if the separation on a *held-out* split improves
   too (AUROC by ``min_gain``, or d′ by ``min_rel_gain`` at no loss of AUROC). The set's score of a text
   is the mean of its features' normalised max activations (:class:`saelab.measures.ConceptClassifier`):
   the concept's classifier, used to *read* answers, not to write them.
3. **Find writers** (:func:`find_writers`): a feature that detects a concept need not write it (a ` Gate`
   token feature fires on every positive text and, turned up, writes nothing about the bridge). Candidates
   come from the detection ranking, from the features whose explanation matches the concept's words
   (features.db search) and from the detection set; each is *turned up* on a few calibration prompts, one
   feature per batch row, with the prompt's default answer teacher-forced, and scored by the lift in the
   log-probability the model puts on the concept's tokens (:func:`concept_tokens`) over the answer's
   positions (a cheap causal screen, :func:`screen_writers`). Writers are ranked by that lift; detection
   AUROC breaks ties and vetoes features that fire *less* on the concept (AUROC < ``min_auroc``).
4. **Calibrate** (:func:`calibrate_writers`): the dial's set is the best 1, 2, 4 … writers, and the search runs
   over set size × mode (clamp in × max activation, add in × residual norm) × strength on the calibration
   prompts; the winner is the smallest strength of the best (size, mode) whose concept rate reaches
   ``target_rate`` at acceptable fluency (:func:`saelab.measures.is_fluent`), else the highest fluent rate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from saelab.formats import feature_max_activations
from saelab.measures import (ConceptClassifier, DialValue, Judge, dial_point, encode_prompt, generate_batch,
                             is_fluent)
from saelab.measures import fit_threshold
from saelab.steer import DialSpec, sae_hook_name
from saelab.textfeatures import auroc, text_latents
from saelab.writers import concept_tokens, screen_writers


@dataclass
class ConceptConfig:
    """How features are selected for a concept and how its dial is calibrated."""

    holdout: float = 0.3
    """Share of each class's texts held out to decide whether a feature joins the set."""
    candidates: int = 24
    """Best-ranked features (by training AUROC) that forward selection considers."""
    ranking_size: int = 64
    """Best-ranked features kept (the screen's first candidates)."""
    max_features: int = 8
    """Upper bound on the set's size (selection usually stops before)."""
    min_gain: float = 0.01
    """Held-out AUROC gain that admits a feature."""
    min_rel_gain: float = 0.1
    """Relative held-out d′ gain that admits a feature when the AUROC does not fall."""
    clamp_values: tuple[float, ...] = (2.0, 4.0, 8.0)
    """Clamp strengths (× each feature's max activation) of the calibration search."""
    add_values: tuple[float, ...] = (0.25, 0.5, 1.0)
    """Add strengths (× the residual norm at the position, along the set's direction) of the calibration search."""
    modes: tuple[str, ...] = ("clamp", "add")
    """Edit modes the calibration searches."""
    sizes: tuple[int, ...] = (1, 2, 4)
    """Set sizes (best writers first) the calibration searches."""
    target_rate: float = 0.8
    """Concept rate the calibration aims for."""
    max_fluency_ratio: float = 1.5
    """Fluency: the steered answers' prompt-free NLL may be at most this multiple of the default answers'."""
    max_degenerate: float = 0.1
    """Fluency: at most this share of degenerate answers beyond the default's."""
    max_new_tokens: int = 32
    """Tokens per answer in the calibration search (greedy)."""
    seed: int = 0
    """Seed of the train/held-out split."""
    keywords: list[str] = field(default_factory=list)
    """If given, an answer is on concept when it contains one of them (instead of the feature classifier)."""
    screen_candidates: int = 32
    """Candidates the causal screen turns up (detection ranking first, then explanation search)."""
    screen_strength: float = 4.0
    """Clamp strength (× max activation) of the causal screen."""
    screen_prompts: int = 4
    """Calibration prompts the screen reads (with their default answers, teacher-forced)."""
    screen_tokens: int = 12
    """Tokens of each default answer the screen reads after the prompt."""
    min_lift: float = 0.01
    """A candidate writes the concept when the screen lifts its tokens' log-probability by more than this (nats)."""
    min_auroc: float = 0.5
    """A candidate whose detection AUROC is below this fires less on the concept: vetoed."""


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
    ranking = rank_features(S, n_pos, (tr_p, tr_n), scales, max(cfg.candidates, cfg.ranking_size))
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
    pool = [r["feature"] for r in ranking[1:cfg.candidates]]
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
    spec: DialSpec
    strength: float
    reached: bool
    """Whether ``strength`` reaches the target concept rate at acceptable fluency."""
    sweep: list[DialValue]
    """The default, then this spec's strengths."""
    search: list[dict]
    """Every (size, mode) tried: features, mode, unit, strength picked, its fluent concept rate, reached."""


def pick_strength(sweep: Sequence[DialValue], cfg: ConceptConfig) -> tuple[float, bool, float]:
    """(strength, reached, fluent rate): the smallest fluent value reaching the target rate, else the fluent value
    with the highest rate (rate 0 when none is fluent: then the smallest value)."""
    default, points = sweep[0], list(sweep[1:])
    fluent = [p for p in points if is_fluent(p, default, cfg.max_fluency_ratio, cfg.max_degenerate)]
    good = [p for p in fluent if p.concept_rate >= cfg.target_rate]
    if good:
        best = min(good, key=lambda p: p.value)
        return best.value, True, best.concept_rate
    if fluent:
        best = max(fluent, key=lambda p: (p.concept_rate, -p.value))
        return best.value, False, best.concept_rate
    return min(p.value for p in points), False, 0.0


def judge_of(result: "ConceptResult", cfg: ConceptConfig) -> Judge:
    return Judge(result.classifier, cfg.keywords)


def calibrate_writers(lm, sae, writers: Sequence[int], prompts: Sequence[str], judge: Judge, cfg: ConceptConfig, *,
                      chat: bool = False, db=None, max_act=None, progress=None) -> Calibration:
    """Search set size × mode × strength on ``prompts`` (module docstring, step 4); stop at the first (size, mode)
    that reaches the target at acceptable fluency."""
    if not writers:
        raise ValueError("no candidate writes the concept (no feature raised the concept's tokens when turned up): "
                         "give texts where the concept is plainer, or keywords")
    encoded = [encode_prompt(lm, p, chat, cfg.max_new_tokens) for p in prompts]
    run = lambda spec, v: dial_point(lm, sae, spec, v, encoded, judge, chat=chat,  # noqa: E731
                                     max_new_tokens=cfg.max_new_tokens, max_act=max_act, db=db)
    default = run(None, None)
    grid = [(n, m) for n in sorted({min(n, len(writers)) for n in cfg.sizes}) for m in cfg.modes]
    best, best_rate, search, done = None, 0.0, [], 0
    for n, mode in grid:
        spec = DialSpec(tuple(writers[:n]), mode, "norm" if mode == "add" else "max")
        sweep = [default]
        for v in (cfg.add_values if mode == "add" else cfg.clamp_values):
            sweep.append(run(spec, v))
            done += 1
            if progress:
                progress(done, sum(len(cfg.add_values if m == "add" else cfg.clamp_values) for _, m in grid))
            if sweep[-1].concept_rate >= cfg.target_rate and is_fluent(sweep[-1], default, cfg.max_fluency_ratio,
                                                                        cfg.max_degenerate):
                break  # larger strengths only cost fluency
        strength, reached, rate_ = pick_strength(sweep, cfg)
        search.append({"features": list(spec.features), "mode": mode, "unit": spec.unit, "strength": strength,
                       "rate": rate_, "reached": reached})
        if best is None or (reached, rate_) > (best.reached, best_rate):
            best, best_rate = Calibration(spec, strength, reached, sweep, search), rate_
        if reached:
            break
    return best._replace(search=search)


class WriterSet(NamedTuple):
    writers: list[dict]
    """Screened candidates, best writer first: feature, lift, detection AUROC (None if not ranked), source."""
    concept_tokens: list[int]
    calibration: Calibration | None


def find_writers(lm, sae, result: "ConceptResult", positives: Sequence[str], negatives: Sequence[str],
                 prompts: Sequence[str], cfg: ConceptConfig, *, chat: bool = False, db=None, max_act=None,
                 calibrate: bool = True, progress=None, judge: Judge | None = None,
                 token_words: Sequence[str] | None = None) -> WriterSet:
    """Screen candidates by what they write, then calibrate the best (module docstring, steps 3-4). ``judge``:
    what puts a calibration answer on concept (default: the keywords, else the classifier); ``token_words``: words
    whose tokens stand for the concept (default: the keywords)."""
    words = list(cfg.keywords if token_words is None else token_words)
    auroc_of = {r["feature"]: r["auroc"] for r in result.ranking}
    source = {f: "detection" for f in result.features}
    if db is not None:  # explanation search before the long tail of the ranking: they are few and named
        for word in words:
            for hit in db.search(word, limit=8):
                source.setdefault(int(hit["id"]), "explanation")
    for r in result.ranking:
        source.setdefault(r["feature"], "ranking")
    cands = [f for f in source if auroc_of.get(f, 1.0) >= cfg.min_auroc][:cfg.screen_candidates]
    tokens = concept_tokens(lm.tokenizer, positives, negatives, words)
    encoded = [encode_prompt(lm, p, chat, cfg.screen_tokens) for p in prompts[:cfg.screen_prompts]]
    answers = [rows[0] for rows in generate_batch(lm, encoded, max_new_tokens=cfg.screen_tokens, temperature=0.0)]
    lifts = screen_writers(lm, sae, cands, encoded, answers, tokens, cfg.screen_strength, max_act=max_act, db=db)
    order = sorted(range(len(cands)), key=lambda i: (-lifts[i], -auroc_of.get(cands[i], 0.0)))
    writers = [{"feature": cands[i], "lift": lifts[i], "auroc": auroc_of.get(cands[i]), "source": source[cands[i]]}
               for i in order]
    if not calibrate:
        return WriterSet(writers, tokens, None)
    good = [w["feature"] for w in writers if w["lift"] > cfg.min_lift]
    cal = calibrate_writers(lm, sae, good, prompts, judge or judge_of(result, cfg), cfg, chat=chat, db=db,
                            max_act=max_act, progress=progress)
    return WriterSet(writers, tokens, cal)


def find_concept(lm, sae, positives: Sequence[str], negatives: Sequence[str], cfg: ConceptConfig | None = None, *,
                 hook: str | None = None, db=None) -> ConceptResult:
    """Rank features on the texts and select the concept's set (no generation)."""
    cfg = cfg or ConceptConfig()
    if sorted(positives) == sorted(negatives):
        raise ValueError("the positive and negative texts are the same texts, so they do not separate: give texts "
                         "with the concept and texts without it")
    S = text_max_acts(sae, lm, [*positives, *negatives], hook or sae_hook_name(sae))  # (n_texts, d_sae)
    return select_features(S, len(positives), feature_scales(sae, S, db), cfg)


def concept_json(result: ConceptResult, writers: WriterSet | None) -> dict:
    """The dial (features, mode, unit, strength; without calibration: the detection set, strength None), the
    detection set and its classifier, the screened writers, the calibration search and the best-ranked features."""
    cal = writers.calibration if writers else None
    out = {"features": list(cal.spec.features) if cal else result.features,
           "mode": cal.spec.mode if cal else "clamp", "unit": cal.spec.unit if cal else "max",
           "strength": cal.strength if cal else None, "detection_features": result.features,
           "classifier": result.classifier.to_json(), "selection": result.steps, "ranking": result.ranking[:10]}
    if writers:
        out["writers"] = writers.writers[:12]
        out["concept_tokens"] = writers.concept_tokens
    if cal:
        out["calibrated"] = cal.reached
        out["search"] = cal.search
        out["sweep"] = [point_json(p) for p in cal.sweep]
    return out


def point_json(p: DialValue, answers: bool = False) -> dict:
    out = {"value": p.value, "concept_rate": p.concept_rate, "fluency_nll": p.fluency_nll,
           "relevance_nll": p.relevance_nll, "repetition": p.repetition, "degenerate": p.degenerate,
           "example": p.answers[0].text if p.answers else ""}
    if answers:
        out["answers"] = [a.text for a in p.answers]
    return out
