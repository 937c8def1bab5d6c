//! The node operator's settings for the Docker backend: `[agent.plugins.docker]` in the agent's
//! config, handed to the plugin as JSON.

use serde::Deserialize;

/// `[agent.plugins.docker]`. Every field has a safe default; unknown fields are refused (a typo
/// must not silently weaken the sandbox).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The engine's address: `unix:///path/docker.sock`, `tcp://host:port` or `http://…`.
    /// Default: `DOCKER_HOST`, else the local socket.
    pub host: Option<String>,
    /// Give containers network access when their job asks for it (default: never).
    pub allow_network: bool,
    /// The Docker network such a container joins.
    pub network: String,
    /// Most processes (and threads) a container may have.
    pub pids_limit: i64,
    /// Make every container's root filesystem read-only (`/input` and `/output` are volumes
    /// then; an image meant for such nodes should have `/output` writable by `user`).
    pub read_only_rootfs: bool,
    /// The user the workload runs as (`uid[:gid]` or a name the image knows). Default: 65534
    /// (nobody); `""` keeps the image's own user.
    pub user: String,
    /// Pull an image missing from the local store (`"if-missing"`, the default) or fail the job
    /// at once (`"never"`).
    pub pull: PullPolicy,
    /// How long a pull may take before the job fails.
    pub pull_timeout_ms: u64,
    /// Remove containers left by an earlier agent process of this node when starting.
    pub cleanup_orphans: bool,
    /// Most output files copied out of `/output`, and their total size.
    pub max_output_files: usize,
    pub max_output_bytes: u64,
    /// How long to wait for the engine to answer at start.
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    IfMissing,
    Never,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: None,
            allow_network: false,
            network: "bridge".into(),
            pids_limit: 512,
            read_only_rootfs: false,
            user: "65534:65534".into(),
            pull: PullPolicy::IfMissing,
            pull_timeout_ms: 300_000,
            cleanup_orphans: true,
            max_output_files: 256,
            max_output_bytes: 512 << 10,
            connect_timeout_ms: 5_000,
        }
    }
}

impl Config {
    /// Parses the JSON the agent hands over (`{}` when the section is absent).
    pub fn parse(json: &str) -> Result<Self, String> {
        let json = json.trim();
        let config: Self = if json.is_empty() {
            Self::default()
        } else {
            serde_json::from_str(json)
                .map_err(|e| format!("invalid [agent.plugins.docker] settings: {e}"))?
        };
        if config.pids_limit < 16 {
            return Err(format!(
                "[agent.plugins.docker] pids_limit = {} is too small (at least 16)",
                config.pids_limit
            ));
        }
        if config.network.is_empty() || config.network == "host" {
            return Err(format!(
                "[agent.plugins.docker] network = {:?} is not allowed: name a bridge or user-defined network",
                config.network
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_sandbox() {
        let config = Config::parse("{}").unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.allow_network);
        assert_eq!(config.user, "65534:65534");
        assert_eq!(config.pull, PullPolicy::IfMissing);
        assert!(config.cleanup_orphans);
    }

    #[test]
    fn typos_and_unsafe_values_are_refused_with_the_field() {
        let typo = Config::parse(r#"{"allow_netwrk": true}"#)
            .err()
            .unwrap_or_default();
        assert!(typo.contains("allow_netwrk"), "{typo}");
        let host = Config::parse(r#"{"network": "host"}"#)
            .err()
            .unwrap_or_default();
        assert!(host.contains("not allowed"), "{host}");
        let pids = Config::parse(r#"{"pids_limit": 1}"#)
            .err()
            .unwrap_or_default();
        assert!(pids.contains("pids_limit"), "{pids}");
        let pull = Config::parse(r#"{"pull": "always"}"#)
            .err()
            .unwrap_or_default();
        assert!(pull.contains("unknown variant"), "{pull}");
    }
}
