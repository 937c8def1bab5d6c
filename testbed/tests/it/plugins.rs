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
            rhizos_testbed::plugin_file("rhizos_fixture_plugin_wrong_kind").unwrap(),
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
    let wrong_kind = find("librhizos_fixture_plugin_wrong_kind.so")
        .refused
        .clone()
        .expect("refused");
    assert_eq!(
        wrong_kind,
        "plugin confused is a Resolver plugin, not an execution backend"
    );
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

/// A copy of the wasm plugin named `name` in `dir`.
fn wasm_plugin_copy(dir: &std::path::Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
        &copy,
    )
    .unwrap();
    copy
}

/// The testkit double (a plugin built with the SDK that reads workloads as commands).
fn testkit() -> PathBuf {
    rhizos_testbed::plugin_file("rhizos_fixture_plugin_testkit").unwrap()
}

/// A job for the testkit backend: the "module" is the command text.
fn command_spec(command: &str) -> rhizos_broker::wire::JobSpec {
    rhizos_broker::wire::JobSpec::new(
        rhizos_broker::wire::Workload::Wasm {
            module_b64: rhizos_broker::wire::b64_encode(format!("(testkit {command})").as_bytes()),
        },
        20_000,
        64,
    )
}

/// Polls `check` every 50 ms for up to 10 s.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn registered_plugins(cluster: &Cluster) -> Vec<rhizos_broker::wire::PluginView> {
    let view: rhizos_broker::wire::NodeView = cluster.client().node_info("node-0").await.unwrap();
    view.plugins
}

