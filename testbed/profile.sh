#!/usr/bin/env bash
# Profiles one rhizos-bench run and writes a flamegraph.
#
#   bash testbed/profile.sh NAME BENCH [BENCH OPTIONS...]
#   bash testbed/profile.sh marketplace-1k marketplace --nodes 1000 --jobs 20000
#
# Records the release benchmark (its in-process orchestrator, ledger thread and simulated nodes;
# nats-server is its own process and is not in the profile) with `perf record` and DWARF call
# graphs, then folds the stacks and draws them with inferno. Writes, under target/profile/:
#   NAME.svg     the flamegraph (open it in a browser: frames are clickable and searchable)
#   NAME.folded  the folded stacks (grep them; `inferno-flamegraph < NAME.folded` redraws)
#   NAME.txt     the benchmark's own report
# Needs perf (Debian: linux-perf) and inferno (`cargo install inferno`, done here if missing),
# and kernel.perf_event_paranoid ≤ 1 (or root).
set -euo pipefail

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
name=$1
shift
case $name in
    */* | .* | "") echo "profile.sh: NAME is a file name (letters, digits, - and _), got '$name'" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=/dev/null
source testbed/setup.sh >/dev/null

command -v perf >/dev/null || {
    echo "profile.sh: perf is not installed (Debian: sudo apt-get install linux-perf)" >&2
    exit 1
}
paranoid=$(cat /proc/sys/kernel/perf_event_paranoid 2>/dev/null || echo 2)
if [[ $(id -u) != 0 && $paranoid -gt 1 ]]; then
    echo "profile.sh: perf may not sample here (kernel.perf_event_paranoid=$paranoid); run: sudo sysctl kernel.perf_event_paranoid=1" >&2
    exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v inferno-flamegraph >/dev/null; then
    echo "profile.sh: installing inferno (flamegraph drawing, once)…" >&2
    cargo install --locked --quiet inferno
fi

echo "profile.sh: building the release benchmark…" >&2
cargo build --release --quiet -p rhizos-testbed --bin rhizos-bench

out=target/profile
mkdir -p "$out"
data=$(mktemp "${TMPDIR:-/tmp}/rhizos-perf.XXXXXX")
trap 'rm -f "$data"' EXIT
echo "profile.sh: recording target/release/rhizos-bench $*" >&2
perf record --quiet -F 499 --call-graph dwarf,32768 -o "$data" -- \
    target/release/rhizos-bench "$@" | tee "$out/$name.txt"
echo "profile.sh: folding stacks…" >&2
perf script -i "$data" 2>/dev/null | inferno-collapse-perf >"$out/$name.folded"
inferno-flamegraph --title "rhizos-bench $*" <"$out/$name.folded" >"$out/$name.svg"
echo "profile.sh: wrote $out/$name.svg ($(wc -l <"$out/$name.folded") distinct stacks)" >&2
