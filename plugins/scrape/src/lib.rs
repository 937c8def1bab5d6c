//! The `scrape` backend, the Cxmpute scrape service: URLs fetched and turned into markdown (or
//! plain text), one result per URL, billed per page fetched.
//!
//! Safe to run for strangers (SSRF): only `http` and `https`; every address a host name resolves
//! to — on the first request and on every redirect — must be public (loopback, private,
//! link-local, unique-local, carrier-grade NAT, multicast, unspecified and documentation
//! ranges are refused, IPv4-mapped IPv6 included) unless the operator allows private addresses;
//! at most `max_redirects` redirects, `max_bytes` per page, `timeout_ms` per page.
//!
//! Config (`[agent.plugins.scrape]`, all optional):
//!
//! ```toml
//! model = "scrape"            # the network's model name
//! max_urls = 16               # per request
//! max_bytes = 5242880         # per page
//! timeout_ms = 15000          # per page
//! max_redirects = 5
//! allow_private = false       # true: private and loopback addresses too (a lab network)
//! ```

use rhizos_plugin_api::ai::{AiRequest, Chunk, Service, send_chunk};
use rhizos_plugin_api::sdk::{PluginBackend, ThreadExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, ModelInfo};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use ureq::ResponseExt as _;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: String,
    pub max_urls: usize,
    pub max_bytes: u64,
    pub timeout_ms: u64,
    pub max_redirects: u32,
    pub allow_private: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model: "scrape".into(),
            max_urls: 16,
            max_bytes: 5 * 1024 * 1024,
            timeout_ms: 15_000,
            max_redirects: 5,
            allow_private: false,
        }
    }
}

/// Whether `ip` is an address anyone on the internet could reach (not this machine, its
/// networks, or a special range).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link local
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)) // NAT64 (reaches IPv4 anywhere)
}

/// ureq's resolver, refusing a host any of whose addresses is not public.
#[derive(Debug)]
struct PublicOnly {
    inner: DefaultResolver,
    allow_private: bool,
}

impl Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        if !self.allow_private
            && let Some(private) = addrs.iter().find(|a| !is_public(a.ip()))
        {
            return Err(ureq::Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} resolves to {}, a private or reserved address: refused",
                    uri.host().unwrap_or_default(),
                    private.ip()
                ),
            )));
        }
        Ok(addrs)
    }
}

/// One URL's result, as the gateway relays it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Page {
    pub url: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct ScrapeBackend {
    config: Arc<Config>,
    agent: ureq::Agent,
}

impl ScrapeBackend {
    pub fn new(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config)
            .map_err(|e| format!("scrape backend: bad config ({e})"))?;
        if !rhizos_plugin_api::ai::is_model_name(&config.model) {
            return Err(format!(
                "scrape backend: model name {:?} is not 1-64 of [a-z0-9._:-]",
                config.model
            ));
        }
        let agent_config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(config.max_redirects)
            .user_agent("RhizOS-scrape/0.1 (+https://example.invalid/rhizos)")
            .build();
        let agent = ureq::Agent::with_parts(
            agent_config,
            ureq::unversioned::transport::DefaultConnector::new(),
            PublicOnly {
                inner: DefaultResolver::default(),
                allow_private: config.allow_private,
            },
        );
        Ok(Self {
            config: Arc::new(config),
            agent,
        })
    }

    /// Fetches one URL and converts it (`text`: markdown without its markup).
    pub fn fetch(&self, url: &str, text: bool) -> Page {
        let fail = |error: String| Page {
            url: url.to_owned(),
            ok: false,
            status: None,
            final_url: None,
            title: None,
            content: String::new(),
            error: Some(error),
        };
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return fail("only http:// and https:// URLs are fetched".into());
        }
        let mut response = match self.agent.get(url).call() {
            Ok(response) => response,
            Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return fail(e.to_string());
            }
            Err(ureq::Error::TooManyRedirects) => {
                return fail(format!("more than {} redirects", self.config.max_redirects));
            }
            Err(ureq::Error::Timeout(_)) => {
                return fail(format!("no answer within {} ms", self.config.timeout_ms));
            }
            Err(e) => return fail(format!("fetching failed: {e}")),
        };
        let status = response.status().as_u16();
        let final_url = response.get_uri().to_string();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = match response
            .body_mut()
            .with_config()
            .limit(self.config.max_bytes)
            .read_to_string()
        {
            Ok(body) => body,
            Err(ureq::Error::BodyExceedsLimit(_)) => {
                return fail(format!(
                    "the page is larger than {} bytes",
                    self.config.max_bytes
                ));
            }
            Err(e) => return fail(format!("reading the page failed: {e}")),
        };
        if !(200..300).contains(&status) {
            return Page {
                status: Some(status),
                ..fail(format!("the server answered HTTP {status}"))
            };
        }
        let (title, content) = if kind.contains("html") || kind.is_empty() {
            let converter = htmd::HtmlToMarkdown::builder()
                .skip_tags(vec!["script", "style", "noscript", "head", "svg", "iframe"])
                .build();
            let markdown = converter.convert(&body).unwrap_or_default();
            (
                title_of(&body),
                if text {
                    strip_markdown(&markdown)
                } else {
                    markdown
                },
            )
        } else if kind.starts_with("text/") || kind.contains("json") || kind.contains("xml") {
            (None, body)
        } else {
            return Page {
                status: Some(status),
                ..fail(format!("not a page of text ({kind})"))
            };
        };
        Page {
            url: url.to_owned(),
            ok: true,
            status: Some(status),
            final_url: (final_url != url).then_some(final_url),
            title,
            content: content.trim().to_owned(),
            error: None,
        }
    }
}

