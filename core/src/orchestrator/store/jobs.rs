//! Jobs (table `jobs`, key `id`): accepting a job (the row, the hold and its events in one
//! transaction) and the queries the orchestrator reads jobs by — by id, by account and state,
//! pending ones for dispatch (with their parsed specs cached), a node's active attempts,
//! deadlines and queue timeouts. How a job moves on from there is in `transitions`.

use super::accounts::no_account;
use super::events::{DomainEvent, Movement};
use super::rows::{JOB_COLUMNS, job_from_row};
use super::rows::{JobCursor, JobRecord};
use super::{PendingJob, SPEC_CACHE_ENTRIES, Store, StoreError};
use crate::ledger::{self, AccountKind, LedgerError, TxKind, escrow_account, exec, query_row};
use crate::now_ms;
use crate::orchestrator::matching::Allocation;
use rhizos_broker::wire::{ExecutionRef, JobSpec, JobState, format_usd};
use rusqlite::{OptionalExtension, params};

impl Store {
    /// Accepts a job: records it pending and holds `max_cost` in its escrow account. Submitting
    /// the same request again (same id, account, spec and max cost: a retry) returns the
    /// existing job (`false`); the same id with anything else is refused (`AlreadyExists`).
    pub fn submit(
        &mut self,
        job_id: &str,
        account: &str,
        spec: &JobSpec,
        max_cost_micros: i64,
    ) -> Result<(JobRecord, bool), StoreError> {
        self.submit_with_key(job_id, account, spec, max_cost_micros, None)
    }

