"""Stages that act on a model through its features: steer, dial, monitor, generate."""

from __future__ import annotations

import json
import sys

from saelab.cli.common import _print_json


# -- steer / dial / monitor / generate -------------------------------------------------------------

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
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_steer(sub) -> None:
    p = sub.add_parser("steer", help="generate with features clamped, added or ablated, beside the default",
                       description="Default and steered continuations of a prompt from the same seed. "
                                   "--feature F=10x clamps F to 10× its max activation (error term kept), F=0 "
                                   "ablates it, F=+4 with --mode add adds 4 × max act × its decoder direction.")
    _sae_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--feature", action="append", required=True, metavar="F=VALUE", help="edit (repeatable)")
    p.add_argument("--mode", choices=["clamp", "add"], default="clamp", help="how VALUE is applied")
    p.add_argument("--when", metavar="G>T", help="edit only where feature G's activation exceeds T")
    p.add_argument("--samples", type=int, default=1, help="continuations per side")
    p.set_defaults(func=_run_steer)
    d = sub.add_parser("dial", help="efficacy curve of one feature: concept activation and loss vs clamp value",
                       description="Clamp a feature at each value, generate from every prompt, and report the "
                                   "feature's mean activation on the generated tokens and their loss, both measured "
                                   "on the unsteered model.")
    _sae_args(d)
    d.set_defaults(max_new_tokens=32, temperature=0.0)
    d.add_argument("--feature", type=int, required=True, help="feature id")
    d.add_argument("--prompts", required=True,
                   help="prompts file: .jsonl (JSON strings or objects with 'prompt'), else one prompt per line")
    d.add_argument("--values", default="0,1,2,5,10,20", help="comma-separated clamp values (× max activation)")
    d.add_argument("--samples", type=int, default=1, help="continuations per prompt and value")
    d.set_defaults(func=_run_dial)
    m = sub.add_parser("monitor", help="scan texts (JSONL) for watched features; alerts as JSONL",
                       description="Read texts (one JSON string or {\"text\": ...} per line), write one JSON alert per "
                                   "token where a watched feature exceeds its threshold, as alerts arrive.")
    _sae_args(m, generation=False)
    _watch_args(m)
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


def _watch_args(p) -> None:
    p.add_argument("--watch", required=True, metavar="F,F,...", help="feature ids to watch")
    p.add_argument("--threshold", metavar="T | F=T,...",
                   help="alert threshold for all, or per feature (default: features.db quantile, else 0.5 × max act)")
    p.add_argument("--quantile", type=float, default=0.999, help="quantile for the default thresholds")


def _parse_edit(spec: str, mode: str):
    import math

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
    if not math.isfinite(v):
        raise ValueError(f"--feature {spec!r}: the value must be finite; {_EDIT_USAGE}")
    if mode == "add":
        return int(fid), Add(v)
    return int(fid), Ablate() if v == 0 else Clamp(v)


def _parse_when(spec: str) -> tuple[int, float]:
    fid, sep, thr = spec.partition(">")
    try:
        return int(fid), float(thr)
    except ValueError:
        raise ValueError(f"--when {spec!r}: expected FEATURE>THRESHOLD, e.g. 88>0.5") from None


def _parse_numbers(text: str, what: str, cast=float) -> list:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            out.append(cast(item))
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise ValueError(f"{what} {text!r}: {item!r} is not {kind} (expected comma-separated values)") from None
    if not out:
        raise ValueError(f"{what} {text!r}: expected at least one comma-separated value")
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


def _steer_inputs(args, need_lm_head: bool = True):
    """(model, sae, features.db or None) for the steer/monitor subcommands."""
    from pathlib import Path

    from saelab.models import load_model
    from saelab.sae import SAE

    sae = SAE.load(args.sae, device=args.device)
    name = args.model or sae.provenance.get("model_name") or sae.cfg.metadata.get("model_name")
    if not name:
        raise ValueError(f"{args.sae}: the SAE does not name the model it was trained on; pass --model")
    lm = load_model(name, device=args.device)
    if need_lm_head and not lm.is_causal:
        raise ValueError(f"{name} has no language-model head: it cannot generate")
    db_path = Path(args.db) if args.db else Path(args.sae).resolve().parent / "features.db"
    db = None
    if args.db or db_path.is_file():
        from saelab.featuredb import FeatureDB

        db = FeatureDB.open(db_path)
        db.check_sae(sae, args.sae)   # another SAE's max activations would steer by the wrong amounts
    return lm, sae, db


