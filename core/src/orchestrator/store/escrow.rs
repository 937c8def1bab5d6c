//! Closing a job's escrow, exactly once (`close:<job>`): settle (the measured cost, capped at the
//! hold, to the provider minus the fee; the fee to `platform:fees`; the rest back to the payer)
//! or refund (the whole hold back). Both record the split on the job and emit the escrow event in
//! the same transaction. The hold itself is taken at submit (`jobs`).

use super::events::{DomainEvent, Movement};
use super::{Ctx, StoreError};
use crate::ledger::{self, AccountKind, Applied, TxKind, escrow_account, exec, query_row};
use rusqlite::{Connection, params};

impl Ctx {
    pub(super) fn job_account_and_hold(
        tx: &Connection,
        job_id: &str,
    ) -> Result<(String, i64), StoreError> {
        query_row(
            tx,
            "SELECT COALESCE(payer_account, account_id), max_cost_micros FROM jobs WHERE id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(StoreError::from)
    }

    pub(super) fn settle(
        &self,
        tx: &Connection,
        job_id: &str,
        measured_micros: i64,
        now: u64,
    ) -> Result<(), StoreError> {
        // The job's payer and hold, and the provider account recorded when it was assigned (a
        // later registration cannot redirect it; rows assigned before that was recorded: the
        // node's registration).
        // The payer: the job's account, or the flow whose escrow held for it.
        let (account, hold, provider, key_id, payer): (String, i64, String, Option<String>, String) = query_row(
            tx,
            "SELECT j.account_id, j.max_cost_micros,
                    COALESCE(j.provider_account, json_extract(n.registration, '$.provider_account')),
                    j.key_id, COALESCE(j.payer_account, j.account_id)
             FROM jobs j LEFT JOIN nodes n ON n.id = j.node_id WHERE j.id = ?1",
            [job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        ledger::ensure_account(tx, &provider, AccountKind::Provider, now)?;
        let split = ledger::split(measured_micros, hold, self.fee_bps);
        let escrow = escrow_account(job_id);
        let applied = ledger::post(
            tx,
            &format!("close:{job_id}"),
            TxKind::Settle,
            Some(job_id),
            &[
                (&escrow, -hold),
                (&provider, split.provider_micros),
                (ledger::PLATFORM_FEES, split.fee_micros),
                (&payer, split.refund_micros),
            ],
            now,
        )?;
        if applied == Applied::Duplicate {
            return Ok(());
        }
        exec(
            tx,
            "UPDATE jobs SET cost_micros = ?2, provider_micros = ?3, fee_micros = ?4, refund_micros = ?5, fee_bps = ?6
             WHERE id = ?1",
            params![
                job_id,
                split.cost_micros,
                split.provider_micros,
                split.fee_micros,
                split.refund_micros,
                self.fee_bps
            ],
        )?;
        // What the job cost counts against the API key it was charged to, once (this runs only
        // with the settlement's first posting).
        if let Some(key_id) = &key_id {
            exec(
                tx,
                "UPDATE api_keys SET spent_micros = spent_micros + ?2 WHERE key_id = ?1",
                params![key_id, split.cost_micros],
            )?;
        }
        self.emit(
            tx,
            DomainEvent::Escrow {
                job_id: job_id.to_owned(),
                movement: Movement::Settled,
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

    pub(super) fn refund(&self, tx: &Connection, job_id: &str, now: u64) -> Result<(), StoreError> {
        let (payer, hold) = Self::job_account_and_hold(tx, job_id)?;
        let escrow = escrow_account(job_id);
        let applied = ledger::post(
            tx,
            &format!("close:{job_id}"),
            TxKind::Refund,
            Some(job_id),
            &[(&escrow, -hold), (&payer, hold)],
            now,
        )?;
        if applied == Applied::Duplicate {
            return Ok(());
        }
        exec(
            tx,
            "UPDATE jobs SET cost_micros = 0, provider_micros = 0, fee_micros = 0, refund_micros = ?2 WHERE id = ?1",
            params![job_id, hold],
        )?;
        let account: String = query_row(
            tx,
            "SELECT account_id FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )?;
        self.emit(
            tx,
            DomainEvent::Escrow {
                job_id: job_id.to_owned(),
                movement: Movement::Refunded,
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
}
