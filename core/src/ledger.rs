//! The escrow ledger: double-entry postings in integer micro-USD, written inside the caller's
//! SQLite transaction, idempotent by key.
//!
//! Accounts: user and provider accounts (named by their owners, `[a-z0-9_-]`), `escrow:<job>`
//! (one per job), `platform:fees`, and `external` (the outside world: deposits come from it, so its
//! balance is minus everything ever deposited). Every movement is one `ledger_tx` row with a
//! unique `idem_key` and postings that sum to zero; applying the same key twice changes nothing.
//!
//! **Architecture Invariant:** balances are only changed by [`post`], which checks Σ = 0 and the
//! no-negative rule for user/provider accounts in the same transaction as the postings.

use rusqlite::{Connection, OptionalExtension, params};

/// `execute` through the connection's prepared-statement cache (the hot paths run the same SQL
/// thousands of times per second; parsing it each time shows in profiles).
pub(crate) fn exec(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the prepared-statement cache.
pub(crate) fn query_row<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// The outside world (deposits in, withdrawals out).
pub const EXTERNAL: &str = "external";
/// Where platform fees go.
pub const PLATFORM_FEES: &str = "platform:fees";

/// Fee denominator: fees are in basis points.
pub const BPS_DENOMINATOR: i64 = 10_000;

/// The escrow account of one job.
/// Whether `id` names one of the ledger's own accounts (`external`, `platform:*`, `escrow:*`),
/// which no user or provider may take.
pub fn is_reserved(id: &str) -> bool {
    id == EXTERNAL || id.starts_with("platform:") || id.starts_with("escrow:")
}

pub fn escrow_account(job_id: &str) -> String {
    format!("escrow:{job_id}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    User,
    Provider,
    Escrow,
    Platform,
    External,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Provider => "provider",
            Self::Escrow => "escrow",
            Self::Platform => "platform",
            Self::External => "external",
        }
    }

    /// Accounts that belong to a person and may never go below zero.
    fn must_stay_non_negative(self) -> bool {
        matches!(
            self,
            Self::User | Self::Provider | Self::Escrow | Self::Platform
        )
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::User,
            Self::Provider,
            Self::Escrow,
            Self::Platform,
            Self::External,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("postings of {key} do not sum to zero (sum {sum})")]
    Unbalanced { key: String, sum: i64 },
    #[error("account {account} has {balance_micros} micro-USD, {needed_micros} needed")]
    InsufficientFunds {
        account: String,
        balance_micros: i64,
        needed_micros: i64,
    },
    #[error("no account {0}")]
    NoAccount(String),
    #[error("amount must be positive, got {0}")]
    NonPositive(i64),
    #[error("ledger database: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Whether a movement was written now or had been written before under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    Duplicate,
}

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    balance_micros INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_tx (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idem_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    job_id TEXT,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS postings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tx_id INTEGER NOT NULL REFERENCES ledger_tx(id),
    account_id TEXT NOT NULL REFERENCES accounts(id),
    amount_micros INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS postings_by_account ON postings(account_id);
";

/// Creates an account if it does not exist; returns whether it was created.
pub fn ensure_account(
    tx: &Connection,
    id: &str,
    kind: AccountKind,
    now_ms: u64,
) -> Result<bool, LedgerError> {
    let inserted = exec(
        tx,
        "INSERT INTO accounts (id, kind, balance_micros, created_ms) VALUES (?1, ?2, 0, ?3) ON CONFLICT(id) DO NOTHING",
        params![id, kind.as_str(), now_ms as i64],
    )?;
    Ok(inserted == 1)
}

pub fn balance(tx: &rusqlite::Connection, id: &str) -> Result<Option<i64>, LedgerError> {
    Ok(query_row(
        tx,
        "SELECT balance_micros FROM accounts WHERE id = ?1",
        [id],
        |row| row.get(0),
    )
    .optional()?)
}

/// What a ledger transaction is (`ledger_tx.kind`, and the `kind` of a statement line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// Money in from outside the network.
    Deposit,
    /// A job's `max_cost` from the payer into its escrow.
    Hold,
    /// A job's escrow closed with a charge.
    Settle,
    /// A job's escrow closed with everything back to the payer.
    Refund,
    /// Money out of the network (a provider's payout).
    Withdraw,
}

