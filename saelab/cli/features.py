"""Stages that study an SAE's features: analyze, feature, inspect, search, export, explain."""

from __future__ import annotations

import json
from pathlib import Path

from saelab.cli.common import _print_json, seed, terminal_text
from saelab.cli.llamacpp import add_control_vector_args, run_control_vector


# -- analyze / feature / inspect / search / explain / export ---------------------------------------

def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="one streaming pass over corpus tokens → features.db",
                       description="Run the model and SAE over held-out corpus tokens and write every feature's "
                                   "stats, examples, logit effects, neighbours, map and offline explanation "
                                   "to features.db (SQLite).")
    p.add_argument("sae", help="SAE folder (model, hook and corpus are read from its provenance)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to analyse (default 1M)")
    p.add_argument("--out", help="database file (default: features.db beside the SAE folder)")
    p.add_argument("--model", help="model to run (default: the SAE's model_name)")
    p.add_argument("--corpus", help="corpus spec (default: the SAE's training corpus)")
    p.add_argument("--split", default="auto", choices=["auto", "validation", "train", "all"],
                   help="auto = validation first, then train when it runs out")
    p.add_argument("--context", type=int, help="sequence length (default: the SAE's context_size)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--k-top", type=int, default=20, help="top examples per feature")
    p.add_argument("--map", default="auto", choices=["auto", "umap", "pca", "none"], help="map layout method")
    p.add_argument("--no-explain", action="store_true", help="skip the offline explanations")
    p.add_argument("--seed", type=seed, default=0)
    p.set_defaults(func=_run_analyze)

    p = sub.add_parser("feature", help="a feature's page in the terminal",
                       description="Stats, explanation, top examples (max token marked «like this»), logit "
                                   "effects and neighbours of one feature of a features.db.")
    p.add_argument("db", help="features.db")
    p.add_argument("id", type=int, help="feature index")
    p.add_argument("--examples", type=int, default=8, help="top examples to show")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=_run_feature)

    p = sub.add_parser("inspect", help="per token of a text: its top features",
                       description="Run a text through the model and SAE and list, per token, the most active "
                                   "features (with their explanations when a features.db is beside the SAE).")
    p.add_argument("sae", help="SAE folder")
    p.add_argument("--text", required=True, help=r"the text (\n and \t are read as newline and tab)")
    p.add_argument("--top", type=int, default=5, help="features listed per token (default 5)")
    p.add_argument("--chat", action="store_true", help="the text is a user message: read it in the model's chat "
                                                       "template (its tokens are listed too)")
    p.add_argument("--model", help="model (default: the SAE's model_name)")
    p.add_argument("--db", help="features.db for explanations (default: features.db beside the SAE folder, if any)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_inspect)

    p = sub.add_parser("search", help="full-text search in features.db, or contrastive concept search",
                       description="'saelab search DB \"words\"' searches explanations and top tokens. "
                                   "'saelab search SAE_DIR --positive P --negative N' ranks features by how well "
                                   "their max activation per text separates the two sets (AUROC, then the "
                                   "relative difference of means); P and N hold one text per line, or JSONL "
                                   "with a 'text' field.")
    p.add_argument("target", help="features.db (text search) or SAE folder (contrastive)")
    p.add_argument("query", nargs="?", help="words to look for")
    p.add_argument("--positive", help="file of texts that show the concept")
    p.add_argument("--negative", help="file of texts that do not")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--model", help="model (default: the SAE's model_name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_search)

    p = sub.add_parser("export", help="export features.db to other tools' formats",
                       description="Export a features.db: 'neuronpedia' writes SAEDashboard batch files "
                                   "(batch-N.json, for Neuronpedia's convert-saedashboard-to-neuronpedia-export.py), "
                                   "Neuronpedia Explanation rows (explanations/batch-N.jsonl.gz) and the SQL for "
                                   "their explanation types (explanation_types.sql). README: 'Neuronpedia'. "
                                   "'control-vector' writes an SAE's features as a llama.cpp control vector.")
    p.add_argument("format", choices=["neuronpedia", "control-vector"],
                   help="control-vector: a llama.cpp control-vector GGUF (docs/llamacpp.md)")
    p.add_argument("db", help="features.db (neuronpedia), or the SAE folder (control-vector)")
    p.add_argument("--out", required=True, help="output folder (control-vector: the .gguf file)")
    p.add_argument("--sae", help="the SAE folder the database was made from (default: the one it records)")
    p.add_argument("--model-id", help="Neuronpedia model id (default: the model's folder name, lower case)")
    p.add_argument("--layer", type=int, help="Neuronpedia layer number (default: the number in the hook name)")
    p.add_argument("--sae-set", help="Neuronpedia source set id, letters/digits/dashes, no layer "
                                     "(default: saelab-<hook kind>-<width>)")
    p.add_argument("--sae-id-suffix", help="optional suffix of the source id: <layer>-<sae-set>__<suffix>")
    p.add_argument("--author-id", default=None,
                   help="id of an existing user of your Neuronpedia instance, the explanations' author "
                        "(default: the 'bot' user a fresh instance's database seed creates)")
    add_control_vector_args(p)
    p.set_defaults(func=_run_export)


def _run_analyze(args) -> None:
    from saelab.analyze import analyze

    out = analyze(args.sae, args.model, args.corpus, out=args.out, tokens=args.tokens, split=args.split,
                  context=args.context, batch_size=args.batch_size, k_top=args.k_top, map=args.map,
                  explain=not args.no_explain, seed=args.seed)
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(out) as db:
        info = db.sae_info()
        live = len(db.live_features())
    print(f"{out}: {info['d_sae']} features ({live} fired) over {info['tokens_analysed']:,} tokens "
          f"in {info['seconds']:.0f} s ({info['tokens_per_s']:,.0f} tokens/s)")
    if info.get("note"):
        print(f"note: {info['note']}")


def _shown(text: str) -> str:
    """Model text made safe for a terminal: control characters escaped, nothing interpreted."""
    return terminal_text(text)


def _window(ex: dict) -> str:
    return "".join(f"«{_shown(t)}»" if i == ex["max_pos"] else _shown(t) for i, t in enumerate(ex["tokens"]))


def _run_feature(args) -> None:
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(args.db) as db:
        full = db.page(args.id)
        note = db.logit_effects_note()
    row = full["feature"]
    page = {"feature": row, "top": full["examples"]["top"][:args.examples], "logit_effects": full["logit_effects"],
            "logit_effects_note": note, "neighbours": full["neighbours"], "histogram": full["histogram"]}
    if args.json:
        _print_json(page)
        return
    print(f"feature {row['id']}   density {row['density']:.3g} ({row['count']} tokens)   max {row['max_act']:.3g}"
          f"   mean {row['mean_act']:.3g}" + (f"   cluster {row['cluster']}" if row["cluster"] is not None else ""))
    score = f"  (detection score {row['score']:.2f})" if row["score"] is not None else ""
    print(f"explanation: {_shown(row['explanation']) or '-'}{score}")
    print("\ntop examples:")
    for ex in page["top"]:
        print(f"  {ex['max_act']:8.3f}  {_window(ex)}")
    effects = page["logit_effects"]
    if effects["positive"]:
        print("\npromotes: " + ", ".join(f"{_shown(t)!r} {v:+.2f}" for t, v in effects["positive"]))
        print("suppresses: " + ", ".join(f"{_shown(t)!r} {v:+.2f}" for t, v in effects["negative"]))
        print(f"  ({page['logit_effects_note']})")
    for kind, label in (("decoder", "decoder cosine"), ("coact", "co-activation (Jaccard)")):
        near = page["neighbours"][kind]
        if near:
            print(f"\nneighbours by {label}: " + ", ".join(f"{n['id']} ({n['value']:.2f})" for n in near))


def _run_inspect(args) -> None:
    from pathlib import Path

    from saelab.session import open_run
    from saelab.textfeatures import inspect_text

    text = args.text.replace("\\n", "\n").replace("\\t", "\t")
    if not text:
        raise ValueError("--text is empty: give the text to inspect")
    if args.top < 1:
        raise ValueError(f"--top {args.top}: list at least one feature per token")
    if not Path(args.sae).exists():
        raise FileNotFoundError(f"{args.sae}: no such SAE folder")
    run = open_run(args.sae, args.model, db=args.db)   # another SAE's features.db is refused before the model loads
    rows = inspect_text(run, text=text, top=args.top, chat=args.chat)
    names: dict[int, str] = {}
    if run.db_path is not None:
        with run.db() as db:
            ids = {f for r in rows for f, _ in r.features}
            names = {i: db.feature(i)["explanation"] or "" for i in ids if i < db.n_features}
    if args.json:
        _print_json([{**r._asdict(), "features": [{"id": f, "act": a, "explanation": names.get(f)}
                                                  for f, a in r.features]} for r in rows])
        return
    width = max(len(_shown(r.token)) for r in rows)
    for r in rows:
        if not names:
            feats = "  ".join(f"{f}:{a:.2f}" for f, a in r.features) or "-"
            print(f"{r.pos:4d}  {_shown(r.token):<{width}}  {feats}")
            continue
        print(f"{r.pos:4d}  {_shown(r.token)}" + ("" if r.features else "  -"))
        for f, a in r.features:
            print(f"        {f:>6} {a:7.2f}  {_shown(names.get(f, ''))[:100]}")


def _run_search(args) -> None:
    if args.positive or args.negative:
        from saelab.textfeatures import contrastive_search
        from saelab.texts import read_texts

        if not (args.positive and args.negative):
            raise ValueError("contrastive search needs both --positive and --negative files")
        hits = contrastive_search(args.target, args.model, read_texts(args.positive), read_texts(args.negative),
                                  top=args.top)
        if args.json:
            _print_json(hits)
            return
        for h in hits:
            print(f"{h['feature']:6d}  AUROC {h['auroc']:.2f}  mean max act {h['mean_pos']:.3f} vs {h['mean_neg']:.3f}")
        return
    if not args.query:
        raise ValueError("give words to search for, or --positive/--negative files for a contrastive search")
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(args.target) as db:
        hits = db.search(args.query, limit=args.top)
    if args.json:
        _print_json(hits)
        return
    for h in hits:
        print(f"{h['id']:6d}  density {h['density']:.2g}  {_shown(h['explanation'] or h['top_tokens'])}")
    if not hits:
        print(f"no feature matches {args.query!r}")


def _run_export(args) -> None:
    if args.format == "control-vector":
        return run_control_vector(args)
    from saelab.neuronpedia import DEFAULT_AUTHOR_ID, export_neuronpedia

    files = export_neuronpedia(args.db, args.out, sae=args.sae, model_id=args.model_id, layer=args.layer,
                               sae_set=args.sae_set, sae_id_suffix=args.sae_id_suffix,
                               author_id=args.author_id or DEFAULT_AUTHOR_ID)
    batch = json.loads(Path(args.out, "batch-0.json").read_text(encoding="utf-8"))
    print(f"wrote {len(files)} files to {args.out}: model {batch['model_id']}, layer {batch['layer']}, "
          f"source set {batch['sae_set']} (give Neuronpedia's converter the same values)")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="explain and score features in a features.db (offline, or by an LLM)",
                       description="Write an explanation and a detection score (balanced accuracy on held-out "
                                   "contexts) for each selected feature. Without --llm the offline explainer "
                                   "and judge are used; with --llm, any OpenAI-compatible chat endpoint.")
    p.add_argument("db", help="path to a features.db made by 'saelab analyze'")
    p.add_argument("--llm", metavar="URL", help="API base of an OpenAI-compatible endpoint, e.g. "
                                                "http://localhost:8000/v1 (vLLM, Ollama, llama.cpp, OpenAI)")
    p.add_argument("--model", help="model id at the endpoint (required with --llm)")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key (default: SAELAB_LLM_API_KEY, then OPENAI_API_KEY)")
    p.add_argument("--features", default="all", help="'all' (default), '7', '0-99' or '1,5,10-20'")
    p.add_argument("--max-features", type=int, metavar="N", help="explain at most N of the selected live features")
    p.add_argument("--judge", choices=("offline", "llm"),
                   help="detection judge (default: llm with --llm, else offline)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip features already explained by the same explainer (to resume an interrupted run)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per LLM request (default 60)")
    p.add_argument("--max-retries", type=int, default=3, help="retries per LLM request on 429/5xx/timeouts")
    p.add_argument("--price-prompt", type=float, default=0.0, metavar="USD", help="USD per 1M prompt tokens")
    p.add_argument("--price-completion", type=float, default=0.0, metavar="USD", help="USD per 1M completion tokens")
    p.set_defaults(func=_run_explain)


def _run_explain(args) -> None:
    import statistics

    from saelab.explain import OfflineJudge, explain_db, parse_feature_selection
    from saelab.featuredb import FeatureDB
    from saelab.llm import LLMClient, LLMJudge
    from saelab.progress import bar as progress_bar

    if args.llm is None and (args.model or args.judge == "llm"):
        raise ValueError("--model and --judge llm need an endpoint: add --llm URL")
    if args.llm is not None and not args.model:
        raise ValueError("--llm needs --model NAME (the model id the endpoint serves)")
    client = None if args.llm is None else LLMClient(
        args.llm, args.model, api_key_env=args.api_key_env, timeout=args.timeout, max_retries=args.max_retries,
        price_prompt=args.price_prompt, price_completion=args.price_completion)
    judge = LLMJudge(client) if (args.judge or ("llm" if client else "offline")) == "llm" else OfflineJudge()
    with FeatureDB.open(args.db, writable=True) as db:
        live = set(db.live_features())
        ids = [i for i in parse_feature_selection(args.features, db.n_features) if i in live]
        ids = ids[:args.max_features] if args.max_features is not None else ids
        try:
            with progress_bar(total=len(ids), desc="explaining", unit="feature", leave=False) as bar:
                results = explain_db(db, ids, client=client, judge=judge, skip_existing=args.skip_existing,
                                     progress=bar.update)
        finally:
            if client is not None:
                print(client.tally.summary())
    scores = [r.score for r in results.values() if r.score is not None]
    print(f"explained {len(results)} of {len(ids)} selected live features")
    if scores:
        print(f"median detection score (balanced accuracy) {statistics.median(scores):.3f} over {len(scores)} "
              f"scored features")
    else:
        print("no feature could be scored: the database has no held-out firing and non-firing contexts")
