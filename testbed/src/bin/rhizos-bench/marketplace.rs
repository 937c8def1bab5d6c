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
    /// The replicated ledger on.
    replicated: bool,
    /// `[orchestrator] job_payload_max_age_s`, when set.
    payload_max_age_s: Option<u64>,
    registration_s: f64,
    rejected: usize,
    settled: usize,
    submit_phase_s: f64,
    total_s: f64,
    jobs_settled_per_s: f64,
    submit_to_running_ms: Tail,
    /// Where submit → running goes.
    stages: Stages,
    inside: Inside,
    /// Ended jobs whose payloads were dropped during the run.
    jobs_pruned: u64,
    /// The ledger file and its write-ahead log at the end.
    ledger_bytes: u64,
    /// Of which the write-ahead log.
    ledger_wal_bytes: u64,
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
            "{} jobs over {} simulated nodes ({} build, {load}, authentication {}{}):",
            self.jobs,
            self.nodes,
            self.build,
            if self.secure { "on" } else { "off" },
            if self.replicated {
                ", replicated ledger"
            } else {
                ""
            }
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
        write!(f, "{}", self.stages)?;
        writeln!(
            f,
            "    inside the orchestrator (means): submit handled {:.2} ms · report handled {:.2} ms · a ledger operation queued → durable {:.2} ms · group commit {:.2} ms, {:.1} operations each",
            self.inside.submit_handled_ms,
            self.inside.report_handled_ms,
            self.inside.ledger_wait_ms,
            self.inside.group_commit_ms,
            self.inside.ops_per_commit
        )?;
        writeln!(
            f,
            "  ledger file {:.1} MiB at the end ({:.1} MiB of it the write-ahead log); {} ended jobs' payloads dropped{}",
            self.ledger_bytes as f64 / (1024.0 * 1024.0),
            self.ledger_wal_bytes as f64 / (1024.0 * 1024.0),
            self.jobs_pruned,
            self.payload_max_age_s
                .map(|age| format!(" (job_payload_max_age_s = {age})"))
                .unwrap_or_default()
        )?;
        write!(f, "{}", self.limits)?;
        writeln!(
            f,
            "  ratios: jobs/s ÷ commits/s {:.2}× · submit → running p50 ÷ NATS round trip {:.1}×",
            self.settled_per_commit_rate, self.running_per_nats_round_trip
        )
    }
}

/// What the submitting client saw of each job, by job id.
type Seen = Arc<Mutex<HashMap<String, ClientSide>>>;

/// When the client sent a job, heard the answer and saw its `running` event.
#[derive(Debug, Clone, Copy)]
pub struct ClientSide {
    submitted: Instant,
    answered: Option<Instant>,
    running_seen: Option<Instant>,
}

/// Where submit → running goes, stage by stage (p50/p99 of each job's own stage times): the
/// client's stamps and the simulated nodes' ([`rhizos_testbed::sim::Timeline`]).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stages {
    /// Submit sent → its answer heard (validation, a durable commit, the reply).
    pub submit_answered_ms: Tail,
    /// Submit sent → the assignment at the node (placed at submit, sent after the commit).
    pub submit_to_assignment_ms: Tail,
    /// Assignment at the node → its `running` report sent (the simulated node's own delay).
    pub node_ms: Tail,
    /// `running` report sent → its answer (a hop, a durable commit, a hop).
    pub running_report_ms: Tail,
    /// Answer to the `running` report → the `running` event at a subscriber (the outbox, its
    /// JetStream publish, delivery).
    pub report_answered_to_event_ms: Tail,
}

