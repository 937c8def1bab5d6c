//! Signed settlement receipts: what a job cost and why, signed by the orchestrator with its
//! ed25519 key (nkey encoding), verifiable offline by anyone with the receipt and the key.
//!
//! The signature covers the exact bytes of [`SignedReceipt::body`], a JSON text of
//! [`ReceiptBody`] (fields in a fixed order, integers only): a verifier checks the bytes it was
//! given, never a re-encoding of them.

use super::jobs::JobState;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `receipt.get` request: the receipt of an ended job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetReceipt {
    pub v: u32,
    pub job_id: String,
}

/// What a receipt states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    /// Receipt format version.
    pub receipt_v: u32,
    pub job_id: String,
    /// The attempt that ended the job (0: it never ran).
    pub attempt: u32,
    pub state: JobState,
    /// The payer.
    pub account: String,
    pub node_id: Option<String>,
    /// The node's public key (`U…`): the one it signed its result with, else the one it was
    /// enrolled with (`null`: neither).
    pub node_key: Option<String>,
    /// The node's result report exactly as it signed it (JSON text of its `job.report`), when
    /// it signed one.
    #[serde(default)]
    pub node_report: Option<String>,
    /// The node's ed25519 signature over `node_report` under `node_key`, base64.
    #[serde(default)]
    pub node_signature_b64: Option<String>,
    /// The account paid, fixed when the job was assigned.
    pub provider_account: Option<String>,
    /// SHA-256 of the job's spec as the orchestrator stored it.
    pub spec_sha256: String,
    /// SHA-256 of the result: exit code, stdout, stderr and output files (see
    /// `rhizos_core::orchestrator` for the exact encoding).
    pub result_sha256: String,
    pub submitted_ms: u64,
    /// When the node reported the execution running (`null`: it never ran).
    pub started_ms: Option<u64>,
    pub ended_ms: u64,
    /// Run time and fuel the node reported, and what was billed.
    pub reported_elapsed_ms: Option<u64>,
    pub billed_elapsed_ms: Option<u64>,
    pub fuel_consumed: Option<u64>,
    pub max_cost_micros: i64,
    pub cost_micros: i64,
    pub fee_micros: i64,
    pub provider_micros: i64,
    pub refund_micros: i64,
    /// The platform fee in basis points of the cost.
    pub fee_bps: u32,
    /// The ledger transaction that closed the job's escrow.
    pub ledger_tx_id: i64,
}

/// Receipt format version of [`ReceiptBody::receipt_v`] (2: with the node's signed report; a
/// version-1 receipt reads with none).
pub const RECEIPT_VERSION: u32 = 2;

/// A receipt as it is handed out and kept: the body's bytes, the signature over them and the
/// key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    /// [`ReceiptBody`] as JSON text: exactly the signed bytes.
    pub body: String,
    /// The orchestrator's public key (nkey, `N…`).
    pub orchestrator_key: String,
    /// ed25519 signature over `body`, base64.
    pub signature_b64: String,
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    #[error("the receipt is signed by {found}, not by the expected orchestrator key {expected}")]
    WrongKey { expected: String, found: String },
    #[error("the orchestrator key {0:?} is not a valid public nkey")]
    BadKey(String),
    #[error("the signature is not valid base64 of 64 bytes")]
    BadSignature,
    #[error(
        "the signature does not match the receipt's contents: it was changed after signing, or signed by another key"
    )]
    Mismatch,
    #[error("the signed body is not a receipt: {0}")]
    BadBody(String),
    #[error("the receipt's numbers do not add up: {0}")]
    Inconsistent(String),
    #[error("the node's signature over its report does not hold: {0}")]
    NodeSignature(String),
}

impl SignedReceipt {
    /// Signs `body` with the orchestrator's key pair.
    pub fn sign(body: &ReceiptBody, key: &nkeys::KeyPair) -> Result<Self, ReceiptError> {
        let text = serde_json::to_string(body).map_err(|e| ReceiptError::BadBody(e.to_string()))?;
        let signature = key
            .sign(text.as_bytes())
            .map_err(|_| ReceiptError::BadKey(key.public_key()))?;
        Ok(Self {
            body: text,
            orchestrator_key: key.public_key(),
            signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
        })
    }

