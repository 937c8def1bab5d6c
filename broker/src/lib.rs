//! The only crate that knows RhizOS subjects and wire encodings.
//!
//! * [`subjects`]: builders for every subject of the v1 scheme
//!   (`rhizos.<kind>.v1.<ns>.<noun>.<verb>[.<id>]`) and token validation;
//! * [`ops`]: the one table of request/reply operations ([`CtlOp`]) and the [`Request`] trait
//!   tying each request message to its operation and reply;
//! * [`wire`]: versioned serde messages and the single reply envelope;
//! * [`config`]: settings from `rhizos.toml` + `RHIZOS_*` environment (figment);
//! * [`identity`]: roles, the caller token of every request subject, credentials files;
//! * [`auth`]: each role's `nats-server` permissions and the server's authorization block;
//! * [`bus`]: a connected client with typed request/reply, and the JetStream event stream;
//! * [`blobs`]: result bytes out of band (large output files, whole logs) in the blob stream;
//! * [`client`]: the typed control client, one method per operation (CLI, testbed, benchmarks);
//! * [`server`]: a `nats-server` launcher (free port, data dir, readiness wait, kill on drop)
//!   used by `rhizos up` and by tests.
//!
//! **Architecture Invariant:** no other crate formats a subject string or picks an encoding.

pub mod auth;
pub mod blobs;
pub mod bus;
pub mod client;
pub mod config;
pub mod identity;
pub mod ops;
pub mod server;
pub mod subjects;
pub mod wire;

pub use bus::{Bus, RequestError};
pub use client::Client;
pub use config::Settings;
pub use identity::{Caller, Credentials, Role};
pub use ops::{CtlOp, Request, Server};
pub use subjects::{Subjects, TokenError, validate_token};
