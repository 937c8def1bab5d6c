//! The RhizOS runtime behind `rhizosd`: the orchestrator (registry, matching, jobs, escrow ledger)
//! and the node agent (plugin host, executions, heartbeats). Both take their NATS connection and a
//! shutdown future as arguments, so they run as daemons, inside `rhizos up`, or inside a test.

pub mod agent;
pub mod component;
pub mod ledger;
pub mod orchestrator;
pub mod telemetry;

pub use agent::Agent;
pub use orchestrator::Orchestrator;

/// SHA-256 of `bytes` as 64 lowercase hex digits (how artifacts, modules and plugin copies are
/// named and checked).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it). The one wall clock of the
/// daemons: stored timestamps, event times, deadlines.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
