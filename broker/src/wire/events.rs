//! Events the orchestrator publishes to the JetStream stream (job state changes and escrow
//! movements), through its outbox.

use super::jobs::JobState;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub v: u32,
    pub ts_ms: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    /// A job changed state.
    Job {
        job_id: String,
        state: JobState,
        attempt: u32,
        node_id: Option<String>,
        reason: Option<String>,
    },
    /// Money moved for a job.
    Escrow {
        job_id: String,
        kind: EscrowKind,
        account: String,
        /// Held: the hold. Settled: the cost. Refunded: the refund.
        amount_micros: i64,
        provider_account: Option<String>,
        provider_micros: Option<i64>,
        fee_micros: Option<i64>,
        refund_micros: Option<i64>,
    },
    /// A flow changed state, or one of its steps did (`step` names it; `state` is then the
    /// step's).
    Flow {
        flow_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<String>,
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowKind {
    Held,
    Settled,
    Refunded,
}
