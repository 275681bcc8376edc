"""Stages that act on a model through its features: steer, monitor, generate."""

from __future__ import annotations

import argparse
import sys

from saelab.cli.common import CONTINUATION, _print_json, positive, seed, terminal_text


# -- steer / monitor / generate (dial: saelab.cli.concepts) -------------------------------------------------------------

_EDIT_USAGE = "write e.g. 1234=10x (clamp to 10× max activation), 1234=0 (ablate) or 1234=+4 with --mode add"


def _sae_args(p, generation: bool = True) -> None:
    p.add_argument("sae", help="SAE folder (its saelab.json names the model and hook)")
    p.add_argument("--model", help="model to load instead of the one named in the SAE's provenance")
    p.add_argument("--db", help="features.db for max activations, thresholds and explanations "
                                "(default: features.db beside the SAE folder, if present)")
    p.add_argument("--device", default="cpu", help="torch device for the model")
    if generation:
        p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
        p.add_argument("--seed", type=seed, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_steer(sub) -> None:
    p = sub.add_parser("steer", help="generate with features clamped, added or ablated, beside the default",
                       description="Default and steered continuations of a prompt from the same seed. "
                                   "--feature F=10x clamps F to 10× its max activation (error term kept), F=0 "
                                   "ablates it, F=+4 with --mode add adds 4 × max act × its decoder direction.")
    _sae_args(p)
    p.set_defaults(temperature=0.0)  # greedy, like the web page: the difference is the edit's, not the sampler's
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--feature", action="append", default=[], metavar="F=VALUE", help="edit (repeatable)")
    p.add_argument("--concept", metavar="FILE[=STRENGTH]",
                   help="a concept file (saelab concept --save): its dial at its calibrated strength, or STRENGTH")
    p.add_argument("--mode", choices=["clamp", "add"], default="clamp", help="how VALUE is applied")
    p.add_argument("--when", metavar="G>T", help="edit only where feature G's activation exceeds T")
    p.add_argument("--samples", type=positive, default=1, help="continuations per side")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="the prompt is a user message: wrap it in the model's chat template (default: on when the "
                        "model has one)")
    p.add_argument("--positions", choices=["all", "generated"], default="all",
                   help="edit every position (default) or only those that predict new tokens (the prompt is read as is)")
    p.set_defaults(func=_run_steer)
    m = sub.add_parser("monitor", help="scan texts (JSONL) for watched features; alerts as JSONL",
                       description="Read texts (one JSON string or {\"text\": ...} per line), write one JSON alert per "
                                   "token where a watched feature exceeds its threshold, as alerts arrive.")
    _sae_args(m, generation=False)
    _watch_args(m, concept=True)
    m.add_argument("--input", required=True, help="JSONL texts ('-' for stdin)")
    m.add_argument("--output", help="alerts JSONL (default: stdout); written line by line as alerts arrive")
    m.set_defaults(func=_run_monitor)
    g = sub.add_parser("generate", help="generate while watching features: log, ablate or abort when they fire")
    _sae_args(g)
    _watch_args(g)
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--on-fire", choices=["log", "ablate", "abort"], default="log", help="policy when a feature fires")
    g.add_argument("--watch-prompt", action="store_true", help="watch the prompt's tokens too")
    g.set_defaults(func=_run_generate)
    c = sub.add_parser("chat", help="chat with the model in the terminal, a concept's dial on (streamed)",
                       description="A streaming chat REPL (the model's chat template, the conversation kept) with a "
                                   "concept file's dial turned to its calibrated strength or to STRENGTH. Type /quit "
                                   "or press Ctrl-D to leave, /reset to start over.")
    c.add_argument("run", help="run folder (RUN/sae, RUN/features.db) or an SAE folder")
    c.add_argument("--concept", metavar="FILE[=STRENGTH]", help="a concept file (saelab concept --save)")
    c.add_argument("--model", help="model to load instead of the one named in the SAE's provenance")
    c.add_argument("--device", default="cpu", help="torch device for the model")
    c.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per answer")
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed")
    c.set_defaults(func=_run_chat, db=None, json=False)


def _watch_args(p, concept: bool = False) -> None:
    p.add_argument("--watch", required=not concept, metavar="F,F,...", help="feature ids to watch")
    if concept:
        p.add_argument("--concept", metavar="FILE", help="watch a concept file's features (with or instead of --watch)")
    p.add_argument("--threshold", metavar="T | F=T,...",
                   help="alert threshold for all, or per feature (default: features.db quantile, else 0.5 × max act)")
    p.add_argument("--quantile", type=float, default=0.999, help="quantile for the default thresholds")


def _parse_edit(spec: str, mode: str):
    from saelab.steer import Ablate, Add, Clamp

    fid, sep, value = spec.partition("=")
    if not sep or not fid.strip().isdigit():
        raise ValueError(f"--feature {spec!r}: expected FEATURE=VALUE; {_EDIT_USAGE}")
    text = value.strip()
    number = text[:-1] if text.endswith("x") else text
    try:
        v = float(number)
    except ValueError:
        raise ValueError(f"--feature {spec!r}: {number!r} is not a number; {_EDIT_USAGE}") from None
    if not abs(v) <= MAX_EDIT:   # NaN included
        raise ValueError(f"--feature {spec!r}: the value must be a finite number within ±{MAX_EDIT:g}; {_EDIT_USAGE}")
    if mode == "add":
        return int(fid), Add(v)
    return int(fid), Ablate() if v == 0 else Clamp(v)


