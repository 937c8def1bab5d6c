#!/usr/bin/env bash
# The README's first command: builds RhizOS, brings up a local network (`rhizos up`: nats-server,
# orchestrator with the example module registry, one agent with the backend plugins), runs the demo
# job end to end — logs streamed, result, escrow settled with the 5% fee — then the registry module
# chain://mod-hello, then stops the network. `--keep` leaves it running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$RHIZOS_ROOT"
keep=false
[ "${1:-}" = "--keep" ] && keep=true

echo "» building RhizOS (first build takes a few minutes)"
cargo build --workspace --quiet
for target in wasm32-wasip1 wasm32-wasip2; do
  cargo build --release --quiet --target "$target" \
    --manifest-path testbed/guests/demo/Cargo.toml --target-dir target/guests
done
cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path plugins/resolver-index/Cargo.toml --target-dir target/guests
demo_wasm=target/guests/wasm32-wasip1/release/rhizos-demo.wasm
rhizos=target/debug/rhizos

# A demo price of $36 per CPU-hour makes the sub-second demo cost visible to the micro-dollar.
export RHIZOS_PRICING__CPU_HOUR_CENTS="${RHIZOS_PRICING__CPU_HOUR_CENTS:-3600}"
export RHIZOS_NATS__NAMESPACE="${RHIZOS_NATS__NAMESPACE:-demo}"
# A fresh network each time, so the demo's numbers read the same on every run.
rm -rf .rhizos/network
mkdir -p .rhizos/network/resolvers
# The example registry (testbed/registry) behind the `index` resolver component.
echo "» rhizos module pack testbed/registry/modules.json (the example registry)"
"$rhizos" module pack testbed/registry/modules.json --out .rhizos/network/resolvers/registry/index.json
cp target/guests/wasm32-wasip2/release/rhizos_resolver_index.wasm .rhizos/network/resolvers/index.wasm
echo '{"read_dirs": [{"host": "registry", "guest": "/registry"}], "config": {"index": "/registry/index.json"}}' \
  > .rhizos/network/resolvers/index.json
export RHIZOS_ORCHESTRATOR__RESOLVER_DIR="${RHIZOS_ORCHESTRATOR__RESOLVER_DIR:-$RHIZOS_ROOT/.rhizos/network/resolvers}"
log=.rhizos/up.log
echo "» rhizos up (log: $log)"
"$rhizos" up --data-dir .rhizos/network >"$log" 2>&1 &
up_pid=$!
stop() { kill -INT "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true; }
$keep || trap stop EXIT
for _ in $(seq 1 150); do
  grep -q "RhizOS is up" "$log" && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$log"; echo "error: rhizos up exited" >&2; exit 1; }
  sleep 0.2
done
grep -q "RhizOS is up" "$log" || { cat "$log"; echo "error: the network did not come up in 30 s" >&2; exit 1; }
grep -E "^(✓|✗|!)" "$log"

echo
echo "» rhizos user add demo-user && rhizos account deposit demo-user 1"
"$rhizos" user add demo-user
"$rhizos" account deposit demo-user 1
echo
echo "» rhizos job submit --account demo-user --wasm $demo_wasm --arg hello --arg RhizOS --timeout-secs 5 --max-cost 0.10 --wait"
"$rhizos" job submit --account demo-user --wasm "$demo_wasm" --arg hello --arg RhizOS --timeout-secs 5 --max-cost 0.10 --wait
echo
echo "» rhizos module list"
"$rhizos" module list
echo
echo "» rhizos module resolve chain://mod-hello@1.0.0"
"$rhizos" module resolve chain://mod-hello@1.0.0
echo
module_job="hello-$(date +%s)"
echo "» rhizos job submit --account demo-user --module chain://mod-hello@1.0.0 --job-id $module_job --max-cost 0.10 --wait"
"$rhizos" job submit --account demo-user --module chain://mod-hello@1.0.0 --job-id "$module_job" --timeout-secs 5 --max-cost 0.10 --wait
echo
echo "» rhizos receipt get $module_job --out .rhizos/receipt.json && rhizos receipt verify .rhizos/receipt.json"
"$rhizos" receipt get "$module_job" --out .rhizos/receipt.json
"$rhizos" receipt verify .rhizos/receipt.json
echo
"$rhizos" account balance demo-user
if $keep; then
  echo
  echo "The network keeps running (pid $up_pid; stop it with: kill -INT $up_pid)."
  echo "Try: RHIZOS_NATS__NAMESPACE=$RHIZOS_NATS__NAMESPACE $rhizos events"
fi
