//! Settings for every RhizOS process, from `rhizos.toml` and `RHIZOS_*` environment variables.
//!
//! Precedence (later wins): built-in defaults, the TOML file, then environment variables named
//! `RHIZOS_<SECTION>__<KEY>` (double underscore between section and key), e.g.
//! `RHIZOS_NATS__URL=nats://10.0.0.5:4222` or `RHIZOS_PRICING__CPU_HOUR_CENTS=12`.
//! Unknown keys in the file are errors, so a typo never silently falls back to a default.

use crate::wire::Pricing;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Default config file, looked up in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "rhizos.toml";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub nats: NatsSettings,
    pub orchestrator: OrchestratorSettings,
    pub agent: AgentSettings,
    pub pricing: Pricing,
    pub gateway: GatewaySettings,
    pub metrics: MetricsSettings,
}

/// `[metrics]`: Prometheus metrics of the daemon (`GET /metrics`, text exposition), on a
/// listener of their own — never on the gateway's public port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address to serve `/metrics` on, e.g. `127.0.0.1:9464`; none: not served.
    pub listen: Option<String>,
}

/// `[gateway]`: the OpenAI-compatible HTTP gateway (`rhizosd gateway`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Address the HTTP server listens on.
    pub listen: String,
    /// `max_tokens` of a chat request that sets none (its hold is made for them).
    pub default_max_tokens: u32,
    /// The most `max_tokens` a request may ask for.
    pub max_tokens_cap: u32,
    /// Longest a request may take from submit to its last chunk, in ms (also its job's
    /// timeout).
    pub request_timeout_ms: u64,
    /// How long a key's view (limits, revocation) is trusted before it is asked again, in ms.
    pub key_cache_ms: u64,
    /// How long the list of served models is trusted, in ms.
    pub models_cache_ms: u64,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Serve the web dashboard at `/dashboard` (people sign in with their credentials file).
    pub dashboard: bool,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            default_max_tokens: 512,
            max_tokens_cap: 8192,
            request_timeout_ms: 120_000,
            key_cache_ms: 5_000,
            models_cache_ms: 1_000,
            max_body_bytes: 4 * 1024 * 1024,
            dashboard: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL; several may be given comma-separated.
    pub url: String,
    /// Namespace token in every subject (tenancy; lets several networks share one server).
    pub namespace: String,
    /// How long a request waits for its reply.
    pub request_timeout_ms: u64,
    /// Client name shown by the server's monitoring.
    pub client_name: Option<String>,
    /// PEM file of the CA(s) the server's certificate must chain to; setting it requires TLS
    /// (a server that does not offer TLS is refused). None: plain TCP unless the server asks
    /// for TLS, then the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for servers that verify clients (mutual TLS); with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// A credentials file (`rhizos user add` / `rhizos node enroll` write them; mode 0600): the
    /// nkey this client authenticates with and the identity it acts as. None: connect without
    /// authentication, which only a server with no users accepts.
    pub credentials: Option<PathBuf>,
    /// Most bytes of job and escrow history the event stream keeps (oldest dropped first).
    pub event_max_bytes: u64,
    /// Longest the event stream keeps an event, in seconds; 0: no age limit.
    pub event_max_age_s: u64,
    /// Most bytes of out-of-band results (large output files, whole logs) the blob stream
    /// keeps (oldest dropped first).
    pub blob_max_bytes: u64,
    /// Longest the blob stream keeps a result's blobs, in seconds; 0: no age limit.
    pub blob_max_age_s: u64,
    /// Copies JetStream keeps of the event stream, the blob stream and the orchestrator lease:
    /// 1 on one server; 3 on a 3-server cluster, so losing one server loses nothing (set when
    /// the streams are created; a change needs them recreated).
    pub replicas: usize,
    /// How long a request to the orchestrator keeps being resent while nothing serves it (no
    /// responders: the active orchestrator is gone and a standby has not taken over yet). A
    /// request nobody received is always safe to send again. 0: fail at once.
    pub failover_wait_ms: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            namespace: "default".into(),
            request_timeout_ms: 5_000,
            client_name: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            credentials: None,
            event_max_bytes: 1024 * 1024 * 1024,
            event_max_age_s: 0,
            blob_max_bytes: 2 * 1024 * 1024 * 1024,
            blob_max_age_s: 7 * 24 * 3600,
            replicas: 1,
            failover_wait_ms: 15_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrchestratorSettings {
    /// Holds `ledger.db` (jobs and the escrow ledger).
    pub data_dir: PathBuf,
    /// Platform fee in basis points of the job cost (500 = 5%).
    pub fee_bps: u32,
    /// Largest request accepted on any subject.
    pub max_request_bytes: usize,
    /// How long an agent has to acknowledge an assignment.
    pub assign_timeout_ms: u64,
    /// A node is considered gone after this many missed heartbeats.
    pub missed_heartbeats: u32,
    /// Largest stdout/stderr tail stored with a job result.
    pub max_output_bytes: usize,
    /// How long a job waits for a node unless it says otherwise.
    pub queue_timeout_ms: u64,
    /// How fitting nodes are ranked.
    pub matching: MatchingWeights,
    /// Directory of resolver plugins (`*.so` stable-ABI resolvers, `*.wasm` resolver
    /// components with their manifests): the chain `chain://` modules are resolved through at
    /// submit, in file name order. None: modules cannot be used.
    pub resolver_dir: Option<PathBuf>,
    /// Resolver names in the order they are asked; resolvers not named follow, in file name
    /// order. Empty: file name order.
    pub resolver_order: Vec<String>,
    /// How long one resolver may take before the next in the chain is asked.
    pub resolver_timeout_ms: u64,
    /// How long a resolved manifest is reused.
    pub resolver_cache_ttl_ms: u64,
    /// Config handed to each stable-ABI resolver plugin by name (`[orchestrator.resolvers.<name>]`).
    pub resolvers: std::collections::BTreeMap<String, serde_json::Value>,
    /// Let nodes the operator did not enrol register (with the provider account they name).
    /// Only for a network without authentication, where anyone may claim to be anyone anyway;
    /// off, a node registers only as enrolled (`rhizos node enroll`).
    pub open_registration: bool,
    /// What a job is charged when its workload fails on its own (non-zero exit, trap, its own
    /// deadline, memory or fuel limit): `time_used` (default) pays the provider for the time it
    /// ran, like a success; `none` refunds it. Failures of the node itself (lost, engine or
    /// plugin error, digest mismatch, shutting down) are never charged.
    pub failed_workload_charge: FailedWorkloadCharge,
    /// Tolerance of the orchestrator's own measurements, in ms: a node's reported run time is
    /// billed at most up to the time since the assignment plus this, and a running job is
    /// stopped by the orchestrator once its `timeout_ms` plus this has passed since it started.
    pub timing_slack_ms: u64,
    /// Most requests served at once; past it a request is answered `too_busy` (retryable) at
    /// once, so a flood cannot queue without limit in front of the ledger thread.
    pub max_requests_in_flight: usize,
    /// How long the active orchestrator's lease lasts unrenewed (it renews every third of it):
    /// a standby on the same ledger takes over once it lapses, and the active stops serving
    /// if it cannot renew for this long.
    pub lease_ttl_ms: u64,
    /// Take the lease when the orchestrator that held it is gone (released or lapsed) even
    /// though it wrote another ledger: makes this orchestrator's ledger the network's. Off, such
    /// an orchestrator waits as a standby (a ledger switch is an operator's decision).
    pub lease_take_over_other_ledger: bool,
    /// Keep the ledger in a replicated JetStream stream (ADR 0010): the active orchestrator
    /// appends each committed batch's changes there (acknowledged by a quorum when `[nats]
    /// replicas` is 3) before anyone hears of them, and every orchestrator's SQLite file is a
    /// projection of that stream — a standby on another machine follows it and takes over
    /// with every committed movement. Off, the SQLite file alone is the ledger.
    pub replicated_ledger: bool,
    /// With `replicated_ledger`: the active orchestrator stores a snapshot of the ledger once
    /// this many records were appended since the last one, and trims the stream to what the
    /// two latest snapshots need — a member joining restores the latest snapshot and replays
    /// only what follows it, and the stream stays bounded. 0: never (the stream keeps every
    /// record; a new member replays them all).
    pub ledger_snapshot_every: u64,
    /// How long an ended job keeps its payloads — spec (inline modules, inputs, env), stdout
    /// and stderr, output files and blob references, the node's signed report — in seconds
    /// after it closed; then the active orchestrator drops them and keeps what the books and
    /// receipts need: money, state, times, billed usage, and the spec's and result's digests
    /// (its receipt then names no node report). Jobs of a flow still running are kept. 0:
    /// forever (the ledger file grows with every job).
    pub job_payload_max_age_s: u64,
    /// How long a lost node (no heartbeat) stays registered, in seconds: past it the active
    /// orchestrator forgets its registration (its attempts, reputation and enrolment stay), so
    /// nodes that come and go under new ids do not pile up. Heartbeats from a forgotten node
    /// make the orchestrator ask its agent to register again (`node.reregister`). 0: never.
    pub lost_node_max_age_s: u64,
}

