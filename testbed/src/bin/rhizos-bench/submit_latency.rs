//! `submit-latency`: one real node, the demo job, one job at a time: submit → reply, → the
//! `assigned` event, → `running`, → the end.

use crate::limits::Limits;
use crate::report::{self, Maybe, Summary};
use anyhow::Context as _;
use futures::StreamExt as _;
use rhizos_broker::wire::{Event, EventBody, JobState, SubmitJob, WIRE_VERSION};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    jobs: usize,
    build: &'static str,
    submit_reply_ms: Option<Summary>,
    submit_to_assigned_ms: Option<Summary>,
    submit_to_running_ms: Option<Summary>,
    submit_to_finished_ms: Option<Summary>,
    limits: Limits,
    /// Submit → running median ÷ the NATS round trip (target: within 2× of the simulated
    /// nodes' 6×, so ≤ 12×).
    running_per_nats_round_trip: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "submit → running over {} sequential jobs ({} build, 1 node, real nats-server + SQLite):",
            self.jobs, self.build
        )?;
        for (key, value) in [
            ("submit_reply_ms", &self.submit_reply_ms),
            ("submit_to_assigned_ms", &self.submit_to_assigned_ms),
            ("submit_to_running_ms", &self.submit_to_running_ms),
            ("submit_to_finished_ms", &self.submit_to_finished_ms),
        ] {
            writeln!(f, "  {key:<24} {}", Maybe(value))?;
        }
        write!(f, "{}", self.limits)?;
        if let Some(ratio) = self.running_per_nats_round_trip {
            writeln!(f, "  ratio: submit → running ÷ NATS round trip {ratio:.1}×")?;
        }
        Ok(())
    }
}

pub async fn run(jobs: usize) -> anyhow::Result<Report> {
    anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let limits = crate::limits::measure(&cluster.settings.nats).await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    let client = cluster.client();
    let (mut accepted, mut assigned, mut running, mut finished) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One warm-up job (index 0): the first execution compiles the module, later ones hit the
    // cache.
    for index in 0..=jobs {
        let job_id = format!("bench-{index}");
        let mut events = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_events_of(Some("bench"), &job_id)?[0].clone())
            .await?;
        cluster.bus.client.flush().await?;
        let request = SubmitJob {
            v: WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "bench".into(),
            spec: wasm_spec(&module, &["count", "1"], 10_000),
            max_cost_micros: 1_000_000,
            api_key_sha256: None,
        };
        let started = Instant::now();
        client.submit(&request).await?;
        let to_accepted = started.elapsed();
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
            accepted.push(to_accepted);
            assigned.push(to_assigned.context("no assigned event")?);
            running.push(to_running.context("no running event")?);
            finished.push(started.elapsed());
        }
    }
    cluster.shutdown().await?;
    let to_running = Summary::of(&mut running);
    Ok(Report {
        bench: "submit-latency",
        running_per_nats_round_trip: to_running.map(|s| s.median / limits.nats_round_trip_ms),
        limits,
        jobs,
        build: report::build(),
        submit_reply_ms: Summary::of(&mut accepted),
        submit_to_assigned_ms: Summary::of(&mut assigned),
        submit_to_running_ms: to_running,
        submit_to_finished_ms: Summary::of(&mut finished),
    })
}
