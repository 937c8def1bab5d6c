//! `round-trip`: a request through the orchestrator without a commit (`account.balance`: bus +
//! ledger thread) and with one (`account.deposit`: plus a durable commit), one at a time.

use crate::report::{self, Maybe, Summary};
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::fmt;
use std::time::Instant;

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    requests: usize,
    build: &'static str,
    read_ms: Option<Summary>,
    write_ms: Option<Summary>,
    limits: crate::limits::Limits,
    /// Median ÷ the bare NATS round trip (what the orchestrator adds), and the write's median
    /// ÷ (round trip + one durable commit).
    read_per_nats_round_trip: Option<f64>,
    write_per_round_trip_and_commit: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "request round trips through the orchestrator ({} each, sequential, {} build):",
            self.requests, self.build
        )?;
        writeln!(
            f,
            "  {:<22} {}",
            "balance (no commit)",
            Maybe(&self.read_ms)
        )?;
        writeln!(f, "  {:<22} {}", "deposit (commit)", Maybe(&self.write_ms))?;
        write!(f, "{}", self.limits)?;
        if let (Some(read), Some(write)) = (
            self.read_per_nats_round_trip,
            self.write_per_round_trip_and_commit,
        ) {
            writeln!(
                f,
                "  ratios: balance ÷ NATS round trip {read:.1}× · deposit ÷ (round trip + commit) {write:.1}×"
            )?;
        }
        Ok(())
    }
}

pub async fn run(requests: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(requests > 0, "--requests must be at least 1");
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await?;
    let limits = crate::limits::measure(&cluster.settings.nats).await?;
    cluster.funded_account("rt", 1).await?;
    let client = cluster.client();
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for index in 0..requests {
        let started = Instant::now();
        client.account_balance("rt").await?;
        reads.push(started.elapsed());
        let started = Instant::now();
        client
            .account_deposit("rt", 1, Some(&format!("rt-{index}")))
            .await?;
        writes.push(started.elapsed());
    }
    cluster.shutdown().await?;
    let (read_ms, write_ms) = (Summary::of(&mut reads), Summary::of(&mut writes));
    Ok(Report {
        bench: "round-trip",
        requests,
        build: report::build(),
        read_per_nats_round_trip: read_ms.map(|r| r.median / limits.nats_round_trip_ms),
        write_per_round_trip_and_commit: write_ms
            .map(|w| w.median / (limits.nats_round_trip_ms + limits.sqlite_commit_ms)),
        read_ms,
        write_ms,
        limits,
    })
}
