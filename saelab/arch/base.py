"""What an SAE architecture is: one class that owns its activation, its training loss, its sparsity
schedule, its defaults, its saved (SAELens) name and its FLOPs; and the registry that names them.

Every other module asks the class (``get(cfg.architecture)``) instead of comparing architecture
names, so an architecture is added in one file: a subclass of :class:`Architecture` decorated with
:func:`register`, imported by ``saelab/arch/__init__.py``.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from saelab.arch.rules import threshold_latents


class StepStats(NamedTuple):
    """One training step's sums over one rank's batch (all-reduced across ranks before use)."""

    err_sq: torch.Tensor
    """Σ_tokens ‖x − x̂‖² of the whole dictionary (scalar)."""
    loss: torch.Tensor
    """This rank's total loss (scalar)."""
    aux: torch.Tensor
    """AuxK loss, or the (unweighted) sparsity penalty for relu/jumprelu (scalar)."""
    active: torch.Tensor
    """Σ_tokens active latents (scalar)."""
    fired: torch.Tensor
    """Tokens on which each latent fired [d_sae]."""
    min_kept: torch.Tensor
    """batchtopk: smallest positive activation kept (scalar; +inf when none)."""


class Architecture:
    """The base of every architecture; the defaults are those of a plain dense-gradient SAE."""

    name: ClassVar[str]
    """saelab's name (``SAEConfig.architecture``, ``--arch``)."""
    saved_name: ClassVar[str]
    """SAELens's ``architecture`` in cfg.json (what the saved inference SAE is)."""
    default_lr: ClassVar[float]
    """Adam learning rate when the config leaves it None."""
    aux_metric: ClassVar[str] = "auxk"
    """Name of the ``aux`` term in the training log."""
    needs_k: ClassVar[bool] = False
    """Whether k (active latents per token) is part of the architecture."""
    ranks_per_token: ClassVar[bool] = False
    """Whether a latent fires by its rank among the token's latents (topk): the sparse and subset encoders
    then need every pre-activation; otherwise a latent depends on its own pre-activation only."""
    threshold_at_inference: ClassVar[bool] = False
    """Whether inference is a JumpReLU with ``sae.threshold`` (saved as SAELens jumprelu)."""
    trains_threshold: ClassVar[bool] = False
    """Whether θ is a trained parameter (jumprelu)."""
    learns_batch_threshold: ClassVar[bool] = False
    """Whether training learns one global θ from the smallest kept activations (batchtopk)."""
    hand_gradients: ClassVar[bool] = False
    """Whether :meth:`loss` writes exact gradients itself (sparse step; W_enc kept transposed for Adam)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows kept at unit norm (gradient parallel to a row removed before each update)."""
    resamples_dead: ClassVar[bool] = False
    """Dead latents are resampled during training (Anthropic's recipe for relu)."""
    decoder_init_norm: ClassVar[float] = 1.0
    """Norm of each initial decoder row."""
    saelens_training_name: ClassVar[str | None] = None
    """SAELens's name for a *training* checkpoint of this architecture (one global ``topk_threshold``),
    which loads as the architecture that owns :attr:`saved_name`."""
    loads_back: ClassVar[bool] = True
    """Whether an SAE saved as :attr:`saved_name` loads back as this architecture (False for the training
    recipes saved as another architecture's inference form, e.g. batchtopk as jumprelu)."""

    # -- inference --------------------------------------------------------------------------------

    def check_k(self, k: int | None, d_sae: int) -> None:
        """Raise ValueError when k does not fit this architecture and width."""
        if self.needs_k and not (k and 1 <= k <= d_sae):
            raise ValueError(f"{self.name} needs 1 <= k <= d_sae, got k={k}, d_sae={d_sae}")

    def activation(self, pre: torch.Tensor, threshold: torch.Tensor, k: int | None) -> torch.Tensor:
        """Inference latents from ``pre [..., d_sae]`` (dense)."""
        if self.threshold_at_inference:
            return threshold_latents(pre, threshold)
        raise NotImplementedError

    def train_activation(self, pre: torch.Tensor, sae, bandwidth: float) -> torch.Tensor:
        """Training latents from ``pre [batch, d_sae]`` (dense, differentiable)."""
        return self.activation(pre, sae.threshold, sae.cfg.k)

    def subset_activation(self, pre: torch.Tensor, idx: torch.Tensor, threshold: torch.Tensor,
                          k: int | None) -> torch.Tensor:
        """Latents ``idx`` from ``pre`` (``[n, len(idx)]``, or ``[n, d_sae]`` when :attr:`ranks_per_token`);
        ``threshold`` is already the subset's."""
        return self.activation(pre, threshold, k)

    # -- training ---------------------------------------------------------------------------------

    def resolve(self, cfg, d_in: int, d_sae: int) -> dict:
        """The architecture's automatic TrainConfig values for width ``d_sae`` (fields → values)."""
        self.check_k(cfg.k, d_sae)
        return {"k": cfg.k if self.needs_k else None}

    def sparsity_coefficient(self, cfg, step: int) -> float:
        """λ of the sparsity penalty at ``step``: rises linearly from 0 over the warm-up fraction."""
        return self.penalty_base(cfg) * min(1.0, (step + 1) / max(1.0, cfg.sparsity_warmup_fraction * cfg.steps))

    def penalty_base(self, cfg) -> float:
        return cfg.l0_coefficient

    def init(self, sae, cfg) -> None:
        """Architecture-specific initial values, after the shared initialisation."""

    def loss(self, sae, params: dict, x: torch.Tensor, cfg, step: int, dead: torch.Tensor) -> StepStats:
        """The step's loss on ``x [B, d_in]`` (input-scaled) with gradients set on ``params``."""
        raise NotImplementedError

    @torch.no_grad()
    def after_update(self, sae) -> None:
        """Constraints restored after each optimiser step."""
        if self.unit_norm_decoder:
            sae.set_decoder_norm_to_unit()

    def flops_per_token(self, d_in: int, d_sae: int, k: int | None, k_aux: int | None) -> float:
        """Training FLOPs per token: encoder, decoder and their gradients, all dense (3 × 2 products × 2)."""
        return 12.0 * d_in * d_sae


_REGISTRY: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make ``cls`` known under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"architecture {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Architecture:
    """The architecture called ``name``; ValueError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown SAE architecture {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_REGISTRY)


def by_saved_name(saved: str) -> Architecture | None:
    """The architecture a SAELens folder with ``architecture: saved`` loads as (None if saelab runs none)."""
    inference = next((a.saved_name for a in _REGISTRY.values() if saved in (a.saved_name, a.saelens_training_name)),
                     None)
    return next((a for a in _REGISTRY.values() if a.saved_name == inference and a.loads_back), None)


def saved_names() -> tuple[str, ...]:
    """The SAELens architectures saelab loads (inference forms)."""
    return tuple(a.saved_name for a in _REGISTRY.values() if a.loads_back)


def dense_step(sae, x: torch.Tensor, z: torch.Tensor, penalty: torch.Tensor, coefficient: float) -> StepStats:
    """Backpropagate mean‖x − x̂‖² + λ·penalty for dense latents ``z [B, d_sae]`` and return the sums."""
    err_sq = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum()
    loss = err_sq / x.shape[0] + coefficient * penalty
    loss.backward()
    on = (z > 0).detach()
    return StepStats(err_sq.detach(), loss.detach(), penalty.detach(), on.sum().float(), on.sum(0).float(),
                     torch.tensor(float("inf"), device=x.device))
