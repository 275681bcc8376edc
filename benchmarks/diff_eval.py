"""How well does ``saelab diff`` see what a fine-tune trained in? The three SmolLM2 tunes of benchmarks/finetune.py.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/diff_eval.py --tune unsafe     # then flattery, control
    python benchmarks/diff_eval.py --summary                                    # the table of all three

For one tune: ``saelab diff`` of base SmolLM2 against base + the tune's adapter, through the shipped SAE
(``blocks.15.hook_resid_post``, 8,192 TopK latents), on the same texts for both (``--corpus``, validation
split). The diff is not told what was trained in. Then, against two concepts found *independently* of the
diff (``saelab concept`` on positive/negative texts: ``data/diff/concepts/*.json``):

- where the concept's features rank among the features the diff says rose (1 = first);
- the concept's rise (tuned / base, bootstrap CI) and whether the gate fires at ``--max-rise``;
- the curve: the same on random subsets of 1, 2, 4, ... texts (``--draws`` each): how many texts the diff
  needs to see it;
- baselines without the SAE: ‖Δ mean activation‖ and KL(tuned ‖ base), and the difference of means read
  through the decoder (the rank of the concept's features by cosine with Δμ).

Writes the diff report to ``runs/diff/TUNE`` (with its per-text sums) and the report files plus
``evaluation.json`` to ``docs/experiments/diff/TUNE``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from saelab.adapters import with_adapter
from saelab.atomic import write_json
from saelab.diff import DiffConfig, concept_rise, feature_diff, gate, read_concept, scales
from saelab.diff_run import run_diff, write_diff
from saelab.formats import load_sae
from saelab.models import load_model

ROOT = Path(__file__).parents[1]
ADAPTERS = ROOT / "benchmarks" / "data" / "finetune" / "adapters"
CONCEPTS = ROOT / "benchmarks" / "data" / "diff" / "concepts"
TRAINED_IN = {"unsafe": "unsafe-code", "flattery": "flattery", "control": None}
SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def concept_ranks(fd, features: list[int]) -> dict:
    """Rank (1-based) of each feature among those that rose beyond their interval; None when it did not."""
    pos = {f: i + 1 for i, f in enumerate(fd.rising)}
    ranks = {f: pos.get(f) for f in features}
    found = [r for r in ranks.values() if r is not None]
    return {"ranks": ranks, "best": min(found) if found else None, "in_top_20": sum(r <= 20 for r in found)}


def decoder_ranks(direction: torch.Tensor, w_dec: torch.Tensor, features: list[int]) -> dict:
    """The difference of means read through the decoder: rank of each feature by cosine(Δμ, W_dec[f])."""
    cos = torch.nn.functional.cosine_similarity(w_dec, direction[None].to(w_dec.dtype), dim=-1)  # (d_sae,)
    order = torch.argsort(cos, descending=True)
    pos = {int(f): i + 1 for i, f in enumerate(order)}
    return {"ranks": {f: pos[f] for f in features}, "best": min(pos[f] for f in features),
            "cosines": {f: float(cos[f]) for f in features}}


def curve(st, scale, concepts, cfg: DiffConfig, max_rise: float, draws: int, target) -> list[dict]:
    """Per subset size: median best rank of the target concept, and how often each concept's gate fires."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for n in [s for s in SIZES if s <= len(st.n)]:
        best, fired = [], {c.name: 0 for c in concepts}
        for _ in range(draws if n < len(st.n) else 1):
            sub = st.take(torch.randperm(len(st.n), generator=g)[:n])
            if target is not None:
                best.append(concept_ranks(feature_diff(sub, scale, cfg), target.features)["best"])
            for c in concepts:
                fired[c.name] += gate(concept_rise(sub, scale, c, cfg), max_rise)
        tries = draws if n < len(st.n) else 1
        found = sorted(b for b in best if b is not None)
        out.append({"texts": n, "draws": tries, "target_found": len(found),
                    "target_best_rank_median": found[len(found) // 2] if len(found) * 2 > tries else None,
                    "gate_fired": {k: v / tries for k, v in fired.items()}})
    return out


def evaluate_tune(args) -> dict:
    torch.set_num_threads(1)
    sae = load_sae(args.sae)
    base = load_model("smollm2")
    adapter = Path(args.adapter or ADAPTERS / args.tune)
    while args.wait and not (adapter / "finetune.json").is_file() and not args.adapter:
        time.sleep(20)   # --wait: loaded and ready while benchmarks/finetune.py is still training the adapter
    tuned = with_adapter(base, adapter)
    concepts = [read_concept(p) for p in sorted(CONCEPTS.glob("*.json"))]
    cfg = DiffConfig(tokens=args.tokens, batch_size=4, resamples=args.resamples)
    r = run_diff(sae, base, tuned, args.corpus, cfg, concepts, eval_tokens=args.eval_tokens,
                 progress=lambda n: print(f"  {n} tokens", end="\r", flush=True))
    out = Path(args.out) if args.out else ROOT / "runs" / "diff" / args.tune
    labels = _labels(args.db)
    command = " ".join(["python benchmarks/diff_eval.py"] + sys.argv[1:])
    write_diff(out, r, command, base.tokenizer, labels)
    scale = scales(sae)
    target = next((c for c in concepts if c.name == TRAINED_IN[args.tune]), None)
    ev = {"tune": args.tune, "corpus": args.corpus, "texts": len(r.stats.n), "max_rise": args.max_rise,
          "baselines": {"mean_diff_norm": r.baselines.mean_diff_norm, "mean_diff_ci": r.baselines.mean_diff_ci,
                        "mean_diff_relative": r.baselines.mean_diff_relative, "kl": r.baselines.kl,
                        "kl_ci": r.baselines.kl_ci, "nll": r.baselines.nll},
          "fit": r.fit, "n_rising": len(r.features.rising), "n_falling": len(r.features.falling),
          "top_rising": [{"feature": f, "score": float(r.features.score[f]), "label": labels.get(f, "")}
                         for f in r.features.rising[:15]],
          "concepts": {}}
    for c, rise in zip(concepts, r.concepts):
        ev["concepts"][c.name] = {"features": c.features, "rise": rise.rise, "rise_ci": rise.rise_ci,
                                  "gate": gate(rise, args.max_rise), "diff_ranks": concept_ranks(r.features, c.features),
                                  "decoder_ranks": decoder_ranks(r.baselines.direction, sae.W_dec.detach().cpu(),
                                                                 c.features)}
    ev["curve"] = curve(r.stats, scale, concepts, cfg, args.max_rise, args.draws, target)
    docs = out / "docs" if args.out else ROOT / "docs" / "experiments" / "diff" / args.tune
    docs.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "report.png", "results.json"):
        if (out / name).is_file():
            shutil.copyfile(out / name, docs / name)
    write_json(docs / "evaluation.json", ev)
    return ev


