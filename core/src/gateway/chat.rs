//! `POST /v1/chat/completions` and `POST /v1/embeddings`: validate the request as OpenAI
//! defines it, hold its most tokens in escrow as an inference job, and relay the node's
//! response — as SSE `chat.completion.chunk`s or as one object — counting what is delivered.
//!
//! The relay ([`Relay`]) follows the job, not a node: it subscribes to the job's stream before
//! submitting, takes chunks only from the node and attempt the job is assigned to (checked with
//! `job.get`, so no other node can inject text), and witnesses what it delivered before it
//! answers the node's end of stream. A node failing before its first chunk is replaced by the
//! orchestrator (the attempt is requeued, billed nothing) and the relay takes the next node's
//! stream; after the first chunk nobody else may answer: the client gets an error event, the
//! part delivered is witnessed (the node is paid for it and no more), and the job ends.

use super::error::ApiError;
use super::{Gateway, bus_error};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use rhizos_broker::wire::{
    self, ErrorCode, ExitKind, JobSpec, JobState, KeyView, ModelView, StreamEnd, SubmitJob,
    WIRE_VERSION, Workload,
};
use rhizos_plugin_api::ai::{AiRequest, Chunk, Message, Service};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Prefix of a chat response id; the rest is the job id.
const CHAT_ID_PREFIX: &str = "chatcmpl-";
const EMBEDDING_ID_PREFIX: &str = "embd-";
const SPEECH_ID_PREFIX: &str = "speech-";
const SCRAPE_ID_PREFIX: &str = "scrape-";

/// The job id inside a response id this gateway gave out.
pub fn job_of_response_id(id: &str) -> Option<&str> {
    let job = id
        .strip_prefix(CHAT_ID_PREFIX)
        .or_else(|| id.strip_prefix(EMBEDDING_ID_PREFIX))
        .or_else(|| id.strip_prefix(SPEECH_ID_PREFIX))
        .or_else(|| id.strip_prefix(SCRAPE_ID_PREFIX))?;
    rhizos_broker::validate_token("job id", job).ok()?;
    Some(job)
}

/// Tokens a prompt can be at most: a token is at least one byte of its text, plus the chat
/// template's few tokens per message.
fn prompt_bound(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| m.content.len() as u64 + m.role.len() as u64 + 8)
        .sum::<u64>()
        + 16
}

/// The request's body as JSON, or a 400 saying why not.
fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_body("The request body must be a JSON object")),
        Err(e) => Err(ApiError::bad_body(format!(
            "We could not parse the JSON body of your request: {e}"
        ))),
    }
}

fn number(
    body: &serde_json::Map<String, Value>,
    name: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::invalid(
                name,
                format!(
                    "Invalid value for '{name}': expected a number from {min} to {max}, got {v}"
                ),
            )),
        },
    }
}

fn whole(
    body: &serde_json::Map<String, Value>,
    name: &str,
    min: u64,
) -> Result<Option<u64>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(ApiError::invalid(
                name,
                format!("Invalid value for '{name}': expected an integer ≥ {min}, got {v}"),
            )),
        },
    }
}

fn model_name(body: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        Some(_) => Err(ApiError::invalid(
            "model",
            "'model' must be a non-empty string",
        )),
        None => Err(ApiError::invalid(
            "model",
            "you must provide a model parameter",
        )),
    }
}

/// A chat request as OpenAI defines it, checked field by field.
pub struct ChatRequest {
    pub ai: AiRequest,
    pub stream: bool,
    pub include_usage: bool,
}

