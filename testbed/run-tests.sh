#!/usr/bin/env bash
# Runs the whole RhizOS test suite: formatting, clippy, then every unit and end-to-end test
# against a real nats-server, SQLite files and wasmtime. Installs what a fresh machine lacks.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$RHIZOS_ROOT"
# The AI gateway tests' real parts: llama.cpp's server, a small model, the OpenAI SDK.
source testbed/ai/setup.sh
# The web dashboard's browser test: headless Chromium, chromedriver, Selenium.
source testbed/web/setup.sh

echo "» cargo fmt --check"
cargo fmt --all -- --check
echo "» cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "» cargo build (binaries and plugins the tests load)"
cargo build --workspace --quiet
echo "» demo guest (wasm32-wasip1 module and wasm32-wasip2 component), resolver and backend components"
cargo build --release --quiet --target wasm32-wasip1 \
  --manifest-path testbed/guests/demo/Cargo.toml --target-dir target/guests
cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path testbed/guests/demo/Cargo.toml --target-dir target/guests
cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path plugins/resolver-index/Cargo.toml --target-dir target/guests
cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path testbed/guests/backend-text/Cargo.toml --target-dir target/guests
echo "» tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --no-fail-fast
fi
echo "» fuzz smoke (each target a few seconds; \`bash testbed/fuzz/run.sh 600\` for a real run)"
bash testbed/fuzz/run.sh "${RHIZOS_FUZZ_SECONDS:-5}"
