//! `rhizosd gateway`: the OpenAI-compatible HTTP API of the network. Ordinary AI clients (the
//! official SDKs, curl, LangChain…) point their base URL here; every request becomes an
//! inference job charged to the account of the API key they present — held in escrow at the
//! most its tokens can cost, routed by the orchestrator to a node that serves the model, its
//! response streamed back over NATS (`rhizos.out.v1.<ns>.ai.<job>.<node>`) and settled by the
//! units served, bounded by what this gateway witnessed delivering (`job.witness`).
//!
//! Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (plain and SSE),
//! `POST /v1/embeddings`, `POST /v1/audio/speech`, `POST /v1/scrape`, `GET /v1/generation?id=` (a request's usage, cost, node, receipt),
//! `GET /health`. Errors in OpenAI's shape ([`error::ApiError`]).
//!
//! It depends on the broker's typed client only — never on orchestrator internals — and runs
//! with the `gateway` role: it may check keys by digest, submit inference jobs charged to them,
//! read and cancel those jobs, and read their response streams; nothing else.

mod chat;
pub mod dashboard;
mod error;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::ApiError;
use rhizos_broker::config::GatewaySettings;
use rhizos_broker::wire::{ErrorCode, KeyView, ModelView};
use rhizos_broker::{Bus, Client, RequestError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The gateway: its bus client, settings and the little it caches (keys, models, rate windows).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
    /// The web dashboard under `/dashboard`, when served ([`Gateway::with_dashboard`]).
    dashboard: Option<Arc<dashboard::Dashboard>>,
}

struct Inner {
    bus: Bus,
    client: Client,
    settings: GatewaySettings,
    keys: Mutex<KeyCache>,
    models: tokio::sync::Mutex<Option<(Instant, Vec<ModelView>)>>,
    windows: Mutex<HashMap<String, Window>>,
    metrics: Arc<crate::metrics::GatewayMetrics>,
}

/// One key's last minute: request times and the tokens its requests used.
#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
}

/// Keys by SHA-256: when they were asked about and the answer (a refusal is cached too).
type KeyCache = HashMap<String, (Instant, Result<KeyView, ApiError>)>;

const MINUTE: Duration = Duration::from_secs(60);

impl Gateway {
    pub fn new(bus: Bus, settings: GatewaySettings) -> Self {
        let client = Client::new(bus.clone());
        Self {
            inner: Arc::new(Inner {
                bus,
                client,
                settings,
                keys: Mutex::new(HashMap::new()),
                models: tokio::sync::Mutex::new(None),
                windows: Mutex::new(HashMap::new()),
                metrics: Arc::new(crate::metrics::GatewayMetrics::new()),
            }),
            dashboard: None,
        }
    }

    /// Also serves the web dashboard under `/dashboard`: people sign in with their credentials
    /// file and the gateway connects to `nats` as them for the session.
    pub fn with_dashboard(mut self, nats: rhizos_broker::config::NatsSettings) -> Self {
        let mut nats = nats;
        // Each session connects as the person signed in, never with the gateway's own file.
        nats.credentials = None;
        nats.client_name = Some("rhizos-dashboard".into());
        self.dashboard = Some(Arc::new(dashboard::Dashboard::new(nats)));
        self
    }

    /// Its metrics for [`crate::metrics::serve`] (served on a listener of their own, not on
    /// the public API's port).
    pub fn metrics_source(&self) -> crate::metrics::Source {
        crate::metrics::Source::of(&self.inner.metrics.registry)
    }

