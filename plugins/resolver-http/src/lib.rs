//! The `http` module resolver: fetches a module's manifest from a registry over HTTP(S).
//!
//! `GET <base_url>/modules/<id>` (the latest) or `GET <base_url>/modules/<id>?version=<v>`:
//! * `200` with a JSON body (at most `max_bytes`): the manifest; its `ETag` is remembered and
//!   sent back as `If-None-Match`, so an unchanged manifest comes back as `304` without a body;
//! * `404`: this registry does not know the module (the next resolver in the chain is asked);
//! * `5xx`, a refused or reset connection, a timeout: retried `retries` times with exponential
//!   backoff from `backoff_ms`, then an error naming the URL and what happened;
//! * anything else, a body that is not JSON or is too large: an error.
//!
//! `list` (for `rhizos module list`): `GET <base_url>/modules`, a JSON array of manifests or
//! `{"modules": [...]}`; a `404` means the registry cannot be enumerated.
//!
//! TLS through rustls (`https://` base URLs), trusting the Mozilla root certificates (webpki-roots)
//! or, with `ca_file`, only the CA(s) in that PEM file (a private registry). A manifest decides
//! what runs (its artifact and digest), so plain `http://` is refused unless the registry is on
//! this machine (a loopback host) or the operator sets `allow_http`. Redirects are not followed:
//! a `3xx` is an error naming where it pointed (set `base_url` to that, if it is right).
//!
//! Config (`[agent.plugins.http]` on a node, `[orchestrator.resolvers.http]` on the
//! orchestrator): `{"base_url": "https://registry.example/api", "timeout_ms": 5000,
//! "retries": 2, "backoff_ms": 200, "max_bytes": 4194304, "ca_file": "/etc/rhizos/registry-ca.pem",
//! "allow_http": false}`.
#![allow(unsafe_code)] // `export_root_module` expands to an exported `extern "C"` symbol.

use rhizos_plugin_api::sdk::PluginResolver;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The registry's base URL (`http://` or `https://`), without a trailing `/modules`.
    pub base_url: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// PEM file of the CA certificate(s) to trust instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Accept an `http://` base URL on a host other than loopback (anyone on the path can then
    /// change what modules resolve to).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_timeout_ms() -> u64 {
    5_000
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    200
}
fn default_max_bytes() -> u64 {
    4 << 20
}

pub struct HttpResolver {
    config: Config,
    agent: ureq::Agent,
    /// URL → (ETag, body) of the last 200.
    cache: Mutex<HashMap<String, (String, String)>>,
}

impl HttpResolver {
    pub fn new(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| {
            format!("invalid http resolver settings (it needs at least base_url): {e}")
        })?;
        let base = config.base_url.trim_end_matches('/').to_owned();
        check_base_url(&base, config.allow_http)?;
        let mut builder = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(0);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("http resolver: cannot read ca_file {path}: {e}"))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| format!("http resolver: ca_file {path}: {e}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "http resolver: ca_file {path} holds no certificate"
                ));
            }
            builder = builder.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        let agent: ureq::Agent = builder.build().into();
        Ok(Self {
            config: Config {
                base_url: base,
                ..config
            },
            agent,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, id: &str, version: Option<&str>) -> String {
        let escape = |s: &str| -> String {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        match version {
            Some(v) => format!(
                "{}/modules/{}?version={}",
                self.config.base_url,
                escape(id),
                escape(v)
            ),
            None => format!("{}/modules/{}", self.config.base_url, escape(id)),
        }
    }

    /// One GET; `Err((retryable, message))` on failure.
    fn fetch(&self, url: &str) -> Result<Option<String>, (bool, String)> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(url)
            .cloned();
        let mut request = self.agent.get(url).header("Accept", "application/json");
        if let Some((etag, _)) = &cached {
            request = request.header("If-None-Match", etag);
        }
        let mut response = request.call().map_err(|e| match e {
            ureq::Error::Timeout(_) => (
                true,
                format!("no answer within {} ms", self.config.timeout_ms),
            ),
            ureq::Error::HostNotFound => (true, "host not found".to_owned()),
            ureq::Error::ConnectionFailed => (true, "connection failed".to_owned()),
            ureq::Error::Io(e) => (true, format!("unreachable: {e}")),
            other => (false, other.to_string()),
        })?;
        let status = response.status().as_u16();
        match status {
            200 => {
                let etag = response
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = response
                    .body_mut()
                    .with_config()
                    .limit(self.config.max_bytes)
                    .read_to_string()
                    .map_err(|e| match e {
                        ureq::Error::BodyExceedsLimit(_) => (
                            false,
                            format!(
                                "response larger than the {} bytes allowed",
                                self.config.max_bytes
                            ),
                        ),
                        ureq::Error::Timeout(_) => (
                            true,
                            format!("no answer within {} ms", self.config.timeout_ms),
                        ),
                        other => (true, format!("reading the response failed: {other}")),
                    })?;
                if let Err(e) = serde_json::from_str::<serde_json::Value>(&body) {
                    return Err((false, format!("malformed response (not JSON): {e}")));
                }
                if let Some(etag) = etag {
                    self.cache
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(url.to_owned(), (etag, body.clone()));
                }
                Ok(Some(body))
            }
            304 => match cached {
                Some((_, body)) => Ok(Some(body)),
                None => Err((
                    false,
                    "304 Not Modified for a request without an ETag".into(),
                )),
            },
            404 => Ok(None),
            300..=399 => {
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("nowhere");
                Err((
                    false,
                    format!(
                        "HTTP {status} to {location}: redirects are not followed (set base_url to where the registry is)"
                    ),
                ))
            }
            500..=599 | 429 => Err((true, format!("HTTP {status}"))),
            other => Err((false, format!("HTTP {other}"))),
        }
    }
}

