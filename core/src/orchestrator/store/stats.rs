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
    /// AI gateway jobs (charged to an API key), ever, and their billed units.
    pub ai: AiTotals,
}

/// AI gateway jobs (those charged to an API key) and the units billed for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AiTotals {
    pub requests: i64,
    pub input_units: i64,
    pub output_units: i64,
}

/// One account's jobs and money.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountStats {
    pub jobs_by_state: Vec<(String, i64)>,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub ai: AiTotals,
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
            ai: self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*), SUM(billed_input_units), SUM(billed_output_units) \
                     FROM jobs WHERE key_id IS NOT NULL",
                )?
                .query_row([], ai_totals)?,
        })
    }

    /// One account's jobs by state, balance, money held for its open jobs, and AI usage.
    pub fn account_stats(&self, account: &str) -> Result<AccountStats, StoreError> {
        let view = self.account(account)?;
        let mut statement = self.conn.prepare_cached(
            "SELECT state, COUNT(*) FROM jobs WHERE account_id = ?1 GROUP BY state",
        )?;
        let jobs_by_state = statement
            .query_map([account], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let ai = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*), SUM(billed_input_units), SUM(billed_output_units) \
                 FROM jobs WHERE account_id = ?1 AND key_id IS NOT NULL",
            )?
            .query_row([account], ai_totals)?;
        Ok(AccountStats {
            jobs_by_state,
            balance_micros: view.balance_micros,
            held_micros: view.held_micros,
            ai,
        })
    }
}

fn ai_totals(row: &rusqlite::Row<'_>) -> rusqlite::Result<AiTotals> {
    Ok(AiTotals {
        requests: row.get(0)?,
        input_units: row.get::<_, Option<i64>>(1)?.unwrap_or(0),
        output_units: row.get::<_, Option<i64>>(2)?.unwrap_or(0),
    })
}
