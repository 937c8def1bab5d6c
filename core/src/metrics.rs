//! Prometheus metrics of the daemons. Each daemon owns its own [`Registry`] (several daemons run
//! in one process under `rhizos up` and in the tests, so nothing is global), and [`serve`]
//! answers `GET /metrics` with the text exposition of one or several of them — on a listener of
//! its own, never on the gateway's public port.
//!
//! Counters and histograms are updated where things happen; gauges that describe the state of
//! the database or the registry (jobs by state, nodes by status, escrow held) are read when
//! scraped, through each daemon's [`Source::refresh`].

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures::future::BoxFuture;
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::Arc;

/// Latency buckets, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

// Building and registering a metric fails only for an invalid or duplicate name. Every name
// here is a constant, valid, registered once on a registry of its own, so the helpers below
// cannot fail (the unit tests build every daemon's metrics): their `expect`s are allowed.

#[allow(clippy::expect_used)]
fn registered<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are constant and registered once");
    c
}

#[allow(clippy::expect_used)]
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    registered(
        registry,
        IntCounter::new(name, help).expect("a constant, valid metric name"),
    )
}

#[allow(clippy::expect_used)]
fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("a constant, valid metric name"),
    )
}

#[allow(clippy::expect_used)]
fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    registered(
        registry,
        IntGauge::new(name, help).expect("a constant, valid metric name"),
    )
}

#[allow(clippy::expect_used)]
fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("a constant, valid metric name"),
    )
}

#[allow(clippy::expect_used)]
fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    registered(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("a constant, valid metric name"),
    )
}

#[allow(clippy::expect_used)]
fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    registered(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("a constant, valid metric name"),
    )
}

/// The orchestrator's metrics.
pub struct OrchestratorMetrics {
    pub registry: Registry,
    /// Requests served, by operation and outcome (`ok` or the error code).
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    /// One group commit of the ledger thread: how long, how many operations.
    pub commit_seconds: Histogram,
    pub group_size: Histogram,
    /// One ledger operation, from being queued to its commit being durable: what a request
    /// waits for the ledger (queueing behind other batches included).
    pub ledger_wait_seconds: Histogram,
    pub heartbeats: IntCounter,
    /// Ended jobs whose payloads were dropped (`job_payload_max_age_s`).
    pub jobs_pruned: IntCounter,
    /// Lost nodes whose registration was forgotten (`lost_node_max_age_s`).
    pub nodes_forgotten: IntCounter,
    /// 1 while this orchestrator holds the lease and serves; 0 while a standby.
    pub active: IntGauge,
    /// From submit to the node's `running` report.
    pub submit_to_running_seconds: Histogram,
    /// From a finished report's arrival to its settlement being durable.
    pub settle_seconds: Histogram,
    // Read when scraped.
    pub jobs: IntGaugeVec,
    pub nodes: IntGaugeVec,
    pub outbox_pending: IntGauge,
    pub escrow_held_micros: IntGauge,
    pub fees_micros: IntGauge,
}

impl OrchestratorMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            requests: counter_vec(
                &r,
                "rhizos_orchestrator_requests_total",
                "Requests served, by operation and outcome (ok or the error code).",
                &["op", "outcome"],
            ),
            request_seconds: histogram_vec(
                &r,
                "rhizos_orchestrator_request_seconds",
                "Time to answer a request, by operation (ledger commit included).",
                &["op"],
                LATENCY_BUCKETS,
            ),
            commit_seconds: histogram(
                &r,
                "rhizos_ledger_commit_seconds",
                "One group commit of the ledger thread: its operations and the durable commit.",
                LATENCY_BUCKETS,
            ),
            group_size: histogram(
                &r,
                "rhizos_ledger_group_size",
                "Ledger operations committed together by one fsync.",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            ledger_wait_seconds: histogram(
                &r,
                "rhizos_ledger_wait_seconds",
                "One ledger operation from being queued to its commit being durable (queueing included).",
                LATENCY_BUCKETS,
            ),
            heartbeats: counter(&r, "rhizos_heartbeats_total", "Node heartbeats received."),
            jobs_pruned: counter(
                &r,
                "rhizos_jobs_pruned_total",
                "Ended jobs whose payloads were dropped after job_payload_max_age_s.",
            ),
            nodes_forgotten: counter(
                &r,
                "rhizos_nodes_forgotten_total",
                "Lost nodes whose registration was forgotten after lost_node_max_age_s.",
            ),
            active: gauge(
                &r,
                "rhizos_orchestrator_active",
                "1 while this orchestrator holds the lease and serves, 0 while a standby.",
            ),
            submit_to_running_seconds: histogram(
                &r,
                "rhizos_job_submit_to_running_seconds",
                "From a job's submit to its node's running report being recorded.",
                LATENCY_BUCKETS,
            ),
            settle_seconds: histogram(
                &r,
                "rhizos_job_settle_seconds",
                "From a finished report's arrival to its settlement (or refund) being durable.",
                LATENCY_BUCKETS,
            ),
            jobs: gauge_vec(&r, "rhizos_jobs", "Jobs by state.", &["state"]),
            nodes: gauge_vec(
                &r,
                "rhizos_nodes",
                "Registered nodes by status (live: heartbeating; lost: silent past the window).",
                &["status"],
            ),
            outbox_pending: gauge(
                &r,
                "rhizos_outbox_pending",
                "Events committed but not yet published to JetStream (the outbox's lag).",
            ),
            escrow_held_micros: gauge(
                &r,
                "rhizos_escrow_held_micros",
                "Money held in escrow for jobs not yet settled, micro-USD.",
            ),
            fees_micros: gauge(
                &r,
                "rhizos_fees_micros",
                "Fees earned by the platform so far (platform:fees), micro-USD.",
            ),
            registry: r,
        }
    }
}

