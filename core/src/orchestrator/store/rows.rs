//! Row mapping: the `jobs` columns a [`JobView`] is read from, and stored text cut to size.

use rhizos_broker::wire::{JobState, JobView};

pub(super) const JOB_COLUMNS: &str = "id, account_id, backend, state, attempt, node_id, max_cost_micros, cost_micros, provider_micros,
    fee_micros, refund_micros, exit_code, stdout, stderr, reason, elapsed_ms, created_ms, updated_ms, fuel_consumed, output_files";

pub(super) fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobView> {
    let state: String = r.get(3)?;
    Ok(JobView {
        job_id: r.get(0)?,
        account: r.get(1)?,
        backend: r.get(2)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        attempt: r.get(4)?,
        node_id: r.get(5)?,
        max_cost_micros: r.get(6)?,
        cost_micros: r.get(7)?,
        provider_micros: r.get(8)?,
        fee_micros: r.get(9)?,
        refund_micros: r.get(10)?,
        exit_code: r.get(11)?,
        stdout: r.get(12)?,
        stderr: r.get(13)?,
        reason: r.get(14)?,
        elapsed_ms: r.get::<_, Option<i64>>(15)?.map(|v| v as u64),
        created_ms: r.get::<_, i64>(16)? as u64,
        updated_ms: r.get::<_, i64>(17)? as u64,
        fuel_consumed: r.get::<_, Option<i64>>(18)?.map(|v| v as u64),
        output_files: r
            .get::<_, Option<String>>(19)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
    })
}

/// The last `max_bytes` of `text`, cut at a character boundary.
pub(super) fn truncate_tail(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}
