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
        writeln!(f, "  {:<22} {}", "deposit (commit)", Maybe(&self.write_ms))
    }
}

pub async fn run(requests: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(requests > 0, "--requests must be at least 1");
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await?;
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
    Ok(Report {
        bench: "round-trip",
        requests,
        build: report::build(),
        read_ms: Summary::of(&mut reads),
        write_ms: Summary::of(&mut writes),
    })
}
