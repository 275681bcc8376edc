"""Training sparse autoencoders: the four recipes, a sparse TopK step for CPUs, checkpoints, DDP.

Inputs are scaled by one scalar s so that E‖s·x‖² = d_in (Anthropic, April 2024 update); s is folded
into the weights on save, so the saved SAE reads raw activations. Losses (per token, batch mean):

- relu:      ‖x − x̂‖² + λ(t) Σ_i z_i ‖W_dec,i‖            λ warmed up over the first 5% of steps
- topk:      ‖x − x̂‖² + α ‖e − ê‖²,  e = x − x̂,  ê = W_decᵀ z_aux, z_aux = top-k_aux dead latents (Gao §A.2)
- batchtopk: the same with the top k·batch latents over the batch (Bussmann et al. 2024)
- jumprelu:  ‖x − x̂‖² + λ(t) Σ_i H(pre_i − θ_i), straight-through pseudo-gradients (Rajamanoharan)

TopK and BatchTopK keep a unit-norm decoder (gradient projected, rows renormalised after each
step) and never build the dense ``(batch, d_sae)`` latents or a dense decoder product: the
selected (token, latent) pairs form a CSR matrix; the decoder is an ``embedding_bag`` over it,
∂L/∂z a sampled dense-dense product on it, and ∂W_dec, ∂W_enc are ``embedding_bag`` sums over the
pairs sorted by latent. The only dense product is the encoder's forward, the floor.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.nn import functional as F

from saelab.atomic import atomic_dir, recover_dir, truncate_jsonl_log, write_json, write_tensors
from saelab.sae import ARCHITECTURES, SAE, SAEConfig, jumprelu, step

CHECKPOINT, LOG = "checkpoint", "train_log.jsonl"
CHECKPOINT_FORMAT = "saelab-train-checkpoint"
RUN_ONLY_FIELDS = ("checkpoint_every", "log_every", "wandb_project", "device")
"""Config fields that may change between a run and its resumption (they do not alter the math)."""
UNIT_NORM = ("topk", "batchtopk", "jumprelu")


@dataclass
class TrainConfig:
    """How an SAE is trained (what is needed to *run* it lives in SAEConfig)."""

    architecture: str = "topk"
    """relu | topk | batchtopk | jumprelu."""
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
    dead_tokens: int | None = None
    """A latent is dead when it has not fired in this many tokens; None: tokens/10, at most 10M."""
    resample_every: int | None = None
    """relu: resample dead latents every this many steps (not in the last quarter); None: steps/4; 0: never."""
    lr: float | None = None
    """Adam learning rate; None: 2e-3 (topk, batchtopk; best of 4e-4/2e-3 on a 1.4M-token builtin run),
    2e-4 (jumprelu), 1e-4 (relu)."""
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

    def resolved(self, d_in: int) -> "TrainConfig":
        """A copy with every automatic value (None) made concrete for inputs of width ``d_in``."""
        c = self
        if c.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {c.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if c.lr_decay not in ("linear", "cosine") or c.init_b_dec not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"lr_decay must be linear|cosine and init_b_dec geometric_median|mean|zeros, "
                             f"got {c.lr_decay!r}, {c.init_b_dec!r}")
        if c.batch_size < 1 or c.tokens < c.batch_size:
            raise ValueError(f"tokens ({c.tokens}) must be at least one batch ({c.batch_size})")
        d_sae = c.d_sae or int(c.expansion * d_in)
        steps = c.tokens // c.batch_size
        sparse_k = c.architecture in ("topk", "batchtopk")
        if sparse_k and not (c.k and 1 <= c.k <= d_sae):
            raise ValueError(f"{c.architecture} needs 1 <= k <= d_sae ({d_sae}), got k={c.k}")
        lr = c.lr or {"topk": 2e-3, "batchtopk": 2e-3, "jumprelu": 2e-4, "relu": 1e-4}[c.architecture]
        return replace(c, d_sae=d_sae, k=c.k if sparse_k else None, lr=lr,
                       k_aux=c.k_aux or max(1, d_in // 2),
                       dead_tokens=c.dead_tokens or min(10_000_000, max(c.batch_size, c.tokens // 10)),
                       resample_every=steps // 4 if c.resample_every is None else c.resample_every,
                       lr_warmup_steps=min(1000, max(1, steps // 20)) if c.lr_warmup_steps is None
                       else c.lr_warmup_steps)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


class NonFiniteLoss(ValueError):
    """The loss became NaN/inf: the run stops before the step and nothing is checkpointed."""


class StepStats(NamedTuple):
    """Sums over one rank's batch, all-reduced across ranks before use."""

    err_sq: torch.Tensor
    """Σ_tokens ‖x − x̂‖² (scalar)."""
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
    base = cfg.l1_coefficient if cfg.architecture == "relu" else cfg.l0_coefficient
    return base * min(1.0, (step_ + 1) / max(1.0, cfg.sparsity_warmup_fraction * cfg.steps))


