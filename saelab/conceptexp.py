"""A concept experiment: the SAE dial against its baselines, on held-out prompts, from one command.

1. **Find** the concept from example texts (:func:`saelab.concept.find_concept`), **screen** writers and
   **calibrate** the SAE dial on the calibration prompts (:func:`saelab.concept.find_writers`).
2. **Baselines**: the difference of means of the same texts at the same hook, its strength calibrated by the
   same search on the same calibration prompts; the concept stated as an instruction (system turn, user turn).
3. **Measure** on the evaluation prompts (never used for selection or calibration): no steering, each method's
   whole curve (every strength of the search), and the instructions — concept rate with its Wilson interval,
   fluency (prompt-free NLL against the default's, degenerate share), relevance (NLL given the prompt).
4. **Compare**: per method, the calibrated point and the best concept rate at acceptable fluency, and the SAE
   dial's gap to the better baseline, said plainly.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from saelab.atomic import write_json
from saelab.baselines import difference_of_means, dom_spec, prompted
from saelab.concept import (ConceptConfig, calibrate_writers, find_concept, find_writers, pick_strength,
                            point_json)
from saelab.conceptfile import make_concept, save_concept
from saelab.measures import DialValue, Judge, dial_point, encode_prompt, is_fluent
from saelab.report import Series, Table, plot_png, write_report
from saelab.steer import DialSpec


@dataclass
class ConceptExperiment:
    """What one concept experiment reads and how it judges answers."""

    name: str
    positives: list[str]
    negatives: list[str]
    calibration: list[str]
    """Prompts the dial and the baselines are calibrated on."""
    evaluation: dict[str, list[str]]
    """Held-out prompts by group (e.g. everyday, identity): never seen by selection or calibration."""
    judge: Judge
    instruction: str
    """The prompting baseline: the concept stated as an instruction."""
    keywords: list[str] = field(default_factory=list)
    """Words whose tokens stand for the concept (the writers' screen)."""
    samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 40
    curve: str = "full"
    """Strengths evaluated per steering method: ``full`` (every strength of the search) or ``calibrated`` (the
    calibrated one and the next stronger, on machines too busy for the whole curve)."""


def stage(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def row(method: str, p: DialValue, default: DialValue, groups: dict[str, slice], calibrated: bool = False) -> dict:
    """One measured point: rates overall and per group, interval, fluency, relevance."""
    k, n = sum(a.on_concept for a in p.answers), len(p.answers)
    per = {g: sum(a.on_concept for a in p.answers[s]) / max(len(p.answers[s]), 1) for g, s in groups.items()}
    return {"method": method, "strength": p.value, "calibrated": calibrated, "on": k, "n": n, "rate": k / max(n, 1),
            "ci95": list(wilson(k, n)), "groups": per, "fluency_ratio": p.fluency_nll / max(default.fluency_nll, 1e-6),
            "degenerate": p.degenerate, "relevance_ratio": p.relevance_nll / max(default.relevance_nll, 1e-6),
            "fluent": is_fluent(p, default), **{k2: v for k2, v in point_json(p, answers=True).items()
                                                if k2 in ("fluency_nll", "relevance_nll", "answers")}}


def calibrate_vector(lm, sae, spec: DialSpec, prompts, judge: Judge, cfg: ConceptConfig, chat: bool) -> tuple:
    """The difference-of-means dial's strength, by the SAE dial's search (add values, same prompts and rule)."""
    encoded = [encode_prompt(lm, p, chat, cfg.max_new_tokens) for p in prompts]
    run = lambda v, s=None: dial_point(lm, sae, s, v, encoded, judge, chat=chat, max_new_tokens=cfg.max_new_tokens)  # noqa: E731
    sweep = [run(None)] + [run(v, spec) for v in cfg.add_values]
    strength, reached, _ = pick_strength(sweep, cfg)
    return strength, reached, sweep


def run_experiment(lm, sae, db, exp: ConceptExperiment, cfg: ConceptConfig, out, command: str) -> dict:
    t0, chat = time.monotonic(), bool(getattr(lm.tokenizer, "chat_template", None))
    out.mkdir(parents=True, exist_ok=True)
    stage(f"{exp.name}: ranking features on {len(exp.positives)}+{len(exp.negatives)} texts", t0)
    found = find_concept(lm, sae, exp.positives, exp.negatives, cfg, db=db)
    stage(f"screening up to {cfg.screen_candidates} candidates on {cfg.screen_prompts} prompts", t0)
    writers = find_writers(lm, sae, found, exp.positives, exp.negatives, exp.calibration, cfg, chat=chat, db=db,
                           judge=exp.judge, token_words=exp.keywords, calibrate=False)
    good = [w["feature"] for w in writers.writers if w["lift"] > cfg.min_lift]
    stage(f"{len(good)} writers, best {[(w['feature'], round(w['lift'], 2)) for w in writers.writers[:4]]}; "
          f"calibrating on {len(exp.calibration)} prompts", t0)
    cal = calibrate_writers(lm, sae, good, exp.calibration, exp.judge, cfg, chat=chat, db=db,
                            progress=lambda i, n: stage(f"  calibration point {i} (at most {n})", t0))
    writers = writers._replace(calibration=cal)
    stage(f"SAE dial: {cal.spec.label()} at {cal.strength:g} ({'reached' if cal.reached else 'not reached'}); "
          "difference of means", t0)
    vec = difference_of_means(lm, sae, exp.positives, exp.negatives, chat=False)
    vspec = dom_spec(vec)
    v_strength, v_reached, v_sweep = calibrate_vector(lm, sae, vspec, exp.calibration, exp.judge, cfg, chat)
    prompts = [p for ps in exp.evaluation.values() for p in ps]
    groups, i = {}, 0
    for g, ps in exp.evaluation.items():
        groups[g] = slice(i * exp.samples, (i + len(ps)) * exp.samples)
        i += len(ps)
    encoded = [encode_prompt(lm, p, chat, exp.max_new_tokens) for p in prompts]
    gen = dict(chat=chat, max_new_tokens=exp.max_new_tokens, temperature=exp.temperature, samples=exp.samples)
    todo: list[tuple[str, DialSpec | None, float | None, list | None]] = [("none", None, None, None)]
    sae_values = cfg.add_values if cal.spec.mode == "add" else cfg.clamp_values
    todo += [("SAE dial", cal.spec, v, None) for v in curve_values(sae_values, cal.strength, exp.curve)]
    todo += [("difference of means", vspec, v, None) for v in curve_values(cfg.add_values, v_strength, exp.curve)]
    todo += [(f"prompting ({w})", None, None, prompted(lm, prompts, exp.instruction, w, chat, exp.max_new_tokens))
             for w in ("system", "user")]
    rows, default, t_eval = [], None, time.monotonic()
    for j, (method, spec, v, source) in enumerate(todo):
        eta = "" if not j else f", about {(time.monotonic() - t_eval) / j * (len(todo) - j) / 60:.0f} min left"
        stage(f"evaluation {j + 1}/{len(todo)}: {method} {'' if v is None else v} on {len(prompts)} prompts × "
              f"{exp.samples}{eta}", t0)
        p = dial_point(lm, sae, spec, v, encoded, exp.judge, generate_from=source, **gen)
        default = default or p
        calibrated = (method == "SAE dial" and v == cal.strength) or (method == "difference of means" and v == v_strength)
        rows.append(row(method, p, default, groups, calibrated))
        write_json(out / "partial.json", {"experiment": exp.name, "dial": {"features": list(cal.spec.features),
                   "mode": cal.spec.mode, "unit": cal.spec.unit, "strength": cal.strength, "reached": cal.reached,
                   "search": cal.search}, "dom_strength": v_strength, "writers": writers.writers[:12], "rows": rows})
    if exp.name == "unsafe-code":
        stage("evaluation: SAE set ablated", t0)
        p = dial_point(lm, sae, DialSpec(cal.spec.features, "ablate"), 0.0, encoded, exp.judge, **gen)
        rows.append(row("SAE set ablated", p, default, groups))
    results = summarise(exp, found, writers, cal, (v_strength, v_reached, v_sweep), rows, cfg, lm.name, chat)
    concept = make_concept(sae, exp.name, cal.spec, cal.strength, keywords=exp.keywords,
                           measures={"calibration": [point_json(p) for p in cal.sweep],
                                     "evaluation": [r | {"answers": None} for r in rows if r["method"] == "SAE dial"]})
    save_concept(out / "concept.json", concept)
    vconcept = make_concept(sae, exp.name + " (difference of means)", vspec, v_strength, "difference-of-means",
                            exp.keywords)
    save_concept(out / "concept-dom.json", vconcept)
    report(out, exp, results, command)
    stage(f"done: {out / 'report.html'}", t0)
    return results


def curve_values(values: Sequence[float], calibrated: float, curve: str) -> list[float]:
    """Every strength (``full``), or the calibrated one and the next stronger (``calibrated``)."""
    if curve == "full":
        return list(values)
    i = list(values).index(calibrated)
    return list(values)[i:i + 2]


def best_fluent(rows: Sequence[dict], method: str) -> dict | None:
    ok = [r for r in rows if r["method"].startswith(method) and r["fluent"]]
    return max(ok, key=lambda r: (r["rate"], -(r["strength"] or 0))) if ok else None


def summarise(exp, found, writers, cal, vcal, rows, cfg, model: str, chat: bool) -> dict:
    best = {m: best_fluent(rows, m) for m in ("SAE dial", "difference of means", "prompting")}
    at_cal = {m: next((r for r in rows if r["method"] == m and r["calibrated"]), None)
              for m in ("SAE dial", "difference of means")}
    base = [best[m]["rate"] for m in ("difference of means", "prompting") if best[m]]
    sae_best = best["SAE dial"]["rate"] if best["SAE dial"] else 0.0
    gap = sae_best - max(base) if base else None
    verdict = ("no baseline was fluent" if gap is None else
               f"the SAE dial {'wins' if gap > 0 else 'ties' if abs(gap) < 1e-9 else 'loses'} by "
               f"{abs(gap) * 100:.0f} points against the better baseline at acceptable fluency "
               f"({sae_best:.0%} vs {max(base):.0%})")
    return {"experiment": exp.name, "model": model, "chat": chat, "dial": {
        "features": list(cal.spec.features), "mode": cal.spec.mode, "unit": cal.spec.unit, "strength": cal.strength,
        "reached": cal.reached, "search": cal.search, "sweep": [point_json(p) for p in cal.sweep]},
        "dom": {"strength": vcal[0], "reached": vcal[1], "sweep": [point_json(p) for p in vcal[2]]},
        "detection_features": found.features, "ranking": found.ranking[:10], "writers": writers.writers[:12],
        "concept_tokens": writers.concept_tokens, "rows": rows, "best_fluent": best, "at_calibrated": at_cal,
        "gap": gap, "verdict": verdict, "n_eval": rows[0]["n"], "n_calibration": len(exp.calibration),
        "n_texts": [len(exp.positives), len(exp.negatives)], "config": {
            "clamp_values": cfg.clamp_values, "add_values": cfg.add_values, "max_fluency_ratio": cfg.max_fluency_ratio,
            "max_degenerate": cfg.max_degenerate, "samples": exp.samples, "temperature": exp.temperature,
            "max_new_tokens": exp.max_new_tokens, "instruction": exp.instruction}}


def report(out, exp: ConceptExperiment, res: dict, command: str) -> None:
    rows = res["rows"]
    groups = list(exp.evaluation)
    table = Table("Held-out evaluation (every method, every strength)",
                  ["method", "strength", "on concept", "rate", "95% CI", *groups, "fluency NLL / default",
                   "degenerate", "fluent", "relevance NLL / default", "first answer"],
                  [[r["method"] + (" (calibrated)" if r["calibrated"] else ""),
                    "" if r["strength"] is None else r["strength"], f"{r['on']}/{r['n']}", r["rate"],
                    f"{r['ci95'][0]:.0%}–{r['ci95'][1]:.0%}", *[r["groups"][g] for g in groups], r["fluency_ratio"],
                    r["degenerate"], r["fluent"], r["relevance_ratio"], r["answers"][0][:90]] for r in rows])
    search = Table("SAE dial calibration search (calibration prompts)", ["features", "mode", "unit", "strength",
                   "fluent concept rate", "target reached"],
                   [[", ".join(map(str, s["features"])), s["mode"], s["unit"], s["strength"], s["rate"], s["reached"]]
                    for s in res["dial"]["search"]])
    writers = Table("Writers screen (lift of the concept tokens' log-probability when clamped)",
                    ["feature", "lift (nats)", "detection AUROC", "source"],
                    [[w["feature"], w["lift"], w["auroc"], w["source"]] for w in res["writers"]])
    series = []
    for m in ("SAE dial", "difference of means"):
        pts = [r for r in rows if r["method"] == m]
        series.append(Series(m, [r["fluency_ratio"] for r in pts], [r["rate"] for r in pts]))
    for r in rows:
        if r["method"].startswith("prompting") or r["method"] in ("none", "SAE set ablated"):
            series.append(Series(r["method"], [r["fluency_ratio"]], [r["rate"]], style="points"))
    png = plot_png(series, "fluency: prompt-free NLL / default's (acceptable ≤ 1.5)", "concept rate (held out)",
                   title=f"{exp.name}: concept rate against fluency, every method")
    d = res["dial"]
    summary = [f"Model {res['model']}{' (chat template)' if res['chat'] else ''}; {res['n_texts'][0]} positive and "
               f"{res['n_texts'][1]} negative example texts; calibration on {res['n_calibration']} prompts; evaluation "
               f"on {res['n_eval']} held-out answers ({', '.join(f'{g}: {len(p)}' for g, p in exp.evaluation.items())}"
               f" prompts × {exp.samples}), {exp.max_new_tokens} tokens, temperature {exp.temperature}.",
               f"SAE dial: features {d['features']}, {d['mode']} at {d['strength']:g} (× "
               f"{'max activation' if d['unit'] == 'max' else 'residual norm'}), target "
               f"{'reached' if d['reached'] else 'not reached'} on the calibration prompts. Difference of means "
               f"calibrated at {res['dom']['strength']:g} × residual norm.",
               f"Verdict: {res['verdict']}."]
    examples = [(f"{r['method']} {'' if r['strength'] is None else r['strength']}: {p}", a)
                for r in rows for p, a in list(zip([p for ps in exp.evaluation.values() for p in ps], r["answers"]))[:1]]
    write_report(out, f"{exp.name}: the SAE dial against difference of means and prompting", summary,
                 [table, search, writers], png, res, command, examples)
