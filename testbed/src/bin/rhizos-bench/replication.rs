//! `replication`: what a replicated ledger commit would cost (ADR 0009). On a 3-server NATS
//! cluster on this machine, one writer appends `--bytes` records (a group commit's changeset)
//! one after the other to a JetStream stream with `Nats-Expected-Last-Sequence` — the append a
//! deposed writer cannot make — acknowledged by one server (R1) and by a quorum of three (R3),
//! beside one durable SQLite commit and a NATS round trip measured in the same run.

use crate::limits::{self, Limits};
use crate::report::{self, Tail};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    appends: usize,
    bytes: usize,
    /// One append acknowledged by the stream's only server.
    r1_ms: Tail,
    /// One append acknowledged by a quorum of three servers.
    r3_ms: Tail,
    /// The same on servers that fsync each write before acknowledging it
    /// (`sync_interval: always`).
    r3_synced_ms: Tail,
    limits: Limits,
    /// R3 append p50 ÷ one durable SQLite commit p50: what replicating each group commit adds,
    /// in commits.
    r3_per_sqlite_commit: f64,
    /// R3 append p50 ÷ a NATS round trip.
    r3_per_nats_round_trip: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} appends of {} bytes with an expected last sequence, one after the other ({} build, 3 nats-servers on this machine):",
            self.appends, self.bytes, self.build
        )?;
        writeln!(f, "  R1 (one server acknowledges):    {}", self.r1_ms)?;
        writeln!(f, "  R3 (a quorum of three):          {}", self.r3_ms)?;
        writeln!(
            f,
            "  R3, sync_interval: always:       {}",
            self.r3_synced_ms
        )?;
        write!(f, "{}", self.limits)?;
        writeln!(
            f,
            "  ratios: R3 append ÷ durable SQLite commit {:.1}× · R3 append ÷ NATS round trip {:.1}×",
            self.r3_per_sqlite_commit, self.r3_per_nats_round_trip
        )
    }
}

pub async fn run(appends: usize, bytes: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(
        appends > 0 && bytes > 0,
        "--appends and --bytes must be > 0"
    );
    anyhow::ensure!(
        bytes <= 900 * 1024,
        "--bytes must fit in one NATS message (at most 921600)"
    );
    let dir = tempfile::tempdir()?;
    let cluster = rhizos_broker::server::NatsCluster::start(3, "bench", dir.path())?;
    let client = cluster.ready_client().await?;
    let nats = rhizos_broker::config::NatsSettings {
        url: cluster.url(),
        ..Default::default()
    };
    let limits = limits::measure(&nats).await?;
    let js = jetstream::new(client);
    let payload = bytes::Bytes::from(vec![b'x'; bytes]);
    let mut r1 = appends_to(&js, "BENCH_R1", 1, appends, &payload).await?;
    let mut r3 = appends_to(&js, "BENCH_R3", 3, appends, &payload).await?;
    let (r1_ms, r3_ms) = (Tail::of(&mut r1), Tail::of(&mut r3));
    drop(cluster);
    // The same quorum appends on servers that fsync each write before acknowledging it.
    let synced = rhizos_broker::server::NatsCluster::start_synced(3, "synced", dir.path())?;
    let client = synced.ready_client().await?;
    let js = jetstream::new(client);
    let mut r3_synced = appends_to(&js, "BENCH_R3_SYNCED", 3, appends, &payload).await?;
    let r3_synced_ms = Tail::of(&mut r3_synced);
    Ok(Report {
        bench: "replication",
        build: report::build(),
        appends,
        bytes,
        r3_per_sqlite_commit: r3_ms.p50 / limits.sqlite_commit_ms,
        r3_per_nats_round_trip: r3_ms.p50 / limits.nats_round_trip_ms,
        r1_ms,
        r3_ms,
        r3_synced_ms,
        limits,
    })
}

/// Appends `count` records to a fresh stream `name` kept `replicas` times, each expecting the
/// sequence of the one before (as the only writer of a ledger would); returns each ack's wait.
async fn appends_to(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    count: usize,
    payload: &bytes::Bytes,
) -> anyhow::Result<Vec<Duration>> {
    let subject = format!("bench.{}", name.to_lowercase());
    let stream = js
        .create_stream(stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the {replicas}-replica stream {name}: {e}"))?;
    // A new stream's leader and followers settle for a moment: the first appends are not timed.
    let warm_up = 50;
    let mut last = stream.cached_info().state.last_sequence;
    let mut times = Vec::with_capacity(count);
    for i in 0..count + warm_up {
        let started = Instant::now();
        let ack = js
            .send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(payload.clone())
                    .expected_last_sequence(last),
            )
            .await?
            .await?;
        if i >= warm_up {
            times.push(started.elapsed());
        }
        last = ack.sequence;
    }
    Ok(times)
}
