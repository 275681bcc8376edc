"""Analysis pass tokens/s beside the bare forward-to-hook tokens/s (what harvest does, minus disk writes).

    python benchmarks/analyze_throughput.py SAE_DIR [--tokens 200000]

Both run over the same token batches in the same process; the ratio is the cost of the SAE encode and
the streaming statistics on top of the model forward.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saelab.analyze import AnalyzeConfig, analyze, resolve_inputs, token_batches
from saelab.featuredb import FeatureDB
from saelab.hooks import run_to_hooks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sae")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    setup = resolve_inputs(args.sae)
    context = int(setup.sae.provenance.get("context_size") or 128)
    cfg = AnalyzeConfig(tokens=args.tokens, batch_size=args.batch_size)
    batches = [b for b, _ in token_batches(setup.lm, setup.corpus, cfg, context)]  # tokenise outside the timing
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            run_to_hooks(setup.lm.model, ids, setup.hook)
    forward_tps = sum(b.numel() for b in batches) / (time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        for ids in batches:
            x = run_to_hooks(setup.lm.model, ids, setup.hook)[setup.hook]
            setup.sae.encode_topk(x.reshape(-1, x.shape[-1])) if setup.sae.cfg.architecture == "topk" \
                else setup.sae.encode(x)
    encode_tps = sum(b.numel() for b in batches) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = analyze(setup.sae, setup.lm, setup.corpus, out=Path(tmp) / "f.db", hook=setup.hook, config=cfg,
                      progress=False, map="pca")
        total = time.perf_counter() - start
        info = FeatureDB.open(out).sae_info()
    print(f"model {setup.lm.name}, hook {setup.hook}, d_sae {setup.sae.d_sae}, {info['tokens_read']:,} tokens, "
          f"context {context}, batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"forward to hook only (harvest's work): {forward_tps:10,.0f} tokens/s")
    print(f"forward + SAE encode (no statistics):  {encode_tps:10,.0f} tokens/s  ratio {encode_tps / forward_tps:.2f}")
    print(f"analysis pass (forward + SAE + stats): {info['tokens_per_s']:10,.0f} tokens/s  "
          f"ratio {info['tokens_per_s'] / forward_tps:.2f}")
    print(f"whole analyze() incl. tokenising, neighbours, map, explanations, DB: {total:.1f} s")


if __name__ == "__main__":
    main()
