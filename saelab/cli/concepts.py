"""Concepts and dials: ``saelab concept``, ``saelab dial``, ``saelab experiment``."""

from __future__ import annotations

import shlex
import sys

from saelab.cli.common import _print_json, positive, seed, terminal_text

EXPERIMENTS = ("golden-gate", "sycophancy", "unsafe-code", "builtin-dial")  # saelab.experiments.RUNNERS, without importing torch


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
    c = sub.add_parser("concept", help="find the features that write a concept from example texts; calibrate its dial",
                       description="Rank features by how well their max activation over a text separates the positive "
                                   "from the negative texts (AUROC), screen the best-ranked and explanation-matched "
                                   "features by what they write when turned up (lift of the concept's tokens), then "
                                   "search set size × mode (clamp × max activation, add × residual norm) × strength on "
                                   "a few calibration prompts: the smallest strength that puts the answers on concept "
                                   "at acceptable fluency (docs/measures.md).")
    _model_args(c)
    c.add_argument("--positive", required=True, help="texts with the concept (one per line, or .jsonl strings)")
    c.add_argument("--negative", required=True, help="texts without it (same format)")
    c.add_argument("--prompts", help="calibration prompts (default: 8 built-in chat questions)")
    c.add_argument("--no-calibrate", action="store_true", help="only select and screen features (no generation)")
    c.add_argument("--save", metavar="FILE", help="write the concept file (dial, measures, the SAE's identity) here")
    c.add_argument("--name", help="the concept's name in the saved file (default: the file's stem)")
    c.add_argument("--chat", action="store_true", default=None,
                   help="wrap each prompt in the model's chat template (default: on when the model has one)")
    c.add_argument("--keywords", help="comma-separated keywords: an answer containing one is on concept (default: the "
                                      "concept's feature classifier decides); their tokens stand for the concept")
    c.add_argument("--max-new-tokens", type=int, default=32, help="tokens per calibration answer")
    c.add_argument("--clamp-values", default="2,4,8", help="clamp strengths searched (× max activation)")
    c.add_argument("--add-values", default="0.25,0.5,1", help="add strengths searched (× residual norm)")
    c.add_argument("--modes", default="clamp,add", help="edit modes searched (clamp, add)")
    c.add_argument("--sizes", default="1,2,4", help="set sizes searched (best writers first)")
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
    d.add_argument("--unit", choices=["max", "norm"], default="max",
                   help="add in × max activation (default) or × the residual norm at the position")
    d.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    d.add_argument("--samples", type=positive, default=1, help="answers per prompt and value")
    d.add_argument("--seed", type=seed, default=0, help="sampling seed")
    d.add_argument("--report", metavar="DIR", help="also write report.html, report.png and results.json here")
    _dial_args(d, "0,1,2,5,10,20")
    d.set_defaults(func=_run_dial)
    e = sub.add_parser("experiment", help="the seeds' experiments, reproducible: golden-gate, sycophancy, unsafe-code, "
                                          "builtin-dial",
                       description="golden-gate, sycophancy, unsafe-code: the SAE dial found by 'saelab concept' against "
                                   "no steering, difference-of-means steering and prompting, on held-out prompts "
                                   "(concept rate with Wilson intervals, fluency, relevance; every strength). "
                                   "builtin-dial: monotone dials of 50 random vs 50 top-output-score features. Writes "
                                   "report.html, report.png, results.json and the concept files.")
    e.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    e.add_argument("run", help="run folder with sae/ and features.db")
    e.add_argument("--out", help="report folder (default RUN/experiments/NAME)")
    e.add_argument("--model", help="model to load instead of the SAE's")
    e.add_argument("--values", help="comma-separated dial values (default: per mode, docs/measures.md)")
    e.add_argument("--max-new-tokens", type=positive, help="tokens per answer (default 32; unsafe-code: 64)")
    e.add_argument("--samples", type=positive, help="sampled answers per code prompt and condition (default 2)")
    e.add_argument("--n-features", type=positive, help="features per group for builtin-dial (default 50)")
    e.add_argument("--prompts", type=positive, help="at most this many evaluation prompts per group (default: all)")
    e.add_argument("--calibration-prompts", type=positive, help="calibration prompts (default 8)")
    e.add_argument("--curve", choices=["full", "calibrated"], help="evaluate every strength (default) or the "
                                                                   "calibrated one and the next stronger")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=_run_experiment)