def _parse_when(spec: str) -> tuple[int, float]:
    fid, sep, thr = spec.partition(">")
    try:
        return int(fid), float(thr)
    except ValueError:
        raise ValueError(f"--when {spec!r}: expected FEATURE>THRESHOLD, e.g. 88>0.5") from None


MAX_EDIT = 1e6   # |value| of an edit or dial: beyond it activations overflow into inf/nan probabilities


def _parse_numbers(text: str, what: str, cast=float) -> list:
    """Comma-separated numbers; floats finite and within ±MAX_EDIT, integers (feature ids) distinct."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            out.append(cast(item))
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise ValueError(f"{what} {text!r}: {item!r} is not {kind} (expected comma-separated values)") from None
        if cast is float and not abs(out[-1]) <= MAX_EDIT:
            raise ValueError(f"{what} {text!r}: {item!r} is not a finite number within ±{MAX_EDIT:g}")
    if not out:
        raise ValueError(f"{what} {text!r}: expected at least one comma-separated value")
    if cast is int and len(set(out)) < len(out):
        raise ValueError(f"{what} {text!r}: lists a feature twice")
    return out


def _parse_thresholds(text: str | None):
    if text is None:
        return None
    if "=" not in text:
        return _parse_numbers(text, "--threshold")[0]
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    try:
        return {int(f): float(t) for f, _, t in pairs}
    except ValueError:
        raise ValueError(f"--threshold {text!r}: expected a number or FEATURE=THRESHOLD,... with numbers") from None


def _check_ids(ids, sae, path: str) -> None:
    """Every feature id exists in the SAE: checked before the model loads, not after."""
    bad = sorted({int(f) for f in ids if not 0 <= int(f) < sae.cfg.d_sae})
    if bad:
        raise ValueError(f"feature {', '.join(map(str, bad))} does not exist: {path} has features 0-{sae.cfg.d_sae - 1}")


def _steer_inputs(args, need_lm_head: bool = True, ids=(), concept: bool = False):
    """(model, sae, features.db or None) for the steer/monitor subcommands, opened by the session layer (a
    features.db of another SAE is refused: its max activations would steer by the wrong amounts); ``ids`` and,
    with ``concept``, the concept file of ``--concept`` are checked before the model loads."""
    from saelab.session import open_run

    if getattr(args, "prompt", None) is not None and not args.prompt:
        raise ValueError("--prompt is empty: give the text to continue")
    run = open_run(args.sae, args.model, db=args.db, device=args.device)
    _check_ids(ids, run.sae, args.sae)
    if concept:
        _concept_of(args, run.sae)  # another SAE's concept file is refused before the model loads
    lm = run.model()
    if need_lm_head and not lm.is_causal:
        raise ValueError(f"{lm.name} has no language-model head: it cannot generate")
    return lm, run.sae, run.db() if run.db_path else None


def _concept_of(args, sae):
    """(concept file, strength) of ``--concept FILE[=STRENGTH]``, refused when made for another SAE; else None."""
    from saelab.conceptfile import load_concept, parse_concept_arg

    if not getattr(args, "concept", None):
        return None
    path, strength = parse_concept_arg(args.concept)
    concept = load_concept(path, sae)
    return concept, concept.strength if strength is None else strength


def _concept_edits(sae, db, concept, strength):
    """(edits, vector) that turn a concept file's dial to ``strength``."""
    from saelab.steer import dial_edits, max_activations

    spec = concept.spec()
    maxes = max_activations(sae, list(spec.features), db=db) if spec.features and spec.mode != "ablate" else {}
    return dial_edits(sae, spec, strength, maxes)


