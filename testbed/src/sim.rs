//! Simulated nodes for load benchmarks: each speaks the agent's side of the protocol (register,
//! heartbeat, ack assignments, report `running` then `finished`) without running anything, so a
//! benchmark measures the orchestrator and the bus, not the workloads. Many nodes share one
//! connection and one wildcard subscription.

use futures::StreamExt as _;
use rhizos_broker::Bus;
use rhizos_broker::wire::{
    self, Ack, AssignJob, ExecutionOutcome, Heartbeat, JobReport, Pricing, RegisterNode, Reply,
    ReportPhase, WIRE_VERSION,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The id of simulated node `index`.
pub fn node_id(index: usize) -> String {
    format!("sim-{index}")
}

/// The provider account simulated node `index` is paid into (16 providers share the fleet).
pub fn provider_account(index: usize) -> String {
    format!("sim-provider-{}", index % 16)
}

/// A fleet of simulated nodes `sim-0` … `sim-<n-1>`.
pub struct SimFleet {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// When the fleet saw each job's assignment and its `running` report's answer.
    pub timeline: Timeline,
}

/// What the fleet saw of each job, by job id: for latency breakdowns (submit → assignment →
/// running report → its answer).
#[derive(Clone, Default)]
pub struct Timeline(Arc<Mutex<HashMap<String, NodeSide>>>);

/// When the fleet saw one job's attempt.
#[derive(Debug, Clone, Copy)]
pub struct NodeSide {
    /// The assignment arrived.
    pub assigned: Instant,
    /// The `running` report went out.
    pub running_sent: Option<Instant>,
    /// The orchestrator answered the `running` report (it answers after its commit).
    pub running_answered: Option<Instant>,
}

impl Timeline {
    /// What the fleet saw of `job_id` (its last attempt).
    pub fn get(&self, job_id: &str) -> Option<NodeSide> {
        self.0.lock().ok()?.get(job_id).copied()
    }

    fn record(&self, job_id: &str, update: impl FnOnce(&mut NodeSide)) {
        let now = Instant::now();
        if let Ok(mut map) = self.0.lock() {
            update(map.entry(job_id.to_owned()).or_insert(NodeSide {
                assigned: now,
                running_sent: None,
                running_answered: None,
            }));
        }
    }
}

/// The registration of simulated node `index`: 16 cores, 64 GiB, 8 slots, WASM only, one
/// price for all (so the whole fleet is one matching class), heartbeats every
/// `heartbeat_interval_ms`.
pub fn registration(index: usize, pricing: Pricing, heartbeat_interval_ms: u64) -> RegisterNode {
    RegisterNode {
        v: WIRE_VERSION,
        node_id: node_id(index),
        provider_account: provider_account(index),
        backends: vec!["wasm".into()],
        pricing,
        cpu_cores: 16,
        memory_mib: 65_536,
        max_concurrent: 8,
        heartbeat_interval_ms,
        plugins: vec![],
        running: vec![],
        gpus: vec![],
        disk_mib: 100_000,
        hardware: None,
        artifact_sources: vec![],
        models: vec![],
    }
}

impl SimFleet {
    /// Registers `count` nodes and serves their assignments until dropped. Every execution
    /// "runs" for `claimed_elapsed_ms` (reported, not waited). Heartbeats every 5 s.
    pub async fn start(
        bus: Bus,
        count: usize,
        pricing: Pricing,
        claimed_elapsed_ms: u64,
    ) -> anyhow::Result<Self> {
        Self::start_with(
            bus,
            count,
            pricing,
            claimed_elapsed_ms,
            Duration::from_secs(5),
        )
        .await
    }

    /// [`SimFleet::start`] with each node heartbeating every `heartbeat_interval`, the fleet's
    /// heartbeats spread evenly over it (as independent machines' are), not in one burst.
    pub async fn start_with(
        bus: Bus,
        count: usize,
        pricing: Pricing,
        claimed_elapsed_ms: u64,
        heartbeat_interval: Duration,
    ) -> anyhow::Result<Self> {
        let bus = Arc::new(bus);
        let interval_ms = u64::try_from(heartbeat_interval.as_millis()).unwrap_or(u64::MAX);
        // Registration in parallel batches.
        let mut pending = futures::stream::iter((0..count).map(|index| {
            let bus = bus.clone();
            async move { bus.call(&registration(index, pricing, interval_ms)).await }
        }))
        .buffer_unordered(64);
        while let Some(result) = pending.next().await {
            result?;
        }
        let prefix = bus.subjects.job_assign("x")?;
        let wildcard = format!("{}*", prefix.trim_end_matches('x'));
        let mut assignments = bus.client.subscribe(wildcard).await?;
        // Sent before any job can be offered to the fleet (a flush empties the client's buffer;
        // an assignment that still beats it is refused and offered again).
        bus.client.flush().await?;
        let server_bus = bus.clone();
        let timeline = Timeline::default();
        let seen = timeline.clone();
        let server = tokio::spawn(async move {
            while let Some(message) = assignments.next().await {
                let arrived = Instant::now();
                let node_id = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
                let Ok(assign) = wire::decode::<AssignJob>(&message.payload, 4 * 1024 * 1024)
                else {
                    continue;
                };
                seen.record(&assign.job_id, |side| {
                    *side = NodeSide {
                        assigned: arrived,
                        running_sent: None,
                        running_answered: None,
                    };
                });
                if let Some(reply) = message.reply {
                    let ack = wire::encode(&Reply::ok(Ack {
                        accepted: true,
                        note: None,
                    }));
                    let _ = server_bus.client.publish(reply, ack).await;
                }
                let (bus, seen) = (server_bus.clone(), seen.clone());
                tokio::spawn(async move {
                    let running = JobReport {
                        v: WIRE_VERSION,
                        node_id: node_id.clone(),
                        job_id: assign.job_id.clone(),
                        attempt: assign.attempt,
                        phase: ReportPhase::Running,
                        signature: None,
                    };
                    seen.record(&running.job_id, |side| {
                        side.running_sent = Some(Instant::now())
                    });
                    let _ = bus.call(&running).await;
                    seen.record(&running.job_id, |side| {
                        side.running_answered = Some(Instant::now());
                    });
                    let finished = JobReport {
                        phase: ReportPhase::Finished {
                            outcome: ExecutionOutcome::exited(0, claimed_elapsed_ms),
                        },
                        ..running
                    };
                    let _ = bus.call(&finished).await;
                });
            }
        });
        let heartbeats = tokio::spawn(heartbeat_loop(bus.clone(), count, heartbeat_interval));
        Ok(Self {
            tasks: vec![server, heartbeats],
            timeline,
        })
    }
}

/// Every node's heartbeat once per `interval` (nothing running, 8 free slots), in 50 slices
/// a fiftieth of the interval apart.
async fn heartbeat_loop(bus: Arc<Bus>, count: usize, interval: Duration) {
    const SLICES: usize = 50;
    let mut tick = tokio::time::interval(interval / SLICES as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for turn in (0..SLICES).cycle() {
        tick.tick().await;
        for index in turn * count / SLICES..(turn + 1) * count / SLICES {
            let node_id = node_id(index);
            let Ok(subject) = bus.subjects.node_heartbeat(&node_id) else {
                continue;
            };
            let beat = Heartbeat {
                v: WIRE_VERSION,
                node_id,
                running: vec![],
                free_slots: 8,
                ts_ms: 0,
                gpus: vec![],
            };
            let _ = bus.client.publish(subject, wire::encode(&beat)).await;
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
