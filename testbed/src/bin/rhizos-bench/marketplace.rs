//! `marketplace`: jobs offered to many simulated nodes (they ack and report at once): jobs
//! settled per second through the orchestrator and its ledger (real nats-server, SQLite with
//! synchronous=FULL), and submit → running latency (to the `running` event a subscriber sees).
//! Closed loop by default (`--concurrency` submits in flight: throughput); with `--rate` an open
//! loop at that many submits per second (latency at a given load; a low rate such as 100
//! measures an unloaded orchestrator).

use crate::limits::{self, Limits};
use crate::report::{self, Tail};
use futures::StreamExt as _;
use rhizos_broker::subjects::EscrowEventKind;
use rhizos_broker::wire::{JobSpec, SubmitJob, SubmitJobReply, WIRE_VERSION, Workload};
use rhizos_broker::{Caller, Client, RequestError};
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
    nodes: usize,
    jobs: usize,
    concurrency: usize,
    rate: Option<f64>,
    /// Authentication and permissions on.
    secure: bool,
    registration_s: f64,
    rejected: usize,
    settled: usize,
    submit_phase_s: f64,
    total_s: f64,
    jobs_settled_per_s: f64,
    submit_to_running_ms: Tail,
    limits: Limits,
    /// Jobs settled per second ÷ durable SQLite commits per second (target ≥ 3: group commit
    /// settles several jobs per fsync).
    settled_per_commit_rate: f64,
    /// Submit → running p50 ÷ the NATS round trip p50 (target ≤ 6 unloaded).
    running_per_nats_round_trip: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match self.rate {
            Some(rate) => format!(
                "offered at {rate} jobs/s, at most {} in flight",
                self.concurrency
            ),
            None => format!("concurrency {}", self.concurrency),
        };
        writeln!(
            f,
            "{} jobs over {} simulated nodes ({} build, {load}, authentication {}):",
            self.jobs,
            self.nodes,
            self.build,
            if self.secure { "on" } else { "off" }
        )?;
        writeln!(
            f,
            "  registered {} nodes in {:.2} s",
            self.nodes, self.registration_s
        )?;
        writeln!(
            f,
            "  settled {} (rejected {}) in {:.2} s = {:.0} jobs/s",
            self.settled, self.rejected, self.total_s, self.jobs_settled_per_s
        )?;
        writeln!(f, "  submit → running: {}", self.submit_to_running_ms)?;
        write!(f, "{}", self.limits)?;
        writeln!(
            f,
            "  ratios: jobs/s ÷ commits/s {:.2}× · submit → running p50 ÷ NATS round trip {:.1}×",
            self.settled_per_commit_rate, self.running_per_nats_round_trip
        )
    }
}

type SubmittedAt = Arc<Mutex<HashMap<String, Instant>>>;

pub async fn run(
    nodes: usize,
    jobs: usize,
    concurrency: usize,
    rate: Option<f64>,
    secure: bool,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        jobs > 0 && nodes > 0 && concurrency > 0,
        "--nodes, --jobs and --concurrency must be > 0"
    );
    anyhow::ensure!(
        rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--rate must be a positive number of jobs per second"
    );
    let options = ClusterOptions {
        agents: 0,
        secure,
        ..ClusterOptions::default()
    };
    let pricing = options.pricing;
    let cluster = Cluster::start(options).await?;
    let limits = limits::measure(&cluster.settings_as(&Caller::orchestrator())?).await?;
    let setup = Instant::now();
    // One connection speaks for every simulated node: with authentication on it needs the
    // service role, and claims each node's identity per request (the nodes are enrolled).
    let mut fleet_bus =
        rhizos_broker::Bus::connect(&cluster.settings_as(&Caller::orchestrator())?).await?;
    fleet_bus.identity = None;
    if secure {
        let operator = cluster.client();
        let mut enrolments = futures::stream::iter((0..nodes).map(|index| {
            let operator = operator.clone();
            async move {
                operator
                    .node_enroll(
                        &rhizos_testbed::sim::node_id(index),
                        &rhizos_testbed::sim::provider_account(index),
                        None,
                    )
                    .await
            }
        }))
        .buffer_unordered(64);
        while let Some(enrolled) = enrolments.next().await {
            enrolled?;
        }
    }
    let fleet = rhizos_testbed::sim::SimFleet::start(fleet_bus, nodes, pricing, 10).await?;
    let registration_s = setup.elapsed().as_secs_f64();
    cluster.funded_account("load", 1_000_000_000_000).await?;

    let driven = drive(
        &cluster.bus,
        cluster.client_as(&Caller::user("load")).await?,
        jobs,
        concurrency,
        rate,
    )
    .await?;
    drop(fleet);
    cluster.shutdown().await?;
    Ok(Report {
        bench: "marketplace",
        build: report::build(),
        nodes,
        jobs,
        concurrency,
        rate,
        secure,
        registration_s,
        rejected: driven.rejected,
        settled: driven.settled,
        submit_phase_s: driven.submit_phase_s,
        total_s: driven.total_s,
        jobs_settled_per_s: driven.jobs_per_s(),
        settled_per_commit_rate: driven.jobs_per_s() / limits.sqlite_commits_per_s,
        running_per_nats_round_trip: driven.running.p50 / limits.nats_round_trip_ms,
        submit_to_running_ms: driven.running,
        limits,
    })
}

