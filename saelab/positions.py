"""Which positions of a window the SAE stages leave out: one rule for harvest, eval, analysis and steering.

Real models park attention on a few positions whose residual stream is enormous ("attention sinks"):
on SmolLM2-135M-Instruct at layer 15 the first position of every window has a norm of ~25,000 against
a median of ~175, and about one window in ten has a second sink among the next few tokens (a rare
first word, a line of box-drawing characters: 2,000-27,000). An SAE that trains on them spends its
capacity on a handful of rows (143 such rows in 407k carried as much squared norm as all the rest);
an evaluation that splices them measures the damage of moving the sink, not the SAE; a feature
mined from them is the artifact. So every stage leaves out the same positions:

- every position holding the BOS token (every window starts with one, see :mod:`saelab.corpus`;
  documents are separated by it), when ``exclude_bos``;
- every position whose norm at the hook exceeds ``sink_factor`` × the median norm of the other
  positions of its window (the BOS ones left aside). A window's own median, not a batch's or the
  store's, so that the same text gives the same answer in every stage, alone or in a batch.

The rule is recorded in the store's manifest (``positions``), copied into the SAE's provenance, and
rebuilt from there by :meth:`PositionRule.of`. On SmolLM2 the ratio has a gap: 157 rows above 2×, 152
above 5×, 142 above 10× of 407k; :data:`SINK_FACTOR` is 5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINK_FACTOR = 5.0
"""Default: a position more than this many times its window's median norm is a sink."""


@dataclass(frozen=True)
class PositionRule:
    """The positions left out of SAE training, evaluation, mining and steering."""

    bos_id: int | None
    """Positions holding this token id are left out (None: BOS positions are kept)."""
    sink_factor: float | None
    """Positions with norm > this × the median norm of their window are left out (None: no norm rule)."""

    def to_json(self) -> dict:
        return {"bos_token_id": self.bos_id, "exclude_bos": self.bos_id is not None, "sink_factor": self.sink_factor}

    @classmethod
    def of(cls, provenance, bos_id: int) -> "PositionRule":
        """The rule an SAE was trained under (:class:`saelab.provenance.Provenance`), for a tokenizer's BOS."""
        return cls(bos_id if provenance.exclude_bos else None, provenance.sink_factor)

    def keep(self, ids: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: True where a position counts, from token ids and activation norms (both ``[B, T]``)."""
        keep = ids != self.bos_id if self.bos_id is not None else torch.ones_like(ids, dtype=torch.bool)
        if self.sink_factor is None:
            return keep
        return keep & ~(norms > self.sink_factor * window_median(norms, keep))

    def sinks(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: of the positions :meth:`keep` left out (its result ``keep``), those left out
        by the norm rule alone (not BOS): the window medians are not computed twice."""
        bos = ids == self.bos_id if self.bos_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        return ~bos & ~keep


def window_median(norms: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` median of each row of ``norms [B, T]`` over its ``counted`` positions (the lower middle
    value for an even count, as torch's median; inf for a row with none)."""
    masked = torch.where(counted, norms.float(), torch.nan)
    med = masked.nanmedian(dim=1, keepdim=True).values                     # (B, 1); NaN for empty rows
    return torch.nan_to_num(med, nan=float("inf"))
