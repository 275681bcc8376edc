"""Time ``saelab families``: encoding the token sample with every SAE, then matching each size step.

    python benchmarks/families.py RUN/sweep [--acts STORE] [--tokens 16384]
    python benchmarks/families.py --synthetic 256,512,1024,2048,4096 [--d-in 192] [--k 32]

The first form runs on a trained sweep (the store's held-out rows, as the command does) and prints per
step the seconds and the counts persist / split (children) / vanished / new. ``--synthetic`` times
randomly initialised TopK SAEs on Gaussian rows instead: no structure, so nothing persists, and the
co-firing pairs are as many and as scattered as they can be (the slow case for the histogram).
"""

import argparse
import time

import torch

from saelab.families import FamilyConfig, encode_sample, match
from saelab.family_io import find_store, load_members, read_sweep, sample_rows
from saelab.sae import SAE, SAEConfig
from saelab.store import ActivationStore


def synthetic(sizes: list[int], d_in: int, k: int, tokens: int) -> tuple[list, torch.Tensor, list[str]]:
    saes = []
    for i, d in enumerate(sizes):
        sae = SAE(SAEConfig(d_in=d_in, d_sae=d, architecture="topk", k=k))
        sae.reset_parameters(seed=i)
        saes.append(sae.eval())
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(0))
    return saes, x, [f"latents-{d:05d}" for d in sizes]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", nargs="*")
    ap.add_argument("--acts")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--synthetic", help="comma-separated sizes of random TopK SAEs instead of a sweep")
    ap.add_argument("--d-in", type=int, default=192)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    if args.synthetic:
        saes, x, names = synthetic([int(s) for s in args.synthetic.split(",")], args.d_in, args.k, args.tokens)
    else:
        sweep = read_sweep(args.sweep)
        saes = load_members(sweep)
        frac = float((saes[0].provenance.get("train_config") or {}).get("heldout_fraction") or 0.05)
        x, sample = sample_rows(ActivationStore.open(find_store(sweep, args.acts)), args.tokens, frac)
        names = [m["name"] for m in sweep.members]
        print(f"sample: {sample}")
    cfg = FamilyConfig()
    t0 = time.perf_counter()
    codes = [encode_sample(s, x, cfg.batch) for s in saes]
    t_enc = time.perf_counter() - t0
    print(f"{len(saes)} SAEs, {x.shape[0]} tokens, d_in {x.shape[1]}: encode {t_enc:.1f} s")
    total = t_enc
    for t in range(len(saes) - 1):
        t1 = time.perf_counter()
        step = match(saes[t], codes[t], saes[t + 1], codes[t + 1], cfg)
        dt = time.perf_counter() - t1
        total += dt
        c = step.counts
        print(f"{names[t]} → {names[t + 1]}: {dt:.1f} s  persist {c['persist']}  split {c['split']} "
              f"({c['split_children']} children)  vanished {c['vanished']}  new {c['new']}")
    print(f"total {total:.1f} s")


if __name__ == "__main__":
    main()
