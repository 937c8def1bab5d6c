//! The `ollama` backend: serves the node's models through Ollama's native API —
//! `/api/tags` (present), `/api/ps` (loaded: warm), `/api/pull` (NDJSON progress, for the
//! configured models not present yet), `/api/chat` (NDJSON chunks, the last with `done`,
//! `prompt_eval_count` and `eval_count`) and `/api/embed`.
//!
//! Config (`[agent.plugins.ollama]`):
//!
//! ```toml
//! base_url = "http://127.0.0.1:11434"   # default
//! pull = true                           # pull configured models that are not present
//! check_ms = 2000
//! timeout_ms = 120000
//! [[agent.plugins.ollama.models]]
//! name = "llama3.2:1b"                  # Ollama's name, also the network's
//! service = "chat"                      # chat | embeddings
//! context_length = 4096
//! ```
//!
//! A model is offered once Ollama lists it (after its pull); it is warm while `/api/ps` lists
//! it. OpenAI's parameters go where Ollama wants them: `options.temperature`, `top_p`, `seed`,
//! `stop`, `num_predict` (= `max_tokens`), and `format: "json"`. A refused connection, a 5xx or
//! a stream broken before any text is `BackendFailed` (the job goes elsewhere); a 4xx is
//! `Rejected`, saying why.

use rhizos_plugin_api::ai::{AiRequest, Chunk, Service, send_chunk};
use rhizos_plugin_api::sdk::{PluginBackend, ThreadExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, ModelInfo};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_true")]
    pub pull: bool,
    #[serde(default = "default_check_ms")]
    pub check_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    #[serde(default = "default_service")]
    pub service: String,
    #[serde(default)]
    pub context_length: u32,
}

fn default_base_url() -> String {
    "http://127.0.0.1:11434".into()
}
fn default_true() -> bool {
    true
}
fn default_check_ms() -> u64 {
    2_000
}
fn default_timeout_ms() -> u64 {
    120_000
}
fn default_service() -> String {
    "chat".into()
}

const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
const MAX_LINE_BYTES: u64 = 1024 * 1024;

pub struct OllamaBackend {
    inner: Option<Arc<Shared>>,
}

struct Shared {
    base_url: String,
    timeout: Duration,
    check_every: Duration,
    pull: bool,
    models: Vec<(ModelConfig, Service)>,
    agent: ureq::Agent,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Names Ollama lists (`/api/tags`) and has loaded (`/api/ps`), as last checked.
    present: BTreeSet<String>,
    loaded: BTreeSet<String>,
    problem: Option<String>,
    /// Pulls already tried (each configured model is pulled once per start).
    pulled: BTreeSet<String>,
}

impl OllamaBackend {
    pub fn new(config: &str) -> Result<Self, String> {
        if serde_json::from_str::<serde_json::Value>(config)
            .is_ok_and(|v| v.as_object().is_some_and(serde_json::Map::is_empty))
        {
            return Ok(Self { inner: None });
        }
        let config: Config = serde_json::from_str(config)
            .map_err(|e| format!("ollama backend: bad config ({e})"))?;
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(format!(
                "ollama backend: base_url {base_url:?} must be an http:// or https:// URL"
            ));
        }
        let mut models = Vec::new();
        for model in config.models {
            if !rhizos_plugin_api::ai::is_model_name(&model.name) {
                return Err(format!(
                    "ollama backend: model name {:?} is not 1-64 of [a-z0-9._:-]",
                    model.name
                ));
            }
            let service = match Service::parse(&model.service) {
                Some(s @ (Service::Chat | Service::Embeddings)) => s,
                _ => {
                    return Err(format!(
                        "ollama backend: model {} has service {:?}; chat or embeddings",
                        model.name, model.service
                    ));
                }
            };
            models.push((model, service));
        }
        if models.is_empty() {
            return Err("ollama backend: no models configured (models = [{name, service}])".into());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let inner = Arc::new(Shared {
            base_url,
            timeout: Duration::from_millis(config.timeout_ms),
            check_every: Duration::from_millis(config.check_ms.max(100)),
            pull: config.pull,
            models,
            agent,
            state: Mutex::new(State::default()),
        });
        inner.check();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("ollama-health".into())
            .spawn(move || {
                loop {
                    let Some(shared) = weak.upgrade() else { break };
                    shared.pull_missing();
                    let every = shared.check_every;
                    drop(shared);
                    std::thread::sleep(every);
                    match weak.upgrade() {
                        Some(shared) => shared.check(),
                        None => break,
                    }
                }
            })
            .map_err(|e| format!("ollama backend: cannot start its health thread: {e}"))?;
        Ok(Self { inner: Some(inner) })
    }
}

