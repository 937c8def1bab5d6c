//! The manifest beside a component plugin (`x.wasm` → `x.json`): the capabilities and limits the
//! operator grants it. Parsed here, apart from the engine, so it can be checked (and fuzzed)
//! without wasmtime.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Largest memory a component call may be granted (the size of a pooled memory slot).
pub const MAX_MEMORY_MIB: u64 = 1024;
/// Most directories one manifest may grant.
pub const MAX_READ_DIRS: usize = 64;

/// A component's capabilities and limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Directories the component may read: `host` (relative to the plugin directory, or
    /// absolute) appears read-only at `guest`.
    #[serde(default)]
    pub read_dirs: Vec<DirGrant>,
    /// Fuel (deterministic work units) for one call.
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Memory one call may use, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Wall-clock limit of one call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Given to the component's `configure` before each call.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
}

fn default_fuel() -> u64 {
    500_000_000
}
fn default_memory_mib() -> u64 {
    64
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Parses and checks a manifest's text; relative grants are resolved against `base` (the plugin
/// directory) and must be directories there. The error says which field is wrong.
pub fn parse_manifest(text: &str, base: &Path) -> Result<Manifest, String> {
    let mut manifest: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if manifest.memory_mib == 0 || manifest.timeout_ms == 0 || manifest.fuel_per_call == 0 {
        return Err("fuel_per_call, memory_mib and timeout_ms must be > 0".into());
    }
    if manifest.memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "memory_mib is at most {MAX_MEMORY_MIB}, got {}",
            manifest.memory_mib
        ));
    }
    if manifest.read_dirs.len() > MAX_READ_DIRS {
        return Err(format!(
            "read_dirs: at most {MAX_READ_DIRS} directories, got {}",
            manifest.read_dirs.len()
        ));
    }
    for grant in &mut manifest.read_dirs {
        if !grant.guest.starts_with('/') || grant.guest.contains('\0') {
            return Err(format!(
                "read_dirs: guest path {:?} must be absolute",
                grant.guest
            ));
        }
        if grant.host.as_os_str().as_encoded_bytes().contains(&0) {
            return Err("read_dirs: a host path holds a NUL byte".into());
        }
        if grant.host.is_relative() {
            grant.host = base.join(&grant.host);
        }
        if !grant.host.is_dir() {
            return Err(format!(
                "read_dirs: {} is not a directory",
                grant.host.display()
            ));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_checked_field_by_field() {
        let base = std::env::temp_dir();
        let ok = parse_manifest(r#"{"read_dirs": [{"host": ".", "guest": "/data"}]}"#, &base)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.memory_mib, 64);
        assert_eq!(ok.read_dirs[0].host, base.join("."));
        for (text, expected) in [
            (r#"{"memory_mib": 0}"#, "must be > 0"),
            (r#"{"memory_mib": 4096}"#, "at most 1024"),
            (
                r#"{"read_dirs": [{"host": ".", "guest": "data"}]}"#,
                "must be absolute",
            ),
            (
                r#"{"read_dirs": [{"host": "nope-x9", "guest": "/d"}]}"#,
                "is not a directory",
            ),
            (r#"{"fuel": 1}"#, "unknown field"),
        ] {
            let error = parse_manifest(text, &base).err().unwrap_or_default();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
