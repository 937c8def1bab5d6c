//! `ledger.verify`: the ledger's own invariants ([`crate::ledger::verify`]) plus, per job, that
//! its escrow agrees with its state and its recorded split adds up.

use super::{Store, StoreError};
use crate::ledger;
use rhizos_broker::wire::{JobState, LedgerReport};

impl Store {
    /// The ledger invariants plus, per job: an open job's escrow holds exactly its `max_cost` and
    /// has no closing movement; an ended job's escrow is empty, closed exactly once, and its
    /// recorded split adds up (cost + refund = hold, provider + fee = cost); and per closed job
    /// what [`Store::verify_charges`] checks.
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
        self.verify_charges(&mut problems)?;
        self.verify_key_spend(&mut problems)?;
        self.verify_flows(&mut problems)?;
        Ok(LedgerReport {
            ok: problems.is_empty(),
            accounts: base.accounts,
            transactions: base.transactions,
            postings_sum_micros: base.postings_sum_micros,
            jobs_checked,
            problems,
        })
    }

    /// Per flow: held once; an ended flow's escrow is empty and closed once, and what its step
    /// jobs cost plus its refund is its hold; an open flow's escrow plus what its open step jobs
    /// hold plus what its ended ones cost is its hold.
    fn verify_flows(&self, problems: &mut Vec<String>) -> Result<(), StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT f.id, f.state, f.max_cost_micros, f.cost_micros, f.refund_micros,
                    COALESCE(a.balance_micros, 0),
                    (SELECT COUNT(*) FROM ledger_tx t WHERE t.idem_key = 'flow-hold:' || f.id),
                    (SELECT COUNT(*) FROM ledger_tx t WHERE t.idem_key = 'flow-close:' || f.id),
                    (SELECT COALESCE(SUM(j.cost_micros), 0) FROM jobs j
                         WHERE j.payer_account = 'flow:' || f.id AND j.cost_micros IS NOT NULL),
                    (SELECT COALESCE(SUM(j.max_cost_micros), 0) FROM jobs j
                         WHERE j.payer_account = 'flow:' || f.id AND j.cost_micros IS NULL)
             FROM flows f LEFT JOIN accounts a ON a.id = 'flow:' || f.id",
        )?;
        let mut rows = statement.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let state: String = r.get(1)?;
            let hold: i64 = r.get(2)?;
            let (cost, refund): (Option<i64>, Option<i64>) = (r.get(3)?, r.get(4)?);
            let (escrow, holds, closes, spent, open): (i64, i64, i64, i64, i64) =
                (r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?);
            if holds != 1 {
                problems.push(format!("flow {id}: {holds} holds instead of 1"));
            }
            let ended = rhizos_broker::wire::FlowState::parse(&state)
                .is_some_and(rhizos_broker::wire::FlowState::is_terminal);
            if ended {
                if escrow != 0 || closes != 1 || open != 0 {
                    problems.push(format!(
                        "flow {id} ended ({state}) but its escrow holds {escrow}, was closed {closes} times, and its open steps hold {open}"
                    ));
                }
                if cost != Some(spent) || refund.map(|r| r + spent) != Some(hold) {
                    problems.push(format!(
                        "flow {id}: cost {cost:?} + refund {refund:?} is not its hold {hold} (its steps cost {spent})"
                    ));
                }
            } else if closes != 0 || escrow + open + spent != hold {
                problems.push(format!(
                    "flow {id} is {state}: escrow {escrow} + open steps {open} + spent {spent} is not its hold {hold} (closed {closes} times)"
                ));
            }
        }
        Ok(())
    }

    /// Every API key has spent exactly what the jobs charged to it cost.
    fn verify_key_spend(&self, problems: &mut Vec<String>) -> Result<(), StoreError> {
        let mut statement = self.conn.prepare(
            "SELECT k.key_id, k.spent_micros, COALESCE(SUM(j.cost_micros), 0)
             FROM api_keys k LEFT JOIN jobs j ON j.key_id = k.key_id AND j.cost_micros IS NOT NULL
             GROUP BY k.key_id",
        )?;
        let rows = statement.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (key_id, spent, cost) = row?;
            if spent != cost {
                problems.push(format!(
                    "API key {key_id} records {spent} micro-USD spent, but its jobs cost {cost}"
                ));
            }
        }
        Ok(())
    }

    /// Per closed job, that it was charged what the network measured, by the published
    /// formula, to the provider recorded at assignment: billed run time ≤ the reported one, the
    /// job's `timeout_ms` and the time from assignment to its end + the slack; billed fuel ≤ the
    /// limit sent and the reported fuel; cost = min(hold, the billed usage at the agreed
    /// prices); fee = round_half_up(cost × fee_bps / 10 000); and the closing movement's legs
    /// are exactly escrow → provider, fees and payer (or escrow → payer for a refund).
    fn verify_charges(&self, problems: &mut Vec<String>) -> Result<(), StoreError> {
        let slack = self.ctx.charging.slack_ms;
        let mut statement = self.conn.prepare(
            "SELECT j.id, t.id, t.kind, COALESCE(j.payer_account, j.account_id), j.max_cost_micros, j.cost_micros, j.provider_micros,
                    j.fee_micros, j.refund_micros, j.provider_account, j.fee_bps, j.elapsed_ms,
                    j.billed_elapsed_ms, j.fuel_consumed, j.billed_fuel, j.fuel_limit, j.timeout_ms,
                    j.assigned_ms, j.updated_ms, j.cpu_cores, j.memory_mib, j.gpus, j.pricing,
                    j.billed_input_units, j.billed_output_units, j.reported_input_units,
                    j.reported_output_units, j.max_input_units, j.max_output_units,
                    j.witness_input_units, j.witness_output_units
             FROM jobs j JOIN ledger_tx t ON t.idem_key = 'close:' || j.id",
        )?;
        let mut legs = self.conn.prepare_cached(
            "SELECT account_id, amount_micros FROM postings WHERE tx_id = ?1 ORDER BY account_id, amount_micros",
        )?;
        let mut rows = statement.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let tx_id: i64 = r.get(1)?;
            let kind: String = r.get(2)?;
            let payer: String = r.get(3)?;
            let hold: i64 = r.get(4)?;
            let [cost, provider_micros, fee, refund] =
                [5, 6, 7, 8].map(|i| r.get::<_, Option<i64>>(i).ok().flatten().unwrap_or(0));
            let provider: Option<String> = r.get(9)?;
            let fee_bps: Option<u32> = r.get(10)?;
            let opt = |i: usize| {
                r.get::<_, Option<i64>>(i)
                    .map(|v| v.map(|v| v.max(0) as u64))
            };
            let (
                reported,
                billed,
                reported_fuel,
                billed_fuel,
                fuel_limit,
                timeout,
                assigned,
                ended,
            ) = (
                opt(11)?,
                opt(12)?,
                opt(13)?,
                opt(14)?,
                opt(15)?,
                opt(16)?,
                opt(17)?,
                opt(18)?.unwrap_or(0),
            );
            let mut expected: Vec<(String, i64)> = vec![(ledger::escrow_account(&id), -hold)];
            if kind == ledger::TxKind::Settle.as_str() {
                if let Some(billed) = billed {
                    let mut bounds =
                        vec![("the reported run time", reported), ("timeout_ms", timeout)];
                    let window = assigned.map(|at| ended.saturating_sub(at).saturating_add(slack));
                    bounds.push(("the time from assignment to its end + slack", window));
                    for (what, bound) in bounds {
                        if let Some(bound) = bound.filter(|b| billed > *b) {
                            problems.push(format!(
                                "job {id}: billed {billed} ms, more than {what} ({bound} ms)"
                            ));
                        }
                    }
                    for (what, bound) in [
                        ("the fuel limit sent", fuel_limit),
                        ("the reported fuel", reported_fuel),
                    ] {
                        if let (Some(fuel), Some(bound)) = (billed_fuel, bound)
                            && fuel > bound
                        {
                            problems.push(format!(
                                "job {id}: billed {fuel} fuel, more than {what} ({bound})"
                            ));
                        }
                    }
                    let pricing: Option<rhizos_broker::wire::Pricing> = r
                        .get::<_, Option<String>>(22)?
                        .and_then(|json| serde_json::from_str(&json).ok());
                    // A metered job's units: within what it reported, its hold's units and
                    // what the gateway witnessed.
                    let units = match (opt(23)?, opt(24)?) {
                        (Some(input_units), Some(output_units)) => {
                            for (what, billed, bounds) in [
                                (
                                    "input units",
                                    input_units,
                                    [
                                        ("reported", opt(25)?),
                                        ("held for", opt(27)?),
                                        ("witnessed", opt(29)?),
                                    ],
                                ),
                                (
                                    "output units",
                                    output_units,
                                    [
                                        ("reported", opt(26)?),
                                        ("held for", opt(28)?),
                                        ("witnessed", opt(30)?),
                                    ],
                                ),
                            ] {
                                for (how, bound) in bounds {
                                    if let Some(bound) = bound.filter(|b| billed > *b) {
                                        problems.push(format!(
                                            "job {id}: billed {billed} {what}, more than {how} ({bound})"
                                        ));
                                    }
                                }
                            }
                            Some(rhizos_broker::wire::Metered {
                                input_units,
                                output_units,
                            })
                        }
                        _ => None,
                    };
                    match pricing {
                        Some(pricing) => {
                            let metered =
                                units.map_or(0, |u| ledger::metered_cost_micros(u, &pricing));
                            let usage = ledger::usage_cost_micros(
                                billed,
                                billed_fuel,
                                r.get(19)?,
                                r.get::<_, i64>(20)?.max(0) as u64,
                                r.get(21)?,
                                &pricing,
                            )
                            .saturating_add(metered);
                            let want = usage.clamp(0, hold.max(0));
                            if cost != want {
                                problems.push(format!(
                                    "job {id}: charged {cost} but its billed usage costs {want} (capped at the hold {hold})"
                                ));
                            }
                        }
                        None => {
                            problems.push(format!("job {id} was settled without agreed prices"))
                        }
                    }
                }
                if let Some(bps) = fee_bps {
                    let want = ledger::split(cost, hold, bps).fee_micros;
                    if fee != want {
                        problems.push(format!(
                            "job {id}: fee {fee} but round_half_up({cost} × {bps} / 10000) = {want}"
                        ));
                    }
                }
                match &provider {
                    Some(provider) => expected.push((provider.clone(), provider_micros)),
                    None if provider_micros == 0 => {}
                    None => {
                        problems.push(format!("job {id} paid a provider none was recorded for"))
                    }
                }
                expected.push((ledger::PLATFORM_FEES.to_owned(), fee));
                expected.push((payer, refund));
            } else {
                expected.push((payer, hold));
            }
            // Zero legs are not written; legs to the same account add up.
            let mut want: std::collections::BTreeMap<String, i64> = Default::default();
            for (account, amount) in expected {
                *want.entry(account).or_default() += amount;
            }
            want.retain(|_, amount| *amount != 0);
            let mut have: std::collections::BTreeMap<String, i64> = Default::default();
            for leg in legs.query_map([tx_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })? {
                let (account, amount) = leg?;
                *have.entry(account).or_default() += amount;
            }
            have.retain(|_, amount| *amount != 0);
            if have != want {
                problems.push(format!(
                    "job {id}: its {kind} moved {have:?}, not {want:?} (escrow → provider recorded at assignment, fees, payer)"
                ));
            }
        }
        Ok(())
    }
}
