"""The selection rules every SAE path shares: which latents fire, and the pseudo-gradients of θ.

The dense encoder, the sparse encoder, the subset encoder and the training steps of every architecture
(:mod:`saelab.arch`) call these, so the paths cannot disagree about which latents fire.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from saelab.basis import SparseActs


class _JumpReLU(torch.autograd.Function):
    """z = pre · 1[pre > θ]; ∂z/∂θ from a rectangle kernel of width ``bandwidth`` (Rajamanoharan §3)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        near = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_threshold = (-(threshold / eps) * near * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre − θ) with the same straight-through pseudo-gradient for θ (the L0 penalty's)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        return None, (-(1.0 / eps) * near * grad).sum(0), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return _Step.apply(pre, threshold, bandwidth)


def topk_latents(pre: torch.Tensor, k: int) -> SparseActs:
    """The k largest of ``pre [..., d_sae]`` per token, ReLU'd: ``[..., k]`` (zeros where fewer are positive)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseActs(F.relu(values), indices)


def threshold_latents(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU at inference: pre · 1[pre > θ], and ReLU too, as SAELens and Gemma Scope do: the same for
    θ ≥ 0, and no negative latents when a learned θ is below 0. ``threshold`` broadcasts over ``pre``."""
    return F.relu(pre) * (pre > threshold)


def batch_topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK in training: the k·batch largest of ReLU(``pre [..., d_sae]``) over the whole batch, dense
    (differentiable through the kept values)."""
    flat = F.relu(pre).flatten()
    n_keep = min(flat.numel(), k * pre.reshape(-1, pre.shape[-1]).shape[0])
    vals, idx = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