    /// [`Store::submit`], charged to the API key whose SHA-256 is `key_sha256` (of `account`,
    /// neither revoked nor expired — checked here, in the hold's own transaction, not before
    /// it): the hold must fit the key's credit limit with what it has spent and what its open
    /// jobs hold, so concurrent submits cannot overspend the key.
    pub fn submit_with_key(
        &mut self,
        job_id: &str,
        account: &str,
        spec: &JobSpec,
        max_cost_micros: i64,
        key_sha256: Option<&str>,
    ) -> Result<(JobRecord, bool), StoreError> {
        let spec_json = serde_json::to_string(spec)?;
        if let Some(existing) = self.find_job(job_id)? {
            if existing.account != account {
                return Err(StoreError::AlreadyExists(format!(
                    "job id {job_id} is taken"
                )));
            }
            let (stored_spec, pruned_digest): (String, Option<String>) = query_row(
                &self.conn,
                "SELECT spec, spec_sha256 FROM jobs WHERE id = ?1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            // A pruned job's spec is known by its digest only.
            let same_spec = match pruned_digest {
                Some(digest) => digest == crate::sha256_hex(spec_json.as_bytes()),
                None => stored_spec == spec_json,
            };
            if !same_spec || existing.max_cost_micros != max_cost_micros {
                return Err(StoreError::AlreadyExists(format!(
                    "job id {job_id} is taken by another job of {account} (a retry must resend the same spec and max cost): choose another id"
                )));
            }
            return Ok((existing, false));
        }
        let now = now_ms();
        // Every refusal comes before the first write (a lean unit: see `Store::begin_lean`).
        let (tx, ctx) = self.begin_lean()?;
        let balance = match query_row(
            &tx,
            "SELECT kind, balance_micros FROM accounts WHERE id = ?1",
            [account],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?
        {
            Some((kind, balance)) if kind == "user" || kind == "provider" => balance,
            _ => return Err(no_account(account)),
        };
        if balance < max_cost_micros {
            return Err(insufficient(account, balance, max_cost_micros));
        }
        let key_id = match key_sha256 {
            Some(digest) => Some(key_budget(&tx, digest, account, max_cost_micros)?),
            None => None,
        };
        accept(
            &tx,
            ctx,
            Accept {
                job_id,
                account,
                payer: None,
                spec,
                spec_json: &spec_json,
                max_cost_micros,
                key_id: key_id.as_deref(),
            },
            now,
        )?;
        tx.commit()?;
        Ok((self.get_job(job_id)?, true))
    }

    pub fn find_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        query_row(
            &self.conn,
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [job_id],
            job_from_row,
        )
        .optional()
        .map_err(StoreError::from)
    }

    pub fn get_job(&self, job_id: &str) -> Result<JobRecord, StoreError> {
        self.find_job(job_id)?
            .ok_or_else(|| StoreError::NotFound(format!("no job {job_id}")))
    }

    /// Newest first, of `account` and in `state` when given, at most `limit` (at most 1,000).
    /// A page of jobs, newest first, after `after` (the previous page's last job), and the
    /// cursor of the next page if there is one.
    pub fn list_jobs(
        &self,
        account: Option<&str>,
        state: Option<JobState>,
        limit: u32,
        after: Option<&JobCursor>,
    ) -> Result<(Vec<JobRecord>, Option<JobCursor>), StoreError> {
        let limit = limit.clamp(1, 1000);
        // Without outputs (stdout, stderr, files: `job.get` has them), so a list of 1,000
        // stays far under the bus's message size.
        let columns = JOB_COLUMNS
            .replace("stdout, stderr", "NULL, NULL")
            .replace("output_files, output_blobs", "NULL, NULL");
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {columns} FROM jobs WHERE (?1 IS NULL OR account_id = ?1) AND (?2 IS NULL OR state = ?2)
                 AND (?4 IS NULL OR (created_ms, id) < (?4, ?5))
                 ORDER BY created_ms DESC, id DESC LIMIT ?3"
        ))?;
        let rows = statement.query_map(
            params![
                account,
                state.map(JobState::as_str),
                limit + 1,
                after.map(|c| c.created_ms),
                after.map(|c| c.job_id.as_str()),
            ],
            job_from_row,
        )?;
        let mut jobs = rows.collect::<Result<Vec<_>, _>>()?;
        let next = if jobs.len() > limit as usize {
            jobs.truncate(limit as usize);
            jobs.last().map(|last| JobCursor {
                created_ms: i64::try_from(last.created_ms).unwrap_or(i64::MAX),
                job_id: last.job_id.clone(),
            })
        } else {
            None
        };
        Ok((jobs, next))
    }

    /// Pending jobs, oldest first.
    /// The nodes earlier attempts of `job_id` ended on (it was requeued from them). Empty for
    /// a job that never ran: one indexed lookup.
    pub fn tried_nodes(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT DISTINCT node_id FROM attempts WHERE job_id = ?1")?;
        let nodes = statement
            .query_map([job_id], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(nodes)
    }

    pub fn pending_jobs(&mut self, limit: usize) -> Result<Vec<PendingJob>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, max_cost_micros, attempt, updated_ms, account_id FROM jobs WHERE state = 'pending'
                 ORDER BY created_ms, id LIMIT ?1",
        )?;
        let rows = statement
            .query_map([limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(statement);
        let mut jobs = Vec::with_capacity(rows.len());
        for (job_id, max_cost_micros, attempt, pending_since_ms, account) in rows {
            let spec = self.pending_spec(&job_id)?;
            jobs.push(PendingJob {
                job_id,
                account,
                spec,
                max_cost_micros,
                attempt,
                pending_since_ms: pending_since_ms as u64,
            });
        }
        Ok(jobs)
    }

    /// Drops a job's cached spec (it left pending).
    pub fn forget_spec(&mut self, job_id: &str) {
        self.spec_cache.remove(job_id);
    }

    /// A pending job's parsed spec, from the cache or (parsed once) from the database.
    fn pending_spec(&mut self, job_id: &str) -> Result<std::sync::Arc<JobSpec>, StoreError> {
        if let Some(spec) = self.spec_cache.get(job_id) {
            return Ok(spec.clone());
        }
        let text: String = query_row(
            &self.conn,
            "SELECT spec FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )?;
        let spec = std::sync::Arc::new(serde_json::from_str::<JobSpec>(&text)?);
        if self.spec_cache.len() < SPEC_CACHE_ENTRIES {
            self.spec_cache.insert(job_id.to_owned(), spec.clone());
        }
        Ok(spec)
    }

    /// Whether a job other than `job_id` is pending (one indexed probe).
    pub fn pending_other_than(&self, job_id: &str) -> Result<bool, StoreError> {
        query_row(
            &self.conn,
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'pending' AND id != ?1)",
            [job_id],
            |r| r.get(0),
        )
        .map_err(StoreError::from)
    }

    /// What each node has committed to assigned or running executions.
    pub fn active_per_node(&self) -> Result<Vec<(String, Allocation)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT node_id, COUNT(*), SUM(cpu_cores), SUM(memory_mib), SUM(gpus) FROM jobs
                 WHERE state IN ('assigned', 'running') GROUP BY node_id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Allocation {
                    jobs: r.get(1)?,
                    cpu_cores: r.get(2)?,
                    memory_mib: r.get::<_, i64>(3)? as u64,
                    gpus: r.get(4)?,
                },
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }

    /// Assigned or running attempts on one node.
    pub fn active_on_node(&self, node_id: &str) -> Result<Vec<(String, u32)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, attempt FROM jobs WHERE node_id = ?1 AND state IN ('assigned', 'running')",
        )?;
        let rows = statement.query_map([node_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }

    /// The node and attempt a job currently runs on, if it is assigned or running.
    pub fn current_execution(&self, job_id: &str) -> Result<Option<(String, u32)>, StoreError> {
        query_row(
            &self.conn,
            "SELECT node_id, attempt FROM jobs WHERE id = ?1 AND state IN ('assigned', 'running')",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(StoreError::from)
    }

    /// Attempts the database places on `node_id` that the node does not list as running, and
    /// that changed state more than `grace_ms` ago (younger ones may be in flight).
    pub fn unreported_on_node(
        &self,
        node_id: &str,
        running: &[ExecutionRef],
        grace_ms: u64,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        let cutoff = now_ms().saturating_sub(grace_ms) as i64;
        let mut statement = self.conn.prepare_cached(
            "SELECT id, attempt FROM jobs WHERE node_id = ?1 AND state IN ('assigned', 'running')
                 AND updated_ms < ?2",
        )?;
        let rows = statement.query_map(params![node_id, cutoff], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
        })?;
        let mut missing = Vec::new();
        for row in rows {
            let (job_id, attempt) = row?;
            if !running
                .iter()
                .any(|r| r.job_id == job_id && r.attempt == attempt)
            {
                missing.push((job_id, attempt));
            }
        }
        Ok(missing)
    }

    /// Jobs past their total-timeout deadline that have not ended (nor been asked to stop).
    pub fn overdue(&self, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id FROM jobs WHERE deadline_ms IS NOT NULL AND deadline_ms < ?1
                 AND state IN ('pending', 'assigned', 'running') AND cancel_requested = 0",
        )?;
        let rows = statement.query_map([now_ms as i64], |r| r.get(0))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }

    /// Pending jobs that have waited longer than their queue timeout (`default_ms` where the job
    /// set none) at `now`.
    pub fn queue_expired(
        &self,
        now: u64,
        default_ms: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, COALESCE(queue_timeout_ms, ?1) FROM jobs
                 WHERE state = 'pending' AND updated_ms + COALESCE(queue_timeout_ms, ?1) < ?2
                 ORDER BY created_ms, id",
        )?;
        let rows = statement.query_map(params![default_ms as i64, now as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
    }

    /// An ended job with what its receipt states beyond the job record: `NotFound`, or
    /// `InvalidState` while it has not been settled or refunded.
    pub fn closed_job(&self, job_id: &str) -> Result<ClosedJob, StoreError> {
        let record = self.get_job(job_id)?;
        if !record.state.is_terminal() || record.cost_micros.is_none() {
            return Err(StoreError::InvalidState(format!(
                "job {job_id} is {}: its receipt exists once it has ended and its escrow is closed",
                record.state.as_str()
            )));
        }
        let closed = query_row(
            &self.conn,
            // Jobs assigned before the provider was recorded on them (schema 0003) were paid to
            // their node's registered provider.
            "SELECT j.spec,
                    COALESCE(j.provider_account, json_extract(n.registration, '$.provider_account')),
                    j.started_ms, t.id, j.node_report, e.public_key, j.billed_elapsed_ms, j.fee_bps,
                    j.spec_sha256, j.result_sha256
             FROM jobs j JOIN ledger_tx t ON t.idem_key = 'close:' || j.id
             LEFT JOIN nodes n ON n.id = j.node_id
             LEFT JOIN enrolments e ON e.node_id = j.node_id WHERE j.id = ?1",
            [job_id],
            |r| {
                let spec: String = r.get(0)?;
                let charged = record.cost_micros.unwrap_or(0) > 0;
                // A pruned job keeps the digests its payloads had.
                let (spec_sha256, result_sha256): (Option<String>, Option<String>) =
                    (r.get(8)?, r.get(9)?);
                Ok(ClosedJob {
                    spec_sha256: spec_sha256
                        .unwrap_or_else(|| crate::sha256_hex(spec.as_bytes())),
                    result_sha256: result_sha256
                        .unwrap_or_else(|| super::retention::result_sha256(&record)),
                    provider_account: r.get::<_, Option<String>>(1)?.filter(|_| charged),
                    started_ms: r.get::<_, Option<i64>>(2)?.map(|ms| ms as u64),
                    ledger_tx_id: r.get(3)?,
                    node_report: r
                        .get::<_, Option<String>>(4)?
                        .and_then(|json| serde_json::from_str(&json).ok()),
                    node_key: r.get(5)?,
                    billed_elapsed_ms: r.get::<_, Option<i64>>(6)?.map(|ms| ms as u64),
                    fee_bps: r.get::<_, Option<u32>>(7)?,
                    record: record.clone(),
                })
            },
        )?;
        Ok(closed)
    }
}

