#!/usr/bin/env bash
# The README's first command: builds RhizOS, brings up a local network (`rhizos up`: nats-server,
# orchestrator with the example module registry, one agent with the backend plugins), runs the demo
# job end to end — logs streamed, result, escrow settled with the 5% fee — then the registry module
# chain://mod-hello, then asks the network's AI model a question through the OpenAI-compatible
# gateway (llama.cpp serving SmolLM2-135M on the node), then stops the network. `--keep` leaves
# it running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$RHIZOS_ROOT"
source testbed/ai/setup.sh
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
# The node's model server: llama.cpp (PyPI xllamacpp) serving SmolLM2-135M-Instruct, behind the
# node's `openai` backend plugin.
llama_port="${RHIZOS_LLAMA_PORT:-18081}"
echo "» model server: llama.cpp on 127.0.0.1:$llama_port serving $(basename "$RHIZOS_CHAT_MODEL")"
"$RHIZOS_AI_PYTHON" testbed/ai/serve.py "$RHIZOS_CHAT_MODEL" "$llama_port" smollm2 \
  >.rhizos/llama.log 2>&1 </dev/null &
llama_pid=$!
cat > .rhizos/network/rhizos.toml <<TOML
[agent.plugins.openai]
base_url = "http://127.0.0.1:$llama_port"
[[agent.plugins.openai.models]]
name = "smollm2-135m"
upstream = "smollm2"
service = "chat"
context_length = 1024
TOML
for _ in $(seq 1 300); do
  grep -q "^ready" .rhizos/llama.log && break
  kill -0 "$llama_pid" 2>/dev/null || { cat .rhizos/llama.log; echo "error: the model server exited" >&2; exit 1; }
  sleep 0.2
done
log=.rhizos/up.log
gateway="${RHIZOS_GATEWAY__LISTEN:-127.0.0.1:8080}"
echo "» rhizos up --config .rhizos/network/rhizos.toml --gateway $gateway (log: $log)"
"$rhizos" --config .rhizos/network/rhizos.toml up --data-dir .rhizos/network --gateway "$gateway" >"$log" 2>&1 &
up_pid=$!
stop() {
  kill -INT "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true
  kill "$llama_pid" 2>/dev/null || true
}
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
echo "» rhizos flow run testbed/flows/quickstart.toml --account demo-user --wait (three steps of chain://mod-hello, one escrow)"
"$rhizos" flow run testbed/flows/quickstart.toml --account demo-user --wait
echo
echo "» rhizos models"
"$rhizos" models
echo
echo "» rhizos key create --account demo-user --name quickstart --credit-limit 0.05"
api_key=$("$rhizos" key create --account demo-user --name quickstart --credit-limit 0.05)
echo
echo "» rhizos chat smollm2-135m \"Which city is the capital of France?\" --key rhz_… (the gateway, OpenAI's API)"
"$rhizos" chat smollm2-135m "Which city is the capital of France?" --key "$api_key" \
  --gateway "http://$gateway/v1" --temperature 0 --max-tokens 32
echo
echo "The same gateway serves any OpenAI client, e.g. Python:"
echo "  OpenAI(base_url=\"http://$gateway/v1\", api_key=\"rhz_…\").chat.completions.create(model=\"smollm2-135m\", messages=[…])"
echo
"$rhizos" account balance demo-user
echo
echo "» rhizos top --json (one snapshot; \`rhizos top\` in a terminal shows it live: nodes, jobs, money, AI)"
"$rhizos" top --json | python3 -c 'import json,sys; s=json.load(sys.stdin)["stats"]; print("nodes live %d, jobs %s, fees earned %.6f USD, AI requests %d" % (s["nodes_live"], s["jobs_by_state"], s["fees_micros"]/1e6, s["ai_requests"]))'
if $keep; then
  echo
  echo "The network keeps running (pid $up_pid; stop it with: kill -INT $up_pid; the model server: kill $llama_pid)."
  echo "Watch it live: RHIZOS_NATS__NAMESPACE=$RHIZOS_NATS__NAMESPACE $rhizos top (q quits); or: $rhizos events"
  echo "Or in a browser: http://$gateway/dashboard (sign in with a file in .rhizos/network/credentials/)"
fi