/// See [`OrchestratorSettings::failed_workload_charge`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailedWorkloadCharge {
    /// The provider is paid for the time the failed workload used.
    #[default]
    TimeUsed,
    /// A failed workload is refunded in full.
    None,
}

/// Weights of the ranking among nodes that can run a job (lower score wins): the node's price
/// relative to the cheapest fitting one, its load, its unreliability (1 − reputation) and its
/// tier (higher tiers score worse, so big GPUs stay free for the jobs that need them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MatchingWeights {
    pub price: u32,
    pub load: u32,
    pub reputation: u32,
    pub tier: u32,
}

impl Default for MatchingWeights {
    fn default() -> Self {
        Self {
            price: 100,
            load: 50,
            reputation: 50,
            tier: 10,
        }
    }
}

impl Default for OrchestratorSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".rhizos"),
            fee_bps: 500,
            // Under the NATS default max_payload (1 MiB), so an oversized request reaches us and gets
            // a `too_large` reply instead of being dropped by the client.
            max_request_bytes: 900 * 1024,
            assign_timeout_ms: 3_000,
            missed_heartbeats: 3,
            max_output_bytes: 64 * 1024,
            queue_timeout_ms: 5 * 60_000,
            matching: MatchingWeights::default(),
            resolver_dir: None,
            resolver_order: Vec::new(),
            resolver_timeout_ms: 5_000,
            resolver_cache_ttl_ms: 60_000,
            resolvers: std::collections::BTreeMap::new(),
            open_registration: false,
            failed_workload_charge: FailedWorkloadCharge::TimeUsed,
            timing_slack_ms: 2_000,
            max_requests_in_flight: 4_096,
            lease_ttl_ms: 10_000,
            lease_take_over_other_ledger: false,
            replicated_ledger: false,
            ledger_snapshot_every: 10_000,
            job_payload_max_age_s: 30 * 24 * 3600,
            lost_node_max_age_s: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSettings {
    /// Node id (`[a-z0-9_-]`); default: `node-` + the host name, sanitised.
    pub node_id: Option<String>,
    /// Account the node's earnings are paid to.
    pub provider_account: String,
    /// Directory scanned for backend plugins (`*.so`).
    pub plugin_dir: PathBuf,
    /// How often the plugin directory is checked for added, replaced and removed plugins, in
    /// ms; 0 turns watching off (plugins are loaded once at start).
    pub plugin_scan_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// Executions run at the same time.
    pub max_concurrent: u32,
    /// CPU cores offered (default: all).
    pub cpu_cores: Option<u32>,
    /// Memory offered in MiB (default: the machine's total).
    pub memory_mib: Option<u64>,
    /// Largest stdout/stderr tail kept per execution for the result.
    pub max_output_bytes: usize,
    /// Most log lines one execution streams live; past it lines are counted, kept in the
    /// result's tails, and not published (a guest printing in a loop cannot flood the bus).
    pub max_log_lines: u64,
    /// Most bytes of log lines one execution streams live.
    pub max_log_bytes: u64,
    /// Longest line streamed; longer lines are cut (with `…`).
    pub max_line_bytes: usize,
    /// Most bytes of each of stdout and stderr kept whole for the result: when a stream is
    /// longer than its tail, this much of it (from its start) is stored out of band in the blob
    /// stream. 0: only tails.
    pub max_stored_log_bytes: u64,
    /// Most bytes of output files one result stores out of band (files too large to travel in
    /// the report); files past it are dropped, and the result says so.
    pub max_output_blob_bytes: u64,
    /// Configuration handed to each stable-ABI plugin when it starts, by plugin name
    /// (`[agent.plugins.<name>]`); a plugin without an entry gets `{}`.
    pub plugins: std::collections::BTreeMap<String, serde_json::Value>,
    /// Path of NVML (`libnvidia-ml.so.1`) when the loader does not find it (default: the
    /// loader's search). GPUs are detected and watched through it.
    pub nvml_library: Option<PathBuf>,
    /// URL prefixes (`https://registry.example.com/artifacts/`) this node fetches job
    /// artifacts from, for jobs whose bytes come by reference (`artifact_url`). Empty (the
    /// default): it fetches nothing and such jobs go elsewhere. A node only ever sends a GET to
    /// URLs under these prefixes, and runs only bytes matching the job's SHA-256.
    pub artifact_sources: Vec<String>,
    /// Where fetched artifacts are kept, by SHA-256 (default: `rhizos-artifacts-<node>` in the
    /// system's temporary directory).
    pub artifact_cache_dir: Option<PathBuf>,
    /// Largest artifact fetched, in MiB.
    pub max_artifact_mib: u64,
    /// Longest a fetch may take, in ms.
    pub artifact_timeout_ms: u64,
    /// Prices of the models this node serves, by model name (`[agent.model_prices.<name>]`
    /// with `input_million_micros` and `output_million_micros`); a model without an entry is
    /// priced at `[pricing] input_million_micros` / `output_million_micros`.
    pub model_prices: std::collections::BTreeMap<String, ModelPrice>,
    /// How long the agent waits for the gateway to answer the end of an AI response (its
    /// witness of what it delivered) before reporting the result anyway, in ms.
    pub witness_timeout_ms: u64,
}

