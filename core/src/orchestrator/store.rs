//! Durable orchestrator state in one SQLite file (WAL): jobs, nodes, the escrow ledger and the
//! event outbox. Every state change of a job, its money movement and the events describing both
//! are written in one transaction, so they can never disagree.

use crate::ledger::{self, AccountKind, Applied, LedgerError, escrow_account, exec, query_row};
use rhizos_broker::Subjects;
use rhizos_broker::subjects::EscrowEventKind;
use rhizos_broker::wire::{
    AccountView, ErrorCode, EscrowKind, Event, EventBody, ExecutionOutcome, ExitKind, JobSpec,
    JobState, JobView, ListJobs, Pricing, RegisterNode, WIRE_VERSION, WireError,
};
use rusqlite::{Connection, OptionalExtension, Savepoint, params};
use std::path::Path;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    node_id TEXT,
    pricing TEXT,
    max_cost_micros INTEGER NOT NULL,
    cost_micros INTEGER,
    provider_micros INTEGER,
    fee_micros INTEGER,
    refund_micros INTEGER,
    exit_code INTEGER,
    stdout TEXT,
    stderr TEXT,
    reason TEXT,
    elapsed_ms INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    -- Why a running job is being stopped: 'user' (cancel) or 'total_timeout'.
    stop_reason TEXT,
    -- created_ms + total_timeout_ms, when the job has one.
    deadline_ms INTEGER,
    -- The job's own queue timeout (NULL: the orchestrator's default).
    queue_timeout_ms INTEGER,
    -- WASM fuel the last execution burned, when its backend meters it.
    fuel_consumed INTEGER,
    -- Files the workload left in /output: JSON object, relative path → base64.
    output_files TEXT,
    -- The allocation, so a node's committed resources are one query away.
    cpu_cores INTEGER NOT NULL DEFAULT 1,
    memory_mib INTEGER NOT NULL DEFAULT 0,
    gpus INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, created_ms);
CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs(account_id, created_ms);
-- A node's active attempts (heartbeat reconciliation, lost nodes).
CREATE INDEX IF NOT EXISTS jobs_by_node ON jobs(node_id, state);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    registration TEXT NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- How each attempt ended on its node: the provider's record (reputation) is built from this.
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    outcome TEXT NOT NULL, -- succeeded | job_failed | node_failed | cancelled
    ended_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_node ON attempts(node_id, ended_ms);
-- Per node, kept up to date in the transaction that records each attempt's end: attempts ended,
-- of which succeeded, and `recent`, one letter per attempt that counts for reputation ('s'
-- succeeded, 'f' failed through the node), newest last, at most REPUTATION_WINDOW letters.
CREATE TABLE IF NOT EXISTS node_stats (
    node_id TEXT PRIMARY KEY,
    ended INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    recent TEXT NOT NULL
);
";

/// How many of a node's latest attempts its reputation is computed over.
pub const REPUTATION_WINDOW: usize = 100;

/// Columns added after a table was first released: (table, column, declaration).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("jobs", "queue_timeout_ms", "INTEGER"),
    ("jobs", "fuel_consumed", "INTEGER"),
    ("jobs", "output_files", "TEXT"),
];

/// A job waiting for a node.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub job_id: String,
    pub spec: std::sync::Arc<JobSpec>,
    pub max_cost_micros: i64,
    pub attempt: u32,
    /// When the job (last) became pending: at submit, or when it was requeued.
    pub pending_since_ms: u64,
}

/// What an agent's report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportEffect {
    /// The report moved the job on.
    Applied,
    /// Already known (a retried report): nothing changed.
    Duplicate,
    /// The report is for an attempt or node the job no longer has: ignored, nothing paid.
    Stale(String),
}

/// What a cancel request did.
#[derive(Debug, Clone)]
pub struct CancelEffect {
    pub job: JobView,
    /// The node must be told to stop this attempt (the job was running there).
    pub stop: Option<(String, u32)>,
}

/// An outbox row waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub subject: String,
    pub payload: Vec<u8>,
}

pub struct Store {
    conn: Connection,
    ctx: Ctx,
    /// Random id of this database, part of every event's dedupe id.
    instance: String,
    /// Set once checkpoints run on their own thread; dropping it stops that thread.
    checkpointer: Option<std::sync::mpsc::Sender<()>>,
    /// Parsed specs of pending jobs (a spec carries its workload, e.g. a whole WASM module:
    /// dispatch passes must not parse it again each time). Filled at submit and on a miss,
    /// emptied when the job leaves pending; at most [`SPEC_CACHE_ENTRIES`].
    spec_cache: std::collections::HashMap<String, std::sync::Arc<JobSpec>>,
}

/// Most parsed specs kept (dispatch looks at the oldest 256 pending jobs at a time).
const SPEC_CACHE_ENTRIES: usize = 4096;

/// What the writers need besides the connection (borrowed beside an open transaction).
struct Ctx {
    fee_bps: u32,
    subjects: Subjects,
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(
        ErrorCode::Internal,
        format!("orchestrator storage error: {e}"),
    )
}

