//! `account.*` and `ledger.verify` requests.

use super::super::Orchestrator;
use super::super::validate::{limits::MAX_COST_MICROS, party_account, token};
use super::own_account;
use rhizos_broker::wire::{
    self, AccountRef, CreateAccount, Deposit, ErrorCode, StatementRequest, VerifyLedger, WireError,
    Withdraw,
};
use rhizos_broker::{Caller, validate_token};

impl Orchestrator {
    pub(in crate::orchestrator) async fn account_create(
        &self,
        request: CreateAccount,
    ) -> Result<wire::AccountView, WireError> {
        party_account("account", &request.account)?;
        self.db(move |store| store.create_account(&request.account))
            .await
    }

    pub(in crate::orchestrator) async fn account_deposit(
        &self,
        request: Deposit,
    ) -> Result<wire::AccountView, WireError> {
        party_account("account", &request.account)?;
        if let Some(key) = &request.idempotency_key {
            token(validate_token("idempotency key", key))?;
        }
        if request.amount_micros <= 0 || request.amount_micros > MAX_COST_MICROS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "deposit must be between 1 and {MAX_COST_MICROS} micro-USD, got {}",
                    request.amount_micros
                ),
            ));
        }
        self.db(move |store| {
            store.deposit(
                &request.account,
                request.amount_micros,
                request.idempotency_key.as_deref(),
            )
        })
        .await
    }

    pub(in crate::orchestrator) async fn account_withdraw(
        &self,
        request: Withdraw,
    ) -> Result<wire::AccountView, WireError> {
        party_account("account", &request.account)?;
        token(validate_token("idempotency key", &request.idempotency_key))?;
        if request.amount_micros <= 0 || request.amount_micros > MAX_COST_MICROS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "withdrawal must be between 1 and {MAX_COST_MICROS} micro-USD, got {}",
                    request.amount_micros
                ),
            ));
        }
        let view = self
            .db(move |store| {
                store.withdraw(
                    &request.account,
                    request.amount_micros,
                    &request.idempotency_key,
                )
            })
            .await?;
        tracing::info!(account = %view.account, balance_micros = view.balance_micros, "withdrawal");
        Ok(view)
    }

    pub(in crate::orchestrator) async fn account_balance(
        &self,
        caller: Caller,
        request: AccountRef,
    ) -> Result<wire::AccountView, WireError> {
        token(validate_token("account", &request.account))?;
        own_account(&caller, &request.account)?;
        self.db(move |store| store.account(&request.account)).await
    }

    pub(in crate::orchestrator) async fn account_statement(
        &self,
        caller: Caller,
        request: StatementRequest,
    ) -> Result<wire::Statement, WireError> {
        token(validate_token("account", &request.account))?;
        own_account(&caller, &request.account)?;
        let limit = request.limit.unwrap_or(100);
        self.db(move |store| store.statement(&request.account, limit))
            .await
    }

    pub(in crate::orchestrator) async fn ledger_verify(
        &self,
        _request: VerifyLedger,
    ) -> Result<wire::LedgerReport, WireError> {
        self.verify_ledger().await
    }

    /// Checks the ledger invariants (for `rhizos ledger verify` and tests), on a read snapshot
    /// off the writer thread.
    pub async fn verify_ledger(&self) -> Result<wire::LedgerReport, WireError> {
        self.read(|store| store.verify()).await
    }
}
