#!/usr/bin/env bash
# The Debian text packages that saelab's 'english' corpus is built from (see saelab/english.py):
# WordNet glosses, fortunes, the Jargon File, The Devil's Dictionary (~15 MB, offline afterwards).
set -euo pipefail
pkgs="wordnet-base fortunes dict-jargon dict-devil"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "install_english: need root and apt-get to install:$missing (or run: sudo apt-get install$missing)" >&2
  exit 1
fi