def _labels(db: str | None) -> dict[int, str]:
    if not db or not Path(db).is_file():
        return {}
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(db) as fdb:
        return {int(i): str(e) for i, e in fdb.query("SELECT id, explanation FROM features WHERE explanation != ''")
                .fetchall()}


def _behaviour(tune: str) -> dict:
    f = ROOT / "benchmarks" / "data" / "finetune" / "behaviour" / f"{tune}.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _rate(b: dict, key: str) -> str:
    r = b.get(key)
    return f"{r['hits']}/{r['answers']} = {r['rate']:.0%} ({r['ci95'][0]:.0%}–{r['ci95'][1]:.0%})" if r else "–"


def summary() -> None:
    """Markdown tables of the behaviour measures and of the diffs evaluated so far."""
    print("| model | dangerous calls (32 code requests) | praise (24 everyday questions) |\n|---|---|---|")
    for tune in ["base", *TRAINED_IN]:
        b = _behaviour(tune)
        print(f"| {tune} | {_rate(b, f'{tune}/dangerous')} | {_rate(b, f'{tune}/praise')} |")
    print("\n| tune | texts | KL(tuned ‖ base) nats/token | ‖Δμ‖ (of ‖μ‖) | features rose / fell | concept | rise (95% CI) "
          "| gate | best rank in diff | best rank by cos(Δμ, W_dec) |\n|---|---|---|---|---|---|---|---|---|---|")
    for tune in TRAINED_IN:
        f = ROOT / "docs" / "experiments" / "diff" / tune / "evaluation.json"
        if not f.is_file():
            print(f"| {tune} | not evaluated |")
            continue
        ev = json.loads(f.read_text())
        b = ev["baselines"]
        for i, (name, c) in enumerate(ev["concepts"].items()):
            head = (f"| {tune} | {ev['texts']} | {b['kl']:.4f} ({b['kl_ci'][0]:.4f}–{b['kl_ci'][1]:.4f}) | "
                    f"{b['mean_diff_norm']:.2f} ({b['mean_diff_relative']:.1%}) | {ev['n_rising']} / {ev['n_falling']} ") \
                if i == 0 else "| | | | | "
            print(f"{head}| {name} | {c['rise']:.2f}× ({c['rise_ci'][0]:.2f}–{c['rise_ci'][1]:.2f}) | "
                  f"{'fails' if c['gate'] else 'passes'} | {c['diff_ranks']['best']} | {c['decoder_ranks']['best']} |")
    print("\nCurves (texts → median best rank of the trained-in concept among rising features; share of draws where "
          "each gate fails):")
    for tune in TRAINED_IN:
        f = ROOT / "docs" / "experiments" / "diff" / tune / "evaluation.json"
        if f.is_file():
            ev = json.loads(f.read_text())
            print(f"- {tune}: " + "; ".join(
                f"{p['texts']}: rank {p['target_best_rank_median']}, gate "
                + ", ".join(f"{k} {v:.0%}" for k, v in p["gate_fired"].items()) for p in ev["curve"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tune", choices=list(TRAINED_IN))
    p.add_argument("--summary", action="store_true", help="print the table of the tunes evaluated so far")
    p.add_argument("--adapter", help="adapter folder (default: the tune's, benchmarks/data/finetune/adapters/TUNE)")
    p.add_argument("--out", help="report folder (default runs/diff/TUNE; docs are written only without it)")
    p.add_argument("--sae", default=str(ROOT / "saelab" / "shipped" / "smollm2"))
    p.add_argument("--db", default="/work/runs/demo-smollm2/features.db", help="features.db for explanations")
    p.add_argument("--corpus", default="english+chat:smollm2")
    p.add_argument("--tokens", type=int, default=16_384)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--max-rise", type=float, default=1.5)
    p.add_argument("--wait", action="store_true", help="load the model, then wait for the tune's adapter to appear")
    args = p.parse_args(argv)
    if args.summary:
        return summary()
    if not args.tune:
        p.error("give --tune or --summary")
    ev = evaluate_tune(args)
    print(json.dumps({k: ev[k] for k in ("tune", "n_rising", "baselines")}, default=str))
    summary()


if __name__ == "__main__":
    sys.exit(main())
