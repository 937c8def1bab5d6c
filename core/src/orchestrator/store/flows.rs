//! Flows (tables `flows`, `flow_steps`): a graph of jobs paid from one escrow.
//!
//! Starting a flow holds its `max_cost` in the flow's own escrow account (`flow:<id>`, posting
//! `flow-hold:<id>`). Each step's run is an ordinary job of the flow's account whose hold comes
//! from that escrow (`jobs.payer_account`), so it settles exactly like any job — provider, fee —
//! and its unspent hold goes back to the flow's escrow, not to the account. When every step has
//! ended the flow closes its escrow once (`flow-close:<id>`): what is left goes back to the
//! account, and cost + refund = the hold.
//!
//! [`Store::advance_flow`] is the whole state machine, one transaction per call: ended runs
//! are read off their jobs (succeeded, retried after a backoff, failed), steps whose inputs are
//! ready are submitted (conditions checked, upstream files passed in), dependants of a failed
//! or skipped step are skipped, a stopping flow cancels its running jobs, and a flow with
//! nothing left to run ends. Everything it needs is in the database, so an orchestrator that
//! restarts (or takes over) goes on where the last one stopped.

use super::events::DomainEvent;
use super::jobs::{Accept, accept};
use super::{Store, StoreError};
use crate::ledger::{self, AccountKind, TxKind, exec, query_row};
use rhizos_broker::wire::{
    FlowSpec, FlowState, FlowView, InputBlob, JobState, StepState, StepView,
};
use rusqlite::{OptionalExtension, params};

/// Most flows one account may have open (running or stopping) at once: each is looked at
/// every tick of the orchestrator's flow loop.
pub const MAX_OPEN_FLOWS: i64 = 100;

/// Most base64 bytes of input files one step's job may carry in its assignment (its own and
/// those passed inline from upstream steps): the assignment is one NATS message.
pub const MAX_INLINE_INPUT_B64: usize = 768 * 1024;

/// The escrow account a flow's budget is held in.
pub fn flow_account(flow_id: &str) -> String {
    format!("flow:{flow_id}")
}

/// What the orchestrator does after a flow advanced (the database already says it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowAdvance {
    /// Step jobs submitted: to dispatch.
    pub submitted: Vec<String>,
    /// Step jobs cancelled while a node runs them: (node, job, attempt) to stop there.
    pub stops: Vec<(String, String, u32)>,
    /// The latest time to look at the flow again (a retry's backoff, the flow's deadline).
    pub wake_at_ms: Option<u64>,
    /// The flow ended in this call, in this state.
    pub ended: Option<FlowState>,
}

/// A step as stored.
#[derive(Debug, Clone)]
struct StepRow {
    state: StepState,
    runs: u32,
    job_id: Option<String>,
    exit_code: Option<i32>,
    reason: Option<String>,
    cost_micros: i64,
    not_before_ms: Option<u64>,
    changed: bool,
}

/// A flow as stored.
struct FlowRow {
    account: String,
    name: String,
    spec: FlowSpec,
    state: FlowState,
    outcome: Option<FlowState>,
    reason: Option<String>,
    max_cost_micros: i64,
    cost_micros: Option<i64>,
    refund_micros: Option<i64>,
    created_ms: u64,
    updated_ms: u64,
    deadline_ms: Option<u64>,
}

impl FlowRow {
    /// A `flows` row (its columns read by name); a state or spec that does not parse is a
    /// corrupt ledger.
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Self, StoreError>> {
        let ms = |v: i64| v.max(0) as u64;
        let (spec, state, outcome): (String, String, Option<String>) =
            (r.get("spec")?, r.get("state")?, r.get("outcome")?);
        let (account, name, reason) = (r.get("account_id")?, r.get("name")?, r.get("reason")?);
        let (max_cost_micros, cost_micros, refund_micros) = (
            r.get("max_cost_micros")?,
            r.get("cost_micros")?,
            r.get("refund_micros")?,
        );
        let (created_ms, updated_ms, deadline_ms): (i64, i64, Option<i64>) = (
            r.get("created_ms")?,
            r.get("updated_ms")?,
            r.get("deadline_ms")?,
        );
        let parse =
            |what: &str, value: &str| FlowState::parse(value).ok_or_else(|| bad_row(what, value));
        let flow = || -> Result<Self, StoreError> {
            Ok(FlowRow {
                account,
                name,
                spec: serde_json::from_str(&spec)?,
                state: parse("flow state", &state)?,
                outcome: outcome.map(|o| parse("flow outcome", &o)).transpose()?,
                reason,
                max_cost_micros,
                cost_micros,
                refund_micros,
                created_ms: ms(created_ms),
                updated_ms: ms(updated_ms),
                deadline_ms: deadline_ms.map(ms),
            })
        };
        Ok(flow())
    }
}

