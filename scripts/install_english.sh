#!/usr/bin/env bash
# The Debian text packages that saelab's text corpora are built from (see saelab/english.py):
#   english:   WordNet glosses, fortunes, the Jargon File, The Devil's Dictionary (~15 MB)
#   reference: the Python 3 documentation, Linux man pages, the GCIDE dictionary (~60 MB)
# Offline afterwards.
set -euo pipefail
pkgs="wordnet-base fortunes dict-jargon dict-devil python3-doc manpages manpages-dev dict-gcide"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  echo "install_english: need root and apt-get to install:$missing (or run: sudo apt-get install$missing)" >&2
  exit 1
fi
