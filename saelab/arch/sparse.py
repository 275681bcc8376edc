"""The sparse TopK / BatchTopK training step: exact gradients written by hand, so nothing goes dense.

Autograd through a TopK SAE would scatter the k active latents of each token into a dense
``(batch, d_sae)`` tensor, backpropagate a dense ``(batch, d_sae)`` gradient through it and multiply
by that twice (∂W_enc = xᵀ·∂z, ∂W_dec = zᵀ·∂x̂), although only k of a token's d_sae latents are
non-zero. Here the selected (token, latent) pairs form a CSR matrix instead: the decoder is an
``embedding_bag`` over it, ∂L/∂z a sampled dense-dense product on it, and ∂W_dec, ∂W_enc are
``embedding_bag`` sums over the pairs sorted by latent. The only dense product is the encoder's
forward, the floor; AuxK (Gao et al. §A.2) is dense on the dead latents' columns only.
The topk and batchtopk architectures (:mod:`saelab.arch.topk`) train with it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch.nn import functional as F

from saelab.arch.rules import topk_latents


class SparseCode(NamedTuple):
    """Selected (token, latent) pairs as CSR rows (tokens); within a row the latents are in any order."""

    crow: torch.Tensor
    """Row pointers [batch + 1]."""
    col: torch.Tensor
    """Latent of each pair [pairs]."""
    val: torch.Tensor
    """Activation of each pair, ≥ 0 [pairs]."""
    pre: torch.Tensor
    """Dense pre-activations [batch, d_sae] (for AuxK; no autograd)."""


def topk_code(pre: torch.Tensor, k: int) -> SparseCode:
    """The k largest pre-activations of each token (Gao et al.), ReLU'd."""
    vals, idx = topk_latents(pre, k)                             # (B, k): the rule SAE.encode uses
    crow = torch.arange(0, pre.shape[0] * k + 1, k, device=pre.device)
    return SparseCode(crow, idx.reshape(-1), vals.reshape(-1), pre)


def batchtopk_code(pre: torch.Tensor, k: int) -> SparseCode:
    """The k·batch largest pre-activations over the whole batch (Bussmann et al.), ReLU'd."""
    B, S = pre.shape
    vals, flat = pre.reshape(-1).topk(min(B * k, pre.numel()), sorted=False)
    flat, order = flat.sort()
    rows = flat // S
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre.device)
    crow[1:] = torch.bincount(rows, minlength=B).cumsum(0)
    return SparseCode(crow, flat % S, vals[order].clamp_min(0), pre)


def sparse_decode(code: SparseCode, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """x̂ = Σ_pairs val · W_dec[col] + b_dec → ``[batch, d_in]``."""
    return F.embedding_bag(code.col, W_dec, code.crow[:-1], mode="sum", per_sample_weights=code.val) + b_dec


def _pair_dots(code: SparseCode, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """For each pair (b, l): a[b] · W[l], as a sampled dense-dense product on the CSR pattern [pairs]."""
    B, S = code.pre.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)           # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(code.crow, code.col, torch.zeros_like(code.val), (B, S),
                                          check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, W.t(), beta=0.0).values()


def index_sum(index: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """out[i] = Σ weights[index == i] → ``[n]`` (1-D index_add_: ~50x faster than bincount here)."""
    return torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, index, weights)