/// A node's price for one model, micro-USD per million units (tokens; characters for speech;
/// pages for scrape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_million_micros: u64,
    pub output_million_micros: u64,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            node_id: None,
            provider_account: "provider".into(),
            plugin_dir: PathBuf::from("plugins"),
            plugin_scan_ms: 1_000,
            heartbeat_interval_ms: 5_000,
            max_concurrent: 4,
            cpu_cores: None,
            memory_mib: None,
            max_output_bytes: 64 * 1024,
            max_log_lines: 100_000,
            max_log_bytes: 16 * 1024 * 1024,
            max_line_bytes: 16 * 1024,
            max_stored_log_bytes: 16 * 1024 * 1024,
            max_output_blob_bytes: 256 * 1024 * 1024,
            plugins: std::collections::BTreeMap::new(),
            nvml_library: None,
            artifact_sources: Vec::new(),
            artifact_cache_dir: None,
            max_artifact_mib: 256,
            artifact_timeout_ms: 60_000,
            model_prices: std::collections::BTreeMap::new(),
            witness_timeout_ms: 5_000,
        }
    }
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            gpu_hour_cents: 90,
            cpu_hour_cents: 4,
            memory_gb_hour_cents: 1,
            fuel_million_micros: 0,
            // $0.10 / $0.20 per million tokens: a small model's price.
            input_million_micros: 100_000,
            output_million_micros: 200_000,
        }
    }
}