    /// Counts a request's end: its outcome by route and model, its error's code.
    fn count_request(&self, route: &str, model: &str, error: Option<&ApiError>) {
        let metrics = &self.inner.metrics;
        let outcome = error.map_or("served", |e| e.code.unwrap_or(e.kind));
        metrics
            .requests
            .with_label_values(&[route, model, outcome])
            .inc();
        if error.is_some() {
            metrics.errors.with_label_values(&[model, outcome]).inc();
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/v1/models", get(list_models))
            .route("/v1/models/{id}", get(get_model))
            .route("/v1/chat/completions", post(chat::completions))
            .route("/v1/embeddings", post(chat::embeddings))
            .route("/v1/audio/speech", post(chat::speech))
            .route("/v1/scrape", post(chat::scrape))
            .route("/v1/generation", get(generation))
            .fallback(|| async {
                ApiError::not_found("no such route: the gateway serves /v1/models, /v1/chat/completions, /v1/embeddings, /v1/audio/speech, /v1/scrape, /v1/generation and the web dashboard at /dashboard")
            })
            .layer(axum::extract::DefaultBodyLimit::max(
                self.inner.settings.max_body_bytes,
            ))
            .with_state(self.clone())
            .merge(dashboard::router(self.clone()))
    }

    /// Serves on `listener` until `shutdown` resolves (requests in flight finish first).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        use axum::serve::ListenerExt as _;
        // Small SSE writes must not wait for delayed ACKs (~40 ms each on loopback).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tracing::info!(addr = %self.inner.settings.listen, "gateway listening");
        if let Some(dashboard) = &self.dashboard {
            // Idle sessions close (and their NATS connections) even if nobody signs in again.
            let dashboard = Arc::downgrade(dashboard);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let Some(dashboard) = dashboard.upgrade() else {
                        return;
                    };
                    dashboard.sweep();
                }
            });
        }
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }

    /// The key a request presents (`Authorization: Bearer rhz_…`), checked with the
    /// orchestrator at most every `key_cache_ms` (a revoked key stops within that).
    async fn authenticate(&self, headers: &HeaderMap) -> Result<(KeyView, String), ApiError> {
        let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
            return Err(ApiError::invalid_key(
                "You didn't provide an API key: send `Authorization: Bearer rhz_…` (rhizos key create makes one)",
            ));
        };
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value)
            .trim();
        if rhizos_broker::wire::key_id_of(key).is_none() {
            return Err(ApiError::invalid_key(
                "Incorrect API key provided: RhizOS keys look like rhz_<12 hex>_<64 hex>",
            ));
        }
        let digest = rhizos_broker::blobs::sha256_hex(key.as_bytes());
        let ttl = Duration::from_millis(self.inner.settings.key_cache_ms);
        if let Some((at, known)) = self.lock_keys().get(&digest)
            && at.elapsed() < ttl
        {
            return known.clone().map(|view| (view, digest.clone()));
        }
        let known = match self.inner.client.key_authenticate(key).await {
            Ok(view) => Ok(view),
            Err(e) => match e.remote().map(|r| r.code) {
                Some(ErrorCode::NotFound) => {
                    Err(ApiError::invalid_key("Incorrect API key provided"))
                }
                Some(ErrorCode::Forbidden) => Err(ApiError::invalid_key(
                    e.remote().map(|r| r.message.clone()).unwrap_or_default(),
                )),
                _ => return Err(bus_error(&e)),
            },
        };
        let mut keys = self.lock_keys();
        if keys.len() > 100_000 {
            keys.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        keys.insert(digest.clone(), (Instant::now(), known.clone()));
        known.map(|view| (view, digest))
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        self.inner
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The key may use `route` (`chat`, `embeddings`, …) and, if given, `model`.
    fn allowed(key: &KeyView, route: &str, model: Option<&str>) -> Result<(), ApiError> {
        if !key.routes.is_empty() && !key.routes.iter().any(|r| r == route) {
            return Err(ApiError::not_allowed(format!(
                "API key {} may not use the {route} route (it is limited to {})",
                key.key_id,
                key.routes.join(", ")
            )));
        }
        if let Some(model) = model
            && !key.models.is_empty()
            && !key.models.iter().any(|m| m == model)
        {
            return Err(ApiError::not_allowed(format!(
                "API key {} may not use model {model} (it is limited to {})",
                key.key_id,
                key.models.join(", ")
            )));
        }
        Ok(())
    }

    /// Counts a request against the key's requests per minute, and refuses it when the key's
    /// tokens of the last minute reached its tokens per minute.
    fn admit(&self, key: &KeyView) -> Result<(), ApiError> {
        if key.rpm.is_none() && key.tpm.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let mut windows = self
            .inner
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let window = windows.entry(key.key_id.clone()).or_default();
        while window
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            window.requests.pop_front();
        }
        while window
            .tokens
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= MINUTE)
        {
            window.tokens.pop_front();
        }
        let retry_after = |oldest: Option<Instant>| {
            oldest.map_or(1, |t| {
                MINUTE.saturating_sub(now.duration_since(t)).as_secs() + 1
            })
        };
        if let Some(rpm) = key.rpm
            && window.requests.len() >= rpm as usize
        {
            return Err(ApiError::rate_limited(
                format!(
                    "Rate limit reached for key {}: {rpm} requests per minute",
                    key.key_id
                ),
                retry_after(window.requests.front().copied()),
            ));
        }
        if let Some(tpm) = key.tpm {
            let used: u64 = window.tokens.iter().map(|(_, n)| n).sum();
            if used >= tpm {
                return Err(ApiError::rate_limited(
                    format!(
                        "Rate limit reached for key {}: {tpm} tokens per minute (used {used})",
                        key.key_id
                    ),
                    retry_after(window.tokens.front().map(|(t, _)| *t)),
                ));
            }
        }
        window.requests.push_back(now);
        Ok(())
    }

    /// Records the tokens a request used, for the key's tokens per minute.
    fn used_tokens(&self, key: &KeyView, tokens: u64) {
        if key.tpm.is_some() && tokens > 0 {
            let mut windows = self
                .inner
                .windows
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            windows
                .entry(key.key_id.clone())
                .or_default()
                .tokens
                .push_back((Instant::now(), tokens));
        }
    }

    /// The models live nodes serve (cached for `models_cache_ms`).
    async fn models(&self) -> Result<Vec<ModelView>, ApiError> {
        let mut cached = self.inner.models.lock().await;
        let ttl = Duration::from_millis(self.inner.settings.models_cache_ms);
        if let Some((at, models)) = cached.as_ref()
            && at.elapsed() < ttl
        {
            return Ok(models.clone());
        }
        let models = self
            .inner
            .client
            .model_list()
            .await
            .map_err(|e| bus_error(&e))?
            .models;
        *cached = Some((Instant::now(), models.clone()));
        Ok(models)
    }

    /// Forgets the cached model list (a submit found no node for one it listed).
    async fn forget_models(&self) {
        *self.inner.models.lock().await = None;
    }
}

