//! `chain://` modules: resolved at submit through the orchestrator's resolver chain (the
//! resolver plugins of `[orchestrator] resolver_dir`, both kinds, in file name order), cached for
//! a TTL, and turned into a concrete job spec that carries the artifact's digest.
//!
//! Bounded against a `module.resolve` flood: each resolver runs at most
//! [`MAX_CALLS_PER_RESOLVER`] calls at once, counting calls that outlived their timeout (a
//! plugin's blocking call cannot be cancelled, so it keeps its slot until it really returns and
//! the blocking pool is never filled by one hung registry); a module no resolver knows is
//! remembered as unknown for [`UNKNOWN_TTL`] (at most the TTL), and the cache holds at most
//! [`MAX_CACHE_ENTRIES`].

use crate::agent::plugins::{ChainResolver, PluginDir};
use rhizos_broker::wire::{
    self, ErrorCode, JobSpec, ModuleManifest, ModuleRef, ResolvedModule, WireError, Workload,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Most calls one resolver runs at once (those past their timeout included); past it the
/// resolver is skipped, saying so.
pub const MAX_CALLS_PER_RESOLVER: usize = 8;
/// How long a module no resolver knows is answered `not_found` from memory.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(10);
/// Most modules remembered, known and unknown together.
pub const MAX_CACHE_ENTRIES: usize = 10_000;

/// The resolver chain and its cache.
pub struct ModuleResolver {
    /// Keeps the plugins' private copies alive.
    _dir: PluginDir,
    /// Each resolver with its call slots.
    chain: Vec<(ChainResolver, Arc<Semaphore>)>,
    timeout: Duration,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Cached)>>,
}

/// What the cache remembers of a module.
#[derive(Clone)]
enum Cached {
    Known(Box<ResolvedModule>),
    /// Every resolver answered that it does not know it (this message).
    Unknown(String),
}