/// An output stored out of band that a flow's condition reads (see
/// [`Store::condition_blobs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionBlob {
    /// The flow's account (the blob's).
    pub account: String,
    pub job_id: String,
    /// The file's path under `/output/`.
    pub file: String,
    pub blob: InputBlob,
}

/// What the orchestrator read for a flow's conditions: per (job id, file), the JSON document,
/// or why there is none.
pub type ConditionDocuments =
    std::collections::HashMap<(String, String), Result<serde_json::Value, String>>;

/// An upstream step's output file, as the next step takes it.
enum Output {
    /// Base64, as the report carried it.
    Inline(String),
    /// Out of band, in the blob stream.
    Blob(InputBlob),
}

/// A flow event to record: (step, state, job, reason); no step: the flow's own.
type FlowEventRow = (Option<String>, String, Option<String>, Option<String>);

fn bad_row(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} {value:?} in the flows tables"))
}

impl Store {
    /// Starts flow `flow_id` of `account` (its modules already resolved): the rows, its
    /// steps waiting, and `max_cost` held from the account in the flow's escrow, in one
    /// transaction. Starting the same flow again (same id, account and spec: a retry) returns
    /// it as it is (`false`); the same id with anything else is refused.
    pub fn start_flow(
        &mut self,
        flow_id: &str,
        account: &str,
        spec: &FlowSpec,
    ) -> Result<(FlowView, bool), StoreError> {
        let spec_json = serde_json::to_string(spec)?;
        let existing: Option<(String, String)> = query_row(
            &self.conn,
            "SELECT account_id, spec FROM flows WHERE id = ?1",
            [flow_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
        if let Some((owner, stored)) = existing {
            if owner != account || stored != spec_json {
                return Err(StoreError::AlreadyExists(format!(
                    "flow id {flow_id} is taken (a retry must resend the same flow): choose another id"
                )));
            }
            return Ok((self.flow(flow_id)?, false));
        }
        let now = crate::now_ms();
        let (tx, ctx) = self.begin()?;
        let kind: Option<String> = query_row(
            &tx,
            "SELECT kind FROM accounts WHERE id = ?1",
            [account],
            |r| r.get(0),
        )
        .optional()?;
        if !matches!(kind.as_deref(), Some("user" | "provider")) {
            return Err(super::accounts::no_account(account));
        }
        let open: i64 = query_row(
            &tx,
            "SELECT COUNT(*) FROM flows WHERE account_id = ?1 AND state IN ('running', 'stopping')",
            [account],
            |r| r.get(0),
        )?;
        if open >= MAX_OPEN_FLOWS {
            return Err(StoreError::InvalidState(format!(
                "account {account} has {open} flows running, the most at once: wait for one to end, or cancel one"
            )));
        }
        exec(
            &tx,
            "INSERT INTO flows (id, account_id, name, spec, state, max_cost_micros, created_ms, updated_ms, deadline_ms)
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?6, ?7)",
            params![
                flow_id,
                account,
                spec.name,
                spec_json,
                spec.max_cost_micros,
                now as i64,
                spec.timeout_ms.map(|t| now.saturating_add(t) as i64),
            ],
        )?;
        for (index, step) in spec.steps.iter().enumerate() {
            exec(
                &tx,
                "INSERT INTO flow_steps (flow_id, idx, step, state, updated_ms) VALUES (?1, ?2, ?3, 'waiting', ?4)",
                params![flow_id, index as i64, step.name, now as i64],
            )?;
        }
        let escrow = flow_account(flow_id);
        ledger::ensure_account(&tx, &escrow, AccountKind::Escrow, now)?;
        ledger::post(
            &tx,
            &format!("flow-hold:{flow_id}"),
            TxKind::Hold,
            None,
            &[(account, -spec.max_cost_micros), (&escrow, spec.max_cost_micros)],
            now,
        )
        .map_err(|e| match e {
            ledger::LedgerError::InsufficientFunds { balance_micros, .. } => {
                StoreError::InsufficientFunds(format!(
                    "account {account} has {} but the flow's max_cost_micros is {}: deposit more, or lower the flow's budget",
                    rhizos_broker::wire::format_usd(balance_micros),
                    rhizos_broker::wire::format_usd(spec.max_cost_micros)
                ))
            }
            other => other.into(),
        })?;
        ctx.emit(
            &tx,
            DomainEvent::Flow {
                flow_id: flow_id.to_owned(),
                account: account.to_owned(),
                step: None,
                state: FlowState::Running.as_str().to_owned(),
                job_id: None,
                reason: None,
            },
            now,
        )?;
        tx.commit()?;
        Ok((self.flow(flow_id)?, true))
    }

    /// A flow as it is now.
    pub fn flow(&self, flow_id: &str) -> Result<FlowView, StoreError> {
        let row = self.flow_row(flow_id)?;
        let steps = self.step_rows(flow_id)?;
        let escrow = ledger::balance(&self.conn, &flow_account(flow_id))?.unwrap_or(0);
        Ok(view(flow_id, row, &steps, escrow))
    }

    /// Flows of `account` (all with `None`), newest first.
    pub fn list_flows(
        &self,
        account: Option<&str>,
        limit: u32,
    ) -> Result<Vec<FlowView>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id FROM flows WHERE (?1 IS NULL OR account_id = ?1)
             ORDER BY created_ms DESC, id DESC LIMIT ?2",
        )?;
        let ids = statement
            .query_map(params![account, limit], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        ids.iter().map(|id| self.flow(id)).collect()
    }