impl From<LedgerError> for WireError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientFunds { .. } => {
                WireError::new(ErrorCode::InsufficientFunds, e.to_string())
            }
            LedgerError::NoAccount(_) => WireError::new(ErrorCode::NotFound, e.to_string()),
            LedgerError::NonPositive(_) => WireError::new(ErrorCode::BadRequest, e.to_string()),
            other => internal(other),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, fee_bps: u32, subjects: Subjects) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed movement survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays prepared (there are about fifty).
        conn.set_prepared_statement_cache_capacity(256);
        // Savepoint sub-journals (one per operation inside a group commit) stay in memory.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // 64 MiB of page cache (negative: KiB): job rows carry their workload, so the working
        // set of a busy orchestrator is far above SQLite's default 2 MiB.
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.execute_batch(ledger::SCHEMA)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        let instance: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'instance'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let instance = match instance {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::now_v7().simple().to_string();
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('instance', ?1)",
                    [&id],
                )?;
                id
            }
        };
        let mut store = Self {
            conn,
            ctx: Ctx { fee_bps, subjects },
            instance,
            checkpointer: None,
            spec_cache: std::collections::HashMap::new(),
        };
        let tx = store.tx().map_err(|_| rusqlite::Error::InvalidQuery)?;
        let now = now_ms();
        for (id, kind) in [
            (ledger::EXTERNAL, AccountKind::External),
            (ledger::PLATFORM_FEES, AccountKind::Platform),
        ] {
            ledger::ensure_account(&tx, id, kind, now)
                .map_err(|_| rusqlite::Error::InvalidQuery)?;
        }
        tx.commit()?;
        Ok(store)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// One operation's unit of work: a savepoint, so it commits or rolls back as a whole — on
    /// its own, or nested inside a group commit (see [`Store::group_commit`]).
    fn tx(&mut self) -> Result<Savepoint<'_>, WireError> {
        self.conn.savepoint().map_err(internal)
    }

    /// [`Store::tx`] plus the writer context.
    fn begin(&mut self) -> Result<(Savepoint<'_>, &Ctx), WireError> {
        let tx = self.conn.savepoint().map_err(internal)?;
        Ok((tx, &self.ctx))
    }

    /// Runs `ops` inside one SQLite transaction and commits once (one fsync for the batch). Each
    /// op still has its own savepoint, so a failed op undoes only itself. Returns the commit's
    /// outcome; callers must not act on any op's result before it.
    pub fn group_commit<R>(
        &mut self,
        ops: impl FnOnce(&mut Store) -> R,
    ) -> (R, Result<(), String>) {
        let grouped = self.conn.execute_batch("BEGIN IMMEDIATE").is_ok()
            || (self.conn.execute_batch("ROLLBACK").is_ok()
                && self.conn.execute_batch("BEGIN IMMEDIATE").is_ok());
        let results = ops(self);
        if !grouped {
            // No outer transaction: each op's savepoint committed it on its own.
            return (results, Ok(()));
        }
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => (results, Ok(())),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                (results, Err(format!("commit failed: {e}")))
            }
        }
    }

    /// Moves WAL checkpoints (copying committed pages back into the database file, with its own
    /// fsync) off the thread that writes: a second connection checkpoints every `every` in
    /// PASSIVE mode, which never blocks the writer, so commits pay for their WAL append only.
    /// The thread makes a last checkpoint and ends when the store is dropped.
    pub fn checkpoint_in_background(
        &mut self,
        path: &Path,
        every: std::time::Duration,
    ) -> rusqlite::Result<()> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("rhizos-checkpoint".into())
            .spawn(move || {
                let checkpoint = |mode: &str| {
                    if let Err(e) =
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                    }
                };
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    checkpoint("PASSIVE");
                }
                checkpoint("TRUNCATE");
            })
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        // Now nobody else checkpoints: commits no longer stop to copy pages back.
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        self.checkpointer = Some(stop);
        Ok(())
    }

    /// The database's random instance id (part of event dedupe ids).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    // ----- accounts -----

    pub fn create_account(&mut self, account: &str) -> Result<AccountView, WireError> {
        let tx = self.tx()?;
        if !ledger::ensure_account(&tx, account, AccountKind::User, now_ms())? {
            return Err(WireError::new(
                ErrorCode::AlreadyExists,
                format!("account {account} already exists"),
            ));
        }
        tx.commit().map_err(internal)?;
        self.account(account)
    }

    pub fn deposit(
        &mut self,
        account: &str,
        amount_micros: i64,
        key: Option<&str>,
    ) -> Result<AccountView, WireError> {
        if amount_micros <= 0 {
            return Err(LedgerError::NonPositive(amount_micros).into());
        }
        let tx = self.tx()?;
        if ledger::balance(&tx, account)?.is_none() {
            return Err(no_account(account));
        }
        let key = match key {
            Some(k) => format!("deposit:{account}:{k}"),
            None => format!("deposit:{account}:{}", uuid::Uuid::now_v7().simple()),
        };
        ledger::post(
            &tx,
            &key,
            "deposit",
            None,
            &[(ledger::EXTERNAL, -amount_micros), (account, amount_micros)],
            now_ms(),
        )?;
        tx.commit().map_err(internal)?;
        self.account(account)
    }

    pub fn account(&self, account: &str) -> Result<AccountView, WireError> {
        let balance = ledger::balance(&self.conn, account)?.ok_or_else(|| no_account(account))?;
        let held_micros: i64 = query_row(
            &self.conn,
            "SELECT COALESCE(SUM(max_cost_micros), 0) FROM jobs WHERE account_id = ?1
                 AND state IN ('pending', 'assigned', 'running')",
            [account],
            |r| r.get(0),
        )
        .map_err(internal)?;
        Ok(AccountView {
            account: account.to_owned(),
            balance_micros: balance,
            held_micros,
        })
    }

    // ----- jobs -----

    /// Accepts a job: records it pending and holds `max_cost` in its escrow account. Submitting
    /// the same `job_id` again for the same account returns the existing job (`false`).
    pub fn submit(
        &mut self,
        job_id: &str,
        account: &str,
        spec: &JobSpec,
        max_cost_micros: i64,
    ) -> Result<(JobView, bool), WireError> {
        if let Some(existing) = self.find_job(job_id)? {
            if existing.account != account {
                return Err(WireError::new(
                    ErrorCode::AlreadyExists,
                    format!("job id {job_id} is taken"),
                ));
            }
            return Ok((existing, false));
        }
        let spec_json = serde_json::to_string(spec).map_err(internal)?;
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        match query_row(
            &tx,
            "SELECT kind FROM accounts WHERE id = ?1",
            [account],
            |r| r.get::<_, String>(0),
        )
        .optional()
        .map_err(internal)?
        {
            Some(kind) if kind == "user" || kind == "provider" => {}
            _ => return Err(no_account(account)),
        }
        exec(&tx,
            "INSERT INTO jobs (id, account_id, backend, spec, state, max_cost_micros, created_ms, updated_ms, deadline_ms,
                               cpu_cores, memory_mib, gpus, queue_timeout_ms)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?6, ?7, ?8, ?9, ?10, ?11)",
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
                spec.queue_timeout_ms.map(|t| t as i64)
            ],
        )
        .map_err(internal)?;
        let escrow = escrow_account(job_id);
        ledger::ensure_account(&tx, &escrow, AccountKind::Escrow, now)?;
        ledger::post(&tx, &format!("hold:{job_id}"), "hold", Some(job_id), &[(account, -max_cost_micros), (&escrow, max_cost_micros)], now)
            .map_err(|e| match e {
                LedgerError::InsufficientFunds { balance_micros, .. } => WireError::new(
                    ErrorCode::InsufficientFunds,
                    format!(
                        "account {account} has {} but the job's max cost is {}; deposit more or lower --max-cost",
                        format_usd(balance_micros),
                        format_usd(max_cost_micros)
                    ),
                ),
                other => other.into(),
            })?;
        ctx.emit_job(&tx, job_id, JobState::Pending, 0, None, None, now)?;
        ctx.emit(
            &tx,
            ctx.subjects
                .escrow_event(EscrowEventKind::Held, job_id)
                .map_err(internal)?,
            EventBody::Escrow {
                job_id: job_id.to_owned(),
                kind: EscrowKind::Held,
                account: account.to_owned(),
                amount_micros: max_cost_micros,
                provider_account: None,
                provider_micros: None,
                fee_micros: None,
                refund_micros: None,
            },
            now,
        )?;
        tx.commit().map_err(internal)?;
        Ok((self.get_job(job_id)?, true))
    }

    pub fn find_job(&self, job_id: &str) -> Result<Option<JobView>, WireError> {
        query_row(
            &self.conn,
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [job_id],
            job_from_row,
        )
        .optional()
        .map_err(internal)
    }

    pub fn get_job(&self, job_id: &str) -> Result<JobView, WireError> {
        self.find_job(job_id)?
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, format!("no job {job_id}")))
    }

    pub fn list_jobs(&self, filter: &ListJobs) -> Result<Vec<JobView>, WireError> {
        let limit = filter.limit.unwrap_or(50).min(1000);
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR account_id = ?1) AND (?2 IS NULL OR state = ?2)
                 ORDER BY created_ms DESC, id DESC LIMIT ?3"
            ))
            .map_err(internal)?;
        let rows = statement
            .query_map(
                params![filter.account, filter.state.map(JobState::as_str), limit],
                job_from_row,
            )
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }

    /// Pending jobs, oldest first.
    pub fn pending_jobs(&mut self, limit: usize) -> Result<Vec<PendingJob>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, max_cost_micros, attempt, updated_ms FROM jobs WHERE state = 'pending'
                 ORDER BY created_ms, id LIMIT ?1",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map([limit as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(internal)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        drop(statement);
        let mut jobs = Vec::with_capacity(rows.len());
        for (job_id, max_cost_micros, attempt, pending_since_ms) in rows {
            let spec = self.pending_spec(&job_id)?;
            jobs.push(PendingJob {
                job_id,
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
    fn pending_spec(&mut self, job_id: &str) -> Result<std::sync::Arc<JobSpec>, WireError> {
        if let Some(spec) = self.spec_cache.get(job_id) {
            return Ok(spec.clone());
        }
        let text: String = query_row(
            &self.conn,
            "SELECT spec FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )
        .map_err(internal)?;
        let spec = std::sync::Arc::new(serde_json::from_str::<JobSpec>(&text).map_err(internal)?);
        if self.spec_cache.len() < SPEC_CACHE_ENTRIES {
            self.spec_cache.insert(job_id.to_owned(), spec.clone());
        }
        Ok(spec)
    }

    /// Whether a job other than `job_id` is pending (one indexed probe).
    pub fn pending_other_than(&self, job_id: &str) -> Result<bool, WireError> {
        query_row(
            &self.conn,
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'pending' AND id != ?1)",
            [job_id],
            |r| r.get(0),
        )
        .map_err(internal)
    }

    /// What each node has committed to assigned or running executions.
    pub fn active_per_node(&self) -> Result<Vec<(String, super::matching::Allocation)>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT node_id, COUNT(*), SUM(cpu_cores), SUM(memory_mib), SUM(gpus) FROM jobs
                 WHERE state IN ('assigned', 'running') GROUP BY node_id",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    super::matching::Allocation {
                        jobs: r.get(1)?,
                        cpu_cores: r.get(2)?,
                        memory_mib: r.get::<_, i64>(3)? as u64,
                        gpus: r.get(4)?,
                    },
                ))
            })
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }

    /// Assigned or running attempts on one node.
    pub fn active_on_node(&self, node_id: &str) -> Result<Vec<(String, u32)>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, attempt FROM jobs WHERE node_id = ?1 AND state IN ('assigned', 'running')")
            .map_err(internal)?;
        let rows = statement
            .query_map([node_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }

    /// pending → assigned to `node_id` with a new attempt number, at the node's `pricing`.
    /// Returns the attempt, or `None` if the job is no longer pending.
    pub fn assign(
        &mut self,
        job_id: &str,
        node_id: &str,
        pricing: &Pricing,
    ) -> Result<Option<u32>, WireError> {
        let now = now_ms();
        let pricing = serde_json::to_string(pricing).map_err(internal)?;
        let (tx, ctx) = self.begin()?;
        let attempt: Option<u32> = query_row(
            &tx,
            "UPDATE jobs SET state = 'assigned', attempt = attempt + 1, node_id = ?2, pricing = ?3, updated_ms = ?4
             WHERE id = ?1 AND state = 'pending' RETURNING attempt",
            params![job_id, node_id, pricing, now as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(internal)?;
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
        tx.commit().map_err(internal)?;
        Ok(Some(attempt))
    }

    /// assigned → pending again, when the node did not take the assignment.
    pub fn unassign(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        reason: &str,
    ) -> Result<(), WireError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let changed = exec(
            &tx,
            "UPDATE jobs SET state = 'pending', node_id = NULL, pricing = NULL, updated_ms = ?3
                 WHERE id = ?1 AND attempt = ?2 AND state = 'assigned'",
            params![job_id, attempt, now as i64],
        )
        .map_err(internal)?;
        if changed == 1 {
            record_attempt(&tx, job_id, attempt, node_id, "node_failed", now)?;
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
        tx.commit().map_err(internal)
    }

    /// Loads `(state, node_id, attempt)` of a job for report checks.
    fn attempt_of(
        tx: &Connection,
        job_id: &str,
    ) -> Result<Option<(JobState, Option<String>, u32)>, WireError> {
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
        .optional()
        .map_err(internal)?
        .map(|(state, node, attempt)| {
            JobState::parse(&state)
                .map(|s| (s, node, attempt))
                .ok_or_else(|| internal(format!("bad state {state}")))
        })
        .transpose()
    }

    fn check_attempt(
        tx: &Connection,
        job_id: &str,
        node_id: &str,
        attempt: u32,
    ) -> Result<Result<JobState, ReportEffect>, WireError> {
        let Some((state, node, current)) = Self::attempt_of(tx, job_id)? else {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("no job {job_id}"),
            ));
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
    ) -> Result<ReportEffect, WireError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let state = match Self::check_attempt(&tx, job_id, node_id, attempt)? {
            Ok(state) => state,
            Err(effect) => return Ok(effect),
        };
        if state != JobState::Assigned {
            return Ok(ReportEffect::Duplicate);
        }
        exec(
            &tx,
            "UPDATE jobs SET state = 'running', updated_ms = ?2 WHERE id = ?1",
            params![job_id, now as i64],
        )
        .map_err(internal)?;
        ctx.emit_job(
            &tx,
            job_id,
            JobState::Running,
            attempt,
            Some(node_id),
            None,
            now,
        )?;
        tx.commit().map_err(internal)?;
        Ok(ReportEffect::Applied)
    }

    /// Records the end of the current attempt and settles or refunds its escrow, exactly once.
    pub fn finish(
        &mut self,
        job_id: &str,
        node_id: &str,
        attempt: u32,
        outcome: &ExecutionOutcome,
        max_output_bytes: usize,
    ) -> Result<ReportEffect, WireError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let state = match Self::check_attempt(&tx, job_id, node_id, attempt)? {
            Ok(state) => state,
            Err(effect) => return Ok(effect),
        };
        if state.is_terminal() {
            return Ok(ReportEffect::Duplicate);
        }
        // The allocation from its own columns: the spec (with its workload) is not parsed here.
        let (cpu_cores, memory_mib, gpus, pricing, cancel_requested, stop_reason): (
            u32,
            i64,
            u32,
            Option<String>,
            bool,
            Option<String>,
        ) = query_row(
            &tx,
            "SELECT cpu_cores, memory_mib, gpus, pricing, cancel_requested, stop_reason FROM jobs WHERE id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .map_err(internal)?;
        let timed_out = stop_reason.as_deref() == Some("total_timeout");
        let pricing: Pricing = pricing
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(internal)?
            .ok_or_else(|| internal(format!("job {job_id} has no agreed pricing")))?;
        let (final_state, charge, reason) = match (outcome.kind, outcome.exit_code) {
            (ExitKind::Exited, Some(0)) => (JobState::Succeeded, true, None),
            (ExitKind::Exited, code) => (
                JobState::Failed,
                false,
                Some(format!("exited with code {}", code.unwrap_or(-1))),
            ),
            // The user asked to stop a running job: the provider is paid for the time used.
            (ExitKind::Cancelled, _) if cancel_requested && timed_out => (
                JobState::TimedOut,
                true,
                Some("stopped at the job's total timeout".to_owned()),
            ),
            (ExitKind::Cancelled, _) if cancel_requested => (
                JobState::Cancelled,
                true,
                Some("cancelled by the user while running".to_owned()),
            ),
            (kind, _) => (
                JobState::Failed,
                false,
                Some(
                    outcome
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("execution ended: {kind:?}")),
                ),
            ),
        };
        let measured = ledger::cost_micros(
            outcome.elapsed_ms,
            cpu_cores,
            memory_mib as u64,
            gpus,
            &pricing,
        )
        .saturating_add(ledger::fuel_cost_micros(
            outcome.fuel_consumed.unwrap_or(0),
            &pricing,
        ));
        let stdout = truncate_tail(&outcome.stdout, max_output_bytes);
        let stderr = truncate_tail(&outcome.stderr, max_output_bytes);
        exec(&tx,
            "UPDATE jobs SET state = ?2, exit_code = ?3, stdout = ?4, stderr = ?5, reason = ?6, elapsed_ms = ?7,
             updated_ms = ?8, fuel_consumed = ?9, output_files = ?10 WHERE id = ?1",
            params![
                job_id,
                final_state.as_str(),
                outcome.exit_code,
                stdout,
                stderr,
                reason,
                outcome.elapsed_ms as i64,
                now as i64,
                outcome.fuel_consumed.map(|f| f as i64),
                (!outcome.output_files.is_empty())
                    .then(|| serde_json::to_string(&outcome.output_files).unwrap_or_default())
            ],
        )
        .map_err(internal)?;
        ctx.emit_job(
            &tx,
            job_id,
            final_state,
            attempt,
            Some(node_id),
            reason.as_deref(),
            now,
        )?;
        let attempt_outcome = match final_state {
            JobState::Succeeded => "succeeded",
            JobState::Cancelled => "cancelled",
            // The workload's own failure (exit code, trap, its limits, an invalid module).
            _ => "job_failed",
        };
        record_attempt(&tx, job_id, attempt, node_id, attempt_outcome, now)?;
        if charge {
            ctx.settle(&tx, job_id, measured, now)?;
        } else {
            ctx.refund(&tx, job_id, now)?;
        }
        tx.commit().map_err(internal)?;
        Ok(ReportEffect::Applied)
    }

    /// Ends a job that is not running anywhere any more (queue timeout, lost node, cancel before
    /// start) with a full refund.
    pub fn end_with_refund(
        &mut self,
        job_id: &str,
        state: JobState,
        reason: &str,
    ) -> Result<bool, WireError> {
        self.spec_cache.remove(job_id);
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let Some((current, node, attempt)) = Self::attempt_of(&tx, job_id)? else {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("no job {job_id}"),
            ));
        };
        if current.is_terminal() {
            return Ok(false);
        }
        exec(
            &tx,
            "UPDATE jobs SET state = ?2, reason = ?3, updated_ms = ?4 WHERE id = ?1",
            params![job_id, state.as_str(), reason, now as i64],
        )
        .map_err(internal)?;
        ctx.emit_job(
            &tx,
            job_id,
            state,
            attempt,
            node.as_deref(),
            Some(reason),
            now,
        )?;
        ctx.refund(&tx, job_id, now)?;
        tx.commit().map_err(internal)?;
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
    ) -> Result<Option<JobState>, WireError> {
        let now = now_ms();
        let (tx, ctx) = self.begin()?;
        let Some((state, node, current)) = Self::attempt_of(&tx, job_id)? else {
            return Err(WireError::new(
                ErrorCode::NotFound,
                format!("no job {job_id}"),
            ));
        };
        if current != attempt || !matches!(state, JobState::Assigned | JobState::Running) {
            return Ok(None);
        }
        if let Some(node) = &node {
            record_attempt(&tx, job_id, attempt, node, "node_failed", now)?;
        }
        let spec: String = query_row(&tx, "SELECT spec FROM jobs WHERE id = ?1", [job_id], |r| {
            r.get(0)
        })
        .map_err(internal)?;
        let spec: JobSpec = serde_json::from_str(&spec).map_err(internal)?;
        let retries_used = attempt.saturating_sub(1);
        let cancel_requested: bool = query_row(
            &tx,
            "SELECT cancel_requested FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )
        .map_err(internal)?;
        if retries_used < spec.max_retries && !cancel_requested {
            let reason = format!(
                "{reason}; requeued (retry {} of {})",
                retries_used + 1,
                spec.max_retries
            );
            exec(&tx,
                "UPDATE jobs SET state = 'pending', node_id = NULL, pricing = NULL, reason = ?2, updated_ms = ?3
                 WHERE id = ?1",
                params![job_id, reason, now as i64],
            )
            .map_err(internal)?;
            ctx.emit_job(
                &tx,
                job_id,
                JobState::Pending,
                attempt,
                None,
                Some(&reason),
                now,
            )?;
            tx.commit().map_err(internal)?;
            return Ok(Some(JobState::Pending));
        }
        let stop_reason: Option<String> = query_row(
            &tx,
            "SELECT stop_reason FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )
        .map_err(internal)?;
        let (final_state, reason) =
            if cancel_requested && stop_reason.as_deref() == Some("total_timeout") {
                (
                    JobState::TimedOut,
                    format!("{reason}; the job had reached its total timeout"),
                )
            } else if cancel_requested {
                (
                    JobState::Cancelled,
                    format!("{reason}; the job was being cancelled"),
                )
            } else {
                (
                    JobState::Failed,
                    format!("{reason}; no retries left ({} allowed)", spec.max_retries),
                )
            };
        exec(
            &tx,
            "UPDATE jobs SET state = ?2, reason = ?3, updated_ms = ?4 WHERE id = ?1",
            params![job_id, final_state.as_str(), reason, now as i64],
        )
        .map_err(internal)?;
        ctx.emit_job(
            &tx,
            job_id,
            final_state,
            attempt,
            node.as_deref(),
            Some(&reason),
            now,
        )?;
        ctx.refund(&tx, job_id, now)?;
        tx.commit().map_err(internal)?;
        Ok(Some(final_state))
    }

    /// Attempts the database places on `node_id` that the node does not list as running, and
    /// that changed state more than `grace_ms` ago (younger ones may be in flight).
    pub fn unreported_on_node(
        &self,
        node_id: &str,
        running: &[rhizos_broker::wire::ExecutionRef],
        grace_ms: u64,
    ) -> Result<Vec<(String, u32)>, WireError> {
        let cutoff = now_ms().saturating_sub(grace_ms) as i64;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, attempt FROM jobs WHERE node_id = ?1 AND state IN ('assigned', 'running')
                 AND updated_ms < ?2",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map(params![node_id, cutoff], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
            })
            .map_err(internal)?;
        let mut missing = Vec::new();
        for row in rows {
            let (job_id, attempt) = row.map_err(internal)?;
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
    pub fn overdue(&self, now_ms: u64) -> Result<Vec<String>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id FROM jobs WHERE deadline_ms IS NOT NULL AND deadline_ms < ?1
                 AND state IN ('pending', 'assigned', 'running') AND cancel_requested = 0",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map([now_ms as i64], |r| r.get(0))
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }

    /// The total timeout passed: a job that never started ends `timed_out` with a full refund;
    /// a running one is flagged and its node must be told to stop it (returned), after which
    /// it ends `timed_out`, paying the time used.
    pub fn time_out(&mut self, job_id: &str) -> Result<Option<(String, u32)>, WireError> {
        let job = self.get_job(job_id)?;
        let reason = "the job's total timeout passed";
        match job.state {
            JobState::Pending | JobState::Assigned => {
                self.end_with_refund(job_id, JobState::TimedOut, reason)?;
                Ok(job.node_id.map(|node| (node, job.attempt)))
            }
            JobState::Running => {
                exec(&self.conn,
                        "UPDATE jobs SET cancel_requested = 1, stop_reason = 'total_timeout', updated_ms = ?2
                         WHERE id = ?1",
                        params![job_id, now_ms() as i64],
                    )
                    .map_err(internal)?;
                Ok(job.node_id.map(|node| (node, job.attempt)))
            }
            _ => Ok(None),
        }
    }

    /// The node and attempt a job currently runs on, if it is assigned or running.
    pub fn current_execution(&self, job_id: &str) -> Result<Option<(String, u32)>, WireError> {
        query_row(
            &self.conn,
            "SELECT node_id, attempt FROM jobs WHERE id = ?1 AND state IN ('assigned', 'running')",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(internal)
    }

    /// Cancel: before start → cancelled with a full refund; while running → flagged, and the node
    /// is asked to stop (the job ends when the node reports).
    pub fn cancel(&mut self, job_id: &str) -> Result<CancelEffect, WireError> {
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
                exec(&self.conn,
                        "UPDATE jobs SET cancel_requested = 1, stop_reason = 'user', updated_ms = ?2 WHERE id = ?1",
                        params![job_id, now_ms() as i64],
                    )
                    .map_err(internal)?;
                let stop = job.node_id.clone().map(|node| (node, job.attempt));
                Ok(CancelEffect {
                    job: self.get_job(job_id)?,
                    stop,
                })
            }
            terminal => Err(WireError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} already ended ({})", terminal.as_str()),
            )),
        }
    }

    // ----- nodes -----

    pub fn upsert_node(&mut self, registration: &RegisterNode) -> Result<(), WireError> {
        let now = now_ms();
        let json = serde_json::to_string(registration).map_err(internal)?;
        let tx = self.tx()?;
        exec(&tx,
            "INSERT INTO nodes (id, registration, registered_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET registration = excluded.registration, registered_ms = excluded.registered_ms",
            params![registration.node_id, json, now as i64],
        )
        .map_err(internal)?;
        ledger::ensure_account(
            &tx,
            &registration.provider_account,
            AccountKind::Provider,
            now,
        )?;
        tx.commit().map_err(internal)
    }

    pub fn nodes(&self) -> Result<Vec<(RegisterNode, u64)>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT registration, registered_ms FROM nodes")
            .map_err(internal)?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(internal)?;
        let mut nodes = Vec::new();
        for row in rows {
            let (json, registered_ms) = row.map_err(internal)?;
            nodes.push((
                serde_json::from_str(&json).map_err(internal)?,
                registered_ms as u64,
            ));
        }
        Ok(nodes)
    }

    /// Per node: (attempts ended there, of which succeeded, reputation). Reputation is the success
    /// ratio over the node's last 100 attempts that succeeded or failed through the node (lost,
    /// restarted, assignment not taken); the workload's own failures and cancels do not count.
    pub fn node_stats(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, u64, f64)>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT node_id, ended, succeeded, recent FROM node_stats")
            .map_err(internal)?;
        let rows = statement
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(internal)?;
        let mut stats = std::collections::HashMap::new();
        for row in rows {
            let (node, ended, succeeded, recent) = row.map_err(internal)?;
            stats.insert(node, (ended as u64, succeeded as u64, reputation(&recent)));
        }
        Ok(stats)
    }

    /// Pending jobs that have waited longer than their queue timeout (`default_ms` where the job
    /// set none) at `now`.
    pub fn queue_expired(
        &self,
        now: u64,
        default_ms: u64,
    ) -> Result<Vec<(String, u64)>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, COALESCE(queue_timeout_ms, ?1) FROM jobs
                 WHERE state = 'pending' AND updated_ms + COALESCE(queue_timeout_ms, ?1) < ?2
                 ORDER BY created_ms, id",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map(params![default_ms as i64, now as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(internal)?;
        rows.collect::<Result<_, _>>().map_err(internal)
    }

    /// An account's postings, newest first, with the balance after each.
    pub fn statement(
        &self,
        account: &str,
        limit: u32,
    ) -> Result<rhizos_broker::wire::Statement, WireError> {
        let balance = ledger::balance(&self.conn, account)?.ok_or_else(|| no_account(account))?;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT t.id, t.kind, t.job_id, p.amount_micros, t.created_ms FROM postings p
                 JOIN ledger_tx t ON t.id = p.tx_id WHERE p.account_id = ?1 ORDER BY p.id DESC LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map(params![account, limit.min(10_000)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(internal)?;
        let mut lines = Vec::new();
        let mut after = balance;
        for row in rows {
            let (tx_id, kind, job_id, amount_micros, created_ms) = row.map_err(internal)?;
            lines.push(rhizos_broker::wire::StatementLine {
                tx_id,
                kind,
                job_id,
                amount_micros,
                balance_after_micros: after,
                created_ms: created_ms as u64,
            });
            after -= amount_micros;
        }
        Ok(rhizos_broker::wire::Statement {
            account: account.to_owned(),
            balance_micros: balance,
            lines,
        })
    }

    /// The ledger invariants plus, per job: an open job's escrow holds exactly its `max_cost` and
    /// has no closing movement; an ended job's escrow is empty, closed exactly once, and its
    /// recorded split adds up (cost + refund = hold, provider + fee = cost).
    pub fn verify(&self) -> Result<rhizos_broker::wire::LedgerReport, WireError> {
        let base = ledger::verify(&self.conn)?;
        let mut problems = base.problems;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT j.id, j.state, j.max_cost_micros, j.cost_micros, j.provider_micros, j.fee_micros,
                        j.refund_micros, a.balance_micros,
                        (SELECT COUNT(*) FROM ledger_tx t WHERE t.idem_key = 'close:' || j.id),
                        (SELECT COUNT(*) FROM ledger_tx t WHERE t.idem_key = 'hold:' || j.id)
                 FROM jobs j LEFT JOIN accounts a ON a.id = 'escrow:' || j.id",
            )
            .map_err(internal)?;
        type Row = (
            String,
            String,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            i64,
            i64,
        );
        let rows = statement
            .query_map([], |r| {
                Ok::<Row, rusqlite::Error>((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })
            .map_err(internal)?;
        let mut jobs_checked = 0;
        for row in rows {
            let (id, state, hold, cost, provider, fee, refund, escrow, closes, holds) =
                row.map_err(internal)?;
            jobs_checked += 1;
            if holds != 1 {
                problems.push(format!("job {id}: {holds} holds instead of 1"));
            }
            let terminal = JobState::parse(&state).is_some_and(JobState::is_terminal);
            if terminal {
                if escrow != Some(0) {
                    problems.push(format!(
                        "job {id} ended ({state}) but its escrow holds {escrow:?}"
                    ));
                }
                if closes != 1 {
                    problems.push(format!(
                        "job {id} ended with {closes} settlements/refunds instead of 1"
                    ));
                }
                match (cost, provider, fee, refund) {
                    (Some(c), Some(p), Some(f), Some(r)) if c + r == hold && p + f == c => {}
                    other => problems.push(format!(
                        "job {id}: split {other:?} does not add up to hold {hold}"
                    )),
                }
            } else {
                if escrow != Some(hold) {
                    problems.push(format!(
                        "job {id} is {state} but its escrow holds {escrow:?}, not {hold}"
                    ));
                }
                if closes != 0 {
                    problems.push(format!(
                        "job {id} is {state} but was already settled or refunded"
                    ));
                }
            }
        }
        Ok(rhizos_broker::wire::LedgerReport {
            ok: problems.is_empty(),
            accounts: base.accounts,
            transactions: base.transactions,
            postings_sum_micros: base.postings_sum_micros,
            jobs_checked,
            problems,
        })
    }

    // ----- outbox -----

    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxRow>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, subject, payload FROM outbox ORDER BY id LIMIT ?1")
            .map_err(internal)?;
        let rows = statement
            .query_map([limit as i64], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    subject: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }

    pub fn outbox_done(&mut self, up_to_id: i64) -> Result<(), WireError> {
        exec(&self.conn, "DELETE FROM outbox WHERE id <= ?1", [up_to_id]).map_err(internal)?;
        Ok(())
    }
}

/// A read-only connection for the event publisher: it reads committed outbox rows beside the
/// writer (WAL readers never wait for it), so publishing an event costs the ledger thread
/// nothing but the eventual delete.
pub struct OutboxReader {
    conn: Connection,
}

impl OutboxReader {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Committed rows with an id above `after_id`, oldest first. One writer commits rows in id
    /// order, so nothing below the last row seen can still appear.
    pub fn after(&self, after_id: i64, limit: usize) -> Result<Vec<OutboxRow>, WireError> {
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT id, subject, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = statement
            .query_map(params![after_id, limit as i64], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    subject: r.get(1)?,
                    payload: r.get(2)?,
                })
            })
            .map_err(internal)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(internal)
    }
}

