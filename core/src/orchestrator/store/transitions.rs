//! How a job moves through its states after submit, each move one transaction with its money
//! and its events: assigned (a new attempt on a node, at its prices), back to pending (the node
//! did not take it, or was lost while retries remain), running, and ended — finished on its node
//! (settled or refunded as [`ending::finished`] decides), or ended without it (cancel, queue or
//! total timeout, lost with no retries left: refunded).

use super::ending::{
    self, AttemptOutcome, FREE_HAND_BACKS, LostAttempt, StopReason, StopRequest, Usage,
    UsageBounds, Verdict,
};
use super::nodes::record_attempt;
use super::rows::truncate_tail;
use super::{CancelEffect, ReportEffect, SignedReport, Store, StoreError};
use crate::ledger::{self, exec, query_row};
use crate::now_ms;
use rhizos_broker::config::FailedWorkloadCharge;
use rhizos_broker::wire::{ExecutionOutcome, JobSpec, JobState, Pricing};
use rusqlite::{Connection, OptionalExtension, params};

impl Store {
    /// pending → assigned to `node_id` with a new attempt number, at the node's `pricing`.
    /// Returns the attempt, or `None` if the job is no longer pending.
    /// `fuel_limit` is the limit sent with the assignment (billed fuel never exceeds it).
    pub fn assign(
        &mut self,
        job_id: &str,
        node_id: &str,
        pricing: &Pricing,
        fuel_limit: Option<u64>,
    ) -> Result<Option<u32>, StoreError> {
        let now = now_ms();
        let pricing = serde_json::to_string(pricing)?;
        let (tx, ctx) = self.begin_lean()?;
        let attempt: Option<u32> = query_row(
            &tx,
            "UPDATE jobs SET state = 'assigned', attempt = attempt + 1, node_id = ?2, pricing = ?3, updated_ms = ?4,
                 assigned_ms = ?4, fuel_limit = ?5,
                 provider_account = (SELECT json_extract(registration, '$.provider_account') FROM nodes WHERE id = ?2)
             WHERE id = ?1 AND state = 'pending' RETURNING attempt",
            params![job_id, node_id, pricing, now as i64, fuel_limit.map(|f| i64::try_from(f).unwrap_or(i64::MAX))],
            |r| r.get(0),
        )
        .optional()
        ?;
        let Some(attempt) = attempt else {
            return Ok(None);
        };
        ctx.emit_job(
            &tx,
            job_id,
            JobState::Assigned,
            attempt,
            Some(node_id),
            None,
            now,
        )?;
        tx.commit()?;
        Ok(Some(attempt))
    }

    /// assigned → pending again, when the node did not take the assignment.
    pub fn unassign(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let changed = exec(
            &tx,
            "UPDATE jobs SET state = 'pending', node_id = NULL, pricing = NULL, provider_account = NULL, updated_ms = ?3
                 WHERE id = ?1 AND attempt = ?2 AND state = 'assigned'",
            params![job_id, attempt, now as i64],
        )?;
        if changed == 1 {
            record_attempt(
                &tx,
                job_id,
                attempt,
                node_id,
                AttemptOutcome::NodeFailed,
                now,
            )?;
            ctx.emit_job(
                &tx,
                job_id,
                JobState::Pending,
                attempt,
                None,
                Some(reason),
                now,
            )?;
        }
        tx.commit().map_err(StoreError::from)
    }

