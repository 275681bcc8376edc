"""What a training run is: :class:`TrainConfig` (every hyperparameter, its default, and how the
automatic ``None`` values resolve for an input width) and the schedules it defines over the steps.

The loop that follows them is :mod:`saelab.train`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from saelab import arch as architectures

RUN_ONLY_FIELDS = ("checkpoint_every", "log_every", "wandb_project", "device")
"""Config fields that may change between a run and its resumption (they do not alter the math)."""


@dataclass
class TrainConfig:
    """How an SAE is trained (what is needed to *run* it lives in SAEConfig)."""

    architecture: str = "topk"
    """relu | topk | batchtopk | jumprelu | matryoshka_batchtopk (``saelab.arch.names()``)."""
    d_sae: int | None = None
    """Number of latents; None: expansion × d_in."""
    expansion: int = 8
    """Latents per input dimension when d_sae is None."""
    k: int | None = 32
    """Active latents per token (topk; batchtopk on average). Ignored by relu/jumprelu."""
    l1_coefficient: float = 5.0
    """relu: λ of the decoder-norm-weighted L1 penalty (Anthropic April 2024, with E‖x‖² = d_in)."""
    l0_coefficient: float = 1.0
    """jumprelu: λ of the L0 penalty."""
    sparsity_warmup_fraction: float = 0.05
    """relu/jumprelu: λ rises linearly from 0 over this fraction of the steps."""
    bandwidth: float = 0.05
    """jumprelu: width ε of the rectangle kernel of the straight-through estimator."""
    threshold_init: float = 0.01
    """jumprelu: initial θ of every latent."""
    auxk_alpha: float = 1 / 32
    """topk/batchtopk: weight α of the AuxK loss (Gao et al. §A.2)."""
    k_aux: int | None = None
    """topk/batchtopk: dead latents used by AuxK per token; None: d_in // 2."""
    matryoshka_widths: list[int] | None = None
    """matryoshka_batchtopk: ends of the nested prefixes, increasing, the last d_sae; None: d_sae/8, /4, /2, 1."""
    dead_tokens: int | None = None
    """A latent is dead when it has not fired in this many tokens; None: tokens/10, at most 10M."""
    resample_every: int | None = None
    """relu: resample dead latents every this many steps (not in the last quarter); None: steps/4; 0: never."""
    lr: float | None = None
    """Adam learning rate; None: the architecture's (``default_lr``): 2e-3 (topk, batchtopk; best of 4e-4/2e-3
    on a 1.4M-token builtin run), 2e-4 (jumprelu), 1e-4 (relu)."""
    lr_warmup_steps: int | None = None
    """Linear warm-up steps; None: 5% of the steps, at most 1000."""
    lr_decay: str = "linear"
    """Shape of the decay to 0 over the last ``decay_fraction`` of the steps: linear | cosine."""
    decay_fraction: float = 0.2
    """Fraction of the steps over which the learning rate decays to 0."""
    batch_size: int = 4096
    """Tokens per optimiser step, over all ranks."""
    tokens: int = 2_000_000
    """Training tokens (steps = tokens // batch_size)."""
    seed: int = 0
    """Seeds the initialisation, the data order and resampling."""
    init_seed: int | None = None
    """Seed of the initial weights alone (None: ``seed``). A sweep gives each member its own, so that SAEs of
    different sizes do not start from the same first decoder rows (which would make families look persistent)."""
    init_b_dec: str = "geometric_median"
    """b_dec initialisation on the first batch: geometric_median | mean | zeros."""
    normalize_inputs: bool = True
    """Scale inputs so that E‖x‖² = d_in (estimated on the first batch)."""
    heldout_fraction: float = 0.05
    """Fraction of the store's sequences held out for the final evaluation."""
    eval_tokens: int = 262_144
    """Held-out tokens for the final FVU/L0/dead and per-feature statistics."""
    checkpoint_every: int = 500
    """Steps between checkpoints (also on SIGINT/SIGTERM); 0: only on signals."""
    log_every: int = 10
    """Steps between log records."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms during training (bitwise-reproducible resumes on CPU)."""
    device: str | None = None
    """cpu | cuda | cuda:N; None: cuda (LOCAL_RANK) when available, else cpu."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs the ``wandb`` extra)."""

    def __post_init__(self):
        for name in ("seed", "init_seed"):   # checked before the data order is drawn from them
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**63:
                raise ValueError(f"{name} must be an integer from 0 to 2^63 - 1, got {value}")

    def resolved(self, d_in: int) -> "TrainConfig":
        """A copy with every automatic value (None) made concrete for inputs of width ``d_in``."""
        c = self
        rule = architectures.get(c.architecture)
        if c.lr_decay not in ("linear", "cosine") or c.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"lr_decay must be linear|cosine and init_b_dec geometric_median|mean|zeros, "
                             f"got {c.lr_decay!r}, {c.init_b_dec!r}")
        if c.batch_size < 1 or c.tokens < c.batch_size:
            raise ValueError(f"tokens ({c.tokens}) must be at least one batch ({c.batch_size})")
        d_sae = c.d_sae or int(c.expansion * d_in)
        if d_sae < 1:
            raise ValueError(f"the SAE needs at least one latent, got d_sae={d_sae}")
        _check_fits(d_sae, d_in)
        steps = c.tokens // c.batch_size
        return replace(c, d_sae=d_sae, lr=c.lr or rule.default_lr, **rule.resolve(c, d_in, d_sae),
                       k_aux=c.k_aux or max(1, d_in // 2),
                       dead_tokens=c.dead_tokens or min(10_000_000, max(c.batch_size, c.tokens // 10)),
                       resample_every=steps // 4 if c.resample_every is None else c.resample_every,
                       lr_warmup_steps=min(1000, max(1, steps // 20)) if c.lr_warmup_steps is None
                       else c.lr_warmup_steps)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


# fp32 weights of W_enc and W_dec, their gradients and Adam's two moments
BYTES_PER_WEIGHT = 4 * 4


def _check_fits(d_sae: int, d_in: int) -> None:
    """Refuse an SAE whose weights and optimiser state cannot fit in this machine's memory, before any
    allocation (10^12 latents used to end in an allocator traceback)."""
    need = 2 * d_sae * d_in * BYTES_PER_WEIGHT
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # not on this OS: the allocator will say
        return
    if need > have:
        raise ValueError(f"{d_sae:,} latents on inputs of width {d_in} need about {need / 2**30:,.1f} GiB for the "
                         f"weights and optimiser state; this machine has {have / 2**30:,.1f} GiB. Use fewer latents")


# -- schedules -------------------------------------------------------------------------------------

def lr_at(cfg: TrainConfig, step_: int) -> float:
    """Warm-up, constant, then decay to 0 over the last ``decay_fraction`` of the steps."""
    warm = min(1.0, (step_ + 1) / max(1, cfg.lr_warmup_steps))
    decay_steps = max(1, int(cfg.decay_fraction * cfg.steps))
    left = (cfg.steps - step_) / decay_steps
    if left >= 1.0:
        return cfg.lr * warm
    frac = max(0.0, left)
    shape = frac if cfg.lr_decay == "linear" else 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.lr * warm * shape


def sparsity_coefficient_at(cfg: TrainConfig, step_: int) -> float:
    """λ of the architecture's sparsity penalty at ``step_`` (its schedule is the architecture's)."""
    return architectures.get(cfg.architecture).sparsity_coefficient(cfg, step_)
