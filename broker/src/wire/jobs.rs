//! Jobs: what to run ([`Workload`], [`JobSpec`]), the submit / get / list / cancel requests and
//! the job as the orchestrator reports it ([`JobView`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What to run. Tagged by `backend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum Workload {
    /// A WASI preview1 command module (binary `.wasm` or WAT text), base64.
    Wasm { module_b64: String },
    /// A container from an image in the node's local Docker store (pulled only when a registry
    /// answers). The job's `args` are the command; `env`, `stdin` and files as for any job.
    Docker {
        /// Image reference, e.g. `rhizos/ffmpeg:6.1` or `busybox@sha256:…`.
        image: String,
        /// Replaces the image's entrypoint when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entrypoint: Option<Vec<String>>,
        /// Working directory inside the container (default: the image's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workdir: Option<String>,
        /// The job wants network access. Containers have none by default; a node gives it only
        /// when its operator allows it (`[agent.plugins.docker] allow_network = true`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        network: bool,
    },
    /// A native Linux x86-64 program (e.g. built with `nvcc`), base64, run on whole GPUs (the
    /// job's `gpus`, at least 1) that it alone sees; `min_vram_mib` is also its VRAM limit per GPU.
    /// Runs only on nodes whose operator allows native CUDA programs.
    Cuda { program_b64: String },
    /// Any other backend a node's plugin offers (e.g. a WebAssembly backend component, or a
    /// provider's own stable-ABI plugin): `payload_b64` is handed to it as the workload bytes.
    Custom { name: String, payload_b64: String },
    /// A request to a model-serving backend (an AI gateway's client's chat, embeddings, speech
    /// or scrape), billed by the units served at the node's prices for `model` — never more
    /// than `max_input_units` / `max_output_units`, nor than the gateway witnessed delivering.
    /// Submitted by a gateway only; the response streams to it on the job's `ai` subject.
    Inference {
        /// `chat`, `embeddings`, `speech` or `scrape`.
        service: String,
        /// The network's model name.
        model: String,
        /// The backend the node serves the model with (`openai`, `ollama`, `tts`, `scrape`);
        /// empty: any that offers the model.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        via: String,
        /// The validated request (JSON, `rhizos_plugin_api::ai::AiRequest`).
        request: String,
        /// The most input units the request can use (its hold is made for them).
        max_input_units: u64,
        /// The most output units it may produce (`max_tokens` for chat).
        max_output_units: u64,
    },
    /// A module from the registry, `chain://<id>[@<version>]`: the orchestrator resolves it at
    /// submit (through its resolver chain) into one of the forms above, with the module's
    /// artifact digest, which the agent checks before running it.
    Module { uri: String },
}

impl Workload {
    /// The backend a node must offer to run it.
    pub fn backend(&self) -> &str {
        match self {
            Self::Wasm { .. } => "wasm",
            Self::Docker { .. } => "docker",
            Self::Cuda { .. } => "cuda",
            Self::Custom { name, .. } => name,
            Self::Inference { via, .. } if !via.is_empty() => via,
            Self::Inference { .. } => "inference",
            Self::Module { .. } => "module",
        }
    }
}

/// An input file in the blob stream: the blob, and the node that stored it (where the
/// orchestrator copies it from when another node runs the job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputBlob {
    pub sha256: String,
    pub size: u64,
    pub from_node: String,
}

