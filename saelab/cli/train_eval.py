"""Stages that make and measure an SAE: train, eval."""

from __future__ import annotations

from saelab.cli.common import _print_json, seed


# -- train -----------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a sparse autoencoder on an activation store or a live model",
                       description="Train an SAE (relu | topk | batchtopk | jumprelu) on a harvested activation "
                                   "store (--acts) or on activations streamed from a model (--model/--hook/--corpus). "
                                   "Checkpoints every --checkpoint-every steps and on Ctrl-C; --resume continues. "
                                   "Data-parallel under torchrun.")
    p.add_argument("--out", required=True, help="run folder; becomes the SAE folder when training ends")
    add_train_options(p)
    p.add_argument("--json", action="store_true", help="print the held-out summary as JSON")
    p.set_defaults(func=_run_train)


ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")
"""saelab.arch.names(), spelt out: building the parser must not import torch (tests/test_cli_startup.py
checks that the two agree)."""


def add_train_options(p, sizes: bool = True) -> None:
    """The options of ``saelab train`` (data, recipe, run), shared with ``saelab sweep``.

    ``sizes``: also --latents and --k as single integers (a sweep defines them as lists itself)."""
    data = p.add_argument_group("data (one of)")
    data.add_argument("--acts", help="activation store folder (from 'saelab harvest')")
    data.add_argument("--model", help="model to stream from instead (builtin | smollm2 | hub id | HF folder | .gguf)")
    data.add_argument("--hook", help="hook point to stream (with --model), e.g. blocks.2.hook_resid_post")
    data.add_argument("--corpus", default="stdlib", help="corpus to stream (with --model; default stdlib)")
    data.add_argument("--context", type=int, default=256, help="tokens per sequence when streaming (default 256)")
    p.add_argument("--arch", default="topk", choices=ARCHITECTURES, help="architecture (default topk)")
    if sizes:
        p.add_argument("--latents", type=int, help="number of latents d_sae (default: --expansion x d_in)")
    p.add_argument("--expansion", type=int, default=8, help="latents per input dimension (default 8)")
    if sizes:
        p.add_argument("--k", type=int, default=32, help="active latents per token, topk/batchtopk (default 32)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (default 2M)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step over all ranks (default 4096)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default per architecture)")
    p.add_argument("--l1", type=float, default=5.0, help="relu: L1 coefficient (default 5)")
    p.add_argument("--l0", type=float, default=1.0, help="jumprelu: L0 coefficient (default 1)")
    p.add_argument("--matryoshka-widths", metavar="W1,W2,...",
                   help="matryoshka_batchtopk: ends of the nested prefixes (default latents/8,/4,/2,all)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--init-seed", type=seed, help="seed of the initial weights alone (default: --seed)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log records (default 10)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise resumes)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def train_config(args, d_sae: int | None, k: int | None):
    """The TrainConfig of a train/sweep command's options (``d_sae``/``k`` given apart: a sweep varies them)."""
    from saelab.sweep import parse_sizes
    from saelab.train import TrainConfig

    widths = parse_sizes(args.matryoshka_widths, "--matryoshka-widths") if args.matryoshka_widths else None
    return TrainConfig(architecture=args.arch, d_sae=d_sae, expansion=args.expansion, k=k, matryoshka_widths=widths,
                       tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, l1_coefficient=args.l1,
                       l0_coefficient=args.l0, seed=args.seed, init_seed=args.init_seed, checkpoint_every=args.checkpoint_every,
                       log_every=args.log_every, deterministic=args.deterministic, device=args.device,
                       wandb_project=args.wandb)


def train_source(args, batch_size: int):
    """The data of a train command and the provenance it implies."""
    import os

    if bool(args.acts) == bool(args.model):
        raise ValueError("give either --acts STORE or --model MODEL --hook HOOK (not both)")
    if args.acts:
        from saelab.store import ActivationStore

        return ActivationStore.open(args.acts), {}
    if not args.hook:
        raise ValueError("--model needs --hook (list them with 'saelab hooks MODEL')")
    from saelab.sources import StreamSource

    source = StreamSource.open(args.model, args.hook, args.corpus, context=args.context, seed=args.seed)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return source.batches(batch_size, rank, world), source.provenance.to_json()


def _run_train(args) -> None:
    from saelab.provenance import Provenance
    from saelab.train import train

    source, prov = train_source(args, args.batch_size)
    cfg = train_config(args, args.latents, args.k)
    sae = train(source, cfg, out=args.out, resume=args.resume, progress=not args.json, provenance=prov)
    held = Provenance.of(sae).held_out
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return
    if args.json:
        _print_json({"out": args.out, "architecture": args.arch, "d_sae": sae.d_sae, "held_out": held})
    elif held:
        print(f"{args.out}: {args.arch} SAE, {sae.d_sae} latents; {held_out_summary(held)} ({held['tokens']:,} tokens)")
    else:
        print(f"{args.out}: {args.arch} SAE, {sae.d_sae} latents (no held-out data to evaluate on)")


def held_out_summary(held: dict) -> str:
    """A trained SAE's held-out statistics (saelab.json's ``held_out``) in one line."""
    return f"held-out FVU {held['fvu']:.4f}, L0 {held['l0']:.1f}, dead {held['dead_fraction']:.2%}"


# -- eval ------------------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate SAEs: reconstruction, sparsity, spliced CE/KL (one table)",
                       description="Evaluate one or more SAE folders on held-out text: FVU, MSE, cosine, L0, "
                                   "dead/dense features, CE clean/spliced/ablated, CE recovered, KL, and an "
                                   "error-term self-check. Model, hook, context and corpus come from each SAE's "
                                   "provenance unless given. Each report is saved as eval.json in its SAE folder.")
    p.add_argument("sae", nargs="+", help="SAE folder(s); several are shown side by side")
    p.add_argument("--model", help="builtin | smollm2 | hub id | HF folder | .gguf (default: model_name in the SAE's provenance)")
    p.add_argument("--corpus", help="corpus source (default: the SAE's training corpus, else stdlib)")
    p.add_argument("--split", default="validation", choices=("train", "validation", "all"),
                   help="corpus split (default: validation)")
    p.add_argument("--tokens", type=int, default=200_000, help="tokens to evaluate on (default: 200000)")
    p.add_argument("--context", type=int, help="sequence length (default: the SAE's context_size, else 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    p.add_argument("--seed", type=seed, default=0, help="document order of the corpus (default: 0)")
    p.add_argument("--hook", help="hook to evaluate at (default: the SAE's hook_name)")
    p.add_argument("--mean-ablation", action="store_true",
                   help="also report CE with the hook mean-ablated (one more pass and forward per batch)")
    p.add_argument("--device", default="cpu", help="torch device for the model and SAEs (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON (a list when several SAEs are given)")
    p.add_argument("--no-save", action="store_true", help="do not write eval.json into the SAE folders")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> None:
    from saelab.evaluate import compare, evaluate
    from saelab.formats import load_sae
    from saelab.models import load_model
    from saelab.provenance import stage_inputs
    from saelab.stage_config import EvalConfig

    config = EvalConfig(tokens=args.tokens, context=args.context, batch_size=args.batch_size, seed=args.seed,
                        ablations=("zero", "mean") if args.mean_ablation else ("zero",))   # checked before loading
    models, reports = {}, []
    for folder in args.sae:
        sae = load_sae(folder, device=args.device)
        try:
            run = stage_inputs(sae, model=args.model, hook=args.hook, corpus=args.corpus, split=args.split)
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None
        if run.model_name not in models:
            models[run.model_name] = load_model(run.model_name, device=args.device)
        report = evaluate(sae, models[run.model_name], run.corpus, config=config, hook=args.hook, name=folder)
        if not args.no_save:
            report.save(folder)
        reports.append(report)
    if args.json:
        _print_json(reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports])
        return
    print(compare(reports))
