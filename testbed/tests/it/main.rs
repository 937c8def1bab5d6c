//! End-to-end tests: a real nats-server, the orchestrator with a real SQLite ledger, agents
//! loading the real wasm plugin (`cargo build --workspace` first), and guests built from source.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod chaos;
mod cluster;
mod common;
mod components;
mod cuda;
mod dashboard;
mod docker;
mod events;
mod fairness;
mod flows;
mod gateway;
mod identity;
mod jobs;
mod keys;
mod modules;
mod outputs;
mod plugins;
mod protocol;
mod receipts;
mod restart;
mod scale;
mod scenarios;
mod tls;
mod top;
