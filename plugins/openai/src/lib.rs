//! The `openai` backend: serves the node's models through a local OpenAI-compatible server —
//! llama.cpp's `llama-server`, vLLM, LM Studio, or anything that speaks `/v1/models`,
//! `/v1/chat/completions` (SSE) and `/v1/embeddings`.
//!
//! Config (`[agent.plugins.openai]`):
//!
//! ```toml
//! base_url = "http://127.0.0.1:8081"      # the server (loopback or the node's own network)
//! api_key = "…"                           # optional, sent as a bearer token
//! timeout_ms = 120000                     # longest one request may take
//! check_ms = 2000                         # how often the server's /v1/models is checked
//! [[agent.plugins.openai.models]]
//! name = "smollm2-135m"                   # the network's name
//! upstream = "smollm2"                    # the server's name (default: name)
//! service = "chat"                        # chat | embeddings
//! context_length = 2048
//! # base_url = "http://127.0.0.1:8082"    # this model's own server (llama.cpp serves
//!                                         # embeddings from a second one, in embedding mode)
//! ```
//!
//! The node offers the configured models while the server answers `/v1/models` (a server that
//! lists models must list each configured `upstream`; llama.cpp's answers any name, which is
//! why the models are configured, not taken from the server). A request for another model or
//! service is refused. Chat streams: each SSE delta becomes a [`Chunk`] for the host as it
//! comes; the server's `usage` (asked for with `stream_options.include_usage`) is the backend's
//! count. The server failing (refused connection, 5xx, a broken stream) is `BackendFailed` —
//! the job goes to another node — and a request it refuses (4xx) is `Rejected`, saying why.

use rhizos_plugin_api::ai::{AiRequest, Chunk, Service, send_chunk};
use rhizos_plugin_api::sdk::{PluginBackend, ThreadExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, ModelInfo};
use serde::Deserialize;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_check_ms")]
    pub check_ms: u64,
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default = "default_service")]
    pub service: String,
    #[serde(default)]
    pub context_length: u32,
    /// This model's own server (default: the plugin's `base_url`).
    #[serde(default)]
    pub base_url: Option<String>,
}

fn default_timeout_ms() -> u64 {
    120_000
}
fn default_check_ms() -> u64 {
    2_000
}
fn default_service() -> String {
    "chat".into()
}

const NOT_CONFIGURED: &str = "no model server configured: set [agent.plugins.openai] base_url and models (see the plugin's docs)";

/// Largest response body read whole (an embeddings reply, an error).
const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Longest SSE line accepted from the server.
const MAX_LINE_BYTES: u64 = 1024 * 1024;

struct Model {
    config: ModelConfig,
    service: Service,
    /// Its server (the model's `base_url` or the plugin's), without a trailing `/`.
    base_url: String,
}

pub struct OpenAiBackend {
    /// `None` when the node's config names no model server.
    inner: Option<Arc<Shared>>,
}

struct Shared {
    api_key: Option<String>,
    timeout: Duration,
    check_every: Duration,
    models: Vec<Model>,
    agent: ureq::Agent,
    /// What is wrong with each server (by base URL) as last checked; `None`: it answers
    /// `/v1/models` and lists what it must.
    health: Mutex<std::collections::BTreeMap<String, Option<String>>>,
}