/// A config file or variable could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

impl Settings {
    /// Loads defaults, then `path` (or `./rhizos.toml` when `None` and it exists), then the
    /// environment. An explicit `path` that does not exist is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match path {
            Some(path) if !path.exists() => {
                return Err(ConfigError(Box::new(figment::Error::from(format!(
                    "config file {} does not exist",
                    path.display()
                )))));
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None => figment = figment.merge(Toml::file(DEFAULT_CONFIG_FILE)),
        }
        Self::from_figment(figment)
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let env = Env::prefixed("RHIZOS_")
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))
    }

    /// Loads from TOML text (tests, embedded configs), then the environment.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_rejects_typos() {
        let s =
            Settings::from_toml("[pricing]\ncpu_hour_cents = 12\n[nats]\nnamespace = \"lab\"\n")
                .unwrap();
        assert_eq!(s.pricing.cpu_hour_cents, 12);
        assert_eq!(s.pricing.gpu_hour_cents, Pricing::default().gpu_hour_cents);
        assert_eq!(s.nats.namespace, "lab");
        let err = Settings::from_toml("[pricing]\ncpu_hour_cent = 12\n").unwrap_err();
        assert!(err.to_string().contains("cpu_hour_cent"), "{err}");
    }

    #[test]
    fn plugin_sections_reach_the_agent_settings_as_json() {
        let s = Settings::from_toml(
            "[agent.plugins.testkit]\nprefix = \"lab\"\n[agent.plugins.docker]\nnetwork = false\nmemory_mib = 512\n",
        )
        .unwrap();
        assert_eq!(
            s.agent.plugins["testkit"],
            serde_json::json!({"prefix": "lab"})
        );
        assert_eq!(
            s.agent.plugins["docker"],
            serde_json::json!({"network": false, "memory_mib": 512})
        );
        assert!(Settings::default().agent.plugins.is_empty());
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/rhizos.toml"))).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/rhizos.toml"),
            "{err}"
        );
    }
}
