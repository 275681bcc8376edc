"""llama.cpp figures: saelab's dial exported as a control vector in llama-server against saelab's own Add,
and the LLM explainer served by llama-server against the offline explainer.

    python benchmarks/llamacpp.py rates saelab/shipped/smollm2 --features 3737,3594,4648,1202 --values 1,2,4 \\
        --prompts heldout20.txt --keywords "golden gate,bridge,san francisco" --max-new-tokens 40 \\
        --saelab dial.json --out rates.json
    python benchmarks/llamacpp.py explain runs/demo-smollm2/features.db --features 0-39 [--judges offline,llm] \
        --out explain.json

``rates``: for each value v (and 0), the features' Add direction at strength v is exported
(:mod:`saelab.controlvector`) and llama-server answers every prompt greedily from the *same token ids*
saelab steers (the chat template as saelab renders it; ``POST /completion``). The on-concept rate is the
keyword rate of :func:`saelab.measures.keyword_hit`, with a Wilson 95% interval. ``--saelab`` takes the
JSON of ``saelab dial ... --mode add --json`` on the same prompts and values, and puts its rates and answers
beside the server's (identical answers, and the words the two share before they part). Plain server vs a
zero-strength vector: the count of identical answers.

``explain``: copies the features.db, explains the selected live features with SmolLM2 served by
llama-server (``saelab explain --llm``), judged once by the same LLM and once by the offline judge, and
compares each feature's detection score with the offline explanation's already in the database.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from saelab.controlvector import feature_direction, llamacpp_layer, write_control_vector
from saelab.conceptexp import wilson
from saelab.texts import read_texts
from saelab.formats import load_sae
from saelab.llamacpp import LlamaServer, ServerConfig
from saelab.measures import encode_prompt, keyword_hit
from saelab.models import load_model, smollm2_gguf
from saelab.steer import max_activations, sae_hook_name


def _rate(answers, keywords) -> dict:
    k, n = sum(keyword_hit(a, keywords) for a in answers), len(answers)
    lo, hi = wilson(k, n)
    return {"rate": k / n, "hits": k, "n": n, "wilson95": [lo, hi]}


def _shared_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def _serve(gguf, vectors, encoded, max_new, log) -> tuple[list[str], float]:
    with LlamaServer(ServerConfig(gguf, vectors, log=log)) as s:
        t0 = time.perf_counter()
        answers = [s.complete(ids[0].tolist(), max_new)["content"] for ids in encoded]
        return answers, time.perf_counter() - t0


def rates(args) -> dict:
    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    sae, lm = load_sae(args.sae), load_model("smollm2")
    prompts, keywords = read_texts(args.prompts), [k.strip() for k in args.keywords.split(",") if k.strip()]
    features = [int(f) for f in args.features.split(",")]
    maxes = max_activations(sae, features)
    encoded = [encode_prompt(lm, p, chat=True, max_new_tokens=args.max_new_tokens) for p in prompts]
    layer, gguf = llamacpp_layer(sae_hook_name(sae)), smollm2_gguf()
    ref = json.loads(Path(args.saelab).read_text()) if args.saelab else None
    ref_points = {p["value"]: p for p in ref["points"]} if ref else {}
    plain, secs = _serve(gguf, [], encoded, args.max_new_tokens, out_dir / "plain.log")
    result = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "features": features,
              "keywords": keywords, "layer": layer, "plain": {**_rate(plain, keywords), "seconds": secs,
                                                              "answers": plain}, "points": []}
    for v in [0.0, *[float(x) for x in args.values.split(",")]]:
        path = write_control_vector(out_dir / f"cv-{v:g}.gguf",
                                    feature_direction(sae, {f: v for f in features}, maxes), layer, "llama")
        answers, secs = _serve(gguf, [(path, 1.0)], encoded, args.max_new_tokens, out_dir / f"cv-{v:g}.log")
        point = {"value": v, "server": {**_rate(answers, keywords), "seconds": secs, "answers": answers}}
        if v == 0:
            point["identical_to_plain"] = sum(a == b for a, b in zip(answers, plain))
        mine = ref_points.get(None if v == 0 else v)
        if mine is not None:
            theirs = mine["answers"][:len(prompts)]  # the same first prompts, in order
            point["saelab"] = {**_rate(theirs, keywords), "answers": theirs}
            point["identical_to_saelab"] = sum(a.strip() == b.strip() for a, b in zip(answers, theirs))
            point["shared_words_median"] = statistics.median(_shared_words(a, b) for a, b in zip(answers, theirs))
        result["points"].append(point)
        _print_point(point)
    return result


def _print_point(p) -> None:
    s = p["server"]
    line = f"v={p['value']:g}: server {s['hits']}/{s['n']} ({s['wilson95'][0]:.0%}-{s['wilson95'][1]:.0%})"
    if "saelab" in p:
        m = p["saelab"]
        line += (f", saelab {m['hits']}/{m['n']} ({m['wilson95'][0]:.0%}-{m['wilson95'][1]:.0%}); identical answers "
                 f"{p['identical_to_saelab']}/{s['n']}, shared words (median) {p['shared_words_median']}")
    if "identical_to_plain" in p:
        line += f"; zero vector = plain server on {p['identical_to_plain']}/{s['n']}"
    print(line, flush=True)


def _explain(db: Path, url: str, features: str, judge: str, log: Path) -> str:
    cmd = [sys.executable, "-m", "saelab", "explain", str(db), "--llm", url, "--model", "smollm2",
           "--features", features, "--judge", judge, "--timeout", "300", "--max-retries", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _scores(db: Path, ids) -> dict[int, tuple[str, str, float | None]]:
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(db) as d:
        rows = {i: d.feature(i) for i in ids}
    return {i: (r["explanation"], r["explanation_source"], r["score"]) for i, r in rows.items()}


def explain(args) -> dict:
    from saelab.explain import parse_feature_selection
    from saelab.featuredb import FeatureDB

    out_dir = Path(args.out).with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    with FeatureDB.open(args.db) as d:
        live = set(d.live_features())
        ids = [i for i in parse_feature_selection(args.features, d.n_features) if i in live]
    offline = _scores(Path(args.db), ids)
    result = {"features": ids, "offline": offline, "runs": {}}
    with LlamaServer(ServerConfig(smollm2_gguf(), context=8192, log=out_dir / "server.log")) as s:
        for judge in args.judges.split(","):
            db = out_dir / f"features-{judge}.db"
            shutil.copyfile(args.db, db)
            t0 = time.perf_counter()
            stdout = _explain(db, s.base_url, ",".join(map(str, ids)), judge, out_dir / f"explain-{judge}.log")
            got = _scores(db, ids)
            llm = {i: v for i, v in got.items() if v[1] == "llm:smollm2"}
            pairs = [(offline[i][2], v[2]) for i, v in llm.items() if v[2] is not None and offline[i][2] is not None]
            result["runs"][judge] = {"stdout": stdout, "seconds": time.perf_counter() - t0, "explained": len(llm),
                                     "scores": {i: v for i, v in llm.items()},
                                     "median_llm": statistics.median(b for _, b in pairs) if pairs else None,
                                     "median_offline_same_features": statistics.median(a for a, _ in pairs) if pairs else None,
                                     "llm_better": sum(b > a for a, b in pairs), "n_pairs": len(pairs)}
            print(f"judge {judge}: {stdout.strip()}", flush=True)
            print({k: v for k, v in result["runs"][judge].items() if k not in ("scores", "stdout")}, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rates")
    r.add_argument("sae")
    r.add_argument("--features", required=True)
    r.add_argument("--values", default="1,2,4")
    r.add_argument("--prompts", required=True)
    r.add_argument("--keywords", required=True)
    r.add_argument("--max-new-tokens", type=int, default=40)
    r.add_argument("--saelab", help="JSON of 'saelab dial --mode add --json' on the same prompts and values")
    r.add_argument("--out", required=True)
    e = sub.add_parser("explain")
    e.add_argument("db")
    e.add_argument("--features", default="0-39")
    e.add_argument("--judges", default="offline,llm", help="offline and/or llm (the same served model)")
    e.add_argument("--out", required=True)
    args = ap.parse_args()
    result = rates(args) if args.what == "rates" else explain(args)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
