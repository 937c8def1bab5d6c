//! `ledger.verify`: the ledger's own invariants ([`crate::ledger::verify`]) plus, per job, that
//! its escrow agrees with its state and its recorded split adds up.

use super::{Store, StoreError};
use crate::ledger;
use rhizos_broker::wire::{JobState, LedgerReport};

impl Store {
    /// The ledger invariants plus, per job: an open job's escrow holds exactly its `max_cost` and
    /// has no closing movement; an ended job's escrow is empty, closed exactly once, and its
    /// recorded split adds up (cost + refund = hold, provider + fee = cost).
    pub fn verify(&self) -> Result<LedgerReport, StoreError> {
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
            ?;
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
        let rows = statement.query_map([], |r| {
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
        })?;
        let mut jobs_checked = 0;
        for row in rows {
            let (id, state, hold, cost, provider, fee, refund, escrow, closes, holds) = row?;
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
        Ok(LedgerReport {
            ok: problems.is_empty(),
            accounts: base.accounts,
            transactions: base.transactions,
            postings_sum_micros: base.postings_sum_micros,
            jobs_checked,
            problems,
        })
    }
}
