//! `gateway`: what the AI gateway adds to a streamed chat completion. The same requests go to a
//! fast local mock model server directly and through the whole network — gateway (key check,
//! hold), orchestrator (submit, match, assign, settle), agent and `openai` plugin, the response
//! relayed over NATS — at concurrency 1 and 64: time to the first content chunk and to the last,
//! p50 / p99, and requests per second.

use crate::report::{Tail, ms};
use rhizos_broker::wire::CreateKey;
use rhizos_testbed::mock_openai::MockOpenAi;
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    tokens: usize,
    runs: Vec<Run>,
}

#[derive(Serialize)]
struct Run {
    concurrency: usize,
    requests: usize,
    direct_first_ms: Tail,
    direct_last_ms: Tail,
    direct_rps: f64,
    gateway_first_ms: Tail,
    gateway_last_ms: Tail,
    gateway_rps: f64,
    /// Gateway − direct at p50 and p99, time to first chunk.
    added_first_p50_ms: f64,
    added_first_p99_ms: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "streamed chat completions of {} tokens from a local mock server ({} build): direct vs through the gateway",
            self.tokens, self.build
        )?;
        for run in &self.runs {
            writeln!(
                f,
                "  concurrency {} ({} requests each way):",
                run.concurrency, run.requests
            )?;
            writeln!(
                f,
                "    direct   first chunk {}; last {}; {:.0} req/s",
                run.direct_first_ms, run.direct_last_ms, run.direct_rps
            )?;
            writeln!(
                f,
                "    gateway  first chunk {}; last {}; {:.0} req/s",
                run.gateway_first_ms, run.gateway_last_ms, run.gateway_rps
            )?;
            writeln!(
                f,
                "    added to the first chunk: p50 {:.2} ms, p99 {:.2} ms",
                run.added_first_p50_ms, run.added_first_p99_ms
            )?;
        }
        Ok(())
    }
}

/// One streamed request; (time to the first content chunk, time to the end).
fn request(
    agent: &ureq::Agent,
    url: &str,
    key: Option<&str>,
) -> anyhow::Result<(Duration, Duration)> {
    let body = serde_json::json!({"model": "mock", "stream": true, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say something."}]});
    let started = Instant::now();
    let mut call = agent.post(url).header("Content-Type", "application/json");
    if let Some(key) = key {
        call = call.header("Authorization", format!("Bearer {key}"));
    }
    let response = call.send(body.to_string())?;
    anyhow::ensure!(response.status() == 200, "HTTP {}", response.status());
    let mut first = None;
    for line in BufReader::new(response.into_body().into_reader()).lines() {
        let line = line?;
        if first.is_none() && line.contains("\"content\":\"tok") {
            first = Some(started.elapsed());
        }
        if line == "data: [DONE]" {
            break;
        }
    }
    Ok((
        first.unwrap_or_else(|| started.elapsed()),
        started.elapsed(),
    ))
}

/// `requests` requests, `concurrency` at a time; the samples and requests per second.
fn load(
    url: &str,
    key: Option<&str>,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, f64)> {
    let started = Instant::now();
    let per_worker = requests.div_ceil(concurrency);
    let results: Vec<anyhow::Result<Vec<(Duration, Duration)>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    (0..per_worker).map(|_| request(&agent, url, key)).collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for worker in results {
        for (f, l) in worker? {
            first.push(f);
            last.push(l);
        }
    }
    let rps = first.len() as f64 / elapsed.as_secs_f64();
    Ok((first, last, rps))
}

pub async fn run(requests: usize, tokens: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(requests >= 64, "--requests must be at least 64");
    let mock = MockOpenAi::start(tokens)?;
    let mut plugin_config = std::collections::BTreeMap::new();
    plugin_config.insert(
        "openai".to_owned(),
        serde_json::json!({"base_url": mock.base_url(), "models": [{"name": "mock", "service": "chat"}]}),
    );
    let cluster = Cluster::start(ClusterOptions {
        agents: 1,
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_openai")?],
        plugin_config,
        max_concurrent: 128,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    let key = cluster
        .client()
        .key_create(CreateKey {
            account: "bench".into(),
            ..CreateKey::default()
        })
        .await?
        .key;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
    let gateway = rhizos_core::Gateway::new(
        cluster.bus.clone(),
        rhizos_broker::config::GatewaySettings {
            listen: listener.local_addr()?.to_string(),
            ..Default::default()
        },
    );
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    let until = Instant::now() + Duration::from_secs(20);
    while !cluster
        .client()
        .model_list()
        .await?
        .models
        .iter()
        .any(|m| m.name == "mock")
    {
        anyhow::ensure!(Instant::now() < until, "the mock model was never offered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct_url = format!("{}/v1/chat/completions", mock.base_url());
    let mut runs = Vec::new();
    for (concurrency, count) in [(1, requests / 4), (64, requests)] {
        let (d, g) = {
            let (direct_url, gateway_url, key) =
                (direct_url.clone(), gateway_url.clone(), key.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                // Warm-up: connections, caches, the plugin's first request.
                load(
                    &gateway_url,
                    Some(&key),
                    concurrency.min(8),
                    concurrency.min(8),
                )?;
                let d = load(&direct_url, None, count, concurrency)?;
                let g = load(&gateway_url, Some(&key), count, concurrency)?;
                Ok((d, g))
            })
            .await??
        };
        let (mut df, mut dl, drps) = d;
        let (mut gf, mut gl, grps) = g;
        let (dft, gft) = (Tail::of(&mut df), Tail::of(&mut gf));
        runs.push(Run {
            concurrency,
            requests: count,
            direct_first_ms: dft,
            direct_last_ms: Tail::of(&mut dl),
            direct_rps: drps,
            gateway_first_ms: gft,
            gateway_last_ms: Tail::of(&mut gl),
            gateway_rps: grps,
            added_first_p50_ms: gft.p50 - dft.p50,
            added_first_p99_ms: gft.p99 - dft.p99,
        });
    }
    let _ = ms;
    Ok(Report {
        bench: "gateway",
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        tokens,
        runs,
    })
}
