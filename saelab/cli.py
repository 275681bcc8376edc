"""The ``saelab`` command: one subcommand per stage; parse → call the library → print.

Each stage has an ``_add_<stage>(sub)`` function that registers its subcommand(s) and sets
``func`` to a ``_run_<stage>(args)`` function. Library errors a user can cause (bad path, wrong hook,
corrupt file) are printed as one line ``saelab: error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# -- hooks -----------------------------------------------------------------------------------------

def _add_hooks(sub) -> None:
    p = sub.add_parser("hooks", help="list a model's canonical hook points with their widths",
                       description="List the canonical hook names of a model (builtin, hub id, or local HF folder), "
                                   "the HF module each resolves to, and the activation width.")
    p.add_argument("model", nargs="?", default="builtin", help="builtin | hub id | path to an HF model folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_hooks)


def _run_hooks(args) -> None:
    from saelab.hooks import hook_names, hook_shapes, resolve
    from saelab.models import load_model

    lm = load_model(args.model)
    names = hook_names(lm)
    shapes = hook_shapes(lm, names)
    rows = [{"hook": n, "module": resolve(lm.model, n).hf_hook_name, "d": shapes[n]} for n in names]
    if args.json:
        _print_json({"model": args.model, "family": lm.family, "n_layers": lm.n_layers, "hooks": rows})
        return
    print(f"{args.model}: {lm.family}, {lm.n_layers} layers, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f}M parameters")
    width = max(len(r["hook"]) for r in rows)
    for r in rows:
        print(f"  {r['hook']:<{width}}  d={r['d']:<6} {r['module']}")


# -- builtin ---------------------------------------------------------------------------------------

def _add_builtin(sub) -> None:
    p = sub.add_parser("builtin", help="train or evaluate the embedded default model",
                       description="The builtin model: a tiny Llama trained on the Python standard library.")
    bsub = p.add_subparsers(dest="builtin_cmd", required=True)
    t = bsub.add_parser("train", help="reproduce the shipped builtin model from scratch (checkpoints; --resume)")
    t.add_argument("--out", required=True, help="run folder; becomes an HF model folder when training ends")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--tokens", type=int, help="training tokens (default: the shipped model's budget)")
    t.set_defaults(func=_run_builtin_train)
    e = bsub.add_parser("eval", help="held-out bits/byte on the stdlib validation files, beside xz -9e")
    e.add_argument("--model", default="builtin", help="model to score (default: the shipped builtin model)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_run_builtin_eval)


def _run_builtin_train(args) -> None:
    from dataclasses import replace

    from saelab.builtin.make import BuiltinConfig, train_builtin

    config = BuiltinConfig()
    if args.tokens:
        config = replace(config, tokens=args.tokens)
    train_builtin(args.out, config, resume=args.resume)


def _run_builtin_eval(args) -> None:
    from tqdm import tqdm

    from saelab.builtin.make import evaluate_bits_per_byte
    from saelab.models import load_model

    lm = load_model(args.model)
    with tqdm(desc="scoring validation windows", unit="win", disable=args.json, leave=False) as bar:
        report = evaluate_bits_per_byte(lm.model, lm.tokenizer, progress=bar.update)
    report = {"model": args.model, **report}
    if args.json:
        _print_json(report)
        return
    print(f"stdlib validation: {report['files']} files, {report['bytes']:,} bytes, {report['tokens']:,} tokens "
          f"({report['bytes_per_token']:.2f} bytes/token)")
    print(f"  {args.model:<10} {report['bits_per_byte']:.3f} bits/byte")
    print(f"  {'xz -9e':<10} {report['xz_bits_per_byte']:.3f} bits/byte")


# -- stage sections: each stage's owner adds _add_<stage> / _run_<stage> here --------------------

# -- harvest / store -------------------------------------------------------------------------------

def _add_harvest(sub) -> None:
    p = sub.add_parser("harvest", help="record a model's activations at hook points into activation stores",
                       description="Run a model over a corpus and store the activations at one or more hooks "
                                   "(one forward pass). With several --hook, each store is OUT/<hook>/.")
    p.add_argument("--model", default="builtin", help="builtin | hub id | path to an HF model folder")
    p.add_argument("--hook", action="append", required=True, help="hook name (repeat for several, one pass)")
    p.add_argument("--corpus", default="stdlib", help="stdlib | folder | text file | .jsonl | hf:NAME")
    p.add_argument("--split", default="train", choices=["train", "validation", "all"], help="corpus split")
    p.add_argument("--tokens", type=int, required=True, help="positions to harvest (rounded up to whole sequences)")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--out", required=True, help="store folder (several hooks: one subfolder each)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype")
    p.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    p.add_argument("--exclude-bos", action="store_true", help="do not store BOS positions")
    p.add_argument("--max-norm-factor", type=float, help="drop positions with norm > this × the batch median")
    p.add_argument("--nan-policy", default="fail", choices=["fail", "skip"], help="on NaN/inf: stop, or drop the sequence")
    p.add_argument("--shard-rows", type=int, help="rows per shard (default: ~64 MiB shards)")
    p.add_argument("--device", default="cpu", help="torch device for the model")
    p.set_defaults(func=_run_harvest)
    s = sub.add_parser("store", help="inspect or verify an activation store")
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    i = ssub.add_parser("info", help="model, hook, rows, shards, dtype, size on disk, norm summary")
    i.add_argument("path", help="store folder (or a multi-hook harvest folder)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_run_store_info)
    v = ssub.add_parser("verify", help="re-check every shard's size, sha256 and shapes (exit 2 if any is bad)")
    v.add_argument("path", help="store folder (or a multi-hook harvest folder)")
    v.set_defaults(func=_run_store_verify)


def _run_harvest(args) -> None:
    from saelab.corpus import CorpusSpec
    from saelab.harvest import harvest
    from saelab.models import load_model

    lm = load_model(args.model, device=args.device)
    result = harvest(lm, args.hook, CorpusSpec(args.corpus, args.split), tokens=args.tokens, out=args.out,
                     context=args.context, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
                     resume=args.resume, exclude_bos=args.exclude_bos, max_norm_factor=args.max_norm_factor,
                     nan_policy=args.nan_policy, shard_rows=args.shard_rows, progress=True)
    for store in result.values() if isinstance(result, dict) else [result]:
        print(f"{store.path}: {store.n_rows:,} rows of {store.hook_name} (d_in={store.d_in}), "
              f"{len(store.shards)} shards")


def _store_paths(path: str):
    from pathlib import Path

    from saelab.store import MANIFEST

    root = Path(path).expanduser()
    if (root / MANIFEST).exists() or not root.is_dir():
        return [root]
    subs = sorted(p for p in root.iterdir() if (p / MANIFEST).exists())
    return subs or [root]


def _run_store_info(args) -> None:
    from saelab.store import ActivationStore, summary

    infos = [summary(ActivationStore.open(p, allow_incomplete=True)) for p in _store_paths(args.path)]
    if args.json:
        _print_json(infos[0] if len(infos) == 1 else infos)
        return
    for s in infos:
        n = s["norm"]
        state = "complete" if s["complete"] else "UNFINISHED (resume with saelab harvest ... --resume)"
        print(f"{s['path']}: {state}")
        print(f"  model    {s['model']} (weights sha256 {str(s['model_weights_sha256'])[:12]})")
        print(f"  hook     {s['hook']} -> {s['hf_hook']}, d_in={s['d_in']}, dtype {s['dtype']}")
        print(f"  corpus   {s['corpus']}, context {s['context']}")
        print(f"  rows     {s['rows']:,} from {s['sequences']:,} sequences; excluded {s['excluded']}, "
              f"skipped sequences {s['skipped_sequences']}")
        print(f"  shards   {s['shards']}, {s['bytes'] / 2**20:.1f} MiB on disk")
        if n["mean"] is not None and s["rows"]:
            print(f"  norm     mean {n['mean']:.3g} ± {n['std']:.3g}, median {n['median']:.3g}, p99 {n['p99']:.3g}, "
                  f"max {n['max']:.3g} ({s['max_over_median']:.1f}× median)")


def _run_store_verify(args) -> None:
    from saelab.store import ActivationStore, StoreError

    bad = []
    for p in _store_paths(args.path):
        store = ActivationStore.open(p, allow_incomplete=True)
        problems = store.verify()
        bad += problems
        print(f"{p}: {len(store.shards) - len(problems)}/{len(store.shards)} shards OK, {store.n_rows:,} rows"
              + ("" if store.manifest.get("complete") else " (harvest unfinished)"))
    if bad:
        raise StoreError(f"{len(bad)} bad shard(s):\n  " + "\n  ".join(bad))

# -- train -----------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    from saelab.sae import ARCHITECTURES

    p = sub.add_parser("train", help="train a sparse autoencoder on an activation store or a live model",
                       description="Train an SAE (relu | topk | batchtopk | jumprelu) on a harvested activation "
                                   "store (--acts) or on activations streamed from a model (--model/--hook/--corpus). "
                                   "Checkpoints every --checkpoint-every steps and on Ctrl-C; --resume continues. "
                                   "Data-parallel under torchrun.")
    data = p.add_argument_group("data (one of)")
    data.add_argument("--acts", help="activation store folder (from 'saelab harvest')")
    data.add_argument("--model", help="model to stream from instead (builtin | hub id | HF folder)")
    data.add_argument("--hook", help="hook point to stream (with --model), e.g. blocks.2.hook_resid_post")
    data.add_argument("--corpus", default="stdlib", help="corpus to stream (with --model; default stdlib)")
    data.add_argument("--context", type=int, default=256, help="tokens per sequence when streaming (default 256)")
    p.add_argument("--out", required=True, help="run folder; becomes the SAE folder when training ends")
    p.add_argument("--arch", default="topk", choices=ARCHITECTURES, help="architecture (default topk)")
    p.add_argument("--latents", type=int, help="number of latents d_sae (default: --expansion x d_in)")
    p.add_argument("--expansion", type=int, default=8, help="latents per input dimension (default 8)")
    p.add_argument("--k", type=int, default=32, help="active latents per token, topk/batchtopk (default 32)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (default 2M)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step over all ranks (default 4096)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default per architecture)")
    p.add_argument("--l1", type=float, default=5.0, help="relu: L1 coefficient (default 5)")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: L0 coefficient (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log records (default 10)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resumes)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--json", action="store_true", help="print the held-out summary as JSON")
    p.set_defaults(func=_run_train)


def _train_source(args, batch_size: int):
    """The data of a train command and the provenance it implies."""
    import os

    if bool(args.acts) == bool(args.model):
        raise ValueError("give either --acts STORE or --model MODEL --hook HOOK (not both)")
    if args.acts:
        from saelab.store import ActivationStore

        return ActivationStore.open(args.acts), {}
    if not args.hook:
        raise ValueError("--model needs --hook (list them with 'saelab hooks MODEL')")
    from saelab.corpus import CorpusSpec
    from saelab.harvest import stream_activations
    from saelab.hooks import resolve
    from saelab.models import load_model

    lm = load_model(args.model)
    point = resolve(lm.model, args.hook)
    spec = CorpusSpec(args.corpus)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    stream = stream_activations(lm, args.hook, spec, context=args.context, batch_size=batch_size // world,
                                seed=args.seed + rank, passes=None)
    prov = {"model_name": lm.name, "model_weights_sha256": lm.weights_hash, "hook_name": point.name,
            "hf_hook_name": point.hf_hook_name, "hook_io": point.io, "corpus": {**spec.to_json(), "seed": args.seed},
            "context_size": args.context}
    return stream, prov


def _run_train(args) -> None:
    from saelab.train import TrainConfig, train

    source, prov = _train_source(args, args.batch_size)
    cfg = TrainConfig(architecture=args.arch, d_sae=args.latents, expansion=args.expansion, k=args.k,
                      tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, l1_coefficient=args.l1,
                      l0_coefficient=args.l0, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      log_every=args.log_every, deterministic=args.deterministic, device=args.device,
                      wandb_project=args.wandb)
    sae = train(source, cfg, out=args.out, resume=args.resume, progress=not args.json, provenance=prov)
    held = getattr(sae, "provenance", {}).get("held_out")
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return
    if args.json:
        _print_json({"out": args.out, "architecture": args.arch, "d_sae": sae.d_sae, "held_out": held})
    elif held:
        print(f"{args.out}: {args.arch} SAE, {sae.d_sae} latents; held-out FVU {held['fvu']:.4f}, "
              f"L0 {held['l0']:.1f}, dead {held['dead_fraction']:.2%} ({held['tokens']:,} tokens)")
    else:
        print(f"{args.out}: {args.arch} SAE, {sae.d_sae} latents (no held-out data to evaluate on)")

# -- eval ------------------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate SAEs: reconstruction, sparsity, spliced CE/KL (one table)",
                       description="Evaluate one or more SAE folders on held-out text: FVU, MSE, cosine, L0, "
                                   "dead/dense features, CE clean/spliced/ablated, CE recovered, KL, and an "
                                   "error-term self-check. Model, hook, context and corpus come from each SAE's "
                                   "provenance unless given. Each report is saved as eval.json in its SAE folder.")
    p.add_argument("sae", nargs="+", help="SAE folder(s); several are shown side by side")
    p.add_argument("--model", help="builtin | hub id | HF folder (default: model_name in the SAE's provenance)")
    p.add_argument("--corpus", help="corpus source (default: the SAE's training corpus, else stdlib)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "all"),
                   help="corpus split (default: validation)")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens to evaluate on (default: 200000)")
    p.add_argument("--context", type=int, help="sequence length (default: the SAE's context_size, else 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="document order of the corpus (default: 0)")
    p.add_argument("--hook", help="hook to evaluate at (default: the SAE's hook_name)")
    p.add_argument("--device", default="cpu", help="torch device for the model and SAEs (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON (a list when several SAEs are given)")
    p.add_argument("--no-save", action="store_true", help="do not write eval.json into the SAE folders")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> None:
    from saelab.corpus import CorpusSpec
    from saelab.evaluate import compare, default_corpus, evaluate
    from saelab.models import load_model
    from saelab.sae import SAE

    if args.tokens < 1 or args.batch_size < 1:
        raise ValueError("--tokens and --batch-size must be positive")
    models, reports = {}, []
    for folder in args.sae:
        sae = SAE.load(folder, device=args.device)
        name = args.model or sae.provenance.get("model_name") or sae.cfg.metadata.get("model_name")
        if not name:
            raise ValueError(f"{folder}: the SAE does not record its model; pass --model")
        if name not in models:
            models[name] = load_model(name, device=args.device)
        corpus = CorpusSpec(args.corpus, args.split) if args.corpus else default_corpus(sae, args.split)
        report = evaluate(sae, models[name], corpus, tokens=args.tokens, context=args.context,
                          batch_size=args.batch_size, seed=args.seed, hook=args.hook, name=folder)
        if not args.no_save:
            report.save(folder)
        reports.append(report)
    if args.json:
        _print_json(reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports])
        return
    print(compare(reports))

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
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--model", help="model (default: the SAE's model_name)")
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
                       description="Export a features.db: 'neuronpedia' writes Neuronpedia's upload layout "
                                   "(batch-N.json feature dashboards and explanations.json).")
    p.add_argument("format", choices=["neuronpedia"])
    p.add_argument("db", help="features.db")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model-id", help="Neuronpedia model id (default: from the database)")
    p.add_argument("--sae-set", help="Neuronpedia SAE set name (default: saelab-<hook>)")
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
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _window(ex: dict) -> str:
    return "".join(f"«{_shown(t)}»" if i == ex["max_pos"] else _shown(t) for i, t in enumerate(ex["tokens"]))


def _run_feature(args) -> None:
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(args.db) as db:
        row = db.feature(args.id)
        page = {"feature": row, "top": db.examples(args.id, "top")[:args.examples],
                "logit_effects": db.logit_effects(args.id), "neighbours": db.neighbours(args.id),
                "histogram": db.histogram(args.id)}
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
    for kind, label in (("decoder", "decoder cosine"), ("coact", "co-activation (Jaccard)")):
        near = [n for n in page["neighbours"] if n["kind"] == kind]
        if near:
            print(f"\nneighbours by {label}: " + ", ".join(f"{n['other']} ({n['value']:.2f})" for n in near))


def _run_inspect(args) -> None:
    from saelab.analyze import inspect_text

    text = args.text.replace("\\n", "\n").replace("\\t", "\t")
    rows = inspect_text(args.sae, args.model, text, top=args.top)
    if args.json:
        _print_json([r._asdict() for r in rows])
        return
    width = max(len(_shown(r.token)) for r in rows)
    for r in rows:
        feats = "  ".join(f"{f}:{a:.2f}" for f, a in r.features) or "-"
        print(f"{r.pos:4d}  {_shown(r.token):<{width}}  {feats}")


def _read_texts(path: str) -> list[str]:
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file of texts")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: each line needs a string or an object with a string 'text'")
        texts.append(text)
    return texts


def _run_search(args) -> None:
    if args.positive or args.negative:
        from saelab.analyze import contrastive_search

        if not (args.positive and args.negative):
            raise ValueError("contrastive search needs both --positive and --negative files")
        hits = contrastive_search(args.target, args.model, _read_texts(args.positive), _read_texts(args.negative),
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
    from saelab.featuredb import export_neuronpedia

    files = export_neuronpedia(args.db, args.out, model_id=args.model_id, sae_set=args.sae_set)
    print(f"wrote {len(files)} files to {args.out}")


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

    from tqdm import tqdm

    from saelab.explain import OfflineJudge, explain_db, parse_feature_selection
    from saelab.featuredb import FeatureDB
    from saelab.llm import LLMClient, LLMJudge

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
            with tqdm(total=len(ids), desc="explaining", unit="feature", leave=False) as bar:
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

# -- serve / demo ----------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="every stage on the builtin model, then the browser",
                       description="Harvest → train (TopK) → eval → analyse on the builtin model and the stdlib "
                                   "corpus, then serve the feature browser. Completed stages are skipped.")
    p.add_argument("--quick", action="store_true", help="a smaller run for a first look (runs/demo-quick)")
    p.add_argument("--run", help="run folder (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--no-serve", action="store_true", help="stop after the summary instead of serving")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from pathlib import Path

    from saelab.demo import DemoConfig, format_summary, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.run:
        config.run = Path(args.run)
    summary = run_demo(config, say=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    url = None if args.no_serve else f"http://{args.host}:{args.port}/"
    if args.json:
        _print_json({**summary, "url": url})
    else:
        print(format_summary(summary, url))
    if not args.no_serve:
        from saelab.web.app import create_app, serve
        from saelab.web.guard import ServerConfig

        server = ServerConfig(host=args.host, port=args.port)
        serve(create_app(config.run, config=server), server)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the feature browser for a run folder (or a features.db + SAE)",
                       description="Serve the feature browser and JSON API (/api/, schema at /docs and /openapi.json) "
                                   "for RUN_DIR (sae/, features.db, eval.json), or for --db (and --sae). Binds "
                                   "127.0.0.1 unless --host says otherwise.")
    p.add_argument("run_dir", nargs="?", help="run folder holding sae/, features.db and eval.json")
    p.add_argument("--db", help="features.db to serve (instead of RUN_DIR/features.db)")
    p.add_argument("--sae", help="SAE folder (instead of RUN_DIR/sae); needed for inspect, steer and monitor")
    p.add_argument("--model", help="model to run (default: the one named in the SAE's provenance)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; anything else exposes "
                                                       "the server to your network)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="extra name accepted in the Host header (repeatable), e.g. this machine's DNS name")
    p.add_argument("--max-new-tokens", type=int, default=200, help="cap on tokens per steering request (default 200)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> None:
    from saelab.web.app import create_app, serve
    from saelab.web.guard import ServerConfig

    if args.run_dir is None and args.db is None:
        raise ValueError("give a run folder (saelab serve runs/x) or --db FEATURES_DB [--sae SAE_DIR]")
    config = ServerConfig(host=args.host, port=args.port, allowed_hosts=args.allow_host,
                          max_new_tokens=args.max_new_tokens)
    app = create_app(args.run_dir, db=args.db, sae=args.sae, model=args.model, config=config)
    print(f"saelab: serving {app.state.run.label} on http://{_url_host(config.host)}:{config.port}/ (Ctrl-C to stop)",
          file=sys.stderr)
    serve(app, config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


STAGES = [_add_demo, _add_hooks, _add_builtin, _add_harvest, _add_train, _add_eval, _add_analyze, _add_explain, _add_steer, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Dictionary learning on language models: harvest activations, train sparse autoencoders, "
                    "evaluate, analyse and map features, steer and monitor.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in STAGES:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, PermissionError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saelab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