#[derive(Deserialize)]
struct Listed {
    models: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get_names(&self, path: &str) -> Result<BTreeSet<String>, String> {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base_url))
            .config()
            .timeout_global(Some(Duration::from_millis(1_500)))
            .build()
            .call()
            .map_err(|e| format!("Ollama at {} does not answer: {e}", self.base_url))?;
        if response.status().as_u16() != 200 {
            return Err(format!(
                "Ollama's {path} answered HTTP {}",
                response.status().as_u16()
            ));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|e| format!("Ollama's {path}: {e}"))?;
        let listed: Listed = serde_json::from_str(&body)
            .map_err(|e| format!("Ollama's {path} is not a model list: {e}"))?;
        Ok(listed.models.into_iter().map(|e| e.name).collect())
    }

    /// Asks `/api/tags` and `/api/ps` now and records what they said.
    fn check(&self) {
        let (present, loaded) = (self.get_names("/api/tags"), self.get_names("/api/ps"));
        let mut state = self.state();
        match (present, loaded) {
            (Ok(present), Ok(loaded)) => {
                state.present = present;
                state.loaded = loaded;
                state.problem = None;
            }
            (Err(e), _) | (_, Err(e)) => {
                state.present.clear();
                state.loaded.clear();
                state.problem = Some(e);
            }
        }
    }

    /// Pulls each configured model Ollama does not have (once per start), logging progress.
    fn pull_missing(&self) {
        if !self.pull {
            return;
        }
        let missing: Vec<String> = {
            let state = self.state();
            if state.problem.is_some() {
                return;
            }
            self.models
                .iter()
                .map(|(m, _)| m.name.clone())
                .filter(|n| !state.present.contains(n) && !state.pulled.contains(n))
                .collect()
        };
        for name in missing {
            self.state().pulled.insert(name.clone());
            eprintln!("rhizos ollama: pulling {name}");
            let response = self
                .agent
                .post(format!("{}/api/pull", self.base_url))
                .config()
                .timeout_global(None)
                .build()
                .header("Content-Type", "application/json")
                .send(serde_json::json!({"model": name, "stream": true}).to_string());
            let Ok(response) = response else {
                eprintln!("rhizos ollama: pulling {name} failed: no answer");
                continue;
            };
            let mut last = String::new();
            for line in
                BufReader::new(response.into_body().into_reader().take(MAX_BODY_BYTES)).lines()
            {
                let Ok(line) = line else { break };
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if let Some(error) = event["error"].as_str() {
                    eprintln!("rhizos ollama: pulling {name} failed: {error}");
                    break;
                }
                let status = event["status"].as_str().unwrap_or_default().to_owned();
                match (event["completed"].as_u64(), event["total"].as_u64()) {
                    (Some(done), Some(total)) if total > 0 => {
                        eprintln!("rhizos ollama: {name}: {status} {}%", done * 100 / total);
                    }
                    _ if status != last => eprintln!("rhizos ollama: {name}: {status}"),
                    _ => {}
                }
                last = status;
            }
        }
        self.check();
    }

    fn model(&self, request: &AiRequest) -> Result<&ModelConfig, String> {
        self.models
            .iter()
            .find(|(m, s)| m.name == request.model && *s == request.service)
            .map(|(m, _)| m)
            .ok_or_else(|| {
                format!(
                    "this node's ollama backend does not serve {} for {}",
                    request.model,
                    request.service.as_str()
                )
            })
    }

    fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<ureq::http::Response<ureq::Body>, String> {
        self.agent
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("Ollama at {} did not answer: {e}", self.base_url))
    }
}

/// The `/api/chat` body for `request`: OpenAI's parameters where Ollama wants them.
pub fn chat_body(request: &AiRequest) -> serde_json::Value {
    let mut options = serde_json::Map::new();
    if let Some(t) = request.temperature {
        options.insert("temperature".into(), t.into());
    }
    if let Some(p) = request.top_p {
        options.insert("top_p".into(), p.into());
    }
    if let Some(seed) = request.seed {
        options.insert("seed".into(), seed.into());
    }
    if !request.stop.is_empty() {
        options.insert("stop".into(), request.stop.clone().into());
    }
    if let Some(n) = request.max_tokens {
        options.insert("num_predict".into(), n.into());
    }
    let mut body = serde_json::json!({
        "model": request.model,
        "messages": request.messages.iter().map(|m| serde_json::json!({
            "role": if m.role == "developer" { "system" } else { m.role.as_str() },
            "content": m.content,
        })).collect::<Vec<_>>(),
        "stream": true,
        "options": options,
    });
    if request.json {
        body["format"] = "json".into();
    }
    body
}

