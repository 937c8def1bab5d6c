//! Accounts and the ledger: create, deposit, balance, statement and verify requests and replies.
//! Money is integer micro-USD.

use serde::{Deserialize, Serialize};

/// `account.balance` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRef {
    pub v: u32,
    pub account: String,
}

/// `account.create` request (the same shape as [`AccountRef`], its own type so it cannot be sent
/// to `account.balance` by mistake).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAccount {
    pub v: u32,
    pub account: String,
}

/// `account.deposit` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deposit {
    pub v: u32,
    pub account: String,
    pub amount_micros: i64,
    /// Repeating a deposit with the same key changes nothing (safe retries).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// `account.withdraw` request (operator): a payout from `account` to `external`. Never takes a
/// balance below zero (money held in escrow is not the account's to withdraw).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Withdraw {
    pub v: u32,
    pub account: String,
    pub amount_micros: i64,
    /// Required: a retry with the same key pays out once.
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    pub account: String,
    pub balance_micros: i64,
    /// Money of this account currently held in escrow by its running jobs.
    pub held_micros: i64,
}

/// `ledger.verify` request (no parameters besides the version).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyLedger {
    pub v: u32,
}

/// What `ledger.verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReport {
    pub ok: bool,
    pub accounts: u64,
    pub transactions: u64,
    pub postings_sum_micros: i64,
    pub jobs_checked: u64,
    pub problems: Vec<String>,
}

/// `account.statement` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementRequest {
    pub v: u32,
    pub account: String,
    /// At most this many postings, newest first (default 100, at most 10 000).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub tx_id: i64,
    /// `deposit`, `hold`, `settle`, `refund`.
    pub kind: String,
    pub job_id: Option<String>,
    pub amount_micros: i64,
    /// Balance right after this posting.
    pub balance_after_micros: i64,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub account: String,
    pub balance_micros: i64,
    pub lines: Vec<StatementLine>,
}

/// Parses `"1"`, `"0.05"`, `"$2.500000"` into micro-USD. At most 6 decimals.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    let trimmed = text.trim().trim_start_matches('$');
    let (whole, fraction) = trimmed.split_once('.').unwrap_or((trimmed, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) {
        return Err(format!(
            "{text:?} is not an amount in USD (examples: 5, 0.25, 0.000150)"
        ));
    }
    if fraction.len() > 6 {
        return Err(format!(
            "{text:?} has more than 6 decimals; the smallest unit is 0.000001 USD"
        ));
    }
    let whole: i64 = whole
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let fraction: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}")
            .parse()
            .map_err(|_| "bad decimals")?
    };
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `1234567` → `$1.234567` (exact: integer micro-USD, no floating point).
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}${}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// `network.stats` request: the whole network's figures (operator), or one account's (that
/// account's user, or the operator).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsRequest {
    pub v: u32,
    /// None: the whole network (operator only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// What the network (or one account) looks like now, in one reply: what `rhizos top` and the
/// dashboards poll once a second instead of asking every node. The totals only grow, so a
/// client turns two replies into rates (jobs ended per second, tokens per second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatsView {
    pub ts_ms: u64,
    /// The account these figures are scoped to (None: the whole network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub nodes_live: u64,
    pub nodes_lost: u64,
    /// Jobs by state (`pending`, `running`, …), every state with at least one job.
    pub jobs_by_state: std::collections::BTreeMap<String, u64>,
    /// Jobs that reached a final state, ever.
    pub jobs_ended: u64,
    /// Money held in escrow for open jobs.
    pub escrow_held_micros: i64,
    /// The platform's fees earned (network scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fees_micros: Option<i64>,
    /// The account's balance (account scope only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_micros: Option<i64>,
    /// AI gateway requests (jobs charged to an API key), ever, and their billed units.
    pub ai_requests: u64,
    pub ai_input_units: u64,
    pub ai_output_units: u64,
}
