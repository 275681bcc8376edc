"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose nested prefixes of the
dictionary must each reconstruct the input on their own.

With prefix ends w_1 < w_2 < … < w_m = d_sae, the loss is

    Σ_j mean‖x − (b_dec + Σ_{i < w_j} z_i W_dec,i)‖²  +  α·AuxK

so the first latents learn the broad directions a small dictionary would, and later ones cannot absorb
them (feature absorption). The latents, their selection and the inference JumpReLU are BatchTopK's, so
the saved SAE is the same kind (SAELens saves it as jumprelu too). The prefix losses need the dense
latents, so the step runs through autograd rather than BatchTopK's hand-written sparse gradients.
"""

from __future__ import annotations

import torch

from saelab.arch.base import StepStats, register
from saelab.arch.rules import batch_topk_dense
from saelab.arch.topk import BatchTopK


def default_widths(d_sae: int) -> list[int]:
    """d_sae/8, d_sae/4, d_sae/2, d_sae (fewer when d_sae is too small to halve)."""
    return sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})


def check_widths(widths, d_sae: int) -> list[int]:
    """Prefix ends, strictly increasing within 1..d_sae; d_sae is added as the last when missing."""
    widths = [int(w) for w in widths]
    if not widths or any(not 1 <= w <= d_sae for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"matryoshka_widths must increase strictly within 1..d_sae ({d_sae}), got {widths}")
    return widths if widths[-1] == d_sae else [*widths, d_sae]


def dense_auxk(pre: torch.Tensor, residual: torch.Tensor, W_dec: torch.Tensor, dead: torch.Tensor,
               k_aux: int) -> torch.Tensor:
    """AuxK (Gao et al. §A.2): the k_aux largest dead latents of each token reconstruct ``residual``
    ``[B, d_in]`` (x − x̂, detached); mean over tokens of ‖e − ê‖² (0 without dead latents)."""
    dead_idx = dead.nonzero().squeeze(1)                                      # (n_dead,)
    if dead_idx.numel() == 0:
        return torch.zeros((), device=pre.device)
    pre_d = pre.index_select(1, dead_idx)                                     # (B, n_dead)
    vals, j = pre_d.topk(min(k_aux, dead_idx.numel()), dim=1, sorted=False)
    z_aux = torch.zeros_like(pre_d).scatter(1, j, vals.clamp_min(0))
    return (z_aux @ W_dec.index_select(0, dead_idx) - residual).pow(2).sum(1).mean()


@register
class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK with a reconstruction loss for every nested prefix of the dictionary."""

    name = "matryoshka_batchtopk"
    saelens_training_name = "matryoshka_batchtopk"
    hand_gradients = False

    def resolve(self, cfg, d_in: int, d_sae: int) -> dict:
        widths = cfg.matryoshka_widths or default_widths(d_sae)
        return {**super().resolve(cfg, d_in, d_sae), "matryoshka_widths": check_widths(widths, d_sae)}

    def loss(self, sae, params: dict, x: torch.Tensor, cfg, step: int, dead: torch.Tensor) -> StepStats:
        pre = sae.pre_acts(x)                                                 # (B, d_sae)
        z = batch_topk_dense(pre, cfg.k)                                      # (B, d_sae)
        x_hat, start, prefix_err = sae.b_dec.expand_as(x), 0, []
        for end in cfg.matryoshka_widths:
            x_hat = x_hat + z[:, start:end] @ sae.W_dec[start:end]           # (B, d_in) prefix reconstruction
            prefix_err.append((x_hat - x).pow(2).sum())
            start = end
        aux = dense_auxk(pre, (x - x_hat).detach(), sae.W_dec, dead, cfg.k_aux)
        loss = torch.stack(prefix_err).sum() / x.shape[0] + cfg.auxk_alpha * aux
        loss.backward()
        z = z.detach()
        on = z > 0
        min_kept = z[on].min() if bool(on.any()) else torch.tensor(float("inf"), device=x.device)
        return StepStats(prefix_err[-1].detach(), loss.detach(), aux.detach(), on.sum().float(), on.sum(0).float(),
                         min_kept)

    def flops_per_token(self, d_in: int, d_sae: int, k: int | None, k_aux: int | None) -> float:
        """Dense: encoder, decoder (its prefixes share the partial sums) and their gradients, plus AuxK."""
        return float(12 * d_in * d_sae + 4 * d_in * min(k_aux or 0, d_sae))
