//! Between the orchestrator and one agent: assignments and stops, reports, heartbeats, log lines
//! and the agent's live plugin list.

use super::jobs::JobSpec;
use super::nodes::{GpuTelemetry, PluginView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Request on `node.plugins.<node>` (answered by that node's agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListPlugins {
    pub v: u32,
}

/// A node's plugins as its agent sees them now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PluginList {
    pub node_id: String,
    /// The directory the agent follows.
    pub plugin_dir: String,
    pub plugins: Vec<PluginView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRef {
    pub job_id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    pub node_id: String,
    pub running: Vec<ExecutionRef>,
    pub free_slots: u32,
    pub ts_ms: u64,
    /// The node's GPUs now (empty without GPUs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuTelemetry>,
}

/// Orchestrator → agent: run this attempt of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssignJob {
    pub v: u32,
    pub job_id: String,
    pub attempt: u32,
    /// The paying account: the job's log lines are published under it, where only that
    /// account (and the operator) may read them.
    pub account: String,
    pub spec: JobSpec,
}

/// Orchestrator → agent: stop this attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StopJob {
    pub v: u32,
    pub job_id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How an execution ended, as reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    Exited,
    TimedOut,
    MemoryExceeded,
    Crashed,
    Cancelled,
    Rejected,
    FuelExhausted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionOutcome {
    pub kind: ExitKind,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub elapsed_ms: u64,
    /// Fuel burned, when the backend meters it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_consumed: Option<u64>,
    /// Files the workload left under `/output` (relative path → base64).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_files: BTreeMap<String, String>,
    /// Tail of stdout/stderr (bounded, see the agent's `max_output_bytes`).
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum ReportPhase {
    Running,
    Finished { outcome: ExecutionOutcome },
}

/// Agent → orchestrator: progress of one attempt. Retried until acked; idempotent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobReport {
    pub v: u32,
    pub node_id: String,
    pub job_id: String,
    pub attempt: u32,
    #[serde(flatten)]
    pub phase: ReportPhase,
}

/// One line of job output on `rhizos.out.v1.<ns>.job.log.<job_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub v: u32,
    pub job_id: String,
    pub attempt: u32,
    /// Per attempt, from 0, without gaps: a watcher can tell a lost line.
    pub seq: u64,
    pub stream: LogStream,
    pub line: String,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}
