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

fn receipt_body(closed: ClosedJob, fee_bps: u32) -> ReceiptBody {
    let job = &closed.record;
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
        result_sha256: closed.result_sha256.clone(),
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
