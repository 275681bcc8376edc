"""The ``saelab`` command: one subcommand per stage; parse → call the library → print.

Each stage has an ``_add_<stage>(sub)`` function that registers its subcommand(s) and sets
``func`` to a ``_run_<stage>(args)`` function; they live in the module of their pipeline step
(``data``, ``train_eval``, ``features``, ``steering``, ``app``) and are listed in ``STAGES`` below.
Library errors a user can cause (bad path, wrong hook, corrupt file, a busy folder, a full disk:
:class:`saelab.errors.SaelabError` and the builtin errors the library raises for them) are printed as
one line ``saelab: error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from saelab.cli.app import _add_demo, _add_serve
from saelab.cli.data import _add_builtin, _add_harvest, _add_hooks
from saelab.cli.features import _add_analyze, _add_explain
from saelab.cli.steering import _add_steer
from saelab.cli.train_eval import _add_eval, _add_train
from saelab.errors import SaelabError
from saelab.runtime import tune_allocator


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
    tune_allocator()
    try:
        args.func(args)
    except SaelabError as e:
        print(f"saelab: error: {e}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as e:   # a features.db read outside FeatureDB's checked queries
        print(f"saelab: error: a feature database cannot be read ({e}); it is damaged: rebuild it with "
              "'saelab analyze SAE_DIR'", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, PermissionError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"saelab: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saelab: interrupted", file=sys.stderr)
        return 130
    return 0