impl Stages {
    fn of(seen: &HashMap<String, ClientSide>, timeline: &rhizos_testbed::sim::Timeline) -> Self {
        let between = |a: Instant, b: Option<Instant>| b.and_then(|b| b.checked_duration_since(a));
        let mut stages: [Vec<Duration>; 5] = Default::default();
        for (job_id, client) in seen {
            let node = timeline.get(job_id);
            let durations = [
                between(client.submitted, client.answered),
                between(client.submitted, node.map(|n| n.assigned)),
                node.and_then(|n| between(n.assigned, n.running_sent)),
                node.and_then(|n| n.running_sent.and_then(|s| between(s, n.running_answered))),
                node.and_then(|n| {
                    n.running_answered
                        .and_then(|a| between(a, client.running_seen))
                }),
            ];
            for (stage, duration) in stages.iter_mut().zip(durations) {
                stage.extend(duration);
            }
        }
        let [answered, assignment, node, report, event] = stages.map(|mut s| Tail::of(&mut s));
        Self {
            submit_answered_ms: answered,
            submit_to_assignment_ms: assignment,
            node_ms: node,
            running_report_ms: report,
            report_answered_to_event_ms: event,
        }
    }
}

/// The orchestrator's own view of the run (means from its histograms: the time it spent
/// between a request's arrival and its answer, and its ledger thread's group commits).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Inside {
    /// `job.submit` handled, arrival → answer.
    pub submit_handled_ms: f64,
    /// `job.report` handled (running and finished reports alike).
    pub report_handled_ms: f64,
    /// One group commit: its operations and the durable commit.
    pub group_commit_ms: f64,
    /// One ledger operation, queued → its commit durable.
    pub ledger_wait_ms: f64,
    /// Ledger operations per group commit.
    pub ops_per_commit: f64,
}

impl Inside {
    /// From the text exposition of the orchestrator's metrics.
    fn of(metrics: &str) -> Self {
        // One series' value: `name{labels} value`.
        let value = |series: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let mean = |name: &str, labels: &str| {
            value(&format!("{name}_sum{labels}")) / value(&format!("{name}_count{labels}"))
        };
        let request = "rhizos_orchestrator_request_seconds";
        Self {
            submit_handled_ms: mean(request, "{op=\"job.submit\"}") * 1000.0,
            report_handled_ms: mean(request, "{op=\"job.report\"}") * 1000.0,
            group_commit_ms: mean("rhizos_ledger_commit_seconds", "") * 1000.0,
            ledger_wait_ms: mean("rhizos_ledger_wait_seconds", "") * 1000.0,
            ops_per_commit: mean("rhizos_ledger_group_size", ""),
        }
    }
}

impl fmt::Display for Stages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, tail) in [
            ("submit → answer", &self.submit_answered_ms),
            (
                "submit → assignment at the node",
                &self.submit_to_assignment_ms,
            ),
            ("assignment → running report sent", &self.node_ms),
            ("running report → its answer", &self.running_report_ms),
            (
                "answer → running event seen",
                &self.report_answered_to_event_ms,
            ),
        ] {
            writeln!(f, "    {name:<34} {tail}")?;
        }
        Ok(())
    }
}

