//! Modules of the registry (`chain://<id>[@<version>]`): the reference, the manifest a resolver
//! returns, and the `module.resolve` / `module.list` requests and replies.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
