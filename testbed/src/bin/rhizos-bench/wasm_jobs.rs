//! `wasm-jobs`: small WASM jobs (the demo's `count 1`) through the whole network — real
//! nats-server, the orchestrator with its ledger, real agents running the wasm plugin: jobs/s and
//! submit → settled latency.

use crate::report::{self, Maybe, Summary};
use futures::StreamExt as _;
use rhizos_broker::subjects::EscrowEventKind;
use rhizos_broker::wire::{SubmitJob, WIRE_VERSION};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    jobs: usize,
    agents: usize,
    concurrency: usize,
    settled: usize,
    total_s: f64,
    jobs_per_s: f64,
    submit_to_settled_ms: Option<Summary>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} of {} WASM jobs (demo `count 1`) through the network in {:.2} s = {:.0} jobs/s ({} agents, {} build)",
            self.settled, self.jobs, self.total_s, self.jobs_per_s, self.agents, self.build
        )?;
        writeln!(
            f,
            "  submit → settled: {}",
            Maybe(&self.submit_to_settled_ms)
        )
    }
}

type SubmittedAt = Arc<Mutex<HashMap<String, Instant>>>;

pub async fn run(jobs: usize, agents: usize, concurrency: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(
        jobs > 0 && agents > 0 && concurrency > 0,
        "--jobs, --agents and --concurrency must be > 0"
    );
    let cluster = Cluster::start(ClusterOptions {
        agents,
        max_concurrent: 16,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("wasm", 1_000_000_000_000).await?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let spec = wasm_spec(&module, &["count", "1"], 30_000);
    let settled_wildcard = cluster
        .bus
        .subjects
        .escrow_event("wasm", EscrowEventKind::Settled, "x")?
        .trim_end_matches('x')
        .to_owned()
        + "*";
    let settled = cluster.bus.client.subscribe(settled_wildcard).await?;
    cluster.bus.client.flush().await?;
    let started = Instant::now();
    let submitted_at: SubmittedAt = Arc::default();
    let collector = tokio::spawn(collect(settled, submitted_at.clone(), jobs));
    let client = cluster.client();
    let mut submits = futures::stream::iter((0..jobs).map(|index| {
        let (client, spec, submitted_at) = (client.clone(), spec.clone(), submitted_at.clone());
        async move {
            let job_id = format!("wasm-{index}");
            if let Ok(mut map) = submitted_at.lock() {
                map.insert(job_id.clone(), Instant::now());
            }
            client
                .submit(&SubmitJob {
                    v: WIRE_VERSION,
                    job_id: Some(job_id),
                    account: "wasm".into(),
                    spec,
                    max_cost_micros: 10_000_000,
                    api_key_sha256: None,
                })
                .await
        }
    }))
    .buffer_unordered(concurrency);
    let mut rejected = 0usize;
    while let Some(result) = submits.next().await {
        rejected += usize::from(result.is_err());
    }
    anyhow::ensure!(rejected == 0, "{rejected} submits were refused");
    let mut latencies = collector.await?;
    let total_s = started.elapsed().as_secs_f64();
    cluster.shutdown().await?;
    Ok(Report {
        bench: "wasm-jobs",
        build: report::build(),
        jobs,
        agents,
        concurrency,
        settled: latencies.len(),
        total_s,
        jobs_per_s: latencies.len() as f64 / total_s,
        submit_to_settled_ms: Summary::of(&mut latencies),
    })
}

/// Submit → settled of each job, from the settled events (until `jobs` or 120 s of silence).
async fn collect(
    mut settled: async_nats::Subscriber,
    submitted_at: SubmittedAt,
    jobs: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while latencies.len() < jobs {
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(120), settled.next()).await
        else {
            break;
        };
        let job_id = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
        if let Some(at) = submitted_at
            .lock()
            .ok()
            .and_then(|m| m.get(&job_id).copied())
        {
            latencies.push(at.elapsed());
        }
    }
    latencies
}
