//! Component plugins: the `index` resolver (a WebAssembly component built from source with
//! wit-bindgen) loaded from a plugin directory with its manifest, called within its grants and
//! limits, and refused with reasons when it cannot be trusted to run.

use rhizos_core::component::{ComponentHost, DirGrant, Manifest, read_manifest};
use rhizos_testbed::{Cluster, ClusterOptions};
use std::path::Path;
use std::time::Duration;

fn component() -> std::path::PathBuf {
    rhizos_testbed::guests::resolver_index_wasm().expect("the resolver component builds")
}

const INDEX: &str = r#"{"modules": [
    {"id": "mod-hello", "version": "1.0.0", "backend": "wasm", "description": "first"},
    {"id": "mod-hello", "version": "1.10.0", "backend": "wasm", "description": "newest"},
    {"id": "mod-hello", "version": "1.9.2", "backend": "wasm"},
    {"id": "mod-broken", "backend": "wasm"}
]}"#;

/// A registry dir with `index.json`, and a manifest granting it at /registry.
fn registry(dir: &Path, index: &str) -> Manifest {
    let registry = dir.join("registry");
    std::fs::create_dir_all(&registry).unwrap();
    std::fs::write(registry.join("index.json"), index).unwrap();
    Manifest {
        read_dirs: vec![DirGrant {
            host: registry,
            guest: "/registry".into(),
        }],
        fuel_per_call: 500_000_000,
        memory_mib: 64,
        timeout_ms: 5_000,
        config: serde_json::json!({"index": "/registry/index.json"}),
    }
}

