//! `rhizosd`: the RhizOS daemons. `rhizosd orchestrator` and `rhizosd agent` run one role each;
//! both read `rhizos.toml` (or `--config`) and `RHIZOS_<SECTION>__<KEY>` variables.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rhizos_broker::{Bus, Settings};
use rhizos_core::{Agent, Gateway, Orchestrator, telemetry};
use std::path::PathBuf;

/// mimalloc instead of glibc's allocator: the orchestrator allocates small, short-lived buffers
/// on several threads at once (requests, events, ledger operations), where it measured ~20% more
/// jobs settled per second (`rhizos-bench marketplace`, which uses the same allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rhizosd",
    version,
    about = "RhizOS daemons: the orchestrator, the node agent and the AI gateway"
)]
struct Cli {
    /// Config file (default: ./rhizos.toml when present). Environment variables
    /// RHIZOS_<SECTION>__<KEY> override it, e.g. RHIZOS_NATS__URL.
    #[arg(long, global = true, env = "RHIZOS_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL (overrides [nats] url).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Subject namespace (overrides [nats] namespace).
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// Credentials file this daemon authenticates with (overrides [nats] credentials): the
    /// orchestrator's, or the node's from `rhizos node enroll`.
    #[arg(long, global = true)]
    credentials: Option<PathBuf>,
    /// Serve Prometheus metrics on this address at /metrics (overrides [metrics] listen), e.g.
    /// 127.0.0.1:9464. Off by default; never on the gateway's public port.
    #[arg(long, global = true)]
    metrics: Option<String>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve job, account and node requests; match jobs to nodes; keep the escrow ledger.
    Orchestrator {
        /// Directory for ledger.db (overrides [orchestrator] data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run jobs on this machine through the backend plugins in the plugin directory.
    Agent {
        /// Plugin directory (overrides [agent] plugin_dir).
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
        /// Node id (overrides [agent] node_id).
        #[arg(long)]
        node_id: Option<String>,
    },
    /// Serve the OpenAI-compatible HTTP API (chat with streaming, embeddings, models): each
    /// request is held in escrow against its API key's account, served by a node and settled
    /// by the tokens it delivered. Authenticates with gateway credentials (`rhizos user add
    /// --gateway`).
    Gateway {
        /// Address to listen on (overrides [gateway] listen), e.g. 0.0.0.0:8080.
        #[arg(long)]
        listen: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info", cli.log_json);
    // Listening from here on: Ctrl-C or SIGTERM while starting stops the daemon cleanly.
    let shutdown = telemetry::Shutdown::listen().context("cannot listen for Ctrl-C and SIGTERM")?;
    let stopped = |shutdown: &telemetry::Shutdown| {
        let shutdown = shutdown.clone();
        async move { shutdown.signalled().await }
    };
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(url) = cli.nats_url {
        settings.nats.url = url;
    }
    if let Some(namespace) = cli.namespace {
        settings.nats.namespace = namespace;
    }
    if let Some(credentials) = cli.credentials {
        settings.nats.credentials = Some(credentials);
    }
    if cli.metrics.is_some() {
        settings.metrics.listen = cli.metrics;
    }
    let metrics_listener =
        match &settings.metrics.listen {
            Some(address) => Some(tokio::net::TcpListener::bind(address).await.with_context(
                || {
                    format!(
                        "cannot serve metrics on {address} (in use? choose another with --metrics)"
                    )
                },
            )?),
            None => None,
        };
    // Serves the daemon's metrics, when asked for, until the daemon stops.
    let serve_metrics = |source: rhizos_core::metrics::Source| {
        if let Some(listener) = metrics_listener {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(%address, "metrics at http://{address}/metrics");
            }
            tokio::spawn(rhizos_core::metrics::serve(
                listener,
                vec![source],
                stopped(&shutdown),
            ));
        }
    };
    let bus = tokio::select! {
        bus = Bus::connect(&settings.nats) => bus?,
        () = shutdown.signalled() => return Ok(()),
    };
    if !bus.client.server_info().auth_required {
        tracing::warn!(
            url = %settings.nats.url,
            "the NATS server does not authenticate clients: anyone who reaches it can act as anyone (README: Identity and permissions)"
        );
    }
    match cli.role {
        Role::Orchestrator { data_dir } => {
            if let Some(dir) = data_dir {
                settings.orchestrator.data_dir = dir;
            }
            let orchestrator = tokio::select! {
                opened = Orchestrator::open(bus, settings.orchestrator) => {
                    opened.context("failed to start the orchestrator")?
                }
                () = shutdown.signalled() => return Ok(()),
            };
            serve_metrics(orchestrator.metrics_source());
            orchestrator.run(stopped(&shutdown)).await
        }
        Role::Agent {
            plugin_dir,
            node_id,
        } => {
            if let Some(dir) = plugin_dir {
                settings.agent.plugin_dir = dir;
            }
            if node_id.is_some() {
                settings.agent.node_id = node_id;
            }
            let agent = Agent::new(bus, settings.agent, settings.pricing)
                .context("failed to start the agent")?;
            serve_metrics(agent.metrics_source());
            agent.run(stopped(&shutdown)).await
        }
        Role::Gateway { listen } => {
            if let Some(listen) = listen {
                settings.gateway.listen = listen;
            }
            let listener = tokio::net::TcpListener::bind(&settings.gateway.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (another process has it? choose another with --listen)",
                        settings.gateway.listen
                    )
                })?;
            println!("gateway listening on http://{}/v1", listener.local_addr()?);
            let dashboard = settings.gateway.dashboard;
            let mut gateway = Gateway::new(bus, settings.gateway);
            if dashboard {
                println!("dashboard on http://{}/dashboard", listener.local_addr()?);
                gateway = gateway.with_dashboard(settings.nats.clone());
            }
            serve_metrics(gateway.metrics_source());
            gateway.serve(listener, stopped(&shutdown)).await
        }
    }
}