impl PluginResolver for HttpResolver {
    fn resolve(&self, id: &str, version: Option<&str>) -> Result<Option<String>, String> {
        self.get_with_retries(&self.url(id, version))
    }

    fn list(&self) -> Result<Option<Vec<String>>, String> {
        let url = format!("{}/modules", self.config.base_url);
        let Some(body) = self.get_with_retries(&url)? else {
            return Ok(None);
        };
        let value: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {url}: {e}"))?;
        let entries = match &value {
            serde_json::Value::Array(entries) => entries,
            other => other
                .get("modules")
                .and_then(serde_json::Value::as_array)
                .ok_or_else(|| {
                    format!("GET {url}: expected a list of manifests or {{\"modules\": [...]}}")
                })?,
        };
        Ok(Some(entries.iter().map(|e| e.to_string()).collect()))
    }
}

impl HttpResolver {
    /// GET with the retry policy; `None` on 404.
    fn get_with_retries(&self, url: &str) -> Result<Option<String>, String> {
        let url = url.to_owned();
        let mut backoff = Duration::from_millis(self.config.backoff_ms);
        let mut attempt = 0;
        loop {
            match self.fetch(&url) {
                Ok(found) => return Ok(found),
                Err((true, _)) if attempt < self.config.retries => {
                    attempt += 1;
                    std::thread::sleep(backoff);
                    backoff = backoff.saturating_mul(2);
                }
                Err((_, message)) => {
                    return Err(format!(
                        "GET {url}: {message}{}",
                        if attempt > 0 {
                            format!(" (after {} retries)", attempt)
                        } else {
                            String::new()
                        }
                    ));
                }
            }
        }
    }
}

/// `http://` only to this machine unless `allow_http`; `https://` anywhere; nothing else.
fn check_base_url(base: &str, allow_http: bool) -> Result<(), String> {
    let parsed =
        url::Url::parse(base).map_err(|e| format!("http resolver: base_url {base:?}: {e}"))?;
    if parsed.cannot_be_a_base() || parsed.host().is_none() {
        return Err(format!("http resolver: base_url {base:?} has no host"));
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "http resolver: base_url {base:?} is plain http to another machine: use https:// \
                     (or set allow_http = true if the network path is trusted)"
                ))
            }
        }
        other => Err(format!(
            "http resolver: base_url {base:?} must be https:// (or http:// to this machine), not {other}://"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base_url: &str, allow_http: bool) -> String {
        serde_json::json!({"base_url": base_url, "allow_http": allow_http}).to_string()
    }

    #[test]
    fn plain_http_only_to_this_machine_unless_allowed() {
        for ok in [
            "https://registry.example/api",
            "http://127.0.0.1:8080",
            "http://127.8.0.1",
            "http://localhost:9000/r",
            "http://[::1]:80",
        ] {
            assert!(HttpResolver::new(&config(ok, false)).is_ok(), "{ok}");
        }
        for refused in [
            "http://registry.example",
            "http://10.0.0.1",
            "http://127.0.0.1.evil.net",
            "http://localhost.evil.net",
            "ftp://registry.example",
            "file:///etc/passwd",
            "https://",
            "registry.example",
        ] {
            let err = HttpResolver::new(&config(refused, false))
                .err()
                .unwrap_or_else(|| panic!("{refused} accepted"));
            assert!(err.contains("base_url"), "{refused}: {err}");
        }
        assert!(HttpResolver::new(&config("http://registry.example", true)).is_ok());
    }
}

fn new_resolver(config: &str) -> Result<HttpResolver, String> {
    HttpResolver::new(config)
}

rhizos_plugin_api::export_resolver_plugin! {
    name: "http",
    new: new_resolver,
}