#[tokio::test]
async fn plugins_added_replaced_and_removed_while_the_agent_runs() {
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![testkit()],
        plugin_scan_ms: 100,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let dir = cluster.plugin_dir(0);
    let slot = dir.join("librhizos_fixture_plugin_testkit.so");
    let agent = &cluster.agents[0];
    cluster.funded_account("hal", 5_000_000).await.unwrap();

    // A job running on the testkit plugin while its file is replaced.
    cluster
        .submit(&submit_request(
            "hal",
            "long",
            command_spec("sleep 1500"),
            1_000_000,
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cluster.job("long").await.unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "long job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Overwritten in place (same inode): the agent runs from its own copy, so this is safe.
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
        &slot,
    )
    .unwrap();
    eventually("the replacement to load", || {
        let views = agent.plugin_views();
        (views.len() == 1 && views[0].name.as_deref() == Some("wasm")).then_some(())
    })
    .await;
    let long = cluster
        .wait_for_end("long", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(long.state, JobState::Succeeded, "{long:?}");
    assert_eq!(
        long.stdout.as_deref(),
        Some("testkit sleep 1500\n"),
        "finished on the plugin it started on"
    );
    // The orchestrator heard of the change, and new jobs run on the new plugin.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let plugins = registered_plugins(&cluster).await;
        if plugins.len() == 1 && plugins[0].name.as_deref() == Some("wasm") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{plugins:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .submit(&submit_request(
            "hal",
            "on-wasm",
            wasm_spec(&demo(), &["count", "2"], 30_000),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("on-wasm", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");

    // Removed: the node offers nothing, so a job is refused at submit.
    std::fs::remove_file(&slot).unwrap();
    eventually("the removal", || {
        agent.plugin_views().is_empty().then_some(())
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match cluster
            .submit(&submit_request(
                "hal",
                "nowhere",
                command_spec("exit 0"),
                500_000,
            ))
            .await
        {
            Err(e) => break e.to_string(),
            Ok(_) => {
                // Registered before the removal reached the orchestrator; try again.
                let _ = cluster
                    .wait_for_end("nowhere", Duration::from_secs(1))
                    .await;
                assert!(std::time::Instant::now() < deadline, "never refused");
            }
        }
    };
    assert!(refusal.contains("wasm"), "{refusal}");

    // Added under a new name, while running: picked up and used.
    std::fs::copy(testkit(), dir.join("libtestkit-again.so")).unwrap();
    eventually("the addition", || {
        let views = agent.plugin_views();
        (views.len() == 1 && views[0].name.as_deref() == Some("testkit")).then_some(())
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while registered_plugins(&cluster).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "re-registration missing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster
        .submit(&submit_request(
            "hal",
            "again",
            command_spec("exit 3"),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("again", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        (job.state, job.exit_code),
        (JobState::Failed, Some(3)),
        "{job:?}"
    );
    assert_ledger_consistent(&cluster).await;
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_plugin_fails_only_that_execution_and_the_agent_keeps_serving() {
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![testkit()],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("ian", 5_000_000).await.unwrap();
    for (job_id, command, expected) in [
        (
            "p-start",
            "panic-start",
            "plugin panicked in start: testkit was asked to panic in start",
        ),
        (
            "p-wait",
            "panic-wait",
            "plugin panicked in wait: testkit was asked to panic in wait",
        ),
    ] {
        cluster
            .submit(&submit_request(
                "ian",
                job_id,
                command_spec(command),
                500_000,
            ))
            .await
            .unwrap();
        let job = cluster
            .wait_for_end(job_id, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Failed, "{job:?}");
        let reason = job.reason.clone().unwrap_or_default();
        assert!(reason.contains(expected), "{reason}");
        assert_eq!(job.refund_micros, Some(500_000), "nothing ran: full refund");
    }
    cluster
        .submit(&submit_request(
            "ian",
            "fine",
            command_spec("exit 0"),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("fine", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.stdout.as_deref(), Some("testkit exit 0\n"));
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn duplicate_plugin_names_are_refused_and_plugins_list_answers_over_nats() {
    let scratch = tempfile::tempdir().unwrap();
    let twin = wasm_plugin_copy(scratch.path(), "libzz-wasm-twin.so");
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![
            rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap(),
            twin,
        ],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let list: rhizos_broker::wire::PluginList = cluster
        .bus
        .request(
            cluster.bus.subjects.node_plugins("node-0").unwrap(),
            &rhizos_broker::wire::ListPlugins {
                v: rhizos_broker::wire::WIRE_VERSION,
            },
        )
        .await
        .unwrap();
    assert_eq!(list.node_id, "node-0");
    assert_eq!(list.plugins, cluster.agents[0].plugin_views());
    assert_eq!(list.plugins.len(), 2, "{list:?}");
    let loaded = &list.plugins[0];
    assert!(loaded.file.ends_with("librhizos_plugin_wasm.so"));
    assert_eq!(
        (
            loaded.name.as_deref(),
            loaded.kind.as_deref(),
            loaded.refused.as_deref()
        ),
        (Some("wasm"), Some("backend"), None)
    );
    let twin = &list.plugins[1];
    let reason = twin.refused.clone().expect("the twin is refused");
    assert!(twin.file.ends_with("libzz-wasm-twin.so"));
    assert!(
        reason.contains("duplicate plugin name \"wasm\": already loaded from")
            && reason.contains("librhizos_plugin_wasm.so"),
        "{reason}"
    );
    // A malformed request gets an error reply; the agent keeps answering.
    let bad = cluster
        .bus
        .request_raw::<rhizos_broker::wire::PluginList>(
            cluster.bus.subjects.node_plugins("node-0").unwrap(),
            bytes::Bytes::from_static(b"{\"v\":1,\"extra\":true}"),
        )
        .await;
    assert!(bad.is_err(), "{bad:?}");
    let again: rhizos_broker::wire::PluginList = cluster
        .bus
        .request(
            cluster.bus.subjects.node_plugins("node-0").unwrap(),
            &rhizos_broker::wire::ListPlugins {
                v: rhizos_broker::wire::WIRE_VERSION,
            },
        )
        .await
        .unwrap();
    assert_eq!(again, list);
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn node_info_describes_the_machine_and_why_it_offers_no_gpu() {
    let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
    let view: rhizos_broker::wire::NodeView = cluster.client().node_info("node-0").await.unwrap();
    let hardware = view.hardware.expect("the agent registers its hardware");
    assert!(hardware.cpu_threads >= hardware.cpu_cores && hardware.cpu_cores >= 1);
    assert!(!hardware.os.is_empty() && !hardware.kernel.is_empty());
    if view.gpus.is_empty() {
        let note = hardware.gpu_note.expect("why no GPU");
        assert!(note.contains("NVML") || note.contains("no GPU"), "{note}");
        assert_eq!(view.tier, 0);
    }
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn plugins_start_with_their_config_and_a_bad_one_refuses_the_plugin() {
    let scratch = tempfile::tempdir().unwrap();
    let wasm_twin = wasm_plugin_copy(scratch.path(), "librhizos_plugin_wasm.so");
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![testkit(), wasm_twin],
        plugin_config: [
            (
                "testkit".to_owned(),
                serde_json::json!({"prefix": "configured"}),
            ),
            ("wasm".to_owned(), serde_json::json!({"threads": 4})),
        ]
        .into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let views = cluster.agents[0].plugin_views();
    let wasm = views
        .iter()
        .find(|v| v.file.ends_with("librhizos_plugin_wasm.so"))
        .unwrap();
    let reason = wasm
        .refused
        .clone()
        .expect("the wasm plugin takes no options");
    assert!(
        reason.starts_with("plugin wasm failed to start: the wasm backend takes no options"),
        "{reason}"
    );
    cluster.funded_account("kai", 1_000_000).await.unwrap();
    cluster
        .submit(&submit_request(
            "kai",
            "cfg",
            command_spec("exit 0"),
            500_000,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("cfg", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.stdout.as_deref(), Some("configured exit 0\n"));
    cluster.shutdown().await.unwrap();
}
