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
