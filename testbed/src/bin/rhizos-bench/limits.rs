//! The machine's own limits, measured in the same run as a benchmark: a bare NATS
//! request/reply, a burst of core publishes, one durable SQLite transaction (WAL,
//! `synchronous=FULL`, as the ledger commits). These machines differ 2–3× from day to day, so a
//! figure alone says little; as a ratio to these it can be compared across days.

use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};

use crate::report::ms;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// A request and its reply through nats-server, nothing else, p50 in ms.
    pub nats_round_trip_ms: f64,
    /// Core publishes of 64 bytes per second (one connection, flushed at the end).
    pub nats_publishes_per_s: f64,
    /// One durable SQLite transaction (one insert, commit with fsync), p50 in ms.
    pub sqlite_commit_ms: f64,
    /// Such transactions per second, one after the other.
    pub sqlite_commits_per_s: f64,
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  machine limits, this run: NATS request/reply p50 {:.3} ms · {:.0} publishes/s · durable SQLite commit p50 {:.3} ms ({:.0}/s)",
            self.nats_round_trip_ms,
            self.nats_publishes_per_s,
            self.sqlite_commit_ms,
            self.sqlite_commits_per_s
        )
    }
}

/// Measures the limits against the nats-server the benchmark uses (`nats`: a party that may
/// publish and subscribe anywhere, e.g. the orchestrator's settings).
pub async fn measure(nats: &rhizos_broker::config::NatsSettings) -> anyhow::Result<Limits> {
    use futures::StreamExt as _;
    let responder = rhizos_broker::Bus::connect(nats).await?.client;
    let requester = rhizos_broker::Bus::connect(nats).await?.client;
    let subject = format!("rhizos.bench.limits.{}", std::process::id());
    let mut requests = responder.subscribe(subject.clone()).await?;
    let echo = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    // async-nats's flush only empties its own buffer, so the server may see the requester's
    // first request before the responder's subscription (another connection): "no responders".
    // Ask until the echo answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match requester
            .request(subject.clone(), bytes::Bytes::from_static(b"ping"))
            .await
        {
            Ok(_) => break,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut round_trips = Vec::with_capacity(2_000);
    for i in 0..2_200 {
        let started = Instant::now();
        requester
            .request(subject.clone(), bytes::Bytes::from_static(b"ping"))
            .await?;
        if i >= 200 {
            round_trips.push(started.elapsed());
        }
    }
    echo.abort();
    let burst = 200_000;
    let payload = bytes::Bytes::from(vec![b'x'; 64]);
    let started = Instant::now();
    for _ in 0..burst {
        requester
            .publish("rhizos.bench.limits.sink", payload.clone())
            .await?;
    }
    requester.flush().await?;
    let publish_s = started.elapsed().as_secs_f64();
    let commits = tokio::task::spawn_blocking(sqlite_commits).await??;
    Ok(Limits {
        nats_round_trip_ms: median(&mut round_trips),
        nats_publishes_per_s: f64::from(burst) / publish_s,
        sqlite_commit_ms: median(&mut commits.clone()),
        sqlite_commits_per_s: commits.len() as f64
            / commits.iter().map(Duration::as_secs_f64).sum::<f64>(),
    })
}

/// 500 one-insert transactions on a fresh WAL database with `synchronous=FULL`.
fn sqlite_commits() -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::tempdir()?;
    let conn = rusqlite::Connection::open(dir.path().join("limits.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL);",
    )?;
    let mut times = Vec::with_capacity(500);
    for i in 0..520 {
        let started = Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])?;
        conn.execute_batch("COMMIT")?;
        if i >= 20 {
            times.push(started.elapsed());
        }
    }
    Ok(times)
}

fn median(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples.get(samples.len() / 2).map_or(f64::NAN, |d| ms(*d))
}
