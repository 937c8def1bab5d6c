//! Nodes as the orchestrator knows them: the registration an agent sends (capabilities, prices,
//! plugins, machine), and the `node.list` / `node.info` requests and views.

use super::agent::ExecutionRef;
use serde::{Deserialize, Serialize};

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
    /// Default price of a model's input units (tokens…), micro-USD per million, for models
    /// without their own price (`[pricing.models.<name>]` in the agent's config).
    #[serde(default)]
    pub input_million_micros: u64,
    /// Default price of a model's output units, micro-USD per million.
    #[serde(default)]
    pub output_million_micros: u64,
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

/// `node.register` request (agent → orchestrator).
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
    /// Models the node's backends serve, with its prices for each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<super::ai::ModelOffer>,
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

/// `node.list` request: nodes in node-id order, a page at a time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListNodes {
    pub v: u32,
    /// At most this many (default 200, at most 1000): a whole network does not fit in one
    /// message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Continue after this cursor: the `next` of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// `node.info` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRef {
    pub v: u32,
    pub node_id: String,
}

/// `node.enroll` request (operator): fixes the node's id and the provider account it is paid
/// into. Its registrations cannot change either; enrolling again with the same account is a
/// no-op, with another account `already_exists`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollNode {
    pub v: u32,
    pub node_id: String,
    pub provider_account: String,
    /// The node's nkey public key (`U…`), recorded for receipts and audits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// `node.remove` request (operator): the node's registrations are refused from then on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    pub v: u32,
    pub node_id: String,
}

/// A node's enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub node_id: String,
    pub provider_account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    pub enrolled_ms: u64,
    /// When it was removed; None while enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_ms: Option<u64>,
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
    /// The cursor for the next page (`after`), absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}
