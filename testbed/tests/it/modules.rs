//! `chain://` modules: resolved at submit through the orchestrator's resolver chain (here the
//! `index` resolver component reading a JSON registry), run end to end with their digest
//! checked, and refused with clear reasons when unknown, tampered with or malformed.

use crate::common::*;
use rhizos_broker::wire::{self, ErrorCode, JobSpec, JobState, ResolvedModule, Workload};
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

/// `module.resolve` through the cluster's orchestrator.
async fn resolve_on(
    cluster: &Cluster,
    uri: &str,
) -> Result<ResolvedModule, rhizos_broker::RequestError> {
    cluster.client().module_resolve(uri).await
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
    let resolve = |uri: &'static str| resolve_on(&cluster, uri);

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

/// The `http` resolver plugin, loaded the way the chain loads it, with `config`.
fn http_resolver(config: serde_json::Value) -> rhizos_core::agent::plugins::ChainResolver {
    resolver_plugin("rhizos_plugin_resolver_http", config)
}

/// A resolver plugin of the workspace, loaded the way the chain loads it, with `config`.
fn resolver_plugin(
    crate_name: &str,
    config: serde_json::Value,
) -> rhizos_core::agent::plugins::ChainResolver {
    use rhizos_core::agent::plugins::{ChainResolver, Native, load_library};
    let path = rhizos_testbed::plugin_file(crate_name).unwrap();
    let host = rhizos_plugin_api::HostContext {
        node_id: "test".into(),
    };
    let text = config.to_string();
    match load_library(&path, &|_| text.clone(), &host) {
        Ok(Native::Resolver(resolver)) => ChainResolver::Native(std::sync::Arc::new(resolver)),
        Ok(Native::Backend(_)) => panic!("the http plugin is a resolver"),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn the_http_resolver_caches_by_etag_retries_and_fails_with_clear_errors() {
    use rhizos_testbed::registry_server::{Hit, RegistryServer, Route};
    let manifest = r#"{"id": "mod-http", "version": "1.0.0"}"#.to_owned();
    let server = RegistryServer::start(
        [
            (
                "/modules/mod-http".to_owned(),
                Route::Json {
                    body: manifest.clone(),
                    etag: "\"v1\"".into(),
                },
            ),
            (
                "/modules/mod-http?version=0.1.0".to_owned(),
                Route::Json {
                    body: r#"{"id": "mod-http", "version": "0.1.0"}"#.into(),
                    etag: "\"v0\"".into(),
                },
            ),
            ("/modules/garbage".to_owned(), Route::Raw("<html>".into())),
            (
                "/modules/slow".to_owned(),
                Route::Slow(Duration::from_millis(1_500), manifest.clone()),
            ),
            (
                "/modules/flaky".to_owned(),
                Route::FailThen(2, manifest.clone()),
            ),
            ("/modules/broken".to_owned(), Route::Status(500)),
            ("/modules/forbidden".to_owned(), Route::Status(403)),
            (
                "/modules/moved".to_owned(),
                Route::Redirect("/modules/mod-http".into()),
            ),
            (
                "/modules/huge".to_owned(),
                Route::Raw(format!("\"{}\"", "x".repeat(4_000))),
            ),
            (
                "/modules".to_owned(),
                Route::Json {
                    body: format!(r#"{{"modules": [{manifest}]}}"#),
                    etag: "\"all\"".into(),
                },
            ),
        ]
        .into(),
    )
    .unwrap();
    let resolver = http_resolver(serde_json::json!({
        "base_url": server.base_url,
        "timeout_ms": 300,
        "retries": 2,
        "backoff_ms": 20,
        "max_bytes": 2048,
    }));
    let resolve = |id: &str, version: Option<&str>| {
        let (resolver, id, version) = (resolver.clone(), id.to_owned(), version.map(str::to_owned));
        async move {
            tokio::task::spawn_blocking(move || resolver.resolve(&id, version.as_deref()))
                .await
                .unwrap()
        }
    };

    // Found; then revalidated with its ETag (304) and served from the plugin's cache.
    assert_eq!(resolve("mod-http", None).await, Ok(Some(manifest.clone())));
    assert_eq!(resolve("mod-http", None).await, Ok(Some(manifest.clone())));
    assert_eq!(
        resolve("mod-http", Some("0.1.0")).await,
        Ok(Some(r#"{"id": "mod-http", "version": "0.1.0"}"#.to_owned()))
    );
    // Not found: the next resolver is asked.
    assert_eq!(resolve("nobody", None).await, Ok(None));
    // The registry can be enumerated.
    let listing = resolver.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || listing.list())
            .await
            .unwrap(),
        Ok(Some(vec![
            serde_json::from_str::<serde_json::Value>(&manifest)
                .unwrap()
                .to_string()
        ]))
    );
    // Retried through two 503s.
    assert_eq!(resolve("flaky", None).await, Ok(Some(manifest.clone())));

    let base = &server.base_url;
    let failures = [
        ("garbage", "malformed response (not JSON)".to_owned()),
        (
            "slow",
            format!("GET {base}/modules/slow: no answer within 300 ms (after 2 retries)"),
        ),
        (
            "broken",
            format!("GET {base}/modules/broken: HTTP 500 (after 2 retries)"),
        ),
        (
            "forbidden",
            format!("GET {base}/modules/forbidden: HTTP 403"),
        ),
        (
            "huge",
            "response larger than the 2048 bytes allowed".to_owned(),
        ),
        (
            "moved",
            format!(
                "GET {base}/modules/moved: HTTP 302 to /modules/mod-http: redirects are not followed"
            ),
        ),
    ];
    for (id, expected) in failures {
        let err = resolve(id, None).await.unwrap_err();
        assert!(err.contains(&expected), "{id}: {err}");
    }
    let hits = server.hits();
    let of = |target: &str| -> Vec<Hit> {
        hits.iter()
            .filter(|h| h.target == target)
            .cloned()
            .collect()
    };
    assert_eq!(
        of("/modules/mod-http")
            .iter()
            .map(|h| h.if_none_match.clone())
            .collect::<Vec<_>>(),
        [None, Some("\"v1\"".to_owned())]
    );
    assert_eq!(of("/modules/flaky").len(), 3, "two 503s, then the answer");
    assert_eq!(of("/modules/forbidden").len(), 1, "a 403 is not retried");
    assert_eq!(
        of("/modules/mod-http").len(),
        2,
        "the redirect was not followed"
    );

    // Nothing listens: unreachable, named.
    let nowhere = http_resolver(serde_json::json!({
        "base_url": "http://127.0.0.1:1",
        "retries": 0,
    }));
    let err = tokio::task::spawn_blocking(move || nowhere.resolve("x", None))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.starts_with("GET http://127.0.0.1:1/modules/x: "),
        "{err}"
    );
}

#[tokio::test]
async fn the_chain_falls_back_from_a_component_to_the_http_plugin_and_the_job_runs() {
    use rhizos_testbed::registry_server::{RegistryServer, Route};
    let demo = demo();
    let manifest = serde_json::json!({
        "id": "mod-remote",
        "version": "2.0.0",
        "backend": "wasm",
        "artifact": {"data_b64": wire::b64_encode(&demo), "sha256": sha256_hex(&demo)},
        "args": ["hello", "http"],
    });
    let route = Route::Json {
        body: manifest.to_string(),
        etag: "\"r2\"".into(),
    };
    let server = RegistryServer::start(
        [
            ("/modules/mod-remote".to_owned(), route.clone()),
            ("/modules/mod-remote?version=2.0.0".to_owned(), route),
        ]
        .into(),
    )
    .unwrap();
    let resolvers = tempfile::tempdir().unwrap();
    registry(resolvers.path());
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_http").unwrap(),
        resolvers.path().join("zz-http.so"),
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [(
            "http".to_owned(),
            serde_json::json!({"base_url": server.base_url}),
        )]
        .into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let resolved = resolve_on(&cluster, "chain://mod-remote").await.unwrap();
    assert_eq!(
        (
            resolved.resolver.as_str(),
            resolved.manifest.version.as_str()
        ),
        ("http", "2.0.0"),
        "the index component does not know it; the http plugin after it does"
    );
    cluster.funded_account("max", USD).await.unwrap();
    cluster
        .submit(&submit_request(
            "max",
            "remote",
            module_job("chain://mod-remote@2.0.0"),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("remote", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert!(
        job.stdout
            .unwrap_or_default()
            .starts_with("Hello from RhizOS, http!"),
    );
    assert_ledger_consistent(&cluster).await;
    drop(cluster);

    // With `resolver_order = ["http"]` the http plugin is asked first, also for a module the
    // index knows too.
    let both = serde_json::json!({
        "id": "mod-demo", "version": "1.0.0", "backend": "wasm",
        "artifact": {"data_b64": wire::b64_encode(&demo), "sha256": sha256_hex(&demo)},
        "description": "served over http",
    });
    let server = RegistryServer::start(
        [(
            "/modules/mod-demo".to_owned(),
            Route::Json {
                body: both.to_string(),
                etag: "\"d\"".into(),
            },
        )]
        .into(),
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [(
            "http".to_owned(),
            serde_json::json!({"base_url": server.base_url}),
        )]
        .into(),
        resolver_order: vec!["http".into()],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let resolved = resolve_on(&cluster, "chain://mod-demo").await.unwrap();
    assert_eq!(
        (
            resolved.resolver.as_str(),
            resolved.manifest.description.as_deref()
        ),
        ("http", Some("served over http"))
    );
}

#[tokio::test]
async fn the_substrate_resolver_reads_finalized_storage_and_fails_with_clear_errors() {
    use rhizos_testbed::doubles::SubstrateDouble;
    let node = SubstrateDouble::start().unwrap();
    let demo = demo();
    let manifest = |version: &str| {
        serde_json::json!({
            "id": "mod-onchain",
            "version": version,
            "backend": "wasm",
            "artifact": {"data_b64": wire::b64_encode(&demo), "sha256": sha256_hex(&demo)},
            "args": ["hello", format!("chain {version}")],
        })
        .to_string()
    };
    let (old, new) = (manifest("1.0.0"), manifest("1.2.0"));
    node.put_module(
        "ModuleRegistry",
        "Modules",
        "mod-onchain",
        &[("1.2.0", new.as_str()), ("1.0.0", old.as_str())],
    );
    node.put_module("Registry", "Mods", "elsewhere", &[("3.0.0", "{}")]);
    node.put_raw("ModuleRegistry", "Modules", "mod-bad", vec![0xff, 0x01]);
    let resolver = resolver_plugin(
        "rhizos_plugin_resolver_substrate",
        serde_json::json!({"url": node.url, "timeout_ms": 300}),
    );
    let resolve =
        |r: &rhizos_core::agent::plugins::ChainResolver, id: &str, version: Option<&str>| {
            let (r, id, version) = (r.clone(), id.to_owned(), version.map(str::to_owned));
            async move {
                tokio::task::spawn_blocking(move || r.resolve(&id, version.as_deref()))
                    .await
                    .unwrap()
            }
        };
    assert_eq!(
        resolve(&resolver, "mod-onchain", None).await,
        Ok(Some(new.clone()))
    );
    assert_eq!(
        resolve(&resolver, "mod-onchain", Some("1.0.0")).await,
        Ok(Some(old.clone()))
    );
    assert_eq!(
        resolve(&resolver, "mod-onchain", Some("9.9.9")).await,
        Ok(None)
    );
    assert_eq!(resolve(&resolver, "nobody", None).await, Ok(None));
    assert_eq!(
        node.calls()[..2],
        ["chain_getFinalizedHead", "state_getStorage"],
        "storage is read at the finalized head"
    );
    let bad = resolve(&resolver, "mod-bad", None).await.unwrap_err();
    assert!(
        bad.contains("malformed storage value for mod-bad at ModuleRegistry::Modules"),
        "{bad}"
    );
    // Listing pages through the map: one malformed value fails it, naming the key.
    let listing = resolver.clone();
    let bad_list = tokio::task::spawn_blocking(move || listing.list())
        .await
        .unwrap()
        .unwrap_err();
    assert!(bad_list.contains("malformed storage value"), "{bad_list}");
    let clean = SubstrateDouble::start().unwrap();
    clean.put_module(
        "ModuleRegistry",
        "Modules",
        "mod-onchain",
        &[("1.2.0", new.as_str()), ("1.0.0", old.as_str())],
    );
    clean.put_module("ModuleRegistry", "Modules", "mod-other", &[("0.1.0", "{}")]);
    let clean_resolver = resolver_plugin(
        "rhizos_plugin_resolver_substrate",
        serde_json::json!({"url": clean.url}),
    );
    let mut all = tokio::task::spawn_blocking(move || clean_resolver.list())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    all.sort();
    let mut expected = vec![new.clone(), old.clone(), "{}".to_owned()];
    expected.sort();
    assert_eq!(all, expected);
    assert!(clean.calls().contains(&"state_getKeysPaged".to_owned()));

    // The pallet and item are configurable.
    let other = resolver_plugin(
        "rhizos_plugin_resolver_substrate",
        serde_json::json!({"url": node.url, "pallet": "Registry", "item": "Mods"}),
    );
    assert_eq!(
        resolve(&other, "elsewhere", None).await,
        Ok(Some("{}".to_owned()))
    );
    // Slow and unreachable nodes.
    node.set_delay(Some(Duration::from_millis(1_000)));
    let slow = resolve(&resolver, "mod-onchain", None).await.unwrap_err();
    assert!(
        slow.contains("chain_getFinalizedHead at http://127.0.0.1:")
            && slow.contains("no answer within 300 ms"),
        "{slow}"
    );
    node.set_delay(None);
    let nowhere = resolver_plugin(
        "rhizos_plugin_resolver_substrate",
        serde_json::json!({"url": "http://127.0.0.1:1"}),
    );
    let err = resolve(&nowhere, "x", None).await.unwrap_err();
    assert!(
        err.starts_with("chain_getFinalizedHead at http://127.0.0.1:1: unreachable"),
        "{err}"
    );

    // A chain:// job resolved from the chain runs end to end.
    let resolvers = tempfile::tempdir().unwrap();
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_substrate").unwrap(),
        resolvers.path().join("substrate.so"),
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [("substrate".to_owned(), serde_json::json!({"url": node.url}))].into(),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("ned", USD).await.unwrap();
    cluster
        .submit(&submit_request(
            "ned",
            "onchain",
            module_job("chain://mod-onchain"),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("onchain", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert!(
        job.stdout
            .unwrap_or_default()
            .starts_with("Hello from RhizOS, chain 1.2.0!")
    );
    assert_ledger_consistent(&cluster).await;
}

#[tokio::test]
async fn the_example_registry_packs_with_the_cli_and_its_modules_run() {
    // Its artifacts are the demo guest, built from source for both targets.
    rhizos_testbed::guests::demo_wasm().unwrap();
    rhizos_testbed::guests::demo_component().unwrap();
    let resolvers = tempfile::tempdir().unwrap();
    let rhizos = rhizos_testbed::build_dir().join("rhizos");
    let source = rhizos_testbed::guests::workspace_root().join("testbed/registry/modules.json");
    let packed = std::process::Command::new(&rhizos)
        .args(["module", "pack"])
        .arg(&source)
        .arg("--out")
        .arg(resolvers.path().join("registry/index.json"))
        .output()
        .expect("rhizos is built (cargo build --workspace)");
    let stdout = String::from_utf8_lossy(&packed.stdout);
    assert!(packed.status.success(), "{packed:?}");
    assert!(stdout.contains("3 module(s) →"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "packed chain://mod-hello@1.0.0 (wasm, sha256 {})",
            sha256_hex(&demo())
        )),
        "{stdout}"
    );
    std::fs::copy(
        rhizos_testbed::guests::resolver_index_wasm().unwrap(),
        resolvers.path().join("index.wasm"),
    )
    .unwrap();
    std::fs::write(
        resolvers.path().join("index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}],
            "config": {"index": "/registry/index.json"}}"#,
    )
    .unwrap();
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    // Listed through the chain (the index component enumerates its registry).
    let listed: wire::ModuleList = cluster.client().module_list().await.unwrap();
    assert_eq!(
        listed
            .modules
            .iter()
            .map(|m| (m.uri.as_str(), m.resolver.as_str(), m.backend.as_str()))
            .collect::<Vec<_>>(),
        [
            ("chain://mod-count@1.0.0", "index", "wasm"),
            ("chain://mod-hello@1.0.0", "index", "wasm"),
            ("chain://mod-hello@2.0.0", "index", "wasm"),
        ]
    );
    assert!(
        listed.unlisted.is_empty() && listed.problems.is_empty(),
        "{listed:?}"
    );
    cluster.funded_account("pat", 4 * USD).await.unwrap();
    let cases = [
        (
            "latest",
            "chain://mod-hello",
            "Hello from RhizOS, component!\n",
        ),
        (
            "pinned",
            "chain://mod-hello@1.0.0",
            "Hello from RhizOS, registry!\n",
        ),
        ("count", "chain://mod-count", "line 1\nline 2\nline 3\n"),
    ];
    for (id, uri, _) in cases {
        cluster
            .submit(&submit_request("pat", id, module_job(uri), USD))
            .await
            .unwrap();
    }
    for (id, uri, start) in cases {
        let job = cluster
            .wait_for_end(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{uri}: {job:?}");
        let out = job.stdout.unwrap_or_default();
        assert!(out.starts_with(start), "{uri}: {out}");
    }
    assert_ledger_consistent(&cluster).await;

    // A broken source is refused naming the entry and what is wrong, and writes nothing.
    let broken = resolvers.path().join("broken.json");
    std::fs::write(
        &broken,
        r#"{"modules": [{"id": "mod-x", "version": "1", "backend": "wasm",
            "artifact": {"file": "missing.wasm"}}]}"#,
    )
    .unwrap();
    let out = resolvers.path().join("never.json");
    let refused = std::process::Command::new(&rhizos)
        .args(["module", "pack"])
        .arg(&broken)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("modules[0] (mod-x@1): artifact.file") && stderr.contains("missing.wasm"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[tokio::test]
async fn the_http_resolver_speaks_tls_to_a_registry_whose_ca_it_is_given() {
    use rhizos_testbed::registry_server::{RegistryServer, Route};
    let manifest = r#"{"id": "mod-tls", "version": "1.0.0"}"#.to_owned();
    let server = RegistryServer::start_tls(
        [(
            "/modules/mod-tls".to_owned(),
            Route::Json {
                body: manifest.clone(),
                etag: "\"t\"".into(),
            },
        )]
        .into(),
    )
    .unwrap();
    assert!(server.base_url.starts_with("https://127.0.0.1:"));
    let trusting = resolver_plugin(
        "rhizos_plugin_resolver_http",
        serde_json::json!({
            "base_url": server.base_url,
            "ca_file": RegistryServer::test_ca_file(),
        }),
    );
    let found = tokio::task::spawn_blocking(move || trusting.resolve("mod-tls", None))
        .await
        .unwrap();
    assert_eq!(found, Ok(Some(manifest)));
    // Without the CA, the server's certificate is not trusted: an error, never a manifest.
    let default_roots = resolver_plugin(
        "rhizos_plugin_resolver_http",
        serde_json::json!({"base_url": server.base_url, "retries": 0}),
    );
    let err = tokio::task::spawn_blocking(move || default_roots.resolve("mod-tls", None))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.starts_with(&format!("GET {}/modules/mod-tls: ", server.base_url))
            && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(
        server.hits().len(),
        1,
        "the untrusted handshake never sent the request"
    );
}

#[tokio::test]
async fn an_artifact_by_reference_is_fetched_once_checked_and_run_only_where_allowed() {
    use rhizos_testbed::registry_server::{RegistryServer, Route};
    let demo = demo();
    let mut tampered = demo.clone();
    tampered.extend_from_slice(b"\0extra");
    let server = RegistryServer::start(
        [
            (
                "/artifacts/demo.wasm".to_owned(),
                Route::Bytes(demo.clone()),
            ),
            (
                "/artifacts/tampered.wasm".to_owned(),
                Route::Bytes(tampered),
            ),
            (
                "/elsewhere/demo.wasm".to_owned(),
                Route::Bytes(demo.clone()),
            ),
            ("/artifacts/private.wasm".to_owned(), Route::Status(403)),
            ("/artifacts/broken.wasm".to_owned(), Route::Status(500)),
        ]
        .into(),
    )
    .unwrap();
    let manifest = |id: &str, path: &str, sha256: &str| {
        let body = serde_json::json!({
            "id": id, "version": "1.0.0", "backend": "wasm",
            "artifact": {"url": format!("{}{path}", server.base_url), "sha256": sha256},
            "args": ["hello", "reference"],
        })
        .to_string();
        (
            format!("/modules/{id}"),
            Route::Json {
                body,
                etag: format!("\"{id}\""),
            },
        )
    };
    let registry = RegistryServer::start(
        [
            manifest("mod-ref", "/artifacts/demo.wasm", &sha256_hex(&demo)),
            // Names bytes the node has not cached (the cache is by digest: bytes with the
            // job's digest run wherever they came from); the server has others.
            manifest(
                "mod-tampered",
                "/artifacts/tampered.wasm",
                &sha256_hex(b"the module the registry meant"),
            ),
            manifest("mod-elsewhere", "/elsewhere/demo.wasm", &sha256_hex(&demo)),
            // Digests the node has not cached, so it goes to the source.
            manifest(
                "mod-private",
                "/artifacts/private.wasm",
                &sha256_hex(b"private"),
            ),
            manifest(
                "mod-broken",
                "/artifacts/broken.wasm",
                &sha256_hex(b"broken"),
            ),
            manifest(
                "mod-absent",
                "/artifacts/absent.wasm",
                &sha256_hex(b"absent"),
            ),
        ]
        .into(),
    )
    .unwrap();
    let resolvers = http_resolver_dir();
    let cluster = Cluster::start(ClusterOptions {
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [(
            "http".to_owned(),
            serde_json::json!({"base_url": registry.base_url}),
        )]
        .into(),
        artifact_sources: vec![format!("{}/artifacts/", server.base_url)],
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    cluster.funded_account("rita", 4 * USD).await.unwrap();

    // Twice the same module: fetched by the node the first time, from its cache the second.
    for job_id in ["ref-1", "ref-2"] {
        cluster
            .submit(&submit_request(
                "rita",
                job_id,
                module_job("chain://mod-ref"),
                USD,
            ))
            .await
            .unwrap();
        let job = cluster
            .wait_for_end(job_id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert!(
            job.stdout
                .unwrap_or_default()
                .starts_with("Hello from RhizOS, reference!"),
        );
    }
    let fetches = server
        .hits()
        .iter()
        .filter(|h| h.target == "/artifacts/demo.wasm")
        .count();
    assert_eq!(fetches, 1, "the second job ran from the node's cache");

    // Bytes that are not the ones the manifest names: refused by the node, refunded in full.
    cluster
        .submit(&submit_request(
            "rita",
            "tampered",
            module_job("chain://mod-tampered"),
            USD,
        ))
        .await
        .unwrap();
    let job = cluster
        .wait_for_end("tampered", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let reason = job.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("artifact digest mismatch") && reason.contains("/artifacts/tampered.wasm"),
        "{reason}"
    );
    // What the source served stays on the node: its digest is not an oracle for its content.
    let served = sha256_hex(&[demo.as_slice(), b"\0extra"].concat());
    assert!(!reason.contains(&served), "{reason}");
    assert_eq!(job.cost_micros, Some(0), "{job:?}");
    assert_eq!(job.refund_micros, Some(USD), "{job:?}");

    // Forbidden, failing or absent on the source: the submitter learns that the fetch failed,
    // the same words each time, never the status (no probing the operator's sources).
    let mut reasons = Vec::new();
    for id in ["mod-private", "mod-broken", "mod-absent"] {
        cluster
            .submit(&submit_request(
                "rita",
                id,
                module_job(&format!("chain://{id}")),
                USD,
            ))
            .await
            .unwrap();
        let job = cluster
            .wait_for_end(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            (job.state, job.cost_micros),
            (JobState::Failed, Some(0)),
            "{job:?}"
        );
        let reason = job.reason.unwrap_or_default();
        assert!(
            reason.contains("could not be fetched from its source"),
            "{reason}"
        );
        // The source's address is named (its random port may hold "403"); nothing else may
        // carry the status.
        let rest = reason.replace(&server.base_url, "");
        for leak in ["403", "500", "404", "HTTP", "Forbidden", "Not Found"] {
            assert!(!rest.contains(leak), "{id}: {reason}");
        }
        reasons.push(reason.replace(id.trim_start_matches("mod-"), "X"));
    }
    assert!(reasons.windows(2).all(|w| w[0] == w[1]), "{reasons:?}");

    // From a source no node fetches from: refused at submit, saying so; nothing fetched.
    let refused = cluster
        .submit(&submit_request(
            "rita",
            "elsewhere",
            module_job("chain://mod-elsewhere"),
            USD,
        ))
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("does not fetch artifacts from http://"),
        "{refused}"
    );
    assert!(
        server
            .hits()
            .iter()
            .all(|h| h.target != "/elsewhere/demo.wasm")
    );
    assert_ledger_consistent(&cluster).await;
}

/// A `module.resolve` flood against a hung registry and for modules nobody has: the hung
/// resolver runs at most its slots of calls (a call past its timeout keeps its slot until it
/// returns), every request is answered within the timeout, and an unknown module is asked of
/// the registry once, then answered from memory.
#[tokio::test]
async fn a_resolve_flood_cannot_exhaust_the_orchestrator_or_the_registry() {
    use rhizos_core::orchestrator::modules::MAX_CALLS_PER_RESOLVER;
    use rhizos_testbed::registry_server::{RegistryServer, Route};
    let manifest = r#"{"id": "hung", "version": "1.0.0"}"#.to_owned();
    let server = RegistryServer::start(
        [(
            "/modules/hung".to_owned(),
            Route::Slow(Duration::from_secs(3), manifest),
        )]
        .into(),
    )
    .unwrap();
    let resolvers = http_resolver_dir();
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        resolver_dir: Some(resolvers.path().to_path_buf()),
        resolver_config: [(
            "http".to_owned(),
            serde_json::json!({"base_url": server.base_url, "retries": 0, "timeout_ms": 10_000}),
        )]
        .into(),
        resolver_timeout_ms: Some(200),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    // Unknown: every resolver answered, so it is remembered; the registry is asked once.
    for _ in 0..20 {
        let unknown = resolve_on(&cluster, "chain://nobody-has-this")
            .await
            .unwrap_err();
        assert_eq!(
            unknown.remote().map(|e| e.code),
            Some(wire::ErrorCode::NotFound)
        );
    }
    let asked = server
        .hits()
        .iter()
        .filter(|h| h.target == "/modules/nobody-has-this")
        .count();
    assert_eq!(asked, 1);

    let started = std::time::Instant::now();
    let answers = futures::future::join_all(
        (0..3 * MAX_CALLS_PER_RESOLVER).map(|_| resolve_on(&cluster, "chain://hung")),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered within the resolver timeout, not the registry's 3 s: {:?}",
        started.elapsed()
    );
    let (mut timed_out, mut skipped) = (0, 0);
    for answer in answers {
        let message = answer.unwrap_err().to_string();
        if message.contains("no answer within 200 ms") {
            timed_out += 1;
        } else if message.contains("calls to it are still running") {
            skipped += 1;
        } else {
            panic!("unexpected: {message}");
        }
    }
    assert_eq!(timed_out, MAX_CALLS_PER_RESOLVER, "skipped {skipped}");
    let hung_hits = || {
        server
            .hits()
            .iter()
            .filter(|h| h.target == "/modules/hung")
            .count()
    };
    assert_eq!(
        hung_hits(),
        MAX_CALLS_PER_RESOLVER,
        "the registry saw only the slots' calls"
    );
}
