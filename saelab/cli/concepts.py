"""Concepts and dials: ``saelab concept``, ``saelab dial``, ``saelab experiment``."""

from __future__ import annotations

import shlex
import sys

from saelab.cli.common import _print_json, positive, seed, terminal_text

EXPERIMENTS = ("golden-gate", "unsafe-code", "builtin-dial")  # saelab.experiments.RUNNERS, without importing torch


def _model_args(p) -> None:
    p.add_argument("sae", help="SAE folder (its saelab.json names the model and hook)")
    p.add_argument("--model", help="model to load instead of the one named in the SAE's provenance")
    p.add_argument("--db", help="features.db for max activations (default: features.db beside the SAE, if present)")
    p.add_argument("--device", default="cpu", help="torch device for the model")
    p.add_argument("--json", action="store_true", help="print JSON")


def _dial_args(p, values: str) -> None:
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template (user turn)")
    p.add_argument("--values", default=values, help="comma-separated dial values (× each feature's max activation)")
    p.add_argument("--keywords", help="comma-separated keywords: an answer containing one is on concept "
                                      "(default: the concept's feature classifier decides)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")


def _add_concepts(sub) -> None:
    c = sub.add_parser("concept", help="find a concept's features from example texts and calibrate its dial",
                       description="Rank features by how well their max activation over a text separates the positive "
                                   "from the negative texts (AUROC), grow a small detection set while a held-out split "
                                   "keeps improving, then grow the dial's set along the ranking while calibration on a "
                                   "few neutral prompts says it helps: for each size, the smallest strength where the "
                                   "concept shows in the answers while they stay fluent.")
    _model_args(c)
    c.add_argument("--positive", required=True, help="texts with the concept (one per line, or .jsonl strings)")
    c.add_argument("--negative", required=True, help="texts without it (same format)")
    c.add_argument("--prompts", help="neutral prompts for the calibration sweep (default: 4 built-in chat questions)")
    c.add_argument("--no-calibrate", action="store_true", help="only select features (no generation)")
    _dial_args(c, "0.5,1,1.5,2,3,5")
    c.set_defaults(func=_run_concept)
    d = sub.add_parser("dial", help="curves of a feature or a concept against the dial: concept rate, NLL, repetition",
                       description="Turn one feature (--feature) or a concept's feature set (--concept P.txt:N.txt, or "
                                   "--features F,F,...) to each dial value, answer every prompt, and re-read the answers "
                                   "with the unsteered model: concept rate, NLL and repetition (docs/measures.md).")
    _model_args(d)
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--feature", type=int, help="one feature: its own activation and loss vs clamp value")
    what.add_argument("--concept", metavar="P.txt:N.txt", help="positive and negative texts naming the concept")
    what.add_argument("--features", metavar="F,F,...", help="a feature set sharing one dial (needs --keywords)")
    d.add_argument("--prompts", required=True, help="prompts: one per line, or .jsonl strings")
    d.add_argument("--positions", choices=["all", "generated"], default="all", help="which positions to edit")
    d.add_argument("--mode", choices=["clamp", "add"], default="clamp", help="how the dial value is applied")
    d.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    d.add_argument("--samples", type=positive, default=1, help="answers per prompt and value")
    d.add_argument("--seed", type=seed, default=0, help="sampling seed")
    d.add_argument("--report", metavar="DIR", help="also write report.html, report.png and results.json here")
    _dial_args(d, "0,1,2,5,10,20")
    d.set_defaults(func=_run_dial)
    e = sub.add_parser("experiment", help="the seeds' experiments, reproducible: golden-gate, unsafe-code, builtin-dial",
                       description="golden-gate: concept rate and fluency vs the dial on 20 held-out chat questions. "
                                   "unsafe-code: dangerous-call rate over 32 programming requests, default vs the "
                                   "concept ablated vs forced on. builtin-dial: monotone dials of 50 random vs 50 "
                                   "top-output-score features. Writes report.html, report.png and results.json.")
    e.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    e.add_argument("run", help="run folder with sae/ and features.db")
    e.add_argument("--out", help="report folder (default RUN/experiments/NAME)")
    e.add_argument("--model", help="model to load instead of the SAE's")
    e.add_argument("--values", help="comma-separated dial values (default 0.5,1,1.5,2,3)")
    e.add_argument("--max-new-tokens", type=positive, help="tokens per answer (default 40)")
    e.add_argument("--samples", type=positive, help="sampled answers per code prompt and condition (default 2)")
    e.add_argument("--n-features", type=positive, help="features per group for builtin-dial (default 50)")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=_run_experiment)


