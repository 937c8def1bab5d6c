//! Benchmarks that print numbers (never asserted in tests).
//!
//! `rhizos-bench submit-latency [--jobs 20]`: starts a one-node network (real nats-server, SQLite
//! ledger, wasm plugin), submits small demo jobs one after another, and prints the time from
//! sending `job.submit` to seeing the job's `assigned` and `running` events, and to its end.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use rhizos_broker::wire::{Event, EventBody, JobState};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "rhizos-bench",
    about = "RhizOS benchmarks: each prints its measurements"
)]
struct Cli {
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Time from `rhizos job submit` to the job running (median of N sequential jobs).
    SubmitLatency {
        #[arg(long, default_value_t = 20)]
        jobs: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rhizos_core::telemetry::init("warn", false);
    let cli = Cli::parse();
    match cli.bench {
        Bench::SubmitLatency { jobs } => submit_latency(jobs, cli.json).await,
    }
}

async fn submit_latency(jobs: usize, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    // One warm-up job: the first execution compiles the module, later ones hit the cache.
    let mut assigned = Vec::new();
    let mut running = Vec::new();
    let mut finished = Vec::new();
    for index in 0..=jobs {
        let job_id = format!("bench-{index}");
        let mut events = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_events_of(&job_id)?[0].clone())
            .await?;
        cluster.bus.client.flush().await?;
        let request = rhizos_broker::wire::SubmitJob {
            v: rhizos_broker::wire::WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "bench".into(),
            spec: wasm_spec(&module, &["count", "1"], 10_000),
            max_cost_micros: 1_000_000,
        };
        let started = Instant::now();
        cluster.submit(&request).await?;
        let (mut to_assigned, mut to_running) = (None, None);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .with_context(|| format!("no event for {job_id} within 30 s"))?
                .context("event subscription closed")?;
            let Ok(Event {
                body: EventBody::Job { state, .. },
                ..
            }) = serde_json::from_slice(&message.payload)
            else {
                continue;
            };
            match state {
                JobState::Assigned => to_assigned = Some(started.elapsed()),
                JobState::Running => to_running = Some(started.elapsed()),
                s if s.is_terminal() => break,
                _ => {}
            }
        }
        if index > 0 {
            assigned.push(to_assigned.context("no assigned event")?);
            running.push(to_running.context("no running event")?);
            finished.push(started.elapsed());
        }
    }
    let report = serde_json::json!({
        "bench": "submit-latency",
        "jobs": jobs,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "submit_to_assigned_ms": summary(&mut assigned),
        "submit_to_running_ms": summary(&mut running),
        "submit_to_finished_ms": summary(&mut finished),
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "submit → running over {jobs} sequential jobs ({} build, 1 node, real nats-server + SQLite):",
            report["build"].as_str().unwrap_or("?")
        );
        for key in [
            "submit_to_assigned_ms",
            "submit_to_running_ms",
            "submit_to_finished_ms",
        ] {
            let s = &report[key];
            let v = |name: &str| s[name].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {key:<24} median {:>8.3}  min {:>8.3}  p90 {:>8.3}  max {:>8.3}",
                v("median"),
                v("min"),
                v("p90"),
                v("max")
            );
        }
    }
    cluster.shutdown().await
}

fn summary(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    serde_json::json!({ "median": at(0.5), "min": at(0.0), "p90": at(0.9), "max": at(1.0) })
}