/// An ended job and the facts its receipt adds to the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedJob {
    pub record: JobRecord,
    /// SHA-256 of the spec as stored.
    pub spec_sha256: String,
    /// SHA-256 of the result as the receipt encodes it (exit code, stdout, stderr, output
    /// files, blob digests).
    pub result_sha256: String,
    /// The account paid (recorded at assignment), when the job was charged.
    pub provider_account: Option<String>,
    pub started_ms: Option<u64>,
    /// The ledger transaction that closed the escrow.
    pub ledger_tx_id: i64,
    /// The node's signed result report, when it signed one.
    pub node_report: Option<super::SignedReport>,
    /// The key the node was enrolled with.
    pub node_key: Option<String>,
    /// The run time billed (the node's report bounded by what the orchestrator measured), when
    /// the job was charged.
    pub billed_elapsed_ms: Option<u64>,
    /// The fee rate the job was settled at (`None`: refunded, or settled before it was kept).
    pub fee_bps: Option<u32>,
}

/// The id of the API key `key_sha256` when it is `account`'s, neither revoked nor expired, and a
/// hold of `hold_micros` fits its credit limit: spent + held by its open jobs + this hold ≤ limit.
/// The payer cannot cover the hold.
fn insufficient(account: &str, balance_micros: i64, max_cost_micros: i64) -> StoreError {
    StoreError::InsufficientFunds(format!(
        "account {account} has {} but the job's max cost is {}; deposit more or lower --max-cost",
        format_usd(balance_micros),
        format_usd(max_cost_micros)
    ))
}

