//! The web dashboard, served by the gateway under `/dashboard` (the same port as the API).
//!
//! A person signs in with the credentials file `rhizos user add` wrote (pasted or picked in the
//! page); the gateway then connects to NATS *as that party* for the session, so the bus's own
//! permissions decide what the page can see and do — a user their own account, the operator
//! everything — exactly as for the CLI. The gateway's own role grants the page nothing. The
//! session is a random 256-bit token in an `HttpOnly`, `SameSite=Strict` cookie scoped to
//! `/dashboard`; state-changing calls also need the `X-Rhizos-Dashboard` header (a form on
//! another site cannot send it). Idle sessions close after an hour.
//!
//! The page itself (`dashboard/index.html`, `app.js`, `app.css`) is plain HTML, CSS and JS
//! built into the binary: no Node toolchain, no third-party scripts, a strict CSP. Live updates
//! come by Server-Sent Events fed from the session's NATS subscriptions (events, and the job's
//! log lines when the page follows one).

use super::Gateway;
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use rhizos_broker::config::NatsSettings;
use rhizos_broker::identity::Credentials;
use rhizos_broker::wire::{self, JobSpec, SubmitJob, WIRE_VERSION, Workload};
use rhizos_broker::{Bus, Caller, Client, RequestError, Role};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const INDEX: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

const COOKIE: &str = "rhizos_session";
/// Sessions close after this long without a request.
const IDLE: Duration = Duration::from_secs(3_600);
/// Most sessions at once (each holds a NATS connection).
const MAX_SESSIONS: usize = 1_000;

