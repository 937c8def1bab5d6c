//! The agent refuses files that are not compatible plugins, says why, and runs with the rest.

use crate::common::*;
use rhizos_broker::wire::JobState;
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::path::PathBuf;
use std::time::Duration;

/// A shared library that is not a RhizOS plugin, compiled from C by the system compiler.
fn foreign_library(dir: &std::path::Path) -> PathBuf {
    let source = dir.join("foreign.c");
    std::fs::write(&source, "int answer(void) { return 42; }\n").unwrap();
    let library = dir.join("libforeign.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("a C compiler (cc) is installed");
    assert!(status.success());
    library
}

#[tokio::test]
async fn incompatible_and_foreign_libraries_are_refused_and_the_good_plugin_still_runs_jobs() {
    let scratch = tempfile::tempdir().unwrap();
    let garbage = scratch.path().join("libgarbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    let options = ClusterOptions {
        plugin_files: vec![
            rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
            rhizos_testbed::plugin_file("rhizos_fixture_plugin_abi_mismatch").unwrap(),
            foreign_library(scratch.path()),
            garbage,
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options).await.unwrap();
    let views = cluster.agents[0].plugin_views();
    let find = |file: &str| {
        views
            .iter()
            .find(|v| v.file.ends_with(file))
            .unwrap_or_else(|| panic!("{file} in {views:?}"))
    };

    let good = find("librhizos_plugin_wasm.so");
    assert_eq!(
        (good.name.as_deref(), good.refused.as_deref()),
        (Some("wasm"), None)
    );
    assert_eq!(good.backends, ["wasm"]);
    let mismatch = find("librhizos_fixture_plugin_abi_mismatch.so")
        .refused
        .clone()
        .expect("refused");
    assert!(
        mismatch.contains("built against rhizos-plugin-api 2.0.0"),
        "{mismatch}"
    );
    assert!(mismatch.contains("rebuild the plugin"), "{mismatch}");
    let foreign = find("libforeign.so").refused.clone().expect("refused");
    assert!(foreign.contains("not a RhizOS plugin"), "{foreign}");
    let garbage = find("libgarbage.so").refused.clone().expect("refused");
    assert!(
        garbage.contains("not a loadable shared library"),
        "{garbage}"
    );

    cluster.funded_account("gail", 1_000_000).await.unwrap();
    cluster
        .submit(&submit_request(
            "gail",
            "after-refusals",
            wasm_spec(&demo(), &["count", "3"], 30_000),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("after-refusals", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.stdout.as_deref(), Some("line 1\nline 2\nline 3\n"));
    cluster.shutdown().await.unwrap();
}
