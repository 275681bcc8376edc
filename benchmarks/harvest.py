"""Harvest throughput vs the model's bare forward passes, measured in one run.

    python benchmarks/harvest.py [--model builtin] [--hook blocks.2.hook_resid_post] [--tokens 262144]

Baseline: the same model, the same token batches (pre-tokenised here, so the baseline pays no
tokenisation), the forward stopped after the same layer (``run_to_hooks``; its hook keeps a
reference and stores nothing). Harvest: ``saelab.harvest`` end to end into a temporary store:
corpus reading and tokenisation, forward, NaN checks, statistics, shard serialisation, sha256,
fsync. The two are interleaved ``--repeats`` times and the best of each is kept, because other
jobs share the CPU. Prints tokens/s of both and the ratio (target >= 0.90).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saelab.corpus import CorpusSpec, sequences
from saelab.harvest import harvest
from saelab.hooks import run_to_hooks
from saelab.models import load_model


def bare_forward(lm, batches: list[torch.Tensor], hook: str) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for ids in batches:
        run_to_hooks(lm.model, ids, [hook])
    return time.perf_counter() - start, time.process_time() - cpu


def full_harvest(lm, hook: str, corpus: CorpusSpec, tokens: int, context: int, batch_size: int,
                 dtype: str) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="saelab-bench-")) / "store"
    try:
        start, cpu = time.perf_counter(), time.process_time()
        harvest(lm, hook, corpus, tokens=tokens, out=out, context=context, batch_size=batch_size, dtype=dtype,
                progress=False)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        shutil.rmtree(out.parent)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--hook", default="blocks.2.hook_resid_post")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    lm = load_model(args.model)
    lm.weights_hash  # computed once per model (cached); not part of the per-token cost
    corpus = CorpusSpec(args.corpus)
    n_seqs = -(-args.tokens // args.context)
    seqs = list(itertools.islice(sequences(corpus, lm.tokenizer, args.context, 0), n_seqs))
    batches = [torch.stack(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]
    tokens = sum(b.numel() for b in batches)
    run_to_hooks(lm.model, batches[0], [args.hook])  # warm-up
    bare, full = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(lm, batches, args.hook))
        full.append(full_harvest(lm, args.hook, corpus, tokens, args.context, args.batch_size, args.dtype))
    bare_tps, full_tps = tokens / min(t for t, _ in bare), tokens / min(t for t, _ in full)
    bare_cpu, full_cpu = min(c for _, c in bare), min(c for _, c in full)
    print(f"model {args.model}, hook {args.hook}, {tokens:,} tokens, context {args.context}, "
          f"batch {args.batch_size} x {args.context}, store dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    for label, tps, runs in (("bare forward (stopped at the hook)", bare_tps, bare), ("harvest to a store", full_tps, full)):
        print(f"{label:<36}{tps:10,.0f} tokens/s  (wall {', '.join(f'{t:.1f}s' for t, _ in runs)}; "
              f"CPU {', '.join(f'{c:.1f}s' for _, c in runs)})")
    print(f"{'ratio harvest / bare forward':<36}{full_tps / bare_tps:10.3f}  (wall clock; target >= 0.90)")
    print(f"{'ratio of CPU time bare / harvest':<36}{bare_cpu / full_cpu:10.3f}  (all threads of this process)")

if __name__ == "__main__":
    main()