/// The dashboard's state: where NATS is, and the signed-in sessions.
pub struct Dashboard {
    nats: NatsSettings,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

/// One signed-in person: their own connection to the bus.
pub struct Session {
    caller: Caller,
    bus: Bus,
    client: Client,
    last_used: Mutex<Instant>,
}

impl Session {
    /// The account this session acts for (None: the operator's whole network).
    fn account(&self) -> Option<&str> {
        (self.caller.role == Role::User).then_some(self.caller.name.as_str())
    }
}

impl Dashboard {
    pub fn new(nats: NatsSettings) -> Self {
        Self {
            nats,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Closes sessions idle for longer than an hour (their NATS connections with them).
    pub fn sweep(&self) {
        self.sessions().retain(|_, s| {
            s.last_used
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
                < IDLE
        });
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An error as the page shows it: `{"error": "…"}` with a status.
struct PageError(StatusCode, String);

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<RequestError> for PageError {
    fn from(e: RequestError) -> Self {
        let status = match e.remote().map(|r| r.code) {
            Some(wire::ErrorCode::Forbidden) => StatusCode::FORBIDDEN,
            Some(wire::ErrorCode::NotFound) => StatusCode::NOT_FOUND,
            Some(
                wire::ErrorCode::BadRequest
                | wire::ErrorCode::InsufficientFunds
                | wire::ErrorCode::NoCapacity,
            ) => StatusCode::BAD_REQUEST,
            Some(_) => StatusCode::BAD_GATEWAY,
            None => StatusCode::SERVICE_UNAVAILABLE,
        };
        let message = match e.remote() {
            Some(remote) => remote.message.clone(),
            None => format!("the network did not answer: {e}"),
        };
        PageError(status, message)
    }
}

type PageResult<T> = Result<T, PageError>;

fn bad(message: impl Into<String>) -> PageError {
    PageError(StatusCode::BAD_REQUEST, message.into())
}

pub fn router(gateway: Gateway) -> Router {
    Router::new()
        .route(
            "/dashboard",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { page(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route(
            "/dashboard/api/session",
            post(sign_in).get(me).delete(sign_out),
        )
        .route("/dashboard/api/stats", get(stats))
        .route("/dashboard/api/nodes", get(nodes))
        .route("/dashboard/api/nodes/{id}", get(node))
        .route("/dashboard/api/jobs", get(jobs).post(submit))
        .route("/dashboard/api/jobs/{id}", get(job))
        .route("/dashboard/api/jobs/{id}/cancel", post(cancel))
        .route("/dashboard/api/flows", get(flows).post(run_flow))
        .route("/dashboard/api/flows/{id}", get(flow))
        .route("/dashboard/api/flows/{id}/cancel", post(cancel_flow))
        .route("/dashboard/api/modules", get(modules))
        .route("/dashboard/api/account", get(account))
        .route("/dashboard/api/keys", get(keys).post(create_key))
        .route("/dashboard/api/keys/{id}/revoke", post(revoke_key))
        .route("/dashboard/api/receipts/{id}", get(receipt))
        .route("/dashboard/api/events", get(events))
        .layer(axum::extract::DefaultBodyLimit::max(16 << 20))
        .with_state(gateway)
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn dashboard(gateway: &Gateway) -> PageResult<&Dashboard> {
    gateway.dashboard.as_deref().ok_or_else(|| {
        PageError(
            StatusCode::NOT_FOUND,
            "this gateway serves no dashboard".into(),
        )
    })
}

/// The session of a request's cookie, if it is signed in (and its idle clock reset).
fn session(gateway: &Gateway, headers: &HeaderMap) -> PageResult<Arc<Session>> {
    let dashboard = dashboard(gateway)?;
    let token = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned());
    let signed_out = || {
        PageError(
            StatusCode::UNAUTHORIZED,
            "not signed in (or the session expired): sign in with your credentials file".into(),
        )
    };
    let token = token.ok_or_else(signed_out)?;
    let mut sessions = dashboard.sessions();
    let session = sessions.get(&token).cloned().ok_or_else(signed_out)?;
    let mut last = session
        .last_used
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if last.elapsed() > IDLE {
        drop(last);
        sessions.remove(&token);
        return Err(signed_out());
    }
    *last = Instant::now();
    drop(last);
    Ok(session)
}

/// A state-changing call must carry the dashboard's header (a cross-site form cannot).
fn changing(headers: &HeaderMap) -> PageResult<()> {
    if headers.contains_key("x-rhizos-dashboard") {
        Ok(())
    } else {
        Err(PageError(
            StatusCode::FORBIDDEN,
            "missing the X-Rhizos-Dashboard header".into(),
        ))
    }
}

#[derive(Deserialize)]
struct SignIn {
    /// The credentials file's text.
    credentials: String,
}

async fn sign_in(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Json(form): Json<SignIn>,
) -> PageResult<Response> {
    changing(&headers)?;
    let dashboard = dashboard(&gateway)?;
    let credentials = Credentials::parse(form.credentials.trim()).map_err(|problem| {
        bad(format!(
            "these are not RhizOS credentials ({problem}); use the file `rhizos user add NAME` wrote"
        ))
    })?;
    let caller = credentials.caller();
    if !matches!(caller.role, Role::User | Role::Operator) {
        return Err(bad(format!(
            "{caller} cannot sign in here: use a user's or the operator's credentials"
        )));
    }
    let bus = Bus::connect_with(&dashboard.nats, Some(credentials))
        .await
        .map_err(|e| {
            PageError(
                StatusCode::UNAUTHORIZED,
                format!("the network refused these credentials: {e}"),
            )
        })?;
    // The connection is accepted before the server checks permissions: one request proves the
    // credentials are enrolled.
    let client = Client::new(bus.clone());
    let account = (caller.role == Role::User).then(|| caller.name.clone());
    client
        .network_stats(account.as_deref())
        .await
        .map_err(|e| PageError(StatusCode::UNAUTHORIZED, format!("signed in, but: {e}")))?;
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    {
        dashboard.sweep();
        let mut sessions = dashboard.sessions();
        if sessions.len() >= MAX_SESSIONS {
            return Err(PageError(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many dashboard sessions; try again later".into(),
            ));
        }
        sessions.insert(
            token.clone(),
            Arc::new(Session {
                caller: caller.clone(),
                bus,
                client,
                last_used: Mutex::new(Instant::now()),
            }),
        );
    }
    tracing::info!(%caller, "dashboard: signed in");
    let cookie =
        format!("{COOKIE}={token}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=86400");
    let mut response = Json(me_json(&caller)).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

fn me_json(caller: &Caller) -> serde_json::Value {
    serde_json::json!({
        "signed_in": true,
        "role": caller.role.as_str(),
        "name": caller.name,
        "account": (caller.role == Role::User).then_some(&caller.name),
    })
}

/// Who is signed in (`{"signed_in": false}` when nobody: the page's first question).
async fn me(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> PageResult<Json<serde_json::Value>> {
    dashboard(&gateway)?;
    Ok(Json(match session(&gateway, &headers) {
        Ok(session) => me_json(&session.caller),
        Err(_) => serde_json::json!({ "signed_in": false }),
    }))
}

async fn sign_out(State(gateway): State<Gateway>, headers: HeaderMap) -> PageResult<Response> {
    changing(&headers)?;
    if let Ok(session) = session(&gateway, &headers) {
        dashboard(&gateway)?
            .sessions()
            .retain(|_, s| !Arc::ptr_eq(s, &session));
    }
    let mut response = Json(serde_json::json!({"ok": true})).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "rhizos_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(response)
}

async fn stats(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> PageResult<Json<wire::NetworkStatsView>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.network_stats(session.account()).await?))
}

async fn nodes(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> PageResult<Json<wire::NodeList>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.node_list().await?))
}

async fn node(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<serde_json::Value>> {
    let session = session(&gateway, &headers)?;
    let view = session.client.node_info(&id).await?;
    // The node's agent answers for its plugins live; a lost node does not.
    let plugins = match session.client.node_plugins(&id).await {
        Ok(list) => serde_json::json!({ "ok": list }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    Ok(Json(
        serde_json::json!({ "node": view, "plugins": plugins }),
    ))
}

#[derive(Deserialize)]
struct JobsQuery {
    limit: Option<u32>,
}

async fn jobs(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<JobsQuery>,
) -> PageResult<Json<wire::JobList>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(
        session
            .client
            .job_list(
                session.account(),
                None,
                Some(query.limit.unwrap_or(200).min(1_000)),
            )
            .await?,
    ))
}

async fn job(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::JobView>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.job_get(&id).await?))
}

async fn cancel(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::JobView>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.job_cancel(&id).await?))
}

/// The Deploy page's form.
#[derive(Deserialize)]
struct Deploy {
    /// A WASM module (base64), or
    module_b64: Option<String>,
    /// a registry module (`chain://id[@version]`).
    module_uri: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    /// USD, e.g. "0.05".
    max_cost_usd: String,
    timeout_secs: Option<u64>,
    #[serde(default)]
    gpus: u32,
    #[serde(default)]
    min_vram_mib: u64,
    memory_mib: Option<u64>,
    /// Operators submit for an account they name.
    account: Option<String>,
}

async fn submit(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Json(form): Json<Deploy>,
) -> PageResult<Json<wire::SubmitJobReply>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    let account = match (session.account(), form.account) {
        (Some(own), _) => own.to_owned(),
        (None, Some(named)) => named,
        (None, None) => return Err(bad("name the account the job is charged to")),
    };
    let max_cost_micros =
        wire::parse_usd(&form.max_cost_usd).map_err(|e| bad(format!("max cost: {e}")))?;
    let workload = match (form.module_b64, form.module_uri) {
        (Some(module_b64), None) => Workload::Wasm { module_b64 },
        (None, Some(uri)) => {
            wire::ModuleRef::parse(&uri).map_err(|e| bad(format!("module: {e}")))?;
            Workload::Module { uri }
        }
        _ => return Err(bad("give either a WASM module file or a chain:// module")),
    };
    let mut spec = JobSpec::new(
        workload,
        form.timeout_secs.unwrap_or(30).clamp(1, 86_400) * 1_000,
        form.memory_mib.unwrap_or(128),
    );
    spec.args = form.args;
    spec.gpus = form.gpus;
    spec.min_vram_mib = form.min_vram_mib;
    let request = SubmitJob {
        v: WIRE_VERSION,
        job_id: Some(format!("job-{}", uuid::Uuid::now_v7().simple())),
        account,
        spec,
        max_cost_micros,
        api_key_sha256: None,
    };
    Ok(Json(session.client.submit(&request).await?))
}

async fn flows(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> PageResult<Json<wire::FlowList>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(
        session
            .client
            .flow_list(session.account(), Some(100))
            .await?,
    ))
}

async fn flow(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::FlowView>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.flow_get(&id).await?))
}