    /// Open flows with something to do at `now`: a running step whose job has ended, a retry
    /// whose backoff is over, a deadline passed, or stopping. The others are left alone (a
    /// waiting step can only become ready when another step's run ends), so the flow loop's
    /// tick costs one indexed read, not a pass over every open flow.
    pub fn flows_due(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT f.id FROM flows f WHERE f.state IN ('running', 'stopping') AND (
                 f.state = 'stopping'
                 OR (f.deadline_ms IS NOT NULL AND f.deadline_ms <= ?1)
                 OR EXISTS (SELECT 1 FROM flow_steps s JOIN jobs j ON j.id = s.job_id
                            WHERE s.flow_id = f.id AND s.state = 'running'
                              AND j.state IN ('succeeded', 'failed', 'cancelled', 'timed_out'))
                 OR EXISTS (SELECT 1 FROM flow_steps s
                            WHERE s.flow_id = f.id AND s.state = 'retrying' AND s.not_before_ms <= ?1))",
        )?;
        let ids = statement
            .query_map([now as i64], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// Asks a running flow to stop: it becomes `stopping` (nothing new starts; the next
    /// [`Store::advance_flow`] cancels its running steps) and ends `cancelled`. A flow that
    /// ended already is refused; one stopping already is left as it is.
    pub fn cancel_flow(&mut self, flow_id: &str) -> Result<FlowView, StoreError> {
        let row = self.flow_row(flow_id)?;
        match row.state {
            FlowState::Running => {
                let now = crate::now_ms();
                let (tx, ctx) = self.begin()?;
                exec(
                    &tx,
                    "UPDATE flows SET state = 'stopping', outcome = 'cancelled', reason = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![flow_id, "cancelled by its account", now as i64],
                )?;
                ctx.emit(
                    &tx,
                    DomainEvent::Flow {
                        flow_id: flow_id.to_owned(),
                        account: row.account.clone(),
                        step: None,
                        state: FlowState::Stopping.as_str().to_owned(),
                        job_id: None,
                        reason: Some("cancelled by its account".into()),
                    },
                    now,
                )?;
                tx.commit()?;
            }
            FlowState::Stopping => {}
            ended => {
                return Err(StoreError::InvalidState(format!(
                    "flow {flow_id} already ended ({})",
                    ended.as_str()
                )));
            }
        }
        self.flow(flow_id)
    }

    /// Moves flow `flow_id` on as far as it can now (see the module's documentation), all of
    /// it or nothing. A condition on an output stored out of band reads nothing here: see
    /// [`Store::advance_flow_reading`].
    pub fn advance_flow(&mut self, flow_id: &str, now: u64) -> Result<FlowAdvance, StoreError> {
        self.advance_flow_reading(flow_id, now, &ConditionDocuments::new())
    }

    /// [`Store::advance_flow`] with the documents of [`Store::condition_blobs`] read by the
    /// orchestrator: a condition on an output stored out of band is evaluated on its document.
    pub fn advance_flow_reading(
        &mut self,
        flow_id: &str,
        now: u64,
        documents: &ConditionDocuments,
    ) -> Result<FlowAdvance, StoreError> {
        self.conn.execute_batch("SAVEPOINT flow_advance")?;
        match self.advance(flow_id, now, documents) {
            Ok(advance) => {
                self.conn.execute_batch("RELEASE flow_advance")?;
                Ok(advance)
            }
            Err(e) => {
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO flow_advance; RELEASE flow_advance");
                Err(e)
            }
        }
    }

    fn advance(
        &mut self,
        flow_id: &str,
        now: u64,
        documents: &ConditionDocuments,
    ) -> Result<FlowAdvance, StoreError> {
        let mut advance = FlowAdvance::default();
        let mut flow = self.flow_row(flow_id)?;
        if flow.state.is_terminal() {
            return Ok(advance);
        }
        let mut steps = self.step_rows(flow_id)?;
        let plan = flow
            .spec
            .plan()
            .map_err(|e| StoreError::Corrupt(format!("flow {flow_id}'s stored spec: {e}")))?;
        let mut events: Vec<FlowEventRow> = Vec::new();
        let mut flow_changed = false;

        if flow.state == FlowState::Running
            && let Some(deadline) = flow.deadline_ms
        {
            if now >= deadline {
                flow.state = FlowState::Stopping;
                flow.outcome = Some(FlowState::TimedOut);
                flow.reason = Some(format!(
                    "the flow's timeout_ms ({} ms) passed",
                    flow.spec.timeout_ms.unwrap_or_default()
                ));
                flow_changed = true;
                events.push((None, "stopping".into(), None, flow.reason.clone()));
            } else {
                advance.wake_at_ms = Some(deadline);
            }
        }

        // Runs that ended.
        for (index, step) in steps.iter_mut().enumerate() {
            if step.state != StepState::Running {
                continue;
            }
            let Some(job_id) = step.job_id.clone() else {
                continue;
            };
            let job = self.get_job(&job_id)?;
            if !job.state.is_terminal() {
                continue;
            }
            let spec = &flow.spec.steps[index];
            step.cost_micros = step
                .cost_micros
                .saturating_add(job.cost_micros.unwrap_or(0));
            step.exit_code = job.exit_code;
            step.changed = true;
            let ok = matches!(job.state, JobState::Succeeded | JobState::Failed)
                && job
                    .exit_code
                    .is_some_and(|code| spec.ok_exit_codes.contains(&code));
            if ok {
                step.state = StepState::Succeeded;
                step.reason = None;
            } else {
                let why = match (&job.reason, job.exit_code) {
                    (Some(reason), _) => reason.clone(),
                    (None, Some(code)) => format!("exited with code {code}"),
                    (None, None) => format!("its job ended {}", job.state.as_str()),
                };
                if job.state == JobState::Cancelled && flow.state == FlowState::Stopping {
                    step.state = StepState::Cancelled;
                    step.reason = flow.reason.clone();
                } else if flow.state == FlowState::Running && step.runs <= spec.retries {
                    let backoff = spec
                        .backoff_ms
                        .saturating_mul(1u64 << (step.runs.saturating_sub(1)).min(20));
                    step.state = StepState::Retrying;
                    step.not_before_ms = Some(now.saturating_add(backoff));
                    step.reason = Some(format!(
                        "run {} failed ({why}); run {} in {backoff} ms",
                        step.runs,
                        step.runs + 1
                    ));
                } else {
                    step.state = StepState::Failed;
                    step.reason = Some(why);
                }
            }
            events.push((
                Some(spec.name.clone()),
                step.state.as_str().to_owned(),
                Some(job_id),
                step.reason.clone(),
            ));
        }

        if flow.state == FlowState::Stopping {
            let why = flow.reason.clone();
            for (index, step) in steps.iter_mut().enumerate() {
                match step.state {
                    StepState::Waiting | StepState::Retrying => {
                        step.state = StepState::Cancelled;
                        step.reason = why.clone();
                        step.not_before_ms = None;
                        step.changed = true;
                        events.push((
                            Some(flow.spec.steps[index].name.clone()),
                            "cancelled".into(),
                            None,
                            why.clone(),
                        ));
                    }
                    StepState::Running => {
                        let Some(job_id) = &step.job_id else { continue };
                        let requested: bool = query_row(
                            &self.conn,
                            "SELECT COALESCE(cancel_requested, 0) FROM jobs WHERE id = ?1",
                            [job_id],
                            |r| r.get(0),
                        )?;
                        if !requested {
                            let effect = self.cancel(job_id)?;
                            if let Some((node, attempt)) = effect.stop {
                                advance.stops.push((node, job_id.clone(), attempt));
                            }
                        }
                    }
                    _ => {}
                }
            }
        } else {
            self.start_ready_steps(
                flow_id,
                &flow,
                &plan,
                &mut steps,
                now,
                (&mut events, &mut advance),
                documents,
            )?;
        }

        if steps.iter().all(|s| s.state.is_terminal()) {
            let (state, reason) = match flow.state {
                FlowState::Stopping => (
                    flow.outcome.unwrap_or(FlowState::Cancelled),
                    flow.reason.clone(),
                ),
                _ => match steps.iter().position(|s| s.state == StepState::Failed) {
                    Some(index) => (
                        FlowState::Failed,
                        Some(format!(
                            "step {:?} failed: {}",
                            flow.spec.steps[index].name,
                            steps[index].reason.clone().unwrap_or_default()
                        )),
                    ),
                    None => (FlowState::Succeeded, None),
                },
            };
            let escrow = flow_account(flow_id);
            let left = ledger::balance(&self.conn, &escrow)?.unwrap_or(0);
            ledger::post(
                &self.conn,
                &format!("flow-close:{flow_id}"),
                TxKind::Refund,
                None,
                &[(&escrow, -left), (&flow.account, left)],
                now,
            )?;
            flow.state = state;
            flow.reason = reason;
            flow.cost_micros = Some(flow.max_cost_micros - left);
            flow.refund_micros = Some(left);
            flow_changed = true;
            advance.ended = Some(state);
            advance.wake_at_ms = None;
            events.push((None, state.as_str().to_owned(), None, flow.reason.clone()));
        }

        for (index, step) in steps.iter().enumerate().filter(|(_, s)| s.changed) {
            exec(
                &self.conn,
                "UPDATE flow_steps SET state = ?3, runs = ?4, job_id = ?5, exit_code = ?6, reason = ?7,
                        cost_micros = ?8, not_before_ms = ?9, updated_ms = ?10
                 WHERE flow_id = ?1 AND idx = ?2",
                params![
                    flow_id,
                    index as i64,
                    step.state.as_str(),
                    step.runs,
                    step.job_id,
                    step.exit_code,
                    step.reason,
                    step.cost_micros,
                    step.not_before_ms.map(|t| t as i64),
                    now as i64
                ],
            )?;
        }
        if flow_changed || steps.iter().any(|s| s.changed) {
            exec(
                &self.conn,
                "UPDATE flows SET state = ?2, outcome = ?3, reason = ?4, cost_micros = ?5, refund_micros = ?6, updated_ms = ?7
                 WHERE id = ?1",
                params![
                    flow_id,
                    flow.state.as_str(),
                    flow.outcome.map(FlowState::as_str),
                    flow.reason,
                    flow.cost_micros,
                    flow.refund_micros,
                    now as i64
                ],
            )?;
        }
        for (step, state, job_id, reason) in events {
            self.ctx.emit(
                &self.conn,
                DomainEvent::Flow {
                    flow_id: flow_id.to_owned(),
                    account: flow.account.clone(),
                    step,
                    state,
                    job_id,
                    reason,
                },
                now,
            )?;
        }
        Ok(advance)
    }

    /// Skips what can no longer run and submits what is ready: a waiting step whose every
    /// upstream step succeeded and whose every edge's condition holds, and a retrying step
    /// past its backoff — each while the flow's escrow can hold its cap (or all that is left,
    /// once no other step runs to give some back).
    #[allow(clippy::too_many_arguments)]
    fn start_ready_steps(
        &mut self,
        flow_id: &str,
        flow: &FlowRow,
        plan: &rhizos_broker::wire::FlowPlan,
        steps: &mut [StepRow],
        now: u64,
        (events, advance): (&mut Vec<FlowEventRow>, &mut FlowAdvance),
        documents: &ConditionDocuments,
    ) -> Result<(), StoreError> {
        let name = |i: usize| flow.spec.steps[i].name.clone();
        let index_of = |step: &str| flow.spec.steps.iter().position(|s| s.name == step);
        let mut ready = Vec::new();
        for &target in &plan.order {
            if steps[target].state != StepState::Waiting {
                continue;
            }
            let mut skip: Option<String> = None;
            let mut all_done = true;
            for (e, (from, to)) in plan.edges.iter().enumerate() {
                if index_of(&to.step) != Some(target) {
                    continue;
                }
                let Some(source) = index_of(&from.step) else {
                    continue;
                };
                match steps[source].state {
                    StepState::Failed | StepState::Cancelled => {
                        skip = Some(format!("step {:?} failed", from.step));
                    }
                    StepState::Skipped => {
                        skip = Some(format!("step {:?} was skipped", from.step));
                    }
                    StepState::Succeeded => {
                        if let Some(condition) = &flow.spec.edges[e].when {
                            let (document, unread) = match &condition.json {
                                Some(file) => self.output_json(
                                    steps[source].job_id.as_deref(),
                                    file.trim_start_matches("/output/"),
                                    documents,
                                )?,
                                None => (None, None),
                            };
                            let code = steps[source].exit_code.unwrap_or(-1);
                            if !condition.holds(code, document.as_ref()) {
                                skip = Some(format!(
                                    "the condition on the edge from {:?} is false{}",
                                    from.step,
                                    unread.map(|why| format!(" ({why})")).unwrap_or_default()
                                ));
                            }
                        }
                    }
                    _ => all_done = false,
                }
                if skip.is_some() {
                    break;
                }
            }
            if let Some(reason) = skip {
                steps[target].state = StepState::Skipped;
                steps[target].reason = Some(reason.clone());
                steps[target].changed = true;
                events.push((Some(name(target)), "skipped".into(), None, Some(reason)));
            } else if all_done {
                ready.push(target);
            }
        }
        for (index, step) in steps.iter().enumerate() {
            if step.state == StepState::Retrying {
                match step.not_before_ms {
                    Some(at) if at > now => {
                        advance.wake_at_ms = Some(advance.wake_at_ms.map_or(at, |w| w.min(at)));
                    }
                    _ => ready.push(index),
                }
            }
        }
        let escrow = flow_account(flow_id);
        for index in ready {
            let spec = &flow.spec.steps[index];
            let cap = spec.max_cost_micros.unwrap_or(flow.max_cost_micros);
            let left = ledger::balance(&self.conn, &escrow)?.unwrap_or(0);
            let others_running = steps.iter().any(|s| s.state == StepState::Running);
            if left < cap && others_running {
                // What the running steps do not spend comes back: wait for it.
                continue;
            }
            let fail = |steps: &mut [StepRow], why: String, events: &mut Vec<_>| {
                steps[index].state = StepState::Failed;
                steps[index].reason = Some(why.clone());
                steps[index].not_before_ms = None;
                steps[index].changed = true;
                events.push((Some(name(index)), "failed".to_owned(), None, Some(why)));
            };
            if left <= 0 {
                fail(
                    steps,
                    format!(
                        "the flow's budget is spent (max_cost_micros {})",
                        flow.max_cost_micros
                    ),
                    events,
                );
                continue;
            }
            let mut job_spec = spec.spec.clone();
            let mut missing = None;
            for (from, to) in &plan.edges {
                if index_of(&to.step) != Some(index) {
                    continue;
                }
                let (Some(out), Some(input)) = (&from.file, &to.file) else {
                    continue;
                };
                let source = index_of(&from.step).unwrap_or_default();
                match self.output(steps[source].job_id.as_deref(), out)? {
                    Ok(Output::Inline(b64)) => {
                        job_spec.input_files.insert(input.clone(), b64);
                    }
                    Ok(Output::Blob(blob)) => {
                        job_spec.input_blobs.insert(input.clone(), blob);
                    }
                    Err(why) => {
                        missing = Some(format!("step {:?} {why}", from.step));
                        break;
                    }
                }
            }
            let inline: usize = job_spec.input_files.values().map(String::len).sum();
            if missing.is_none() && inline > MAX_INLINE_INPUT_B64 {
                missing = Some(format!(
                    "its inline input files come to {inline} base64 bytes, more than the {MAX_INLINE_INPUT_B64} an assignment carries"
                ));
            }
            if let Some(why) = missing {
                fail(steps, why, events);
                continue;
            }
            let hold = cap.min(left);
            let run = steps[index].runs + 1;
            let job_id = format!("{flow_id}-{index}-{run}");
            let spec_json = serde_json::to_string(&job_spec)?;
            accept(
                &self.conn,
                &self.ctx,
                Accept {
                    job_id: &job_id,
                    account: &flow.account,
                    payer: Some(&escrow),
                    spec: &job_spec,
                    spec_json: &spec_json,
                    max_cost_micros: hold,
                    key_id: None,
                },
                now,
            )?;
            let step = &mut steps[index];
            step.runs = run;
            step.job_id = Some(job_id.clone());
            step.state = StepState::Running;
            step.not_before_ms = None;
            step.exit_code = None;
            step.changed = true;
            events.push((
                Some(name(index)),
                "running".into(),
                Some(job_id.clone()),
                None,
            ));
            advance.submitted.push(job_id);
        }
        Ok(())
    }

    /// The output file `file` of job `job_id` as the next step's input — inline as its
    /// report carried it, or its blob and the node that stored it; or why there is none.
    fn output(
        &self,
        job_id: Option<&str>,
        file: &str,
    ) -> Result<Result<Output, String>, StoreError> {
        let Some(job_id) = job_id else {
            return Ok(Err("never ran".into()));
        };
        let job = self.get_job(job_id)?;
        if let Some(b64) = job.output_files.get(file) {
            return Ok(Ok(Output::Inline(b64.clone())));
        }
        if let (Some(blob), Some(node)) = (job.blobs.files.get(file), &job.node_id) {
            return Ok(Ok(Output::Blob(InputBlob {
                sha256: blob.sha256.clone(),
                size: blob.size,
                from_node: node.clone(),
            })));
        }
        Ok(Err(format!("left no /output/{file}")))
    }

    /// The output file `file` of job `job_id` read as JSON — inline as the report carried it,
    /// or out of band as the orchestrator read it into `documents` — or `None` (absent, not
    /// JSON, or not read) with why when it is not plain absence.
    fn output_json(
        &self,
        job_id: Option<&str>,
        file: &str,
        documents: &ConditionDocuments,
    ) -> Result<(Option<serde_json::Value>, Option<String>), StoreError> {
        Ok(match self.output(job_id, file)? {
            Ok(Output::Inline(b64)) => (
                rhizos_broker::wire::b64_decode("output", &b64)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok()),
                None,
            ),
            Ok(Output::Blob(_)) => {
                let key = (job_id.unwrap_or_default().to_owned(), file.to_owned());
                match documents.get(&key) {
                    Some(Ok(document)) => (Some(document.clone()), None),
                    Some(Err(why)) => (None, Some(why.clone())),
                    None => (None, Some(format!("/output/{file} was not read"))),
                }
            }
            Err(_) => (None, None),
        })
    }