fn key_budget(
    tx: &rusqlite::Connection,
    key_sha256: &str,
    account: &str,
    hold_micros: i64,
) -> Result<String, StoreError> {
    type KeyRow = (String, String, Option<i64>, i64, Option<i64>, Option<i64>);
    let (key_id, key_account, limit, spent, revoked_ms, expires_ms): KeyRow = tx
        .prepare_cached(
            "SELECT key_id, account_id, credit_limit_micros, spent_micros, revoked_ms, expires_ms
             FROM api_keys WHERE key_sha256 = ?1",
        )?
        .query_row(params![key_sha256], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?
        .ok_or_else(|| StoreError::NotFound("invalid API key".to_owned()))?;
    if key_account != account {
        return Err(StoreError::Forbidden(format!(
            "API key {key_id} is account {key_account}'s: the job must be charged to it, not to {account}"
        )));
    }
    if let Some(when) = revoked_ms {
        return Err(StoreError::Forbidden(format!(
            "API key {key_id} was revoked (at {when} ms)"
        )));
    }
    if let Some(when) = expires_ms
        && when <= now_ms() as i64
    {
        return Err(StoreError::Forbidden(format!(
            "API key {key_id} expired (at {when} ms)"
        )));
    }
    if let Some(limit) = limit {
        let held: i64 = query_row(
            tx,
            "SELECT COALESCE(SUM(max_cost_micros), 0) FROM jobs WHERE key_id = ?1 AND cost_micros IS NULL",
            [&key_id],
            |r| r.get(0),
        )?;
        let left = limit.saturating_sub(spent).saturating_sub(held);
        if hold_micros > left {
            return Err(StoreError::InsufficientFunds(format!(
                "API key {key_id} has {} of its {} credit limit left ({} spent, {} held by requests in flight); this request holds {}",
                format_usd(left.max(0)),
                format_usd(limit),
                format_usd(spent),
                format_usd(held),
                format_usd(hold_micros)
            )));
        }
    }
    Ok(key_id)
}

/// A metered (inference) job's most input and output units; `None` for time-billed jobs.
pub(super) fn metered_limits(spec: &JobSpec) -> Option<(u64, u64)> {
    match &spec.workload {
        rhizos_broker::wire::Workload::Inference {
            max_input_units,
            max_output_units,
            ..
        } => Some((*max_input_units, *max_output_units)),
        _ => None,
    }
}

/// A job to accept: its owner `account`, and who pays its hold (`payer`: a flow's escrow;
/// `None`: the owner).
pub(super) struct Accept<'a> {
    pub job_id: &'a str,
    pub account: &'a str,
    pub payer: Option<&'a str>,
    pub spec: &'a JobSpec,
    pub spec_json: &'a str,
    pub max_cost_micros: i64,
    pub key_id: Option<&'a str>,
}

