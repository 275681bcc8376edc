"""Which features *write* a concept: its tokens, and a cheap causal screen of many candidates at once.

The screen (:func:`screen_writers`) turns one candidate up per batch row, on a few prompts with their default
answers teacher-forced (no generation), and measures how much more probability the model puts on the concept's
tokens (:func:`concept_tokens`) at the positions that predict the answer. A feature that only *detects* the
concept (a token feature of " Gate") lifts nothing; one that writes it lifts the concept's tokens everywhere.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from typing import Sequence

import torch

from saelab.steer import max_activations, sae_hook_name
from saelab.hooks import intervene


def _words(tok, text: str) -> set[int]:
    return set(tok(text, add_special_tokens=False)["input_ids"])


def concept_tokens(tok, positives: Sequence[str], negatives: Sequence[str], keywords: Sequence[str] = (),
                   k: int = 24, min_share: float = 0.25) -> list[int]:
    """Token ids that stand for the concept: each keyword's first token (as written, capitalised, after a space),
    then the tokens in at least ``min_share`` of the positive texts and in none of the negative ones, most
    frequent first, alphabetic tokens of 3+ letters only (not punctuation or pieces of words); ``k`` at most."""
    out: list[int] = []
    for kw in keywords:
        for form in {kw, kw.capitalize(), " " + kw, " " + kw.capitalize(), kw.lower(), " " + kw.lower()}:
            ids = tok(form, add_special_tokens=False)["input_ids"]
            if ids and ids[0] not in out:
                out.append(ids[0])
    pos = Counter(t for text in positives for t in _words(tok, text))
    neg = Counter(t for text in negatives for t in _words(tok, text))
    for t, n in pos.most_common():
        piece = tok.decode([t]).strip()
        if n < min_share * len(positives) or len(out) >= k:
            break
        if neg[t] == 0 and t not in out and re.fullmatch(r"[A-Za-z]{3,}", piece):
            out.append(t)
    if not out:
        raise ValueError("no token stands for the concept (none is frequent in the positive texts and absent from the "
                         "negative ones): give keywords, or texts where the concept is plainer")
    return out[:k]


class RowEdit:
    """Row b of the batch edits feature ``features[b]``: clamps it to ``targets[b]`` (error term kept), at every
    real position but the first of a text (BOS, the attention sink steering never edits) and the right padding.
    ``from_start=False``: the call continues cached text, so its first position is no BOS and is edited too."""

    def __init__(self, sae, features: Sequence[int], targets: torch.Tensor, mask: torch.Tensor | None = None,
                 from_start: bool = True):
        self.enc = sae.subset_encoder(list(features))
        self.W = sae.W_dec.detach()[list(features)].float()  # (B, d_in)
        self.targets = targets  # (B,)
        self.rows = torch.arange(len(features))
        self.mask = mask  # (B, seq) 1 on real tokens, or None
        self.from_start = from_start

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, seq, d_in)
        z = self.enc(x.float())[self.rows, :, self.rows]  # (B, seq) each row's own feature
        coef = self.targets[:, None] - z  # (B, seq)
        if x.shape[1] > 1 and self.from_start:  # a forward from the text's start: position 0 is BOS
            coef[:, 0] = 0.0
        if self.mask is not None and self.mask.shape == coef.shape:
            coef = coef * self.mask
        return x + (coef[..., None] * self.W[:, None, :]).to(x.dtype)


@torch.no_grad()
def concept_logmass(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``logits [..., vocab]`` → ``[...]`` the log of the probability on the concept's ``tokens``."""
    logp = logits.float().log_softmax(-1)
    return logp[..., tokens].logsumexp(-1)


@torch.no_grad()
def screen_writers(lm, sae, candidates: Sequence[int], prompts: Sequence[torch.Tensor], answers: Sequence[torch.Tensor],
                   tokens: Sequence[int], strength: float, *, max_act=None, db=None, batch: int = 32) -> list[float]:
    """Per candidate, the mean lift (nats) of :func:`concept_logmass` over the positions that predict each answer
    token, with the candidate clamped to ``strength`` × its max activation at those positions (the prompt's last
    one and the answer's: the prompt before them is read once, unsteered, and its KV cache shared by every
    row), against unsteered; over ``prompts [1, n_i]`` with their ``answers [m_i]`` teacher-forced."""
    if not candidates:
        return []
    hook = sae_hook_name(sae)
    maxes = max_activations(sae, list(candidates), max_act, db)
    toks = torch.tensor(list(tokens), device=prompts[0].device)
    lifts = torch.zeros(len(candidates))
    for ids, answer in zip(prompts, answers):
        prefix = lm.model(input_ids=ids[:, :-1], use_cache=True).cache  # the prompt, unsteered
        tail = torch.cat([ids[0, -1:], answer])[None, :-1] if len(answer) else ids[:, -1:]  # (1, m) predicts answer
        full = torch.ones(1, ids.shape[1] - 1 + tail.shape[1], dtype=torch.long, device=ids.device)

        def run(rows: int, hook_fn=None) -> torch.Tensor:  # (rows,) mean log-mass over the answer's positions
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(rows)
            with intervene(lm.model, {hook: hook_fn} if hook_fn else {}):
                logits = lm.model(input_ids=tail.expand(rows, -1), attention_mask=full.expand(rows, -1),
                                  cache=cache, use_cache=True).logits  # (rows, m, vocab)
            return concept_logmass(logits, toks).mean(1)

        base = run(1)[0]
        for s in range(0, len(candidates), batch):
            chunk = list(candidates)[s:s + batch]
            targets = torch.tensor([strength * maxes[f] for f in chunk])
            lifts[s:s + len(chunk)] += (run(len(chunk), RowEdit(sae, chunk, targets, from_start=False)) - base).cpu()
    return (lifts / len(prompts)).tolist()