/// The text of the document's `<title>`, if it has one.
fn title_of(html: &str) -> Option<String> {
    let lower = html.to_ascii_lowercase();
    let start = lower.find("<title")?;
    let open = start + lower[start..].find('>')? + 1;
    let close = open + lower[open..].find("</title")?;
    let title = html.get(open..close)?.trim();
    (!title.is_empty()).then(|| title.to_owned())
}

/// Markdown with its markup taken off (headings, emphasis, link targets): text to read.
fn strip_markdown(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len());
    for line in markdown.lines() {
        let line = line.trim_start_matches(['#', '>', ' ']);
        let line = line
            .strip_prefix("* ")
            .or_else(|| line.strip_prefix("- "))
            .unwrap_or(line);
        let mut text = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' | '_' | '`' => {}
                '[' => {}
                ']' if chars.peek() == Some(&'(') => {
                    // Drop the link target.
                    for c in chars.by_ref() {
                        if c == ')' {
                            break;
                        }
                    }
                }
                other => text.push(other),
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

impl PluginBackend for ScrapeBackend {
    type Execution = ThreadExecution;

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<ThreadExecution, String> {
        let ai: AiRequest = serde_json::from_slice(&request.workload)
            .map_err(|e| format!("not an AI request: {e}"))?;
        if ai.service != Service::Scrape || ai.model != self.config.model {
            return Err(format!(
                "this node's scrape backend serves {} only",
                self.config.model
            ));
        }
        if ai.input.is_empty() || ai.input.len() > self.config.max_urls {
            return Err(format!(
                "1 to {} URLs per request, got {}",
                self.config.max_urls,
                ai.input.len()
            ));
        }
        let this = Self {
            config: self.config.clone(),
            agent: self.agent.clone(),
        };
        let text = ai.format.as_deref() == Some("text");
        ThreadExecution::spawn(
            format!("scrape-{}", request.execution_id),
            move |cancelled| {
                let started = Instant::now();
                let mut fetched = 0u64;
                for url in &ai.input {
                    if cancelled.load(Ordering::Relaxed) {
                        return ExecOutcome::abnormal(
                            ExitKind::Cancelled,
                            "cancelled",
                            started.elapsed().as_millis() as u64,
                        )
                        .with_usage(ai.input.len() as u64, fetched);
                    }
                    let page = this.fetch(url, text);
                    fetched += u64::from(page.ok);
                    let chunk = Chunk {
                        content: serde_json::to_string(&page).unwrap_or_default(),
                        ..Chunk::default()
                    };
                    send_chunk(&sink, &chunk);
                }
                ExecOutcome::exited(0, started.elapsed().as_millis() as u64)
                    .with_usage(ai.input.len() as u64, fetched)
            },
        )
    }

    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            service: Service::Scrape.as_str().into(),
            name: self.config.model.as_str().into(),
            context_length: self.config.max_urls as u32,
            warm: true,
        }]
    }
}

rhizos_plugin_api::export_backend_plugin! {
    name: "scrape",
    backends: ["scrape"],
    new: ScrapeBackend::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "192.0.0.8",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn loopback_and_names_resolving_to_it_are_refused_unless_allowed() {
        let backend = ScrapeBackend::new("{}").unwrap();
        for url in [
            "http://127.0.0.1:9/",
            "http://localhost:9/x",
            "http://[::1]:9/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let page = backend.fetch(url, false);
            assert!(!page.ok, "{url}");
            assert!(
                page.error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("private or reserved"),
                "{url}: {page:?}"
            );
        }
        for url in ["file:///etc/passwd", "ftp://example.com/", "gopher://x/"] {
            let page = backend.fetch(url, false);
            assert!(page.error.unwrap().contains("only http"), "{url}");
        }
    }

    #[test]
    fn markdown_and_text_of_a_page() {
        assert_eq!(
            title_of("<html><head><title> Hi </title></head></html>").as_deref(),
            Some("Hi")
        );
        assert_eq!(title_of("<p>no title</p>"), None);
        assert_eq!(
            strip_markdown("# Head\n\nSome **bold** [link](http://x).").trim(),
            "Head\n\nSome bold link."
        );
    }
}
