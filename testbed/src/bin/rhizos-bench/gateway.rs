//! `gateway`: what the AI gateway adds to a streamed chat completion. The same requests go to a
//! fast local mock model server directly and through the whole network — gateway (key check,
//! hold), orchestrator (submit, match, assign, settle), agent and `openai` plugin, the response
//! relayed over NATS — at concurrency 1 and 64: time to the first content chunk and to the last,
//! p50 / p99, and requests per second. Where LiteLLM's proxy is installed
//! (`testbed/ai/litellm-setup.sh`: a pinned version in its own venv), the same load goes through
//! it to the same mock in the same run, as the field's common anchor.

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
    /// Why LiteLLM is not in the runs, when it is not.
    litellm_missing: Option<String>,
    runs: Vec<Run>,
    limits: crate::limits::Limits,
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
    litellm: Option<Anchor>,
    /// Where a request's time goes, from the daemons' own metrics over this run's requests:
    /// mean ms of each stage (they overlap: the submit's commit is inside the submit).
    breakdown: Vec<(String, f64)>,
}

/// The same load through LiteLLM's proxy.
#[derive(Serialize)]
struct Anchor {
    first_ms: Tail,
    last_ms: Tail,
    rps: f64,
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
            if !run.breakdown.is_empty() {
                let stages: Vec<String> = run
                    .breakdown
                    .iter()
                    .map(|(stage, ms)| format!("{stage} {ms:.2}"))
                    .collect();
                writeln!(f, "    where it goes (mean ms): {}", stages.join("; "))?;
            }
            if let Some(litellm) = &run.litellm {
                writeln!(
                    f,
                    "    litellm  first chunk {}; last {}; {:.0} req/s",
                    litellm.first_ms, litellm.last_ms, litellm.rps
                )?;
                writeln!(
                    f,
                    "    LiteLLM adds: p50 {:.2} ms, p99 {:.2} ms (RhizOS's addition is {:.1}× less at p50)",
                    litellm.added_first_p50_ms,
                    litellm.added_first_p99_ms,
                    litellm.added_first_p50_ms / run.added_first_p50_ms.max(0.001)
                )?;
            }
        }
        if let Some(why) = &self.litellm_missing {
            writeln!(f, "  LiteLLM not compared: {why}")?;
        }
        write!(f, "{}", self.limits)?;
        for run in &self.runs {
            writeln!(
                f,
                "  ratio at concurrency {}: added to the first chunk p50 ÷ NATS round trip {:.1}×",
                run.concurrency,
                run.added_first_p50_ms / self.limits.nats_round_trip_ms
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

/// LiteLLM's proxy in front of `mock`, killed on drop.
struct LiteLlm {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

/// The key LiteLLM's proxy is started with (it refuses to start without a master key).
const LITELLM_KEY: &str = "sk-rhizos-bench";

impl LiteLlm {
    fn start(command: &std::path::Path, mock: &MockOpenAi) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("litellm.yaml");
        std::fs::write(
            &config,
            format!(
                "model_list:\n  - model_name: mock\n    litellm_params:\n      model: openai/mock\n      api_base: {}/v1\n      api_key: none\ngeneral_settings:\n  master_key: {LITELLM_KEY}\nlitellm_settings:\n  drop_params: true\n",
                mock.base_url()
            ),
        )?;
        let port = rhizos_testbed::ai::free_port()?;
        let child = std::process::Command::new(command)
            .args(["--config"])
            .arg(&config)
            .args([
                "--port",
                &port.to_string(),
                "--host",
                "127.0.0.1",
                "--num_workers",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("litellm.log"))?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", command.display()))?;
        let litellm = Self {
            child,
            url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
            _dir: dir,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(response) = agent
                .get(format!("http://127.0.0.1:{port}/health/liveliness"))
                .call()
                && response.status() == 200
            {
                return Ok(litellm);
            }
            anyhow::ensure!(
                Instant::now() < until,
                "LiteLLM's proxy did not answer within 120 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `litellm` command to compare with: the one named, or the one the setup script installs.
fn litellm_command(named: Option<std::path::PathBuf>) -> Result<std::path::PathBuf, String> {
    let path = named.unwrap_or_else(|| {
        rhizos_testbed::ai::repo_root().join(".rhizos/tools/litellm/venv/bin/litellm")
    });
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is not there (bash testbed/ai/litellm-setup.sh installs it)",
            path.display()
        ))
    }
}

pub async fn run(
    requests: usize,
    tokens: usize,
    litellm: Option<std::path::PathBuf>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(requests >= 64, "--requests must be at least 64");
    let mock = MockOpenAi::start(tokens)?;
    let (litellm, litellm_missing) = match litellm_command(litellm) {
        Ok(command) => {
            eprintln!("starting LiteLLM's proxy ({})", command.display());
            (Some(LiteLlm::start(&command, &mock)?), None)
        }
        Err(why) => (None, Some(why)),
    };
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
    let limits = crate::limits::measure(&cluster.settings.nats).await?;
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
    tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
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
    let litellm_url = litellm.as_ref().map(|l| l.url.clone());
    let sources = vec![
        gateway.metrics_source(),
        cluster.orchestrator.metrics_source(),
        cluster.agents[0].metrics_source(),
    ];
    for (concurrency, count) in [(1, requests / 4), (64, requests)] {
        let metrics_before = rhizos_core::metrics::render(&sources).await;
        let (d, g, l) = {
            let (direct_url, gateway_url, key, litellm_url) = (
                direct_url.clone(),
                gateway_url.clone(),
                key.clone(),
                litellm_url.clone(),
            );
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                // Warm-up: connections, caches, the plugin's first request.
                let warm = concurrency.min(8);
                load(&gateway_url, Some(&key), warm, warm)?;
                let d = load(&direct_url, None, count, concurrency)?;
                let g = load(&gateway_url, Some(&key), count, concurrency)?;
                let l = match &litellm_url {
                    Some(url) => {
                        load(url, Some(LITELLM_KEY), warm, warm)?;
                        Some(load(url, Some(LITELLM_KEY), count, concurrency)?)
                    }
                    None => None,
                };
                Ok((d, g, l))
            })
            .await??
        };
        let metrics_after = rhizos_core::metrics::render(&sources).await;
        let mean_ms = |series: &str| {
            // `name{labels}` → `name_sum{labels} value`.
            let (name, labels) = series.split_at(series.find('{').unwrap_or(series.len()));
            let value = |text: &str, suffix: &str| -> f64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}{suffix}{labels} ")))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0.0)
            };
            let sum = value(&metrics_after, "_sum") - value(&metrics_before, "_sum");
            let count = value(&metrics_after, "_count") - value(&metrics_before, "_count");
            if count > 0.0 {
                sum / count * 1000.0
            } else {
                0.0
            }
        };
        // The warm-up's and LiteLLM's requests are in the gateway's counts too: the gateway's
        // and orchestrator's stages are means over the requests that went through RhizOS.
        let breakdown = [
            ("gateway submit round trip", "rhizos_gateway_submit_seconds"),
            (
                "orchestrator job.submit",
                "rhizos_orchestrator_request_seconds{op=\"job.submit\"}",
            ),
            ("ledger group commit", "rhizos_ledger_commit_seconds"),
            ("submit→running", "rhizos_job_submit_to_running_seconds"),
            (
                "admission→first chunk",
                "rhizos_gateway_first_chunk_seconds{model=\"mock\"}",
            ),
            ("report→settled", "rhizos_job_settle_seconds"),
        ]
        .into_iter()
        .map(|(stage, series)| (stage.to_owned(), mean_ms(series)))
        .collect();
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
            breakdown,
            litellm: l.map(|(mut first, mut last, rps)| {
                let first_ms = Tail::of(&mut first);
                Anchor {
                    first_ms,
                    last_ms: Tail::of(&mut last),
                    rps,
                    added_first_p50_ms: first_ms.p50 - dft.p50,
                    added_first_p99_ms: first_ms.p99 - dft.p99,
                }
            }),
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
        litellm_missing,
        runs,
        limits,
    })
}
