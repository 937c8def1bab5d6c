//! Versioned wire messages (JSON) and the single reply envelope.
//!
//! Every message carries `v`, the schema version ([`WIRE_VERSION`]). A receiver first checks the
//! size and the version ([`decode`]) and only then the shape, so each kind of bad input gets its
//! own stable [`ErrorCode`]. Money is always integer micro-USD (`*_micros`, `i64`).

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::collections::BTreeMap;

/// Schema version of every message in this module.
pub const WIRE_VERSION: u32 = 1;

/// Micro-USD per USD.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// Stable error codes carried by failed replies. Tooling may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The payload is not valid JSON or does not have the expected shape or values.
    BadRequest,
    /// The message's `v` is not a version this receiver speaks.
    UnsupportedVersion,
    /// The payload is larger than the receiver accepts.
    TooLarge,
    NotFound,
    AlreadyExists,
    /// The account balance cannot cover the hold.
    InsufficientFunds,
    /// No registered node can run the job.
    NoCapacity,
    /// The operation does not apply to the object in its current state.
    InvalidState,
    /// Nothing handles this subject.
    UnsupportedSubject,
    /// The receiver failed; the request may be retried.
    Internal,
    /// A code from a newer peer.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::InsufficientFunds => "insufficient_funds",
            Self::NoCapacity => "no_capacity",
            Self::InvalidState => "invalid_state",
            Self::UnsupportedSubject => "unsupported_subject",
            Self::Internal => "internal",
            Self::Unknown => "unknown",
        }
    }
}

/// The error half of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({})", code.as_str())]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The one reply envelope used by every request/reply subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply<T> {
    pub v: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl<T> Reply<T> {
    pub fn ok(data: T) -> Self {
        Self {
            v: WIRE_VERSION,
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(error: WireError) -> Self {
        Self {
            v: WIRE_VERSION,
            ok: false,
            data: None,
            error: Some(error),
        }
    }
    pub fn into_result(self) -> Result<T, WireError> {
        match (self.ok, self.data, self.error) {
            (true, Some(data), _) => Ok(data),
            (_, _, Some(error)) => Err(error),
            _ => Err(WireError::new(
                ErrorCode::BadRequest,
                "reply has neither data nor error",
            )),
        }
    }
}

/// Encodes any wire message. Serialising these plain structs cannot fail.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    // serde_json only fails on maps with non-string keys or failing Serialize impls; none here.
    bytes::Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// Checks size, then version, then shape of an incoming message.
pub fn decode<T: DeserializeOwned>(payload: &[u8], max_bytes: usize) -> Result<T, WireError> {
    if payload.len() > max_bytes {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "message is {} bytes, the limit is {max_bytes} bytes",
                payload.len()
            ),
        ));
    }
    #[derive(Deserialize)]
    struct VersionProbe {
        v: Option<serde_json::Value>,
    }
    let probe: VersionProbe = serde_json::from_slice(payload).map_err(|e| {
        WireError::new(
            ErrorCode::BadRequest,
            format!("message is not a JSON object: {e}"),
        )
    })?;
    match probe.v {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(WIRE_VERSION)) => {}
        Some(other) => {
            return Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "message schema version {other} is not supported; this receiver speaks v{WIRE_VERSION}"
                ),
            ));
        }
        None => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("message has no schema version field \"v\" (expected {WIRE_VERSION})"),
            ));
        }
    }
    serde_json::from_slice(payload)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("invalid message: {e}")))
}

/// Base64 (standard alphabet) for binary fields.
pub fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn b64_decode(field: &str, text: &str) -> Result<Vec<u8>, WireError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            WireError::new(
                ErrorCode::BadRequest,
                format!("{field} is not valid base64: {e}"),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Jobs

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
            Self::Module { .. } => "module",
        }
    }
}

/// Longest `artifact_url` accepted.
pub const MAX_ARTIFACT_URL_BYTES: usize = 2048;

/// Checks an artifact URL's form: `http://` or `https://`, no whitespace, at most
/// [`MAX_ARTIFACT_URL_BYTES`].
pub fn validate_artifact_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "artifact URL {url:?} must start with http:// or https://"
        ));
    }
    if url.len() > MAX_ARTIFACT_URL_BYTES || url.chars().any(char::is_whitespace) {
        return Err(format!(
            "artifact URL must be at most {MAX_ARTIFACT_URL_BYTES} bytes without whitespace"
        ));
    }
    Ok(())
}

/// Whether a node with `sources` (URL prefixes) fetches `url`.
pub fn fetches_from(sources: &[String], url: &str) -> bool {
    sources
        .iter()
        .any(|prefix| !prefix.is_empty() && url.starts_with(prefix.as_str()))
}

