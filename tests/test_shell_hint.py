"""The commands saelab suggests ("'saelab serve runs/demo' starts it again") work in a fresh shell."""

import os
import subprocess

from saelab import runtime
from saelab.demo import format_summary
from saelab.runtime import shell_command


def fake_env(tmp_path, monkeypatch, on_path: bool):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "saelab"
    script.write_text("#!/bin/sh\necho ran \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setattr(runtime.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", (f"{bin_dir}:" if on_path else "") + "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    return script


def test_saelab_when_on_path_else_the_script_path_a_fresh_shell_can_run(tmp_path, monkeypatch):
    fake_env(tmp_path, monkeypatch, on_path=True)
    assert shell_command() == "saelab"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")            # a fresh shell: no virtualenv active
    hint = shell_command()
    assert hint == ".venv/bin/saelab"
    ran = subprocess.run(["bash", "-c", f"{hint} serve runs/demo"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert ran.stdout.strip() == "ran serve runs/demo"


def test_without_a_script_it_is_python_dash_m(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.sys, "executable", str(tmp_path / "py" / "python3"))
    monkeypatch.chdir(os.path.dirname(os.path.abspath(__file__)))
    assert shell_command() == f"{tmp_path / 'py' / 'python3'} -m saelab"


def test_the_demo_summary_hint_uses_it(tmp_path, monkeypatch):
    fake_env(tmp_path, monkeypatch, on_path=False)
    s = {"run": "runs/demo quick", "fvu": 0.1, "l0": 32.0, "dead": 0, "d_sae": 64, "dead_fraction": 0.0,
         "eval_tokens": 100, "live_features": 64, "analysed_tokens": 100, "ce_clean": None, "notable": []}
    assert "'.venv/bin/saelab serve 'runs/demo quick'' starts it again" in format_summary(s, "http://x/")
    assert "'.venv/bin/saelab serve 'runs/demo quick'' serves it" in format_summary(s, None)
