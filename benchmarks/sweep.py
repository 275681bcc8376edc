"""Sweep throughput: N SAEs trained in one pass against the same N trained one after another.

    python benchmarks/sweep.py --acts runs/demo/acts [--latents 256,512,1024,2048,4096 --k 32
                               --tokens 409600 --rounds 2]

In one process, each round trains every size alone (``saelab.train.train``, no output folder) and then
all of them in one pass (``saelab.train.train_many``), on the same store, seed and batches, timing each
whole call (initialisation, the steps, the held-out evaluation). The sweep does the work of the N solo
runs, so the ratio compares its wall time with theirs added up:

    ratio = Σ_i solo wall_i / sweep wall  =  sweep tokens/s ÷ (1 / Σ_i 1/solo tokens/s_i)

(sweep tokens/s counts each token once; 1/Σ(1/r_i) is the rate of running the solos back to back).
1.0: the sweep saves nothing; above 1: it saves what the members share (reading, checksumming and
shuffling the store's batches once instead of N times); the goal is >= 0.8. Prints a table per round
and the median ratio over rounds (rounds alternate solos and sweep, so load drift hits both).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from saelab.store import ActivationStore
from saelab.sweep import parse_sizes
from saelab.train import train, train_many
from saelab.train_config import TrainConfig


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acts", required=True, help="activation store")
    p.add_argument("--latents", default="256,512,1024,2048,4096")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=409_600, help="training tokens per SAE")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens each run evaluates on")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    store = ActivationStore.open(args.acts)
    base = TrainConfig(architecture="topk", k=args.k, tokens=args.tokens, batch_size=args.batch_size,
                       eval_tokens=args.eval_tokens, checkpoint_every=0, log_every=10**9)
    configs = [replace(base, d_sae=n) for n in parse_sizes(args.latents, "--latents")]
    print(f"store {args.acts}: d_in {store.d_in}, {store.n_rows:,} rows; {len(configs)} TopK SAEs (k {args.k}), "
          f"{args.tokens:,} tokens each, batch {args.batch_size}, {torch.get_num_threads()} threads")
    # warm-up (first-use costs: thread pools, allocator, the store's page cache) outside every timing
    train(store, replace(configs[0], tokens=4 * args.batch_size, eval_tokens=args.batch_size), progress=False)
    ratios = []
    for r in range(args.rounds):
        solo = [timed(lambda c=c: train(store, c, progress=False)) for c in configs]
        both = timed(lambda: train_many(store, configs, [None] * len(configs), progress=False))
        tokens = configs[0].steps * args.batch_size
        print(f"\nround {r + 1}\n| run | wall s | tokens/s |\n|---|---:|---:|")
        for c, w in zip(configs, solo):
            print(f"| solo d_sae {c.d_sae} | {w:.1f} | {tokens / w:,.0f} |")
        seq = tokens / sum(solo)
        print(f"| solos back to back (1/Σ 1/r) | {sum(solo):.1f} | {seq:,.0f} |")
        print(f"| sweep of {len(configs)} | {both:.1f} | {tokens / both:,.0f} |")
        ratios.append(sum(solo) / both)
        print(f"ratio (goal >= 0.8): {ratios[-1]:.3f}")
    print(f"\nmedian ratio over {len(ratios)} round(s): {statistics.median(ratios):.3f} "
          f"({', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
