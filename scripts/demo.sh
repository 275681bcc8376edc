#!/usr/bin/env bash
# README command 1: set up, then run the whole pipeline on the builtin model and serve the browser.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/setup.sh | tail -n 1)
exec "$bin/saelab" demo "$@"
