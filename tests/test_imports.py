"""The layering of docs/architecture.md §2 (imports point down, no cycles), checked by import-linter.

The contracts live in pyproject.toml; this test runs ``lint-imports`` so that every test run (and so
CI) enforces them, and shows that the contracts do catch an upward import and a cycle.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the ``saelab`` package under ``root``, with the contracts of ``pyproject.toml``."""
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, f"lint-imports found broken import contracts:\n{result.stdout}\n{result.stderr}"
    assert "Contracts: 4 kept, 0 broken." in result.stdout, result.stdout


def test_upward_import_and_cycle_are_caught(tmp_path):
    copy = tmp_path / "saelab"
    shutil.copytree(ROOT / "saelab", copy, ignore=lambda d, names: [n for n in names if n in ("model", "__pycache__")])
    with open(copy / "sae.py", "a") as f:
        f.write("\nimport saelab.analyze  # upward: sae sits below analyze\nimport saelab.formats  # formats imports sae\n")
    with open(copy / "web" / "state.py", "a") as f:
        f.write("\nimport saelab.web.api  # upward inside the web app: the API reads the state\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "saelab.sae is not allowed to import saelab.analyze" in result.stdout, result.stdout
    assert "No import cycles BROKEN" in result.stdout, result.stdout
    assert "saelab.web.state is not allowed to import saelab.web.api" in result.stdout, result.stdout