    /// The outputs stored out of band that conditions of flow `flow_id` must read before it
    /// moves on: for each edge with a JSON condition whose target still waits, the source
    /// step's latest run's file, when it is a blob. (The ledger thread reads no blobs: the
    /// orchestrator fetches these and passes them to [`Store::advance_flow_reading`].)
    pub fn condition_blobs(&self, flow_id: &str) -> Result<Vec<ConditionBlob>, StoreError> {
        let flow = self.flow_row(flow_id)?;
        if flow.state.is_terminal() {
            return Ok(Vec::new());
        }
        let steps = self.step_rows(flow_id)?;
        let plan = flow
            .spec
            .plan()
            .map_err(|e| StoreError::Corrupt(format!("flow {flow_id}'s stored spec: {e}")))?;
        let index_of = |step: &str| flow.spec.steps.iter().position(|s| s.name == step);
        let mut blobs = Vec::new();
        for (e, (from, to)) in plan.edges.iter().enumerate() {
            let Some(file) = flow.spec.edges[e]
                .when
                .as_ref()
                .and_then(|c| c.json.as_ref())
            else {
                continue;
            };
            let (Some(source), Some(target)) = (index_of(&from.step), index_of(&to.step)) else {
                continue;
            };
            if steps[target].state != StepState::Waiting {
                continue;
            }
            let Some(job_id) = steps[source].job_id.clone() else {
                continue;
            };
            let file = file.trim_start_matches("/output/").to_owned();
            if let Ok(Output::Blob(blob)) = self.output(Some(&job_id), &file)? {
                blobs.push(ConditionBlob {
                    account: flow.account.clone(),
                    job_id,
                    file,
                    blob,
                });
            }
        }
        Ok(blobs)
    }

