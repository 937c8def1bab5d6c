//! Durable orchestrator state in one SQLite file (WAL): jobs, nodes, the escrow ledger and the
//! event outbox. Every state change of a job, its money movement and the events describing both
//! are written in one transaction, so they can never disagree.
//!
//! This file opens the database (pragmas, migrations, the instance id) and runs operations —
//! each in its own savepoint, many under one commit ([`Store::group_commit`]). One file per
//! concern adds its own `impl Store` block:
//! * [`schema`]: the tables and their numbered migrations (`PRAGMA user_version`);
//! * [`jobs`]: accepting a job (row + hold + events) and reading jobs;
//! * [`transitions`]: assign, unassign, running, finish, requeue, timeouts, cancel;
//! * [`ending`]: the pure rule deciding how a job ends and what it is charged;
//! * [`escrow`]: settle and refund, exactly once;
//! * [`accounts`]: accounts, deposits, balances, statements;
//! * [`nodes`]: registrations, attempts and the node record (reputation);
//! * [`events`], [`outbox`]: domain events written with their change, and the publisher's
//!   reader (the publisher turns them into wire events: the store knows no subjects);
//! * [`verify`]: the ledger and per-job escrow invariants;
//! * [`rows`]: row mapping.
//!
//! Errors are [`StoreError`]; the orchestrator turns them into wire errors at its API edge.

mod accounts;
mod changes;
pub mod ending;
mod enrolments;
mod escrow;
pub mod events;
pub mod flows;
mod jobs;
pub mod keys;
mod nodes;
mod outbox;
mod retention;
mod rows;
pub mod schema;
mod stats;
mod transitions;
mod verify;

#[cfg(test)]
mod tests;

pub use crate::now_ms;
pub use ending::{AttemptOutcome, StopReason};
pub use events::{DomainEvent, Movement, Recorded};
pub use flows::FlowAdvance;
pub use jobs::ClosedJob;
pub use nodes::REPUTATION_WINDOW;
pub use outbox::{OutboxEvent, OutboxReader, OutboxRow};
pub use rows::{JobCursor, JobRecord};
pub use stats::{AccountStats, AiTotals, NetworkStats};

use crate::ledger::{self, AccountKind, LedgerError};
use rhizos_broker::TokenError;
use rhizos_broker::wire::JobSpec;
use rusqlite::{Connection, OptionalExtension, Savepoint};
use std::path::Path;

/// Why a store operation failed. The orchestrator maps each kind to a wire error code once, at
/// its API edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The job or account named does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not apply to the job in its current state.
    #[error("{0}")]
    InvalidState(String),
    /// The payer's balance cannot cover the hold.
    #[error("{0}")]
    InsufficientFunds(String),
    /// The caller may not do this (an API key of another account, revoked or expired).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("orchestrator storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("orchestrator storage error: stored JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("orchestrator storage error: {0}")]
    Subject(#[from] TokenError),
    /// What is stored breaks a rule the store keeps (a damaged file, a newer schema, a bug).
    #[error("orchestrator storage error: {0}")]
    Corrupt(String),
}

/// A node's signed result report as the orchestrator verified it: the exact signed bytes (the
/// report's JSON without its signature) and the signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignedReport {
    pub report: String,
    pub signature: rhizos_broker::wire::NodeSignature,
}

/// A job waiting for a node.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub job_id: String,
    /// The payer.
    pub account: String,
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
    pub job: JobRecord,
    /// The node must be told to stop this attempt (the job was running there).
    pub stop: Option<(String, u32)>,
}

/// Turns on SQLite's query planner stability guarantee for `conn`: plans never depend on bound
/// values, so a cached statement is not re-prepared each time its parameters change. Bundled
/// SQLite has STAT4, under which a statement with a parameter in a range constraint (`id > ?1`)
/// is re-parsed on every new binding: `perf` found 3.5 % of the ledger thread in
/// `sqlite3Reprepare`, and most of the outbox publisher's reads in the parser, without it.
pub(crate) fn stable_plans(conn: &Connection) -> rusqlite::Result<bool> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )
}