def _run_steer(args) -> None:
    from dataclasses import replace

    from saelab.steer import Add, compare_generations

    edits = dict(_parse_edit(s, args.mode) for s in args.feature)
    if args.when:
        when = _parse_when(args.when)
        edits = {f: replace(e, when=when) for f, e in edits.items()}
    lm, sae, db = _steer_inputs(args)
    pairs = compare_generations(lm, sae, args.prompt, edits, args.max_new_tokens, args.samples, args.seed,
                                args.temperature, db=db)
    described = {str(f): {"mode": "add" if isinstance(e, Add) else "clamp", "value": e.value,
                          "when": list(e.when) if e.when else None} for f, e in edits.items()}
    if args.json:
        _print_json({"prompt": args.prompt, "edits": described, "seed": args.seed, "temperature": args.temperature,
                     "samples": [{**p._asdict(), "steered_acts": {str(f): a for f, a in p.steered_acts.items()}}
                                 for p in pairs]})
        return
    for i, p in enumerate(pairs):
        means = ", ".join(f"{f}: {sum(a) / max(len(a), 1):.3g}" for f, a in p.steered_acts.items())
        print(f"── sample {i} (seed {args.seed}) ──")
        print(f"default:\n{args.prompt}{p.default_text}\n")
        print(f"steered:\n{args.prompt}{p.steered_text}\n")
        print(f"mean activation on the steered text (unsteered re-read): {means}\n")


def _read_prompts(path: str) -> list[str]:
    from pathlib import Path

    lines = Path(path).read_text().splitlines()
    if not path.endswith((".jsonl", ".json")):
        return [ln for ln in lines if ln.strip()]
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        prompts.append(obj if isinstance(obj, str) else obj.get("prompt") if isinstance(obj, dict) else None)
        if not isinstance(prompts[-1], str):
            raise ValueError(f"{path}:{n}: expected a JSON string or an object with a 'prompt' string")
    return prompts


def _run_dial(args) -> None:
    from saelab.steer import dial

    values = _parse_numbers(args.values, "--values")
    prompts = _read_prompts(args.prompts)
    lm, sae, db = _steer_inputs(args)
    curve = dial(lm, sae, args.feature, prompts, values, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, samples=args.samples, seed=args.seed, db=db)
    if args.json:
        _print_json({"feature": curve.feature, "max_act": curve.max_act, "points": [p._asdict() for p in curve.points]})
        return
    print(f"feature {curve.feature} (max activation {curve.max_act:.4g}), {len(prompts)} prompts")
    print(f"  {'value':>6}  {'activation':>10}  {'loss':>6}  tokens  first continuation")
    for p in curve.points:
        first = (p.texts[0] if p.texts else "")[:50].replace("\n", "⏎")
        print(f"  {p.value:>5g}×  {p.activation:>10.4g}  {p.loss:>6.3f}  {p.n_tokens:>6}  {first}")


def _watchlist(args, sae, db):
    from saelab.monitor import Watchlist

    feats = _parse_numbers(args.watch, "--watch", int)
    return Watchlist.build(sae, feats, _parse_thresholds(args.threshold), db=db, quantile=args.quantile)


def _run_monitor(args) -> None:
    from saelab.monitor import scan_jsonl

    lm, sae, db = _steer_inputs(args, need_lm_head=False)
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

    lm, sae, db = _steer_inputs(args)
    watchlist = _watchlist(args, sae, db)
    result = watch_generate(lm, sae, args.prompt, watchlist, args.on_fire, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, seed=args.seed, watch_prompt=args.watch_prompt)
    if args.json:
        _print_json({"prompt": args.prompt, "text": result.text, "aborted": result.aborted, "policy": args.on_fire,
                     "thresholds": {str(f): t for f, t in watchlist.thresholds.items()},
                     "alerts": [a.to_json() for a in result.alerts]})
        return
    print(args.prompt + result.text)
    for a in result.alerts:
        print(f"alert: token {a.token!r} at position {a.position}: feature {a.feature} = {a.activation:.4g} "
              f"(> {watchlist.thresholds[a.feature]:.4g}){' — ' + a.explanation if a.explanation else ''}",
              file=sys.stderr)
    if result.aborted:
        print("generation aborted at the first firing token (withheld)", file=sys.stderr)