/// A job as submitted: the workload and how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub workload: Workload,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Input files (relative path → base64 content), readable by the workload under `/input`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_files: BTreeMap<String, String>,
    /// Input files stored in the blob stream (relative path → blob): a flow's upstream step's
    /// output, out of band. The node reads each under its own node token, where the
    /// orchestrator files it before the assignment, and checks its digest. Set by flows only
    /// (a submit naming one is refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_blobs: BTreeMap<String, InputBlob>,
    /// Execution deadline; the backend stops the workload after it.
    pub timeout_ms: u64,
    /// Memory limit of the workload.
    pub memory_mib: u64,
    /// CPU cores allocated (billing and, later, matching).
    #[serde(default = "default_cpu_cores")]
    pub cpu_cores: u32,
    /// How many times the job is retried after an infrastructure failure (its node was lost or
    /// restarted). Never for the job's own failure.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// GPUs needed (whole GPUs), each with at least `min_vram_mib` and every API in `gpu_apis`.
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub min_vram_mib: u64,
    #[serde(default)]
    pub gpu_apis: Vec<String>,
    /// Scratch disk needed.
    #[serde(default)]
    pub disk_mib: u64,
    /// How long the job may wait for a node (default: the orchestrator's `queue_timeout_ms`);
    /// then it ends `timed_out`, fully refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
    /// Limit on the job's whole life from submit; when it passes the job is stopped and ends
    /// `timed_out` (refunded if it never ran, paying the time used if it was running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_timeout_ms: Option<u64>,
    /// Most WASM fuel (deterministic work units) the job may burn; it ends `failed` with
    /// "fuel limit … exhausted" past it. On a node that prices fuel, the orchestrator also caps
    /// it at what `max_cost` can pay for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_limit: Option<u64>,
    /// SHA-256 the workload's artifact must have (set when a module is resolved); the agent
    /// refuses to run anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_sha256: Option<String>,
    /// Where the node fetches the workload's bytes (`http://` or `https://`), instead of them
    /// travelling inline: the workload's own bytes field is then empty and `artifact_sha256`
    /// required. Only nodes that fetch from this source (their `[agent] artifact_sources`)
    /// take the job; they keep fetched artifacts in a cache by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_url: Option<String>,
    /// The module this spec was resolved from (`chain://id@version`), for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl JobSpec {
    /// A spec with every optional field at its default: no args, env or stdin, 1 core, no GPU,
    /// [`DEFAULT_MAX_RETRIES`], the orchestrator's queue timeout, no total timeout.
    pub fn new(workload: Workload, timeout_ms: u64, memory_mib: u64) -> Self {
        Self {
            workload,
            args: Vec::new(),
            env: BTreeMap::new(),
            stdin_b64: None,
            input_files: BTreeMap::new(),
            input_blobs: BTreeMap::new(),
            timeout_ms,
            memory_mib,
            cpu_cores: default_cpu_cores(),
            max_retries: DEFAULT_MAX_RETRIES,
            queue_timeout_ms: None,
            total_timeout_ms: None,
            gpus: 0,
            min_vram_mib: 0,
            gpu_apis: Vec::new(),
            disk_mib: 0,
            fuel_limit: None,
            artifact_sha256: None,
            artifact_url: None,
            module: None,
        }
    }
}

fn default_cpu_cores() -> u32 {
    1
}

/// Retries after infrastructure failures when a submit does not say.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

fn default_max_retries() -> u32 {
    DEFAULT_MAX_RETRIES
}

/// `job.submit` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitJob {
    pub v: u32,
    /// Client-chosen id (`[a-z0-9_-]{1,64}`), so a client can subscribe to the job's logs and
    /// events before submitting, and retry a submit safely. The orchestrator picks one if absent.
    #[serde(default)]
    pub job_id: Option<String>,
    /// Paying account.
    pub account: String,
    pub spec: JobSpec,
    /// The most the user will pay; held in escrow on accept.
    pub max_cost_micros: i64,
    /// The API key a gateway's client presented, by SHA-256: the job is charged to that key's
    /// account within the key's credit limit — checked in the same ledger transaction as the
    /// hold, so concurrent requests cannot overspend it. Required when a gateway submits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitJobReply {
    pub job_id: String,
    pub state: JobState,
    /// The node and attempt, when the job was assigned in the submit itself (nothing queued
    /// ahead): a gateway takes that node's stream without asking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// `job.get` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRef {
    pub v: u32,
    pub job_id: String,
}

/// `job.cancel` request (the same shape as [`JobRef`], its own type so it cannot be sent to
/// `job.get` by mistake).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelJob {
    pub v: u32,
    pub job_id: String,
}

/// `job.list` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListJobs {
    pub v: u32,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub state: Option<JobState>,
    /// At most this many, newest first (default 50, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Continue after this cursor: the `next` of the previous page. Pages are stable while
    /// jobs are submitted (newer jobs never shift an older page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        Self::Pending,
        Self::Assigned,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

/// A job as the orchestrator knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: String,
    pub account: String,
    pub backend: String,
    pub state: JobState,
    pub attempt: u32,
    pub node_id: Option<String>,
    pub max_cost_micros: i64,
    /// Set once the job is settled or refunded.
    pub cost_micros: Option<i64>,
    pub provider_micros: Option<i64>,
    pub fee_micros: Option<i64>,
    pub refund_micros: Option<i64>,
    pub exit_code: Option<i32>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// Why the job failed, timed out or was cancelled.
    pub reason: Option<String>,
    pub elapsed_ms: Option<u64>,
    /// WASM fuel the execution burned (when the backend meters it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_consumed: Option<u64>,
    /// Files the workload wrote under `/output` (relative path → base64), when it ended.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_files: BTreeMap<String, String>,
    /// Output stored out of band (larger files, whole stdout/stderr), written by `node_id`:
    /// `rhizos job output` fetches it.
    #[serde(default, skip_serializing_if = "super::OutputBlobs::is_empty")]
    pub blobs: super::OutputBlobs,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// A metered (AI) job's units as its node reported them, and as billed (bounded by the
    /// hold and the gateway's witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_usage: Option<super::Metered>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billed_usage: Option<super::Metered>,
    /// When the job's payloads (spec, stdout/stderr, output files, blob references) were
    /// dropped under the orchestrator's `job_payload_max_age_s`: its money, state and times
    /// stay, and its receipt keeps the digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// The cursor for the next page (`after`), absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}
