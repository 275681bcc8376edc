"""The baselines an SAE dial must beat, measured on the same prompts with the same measures.

- **Difference of means** (:func:`difference_of_means`): the mean residual at the SAE's hook over the positive
  texts' tokens minus the mean over the negative texts' tokens — every token pooled, the positions the SAE's
  position rule leaves out (BOS, attention sinks) excluded, as in training. Added as a steering vector in units
  of the residual norm (:class:`saelab.steer.VectorAdd`, ``x_t ↦ x_t + s·‖x_t‖·d/‖d‖``) with the same strength
  search as the SAE dial (AxBench's strongest simple baseline; Im & Li 2025).
- **Prompting** (:func:`prompted`): the concept stated as an instruction, in the system turn or before the user's
  message; the answers are read back under the plain prompt, so relevance is measured against the question.
"""

from __future__ import annotations

from typing import Sequence

import torch

from saelab.measures import encode_prompt
from saelab.steer import DialSpec, sae_hook_name
from saelab.textfeatures import text_residuals

PROMPT_PLACES = ("system", "user")


@torch.no_grad()
def mean_residual(lm, sae, texts: Sequence[str], hook: str | None = None, chat: bool = False) -> torch.Tensor:
    """``[d_in]`` the mean activation at the SAE's hook over every kept token position of ``texts``."""
    name = hook or sae_hook_name(sae)
    total, count = None, 0
    for text in texts:
        _, x, keep = text_residuals(sae, lm, text, name, chat)  # (n, d_in), (n,)
        part = x[keep.to(x.device)].sum(0)  # (d_in,)
        total = part if total is None else total + part
        count += int(keep.sum())
    if not count:
        raise ValueError(f"no token of the {len(texts)} texts is kept by the SAE's position rule: give longer texts")
    return total / count


def difference_of_means(lm, sae, positives: Sequence[str], negatives: Sequence[str], *, hook: str | None = None,
                        chat: bool = False) -> torch.Tensor:
    """``[d_in]`` mean residual over the positive texts' tokens minus the mean over the negative texts' tokens at
    the SAE's hook (BOS and sinks left out by the SAE's position rule). Export it, or steer with
    :func:`dom_spec`."""
    if not positives or not negatives:
        raise ValueError(f"a difference of means needs positive and negative texts; got {len(positives)} and "
                         f"{len(negatives)}")
    return mean_residual(lm, sae, positives, hook, chat) - mean_residual(lm, sae, negatives, hook, chat)


def dom_spec(vector: torch.Tensor, positions: str = "all") -> DialSpec:
    """The dial that adds ``vector`` in units of the residual norm."""
    return DialSpec(mode="vector", unit="norm", positions=positions,
                    direction=tuple(float(v) for v in vector.float().cpu()))


def prompted(lm, prompts: Sequence[str], instruction: str, where: str = "system", chat: bool = False,
             max_new_tokens: int = 0) -> list[torch.Tensor]:
    """Each prompt encoded with ``instruction`` in the system turn (``"system"``), or before the user's message in
    the same turn (``"user"``)."""
    if where not in PROMPT_PLACES:
        raise ValueError(f"unknown place {where!r} for the instruction: choose 'system' or 'user'")
    if where == "system":
        return [encode_prompt(lm, p, chat, max_new_tokens, system=instruction) for p in prompts]
    return [encode_prompt(lm, f"{instruction}\n\n{p}", chat, max_new_tokens) for p in prompts]