pub fn parse_chat(
    body: &[u8],
    settings: &rhizos_broker::config::GatewaySettings,
) -> Result<ChatRequest, ApiError> {
    let body = parse_body(body)?;
    let model = model_name(&body)?;
    let Some(Value::Array(raw)) = body.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must be an array of messages",
        ));
    };
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if !matches!(role, "system" | "developer" | "user" | "assistant") {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!(
                    "Invalid role {:?}: system, developer, user or assistant",
                    m["role"]
                ),
            ));
        }
        let content = match &m["content"] {
            Value::String(text) => text.clone(),
            Value::Array(parts) => {
                let mut text = String::new();
                for part in parts {
                    match (part["type"].as_str(), part["text"].as_str()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content"),
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
            Value::Null if role == "assistant" => String::new(),
            _ => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].content"),
                    "'content' must be a string or an array of text parts",
                ));
            }
        };
        messages.push(Message {
            role: role.to_owned(),
            content,
        });
    }
    if let Some(n) = whole(&body, "n", 1)?
        && n != 1
    {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let max_tokens = match (
        whole(&body, "max_completion_tokens", 1)?,
        whole(&body, "max_tokens", 1)?,
    ) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => u64::from(settings.default_max_tokens),
    };
    if max_tokens > u64::from(settings.max_tokens_cap) {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens}; this gateway allows at most {}",
                settings.max_tokens_cap
            ),
        ));
    }
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 && items.iter().all(Value::is_string) => {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "'stop' must be a string or up to 4 strings",
            ));
        }
    };
    let json = match body.get("response_format") {
        None | Some(Value::Null) => false,
        Some(format) => match format["type"].as_str() {
            Some("text") => false,
            Some("json_object") => true,
            _ => {
                return Err(ApiError::invalid(
                    "response_format",
                    "response_format.type must be text or json_object",
                ));
            }
        },
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::invalid("seed", "'seed' must be an integer"))?,
        ),
    };
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "'stream' must be a boolean")),
    };
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatRequest {
        ai: AiRequest {
            service: Service::Chat,
            model,
            messages,
            input: Vec::new(),
            max_tokens: Some(max_tokens as u32),
            temperature: number(&body, "temperature", 0.0, 2.0)?,
            top_p: number(&body, "top_p", 0.0, 1.0)?,
            stop,
            seed,
            json,
            dimensions: None,
            voice: None,
            speed: None,
            format: None,
        },
        stream,
        include_usage,
    })
}

/// What the relay hands the HTTP side, in order.
enum Event {
    /// Text for the client.
    Delta(String),
    /// Embeddings, one per input.
    Vectors(Vec<Vec<f32>>),
    /// The next piece of an audio file.
    Audio(Vec<u8>),
    /// The answer is complete.
    Finish {
        reason: String,
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// It failed (before or after the first delta).
    Failed(ApiError),
}

/// One request in flight: what was submitted and where its response comes from.
struct Relay {
    gw: Gateway,
    job_id: String,
    max_input: u64,
    max_output: u64,
    /// The node and attempt whose chunks are taken (checked against the job).
    source: Option<(String, u32)>,
    delivered: u64,
    /// The source's end of stream came (and was witnessed): its own report ends the job.
    ended_by_node: bool,
    finish_reason: Option<String>,
    /// Input units the gateway counts itself (speech: characters; scrape: URLs), for its
    /// witness.
    counted_input: Option<u64>,
    service: Service,
    /// For the metrics.
    route: String,
    model: String,
}

impl Gateway {
    /// Holds and submits `ai` for `key`; returns the relay's events (the first already
    /// received, so a failure before the response starts is an HTTP status).
    async fn start(
        &self,
        key: &KeyView,
        digest: String,
        ai: AiRequest,
        route: &str,
    ) -> Result<(String, mpsc::Receiver<Event>), ApiError> {
        let admitted = Instant::now();
        let (route_name, model_name) = (route.to_owned(), ai.model.clone());
        let started = self.start_inner(key, digest, ai, route, admitted).await;
        if let Err(e) = &started {
            self.count_request(&route_name, &model_name, Some(e));
        }
        started
    }

