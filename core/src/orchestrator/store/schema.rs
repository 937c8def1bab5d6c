//! The schema and its numbered migrations. `PRAGMA user_version` is the number of migrations a
//! database has had; [`migrate`] applies the missing ones in order, each in its own transaction,
//! and refuses a database written by a newer release.
//!
//! Tables (the ledger's own `accounts`, `ledger_tx` and `postings` are in [`crate::ledger`]):
//! * `jobs` — key `id`: a job, its spec, state, current attempt, node and agreed pricing, its
//!   outcome and its money split once closed (see `jobs` and `escrow`); past
//!   `job_payload_max_age_s` its payloads are dropped (`pruned_ms`, with the digests its
//!   receipt keeps: see `retention`);
//! * `nodes` — key `id`: the last registration of each node (JSON);
//! * `attempts` — key `(job_id, attempt)`: how each attempt ended on its node;
//! * `node_stats` — key `node_id`: running totals over `attempts` (reputation);
//! * `outbox` — key `id` (ascending): committed events waiting to be published;
//! * `meta` — key `key`: `instance`, the database's random id.

use crate::ledger;
use rusqlite::Connection;

/// The tables as of migration 1 (`CREATE … IF NOT EXISTS`, so applying it again changes nothing).
pub(super) const SCHEMA: &str = "
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

/// Columns added to `jobs` before migrations were numbered: a database from then has some of
/// them; migration 1 adds the missing ones.
const PRE_VERSIONING_COLUMNS: &[(&str, &str, &str)] = &[
    ("jobs", "queue_timeout_ms", "INTEGER"),
    ("jobs", "fuel_consumed", "INTEGER"),
    ("jobs", "output_files", "TEXT"),
];

/// One step of the schema: `MIGRATIONS[n]` takes a database from `user_version` n to n + 1.
struct Migration {
    name: &'static str,
    apply: fn(&Connection) -> rusqlite::Result<()>,
}

