"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024): k active latents per token, or k·batch over
the batch; trained with exact sparse gradients (:mod:`saelab.arch.sparse`) plus AuxK on dead latents."""

from __future__ import annotations

import torch

from saelab.arch.base import Architecture, StepStats, register
from saelab.arch.rules import batch_topk_dense, topk_latents
from saelab.arch.sparse import SparseCode, batchtopk_code, index_sum, sparse_grads, topk_code


class _KSparse(Architecture):
    """What TopK and BatchTopK share: k, AuxK, the sparse step, unit-norm decoder rows."""

    default_lr = 2e-3  # best of 4e-4/2e-3 on a 1.4M-token builtin run
    needs_k = True
    hand_gradients = True

    def code(self, pre: torch.Tensor, k: int) -> SparseCode:
        raise NotImplementedError

    def loss(self, sae, params: dict, x: torch.Tensor, cfg, step: int, dead: torch.Tensor) -> StepStats:
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)     # (B, d_sae): the one dense product
            code = self.code(pre, cfg.k)
        out = sparse_grads(sae, x, code, dead, cfg.k_aux, cfg.auxk_alpha)
        for name, g in out.grads.items():
            p = params[name]
            p.grad = g if g.shape == p.shape else g.t()
        on = code.val > 0
        fired = index_sum(code.col, on.float(), sae.d_sae)
        min_kept = code.val[on].min() if bool(on.any()) else torch.tensor(float("inf"), device=x.device)
        loss = out.err_sq / x.shape[0] + cfg.auxk_alpha * out.aux
        return StepStats(out.err_sq, loss, out.aux, on.sum().float(), fired, min_kept)

    def flops_per_token(self, d_in: int, d_sae: int, k: int | None, k_aux: int | None) -> float:
        """The dense encoder product, the k-sparse decoder and its gradients, and AuxK on the dead latents."""
        return float(2 * d_in * d_sae + 6 * d_in * (k or 0) + 4 * d_in * min(k_aux or 0, d_sae))


@register
class TopK(_KSparse):
    """z = the k largest of ReLU(pre) per token."""

    name = "topk"
    saved_name = "topk"
    ranks_per_token = True

    def activation(self, pre: torch.Tensor, threshold: torch.Tensor, k: int | None) -> torch.Tensor:
        vals, idx = topk_latents(pre, k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def subset_activation(self, pre: torch.Tensor, idx: torch.Tensor, threshold: torch.Tensor,
                          k: int | None) -> torch.Tensor:
        kth = pre.topk(k, dim=-1).values[:, -1:]  # (positions, 1) the k-th largest pre-activation
        sel = pre[:, idx]  # (positions, n)
        return torch.where(sel >= kth, sel.clamp_min(0.0), 0.0)

    def code(self, pre: torch.Tensor, k: int) -> SparseCode:
        return topk_code(pre, k)


@register
class BatchTopK(_KSparse):
    """In training the k·batch largest of ReLU(pre) over the batch; at inference a JumpReLU with the one
    threshold θ learned as the mean smallest kept activation (saved as SAELens jumprelu)."""

    name = "batchtopk"
    saved_name = "jumprelu"
    threshold_at_inference = True
    learns_batch_threshold = True
    loads_back = False
    saelens_training_name = "batchtopk"

    def train_activation(self, pre: torch.Tensor, sae, bandwidth: float) -> torch.Tensor:
        return batch_topk_dense(pre, sae.cfg.k)

    def code(self, pre: torch.Tensor, k: int) -> SparseCode:
        return batchtopk_code(pre, k)