async fn cancel_flow(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::FlowView>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.flow_cancel(&id).await?))
}

/// The Flows page's form: a flow file's text (JSON or TOML, as `rhizos flow run` reads it).
#[derive(Deserialize)]
struct FlowForm {
    flow: String,
    /// Operators name the paying account.
    account: Option<String>,
}

async fn run_flow(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Json(form): Json<FlowForm>,
) -> PageResult<Json<wire::FlowView>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    let account = match (session.account(), form.account) {
        (Some(own), _) => own.to_owned(),
        (None, Some(named)) if !named.is_empty() => named,
        _ => return Err(bad("name the account the flow is paid from")),
    };
    let text = form.flow.trim();
    let spec: wire::FlowSpec = if text.starts_with('{') {
        serde_json::from_str(text).map_err(|e| bad(format!("the flow is not valid JSON: {e}")))?
    } else {
        toml::from_str(text).map_err(|e| bad(format!("the flow is not valid TOML: {e}")))?
    };
    spec.plan().map_err(|e| bad(e.to_string()))?;
    let flow_id = format!("flow-{}", &uuid::Uuid::now_v7().simple().to_string()[..20]);
    Ok(Json(
        session
            .client
            .flow_run(Some(&flow_id), &account, spec)
            .await?,
    ))
}

