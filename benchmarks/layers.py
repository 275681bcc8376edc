"""Where to read SmolLM2's concepts: SAEs at several depths, same width and budget (issue 23).

    python benchmarks/layers.py ACTS --out RUN [--latents 8192] [--k 32] [--tokens 1000000]
        [--eval-tokens 8192] [--concepts saelab/prompts/concepts-smollm2] [--report docs/experiments/layers]

``ACTS`` is a multi-hook harvest folder (``saelab harvest --hook A,B,...``, or ``saelab store prefix`` of one):
one store per depth. For each store, in depth order:

1. train a TopK SAE (``--latents``, ``--k``, ``--tokens``; everything else the defaults, seed 0) into
   ``RUN/<hook>/`` (skipped when that folder already holds an SAE: the script resumes where it stopped);
2. ``saelab eval`` on ``--eval-tokens`` of the corpus' validation split: FVU, L0, CE recovered (zero
   ablation), KL (``RUN/<hook>/eval.json``);

``--baseline SAE`` (e.g. ``saelab/shipped/smollm2``) is evaluated on the same text and its concepts counted
the same way, for comparison. Then, over all depths at once, concept coverage (:mod:`saelab.coverage`): for each concept of
``--concepts`` the best single feature (chosen on 70% of its texts) and its held-out AUROC on the other 30%;
a concept is *detected* at a depth when that AUROC is >= 0.9. Writes ``RUN/layers.json`` and, with
``--report``, ``layers.json``, ``README.md`` and ``layers.png`` there.

Not measured here: how well concept dials steer at each depth (the dials issue's code was not in main when
this was written); see the report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from saelab import atomic
from saelab.corpus import CorpusSpec
from saelab.coverage import CoverageConfig, concept_coverage, read_concepts
from saelab.evaluate import evaluate
from saelab.formats import load_sae
from saelab.hooks import resolve
from saelab.models import load_model
from saelab.store import MANIFEST, ActivationStore
from saelab.train import train
from saelab.steer import sae_hook_name
from saelab.train_config import TrainConfig


def depth_stores(acts: Path, lm) -> list[ActivationStore]:
    """The stores of a multi-hook harvest folder, shallowest first."""
    stores = [ActivationStore.open(p) for p in sorted(acts.iterdir()) if (p / MANIFEST).is_file()]
    if not stores:
        raise SystemExit(f"{acts}: no activation stores (expected one folder per hook)")
    return sorted(stores, key=lambda s: resolve(lm.model, s.hook_name).layer or 0)


def train_and_eval(store: ActivationStore, lm, out: Path, cfg: TrainConfig, eval_tokens: int) -> dict:
    """One depth: its SAE (trained now unless already there) and its evaluation (cached in eval.json)."""
    t0 = time.perf_counter()
    if not (out / "cfg.json").is_file():
        train(store, cfg, out=out)
    row = {"rows": store.n_rows, "train_seconds_this_run": round(time.perf_counter() - t0, 1)}
    return {**row, **eval_row(out, out, lm, CorpusSpec(store.manifest["corpus"]["source"], "validation"), eval_tokens)}


def eval_row(sae_dir: Path, out: Path, lm, corpus: CorpusSpec, eval_tokens: int) -> dict:
    """FVU, L0, CE recovered of the SAE in ``sae_dir`` on ``corpus`` (the report cached in ``out/eval.json``)."""
    sae = load_sae(sae_dir)
    if not (out / "eval.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        evaluate(sae, lm, corpus, tokens=eval_tokens, progress=True).save(out)
    report = json.loads((out / "eval.json").read_text())
    held = sae.provenance.get("held_out", {})
    down = report.get("downstream") or {}
    hook = sae_hook_name(sae)
    return {"sae": str(sae_dir), "hook": hook, "layer": resolve(lm.model, hook).layer, "heldout_fvu": held.get("fvu"),
            "fvu": report["reconstruction"]["fvu"], "l0": report["sparsity"]["l0"],
            "dead_fraction": report["sparsity"].get("dead_fraction"),
            "ce_clean": down.get("ce_clean"), "ce_spliced": down.get("ce_spliced"),
            "ce_recovered": down.get("ce_recovered_zero"), "kl": down.get("kl_spliced"),
            "eval_tokens": report["tokens"]}


def coverage(lm, dirs: list[Path], concepts: dict, cache: Path) -> dict:
    """Concept coverage of the SAEs in ``dirs`` (one forward per text for all), cached in ``cache``."""
    key = {"saes": [str(d) for d in dirs], "concepts": sorted(concepts)}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["coverage"]
    cov = concept_coverage(lm, [load_sae(d) for d in dirs], key["saes"], concepts, CoverageConfig(),
                           progress=lambda i, n: print(f"concepts {i}/{n}", flush=True))
    atomic.write_json(cache, {"key": key, "coverage": cov})
    return cov


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [d["layer"] for d in doc["depths"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("fvu", "ce_recovered", "detected"),
                              ("FVU (held-out text)", "CE recovered", f"concepts detected (of {doc['n_concepts']})")):
        ax.plot(layers, [d[key] for d in doc["depths"]], marker="o", label=f"TopK {doc['latents']}, this corpus")
        if doc["baseline"]:
            ax.axhline(doc["baseline"][key], color="grey", linestyle="--", label=f"baseline ({Path(doc['baseline']['sae']).name})")
        ax.set_xlabel("layer (resid_post)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{doc['model']}: TopK {doc['latents']}, k {doc['k']}, {doc['train_tokens']:,} training tokens per depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("acts", type=Path, help="multi-hook harvest folder (one store per depth)")
    p.add_argument("--out", type=Path, required=True, help="run folder: one SAE per depth, layers.json")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per depth")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--concepts", type=Path, default=Path("saelab/prompts/concepts-smollm2"))
    p.add_argument("--baseline", type=Path, help="an SAE folder to measure the same way (e.g. saelab/shipped/smollm2)")
    p.add_argument("--coverage-only", action="store_true",
                   help="only the concept coverage of SAEs already trained in --out (cached for the full run)")
    p.add_argument("--report", type=Path, help="also write layers.json and layers.png here")
    args = p.parse_args()

    lm = load_model(args.model)
    cfg = TrainConfig(architecture="topk", d_sae=args.latents, k=args.k, tokens=args.tokens)
    stores = depth_stores(args.acts, lm)
    corpus = CorpusSpec(stores[0].manifest["corpus"]["source"], "validation")
    if args.coverage_only:     # the SAEs are trained (by an earlier or a parallel run); their evals may not be
        depths = [{"sae": str(args.out / s.hook_name)} for s in stores]
        baseline = [{"sae": str(args.baseline)}] if args.baseline else []
    else:
        depths = [train_and_eval(s, lm, args.out / s.hook_name, cfg, args.eval_tokens) for s in stores]
        baseline = [eval_row(args.baseline, args.out / "baseline", lm, corpus, args.eval_tokens)] if args.baseline else []
    concepts = read_concepts(args.concepts)
    dirs = [Path(d["sae"]) for d in depths + baseline]
    cov = coverage(lm, dirs, concepts, args.out / "coverage.json")
    if args.coverage_only:
        return
    for t, d in enumerate(depths + baseline):
        d["detected"] = sum(cov["concepts"][c][t]["heldout_auroc"] >= cov["threshold"] for c in cov["concepts"])
    doc = {"format": "saelab-layers", "version": 1, "model": args.model, "acts": str(args.acts), "latents": args.latents, "k": args.k,
           "train_tokens": args.tokens, "eval_tokens": args.eval_tokens, "eval_corpus": corpus.to_json(),
           "concepts_folder": str(args.concepts), "n_concepts": len(concepts), "depths": depths,
           "baseline": baseline[0] if baseline else None, "coverage": cov}
    atomic.write_json(args.out / "layers.json", doc)
    for d in depths + baseline:
        print(f"{d['sae']:<40} FVU {d['fvu']:.3f}  L0 {d['l0']:.1f}  CE recovered {d['ce_recovered']:.3f}  "
              f"detected {d['detected']}/{len(concepts)}")
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        atomic.write_json(args.report / "layers.json", doc)
        plot(doc, args.report / "layers.png")


if __name__ == "__main__":
    main()
