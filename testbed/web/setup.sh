#!/usr/bin/env bash
# The web dashboard's browser test: Debian's headless Chromium and its WebDriver
# (chromium, chromium-driver) and the Selenium client in a venv of its own. Source it:
# exports RHIZOS_WEB_PYTHON, RHIZOS_CHROMIUM and RHIZOS_CHROMEDRIVER.
RHIZOS_ROOT="${RHIZOS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
WEB="$RHIZOS_ROOT/.rhizos/tools/web"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "» installing chromium and chromium-driver (apt-get; the dashboard's browser test)"
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "warning: chromium / chromedriver not found (apt-get install chromium chromium-driver): the dashboard's browser test fails" >&2
  fi
fi
if [ ! -x "$WEB/venv/bin/python" ] || ! "$WEB/venv/bin/python" -c 'import selenium' 2>/dev/null; then
  echo "» selenium (PyPI) into $WEB/venv"
  mkdir -p "$WEB"
  [ -x "$WEB/venv/bin/python" ] || python3 -m venv "$WEB/venv"
  "$WEB/venv/bin/pip" install --quiet --disable-pip-version-check 'selenium==4.*'
fi
export RHIZOS_WEB_PYTHON="$WEB/venv/bin/python"
export RHIZOS_CHROMIUM="$(command -v chromium || true)"
export RHIZOS_CHROMEDRIVER="$(command -v chromedriver || true)"