# -- initialisation --------------------------------------------------------------------------------

def geometric_median(x: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iterations on ``x [n, d]`` from the mean → ``[d]``."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)           # (n,)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


def input_scale(x: torch.Tensor) -> float:
    """s with E‖s·x‖² = d_in on the sample ``x [n, d_in]``."""
    ms = x.pow(2).sum(1).mean().item()
    if not ms > 0:
        raise ValueError("the first batch of activations is all zeros; cannot normalise the inputs")
    return math.sqrt(x.shape[1] / ms)


# -- the sparse TopK path --------------------------------------------------------------------------

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
    vals, idx = pre.topk(k, dim=1, sorted=False)                  # (B, k)
    vals = vals.clamp_min(0)
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


def _count(index: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
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
        counts = _count(code.col, torch.ones_like(code.val), code.pre.shape[1]).long()
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
def sparse_grads(sae: SAE, x: torch.Tensor, code: SparseCode, dead: torch.Tensor | None, k_aux: int,
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
    g_b_enc = _count(code.col, g_pre, W_dec.shape[0])
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


# -- data parallelism ------------------------------------------------------------------------------

class World:
    """torchrun data parallelism: rank/size from the environment, gloo (CPU) or nccl (GPU)."""

    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def mean_grads_(self, params: list[torch.Tensor]) -> None:
        """Average the gradients over ranks in one collective (manual DDP; our grads are hand-made)."""
        if self.size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x [n, d]`` in rank order (= the rows of one global batch)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(t, 0)
        return t

    def close(self) -> None:
        if self.owns_group:
            dist.barrier()
            dist.destroy_process_group()


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Owns the SAE, Adam, schedules and dead-latent counters; :meth:`train_step` is one update."""

    def __init__(self, cfg: TrainConfig, d_in: int, world: World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        sae = SAE(SAEConfig(d_in, cfg.d_sae, cfg.architecture, cfg.k))
        sae.reset_parameters(seed=cfg.seed)
        if cfg.architecture == "jumprelu":
            sae.threshold.data.fill_(cfg.threshold_init)
        self.sae = sae.to(device).train()
        self.sparse = cfg.architecture in ("topk", "batchtopk")
        self.params = {n: p for n, p in sae.named_parameters() if p.requires_grad}
        if self.sparse:
            # Adam updates W_encᵀ [d_sae, d_in], contiguous (the sparse gradient's rows are latents, and
            # fused Adam is 4x slower on a transposed tensor); sae.W_enc is a view of the same storage.
            self.params["W_enc"] = torch.nn.Parameter(sae.W_enc.detach().t().contiguous())
            sae.W_enc.data = self.params["W_enc"].data.t()
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.999),
                                    fused=device.type in ("cpu", "cuda"))
        self.step = 0
        self.input_scale = 1.0
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)  # tokens since last fire
        self.threshold_sum, self.threshold_count = 0.0, 0
        self.stop_requested = False

    def initialize(self, sample: torch.Tensor) -> None:
        """Input scale and b_dec from the first global batch ``sample [n, d_in]`` (raw units)."""
        cfg = self.cfg
        self.input_scale = input_scale(sample) if cfg.normalize_inputs else 1.0
        x = sample * self.input_scale
        init = {"geometric_median": geometric_median, "mean": lambda t: t.mean(0),
                "zeros": lambda t: torch.zeros(t.shape[1])}[cfg.init_b_dec]
        with torch.no_grad():
            self.sae.b_dec.copy_(init(x))

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.cfg.dead_tokens          # (d_sae,) bool

    def train_step(self, x: torch.Tensor) -> dict:
        """One Adam update on this rank's ``x [b, d_in]`` (raw units); returns the step's metrics."""
        cfg, sae = self.cfg, self.sae
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteLoss(f"the activations of batch {self.step} contain NaN/inf; check the store "
                                "('saelab store verify') or the model")
        x = x * self.input_scale
        lr = lr_at(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        stats = self._sparse_loss(x) if self.sparse else self._dense_loss(x)
        params = list(self.params.values())
        self.world.mean_grads_(params)
        reduced = self._reduce(x, stats)
        loss = reduced["loss"]
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at step {self.step} (lr {lr:.3g}); the run is stopped and "
                                "the last checkpoint kept. Lower the learning rate (--lr) or check the inputs")
        if cfg.architecture in UNIT_NORM:
            sae.remove_parallel_decoder_grad()
        self.opt.step()
        self._after_update(reduced, x)
        self.step += 1
        return {"step": self.step, "tokens": self.step * cfg.batch_size, **reduced, "lr": lr,
                "dead_fraction": float(self.dead.float().mean())}

    def _sparse_loss(self, x: torch.Tensor) -> StepStats:
        cfg, sae = self.cfg, self.sae
        with torch.no_grad():
            pre = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)     # (B, d_sae): the one dense product
            code = (topk_code if cfg.architecture == "topk" else batchtopk_code)(pre, cfg.k)
        out = sparse_grads(sae, x, code, self.dead, cfg.k_aux, cfg.auxk_alpha)
        for name, g in out.grads.items():
            p = self.params[name]
            p.grad = g if g.shape == p.shape else g.t()
        B = x.shape[0]
        on = code.val > 0
        fired = _count(code.col, on.float(), cfg.d_sae)
        min_kept = code.val[on].min() if bool(on.any()) else torch.tensor(float("inf"), device=x.device)
        loss = out.err_sq / B + cfg.auxk_alpha * out.aux
        return StepStats(out.err_sq, loss, out.aux, on.sum().float(), fired, min_kept)

    def _dense_loss(self, x: torch.Tensor) -> StepStats:
        cfg, sae = self.cfg, self.sae
        for p in self.params.values():
            p.grad = None
        pre = sae.pre_acts(x)                                      # (B, d_sae)
        if cfg.architecture == "relu":
            z = F.relu(pre)
            penalty = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            z = jumprelu(pre, sae.threshold, cfg.bandwidth)
            penalty = step(pre, sae.threshold, cfg.bandwidth).sum(-1).mean()
        err_sq = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum()
        loss = err_sq / x.shape[0] + sparsity_coefficient_at(cfg, self.step) * penalty
        loss.backward()
        on = (z > 0).detach()
        return StepStats(err_sq.detach(), loss.detach(), penalty.detach(), on.sum().float(), on.sum(0).float(),
                         torch.tensor(float("inf"), device=x.device))

    def _reduce(self, x: torch.Tensor, s: StepStats) -> dict:
        """All-reduce the step's sums (and the stop flag) in one collective; return global metrics."""
        d = x.shape[1]
        scalars = torch.stack([s.err_sq, s.loss, s.aux, s.active, x.pow(2).sum(),
                               torch.tensor(float(x.shape[0]), device=x.device),
                               torch.tensor(float(self.stop_requested), device=x.device),
                               torch.where(torch.isfinite(s.min_kept), s.min_kept, torch.zeros_like(s.min_kept)),
                               torch.isfinite(s.min_kept).float()]).float()
        flat = self.world.sum_(torch.cat([scalars, x.sum(0), s.fired]))
        err_sq, loss, aux, active, x_sq, n, stop, kept_sum, kept_n = flat[:9].tolist()
        x_sum, fired = flat[9:9 + d], flat[9 + d:]
        variance = x_sq - float(x_sum.pow(2).sum()) / n
        self.stop_requested = stop > 0
        return {"loss": loss / self.world.size, "mse": err_sq / n, "aux": aux / self.world.size,
                "fvu": err_sq / variance if variance > 0 else float("nan"), "l0": active / n,
                "_fired": fired, "_tokens": int(n), "_min_kept": kept_sum / kept_n if kept_n else None}

    @torch.no_grad()
    def _after_update(self, reduced: dict, x: torch.Tensor) -> None:
        cfg, sae = self.cfg, self.sae
        if cfg.architecture in UNIT_NORM:
            sae.set_decoder_norm_to_unit()
        if cfg.architecture == "jumprelu":
            sae.threshold.clamp_(min=0.0)
        self.since_fired += reduced.pop("_tokens")
        self.since_fired[reduced.pop("_fired") > 0] = 0
        min_kept = reduced.pop("_min_kept")
        if cfg.architecture == "batchtopk" and min_kept is not None:
            self.threshold_sum += min_kept
            self.threshold_count += 1
        every = cfg.resample_every
        if (cfg.architecture == "relu" and every and (self.step + 1) % every == 0
                and self.step + 1 <= 0.75 * cfg.steps):
            self.resample_dead(x)

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> int:
        """Anthropic-style resampling ("Towards Monosemanticity"): each dead latent restarts on an input of
        this batch drawn with probability ∝ loss²: decoder row = that input's direction (at the mean alive
        decoder norm), encoder column = 0.2 × mean alive encoder norm × it, b_enc = 0, Adam moments reset.
        Rank 0's draw is broadcast so every rank applies the same surgery."""
        sae, dead = self.sae, self.dead
        dead_idx = dead.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return 0
        loss = (sae.decode(F.relu(sae.pre_acts(x))) - x).pow(2).sum(1)        # (B,)
        gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        pick = torch.multinomial(loss.pow(2) + 1e-20, dead_idx.numel(), replacement=True, generator=gen)
        v = x[pick] - sae.b_dec
        v = self.world.broadcast_((v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)).contiguous())  # (n_dead, d_in)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        dec_norm = sae.W_dec[alive].norm(dim=1).mean() if bool(alive.any()) else torch.tensor(0.1)
        sae.W_dec[dead_idx] = v * dec_norm
        sae.W_enc[:, dead_idx] = v.t() * (0.2 * enc_norm)
        sae.b_enc[dead_idx] = 0.0
        for name, index in (("W_enc", (slice(None), dead_idx)), ("W_dec", dead_idx), ("b_enc", dead_idx)):
            state = self.opt.state.get(self.params[name], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.since_fired[dead_idx] = 0
        return dead_idx.numel()

    # -- state ------------------------------------------------------------------------------------

    def state(self, source: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a bitwise resume needs: tensors (safetensors) and scalars (JSON)."""
        t = {f"param.{n}": p.detach().cpu() for n, p in self.sae.named_parameters()}
        for n, p in self.params.items():
            for key, v in self.opt.state.get(p, {}).items():
                t[f"adam.{n}.{key}"] = v.detach().cpu().reshape(-1) if key == "step" else v.detach().cpu()
        t["since_fired"] = self.since_fired.cpu()
        t["rng.torch"] = torch.get_rng_state()
        meta = {"format": CHECKPOINT_FORMAT, "version": 1, "step": self.step,
                "tokens_trained": self.step * self.cfg.batch_size, "input_scale": self.input_scale,
                "threshold_sum": self.threshold_sum, "threshold_count": self.threshold_count,
                "config": asdict(self.cfg), "source": source}
        return t, meta

    @torch.no_grad()
    def load_state(self, t: dict[str, torch.Tensor], meta: dict) -> None:
        for n, p in self.sae.named_parameters():
            p.copy_(t[f"param.{n}"])
        for n, p in self.params.items():
            if f"adam.{n}.step" in t:
                self.opt.state[p] = {"step": t[f"adam.{n}.step"].reshape(()).to(self.device),
                                     "exp_avg": torch.empty_like(p).copy_(t[f"adam.{n}.exp_avg"]),
                                     "exp_avg_sq": torch.empty_like(p).copy_(t[f"adam.{n}.exp_avg_sq"])}
        self.since_fired.copy_(t["since_fired"])
        torch.set_rng_state(t["rng.torch"])
        self.step, self.input_scale = meta["step"], meta["input_scale"]
        self.threshold_sum, self.threshold_count = meta["threshold_sum"], meta["threshold_count"]

    @torch.no_grad()
    def finished_sae(self) -> SAE:
        """The trained SAE for raw inputs: eval mode, BatchTopK threshold set, input scale folded in."""
        sae = self.sae
        sae.W_enc.data = sae.W_enc.data.contiguous()
        if self.cfg.architecture == "batchtopk":
            if not self.threshold_count:
                raise ValueError("batchtopk training kept no positive activation; no threshold can be learned")
            sae.threshold.fill_(self.threshold_sum / self.threshold_count)
        sae.fold_input_scale(self.input_scale)
        return sae.eval()


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_stats(sae: SAE, batches: Iterable[torch.Tensor], max_tokens: int, device=None) -> dict | None:
    """FVU, L0, dead fraction and per-feature max activation and density of ``sae`` on raw batches.

    Returns None when ``batches`` is empty.
    """
    device = device or sae.W_enc.device
    n, err_sq, x_sq, l0 = 0, 0.0, 0.0, 0.0
    x_sum = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.d_sae, device=device)
    max_act = torch.zeros(sae.d_sae, device=device)
    for x in batches:
        x = x[:max_tokens - n].to(device).float()
        if sae.cfg.architecture == "topk":
            vals, idx = sae.encode_topk(x)                          # (b, k)
            x_hat = sae.decode_sparse(vals, idx)
            on = vals > 0
            fired.index_add_(0, idx[on], torch.ones(int(on.sum()), device=device))
            max_act.scatter_reduce_(0, idx.reshape(-1), vals.reshape(-1), "amax")
        else:
            z = sae.encode(x)                                        # (b, d_sae)
            x_hat = sae.decode(z)
            on = z > 0
            fired += on.sum(0)
            max_act = torch.maximum(max_act, z.amax(0))
        err_sq += float((x_hat - x).pow(2).sum())
        x_sq += float(x.double().pow(2).sum())
        x_sum += x.double().sum(0)
        l0 += float(on.sum())
        n += x.shape[0]
        if n >= max_tokens:
            break
    if n == 0:
        return None
    variance = x_sq - float(x_sum.pow(2).sum()) / n
    return {"fvu": err_sq / variance if variance > 0 else float("nan"), "l0": l0 / n,
            "dead_fraction": float((fired == 0).float().mean()), "tokens": n,
            "feature_density": (fired / n).tolist(), "feature_max_act": max_act.tolist()}


# -- the run ---------------------------------------------------------------------------------------

def _source_info(source, d_in: int) -> dict:
    """What identifies the data of a run (a resumed run must read the same)."""
    if hasattr(source, "manifest"):
        m = source.manifest
        return {"kind": "store", "model_name": m.get("model_name"), "hook_name": m.get("hook_name"),
                "model_weights_sha256": m.get("model_weights_sha256"), "n_rows": source.n_rows, "d_in": d_in}
    return {"kind": "iterator", "d_in": d_in}


def store_provenance(store) -> dict:
    """Provenance keys of saelab.json taken from an activation store's manifest."""
    m = store.manifest
    prov = {"model_name": m.get("model_name"), "model_weights_sha256": m.get("model_weights_sha256"),
            "hook_name": m.get("hook_name"), "hf_hook_name": m.get("hf_hook_name"), "hook_io": m.get("hook_io"),
            "corpus": m.get("corpus"), "context_size": m.get("context"),
            "prepend_bos": (m.get("bos") or {}).get("prepended_per_document")}
    return {k: v for k, v in prov.items() if v is not None}


def _open_run(out: Path | None, resume: bool, world: World):
    """Check ``out`` and return the checkpoint (tensors, meta), None to start fresh, or "finished"."""
    if out is None:
        if resume:
            raise ValueError("resume needs the run folder (out) that holds the checkpoint")
        return None
    ckpt = out / CHECKPOINT
    recover_dir(ckpt)
    if resume and (ckpt / "state.json").exists():
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt / 'state.json'} is not a saelab training checkpoint")
        return load_file(str(ckpt / "state.safetensors")), meta
    if resume and (out / "cfg.json").exists():
        return "finished"
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass --resume to continue the run in it, or choose a new --out")
    return None


def _check_resume(meta: dict, cfg: TrainConfig, source: dict, where: Path) -> None:
    saved = meta["config"]
    now = asdict(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in RUN_ONLY_FIELDS and saved.get(k) != now[k]]
    diff += [f"data {k}: checkpoint {meta['source'].get(k)!r}, now {v!r}" for k, v in source.items()
             if meta["source"].get(k) != v]
    if diff:
        raise ValueError(f"refusing to resume {where}: the run was started with a different configuration "
                         f"({'; '.join(diff)}). Resume with the original settings or use a new --out")


def _batches(source, cfg: TrainConfig, world: World, start: int) -> tuple[Iterator[torch.Tensor], torch.Tensor]:
    """This rank's training batches from global batch ``start`` on, and the first global batch (init sample)."""
    per_rank = cfg.batch_size // world.size
    if hasattr(source, "batches"):
        kw = dict(seed=cfg.seed, split="train", heldout_fraction=cfg.heldout_fraction, rank=world.rank,
                  world_size=world.size)
        first_it = source.batches(per_rank, start_batch=0, **kw)
        first = next(iter(first_it))
        first_it.close()
        return source.batches(per_rank, start_batch=start, **kw), first
    it = iter(source)
    for _ in range(start):          # a plain iterator cannot seek: replay it (same seed → same batches)
        next(it)
    first = next(it)
    return _chain(first, it), first


def _chain(first, rest):
    yield first
    yield from rest


class _StopOnSignals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step (a second one interrupts)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.old = trainer, {}

    def _handle(self, signum, frame) -> None:
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.stop_requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _save_checkpoint(trainer: Trainer, out: Path, source: dict) -> None:
    tensors, meta = trainer.state(source)
    with atomic_dir(out / CHECKPOINT) as tmp:
        write_tensors(tmp / "state.safetensors", tensors)
        write_json(tmp / "state.json", meta)


class _Logger:
    """JSONL records in the run folder, a tqdm bar, and optionally wandb and a callback (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, out: Path | None, world: World, start: int, callback, progress: bool):
        from tqdm import tqdm

        self.main, self.callback = world.is_main, callback
        self.file = open(out / LOG, "a", encoding="utf-8") if out is not None and self.main else None
        self.bar = tqdm(total=cfg.steps, initial=start, unit="step", desc=f"train {cfg.architecture}",
                        disable=not (progress and self.main))
        self.wandb = None
        if cfg.wandb_project and self.main:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb logging needs the wandb extra: pip install 'saelab[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project, config=asdict(cfg))
        self.t0, self.step0 = time.perf_counter(), start

    def record(self, m: dict, cfg: TrainConfig) -> None:
        self.bar.update(1)
        if not self.main or (m["step"] % cfg.log_every and m["step"] != cfg.steps):
            return
        now = time.perf_counter()
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
        rec["tokens_per_s"] = round((m["step"] - self.step0) * cfg.batch_size / max(now - self.t0, 1e-9), 1)
        self.t0, self.step0 = now, m["step"]
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.bar.set_postfix(fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_fraction']:.1%}")
        if self.wandb:
            self.wandb.log(rec, step=m["step"])
        if self.callback:
            self.callback(rec)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


def train(source, config: TrainConfig, out: str | Path | None = None, resume: bool = False,
          log: Callable[[dict], None] | None = None, progress: bool = True, provenance: dict | None = None) -> SAE:
    """Train an SAE on ``source`` (an ActivationStore, or any iterator of float32 ``[batch, d_in]`` batches).

    ``out``: the run folder; it holds ``train_log.jsonl`` and ``checkpoint/`` while training and becomes
    the SAE folder (+ the log) at the end. ``resume`` continues from its checkpoint, bitwise as if never
    stopped (a plain iterator is replayed from its start). Under torchrun, each rank reads its slice of
    every global batch of ``config.batch_size`` rows; only rank 0 writes. ``log`` receives each log
    record. ``provenance`` adds saelab.json keys (the store's manifest supplies model, hook, corpus).
    Returns the SAE for raw activations, with ``sae.provenance``.
    """
    device = _device(config)
    world = World(device)
    ok = False
    try:
        sae = _train(source, config, Path(out) if out is not None else None, resume, log, progress,
                     provenance or {}, world, device)
        ok = True
        return sae
    finally:
        if ok:
            world.close()
        elif world.owns_group:
            dist.destroy_process_group()


def _train(source, config, out, resume, log, progress, provenance, world, device) -> SAE:
    ckpt = _open_run(out, resume, world)
    if ckpt == "finished":
        return SAE.load(out)
    if config.batch_size % world.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world.size} ranks")
    start = ckpt[1]["step"] if ckpt else 0
    it, first = _batches(source, config, world, start)
    cfg = config.resolved(first.shape[1])
    trainer = Trainer(cfg, first.shape[1], world, device)
    info = _source_info(source, first.shape[1])
    if ckpt:
        _check_resume(ckpt[1], cfg, info, out)
        trainer.load_state(*ckpt)
        if world.is_main:
            truncate_jsonl_log(out / LOG, start)
    else:
        trainer.initialize(world.gather_rows(first.to(device).float()))
    if out is not None and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or previous)
    logger = _Logger(cfg, out, world, trainer.step, log, progress)
    try:
        with _StopOnSignals(trainer):
            _loop(trainer, it, out, info, logger)
    finally:
        logger.close()
        torch.use_deterministic_algorithms(previous)
    return _finish(trainer, source, it, out, info, provenance)


def _loop(trainer: Trainer, it: Iterator[torch.Tensor], out: Path | None, info: dict, logger: _Logger) -> None:
    cfg, world = trainer.cfg, trainer.world
    per_rank = cfg.batch_size // world.size
    while trainer.step < cfg.steps:
        x = next(it, None)
        if x is None:
            warnings.warn(f"the data ran out after {trainer.step} of {cfg.steps} steps; finishing early")
            return
        if x.shape != (per_rank, trainer.sae.d_in):
            raise ValueError(f"batch {trainer.step} has shape {tuple(x.shape)}, expected ({per_rank}, "
                             f"{trainer.sae.d_in}) (batch_size {cfg.batch_size} over {world.size} ranks)")
        m = trainer.train_step(x.to(trainer.device, non_blocking=True).float())
        aux_name = {"relu": "l1_penalty", "jumprelu": "l0_penalty"}.get(cfg.architecture, "auxk")
        m[aux_name] = m.pop("aux")
        logger.record(m, cfg)
        due = cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0
        if out is not None and world.is_main and trainer.step < cfg.steps and (due or trainer.stop_requested):
            _save_checkpoint(trainer, out, info)
        if trainer.stop_requested:
            where = f"; checkpoint in {out / CHECKPOINT}, continue with --resume" if out is not None else ""
            raise KeyboardInterrupt(f"training stopped by a signal at step {trainer.step}{where}")


def _finish(trainer: Trainer, source, it, out: Path | None, info: dict, provenance: dict) -> SAE:
    """Fold the scale in, evaluate on held-out data, attach provenance, save (rank 0)."""
    cfg = trainer.cfg
    sae = trainer.finished_sae()
    if not trainer.world.is_main:
        return sae
    if hasattr(source, "batches"):
        held = source.batches(cfg.batch_size, split="heldout", heldout_fraction=cfg.heldout_fraction,
                              shuffle=False, epochs=1) if _has_heldout(source, cfg) else iter(())
        if hasattr(it, "close"):
            it.close()
    else:
        held = it                   # batches the run never trained on
    stats = heldout_stats(sae, held, cfg.eval_tokens)
    if hasattr(held, "close"):
        held.close()
    prov = {**(store_provenance(source) if hasattr(source, "manifest") else {}), **provenance,
            "tokens_trained": trainer.step * cfg.batch_size, "train_config": asdict(cfg),
            "input_scale": trainer.input_scale, "trained_architecture": cfg.architecture}
    if stats:
        prov["feature_max_act"] = stats.pop("feature_max_act")
        prov["feature_density"] = stats.pop("feature_density")
        prov["held_out"] = stats
    sae.provenance = prov
    if out is not None:
        with atomic_dir(out) as tmp:
            sae.save(tmp, **prov)
            if (out / LOG).exists():
                (tmp / LOG).write_bytes((out / LOG).read_bytes())
    return sae


def _has_heldout(store, cfg: TrainConfig) -> bool:
    return cfg.heldout_fraction > 0 and store.n_rows_in("heldout", cfg.heldout_fraction) >= cfg.batch_size