impl ModuleResolver {
    /// Loads the resolver plugins of `dir` (backend plugins there are ignored, with a warning).
    pub fn open(
        dir: &std::path::Path,
        configs: std::collections::BTreeMap<String, String>,
        order: &[String],
        timeout: Duration,
        ttl: Duration,
    ) -> std::io::Result<Self> {
        let mut plugins = PluginDir::new(dir, configs, "orchestrator")?;
        plugins.scan(false);
        let mut set = plugins.set();
        // Named resolvers first, in the configured order; the rest keep file name order.
        set.resolvers.sort_by_key(|r| {
            order
                .iter()
                .position(|name| name == r.name())
                .unwrap_or(order.len())
        });
        for name in order {
            if !set.resolvers.iter().any(|r| r.name() == name) {
                tracing::warn!(resolver = %name, "resolver_order names a resolver that is not loaded");
            }
        }
        for refused in &set.refused {
            tracing::warn!(file = %refused.file.display(), "resolver refused: {}", refused.reason);
        }
        for backend in &set.loaded {
            tracing::warn!(file = %backend.file.display(), "backend plugin in the resolver dir ignored");
        }
        for resolver in &set.resolvers {
            tracing::info!(
                name = resolver.name(),
                version = resolver.version(),
                "module resolver loaded"
            );
        }
        Ok(Self {
            _dir: plugins,
            chain: set
                .resolvers
                .into_iter()
                .map(|r| (r, Arc::new(Semaphore::new(MAX_CALLS_PER_RESOLVER))))
                .collect(),
            timeout,
            ttl,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The resolvers, in the order they are asked.
    pub fn names(&self) -> Vec<String> {
        self.chain
            .iter()
            .map(|(r, _)| r.name().to_owned())
            .collect()
    }

    /// The manifest of `uri`: from the cache within its TTL, else from the first resolver that
    /// knows it. A resolver that fails, times out or answers malformed is skipped (its error
    /// is reported if no later one answers).
    pub async fn resolve(&self, uri: &str) -> Result<ResolvedModule, WireError> {
        let module = ModuleRef::parse(uri).map_err(|e| WireError::new(ErrorCode::BadRequest, e))?;
        let key = module.to_string();
        if let Some(cached) = self.cached(&key) {
            return match cached {
                Cached::Known(resolved) => {
                    let mut resolved = *resolved;
                    resolved.cached = true;
                    Ok(resolved)
                }
                Cached::Unknown(message) => Err(WireError::new(ErrorCode::NotFound, message)),
            };
        }
        let mut problems = Vec::new();
        for (resolver, slots) in &self.chain {
            let name = resolver.name().to_owned();
            let (id, version) = (module.id.clone(), module.version.clone());
            let text = match self
                .ask(resolver, slots, move |r| r.resolve(&id, version.as_deref()))
                .await
            {
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
                Ok(None) => continue,
                Ok(Some(text)) => text,
            };
            let manifest: ModuleManifest = match serde_json::from_str(&text) {
                Ok(manifest) => manifest,
                Err(e) => {
                    problems.push(format!("{name}: malformed manifest for {key}: {e}"));
                    continue;
                }
            };
            if manifest.id != module.id
                || module
                    .version
                    .as_ref()
                    .is_some_and(|v| *v != manifest.version)
            {
                problems.push(format!(
                    "{name}: answered chain://{}@{} for {key}",
                    manifest.id, manifest.version
                ));
                continue;
            }
            let resolved = ResolvedModule {
                uri: key.clone(),
                resolver: name,
                manifest,
                cached: false,
            };
            self.remember(key, Cached::Known(Box::new(resolved.clone())));
            return Ok(resolved);
        }
        let mut message = format!(
            "no resolver knows {key} (asked: {})",
            if self.chain.is_empty() {
                "none".to_owned()
            } else {
                self.names().join(", ")
            }
        );
        if problems.is_empty() {
            // Every resolver answered: a definite "unknown", worth remembering for a while.
            self.remember(key, Cached::Unknown(message.clone()));
        } else {
            message.push_str(&format!("; {}", problems.join("; ")));
        }
        Err(WireError::new(ErrorCode::NotFound, message))
    }

    /// The cache's entry for `key` while it is fresh.
    fn cached(&self, key: &str) -> Option<Cached> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (at, cached) = cache.get(key)?;
        let ttl = match cached {
            Cached::Known(_) => self.ttl,
            Cached::Unknown(_) => self.ttl.min(UNKNOWN_TTL),
        };
        (at.elapsed() < ttl).then(|| cached.clone())
    }

    /// Caches `cached` under `key`, dropping stale entries (and then the oldest) when full.
    fn remember(&self, key: String, cached: Cached) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_CACHE_ENTRIES && !cache.contains_key(&key) {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl.min(UNKNOWN_TTL));
            while cache.len() >= MAX_CACHE_ENTRIES {
                let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (Instant::now(), cached));
    }
}

impl ModuleResolver {
    /// Runs one blocking resolver call on the blocking pool within the per-resolver timeout;
    /// every way it can fail becomes one problem line naming the resolver.
    async fn ask<T: Send + 'static>(
        &self,
        resolver: &ChainResolver,
        slots: &Arc<Semaphore>,
        call: impl FnOnce(&ChainResolver) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let name = resolver.name().to_owned();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            return Err(format!(
                "{name}: skipped, {MAX_CALLS_PER_RESOLVER} calls to it are still running (slow or hung)"
            ));
        };
        let resolver = resolver.clone();
        match tokio::time::timeout(
            self.timeout,
            tokio::task::spawn_blocking(move || {
                // Held until the call returns, timed out or not.
                let _slot = slot;
                call(&resolver)
            }),
        )
        .await
        {
            Err(_) => Err(format!(
                "{name}: no answer within {} ms",
                self.timeout.as_millis()
            )),
            Ok(Err(e)) => Err(format!("{name}: {e}")),
            Ok(Ok(Err(e))) => Err(format!("{name}: {e}")),
            Ok(Ok(Ok(answer))) => Ok(answer),
        }
    }

    /// Every module version the resolvers list, first resolver winning per id@version.
    pub async fn list(&self) -> wire::ModuleList {
        let mut seen = std::collections::BTreeMap::new();
        let mut unlisted = Vec::new();
        let mut problems = Vec::new();
        for (resolver, slots) in &self.chain {
            let name = resolver.name().to_owned();
            let manifests = match self.ask(resolver, slots, ChainResolver::list).await {
                Err(problem) => {
                    problems.push(problem);
                    continue;
                }
                Ok(None) => {
                    unlisted.push(name);
                    continue;
                }
                Ok(Some(manifests)) => manifests,
            };
            for text in manifests {
                match serde_json::from_str::<ModuleManifest>(&text) {
                    Ok(m) => {
                        let uri = format!("chain://{}@{}", m.id, m.version);
                        seen.entry(uri.clone()).or_insert(wire::ListedModule {
                            uri,
                            resolver: name.clone(),
                            backend: m.backend,
                            description: m.description,
                            price_hint_micros: m.price_hint_micros,
                        });
                    }
                    Err(e) => problems.push(format!("{name}: malformed manifest: {e}")),
                }
            }
        }
        wire::ModuleList {
            modules: seen.into_values().collect(),
            unlisted,
            problems,
        }
    }
}

