"""Harvest throughput vs the model's bare forward passes, measured in one run.

    python benchmarks/harvest.py [--model builtin] [--hook blocks.2.hook_resid_post] [--tokens 262144]
    python benchmarks/harvest.py --hook blocks.0.hook_resid_post,blocks.1.hook_resid_post,blocks.2.hook_resid_post

A  bare forward: the same model, the same token batches (pre-tokenised here, so it pays no
   tokenisation), the forward stopped after the same layer (``run_to_hooks``; its hook keeps a
   reference and stores nothing). With several hooks (a comma list), the forward to the *deepest*
   one only: B then writes one store per hook from one pass, and B/A is what the other hooks cost.
B  ``saelab.harvest`` end to end into a temporary store, the corpus read from the token cache (the
   normal case after a corpus's first use): packing, forward, NaN checks, statistics, shard
   writing, sha256, fsync.
C  the same harvest tokenising on the fly (``SAELAB_TOKEN_CACHE=0``, as for ``hf:`` corpora).
The one-time cost of building the token cache is measured first, in a fresh cache folder.
Both sides run under the same malloc settings: ``saelab.runtime.tune_allocator`` is applied
before anything is measured (``SAELAB_MALLOC_TUNING=0`` measures both without it).
The three run in ``--repeats`` rounds (order rotating) because other jobs share the CPU; prints the
best tokens/s of each, the ratios (target B/A >= 0.90) and the median per-round ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saelab.corpus import CorpusSpec
from saelab.harvest import harvest
from saelab.hooks import resolve, run_to_hooks
from saelab.models import load_model
from saelab.runtime import tune_allocator
from saelab.token_cache import sequences


def bare_forward(lm, batches: list[torch.Tensor], hook: str) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    for ids in batches:
        run_to_hooks(lm.model, ids, [hook])
    return time.perf_counter() - start, time.process_time() - cpu


def deepest(lm, hooks: list[str]) -> str:
    """The hook a forward must reach to serve all of ``hooks`` (canonical names: the highest block)."""
    points = [resolve(lm.model, h) for h in hooks]
    if len(points) > 1 and any(p.layer is None for p in points):
        raise SystemExit("several hooks: give canonical names (blocks.L....), whose depth is known")
    return max(points, key=lambda p: p.layer or 0).name


def full_harvest(lm, hook: str | list[str], corpus: CorpusSpec, tokens: int, context: int, batch_size: int,
                 dtype: str, cached: bool) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="saelab-bench-")) / "store"
    os.environ["SAELAB_TOKEN_CACHE"] = "1" if cached else "0"
    try:
        start, cpu = time.perf_counter(), time.process_time()
        harvest(lm, hook, corpus, tokens=tokens, out=out, context=context, batch_size=batch_size, dtype=dtype,
                progress=False)
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        os.environ.pop("SAELAB_TOKEN_CACHE")
        shutil.rmtree(out.parent)


PEAK_RSS = """
import resource, sys, tempfile
from saelab.harvest import harvest
with tempfile.TemporaryDirectory() as d:
    harvest(sys.argv[1], sys.argv[2].split(","), sys.argv[3], tokens=int(sys.argv[4]), out=d + "/s", progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(model: str, hook: str, corpus: str, tokens: int) -> float:
    """Peak resident memory of a fresh process that harvests ``tokens`` (token cache already built)."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, model, hook, corpus, str(tokens)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--hook", default="blocks.2.hook_resid_post", help="a hook, or a comma list (one pass)")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=4, help="bare/harvest pairs, order alternating")
    p.add_argument("--memory", default="", metavar="N,N,...",
                   help="also print the peak resident memory of harvests of these token counts (fresh processes)")
    args = p.parse_args()

    tuned = tune_allocator()   # harvest() would apply it anyway; do it before A is measured too
    lm = load_model(args.model)
    lm.weights_hash  # computed once per model (cached); not part of the per-token cost
    hooks = args.hook.split(",")
    bare_hook, harvest_hooks = deepest(lm, hooks), (hooks if len(hooks) > 1 else hooks[0])
    corpus = CorpusSpec(args.corpus)
    n_seqs = -(-args.tokens // args.context)
    os.environ["SAELAB_CACHE"] = cache = tempfile.mkdtemp(prefix="saelab-bench-cache-")
    start, cpu = time.perf_counter(), time.process_time()
    seqs = list(itertools.islice(sequences(corpus, lm.tokenizer, args.context, 0), n_seqs))  # builds the cache
    build = (time.perf_counter() - start, time.process_time() - cpu)
    cache_tokens = sum(f.stat().st_size for f in Path(cache).rglob("tokens.bin")) // 4
    batches = [torch.stack(seqs[i:i + args.batch_size]) for i in range(0, len(seqs), args.batch_size)]
    tokens = sum(b.numel() for b in batches)
    run_to_hooks(lm.model, batches[0], [bare_hook])  # warm-up
    load0 = os.getloadavg()[0]
    bare, warm, fly = [], [], []
    for r in range(args.repeats):  # rotate the order so that a drifting load favours none
        for which in [(0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1)][r % 4]:
            if which == 0:
                bare.append(bare_forward(lm, batches, bare_hook))
            else:
                (warm if which == 1 else fly).append(full_harvest(lm, harvest_hooks, corpus, tokens, args.context,
                                                                  args.batch_size, args.dtype, cached=which == 1))
    rss = {n: peak_rss_mb(args.model, args.hook, args.corpus, n) for n in map(int, filter(None, args.memory.split(",")))}
    shutil.rmtree(cache)
    runs_of = {"bare": bare, "warm": warm, "fly": fly}
    best = {name: tokens / min(t for t, _ in runs) for name, runs in runs_of.items()}
    print(f"model {args.model}, hook {args.hook} (bare forward to {bare_hook}), {tokens:,} tokens, context {args.context}, "
          f"batch {args.batch_size} x {args.context}, store dtype {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, malloc tuning {'on' if tuned else 'off'}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"one-time token cache build: {cache_tokens:,} tokens of {args.corpus} in {build[0]:.1f}s "
          f"(CPU {build[1]:.1f}s)")
    rows = (("A bare forward, pre-tokenised batches", "bare", bare), ("B harvest, token cache", "warm", warm),
            ("C harvest, tokenising on the fly", "fly", fly))
    for label, key, runs in rows:
        print(f"{label:<40}{best[key]:10,.0f} tokens/s best  (wall {', '.join(f'{t:.1f}s' for t, _ in runs)}; "
              f"CPU {', '.join(f'{c:.1f}s' for _, c in runs)})")
    for label, a, b in (("B / A (target >= 0.90)", "warm", "bare"), ("C / A (tokenising on the fly)", "fly", "bare")):
        pairs = sorted(x[0] / y[0] for x, y in zip(runs_of[b], runs_of[a]))
        print(f"ratio {label:<34}{best[a] / best[b]:10.3f} best of each; median pair {statistics.median(pairs):.3f}")
    for n, mb in rss.items():
        print(f"peak resident memory, harvest of {n:>10,} tokens: {mb:8.0f} MB")


if __name__ == "__main__":
    main()
