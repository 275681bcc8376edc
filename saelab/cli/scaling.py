"""Stages over many SAE sizes: sweep (train them in one pass), scaling (fit loss against size and compute)."""

from __future__ import annotations

from saelab.cli.common import _print_json
from saelab.cli.train_eval import add_train_options, held_out_summary, train_config, train_source


# -- sweep -----------------------------------------------------------------------------------------

def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train many SAEs (a scan of latents and/or k) in one pass over the data",
                       description="Train one SAE per value of --latents (and of --k) on the same batches: each batch "
                                   "is read once and fed to every SAE, so each trains exactly as 'saelab train' "
                                   "would train it alone with the same --seed. Takes every option of 'saelab "
                                   "train'. OUT gets one ordinary SAE folder per member (latents-01024, k-032, or "
                                   "latents-01024-k-032 when both vary) and, once all are saved, sweep.json. "
                                   "Checkpoints like 'saelab train'; --resume continues every member. Then: "
                                   "'saelab scaling OUT'.")
    p.add_argument("--out", required=True, help="sweep folder: one SAE folder per member, and sweep.json")
    p.add_argument("--latents", help="comma-separated numbers of latents, e.g. 1024,2048,4096 "
                                     "(default: --expansion x d_in, one width)")
    p.add_argument("--k", default="32", help="comma-separated active latents per token for topk/batchtopk, e.g. "
                                             "16,32,64 (a k scan; default 32)")
    add_train_options(p, sizes=False)
    p.add_argument("--json", action="store_true", help="print the members and their held-out summaries as JSON")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> None:
    import os

    from saelab import arch as architectures
    from saelab.sweep import parse_sizes, sweep

    latents = parse_sizes(args.latents, "--latents")        # checked before any data is opened
    has_k = architectures.get(args.arch).needs_k
    ks = parse_sizes(args.k, "--k") if has_k else []
    if not has_k and "," in str(args.k):
        raise ValueError(f"--k lists several values, but {args.arch} has no k; use --arch topk or batchtopk")
    if len(latents) < 2 and len(ks) < 2:
        raise ValueError("a sweep scans at least two values: give --latents A,B,... and/or --k A,B,...")
    source, prov = train_source(args, args.batch_size)
    saes = sweep(source, train_config(args, None, ks[0] if ks else None), args.out, latents, ks,
                 resume=args.resume, progress=not args.json, provenance=prov)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from saelab.provenance import Provenance
    from saelab.sweep import load_sweep

    _, members = load_sweep(args.out)
    rows = [{**m._asdict(), "held_out": Provenance.of(sae).held_out} for m, sae in zip(members, saes)]
    if args.json:
        _print_json({"out": args.out, "members": rows})
        return
    for r in rows:
        held = r["held_out"]
        fvu = held_out_summary(held) if held else "no held-out data"
        print(f"{args.out}/{r['path']}: {r['arch']} {r['d_sae']} latents" + (f", k {r['k']}" if r["k"] else "")
              + f"; {fvu}")
    print(f"next: saelab scaling {args.out}")


# -- scaling ---------------------------------------------------------------------------------------

def _add_scaling(sub) -> None:
    p = sub.add_parser("scaling", help="scaling laws of a sweep: loss vs latents, compute and k, fitted power laws",
                       description="Read a sweep folder (from 'saelab sweep') and fit L(N) = a*N^(-b) + c to each "
                                   "member's held-out FVU against latents, training FLOPs and (for a k scan) k, "
                                   "with standard errors; with --ce, or where a member's eval.json has it, also "
                                   "1 - CE recovered. Writes a report (report.html, report.png log-log plot, "
                                   "results.json) into SWEEP/scaling/. Needs 3+ members along an axis to fit.")
    p.add_argument("sweep", help="sweep folder (holds sweep.json)")
    p.add_argument("--ce", action="store_true",
                   help="evaluate CE recovered of members without an eval.json, as 'saelab eval' does (needs the "
                        "store's model; saves eval.json in each member)")
    p.add_argument("--ce-tokens", type=int, default=16_384, help="tokens per CE evaluation (default 16384)")
    p.add_argument("--acts", help="activation store to measure held-out FVU on, for members that recorded none")
    p.add_argument("--device", default="cpu", help="torch device for --ce and --acts evaluations (default: cpu)")
    p.add_argument("--out", help="report folder (default: SWEEP/scaling)")
    p.add_argument("--json", action="store_true", help="print {fit: {a, b, c, a_se, b_se, c_se}, fits, members} "
                                                       "as JSON, members smallest first")
    p.set_defaults(func=_run_scaling)


def _run_scaling(args) -> None:
    from saelab.scaling import scaling

    result = scaling(args.sweep, ce=args.ce, ce_tokens=args.ce_tokens, acts=args.acts, device=args.device,
                     out=args.out)
    if args.json:
        _print_json(result)
        return
    for r in result["members"]:
        ce = f", CE recovered {r['ce_recovered']:.4f}" if r.get("ce_recovered") is not None else ""
        print(f"{r['name']}: {r['d_sae']} latents, k {r['k']}: held-out FVU {r['fvu']:.4f}{ce}, "
              f"{r['flops']:.3g} training FLOPs")
    for name, f in result["fits"].items():
        se = (f" (± {f['a_se']:.2g}, {f['b_se']:.2g}, {f['c_se']:.2g})" if f["b_se"] is not None
              else " (no error estimate: 3 points)")
        edge = "; b at the edge of its search range: not a falling power law" if f["at_bound"] else ""
        print(f"{name}: L = {f['a']:.4g}·N^(-{f['b']:.4g}) + {f['c']:.4g}{se}, rms residual {f['rmse']:.2g}{edge}")
    if not result["fits"]:
        print("no fit: a power law needs at least 3 members that differ in latents (or in k)")
    print(f"report: {result['report']}")