impl OpenAiBackend {
    pub fn new(config: &str) -> Result<Self, String> {
        // No config at all: the plugin loads and says what it needs (a node without a model
        // server offers nothing through it).
        if serde_json::from_str::<serde_json::Value>(config)
            .is_ok_and(|v| v.as_object().is_some_and(serde_json::Map::is_empty))
        {
            return Ok(Self { inner: None });
        }
        let config: Config = serde_json::from_str(config).map_err(|e| {
            format!("openai backend: bad config ({e}); it needs base_url and models")
        })?;
        let check_url = |url: &str| -> Result<String, String> {
            let url = url.trim_end_matches('/').to_owned();
            if url.starts_with("http://") || url.starts_with("https://") {
                Ok(url)
            } else {
                Err(format!(
                    "openai backend: base_url {url:?} must be an http:// or https:// URL"
                ))
            }
        };
        let base_url = check_url(&config.base_url)?;
        let mut models = Vec::new();
        for model in config.models {
            if !rhizos_plugin_api::ai::is_model_name(&model.name) {
                return Err(format!(
                    "openai backend: model name {:?} is not 1-64 of [a-z0-9._:-]",
                    model.name
                ));
            }
            let service = match Service::parse(&model.service) {
                Some(s @ (Service::Chat | Service::Embeddings)) => s,
                _ => {
                    return Err(format!(
                        "openai backend: model {} has service {:?}; this backend serves chat and embeddings",
                        model.name, model.service
                    ));
                }
            };
            let base_url = match &model.base_url {
                Some(url) => check_url(url)?,
                None => base_url.clone(),
            };
            models.push(Model {
                config: model,
                service,
                base_url,
            });
        }
        if models.is_empty() {
            return Err("openai backend: no models configured (models = [{name, service}])".into());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let inner = Arc::new(Shared {
            api_key: config.api_key,
            timeout: Duration::from_millis(config.timeout_ms),
            check_every: Duration::from_millis(config.check_ms.max(100)),
            models,
            agent,
            health: Mutex::new(std::collections::BTreeMap::new()),
        });
        // The server is checked now (so the node registers with what answers) and then every
        // check_ms on a thread of its own, which ends with the backend.
        inner.check();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("openai-health".into())
            .spawn(move || {
                while let Some(shared) = weak.upgrade() {
                    let every = shared.check_every;
                    drop(shared);
                    std::thread::sleep(every);
                    match weak.upgrade() {
                        Some(shared) => shared.check(),
                        None => break,
                    }
                }
            })
            .map_err(|e| format!("openai backend: cannot start its health thread: {e}"))?;
        Ok(Self { inner: Some(inner) })
    }
}

impl Shared {
    fn post(
        &self,
        model: &Model,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<ureq::http::Response<ureq::Body>, String> {
        let mut request = self
            .agent
            .post(format!("{}{path}", model.base_url))
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        request
            .send(body.to_string())
            .map_err(|e| format!("the model server at {} did not answer: {e}", model.base_url))
    }

    /// What is wrong with `model`'s server, as the health thread last saw it (`None`: it
    /// answers and lists what it must). Never blocks on the network.
    fn problem(&self, model: &Model) -> Option<String> {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&model.base_url)
            .cloned()
            .unwrap_or_else(|| Some("not checked yet".into()))
    }

    /// Probes every server now and records what it found.
    fn check(&self) {
        let mut servers: Vec<&str> = self.models.iter().map(|m| m.base_url.as_str()).collect();
        servers.sort_unstable();
        servers.dedup();
        for base_url in servers {
            let problem = self.probe(base_url);
            self.health
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(base_url.to_owned(), problem);
        }
    }

    fn probe(&self, base_url: &str) -> Option<String> {
        let mut request = self
            .agent
            .get(format!("{base_url}/v1/models"))
            .config()
            .timeout_global(Some(Duration::from_millis(1_500)))
            .build();
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = match request.call() {
            Ok(response) => response,
            Err(e) => {
                return Some(format!(
                    "the model server at {base_url} does not answer: {e}"
                ));
            }
        };
        if response.status().as_u16() != 200 {
            return Some(format!(
                "the model server's /v1/models answered HTTP {}",
                response.status().as_u16()
            ));
        }
        let body = match response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
        {
            Ok(body) => body,
            Err(e) => return Some(format!("the model server's /v1/models: {e}")),
        };
        #[derive(Deserialize)]
        struct Listed {
            data: Vec<Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            id: String,
        }
        let listed: Listed = match serde_json::from_str(&body) {
            Ok(listed) => listed,
            Err(e) => {
                return Some(format!(
                    "the model server's /v1/models is not a model list: {e}"
                ));
            }
        };
        // llama.cpp lists the file (or alias) it serves and answers any name: only a server
        // that lists several models is held to listing each configured one.
        if listed.data.len() > 1 {
            for model in self.models.iter().filter(|m| m.base_url == base_url) {
                let upstream = model
                    .config
                    .upstream
                    .as_deref()
                    .unwrap_or(&model.config.name);
                if !listed.data.iter().any(|e| e.id == upstream) {
                    return Some(format!("the model server does not list {upstream}"));
                }
            }
        }
        None
    }

