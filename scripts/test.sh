#!/usr/bin/env bash
# README command 2 (and CI): set up with the test tools, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/setup.sh --test | tail -n 1)
exec "$bin/python" -m pytest -q -p no:cacheprovider "$@"
