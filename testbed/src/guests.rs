//! Guest programs built from source in `testbed/guests/`, for the demo and the tests.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (this crate is `<root>/testbed`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds (if needed) and returns the demo guest, `rhizos-demo.wasm` (WASI preview1).
///
/// Runs `cargo build --release --target wasm32-wasip1` on `testbed/guests/demo` into
/// `target/guests`; cargo makes this a no-op when nothing changed. Needs the target installed
/// (`rustup target add wasm32-wasip1`; `.ci/run` does it).
pub fn demo_wasm() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_demo().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_demo() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target").join("guests");
    let manifest = root.join("testbed/guests/demo/Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-wasip1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build (coverage, sanitizers) must not reach the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .context("failed to run cargo to build the demo guest")?;
    anyhow::ensure!(
        output.status.success(),
        "building the demo guest failed (is the target installed? `rustup target add wasm32-wasip1`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = target_dir.join("wasm32-wasip1/release/rhizos-demo.wasm");
    anyhow::ensure!(wasm.is_file(), "{} was not produced", wasm.display());
    Ok(wasm)
}