pub async fn run(
    nodes: usize,
    jobs: usize,
    concurrency: usize,
    rate: Option<f64>,
    secure: bool,
    replicated: bool,
    payload_max_age_s: Option<u64>,
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
        replicated_ledger: replicated,
        job_payload_max_age_s: payload_max_age_s,
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
    let stages = Stages::of(&driven.seen, &fleet.timeline);
    let metrics = rhizos_core::metrics::render(&[cluster.orchestrator.metrics_source()]).await;
    let inside = Inside::of(&metrics);
    let jobs_pruned = metrics
        .lines()
        .find_map(|line| line.strip_prefix("rhizos_jobs_pruned_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64;
    let ledger = cluster.ledger_path();
    let size = |path: std::path::PathBuf| std::fs::metadata(path).map_or(0, |m| m.len());
    let ledger_wal_bytes = size(ledger.with_extension("db-wal"));
    let ledger_bytes = size(ledger) + ledger_wal_bytes;
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
        replicated,
        payload_max_age_s,
        registration_s,
        rejected: driven.rejected,
        settled: driven.settled,
        submit_phase_s: driven.submit_phase_s,
        total_s: driven.total_s,
        jobs_settled_per_s: driven.jobs_per_s(),
        settled_per_commit_rate: driven.jobs_per_s() / limits.sqlite_commits_per_s,
        running_per_nats_round_trip: driven.running.p50 / limits.nats_round_trip_ms,
        submit_to_running_ms: driven.running,
        stages,
        inside,
        jobs_pruned,
        ledger_bytes,
        ledger_wal_bytes,
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
    /// What the client saw of each job.
    pub seen: HashMap<String, ClientSide>,
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
    let settled_events = bus
        .client
        .subscribe(wildcard(subjects.escrow_event(
            "load",
            EscrowEventKind::Settled,
            "x",
        )?))
        .await?;
    bus.client.flush().await?;
    let seen: Seen = Arc::default();
    let watcher = tokio::spawn(watch_running(running_events, seen.clone()));
    // Settle events are counted as they come, while submits are still going out: left in the
    // subscription until the submit phase ends, past 65,536 of them the client dropped the rest
    // (a 100,000-job run saw 66,028).
    let (settled_count, mut settled_rx) = tokio::sync::watch::channel(0usize);
    let counter = tokio::spawn(async move {
        let mut settled_events = settled_events;
        let mut count = 0usize;
        while settled_events.next().await.is_some() {
            count += 1;
            settled_count.send_replace(count);
        }
    });
    let submitter = Submitter {
        client,
        module: rhizos_broker::wire::b64_encode(b"(module (func (export \"_start\")))"),
        seen: seen.clone(),
    };
    let started = Instant::now();
    let rejected = match rate {
        None => submitter.closed_loop(jobs, concurrency).await,
        Some(rate) => submitter.open_loop(jobs, concurrency, rate, started).await,
    };
    let submit_phase_s = started.elapsed().as_secs_f64();
    // Until every accepted job settled, or none more did for 60 s.
    let target = jobs - rejected;
    while *settled_rx.borrow_and_update() < target {
        if !matches!(
            tokio::time::timeout(Duration::from_secs(60), settled_rx.changed()).await,
            Ok(Ok(()))
        ) {
            break;
        }
    }
    let settled = *settled_rx.borrow();
    let total_s = started.elapsed().as_secs_f64();
    watcher.abort();
    counter.abort();
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut latencies: Vec<Duration> = seen
        .values()
        .filter_map(|c| {
            c.running_seen
                .map(|r| r.saturating_duration_since(c.submitted))
        })
        .collect();
    Ok(Driven {
        rejected,
        settled,
        submit_phase_s,
        total_s,
        running: Tail::of(&mut latencies),
        seen,
    })
}

/// Stamps when each job's running event is seen.
async fn watch_running(mut running_events: async_nats::Subscriber, seen: Seen) {
    while let Some(message) = running_events.next().await {
        let now = Instant::now();
        let job_id = rhizos_broker::Subjects::last_token(&message.subject);
        if let Some(client) = seen.lock().ok().as_mut().and_then(|m| m.get_mut(job_id)) {
            client.running_seen.get_or_insert(now);
        }
    }
}

struct Submitter {
    client: Client,
    /// The smallest WASM module (WAT), base64.
    module: String,
    seen: Seen,
}

impl Submitter {
    fn submit(
        &self,
        index: usize,
    ) -> impl Future<Output = Result<SubmitJobReply, RequestError>> + use<> {
        let (client, seen) = (self.client.clone(), self.seen.clone());
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
            if let Ok(mut map) = seen.lock() {
                map.insert(
                    job_id.clone(),
                    ClientSide {
                        submitted: Instant::now(),
                        answered: None,
                        running_seen: None,
                    },
                );
            }
            let answer = client.submit(&request).await;
            let now = Instant::now();
            if let Some(client) = seen.lock().ok().as_mut().and_then(|m| m.get_mut(&job_id)) {
                client.answered = Some(now);
            }
            answer
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
