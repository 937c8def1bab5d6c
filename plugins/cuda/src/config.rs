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
    /// How a native program is confined. `uid-and-cgroup` (the default) runs each execution
    /// under a uid of its own from `first_uid`, in a cgroup of its own (nothing it starts
    /// outlives it), with no new privileges — the agent must run as root for it, else the node
    /// offers no native CUDA and says why. `none` runs programs as the agent's own user in a
    /// process group (they can write whatever the agent can).
    pub isolation: Isolation,
    /// The first of the uids (gid = uid) given to executions, one each while it runs.
    pub first_uid: u32,
    /// How many uids from `first_uid` (at least the executions run at once).
    pub uid_count: u32,
    /// Most processes one execution may have at once (its cgroup's `pids.max`).
    pub pids_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    UidAndCgroup,
    None,
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
            isolation: Isolation::UidAndCgroup,
            first_uid: 200_000,
            uid_count: 1_024,
            pids_limit: 512,
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
        if config.first_uid == 0 || config.uid_count == 0 {
            return Err(
                "[agent.plugins.cuda] first_uid and uid_count must be > 0 (uid 0 is root)".into(),
            );
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