    /// Checks the signature (against `expected_key` when given, else the key the receipt names),
    /// then that the body is a receipt whose money adds up, and returns it.
    pub fn verify(&self, expected_key: Option<&str>) -> Result<ReceiptBody, ReceiptError> {
        if let Some(expected) = expected_key
            && expected != self.orchestrator_key
        {
            return Err(ReceiptError::WrongKey {
                expected: expected.to_owned(),
                found: self.orchestrator_key.clone(),
            });
        }
        let key = nkeys::KeyPair::from_public_key(&self.orchestrator_key)
            .map_err(|_| ReceiptError::BadKey(self.orchestrator_key.clone()))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&self.signature_b64)
            .ok()
            .filter(|s| s.len() == 64)
            .ok_or(ReceiptError::BadSignature)?;
        key.verify(self.body.as_bytes(), &signature)
            .map_err(|_| ReceiptError::Mismatch)?;
        let body: ReceiptBody =
            serde_json::from_str(&self.body).map_err(|e| ReceiptError::BadBody(e.to_string()))?;
        body.check()?;
        body.check_node_report()?;
        Ok(body)
    }
}

impl ReceiptBody {
    /// The node's signature over its report holds under `node_key`, and the report is this
    /// job's attempt on this node, with the run time the receipt says was reported.
    pub fn check_node_report(&self) -> Result<(), ReceiptError> {
        let bad = |what: String| Err(ReceiptError::NodeSignature(what));
        let (report, signature) = match (&self.node_report, &self.node_signature_b64) {
            (None, None) => return Ok(()),
            (Some(report), Some(signature)) => (report, signature),
            _ => {
                return bad(
                    "a report without its signature, or a signature without its report".into(),
                );
            }
        };
        let Some(key) = &self.node_key else {
            return bad("a signed report but no node key".into());
        };
        let signature = super::NodeSignature {
            key: key.clone(),
            signature_b64: signature.clone(),
        };
        if let Err(e) = signature.verify(report.as_bytes()) {
            return bad(e);
        }
        let report: super::JobReport = match serde_json::from_str(report) {
            Ok(report) => report,
            Err(e) => return bad(format!("the signed report is not a report: {e}")),
        };
        let elapsed = match &report.phase {
            super::ReportPhase::Finished { outcome } => outcome.elapsed_ms,
            super::ReportPhase::Running | super::ReportPhase::HandedBack { .. } => {
                return bad("the signed report is not a result".into());
            }
        };
        if report.job_id != self.job_id
            || report.attempt != self.attempt
            || Some(&report.node_id) != self.node_id.as_ref()
            || Some(elapsed) != self.reported_elapsed_ms
        {
            return bad(format!(
                "the signed report is of job {} attempt {} on {} ({} ms), not what the receipt states",
                report.job_id, report.attempt, report.node_id, elapsed
            ));
        }
        Ok(())
    }