impl Ctx {
    fn job_account_and_hold(tx: &Connection, job_id: &str) -> Result<(String, i64), WireError> {
        query_row(
            tx,
            "SELECT account_id, max_cost_micros FROM jobs WHERE id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(internal)
    }

    fn settle(
        &self,
        tx: &Connection,
        job_id: &str,
        measured_micros: i64,
        now: u64,
    ) -> Result<(), WireError> {
        // The job's payer and hold, and the provider account of the node it ran on (read from
        // the stored registration without parsing all of it).
        let (account, hold, provider): (String, i64, String) = query_row(
            tx,
            "SELECT j.account_id, j.max_cost_micros, json_extract(n.registration, '$.provider_account')
             FROM jobs j JOIN nodes n ON n.id = j.node_id WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(internal)?;
        ledger::ensure_account(tx, &provider, AccountKind::Provider, now)?;
        let split = ledger::split(measured_micros, hold, self.fee_bps);
        let escrow = escrow_account(job_id);
        let applied = ledger::post(
            tx,
            &format!("close:{job_id}"),
            "settle",
            Some(job_id),
            &[
                (&escrow, -hold),
                (&provider, split.provider_micros),
                (ledger::PLATFORM_FEES, split.fee_micros),
                (&account, split.refund_micros),
            ],
            now,
        )?;
        if applied == Applied::Duplicate {
            return Ok(());
        }
        exec(tx,
            "UPDATE jobs SET cost_micros = ?2, provider_micros = ?3, fee_micros = ?4, refund_micros = ?5 WHERE id = ?1",
            params![job_id, split.cost_micros, split.provider_micros, split.fee_micros, split.refund_micros],
        )
        .map_err(internal)?;
        self.emit(
            tx,
            self.subjects
                .escrow_event(EscrowEventKind::Settled, job_id)
                .map_err(internal)?,
            EventBody::Escrow {
                job_id: job_id.to_owned(),
                kind: EscrowKind::Settled,
                account,
                amount_micros: split.cost_micros,
                provider_account: Some(provider),
                provider_micros: Some(split.provider_micros),
                fee_micros: Some(split.fee_micros),
                refund_micros: Some(split.refund_micros),
            },
            now,
        )
    }

    fn refund(&self, tx: &Connection, job_id: &str, now: u64) -> Result<(), WireError> {
        let (account, hold) = Self::job_account_and_hold(tx, job_id)?;
        let escrow = escrow_account(job_id);
        let applied = ledger::post(
            tx,
            &format!("close:{job_id}"),
            "refund",
            Some(job_id),
            &[(&escrow, -hold), (&account, hold)],
            now,
        )?;
        if applied == Applied::Duplicate {
            return Ok(());
        }
        exec(tx,
            "UPDATE jobs SET cost_micros = 0, provider_micros = 0, fee_micros = 0, refund_micros = ?2 WHERE id = ?1",
            params![job_id, hold],
        )
        .map_err(internal)?;
        self.emit(
            tx,
            self.subjects
                .escrow_event(EscrowEventKind::Refunded, job_id)
                .map_err(internal)?,
            EventBody::Escrow {
                job_id: job_id.to_owned(),
                kind: EscrowKind::Refunded,
                account,
                amount_micros: hold,
                provider_account: None,
                provider_micros: None,
                fee_micros: None,
                refund_micros: Some(hold),
            },
            now,
        )
    }

    fn emit(
        &self,
        tx: &Connection,
        subject: String,
        body: EventBody,
        now: u64,
    ) -> Result<(), WireError> {
        let event = Event {
            v: WIRE_VERSION,
            ts_ms: now,
            body,
        };
        let payload = serde_json::to_vec(&event).map_err(internal)?;
        exec(
            tx,
            "INSERT INTO outbox (subject, payload, created_ms) VALUES (?1, ?2, ?3)",
            params![subject, payload, now as i64],
        )
        .map_err(internal)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_job(
        &self,
        tx: &Connection,
        job_id: &str,
        state: JobState,
        attempt: u32,
        node_id: Option<&str>,
        reason: Option<&str>,
        now: u64,
    ) -> Result<(), WireError> {
        let subject = self
            .subjects
            .job_event(state.as_str(), job_id)
            .map_err(internal)?;
        self.emit(
            tx,
            subject,
            EventBody::Job {
                job_id: job_id.to_owned(),
                state,
                attempt,
                node_id: node_id.map(str::to_owned),
                reason: reason.map(str::to_owned),
            },
            now,
        )
    }
}

/// Records how an attempt ended on its node (once; a replay changes nothing).
fn record_attempt(
    tx: &Connection,
    job_id: &str,
    attempt: u32,
    node_id: &str,
    outcome: &str,
    now: u64,
) -> Result<(), WireError> {
    let inserted = exec(tx,
        "INSERT INTO attempts (job_id, attempt, node_id, outcome, ended_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(job_id, attempt) DO NOTHING",
        params![job_id, attempt, node_id, outcome, now as i64],
    )
    .map_err(internal)?;
    if inserted == 1 {
        count_attempt(tx, node_id, outcome).map_err(internal)?;
    }
    Ok(())
}

/// Adds one ended attempt to its node's running totals (one statement: the window of recent
/// outcomes is cut to its last [`REPUTATION_WINDOW`] letters in SQL).
fn count_attempt(tx: &Connection, node_id: &str, outcome: &str) -> rusqlite::Result<()> {
    let letter = match outcome {
        "succeeded" => "s",
        "node_failed" => "f",
        _ => "",
    };
    exec(
        tx,
        "INSERT INTO node_stats (node_id, ended, succeeded, recent) VALUES (?1, 1, ?2, ?3)
         ON CONFLICT(node_id) DO UPDATE SET ended = ended + 1, succeeded = succeeded + ?2,
             recent = substr(recent || ?3, -?4)",
        params![
            node_id,
            i64::from(outcome == "succeeded"),
            letter,
            REPUTATION_WINDOW as i64
        ],
    )?;
    Ok(())
}

/// Success ratio of a node's recent attempts (`recent` as kept in `node_stats`); 1.0 with none.
fn reputation(recent: &str) -> f64 {
    if recent.is_empty() {
        return 1.0;
    }
    recent.bytes().filter(|b| *b == b's').count() as f64 / recent.len() as f64
}

/// Brings a database written by an earlier release up to this schema: adds missing columns and
/// fills `node_stats` from the attempts table when it predates it.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, declaration) in ADDED_COLUMNS {
        let exists: bool = conn.query_row(
            &format!("SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
            [column],
            |r| r.get(0),
        )?;
        if !exists {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
            ))?;
        }
    }
    let (stats, attempts): (i64, i64) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM node_stats), (SELECT COUNT(*) FROM attempts)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if stats == 0 && attempts > 0 {
        let tx = conn.unchecked_transaction()?;
        let mut statement = tx.prepare(
            "SELECT node_id, outcome FROM attempts ORDER BY node_id, ended_ms, job_id, attempt",
        )?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        drop(statement);
        for (node_id, outcome) in rows {
            count_attempt(&tx, &node_id, &outcome)?;
        }
        tx.commit()?;
    }
    Ok(())
}

