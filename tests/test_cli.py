import json
import subprocess
import sys

import pytest

from saelab.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_subcommand_has_help(capsys):
    subs = _subcommands()
    for expected in ("demo", "hooks", "builtin", "harvest", "store", "train", "eval", "analyze", "feature",
                     "inspect", "search", "explain", "export", "steer", "dial", "monitor", "generate", "serve"):
        assert expected in subs, f"missing subcommand {expected}"
    for name in subs:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: saelab " + name in capsys.readouterr().out


def test_hooks_lists_names_with_widths(tiny_model_dirs, capsys):
    assert main(["hooks", str(tiny_model_dirs["gpt2"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "gpt2" and out["n_layers"] == 3
    row = next(r for r in out["hooks"] if r["hook"] == "blocks.1.mlp.hook_post")
    assert row["d"] == 128 and row["module"] == "transformer.h.1.mlp.c_proj:input"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "saelab", "hooks", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("saelab: error:") and "Traceback" not in r.stderr