enum Ended {
    Served {
        input: u64,
        output: u64,
    },
    Refused(String),
    /// Failed before any text went out: another node should serve it.
    Failed(String),
    /// Failed after `output` chunks went out: paid for them, served by nobody else.
    Broke {
        message: String,
        output: u64,
    },
    Cancelled {
        input: u64,
        output: u64,
    },
    TimedOut {
        output: u64,
    },
}

/// How a stream that failed ends: before any text, for another node to serve; after it, paid
/// for the `generated` chunks that went out.
fn broke(message: String, generated: u64) -> Ended {
    if generated == 0 {
        Ended::Failed(message)
    } else {
        Ended::Broke {
            message,
            output: generated,
        }
    }
}

fn refusal(status: u16, response: ureq::http::Response<ureq::Body>) -> Ended {
    let body = response
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(body);
    if status >= 500 || status == 429 {
        Ended::Failed(format!("Ollama failed (HTTP {status}): {message}"))
    } else {
        Ended::Refused(format!(
            "Ollama refused the request (HTTP {status}): {message}"
        ))
    }
}

fn chat(
    inner: &Shared,
    request: &AiRequest,
    sink: &EventSinkBox,
    cancelled: &AtomicBool,
    started: Instant,
    deadline: Duration,
) -> Ended {
    if let Err(message) = inner.model(request) {
        return Ended::Refused(message);
    }
    let response = match inner.post("/api/chat", &chat_body(request)) {
        Ok(response) => response,
        Err(message) => return Ended::Failed(message),
    };
    let status = response.status().as_u16();
    if status != 200 {
        return refusal(status, response);
    }
    let mut lines = BufReader::new(response.into_body().into_reader().take(MAX_BODY_BYTES * 8));
    let (mut generated, mut line) = (0u64, String::new());
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Ended::Cancelled {
                input: 0,
                output: generated,
            };
        }
        if started.elapsed() > deadline {
            return Ended::TimedOut { output: generated };
        }
        line.clear();
        match (&mut lines).take(MAX_LINE_BYTES).read_line(&mut line) {
            Ok(0) => {
                return broke(
                    "Ollama's stream ended without its done line".into(),
                    generated,
                );
            }
            Ok(_) => {}
            Err(e) => return broke(format!("Ollama's stream broke: {e}"), generated),
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
            continue;
        };
        if let Some(error) = event["error"].as_str() {
            return broke(format!("Ollama failed mid-stream: {error}"), generated);
        }
        let content = event["message"]["content"].as_str().unwrap_or_default();
        if !content.is_empty() {
            generated += 1;
            send_chunk(
                sink,
                &Chunk {
                    content: content.to_owned(),
                    ..Chunk::default()
                },
            );
        }
        if event["done"].as_bool() == Some(true) {
            let reason = match event["done_reason"].as_str() {
                Some("length") => "length",
                _ => "stop",
            };
            send_chunk(
                sink,
                &Chunk {
                    finish_reason: Some(reason.into()),
                    ..Chunk::default()
                },
            );
            return Ended::Served {
                input: event["prompt_eval_count"].as_u64().unwrap_or(0),
                output: event["eval_count"].as_u64().unwrap_or(generated),
            };
        }
    }
}

fn embed(inner: &Shared, request: &AiRequest, sink: &EventSinkBox) -> Ended {
    if let Err(message) = inner.model(request) {
        return Ended::Refused(message);
    }
    let response = match inner.post(
        "/api/embed",
        &serde_json::json!({"model": request.model, "input": request.input}),
    ) {
        Ok(response) => response,
        Err(message) => return Ended::Failed(message),
    };
    let status = response.status().as_u16();
    if status != 200 {
        return refusal(status, response);
    }
    #[derive(Deserialize)]
    struct Reply {
        embeddings: Vec<Vec<f32>>,
        #[serde(default)]
        prompt_eval_count: u64,
    }
    let reply: Reply = match response
        .into_body()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_json()
    {
        Ok(reply) => reply,
        Err(e) => return Ended::Failed(format!("Ollama's embeddings are malformed: {e}")),
    };
    if reply.embeddings.len() != request.input.len() {
        return Ended::Failed(format!(
            "Ollama returned {} embeddings for {} inputs",
            reply.embeddings.len(),
            request.input.len()
        ));
    }
    send_chunk(
        sink,
        &Chunk {
            embeddings: reply.embeddings,
            ..Chunk::default()
        },
    );
    Ended::Served {
        input: reply.prompt_eval_count,
        output: 0,
    }
}

