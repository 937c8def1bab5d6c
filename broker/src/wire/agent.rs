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

/// Request on `node.reregister.<node>`, from the orchestrator to that node's agent: the node's
/// heartbeats arrive but the orchestrator holds no registration of it (forgotten after
/// `[orchestrator] lost_node_max_age_s` lost, or a ledger restored from before it
/// registered) — register again. Answered `{accepted}` at once; the registration follows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgain {
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
    /// The node could not run the workload through no fault of it: its backend or engine
    /// failed, the artifact did not arrive or did not match its digest, the GPUs it offered were
    /// not there. Never charged; the job is requeued while retries remain.
    NodeError,
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
    /// What did not travel in this report: output files, and the whole of stdout/stderr when
    /// longer than their tails, stored in the namespace's blob stream ([`crate::blobs`]).
    #[serde(default, skip_serializing_if = "OutputBlobs::is_empty")]
    pub blobs: OutputBlobs,
    /// Units a metered service (an AI backend) counted; the bill is bounded by the job's
    /// limits and the gateway's witness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<super::ai::Metered>,
}

/// Bytes kept out of band in the namespace's blob stream, by SHA-256, under the account of the
/// job and the node that stored them (`rhizos.blob.v1.<ns>.u.<account>.n.<node>.<sha256>.<i>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// Lowercase hex SHA-256 of the whole content.
    pub sha256: String,
    pub size: u64,
}

/// A result's parts stored out of band.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputBlobs {
    /// Output files under `/output` too large to travel inline (relative path → blob).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, BlobRef>,
    /// The whole stdout (up to the agent's `max_stored_log_bytes`), when longer than its tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<BlobRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<BlobRef>,
}

impl OutputBlobs {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.stdout.is_none() && self.stderr.is_none()
    }

    /// Every blob with what it holds (`stdout`, `stderr` or the file's path).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &BlobRef)> {
        self.stdout
            .iter()
            .map(|b| ("stdout", b))
            .chain(self.stderr.iter().map(|b| ("stderr", b)))
            .chain(self.files.iter().map(|(name, b)| (name.as_str(), b)))
    }
}

impl ExecutionOutcome {
    /// A workload that exited with `code` after `elapsed_ms`, with no output.
    pub fn exited(code: i32, elapsed_ms: u64) -> Self {
        Self {
            kind: ExitKind::Exited,
            exit_code: Some(code),
            message: None,
            elapsed_ms,
            fuel_consumed: None,
            output_files: BTreeMap::new(),
            stdout: String::new(),
            stderr: String::new(),
            blobs: OutputBlobs::default(),
            usage: None,
        }
    }
}

// A report is decoded once and handled at once; boxing the outcome would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum ReportPhase {
    Running,
    Finished {
        outcome: ExecutionOutcome,
    },
    /// The agent is shutting down and stopped this attempt unfinished: requeue it (nothing is
    /// charged, no retry is spent).
    HandedBack {
        reason: String,
    },
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
    /// The node's signature over the report ([`JobReport::signed_bytes`]): a node enrolled with
    /// a key must sign its results, and receipts carry the signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<NodeSignature>,
}

/// A node's ed25519 signature (nkey encoding) over a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSignature {
    /// The node's public key (`U…`).
    pub key: String,
    pub signature_b64: String,
}

impl JobReport {
    /// The bytes a node signs: the report's JSON encoding without its signature. Both sides
    /// encode the same struct, so the orchestrator re-derives exactly these bytes from what it
    /// decoded (and keeps them, for receipts).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let unsigned = Self {
            signature: None,
            ..self.clone()
        };
        serde_json::to_vec(&unsigned).unwrap_or_default()
    }

    /// Signs the report with the node's key.
    pub fn sign(&mut self, key: &nkeys::KeyPair) -> Result<(), String> {
        use base64::Engine as _;
        let signature = key.sign(&self.signed_bytes()).map_err(|e| e.to_string())?;
        self.signature = Some(NodeSignature {
            key: key.public_key(),
            signature_b64: base64::engine::general_purpose::STANDARD.encode(signature),
        });
        Ok(())
    }

    /// Checks the signature against the key it names; returns the signed bytes.
    pub fn verify_signature(&self) -> Result<Option<(Vec<u8>, &NodeSignature)>, String> {
        let Some(signature) = &self.signature else {
            return Ok(None);
        };
        let bytes = self.signed_bytes();
        signature.verify(&bytes)?;
        Ok(Some((bytes, signature)))
    }
}

impl NodeSignature {
    /// Checks the signature over `bytes` under [`NodeSignature::key`].
    pub fn verify(&self, bytes: &[u8]) -> Result<(), String> {
        use base64::Engine as _;
        let key = nkeys::KeyPair::from_public_key(&self.key)
            .map_err(|_| format!("{:?} is not a public nkey", self.key))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.signature_b64)
            .ok()
            .filter(|s| s.len() == 64)
            .ok_or("the signature is not base64 of 64 bytes")?;
        key.verify(bytes, &raw).map_err(|_| {
            format!(
                "the signature does not match the report under key {}",
                self.key
            )
        })
    }
}

/// Job output on `rhizos.out.v1.<ns>.u.<account>.job.log.<job_id>.<node>`: the lines an agent
/// had ready, in order, in one message (a guest printing fast fills a batch, a quiet one sends
/// each line as it comes). Sequence numbers count every line the job printed, so a gap is lines
/// that were not streamed (the job's log budget spent, or the agent's buffer full); the result
/// still carries the tails of both streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    pub v: u32,
    pub job_id: String,
    pub attempt: u32,
    pub lines: Vec<LogEntry>,
}

/// One line in a [`LogBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Per attempt, from 0, in the order printed.
    pub seq: u64,
    pub stream: LogStream,
    pub line: String,
    pub ts_ms: u64,
}

impl LogBatch {
    /// The batch as single lines.
    pub fn into_lines(self) -> impl Iterator<Item = LogLine> {
        let (job_id, attempt) = (self.job_id, self.attempt);
        self.lines.into_iter().map(move |entry| LogLine {
            v: self.v,
            job_id: job_id.clone(),
            attempt,
            seq: entry.seq,
            stream: entry.stream,
            line: entry.line,
            ts_ms: entry.ts_ms,
        })
    }
}

/// One line of job output, as a watcher handles it ([`LogBatch::into_lines`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub v: u32,
    pub job_id: String,
    pub attempt: u32,
    /// Per attempt, from 0: a gap is lines that were not streamed.
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