def _run_steer(args) -> None:
    from dataclasses import replace

    from saelab.steer import Add, compare_generations
    from saelab.generation import prompt_ids

    if not args.feature and not args.concept:
        raise ValueError("nothing to steer: give --feature F=VALUE (repeatable) or --concept FILE[=STRENGTH]")
    edits = dict(_parse_edit(s, args.mode) for s in args.feature)
    if args.when:
        when = _parse_when(args.when)
        edits = {f: replace(e, when=when) for f, e in edits.items()}
    when_ids = [e.when[0] for e in edits.values() if e.when]
    lm, sae, db = _steer_inputs(args, ids=[*edits, *when_ids], concept=True)
    vector, described_concept = None, None
    if (found := _concept_of(args, sae)) is not None:
        concept, strength = found
        more, vector = _concept_edits(sae, db, concept, strength)
        if set(more) & set(edits):
            raise ValueError(f"--feature and --concept both turn feature {sorted(set(more) & set(edits))[0]}: "
                             "give each feature one dial")
        edits.update(more)
        described_concept = {"name": concept.name, "mode": concept.mode, "unit": concept.unit, "strength": strength}
    chat = bool(getattr(lm.tokenizer, "chat_template", None)) if args.chat is None else args.chat
    positions = concept.positions if described_concept and args.positions == "all" else args.positions
    ids = prompt_ids(lm, args.prompt, args.max_new_tokens, chat=chat)
    pairs = compare_generations(lm, sae, args.prompt, edits, args.max_new_tokens, args.samples, args.seed,
                                args.temperature, db=db, positions=positions, ids=ids, vector=vector)
    described = {str(f): {"mode": "add" if isinstance(e, Add) else "clamp", "value": e.value,
                          "when": list(e.when) if e.when else None} for f, e in edits.items()}
    if args.json:
        _print_json({"prompt": args.prompt, "chat": chat, "edits": described, "concept": described_concept,
                     "seed": args.seed, "temperature": args.temperature,
                     "samples": [{**p._asdict(), "steered_acts": {str(f): a for f, a in p.steered_acts.items()}}
                                 for p in pairs]})
        return
    print(f"prompt{' (user turn of the chat template)' if chat else ''}:\n{terminal_text(args.prompt, keep=CONTINUATION)}\n")
    if described_concept:
        print(f"concept {concept.name!r}: {concept.spec().label()} at {described_concept['strength']:g}\n")
    for i, p in enumerate(pairs):
        means = ", ".join(f"{f}: {sum(a) / max(len(a), 1):.3g}" for f, a in p.steered_acts.items())
        what = f"seed {args.seed}" if args.temperature > 0 else "greedy"
        print(f"── sample {i} ({what}) ──")
        print(f"default answer:\n{terminal_text(p.default_text, keep=CONTINUATION)}\n")
        print(f"steered answer:\n{terminal_text(p.steered_text, keep=CONTINUATION)}\n")
        if means:
            print(f"mean activation on the steered answer (unsteered re-read): {means}\n")


def _watch_ids(args) -> list[int]:
    return _parse_numbers(args.watch, "--watch", int) if args.watch else []


def _watchlist(args, sae, db):
    from saelab.monitor import Watchlist

    feats = _watch_ids(args)
    if (found := _concept_of(args, sae)) is not None:
        feats += [f for f in found[0].features if f not in feats]
    if not feats:
        raise ValueError("nothing to watch: give --watch F,F,... or a concept file of SAE features (--concept)")
    return Watchlist.build(sae, feats, _parse_thresholds(args.threshold), db=db, quantile=args.quantile)


def _run_monitor(args) -> None:
    from saelab.monitor import scan_jsonl

    lm, sae, db = _steer_inputs(args, need_lm_head=False, ids=_watch_ids(args), concept=True)
    watchlist = _watchlist(args, sae, db)
    src = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    dst = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        n = scan_jsonl(lm, sae, src, watchlist, dst)
    finally:
        if src is not sys.stdin:
            src.close()
        if dst is not sys.stdout:
            dst.close()
    print(f"{n} alerts", file=sys.stderr)


def _run_generate(args) -> None:
    from saelab.monitor import watch_generate

    lm, sae, db = _steer_inputs(args, ids=_parse_numbers(args.watch, "--watch", int))
    watchlist = _watchlist(args, sae, db)
    result = watch_generate(lm, sae, args.prompt, watchlist, args.on_fire, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed, watch_prompt=args.watch_prompt)
    if args.json:
        _print_json({"prompt": args.prompt, "text": result.text, "aborted": result.aborted, "policy": args.on_fire,
                     "thresholds": {str(f): t for f, t in watchlist.thresholds.items()},
                     "alerts": [a.to_json() for a in result.alerts]})
        return
    print(terminal_text(args.prompt + result.text, keep=CONTINUATION))
    for a in result.alerts:
        print(f"alert: token {a.token!r} at position {a.position}: feature {a.feature} = {a.activation:.4g} "
              f"(> {watchlist.thresholds[a.feature]:.4g}){' — ' + a.explanation if a.explanation else ''}",
              file=sys.stderr)
    if result.aborted:
        print("generation aborted at the first firing token (withheld)", file=sys.stderr)


def _run_chat(args) -> None:
    """A streaming chat REPL with a concept's dial on (:mod:`saelab.chat`)."""
    from pathlib import Path

    from saelab.chat import chat_loop

    run = Path(args.run)
    args.sae = str(run / "sae") if (run / "sae").is_dir() else str(run)
    if (run / "features.db").is_file():
        args.db = str(run / "features.db")
    args.prompt = None
    lm, sae, db = _steer_inputs(args, concept=True)
    if not getattr(lm.tokenizer, "chat_template", None):
        raise ValueError(f"{lm.name} has no chat template: 'saelab chat' needs a chat model (use 'saelab steer')")
    found = _concept_of(args, sae)
    if found:
        print(f"concept {found[0].name!r}: {found[0].spec().label()} at {found[1]:g} "
              f"(calibrated: {found[0].strength:g}). /quit to leave, /reset to start over.", file=sys.stderr)
    chat_loop(lm, sae, db, found, sys.stdin, sys.stdout, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, seed=args.seed)
