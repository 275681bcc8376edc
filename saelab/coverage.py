"""Concept coverage across dictionary sizes: which share of named concepts has a feature of its own.

A concept is given by example texts: ``NAME.pos.txt`` (texts with it) and ``NAME.neg.txt`` (texts without
it), one text per line, or ``NAME.pos.jsonl`` / ``NAME.neg.jsonl`` with one JSON string per line (for
texts spanning lines). For each concept and each SAE of a sweep:

1. every text is scored per feature by the feature's max activation over its tokens
   (:func:`saelab.concept.text_max_acts`: BOS first, sinks left out, as in analysis);
2. the texts are split once per concept (the same split for every size, ``holdout`` of each class held
   out, seeded), and the *best single feature* is the one with the highest training AUROC among those
   more active on the positive texts (:func:`saelab.concept.rank_features`);
3. its **held-out AUROC** ``P(score(pos) > score(neg)) + ½ P(tie)`` over the held-out texts is the
   concept's score at that size; the concept is **covered** when it is ``≥ threshold``.

The coverage of a size is the share of concepts covered. With few held-out texts the AUROC moves in
steps of ``1 / (n_pos_held · n_neg_held)``: give ≥ 12 texts per class.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from saelab.atomic import write_json
from saelab.concept import auroc1, rank_features, split
from saelab.corpus import bos_token_id
from saelab.family_io import load_members, read_sweep
from saelab.generation import prompt_ids
from saelab.hooks import run_to_hooks
from saelab.models import load_model
from saelab.positions import PositionRule
from saelab.provenance import Provenance, stage_inputs
from saelab.steer import sae_hook_name
from saelab.texts import read_texts

SUFFIXES = ((".pos.txt", ".neg.txt"), (".pos.jsonl", ".neg.jsonl"))
COVERAGE_FILE = "coverage.json"


@dataclass
class CoverageConfig:
    """How concept coverage is measured."""

    threshold: float = 0.9
    """Held-out AUROC at which a concept counts as covered by its best feature."""
    holdout: float = 0.3
    """Share of each class's texts held out to score the best feature."""
    seed: int = 0
    """Seed of the train/held-out split (the same split at every size)."""


class ConceptScore(NamedTuple):
    feature: int | None
    """Best feature by training AUROC (None: no feature is more active on the positive texts)."""
    train_auroc: float
    heldout_auroc: float