const NOT_CONFIGURED: &str = "no Ollama models configured: set [agent.plugins.ollama] models (and base_url if not 127.0.0.1:11434)";

impl PluginBackend for OllamaBackend {
    type Execution = ThreadExecution;

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<ThreadExecution, String> {
        let inner = self.inner.as_ref().ok_or(NOT_CONFIGURED)?.clone();
        let ai: AiRequest = serde_json::from_slice(&request.workload)
            .map_err(|e| format!("not an AI request: {e}"))?;
        inner.model(&ai)?;
        let deadline = Duration::from_millis(request.limits.wall_timeout_ms).min(inner.timeout);
        ThreadExecution::spawn(
            format!("ollama-{}", request.execution_id),
            move |cancelled| {
                let started = Instant::now();
                let ended = match ai.service {
                    Service::Embeddings => embed(&inner, &ai, &sink),
                    _ => chat(&inner, &ai, &sink, cancelled, started, deadline),
                };
                let elapsed = started.elapsed().as_millis() as u64;
                match ended {
                    Ended::Served { input, output } => {
                        ExecOutcome::exited(0, elapsed).with_usage(input, output)
                    }
                    Ended::Refused(m) => ExecOutcome::abnormal(ExitKind::Rejected, m, elapsed),
                    Ended::Failed(m) => ExecOutcome::abnormal(ExitKind::BackendFailed, m, elapsed),
                    Ended::Broke { message, output } => {
                        ExecOutcome::abnormal(ExitKind::BackendFailed, message, elapsed)
                            .with_usage(0, output)
                    }
                    Ended::Cancelled { input, output } => {
                        ExecOutcome::abnormal(ExitKind::Cancelled, "cancelled", elapsed)
                            .with_usage(input, output)
                    }
                    Ended::TimedOut { output } => ExecOutcome::abnormal(
                        ExitKind::TimedOut,
                        "Ollama took longer than the request's deadline",
                        elapsed,
                    )
                    .with_usage(0, output),
                }
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
        let state = inner.state();
        inner
            .models
            .iter()
            .filter(|(m, _)| state.present.contains(&m.name))
            .map(|(m, s)| ModelInfo {
                service: s.as_str().into(),
                name: m.name.as_str().into(),
                context_length: m.context_length,
                warm: state.loaded.contains(&m.name),
            })
            .collect()
    }
}

rhizos_plugin_api::export_backend_plugin! {
    name: "ollama",
    backends: ["ollama"],
    new: OllamaBackend::new,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_parameters_go_under_options_and_num_predict() {
        let request = AiRequest {
            service: Service::Chat,
            model: "llama3.2:1b".into(),
            messages: vec![rhizos_plugin_api::ai::Message {
                role: "developer".into(),
                content: "x".into(),
            }],
            input: vec![],
            max_tokens: Some(7),
            temperature: Some(0.0),
            top_p: Some(0.5),
            stop: vec!["\n".into()],
            seed: Some(3),
            json: true,
            dimensions: None,
            voice: None,
            speed: None,
            format: None,
        };
        let body = chat_body(&request);
        assert_eq!(body["options"]["num_predict"], 7);
        assert_eq!(body["options"]["temperature"], 0.0);
        assert_eq!(body["options"]["top_p"], 0.5);
        assert_eq!(body["options"]["seed"], 3);
        assert_eq!(body["options"]["stop"][0], "\n");
        assert_eq!(body["format"], "json");
        assert_eq!(body["messages"][0]["role"], "system");
        assert!(body.get("max_tokens").is_none());
    }

    #[test]
    fn configs_are_checked_and_none_says_what_it_needs() {
        assert!(OllamaBackend::new(r#"{"models": []}"#).is_err());
        assert!(OllamaBackend::new(r#"{"models": [{"name": "Big"}]}"#).is_err());
        assert!(
            OllamaBackend::new(r#"{"base_url": "ftp://x", "models": [{"name": "m"}]}"#).is_err()
        );
        let bare = OllamaBackend::new("{}").unwrap();
        assert!(bare.unavailable().unwrap().contains("models"));
        let down =
            OllamaBackend::new(r#"{"base_url": "http://127.0.0.1:9", "models": [{"name": "m"}]}"#)
                .unwrap();
        assert!(down.models().is_empty());
    }
}