fn no_account(account: &str) -> WireError {
    WireError::new(
        ErrorCode::NotFound,
        format!("no account {account}: create it with `rhizos account create {account}`"),
    )
}

/// The last `max_bytes` of `text`, cut at a character boundary.
fn truncate_tail(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// `1234567` → `$1.234567`.
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

const JOB_COLUMNS: &str = "id, account_id, backend, state, attempt, node_id, max_cost_micros, cost_micros, provider_micros,
    fee_micros, refund_micros, exit_code, stdout, stderr, reason, elapsed_ms, created_ms, updated_ms, fuel_consumed, output_files";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobView> {
    let state: String = r.get(3)?;
    Ok(JobView {
        job_id: r.get(0)?,
        account: r.get(1)?,
        backend: r.get(2)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        attempt: r.get(4)?,
        node_id: r.get(5)?,
        max_cost_micros: r.get(6)?,
        cost_micros: r.get(7)?,
        provider_micros: r.get(8)?,
        fee_micros: r.get(9)?,
        refund_micros: r.get(10)?,
        exit_code: r.get(11)?,
        stdout: r.get(12)?,
        stderr: r.get(13)?,
        reason: r.get(14)?,
        elapsed_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
        created_ms: r.get::<_, i64>(16)? as u64,
        updated_ms: r.get::<_, i64>(17)? as u64,
        fuel_consumed: r.get::<_, Option<i64>>(18)?.map(|v| v as u64),
        output_files: r
            .get::<_, Option<String>>(19)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::{ExecutionRef, Workload};

    const PRICING: Pricing = Pricing {
        gpu_hour_cents: 0,
        cpu_hour_cents: 3_600,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 0,
    };

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("ledger.db"),
            500,
            Subjects::new("t").unwrap(),
        )
        .unwrap();
        (dir, store)
    }

    fn spec() -> JobSpec {
        JobSpec::new(
            Workload::Wasm {
                module_b64: "AGFzbQ==".into(),
            },
            10_000,
            64,
        )
    }

    fn node(store: &mut Store) {
        store
            .upsert_node(&RegisterNode {
                v: WIRE_VERSION,
                node_id: "n1".into(),
                provider_account: "prov".into(),
                backends: vec!["wasm".into()],
                pricing: PRICING,
                cpu_cores: 2,
                memory_mib: 1024,
                max_concurrent: 2,
                heartbeat_interval_ms: 1000,
                plugins: vec![],
                running: Vec::<ExecutionRef>::new(),
                gpus: vec![],
                disk_mib: 0,
                hardware: None,
                artifact_sources: vec![],
            })
            .unwrap();
    }

    fn exited(code: i32, elapsed_ms: u64) -> ExecutionOutcome {
        ExecutionOutcome {
            fuel_consumed: None,
            output_files: Default::default(),
            kind: ExitKind::Exited,
            exit_code: Some(code),
            message: None,
            elapsed_ms,
            stdout: "out\n".into(),
            stderr: String::new(),
        }
    }

    fn balance(store: &Store, account: &str) -> i64 {
        ledger::balance(store.connection(), account)
            .unwrap()
            .unwrap_or(0)
    }

    #[test]
    fn hold_settle_and_replays_move_money_exactly_once() {
        let (_dir, mut store) = store();
        node(&mut store);
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, Some("d1")).unwrap();
        store.deposit("u", 1_000_000, Some("d1")).unwrap(); // replayed deposit: no change
        assert_eq!(balance(&store, "u"), 1_000_000);

        let (job, created) = store.submit("j1", "u", &spec(), 200_000).unwrap();
        assert!(created);
        assert_eq!(job.state, JobState::Pending);
        let (_, created_again) = store.submit("j1", "u", &spec(), 200_000).unwrap();
        assert!(!created_again, "resubmitting the same id returns the job");
        assert_eq!(balance(&store, "u"), 800_000);
        assert_eq!(balance(&store, "escrow:j1"), 200_000);

        let attempt = store.assign("j1", "n1", &PRICING).unwrap().unwrap();
        assert_eq!(attempt, 1);
        assert_eq!(
            store.assign("j1", "n1", &PRICING).unwrap(),
            None,
            "only pending jobs are assigned"
        );
        assert_eq!(
            store.mark_running("j1", "n1", 1).unwrap(),
            ReportEffect::Applied
        );
        assert_eq!(
            store.mark_running("j1", "n1", 1).unwrap(),
            ReportEffect::Duplicate
        );

        // 1 234 ms at 10 micro-USD/ms = 12 340; fee 5% = 617; provider 11 723; refund 187 660.
        assert_eq!(
            store
                .finish("j1", "n1", 1, &exited(0, 1_234), 1024)
                .unwrap(),
            ReportEffect::Applied
        );
        let job = store.get_job("j1").unwrap();
        assert_eq!(
            (
                job.state,
                job.cost_micros,
                job.fee_micros,
                job.provider_micros,
                job.refund_micros
            ),
            (
                JobState::Succeeded,
                Some(12_340),
                Some(617),
                Some(11_723),
                Some(187_660)
            )
        );
        assert_eq!(
            store
                .finish("j1", "n1", 1, &exited(0, 99_999), 1024)
                .unwrap(),
            ReportEffect::Duplicate
        );
        assert!(matches!(
            store.finish("j1", "n1", 2, &exited(0, 1), 1024).unwrap(),
            ReportEffect::Stale(_)
        ));
        assert!(matches!(
            store.finish("j1", "n2", 1, &exited(0, 1), 1024).unwrap(),
            ReportEffect::Stale(_)
        ));

        assert_eq!(balance(&store, "u"), 1_000_000 - 12_340);
        assert_eq!(balance(&store, "prov"), 11_723);
        assert_eq!(balance(&store, ledger::PLATFORM_FEES), 617);
        assert_eq!(balance(&store, "escrow:j1"), 0);
        assert_eq!(balance(&store, ledger::EXTERNAL), -1_000_000);
        assert!(ledger::verify(store.connection()).unwrap().is_ok());
        // Events: pending, held, assigned, running, succeeded, settled — in that order.
        let subjects: Vec<String> = store
            .outbox_batch(100)
            .unwrap()
            .into_iter()
            .map(|r| r.subject)
            .collect();
        assert_eq!(
            subjects,
            [
                "rhizos.evt.v1.t.job.pending.j1",
                "rhizos.evt.v1.t.escrow.held.j1",
                "rhizos.evt.v1.t.job.assigned.j1",
                "rhizos.evt.v1.t.job.running.j1",
                "rhizos.evt.v1.t.job.succeeded.j1",
                "rhizos.evt.v1.t.escrow.settled.j1",
            ]
        );
    }

    #[test]
    fn failures_and_early_cancels_refund_in_full_and_late_cancels_pay_for_time() {
        let (_dir, mut store) = store();
        node(&mut store);
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, None).unwrap();
        for id in ["fail", "early", "late"] {
            store.submit(id, "u", &spec(), 100_000).unwrap();
        }
        store.assign("fail", "n1", &PRICING).unwrap();
        store
            .finish("fail", "n1", 1, &exited(7, 5_000), 1024)
            .unwrap();
        let failed = store.get_job("fail").unwrap();
        assert_eq!(
            (failed.state, failed.refund_micros, failed.cost_micros),
            (JobState::Failed, Some(100_000), Some(0))
        );
        assert_eq!(failed.reason.as_deref(), Some("exited with code 7"));

        let cancelled = store.cancel("early").unwrap();
        assert_eq!(cancelled.job.state, JobState::Cancelled);
        assert_eq!(cancelled.stop, None);

        store.assign("late", "n1", &PRICING).unwrap();
        store.mark_running("late", "n1", 1).unwrap();
        let effect = store.cancel("late").unwrap();
        assert_eq!(effect.stop, Some(("n1".to_owned(), 1)));
        assert_eq!(
            effect.job.state,
            JobState::Running,
            "ends when the node confirms"
        );
        let stopped = ExecutionOutcome {
            fuel_consumed: None,
            output_files: Default::default(),
            kind: ExitKind::Cancelled,
            exit_code: None,
            message: None,
            ..exited(0, 300)
        };
        store.finish("late", "n1", 1, &stopped, 1024).unwrap();
        let late = store.get_job("late").unwrap();
        assert_eq!(
            (late.state, late.cost_micros, late.fee_micros),
            (JobState::Cancelled, Some(3_000), Some(150))
        );
        assert_eq!(
            store.cancel("late").unwrap_err().code,
            ErrorCode::InvalidState
        );

        assert_eq!(balance(&store, "u"), 1_000_000 - 3_000);
        assert_eq!(store.account("u").unwrap().held_micros, 0);
        assert!(ledger::verify(store.connection()).unwrap().is_ok());
    }

    #[test]
    fn node_stats_count_every_attempt_and_rate_the_last_hundred() {
        let (_dir, mut store) = store();
        node(&mut store);
        store.create_account("u").unwrap();
        store.deposit("u", 100_000_000, None).unwrap();
        // 20 attempts lost with the node, then 100 successes: the window has only successes.
        let mut spec = spec();
        spec.max_retries = 0;
        for index in 0..20 {
            let id = format!("lost-{index}");
            store.submit(&id, "u", &spec, 100_000).unwrap();
            assert_eq!(store.assign(&id, "n1", &PRICING).unwrap(), Some(1));
            store.requeue_or_fail(&id, 1, "node n1 was lost").unwrap();
        }
        let stats = store.node_stats().unwrap();
        assert_eq!(stats["n1"], (20, 0, 0.0));
        for index in 0..100 {
            let id = format!("ok-{index}");
            store.submit(&id, "u", &spec, 100_000).unwrap();
            assert_eq!(store.assign(&id, "n1", &PRICING).unwrap(), Some(1));
            store.mark_running(&id, "n1", 1).unwrap();
            store.finish(&id, "n1", 1, &exited(0, 10), 1024).unwrap();
            if index == 49 {
                // 20 failed + 50 succeeded in the window.
                let (ended, succeeded, reputation) = store.node_stats().unwrap()["n1"];
                assert_eq!((ended, succeeded), (70, 50));
                assert!((reputation - 50.0 / 70.0).abs() < 1e-12, "{reputation}");
            }
        }
        // A replayed result counts once.
        store
            .finish("ok-99", "n1", 1, &exited(0, 10), 1024)
            .unwrap();
        assert_eq!(store.node_stats().unwrap()["n1"], (120, 100, 1.0));
        // A job's own non-zero exit is not the node's fault: counted as ended, rating unchanged.
        store.submit("bad", "u", &spec, 100_000).unwrap();
        store.assign("bad", "n1", &PRICING).unwrap();
        store.mark_running("bad", "n1", 1).unwrap();
        store.finish("bad", "n1", 1, &exited(3, 10), 1024).unwrap();
        assert_eq!(store.node_stats().unwrap()["n1"], (121, 100, 1.0));
    }

    #[test]
    fn an_older_database_is_migrated_with_its_node_stats_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // The schema as first released: no queue_timeout_ms column, no node_stats table.
            let conn = Connection::open(&path).unwrap();
            let old = SCHEMA
                .replace("    queue_timeout_ms INTEGER,\n", "")
                .replace("    fuel_consumed INTEGER,\n", "")
                .replace("    output_files TEXT,\n", "")
                .split("CREATE TABLE IF NOT EXISTS node_stats")
                .next()
                .unwrap()
                .to_owned();
            assert!(!old.contains("queue_timeout_ms") && !old.contains("fuel_consumed INTEGER"));
            conn.execute_batch(&old).unwrap();
            conn.execute_batch(
                "INSERT INTO attempts VALUES ('a', 1, 'n1', 'node_failed', 1),
                                             ('b', 1, 'n1', 'succeeded', 2),
                                             ('c', 1, 'n1', 'succeeded', 3),
                                             ('d', 1, 'n1', 'job_failed', 4),
                                             ('e', 1, 'n2', 'succeeded', 5)",
            )
            .unwrap();
        }
        let mut store = Store::open(&path, 500, Subjects::new("t").unwrap()).unwrap();
        let stats = store.node_stats().unwrap();
        let (ended, succeeded, reputation) = stats["n1"];
        assert_eq!((ended, succeeded), (4, 2));
        assert!((reputation - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(stats["n2"], (1, 1, 1.0));
        // The new column works, and opening again changes nothing.
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, None).unwrap();
        let mut spec = spec();
        spec.queue_timeout_ms = Some(5);
        store.submit("j", "u", &spec, 100_000).unwrap();
        drop(store);
        let store = Store::open(&path, 500, Subjects::new("t").unwrap()).unwrap();
        assert_eq!(store.node_stats().unwrap()["n1"].0, 4);
        assert_eq!(store.queue_expired(now_ms() + 10, 60_000).unwrap().len(), 1);
    }

    #[test]
    fn queue_expiry_uses_the_jobs_own_timeout_or_the_default() {
        let (_dir, mut store) = store();
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, None).unwrap();
        let mut own = spec();
        own.queue_timeout_ms = Some(1_000);
        store.submit("own", "u", &own, 100_000).unwrap();
        store.submit("default", "u", &spec(), 100_000).unwrap();
        let since = store.get_job("own").unwrap().created_ms;
        assert!(
            store
                .queue_expired(since + 1_000, 5_000)
                .unwrap()
                .is_empty(),
            "not past it yet"
        );
        assert_eq!(
            store.queue_expired(since + 1_001, 5_000).unwrap(),
            vec![("own".to_owned(), 1_000)]
        );
        let mut expired: Vec<(String, u64)> =
            store.queue_expired(since + 5_001 + 100, 5_000).unwrap();
        expired.sort();
        assert_eq!(
            expired,
            [("default".to_owned(), 5_000), ("own".to_owned(), 1_000)]
        );
        // A job no longer pending never expires.
        node(&mut store);
        store.assign("own", "n1", &PRICING).unwrap();
        assert_eq!(store.queue_expired(u64::MAX / 2, 5_000).unwrap().len(), 1);
    }

    #[test]
    fn lost_attempts_are_requeued_with_the_hold_intact_until_retries_run_out() {
        let (_dir, mut store) = store();
        node(&mut store);
        store.create_account("u").unwrap();
        store.deposit("u", 1_000_000, None).unwrap();
        let mut spec = spec();
        spec.max_retries = 2;
        store.submit("j", "u", &spec, 100_000).unwrap();
        for attempt in 1..=2 {
            assert_eq!(store.assign("j", "n1", &PRICING).unwrap(), Some(attempt));
            assert_eq!(
                store
                    .requeue_or_fail("j", attempt, "node n1 was lost")
                    .unwrap(),
                Some(JobState::Pending)
            );
            assert_eq!(
                balance(&store, "escrow:j"),
                100_000,
                "the hold stays while the job moves"
            );
            assert_eq!(
                store.requeue_or_fail("j", attempt, "again").unwrap(),
                None,
                "stale attempt ignored"
            );
        }
        let job = store.get_job("j").unwrap();
        assert_eq!(
            job.reason.as_deref(),
            Some("node n1 was lost; requeued (retry 2 of 2)")
        );
        assert_eq!(store.assign("j", "n1", &PRICING).unwrap(), Some(3));
        assert_eq!(
            store.requeue_or_fail("j", 3, "node n1 was lost").unwrap(),
            Some(JobState::Failed)
        );
        let job = store.get_job("j").unwrap();
        assert_eq!(
            (job.state, job.refund_micros),
            (JobState::Failed, Some(100_000))
        );
        assert_eq!(
            job.reason.as_deref(),
            Some("node n1 was lost; no retries left (2 allowed)")
        );
        assert_eq!(balance(&store, "u"), 1_000_000);
        assert!(ledger::verify(store.connection()).unwrap().is_ok());
    }

    #[test]
    fn a_group_commit_keeps_each_operation_all_or_nothing() {
        let (_dir, mut store) = store();
        node(&mut store);
        let (results, commit) = store.group_commit(|store| {
            (
                store.create_account("g").map(|_| ()),
                store.deposit("g", 50, Some("once")).map(|_| ()),
                store.submit("too-dear", "g", &spec(), 51).map(|_| ()),
                store.submit("fits", "g", &spec(), 40).map(|_| ()),
            )
        });
        assert_eq!(commit, Ok(()));
        assert!(results.0.is_ok() && results.1.is_ok() && results.3.is_ok());
        assert_eq!(results.2.unwrap_err().code, ErrorCode::InsufficientFunds);
        assert!(
            store.find_job("too-dear").unwrap().is_none(),
            "the failed op left nothing"
        );
        assert_eq!(store.get_job("fits").unwrap().state, JobState::Pending);
        assert_eq!(balance(&store, "g"), 10);
        assert!(store.verify().unwrap().ok);
        // Outside a batch, each op commits on its own.
        store.deposit("g", 5, None).unwrap();
        assert_eq!(balance(&store, "g"), 15);
    }

    #[test]
    fn insufficient_funds_leave_no_trace() {
        let (_dir, mut store) = store();
        store.create_account("u").unwrap();
        store.deposit("u", 10, None).unwrap();
        let error = store.submit("j", "u", &spec(), 11).unwrap_err();
        assert_eq!(error.code, ErrorCode::InsufficientFunds);
        assert!(error.message.contains("10"), "{}", error.message);
        assert!(store.find_job("j").unwrap().is_none());
        assert_eq!(ledger::balance(store.connection(), "u").unwrap(), Some(10));
        assert_eq!(
            ledger::balance(store.connection(), "escrow:j").unwrap(),
            None
        );
        assert!(store.outbox_batch(10).unwrap().is_empty());
        assert_eq!(
            store.create_account("u").unwrap_err().code,
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            store.deposit("nobody", 5, None).unwrap_err().code,
            ErrorCode::NotFound
        );
        // Also inside a group commit: the failed operation's savepoint undoes it alone.
        let (results, commit) = store.group_commit(|store| {
            (
                store.submit("g1", "u", &spec(), 11).is_err(),
                store.submit("g2", "u", &spec(), 4).is_ok(),
            )
        });
        assert_eq!((results, commit), ((true, true), Ok(())));
        assert_eq!(ledger::balance(store.connection(), "u").unwrap(), Some(6));
        assert!(store.find_job("g1").unwrap().is_none());
    }
}