/// A failure to reach the orchestrator, as the client sees it.
fn bus_error(e: &RequestError) -> ApiError {
    match e.remote().map(|r| r.code) {
        Some(ErrorCode::TooBusy) => {
            ApiError::rate_limited("The network is busy; retry in a moment", 1)
        }
        _ => ApiError::unavailable(format!("The network did not answer: {e}")),
    }
}

/// OpenAI's model object, with what the network knows of it.
fn model_json(model: &ModelView) -> serde_json::Value {
    serde_json::json!({
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "rhizos",
        "service": model.service,
        "context_length": model.context_length,
        "nodes": model.nodes,
        "warm_nodes": model.warm_nodes,
        "pricing": {
            "unit": match model.service.as_str() {
                "speech" => "character",
                "scrape" => "page",
                _ => "token",
            },
            "input_per_million_usd": rhizos_broker::wire::format_usd(model.input_million_micros_max as i64),
            "output_per_million_usd": rhizos_broker::wire::format_usd(model.output_million_micros_max as i64),
            "input_million_micros": {"min": model.input_million_micros_min, "max": model.input_million_micros_max},
            "output_million_micros": {"min": model.output_million_micros_min, "max": model.output_million_micros_max},
        },
    })
}

async fn list_models(State(gw): State<Gateway>, headers: HeaderMap) -> Response {
    let result = async {
        let (key, _) = gw.authenticate(&headers).await?;
        Gateway::allowed(&key, "models", None)?;
        let models = gw.models().await?;
        let data: Vec<serde_json::Value> = models
            .iter()
            .filter(|m| key.models.is_empty() || key.models.contains(&m.name))
            .map(model_json)
            .collect();
        Ok::<_, ApiError>(axum::Json(
            serde_json::json!({"object": "list", "data": data}),
        ))
    }
    .await;
    result.into_response()
}

async fn get_model(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let (key, _) = gw.authenticate(&headers).await?;
        Gateway::allowed(&key, "models", Some(&id))?;
        let models = gw.models().await?;
        models
            .iter()
            .find(|m| m.name == id)
            .map(|m| axum::Json(model_json(m)))
            .ok_or_else(|| ApiError::model_not_found(&id))
    }
    .await;
    result.into_response()
}

#[derive(serde::Deserialize)]
struct GenerationQuery {
    id: String,
}

/// `GET /v1/generation?id=chatcmpl-…`: what a request used and cost, which node served it,
/// and its signed receipt once settled. Only the key's own account's requests.
async fn generation(
    State(gw): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<GenerationQuery>,
) -> Response {
    let result = async {
        let (key, _) = gw.authenticate(&headers).await?;
        let job_id = chat::job_of_response_id(&query.id).ok_or_else(|| {
            ApiError::invalid(
                "id",
                "not a response id of this gateway (chatcmpl-… or embd-…)",
            )
        })?;
        let job = match gw.inner.client.job_get(job_id).await {
            Ok(job) if job.account == key.account => job,
            Ok(_) => return Err(ApiError::not_found(format!("no generation {}", query.id))),
            Err(e) if e.remote().map(|r| r.code) == Some(ErrorCode::NotFound) => {
                return Err(ApiError::not_found(format!("no generation {}", query.id)));
            }
            Err(e) => return Err(bus_error(&e)),
        };
        let receipt = if job.state.is_terminal() {
            gw.inner.client.receipt_get(job_id).await.ok()
        } else {
            None
        };
        let usage = job.billed_usage.map(|u| {
            serde_json::json!({"prompt_tokens": u.input_units, "completion_tokens": u.output_units,
                "total_tokens": u.input_units + u.output_units})
        });
        Ok(axum::Json(serde_json::json!({
            "id": query.id,
            "job_id": job.job_id,
            "state": job.state,
            "node_id": job.node_id,
            "usage": usage,
            "reported_usage": job.reported_usage,
            "held_micros": job.max_cost_micros,
            "cost_micros": job.cost_micros,
            "provider_micros": job.provider_micros,
            "fee_micros": job.fee_micros,
            "refund_micros": job.refund_micros,
            "receipt": receipt,
        })))
    }
    .await;
    result.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape_and_retry_headers() {
        let response = ApiError::insufficient_quota("empty").into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let response = ApiError::rate_limited("slow down", 7).into_response();
        assert_eq!(response.headers()["retry-after"], "7");
        let body = ApiError::invalid("messages", "empty").body();
        assert_eq!(body["error"]["param"], "messages");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["code"].is_null());
    }
}
