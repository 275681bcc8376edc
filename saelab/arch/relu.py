"""ReLU SAE trained with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from saelab.arch.base import Architecture, StepStats, dense_step, register


@register
class ReLU(Architecture):
    """z = ReLU(pre); loss = mean‖x − x̂‖² + λ·Σ_i z_i‖W_dec,i‖; decoder free, started at norm 0.1."""

    name = "relu"
    saved_name = "standard"
    default_lr = 1e-4
    aux_metric = "l1_penalty"
    unit_norm_decoder = False
    resamples_dead = True
    decoder_init_norm = 0.1  # Anthropic (April 2024 update): small decoder norms, unconstrained afterwards

    def activation(self, pre: torch.Tensor, threshold: torch.Tensor, k: int | None) -> torch.Tensor:
        return F.relu(pre)

    def penalty_base(self, cfg) -> float:
        return cfg.l1_coefficient

    def loss(self, sae, params: dict, x: torch.Tensor, cfg, step: int, dead: torch.Tensor) -> StepStats:
        z = F.relu(sae.pre_acts(x))                                   # (B, d_sae)
        penalty = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
        return dense_step(sae, x, z, penalty, self.sparsity_coefficient(cfg, step))
