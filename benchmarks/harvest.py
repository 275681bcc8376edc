"""Harvest throughput vs the model's bare forward passes, measured in one run.

    python benchmarks/harvest.py [--model builtin] [--hook blocks.2.hook_resid_post] [--tokens 262144]

Baseline: the same model, the same token batches (pre-tokenised here, so the baseline pays no
tokenisation), the forward stopped after the same layer (``run_to_hooks``; its hook keeps a
reference and stores nothing). Harvest: ``saelab.harvest`` end to end into a temporary store:
corpus reading and tokenisation, forward, NaN checks, statistics, shard serialisation, sha256,
fsync. A middle line B (corpus tokenised in a thread exactly as harvest does, then the same
forwards, nothing captured or stored) separates the cost of tokenising from that of the store.
The three run in ``--repeats`` rounds (order rotating) because other jobs share the CPU; prints the
best tokens/s of each, the ratios (target C/A >= 0.90) and the median per-round ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saelab.corpus import CorpusSpec, sequences
from saelab.harvest import PREFETCH_BATCHES, _batched, harvest
from saelab.hooks import run_to_hooks
from saelab.models import load_model
from saelab.store import prefetched


def bare_forward(lm, batches: list[torch.Tensor], hook: str) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for ids in batches:
        run_to_hooks(lm.model, ids, [hook])
    return time.perf_counter() - start, time.process_time() - cpu


def corpus_forward(lm, hook: str, corpus: CorpusSpec, n_seqs: int, context: int,
                   batch_size: int) -> tuple[float, float]:
    """Tokenise the corpus (in a thread, as harvest does) and run the same forward passes: no capture, no store."""
    start, cpu = time.perf_counter(), time.process_time()
    batches = _batched(itertools.islice(sequences(corpus, lm.tokenizer, context, 0), n_seqs), batch_size)
    for ids in prefetched(batches, PREFETCH_BATCHES):
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
    p.add_argument("--repeats", type=int, default=4, help="bare/harvest pairs, order alternating")
    args = p.parse_args()

    lm = load_model(args.model)
    lm.weights_hash  # computed once per model (cached); not part of the per-token cost
    corpus = CorpusSpec(args.corpus)
    n_seqs = -(-args.tokens // args.context)
    seqs = list(itertools.islice(sequences(corpus, lm.tokenizer, args.context, 0), n_seqs))
    batches = [torch.stack(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]
    tokens = sum(b.numel() for b in batches)
    run_to_hooks(lm.model, batches[0], [args.hook])  # warm-up
    load0 = os.getloadavg()[0]
    bare, tok, full = [], [], []
    for r in range(args.repeats):  # rotate the order so that a drifting load favours none
        for which in [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1)][r % 4]:
            if which == 0:
                bare.append(bare_forward(lm, batches, args.hook))
            elif which == 1:
                tok.append(corpus_forward(lm, args.hook, corpus, len(seqs), args.context, args.batch_size))
            else:
                full.append(full_harvest(lm, args.hook, corpus, tokens, args.context, args.batch_size, args.dtype))
    best = {name: tokens / min(t for t, _ in runs) for name, runs in (("bare", bare), ("tok", tok), ("full", full))}
    print(f"model {args.model}, hook {args.hook}, {tokens:,} tokens, context {args.context}, "
          f"batch {args.batch_size} x {args.context}, store dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    rows = (("A bare forward, pre-tokenised batches", "bare", bare), ("B tokenise corpus + forward", "tok", tok),
            ("C harvest to a store", "full", full))
    for label, key, runs in rows:
        print(f"{label:<40}{best[key]:10,.0f} tokens/s best  (wall {', '.join(f'{t:.1f}s' for t, _ in runs)}; "
              f"CPU {', '.join(f'{c:.1f}s' for _, c in runs)})")
    for label, a, b in (("C / A (target >= 0.90)", "full", "bare"), ("C / B (cost of capture + store)", "full", "tok"),
                        ("B / A (cost of tokenising)", "tok", "bare")):
        pairs = sorted(x[0] / y[0] for x, y in zip(dict(bare=bare, tok=tok, full=full)[b],
                                                   dict(bare=bare, tok=tok, full=full)[a]))
        print(f"ratio {label:<34}{best[a] / best[b]:10.3f} best of each; median pair {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
