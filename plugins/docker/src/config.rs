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
    /// The registries (`host[:port]`; `docker.io` for unqualified names such as `alpine`) this
    /// node pulls images from. A job naming an image elsewhere runs only if the image is already
    /// in the local store: no job can make the engine reach an arbitrary host.
    pub pull_registries: Vec<String>,
    /// Remove containers left by an earlier agent process of this node when starting.
    pub cleanup_orphans: bool,
    /// Most output files copied out of `/output`, and their total size.
    pub max_output_files: usize,
    pub max_output_bytes: u64,
    /// How long to wait for the engine to answer at start.
    pub connect_timeout_ms: u64,
    /// Disk a job may write (its container's writable layer: `/output`, `/tmp`, anything) when
    /// it asks for none (`disk_mib` 0), in MiB; a job past its limit is stopped "disk quota
    /// exceeded". With `read_only_rootfs` the `/output` volume is measured too when its host
    /// directory is readable by the agent.
    pub default_disk_mib: u64,
    /// How often a running container's disk use is measured (a workload writing faster
    /// overshoots by at most what it writes in one interval).
    pub disk_check_ms: u64,
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
            pull_registries: vec!["docker.io".into()],
            cleanup_orphans: true,
            max_output_files: 256,
            max_output_bytes: 64 << 20,
            connect_timeout_ms: 5_000,
            default_disk_mib: 10 * 1024,
            disk_check_ms: 500,
        }
    }
}

/// The registry an image reference pulls from: its first path component when that names a host
/// (has a `.` or `:`, or is `localhost`), else Docker Hub (`docker.io`).
pub fn registry_of(image: &str) -> String {
    let registry = match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    };
    match registry.to_ascii_lowercase().as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_owned(),
    }
}

impl Config {
    /// Whether this node pulls `image` (see [`Config::pull_registries`]).
    pub fn pulls_from(&self, image: &str) -> bool {
        let registry = registry_of(image);
        self.pull_registries
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&registry))
    }

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
        if let Some(bad) = config
            .pull_registries
            .iter()
            .find(|r| r.is_empty() || r.contains('/') || r.contains(char::is_whitespace))
        {
            return Err(format!(
                "[agent.plugins.docker] pull_registries entry {bad:?} is not a registry host[:port]"
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
    fn images_are_pulled_only_from_the_operators_registries() {
        for (image, registry) in [
            ("alpine", "docker.io"),
            ("library/alpine:3", "docker.io"),
            ("ghcr.io/org/app:1", "ghcr.io"),
            ("10.0.0.5:5000/x", "10.0.0.5:5000"),
            ("localhost/x", "localhost"),
            ("index.docker.io/library/alpine", "docker.io"),
            ("GHCR.IO/org/app", "ghcr.io"),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
        let config = Config::parse("{}").unwrap_or_else(|e| panic!("{e}"));
        assert!(config.pulls_from("alpine:3"));
        assert!(!config.pulls_from("169.254.169.254:80/latest/meta-data"));
        assert!(!config.pulls_from("ghcr.io/org/app"));
        let more = Config::parse(r#"{"pull_registries": ["docker.io", "ghcr.io"]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(more.pulls_from("ghcr.io/org/app"));
        let bad = Config::parse(r#"{"pull_registries": ["ghcr.io/org"]}"#)
            .err()
            .unwrap_or_default();
        assert!(bad.contains("not a registry"), "{bad}");
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
