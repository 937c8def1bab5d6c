//! The RhizOS testbed: builds the guest programs, launches whole networks in-process against a
//! real `nats-server` (one namespace and temp dirs each, so tests share nothing), and hosts the
//! end-to-end tests (`tests/it`) and benchmarks (`src/bin`).

pub mod ai;
pub mod cluster;
pub mod doubles;
pub mod guests;
pub mod images;
pub mod mock_openai;
pub mod registry_server;
pub mod sim;

pub use cluster::{Cluster, ClusterOptions};

/// `target/<profile>`: where cargo put the binaries and plugins of this build.
pub fn build_dir() -> std::path::PathBuf {
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace cdylib, e.g. `plugin_file("rhizos_plugin_wasm")`.
pub fn plugin_file(crate_name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = build_dir().join(format!("lib{crate_name}.so"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the plugins first with `cargo build --workspace`",
        path.display()
    );
    Ok(path)
}
