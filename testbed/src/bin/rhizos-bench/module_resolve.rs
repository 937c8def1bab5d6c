//! `module-resolve`: `chain://` resolutions per second through the orchestrator's resolver chain,
//! per resolver (the index component, http against a local registry server, substrate against
//! the JSON-RPC double): cold (every call reaches the resolver) and warm (from the cache).

use crate::report;
use rhizos_core::orchestrator::modules::ModuleResolver;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    calls: usize,
    build: &'static str,
    resolvers: Vec<Row>,
}

#[derive(Serialize)]
struct Row {
    resolver: &'static str,
    cold_per_s: f64,
    warm_per_s: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chain:// resolutions per second, {} sequential per case ({} build; cold: no cache, every call reaches the resolver; warm: orchestrator cache):",
            self.calls, self.build
        )?;
        for row in &self.resolvers {
            writeln!(
                f,
                "  {:<24} cold {:>10.0}/s   warm {:>10.0}/s",
                row.resolver, row.cold_per_s, row.warm_per_s
            )?;
        }
        Ok(())
    }
}

pub async fn run(calls: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(calls > 0, "--calls must be at least 1");
    let manifest = serde_json::json!({
        "id": "mod-bench", "version": "1.0.0", "backend": "wasm",
        "artifact": {"data_b64": "AGFzbQEAAAA=", "sha256": "0".repeat(64)},
    })
    .to_string();
    // One directory per resolver, so each is measured alone.
    let index_dir = tempfile::tempdir()?;
    std::fs::create_dir_all(index_dir.path().join("registry"))?;
    std::fs::write(
        index_dir.path().join("registry/index.json"),
        format!(r#"{{"modules": [{manifest}]}}"#),
    )?;
    std::fs::copy(
        rhizos_testbed::guests::resolver_index_wasm()?,
        index_dir.path().join("index.wasm"),
    )?;
    std::fs::write(
        index_dir.path().join("index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}], "config": {"index": "/registry/index.json"}}"#,
    )?;
    let server = rhizos_testbed::registry_server::RegistryServer::start(
        [(
            "/modules/mod-bench".to_owned(),
            rhizos_testbed::registry_server::Route::Json {
                body: manifest.clone(),
                etag: "\"b\"".into(),
            },
        )]
        .into(),
    )?;
    let http_dir = tempfile::tempdir()?;
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_http")?,
        http_dir.path().join("http.so"),
    )?;
    let node = rhizos_testbed::doubles::SubstrateDouble::start()?;
    node.put_module(
        "ModuleRegistry",
        "Modules",
        "mod-bench",
        &[("1.0.0", &manifest)],
    );
    let substrate_dir = tempfile::tempdir()?;
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_substrate")?,
        substrate_dir.path().join("substrate.so"),
    )?;
    let cases = [
        ("index (component)", index_dir.path(), None),
        (
            "http (stable ABI)",
            http_dir.path(),
            Some(("http", serde_json::json!({"base_url": server.base_url}))),
        ),
        (
            "substrate (stable ABI)",
            substrate_dir.path(),
            Some(("substrate", serde_json::json!({"url": node.url}))),
        ),
    ];
    let mut resolvers = Vec::new();
    for (resolver, dir, config) in cases {
        let configs: BTreeMap<String, String> = config
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.to_string()))
            .collect();
        resolvers.push(Row {
            resolver,
            cold_per_s: rate(dir, &configs, Duration::ZERO, calls).await?,
            warm_per_s: rate(dir, &configs, Duration::from_secs(3600), calls).await?,
        });
    }
    Ok(Report {
        bench: "module-resolve",
        calls,
        build: report::build(),
        resolvers,
    })
}

/// Resolutions per second through a chain of the resolvers in `dir` with cache TTL `ttl`.
async fn rate(
    dir: &Path,
    configs: &BTreeMap<String, String>,
    ttl: Duration,
    calls: usize,
) -> anyhow::Result<f64> {
    let resolver = ModuleResolver::open(dir, configs.clone(), &[], Duration::from_secs(5), ttl)?;
    let resolve = || async {
        resolver
            .resolve("chain://mod-bench")
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))
    };
    resolve().await?;
    let started = Instant::now();
    for _ in 0..calls {
        std::hint::black_box(resolve().await?);
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}
