//! Guest programs built from source for the demo and the tests: `testbed/guests/` (the demo
//! module and component, the `text` backend component) and the shipping `index` resolver
//! component in `plugins/resolver-index`.

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

/// Builds (if needed) and returns the demo guest as a WASI preview2 command component
/// (the same source built for `wasm32-wasip2`).
pub fn demo_component() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build_guest("testbed/guests/demo", "wasm32-wasip2", "rhizos-demo.wasm")
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Builds (if needed) and returns the `index` resolver component,
/// `rhizos_resolver_index.wasm` (a WebAssembly component for `rhizos:plugin` `resolver`,
/// built for wasm32-wasip2 with wit-bindgen).
pub fn resolver_index_wasm() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build_guest(
                "plugins/resolver-index",
                "wasm32-wasip2",
                "rhizos_resolver_index.wasm",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Builds (if needed) and returns the `textproc` backend component,
/// `rhizos_backend_text.wasm` (the `backend` world of `rhizos:plugin`, offering the `text`
/// backend; built for wasm32-wasip2 with wit-bindgen).
pub fn backend_text_wasm() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            build_guest(
                "testbed/guests/backend-text",
                "wasm32-wasip2",
                "rhizos_backend_text.wasm",
            )
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_demo() -> anyhow::Result<PathBuf> {
    build_guest("testbed/guests/demo", "wasm32-wasip1", "rhizos-demo.wasm")
}

/// `cargo build --release --target <target>` of the crate in `dir` (relative to the workspace
/// root: `plugins/resolver-index`, `testbed/guests/demo`, …) into `target/guests`.
fn build_guest(dir: &str, target: &str, artifact: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target").join("guests");
    let manifest = root.join(dir).join("Cargo.toml");
    let name = dir.rsplit('/').next().unwrap_or(dir);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            target,
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build (coverage, sanitizers) must not reach the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .with_context(|| format!("failed to run cargo to build the {name} guest"))?;
    anyhow::ensure!(
        output.status.success(),
        "building the {name} guest failed (is the target installed? `rustup target add {target}`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = target_dir.join(format!("{target}/release/{artifact}"));
    anyhow::ensure!(wasm.is_file(), "{} was not produced", wasm.display());
    Ok(wasm)
}
