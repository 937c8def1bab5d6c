//! `node.*` requests: registration (with reconciliation of what the node says it runs), and the
//! node list / info views (registry + record from the ledger).

use super::super::Orchestrator;
use super::super::matching::provider_tier;
use super::super::validate::{party_account, token};
use rhizos_broker::validate_token;
use rhizos_broker::wire::{self, Ack, ErrorCode, ListNodes, NodeRef, RegisterNode, WireError};

impl Orchestrator {
    pub(in crate::orchestrator) async fn register_node(
        &self,
        registration: RegisterNode,
    ) -> Result<Ack, WireError> {
        token(validate_token("node id", &registration.node_id))?;
        party_account("provider account", &registration.provider_account)?;
        for backend in &registration.backends {
            token(validate_token("backend", backend))?;
        }
        if registration.heartbeat_interval_ms == 0 || registration.max_concurrent == 0 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "heartbeat_interval_ms and max_concurrent must be > 0",
            ));
        }
        let stored = registration.clone();
        self.db(move |store| store.upsert_node(&stored)).await?;
        // Attempts the orchestrator believes run there but the node does not report were lost
        // with its restart: requeue them. Executions it reports that were moved elsewhere: stop.
        let node_id = registration.node_id.clone();
        let active = self.db(move |store| store.active_on_node(&node_id)).await?;
        for (job_id, attempt) in active {
            if !registration
                .running
                .iter()
                .any(|r| r.job_id == job_id && r.attempt == attempt)
            {
                let reason = format!(
                    "node {} restarted without attempt {attempt}",
                    registration.node_id
                );
                self.requeue_or_fail(job_id, attempt, reason).await?;
            }
        }
        self.stop_moved_executions(&registration.node_id, &registration.running)
            .await;
        tracing::info!(node_id = %registration.node_id, backends = ?registration.backends, "node registered");
        self.registry().upsert(registration);
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        Ok(Ack {
            accepted: true,
            note: None,
        })
    }

    /// Recounts every node's committed resources from the database (forgetting attempts that
    /// ended since the last recount) and reads the node totals. On the ledger thread, so no
    /// assignment can slip between the count and its use.
    pub(in crate::orchestrator) async fn recount_and_stats(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, u64, f64)>, WireError> {
        let this = self.clone();
        self.db(move |store| {
            let allocations = store.active_per_node()?;
            this.registry().set_allocations(&allocations);
            store.node_stats()
        })
        .await
    }

    pub(in crate::orchestrator) async fn node_views(
        &self,
    ) -> Result<Vec<wire::NodeView>, WireError> {
        let stats = self.recount_and_stats().await?;
        let registry = self.registry();
        Ok(registry
            .entries()
            .into_iter()
            .map(|entry| {
                let r = entry.registration;
                let (jobs_run, jobs_succeeded, reputation) =
                    stats.get(&r.node_id).copied().unwrap_or((0, 0, 1.0));
                wire::NodeView {
                    tier: provider_tier(&r.gpus),
                    status: if entry.lost { "lost" } else { "live" }.to_owned(),
                    last_heartbeat_ms_ago: u64::try_from(entry.last_seen.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    active: entry.allocated.jobs,
                    jobs_run,
                    jobs_succeeded,
                    reputation,
                    node_id: r.node_id,
                    provider_account: r.provider_account,
                    backends: r.backends,
                    pricing: r.pricing,
                    cpu_cores: r.cpu_cores,
                    memory_mib: r.memory_mib,
                    gpus: r.gpus,
                    max_concurrent: r.max_concurrent,
                    plugins: r.plugins,
                    hardware: r.hardware,
                    gpu_telemetry: entry.gpu_telemetry,
                }
            })
            .collect())
    }

    pub(in crate::orchestrator) async fn node_list(
        &self,
        _request: ListNodes,
    ) -> Result<wire::NodeList, WireError> {
        Ok(wire::NodeList {
            nodes: self.node_views().await?,
        })
    }

    pub(in crate::orchestrator) async fn node_info(
        &self,
        request: NodeRef,
    ) -> Result<wire::NodeView, WireError> {
        token(validate_token("node id", &request.node_id))?;
        self.node_views()
            .await?
            .into_iter()
            .find(|n| n.node_id == request.node_id)
            .ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("no node {}", request.node_id))
            })
    }
}
