"""Features of given texts: which fire on a text (inspect), which stand for a concept (contrastive search).

Both read a text the way the analysis pass reads the corpus (BOS first, forward to the SAE's hook,
then the SAE), one text at a time, and default the model and hook to the SAE's provenance.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from saelab.analyze import resolve_inputs
from saelab.hooks import run_to_hooks
from saelab.provenance import Provenance
from saelab.generation import prompt_ids


class TokenFeatures(NamedTuple):
    """One token of an inspected text and its strongest features."""

    pos: int
    """Index in the text's tokens (BOS excluded)."""
    token_id: int
    token: str
    """Exact token string (raw)."""
    features: list[tuple[int, float]]
    """``(feature, activation)``, strongest first (only active ones)."""


@torch.no_grad()
def text_residuals(sae, lm, text: str, hook: str, chat: bool = False) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Token ids of ``text`` (without the BOS the model sees first), their activations at ``hook`` ``[n, d_in]``
    and ``[n]`` bool: the positions the SAE's :class:`saelab.positions.PositionRule` keeps (not BOS, not sinks).

    The text is read as every stage reads a window: BOS first (``chat``: the user turn of the model's chat
    template)."""
    ids = prompt_ids(lm, text, chat=chat)                                      # (1, n + 1), BOS first
    if ids.shape[1] < 2:
        raise ValueError(f"text {text[:40]!r} has no tokens")
    x = run_to_hooks(lm.model, ids, hook)[hook]                                # (1, n + 1, d_in)
    rule = Provenance.of(sae).position_rule(lm.tokenizer)                     # the SAE's own rule
    keep = rule.keep(ids, torch.linalg.vector_norm(x.float(), dim=-1))[0, 1:]  # (n,)
    return ids[0, 1:].tolist(), x[0, 1:].float(), keep


@torch.no_grad()
def text_latents(sae, lm, text: str, hook: str, chat: bool = False) -> tuple[list[int], torch.Tensor]:
    """Token ids of ``text`` (without the BOS the model sees first) and their latents ``[n_tokens, d_sae]``;
    the positions :class:`saelab.positions.PositionRule` leaves out — BOS tokens and attention sinks — get no
    latents (all zero), as in training and analysis (:func:`text_residuals`)."""
    ids, x, keep = text_residuals(sae, lm, text, hook, chat)
    z = sae.encode(x.to(sae.W_dec.device, torch.float32))                     # (n, d_sae)
    z[~keep.to(z.device)] = 0
    return ids, z


def inspect_text(sae, model=None, text: str = "", top: int = 5, hook: str | None = None,
                 chat: bool = False) -> list[TokenFeatures]:
    """Per token of ``text`` (exact token strings), the ``top`` most active features and their activations
    (``chat``: the text is a user message in the model's chat template, whose tokens are listed too)."""
    setup = resolve_inputs(sae, model, "stdlib", hook)
    ids, z = text_latents(setup.sae, setup.lm, text, setup.hook, chat=chat)
    vals, feats = z.topk(min(top, z.shape[1]), dim=1)
    strings = [setup.lm.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    return [TokenFeatures(p, i, s, [(f, v) for f, v in zip(fr, vr) if v > 0])
            for p, (i, s, fr, vr) in enumerate(zip(ids, strings, feats.tolist(), vals.tolist()))]


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Per column, P(a positive score > a negative one) + ½ P(tie): ``pos [p, d]``, ``neg [q, d]`` → ``[d]``."""
    gt = (pos[:, None, :] > neg[None, :, :]).float().mean((0, 1))
    eq = (pos[:, None, :] == neg[None, :, :]).float().mean((0, 1))
    return gt + 0.5 * eq


def contrastive_search(sae, model=None, positives: Sequence[str] = (), negatives: Sequence[str] = (), top: int = 20,
                       hook: str | None = None) -> list[dict]:
    """Features whose activation separates ``positives`` from ``negatives`` texts, best first.

    Each text is scored per feature by its max activation over the text's tokens. Features are ranked by
    the AUROC of those scores (positive vs negative texts; 1 = every positive text beats every negative
    one), ties broken by the difference of mean max activation, relative to the feature's largest score
    (so strong and weak features compare fairly). Each hit: feature, auroc, mean_pos, mean_neg, diff.
    """
    if not positives or not negatives:
        raise ValueError(f"contrastive search needs positive and negative texts; got {len(positives)} positive "
                         f"and {len(negatives)} negative")
    setup = resolve_inputs(sae, model, "stdlib", hook)
    scores = [text_latents(setup.sae, setup.lm, t, setup.hook)[1].max(0).values for t in [*positives, *negatives]]
    S = torch.stack(scores).cpu()  # (n_texts, d_sae)
    P, N = S[:len(positives)], S[len(positives):]
    au = torch.cat([auroc(P[:, i:i + 2048], N[:, i:i + 2048]) for i in range(0, S.shape[1], 2048)])
    mp, mn = P.mean(0), N.mean(0)
    rel = (mp - mn) / S.max(0).values.clamp_min(1e-12)
    order = sorted(range(S.shape[1]), key=lambda f: (-float(au[f]), -float(rel[f])))
    hits = [f for f in order if float(mp[f] - mn[f]) > 0][:top]
    return [{"feature": f, "auroc": float(au[f]), "mean_pos": float(mp[f]), "mean_neg": float(mn[f]),
             "diff": float(mp[f] - mn[f]), "relative_diff": float(rel[f])} for f in hits]