/// What [`drive`] saw.
pub struct Driven {
    pub rejected: usize,
    pub settled: usize,
    pub submit_phase_s: f64,
    pub total_s: f64,
    pub running: Tail,
}

impl Driven {
    pub fn jobs_per_s(&self) -> f64 {
        self.settled as f64 / self.total_s
    }
}

/// Submits `jobs` minimal WASM jobs for the funded account `load` through `client` (closed
/// loop with `concurrency` in flight, or open at `rate`), watching their events on `bus`:
/// submit → running from each `running` event, throughput from the `settled` escrow events
/// (waiting for all of them, at most 60 s after the last).
pub async fn drive(
    bus: &rhizos_broker::Bus,
    client: Client,
    jobs: usize,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<Driven> {
    let subjects = &bus.subjects;
    let wildcard = |subject: String| subject.trim_end_matches('x').to_owned() + "*";
    let running_events = bus
        .client
        .subscribe(wildcard(subjects.job_event("load", "running", "x")?))
        .await?;
    let mut settled_events = bus
        .client
        .subscribe(wildcard(subjects.escrow_event(
            "load",
            EscrowEventKind::Settled,
            "x",
        )?))
        .await?;
    bus.client.flush().await?;
    let submitted_at: SubmittedAt = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let watcher = tokio::spawn(watch_running(
        running_events,
        submitted_at.clone(),
        latencies.clone(),
    ));
    let submitter = Submitter {
        client,
        module: rhizos_broker::wire::b64_encode(b"(module (func (export \"_start\")))"),
        submitted_at,
    };
    let started = Instant::now();
    let rejected = match rate {
        None => submitter.closed_loop(jobs, concurrency).await,
        Some(rate) => submitter.open_loop(jobs, concurrency, rate, started).await,
    };
    let submit_phase_s = started.elapsed().as_secs_f64();
    let mut settled = 0usize;
    while settled < jobs - rejected {
        match tokio::time::timeout(Duration::from_secs(60), settled_events.next()).await {
            Ok(Some(_)) => settled += 1,
            _ => break,
        }
    }
    let total_s = started.elapsed().as_secs_f64();
    watcher.abort();
    let mut latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(Driven {
        rejected,
        settled,
        submit_phase_s,
        total_s,
        running: Tail::of(&mut latencies),
    })
}

/// Submit → running of each job, from the running events.
async fn watch_running(
    mut running_events: async_nats::Subscriber,
    submitted_at: SubmittedAt,
    latencies: Arc<Mutex<Vec<Duration>>>,
) {
    while let Some(message) = running_events.next().await {
        let job_id = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
        let started = submitted_at
            .lock()
            .ok()
            .and_then(|m| m.get(&job_id).copied());
        if let (Some(started), Ok(mut l)) = (started, latencies.lock()) {
            l.push(started.elapsed());
        }
    }
}

struct Submitter {
    client: Client,
    /// The smallest WASM module (WAT), base64.
    module: String,
    submitted_at: SubmittedAt,
}

impl Submitter {
    fn submit(
        &self,
        index: usize,
    ) -> impl Future<Output = Result<SubmitJobReply, RequestError>> + use<> {
        let (client, submitted_at) = (self.client.clone(), self.submitted_at.clone());
        let job_id = format!("load-{index}");
        let request = SubmitJob {
            v: WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "load".into(),
            spec: JobSpec {
                max_retries: 0,
                ..JobSpec::new(
                    Workload::Wasm {
                        module_b64: self.module.clone(),
                    },
                    1_000,
                    64,
                )
            },
            max_cost_micros: 1_000_000,
            api_key_sha256: None,
        };
        async move {
            if let Ok(mut map) = submitted_at.lock() {
                map.insert(job_id, Instant::now());
            }
            client.submit(&request).await
        }
    }

    /// `concurrency` submits in flight; returns how many were refused.
    async fn closed_loop(&self, jobs: usize, concurrency: usize) -> usize {
        let mut submits = futures::stream::iter((0..jobs).map(|index| self.submit(index)))
            .buffer_unordered(concurrency);
        let mut rejected = 0;
        while let Some(result) = submits.next().await {
            rejected += usize::from(result.is_err());
        }
        rejected
    }

    /// Job i goes out at `started + i / rate` (late ones at once), answers collected meanwhile;
    /// never more than `concurrency` unanswered. Returns how many were refused.
    async fn open_loop(
        &self,
        jobs: usize,
        concurrency: usize,
        rate: f64,
        started: Instant,
    ) -> usize {
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut rejected = 0;
        for index in 0..jobs {
            let due = started + Duration::from_secs_f64(index as f64 / rate);
            loop {
                tokio::select! {
                    biased;
                    Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                        let result: Result<SubmitJobReply, RequestError> = result;
                        rejected += usize::from(result.is_err());
                    }
                    () = tokio::time::sleep_until(due.into()), if in_flight.len() < concurrency => break,
                }
            }
            in_flight.push(self.submit(index));
        }
        while let Some(result) = in_flight.next().await {
            rejected += usize::from(result.is_err());
        }
        rejected
    }
}
