"""``saelab --help`` answers at once: importing saelab and building the CLI's parser load no torch or
transformers (the public names are lazy re-exports), and the lazy names are the same objects as before."""

import subprocess
import sys

import saelab

HEAVY = ("torch", "transformers", "numpy", "safetensors")


def _fresh(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (a clean sys.modules) and return its result."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


HELP_EVERY_COMMAND = """
import argparse, contextlib, io, sys
from saelab.cli import build_parser, main

def commands(parser, path=()):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))

n = 0
for path in commands(build_parser()):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([*path, "--help"])
    n += 1
print(n, sorted(m for m in HEAVY if m in sys.modules))
"""


def test_help_of_every_command_imports_no_torch():
    result = _fresh(f"HEAVY = {HEAVY!r}\n" + HELP_EVERY_COMMAND)
    assert result.returncode == 0, result.stderr
    n, heavy = result.stdout.strip().split(" ", 1)
    assert int(n) > 25 and heavy == "[]", result.stdout


def test_import_saelab_is_lazy_and_dir_lists_the_public_names():
    result = _fresh("import sys, saelab\n"
                    f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
                    "print(set(saelab.__all__) <= set(dir(saelab)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_every_public_name_resolves_to_its_stage_modules_object():
    from saelab.analyze import analyze
    from saelab.models import load_model
    from saelab.steer import Clamp

    for name in saelab.__all__:
        assert getattr(saelab, name) is not None, name
    assert saelab.load_model is load_model and saelab.Clamp is Clamp and saelab.analyze is analyze


def test_a_submodule_import_does_not_shadow_the_function_of_the_same_name():
    # 'import saelab.harvest' makes the import system set saelab.harvest = <module>; the eager re-exports
    # left the function there, and so must the lazy ones.
    result = _fresh("import saelab.harvest, saelab.evaluate, saelab.train, saelab.analyze, saelab\n"
                    "print(all(callable(getattr(saelab, n)) and not isinstance(getattr(saelab, n), type(saelab))\n"
                    "          for n in ('harvest', 'evaluate', 'train', 'analyze')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_an_unknown_attribute_is_an_attribute_error():
    try:
        saelab.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("saelab.no_such_name did not raise")


def test_the_clis_architecture_choices_are_the_registrys():
    from saelab import arch
    from saelab.cli.train_eval import ARCHITECTURES as CLI_ARCHITECTURES

    assert CLI_ARCHITECTURES == tuple(arch.names())
