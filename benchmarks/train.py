"""TopK SAE training speed on CPU against its floor, one dense ``x @ W_enc`` of the same shape.

    nice -n 5 python benchmarks/train.py [--sizes 4096 16384] [--reps 5] [--dead 0.01] [--threads N]

For each d_sae it times, in one run: the floor (one fp32 ``(batch, d_in) @ (d_in, d_sae)`` matmul),
the full sparse training step (``Trainer.train_step``: encoder, top-k, sparse decoder, AuxK on a
``--dead`` fraction of dead latents, hand-made sparse backward, Adam, decoder projection and
renormalisation) and, as the "before" baseline, the same step done the plain way (dense latents,
dense decoder product, autograd, Adam). Prints tokens/s and the ratios to the floor (goal ≥ 0.40).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from saelab.sae import SAE, SAEConfig
from saelab.train import TrainConfig, Trainer, World


def median_time(fn, reps: int) -> float:
    fn()                                        # warm-up (allocations, thread pool)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_step(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, k: int) -> None:
    """The unoptimised TopK step: dense (batch, d_sae) latents, dense decoder, autograd."""
    opt.zero_grad(set_to_none=True)
    pre = sae.pre_acts(x)
    vals, idx = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
    loss = (z @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
    loss.backward()
    sae.remove_parallel_decoder_grad()
    opt.step()
    sae.set_decoder_norm_to_unit()


def bench(d_in: int, d_sae: int, k: int, batch: int, reps: int, dead: float) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    W = torch.randn(d_in, d_sae) / d_in ** 0.5
    floor = median_time(lambda: x @ W, reps)

    cfg = TrainConfig(d_sae=d_sae, k=k, batch_size=batch, tokens=batch * 1000).resolved(d_in)
    trainer = Trainer(cfg, d_in, World(torch.device("cpu")), torch.device("cpu"))
    trainer.initialize(x)
    n_dead = int(dead * d_sae)
    trainer.since_fired[:n_dead] = 10 * cfg.dead_tokens              # these latents count as dead

    def sparse():
        trainer.since_fired[:n_dead] = 10 * cfg.dead_tokens
        trainer.train_step(x)

    step = median_time(sparse, reps)
    sae = SAE(SAEConfig(d_in, d_sae, "topk", k))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    before = median_time(lambda: dense_step(sae, opt, x, k), max(1, reps // 2))
    return {"d_sae": d_sae, "floor_tok_s": batch / floor, "step_tok_s": batch / step,
            "dense_tok_s": batch / before, "ratio": floor / step, "dense_ratio": floor / before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--d-in", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dead", type=float, default=0.01, help="fraction of dead latents (AuxK work)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"d_in={args.d_in} k={args.k} batch={args.batch} dead={args.dead:.0%} threads={torch.get_num_threads()}")
    print(f"{'d_sae':>6} {'matmul tok/s':>13} {'step tok/s':>11} {'ratio':>6} {'dense step tok/s':>17} {'ratio':>6}")
    for d_sae in args.sizes:
        r = bench(args.d_in, d_sae, args.k, args.batch, args.reps, args.dead)
        print(f"{r['d_sae']:>6} {r['floor_tok_s']:>13,.0f} {r['step_tok_s']:>11,.0f} {r['ratio']:>6.2f} "
              f"{r['dense_tok_s']:>17,.0f} {r['dense_ratio']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