async fn modules(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
) -> PageResult<Json<wire::ModuleList>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.module_list().await?))
}

#[derive(Deserialize)]
struct AccountQuery {
    /// Operators look at the account they name.
    account: Option<String>,
}

async fn account(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<AccountQuery>,
) -> PageResult<Json<serde_json::Value>> {
    let session = session(&gateway, &headers)?;
    let account = named_account(&session, query.account)?;
    let view = session.client.account_balance(&account).await?;
    let statement = session.client.account_statement(&account, Some(50)).await?;
    Ok(Json(
        serde_json::json!({ "account": view, "statement": statement }),
    ))
}

fn named_account(session: &Session, asked: Option<String>) -> PageResult<String> {
    match (session.account(), asked) {
        (Some(own), _) => Ok(own.to_owned()),
        (None, Some(named)) if !named.is_empty() => Ok(named),
        (None, _) => Err(bad("name an account")),
    }
}

async fn keys(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<AccountQuery>,
) -> PageResult<Json<wire::KeyList>> {
    let session = session(&gateway, &headers)?;
    let account = named_account(&session, query.account)?;
    Ok(Json(session.client.key_list(&account).await?))
}

#[derive(Deserialize)]
struct NewKey {
    account: Option<String>,
    name: Option<String>,
    credit_limit_usd: Option<String>,
}

async fn create_key(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Json(form): Json<NewKey>,
) -> PageResult<Json<wire::CreatedKey>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    let account = named_account(&session, form.account)?;
    let credit_limit_micros = match form.credit_limit_usd.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(wire::parse_usd(text).map_err(|e| bad(format!("credit limit: {e}")))?),
    };
    Ok(Json(
        session
            .client
            .key_create(wire::CreateKey {
                account,
                name: form.name.filter(|n| !n.trim().is_empty()),
                credit_limit_micros,
                ..wire::CreateKey::default()
            })
            .await?,
    ))
}

async fn revoke_key(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::KeyView>> {
    changing(&headers)?;
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.key_revoke(&id).await?))
}

async fn receipt(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult<Json<wire::SignedReceipt>> {
    let session = session(&gateway, &headers)?;
    Ok(Json(session.client.receipt_get(&id).await?))
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Also this job's log lines.
    job: Option<String>,
}

/// Server-Sent Events from the session's own subscriptions: `event: event` (job and escrow
/// events), `event: log` (the followed job's lines), `event: heartbeat` (operator).
async fn events(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> PageResult<Response> {
    let session = session(&gateway, &headers)?;
    let bus = &session.bus;
    let subject = match session.account() {
        Some(account) => bus
            .subjects
            .account_events(account)
            .map_err(|e| bad(e.to_string()))?,
        None => bus.subjects.events_wildcard(),
    };
    let mut streams = vec![(
        "event",
        bus.client
            .subscribe(subject)
            .await
            .map_err(|e| PageError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
    )];
    if let Some(job_id) = query.job {
        let logs = bus
            .subjects
            .job_logs_of(session.account(), &job_id)
            .map_err(|e| bad(e.to_string()))?;
        streams.push((
            "log",
            bus.client
                .subscribe(logs)
                .await
                .map_err(|e| PageError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
        ));
    }
    if session.account().is_none() {
        streams.push((
            "heartbeat",
            bus.client
                .subscribe(bus.subjects.node_heartbeat_wildcard())
                .await
                .map_err(|e| PageError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
        ));
    }
    let merged = futures::stream::select_all(
        streams
            .into_iter()
            .map(|(kind, subscriber)| subscriber.map(move |m| (kind, m))),
    );
    // The session stays alive while its page listens.
    let keep = session.clone();
    let stream = merged.map(move |(kind, message)| {
        let _ = &keep;
        Ok::<_, std::convert::Infallible>(
            SseEvent::default()
                .event(kind)
                .data(String::from_utf8_lossy(&message.payload)),
        )
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
