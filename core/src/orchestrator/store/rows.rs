//! Row mapping: a job as the store holds it ([`JobRecord`], read from the `jobs` columns), and
//! stored text cut to size. The orchestrator turns a record into the wire's `JobView`.

use rhizos_broker::wire::JobState;
use std::collections::BTreeMap;

/// A job's row: what was asked, where it stands, and once it ended, how and for how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub job_id: String,
    pub account: String,
    pub backend: String,
    pub state: JobState,
    /// Increments at each assignment; 0 before the first.
    pub attempt: u32,
    pub node_id: Option<String>,
    pub max_cost_micros: i64,
    /// The split, set once the escrow is closed (settled or refunded).
    pub cost_micros: Option<i64>,
    pub provider_micros: Option<i64>,
    pub fee_micros: Option<i64>,
    pub refund_micros: Option<i64>,
    pub exit_code: Option<i32>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// Why the job failed, timed out or was cancelled (or was requeued).
    pub reason: Option<String>,
    pub elapsed_ms: Option<u64>,
    pub fuel_consumed: Option<u64>,
    /// Relative path → base64.
    pub output_files: BTreeMap<String, String>,
    /// What the result stored out of band (checked to be in the blob stream when recorded).
    pub blobs: rhizos_broker::wire::OutputBlobs,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The API key it was charged to (a gateway's request).
    pub key_id: Option<String>,
    /// A metered job's units: as its node reported them, and as billed.
    pub reported_usage: Option<rhizos_broker::wire::Metered>,
    pub billed_usage: Option<rhizos_broker::wire::Metered>,
    /// When the job's payloads were dropped (`job_payload_max_age_s`).
    pub pruned_ms: Option<u64>,
}

/// Where a page of `job.list` continues: after the job created at `created_ms` with this id
/// (the order is `created_ms DESC, id DESC`, so a page never shifts when jobs are submitted).
/// On the wire it is `<created_ms>.<job id>`: job ids are tokens, without dots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCursor {
    pub created_ms: i64,
    pub job_id: String,
}

impl JobCursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_ms, self.job_id)
    }

    /// `None` for anything `encode` did not write.
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, id) = text.split_once('.')?;
        let created_ms = ms.parse::<i64>().ok().filter(|ms| *ms >= 0)?;
        rhizos_broker::validate_token("job id", id).ok()?;
        Some(Self {
            created_ms,
            job_id: id.to_owned(),
        })
    }
}

pub(super) const JOB_COLUMNS: &str = "id, account_id, backend, state, attempt, node_id, max_cost_micros, cost_micros, provider_micros,
    fee_micros, refund_micros, exit_code, stdout, stderr, reason, elapsed_ms, created_ms, updated_ms, fuel_consumed, output_files, output_blobs,
    key_id, reported_input_units, reported_output_units, billed_input_units, billed_output_units, pruned_ms";

pub(super) fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = r.get(3)?;
    Ok(JobRecord {
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
        blobs: r
            .get::<_, Option<String>>(20)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
        key_id: r.get(21)?,
        reported_usage: metered(r.get(22)?, r.get(23)?),
        billed_usage: metered(r.get(24)?, r.get(25)?),
        pruned_ms: r.get::<_, Option<i64>>(26)?.map(|v| v.max(0) as u64),
    })
}

fn metered(input: Option<i64>, output: Option<i64>) -> Option<rhizos_broker::wire::Metered> {
    Some(rhizos_broker::wire::Metered {
        input_units: input?.max(0) as u64,
        output_units: output?.max(0) as u64,
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
