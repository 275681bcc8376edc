"""Cost of steering: steered generation against plain generation of the same length, same run.

    nice -n 5 python benchmarks/steer.py [--sae runs/x/sae] [--tokens 128] [--reps 5]

Both sides run HF ``generate`` greedily with the KV cache on and exactly ``--tokens`` new tokens
(``min_new_tokens``), on the builtin model unless the SAE names another. The steered side clamps
one feature (and, in the other rows, adds one, or clamps one only where another fires, or clamps
four) at the SAE's hook. Plain and steered runs alternate and the medians are compared (goal: ≤ 1.25).
Without ``--sae`` a random TopK SAE (8 × d_model latents, k = 32) at ``blocks.1.hook_resid_post``
stands in: the hook's cost does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelab.models import load_model
from saelab.sae import SAE, SAEConfig
from saelab.steer import Add, Clamp, generate_ids, prompt_ids, steering

PROMPT = "import os\n\n\ndef run_command(cmd):\n    "


def random_sae(d_in: int) -> SAE:
    sae = SAE(SAEConfig(d_in, 8 * d_in, "topk", k=32))
    sae.reset_parameters(0)
    sae.provenance = {"hook_name": "blocks.1.hook_resid_post", "feature_max_act": [1.0] * sae.d_sae}
    return sae


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", help="SAE folder (default: a random TopK SAE on the builtin model)")
    ap.add_argument("--model", help="model (default: the SAE's, else builtin)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per side (median)")
    args = ap.parse_args()

    sae = SAE.load(args.sae) if args.sae else None
    lm = load_model(args.model or (sae.provenance.get("model_name") if sae else None) or "builtin")
    sae = sae or random_sae(lm.config.hidden_size)
    ids = prompt_ids(lm, PROMPT, args.tokens)
    run = lambda: generate_ids(lm, ids, max_new_tokens=args.tokens, temperature=0, exact_length=True)  # noqa: E731
    cases = {
        "clamp 1 feature 10x": {7: Clamp(10)},
        "add 1 feature 4x": {7: Add(4)},
        "clamp 1 when another fires": {7: Clamp(10, when=(11, 0.1))},
        "clamp 4 features": {7: Clamp(10), 11: Clamp(5), 13: Clamp(0), 17: Clamp(2)},
    }
    print(f"model {lm.name}, SAE {args.sae or 'random topk'} ({sae.cfg.architecture}, d_sae={sae.d_sae}) at "
          f"{sae.provenance['hook_name']}; {ids.shape[1]}-token prompt + {args.tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    run()  # warm-up
    for name, edits in cases.items():
        plain, steered = [], []
        with steering(lm, sae, edits):
            run()  # warm-up of the steered path
        for _ in range(args.reps):  # alternate, so that load changes hit both sides alike
            plain.append(timed(run))
            with steering(lm, sae, edits):
                steered.append(timed(run))
        p, s = statistics.median(plain), statistics.median(steered)
        print(f"  {name:<28} plain {p * 1e3 / args.tokens:6.2f} ms/token   steered {s * 1e3 / args.tokens:6.2f} "
              f"ms/token   ratio {s / p:.3f}")


if __name__ == "__main__":
    main()