    fn flow_row(&self, flow_id: &str) -> Result<FlowRow, StoreError> {
        query_row(
            &self.conn,
            "SELECT account_id, name, spec, state, outcome, reason, max_cost_micros, cost_micros,
                    refund_micros, created_ms, updated_ms, deadline_ms
             FROM flows WHERE id = ?1",
            [flow_id],
            FlowRow::from_row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("flow {flow_id}")))?
    }

    fn step_rows(&self, flow_id: &str) -> Result<Vec<StepRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT state, runs, job_id, exit_code, reason, cost_micros, not_before_ms
             FROM flow_steps WHERE flow_id = ?1 ORDER BY idx",
        )?;
        let rows = statement
            .query_map([flow_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i32>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(
                |(state, runs, job_id, exit_code, reason, cost, not_before)| {
                    Ok(StepRow {
                        state: StepState::parse(&state)
                            .ok_or_else(|| bad_row("step state", &state))?,
                        runs,
                        job_id,
                        exit_code,
                        reason,
                        cost_micros: cost,
                        not_before_ms: not_before.map(|t| t.max(0) as u64),
                        changed: false,
                    })
                },
            )
            .collect()
    }
}

fn view(flow_id: &str, row: FlowRow, steps: &[StepRow], escrow: i64) -> FlowView {
    FlowView {
        flow_id: flow_id.to_owned(),
        name: row.name,
        account: row.account,
        state: row.state,
        reason: row.reason,
        max_cost_micros: row.max_cost_micros,
        escrow_micros: escrow,
        cost_micros: row.cost_micros,
        refund_micros: row.refund_micros,
        created_ms: row.created_ms,
        updated_ms: row.updated_ms,
        deadline_ms: row.deadline_ms,
        steps: steps
            .iter()
            .zip(&row.spec.steps)
            .map(|(step, spec)| StepView {
                step: spec.name.clone(),
                state: step.state,
                runs: step.runs,
                job_id: step.job_id.clone(),
                exit_code: step.exit_code,
                reason: step.reason.clone(),
                cost_micros: step.cost_micros,
                not_before_ms: step.not_before_ms,
            })
            .collect(),
        edges: row.spec.edges,
    }
}
