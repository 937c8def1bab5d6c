//! The node operator's settings for the CUDA backend: `[agent.plugins.cuda]`.

use serde::Deserialize;

/// `[agent.plugins.cuda]`; unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Path of `libnvidia-ml.so.1` when the driver put it somewhere the loader does not look.
    pub nvml_library: Option<String>,
    /// Run jobs' programs natively, as the agent's user, on their GPUs. Off by default: a native
    /// program is not sandboxed (GPU containers, through the docker backend, are).
    pub allow_native: bool,
    /// How often each job's VRAM use is read from NVML.
    pub watch_interval_ms: u64,
    /// Where each execution gets its private directory (default: the system temp dir).
    pub work_dir: Option<String>,
    /// Most output files collected from `output/`, and their total size.
    pub max_output_files: usize,
    pub max_output_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nvml_library: None,
            allow_native: false,
            watch_interval_ms: 250,
            work_dir: None,
            max_output_files: 256,
            max_output_bytes: 64 << 20,
        }
    }
}

impl Config {
    pub fn parse(json: &str) -> Result<Self, String> {
        let json = json.trim();
        let config: Self = if json.is_empty() {
            Self::default()
        } else {
            serde_json::from_str(json)
                .map_err(|e| format!("invalid [agent.plugins.cuda] settings: {e}"))?
        };
        if config.watch_interval_ms == 0 {
            return Err("[agent.plugins.cuda] watch_interval_ms must be > 0".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_execution_is_off_unless_the_operator_turns_it_on() {
        let config = Config::parse("{}").unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.allow_native);
        let typo = Config::parse(r#"{"allow_nativ": true}"#)
            .err()
            .unwrap_or_default();
        assert!(typo.contains("allow_nativ"), "{typo}");
        let zero = Config::parse(r#"{"watch_interval_ms": 0}"#)
            .err()
            .unwrap_or_default();
        assert!(zero.contains("watch_interval_ms"), "{zero}");
    }
}