/// The orchestrator's database, owned by the ledger writer thread.
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
    /// Set while a group commit runs its operations: lean units (see [`Store::begin_lean`])
    /// need no savepoint of their own then.
    grouped: bool,
    /// A lean unit ended without committing after writing: the batch must be rolled back.
    broken: std::sync::atomic::AtomicBool,
    /// Where each committed batch's changes go first, while this store is the replicated
    /// ledger's writer (see [`Journal`]); with the tables they are captured from.
    journal: Option<(Box<dyn Journal>, Vec<std::ffi::CString>)>,
    /// A standby of the replicated ledger: nothing but [`Store::apply_replicated`] may change
    /// the file (a batch with any other change is rolled back).
    standby: bool,
    /// Rows changed by [`Store::apply_replicated`] in the current batch.
    replicated_changes: u64,
}

/// The replicated ledger's log, as the store's writer sees it (ADR 0010): each batch's
/// changeset is appended — and acknowledged by a quorum — before the batch commits here, so
/// nothing a client was told of exists only on this machine.
pub trait Journal: Send {
    /// Appends one batch's changeset; returns the log position that now holds it. An error
    /// means the batch is not in the log (or not known to be): it is rolled back here, and the
    /// writer must stop writing until it has caught up with the log again.
    fn append(&mut self, changeset: Vec<u8>) -> Result<u64, String>;
    /// Appends a snapshot record: the ledger as it was after position `covers`, stored as
    /// `object`; returns its position. An error stops the writer as for [`Journal::append`].
    fn append_snapshot(&mut self, object: &str, covers: u64) -> Result<u64, String>;
    /// A batch this journal took did not commit here after all (its commit failed): this
    /// file is now behind the log, so the writer must stop writing and catch up with the log
    /// (where it applies the batch it could not commit).
    fn stop(&mut self, why: String);
}

/// Why a group commit did not commit (nothing of its batch did).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    /// This orchestrator cannot write the replicated ledger now: it is a standby, or its
    /// append was refused or unanswered (it stops serving and catches up). The same request
    /// may be sent again — to whoever serves next.
    #[error("{0}")]
    NotWriting(String),
    /// The batch failed here (an operation half-done, the commit itself).
    #[error("{0}")]
    Failed(String),
}

/// One operation's unit of work: a savepoint, or — inside a group commit, for the operations
/// that refuse only before their first write — the batch's own transaction (a *lean* unit).
/// Both deref to the connection and commit or roll back as a whole: a lean unit that ends
/// without [`Unit::commit`] after writing marks the batch broken, and the whole batch is rolled
/// back ([`Store::group_commit`]).
pub(crate) enum Unit<'a> {
    Savepoint(Savepoint<'a>),
    Lean(Lean<'a>),
}

/// A unit of work inside the batch's transaction, without a savepoint of its own.
pub(crate) struct Lean<'a> {
    conn: &'a Connection,
    /// The connection's change count when the unit began.
    changes: u64,
    committed: bool,
    broken: &'a std::sync::atomic::AtomicBool,
}

impl std::ops::Deref for Unit<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Unit::Savepoint(savepoint) => savepoint,
            Unit::Lean(lean) => lean.conn,
        }
    }
}

impl Unit<'_> {
    /// Keeps what the unit wrote (a lean unit's writes commit with its batch).
    pub(crate) fn commit(self) -> rusqlite::Result<()> {
        match self {
            Unit::Savepoint(savepoint) => savepoint.commit(),
            Unit::Lean(mut lean) => {
                lean.committed = true;
                Ok(())
            }
        }
    }
}

