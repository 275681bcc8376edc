"""Steering figures: its cost (``speed``) and its efficacy over many features (``dial``).

    nice -n 5 python benchmarks/steer.py speed [--sae runs/x/sae] [--tokens 128] [--reps 7]
    nice -n 5 python benchmarks/steer.py dial runs/x/sae [--n 50] [--seed 0]

``speed``: steered against plain generation of the same length, same run. Both sides run HF
``generate`` greedily with the KV cache on and exactly ``--tokens`` new tokens (``min_new_tokens``).
The steered side clamps one feature (other rows: adds one, clamps one only where another fires,
clamps four, a concept of four features on one dial, clamps one at generated positions only) at the SAE's hook. Plain and steered runs alternate; the ratio of the fastest run of each
side is reported (the minimum is the estimate least disturbed by other processes on a shared CPU),
beside the median, and the hook's own time per call measured alone. Goal: ratio ≤ 1.25. Without
``--sae`` a random TopK SAE (8 × d_model latents, k = 32) at ``blocks.1.hook_resid_post`` stands in:
the hook's cost does not depend on what the weights learned.

``dial``: for ``--n`` random live features (features.db beside the SAE, else the SAE's recorded
densities), the efficacy curve of :func:`saelab.experiments.feature_curves` (the feature's own activation
on its greedy text, re-read unsteered, and the text's NLL) over clamp values 0, 1, 2, 5, 10, 20 on a few
code prompts; prints the fraction of features whose activation rises monotonically from 0× to 10× and
example curves.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from saelab.formats import load_sae
from saelab.models import load_model
from saelab.sae import SAE, SAEConfig
from saelab.experiments import feature_curves
from saelab.steer import Add, Clamp, concept_edits, edit_start, max_activations, steering
from saelab.generation import generate_ids, prompt_ids

PROMPT = "import os\n\n\ndef run_command(cmd):\n    "
DIAL_PROMPTS = ["import os\n\n\ndef main():\n    ", "class Parser:\n    def __init__(self, text):\n        ",
                "# Tests for the json module\nimport unittest\n\n\n", "def read_config(path):\n    "]


def random_sae(d_in: int) -> SAE:
    sae = SAE(SAEConfig(d_in, 8 * d_in, "topk", k=32))
    sae.reset_parameters(0)
    sae.provenance = {"hook_name": "blocks.1.hook_resid_post", "feature_max_act": [1.0] * sae.d_sae}
    return sae


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(args) -> None:
    sae = load_sae(args.sae) if args.sae else None
    lm = load_model(args.model or (sae.provenance.get("model_name") if sae else None) or "builtin")
    sae = sae or random_sae(lm.config.hidden_size)
    ids = prompt_ids(lm, PROMPT, args.tokens)
    run = lambda: generate_ids(lm, ids, max_new_tokens=args.tokens, temperature=0, exact_length=True)  # noqa: E731
    cases = {
        "clamp 1 feature 10x": {7: Clamp(10)},
        "add 1 feature 4x": {7: Add(4)},
        "clamp 1 when another fires": {7: Clamp(10, when=(11, 0.1))},
        "clamp 4 features": {7: Clamp(10), 11: Clamp(5), 13: Clamp(0), 17: Clamp(2)},
        "concept: 4 features, one dial": concept_edits([7, 11, 13, 17], 1.5),
        "clamp 1, generated positions": {7: Clamp(10)},
    }
    starts = {"clamp 1, generated positions": edit_start("generated", ids.shape[1])}
    print(f"model {lm.name}, SAE {args.sae or 'random topk'} ({sae.cfg.architecture}, d_sae={sae.d_sae}) at "
          f"{sae.provenance['hook_name']}; {ids.shape[1]}-token prompt + {args.tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {args.reps} alternating runs per side")
    run()  # warm-up
    x = torch.randn(1, 1, lm.config.hidden_size)
    for name, edits in cases.items():
        plain, steered = [], []
        start = starts.get(name, 0)
        with steering(lm, sae, edits, start=start) as hook:
            run()  # warm-up of the steered path
            hook_s = min(timed(lambda: [hook(x) for _ in range(200)]) for _ in range(3)) / 200
        for _ in range(args.reps):  # alternate, so that load changes hit both sides alike
            plain.append(timed(run))
            with steering(lm, sae, edits, start=start):
                steered.append(timed(run))
        p, s = min(plain), min(steered)
        print(f"  {name:<31} plain {p * 1e3 / args.tokens:6.2f} ms/token  steered {s * 1e3 / args.tokens:6.2f} "
              f"ms/token  ratio {s / p:.3f} (medians: {statistics.median(steered) / statistics.median(plain):.3f})  "
              f"hook alone {hook_s * 1e6:5.0f} us/call", flush=True)


def live_features(sae_dir: str, sae) -> list[int]:
    db_path = Path(sae_dir).resolve().parent / "features.db"
    if db_path.is_file():
        from saelab.featuredb import FeatureDB

        with FeatureDB.open(db_path) as db:
            return db.live_features()
    density = sae.provenance.get("feature_density")
    if density is None:
        raise SystemExit("no features.db beside the SAE and no feature_density in saelab.json: cannot tell live features")
    return [i for i, d in enumerate(density) if d > 0]


VALUES = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)


def monotonic_fraction(acts: torch.Tensor, upto: int) -> float:
    """Share of rows of ``acts [n, values]`` that never fall and end higher over the first ``upto`` values."""
    a = acts[:, :upto]
    return float(((a[:, 1:] >= a[:, :-1]).all(1) & (a[:, -1] > a[:, 0])).float().mean())


def efficacy(args) -> None:
    sae = load_sae(args.sae)
    lm = load_model(args.model or sae.provenance.get("model_name") or "builtin")
    feats = sorted(random.Random(args.seed).sample(live_features(args.sae, sae), args.n))
    maxes = torch.tensor([max_activations(sae, [f])[f] for f in feats])
    t0 = time.perf_counter()
    curves = feature_curves(lm, sae, feats, maxes, DIAL_PROMPTS, VALUES, args.max_new_tokens)  # (n, values, 2)
    for f, c, m in zip(feats, curves, maxes):
        acts = " ".join(f"{v:g}x:{a:.3f}/{n:.2f}" for v, (a, n) in zip(VALUES, c.tolist()))
        print(f"  feature {f:>5} (max {float(m):.2f})  activation (× max)/loss  {acts}")
    print(f"{len(feats)} random live features, {len(DIAL_PROMPTS)} prompts x {args.max_new_tokens} greedy tokens, "
          f"{time.perf_counter() - t0:.0f}s")
    print(f"monotonic 0x..10x: {monotonic_fraction(curves[:, :, 0], 5):.0%}; "
          f"0x..20x: {monotonic_fraction(curves[:, :, 0], 6):.0%}")
    for j, v in enumerate(VALUES):
        print(f"  {v:>4g}x: mean activation {float(curves[:, j, 0].mean()):.3f} x max act, "
              f"mean loss {float(curves[:, j, 1].mean()):.3f} nats/token")
    if args.out:
        Path(args.out).write_text(json.dumps([{"feature": f, "max_act": float(m), "values": VALUES,
                                               "activation": c[:, 0].tolist(), "loss": c[:, 1].tolist()}
                                              for f, c, m in zip(feats, curves, maxes)], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="steered vs plain generation time")
    s.add_argument("--sae", help="SAE folder (default: a random TopK SAE on the builtin model)")
    s.add_argument("--model", help="model (default: the SAE's, else builtin)")
    s.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    s.add_argument("--reps", type=int, default=7, help="timed runs per side")
    s.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a 4-layer model best)")
    d = sub.add_parser("dial", help="efficacy curves of random live features")
    d.add_argument("sae", help="SAE folder (features.db beside it is used for live features and max activations)")
    d.add_argument("--model", help="model (default: the SAE's)")
    d.add_argument("--n", type=int, default=50, help="random live features")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="torch threads")
    d.add_argument("--out", help="write the curves as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    speed(args) if args.cmd == "speed" else efficacy(args)


if __name__ == "__main__":
    main()
