"""Stages that make the data: the model and its hook points (hooks, builtin) and the activations
recorded from it (harvest, store)."""

from __future__ import annotations

import argparse

from saelab.cli.common import _print_json, seed


# -- hooks -----------------------------------------------------------------------------------------

def _add_hooks(sub) -> None:
    p = sub.add_parser("hooks", help="list a model's canonical hook points with their widths",
                       description="List the canonical hook names of a model (builtin, hub id, or local HF folder), "
                                   "the HF module each resolves to, and the activation width.")
    p.add_argument("model", nargs="?", default="builtin", help="builtin | smollm2 | hub id | HF model folder | .gguf file")
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
    from saelab.builtin.make import evaluate_bits_per_byte
    from saelab.models import load_model
    from saelab.progress import bar as progress_bar

    lm = load_model(args.model)
    with progress_bar(desc="scoring validation windows", unit="win", disable=args.json, leave=False) as bar:
        report = evaluate_bits_per_byte(lm.model, lm.tokenizer, progress=bar.update)
    report = {"model": args.model, **report}
    if args.json:
        _print_json(report)
        return
    print(f"stdlib validation: {report['files']} files, {report['bytes']:,} bytes, {report['tokens']:,} tokens "
          f"({report['bytes_per_token']:.2f} bytes/token)")
    print(f"  {args.model:<10} {report['bits_per_byte']:.3f} bits/byte")
    print(f"  {'xz -9e':<10} {report['xz_bits_per_byte']:.3f} bits/byte")


# -- harvest / store -------------------------------------------------------------------------------

def _add_harvest(sub) -> None:
    p = sub.add_parser("harvest", help="record a model's activations at hook points into activation stores",
                       description="Run a model over a corpus and store the activations at one or more hooks "
                                   "(one forward pass). With several --hook, each store is OUT/<hook>/.")
    p.add_argument("--model", default="builtin", help="builtin | smollm2 | hub id | HF model folder | .gguf file")
    p.add_argument("--hook", action="append", required=True,
                   help="hook name (repeat, or a comma list, for several: one pass, one store each)")
    p.add_argument("--corpus", default="stdlib",
                   help="stdlib | english | chat:MODEL | folder | text file | .jsonl | hf:NAME | a mix A+B")
    p.add_argument("--split", default="train", choices=["train", "validation", "all"], help="corpus split")
    p.add_argument("--tokens", type=int, required=True, help="positions to harvest (rounded up to whole sequences)")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--out", required=True, help="store folder (several hooks: one subfolder each)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="storage dtype")
    p.add_argument("--seed", type=seed, default=0, help="corpus shuffle seed")
    p.add_argument("--exclude-bos", action=argparse.BooleanOptionalAction, default=True,
                   help="leave out BOS positions: window starts (attention sinks on real models) and document "
                        "separators; later stages exclude the same positions (default: on)")
    p.add_argument("--sink-factor", type=float, default=5.0,
                   help="leave out attention sinks: positions whose norm exceeds this × their window's median "
                        "(default 5; 0 turns the rule off); later stages apply the same rule")
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
    x = ssub.add_parser("prefix", help="a complete store of the first tokens of another (which may still be harvesting)",
                        description="Hard-links the leading shards of SRC that hold --tokens corpus positions into OUT, "
                                    "a complete store of its own (statistics recomputed), e.g. to train on the first "
                                    "tokens of a long harvest while it runs on.")
    x.add_argument("path", help="source store folder (or a multi-hook harvest folder: one prefix per hook)")
    x.add_argument("--tokens", type=int, required=True, help="corpus positions to take (rounded up to whole shards)")
    x.add_argument("--out", required=True, help="new store folder (multi-hook source: one subfolder each)")
    x.set_defaults(func=_run_store_prefix)
    c = sub.add_parser("cache", help="list or clear the token cache (corpora tokenised once, reused by every stage)",
                       description="Local corpora are tokenised once per tokenizer and kept in $SAELAB_CACHE "
                                   "(default ~/.cache/saelab); harvest, analyze and eval read them from there.")
    csub = c.add_subparsers(dest="cache_cmd", required=True)
    ci = csub.add_parser("info", help="where the cache is and what it holds")
    ci.add_argument("--json", action="store_true", help="print JSON")
    ci.set_defaults(func=_run_cache_info)
    csub.add_parser("clear", help="delete every cached corpus (they are rebuilt on next use)").set_defaults(
        func=_run_cache_clear)
    k = sub.add_parser("corpus", help="build a corpus that needs a model: chat:MODEL (the model's own answers)")
    ksub = k.add_subparsers(dest="corpus_cmd", required=True)
    kc = ksub.add_parser("chat", help="ask the model ~800 hand-written requests; its answers become corpus chat:MODEL",
                         description="Puts every request of saelab/prompts/chat_requests.toml (topics x templates) "
                                     "to the model as a chat message and keeps the exchanges, in its chat template, "
                                     "as the corpus 'chat:MODEL' (use it alone, or mixed: --corpus english+chat:MODEL). "
                                     "Resumes where it stopped if interrupted.")
    kc.add_argument("model", help="a chat model: smollm2 | hub id | HF folder | .gguf")
    kc.add_argument("--device", default="cpu", help="torch device for the model")
    kc.set_defaults(func=_run_corpus_chat)


