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
use std::sync::Arc;
use std::time::Duration;

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
}

impl SimFleet {
    /// Registers `count` nodes and serves their assignments until dropped. Every execution
    /// "runs" for `claimed_elapsed_ms` (reported, not waited).
    pub async fn start(
        bus: Bus,
        count: usize,
        pricing: Pricing,
        claimed_elapsed_ms: u64,
    ) -> anyhow::Result<Self> {
        let bus = Arc::new(bus);
        // Registration in parallel batches.
        let mut pending = futures::stream::iter((0..count).map(|index| {
            let bus = bus.clone();
            async move {
                let registration = RegisterNode {
                    v: WIRE_VERSION,
                    node_id: node_id(index),
                    provider_account: provider_account(index),
                    backends: vec!["wasm".into()],
                    pricing,
                    cpu_cores: 16,
                    memory_mib: 65_536,
                    max_concurrent: 8,
                    heartbeat_interval_ms: 5_000,
                    plugins: vec![],
                    running: vec![],
                    gpus: vec![],
                    disk_mib: 100_000,
                    hardware: None,
                    artifact_sources: vec![],
                    models: vec![],
                };
                bus.call(&registration).await
            }
        }))
        .buffer_unordered(64);
        while let Some(result) = pending.next().await {
            result?;
        }
        let prefix = bus.subjects.job_assign("x")?;
        let wildcard = format!("{}*", prefix.trim_end_matches('x'));
        let mut assignments = bus.client.subscribe(wildcard).await?;
        let server_bus = bus.clone();
        let server = tokio::spawn(async move {
            while let Some(message) = assignments.next().await {
                let node_id = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
                let Ok(assign) = wire::decode::<AssignJob>(&message.payload, 4 * 1024 * 1024)
                else {
                    continue;
                };
                if let Some(reply) = message.reply {
                    let ack = wire::encode(&Reply::ok(Ack {
                        accepted: true,
                        note: None,
                    }));
                    let _ = server_bus.client.publish(reply, ack).await;
                }
                let bus = server_bus.clone();
                tokio::spawn(async move {
                    let running = JobReport {
                        v: WIRE_VERSION,
                        node_id: node_id.clone(),
                        job_id: assign.job_id.clone(),
                        attempt: assign.attempt,
                        phase: ReportPhase::Running,
                        signature: None,
                    };
                    let _ = bus.call(&running).await;
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
        let heartbeats = tokio::spawn(heartbeat_loop(bus.clone(), count));
        Ok(Self {
            tasks: vec![server, heartbeats],
        })
    }
}

/// Every node's heartbeat every 5 s (nothing running, 8 free slots).
async fn heartbeat_loop(bus: Arc<Bus>, count: usize) {
    loop {
        for index in 0..count {
            let node_id = format!("sim-{index}");
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
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