impl Drop for Lean<'_> {
    fn drop(&mut self) {
        // An error (or a panic) after a write: only rolling the whole batch back undoes it.
        if !self.committed && self.conn.total_changes() != self.changes {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Most parsed specs kept (dispatch looks at the oldest 256 pending jobs at a time).
const SPEC_CACHE_ENTRIES: usize = 4096;

/// What the writers need besides the connection (borrowed beside an open transaction).
struct Ctx {
    fee_bps: u32,
    charging: ChargePolicy,
}

/// How reports are turned into charges (`[orchestrator] failed_workload_charge` and
/// `timing_slack_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargePolicy {
    pub failed_workload: rhizos_broker::config::FailedWorkloadCharge,
    pub slack_ms: u64,
}

impl Default for ChargePolicy {
    fn default() -> Self {
        let settings = rhizos_broker::config::OrchestratorSettings::default();
        Self {
            failed_workload: settings.failed_workload_charge,
            slack_ms: settings.timing_slack_ms,
        }
    }
}

/// The write-ahead log's size past which, once copied back, it is started over (and the file
/// cut back to this).
pub const WAL_RESTART_BYTES: i64 = 64 * 1024 * 1024;

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, fee_bps: u32) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a committed movement survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement the store runs stays prepared (there are about fifty).
        conn.set_prepared_statement_cache_capacity(256);
        stable_plans(&conn)?;
        // Savepoint sub-journals (one per operation inside a group commit) stay in memory.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // 64 MiB of page cache (negative: KiB): job rows carry their workload, so the working
        // set of a busy orchestrator is far above SQLite's default 2 MiB.
        conn.pragma_update(None, "cache_size", -65_536)?;
        // A WAL started over is cut back to this size (see `checkpoint_in_background`).
        conn.pragma_update(None, "journal_size_limit", WAL_RESTART_BYTES)?;
        schema::migrate(&conn)?;
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
        let mut store = Self::on(conn, fee_bps, instance);
        let tx = store.tx()?;
        let now = now_ms();
        for (id, kind) in [
            (ledger::EXTERNAL, AccountKind::External),
            (ledger::PLATFORM_FEES, AccountKind::Platform),
        ] {
            ledger::ensure_account(&tx, id, kind, now)?;
        }
        tx.commit()?;
        Ok(store)
    }

    /// A second, read-only handle on the database at `path` (which [`Store::open`] made): for
    /// expensive reads — `ledger.verify`, lists — off the writer thread. WAL lets it read a
    /// consistent snapshot while the writer commits; `query_only` refuses any write through it.
    pub fn open_reader(path: &Path, fee_bps: u32) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        stable_plans(&conn)?;
        let instance: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'instance'", [], |r| {
                r.get(0)
            })?;
        Ok(Self::on(conn, fee_bps, instance))
    }

    /// A store on an open connection, with the default charge policy.
    fn on(conn: Connection, fee_bps: u32, instance: String) -> Self {
        Self {
            conn,
            ctx: Ctx {
                fee_bps,
                charging: ChargePolicy::default(),
            },
            instance,
            checkpointer: None,
            spec_cache: std::collections::HashMap::new(),
            grouped: false,
            broken: std::sync::atomic::AtomicBool::new(false),
            journal: None,
            standby: false,
            replicated_changes: 0,
        }
    }

    /// Runs `f` in one read transaction: every query it makes sees the same snapshot.
    pub fn snapshot<T>(
        &mut self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        let result = f(self);
        let _ = self.conn.execute_batch("COMMIT");
        result
    }

    /// Sets how reports are charged from now on (the defaults until then).
    pub fn set_charge_policy(&mut self, policy: ChargePolicy) {
        self.ctx.charging = policy;
    }

    pub fn charge_policy(&self) -> ChargePolicy {
        self.ctx.charging
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// One operation's unit of work: a savepoint, so it commits or rolls back as a whole — on
    /// its own, or nested inside a group commit (see [`Store::group_commit`]).
    fn tx(&mut self) -> Result<Savepoint<'_>, StoreError> {
        self.conn.savepoint().map_err(StoreError::from)
    }

    /// [`Store::tx`] plus the writer context.
    fn begin(&mut self) -> Result<(Savepoint<'_>, &Ctx), StoreError> {
        let tx = self.conn.savepoint()?;
        Ok((tx, &self.ctx))
    }

    /// [`Store::begin`] for an operation whose every refusal comes before its first write:
    /// inside a group commit it runs in the batch's transaction without a savepoint of its own
    /// (`perf`: a savepoint's statement journal — each page the operation touches copied and
    /// freed again — was a quarter of the ledger thread's time under load). Should it still
    /// end without committing after a write (an I/O error, a bug, a panic), the whole batch is
    /// rolled back and every operation in it answered with an error. Outside a group commit
    /// it is a savepoint.
    fn begin_lean(&mut self) -> Result<(Unit<'_>, &Ctx), StoreError> {
        if !self.grouped {
            let savepoint = self.conn.savepoint()?;
            return Ok((Unit::Savepoint(savepoint), &self.ctx));
        }
        let unit = Lean {
            conn: &self.conn,
            changes: self.conn.total_changes(),
            committed: false,
            broken: &self.broken,
        };
        Ok((Unit::Lean(unit), &self.ctx))
    }

    /// Runs `ops` inside one SQLite transaction and commits once (one fsync for the batch). Each
    /// op still has its own savepoint, so a failed op undoes only itself. Returns the commit's
    /// outcome; callers must not act on any op's result before it.
    pub fn group_commit<R>(
        &mut self,
        ops: impl FnOnce(&mut Store) -> R,
    ) -> (R, Result<(), CommitError>) {
        let grouped = self.conn.execute_batch("BEGIN IMMEDIATE").is_ok()
            || (self.conn.execute_batch("ROLLBACK").is_ok()
                && self.conn.execute_batch("BEGIN IMMEDIATE").is_ok())
            // The replicated ledger's writer never commits operation by operation (each would
            // be in the file before the log has it): a deferred transaction, whose writes wait
            // for the lock — or fail, and the batch with them.
            || (self.journal.is_some() && self.conn.execute_batch("BEGIN").is_ok());
        self.grouped = grouped;
        self.broken
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // Ok(None): not replicating. Err: the changes cannot be captured, so the batch must
        // not commit.
        let capture = match &self.journal {
            Some((_, tables)) => changes::Capture::start(&self.conn, tables).map(Some),
            None => Ok(None),
        };
        let changes_before = self.conn.total_changes();
        self.replicated_changes = 0;
        let results = ops(self);
        self.grouped = false;
        let foreign =
            self.standby && self.conn.total_changes() - changes_before > self.replicated_changes;
        if !grouped {
            // No outer transaction: each op's savepoint committed it on its own.
            let replicated = capture
                .map_err(|e| e.to_string())
                .and_then(|capture| capture.map_or(Ok(()), |c| self.journal_batch(&c)));
            if let Err(e) = replicated {
                tracing::error!(error = %e, "operations committed outside a transaction could not be replicated: this projection is ahead of the replicated ledger");
            }
            if foreign {
                tracing::error!(
                    "a standby's operations committed outside a transaction changed the file: this projection may disagree with the replicated ledger"
                );
            }
            return (results, Ok(()));
        }
        if foreign {
            let _ = self.conn.execute_batch("ROLLBACK");
            return (
                results,
                Err(CommitError::NotWriting(
                    "this orchestrator is a standby: it writes nothing but the replicated ledger's changes".into(),
                )),
            );
        }
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                "a ledger operation failed after writing part of its change; its whole batch is rolled back"
            );
            let rolled_back = self.conn.execute_batch("ROLLBACK");
            return (
                results,
                Err(CommitError::Failed(format!(
                    "batch rolled back (an operation in it failed half-way{}); retry",
                    rolled_back
                        .err()
                        .map(|e| format!(", and the rollback: {e}"))
                        .unwrap_or_default()
                ))),
            );
        }
        let replicated = capture
            .map_err(|e| e.to_string())
            .and_then(|capture| capture.map_or(Ok(()), |c| self.journal_batch(&c)));
        if let Err(e) = replicated {
            let _ = self.conn.execute_batch("ROLLBACK");
            return (
                results,
                Err(CommitError::NotWriting(format!(
                    "not replicated: {e}; retry"
                ))),
            );
        }
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => (results, Ok(())),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                if let Some((journal, _)) = self.journal.as_mut() {
                    journal.stop(format!(
                        "a batch the replicated ledger took did not commit here: {e}"
                    ));
                }
                (
                    results,
                    Err(CommitError::Failed(format!("commit failed: {e}"))),
                )
            }
        }
    }

    /// Appends the batch `capture` recorded to the journal (when it changed anything) and
    /// notes the log position it now has.
    fn journal_batch(&mut self, capture: &changes::Capture) -> Result<(), String> {
        let changeset = capture.changeset().map_err(|e| e.to_string())?;
        if changeset.is_empty() {
            return Ok(());
        }
        let Some((journal, _)) = self.journal.as_mut() else {
            return Ok(());
        };
        let position = journal.append(changeset)?;
        self.set_applied(position).map_err(|e| e.to_string())
    }

    /// Makes this store the replicated ledger's writer (`Some`): from the next batch on, every
    /// batch's changes are appended to `journal` before they commit. `None`: a standby again.
    /// Parsed specs are dropped (a standby's applied changes did not keep them current).
    pub fn set_journal(&mut self, journal: Option<Box<dyn Journal>>) -> Result<(), StoreError> {
        self.spec_cache.clear();
        self.journal = match journal {
            Some(journal) => Some((journal, changes::replicated_tables(&self.conn)?)),
            None => None,
        };
        self.standby = self.journal.is_none();
        Ok(())
    }

    /// Makes this store a standby of the replicated ledger: it changes nothing but what
    /// [`Store::apply_replicated`] applies, until [`Store::set_journal`] makes it the writer.
    pub fn set_standby(&mut self) {
        self.journal = None;
        self.standby = true;
    }

    /// The writer records in the log that a snapshot of the ledger as it was after `covers`
    /// (at most what this file has applied) is stored as `object`; returns the record's
    /// position, now applied.
    pub fn record_snapshot(&mut self, object: &str, covers: u64) -> Result<u64, StoreError> {
        let applied = self.applied()?;
        if covers > applied {
            return Err(StoreError::InvalidState(format!(
                "a snapshot covering record {covers} is ahead of this ledger (applied up to {applied})"
            )));
        }
        let Some((journal, _)) = self.journal.as_mut() else {
            return Err(StoreError::InvalidState(
                "only the replicated ledger's writer records snapshots".into(),
            ));
        };
        let position = journal
            .append_snapshot(object, covers)
            .map_err(StoreError::InvalidState)?;
        self.set_applied(position)?;
        Ok(position)
    }

    /// How far this database has applied the replicated ledger's log (0: nothing yet).
    pub fn applied(&self) -> Result<u64, StoreError> {
        let applied: i64 =
            self.conn
                .query_row("SELECT value FROM replica WHERE key = 'applied'", [], |r| {
                    r.get(0)
                })?;
        Ok(u64::try_from(applied).unwrap_or(0))
    }

    /// Records that the log is applied up to `position` (records skipped included).
    pub fn set_applied(&self, position: u64) -> Result<(), StoreError> {
        let position = i64::try_from(position)
            .map_err(|_| StoreError::Corrupt(format!("log position {position} out of range")))?;
        self.conn.execute(
            "UPDATE replica SET value = ?1 WHERE key = 'applied'",
            [position],
        )?;
        Ok(())
    }

    /// Applies the changeset the log holds at `position` (a standby following the writer): all
    /// of it or nothing, and only right after what was applied last (`after`), so a gap or a
    /// repeat is refused rather than applied twice.
    pub fn apply_replicated(
        &mut self,
        after: u64,
        position: u64,
        changeset: &[u8],
    ) -> Result<(), StoreError> {
        if self.journal.is_some() {
            return Err(StoreError::InvalidState(
                "the replicated ledger's writer applies no one else's changes".into(),
            ));
        }
        // Whether it applies or not, what it wrote (and undid) is the log's, not foreign.
        let before = self.conn.total_changes();
        let result = self.apply_at(after, position, changeset);
        self.replicated_changes += self.conn.total_changes() - before;
        self.spec_cache.clear();
        result
    }

    /// Replaces every replicated table's rows with those of the snapshot database at
    /// `snapshot` (a standby the stream was trimmed past: it cannot replay what it missed),
    /// all at once, and notes the log applied up to `covers`. The file and its connections
    /// stay; only what they hold changes.
    pub fn reset_from_snapshot(&mut self, snapshot: &Path, covers: u64) -> Result<(), StoreError> {
        if self.journal.is_some() {
            return Err(StoreError::InvalidState(
                "the replicated ledger's writer is not reset from a snapshot".into(),
            ));
        }
        let source =
            Connection::open_with_flags(snapshot, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let tables = changes::replicated_tables(&self.conn)?;
        let before = self.conn.total_changes();
        let result = (|| -> Result<(), StoreError> {
            let tx = self.conn.savepoint()?;
            // Rows go in table by table: references are checked once all are in.
            tx.pragma_update(None, "defer_foreign_keys", "ON")?;
            for table in &tables {
                let table = table.to_string_lossy();
                tx.execute(&format!("DELETE FROM \"{table}\""), [])?;
                let mut read = source.prepare(&format!("SELECT * FROM \"{table}\""))?;
                let columns = read.column_count();
                let mut write = tx.prepare(&format!(
                    "INSERT INTO \"{table}\" VALUES ({})",
                    vec!["?"; columns].join(", ")
                ))?;
                let mut rows = read.query([])?;
                while let Some(row) = rows.next()? {
                    let values = (0..columns)
                        .map(|i| row.get::<_, rusqlite::types::Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    write.execute(rusqlite::params_from_iter(values))?;
                }
            }
            let covers = i64::try_from(covers)
                .map_err(|_| StoreError::Corrupt(format!("log position {covers} out of range")))?;
            tx.execute(
                "UPDATE replica SET value = ?1 WHERE key = 'applied'",
                [covers],
            )?;
            tx.commit()?;
            Ok(())
        })();
        self.replicated_changes += self.conn.total_changes() - before;
        self.spec_cache.clear();
        result
    }

    fn apply_at(&mut self, after: u64, position: u64, changeset: &[u8]) -> Result<(), StoreError> {
        let tx = self.conn.savepoint()?;
        let applied: i64 =
            tx.query_row("SELECT value FROM replica WHERE key = 'applied'", [], |r| {
                r.get(0)
            })?;
        if u64::try_from(applied).ok() != Some(after) {
            return Err(StoreError::InvalidState(format!(
                "log position {position} follows {after}, but this projection has applied up to {applied}"
            )));
        }
        if !changeset.is_empty() {
            changes::apply(&tx, changeset)?;
        }
        let position = i64::try_from(position)
            .map_err(|_| StoreError::Corrupt(format!("log position {position} out of range")))?;
        tx.execute(
            "UPDATE replica SET value = ?1 WHERE key = 'applied'",
            [position],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Moves WAL checkpoints (copying committed pages back into the database file, with its own
    /// fsync) off the thread that writes: a second connection checkpoints every `every` in
    /// PASSIVE mode, which never blocks the writer, so commits pay for their WAL append only.
    /// PASSIVE never starts the log over, though: under steady load (a reader somewhere in it
    /// at every moment) the WAL only grows — 200 MiB in 20,000 jobs. Once it holds more than
    /// [`WAL_RESTART_BYTES`] and is all copied back, a RESTART checkpoint waits for the readers
    /// in it to finish (milliseconds; new writes wait meanwhile) so the next commit writes it
    /// from the start, and `journal_size_limit` cuts the file back to that size.
    /// The thread makes a last checkpoint and ends when the store is dropped.
    pub fn checkpoint_in_background(
        &mut self,
        path: &Path,
        every: std::time::Duration,
    ) -> rusqlite::Result<()> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let page_bytes: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let restart_frames = WAL_RESTART_BYTES / page_bytes.max(512);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("rhizos-checkpoint".into())
            .spawn(move || {
                // (busy, frames in the log, frames copied back), or None when it failed.
                let checkpoint = |mode: &str| -> Option<(i64, i64, i64)> {
                    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    }) {
                        Ok(outcome) => Some(outcome),
                        Err(e) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                            None
                        }
                    }
                };
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    if let Some((0, frames, copied)) = checkpoint("PASSIVE")
                        && frames > restart_frames
                        && copied == frames
                    {
                        checkpoint("RESTART");
                    }
                }
                checkpoint("TRUNCATE");
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        // Now nobody else checkpoints: commits no longer stop to copy pages back.
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        self.checkpointer = Some(stop);
        Ok(())
    }

    /// The database's random instance id (part of event dedupe ids).
    pub fn instance(&self) -> &str {
        &self.instance
    }
}