    fn model(&self, request: &AiRequest) -> Result<&Model, String> {
        self.models
            .iter()
            .find(|m| m.config.name == request.model && m.service == request.service)
            .ok_or_else(|| {
                format!(
                    "this node's openai backend does not serve {} for {}",
                    request.model,
                    request.service.as_str()
                )
            })
    }
}

impl PluginBackend for OpenAiBackend {
    type Execution = ThreadExecution;

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<ThreadExecution, String> {
        let inner = self.inner.as_ref().ok_or(NOT_CONFIGURED)?.clone();
        let ai: AiRequest = serde_json::from_slice(&request.workload)
            .map_err(|e| format!("not an AI request: {e}"))?;
        inner.model(&ai)?;
        let deadline = Duration::from_millis(request.limits.wall_timeout_ms).min(inner.timeout);
        ThreadExecution::spawn(
            format!("openai-{}", request.execution_id),
            move |cancelled| {
                let started = Instant::now();
                let outcome = match ai.service {
                    Service::Embeddings => embed(&inner, &ai, &sink),
                    _ => chat(&inner, &ai, &sink, cancelled, started, deadline),
                };
                outcome.into_outcome(started)
            },
        )
    }

    fn unavailable(&self) -> Option<String> {
        match &self.inner {
            None => Some(NOT_CONFIGURED.into()),
            Some(_) => None,
        }
    }

    fn models(&self) -> Vec<ModelInfo> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner
            .models
            .iter()
            .filter(|m| inner.problem(m).is_none())
            .map(|m| ModelInfo {
                service: m.service.as_str().into(),
                name: m.config.name.as_str().into(),
                context_length: m.config.context_length,
                // A server that answers has its model loaded (llama.cpp loads it at start).
                warm: true,
            })
            .collect()
    }
}

/// How one request ended, before it becomes the host's outcome.
enum Ended {
    Served {
        input: u64,
        output: u64,
    },
    /// The server refused the request (its own fault): the message says why.
    Refused(String),
    /// The server failed before any text went out: another node should serve it.
    Failed(String),
    /// The server failed after part of the answer went out: the node is paid for that part
    /// (the gateway witnessed it) and nobody else can serve this request again.
    Broke {
        message: String,
        input: u64,
        output: u64,
    },
    Cancelled {
        input: u64,
        output: u64,
    },
    TimedOut {
        input: u64,
        output: u64,
    },
}

impl Ended {
    fn into_outcome(self, started: Instant) -> ExecOutcome {
        let elapsed = started.elapsed().as_millis() as u64;
        match self {
            Self::Served { input, output } => {
                ExecOutcome::exited(0, elapsed).with_usage(input, output)
            }
            Self::Refused(message) => ExecOutcome::abnormal(ExitKind::Rejected, message, elapsed),
            Self::Failed(message) => {
                ExecOutcome::abnormal(ExitKind::BackendFailed, message, elapsed)
            }
            Self::Broke {
                message,
                input,
                output,
            } => ExecOutcome::abnormal(ExitKind::BackendFailed, message, elapsed)
                .with_usage(input, output),
            Self::Cancelled { input, output } => {
                ExecOutcome::abnormal(ExitKind::Cancelled, "cancelled", elapsed)
                    .with_usage(input, output)
            }
            Self::TimedOut { input, output } => ExecOutcome::abnormal(
                ExitKind::TimedOut,
                format!("the model server took longer than {elapsed} ms"),
                elapsed,
            )
            .with_usage(input, output),
        }
    }
}

/// A refused request's message, from the server's error body.
fn refusal(status: u16, response: ureq::http::Response<ureq::Body>) -> Ended {
    let body = response
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    if status >= 500 || status == 429 {
        Ended::Failed(format!(
            "the model server failed (HTTP {status}): {message}"
        ))
    } else {
        Ended::Refused(format!(
            "the model server refused the request (HTTP {status}): {message}"
        ))
    }
}