fn field(manifest: &str, name: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(manifest).unwrap();
    value[name].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_resolver_component_in_the_plugin_dir_is_loaded_listed_and_answers() {
    let cluster = Cluster::start(ClusterOptions {
        plugin_scan_ms: 100,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let dir = cluster.plugin_dir(0);
    std::fs::create_dir_all(dir.join("registry")).unwrap();
    std::fs::write(dir.join("registry/index.json"), INDEX).unwrap();
    std::fs::write(
        dir.join("index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}],
            "config": {"index": "/registry/index.json"}}"#,
    )
    .unwrap();
    std::fs::copy(component(), dir.join("index.wasm")).unwrap();
    let agent = &cluster.agents[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let view = loop {
        if let Some(view) = agent
            .plugin_views()
            .into_iter()
            .find(|v| v.file.ends_with("index.wasm"))
        {
            break view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "component never loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view.refused, None, "{view:?}");
    assert_eq!(
        (
            view.name.as_deref(),
            view.kind.as_deref(),
            view.version.as_deref()
        ),
        (Some("index"), Some("resolver"), Some("0.1.0"))
    );

    // Highest version without one asked, the exact one when asked, none when unknown.
    let (resolver, newest) = agent
        .resolve_module("mod-hello", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resolver, "index");
    assert_eq!(
        field(&newest, "version"),
        "1.10.0",
        "versions compare as numbers"
    );
    assert_eq!(field(&newest, "description"), "newest");
    let (_, exact) = agent
        .resolve_module("mod-hello", Some("1.0.0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(field(&exact, "description"), "first");
    assert_eq!(
        agent.resolve_module("mod-nothing", None).await.unwrap(),
        None
    );
    assert_eq!(
        agent
            .resolve_module("mod-hello", Some("9.9.9"))
            .await
            .unwrap(),
        None
    );
    // A malformed entry: the error names the file, the entry and the field.
    let error = agent.resolve_module("mod-broken", None).await.unwrap_err();
    assert!(
        error.contains(
            "resolver index: index /registry/index.json: modules[3] (mod-broken): field \"version\""
        ),
        "{error}"
    );

    // A manifest change reloads the component: without the grant, the index is out of reach.
    std::fs::write(
        dir.join("index.json"),
        r#"{"config": {"index": "/registry/index.json"}}"#,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let denied = loop {
        match agent.resolve_module("mod-hello", None).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "grant never withdrawn"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        denied.contains("cannot read index /registry/index.json") && denied.contains("granted"),
        "{denied}"
    );
    cluster.shutdown().await.unwrap();
}

#[test]
fn every_call_is_bounded_by_the_manifest_fuel_memory_and_time() {
    let scratch = tempfile::tempdir().unwrap();
    let host = ComponentHost::new().unwrap();
    let wasm = component();
    // A 2 MB index: parsing it needs far more than a small allowance of fuel or memory.
    let mut big = String::from(r#"{"modules": ["#);
    for i in 0..20_000 {
        if i > 0 {
            big.push(',');
        }
        big.push_str(&format!(
            r#"{{"id": "mod-{i}", "version": "1.0.{i}", "backend": "wasm", "pad": "{}"}}"#,
            "x".repeat(40)
        ));
    }
    big.push_str("]}");
    let generous = Manifest {
        fuel_per_call: 20_000_000_000,
        ..registry(scratch.path(), &big)
    };
    let resolver = host.load_resolver(&wasm, generous.clone()).unwrap();
    let (_, found) = (
        (),
        resolver.resolve("mod-19999", None).unwrap().expect("found"),
    );
    assert_eq!(field(&found, "version"), "1.0.19999");

    let fuel = Manifest {
        fuel_per_call: 2_000_000,
        ..generous.clone()
    };
    let error = host
        .load_resolver(&wasm, fuel)
        .unwrap()
        .resolve("mod-1", None)
        .unwrap_err();
    assert_eq!(error, "fuel limit of 2000000 units per call exhausted");

    let memory = Manifest {
        memory_mib: 4,
        ..generous.clone()
    };
    let error = host
        .load_resolver(&wasm, memory)
        .unwrap()
        .resolve("mod-1", None)
        .unwrap_err();
    assert_eq!(error, "memory limit of 4 MiB per call exceeded");

    let time = Manifest {
        timeout_ms: 1,
        ..generous
    };
    // Describing itself may or may not fit in 1 ms; resolving 2 MB never does.
    let expected = "call exceeded its time limit of 1 ms";
    match host.load_resolver(&wasm, time) {
        Ok(resolver) => assert_eq!(resolver.resolve("mod-1", None).unwrap_err(), expected),
        Err(error) => assert_eq!(error, expected),
    }
}

#[test]
fn components_and_manifests_that_cannot_be_trusted_are_refused_with_reasons() {
    let scratch = tempfile::tempdir().unwrap();
    let host = ComponentHost::new().unwrap();
    // Not a component: a core module, and garbage.
    let core_module = scratch.path().join("core.wasm");
    std::fs::write(&core_module, b"\0asm\x01\0\0\0").unwrap();
    let manifest = registry(scratch.path(), INDEX);
    let error = host
        .load_resolver(&core_module, manifest.clone())
        .err()
        .unwrap();
    assert!(error.starts_with("not a WebAssembly component"), "{error}");
    // A manifest that is missing, malformed, or grants a directory that does not exist.
    let wasm = component();
    let missing = read_manifest(&scratch.path().join("nope.json"), scratch.path()).unwrap_err();
    assert!(missing.contains("no readable manifest"), "{missing}");
    let bad = scratch.path().join("bad.json");
    std::fs::write(&bad, r#"{"read_dirs": [], "network": true}"#).unwrap();
    let error = read_manifest(&bad, scratch.path()).unwrap_err();
    assert!(error.contains("unknown field `network`"), "{error}");
    std::fs::write(
        &bad,
        r#"{"read_dirs": [{"host": "absent", "guest": "/x"}]}"#,
    )
    .unwrap();
    let error = read_manifest(&bad, scratch.path()).unwrap_err();
    assert!(error.contains("absent is not a directory"), "{error}");
    std::fs::write(&bad, r#"{"memory_mib": 0}"#).unwrap();
    let error = read_manifest(&bad, scratch.path()).unwrap_err();
    assert!(error.contains("must be > 0"), "{error}");
    std::fs::write(&bad, r#"{"memory_mib": 4096}"#).unwrap();
    let error = read_manifest(&bad, scratch.path()).unwrap_err();
    assert!(
        error.contains("memory_mib is at most 1024, got 4096"),
        "{error}"
    );
    // Configured without the index setting: the component's own error comes back.
    let unconfigured = Manifest {
        config: serde_json::json!({}),
        ..manifest
    };
    let error = host
        .load_resolver(&wasm, unconfigured)
        .unwrap()
        .resolve("mod-hello", None)
        .unwrap_err();
    assert!(
        error.starts_with("configure: config needs \"index\""),
        "{error}"
    );
}

#[tokio::test]
async fn the_resolver_chain_spans_stable_abi_and_component_plugins_in_file_order() {
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_wasm").unwrap()],
        plugin_scan_ms: 100,
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let dir = cluster.plugin_dir(0);
    // Stable-ABI resolver first in file order ("aa-…"), the component after ("zz-…").
    std::fs::create_dir_all(dir.join("registry")).unwrap();
    std::fs::write(dir.join("registry/index.json"), INDEX).unwrap();
    std::fs::write(
        dir.join("zz-index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}],
            "config": {"index": "/registry/index.json"}}"#,
    )
    .unwrap();
    std::fs::copy(component(), dir.join("zz-index.wasm")).unwrap();
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_fixture_plugin_resolver_testkit").unwrap(),
        dir.join("libaa-resolver.so"),
    )
    .unwrap();
    let agent = &cluster.agents[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let resolvers: Vec<(String, Option<String>)> = agent
            .plugin_views()
            .into_iter()
            .filter(|v| v.kind.as_deref() == Some("resolver"))
            .map(|v| (v.file.rsplit('/').next().unwrap_or("").to_owned(), v.name))
            .collect();
        if resolvers.len() == 2 {
            assert_eq!(
                resolvers,
                [
                    (
                        "libaa-resolver.so".to_owned(),
                        Some("resolver-testkit".to_owned())
                    ),
                    ("zz-index.wasm".to_owned(), Some("index".to_owned())),
                ]
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{resolvers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Known to the first: answered there. Unknown to it: the component answers.
    let (by, native) = agent
        .resolve_module("mod-native", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (by.as_str(), field(&native, "version").as_str()),
        ("resolver-testkit", "2.0.0")
    );
    let (by, hello) = agent
        .resolve_module("mod-hello", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (by.as_str(), field(&hello, "version").as_str()),
        ("index", "1.10.0")
    );
    assert_eq!(agent.resolve_module("mod-none", None).await.unwrap(), None);
    // An error stops the chain with the resolver's reason; a panic is contained as one.
    let error = agent
        .resolve_module("mod-native", Some("3.0.0"))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        "resolver resolver-testkit: mod-native has no version 3.0.0"
    );
    let error = agent.resolve_module("mod-panic", None).await.unwrap_err();
    assert_eq!(
        error,
        "resolver resolver-testkit: plugin panicked in resolve: resolver-testkit was asked to panic"
    );
    let (_, again) = agent
        .resolve_module("mod-native", Some("1.0.0"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(field(&again, "version"), "1.0.0", "the agent keeps serving");
    // A resolver is not a backend: the node still offers only wasm.
    assert_eq!(agent.plugins().backends(), ["wasm"]);
    cluster.shutdown().await.unwrap();
}

/// A cluster whose agent has the `textproc` backend component (manifest: generous ceilings).
async fn text_backend_cluster() -> (Cluster, tempfile::TempDir) {
    let staging = tempfile::tempdir().unwrap();
    let wasm = staging.path().join("textproc.wasm");
    std::fs::copy(
        rhizos_testbed::guests::backend_text_wasm().expect("the backend component builds"),
        &wasm,
    )
    .unwrap();
    let manifest = staging.path().join("textproc.json");
    std::fs::write(
        &manifest,
        r#"{"fuel_per_call": 50000000000, "memory_mib": 256, "timeout_ms": 60000}"#,
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![wasm, manifest],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    (cluster, staging)
}

fn text_job(script: &str, timeout_ms: u64) -> rhizos_broker::wire::JobSpec {
    rhizos_broker::wire::JobSpec::new(
        rhizos_broker::wire::Workload::Custom {
            name: "text".into(),
            payload_b64: rhizos_broker::wire::b64_encode(script.as_bytes()),
        },
        timeout_ms,
        64,
    )
}

#[tokio::test]
async fn a_backend_component_runs_jobs_end_to_end_within_their_limits() {
    use crate::common::{assert_ledger_consistent, submit_request};
    use rhizos_broker::wire::JobState;
    let (cluster, _staging) = text_backend_cluster().await;
    let view = cluster.agents[0]
        .plugin_views()
        .into_iter()
        .find(|v| v.file.ends_with("textproc.wasm"))
        .expect("listed");
    assert_eq!(view.refused, None, "{view:?}");
    assert_eq!(
        (
            view.name.as_deref(),
            view.kind.as_deref(),
            view.backends.clone()
        ),
        (Some("textproc"), Some("backend"), vec!["text".to_owned()])
    );
    cluster.funded_account("jo", 10_000_000).await.unwrap();

    let mut hello = text_job(
        "say hello\nargs\nenv GREETING\nupper\nwarn careful\ncount 3",
        30_000,
    );
    hello.args = vec!["first-arg".into()];
    hello.env.insert("GREETING".into(), "hi".into());
    hello.stdin_b64 = Some(rhizos_broker::wire::b64_encode(b"abc\ndef\n"));
    let mut small = text_job("alloc 64", 30_000);
    small.memory_mib = 16;
    let fueled = rhizos_broker::wire::JobSpec {
        fuel_limit: Some(1_000_000),
        ..text_job("spin", 30_000)
    };
    let cases = [
        ("hello", hello, JobState::Succeeded, ""),
        (
            "three",
            text_job("exit 3", 30_000),
            JobState::Failed,
            "exited with code 3",
        ),
        (
            "spin",
            text_job("spin", 500),
            JobState::Failed,
            "wall-clock deadline of 500 ms exceeded",
        ),
        (
            "big",
            small,
            JobState::Failed,
            "memory limit exceeded: the limit is 16 MiB",
        ),
        (
            "fuel",
            fueled,
            JobState::Failed,
            "fuel limit of 1000000 units exhausted",
        ),
        (
            "no",
            text_job("reject not today", 30_000),
            JobState::Failed,
            "not today",
        ),
    ];
    for (id, spec, _, _) in &cases {
        cluster
            .submit(&submit_request("jo", id, spec.clone(), 1_000_000))
            .await
            .unwrap();
    }
    for (id, _, state, reason) in &cases {
        let job = cluster
            .wait_for_end(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, *state, "{id}: {job:?}");
        let got = job.reason.clone().unwrap_or_default();
        assert!(got.contains(reason), "{id}: {got:?} lacks {reason:?}");
    }
    let hello = cluster.job("hello").await.unwrap();
    assert_eq!(
        hello.stdout.as_deref(),
        Some("hello\nfirst-arg\nGREETING=hi\nABC\nDEF\n1\n2\n3\n")
    );
    assert_eq!(hello.stderr.as_deref(), Some("careful\n"));
    assert!(hello.fuel_consumed.unwrap_or(0) > 0, "{hello:?}");

    // Cancel stops a spinning component at the next epoch tick.
    cluster
        .submit(&submit_request(
            "jo",
            "forever",
            text_job("spin", 60_000),
            1_000_000,
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.job("forever").await.unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.client().job_cancel("forever").await.unwrap();
    let forever = cluster
        .wait_for_end("forever", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(forever.state, JobState::Cancelled, "{forever:?}");
    assert!(forever.elapsed_ms.unwrap() < 20_000);
    assert_ledger_consistent(&cluster).await;
}
