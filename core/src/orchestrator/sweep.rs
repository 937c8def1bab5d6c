//! Keeping the database and the nodes in agreement: heartbeats (liveness, GPU telemetry, and
//! reconciliation — stop executions that were moved, requeue attempts a node does not run), and
//! the sweeper (lost nodes → requeue, queue and total timeouts, reputation refresh).

use super::Orchestrator;
use super::store;
use rhizos_broker::wire::{self, Heartbeat, JobState, WireError};
use std::time::Duration;

impl Orchestrator {
    pub(in crate::orchestrator) fn handle_heartbeat(&self, payload: &[u8]) {
        self.inner.metrics.heartbeats.inc();
        match wire::decode::<Heartbeat>(payload, self.inner.settings.max_request_bytes) {
            Ok(mut heartbeat) => {
                // No node runs more than its registered concurrency (itself capped): a longer
                // list is a lie that would cost a database look-up per entry.
                let most = self
                    .registry()
                    .get(&heartbeat.node_id)
                    .map_or(0, |node| node.registration.max_concurrent as usize);
                if heartbeat.running.len() > most
                    || heartbeat.gpus.len() > super::validate::limits::MAX_NODE_GPUS
                {
                    tracing::warn!(node_id = %heartbeat.node_id, running = heartbeat.running.len(), gpus = heartbeat.gpus.len(), "heartbeat lists more than the node registered; ignored");
                    return;
                }
                let gpus = std::mem::take(&mut heartbeat.gpus);
                if !self.registry().heartbeat(&heartbeat.node_id, gpus) {
                    tracing::debug!(node_id = %heartbeat.node_id, "heartbeat from an unregistered node");
                    self.ask_to_register_again(heartbeat.node_id);
                    return;
                }
                let Ok(permit) = self.inner.reconciling.clone().try_acquire_owned() else {
                    tracing::debug!(node_id = %heartbeat.node_id, "reconciliations busy; this heartbeat only refreshes liveness");
                    return;
                };
                let this = self.clone();
                tokio::spawn(async move {
                    this.reconcile(heartbeat).await;
                    drop(permit);
                });
            }
            Err(e) => tracing::warn!(error = %e, "malformed heartbeat ignored"),
        }
    }

