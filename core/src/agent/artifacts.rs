//! Job artifacts by reference (`artifact_url`): fetched over HTTP(S) only from the URL prefixes
//! the operator allows (`[agent] artifact_sources`), never following redirects (which could lead
//! elsewhere), at most `max_artifact_mib`, checked against the job's SHA-256 and kept in a cache
//! directory named by digest, so a module many jobs run is fetched once per node.
//!
//! What goes back to the job's submitter says only *that* a fetch failed, never how (no HTTP
//! status, no connection error, no digest of what the source served): the reason would
//! otherwise let anyone who can submit a job probe the operator's sources path by path. The
//! node's log has the details.

use rhizos_broker::config::AgentSettings;
use rhizos_broker::wire;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

pub struct ArtifactStore {
    dir: PathBuf,
    sources: Vec<String>,
    max_bytes: u64,
    timeout_ms: u64,
    agent: ureq::Agent,
}

/// Where an artifact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Cache,
    Fetched,
}

impl ArtifactStore {
    pub fn new(settings: &AgentSettings, node_id: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(settings.artifact_timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        Self {
            dir: settings.artifact_cache_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("rhizos-artifacts-{node_id}"))
            }),
            sources: settings.artifact_sources.clone(),
            max_bytes: settings.max_artifact_mib.saturating_mul(1024 * 1024),
            timeout_ms: settings.artifact_timeout_ms,
            agent,
        }
    }

    /// The bytes with digest `sha256` from `url`: from the cache, or fetched and cached.
    /// Blocking (call it on a blocking thread).
    pub fn get(&self, url: &str, sha256: &str) -> Result<(Vec<u8>, Origin), String> {
        wire::validate_artifact_url(url)?;
        if !crate::orchestrator::matching::fetches_from(&self.sources, url) {
            return Err(format!(
                "this node does not fetch artifacts from {url} (its [agent] artifact_sources)"
            ));
        }
        let expected = sha256.to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the job's artifact_sha256 is not 64 hex digits".into());
        }
        let cached = self.dir.join(&expected);
        if let Ok(bytes) = std::fs::read(&cached) {
            if crate::sha256_hex(&bytes) == expected {
                return Ok((bytes, Origin::Cache));
            }
            // Damaged on disk: fetch it again.
            tracing::warn!(path = %cached.display(), "cached artifact does not match its digest; fetching it again");
            let _ = std::fs::remove_file(&cached);
        }
        // Fetch the URL as it was checked (parsed and normalised), so no other parser's reading
        // of the original text decides where the request goes.
        let normalised = url::Url::parse(url).map_err(|e| format!("artifact URL {url:?}: {e}"))?;
        let bytes = self.fetch(normalised.as_str()).map_err(|detail| {
            tracing::warn!(%url, %detail, "artifact fetch failed");
            format!(
                "the artifact {url} could not be fetched from its source (the node's log has why)"
            )
        })?;
        let actual = crate::sha256_hex(&bytes);
        if actual != expected {
            tracing::warn!(%url, %actual, %expected, "artifact digest mismatch");
            return Err(format!(
                "artifact digest mismatch: {url} is not the artifact with sha256 {expected}; refusing to run it"
            ));
        }
        if let Err(e) = self.keep(&expected, &bytes) {
            // Still runnable; only the next job pays the fetch again.
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot cache an artifact");
        }
        Ok((bytes, Origin::Fetched))
    }

    fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut response = self.agent.get(url).call().map_err(|e| match e {
            ureq::Error::Timeout(_) => format!(
                "fetching the artifact {url}: no answer within {} ms",
                self.timeout_ms
            ),
            other => format!("fetching the artifact {url}: {other}"),
        })?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(format!("fetching the artifact {url}: HTTP {status}"));
        }
        response
            .body_mut()
            .with_config()
            .limit(self.max_bytes)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => format!(
                    "the artifact {url} is larger than this node's limit of {} MiB ([agent] max_artifact_mib)",
                    self.max_bytes / (1024 * 1024)
                ),
                other => format!("reading the artifact {url}: {other}"),
            })
    }

    /// Writes the artifact under its digest, whole or not at all (a temporary file renamed).
    fn keep(&self, sha256: &str, bytes: &[u8]) -> std::io::Result<()> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir)?;
        let partial = self.dir.join(format!(
            ".{sha256}.{}.{}.part",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = std::fs::File::create(&partial).and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_data()
        });
        match written.and_then(|()| std::fs::rename(&partial, self.dir.join(sha256))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }
}