def _numbers(text: str, what: str, cast=float) -> list:
    from saelab.cli.steering import _parse_numbers

    return _parse_numbers(text, what, cast)


def _keywords(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def _progress(i: int, n: int) -> None:
    print(f"saelab:   dial point {i}/{n} done", file=sys.stderr, flush=True)


def _run_concept(args) -> None:
    from pathlib import Path

    from saelab.cli.steering import _steer_inputs
    from saelab.concept import ConceptConfig, concept_json, find_concept, find_writers
    from saelab.conceptfile import make_concept, save_concept
    from saelab.experiments import PROMPTS
    from saelab.texts import read_texts

    modes = tuple(_keywords(args.modes))
    if not modes or set(modes) - {"clamp", "add"}:
        raise ValueError(f"--modes {args.modes!r}: choose from clamp, add (comma-separated)")
    cfg = ConceptConfig(keywords=_keywords(args.keywords), max_new_tokens=args.max_new_tokens, modes=modes,
                        clamp_values=tuple(_numbers(args.clamp_values, "--clamp-values")),
                        add_values=tuple(_numbers(args.add_values, "--add-values")),
                        sizes=tuple(int(n) for n in _numbers(args.sizes, "--sizes")))
    pos, neg = read_texts(args.positive), read_texts(args.negative)
    prompts = read_texts(args.prompts) if args.prompts else read_texts(PROMPTS / "golden_gate_calibration.txt")
    if args.save and args.no_calibrate:
        raise ValueError("--save keeps a calibrated dial: drop --no-calibrate")
    lm, sae, db = _steer_inputs(args)
    chat = _chat_default(args, lm)
    _stage(f"ranking features on {len(pos)} positive and {len(neg)} negative texts")
    result = find_concept(lm, sae, pos, neg, cfg, db=db)
    _stage(f"screening up to {cfg.screen_candidates} candidates, then calibrating on {len(prompts)} prompts")
    writers = find_writers(lm, sae, result, pos, neg, prompts, cfg, chat=chat, db=db, calibrate=not args.no_calibrate,
                           progress=None if args.json else _progress)
    out = concept_json(result, writers)
    cal = writers.calibration
    if args.save:
        name = args.name or Path(args.save).stem
        path = save_concept(args.save, make_concept(sae, name, cal.spec, cal.strength, keywords=cfg.keywords,
                                                    measures={"calibrated": cal.reached, "search": cal.search,
                                                              "sweep": out["sweep"]}))
        _stage(f"concept saved: {path}")
    if args.json:
        _print_json(out)
        return
    print(f"detection features: {result.features}")
    print("writers (lift of the concept's tokens when clamped):")
    for w in writers.writers[:8]:
        print(f"  feature {w['feature']:>6}: lift {w['lift']:+.3f} nats, AUROC "
              f"{'-' if w['auroc'] is None else format(w['auroc'], '.2f')} ({w['source']})")
    if cal:
        for g in cal.search:
            print(f"  {g['mode']} {g['features']}: strength {g['strength']:g} × {g['unit']}, fluent concept rate "
                  f"{g['rate']:.0%}")
        print(f"dial: {cal.spec.label()} at {cal.strength:g} ({'target reached' if cal.reached else 'target NOT reached'})")
        _print_curve(cal.sweep)


def _chat_default(args, lm) -> bool:
    chat = getattr(args, "chat", None)
    return bool(getattr(lm.tokenizer, "chat_template", None)) if chat is None else chat


def _stage(msg: str) -> None:
    print(f"saelab: {msg}", file=sys.stderr, flush=True)


def _print_curve(points) -> None:
    from saelab.measures import rate

    base, fbase = points[0].relevance_nll or 1.0, points[0].fluency_nll or 1.0
    print(f"  {'dial':>7}  {'concept':>7}  {'classif.':>8}  {'keyword':>7}  {'fluency':>7}  {'×dflt':>5}  {'degen':>5}  "
          f"{'relev.':>6}  first answer")
    for p in points:
        c, k = rate(p.answers, "classifier"), rate(p.answers, "keyword")
        fmt = lambda r: "   -" if r is None else f"{r:.0%}"  # noqa: E731
        first = terminal_text((p.answers[0].text if p.answers else "")[:60].replace("\n", "⏎"))
        label = "default" if p.value is None else f"{p.value:g}"
        print(f"  {label:>7}  {p.concept_rate:>7.0%}  {fmt(c):>8}  {fmt(k):>7}  {p.fluency_nll:>7.3f}  "
              f"{p.fluency_nll / fbase:>5.2f}  {p.degenerate:>5.0%}  {p.relevance_nll / base:>6.2f}  {first}")


def _run_dial(args) -> None:
    from saelab.cli.steering import _steer_inputs
    from saelab.texts import read_texts
    from saelab.measures import ConceptClassifier, Judge, concept_curve
    from saelab.steer import DialSpec, max_activations

    values = _numbers(args.values, "--values")
    prompts = read_texts(args.prompts)
    keywords = _keywords(args.keywords)
    lm, sae, db = _steer_inputs(args, ids=[args.feature] if args.feature is not None else ())
    classifier = None
    if args.feature is not None:  # one feature: its own max activation over the answer (× max) decides
        features = [args.feature]
        classifier = ConceptClassifier(features, [max_activations(sae, features, db=db)[args.feature]], 0.5)
    elif args.concept:
        from saelab.concept import find_concept

        pos_path, sep, neg_path = args.concept.partition(":")
        if not sep:
            raise ValueError(f"--concept {args.concept!r}: expected POSITIVE.txt:NEGATIVE.txt")
        found = find_concept(lm, sae, read_texts(pos_path), read_texts(neg_path), db=db)
        features, classifier = found.features, found.classifier
    else:
        features = _numbers(args.features, "--features", int)
        if not keywords:
            raise ValueError("--features has no classifier: give --keywords, or name the concept with --concept P:N")
    spec = DialSpec(tuple(features), args.mode, args.unit if args.mode == "add" else "max", args.positions)
    curve = concept_curve(lm, sae, spec, prompts, values, judge=Judge(classifier, keywords), chat=args.chat,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, samples=args.samples,
                          seed=args.seed, db=db, progress=None if args.json else _progress)
    results = _curve_json(features, classifier, curve)
    if args.report:
        _dial_report(args, features, curve, results)
    if args.json:
        _print_json(results)
        return
    print(f"features {features}, {len(prompts)} prompts, {spec.label()}")
    _print_curve(curve)


def _curve_json(features, classifier, curve) -> dict:
    from saelab.concept import point_json
    from saelab.measures import rate

    return {"features": features, "classifier": classifier.to_json() if classifier else None,
            "points": [point_json(p, answers=True) | {"classifier_rate": rate(p.answers, "classifier"),
                                                      "keyword_rate": rate(p.answers, "keyword")} for p in curve]}


def _dial_report(args, features, curve, results) -> None:
    from saelab.report import Series, Table, plot_png, write_report

    xs = [0.0 if p.value is None else p.value for p in curve]
    base = curve[0].fluency_nll or 1.0
    png = plot_png([Series("concept rate", xs, [p.concept_rate for p in curve]),
                    Series("fluency: prompt-free NLL / default", xs, [p.fluency_nll / base for p in curve], "right")],
                   "dial strength (0 = default)", "share of answers", "NLL ratio", f"features {features}")
    rows = [["default" if p.value is None else f"{p.value:g}", p.concept_rate, p.fluency_nll, p.fluency_nll / base,
             p.degenerate, p.relevance_nll, (p.answers[0].text if p.answers else "")[:90]] for p in curve]
    path = write_report(args.report, f"Dial of features {features}", [f"{len(curve[0].answers)} answers per value."],
                        [Table("Dial", ["dial", "concept rate", "fluency NLL", "fluency / default", "degenerate",
                                        "relevance NLL", "first answer"], rows)], png, results,
                        "saelab " + shlex.join(sys.argv[1:]))
    print(f"report: {path}", file=sys.stderr)


def _run_experiment(args) -> None:
    from pathlib import Path

    from saelab.experiments import RUNNERS, ExperimentConfig

    cfg = ExperimentConfig()
    if args.values:
        cfg.values = tuple(_numbers(args.values, "--values"))
    for name in ("max_new_tokens", "samples", "n_features", "prompts", "calibration_prompts", "curve"):
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
