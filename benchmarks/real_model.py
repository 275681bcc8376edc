"""A real model's stages beside its bare forward passes, in one process, and eval's CE against an
independent BOS-led computation.

    python benchmarks/real_model.py runs/smollm2/sae [--tokens 16384] [--rounds 2]

Lines (all over the same BOS-led windows of the SAE's corpus, validation split, tokenised beforehand):
  A  forward to the hook (``run_to_hooks``): the floor for harvest and analysis
  B  ``saelab.harvest`` of the same number of tokens into a temporary store (fp16, as the SmolLM2 run)
  C  the analysis pass (forward + SAE encode + streaming statistics: ``info["tokens_per_s"]``)
  F  full-depth forward (logits): the floor for evaluation
  E  ``saelab.evaluate`` (clean + spliced + zero-ablated; the self-check on the first batch)
Every line runs with saelab's malloc tuning (the library's long jobs apply it; so must the floors) after
one warm-up batch. Ratios B/A, C/A and E/F are per round; odd rounds run the lines in reverse order, so a
load that rises or falls during a round favours neither side. Then the independent check:
CE clean / spliced / zero-ablated from plain HF forwards with ``labels=`` (its own shift), the SAE's
reconstruction put in by an intervention at the positions the SAE's position rule keeps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from saelab.analyze import AnalyzeConfig, analyze
from saelab.corpus import bos_token_id
from saelab.token_cache import sequences
from saelab.evaluate import evaluate
from saelab.featuredb import FeatureDB
from saelab.formats import load_sae
from saelab.harvest import harvest
from saelab.hooks import intervene, run_to_hooks
from saelab.models import load_model
from saelab.positions import PositionRule
from saelab.provenance import stage_inputs
from saelab.runtime import tune_allocator


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def independent_ce(lm, sae, hook, ids, rule, batch):
    """(clean, spliced, zero-ablated) mean CE over every next-token prediction of ``ids``."""
    sums = [0.0, 0.0, 0.0]
    n = 0
    for b in ids.split(batch):
        x = run_to_hooks(lm.model, b, [hook])[hook]
        keep = rule.keep(b, x.norm(dim=-1))
        for i, values in enumerate((None, lambda a: sae(a).x_hat, torch.zeros_like)):
            def put(a, values=values):
                out = a.clone()
                out[keep] = values(a[keep]).to(a.dtype)
                return out
            with intervene(lm, {hook: put}) if values else contextlib.nullcontext():
                loss = lm.model(input_ids=b, labels=b).loss.item()
            sums[i] += loss * b.shape[0] * (b.shape[1] - 1)
        n += b.shape[0] * (b.shape[1] - 1)
    return [s / n for s in sums]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sae")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tune_allocator()
    sae = load_sae(args.sae)
    run = stage_inputs(sae)
    lm = load_model(run.model_name)
    ctx = run.context
    ids = torch.stack(list(islice(sequences(run.corpus, lm.tokenizer, ctx, 0), -(-args.tokens // ctx))))
    n_tok = ids.numel()
    rule = PositionRule(bos_token_id(lm.tokenizer) if run.exclude_bos else None, run.provenance.sink_factor)
    print(f"model {lm.name}, hook {run.hook}, corpus {run.corpus.source}/{run.corpus.split}, {n_tok:,} tokens, "
          f"context {ctx}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    def bare_to_hook():
        for b in ids.split(args.batch_size):
            run_to_hooks(lm.model, b, [run.hook])

    def bare_full():
        with torch.no_grad():
            for b in ids.split(args.batch_size):
                lm.model(input_ids=b, use_cache=False)

    with torch.no_grad():
        lm.model(input_ids=ids[:args.batch_size], use_cache=False)          # warm-up
    ratios = {"B/A harvest": [], "C/A analysis": [], "E/F eval": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = AnalyzeConfig(tokens=n_tok, batch_size=args.batch_size, split="validation", map="none",
                                explain=False)

            def analysis() -> float:
                db = analyze(sae, lm, run.corpus.source, out=Path(tmp) / "f.db", config=cfg, progress=False)
                with FeatureDB.open(db) as fdb:
                    return n_tok / fdb.sae_info()["tokens_per_s"]           # seconds of the pass itself

            lines = {"A": bare_to_hook, "B": lambda: harvest(
                         lm, run.hook, run.corpus, tokens=n_tok, out=Path(tmp) / "acts", context=ctx,
                         batch_size=args.batch_size, dtype="float16", progress=False),
                     "C": analysis, "F": bare_full,
                     "E": lambda: evaluate(sae, lm, ids, tokens=n_tok, batch_size=args.batch_size, progress=False)}
            secs = {}
            for name in (list(lines) if r % 2 == 0 else list(reversed(lines))):
                secs[name] = lines[name]() if name == "C" else timed(lines[name])
        a, b, f, e = secs["A"], secs["B"], secs["F"], secs["E"]
        c_tps = n_tok / secs["C"]
        ratios["B/A harvest"].append(a / b)
        ratios["C/A analysis"].append(c_tps / (n_tok / a))
        ratios["E/F eval"].append(f / e)
        print(f"round {r}: A {n_tok / a:7.0f} tok/s  B {n_tok / b:7.0f}  C {c_tps:7.0f}  F {n_tok / f:7.0f}  "
              f"E {n_tok / e:7.0f}  | B/A {a / b:.3f}  C/A {c_tps / (n_tok / a):.3f}  E/F {f / e:.3f}")
    for name, vals in ratios.items():
        print(f"{name}: median {statistics.median(vals):.3f}  (rounds: {', '.join(f'{v:.3f}' for v in vals)})")
    report = evaluate(sae, lm, ids, tokens=n_tok, batch_size=args.batch_size, progress=False)
    clean, spliced, zero = independent_ce(lm, sae, run.hook, ids, rule, args.batch_size)
    d = report.downstream
    ind = (zero - spliced) / (zero - clean)
    print(f"saelab eval:  CE clean {d.ce_clean:.4f}  spliced {d.ce_spliced:.4f}  zero {d.ce_zero_ablated:.4f}  "
          f"recovered {d.ce_recovered_zero:.4f}  KL {d.kl_spliced:.4f}  FVU {report.reconstruction.fvu:.4f}")
    print(f"independent:  CE clean {clean:.4f}  spliced {spliced:.4f}  zero {zero:.4f}  recovered {ind:.4f}  "
          f"|difference| {abs(ind - d.ce_recovered_zero):.4f}")


if __name__ == "__main__":
    main()
