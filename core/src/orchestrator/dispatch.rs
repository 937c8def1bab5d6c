//! Placement: choosing a node for pending jobs (at submit when nobody is queued ahead, else in
//! dispatch passes — one ledger operation per pass, so the registry's view and the assignments
//! it records agree), sending `job.assign` / `job.stop`, and putting a job back to pending when
//! its node does not take it.

use super::Orchestrator;
use super::matching;
use super::store::{Store, StoreError};
use rhizos_broker::wire::{Ack, AssignJob, JobSpec, StopJob, WIRE_VERSION, WireError};
use std::time::Duration;

/// Most pending jobs matched in one dispatch pass.
const DISPATCH_BATCH: usize = 256;

impl Orchestrator {
    /// On the ledger thread: chooses a node for a pending job and records the assignment;
    /// returns the node and attempt to send, or `None` when no node has room now (or the job
    /// is no longer pending).
    pub(in crate::orchestrator) fn place(
        &self,
        store: &mut Store,
        job_id: &str,
        spec: &JobSpec,
        max_cost_micros: i64,
        requeued: bool,
    ) -> Option<(String, u32, Option<u64>)> {
        // A requeued job goes to another node than the ones it failed on, if one can take it
        // (a job never assigned has tried none: no lookup on the submit path).
        let tried = if requeued {
            store.tried_nodes(job_id).unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut registry = self.registry();
        let node = registry.pick_avoiding(spec, max_cost_micros, &tried)?;
        let (node_id, pricing) = (
            node.registration.node_id.clone(),
            matching::agreed_pricing(spec, &node.registration),
        );
        let fuel_limit = matching::fuel_budget(spec, max_cost_micros, &node.registration);
        // The assignment has its own savepoint: failing leaves the rest of the batch.
        match store.assign(job_id, &node_id, &pricing, fuel_limit) {
            Ok(Some(attempt)) => {
                registry.allocate(&node_id, spec);
                Some((node_id, attempt, fuel_limit))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(%job_id, error = %e, "cannot record the assignment");
                None
            }
        }
    }

    pub(in crate::orchestrator) async fn dispatch_loop(self) {
        loop {
            tokio::select! {
                () = self.inner.dispatch_wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Err(e) = self.dispatch_pending().await {
                tracing::error!(error = %e, "dispatch failed");
            }
        }
    }

    /// Matches pending jobs to nodes and sends the assignments. A pass is one operation on the
    /// ledger thread: read the oldest pending jobs and what every node has committed, choose a
    /// node for each, record the assignments — all against one consistent view, in one commit.
    pub(in crate::orchestrator) async fn dispatch_pending(&self) -> Result<(), WireError> {
        let this = self.clone();
        let chosen = self
            .db(move |store| {
                let pending = store.pending_jobs(DISPATCH_BATCH)?;
                if pending.is_empty() {
                    return Ok::<_, StoreError>(Vec::new());
                }
                let allocations = store.active_per_node()?;
                this.registry().set_allocations(&allocations);
                let mut chosen = Vec::new();
                for job in pending {
                    if let Some((node_id, attempt, fuel_limit)) = this.place(
                        store,
                        &job.job_id,
                        &job.spec,
                        job.max_cost_micros,
                        job.attempt > 0,
                    ) {
                        store.forget_spec(&job.job_id);
                        chosen.push((job, node_id, attempt, fuel_limit));
                    }
                }
                Ok(chosen)
            })
            .await?;
        if chosen.is_empty() {
            return Ok(());
        }
        self.inner.outbox_wake.notify_one();
        for (job, node_id, attempt, fuel_limit) in chosen {
            let this = self.clone();
            tokio::spawn(async move {
                let mut spec = std::sync::Arc::unwrap_or_clone(job.spec);
                spec.fuel_limit = fuel_limit;
                this.send_assignment(job.job_id, job.account, attempt, spec, node_id)
                    .await
            });
        }
        Ok(())
    }

    /// Files each of the job's input blobs (a flow step's upstream output) under the node
    /// that will run it, when another node stored it: a node reads blobs only under its own
    /// node token. A copy that fails is logged; the node then fails to read the input and
    /// hands the attempt back.
    async fn hand_over_inputs(&self, job_id: &str, account: &str, spec: &JobSpec, node_id: &str) {
        let bus = &self.inner.bus;
        for (path, input) in &spec.input_blobs {
            if input.from_node == node_id {
                continue;
            }
            let blob = rhizos_broker::wire::BlobRef {
                sha256: input.sha256.clone(),
                size: input.size,
            };
            let what = format!("job {job_id}'s input {path}");
            let started = std::time::Instant::now();
            match bus
                .copy_blob(account, &input.from_node, node_id, &what, &blob)
                .await
            {
                Ok(()) => {
                    tracing::info!(job_id, path, from = %input.from_node, to = node_id, bytes = input.size, ms = started.elapsed().as_millis() as u64, "input blob handed over")
                }
                Err(e) => {
                    tracing::warn!(job_id, path, error = %e, "an input blob could not be handed over; the node will not find it")
                }
            }
        }
    }

    pub(in crate::orchestrator) async fn send_assignment(
        &self,
        job_id: String,
        account: String,
        attempt: u32,
        spec: JobSpec,
        node_id: String,
    ) {
        self.hand_over_inputs(&job_id, &account, &spec, &node_id)
            .await;
        let assign = AssignJob {
            v: WIRE_VERSION,
            job_id: job_id.clone(),
            account,
            attempt,
            spec,
        };
        let timeout = Duration::from_millis(self.inner.settings.assign_timeout_ms);
        let result =
            tokio::time::timeout(timeout, self.inner.bus.call_node(&node_id, &assign)).await;
        let refused = match result {
            Ok(Ok(Ack { accepted: true, .. })) => {
                tracing::debug!(%job_id, %node_id, attempt, "assignment acknowledged");
                self.registry().accepted(&node_id);
                return;
            }
            Ok(Ok(Ack { note, .. })) => format!(
                "node {node_id} refused the job: {}",
                note.unwrap_or_default()
            ),
            Ok(Err(e)) => format!("node {node_id} did not take the job: {e}"),
            Err(_) => format!(
                "node {node_id} did not acknowledge within {} ms",
                timeout.as_millis()
            ),
        };
        tracing::warn!(%job_id, attempt, "{refused}; back to pending");
        {
            let mut registry = self.registry();
            registry.release(&node_id, &assign.spec);
            registry.refused(&node_id);
        }
        let (id, node) = (job_id.clone(), node_id.clone());
        if let Err(e) = self
            .db(move |store| store.unassign(&id, &node, attempt, &refused))
            .await
        {
            tracing::error!(%job_id, error = %e, "failed to return job to pending");
        }
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
    }

    /// Asks `node_id` to stop an attempt (best effort: a node that is gone is found by the
    /// sweeper, and its attempts requeued or ended). An execution still starting answers
    /// "retry": asked again, with backoff, for up to [`STOP_RETRY_FOR`].
    pub(in crate::orchestrator) async fn send_stop(
        &self,
        node_id: &str,
        job_id: &str,
        attempt: u32,
    ) {
        let stop = StopJob {
            v: WIRE_VERSION,
            job_id: job_id.to_owned(),
            attempt,
        };
        let until = tokio::time::Instant::now() + STOP_RETRY_FOR;
        let mut delay = Duration::from_millis(50);
        loop {
            match self.inner.bus.call_node(node_id, &stop).await {
                Ok(Ack { accepted: true, .. }) => return,
                Ok(Ack { note, .. }) if tokio::time::Instant::now() + delay < until => {
                    tracing::debug!(%job_id, %node_id, note = ?note, "stop not taken yet; asking again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Ok(Ack { note, .. }) => {
                    tracing::warn!(%job_id, %node_id, note = ?note, "node did not take the stop; its heartbeats will show the execution");
                    return;
                }
                Err(e) => {
                    tracing::warn!(%job_id, %node_id, error = %e, "node did not confirm the stop");
                    return;
                }
            }
        }
    }
}

/// How long a stop answered with "retry" (the execution still starting) is asked again.
const STOP_RETRY_FOR: Duration = Duration::from_secs(30);
