//! `account.*`, `network.stats` and `ledger.verify` requests.

use super::super::Orchestrator;
use super::super::validate::{limits::MAX_COST_MICROS, party_account, token};
use super::{forbidden, own_account};
use rhizos_broker::wire::{
    self, AccountRef, CreateAccount, Deposit, ErrorCode, JobState, StatementRequest, StatsRequest,
    VerifyLedger, WireError, Withdraw,
};
use rhizos_broker::{Caller, Role, validate_token};

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

    /// `network.stats`: the whole network's figures (operator; read at most once a second) or
    /// one account's (its user, or the operator).
    pub(in crate::orchestrator) async fn network_stats(
        &self,
        caller: Caller,
        request: StatsRequest,
    ) -> Result<wire::NetworkStatsView, WireError> {
        let (nodes_live, nodes_lost) = {
            let registry = self.registry();
            let live = registry.live_count();
            (live, registry.registered_count().saturating_sub(live))
        };
        let Some(account) = request.account else {
            if caller.role != Role::Operator {
                return Err(forbidden(
                    "the whole network's figures are the operator's; pass your account".into(),
                ));
            }
            let mut cached = self.inner.network_stats.lock().await;
            if let Some((at, view)) = cached.as_ref()
                && at.elapsed() < std::time::Duration::from_secs(1)
            {
                return Ok(view.clone());
            }
            let stats = self.read(|store| store.network_stats()).await?;
            let view = wire::NetworkStatsView {
                ts_ms: crate::now_ms(),
                account: None,
                nodes_live: nodes_live as u64,
                nodes_lost: nodes_lost as u64,
                jobs_ended: ended(&stats.jobs_by_state),
                jobs_by_state: by_state(stats.jobs_by_state),
                escrow_held_micros: stats.escrow_held_micros,
                fees_micros: Some(stats.fees_micros),
                balance_micros: None,
                ai_requests: stats.ai.requests.max(0) as u64,
                ai_input_units: stats.ai.input_units.max(0) as u64,
                ai_output_units: stats.ai.output_units.max(0) as u64,
            };
            *cached = Some((std::time::Instant::now(), view.clone()));
            return Ok(view);
        };
        token(validate_token("account", &account))?;
        own_account(&caller, &account)?;
        let read_for = account.clone();
        let stats = self
            .read(move |store| store.account_stats(&read_for))
            .await?;
        Ok(wire::NetworkStatsView {
            ts_ms: crate::now_ms(),
            account: Some(account),
            nodes_live: nodes_live as u64,
            nodes_lost: nodes_lost as u64,
            jobs_ended: ended(&stats.jobs_by_state),
            jobs_by_state: by_state(stats.jobs_by_state),
            escrow_held_micros: stats.held_micros,
            fees_micros: None,
            balance_micros: Some(stats.balance_micros),
            ai_requests: stats.ai.requests.max(0) as u64,
            ai_input_units: stats.ai.input_units.max(0) as u64,
            ai_output_units: stats.ai.output_units.max(0) as u64,
        })
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

fn by_state(rows: Vec<(String, i64)>) -> std::collections::BTreeMap<String, u64> {
    rows.into_iter()
        .map(|(state, n)| (state, n.max(0) as u64))
        .collect()
}

/// Jobs in a final state.
fn ended(rows: &[(String, i64)]) -> u64 {
    rows.iter()
        .filter(|(state, _)| JobState::parse(state).is_some_and(JobState::is_terminal))
        .map(|(_, n)| (*n).max(0).unsigned_abs())
        .sum()
}
