//! Retention of ended jobs' payloads (`[orchestrator] job_payload_max_age_s`).
//!
//! A job's row carries its payloads as long as it lives: the spec (an inline WASM module of
//! hundreds of KiB, input files, environment), stdout and stderr tails, output files, the
//! references of its out-of-band blobs and the node's signed report. Kept forever, they make
//! the ledger file grow with every job. Once a job closed longer ago than the retention, the
//! active orchestrator drops them and keeps what the books and receipts need: the money, the
//! state, times and billed usage, and the SHA-256 of the spec and of the result exactly as the
//! receipt computes them — so the receipt of a pruned job vouches for the same spec and result
//! (it no longer carries the node's report). Jobs of a flow still running are kept: their
//! outputs may feed the next step. SQLite reuses the freed pages, so the file stops growing
//! once the jobs pruned per day match the jobs ended per day.

use super::rows::{JOB_COLUMNS, JobRecord, job_from_row};
use super::{Store, StoreError};
use crate::ledger::exec;
use rusqlite::params;
use serde::Serialize;

/// The result a receipt vouches for, in a fixed encoding: exit code, stdout, stderr, output files
/// (path → base64, sorted by path), then the out-of-band blobs (their digests), as JSON in this
/// field order.
#[derive(Serialize)]
struct ResultDigestInput<'a> {
    exit_code: Option<i32>,
    stdout: &'a str,
    stderr: &'a str,
    output_files: &'a std::collections::BTreeMap<String, String>,
    /// The out-of-band parts by digest (absent when none, so older receipts hash the same).
    #[serde(skip_serializing_if = "rhizos_broker::wire::OutputBlobs::is_empty")]
    blobs: &'a rhizos_broker::wire::OutputBlobs,
}

/// SHA-256 (hex) of `job`'s result as its receipt encodes it.
pub(super) fn result_sha256(job: &JobRecord) -> String {
    let result = ResultDigestInput {
        exit_code: job.exit_code,
        stdout: job.stdout.as_deref().unwrap_or_default(),
        stderr: job.stderr.as_deref().unwrap_or_default(),
        output_files: &job.output_files,
        blobs: &job.blobs,
    };
    // Serialising this plain struct cannot fail (string keys, no custom Serialize).
    crate::sha256_hex(&serde_json::to_vec(&result).unwrap_or_default())
}

impl Store {
    /// Drops the payloads of jobs that closed before `closed_before_ms` (oldest first; jobs of
    /// running flows excepted), keeping their spec's and result's digests, in one transaction
    /// stamped `now`: at most `limit` jobs, and no more once `max_bytes` of payload are taken
    /// (at least one job) — with the replicated ledger the batch's changeset carries what it
    /// drops. Returns how many were pruned.
    pub fn prune_job_payloads(
        &mut self,
        closed_before_ms: u64,
        limit: u32,
        max_bytes: u64,
        now: u64,
    ) -> Result<usize, StoreError> {
        let tx = self.tx()?;
        let jobs = {
            let mut statement = tx.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS}, spec,
                        length(spec) + COALESCE(length(stdout), 0) + COALESCE(length(stderr), 0)
                        + COALESCE(length(output_files), 0) + COALESCE(length(output_blobs), 0)
                        + COALESCE(length(node_report), 0) AS payload_bytes
                 FROM jobs
                 WHERE pruned_ms IS NULL AND cost_micros IS NOT NULL AND updated_ms < ?1
                   AND (payer_account IS NULL OR NOT EXISTS (
                        SELECT 1 FROM flows f WHERE 'flow:' || f.id = jobs.payer_account
                          AND f.state IN ('running', 'stopping')))
                 ORDER BY updated_ms LIMIT ?2"
            ))?;
            let mut rows = statement.query(params![
                i64::try_from(closed_before_ms).unwrap_or(i64::MAX),
                limit
            ])?;
            let (mut jobs, mut bytes) = (Vec::new(), 0u64);
            while let Some(r) = rows.next()? {
                let size = u64::try_from(r.get::<_, i64>("payload_bytes")?).unwrap_or(0);
                if !jobs.is_empty() && bytes + size > max_bytes {
                    break;
                }
                bytes += size;
                jobs.push((job_from_row(r)?, r.get::<_, String>("spec")?));
            }
            jobs
        };
        for (job, spec) in &jobs {
            exec(
                &tx,
                "UPDATE jobs SET spec = '', stdout = NULL, stderr = NULL, output_files = NULL,
                     output_blobs = NULL, node_report = NULL, spec_sha256 = ?2,
                     result_sha256 = ?3, pruned_ms = ?4
                 WHERE id = ?1",
                params![
                    job.job_id,
                    crate::sha256_hex(spec.as_bytes()),
                    result_sha256(job),
                    i64::try_from(now).unwrap_or(i64::MAX),
                ],
            )?;
        }
        tx.commit()?;
        Ok(jobs.len())
    }
}
