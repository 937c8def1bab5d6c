//! `receipt.get`: the receipt of an ended job, built from what the ledger recorded and signed
//! with the orchestrator's key. Ed25519 signatures are deterministic, so the same job always
//! gets the same receipt, byte for byte.

use super::super::Orchestrator;
use super::super::store::ClosedJob;
use super::super::validate::token;
use rhizos_broker::wire::{
    ErrorCode, GetReceipt, RECEIPT_VERSION, ReceiptBody, SignedReceipt, WireError,
};
use rhizos_broker::{Caller, validate_token};
use serde::Serialize;

impl Orchestrator {
    pub(in crate::orchestrator) async fn receipt_get(
        &self,
        caller: Caller,
        request: GetReceipt,
    ) -> Result<SignedReceipt, WireError> {
        token(validate_token("job id", &request.job_id))?;
        let closed = self
            .db(move |store| store.closed_job(&request.job_id))
            .await?;
        super::jobs::own_job(&caller, &closed.record)?;
        let body = receipt_body(closed, self.inner.settings.fee_bps);
        SignedReceipt::sign(&body, &self.inner.signing_key)
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("cannot sign: {e}")))
    }
}

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

fn receipt_body(closed: ClosedJob, fee_bps: u32) -> ReceiptBody {
    let job = &closed.record;
    let result = ResultDigestInput {
        exit_code: job.exit_code,
        stdout: job.stdout.as_deref().unwrap_or_default(),
        stderr: job.stderr.as_deref().unwrap_or_default(),
        output_files: &job.output_files,
        blobs: &job.blobs,
    };
    // Serialising this plain struct cannot fail (string keys, no custom Serialize).
    let result_json = serde_json::to_vec(&result).unwrap_or_default();
    ReceiptBody {
        receipt_v: RECEIPT_VERSION,
        job_id: job.job_id.clone(),
        attempt: job.attempt,
        state: job.state,
        account: job.account.clone(),
        node_id: job.node_id.clone(),
        // The key the node signed its result with (its enrolled key: the report was refused
        // otherwise), else the key it was enrolled with.
        node_key: closed
            .node_report
            .as_ref()
            .map(|r| r.signature.key.clone())
            .or_else(|| closed.node_key.clone()),
        node_report: closed.node_report.as_ref().map(|r| r.report.clone()),
        node_signature_b64: closed
            .node_report
            .as_ref()
            .map(|r| r.signature.signature_b64.clone()),
        provider_account: closed.provider_account.clone(),
        spec_sha256: closed.spec_sha256.clone(),
        result_sha256: crate::sha256_hex(&result_json),
        submitted_ms: job.created_ms,
        started_ms: closed.started_ms,
        ended_ms: job.updated_ms,
        reported_elapsed_ms: job.elapsed_ms,
        billed_elapsed_ms: closed.billed_elapsed_ms,
        fuel_consumed: job.fuel_consumed,
        max_cost_micros: job.max_cost_micros,
        cost_micros: job.cost_micros.unwrap_or(0),
        fee_micros: job.fee_micros.unwrap_or(0),
        provider_micros: job.provider_micros.unwrap_or(0),
        refund_micros: job.refund_micros.unwrap_or(0),
        fee_bps: closed.fee_bps.unwrap_or(fee_bps),
        ledger_tx_id: closed.ledger_tx_id,
    }
}