/// Records a job pending and holds its `max_cost` from its payer in its escrow account, with
/// its events, in `tx`.
pub(super) fn accept(
    tx: &rusqlite::Connection,
    ctx: &super::Ctx,
    job: Accept<'_>,
    now: u64,
) -> Result<(), StoreError> {
    let Accept {
        job_id,
        account,
        payer,
        spec,
        spec_json,
        max_cost_micros,
        key_id,
    } = job;
    let paying = payer.unwrap_or(account);
    exec(tx,
        "INSERT INTO jobs (id, account_id, backend, spec, state, max_cost_micros, created_ms, updated_ms, deadline_ms,
                           cpu_cores, memory_mib, gpus, queue_timeout_ms, timeout_ms, key_id,
                           max_input_units, max_output_units, payer_account)
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            job_id,
            account,
            spec.workload.backend(),
            spec_json,
            max_cost_micros,
            now as i64,
            spec.total_timeout_ms.map(|t| now.saturating_add(t) as i64),
            spec.cpu_cores,
            spec.memory_mib as i64,
            spec.gpus,
            spec.queue_timeout_ms.map(|t| t as i64),
            i64::try_from(spec.timeout_ms).unwrap_or(i64::MAX),
            key_id,
            metered_limits(spec).map(|(i, _)| i as i64),
            metered_limits(spec).map(|(_, o)| o as i64),
            payer,
        ],
    )
    ?;
    let escrow = escrow_account(job_id);
    ledger::ensure_account(tx, &escrow, AccountKind::Escrow, now)?;
    ledger::post(
        tx,
        &format!("hold:{job_id}"),
        TxKind::Hold,
        Some(job_id),
        &[(paying, -max_cost_micros), (&escrow, max_cost_micros)],
        now,
    )
    .map_err(|e| match e {
        LedgerError::InsufficientFunds { balance_micros, .. } => {
            insufficient(paying, balance_micros, max_cost_micros)
        }
        other => other.into(),
    })?;
    ctx.emit_job(tx, job_id, JobState::Pending, 0, None, None, now)?;
    ctx.emit(
        tx,
        DomainEvent::Escrow {
            job_id: job_id.to_owned(),
            movement: Movement::Held,
            account: account.to_owned(),
            amount_micros: max_cost_micros,
            provider_account: None,
            provider_micros: None,
            fee_micros: None,
            refund_micros: None,
        },
        now,
    )?;
    Ok(())
}
