"""``saelab diff BASE TUNED``: what fine-tuning changed, through the base model's SAE; a gate for CI."""

from __future__ import annotations

import shlex
import sys

from saelab.cli.common import _print_json


def _add_diff(sub) -> None:
    p = sub.add_parser("diff", help="compare a fine-tuned model with its base through the base model's SAE",
                       description="Run the same texts through BASE and TUNED, read both with the base model's SAE "
                                   "at its hook, and report per feature the change in firing rate and mean activation "
                                   "(95%% bootstrap intervals over texts), the SAE's FVU and CE recovered on each "
                                   "model, features that appear or vanish, watched concepts, and the no-SAE baselines "
                                   "(difference of mean activations, KL). TUNED may be a model folder, a GGUF, a hub "
                                   "id, or a PEFT/LoRA adapter folder (applied to BASE). With --gate the command "
                                   "exits 1, with one line, when the concept rose more than --max-rise times.")
    p.add_argument("base", help="the base model (smollm2, a folder, a GGUF, a hub id)")
    p.add_argument("tuned", help="the tuned model, or a PEFT adapter folder (adapter_config.json) for BASE")
    p.add_argument("--adapter", help="a PEFT/LoRA adapter folder to apply to TUNED")
    p.add_argument("--sae", required=True, help="the base model's SAE folder")
    p.add_argument("--corpus", required=True,
                   help="texts for both models: a corpus source (its validation split), e.g. english+chat:smollm2")
    p.add_argument("--out", required=True, help="report folder (report.html, report.png, results.json)")
    p.add_argument("--db", help="features.db for explanations (default: features.db beside the SAE folder)")
    p.add_argument("--tokens", type=int, default=16_384, help="tokens through each model (default 16384)")
    p.add_argument("--context", type=int, help="window length (default: the SAE's, at most 256)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples over texts (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="corpus order and bootstrap seed")
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="tokens for the SAE's FVU and CE recovered on each model (0: skip; default 4096)")
    p.add_argument("--watch", action="append", default=[], metavar="CONCEPT_FILE",
                   help="a concept to report on (JSON with 'features' and 'name', or a list of ids); repeatable")
    gate = p.add_mutually_exclusive_group()
    gate.add_argument("--gate", metavar="CONCEPT_FILE", help="fail (exit 1) when this concept rose too much")
    gate.add_argument("--gate-features", metavar="F,F,...", help="the gate's concept as a feature list")
    p.add_argument("--max-rise", type=float, default=2.0,
                   help="the gate fails when the concept's tuned/base ratio is above this and significant (default 2)")
    p.add_argument("--json", action="store_true", help="print results.json instead of the summary")
    p.set_defaults(func=_run_diff)


def _concepts(args, sae):
    from saelab.diff import Concept, read_concept

    watched = [read_concept(f, sae) for f in args.watch]
    gated = None
    if args.gate:
        gated = read_concept(args.gate, sae)
    elif args.gate_features:
        try:
            gated = Concept("features " + args.gate_features, [int(f) for f in args.gate_features.split(",")])
        except ValueError:
            raise ValueError(f"--gate-features: expected comma-separated feature ids, got {args.gate_features!r}") \
                from None
    return watched + ([gated] if gated else []), gated


def _labels(run) -> dict[int, str]:
    if run.db_path is None:
        return {}
    with run.db() as db:
        rows = db.query("SELECT id, explanation FROM features WHERE explanation != ''").fetchall()
    return {int(i): str(e) for i, e in rows}


def _run_diff(args) -> int:
    from saelab.diff import DiffConfig, gate
    from saelab.diff_run import gate_message, load_pair, run_diff, text_preview, to_json, write_diff
    from saelab.session import open_run

    if args.max_rise <= 0:
        raise ValueError(f"--max-rise must be positive, got {args.max_rise}")
    run = open_run(args.sae, db=args.db)        # another SAE's features.db (labels) is refused here
    sae = run.sae
    concepts, gated = _concepts(args, sae)      # and another SAE's concept file
    base, tuned = load_pair(args.base, args.tuned, args.adapter)
    cfg = DiffConfig(tokens=args.tokens, context=args.context, batch_size=args.batch_size, seed=args.seed,
                     resamples=args.resamples)
    result = run_diff(sae, base, tuned, args.corpus, cfg, concepts, eval_tokens=args.eval_tokens)
    command = "saelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    html = write_diff(args.out, result, command, base.tokenizer, _labels(run))
    if args.json:
        _print_json(to_json(result, base.tokenizer))
    else:
        fd = result.features
        print(f"{len(fd.rising)} features rose, {len(fd.falling)} fell, {len(fd.appear)} appeared, "
              f"{len(fd.vanish)} vanished; top risers: {', '.join(map(str, fd.rising[:10])) or 'none'}")
        print(f"report: {html}")
    if gated is None:
        return 0
    rise = result.concepts[-1]
    preview = text_preview(base.tokenizer, result.stats.ids[rise.top_texts[0][0]]) if rise.top_texts else ""
    line = gate_message(rise, args.max_rise, preview, result.corpus)
    if gate(rise, args.max_rise):
        print(f"saelab: gate failed: {line}", file=sys.stderr)
        return 1
    print(f"gate passed: {line}")
    return 0
