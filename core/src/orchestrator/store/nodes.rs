//! Nodes and their record. Tables: `nodes` (key `id`: the last registration, JSON), `attempts`
//! (key `(job_id, attempt)`: how each attempt ended on its node, written once) and `node_stats`
//! (key `node_id`: attempts ended, succeeded, and the recent window reputation is computed
//! over — kept up to date in the transaction that records each attempt's end).

use super::ending::AttemptOutcome;
use super::{Store, StoreError};
use crate::ledger::{self, AccountKind, exec};
use crate::now_ms;
use rhizos_broker::wire::RegisterNode;
use rusqlite::{Connection, params};

/// How many of a node's latest attempts its reputation is computed over.
pub const REPUTATION_WINDOW: usize = 100;

impl Store {
    pub fn upsert_node(&mut self, registration: &RegisterNode) -> Result<(), StoreError> {
        let now = now_ms();
        let json = serde_json::to_string(registration)?;
        let tx = self.tx()?;
        exec(&tx,
            "INSERT INTO nodes (id, registration, registered_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET registration = excluded.registration, registered_ms = excluded.registered_ms",
            params![registration.node_id, json, now as i64],
        )
        ?;
        ledger::ensure_account(
            &tx,
            &registration.provider_account,
            AccountKind::Provider,
            now,
        )?;
        tx.commit().map_err(StoreError::from)
    }

    /// Forgets the registrations of `node_ids` that registered before `registered_before_ms`
    /// and run no job (a node that registered again since, or was given work, is kept): their
    /// attempts, stats and enrolment stay. Returns the ids forgotten.
    pub fn forget_nodes(
        &mut self,
        node_ids: &[String],
        registered_before_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        let tx = self.tx()?;
        let mut forgotten = Vec::new();
        for node_id in node_ids {
            let deleted = tx.execute(
                "DELETE FROM nodes WHERE id = ?1 AND registered_ms < ?2
                   AND NOT EXISTS (SELECT 1 FROM jobs
                                   WHERE node_id = ?1 AND state IN ('assigned', 'running'))",
                params![
                    node_id,
                    i64::try_from(registered_before_ms).unwrap_or(i64::MAX)
                ],
            )?;
            if deleted == 1 {
                forgotten.push(node_id.clone());
            }
        }
        tx.commit()?;
        Ok(forgotten)
    }

    pub fn nodes(&self) -> Result<Vec<(RegisterNode, u64)>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT registration, registered_ms FROM nodes")?;
        let rows =
            statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut nodes = Vec::new();
        for row in rows {
            let (json, registered_ms) = row?;
            nodes.push((serde_json::from_str(&json)?, registered_ms as u64));
        }
        Ok(nodes)
    }

    /// Per node: (attempts ended there, of which succeeded, reputation). Reputation is the success
    /// ratio over the node's last 100 attempts that succeeded or failed through the node (lost,
    /// restarted, assignment not taken); the workload's own failures and cancels do not count.
    pub fn node_stats(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, u64, f64)>, StoreError> {
        self.node_stats_between(None)
    }

    /// [`Store::node_stats`] of the nodes whose ids lie in `first..=last` (a page of
    /// `node.list`), or of all.
    pub fn node_stats_between(
        &self,
        range: Option<(&str, &str)>,
    ) -> Result<std::collections::HashMap<String, (u64, u64, f64)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT node_id, ended, succeeded, recent FROM node_stats
             WHERE ?1 IS NULL OR node_id BETWEEN ?1 AND ?2",
        )?;
        let rows = statement.query_map(params![range.map(|r| r.0), range.map(|r| r.1)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut stats = std::collections::HashMap::new();
        for row in rows {
            let (node, ended, succeeded, recent) = row?;
            stats.insert(node, (ended as u64, succeeded as u64, reputation(&recent)));
        }
        Ok(stats)
    }
}

/// Records how an attempt ended on its node (once; a replay changes nothing).
pub(super) fn record_attempt(
    tx: &Connection,
    job_id: &str,
    attempt: u32,
    node_id: &str,
    outcome: AttemptOutcome,
    now: u64,
) -> Result<(), StoreError> {
    let inserted = exec(tx,
        "INSERT INTO attempts (job_id, attempt, node_id, outcome, ended_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(job_id, attempt) DO NOTHING",
        params![job_id, attempt, node_id, outcome.as_str(), now as i64],
    )?;
    if inserted == 1 {
        count_attempt(tx, node_id, outcome)?;
    }
    Ok(())
}

/// Adds one ended attempt to its node's running totals (one statement: the window of recent
/// outcomes is cut to its last [`REPUTATION_WINDOW`] letters in SQL).
pub(super) fn count_attempt(
    tx: &Connection,
    node_id: &str,
    outcome: AttemptOutcome,
) -> rusqlite::Result<()> {
    exec(
        tx,
        "INSERT INTO node_stats (node_id, ended, succeeded, recent) VALUES (?1, 1, ?2, ?3)
         ON CONFLICT(node_id) DO UPDATE SET ended = ended + 1, succeeded = succeeded + ?2,
             recent = substr(recent || ?3, -?4)",
        params![
            node_id,
            i64::from(outcome == AttemptOutcome::Succeeded),
            outcome.reputation_letter(),
            REPUTATION_WINDOW as i64
        ],
    )?;
    Ok(())
}

pub(super) fn reputation(recent: &str) -> f64 {
    if recent.is_empty() {
        return 1.0;
    }
    recent.bytes().filter(|b| *b == b's').count() as f64 / recent.len() as f64
}