class _ByLatent(NamedTuple):
    """The pairs grouped by latent: a permutation, the token of each, and each latent's first position."""

    order: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def of(cls, code: SparseCode, rows: torch.Tensor) -> "_ByLatent":
        order = torch.sort(code.col.int(), stable=True).indices     # int32 keys sort ~3x faster
        counts = index_sum(code.col, torch.ones_like(code.val), code.pre.shape[1]).long()
        return cls(order, rows[order], counts.cumsum(0) - counts)

    def sum(self, weights: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """out[l] = Σ_{pairs (b, l)} weights · src[b] → ``[d_sae, d]`` (one embedding_bag)."""
        return F.embedding_bag(self.rows, src, self.offsets, mode="sum", per_sample_weights=weights[self.order])


class SparseGrads(NamedTuple):
    grads: dict[str, torch.Tensor]
    """∂loss/∂ W_enc [d_in, d_sae], b_enc, W_dec, b_dec."""
    err_sq: torch.Tensor
    """Σ_tokens ‖x − x̂‖²."""
    aux: torch.Tensor
    """AuxK loss ‖e − ê‖² (batch mean; 0 without dead latents)."""


@torch.no_grad()
def sparse_grads(sae, x: torch.Tensor, code: SparseCode, dead: torch.Tensor | None, k_aux: int,
                 auxk_alpha: float) -> SparseGrads:
    """Exact gradients of mean‖x − x̂‖² + α·AuxK for the pairs in ``code``, without dense latents."""
    W_enc, W_dec, b_dec = sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach()
    B = x.shape[0]
    xc = x - b_dec                                               # (B, d_in)
    err = sparse_decode(code, W_dec, b_dec) - x                  # (B, d_in)
    err_sq = err.pow(2).sum()
    g = err * (2.0 / B)                                          # ∂L/∂x̂ (B, d_in)
    rows = torch.repeat_interleave(torch.arange(B, device=x.device), code.crow.diff())   # (pairs,)
    g_pre = _pair_dots(code, g, W_dec) * (code.val > 0)          # (pairs,)
    by_latent = _ByLatent.of(code, rows)
    g_W_dec = by_latent.sum(code.val, g)                         # (d_sae, d_in)
    g_W_encT = by_latent.sum(g_pre, xc)                          # (d_sae, d_in)
    g_b_enc = index_sum(code.col, g_pre, W_dec.shape[0])
    g_b_dec = g.sum(0) - W_enc @ g_b_enc
    aux = torch.zeros((), device=x.device)
    if dead is not None and bool(dead.any()):
        aux = _auxk(code.pre, err, xc, dead, k_aux, auxk_alpha, W_enc, W_dec,
                    (g_W_encT, g_b_enc, g_W_dec, g_b_dec))
    return SparseGrads({"W_enc": g_W_encT.t(), "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": g_b_dec}, err_sq, aux)


def _auxk(pre, err, xc, dead, k_aux, alpha, W_enc, W_dec, grads) -> torch.Tensor:
    """Add α·∂‖e − ê‖² to ``grads`` (in place) and return the AuxK loss; dense on the dead columns only."""
    g_W_encT, g_b_enc, g_W_dec, g_b_dec = grads
    B = err.shape[0]
    dead_idx = dead.nonzero().squeeze(1)                         # (n_dead,)
    pre_d = pre.index_select(1, dead_idx)                        # (B, n_dead)
    ka = min(k_aux, dead_idx.numel())
    if ka < dead_idx.numel():
        v, j = pre_d.topk(ka, dim=1, sorted=False)
        z_aux = torch.zeros_like(pre_d).scatter_(1, j, v.clamp_min(0))
    else:
        z_aux = pre_d.clamp_min(0)                               # (B, n_dead)
    W_d = W_dec.index_select(0, dead_idx)                        # (n_dead, d_in)
    r = z_aux @ W_d + err                                        # ê − e, e = x − x̂ detached (B, d_in)
    ga = r * (2.0 * alpha / B)
    # index_put_ (rows are distinct): 2-D index_add_ on CPU scans the whole destination
    g_W_dec.index_put_((dead_idx,), z_aux.t() @ ga, accumulate=True)
    g_pre_d = (ga @ W_d.t()) * (z_aux > 0)                       # (B, n_dead)
    s = g_pre_d.sum(0)
    g_b_enc.index_add_(0, dead_idx, s)
    g_W_encT.index_put_((dead_idx,), g_pre_d.t() @ xc, accumulate=True)
    g_b_dec.sub_(W_enc.index_select(1, dead_idx) @ s)
    return r.pow(2).sum(1).mean()