/// Property test: whatever happens, in whatever order, the money adds up.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use rhizos_broker::wire::{ExecutionRef, Workload};

    const PRICING: Pricing = Pricing {
        gpu_hour_cents: 0,
        cpu_hour_cents: 3_600,
        memory_gb_hour_cents: 0,
        fuel_million_micros: 0,
    };
    const NODES: [&str; 2] = ["n0", "n1"];
    const INITIAL_DEPOSIT: i64 = 300_000;
    const USERS: [&str; 2] = ["u0", "u1"];

    #[derive(Debug, Clone)]
    enum Op {
        Deposit {
            user: usize,
            amount: i64,
        },
        Submit {
            user: usize,
            max_cost: i64,
            retries: u32,
        },
        Assign {
            job: usize,
            node: usize,
        },
        Running {
            job: usize,
        },
        Finish {
            job: usize,
            exit_code: i32,
            elapsed_ms: u64,
            replay: bool,
        },
        Cancelled {
            job: usize,
        },
        NodeLost {
            job: usize,
        },
        Cancel {
            job: usize,
        },
        StaleReport {
            job: usize,
            elapsed_ms: u64,
        },
        QueueTimeout {
            job: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0..2usize, 1..500_000i64).prop_map(|(user, amount)| Op::Deposit { user, amount }),
            3 => (0..2usize, 1..200_000i64, 0..3u32).prop_map(|(user, max_cost, retries)| Op::Submit {
                user,
                max_cost,
                retries
            }),
            3 => (0..3usize, 0..2usize).prop_map(|(job, node)| Op::Assign { job, node }),
            2 => (0..3usize).prop_map(|job| Op::Running { job }),
            3 => (
                0..3usize,
                prop_oneof![Just(0), Just(0), Just(1), Just(137)],
                0..50_000u64,
                any::<bool>()
            )
                .prop_map(|(job, exit_code, elapsed_ms, replay)| Op::Finish {
                    job,
                    exit_code,
                    elapsed_ms,
                    replay
                }),
            1 => (0..3usize).prop_map(|job| Op::Cancelled { job }),
            1 => (0..3usize).prop_map(|job| Op::NodeLost { job }),
            1 => (0..3usize).prop_map(|job| Op::Cancel { job }),
            1 => (0..3usize, 0..50_000u64)
                .prop_map(|(job, elapsed_ms)| Op::StaleReport { job, elapsed_ms }),
            1 => (0..3usize).prop_map(|job| Op::QueueTimeout { job }),
        ]
    }

    fn outcome(kind: ExitKind, exit_code: Option<i32>, elapsed_ms: u64) -> ExecutionOutcome {
        ExecutionOutcome {
            kind,
            exit_code,
            message: None,
            elapsed_ms,
            fuel_consumed: None,
            output_files: Default::default(),
            stdout: String::new(),
            stderr: String::new(),
        }
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(
            &dir.path().join("ledger.db"),
            500,
            Subjects::new("p").unwrap(),
        )
        .unwrap();
        for (index, node) in NODES.iter().enumerate() {
            store
                .upsert_node(&RegisterNode {
                    v: WIRE_VERSION,
                    node_id: (*node).into(),
                    provider_account: format!("prov{index}"),
                    backends: vec!["wasm".into()],
                    pricing: PRICING,
                    cpu_cores: 4,
                    memory_mib: 4096,
                    max_concurrent: 8,
                    heartbeat_interval_ms: 1000,
                    plugins: vec![],
                    running: Vec::<ExecutionRef>::new(),
                    gpus: vec![],
                    disk_mib: 0,
                    hardware: None,
                    artifact_sources: vec![],
                })
                .unwrap();
        }
        for user in USERS {
            store.create_account(user).unwrap();
            store.deposit(user, INITIAL_DEPOSIT, None).unwrap();
        }
        (dir, store)
    }

    /// The node and attempt the job currently has, if any.
    fn current(store: &Store, job_id: &str) -> Option<(String, u32)> {
        store.current_execution(job_id).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn every_sequence_keeps_the_ledger_invariants(ops in proptest::collection::vec(op(), 10..80)) {
            let (_dir, mut store) = setup();
            let mut jobs: Vec<String> = Vec::new();
            let mut deposited = INITIAL_DEPOSIT * USERS.len() as i64;
            for op in ops {
                match op {
                    Op::Deposit { user, amount } => {
                        store.deposit(USERS[user], amount, None).unwrap();
                        deposited += amount;
                    }
                    Op::Submit { user, max_cost, retries } => {
                        let id = format!("j{}", jobs.len());
                        let spec = JobSpec { max_retries: retries, ..JobSpec::new(Workload::Wasm { module_b64: "AGFzbQ==".into() }, 10_000, 64) };
                        match store.submit(&id, USERS[user], &spec, max_cost) {
                            Ok(_) => jobs.push(id),
                            Err(e) => prop_assert_eq!(e.code, ErrorCode::InsufficientFunds),
                        }
                    }
                    Op::Assign { job, node } => {
                        if let Some(id) = jobs.get(job) {
                            store.assign(id, NODES[node], &PRICING).unwrap();
                        }
                    }
                    Op::Running { job } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            store.mark_running(id, &node, attempt).unwrap();
                        }
                    }
                    Op::Finish { job, exit_code, elapsed_ms, replay } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            let report = outcome(ExitKind::Exited, Some(exit_code), elapsed_ms);
                            prop_assert_eq!(store.finish(id, &node, attempt, &report, 1024).unwrap(), ReportEffect::Applied);
                            let after = store.get_job(id).unwrap();
                            if replay {
                                let replayed = store.finish(id, &node, attempt, &report, 1024).unwrap();
                                prop_assert_eq!(replayed, ReportEffect::Duplicate);
                                prop_assert_eq!(store.get_job(id).unwrap(), after);
                            }
                        }
                    }
                    Op::Cancelled { job } => {
                        if let Some(id) = jobs.get(job) && let Some((node, attempt)) = current(&store, id) {
                            store.finish(id, &node, attempt, &outcome(ExitKind::Cancelled, None, 700), 1024).unwrap();
                        }
                    }
                    Op::NodeLost { job } => {
                        if let Some(id) = jobs.get(job) && let Some((_, attempt)) = current(&store, id) {
                            store.requeue_or_fail(id, attempt, "node lost").unwrap();
                        }
                    }
                    Op::Cancel { job } => {
                        if let Some(id) = jobs.get(job) {
                            let _ = store.cancel(id);
                        }
                    }
                    Op::StaleReport { job, elapsed_ms } => {
                        if let Some(id) = jobs.get(job) {
                            let before = store.get_job(id).unwrap();
                            let attempt = before.attempt + 5;
                            let report = outcome(ExitKind::Exited, Some(0), elapsed_ms);
                            prop_assert!(matches!(store.finish(id, "n0", attempt, &report, 1024).unwrap(), ReportEffect::Stale(_)));
                            prop_assert_eq!(store.get_job(id).unwrap(), before);
                        }
                    }
                    Op::QueueTimeout { job } => {
                        if let Some(id) = jobs.get(job) && store.get_job(id).unwrap().state == JobState::Pending {
                            store.end_with_refund(id, JobState::TimedOut, "queue timeout").unwrap();
                        }
                    }
                }
                let report = store.verify().unwrap();
                prop_assert!(report.ok, "{:?}", report.problems);
            }
            // Conservation: what came in is exactly what the users, escrows, providers and the
            // platform hold now.
            let held: i64 = jobs.iter().map(|id| ledger::balance(store.connection(), &escrow_account(id)).unwrap().unwrap_or(0)).sum();
            let users: i64 = USERS.iter().map(|u| ledger::balance(store.connection(), u).unwrap().unwrap_or(0)).sum();
            let providers: i64 = (0..2).map(|i| ledger::balance(store.connection(), &format!("prov{i}")).unwrap().unwrap_or(0)).sum();
            let fees = ledger::balance(store.connection(), ledger::PLATFORM_FEES).unwrap().unwrap_or(0);
            prop_assert_eq!(users + held + providers + fees, deposited);
            prop_assert_eq!(ledger::balance(store.connection(), ledger::EXTERNAL).unwrap(), Some(-deposited));
            // Every ended job: its split matches the postings it made.
            for id in &jobs {
                let job = store.get_job(id).unwrap();
                if job.state.is_terminal() {
                    let (cost, fee, provider, refund) = (job.cost_micros.unwrap(), job.fee_micros.unwrap(), job.provider_micros.unwrap(), job.refund_micros.unwrap());
                    prop_assert_eq!(cost + refund, job.max_cost_micros);
                    prop_assert_eq!(provider + fee, cost);
                    prop_assert_eq!(fee, (cost * 500 + 5_000) / 10_000);
                }
            }
            // The running node totals agree with the attempts they summarise.
            let mut expected = std::collections::HashMap::<String, (u64, u64, String)>::new();
            let mut rows = store.connection().prepare("SELECT node_id, outcome FROM attempts ORDER BY rowid").unwrap();
            for row in rows.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap() {
                let (node, outcome) = row.unwrap();
                let entry = expected.entry(node).or_default();
                entry.0 += 1;
                entry.1 += u64::from(outcome == "succeeded");
                match outcome.as_str() { "succeeded" => entry.2.push('s'), "node_failed" => entry.2.push('f'), _ => {} }
            }
            drop(rows);
            let stats = store.node_stats().unwrap();
            prop_assert_eq!(stats.len(), expected.len());
            for (node, (ended, succeeded, recent)) in expected {
                let recent = &recent[recent.len().saturating_sub(REPUTATION_WINDOW)..];
                prop_assert_eq!(stats[&node], (ended, succeeded, reputation(recent)));
            }
        }
    }
}