    /// Compares a heartbeat with the database: executions the node runs that were moved are
    /// stopped; attempts the node should run but does not list (an assignment lost in a crash
    /// between commit and send) are requeued.
    pub(in crate::orchestrator) async fn reconcile(&self, heartbeat: Heartbeat) {
        if !heartbeat.running.is_empty() {
            self.stop_moved_executions(&heartbeat.node_id, &heartbeat.running)
                .await;
        }
        let (interval_ms, committed) = match self.registry().get(&heartbeat.node_id) {
            Some(node) => (node.registration.heartbeat_interval_ms, node.allocated.jobs),
            None => return,
        };
        if committed == 0 && heartbeat.running.is_empty() {
            // Nothing assigned there (the registry counts every assignment as it is recorded
            // and only forgets one at the next dispatch pass's recount) and nothing running.
            return;
        }
        let grace_ms = self.inner.settings.assign_timeout_ms + 2 * interval_ms;
        let (node_id, running) = (heartbeat.node_id.clone(), heartbeat.running);
        let missing = match self
            .db(move |store| store.unreported_on_node(&node_id, &running, grace_ms))
            .await
        {
            Ok(missing) => missing,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reconcile a heartbeat");
                return;
            }
        };
        for (job_id, attempt) in missing {
            let reason = format!("node {} does not run attempt {attempt}", heartbeat.node_id);
            if let Err(e) = self.requeue_or_fail(job_id, attempt, reason).await {
                tracing::warn!(error = %e, "cannot requeue");
            }
        }
    }

    /// Tells `node_id` to stop executions it runs that are no longer the job's current attempt
    /// there (the job was requeued elsewhere after the node was thought lost, or ended).
    pub(in crate::orchestrator) async fn stop_moved_executions(
        &self,
        node_id: &str,
        running: &[wire::ExecutionRef],
    ) {
        for execution in running {
            let job_id = execution.job_id.clone();
            let current = match self.db(move |store| store.current_execution(&job_id)).await {
                Ok(current) => current,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check an execution");
                    continue;
                }
            };
            if current
                .as_ref()
                .is_some_and(|(node, attempt)| node == node_id && *attempt == execution.attempt)
            {
                continue;
            }
            tracing::info!(job_id = %execution.job_id, attempt = execution.attempt, %node_id, "stopping an execution that was moved or ended");
            self.send_stop(node_id, &execution.job_id, execution.attempt)
                .await;
        }
    }

    pub(in crate::orchestrator) async fn requeue_or_fail(
        &self,
        job_id: String,
        attempt: u32,
        reason: String,
    ) -> Result<(), WireError> {
        let id = job_id.clone();
        let outcome = self
            .db(move |store| store.requeue_or_fail(&id, attempt, &reason))
            .await?;
        if let Some(state) = outcome {
            tracing::warn!(%job_id, attempt, state = state.as_str(), "attempt lost");
        }
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        Ok(())
    }

    pub(in crate::orchestrator) async fn sweep_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = self.sweep().await {
                tracing::error!(error = %e, "sweep failed");
            }
        }
    }

    /// Ends jobs on lost nodes and jobs that waited too long for one (both refunded), stops
    /// jobs at their total timeout, and ends running jobs their node did not end in time.
    pub(in crate::orchestrator) async fn sweep(&self) -> Result<(), WireError> {
        let stats = self.recount_and_stats().await?;
        let reputations = stats
            .into_iter()
            .map(|(node, (_, _, reputation))| (node, reputation))
            .collect();
        self.registry().set_reputations(&reputations);
        // While the orchestrator's own connection is down no heartbeat can reach it: loss
        // detection pauses, and on reconnect every node gets a whole window to be heard again
        // (a 15 s outage must not requeue the whole network).
        let connected =
            self.inner.bus.client.connection_state() == async_nats::connection::State::Connected;
        let was_down = self
            .inner
            .bus_down
            .swap(!connected, std::sync::atomic::Ordering::Relaxed);
        let lost = if !connected {
            if !was_down {
                tracing::warn!("bus connection lost; node-loss detection paused until it is back");
            }
            Vec::new()
        } else if was_down {
            tracing::info!("bus connection back; every node gets a full heartbeat window");
            self.registry().forgive_silence();
            Vec::new()
        } else {
            self.registry()
                .take_newly_lost(self.inner.settings.missed_heartbeats)
        };
        self.forget_long_lost_nodes().await?;
        for node_id in lost {
            tracing::warn!(%node_id, "node lost: no heartbeat");
            let node = node_id.clone();
            let active = self.db(move |store| store.active_on_node(&node)).await?;
            for (job_id, attempt) in active {
                let reason = format!("node {node_id} was lost (missed heartbeats)");
                self.requeue_or_fail(job_id, attempt, reason).await?;
            }
        }
        let default_queue_timeout_ms = self.inner.settings.queue_timeout_ms;
        let now = store::now_ms();
        let expired = self
            .db(move |store| store.queue_expired(now, default_queue_timeout_ms))
            .await?;
        for (job_id, queue_timeout_ms) in expired {
            let reason =
                format!("no node took the job within its queue timeout of {queue_timeout_ms} ms");
            self.db(move |store| store.end_with_refund(&job_id, JobState::TimedOut, &reason))
                .await?;
        }
        for job_id in self.db(move |store| store.overdue(now)).await? {
            let id = job_id.clone();
            if let Some((node_id, attempt)) = self.db(move |store| store.time_out(&id)).await? {
                tracing::info!(%job_id, %node_id, "total timeout passed; stopping the job");
                let this = self.clone();
                tokio::spawn(async move { this.send_stop(&node_id, &job_id, attempt).await });
            }
        }
        // Deadlines are the orchestrator's own: a node that neither ends a job in time nor
        // reports cannot keep it running (and its escrow held).
        for job_id in self.db(move |store| store.overrun(now)).await? {
            let id = job_id.clone();
            if let Some((node_id, attempt)) =
                self.db(move |store| store.end_at_deadline(&id)).await?
            {
                tracing::warn!(%job_id, %node_id, attempt, "job ran past its timeout; ended it and stopping it on its node");
                let this = self.clone();
                tokio::spawn(async move { this.send_stop(&node_id, &job_id, attempt).await });
                self.inner.dispatch_wake.notify_one();
            }
        }
        self.inner.outbox_wake.notify_one();
        Ok(())
    }
}

/// Most jobs one retention batch prunes, and most payload bytes it drops (what the replicated
/// ledger's record of the batch carries).
const PRUNE_JOBS: u32 = 200;
const PRUNE_BYTES: u64 = 4 * 1024 * 1024;

