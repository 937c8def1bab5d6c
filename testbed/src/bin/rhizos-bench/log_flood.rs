//! `log-flood`: a guest printing empty lines as fast as it can (the demo's `blank N`) on a real
//! agent with the wasm plugin: lines per second the guest emits, how many of them are streamed
//! and in how many NATS messages, and this process's peak resident memory (agent, orchestrator
//! and the watcher share it) — a flood must cost bounded memory and few messages.

use crate::report;
use futures::StreamExt as _;
use rhizos_broker::wire::{JobState, LogBatch, SubmitJob, WIRE_VERSION};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    lines: u64,
    /// The agent's `max_log_lines` for this run.
    budget_lines: u64,
    /// The agent's `max_stored_log_bytes` (the whole stdout kept out of band) for this run.
    stored_log_bytes: u64,
    /// Bytes of the whole stdout stored out of band.
    stored_stdout_bytes: u64,
    guest_ms: u64,
    lines_per_s: f64,
    streamed_lines: u64,
    messages: u64,
    messages_per_10k_lines: f64,
    /// VmHWM after the flood, with the peak reset just before it (Linux `clear_refs`), MiB.
    peak_rss_mib: Option<f64>,
    rss_before_mib: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} empty lines printed in {} ms = {:.0} lines/s ({} build)",
            self.lines, self.guest_ms, self.lines_per_s, self.build
        )?;
        writeln!(
            f,
            "  streamed: {} lines (budget {}) in {} messages = {:.1} messages per 10,000 lines",
            self.streamed_lines, self.budget_lines, self.messages, self.messages_per_10k_lines
        )?;
        writeln!(
            f,
            "  whole stdout stored out of band: {} bytes (max_stored_log_bytes {})",
            self.stored_stdout_bytes, self.stored_log_bytes
        )?;
        let mib = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} MiB"));
        writeln!(
            f,
            "  process memory: {} before, peak {} during the flood",
            mib(self.rss_before_mib),
            mib(self.peak_rss_mib)
        )
    }
}

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub async fn run(
    lines: u64,
    budget_lines: Option<u64>,
    stored_log_bytes: Option<u64>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(lines > 0, "--lines must be > 0");
    let cluster = Cluster::start(ClusterOptions {
        max_log_lines: budget_lines,
        max_stored_log_bytes: stored_log_bytes,
        ..ClusterOptions::default()
    })
    .await?;
    let stored_log_bytes = stored_log_bytes
        .unwrap_or_else(|| rhizos_broker::config::AgentSettings::default().max_stored_log_bytes);
    let budget_lines = budget_lines
        .unwrap_or_else(|| rhizos_broker::config::AgentSettings::default().max_log_lines);
    cluster.funded_account("flood", 1_000_000_000).await?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let mut logs = cluster
        .bus
        .client
        .subscribe(cluster.bus.subjects.job_logs_of(Some("flood"), "flood")?)
        .await?;
    cluster.bus.client.flush().await?;
    let rss_before_mib = status_mib("VmRSS:");
    // Reset the peak (VmHWM) to the current size, so the figure is the flood's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let count = lines.to_string();
    cluster
        .client()
        .submit(&SubmitJob {
            v: WIRE_VERSION,
            job_id: Some("flood".into()),
            account: "flood".into(),
            spec: wasm_spec(&module, &["blank", &count], 300_000),
            max_cost_micros: 100_000_000,
            api_key_sha256: None,
        })
        .await?;
    let watcher = tokio::spawn(async move {
        let (mut messages, mut streamed) = (0u64, 0u64);
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(5), logs.next()).await
        {
            messages += 1;
            if let Ok(batch) = serde_json::from_slice::<LogBatch>(&message.payload) {
                streamed += batch.lines.len() as u64;
            }
        }
        (messages, streamed)
    });
    let job = cluster
        .wait_for_end("flood", Duration::from_secs(600))
        .await?;
    anyhow::ensure!(
        job.state == JobState::Succeeded,
        "the flood job ended {job:?}"
    );
    let peak_rss_mib = status_mib("VmHWM:");
    let (messages, streamed_lines) = watcher.await?;
    cluster.shutdown().await?;
    let guest_ms = job.elapsed_ms.unwrap_or(0).max(1);
    Ok(Report {
        bench: "log-flood",
        build: report::build(),
        lines,
        budget_lines,
        stored_log_bytes,
        stored_stdout_bytes: job.blobs.stdout.as_ref().map_or(0, |b| b.size),
        guest_ms,
        lines_per_s: lines as f64 * 1000.0 / guest_ms as f64,
        streamed_lines,
        messages,
        messages_per_10k_lines: messages as f64 * 10_000.0 / streamed_lines.max(1) as f64,
        peak_rss_mib,
        rss_before_mib,
    })
}
