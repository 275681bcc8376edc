"""Feature families across the sizes of a sweep: ``saelab families``."""

from __future__ import annotations

import sys

from saelab.cli.common import _print_json


def _add_families(sub) -> None:
    p = sub.add_parser("families", help="match features across the sizes of a sweep: persist, split, new, vanished",
                       description="Match each SAE's features to the next larger SAE's by decoder cosine and by the "
                                   "correlation of their activations on the same held-out tokens of the store, and "
                                   "count per size step the features that persist, split, vanish or are new (the "
                                   "rule: saelab/families.py). Writes families.json into the sweep folder. With "
                                   "--concepts, also the share of named concepts that some feature covers per size.")
    p.add_argument("sweep", nargs="+",
                   help="sweep folder (with sweep.json), or two or more SAE folders, smallest first")
    p.add_argument("--acts", help="activation store the SAEs were trained on (default: sweep.json's, or acts/ beside "
                                  "the sweep folder)")
    p.add_argument("--k", type=int, help="in a sweep that scans k too, the k whose sizes are compared")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens every SAE encodes (default 16384)")
    p.add_argument("--tau", type=float, help="minimum match score for a parent (default 0.45)")
    p.add_argument("--cover", type=float, help="share of a parent's tokens its children must cover to split "
                                               "(default 0.5)")
    p.add_argument("--concepts", metavar="DIR", help="also concept coverage: NAME.pos.txt / NAME.neg.txt pairs here "
                                                     "(saelab/prompts/concepts-builtin for the builtin model)")
    p.add_argument("--threshold", type=float, default=0.9, help="held-out AUROC that covers a concept (default 0.9)")
    p.add_argument("--model", help="model for --concepts instead of the one in the SAEs' provenance")
    p.add_argument("--json", action="store_true", help="print families.json (and the coverage) as JSON")
    p.set_defaults(func=_run_families)


def _run_families(args) -> None:
    from saelab.families import FamilyConfig
    from saelab.family_io import run_families

    if args.tokens < 1:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    for name in ("tau", "cover"):   # scores and shares lie in [0, 1]: outside it the result means nothing
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"--{name} must be a number from 0 to 1, got {value}")
    cfg = FamilyConfig(**{k: v for k, v in (("tau", args.tau), ("cover", args.cover)) if v is not None})
    doc = run_families(args.sweep, acts=args.acts, tokens=args.tokens, cfg=cfg, k=args.k)
    if args.concepts:
        doc["coverage"] = _coverage(args)
    if args.json:
        _print_json(doc)
        return
    s = doc["sample"]
    print(f"{len(doc['sizes'])} sizes; {s['rows']:,} tokens ({s['split']} rows of {s['store']}); {s['seconds']} s")
    print(f"{'step':<28} {'persist':>8} {'split':>6} {'(children)':>10} {'vanished':>9} {'new':>6}")
    for step in doc["steps"]:
        c = step["counts"]
        print(f"{step['small'] + ' → ' + step['large']:<28} {c['persist']:>8} {c['split']:>6} "
              f"{c['split_children']:>10} {c['vanished']:>9} {c['new']:>6}")
    if "written" in doc:
        print(f"wrote {doc['written']}")
    if "coverage" in doc:
        cov = doc["coverage"]
        print(f"concept coverage (best single feature, held-out AUROC ≥ {cov['threshold']}):")
        for size, frac in zip(cov["sizes"], cov["covered"]):
            print(f"  {size:<24} {frac:.0%} of {len(cov['concepts'])} concepts")
        if "written" in cov:
            print(f"wrote {cov['written']}")


def _coverage(args) -> dict:
    from saelab.coverage import CoverageConfig, sweep_coverage

    progress = (lambda i, n: print(f"\rconcepts {i}/{n}", end="\n" if i == n else "", file=sys.stderr))
    return sweep_coverage(args.sweep, args.concepts, k=args.k, model=args.model,
                          config=CoverageConfig(threshold=args.threshold), progress=progress)