impl Default for OrchestratorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The AI gateway's metrics.
pub struct GatewayMetrics {
    pub registry: Registry,
    /// Requests admitted (key checked, body valid), by route, model and outcome (`served` or
    /// the OpenAI error code).
    pub requests: IntCounterVec,
    /// Units served and billed from the node's counts, by model and direction (input, output).
    pub tokens: IntCounterVec,
    /// Errors by model and OpenAI error code.
    pub errors: IntCounterVec,
    /// From the request's admission to its first chunk from the node.
    pub first_chunk_seconds: HistogramVec,
    /// The submit round trip (hold committed, node chosen).
    pub submit_seconds: Histogram,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            requests: counter_vec(
                &r,
                "rhizos_gateway_requests_total",
                "Requests admitted, by route, model and outcome (served or the error code).",
                &["route", "model", "outcome"],
            ),
            tokens: counter_vec(
                &r,
                "rhizos_gateway_tokens_total",
                "Units served (tokens; characters for speech; pages for scrape), by model and direction.",
                &["model", "direction"],
            ),
            errors: counter_vec(
                &r,
                "rhizos_gateway_errors_total",
                "Requests that ended in an error, by model and OpenAI error code.",
                &["model", "code"],
            ),
            first_chunk_seconds: histogram_vec(
                &r,
                "rhizos_gateway_first_chunk_seconds",
                "From a request's admission to its first chunk from the node.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            submit_seconds: histogram(
                &r,
                "rhizos_gateway_submit_seconds",
                "The submit round trip to the orchestrator (hold committed, node chosen).",
                LATENCY_BUCKETS,
            ),
            registry: r,
        }
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A node agent's metrics.
pub struct AgentMetrics {
    pub registry: Registry,
    /// Executions ended, by backend and how they ended.
    pub executions: IntCounterVec,
    pub running: IntGauge,
    /// Plugin calls (start, models, describe…) by plugin and call.
    pub plugin_calls: IntCounterVec,
    pub log_lines: IntCounter,
    pub chunks: IntCounter,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            executions: counter_vec(
                &r,
                "rhizos_agent_executions_total",
                "Executions ended, by backend and outcome.",
                &["backend", "outcome"],
            ),
            running: gauge(&r, "rhizos_agent_running", "Executions running now."),
            plugin_calls: counter_vec(
                &r,
                "rhizos_agent_plugin_calls_total",
                "Calls into backend plugins, by plugin and call.",
                &["plugin", "call"],
            ),
            log_lines: counter(
                &r,
                "rhizos_agent_log_lines_total",
                "Job output lines streamed live.",
            ),
            chunks: counter(
                &r,
                "rhizos_agent_chunks_total",
                "AI response chunks published.",
            ),
            registry: r,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One daemon's metrics for [`serve`]: its registry, and what to read before a scrape.
#[derive(Clone)]
pub struct Source {
    pub registry: Registry,
    pub refresh: Option<Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>>,
}

impl Source {
    pub fn of(registry: &Registry) -> Self {
        Self {
            registry: registry.clone(),
            refresh: None,
        }
    }
}

/// The text exposition of `sources`, refreshed first.
pub async fn render(sources: &[Source]) -> String {
    for source in sources {
        if let Some(refresh) = &source.refresh {
            refresh().await;
        }
    }
    let families: Vec<_> = sources.iter().flat_map(|s| s.registry.gather()).collect();
    let mut text = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut text) {
        tracing::warn!(error = %e, "metrics not encoded");
    }
    String::from_utf8(text).unwrap_or_default()
}

async fn metrics(State(sources): State<Arc<Vec<Source>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
        render(&sources).await,
    )
}

/// Serves `GET /metrics` for `sources` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Vec<Source>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Arc::new(sources));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_daemon_s_metrics_register_and_render_with_their_help() {
        let (o, g, a) = (
            OrchestratorMetrics::new(),
            GatewayMetrics::new(),
            AgentMetrics::new(),
        );
        o.jobs.with_label_values(&["running"]).set(3);
        o.requests.with_label_values(&["job.submit", "ok"]).inc();
        g.tokens.with_label_values(&["smollm2", "output"]).inc_by(7);
        a.executions.with_label_values(&["wasm", "exited"]).inc();
        let text = render(&[
            Source::of(&o.registry),
            Source::of(&g.registry),
            Source::of(&a.registry),
        ])
        .await;
        for line in [
            "rhizos_jobs{state=\"running\"} 3",
            "rhizos_orchestrator_requests_total{op=\"job.submit\",outcome=\"ok\"} 1",
            "rhizos_gateway_tokens_total{direction=\"output\",model=\"smollm2\"} 7",
            "rhizos_agent_executions_total{backend=\"wasm\",outcome=\"exited\"} 1",
            "# HELP rhizos_ledger_commit_seconds",
            "# TYPE rhizos_ledger_group_size histogram",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn the_grafana_dashboard_names_only_metrics_the_daemons_serve() {
        // Every metric name is a literal in this file (a vector without children is not
        // gathered, so the registries cannot list them all before traffic).
        let source = include_str!("metrics.rs");
        let dashboard = include_str!("../../docs/grafana-dashboard.json");
        let mut named = 0;
        for (at, _) in dashboard.match_indices("rhizos_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                source.contains(&format!("\"{base}\"")),
                "the dashboard plots {name}, which no daemon serves"
            );
            named += 1;
        }
        assert!(named > 20, "{named}");
    }
}
