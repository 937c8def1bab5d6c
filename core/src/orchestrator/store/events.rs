//! Domain events: what the store records in the outbox, in the transaction of the change they
//! describe — a job changed state, money moved for a job. They say what happened in the store's
//! own terms; turning them into wire events on their subjects is the outbox publisher's job
//! (`orchestrator::outbox`), so the store knows neither subjects nor the wire encoding.
//!
//! Stored as JSON in `outbox.event` (this type's serde shape is the store's own format: add
//! fields only with `#[serde(default)]`, so rows written by an older release still read).

use rhizos_broker::wire::JobState;
use serde::{Deserialize, Serialize};

/// Which way money moved for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Movement {
    /// `max_cost` moved from the payer into the job's escrow (at submit).
    Held,
    /// The escrow closed with a charge: provider, fee, and the rest back to the payer.
    Settled,
    /// The escrow closed with everything back to the payer.
    Refunded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DomainEvent {
    /// A job changed state.
    Job {
        job_id: String,
        /// The payer (events recorded before it was carried have none).
        #[serde(default)]
        account: String,
        state: JobState,
        attempt: u32,
        node_id: Option<String>,
        reason: Option<String>,
    },
    /// Money moved for a job.
    Escrow {
        job_id: String,
        movement: Movement,
        /// The payer.
        account: String,
        /// Held: the hold. Settled: the cost. Refunded: the refund.
        amount_micros: i64,
        provider_account: Option<String>,
        provider_micros: Option<i64>,
        fee_micros: Option<i64>,
        refund_micros: Option<i64>,
    },
    /// A flow changed state, or one of its steps did (`step`; `state` is then the step's).
    Flow {
        flow_id: String,
        account: String,
        #[serde(default)]
        step: Option<String>,
        state: String,
        #[serde(default)]
        job_id: Option<String>,
        #[serde(default)]
        reason: Option<String>,
    },
}

/// A domain event and when it was recorded (wall clock, ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub ts_ms: u64,
    #[serde(flatten)]
    pub event: DomainEvent,
}