/// The server's body for a chat request: the validated fields, passed through as OpenAI names
/// them, streamed with usage.
pub fn chat_body(upstream: &str, request: &AiRequest) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": upstream,
        "messages": request.messages.iter().map(|m| serde_json::json!({
            "role": if m.role == "developer" { "system" } else { m.role.as_str() },
            "content": m.content,
        })).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let Some(object) = body.as_object_mut() else {
        return body;
    };
    if let Some(n) = request.max_tokens {
        object.insert("max_tokens".into(), n.into());
    }
    if let Some(t) = request.temperature {
        object.insert("temperature".into(), t.into());
    }
    if let Some(p) = request.top_p {
        object.insert("top_p".into(), p.into());
    }
    if !request.stop.is_empty() {
        object.insert("stop".into(), request.stop.clone().into());
    }
    if let Some(seed) = request.seed {
        object.insert("seed".into(), seed.into());
    }
    if request.json {
        object.insert(
            "response_format".into(),
            serde_json::json!({"type": "json_object"}),
        );
    }
    body
}

fn chat(
    inner: &Shared,
    request: &AiRequest,
    sink: &EventSinkBox,
    cancelled: &AtomicBool,
    started: Instant,
    deadline: Duration,
) -> Ended {
    let model = match inner.model(request) {
        Ok(model) => model,
        Err(message) => return Ended::Refused(message),
    };
    let upstream = model
        .config
        .upstream
        .as_deref()
        .unwrap_or(&model.config.name);
    let response = match inner.post(model, "/v1/chat/completions", &chat_body(upstream, request)) {
        Ok(response) => response,
        Err(message) => return Ended::Failed(message),
    };
    let status = response.status().as_u16();
    if status != 200 {
        return refusal(status, response);
    }
    let reader = response.into_body().into_reader();
    let mut lines = BufReader::new(reader.take(MAX_BODY_BYTES * 8));
    let (input, output) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut generated = 0u64;
    let mut finished = false;
    let mut line = String::new();
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Ended::Cancelled {
                input: input.into_inner(),
                output: output.into_inner().max(generated),
            };
        }
        if started.elapsed() > deadline {
            return Ended::TimedOut {
                input: input.into_inner(),
                output: output.into_inner().max(generated),
            };
        }
        line.clear();
        match (&mut lines).take(MAX_LINE_BYTES).read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                return broke(
                    format!("the model server's stream broke: {e}"),
                    input.into_inner(),
                    generated,
                );
            }
        }
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            break;
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        if let Some(message) = event["error"]["message"].as_str() {
            return broke(
                format!("the model server failed mid-stream: {message}"),
                input.into_inner(),
                generated,
            );
        }
        if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
            input.store(
                usage["prompt_tokens"].as_u64().unwrap_or(0),
                Ordering::Relaxed,
            );
            output.store(
                usage["completion_tokens"].as_u64().unwrap_or(0),
                Ordering::Relaxed,
            );
        }
        if let Some(choice) = event["choices"].get(0) {
            let content = choice["delta"]["content"].as_str().unwrap_or_default();
            let finish_reason = choice["finish_reason"].as_str().map(str::to_owned);
            if !content.is_empty() || finish_reason.is_some() {
                if !content.is_empty() {
                    generated += 1;
                }
                finished |= finish_reason.is_some();
                send_chunk(
                    sink,
                    &Chunk {
                        content: content.to_owned(),
                        finish_reason,
                        ..Chunk::default()
                    },
                );
            }
        }
    }
    if !finished && generated > 0 && output.load(Ordering::Relaxed) == 0 {
        // Text without a finish reason, usage or [DONE]: the connection closed mid-answer.
        return broke(
            "the model server closed its stream mid-answer".into(),
            input.into_inner(),
            generated,
        );
    }
    if !finished {
        send_chunk(
            sink,
            &Chunk {
                finish_reason: Some("stop".into()),
                ..Chunk::default()
            },
        );
    }
    Ended::Served {
        input: input.into_inner(),
        output: match output.into_inner() {
            0 => generated,
            counted => counted,
        },
    }
}

/// How a stream that failed ends: before any text, for another node to serve; after it, paid
/// for the `generated` chunks that went out.
fn broke(message: String, input: u64, generated: u64) -> Ended {
    if generated == 0 {
        Ended::Failed(message)
    } else {
        Ended::Broke {
            message,
            input,
            output: generated,
        }
    }
}

