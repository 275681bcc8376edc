"""One SAE and its optimiser: the step (each architecture's loss is its class's, :mod:`saelab.arch`),
the initialisation, checkpoint state, and held-out statistics. :mod:`saelab.train` runs it over data (resume, logging, DDP, saving).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Iterable

import torch
from torch.nn import functional as F

from saelab.arch import StepStats
from saelab.distributed import World
from saelab.errors import SaelabError
from saelab.metrics import dead_fraction, fvu
from saelab.sae import SAE, SAEConfig
from saelab.train_config import TrainConfig, lr_at

CHECKPOINT_FORMAT = "saelab-train-checkpoint"


class NonFiniteLoss(SaelabError, ValueError):
    """The inputs or the loss hold NaN/inf: the run stops before the step and nothing is checkpointed."""


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


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Owns the SAE, Adam, schedules and dead-latent counters; :meth:`train_step` is one update."""

    def __init__(self, cfg: TrainConfig, d_in: int, world: World, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        sae = SAE(SAEConfig(d_in, cfg.d_sae, cfg.architecture, cfg.k))
        self.rule = sae.rule  # the architecture: its loss, its schedule, its constraints
        sae.reset_parameters(seed=cfg.seed if cfg.init_seed is None else cfg.init_seed)
        self.rule.init(sae, cfg)
        self.sae = sae.to(device).train()
        self.params = {n: p for n, p in sae.named_parameters() if p.requires_grad}
        if self.rule.hand_gradients:
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
        bad = int((~torch.isfinite(sample)).any(dim=1).sum())
        if bad:  # else the input scale (and every later step) would be NaN, reported as "all zeros" or a NaN loss
            raise NonFiniteLoss(f"the first batch of activations holds NaN/inf values ({bad} of {sample.shape[0]} "
                                "rows); check the store with 'saelab store verify' and re-harvest it with "
                                "nan_policy='skip'")
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
        for p in self.params.values():
            p.grad = None
        stats = self.rule.loss(sae, self.params, x, cfg, self.step, self.dead)
        params = list(self.params.values())
        self.world.mean_grads_(params)
        reduced = self._reduce(x, stats)
        loss = reduced["loss"]
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the loss became {loss} at step {self.step} (lr {lr:.3g}); the run is stopped and "
                                "the last checkpoint kept. Lower the learning rate (--lr) or check the inputs")
        if self.rule.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        self.opt.step()
        self._after_update(reduced, x)
        self.step += 1
        return {"step": self.step, "tokens": self.step * cfg.batch_size, **reduced, "lr": lr,
                "dead_fraction": float(self.dead.float().mean())}

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
        self.stop_requested = stop > 0
        return {"loss": loss / self.world.size, "mse": err_sq / n, "aux": aux / self.world.size,
                "fvu": fvu(err_sq, x_sq, x_sum, int(n)), "l0": active / n,
                "_fired": fired, "_tokens": int(n), "_min_kept": kept_sum / kept_n if kept_n else None}

    @torch.no_grad()
    def _after_update(self, reduced: dict, x: torch.Tensor) -> None:
        cfg = self.cfg
        self.rule.after_update(self.sae)
        self.since_fired += reduced.pop("_tokens")
        self.since_fired[reduced.pop("_fired") > 0] = 0
        min_kept = reduced.pop("_min_kept")
        if self.rule.learns_batch_threshold and min_kept is not None:
            self.threshold_sum += min_kept
            self.threshold_count += 1
        every = cfg.resample_every
        if (self.rule.resamples_dead and every and (self.step + 1) % every == 0
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
        if self.rule.learns_batch_threshold:
            if not self.threshold_count:
                raise ValueError(f"{self.cfg.architecture} training kept no positive activation; "
                                 "no threshold can be learned")
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
        vals, idx = sae.encode_sparse(x)                             # (b, k) or (b, most firing)
        x_hat = sae.decode_sparse(vals, idx)
        on = vals > 0
        fired.index_add_(0, idx[on], torch.ones(int(on.sum()), device=device))
        max_act.scatter_reduce_(0, idx.reshape(-1), vals.reshape(-1), "amax")
        err_sq += float((x_hat - x).pow(2).sum())
        x_sq += float(x.double().pow(2).sum())
        x_sum += x.double().sum(0)
        l0 += float(on.sum())
        n += x.shape[0]
        if n >= max_tokens:
            break
    if n == 0:
        return None
    return {"fvu": fvu(err_sq, x_sq, x_sum, n), "l0": l0 / n, "dead_fraction": dead_fraction(fired), "tokens": n,
            "feature_density": (fired / n).tolist(), "feature_max_act": max_act.tolist()}