/// `chain://<id>[@<version>]`: a module of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRef {
    pub id: String,
    /// `None`: the latest.
    pub version: Option<String>,
}

impl ModuleRef {
    /// Parses `chain://<id>[@<version>]` (id and version: letters, digits, `._-`, at most 128).
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("chain://")
            .ok_or_else(|| format!("{uri:?} is not a module name: it must start with chain://"))?;
        let (id, version) = match rest.split_once('@') {
            Some((id, version)) => (id, Some(version)),
            None => (rest, None),
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !ok(id) {
            return Err(format!(
                "{uri:?}: the module id must be 1-128 letters, digits, '.', '_' or '-'"
            ));
        }
        if let Some(version) = version
            && !ok(version)
        {
            return Err(format!(
                "{uri:?}: the version must be 1-128 letters, digits, '.', '_' or '-'"
            ));
        }
        Ok(Self {
            id: id.to_owned(),
            version: version.map(str::to_owned),
        })
    }
}

impl std::fmt::Display for ModuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(version) => write!(f, "chain://{}@{version}", self.id),
            None => write!(f, "chain://{}", self.id),
        }
    }
}

/// A module's manifest, as a resolver returns it (JSON). Unknown fields are refused so a typo
/// in a registry entry is an error naming the field, not a silently different job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleManifest {
    pub id: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `wasm`, `docker`, `cuda`, or another backend a plugin offers.
    pub backend: String,
    pub artifact: ModuleArtifact,
    /// Arguments used when the job gives none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// For `docker`: the entrypoint replacing the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Environment; the job's own variables win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// What the module needs at least; a job may ask for more.
    #[serde(default)]
    pub requirements: ModuleRequirements,
    /// What a run usually costs, for users choosing a `max_cost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_hint_micros: Option<i64>,
}

/// What a module runs, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleArtifact {
    /// The bytes (a WASM module, a CUDA program, another backend's payload), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// For `docker`: the image reference; the agent checks the local image's id against
    /// `sha256` before running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Instead of `data_b64`: where nodes fetch the bytes (`http://` or `https://`). Jobs stay
    /// small whatever the artifact's size, and go only to nodes that fetch from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// SHA-256 (64 hex digits) of the bytes, or the image id for `docker`.
    pub sha256: String,
}

/// A module's default requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleRequirements {
    pub memory_mib: u64,
    pub cpu_cores: u32,
    pub gpus: u32,
    pub min_vram_mib: u64,
    pub gpu_apis: Vec<String>,
    pub disk_mib: u64,
}

/// `module.resolve` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveModule {
    pub v: u32,
    pub uri: String,
}

/// `module.list` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListModules {
    pub v: u32,
}

/// One module version a resolver lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedModule {
    /// `chain://id@version`.
    pub uri: String,
    pub resolver: String,
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_hint_micros: Option<i64>,
}

/// `module.list` reply: every module version the chain's resolvers list (the first resolver
/// listing an id@version wins, as in resolution), the resolvers that cannot enumerate their
/// registry, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleList {
    pub modules: Vec<ListedModule>,
    pub unlisted: Vec<String>,
    pub problems: Vec<String>,
}

/// `module.resolve` reply: which resolver answered, and the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedModule {
    pub uri: String,
    pub resolver: String,
    pub manifest: ModuleManifest,
    /// Served from the orchestrator's cache (within its TTL).
    pub cached: bool,
}

/// Longest image reference accepted (Docker's own limit on a name is 255 per component).
pub const MAX_IMAGE_REF_BYTES: usize = 512;