fn embed(inner: &Shared, request: &AiRequest, sink: &EventSinkBox) -> Ended {
    let model = match inner.model(request) {
        Ok(model) => model,
        Err(message) => return Ended::Refused(message),
    };
    let upstream = model
        .config
        .upstream
        .as_deref()
        .unwrap_or(&model.config.name);
    let mut body =
        serde_json::json!({"model": upstream, "input": request.input, "encoding_format": "float"});
    if let Some(d) = request.dimensions {
        body["dimensions"] = d.into();
    }
    let response = match inner.post(model, "/v1/embeddings", &body) {
        Ok(response) => response,
        Err(message) => return Ended::Failed(message),
    };
    let status = response.status().as_u16();
    if status != 200 {
        return refusal(status, response);
    }
    let text = match response
        .into_body()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_string()
    {
        Ok(text) => text,
        Err(e) => return Ended::Failed(format!("reading the embeddings failed: {e}")),
    };
    #[derive(Deserialize)]
    struct Reply {
        data: Vec<Item>,
        #[serde(default)]
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Item {
        index: usize,
        embedding: Vec<f32>,
    }
    #[derive(Deserialize)]
    struct Usage {
        prompt_tokens: u64,
    }
    let mut reply: Reply = match serde_json::from_str(&text) {
        Ok(reply) => reply,
        Err(e) => {
            return Ended::Failed(format!("the model server's embeddings are malformed: {e}"));
        }
    };
    if reply.data.len() != request.input.len() {
        return Ended::Failed(format!(
            "the model server returned {} embeddings for {} inputs",
            reply.data.len(),
            request.input.len()
        ));
    }
    reply.data.sort_by_key(|item| item.index);
    let mut embeddings: Vec<Vec<f32>> = reply.data.into_iter().map(|item| item.embedding).collect();
    if let Some(d) = request.dimensions.map(|d| d as usize) {
        // A server that ignores `dimensions`: cut and renormalise (Matryoshka-style), as
        // OpenAI's own models do.
        for vector in &mut embeddings {
            if vector.len() > d {
                vector.truncate(d);
                let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    vector.iter_mut().for_each(|x| *x /= norm);
                }
            }
        }
    }
    send_chunk(
        sink,
        &Chunk {
            embeddings,
            ..Chunk::default()
        },
    );
    Ended::Served {
        input: reply.usage.map_or(0, |u| u.prompt_tokens),
        output: 0,
    }
}

rhizos_plugin_api::export_backend_plugin! {
    name: "openai",
    backends: ["openai"],
    new: OpenAiBackend::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked() {
        for (bad, says) in [
            (r#"{"models": []}"#, "base_url"),
            (
                r#"{"base_url": "ftp://x", "models": [{"name": "m"}]}"#,
                "http://",
            ),
            (r#"{"base_url": "http://x", "models": []}"#, "no models"),
            (
                r#"{"base_url": "http://x", "models": [{"name": "Big"}]}"#,
                "model name",
            ),
            (
                r#"{"base_url": "http://x", "models": [{"name": "m", "service": "speech"}]}"#,
                "chat and embeddings",
            ),
        ] {
            let err = OpenAiBackend::new(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(
            OpenAiBackend::new(r#"{"base_url": "http://127.0.0.1:1/", "models": [{"name": "m"}]}"#)
                .is_ok()
        );
    }

    #[test]
    fn chat_parameters_pass_through_under_openai_names() {
        let request = AiRequest {
            service: Service::Chat,
            model: "m".into(),
            messages: vec![rhizos_plugin_api::ai::Message {
                role: "developer".into(),
                content: "be brief".into(),
            }],
            input: vec![],
            max_tokens: Some(7),
            temperature: Some(0.5),
            top_p: Some(0.9),
            stop: vec!["\n".into()],
            seed: Some(42),
            json: true,
            dimensions: None,
            voice: None,
            speed: None,
            format: None,
        };
        let body = chat_body("up", &request);
        assert_eq!(body["model"], "up");
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["max_tokens"], 7);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["stop"][0], "\n");
        assert_eq!(body["seed"], 42);
        assert_eq!(body["response_format"]["type"], "json_object");
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn a_server_that_does_not_answer_offers_no_models() {
        let backend =
            OpenAiBackend::new(r#"{"base_url": "http://127.0.0.1:9", "models": [{"name": "m"}]}"#)
                .unwrap();
        assert!(backend.models().is_empty());
    }
}
