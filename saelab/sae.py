"""The sparse autoencoder: one module, four activation functions.

    pre = W_encᵀ (x − b_dec) + b_enc          # (batch, d_sae)
    z   = act(pre)                            # relu | topk | batchtopk | jumprelu
    x̂   = W_decᵀ z + b_dec                    # (batch, d_in)

with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
jumprelu (and batchtopk at inference), ``threshold [d_sae]``. Activations:

- ``relu``: z = ReLU(pre) (trained with an L1 penalty weighted by decoder norms; Anthropic 2024).
- ``topk``: keep the k largest of ReLU(pre) per token (Gao et al. 2024).
- ``batchtopk``: in training keep the k·batch largest over the whole batch (Bussmann et al. 2024); at
  inference z = pre · 1[pre > θ] with the global threshold θ learned in training, i.e. a JumpReLU.
- ``jumprelu``: z = pre · 1[pre > θ_i] with per-latent thresholds (Rajamanoharan et al. 2024); in
  training, θ gets pseudo-gradients through a straight-through estimator with a kernel bandwidth.

The SAE is a :class:`saelab.basis.Basis`: besides the dense :meth:`SAE.encode` it has
:meth:`SAE.encode_sparse` (the firing latents of each token as ``(values, indices)``; for topk it never
builds the dense ``(batch, d_sae)`` latents) and :meth:`SAE.subset_encoder` (a few latents only, for
steering and monitoring hooks). The selection rules live in :func:`topk_latents` and
:func:`threshold_latents`, which every path uses, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from saelab import arch as architectures
from saelab.arch.rules import jumprelu, step, threshold_latents, topk_latents
from saelab.basis import SparseActs, sparse_from_dense

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "ForwardOutput", "SubsetEncoder", "jumprelu", "step",
           "threshold_latents", "topk_latents"]

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
"""The four base architectures, each its own activation rule. Every architecture an SAE may have,
training recipes built on these included (matryoshka_batchtopk), is ``saelab.arch.names()``."""


@dataclass
class SAEConfig:
    """What is needed to *load* and run an SAE (how it was trained lives in TrainConfig)."""

    d_in: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """A registered architecture (``saelab.arch.names()``): relu | topk | batchtopk | jumprelu | ..."""
    k: int | None = None
    """Active latents per token for topk/batchtopk (None otherwise)."""
    metadata: dict = field(default_factory=dict)
    """Provenance carried into cfg.json: model_name, hook_name, hf_hook_name, context_size, ..."""

    def __post_init__(self) -> None:
        architectures.get(self.architecture).check_k(self.k, self.d_sae)
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """Reconstruction ``[batch, d_in]``."""
    z: torch.Tensor
    """Latents ``[batch, d_sae]`` (dense)."""
    mse: torch.Tensor
    """Mean over the batch of ‖x − x̂‖² (scalar)."""
    l0: torch.Tensor
    """Mean number of active latents per token (scalar)."""


class SAE(nn.Module):
    """Sparse autoencoder (see the module docstring for the math and shapes)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_sae), requires_grad=self.rule.trains_threshold)
        self.provenance: dict = {}  # how it was made (saelab.json): model, hook, corpus, train config, stats
        self.reset_parameters()

    @property
    def rule(self) -> architectures.Architecture:
        """The architecture's class (:mod:`saelab.arch`): its activation and how it is trained."""
        return architectures.get(self.cfg.architecture)

    @property
    def uses_threshold(self) -> bool:
        """JumpReLU always; BatchTopK at inference (after training has set θ)."""
        return self.rule.trains_threshold or (self.rule.threshold_at_inference and not self.training)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Decoder rows uniform on the sphere (at the architecture's norm), encoder = decoder transpose (Gao §A.1)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        W = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=g)
        W /= W.norm(dim=1, keepdim=True)
        W *= self.rule.decoder_init_norm
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.rule.trains_threshold:
            self.threshold.fill_(1e-3)

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in]`` → pre-activations ``[..., d_sae]``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, bandwidth: float = 1e-3) -> torch.Tensor:
        """Apply the architecture's activation to ``pre [batch, d_sae]`` (dense result)."""
        if self.training:
            return self.rule.train_activation(pre, self, bandwidth)
        return self.rule.activation(pre, self.threshold, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in]`` → latents ``z [..., d_sae]`` (dense)."""
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., d_sae]`` → reconstruction ``[..., d_in]``."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        z = self.encode(x)
        x_hat = self.decode(z)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l0 = (z > 0).float().sum(-1).mean()
        return ForwardOutput(x_hat, z, mse, l0)

    # -- sparse path and subsets (the Basis interface) -------------------------------------------

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        """The firing latents of ``x [..., d_in]`` as ``SparseActs(values [..., m], indices [..., m])``.

        TopK: m = k straight from the pre-activations, never dense. Other architectures: the dense
        encoding's non-zero latents, m = the most any token of ``x`` has (zeros pad the others).
        """
        if self.rule.ranks_per_token:
            return topk_latents(self.pre_acts(x), self.cfg.k)
        return sparse_from_dense(self.encode(x))

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> SparseActs:
        """Top-k latents of ``x [batch, d_in]`` as ``(values [batch, k], indices [batch, k])``.

        For topk SAEs with the default k this *is* the encoding (:meth:`encode_sparse`). For the other
        architectures it returns the k largest activations of the dense encoding.
        """
        k = k or self.cfg.k
        if self.rule.ranks_per_token:
            return topk_latents(self.pre_acts(x), k)
        vals, idx = self.encode(x).topk(k, dim=-1, sorted=False)
        return SparseActs(vals, idx)

    def subset_encoder(self, features, device: torch.device | str | None = None) -> "SubsetEncoder":
        """A callable ``x [..., d_in]`` → ``encode(x)[..., features]`` (float32, inference semantics)."""
        return SubsetEncoder(self, features, device)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec without a dense ``(batch, d_sae)`` product."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    # -- weight surgery ----------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale · x`` take raw ``x``: W_enc·s, W_dec/s, b_dec/s."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each unit decoder row (Gao et al. §A.4)."""
        if self.W_dec.grad is None:
            return
        W, G = self.W_dec, self.W_dec.grad
        G.sub_((G * W).sum(dim=1, keepdim=True) * W)


