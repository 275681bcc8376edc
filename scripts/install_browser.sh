#!/usr/bin/env bash
# Debian's chromium for the Playwright browser tests (playwright cannot download browsers here).
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "install_browser: need root and apt-get to install chromium" >&2
  exit 1
fi