impl TxKind {
    pub const ALL: [Self; 5] = [
        Self::Deposit,
        Self::Hold,
        Self::Settle,
        Self::Refund,
        Self::Withdraw,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Hold => "hold",
            Self::Settle => "settle",
            Self::Refund => "refund",
            Self::Withdraw => "withdraw",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// Writes one balanced movement under `idem_key`. Accounts must exist. Nothing is written (and
/// `Duplicate` returned) if the key was used before. On an error some legs may already be
/// applied: call it inside a savepoint or transaction that rolls back on error (every `Store`
/// operation does).
pub fn post(
    tx: &Connection,
    idem_key: &str,
    kind: TxKind,
    job_id: Option<&str>,
    postings: &[(&str, i64)],
    now_ms: u64,
) -> Result<Applied, LedgerError> {
    let sum: i64 = postings.iter().map(|(_, amount)| *amount).sum();
    if sum != 0 {
        return Err(LedgerError::Unbalanced {
            key: idem_key.to_owned(),
            sum,
        });
    }
    let inserted = exec(
        tx,
        "INSERT INTO ledger_tx (idem_key, kind, job_id, created_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(idem_key) DO NOTHING",
        params![idem_key, kind.as_str(), job_id, now_ms as i64],
    )?;
    if inserted == 0 {
        return Ok(Applied::Duplicate);
    }
    let tx_id = tx.last_insert_rowid();
    for (account, amount) in postings {
        if *amount == 0 {
            continue;
        }
        // One statement per leg: apply the amount and read the result back; a balance that
        // must not go negative makes the caller's savepoint roll the whole movement back.
        let row: Option<(i64, String)> = query_row(
            tx,
            "UPDATE accounts SET balance_micros = balance_micros + ?2 WHERE id = ?1
             RETURNING balance_micros, kind",
            params![account, amount],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
        let Some((new_balance, kind)) = row else {
            return Err(LedgerError::NoAccount((*account).to_owned()));
        };
        let kind = AccountKind::parse(&kind).unwrap_or(AccountKind::User);
        if new_balance < 0 && kind.must_stay_non_negative() {
            return Err(LedgerError::InsufficientFunds {
                account: (*account).to_owned(),
                balance_micros: new_balance - amount,
                needed_micros: -amount,
            });
        }
        exec(
            tx,
            "INSERT INTO postings (tx_id, account_id, amount_micros) VALUES (?1, ?2, ?3)",
            params![tx_id, account, amount],
        )?;
    }
    Ok(Applied::New)
}

/// How a settled job's money is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// What the user pays: the measured cost, capped at the hold.
    pub cost_micros: i64,
    /// Platform fee: `cost × fee_bps / 10 000`, rounded half up to the micro.
    pub fee_micros: i64,
    /// `cost − fee`.
    pub provider_micros: i64,
    /// `hold − cost`, back to the user.
    pub refund_micros: i64,
}

/// Divides a job's hold: see [`Split`] for the rounding rules.
pub fn split(measured_cost_micros: i64, hold_micros: i64, fee_bps: u32) -> Split {
    let cost = measured_cost_micros.clamp(0, hold_micros.max(0));
    let fee = (i128::from(cost) * i128::from(fee_bps) + i128::from(BPS_DENOMINATOR / 2))
        / i128::from(BPS_DENOMINATOR);
    // fee ≤ cost because fee_bps ≤ 10 000 is enforced by configuration checks; clamp anyway.
    let fee = i64::try_from(fee).unwrap_or(cost).min(cost);
    Split {
        cost_micros: cost,
        fee_micros: fee,
        provider_micros: cost - fee,
        refund_micros: hold_micros - cost,
    }
}

/// Cost of running for `elapsed_ms` with the given allocation at a node's prices, rounded up to
/// the micro-USD: `elapsed_h × (cores × cpu_hour + GiB × memory_gb_hour + gpus × gpu_hour)`.
pub fn cost_micros(
    elapsed_ms: u64,
    cpu_cores: u32,
    memory_mib: u64,
    gpus: u32,
    pricing: &rhizos_broker::wire::Pricing,
) -> i64 {
    const MICROS_PER_CENT: i128 = 10_000;
    const MS_PER_HOUR: i128 = 3_600_000;
    const MIB_PER_GIB: i128 = 1024;
    // Work in (cents per hour) × MiB-units so memory priced per GiB stays exact. Checked: a
    // price or run time near its type's limit saturates at i64::MAX (the split caps it at the
    // hold) instead of wrapping.
    let micros = (|| {
        let cpu = i128::from(cpu_cores)
            .checked_mul(i128::from(pricing.cpu_hour_cents))?
            .checked_mul(MIB_PER_GIB)?;
        let memory =
            i128::from(memory_mib).checked_mul(i128::from(pricing.memory_gb_hour_cents))?;
        let gpu = i128::from(gpus)
            .checked_mul(i128::from(pricing.gpu_hour_cents))?
            .checked_mul(MIB_PER_GIB)?;
        let rate_cents_mib_per_hour = cpu.checked_add(memory)?.checked_add(gpu)?;
        let numerator = i128::from(elapsed_ms)
            .checked_mul(rate_cents_mib_per_hour)?
            .checked_mul(MICROS_PER_CENT)?;
        let denominator = MS_PER_HOUR * MIB_PER_GIB;
        numerator
            .checked_add(denominator - 1)
            .map(|n| n / denominator)
    })();
    micros.map_or(i64::MAX, |m| i64::try_from(m).unwrap_or(i64::MAX))
}

/// What a run of `elapsed_ms` that burned `fuel` costs: [`cost_micros`] plus
/// [`fuel_cost_micros`], saturating.
pub fn usage_cost_micros(
    elapsed_ms: u64,
    fuel: Option<u64>,
    cpu_cores: u32,
    memory_mib: u64,
    gpus: u32,
    pricing: &rhizos_broker::wire::Pricing,
) -> i64 {
    cost_micros(elapsed_ms, cpu_cores, memory_mib, gpus, pricing)
        .saturating_add(fuel_cost_micros(fuel.unwrap_or(0), pricing))
}

/// What `fuel` units of WASM fuel cost at `pricing` (micro-USD per million units), rounded up
/// to the micro.
pub fn fuel_cost_micros(fuel: u64, pricing: &rhizos_broker::wire::Pricing) -> i64 {
    // u64 × u64 fits u128 (not i128); the rounding add is checked too.
    let micros = u128::from(fuel)
        .checked_mul(u128::from(pricing.fuel_million_micros))
        .and_then(|n| n.checked_add(999_999))
        .map(|n| n / 1_000_000);
    micros.map_or(i64::MAX, |m| i64::try_from(m).unwrap_or(i64::MAX))
}

/// What a metered request's units cost at `pricing`'s token prices (micro-USD per million
/// input and output units), rounded up to the micro once for the sum: `⌈(in × in_price + out ×
/// out_price) / 1,000,000⌉`.
pub fn metered_cost_micros(
    units: rhizos_broker::wire::Metered,
    pricing: &rhizos_broker::wire::Pricing,
) -> i64 {
    let micros = u128::from(units.input_units)
        .checked_mul(u128::from(pricing.input_million_micros))
        .and_then(|a| {
            u128::from(units.output_units)
                .checked_mul(u128::from(pricing.output_million_micros))
                .and_then(|b| a.checked_add(b))
        })
        .and_then(|n| n.checked_add(999_999))
        .map(|n| n / 1_000_000);
    micros.map_or(i64::MAX, |m| i64::try_from(m).unwrap_or(i64::MAX))
}

/// What `ledger verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub accounts: u64,
    pub transactions: u64,
    pub postings_sum_micros: i64,
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the ledger invariants: Σ postings = 0, every transaction balanced, every cached
/// balance equal to its postings, no negative user/provider/escrow balance.
pub fn verify(conn: &rusqlite::Connection) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport {
        accounts: query_row(conn, "SELECT COUNT(*) FROM accounts", [], |r| {
            r.get::<_, i64>(0)
        })? as u64,
        transactions: conn
            .query_row("SELECT COUNT(*) FROM ledger_tx", [], |r| r.get::<_, i64>(0))?
            as u64,
        postings_sum_micros: query_row(
            conn,
            "SELECT COALESCE(SUM(amount_micros), 0) FROM postings",
            [],
            |r| r.get(0),
        )?,
        problems: Vec::new(),
    };
    if report.postings_sum_micros != 0 {
        report.problems.push(format!(
            "postings sum to {} instead of 0",
            report.postings_sum_micros
        ));
    }
    let mut unbalanced = conn.prepare(
        "SELECT t.idem_key, SUM(p.amount_micros) FROM ledger_tx t JOIN postings p ON p.tx_id = t.id
         GROUP BY t.id HAVING SUM(p.amount_micros) != 0",
    )?;
    for row in unbalanced.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (key, sum) = row?;
        report
            .problems
            .push(format!("transaction {key} sums to {sum}"));
    }
    let mut drift = conn.prepare(
        "SELECT a.id, a.kind, a.balance_micros, COALESCE((SELECT SUM(amount_micros) FROM postings p WHERE p.account_id = a.id), 0)
         FROM accounts a",
    )?;
    for row in drift.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })? {
        let (id, kind, cached, summed) = row?;
        if cached != summed {
            report.problems.push(format!(
                "account {id}: balance {cached} but postings sum to {summed}"
            ));
        }
        let kind = AccountKind::parse(&kind).unwrap_or(AccountKind::User);
        if summed < 0 && kind.must_stay_non_negative() {
            report
                .problems
                .push(format!("account {id} is negative: {summed}"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::Pricing;

    #[test]
    fn split_rounds_fee_half_up_and_caps_cost_at_hold() {
        // (measured cost, hold, bps) → (cost, fee, provider, refund)
        let table = [
            ((1_000, 5_000, 500), (1_000, 50, 950, 4_000)),
            ((9, 100, 500), (9, 0, 9, 91)),   // 0.45 → 0
            ((10, 100, 500), (10, 1, 9, 90)), // 0.5 → 1 (half up)
            ((11, 100, 500), (11, 1, 10, 89)),
            ((7_000, 5_000, 500), (5_000, 250, 4_750, 0)), // capped at the hold
            ((0, 5_000, 500), (0, 0, 0, 5_000)),
            ((-3, 5_000, 500), (0, 0, 0, 5_000)),
            (
                (1_234_567, 2_000_000, 0),
                (1_234_567, 0, 1_234_567, 765_433),
            ),
            (
                (1_234_567, 2_000_000, 10_000),
                (1_234_567, 1_234_567, 0, 765_433),
            ),
        ];
        for ((cost, hold, bps), (want_cost, want_fee, want_provider, want_refund)) in table {
            let s = split(cost, hold, bps);
            assert_eq!(
                (
                    s.cost_micros,
                    s.fee_micros,
                    s.provider_micros,
                    s.refund_micros
                ),
                (want_cost, want_fee, want_provider, want_refund),
                "split({cost}, {hold}, {bps})"
            );
            assert_eq!(s.fee_micros + s.provider_micros + s.refund_micros, hold);
        }
    }

    #[test]
    fn fuel_cost_is_rounded_up_to_the_micro() {
        let pricing = rhizos_broker::wire::Pricing {
            gpu_hour_cents: 0,
            cpu_hour_cents: 0,
            memory_gb_hour_cents: 0,
            fuel_million_micros: 250,
            input_million_micros: 0,
            output_million_micros: 0,
        };
        assert_eq!(fuel_cost_micros(0, &pricing), 0);
        assert_eq!(
            fuel_cost_micros(1, &pricing),
            1,
            "any fuel costs at least a micro"
        );
        assert_eq!(fuel_cost_micros(4_000, &pricing), 1);
        assert_eq!(fuel_cost_micros(4_001, &pricing), 2);
        assert_eq!(fuel_cost_micros(1_000_000, &pricing), 250);
        assert_eq!(fuel_cost_micros(u64::MAX, &pricing), 4_611_686_018_427_388);
        let free = rhizos_broker::wire::Pricing {
            fuel_million_micros: 0,
            ..pricing
        };
        assert_eq!(fuel_cost_micros(u64::MAX, &free), 0);
    }

    #[test]
    fn cost_is_time_times_allocation_times_price_rounded_up() {
        let p = Pricing {
            gpu_hour_cents: 90,
            cpu_hour_cents: 4,
            memory_gb_hour_cents: 1,
            fuel_million_micros: 0,
            input_million_micros: 0,
            output_million_micros: 0,
        };
        // 1 h, 1 core, 1024 MiB: 4 + 1 cents = 50 000 micros.
        assert_eq!(cost_micros(3_600_000, 1, 1024, 0, &p), 50_000);
        // 1 h, 2 cores, 512 MiB, 1 GPU: 8 + 0.5 + 90 cents = 985 000 micros.
        assert_eq!(cost_micros(3_600_000, 2, 512, 1, &p), 985_000);
        // 1 ms, 1 core, no memory: 40 000 micros / 3 600 000 = 0.0111 → rounds up to 1.
        assert_eq!(cost_micros(1, 1, 0, 0, &p), 1);
        assert_eq!(cost_micros(0, 1, 1024, 0, &p), 0);
        // $36/h CPU = 10 micros per ms, exactly.
        let p36 = Pricing {
            gpu_hour_cents: 0,
            cpu_hour_cents: 3_600,
            memory_gb_hour_cents: 0,
            fuel_million_micros: 0,
            input_million_micros: 0,
            output_million_micros: 0,
        };
        assert_eq!(cost_micros(123, 1, 4096, 0, &p36), 1_230);
        // Inputs at their types' limits saturate instead of overflowing (a debug build would
        // panic inside a ledger operation).
        let extreme = Pricing {
            gpu_hour_cents: u64::MAX,
            cpu_hour_cents: u64::MAX,
            memory_gb_hour_cents: u64::MAX,
            fuel_million_micros: u64::MAX,
            input_million_micros: 0,
            output_million_micros: 0,
        };
        assert_eq!(
            cost_micros(u64::MAX, u32::MAX, u64::MAX, u32::MAX, &extreme),
            i64::MAX
        );
        assert_eq!(
            usage_cost_micros(u64::MAX, Some(u64::MAX), 1, 1, 1, &extreme),
            i64::MAX
        );
        assert_eq!(usage_cost_micros(0, None, 1, 1, 1, &p), 0);
    }

    #[test]
    fn metered_cost_rounds_the_sum_up_once() {
        let p = rhizos_broker::wire::Pricing {
            input_million_micros: 100_000,
            output_million_micros: 200_000,
            ..Pricing::default()
        };
        let m = |input_units, output_units| rhizos_broker::wire::Metered {
            input_units,
            output_units,
        };
        // 17 × 0.1 + 9 × 0.2 = 3.5 micros → 4.
        assert_eq!(metered_cost_micros(m(17, 9), &p), 4);
        assert_eq!(metered_cost_micros(m(10, 0), &p), 1);
        assert_eq!(metered_cost_micros(m(1_000_000, 1_000_000), &p), 300_000);
        assert_eq!(metered_cost_micros(m(0, 0), &p), 0);
        let extreme = rhizos_broker::wire::Pricing {
            input_million_micros: u64::MAX,
            output_million_micros: u64::MAX,
            ..p
        };
        assert_eq!(
            metered_cost_micros(m(u64::MAX, u64::MAX), &extreme),
            i64::MAX
        );
    }
}