/// Every migration, in order. A new one goes at the end; released ones never change.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001 jobs, nodes, attempts, node_stats, outbox, meta and the ledger",
        apply: migration_0001,
    },
    Migration {
        name: "0002 outbox rows hold domain events (outbox.event)",
        apply: |conn| conn.execute_batch("ALTER TABLE outbox ADD COLUMN event TEXT"),
    },
    Migration {
        name: "0003 jobs record the provider account at assignment and when they started running",
        apply: |conn| {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN provider_account TEXT;
                 ALTER TABLE jobs ADD COLUMN started_ms INTEGER;",
            )
        },
    },
    Migration {
        name: "0004 enrolments: node ids and provider accounts fixed by the operator",
        apply: |conn| {
            conn.execute_batch(
                "CREATE TABLE enrolments (
                    node_id TEXT PRIMARY KEY,
                    provider_account TEXT NOT NULL,
                    public_key TEXT,
                    enrolled_ms INTEGER NOT NULL,
                    removed_ms INTEGER
                 );",
            )
        },
    },
    Migration {
        name: "0005 jobs keep the node's signed result report (for receipts)",
        apply: |conn| conn.execute_batch("ALTER TABLE jobs ADD COLUMN node_report TEXT"),
    },
    Migration {
        name: "0006 jobs record what billing is bounded by (timeout, assignment time, fuel limit sent) and what was billed",
        apply: |conn| {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN timeout_ms INTEGER;
                 ALTER TABLE jobs ADD COLUMN assigned_ms INTEGER;
                 ALTER TABLE jobs ADD COLUMN fuel_limit INTEGER;
                 ALTER TABLE jobs ADD COLUMN billed_elapsed_ms INTEGER;
                 ALTER TABLE jobs ADD COLUMN billed_fuel INTEGER;
                 ALTER TABLE jobs ADD COLUMN fee_bps INTEGER;
                 UPDATE jobs SET timeout_ms = json_extract(spec, '$.timeout_ms');",
            )
        },
    },
    Migration {
        name: "0007 jobs keep the references of their results' out-of-band blobs",
        apply: |conn| conn.execute_batch("ALTER TABLE jobs ADD COLUMN output_blobs TEXT"),
    },
    Migration {
        name: "0008 api_keys: the AI gateway's keys (their SHA-256 only), limits and spend",
        apply: |conn| {
            conn.execute_batch(
                "CREATE TABLE api_keys (
                     key_id TEXT PRIMARY KEY,
                     key_sha256 TEXT NOT NULL UNIQUE,
                     account_id TEXT NOT NULL,
                     name TEXT,
                     credit_limit_micros INTEGER,
                     spent_micros INTEGER NOT NULL DEFAULT 0,
                     models TEXT,
                     routes TEXT,
                     rpm INTEGER,
                     tpm INTEGER,
                     expires_ms INTEGER,
                     created_ms INTEGER NOT NULL,
                     last_used_ms INTEGER,
                     revoked_ms INTEGER
                 );
                 CREATE INDEX api_keys_account ON api_keys (account_id, created_ms);",
            )
        },
    },
    Migration {
        name: "0009 jobs charged to an API key name it (the key's budget counts their holds)",
        apply: |conn| {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN key_id TEXT;
                 CREATE INDEX jobs_key ON jobs (key_id) WHERE key_id IS NOT NULL;",
            )
        },
    },
    Migration {
        name: "0010 metered jobs: units reported, witnessed by the gateway, and billed",
        apply: |conn| {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN reported_input_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN reported_output_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN witness_attempt INTEGER;
                 ALTER TABLE jobs ADD COLUMN witness_input_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN witness_output_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN max_input_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN max_output_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN billed_input_units INTEGER;
                 ALTER TABLE jobs ADD COLUMN billed_output_units INTEGER;",
            )
        },
    },
    Migration {
        name: "0011 replica: how far this database has applied the replicated ledger stream",
        apply: |conn| {
            conn.execute_batch(
                "CREATE TABLE replica (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
                 INSERT INTO replica (key, value) VALUES ('applied', 0);",
            )
        },
    },
    Migration {
        name: "0012 flows: graphs of jobs paid from one escrow (flow:<id>), and each job's payer",
        apply: |conn| {
            conn.execute_batch(
                "CREATE TABLE flows (
                     id TEXT PRIMARY KEY,
                     account_id TEXT NOT NULL,
                     name TEXT NOT NULL,
                     spec TEXT NOT NULL,
                     state TEXT NOT NULL,
                     outcome TEXT,
                     reason TEXT,
                     max_cost_micros INTEGER NOT NULL,
                     cost_micros INTEGER,
                     refund_micros INTEGER,
                     created_ms INTEGER NOT NULL,
                     updated_ms INTEGER NOT NULL,
                     deadline_ms INTEGER
                 );
                 CREATE INDEX flows_by_account ON flows(account_id, created_ms);
                 CREATE INDEX flows_open ON flows(state) WHERE state IN ('running', 'stopping');
                 CREATE TABLE flow_steps (
                     flow_id TEXT NOT NULL REFERENCES flows(id),
                     idx INTEGER NOT NULL,
                     step TEXT NOT NULL,
                     state TEXT NOT NULL,
                     runs INTEGER NOT NULL DEFAULT 0,
                     job_id TEXT,
                     exit_code INTEGER,
                     reason TEXT,
                     cost_micros INTEGER NOT NULL DEFAULT 0,
                     not_before_ms INTEGER,
                     updated_ms INTEGER NOT NULL,
                     PRIMARY KEY (flow_id, idx)
                 );
                 ALTER TABLE jobs ADD COLUMN payer_account TEXT;",
            )
        },
    },
    Migration {
        name: "0013 ended jobs' payloads are dropped after [orchestrator] job_payload_max_age_s: when, and the digests their receipts keep",
        apply: |conn| {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN pruned_ms INTEGER;
                 ALTER TABLE jobs ADD COLUMN spec_sha256 TEXT;
                 ALTER TABLE jobs ADD COLUMN result_sha256 TEXT;
                 CREATE INDEX jobs_prunable ON jobs(updated_ms)
                     WHERE pruned_ms IS NULL AND cost_micros IS NOT NULL;",
            )
        },
    },
];

/// The schema version this release writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Brings the database up to [`SCHEMA_VERSION`].
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the ledger has schema version {version}, written by a newer RhizOS; this one knows up to {SCHEMA_VERSION}: upgrade rhizosd"
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        (migration.apply)(&tx).map_err(|e| {
            StoreError::Corrupt(format!("schema migration {} failed: {e}", migration.name))
        })?;
        tx.pragma_update(None, "user_version", index as u32 + 1)?;
        tx.commit()?;
        tracing::debug!(migration = migration.name, "ledger schema migrated");
    }
    Ok(())
}

/// The first numbered schema. A database from before numbering (user_version 0 with tables)
/// gets the columns and the `node_stats` table it lacks, the latter filled from `attempts`.
fn migration_0001(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(ledger::SCHEMA)?;
    let had_jobs: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'",
        [],
        |r| r.get(0),
    )?;
    if had_jobs {
        for (table, column, declaration) in PRE_VERSIONING_COLUMNS {
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
    }
    conn.execute_batch(SCHEMA)?;
    let (stats, attempts): (i64, i64) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM node_stats), (SELECT COUNT(*) FROM attempts)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if stats == 0 && attempts > 0 {
        let mut statement = conn.prepare(
            "SELECT node_id, outcome FROM attempts ORDER BY node_id, ended_ms, job_id, attempt",
        )?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        drop(statement);
        for (node_id, outcome) in rows {
            // Unknown outcome text (none was ever written) counts as ended, not for reputation.
            let outcome =
                super::AttemptOutcome::parse(&outcome).unwrap_or(super::AttemptOutcome::JobFailed);
            super::nodes::count_attempt(conn, &node_id, outcome)?;
        }
    }
    Ok(())
}

use super::StoreError;
