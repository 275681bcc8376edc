"""Every command in README.md runs as written: each ``saelab ...`` line of its code blocks parses with the CLI's
own parser (so every subcommand and option it spells exists), every file it names that ships with the repo
exists, the cheap ones really run, the scripts it names are valid bash, and its Python example imports only
names that exist."""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PLACEHOLDERS = {"ID": "7"}
"""Words the README uses for what the reader fills in (a feature id from 'saelab search'), and a stand-in."""
CHEAP = {("hooks", "builtin"), ("cache", "info")}
"""Commands (first two words after saelab) that run for real in seconds, with no run folder."""


def blocks(lang: str | None = None) -> list[str]:
    return [body for tag, body in FENCE.findall(README.read_text()) if lang is None or tag == lang]


def commands() -> list[str]:
    """Each ``saelab ...`` command of the shell blocks, comments dropped, ``&&`` chains split."""
    found = []
    for body in blocks():
        if body.lstrip().startswith(("import ", "from ")):
            continue                          # the Python example
        lines, pending = [], ""
        for raw in body.splitlines():          # join continued lines (a trailing backslash) first
            raw = re.sub(r"\s+#.*$", "", raw).rstrip()
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
                continue
            lines.append(pending + raw)
            pending = ""
        for line in lines:
            line = line.strip()
            for part in re.split(r"\s*(?:&&|\|)\s*", line):
                if part.startswith("saelab "):
                    found.append(part)
    return found


COMMANDS = commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 20 and any(c.startswith("saelab demo") for c in COMMANDS)


def shipped_files(words: list[str]) -> list[str]:
    """Words that name a file of the repository (not a run's output): saelab/..., scripts/..., docs/..., and
    example inputs (*.txt, *.jsonl) outside runs/."""
    return [w.split(":")[0] if ":" in w and not w.startswith("hf:") else w for w in words
            if w.startswith(("saelab/", "scripts/", "docs/")) or
            (w.endswith((".txt", ".jsonl")) and not w.startswith(("runs/", "RUN/", "-")))]


def filled(command: str) -> list[str]:
    """The words after ``saelab``, placeholders filled in."""
    return [re.sub(r"\b(" + "|".join(PLACEHOLDERS) + r")\b", lambda m: PLACEHOLDERS[m[1]], w)
            for w in shlex.split(command)[1:]]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_parses_and_names_files_that_exist(command, capsys):
    words = filled(command)
    try:
        args = build_parser().parse_args(words)
    except SystemExit:
        pytest.fail(f"README command does not parse: {command}\n{capsys.readouterr().err}")
    assert callable(args.func)
    for word in words:
        for piece in word.split(":") if word.count(":") == 1 and "=" not in word else [word]:
            if piece in shipped_files([piece]) and not (ROOT / piece).exists():
                pytest.fail(f"README command names {piece}, which does not exist: {command}")


@pytest.mark.parametrize("command", [c for c in COMMANDS if tuple(shlex.split(c)[1:3]) in CHEAP])
def test_cheap_readme_commands_really_run(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path))
    assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()


def test_the_scripts_it_names_are_valid_bash():
    named = sorted(set(re.findall(r"scripts/[\w.-]+\.sh", README.read_text())))
    assert "scripts/demo.sh" in named
    for script in named:
        assert (ROOT / script).is_file(), script
        result = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_the_python_example_uses_names_that_exist():
    import importlib

    import saelab

    (code,) = blocks("python")
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: from {node.module} import {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "saelab":
            assert hasattr(saelab, node.attr), f"README uses saelab.{node.attr}"


def test_the_readme_says_how_to_put_saelab_on_path():
    text = README.read_text()
    assert "source .venv/bin/activate" in text
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], capture_output=True)
    assert result.returncode == 0 and "activate" in (ROOT / "scripts" / "setup.sh").read_text()


@pytest.mark.slow
def test_readme_python_example_runs_on_the_web_run(web_run_dir, tmp_path):
    """The Python example, run as written against a real (tiny) run folder laid out as runs/demo."""
    (code,) = blocks("python")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "demo").symlink_to(web_run_dir)
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(web_run_dir / "features.db") as db:
        model = db.sae_info()["model_name"]
    code = code.replace('saelab.load_model("builtin")', f"saelab.load_model({model!r})")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}   # this checkout's saelab, from another working folder
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "default:" in result.stdout and "steered:" in result.stdout