    async fn start_inner(
        &self,
        key: &KeyView,
        digest: String,
        ai: AiRequest,
        route: &str,
        admitted: Instant,
    ) -> Result<(String, mpsc::Receiver<Event>), ApiError> {
        Self::allowed(key, route, Some(&ai.model))?;
        self.admit(key)?;
        let model = self.model_for(&ai).await?;
        let max_input = match ai.service {
            Service::Chat => prompt_bound(&ai.messages),
            // Characters, counted here exactly (the witness says so too).
            Service::Speech => ai
                .input
                .iter()
                .map(|t| t.chars().count() as u64)
                .sum::<u64>()
                .max(1),
            // URLs asked for; pages fetched are the output.
            Service::Scrape => ai.input.len() as u64,
            _ => ai
                .input
                .iter()
                .map(|t| t.len() as u64 + 2)
                .sum::<u64>()
                .max(1),
        };
        if ai.service == Service::Speech
            && model.context_length > 0
            && max_input > u64::from(model.context_length)
        {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input is {max_input} characters; {} takes at most {}",
                    ai.model, model.context_length
                ),
            ));
        }
        let max_output = match ai.service {
            Service::Scrape => ai.input.len() as u64,
            _ => u64::from(ai.max_tokens.unwrap_or(0)),
        };
        if model.context_length > 0
            && ai.service == Service::Chat
            && max_output > u64::from(model.context_length)
        {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens {max_output} is more than {}'s context of {} tokens",
                    ai.model, model.context_length
                ),
            ));
        }
        // The hold: the most these units can cost at the dearest node serving the model.
        let hold = crate::ledger::metered_cost_micros(
            wire::Metered {
                input_units: max_input,
                output_units: max_output,
            },
            &wire::Pricing {
                input_million_micros: model.input_million_micros_max,
                output_million_micros: model.output_million_micros_max,
                ..wire::Pricing::default()
            },
        )
        .max(1);
        let job_id = format!("ai-{}", uuid::Uuid::now_v7().simple());
        let bus = &self.inner.bus;
        let stream = bus
            .client
            .subscribe(
                bus.subjects
                    .ai_streams_of(&job_id)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            )
            .await
            .map_err(|e| ApiError::unavailable(format!("The network did not answer: {e}")))?;
        let request = serde_json::to_string(&ai).map_err(|e| ApiError::internal(e.to_string()))?;
        let ai_service = ai.service;
        let mut spec = JobSpec::new(
            Workload::Inference {
                service: ai.service.as_str().into(),
                model: ai.model.clone(),
                via: String::new(),
                request,
                max_input_units: max_input,
                max_output_units: max_output,
            },
            self.inner.settings.request_timeout_ms,
            1,
        );
        // A node failing before its first chunk is replaced; once is usually enough.
        spec.max_retries = 2;
        // The node's model server has its own concurrency; the node's max_concurrent bounds it.
        spec.cpu_cores = 0;
        let submitting = Instant::now();
        let submitted = self
            .inner
            .client
            .submit(&SubmitJob {
                v: WIRE_VERSION,
                job_id: Some(job_id.clone()),
                account: key.account.clone(),
                spec,
                max_cost_micros: hold,
                api_key_sha256: Some(digest),
            })
            .await;
        self.inner
            .metrics
            .submit_seconds
            .observe(submitting.elapsed().as_secs_f64());
        if let Err(e) = &submitted {
            let message = e
                .remote()
                .map(|r| r.message.clone())
                .unwrap_or_else(|| e.to_string());
            return Err(match e.remote().map(|r| r.code) {
                Some(ErrorCode::InsufficientFunds) => ApiError::insufficient_quota(format!(
                    "You exceeded your current quota: {message}"
                )),
                Some(ErrorCode::NoCapacity) => {
                    self.forget_models().await;
                    ApiError::unavailable(format!("No node can serve {} now: {message}", ai.model))
                }
                Some(ErrorCode::BadRequest) => ApiError::bad_body(message),
                Some(ErrorCode::Forbidden) => ApiError::not_allowed(message),
                _ => bus_error(e),
            });
        }
        tracing::debug!(%job_id, model = %ai.model, hold, "request submitted");
        let (sender, mut receiver) = mpsc::channel(256);
        let relay = Relay {
            gw: self.clone(),
            job_id: job_id.clone(),
            max_input,
            max_output,
            // Assigned in the submit: that node's stream is the job's (no job.get on the way
            // to the first token).
            source: submitted
                .ok()
                .and_then(|reply| reply.node_id.zip(reply.attempt)),
            delivered: 0,
            ended_by_node: false,
            finish_reason: None,
            counted_input: matches!(ai_service, Service::Speech | Service::Scrape)
                .then_some(max_input),
            service: ai_service,
            route: route.to_owned(),
            model: ai.model.clone(),
        };
        let key = key.clone();
        tokio::spawn(relay.run(stream, sender, key));
        // The first event decides the HTTP status.
        let Some(first) = receiver.recv().await else {
            return Err(ApiError::internal("the relay ended without an answer"));
        };
        if let Event::Failed(e) = first {
            return Err(e);
        }
        self.inner
            .metrics
            .first_chunk_seconds
            .with_label_values(&[ai.model.as_str()])
            .observe(admitted.elapsed().as_secs_f64());
        let (resend, rest) = mpsc::channel(256);
        tokio::spawn(async move {
            if resend.send(first).await.is_ok() {
                while let Some(event) = receiver.recv().await {
                    if resend.send(event).await.is_err() {
                        break;
                    }
                }
            }
        });
        Ok((job_id, rest))
    }

    /// The model the request names, as the network serves it for the request's service.
    async fn model_for(&self, ai: &AiRequest) -> Result<ModelView, ApiError> {
        let models = self.models().await?;
        models
            .into_iter()
            .find(|m| m.name == ai.model && m.service == ai.service.as_str())
            .ok_or_else(|| ApiError::model_not_found(&ai.model))
    }
}

