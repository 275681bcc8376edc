"""JumpReLU SAE trained with an L0 penalty through straight-through θ gradients (Rajamanoharan et al. 2024)."""

from __future__ import annotations

import torch

from saelab.arch.base import Architecture, StepStats, dense_step, register
from saelab.arch.rules import jumprelu, step


@register
class JumpReLU(Architecture):
    """z = pre · 1[pre > θ_i]; loss = mean‖x − x̂‖² + λ·L0, θ learned with a rectangle-kernel estimator."""

    name = "jumprelu"
    saved_name = "jumprelu"
    default_lr = 2e-4
    aux_metric = "l0_penalty"
    threshold_at_inference = True
    trains_threshold = True

    def train_activation(self, pre: torch.Tensor, sae, bandwidth: float) -> torch.Tensor:
        return jumprelu(pre, sae.threshold, bandwidth)

    def init(self, sae, cfg) -> None:
        sae.threshold.data.fill_(cfg.threshold_init)

    def loss(self, sae, params: dict, x: torch.Tensor, cfg, step_: int, dead: torch.Tensor) -> StepStats:
        pre = sae.pre_acts(x)                                         # (B, d_sae)
        z = jumprelu(pre, sae.threshold, cfg.bandwidth)
        penalty = step(pre, sae.threshold, cfg.bandwidth).sum(-1).mean()
        return dense_step(sae, x, z, penalty, self.sparsity_coefficient(cfg, step_))

    @torch.no_grad()
    def after_update(self, sae) -> None:
        super().after_update(sae)
        sae.threshold.clamp_(min=0.0)
