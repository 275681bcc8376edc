"""Stages that end in the web app: demo (every stage, then the browser), serve."""

from __future__ import annotations

import sys

from saelab.cli.common import _print_json


# -- serve / demo ----------------------------------------------------------------------------------

def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="every stage on the builtin model, then the browser",
                       description="Harvest → train (TopK) → eval → analyse on the builtin model and the stdlib "
                                   "corpus, then serve the feature browser. Completed stages are skipped.")
    p.add_argument("--model", choices=("builtin", "smollm2"), default="builtin",
                   help="builtin (default) or smollm2, the real chat model SmolLM2-135M-Instruct (runs/demo-smollm2; "
                        "uses the SAE that ships with saelab unless --full)")
    p.add_argument("--full", action="store_true", help="with --model smollm2: harvest and train the SAE here "
                                                       "(~15 min on 2 cores) instead of using the shipped one")
    p.add_argument("--quick", action="store_true", help="a smaller run for a first look (runs/demo-quick)")
    p.add_argument("--run", help="run folder (default runs/demo, runs/demo-quick with --quick, "
                                 "runs/demo-smollm2 with --model smollm2)")
    p.add_argument("--no-serve", action="store_true", help="stop after the summary instead of serving")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from pathlib import Path

    from saelab.demo import DemoConfig, format_summary, run_demo

    if args.model == "smollm2":
        if args.quick:
            raise ValueError("--quick is for the builtin model; --model smollm2 already uses a shipped SAE")
        config = DemoConfig.smollm2(full=args.full)
    else:
        if args.full:
            raise ValueError("--full is for --model smollm2 (the builtin demo always trains its SAE)")
        config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.run:
        config.run = Path(args.run)
    summary = run_demo(config, say=lambda m: print(m, file=sys.stderr if args.json else sys.stdout, flush=True))
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
    p.add_argument("--diff", metavar="DIFF_DIR", help="a 'saelab diff' report folder, shown at /diff")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> None:
    from saelab.web.app import create_app, serve
    from saelab.web.guard import ServerConfig

    if args.run_dir is None and args.db is None:
        raise ValueError("give a run folder (saelab serve runs/x) or --db FEATURES_DB [--sae SAE_DIR]")
    config = ServerConfig(host=args.host, port=args.port, allowed_hosts=args.allow_host,
                          max_new_tokens=args.max_new_tokens)
    app = create_app(args.run_dir, db=args.db, sae=args.sae, model=args.model, config=config, diff=args.diff)
    print(f"saelab: serving {app.state.run.label} on http://{_url_host(config.host)}:{config.port}/ (Ctrl-C to stop)"
          + (f"; the diff at /diff" if args.diff else ""), file=sys.stderr)
    serve(app, config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