/// Whether `image` is a Docker image reference: `[host[:port]/]path[:tag][@algo:hex]`, the path
/// in lowercase letters, digits and `._-/`, the tag in letters, digits and `._-` (at most 128).
/// It goes to the engine, never to a shell; this check gives a clear error at submit instead of
/// the engine's at run time.
pub fn valid_image_ref(image: &str) -> bool {
    if image.is_empty() || image.len() > MAX_IMAGE_REF_BYTES {
        return false;
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let Some((algo, hex)) = digest.split_once(':') else {
            return false;
        };
        if algo.is_empty()
            || !algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || hex.len() < 32
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return false;
        }
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag
        && (tag.is_empty()
            || tag.len() > 128
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return false;
    }
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let host_like = name.contains('/') && (first.contains('.') || first.contains(':'));
    let component_ok = |c: &str, port_allowed: bool| {
        !c.is_empty()
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-')
                    || (port_allowed && b == b':')
            })
    };
    component_ok(first, host_like) && components.all(|c| component_ok(c, false))
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitJobReply {
    pub job_id: String,
    pub state: JobState,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRef {
    pub v: u32,
    pub job_id: String,
}

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
    pub created_ms: u64,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

// ---------------------------------------------------------------------------------------------
// Accounts

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRef {
    pub v: u32,
    pub account: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deposit {
    pub v: u32,
    pub account: String,
    pub amount_micros: i64,
    /// Repeating a deposit with the same key changes nothing (safe retries).
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    pub account: String,
    pub balance_micros: i64,
    /// Money of this account currently held in escrow by its running jobs.
    pub held_micros: i64,
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// Provider prices, as in the agent's `[pricing]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub gpu_hour_cents: u64,
    pub cpu_hour_cents: u64,
    pub memory_gb_hour_cents: u64,
    /// Micro-USD per million units of WASM fuel, billed on top of the time prices for jobs
    /// whose backend meters fuel (deterministic billing: set the hourly prices to 0 to bill by
    /// fuel alone). 0: fuel is free.
    #[serde(default)]
    pub fuel_million_micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginView {
    pub file: String,
    pub name: Option<String>,
    pub version: Option<String>,
    /// `backend` or `resolver`, for a loaded plugin.
    #[serde(default)]
    pub kind: Option<String>,
    pub backends: Vec<String>,
    /// Why the file was refused, when it was.
    pub refused: Option<String>,
    /// Why a loaded plugin offers nothing on this node (e.g. "no NVIDIA driver (NVML: …)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterNode {
    pub v: u32,
    pub node_id: String,
    /// Account the node's earnings are paid to.
    pub provider_account: String,
    pub backends: Vec<String>,
    pub pricing: Pricing,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub max_concurrent: u32,
    /// How often the node heartbeats; it is considered lost after a few missed ones.
    pub heartbeat_interval_ms: u64,
    pub plugins: Vec<PluginView>,
    /// Executions the node is running right now (after an agent restart: none).
    #[serde(default)]
    pub running: Vec<ExecutionRef>,
    /// GPUs the node offers (empty without an NVIDIA driver).
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// Free disk offered for job scratch space.
    #[serde(default)]
    pub disk_mib: u64,
    /// What the machine is (for operators and listings; matching uses the fields above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareView>,
    /// URL prefixes the node fetches job artifacts from (`artifact_url`); empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifact_sources: Vec<String>,
}

/// A node's machine, as its agent detected it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareView {
    pub cpu_model: String,
    pub cpu_cores: u32,
    pub cpu_threads: u32,
    /// Instruction-set features workloads test for (avx2, avx512f, …).
    pub cpu_features: Vec<String>,
    pub os: String,
    pub kernel: String,
    /// Container runtimes present (`docker`, `podman`).
    pub runtimes: Vec<String>,
    /// Why the node offers no GPU, when it offers none (e.g. "no NVIDIA driver (NVML: …)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_note: Option<String>,
    /// NVIDIA driver and CUDA versions, e.g. "550.54.15, CUDA 12.4".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_driver: Option<String>,
}

/// One GPU's state now, from NVML, sent with every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuTelemetry {
    pub uuid: String,
    /// GPU busy time over the driver's last sample period, percent.
    pub utilization_pct: u32,
    pub vram_used_mib: u64,
    pub vram_total_mib: u64,
    pub temperature_c: u32,
    pub power_mw: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub name: String,
    pub vram_mib: u64,
    /// The driver's UUID (`GPU-…`), when known: what a job's `CUDA_VISIBLE_DEVICES` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// CUDA compute capability, `major.minor` (e.g. `9.0`), when NVML reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    /// APIs it supports, e.g. `cuda`.
    #[serde(default)]
    pub apis: Vec<String>,
}

/// Provider tier by the largest GPU's VRAM (the Cxmpute tiers): 0 below 1 GiB (or no GPU),
/// 1 for 1–4 GiB, 2 for 4–8 GiB, 3 for 8–22 GiB, 4 from 22 GiB.
pub fn provider_tier(gpus: &[GpuInfo]) -> u8 {
    let largest_mib = gpus.iter().map(|g| g.vram_mib).max().unwrap_or(0);
    match largest_mib {
        m if m >= 22 * 1024 => 4,
        m if m >= 8 * 1024 => 3,
        m if m >= 4 * 1024 => 2,
        m if m >= 1024 => 1,
        _ => 0,
    }
}

/// `node.info` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRef {
    pub v: u32,
    pub node_id: String,
}

/// A node as the orchestrator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: String,
    pub provider_account: String,
    pub tier: u8,
    pub backends: Vec<String>,
    pub pricing: Pricing,
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub gpus: Vec<GpuInfo>,
    pub max_concurrent: u32,
    /// Assigned + running executions now.
    pub active: u32,
    /// `live` or `lost`.
    pub status: String,
    pub last_heartbeat_ms_ago: u64,
    /// Jobs that ended on this node, and how many of them succeeded.
    pub jobs_run: u64,
    pub jobs_succeeded: u64,
    /// Success ratio over the node's last 100 ended jobs (1.0 with no history).
    pub reputation: f64,
    pub plugins: Vec<PluginView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<HardwareView>,
    /// GPU state from the node's last heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_telemetry: Vec<GpuTelemetry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// `ledger.verify` request (no parameters besides the version).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyLedger {
    pub v: u32,
}

