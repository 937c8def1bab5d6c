//! Accounts: creation, deposits (idempotent by key), balances with what escrow holds, and
//! statements. Balances and postings are the ledger's tables ([`crate::ledger`]); the money
//! held is summed from the open jobs in `jobs`.

use super::{Store, StoreError};
use crate::ledger::{self, AccountKind, LedgerError, TxKind, query_row};
use crate::now_ms;
use rhizos_broker::wire::{AccountView, Statement, StatementLine};
use rusqlite::params;

impl Store {
    pub fn create_account(&mut self, account: &str) -> Result<AccountView, StoreError> {
        let tx = self.tx()?;
        if !ledger::ensure_account(&tx, account, AccountKind::User, now_ms())? {
            return Err(StoreError::AlreadyExists(format!(
                "account {account} already exists"
            )));
        }
        tx.commit()?;
        self.account(account)
    }

    pub fn deposit(
        &mut self,
        account: &str,
        amount_micros: i64,
        key: Option<&str>,
    ) -> Result<AccountView, StoreError> {
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
            TxKind::Deposit,
            None,
            &[(ledger::EXTERNAL, -amount_micros), (account, amount_micros)],
            now_ms(),
        )?;
        tx.commit()?;
        self.account(account)
    }

    /// Pays `amount_micros` out of `account` to `external`, once per `key`: a retry after the
    /// money left changes nothing and answers the balance now. Never below zero.
    pub fn withdraw(
        &mut self,
        account: &str,
        amount_micros: i64,
        key: &str,
    ) -> Result<AccountView, StoreError> {
        if amount_micros <= 0 {
            return Err(LedgerError::NonPositive(amount_micros).into());
        }
        let tx = self.tx()?;
        if ledger::balance(&tx, account)?.is_none() {
            return Err(no_account(account));
        }
        ledger::post(
            &tx,
            &format!("withdraw:{account}:{key}"),
            TxKind::Withdraw,
            None,
            &[(account, -amount_micros), (ledger::EXTERNAL, amount_micros)],
            now_ms(),
        )?;
        tx.commit()?;
        self.account(account)
    }

    pub fn account(&self, account: &str) -> Result<AccountView, StoreError> {
        let balance = ledger::balance(&self.conn, account)?.ok_or_else(|| no_account(account))?;
        let held_micros: i64 = query_row(
            &self.conn,
            // Open jobs' holds (a flow's steps' too) and what open flows' escrows have left.
            "SELECT (SELECT COALESCE(SUM(max_cost_micros), 0) FROM jobs WHERE account_id = ?1
                         AND state IN ('pending', 'assigned', 'running'))
                  + (SELECT COALESCE(SUM(a.balance_micros), 0) FROM flows f
                         JOIN accounts a ON a.id = 'flow:' || f.id
                         WHERE f.account_id = ?1 AND f.state IN ('running', 'stopping'))",
            [account],
            |r| r.get(0),
        )?;
        Ok(AccountView {
            account: account.to_owned(),
            balance_micros: balance,
            held_micros,
        })
    }

    /// An account's postings, newest first, with the balance after each.
    pub fn statement(&self, account: &str, limit: u32) -> Result<Statement, StoreError> {
        let balance = ledger::balance(&self.conn, account)?.ok_or_else(|| no_account(account))?;
        let mut statement = self
            .conn
            .prepare_cached(
                "SELECT t.id, t.kind, t.job_id, p.amount_micros, t.created_ms FROM postings p
                 JOIN ledger_tx t ON t.id = p.tx_id WHERE p.account_id = ?1 ORDER BY p.id DESC LIMIT ?2",
            )
            ?;
        let rows = statement.query_map(params![account, limit.min(10_000)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut lines = Vec::new();
        let mut after = balance;
        for row in rows {
            let (tx_id, kind, job_id, amount_micros, created_ms) = row?;
            lines.push(StatementLine {
                tx_id,
                kind,
                job_id,
                amount_micros,
                balance_after_micros: after,
                created_ms: created_ms as u64,
            });
            after -= amount_micros;
        }
        Ok(Statement {
            account: account.to_owned(),
            balance_micros: balance,
            lines,
        })
    }
}

pub(super) fn no_account(account: &str) -> StoreError {
    StoreError::NotFound(format!(
        "no account {account}: create it with `rhizos account create {account}`"
    ))
}