    /// The split adds up and the fee is the published formula: cost + refund = hold,
    /// provider + fee = cost, fee = round_half_up(cost × fee_bps / 10 000).
    pub fn check(&self) -> Result<(), ReceiptError> {
        let bad = |what: String| Err(ReceiptError::Inconsistent(what));
        if self.cost_micros + self.refund_micros != self.max_cost_micros {
            return bad(format!(
                "cost {} + refund {} is not the hold {}",
                self.cost_micros, self.refund_micros, self.max_cost_micros
            ));
        }
        if self.provider_micros + self.fee_micros != self.cost_micros {
            return bad(format!(
                "provider {} + fee {} is not the cost {}",
                self.provider_micros, self.fee_micros, self.cost_micros
            ));
        }
        let fee = (i128::from(self.cost_micros) * i128::from(self.fee_bps) + 5_000) / 10_000;
        if i128::from(self.fee_micros) != fee {
            return bad(format!(
                "fee {} is not {} bps of the cost {} (= {fee})",
                self.fee_micros, self.fee_bps, self.cost_micros
            ));
        }
        if self.cost_micros < 0 || self.refund_micros < 0 || self.fee_micros < 0 {
            return bad("a negative amount".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> ReceiptBody {
        ReceiptBody {
            receipt_v: RECEIPT_VERSION,
            job_id: "j1".into(),
            attempt: 1,
            state: JobState::Succeeded,
            account: "alice".into(),
            node_id: Some("n1".into()),
            node_key: None,
            node_report: None,
            node_signature_b64: None,
            provider_account: Some("prov".into()),
            spec_sha256: "a".repeat(64),
            result_sha256: "b".repeat(64),
            submitted_ms: 1,
            started_ms: Some(2),
            ended_ms: 3,
            reported_elapsed_ms: Some(1_234),
            billed_elapsed_ms: Some(1_234),
            fuel_consumed: None,
            max_cost_micros: 200_000,
            cost_micros: 12_340,
            fee_micros: 617,
            provider_micros: 11_723,
            refund_micros: 187_660,
            fee_bps: 500,
            ledger_tx_id: 7,
        }
    }

    #[test]
    fn a_receipt_verifies_only_unchanged_and_under_its_key() {
        let key = nkeys::KeyPair::new_server();
        let signed = SignedReceipt::sign(&body(), &key).unwrap();
        assert_eq!(signed.verify(Some(&key.public_key())).unwrap(), body());
        assert_eq!(signed.verify(None).unwrap(), body());
        // Every single changed byte of the body breaks the signature.
        for index in 0..signed.body.len() {
            let mut bytes = signed.body.clone().into_bytes();
            bytes[index] ^= 0x01;
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            let changed = SignedReceipt {
                body: text,
                ..signed.clone()
            };
            assert!(
                changed.verify(None).is_err(),
                "byte {index} changed and still verified"
            );
        }
        let other = nkeys::KeyPair::new_server();
        assert!(matches!(
            signed.verify(Some(&other.public_key())),
            Err(ReceiptError::WrongKey { .. })
        ));
        let bad_signature = SignedReceipt {
            signature_b64: "AAAA".into(),
            ..signed.clone()
        };
        assert_eq!(bad_signature.verify(None), Err(ReceiptError::BadSignature));
        let bad_key = SignedReceipt {
            orchestrator_key: "Nnope".into(),
            ..signed.clone()
        };
        assert!(matches!(bad_key.verify(None), Err(ReceiptError::BadKey(_))));
    }

    /// A receipt carrying the node's signed report: it verifies; a signature by another node
    /// key, or a signed report of another run time, fails with the reason — even when the
    /// orchestrator signed the receipt.
    #[test]
    fn the_nodes_signature_over_its_report_is_checked() {
        use super::super::{ExecutionOutcome, ExitKind, JobReport, ReportPhase};
        let orchestrator = nkeys::KeyPair::new_server();
        let node = nkeys::KeyPair::new_user();
        let report = |elapsed_ms| JobReport {
            v: 1,
            node_id: "n1".into(),
            job_id: "j1".into(),
            attempt: 1,
            phase: ReportPhase::Finished {
                outcome: ExecutionOutcome {
                    kind: ExitKind::Exited,
                    exit_code: Some(0),
                    message: None,
                    elapsed_ms,
                    stdout: "hi".into(),
                    stderr: String::new(),
                    fuel_consumed: None,
                    output_files: Default::default(),
                    blobs: Default::default(),
                    usage: None,
                },
            },
            signature: None,
        };
        let signed_by = |key: &nkeys::KeyPair, elapsed_ms| {
            let mut r = report(elapsed_ms);
            r.sign(key).unwrap();
            ReceiptBody {
                node_key: Some(node.public_key()),
                node_report: Some(String::from_utf8(r.signed_bytes()).unwrap()),
                node_signature_b64: r.signature.map(|s| s.signature_b64),
                ..body()
            }
        };
        let good = signed_by(&node, 1_234);
        let receipt = SignedReceipt::sign(&good, &orchestrator).unwrap();
        assert_eq!(receipt.verify(None).unwrap(), good);

        let other = nkeys::KeyPair::new_user();
        let forged = SignedReceipt::sign(&signed_by(&other, 1_234), &orchestrator).unwrap();
        let error = forged.verify(None).unwrap_err();
        assert!(matches!(error, ReceiptError::NodeSignature(_)), "{error}");
        assert!(error.to_string().contains("does not match"), "{error}");

        let longer = SignedReceipt::sign(&signed_by(&node, 9_999), &orchestrator).unwrap();
        let error = longer.verify(None).unwrap_err();
        assert!(error.to_string().contains("9999 ms"), "{error}");

        let unsigned = ReceiptBody {
            node_signature_b64: None,
            ..good
        };
        let error = SignedReceipt::sign(&unsigned, &orchestrator)
            .unwrap()
            .verify(None)
            .unwrap_err();
        assert!(matches!(error, ReceiptError::NodeSignature(_)), "{error}");
    }

    #[test]
    fn a_signed_receipt_whose_money_does_not_add_up_is_refused() {
        let key = nkeys::KeyPair::new_server();
        let cases = [
            ReceiptBody {
                refund_micros: 187_661,
                ..body()
            },
            ReceiptBody {
                provider_micros: 11_724,
                ..body()
            },
            ReceiptBody {
                fee_micros: 616,
                provider_micros: 11_724,
                ..body()
            },
        ];
        for case in cases {
            let signed = SignedReceipt::sign(&case, &key).unwrap();
            assert!(
                matches!(signed.verify(None), Err(ReceiptError::Inconsistent(_))),
                "{case:?}"
            );
        }
    }
}
