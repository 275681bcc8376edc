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
# -- train -----------------------------------------------------------------------------------------
# -- eval ------------------------------------------------------------------------------------------
# -- analyze / feature / inspect / search / explain / export ---------------------------------------
# -- steer / dial / monitor / generate -------------------------------------------------------------
# -- serve / demo ----------------------------------------------------------------------------------

STAGES = [_add_hooks, _add_builtin]


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
