#!/usr/bin/env bash
# Installs LiteLLM's proxy (a pinned version, in its own venv under .rhizos/tools/litellm) for
# `rhizos-bench gateway`, which runs the same load through it beside RhizOS's gateway.
# Not part of the test suite: only the benchmark uses it. 1.106.12 is the newest that installs
# from PyPI here (1.110.x needs a package PyPI does not serve; shared/TOOLCHAIN.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.rhizos/tools/litellm/venv"
if [ -x "$VENV/bin/litellm" ]; then
  echo "» LiteLLM $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') is installed ($VENV/bin/litellm)"
  exit 0
fi
echo "» installing LiteLLM's proxy 1.106.12 into $VENV (pip, ~90 s)"
mkdir -p "$(dirname "$VENV")"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]==1.106.12'
echo "» done: rhizos-bench gateway now compares with it"