impl Relay {
    async fn run(
        mut self,
        mut stream: async_nats::Subscriber,
        events: mpsc::Sender<Event>,
        key: KeyView,
    ) {
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.gw.inner.settings.request_timeout_ms);
        let mut check = tokio::time::interval(Duration::from_millis(500));
        check.tick().await;
        let outcome = loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        break Err(ApiError::upstream("the response stream closed"));
                    };
                    match self.take(message, &events).await {
                        Step::More => {}
                        Step::Done(result) => break result,
                    }
                }
                _ = check.tick() => {
                    // The node may be gone (no end of stream comes): the job says what happened.
                    if let Some(result) = self.watch().await {
                        break result;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    break Err(ApiError::timeout(format!(
                        "no complete answer within {} ms", self.gw.inner.settings.request_timeout_ms
                    )));
                }
                () = events.closed() => {
                    break Err(ApiError::bad_body("the client went away"));
                }
            }
        };
        match outcome {
            Ok((reason, prompt_tokens, completion_tokens)) => {
                self.gw.used_tokens(&key, prompt_tokens + completion_tokens);
                self.gw.count_request(&self.route, &self.model, None);
                let tokens = &self.gw.inner.metrics.tokens;
                tokens
                    .with_label_values(&[self.model.as_str(), "input"])
                    .inc_by(prompt_tokens);
                tokens
                    .with_label_values(&[self.model.as_str(), "output"])
                    .inc_by(completion_tokens);
                let _ = events
                    .send(Event::Finish {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                    })
                    .await;
            }
            Err(e) => {
                tracing::info!(job_id = %self.job_id, error = %e.message, delivered = self.delivered, "request ended without a complete answer");
                if self.delivered > 0 {
                    // Failed before its first event: `start` counts it.
                    self.gw.count_request(&self.route, &self.model, Some(&e));
                }
                if !self.ended_by_node {
                    // The client holds what was delivered (it went away, or the answer took too
                    // long): the node is paid for that part, so it is witnessed before the
                    // cancel. Nothing more is wanted of this job (a later node must not start
                    // over). A node's own end of stream was witnessed already, and its report
                    // ends the job.
                    self.witness_delivered().await;
                    let _ = self.gw.inner.client.job_cancel(&self.job_id).await;
                }
                let _ = events.send(Event::Failed(e)).await;
            }
        }
    }

    /// Witnesses what the current source delivered, if it delivered anything: its bill is
    /// bounded by this (a refused witness — the attempt already moved on — leaves it unpaid).
    async fn witness_delivered(&self) {
        let Some((node, attempt)) = &self.source else {
            return;
        };
        if self.delivered == 0 {
            return;
        }
        if let Err(e) = self
            .gw
            .inner
            .client
            .job_witness(
                &self.job_id,
                node,
                *attempt,
                self.counted_input,
                self.delivered,
            )
            .await
        {
            tracing::info!(job_id = %self.job_id, %node, attempt, error = %e, "what was delivered before the failure was not witnessed");
        }
    }

    /// Whether the chunk's node and attempt are the job's own now (asked of the orchestrator
    /// when they change: only the assigned node's text reaches the client).
    async fn is_source(&mut self, node: &str, attempt: u32) -> bool {
        if self
            .source
            .as_ref()
            .is_some_and(|(n, a)| n == node && *a == attempt)
        {
            return true;
        }
        match self.gw.inner.client.job_get(&self.job_id).await {
            Ok(job) if job.node_id.as_deref() == Some(node) && job.attempt == attempt => {
                if self.source.is_some() && self.delivered > 0 {
                    // Another node after text went out: the client cannot be given a second answer.
                    return false;
                }
                self.source = Some((node.to_owned(), attempt));
                true
            }
            _ => {
                tracing::warn!(job_id = %self.job_id, node, attempt, "chunk from a node that does not serve this request; dropped");
                false
            }
        }
    }

    async fn take(&mut self, message: async_nats::Message, events: &mpsc::Sender<Event>) -> Step {
        let node = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
        let attempt = message
            .headers
            .as_ref()
            .and_then(|h| h.get(wire::AI_ATTEMPT_HEADER))
            .and_then(|v| v.as_str().parse::<u32>().ok());
        let Some(attempt) = attempt else {
            return Step::More;
        };
        if !self.is_source(&node, attempt).await {
            return Step::More;
        }
        if let Some(reply) = message.reply.clone() {
            // The end of the attempt's response.
            let end: StreamEnd = match wire::decode(&message.payload, 64 * 1024) {
                Ok(end) => end,
                Err(_) => return Step::More,
            };
            let witnessed = self
                .gw
                .inner
                .client
                .job_witness(
                    &self.job_id,
                    &node,
                    attempt,
                    self.counted_input,
                    self.delivered,
                )
                .await;
            if let Err(e) = &witnessed {
                tracing::warn!(job_id = %self.job_id, error = %e, "witness not recorded");
            }
            let ack = wire::Ack {
                accepted: witnessed.is_ok(),
                note: None,
            };
            self.ended_by_node = true;
            let _ = self
                .gw
                .inner
                .bus
                .client
                .publish(reply, wire::encode(&wire::Reply::ok(ack)))
                .await;
            return self.ended(end);
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(&message.payload) else {
            return Step::More;
        };
        if !chunk.embeddings.is_empty() {
            self.delivered += 1;
            if events.send(Event::Vectors(chunk.embeddings)).await.is_err() {
                return Step::Done(Err(ApiError::bad_body("the client went away")));
            }
        }
        if !chunk.audio_b64.is_empty() {
            let Ok(audio) = wire::b64_decode("audio_b64", &chunk.audio_b64) else {
                return Step::More;
            };
            if events.send(Event::Audio(audio)).await.is_err() {
                return Step::Done(Err(ApiError::bad_body("the client went away")));
            }
        }
        if !chunk.content.is_empty() && self.delivered < self.max_output.max(1) {
            // A scrape's chunk is one page's result: only a page fetched counts as delivered.
            self.delivered += match self.service {
                Service::Scrape => u64::from(
                    serde_json::from_str::<Value>(&chunk.content)
                        .is_ok_and(|page| page["ok"] == Value::Bool(true)),
                ),
                _ => 1,
            };
            if events.send(Event::Delta(chunk.content)).await.is_err() {
                return Step::Done(Err(ApiError::bad_body("the client went away")));
            }
        }
        if let Some(reason) = chunk.finish_reason {
            // The end of stream follows with the node's counts.
            self.finish_reason = Some(reason);
        }
        Step::More
    }

    fn ended(&mut self, end: StreamEnd) -> Step {
        if end.kind == ExitKind::Exited {
            let usage = end.usage.unwrap_or_default();
            let reason = self.finish_reason.clone().unwrap_or_else(|| "stop".into());
            return Step::Done(Ok((
                reason,
                usage.input_units.min(self.max_input),
                usage.output_units.min(self.delivered),
            )));
        }
        if end.kind == ExitKind::NodeError && self.delivered == 0 {
            // The orchestrator requeues it: the next node's stream follows.
            self.source = None;
            self.ended_by_node = false;
            return Step::More;
        }
        let message = end.message.unwrap_or_else(|| format!("{:?}", end.kind));
        Step::Done(Err(match end.kind {
            ExitKind::Rejected => ApiError::bad_body(message),
            ExitKind::TimedOut => ApiError::timeout(message),
            _ => ApiError::upstream(message),
        }))
    }

    /// Looks at the job while no chunk comes: ended without an answer, or moved to another
    /// node after text was delivered, is the end of the request.
    async fn watch(&mut self) -> Option<Result<(String, u64, u64), ApiError>> {
        let job = self.gw.inner.client.job_get(&self.job_id).await.ok()?;
        if job.state.is_terminal() {
            return Some(Err(match job.state {
                JobState::TimedOut => ApiError::timeout(job.reason.unwrap_or_default()),
                _ => ApiError::unavailable(format!(
                    "the request could not be served: {}",
                    job.reason.unwrap_or_else(|| job.state.as_str().into())
                )),
            }));
        }
        if self.delivered > 0
            && let Some((node, attempt)) = &self.source
            && (job.node_id.as_deref() != Some(node.as_str()) || job.attempt != *attempt)
        {
            return Some(Err(ApiError::upstream(format!(
                "node {node} failed after {} chunks of the answer",
                self.delivered
            ))));
        }
        None
    }
}