/// What `ledger.verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReport {
    pub ok: bool,
    pub accounts: u64,
    pub transactions: u64,
    pub postings_sum_micros: i64,
    pub jobs_checked: u64,
    pub problems: Vec<String>,
}

/// `account.statement` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementRequest {
    pub v: u32,
    pub account: String,
    /// At most this many postings, newest first (default 100, at most 10 000).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub tx_id: i64,
    /// `deposit`, `hold`, `settle`, `refund`.
    pub kind: String,
    pub job_id: Option<String>,
    pub amount_micros: i64,
    /// Balance right after this posting.
    pub balance_after_micros: i64,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub account: String,
    pub balance_micros: i64,
    pub lines: Vec<StatementLine>,
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

// ---------------------------------------------------------------------------------------------
// Events (JetStream)

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowKind {
    Held,
    Settled,
    Refunded,
}

/// Whether `path` is an acceptable input/output file name: relative, `/`-separated, without
/// `.`/`..`/empty segments or NUL, at most 255 bytes.
pub fn valid_file_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.contains('\0')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_paths_stay_inside_their_directory() {
        for good in ["a", "a/b.txt", "data/in.txt", "x..y"] {
            assert!(super::valid_file_path(good), "{good}");
        }
        for bad in [
            "", "/a", "a/", "../a", "a/../b", "./a", "a//b", "a\\b", "a\0b",
        ] {
            assert!(!super::valid_file_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn module_names() {
        use super::ModuleRef;
        let latest = ModuleRef::parse("chain://mod-ffmpeg").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((latest.id.as_str(), latest.version), ("mod-ffmpeg", None));
        let pinned = ModuleRef::parse("chain://mod-hello@1.2.0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pinned.version.as_deref(), Some("1.2.0"));
        assert_eq!(pinned.to_string(), "chain://mod-hello@1.2.0");
        for bad in [
            "mod-hello",
            "http://mod",
            "chain://",
            "chain://a@",
            "chain://a b",
            "chain://a/../b",
        ] {
            assert!(ModuleRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "rhizos-test/probe:3f2a",
            "registry.example.com:5000/team/app:v1.2_RC",
            "localhost/x",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(super::valid_image_ref(good), "{good}");
        }
        for bad in [
            "",
            "-v",
            "Busybox",
            "app:",
            "app:bad tag",
            "/abs",
            "a//b",
            "app@sha256:short",
            "app@:0123456789abcdef0123456789abcdef",
            "app:$(reboot)",
            &"a".repeat(600),
        ] {
            assert!(!super::valid_image_ref(bad), "{bad:?}");
        }
        assert!(!super::valid_file_path(&"x".repeat(256)));
    }

    use super::*;

    #[test]
    fn decode_checks_size_then_version_then_shape() {
        let err = decode::<JobRef>(&[b' '; 100], 10).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        let err = decode::<JobRef>(b"not json", 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = decode::<JobRef>(br#"{"v":2,"job_id":"x"}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        let err = decode::<JobRef>(br#"{"job_id":"x"}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = decode::<JobRef>(br#"{"v":1}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("job_id"), "{}", err.message);
        let ok = decode::<JobRef>(br#"{"v":1,"job_id":"x"}"#, 100).unwrap();
        assert_eq!(ok.job_id, "x");
    }

    #[test]
    fn reply_envelope_round_trips_and_keeps_unknown_codes() {
        let reply: Reply<u32> = Reply::err(WireError::new(ErrorCode::NotFound, "no job j1"));
        let text = String::from_utf8(encode(&reply).to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"ok":false,"error":{"code":"not_found","message":"no job j1"}}"#
        );
        let future: Reply<u32> = serde_json::from_str(
            r#"{"v":1,"ok":false,"error":{"code":"quota_exceeded","message":"m"}}"#,
        )
        .unwrap();
        assert_eq!(future.into_result().unwrap_err().code, ErrorCode::Unknown);
    }

    #[test]
    fn job_report_wire_format_is_flat() {
        let report = JobReport {
            v: 1,
            node_id: "n1".into(),
            job_id: "j1".into(),
            attempt: 1,
            phase: ReportPhase::Running,
        };
        assert_eq!(
            String::from_utf8(encode(&report).to_vec()).unwrap(),
            r#"{"v":1,"node_id":"n1","job_id":"j1","attempt":1,"phase":"running"}"#
        );
    }
}