/// The concrete spec of `spec` (whose workload names the module) from the module's manifest:
/// the artifact becomes the workload, the job's args win over the module's (when it has any),
/// its env over the module's, and each requirement is the larger of the two.
pub fn materialize(manifest: &ModuleManifest, spec: &JobSpec) -> Result<JobSpec, WireError> {
    let bad = |m: String| WireError::new(ErrorCode::BadRequest, m);
    let module = format!("chain://{}@{}", manifest.id, manifest.version);
    let artifact = &manifest.artifact;
    let digest = artifact.sha256.to_ascii_lowercase();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "{module}: artifact.sha256 must be 64 hex digits"
        )));
    }
    // Bytes by reference: the workload's bytes stay empty and the node fetches them (and
    // checks them against the digest) from the URL.
    let by_reference = match (&artifact.url, &artifact.data_b64) {
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "{module}: the artifact has both data_b64 and url; give one"
            )));
        }
        (Some(url), None) => {
            wire::validate_artifact_url(url).map_err(|e| bad(format!("{module}: {e}")))?;
            if manifest.backend == "docker" {
                return Err(bad(format!(
                    "{module}: a docker artifact is an image, not a url"
                )));
            }
            Some(url.clone())
        }
        (None, _) => None,
    };
    let data = || -> Result<String, WireError> {
        if by_reference.is_some() {
            return Ok(String::new());
        }
        let text = artifact
            .data_b64
            .clone()
            .ok_or_else(|| bad(format!("{module}: artifact.data_b64 (or url) is missing")))?;
        let bytes = wire::b64_decode("artifact.data_b64", &text)?;
        let actual = crate::sha256_hex(&bytes);
        if actual != digest {
            return Err(bad(format!(
                "{module}: the artifact does not match its digest (sha256 {actual}, the manifest says {digest})"
            )));
        }
        Ok(text)
    };
    let mut out = spec.clone();
    out.workload = match manifest.backend.as_str() {
        "wasm" => Workload::Wasm {
            module_b64: data()?,
        },
        "cuda" => Workload::Cuda {
            program_b64: data()?,
        },
        "docker" => Workload::Docker {
            image: artifact
                .image
                .clone()
                .ok_or_else(|| bad(format!("{module}: artifact.image is missing")))?,
            entrypoint: manifest.entrypoint.clone(),
            workdir: None,
            network: false,
        },
        "module" | "custom" | "" => {
            return Err(bad(format!(
                "{module}: backend {:?} is not a backend",
                manifest.backend
            )));
        }
        other => Workload::Custom {
            name: other.to_owned(),
            payload_b64: data()?,
        },
    };
    if out.args.is_empty() {
        out.args = manifest.args.clone();
    }
    for (key, value) in &manifest.env {
        out.env.entry(key.clone()).or_insert_with(|| value.clone());
    }
    let needs = &manifest.requirements;
    out.memory_mib = out.memory_mib.max(needs.memory_mib);
    out.cpu_cores = out.cpu_cores.max(needs.cpu_cores);
    out.gpus = out.gpus.max(needs.gpus);
    out.min_vram_mib = out.min_vram_mib.max(needs.min_vram_mib);
    out.disk_mib = out.disk_mib.max(needs.disk_mib);
    for api in &needs.gpu_apis {
        if !out.gpu_apis.contains(api) {
            out.gpu_apis.push(api.clone());
        }
    }
    out.artifact_sha256 = Some(digest);
    out.artifact_url = by_reference;
    out.module = Some(module);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::{ModuleArtifact, ModuleRequirements};

    fn manifest(data: &[u8], digest: String) -> ModuleManifest {
        ModuleManifest {
            id: "mod-hello".into(),
            version: "1.0.0".into(),
            description: None,
            backend: "wasm".into(),
            artifact: ModuleArtifact {
                data_b64: Some(wire::b64_encode(data)),
                image: None,
                url: None,
                sha256: digest,
            },
            args: vec!["hello".into()],
            entrypoint: None,
            env: [
                ("A".to_owned(), "module".to_owned()),
                ("B".to_owned(), "module".to_owned()),
            ]
            .into(),
            requirements: ModuleRequirements {
                memory_mib: 256,
                cpu_cores: 1,
                ..Default::default()
            },
            price_hint_micros: None,
        }
    }

    #[test]
    fn an_artifact_by_url_leaves_the_bytes_to_the_node() {
        let digest = "cd".repeat(32);
        let spec = JobSpec::new(
            Workload::Module {
                uri: "chain://mod-hello".into(),
            },
            10_000,
            64,
        );
        let mut by_url = manifest(b"", digest.clone());
        by_url.artifact.data_b64 = None;
        by_url.artifact.url = Some("https://r.example/mod-hello.wasm".into());
        let out = materialize(&by_url, &spec).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            out.workload,
            Workload::Wasm {
                module_b64: String::new()
            }
        );
        assert_eq!(
            out.artifact_url.as_deref(),
            Some("https://r.example/mod-hello.wasm")
        );
        assert_eq!(out.artifact_sha256.as_deref(), Some(digest.as_str()));
        let refused = |m: &ModuleManifest| materialize(m, &spec).unwrap_err().message;
        let mut both = by_url.clone();
        both.artifact.data_b64 = Some("AA==".into());
        assert!(refused(&both).contains("both data_b64 and url"));
        let mut local = by_url.clone();
        local.artifact.url = Some("file:///etc/passwd".into());
        assert!(refused(&local).contains("must start with http:// or https://"));
        let mut docker = by_url;
        docker.backend = "docker".into();
        assert!(refused(&docker).contains("a docker artifact is an image, not a url"));
    }

    #[test]
    fn the_job_overrides_the_module_and_carries_its_digest() {
        let bytes = b"\0asm\x01\0\0\0";
        let digest = crate::sha256_hex(bytes);
        let mut spec = JobSpec::new(
            Workload::Module {
                uri: "chain://mod-hello".into(),
            },
            10_000,
            64,
        );
        spec.env.insert("A".into(), "job".into());
        let out = materialize(&manifest(bytes, digest.to_uppercase()), &spec)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(out.args, ["hello"]);
        assert_eq!(out.env["A"], "job");
        assert_eq!(out.env["B"], "module");
        assert_eq!(
            out.memory_mib, 256,
            "the module needs more than the job asked"
        );
        assert_eq!(out.artifact_sha256.as_deref(), Some(digest.as_str()));
        assert_eq!(out.module.as_deref(), Some("chain://mod-hello@1.0.0"));
        assert!(matches!(out.workload, Workload::Wasm { .. }));
    }

    #[test]
    fn an_artifact_that_does_not_match_its_digest_is_refused() {
        let wrong = "0".repeat(64);
        let spec = JobSpec::new(
            Workload::Module {
                uri: "chain://mod-hello".into(),
            },
            10_000,
            64,
        );
        let err = materialize(&manifest(b"\0asm", wrong), &spec)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(err.contains("does not match its digest"), "{err}");
        let short = materialize(&manifest(b"\0asm", "abc".into()), &spec)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(short.contains("64 hex digits"), "{short}");
    }
}