def _run_harvest(args) -> None:
    from saelab.corpus import CorpusSpec
    from saelab.harvest import harvest
    from saelab.models import load_model
    from saelab.stage_config import HarvestConfig

    config = HarvestConfig(tokens=args.tokens, context=args.context, batch_size=args.batch_size, dtype=args.dtype,
                           seed=args.seed, exclude_bos=args.exclude_bos, sink_factor=args.sink_factor or None,
                           nan_policy=args.nan_policy, shard_rows=args.shard_rows)   # checked before the model loads
    lm = load_model(args.model, device=args.device)
    hooks = [h.strip() for arg in args.hook for h in arg.split(",") if h.strip()]
    result = harvest(lm, hooks, CorpusSpec(args.corpus, args.split), out=args.out, config=config,
                     resume=args.resume, progress=True)
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


def _run_store_prefix(args) -> None:
    from pathlib import Path

    from saelab.store.prefix import make_prefix

    sources = _store_paths(args.path)
    for src in sources:
        out = Path(args.out) if len(sources) == 1 else Path(args.out) / src.name
        store = make_prefix(src, out, tokens=args.tokens)
        print(f"{out}: {store.n_rows:,} rows, {len(store.shards)} shards of {src}")


def _run_corpus_chat(args) -> None:
    from functools import partial

    from saelab.chatcorpus import build, requests
    from saelab.models import load_model
    from saelab.progress import bar as progress_bar

    bar = progress_bar(total=len(requests()), unit="request", desc=f"chat:{args.model}")

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    path = build(args.model, load=partial(load_model, device=args.device), progress=progress)
    bar.close()
    print(f"corpus chat:{args.model}: {path}")


def _run_cache_info(args) -> None:
    from saelab import token_cache
    from saelab.models import cached_models

    found, models = token_cache.entries(), cached_models()
    if args.json:
        _print_json({"cache": str(token_cache.cache_root()), "enabled": token_cache.enabled(), "corpora": found,
                     "models": models})
        return
    state = "" if token_cache.enabled() else " (switched off by SAELAB_TOKEN_CACHE)"
    print(f"token cache {token_cache.cache_root() / 'tokens'}{state}: {len(found)} corpora, "
          f"{sum(e['bytes'] for e in found) / 2**20:.1f} MiB")
    for e in found:
        print(f"  {e['source']:<24} {e['files'] or 0:>6} files {e['tokens']:>13,} tokens "
              f"{e['bytes'] / 2**20:8.1f} MiB  tokenizer {str(e['tokenizer_sha256'])[:12]}  {e['path']}")
    print(f"models {token_cache.cache_root() / 'models'} (GGUF files converted once): {len(models)} models, "
          f"{sum(m['bytes'] for m in models) / 2**20:.1f} MiB")
    for m in models:
        print(f"  {m['bytes'] / 2**20:8.1f} MiB  {m['path']}  from {m['gguf_file']}")


def _run_cache_clear(args) -> None:
    from saelab import token_cache

    freed = token_cache.clear()
    print(f"cleared {token_cache.cache_root() / 'tokens'}: {freed / 2**20:.1f} MiB freed")

