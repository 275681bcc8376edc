"""The ``saelab`` command: one subcommand per stage; parse → call the library → print.

Each stage has an ``_add_<stage>(sub)`` function that registers its subcommand(s) and sets
``func`` to a ``_run_<stage>(args)`` function; they live in the module of their pipeline step
(``data``, ``train_eval``, ``scaling``, ``features``, ``steering``, ``concepts``, ``families``, ``app``) and are listed in ``STAGES`` below.
Library errors a user can cause (bad path, wrong hook, corrupt file, a busy folder, a full disk:
:class:`saelab.errors.SaelabError` and the builtin errors the library raises for them) are printed as
one line ``saelab: error: ...`` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import warnings

from saelab.cli.app import _add_demo, _add_serve
from saelab.cli.concepts import _add_concepts
from saelab.cli.data import _add_builtin, _add_harvest, _add_hooks
from saelab.cli.diff import _add_diff
from saelab.cli.families import _add_families
from saelab.cli.features import _add_analyze, _add_explain
from saelab.cli.scaling import _add_scaling, _add_sweep
from saelab.cli.steering import _add_steer
from saelab.cli.train_eval import _add_eval, _add_train
from saelab.errors import SaelabError
from saelab.model_names import check_hook_name, check_model_name
from saelab.runtime import tune_allocator


STAGES = [_add_demo, _add_hooks, _add_builtin, _add_harvest, _add_train, _add_sweep, _add_scaling, _add_eval, _add_analyze,
          _add_explain, _add_steer, _add_concepts, _add_families, _add_serve,
          _add_diff]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saelab",
        description="Dictionary learning on language models: harvest activations, train sparse autoencoders, "
                    "evaluate, analyse and map features, steer and monitor.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party progress bars and warnings (transformers, huggingface_hub, umap)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in STAGES:
        add(sub)
    return parser


QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar too
             # every other tqdm bar of the libraries underneath (transformers' GGUF de-quantising bar); saelab's
             # own progress (saelab.progress) passes disable=False and still shows
             "TQDM_DISABLE": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def quiet_third_party() -> None:
    """No progress bars or advisory warnings from the libraries underneath: saelab's own progress (stderr), its
    results and its errors are all a command prints (``--verbose`` keeps them). Env vars, because transformers
    and tqdm read them on first import."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # umap: "n_jobs value 1 overridden to 1 by setting random_state" (we seed the layout on purpose)
    warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)


REMOTE_MODEL_OPTION = {"explain"}
"""Commands whose --model is not a model to load (explain's names the LLM served at --llm)."""


def check_names(args) -> None:
    """The model and hook names a command was given, checked before torch is even imported: a typo fails in
    a second with the nearest known names (:mod:`saelab.model_names`), not after a model load or hub retries."""
    model = getattr(args, "model", None)
    if not isinstance(model, str) or args.command in REMOTE_MODEL_OPTION:
        return
    check_model_name(model)
    hooks = getattr(args, "hook", None)
    for value in [hooks] if isinstance(hooks, str) else hooks or []:
        for hook in value.split(","):          # harvest takes --hook A,B as well as --hook A --hook B
            if hook.strip():
                check_hook_name(model, hook.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_third_party()
    tune_allocator()
    try:
        check_names(args)
        code = args.func(args)            # a stage may return an exit code (the diff gate: 1 when it fails)
        sys.stdout.flush()                # a closed pipe shows here when the output fitted in the buffer
    except BrokenPipeError:
        return _reader_gone()
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
    return code if type(code) is int else 0   # not a bool or a result a stage happened to return


def _reader_gone() -> int:
    """The reader of stdout left (``saelab search ... | head``): stop quietly, as ``cat`` does, with the
    shell's status for SIGPIPE; stdout goes to /dev/null so that Python's own flush at exit stays silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