enum Step {
    More,
    Done(Result<(String, u64, u64), ApiError>),
}

fn now_s() -> u64 {
    crate::now_ms() / 1000
}

fn sse(value: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {value}\n\n"))
}

/// `POST /v1/chat/completions`.
pub async fn completions(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (key, digest) = gw.authenticate(&headers).await?;
        let request = parse_chat(&body, &gw.inner.settings)?;
        let model = request.ai.model.clone();
        let (job_id, events) = gw.start(&key, digest, request.ai, "chat").await?;
        let id = format!("{CHAT_ID_PREFIX}{job_id}");
        tracing::debug!(%id, ms = started.elapsed().as_millis() as u64, "first chunk");
        Ok::<_, ApiError>(if request.stream {
            stream_chat(id, model, request.include_usage, events)
        } else {
            whole_chat(id, model, events).await?
        })
    }
    .await;
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn stream_chat(
    id: String,
    model: String,
    include_usage: bool,
    events: mpsc::Receiver<Event>,
) -> Response {
    let created = now_s();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": null,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let first = sse(&chunk(json!({"role": "assistant", "content": ""}), None));
    let state = (events, Some(chunk), false);
    let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(first) }).chain(
        futures::stream::unfold(state, move |(mut events, chunk, done)| async move {
            if done {
                return None;
            }
            let make = chunk.as_ref()?;
            let (bytes, done) = match events.recv().await {
                Some(Event::Delta(text)) => (sse(&make(json!({"content": text}), None)), false),
                Some(Event::Vectors(_) | Event::Audio(_)) => (bytes::Bytes::new(), false),
                Some(Event::Finish {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    let mut out = sse(&make(json!({}), Some(&reason))).to_vec();
                    if include_usage {
                        let mut usage = make(json!({}), None);
                        usage["choices"] = json!([]);
                        usage["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                 "total_tokens": prompt_tokens + completion_tokens});
                        out.extend_from_slice(&sse(&usage));
                    }
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    (bytes::Bytes::from(out), true)
                }
                Some(Event::Failed(e)) => {
                    // After the first chunk the status is sent: the error travels as an event.
                    let mut out = sse(&e.body()).to_vec();
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    (bytes::Bytes::from(out), true)
                }
                None => return None,
            };
            Some((Ok(bytes), (events, chunk, done)))
        }),
    );
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn whole_chat(
    id: String,
    model: String,
    mut events: mpsc::Receiver<Event>,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta(text) => content.push_str(&text),
            Event::Vectors(_) | Event::Audio(_) => {}
            Event::Failed(e) => return Err(e),
            Event::Finish {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(axum::Json(json!({
                    "id": id, "object": "chat.completion", "created": now_s(), "model": model,
                    "system_fingerprint": null,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                                 "logprobs": null, "finish_reason": reason}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }))
                .into_response());
            }
        }
    }
    Err(ApiError::upstream("the answer ended early"))
}