    /// Loads `(state, node_id, attempt)` of a job for report checks.
    fn attempt_of(
        tx: &Connection,
        job_id: &str,
    ) -> Result<Option<(JobState, Option<String>, u32)>, StoreError> {
        query_row(
            tx,
            "SELECT state, node_id, attempt FROM jobs WHERE id = ?1",
            [job_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, u32>(2)?,
                ))
            },
        )
        .optional()?
        .map(|(state, node, attempt)| {
            JobState::parse(&state)
                .map(|s| (s, node, attempt))
                .ok_or_else(|| StoreError::Corrupt(format!("bad state {state}")))
        })
        .transpose()
    }

    fn check_attempt(
        tx: &Connection,
        job_id: &str,
        node_id: &str,
        attempt: u32,
    ) -> Result<Result<JobState, ReportEffect>, StoreError> {
        let Some((state, node, current)) = Self::attempt_of(tx, job_id)? else {
            return Err(StoreError::NotFound(format!("no job {job_id}")));
        };
        if current != attempt || node.as_deref() != Some(node_id) {
            return Ok(Err(ReportEffect::Stale(format!(
                "job {job_id} attempt {attempt} on {node_id} is not current (attempt {current} on {})",
                node.as_deref().unwrap_or("no node")
            ))));
        }
        Ok(Ok(state))
    }

    /// assigned → running.
    pub fn mark_running(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
    ) -> Result<ReportEffect, StoreError> {
        self.mark_running_timed(job_id, node_id, attempt)
            .map(|(effect, _)| effect)
    }

    /// [`Store::mark_running`], with the time since the job was submitted when it applied.
    pub fn mark_running_timed(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
    ) -> Result<(ReportEffect, Option<u64>), StoreError> {
        let now = now_ms();
        let (tx, ctx) = self.begin_lean()?;
        let state = match Self::check_attempt(&tx, job_id, node_id, attempt)? {
            Ok(state) => state,
            Err(effect) => return Ok((effect, None)),
        };
        if state != JobState::Assigned {
            return Ok((ReportEffect::Duplicate, None));
        }
        // Through the statement cache: this runs on the ledger thread once per job.
        let created_ms: i64 = query_row(
            &tx,
            "UPDATE jobs SET state = 'running', updated_ms = ?2, started_ms = ?2 WHERE id = ?1
             RETURNING created_ms",
            params![job_id, now as i64],
            |r| r.get(0),
        )?;
        ctx.emit_job(
            &tx,
            job_id,
            JobState::Running,
            attempt,
            Some(node_id),
            None,
            now,
        )?;
        tx.commit()?;
        Ok((
            ReportEffect::Applied,
            Some(now.saturating_sub(created_ms.max(0) as u64)),
        ))
    }

    /// Records the end of the current attempt and settles or refunds its escrow, exactly once.
    pub fn finish(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        outcome: &ExecutionOutcome,
        max_output_bytes: usize,
    ) -> Result<ReportEffect, StoreError> {
        self.finish_signed(job_id, node_id, attempt, outcome, max_output_bytes, None)
    }

    /// [`Store::finish`], keeping the node's signed report with the job (receipts carry it).
    pub fn finish_signed(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        outcome: &ExecutionOutcome,
        max_output_bytes: usize,
        signed: Option<&SignedReport>,
    ) -> Result<ReportEffect, StoreError> {
        let now = now_ms();
        let (tx, ctx) = self.begin_lean()?;
        let state = match Self::check_attempt(&tx, job_id, node_id, attempt)? {
            Ok(state) => state,
            Err(effect) => return Ok(effect),
        };
        if state.is_terminal() {
            return Ok(ReportEffect::Duplicate);
        }
        let (billing, stop) = billing_of(&tx, job_id)?;
        let verdict = ending::after_delivery(
            ending::finished(
                outcome.kind,
                outcome.exit_code,
                outcome.message.as_deref(),
                stop,
                ctx.charging.failed_workload,
            ),
            billing.witness.map_or(0, |w| w.output_units),
        );
        let ending = match verdict {
            Verdict::End(ending) => ending,
            Verdict::NodeFault { reason } => {
                let reason = format!("{reason} (node {node_id})");
                lose_attempt(
                    &tx,
                    ctx,
                    job_id,
                    attempt,
                    Some(node_id),
                    &reason,
                    AttemptOutcome::NodeFailed,
                    now,
                )?;
                tx.commit()?;
                return Ok(ReportEffect::Applied);
            }
        };
        let (final_state, reason) = (ending.state, ending.reason);
        let reported = Usage {
            elapsed_ms: outcome.elapsed_ms,
            fuel: outcome.fuel_consumed,
            units: None,
        };
        let billed = ending
            .charge
            .then(|| billing.billed(reported, now, ctx.charging.slack_ms));
        // A metered (AI) job: billed by units, bounded by its hold and the gateway's witness.
        let units = billing
            .max_units
            .map(|max| ending::billed_units(outcome.usage, max, billing.witness));
        let billed_units = if ending.charge { units } else { None };
        let stdout = truncate_tail(&outcome.stdout, max_output_bytes);
        let stderr = truncate_tail(&outcome.stderr, max_output_bytes);
        exec(&tx,
            "UPDATE jobs SET state = ?2, exit_code = ?3, stdout = ?4, stderr = ?5, reason = ?6, elapsed_ms = ?7,
             updated_ms = ?8, fuel_consumed = ?9, output_files = ?10, node_report = ?11,
             billed_elapsed_ms = ?12, billed_fuel = ?13, output_blobs = ?14,
             reported_input_units = ?15, reported_output_units = ?16,
             billed_input_units = ?17, billed_output_units = ?18 WHERE id = ?1",
            params![
                job_id,
                final_state.as_str(),
                outcome.exit_code,
                stdout,
                stderr,
                reason,
                i64::try_from(outcome.elapsed_ms).unwrap_or(i64::MAX),
                now as i64,
                outcome.fuel_consumed.map(|f| i64::try_from(f).unwrap_or(i64::MAX)),
                (!outcome.output_files.is_empty())
                    .then(|| serde_json::to_string(&outcome.output_files).unwrap_or_default()),
                signed.map(|s| serde_json::to_string(s).unwrap_or_default()),
                billed.map(|b| b.elapsed_ms as i64),
                billed.and_then(|b| b.fuel).map(|f| f as i64),
                (!outcome.blobs.is_empty())
                    .then(|| serde_json::to_string(&outcome.blobs).unwrap_or_default()),
                outcome.usage.map(|u| i64::try_from(u.input_units).unwrap_or(i64::MAX)),
                outcome.usage.map(|u| i64::try_from(u.output_units).unwrap_or(i64::MAX)),
                billed_units.map(|u| u.input_units as i64),
                billed_units.map(|u| u.output_units as i64),
            ],
        )
        ?;
        ctx.emit_job(
            &tx,
            job_id,
            final_state,
            attempt,
            Some(node_id),
            reason.as_deref(),
            now,
        )?;
        // A node claiming more than the network measured is paid the measure and marked down.
        let attempt_outcome = match billed_units {
            Some(units) if ending::overclaimed(outcome.usage, units) => {
                tracing::warn!(%job_id, %node_id, reported = ?outcome.usage, billed = ?units, "the node claimed more units than the gateway delivered");
                AttemptOutcome::Overbilled
            }
            _ => ending.attempt,
        };
        record_attempt(&tx, job_id, attempt, node_id, attempt_outcome, now)?;
        let billed = billed.map(|usage| Usage {
            units: billed_units,
            ..usage
        });
        close(&tx, ctx, job_id, &billing, billed, now)?;
        tx.commit()?;
        Ok(ReportEffect::Applied)
    }

    /// Records the gateway's witness of what it delivered of attempt `attempt` of a metered job
    /// on `node_id` (the first witness of an attempt stands). `Ok(false)`: the job is not
    /// metered, or the attempt is not its current one on that node, or it has ended.
    pub fn witness(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        witnessed: ending::Witnessed,
    ) -> Result<bool, StoreError> {
        let (tx, _ctx) = self.begin()?;
        let changed = exec(
            &tx,
            "UPDATE jobs SET witness_attempt = ?3, witness_input_units = ?4, witness_output_units = ?5
             WHERE id = ?1 AND node_id = ?2 AND attempt = ?3 AND max_input_units IS NOT NULL
               AND state IN ('assigned', 'running')
               AND (witness_attempt IS NULL OR witness_attempt <> ?3)",
            params![
                job_id,
                node_id,
                attempt,
                witnessed.input_units.map(|u| i64::try_from(u).unwrap_or(i64::MAX)),
                i64::try_from(witnessed.output_units).unwrap_or(i64::MAX),
            ],
        )?;
        tx.commit()?;
        Ok(changed > 0)
    }

    /// The agent is shutting down and gave attempt `attempt` back unfinished: back to pending
    /// with the hold intact and no retry spent (up to [`FREE_HAND_BACKS`] times per job; past
    /// that, or when the job was being stopped, like a lost attempt). Stale reports change
    /// nothing.
    pub fn hand_back(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<ReportEffect, StoreError> {
        self.spec_cache.remove(job_id);
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let state = match Self::check_attempt(&tx, job_id, node_id, attempt)? {
            Ok(state) => state,
            Err(effect) => return Ok(effect),
        };
        if !matches!(state, JobState::Assigned | JobState::Running) {
            return Ok(ReportEffect::Duplicate);
        }
        let reason = format!("node {node_id} handed it back: {reason}");
        let (_, stop) = stop_request_of(&tx, job_id)?;
        if !stop.cancel_requested && hand_backs_before(&tx, job_id, attempt)? < FREE_HAND_BACKS {
            record_attempt(
                &tx,
                job_id,
                attempt,
                node_id,
                AttemptOutcome::HandedBack,
                now,
            )?;
            let reason = format!("{reason}; requeued");
            back_to_pending(&tx, ctx, job_id, attempt, &reason, now)?;
        } else {
            lose_attempt(
                &tx,
                ctx,
                job_id,
                attempt,
                Some(node_id),
                &reason,
                AttemptOutcome::HandedBack,
                now,
            )?;
        }
        tx.commit()?;
        Ok(ReportEffect::Applied)
    }

    /// Running jobs whose node should have ended them by now: started more than `timeout_ms` +
    /// the slack ago (on the orchestrator's clock).
    pub fn overrun(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let slack = i64::try_from(self.ctx.charging.slack_ms).unwrap_or(i64::MAX);
        let mut statement = self.conn.prepare_cached(
            "SELECT id FROM jobs WHERE state = 'running' AND started_ms IS NOT NULL AND timeout_ms IS NOT NULL
               AND started_ms + timeout_ms + ?2 < ?1",
        )?;
        let rows = statement.query_map(params![now_ms as i64, slack], |r| r.get(0))?;
        rows.collect::<Result<Vec<String>, _>>()
            .map_err(StoreError::from)
    }

    /// Ends a running job its node did not end in time (see [`Store::overrun`]) as `timed_out`,
    /// charged for its whole `timeout_ms` under the failed-workload policy (its own deadline),
    /// whatever the node still reports or lists. Returns the node and attempt to stop, or
    /// `None` if the job is not running any more.
    pub fn end_at_deadline(&mut self, job_id: &str) -> Result<Option<(String, u32)>, StoreError> {
        self.spec_cache.remove(job_id);
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let Some((state, node, attempt)) = Self::attempt_of(&tx, job_id)? else {
            return Err(StoreError::NotFound(format!("no job {job_id}")));
        };
        let Some(node) = node.filter(|_| state == JobState::Running) else {
            return Ok(None);
        };
        let (billing, _) = billing_of(&tx, job_id)?;
        let reason = format!(
            "still running {} ms past its timeout of {} ms: stopped by the orchestrator",
            ctx.charging.slack_ms, billing.timeout_ms
        );
        let billed = (ctx.charging.failed_workload == FailedWorkloadCharge::TimeUsed).then(|| {
            let full = Usage {
                elapsed_ms: billing.timeout_ms,
                fuel: None,
                units: None,
            };
            billing.billed(full, now, ctx.charging.slack_ms)
        });
        exec(
            &tx,
            "UPDATE jobs SET state = ?2, reason = ?3, updated_ms = ?4, billed_elapsed_ms = ?5 WHERE id = ?1",
            params![
                job_id,
                JobState::TimedOut.as_str(),
                reason,
                now as i64,
                billed.map(|b| b.elapsed_ms as i64)
            ],
        )?;
        ctx.emit_job(
            &tx,
            job_id,
            JobState::TimedOut,
            attempt,
            Some(&node),
            Some(&reason),
            now,
        )?;
        record_attempt(&tx, job_id, attempt, &node, AttemptOutcome::JobFailed, now)?;
        close(&tx, ctx, job_id, &billing, billed, now)?;
        tx.commit()?;
        Ok(Some((node, attempt)))
    }

    /// Ends a job that is not running anywhere any more (queue timeout, lost node, cancel before
    /// start) with a full refund.
    pub fn end_with_refund(
        &mut self,
        job_id: &str,
        state: JobState,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.spec_cache.remove(job_id);
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let Some((current, node, attempt)) = Self::attempt_of(&tx, job_id)? else {
            return Err(StoreError::NotFound(format!("no job {job_id}")));
        };
        if current.is_terminal() {
            return Ok(false);
        }
        end_refunded(
            &tx,
            ctx,
            job_id,
            state,
            attempt,
            node.as_deref(),
            reason,
            now,
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// The node lost (or restarted without) attempt `attempt`: back to pending for another node,
    /// with the escrow hold intact, while retries remain; otherwise failed and refunded.
    /// Returns `None` if that attempt is no longer the job's current one.
    pub fn requeue_or_fail(
        &mut self,
        job_id: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<Option<JobState>, StoreError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let Some((state, node, current)) = Self::attempt_of(&tx, job_id)? else {
            return Err(StoreError::NotFound(format!("no job {job_id}")));
        };
        if current != attempt || !matches!(state, JobState::Assigned | JobState::Running) {
            return Ok(None);
        }
        let state = lose_attempt(
            &tx,
            ctx,
            job_id,
            attempt,
            node.as_deref(),
            reason,
            AttemptOutcome::NodeFailed,
            now,
        )?;
        tx.commit()?;
        Ok(Some(state))
    }

    /// The total timeout passed: a job that never started ends `timed_out` with a full refund;
    /// a running one is flagged and its node must be told to stop it (returned), after which
    /// it ends `timed_out`, paying the time used.
    pub fn time_out(&mut self, job_id: &str) -> Result<Option<(String, u32)>, StoreError> {
        let job = self.get_job(job_id)?;
        let reason = "the job's total timeout passed";
        match job.state {
            JobState::Pending | JobState::Assigned => {
                self.end_with_refund(job_id, JobState::TimedOut, reason)?;
                Ok(job.node_id.map(|node| (node, job.attempt)))
            }
            JobState::Running => {
                exec(
                    &self.conn,
                    "UPDATE jobs SET cancel_requested = 1, stop_reason = ?3, updated_ms = ?2
                         WHERE id = ?1",
                    params![job_id, now_ms() as i64, StopReason::TotalTimeout.as_str()],
                )?;
                Ok(job.node_id.map(|node| (node, job.attempt)))
            }
            _ => Ok(None),
        }
    }

    /// Cancel: before start → cancelled with a full refund; while running → flagged, and the node
    /// is asked to stop (the job ends when the node reports).
    pub fn cancel(&mut self, job_id: &str) -> Result<CancelEffect, StoreError> {
        self.spec_cache.remove(job_id);
        let job = self.get_job(job_id)?;
        match job.state {
            JobState::Pending | JobState::Assigned => {
                let stop = job.node_id.clone().map(|node| (node, job.attempt));
                self.end_with_refund(
                    job_id,
                    JobState::Cancelled,
                    "cancelled by the user before it started",
                )?;
                Ok(CancelEffect {
                    job: self.get_job(job_id)?,
                    stop,
                })
            }
            JobState::Running => {
                exec(
                    &self.conn,
                    "UPDATE jobs SET cancel_requested = 1, stop_reason = ?3, updated_ms = ?2 WHERE id = ?1",
                    params![job_id, now_ms() as i64, StopReason::User.as_str()],
                )?;
                let stop = job.node_id.clone().map(|node| (node, job.attempt));
                Ok(CancelEffect {
                    job: self.get_job(job_id)?,
                    stop,
                })
            }
            terminal => Err(StoreError::InvalidState(format!(
                "job {job_id} already ended ({})",
                terminal.as_str()
            ))),
        }
    }
}

/// Ends a job in `state` for `reason` and refunds its hold, with the event: the end of a job
/// that is not running anywhere any more.
#[allow(clippy::too_many_arguments)]
fn end_refunded(
    tx: &Connection,
    ctx: &super::Ctx,
    job_id: &str,
    state: JobState,
    attempt: u32,
    node_id: Option<&str>,
    reason: &str,
    now: u64,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE jobs SET state = ?2, reason = ?3, updated_ms = ?4 WHERE id = ?1",
        params![job_id, state.as_str(), reason, now as i64],
    )?;
    ctx.emit_job(tx, job_id, state, attempt, node_id, Some(reason), now)?;
    ctx.refund(tx, job_id, now)
}

/// The attempt `attempt` is lost (its node lost, restarted without it, failed it, or handed it
/// back past the free hand-backs), recorded as `outcome` for the node: back to pending while
/// retries remain (hand-backs within [`FREE_HAND_BACKS`] spend none), otherwise ended and
/// refunded. Returns the job's new state.
#[allow(clippy::too_many_arguments)]
fn lose_attempt(
    tx: &Connection,
    ctx: &super::Ctx,
    job_id: &str,
    attempt: u32,
    node: Option<&str>,
    reason: &str,
    outcome: AttemptOutcome,
    now: u64,
) -> Result<JobState, StoreError> {
    let free = hand_backs_before(tx, job_id, attempt)?.min(FREE_HAND_BACKS);
    if let Some(node) = node {
        record_attempt(tx, job_id, attempt, node, outcome, now)?;
    }
    let (spec, stop) = stop_request_of(tx, job_id)?;
    let retries_used = attempt.saturating_sub(1).saturating_sub(free);
    match ending::lost(reason, retries_used, spec.max_retries, stop) {
        LostAttempt::Requeue { reason } => {
            back_to_pending(tx, ctx, job_id, attempt, &reason, now)?;
            Ok(JobState::Pending)
        }
        LostAttempt::End { state, reason } => {
            end_refunded(tx, ctx, job_id, state, attempt, node, &reason, now)?;
            Ok(state)
        }
    }
}

/// Closes the job's escrow: settled for the `billed` usage at `billing`'s prices, or refunded in
/// full when nothing is billed.
fn close(
    tx: &Connection,
    ctx: &super::Ctx,
    job_id: &str,
    billing: &Billing,
    billed: Option<Usage>,
    now: u64,
) -> Result<(), StoreError> {
    match billed {
        Some(billed) => ctx.settle(tx, job_id, billing.cost_micros(billed), now),
        None => ctx.refund(tx, job_id, now),
    }
}

/// Back to pending for another node, the hold intact, with the event.
fn back_to_pending(
    tx: &Connection,
    ctx: &super::Ctx,
    job_id: &str,
    attempt: u32,
    reason: &str,
    now: u64,
) -> Result<(), StoreError> {
    exec(
        tx,
        "UPDATE jobs SET state = 'pending', node_id = NULL, pricing = NULL, provider_account = NULL,
         started_ms = NULL, assigned_ms = NULL, fuel_limit = NULL, reason = ?2, updated_ms = ?3
         WHERE id = ?1",
        params![job_id, reason, now as i64],
    )?;
    ctx.emit_job(
        tx,
        job_id,
        JobState::Pending,
        attempt,
        None,
        Some(reason),
        now,
    )
}

/// How many attempts before `attempt` were handed back by shutting-down agents.
fn hand_backs_before(tx: &Connection, job_id: &str, attempt: u32) -> Result<u32, StoreError> {
    query_row(
        tx,
        "SELECT COUNT(*) FROM attempts WHERE job_id = ?1 AND attempt < ?2 AND outcome = ?3",
        params![job_id, attempt, AttemptOutcome::HandedBack.as_str()],
        |r| r.get(0),
    )
    .map_err(StoreError::from)
}

/// The job's spec and what the orchestrator has asked of it.
fn stop_request_of(tx: &Connection, job_id: &str) -> Result<(JobSpec, StopRequest), StoreError> {
    let (spec, cancel_requested, stop_reason): (String, bool, Option<String>) = query_row(
        tx,
        "SELECT spec, cancel_requested, stop_reason FROM jobs WHERE id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let stop = StopRequest {
        cancel_requested,
        stop_reason: stop_reason.as_deref().and_then(StopReason::parse),
    };
    Ok((serde_json::from_str(&spec)?, stop))
}

/// What a job is billed by: its allocation, the prices agreed at assignment, and what bounds
/// the usage its node may bill.
struct Billing {
    cpu_cores: u32,
    memory_mib: u64,
    gpus: u32,
    pricing: Pricing,
    timeout_ms: u64,
    /// When the assignment was recorded (`None` for rows assigned before it was kept).
    assigned_ms: Option<u64>,
    fuel_limit: Option<u64>,
    /// A metered job's most input and output units (its hold was made for them).
    max_units: Option<(u64, u64)>,
    /// What the gateway witnessed of the current attempt, if it did.
    witness: Option<ending::Witnessed>,
}

impl Billing {
    /// The usage billed for `reported` at `now` ([`ending::billed_usage`]).
    fn billed(&self, reported: Usage, now: u64, slack_ms: u64) -> Usage {
        ending::billed_usage(
            reported,
            &UsageBounds {
                timeout_ms: self.timeout_ms,
                since_assignment_ms: self
                    .assigned_ms
                    .map_or(u64::MAX, |at| now.saturating_sub(at)),
                slack_ms,
                fuel_limit: self.fuel_limit,
            },
        )
    }

    /// The cost of `usage` at these prices, uncapped (the split caps it at the hold).
    fn cost_micros(&self, usage: Usage) -> i64 {
        ledger::usage_cost_micros(
            usage.elapsed_ms,
            usage.fuel,
            self.cpu_cores,
            self.memory_mib,
            self.gpus,
            &self.pricing,
        )
        .saturating_add(
            usage
                .units
                .map_or(0, |units| ledger::metered_cost_micros(units, &self.pricing)),
        )
    }
}

/// A job's billing and what the orchestrator had asked of it, from their own columns (the spec,
/// with its workload, is not parsed here).
/// `billing_of`'s one read: allocation, prices and stop request; the timeout, assignment time,
/// fuel limit sent, metering limits and witness columns; the current attempt.
type BillingRow = (
    (u32, i64, u32, Option<String>, bool, Option<String>),
    [Option<i64>; 8],
    u32,
);

fn billing_of(tx: &Connection, job_id: &str) -> Result<(Billing, StopRequest), StoreError> {
    let opt = |r: &rusqlite::Row<'_>, i: usize| r.get::<_, Option<i64>>(i);
    let (
        (cpu_cores, memory_mib, gpus, pricing, cancel_requested, stop_reason),
        [
            timeout,
            assigned,
            fuel_limit,
            max_in,
            max_out,
            witness_attempt,
            witness_in,
            witness_out,
        ],
        attempt,
    ): BillingRow = query_row(
        tx,
        "SELECT cpu_cores, memory_mib, gpus, pricing, cancel_requested, stop_reason, timeout_ms,
                    assigned_ms, fuel_limit, max_input_units, max_output_units, witness_attempt,
                    witness_input_units, witness_output_units, attempt FROM jobs WHERE id = ?1",
        [job_id],
        |r| {
            Ok((
                (
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ),
                [
                    opt(r, 6)?,
                    opt(r, 7)?,
                    opt(r, 8)?,
                    opt(r, 9)?,
                    opt(r, 10)?,
                    opt(r, 11)?,
                    opt(r, 12)?,
                    opt(r, 13)?,
                ],
                r.get(14)?,
            ))
        },
    )?;
    let units = |v: i64| v.max(0) as u64;
    let pricing: Pricing = pricing
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?
        .ok_or_else(|| StoreError::Corrupt(format!("job {job_id} has no agreed pricing")))?;
    let billing = Billing {
        cpu_cores,
        memory_mib: memory_mib as u64,
        gpus,
        pricing,
        timeout_ms: timeout.map_or(u64::MAX, |t| t.max(0) as u64),
        assigned_ms: assigned.map(|t| t.max(0) as u64),
        fuel_limit: fuel_limit.map(|f| f.max(0) as u64),
        max_units: max_in.zip(max_out).map(|(i, o)| (units(i), units(o))),
        witness: match (witness_attempt, witness_out) {
            (Some(at), Some(output)) if at == i64::from(attempt) => Some(ending::Witnessed {
                input_units: witness_in.map(units),
                output_units: units(output),
            }),
            _ => None,
        },
    };
    let stop = StopRequest {
        cancel_requested,
        stop_reason: stop_reason.as_deref().and_then(StopReason::parse),
    };
    Ok((billing, stop))
}