impl Orchestrator {
    /// While active: every minute (sooner under a short retention), drops the payloads of jobs closed longer ago than
    /// `[orchestrator] job_payload_max_age_s` (see `store::retention`), in small batches with
    /// a pause between them so a backlog (retention just turned on) does not crowd out the
    /// ledger thread.
    pub(in crate::orchestrator) async fn retention_loop(self) {
        let max_age_ms = self
            .inner
            .settings
            .job_payload_max_age_s
            .saturating_mul(1_000);
        if max_age_ms == 0 {
            return std::future::pending().await;
        }
        // With nothing to prune it looks again every minute — or sooner under a shorter
        // retention, so no payload outlives it by much.
        let idle = Duration::from_millis(max_age_ms / 2)
            .clamp(Duration::from_millis(200), Duration::from_secs(60));
        let mut pause = Duration::from_secs(1);
        // Jobs pruned since the last time there was nothing to prune (logged once caught up).
        let mut run = 0;
        loop {
            tokio::time::sleep(pause).await;
            let now = crate::now_ms();
            let before = now.saturating_sub(max_age_ms);
            match self
                .db(move |store| store.prune_job_payloads(before, PRUNE_JOBS, PRUNE_BYTES, now))
                .await
            {
                Ok(0) => {
                    if run > 0 {
                        tracing::info!(
                            pruned = run,
                            max_age_s = self.inner.settings.job_payload_max_age_s,
                            "ended jobs' payloads dropped (their money, state and receipt digests kept)"
                        );
                    }
                    run = 0;
                    pause = idle;
                }
                Ok(pruned) => {
                    self.inner.metrics.jobs_pruned.inc_by(pruned as u64);
                    tracing::debug!(pruned, "a batch of ended jobs' payloads dropped");
                    run += pruned;
                    pause = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::warn!(error = %e.message, "pruning ended jobs' payloads failed; trying again");
                    pause = idle;
                }
            }
        }
    }
}

/// How often one node heard from without a registration is asked to register again, and how
/// many such nodes are remembered at once (heartbeats name their node themselves: a flood of
/// made-up ids must not grow this without bound).
const REREGISTER_EVERY: Duration = Duration::from_secs(30);
const REREGISTER_REMEMBERED: usize = 10_000;

/// Most lost nodes forgotten in one sweep.
const FORGET_PER_SWEEP: usize = 1_000;

impl Orchestrator {
    /// Heartbeats arrive from `node_id`, but no registration of it is held (it was forgotten
    /// after `lost_node_max_age_s`, or the ledger is older than its registration): its agent
    /// is asked to register again — once per node every 30 s.
    fn ask_to_register_again(&self, node_id: String) {
        if rhizos_broker::validate_token("node id", &node_id).is_err() {
            return;
        }
        {
            let mut asked = self
                .inner
                .reregister_asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = std::time::Instant::now();
            if asked
                .get(&node_id)
                .is_some_and(|at| now.duration_since(*at) < REREGISTER_EVERY)
            {
                return;
            }
            if asked.len() >= REREGISTER_REMEMBERED {
                asked.retain(|_, at| now.duration_since(*at) < REREGISTER_EVERY);
                if asked.len() >= REREGISTER_REMEMBERED {
                    return;
                }
            }
            asked.insert(node_id.clone(), now);
        }
        let bus = self.inner.bus.clone();
        tokio::spawn(async move {
            let ask = wire::RegisterAgain {
                v: wire::WIRE_VERSION,
            };
            match bus.call_node(&node_id, &ask).await {
                Ok(_) => {
                    tracing::info!(%node_id, "heartbeats from a node with no registration here: its agent was asked to register again")
                }
                Err(e) => {
                    tracing::debug!(%node_id, error = %e, "a node with no registration did not take the ask to register again")
                }
            }
        });
    }

    /// Forgets nodes lost for longer than `lost_node_max_age_s` (their registration; their
    /// attempts, reputation and enrolment stay).
    async fn forget_long_lost_nodes(&self) -> Result<(), WireError> {
        let max_age_s = self.inner.settings.lost_node_max_age_s;
        if max_age_s == 0 {
            return Ok(());
        }
        let candidates = self
            .registry()
            .lost_longer_than(Duration::from_secs(max_age_s), FORGET_PER_SWEEP);
        if candidates.is_empty() {
            return Ok(());
        }
        let registered_before = store::now_ms().saturating_sub(max_age_s.saturating_mul(1_000));
        let forgotten = self
            .db(move |store| store.forget_nodes(&candidates, registered_before))
            .await?;
        let count = self.registry().forget(&forgotten);
        self.inner.metrics.nodes_forgotten.inc_by(count as u64);
        if count > 0 {
            tracing::info!(
                count,
                first = forgotten.first().map(String::as_str).unwrap_or_default(),
                max_age_s,
                "lost nodes forgotten (their attempts, reputation and enrolment kept; one heard from again is asked to register)"
            );
        }
        Ok(())
    }
}