/// `POST /v1/embeddings`: `input` a string or an array of strings; `encoding_format` float
/// (default) or base64 (little-endian f32, as OpenAI sends it); `dimensions` where the model
/// allows fewer.
pub async fn embeddings(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let result = async {
        let (key, digest) = gw.authenticate(&headers).await?;
        let body = parse_body(&body)?;
        let model = model_name(&body)?;
        let input = match body.get("input") {
            Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
            Some(Value::Array(items)) if !items.is_empty() && items.len() <= 2048 => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(ApiError::invalid(
                        "input",
                        "each input must be a non-empty string (token arrays are not supported)",
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => {
                return Err(ApiError::invalid(
                    "input",
                    "'input' must be a non-empty string or an array of up to 2048 strings",
                ));
            }
        };
        let base64 = match body.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("encoding_format {other:?}: float or base64"),
                ));
            }
        };
        let dimensions = whole(&body, "dimensions", 1)?.map(|d| d as u32);
        let ai = AiRequest {
            service: Service::Embeddings,
            model: model.clone(),
            input,
            dimensions,
            ..AiRequest::default()
        };
        let (job_id, mut events) = gw.start(&key, digest, ai, "embeddings").await?;
        let mut vectors = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Vectors(v) => vectors = v,
                Event::Delta(_) | Event::Audio(_) => {}
                Event::Failed(e) => return Err(e),
                Event::Finish { prompt_tokens, .. } => {
                    let data: Vec<Value> = vectors
                        .iter()
                        .enumerate()
                        .map(|(index, vector)| {
                            let embedding = if base64 {
                                let bytes: Vec<u8> =
                                    vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                                Value::String(wire::b64_encode(&bytes))
                            } else {
                                json!(vector)
                            };
                            json!({"object": "embedding", "index": index, "embedding": embedding})
                        })
                        .collect();
                    return Ok(axum::Json(json!({
                        "object": "list", "data": data, "model": model,
                        // Not in OpenAI's shape, which has no id: for /v1/generation.
                        "id": format!("{EMBEDDING_ID_PREFIX}{job_id}"),
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
                    }))
                    .into_response());
                }
            }
        }
        Err(ApiError::upstream("the answer ended early"))
    }
    .await;
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/audio/speech`: `model`, `input` (text), `voice`, `response_format` `wav` (the
/// default here: nodes have no mp3 encoder) or `pcm`, `speed` 0.25–4. Billed per character.
pub async fn speech(State(gw): State<Gateway>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    let result = async {
        let (key, digest) = gw.authenticate(&headers).await?;
        let body = parse_body(&body)?;
        let model = model_name(&body)?;
        let input = match body.get("input") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(ApiError::invalid(
                    "input",
                    "'input' must be a non-empty string",
                ));
            }
        };
        let voice = match body.get("voice") {
            None | Some(Value::Null) => None,
            Some(Value::String(v)) => Some(v.clone()),
            Some(_) => return Err(ApiError::invalid("voice", "'voice' must be a string")),
        };
        let format = match body.get("response_format").and_then(Value::as_str) {
            None | Some("wav") => "wav",
            Some("pcm") => "pcm",
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!(
                        "response_format {other:?}: nodes make wav and pcm (16-bit mono, 22,050 Hz)"
                    ),
                ));
            }
        };
        let speed = number(&body, "speed", 0.25, 4.0)?;
        let ai = AiRequest {
            service: Service::Speech,
            model,
            input: vec![input],
            voice,
            speed,
            format: Some(format.to_owned()),
            ..AiRequest::default()
        };
        let (job_id, mut events) = gw.start(&key, digest, ai, "speech").await?;
        let mut audio = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Audio(piece) => audio.extend_from_slice(&piece),
                Event::Delta(_) | Event::Vectors(_) => {}
                Event::Failed(e) => return Err(e),
                Event::Finish { .. } => {
                    let mut response = Body::from(audio).into_response();
                    let headers = response.headers_mut();
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(if format == "wav" {
                            "audio/wav"
                        } else {
                            "audio/pcm"
                        }),
                    );
                    if let Ok(id) = HeaderValue::from_str(&format!("{SPEECH_ID_PREFIX}{job_id}")) {
                        headers.insert("x-request-id", id);
                    }
                    return Ok(response);
                }
            }
        }
        Err(ApiError::upstream("the audio ended early"))
    }
    .await;
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/scrape` (the Cxmpute scrape service): `urls` (1–16 http/https URLs), `format`
/// `markdown` (default) or `text`, `model` (default `scrape`). One result per URL, in order:
/// `{url, ok, status?, final_url?, title?, content, error?}`. Billed per URL asked (input) and
/// per page fetched (output).
pub async fn scrape(State(gw): State<Gateway>, headers: HeaderMap, body: bytes::Bytes) -> Response {
    let result = async {
        let (key, digest) = gw.authenticate(&headers).await?;
        let body = parse_body(&body)?;
        let model = match body.get("model") {
            None | Some(Value::Null) => "scrape".to_owned(),
            Some(_) => model_name(&body)?,
        };
        let urls: Vec<String> = match body.get("urls") {
            Some(Value::Array(items)) if !items.is_empty() && items.len() <= 16 => items
                .iter()
                .map(|v| match v.as_str() {
                    Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                        Ok(u.to_owned())
                    }
                    _ => Err(ApiError::invalid(
                        "urls",
                        "each URL must be an http:// or https:// string",
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(ApiError::invalid(
                    "urls",
                    "'urls' must be an array of 1 to 16 URLs",
                ));
            }
        };
        let format = match body.get("format").and_then(Value::as_str) {
            None | Some("markdown") => "markdown",
            Some("text") => "text",
            Some(other) => {
                return Err(ApiError::invalid(
                    "format",
                    format!("format {other:?}: markdown or text"),
                ));
            }
        };
        let ai = AiRequest {
            service: Service::Scrape,
            model: model.clone(),
            input: urls,
            format: Some(format.to_owned()),
            ..AiRequest::default()
        };
        let (job_id, mut events) = gw.start(&key, digest, ai, "scrape").await?;
        let mut results = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                Event::Delta(page) => {
                    results.push(serde_json::from_str::<Value>(&page).unwrap_or(Value::Null));
                }
                Event::Vectors(_) | Event::Audio(_) => {}
                Event::Failed(e) => return Err(e),
                Event::Finish {
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => {
                    return Ok(axum::Json(json!({
                        "object": "scrape.result",
                        "id": format!("{SCRAPE_ID_PREFIX}{job_id}"),
                        "model": model,
                        "results": results,
                        "usage": {"requests": prompt_tokens, "pages": completion_tokens},
                    }))
                    .into_response());
                }
            }
        }
        Err(ApiError::upstream("the results ended early"))
    }
    .await;
    match result {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> rhizos_broker::config::GatewaySettings {
        rhizos_broker::config::GatewaySettings::default()
    }

    #[test]
    fn chat_requests_are_checked_naming_the_parameter() {
        for (body, param) in [
            (
                r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
                Some("model"),
            ),
            (r#"{"model": "m"}"#, Some("messages")),
            (r#"{"model": "m", "messages": []}"#, Some("messages")),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 3}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                Some("n"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 5}"#,
                Some("stop"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#,
                Some("response_format"),
            ),
            ("not json", None),
            ("[1]", None),
        ] {
            let err = parse_chat(body.as_bytes(), &settings()).err().expect(body);
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
    }

    #[test]
    fn a_valid_request_keeps_every_parameter() {
        let body = r#"{"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi"}], "max_completion_tokens": 9, "temperature": 0.2, "top_p": 0.5,
            "stop": ["a", "b"], "seed": 7, "response_format": {"type": "json_object"}, "stream": true,
            "stream_options": {"include_usage": true}}"#;
        let request = parse_chat(body.as_bytes(), &settings()).unwrap();
        assert_eq!(request.ai.messages[0].content, "be brief");
        assert_eq!(request.ai.max_tokens, Some(9));
        assert_eq!(request.ai.temperature, Some(0.2));
        assert_eq!(request.ai.top_p, Some(0.5));
        assert_eq!(request.ai.stop, ["a", "b"]);
        assert_eq!(request.ai.seed, Some(7));
        assert!(request.ai.json && request.stream && request.include_usage);
        let plain = parse_chat(
            br#"{"model": "m", "messages": [{"role": "user", "content": "x"}]}"#,
            &settings(),
        )
        .unwrap();
        assert_eq!(plain.ai.max_tokens, Some(settings().default_max_tokens));
        assert!(!plain.stream);
    }

    #[test]
    fn the_prompt_bound_is_at_least_one_token_per_byte() {
        let messages = vec![Message {
            role: "user".into(),
            content: "é".repeat(10),
        }];
        assert!(prompt_bound(&messages) >= 20);
        assert_eq!(job_of_response_id("chatcmpl-ai-1"), Some("ai-1"));
        assert_eq!(job_of_response_id("chatcmpl-a.b"), None);
        assert_eq!(job_of_response_id("other"), None);
    }
}
