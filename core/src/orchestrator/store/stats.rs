//! What the network looks like now, in a few aggregate reads (for metrics scrapes and
//! monitoring): jobs by state, the outbox's backlog, money held in escrow, fees earned.

use super::{Store, StoreError};
use crate::ledger::{self, AccountKind};

/// Aggregates over the whole database, read in one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// (state, jobs in it), every state with at least one job.
    pub jobs_by_state: Vec<(String, i64)>,
    pub outbox_pending: i64,
    pub escrow_held_micros: i64,
    pub fees_micros: i64,
}

impl Store {
    /// Jobs by state, outbox rows waiting, escrow held and fees earned.
    pub fn network_stats(&self) -> Result<NetworkStats, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        let jobs_by_state = statement
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let count = |sql: &str, key: &str| -> Result<i64, StoreError> {
            Ok(self
                .conn
                .prepare_cached(sql)?
                .query_row([key], |r| r.get::<_, Option<i64>>(0))?
                .unwrap_or(0))
        };
        Ok(NetworkStats {
            jobs_by_state,
            outbox_pending: self
                .conn
                .prepare_cached("SELECT COUNT(*) FROM outbox")?
                .query_row([], |r| r.get(0))?,
            escrow_held_micros: count(
                "SELECT SUM(balance_micros) FROM accounts WHERE kind = ?1",
                AccountKind::Escrow.as_str(),
            )?,
            fees_micros: count(
                "SELECT SUM(balance_micros) FROM accounts WHERE id = ?1",
                ledger::PLATFORM_FEES,
            )?,
        })
    }
}