class SubsetEncoder:
    """``z[..., features]`` of ``x [..., d_in]``, equal to ``sae.encode(x)[..., features]`` at inference.

    Prepared once, called per forward (steering and monitoring hooks). For relu, jumprelu and batchtopk
    (a JumpReLU at inference) a latent depends on its own pre-activation only, so only
    ``W_enc[:, features]`` is multiplied. TopK must know whether the feature is among the k largest
    pre-activations of the token, which needs all of them.
    """

    def __init__(self, sae: SAE, features, device: torch.device | str | None = None):
        self.rule, self.k = sae.rule, sae.cfg.k
        idx = torch.tensor(list(features), dtype=torch.long)
        if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < sae.d_sae):
            raise ValueError(f"feature ids {idx.tolist()} out of range: this SAE has {sae.d_sae} features "
                             f"(ids 0..{sae.d_sae - 1})")
        get = lambda t: t.detach().to(device=device, dtype=torch.float32)  # noqa: E731
        every = self.rule.ranks_per_token  # topk: the rank among all latents decides
        W_enc = get(sae.W_enc) if every else get(sae.W_enc[:, idx])  # (d_in, d_sae) or (d_in, n)
        b_enc = get(sae.b_enc) if every else get(sae.b_enc[idx])
        # (x − b_dec)·W + b_enc = x·W + (b_enc − b_dec·W): one fused addmm per call, no elementwise pass on x
        self.W_enc, self.bias = W_enc, b_enc - get(sae.b_dec) @ W_enc
        self.idx = idx.to(device)
        self.threshold = get(sae.threshold[idx])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()  # (positions, d_in)
        pre = torch.addmm(self.bias, flat, self.W_enc)  # (positions, n), or (positions, d_sae) for topk
        z = self.rule.subset_activation(pre, self.idx, self.threshold, self.k)  # the rule SAE.activate uses
        return z.reshape(*x.shape[:-1], z.shape[-1])
