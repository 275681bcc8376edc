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


# -- what a newcomer meets: explanations, checks before the model loads, quiet output ----------------

@pytest.fixture(scope="module")
def served_run(web_run_dir):
    return web_run_dir


def test_inspect_shows_explanations_from_the_features_db_beside_the_sae(served_run, capsys):
    from saelab.featuredb import FeatureDB

    assert main(["inspect", str(served_run / "sae"), "--text", "import os\\n", "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with FeatureDB.open(served_run / "features.db") as db:
        for f in (f for r in rows for f in r["features"]):
            assert f["explanation"] == db.feature(f["id"])["explanation"]
    assert any(f["explanation"] for r in rows for f in r["features"])
    assert main(["inspect", str(served_run / "sae"), "--text", "import os", "--top", "1"]) == 0
    out = capsys.readouterr().out
    first = next(f for r in rows for f in r["features"] if f["explanation"])
    assert first["explanation"][:40] in out.replace("\\n", "\n") or first["explanation"][:20] in out


def test_inputs_are_checked_before_the_model_loads(served_run, monkeypatch, capsys):
    import saelab.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(saelab.models, "load_model", no_model)
    sae = str(served_run / "sae")
    assert main(["inspect", sae, "--text", ""]) == 2
    assert "--text is empty" in capsys.readouterr().err
    assert main(["steer", sae, "--prompt", "x", "--feature", "64=2x"]) == 2
    err = capsys.readouterr().err
    assert "feature 64 does not exist" in err and "features 0-63" in err
    assert main(["steer", sae, "--prompt", "", "--feature", "1=2x"]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert main(["monitor", sae, "--watch", "3,999", "--input", "-"]) == 2
    assert "feature 999 does not exist" in capsys.readouterr().err
    assert main(["inspect", str(served_run / "nothing"), "--text", "x"]) == 2
    assert "no such SAE folder" in capsys.readouterr().err


def test_a_run_folder_given_for_an_sae_is_read_as_its_sae(served_run, capsys):
    """The session layer resolves RUN to RUN/sae (saelab.session.sae_folder): same answer as the SAE folder."""
    assert main(["inspect", str(served_run / "sae"), "--text", "x = 1", "--json"]) == 0
    by_sae = capsys.readouterr().out
    assert main(["inspect", str(served_run), "--text", "x = 1", "--json"]) == 0
    assert capsys.readouterr().out == by_sae


def test_quiet_by_default_and_verbose_on_request(served_run):
    import os

    from saelab.cli import QUIET_ENV

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}  # as a user's shell has it
    cmd = [sys.executable, "-m", "saelab", "inspect", str(served_run / "sae"), "--text", "x = 1"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and "Loading weights" not in quiet.stdout
    loud = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], capture_output=True, text=True, env=env)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
