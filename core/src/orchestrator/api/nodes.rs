//! `node.*` requests: registration (with reconciliation of what the node says it runs), and the
//! node list / info views (registry + record from the ledger).

use super::super::Orchestrator;
use super::super::matching::provider_tier;
use super::super::validate::{party_account, token, validate_registration};
use super::forbidden;
use rhizos_broker::wire::{
    self, Ack, EnrollNode, Enrolment, ErrorCode, ListNodes, NodeRef, RegisterNode, RemoveNode,
    WireError,
};
use rhizos_broker::{Caller, validate_token};
use std::ops::Bound;

impl Orchestrator {
    pub(in crate::orchestrator) async fn register_node(
        &self,
        caller: Caller,
        registration: RegisterNode,
    ) -> Result<Ack, WireError> {
        token(validate_token("node id", &registration.node_id))?;
        party_account("provider account", &registration.provider_account)?;
        if caller.name != registration.node_id {
            return Err(forbidden(format!(
                "{caller} may not register as node {}",
                registration.node_id
            )));
        }
        validate_registration(&registration)?;
        self.check_enrolment(&registration).await?;
        let stored = registration.clone();
        self.db(move |store| store.upsert_node(&stored)).await?;
        // Attempts the orchestrator believes run there but the node does not report were lost
        // with its restart: requeue them. Executions it reports that were moved elsewhere: stop.
        // Attempts that changed state within the grace may be in flight (an assignment sent
        // as the node registered, a running report not yet applied): the heartbeats after
        // it settle those.
        let node_id = registration.node_id.clone();
        let running = registration.running.clone();
        let grace_ms =
            self.inner.settings.assign_timeout_ms + 2 * registration.heartbeat_interval_ms;
        let missing = self
            .db(move |store| store.unreported_on_node(&node_id, &running, grace_ms))
            .await?;
        for (job_id, attempt) in missing {
            let reason = format!(
                "node {} restarted without attempt {attempt}",
                registration.node_id
            );
            self.requeue_or_fail(job_id, attempt, reason).await?;
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

    /// A node registers only as it was enrolled: with the provider account the operator fixed
    /// and not after its removal. Without an enrolment it may register only when
    /// `[orchestrator] open_registration` is on (a network without authentication).
    async fn check_enrolment(&self, registration: &RegisterNode) -> Result<(), WireError> {
        let node_id = registration.node_id.clone();
        let enrolment = self.db(move |store| store.enrolment(&node_id)).await?;
        match enrolment {
            Some(e) if e.removed_ms.is_some() => Err(forbidden(format!(
                "node {} was removed by the operator: enrol it again to let it register",
                e.node_id
            ))),
            Some(e) if e.provider_account != registration.provider_account => {
                Err(forbidden(format!(
                    "node {} is enrolled to pay provider account {}, not {}: the provider account is fixed at enrolment",
                    e.node_id, e.provider_account, registration.provider_account
                )))
            }
            Some(_) => Ok(()),
            None if self.inner.settings.open_registration => Ok(()),
            None => Err(forbidden(format!(
                "node {} is not enrolled: the operator enrols it with `rhizos node enroll {} --provider-account <account>`",
                registration.node_id, registration.node_id
            ))),
        }
    }

    pub(in crate::orchestrator) async fn node_enroll(
        &self,
        request: EnrollNode,
    ) -> Result<Enrolment, WireError> {
        token(validate_token("node id", &request.node_id))?;
        party_account("provider account", &request.provider_account)?;
        if let Some(key) = &request.public_key
            && nkeys::KeyPair::from_public_key(key).is_err()
        {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("public_key {key:?} is not an nkey public key"),
            ));
        }
        let enrolment = self
            .db(move |store| {
                store.enroll(
                    &request.node_id,
                    &request.provider_account,
                    request.public_key.as_deref(),
                )
            })
            .await?;
        tracing::info!(node_id = %enrolment.node_id, provider_account = %enrolment.provider_account, "node enrolled");
        Ok(enrolment)
    }

    pub(in crate::orchestrator) async fn node_remove(
        &self,
        request: RemoveNode,
    ) -> Result<Enrolment, WireError> {
        token(validate_token("node id", &request.node_id))?;
        let node_id = request.node_id.clone();
        let enrolment = self
            .db(move |store| store.remove_enrolment(&node_id))
            .await?;
        tracing::info!(node_id = %request.node_id, "node removed");
        Ok(enrolment)
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

    /// Views of up to `limit` nodes from `start` in node-id order, and whether more follow.
    pub(in crate::orchestrator) async fn node_views(
        &self,
        start: Bound<&str>,
        limit: usize,
    ) -> Result<(Vec<wire::NodeView>, bool), WireError> {
        let (entries, more) = self.registry().page(start, limit);
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok((Vec::new(), false));
        };
        let range = (
            first.registration.node_id.clone(),
            last.registration.node_id.clone(),
        );
        // Off the writer thread: the sweeper recounts allocations every second.
        let stats = self
            .read(move |store| store.node_stats_between(Some((&range.0, &range.1))))
            .await?;
        let views = entries
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
            .collect();
        Ok((views, more))
    }

    pub(in crate::orchestrator) async fn node_list(
        &self,
        request: ListNodes,
    ) -> Result<wire::NodeList, WireError> {
        if let Some(after) = &request.after {
            validate_token("after", after).map_err(|_| {
                WireError::new(
                    ErrorCode::BadRequest,
                    "after: not a cursor node.list returned (pass the previous page's `next`)",
                )
            })?;
        }
        let limit = request.limit.unwrap_or(200).clamp(1, 1000) as usize;
        let start = request
            .after
            .as_deref()
            .map_or(Bound::Unbounded, Bound::Excluded);
        let (nodes, more) = self.node_views(start, limit).await?;
        let next = if more {
            nodes.last().map(|n| n.node_id.clone())
        } else {
            None
        };
        Ok(wire::NodeList { nodes, next })
    }

    pub(in crate::orchestrator) async fn node_info(
        &self,
        request: NodeRef,
    ) -> Result<wire::NodeView, WireError> {
        token(validate_token("node id", &request.node_id))?;
        let (views, _) = self
            .node_views(Bound::Included(&request.node_id), 1)
            .await?;
        views
            .into_iter()
            .find(|n| n.node_id == request.node_id)
            .ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("no node {}", request.node_id))
            })
    }
}
