//! `chain://` modules: resolved at submit through the orchestrator's resolver chain (here the
//! `index` resolver component reading a JSON registry), run end to end with their digest
//! checked, and refused with clear reasons when unknown, tampered with or malformed.

use crate::common::*;
use rhizos_broker::wire::{
    self, ErrorCode, JobSpec, JobState, ResolveModule, ResolvedModule, WIRE_VERSION, Workload,
};
use rhizos_testbed::{Cluster, ClusterOptions};
use sha2::Digest as _;
use std::time::Duration;

const USD: i64 = 1_000_000;

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A resolver dir: the index component, its manifest, and a registry with the demo module.
fn registry(dir: &std::path::Path) {
    let demo = demo();
    let entry = |id: &str, version: &str, digest: &str| {
        serde_json::json!({
            "id": id,
            "version": version,
            "description": "the RhizOS demo guest",
            "backend": "wasm",
            "artifact": {"data_b64": wire::b64_encode(&demo), "sha256": digest},
            "args": ["hello", format!("registry {version}")],
            "requirements": {"memory_mib": 64, "cpu_cores": 1},
            "price_hint_micros": 2000
        })
    };
    let good = sha256_hex(&demo);
    let mut typo = entry("mod-typo", "1.0.0", &good);
    typo["artefact"] = typo["artifact"].clone();
    let index = serde_json::json!({"modules": [
        entry("mod-demo", "0.9.0", &good),
        entry("mod-demo", "1.0.0", &good),
        entry("mod-tampered", "1.0.0", &sha256_hex(b"something else")),
        typo,
    ]});
    std::fs::create_dir_all(dir.join("registry")).unwrap();
    std::fs::write(dir.join("registry/index.json"), index.to_string()).unwrap();
    std::fs::copy(
        rhizos_testbed::guests::resolver_index_wasm().unwrap(),
        dir.join("index.wasm"),
    )
    .unwrap();
    std::fs::write(
        dir.join("index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}],
            "config": {"index": "/registry/index.json"}}"#,
    )
    .unwrap();
}

fn module_job(uri: &str) -> JobSpec {
    JobSpec::new(Workload::Module { uri: uri.into() }, 30_000, 32)
}

#[tokio::test]
async fn a_chain_module_is_resolved_at_submit_runs_and_settles() {
    let resolvers = tempfile::tempdir().unwrap();
    registry(resolvers.path());
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let resolve = |uri: &str| {
        let request = ResolveModule {
            v: WIRE_VERSION,
            uri: uri.into(),
        };
        let bus = cluster.bus.clone();
        async move {
            bus.request::<_, ResolvedModule>(bus.subjects.module_resolve(), &request)
                .await
        }
    };

    // Latest version, then from the cache; a pinned version.
    let latest = resolve("chain://mod-demo").await.unwrap();
    assert_eq!(
        (
            latest.resolver.as_str(),
            latest.manifest.version.as_str(),
            latest.cached
        ),
        ("index", "1.0.0", false)
    );
    assert!(resolve("chain://mod-demo").await.unwrap().cached);
    let pinned = resolve("chain://mod-demo@0.9.0").await.unwrap();
    assert_eq!(pinned.manifest.version, "0.9.0");

    // A job names the module; the module's args, memory and digest go with it.
    cluster.funded_account("kim", 2 * USD).await.unwrap();
    cluster
        .submit(&submit_request(
            "kim",
            "from-registry",
            module_job("chain://mod-demo"),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("from-registry", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.backend, "wasm");
    let stdout = job.stdout.clone().unwrap_or_default();
    assert!(
        stdout.starts_with("Hello from RhizOS, registry 1.0.0!\n"),
        "{stdout}"
    );
    assert!(job.cost_micros.unwrap() > 0);
    assert_ledger_consistent(&cluster).await;

    // Unknown, tampered with, malformed: refused at submit, nothing held.
    let cases = [
        (
            "chain://mod-unknown",
            ErrorCode::NotFound,
            "no resolver knows chain://mod-unknown (asked: index)",
        ),
        (
            "chain://mod-tampered",
            ErrorCode::BadRequest,
            "chain://mod-tampered@1.0.0: the artifact does not match its digest",
        ),
        (
            "chain://mod-typo",
            ErrorCode::NotFound,
            "index: malformed manifest for chain://mod-typo: unknown field `artefact`",
        ),
        (
            "mod-demo",
            ErrorCode::BadRequest,
            "it must start with chain://",
        ),
    ];
    let before = cluster.balance("kim").await.unwrap().balance_micros;
    for (uri, code, reason) in cases {
        let err = cluster
            .submit(&submit_request("kim", "refused", module_job(uri), USD))
            .await
            .unwrap_err();
        let remote = err.remote().unwrap_or_else(|| panic!("{uri}: {err}"));
        assert_eq!(remote.code, code, "{uri}: {remote:?}");
        assert!(remote.message.contains(reason), "{uri}: {}", remote.message);
    }
    assert_eq!(cluster.balance("kim").await.unwrap().balance_micros, before);
}

#[tokio::test]
async fn the_agent_refuses_an_artifact_that_is_not_the_one_the_job_names() {
    let cluster = cluster().await;
    cluster.funded_account("lee", USD).await.unwrap();
    let mut spec = rhizos_testbed::cluster::wasm_spec(&demo(), &["hello", "x"], 30_000);
    spec.artifact_sha256 = Some("0".repeat(64));
    cluster
        .submit(&submit_request("lee", "swapped", spec, USD))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("swapped", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let reason = job.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "artifact digest mismatch: the workload's sha256 is {}",
            sha256_hex(&demo())
        )),
        "{reason}"
    );
    assert_eq!(job.stdout.as_deref().unwrap_or(""), "", "nothing ran");
    assert_eq!(cluster.balance("lee").await.unwrap().balance_micros, USD);
}
