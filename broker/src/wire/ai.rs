//! The AI side of the marketplace on the wire: the models nodes offer (in their registrations),
//! the `model.list` view the gateway serves `/v1/models` from, the units a metered request used
//! (`Metered`), and the gateway's witness of what it delivered (`job.witness`), which bounds
//! what the node can bill.

use serde::{Deserialize, Serialize};

/// A model a node serves through one of its backends, at the node's prices for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOffer {
    /// The backend (plugin) serving it, e.g. `openai`, `ollama`.
    pub backend: String,
    /// `chat`, `embeddings`, `speech` or `scrape`.
    pub service: String,
    /// The network's model name (`[a-z0-9._:-]`, 1–64).
    pub name: String,
    #[serde(default)]
    pub context_length: u32,
    /// Loaded and ready now.
    #[serde(default)]
    pub warm: bool,
    /// Micro-USD per million input units (tokens; characters for speech; requests for scrape).
    pub input_million_micros: u64,
    /// Micro-USD per million output units (tokens; pages for scrape).
    pub output_million_micros: u64,
}

/// Units a metered request used (tokens, characters, pages: see [`ModelOffer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metered {
    pub input_units: u64,
    pub output_units: u64,
}

/// `model.list` request: the models online nodes serve now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListModels {
    pub v: u32,
}

/// One model across the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelView {
    pub name: String,
    pub service: String,
    /// Live nodes serving it, and how many of them have it loaded.
    pub nodes: u32,
    pub warm_nodes: u32,
    /// The largest context any of them offers.
    pub context_length: u32,
    /// The lowest and highest prices among them (micro-USD per million units).
    pub input_million_micros_min: u64,
    pub input_million_micros_max: u64,
    pub output_million_micros_min: u64,
    pub output_million_micros_max: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// By name, then service.
    pub models: Vec<ModelView>,
}

/// `job.witness` request (the gateway): what it delivered to its client of an attempt's
/// response. For an AI job the bill is bounded by it: output never above what was delivered
/// (and input, where the gateway can count it, never above its count). Sent before the
/// gateway answers the node's end of stream; an attempt with no witness bills nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessUsage {
    pub v: u32,
    pub job_id: String,
    pub node_id: String,
    pub attempt: u32,
    /// Input units the gateway counted itself (speech characters); none where only the node
    /// can count them (prompt tokens: bounded by the job's `max_input_units` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_units: Option<u64>,
    /// Output units delivered: content chunks of a chat answer (llama.cpp and Ollama send one
    /// token per chunk), pages of a scrape.
    pub output_units: u64,
}

/// Header of every message on an AI job's stream: the attempt it belongs to.
pub const AI_ATTEMPT_HEADER: &str = "Rhizos-Attempt";
/// Header of a chunk on an AI job's stream: its number in the attempt (from 0), so a gap shows.
pub const AI_SEQ_HEADER: &str = "Rhizos-Seq";

/// The end of an attempt's response on its AI stream (a request: the gateway answers with an
/// [`super::Ack`] once it has sent its witness, and the node reports its result after that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    pub v: u32,
    pub attempt: u32,
    /// How many chunks the node sent before this.
    pub chunks: u64,
    /// How the execution ended, as the node will report it.
    pub kind: super::ExitKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the backend counted (the bill is bounded by the gateway's own count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Metered>,
}