def read_concepts(folder: str | Path) -> dict[str, tuple[list[str], list[str]]]:
    """``{name: (positives, negatives)}`` from the NAME.pos.* / NAME.neg.* pairs in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no concept folder (expected NAME.pos.txt / NAME.neg.txt pairs)")
    out = {}
    for pos_suffix, neg_suffix in SUFFIXES:
        for pos in sorted(folder.glob("*" + pos_suffix)):
            name = pos.name[:-len(pos_suffix)]
            neg = folder / (name + neg_suffix)
            if not neg.is_file():
                raise FileNotFoundError(f"{pos}: has no negative texts beside it ({neg.name})")
            texts = read_texts(pos), read_texts(neg)
            if min(len(t) for t in texts) < 4:
                raise ValueError(f"concept {name!r} in {folder}: needs at least 4 positive and 4 negative texts, "
                                 f"got {len(texts[0])} and {len(texts[1])}")
            out[name] = texts
    if not out:
        raise ValueError(f"{folder}: no concepts (expected NAME.pos.txt / NAME.neg.txt pairs)")
    return dict(sorted(out.items()))


def best_feature(S: torch.Tensor, n_pos: int, cfg: CoverageConfig) -> ConceptScore:
    """Best feature on the training texts of ``S [n_texts, d_sae]`` (positives first) and its held-out AUROC."""
    rng = random.Random(cfg.seed)
    (tr_p, ho_p), (tr_n, ho_n) = split(n_pos, cfg.holdout, rng), split(S.shape[0] - n_pos, cfg.holdout, rng)
    ranked = rank_features(S, n_pos, (tr_p, tr_n), torch.ones(S.shape[1]), top=1)  # AUROC does not need scales
    if not ranked:
        return ConceptScore(None, 0.5, 0.5)
    f = ranked[0]["feature"]
    return ConceptScore(f, ranked[0]["auroc"], auroc1(S[:n_pos][ho_p, f], S[n_pos:][ho_n, f]))


@torch.no_grad()
def texts_max_acts(saes: Sequence, lm, texts: Sequence[str]) -> list[torch.Tensor]:
    """:func:`saelab.concept.text_max_acts` of every SAE at once: ``[n_texts, d_sae]`` per SAE, from one
    forward per text to the deepest of their hooks (SAEs at several depths share the pass)."""
    hooks = [sae_hook_name(sae) for sae in saes]
    rules = [PositionRule(bos_token_id(lm.tokenizer), Provenance.of(sae).sink_factor) for sae in saes]
    out: list[list[torch.Tensor]] = [[] for _ in saes]
    for text in texts:
        ids = prompt_ids(lm, text)                                                 # (1, n + 1), BOS first
        if ids.shape[1] < 2:
            raise ValueError(f"text {text[:40]!r} has no tokens")
        acts = run_to_hooks(lm.model, ids, sorted(set(hooks)))
        for i, (sae, hook, rule) in enumerate(zip(saes, hooks, rules)):
            x = acts[hook]                                                         # (1, n + 1, d_in)
            keep = rule.keep(ids, torch.linalg.vector_norm(x.float(), dim=-1))[0, 1:]   # (n,)
            z = sae.encode(x[0, 1:].to(sae.W_dec.device, torch.float32))          # (n, d_sae)
            z[~keep.to(z.device)] = 0
            out[i].append(z.max(0).values.cpu())
    return [torch.stack(rows) for rows in out]


def concept_coverage(lm, saes: Sequence, names: Sequence[str], concepts: dict[str, tuple[list[str], list[str]]],
                     cfg: CoverageConfig | None = None, progress=None) -> dict:
    """Per concept and size the best feature and its held-out AUROC; per size the share covered."""
    cfg = cfg or CoverageConfig()
    per: dict[str, list[dict]] = {}
    for c, (name, (pos, neg)) in enumerate(concepts.items()):
        per[name] = []
        for size, S in zip(names, texts_max_acts(saes, lm, [*pos, *neg])):     # (n_texts, d_sae) each
            best = best_feature(S, len(pos), cfg)
            per[name].append({"size": size, "feature": best.feature, "train_auroc": round(best.train_auroc, 4),
                              "heldout_auroc": round(best.heldout_auroc, 4)})
        if progress:
            progress(c + 1, len(concepts))
    covered = [sum(per[n][t]["heldout_auroc"] >= cfg.threshold for n in per) / len(per) for t in range(len(saes))]
    return {"format": "saelab-coverage", "version": 1, "threshold": cfg.threshold, "holdout": cfg.holdout,
            "seed": cfg.seed, "sizes": list(names), "covered": [round(v, 4) for v in covered], "concepts": per}


def sweep_coverage(paths: Sequence[str | Path], concepts_folder: str | Path, *, k: int | None = None,
                   model: str | None = None, config: CoverageConfig | None = None, progress=None) -> dict:
    """Concept coverage of a sweep folder (or SAE folders, smallest first) on the concepts in
    ``concepts_folder``; written as coverage.json into the sweep folder (``written`` says where)."""
    concepts = read_concepts(concepts_folder)
    sweep = read_sweep(paths, k)
    saes = load_members(sweep)
    lm = load_model(stage_inputs(saes[0], model=model).model_name)
    cov = concept_coverage(lm, saes, [m["name"] for m in sweep.members], concepts, config or CoverageConfig(),
                           progress=progress)
    if sweep.folder is not None:
        write_json(Path(sweep.folder) / COVERAGE_FILE, cov)
        cov["written"] = str(Path(sweep.folder) / COVERAGE_FILE)
    return cov