def _numbers(text: str, what: str, cast=float) -> list:
    from saelab.cli.steering import _parse_numbers

    return _parse_numbers(text, what, cast)


def _keywords(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def _progress(i: int, n: int) -> None:
    print(f"  dial point {i}/{n} done", file=sys.stderr, flush=True)


def _run_concept(args) -> None:
    from saelab.cli.steering import _steer_inputs
    from saelab.concept import ConceptConfig, concept_json, find_concept, steering_set
    from saelab.experiments import PROMPTS, read_texts

    cfg = ConceptConfig(values=tuple(_numbers(args.values, "--values")), keywords=_keywords(args.keywords),
                        max_new_tokens=args.max_new_tokens)
    pos, neg = read_texts(args.positive), read_texts(args.negative)
    lm, sae, db = _steer_inputs(args)
    result = find_concept(lm, sae, pos, neg, cfg, db=db)
    chosen = None
    if not args.no_calibrate:
        prompts = read_texts(args.prompts) if args.prompts else read_texts(PROMPTS / "neutral_chat.txt")[:4]
        chosen = steering_set(lm, sae, result, prompts, cfg, chat=args.chat, db=db,
                              progress=None if args.json else _progress)
    out = concept_json(result, chosen)
    if args.json:
        _print_json(out)
        return
    print(f"detection features: {result.features}")
    for s in result.steps:
        print(f"  {'+' if s['joined'] else '-'} feature {s['feature']:>6}: held-out AUROC {s['heldout_auroc']:.3f}, "
              f"d′ {s['heldout_dprime']:.2f}{'' if s['joined'] else ' (no gain: stop)'}")
    if chosen:
        for g in chosen.growth:
            print(f"  dial set of {len(g['features'])}: strength {g['strength']:g}×, fluent concept rate {g['rate']:.0%}")
        cal = chosen.calibration
        print(f"dial features: {chosen.features}")
        print(f"calibrated strength: {cal.strength:g}× ({'target reached' if cal.reached else 'target NOT reached'})")
        _print_curve(cal.sweep)


def _print_curve(points) -> None:
    from saelab.measures import rate

    base = points[0].nll or 1.0
    print(f"  {'dial':>7}  {'concept':>7}  {'classif.':>8}  {'keyword':>7}  {'NLL':>6}  {'×dflt':>5}  {'rep':>5}  first answer")
    for p in points:
        c, k = rate(p.answers, "classifier"), rate(p.answers, "keyword")
        fmt = lambda r: "   -" if r is None else f"{r:.0%}"  # noqa: E731
        first = terminal_text((p.answers[0].text if p.answers else "")[:60].replace("\n", "⏎"))
        label = "default" if p.value is None else f"{p.value:g}×"
        print(f"  {label:>7}  {p.concept_rate:>7.0%}  {fmt(c):>8}  {fmt(k):>7}  {p.nll:>6.3f}  {p.nll / base:>5.2f}  "
              f"{p.repetition:>5.2f}  {first}")


def _run_dial(args) -> None:
    from saelab.cli.steering import _steer_inputs
    from saelab.experiments import read_texts

    values = _numbers(args.values, "--values")
    prompts = read_texts(args.prompts)
    if args.feature is not None:
        return _feature_dial(args, values, prompts)
    from saelab.concept import find_concept
    from saelab.measures import concept_curve

    keywords = _keywords(args.keywords)
    lm, sae, db = _steer_inputs(args)
    classifier = None
    if args.concept:
        pos_path, sep, neg_path = args.concept.partition(":")
        if not sep:
            raise ValueError(f"--concept {args.concept!r}: expected POSITIVE.txt:NEGATIVE.txt")
        found = find_concept(lm, sae, read_texts(pos_path), read_texts(neg_path), db=db)
        features, classifier = found.features, found.classifier
    else:
        features = _numbers(args.features, "--features", int)
        if not keywords:
            raise ValueError("--features has no classifier: give --keywords, or name the concept with --concept P:N")
    curve = concept_curve(lm, sae, features, prompts, values, classifier=classifier, keywords=keywords,
                          mode=args.mode, chat=args.chat, positions=args.positions, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, samples=args.samples, seed=args.seed, db=db,
                          progress=None if args.json else _progress)
    results = _curve_json(features, classifier, curve)
    if args.report:
        _dial_report(args, features, curve, results)
    if args.json:
        _print_json(results)
        return
    print(f"features {features}, {len(prompts)} prompts, {args.mode} at {args.positions} positions")
    _print_curve(curve)


def _curve_json(features, classifier, curve) -> dict:
    from saelab.measures import rate

    return {"features": features, "classifier": classifier.to_json() if classifier else None,
            "points": [{"value": p.value, "concept_rate": p.concept_rate, "classifier_rate": rate(p.answers, "classifier"),
                        "keyword_rate": rate(p.answers, "keyword"), "nll": p.nll, "repetition": p.repetition,
                        "answers": [a.text for a in p.answers]} for p in curve]}


def _dial_report(args, features, curve, results) -> None:
    from saelab.report import Series, Table, plot_png, write_report

    xs = [0.0 if p.value is None else p.value for p in curve]
    base = curve[0].nll or 1.0
    png = plot_png([Series("concept rate", xs, [p.concept_rate for p in curve]),
                    Series("NLL / default", xs, [p.nll / base for p in curve], "right")],
                   "dial (× max activation; 0 = default)", "share of answers", "NLL ratio", f"features {features}")
    rows = [["default" if p.value is None else f"{p.value:g}×", p.concept_rate, p.nll, p.nll / base, p.repetition,
             (p.answers[0].text if p.answers else "")[:90]] for p in curve]
    path = write_report(args.report, f"Dial of features {features}", [f"{len(curve[0].answers)} answers per value."],
                        [Table("Dial", ["dial", "concept rate", "NLL", "NLL / default", "repetition", "first answer"],
                               rows)], png, results, "saelab " + shlex.join(sys.argv[1:]))
    print(f"report: {path}", file=sys.stderr)


def _feature_dial(args, values, prompts) -> None:
    from saelab.cli.steering import _steer_inputs
    from saelab.steer import dial

    lm, sae, db = _steer_inputs(args)
    curve = dial(lm, sae, args.feature, prompts, values, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, samples=args.samples, seed=args.seed, db=db, positions=args.positions)
    if args.json:
        _print_json({"feature": curve.feature, "max_act": curve.max_act, "points": [p._asdict() for p in curve.points]})
        return
    print(f"feature {curve.feature} (max activation {curve.max_act:.4g}), {len(prompts)} prompts")
    print(f"  {'value':>6}  {'activation':>10}  {'loss':>6}  tokens  first continuation")
    for p in curve.points:
        first = terminal_text((p.texts[0] if p.texts else "")[:50].replace("\n", "⏎"))
        print(f"  {p.value:>5g}×  {p.activation:>10.4g}  {p.loss:>6.3f}  {p.n_tokens:>6}  {first}")


def _run_experiment(args) -> None:
    from pathlib import Path

    from saelab.experiments import RUNNERS, ExperimentConfig

    cfg = ExperimentConfig()
    if args.values:
        cfg.values = tuple(_numbers(args.values, "--values"))
    for name in ("max_new_tokens", "samples", "n_features"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    out = Path(args.out) if args.out else Path(args.run) / "experiments" / args.name
    command = "saelab " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else \
        f"saelab experiment {args.name} {args.run}"
    results = RUNNERS[args.name](args.run, out, cfg, command, model=args.model)
    if args.json:
        _print_json({k: v for k, v in results.items() if k not in ("points", "conditions", "groups")} |
                    {"report": str(out / "report.html")})
        return
    print(f"report: {out / 'report.html'}")
