//! `rhizos up`: a whole local network in one process — nats-server (started only if none answers
//! at the configured URL), the orchestrator and one agent — until Ctrl-C.

use crate::GlobalArgs;
use crate::local::{self, LocalNetwork};
use anyhow::Context as _;
use clap::Args;
use rhizos_broker::server::{LaunchOptions, NatsServer, is_reachable};
use rhizos_broker::{Bus, Caller};
use rhizos_core::{Agent, Orchestrator};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct UpArgs {
    /// Where the network keeps its state: ledger.db, nats/ (JetStream) and plugins/.
    #[arg(long, default_value = ".rhizos")]
    data_dir: PathBuf,
    /// Directory to load backend plugins from. Default: the backend plugins (librhizos_plugin_*.so,
    /// not the resolvers) built next to this executable, linked into <data-dir>/plugins.
    #[arg(long)]
    plugin_dir: Option<PathBuf>,
    /// Node id of the local agent.
    #[arg(long, default_value = "local")]
    node_id: String,
    /// Show the daemons' logs (orchestrator, agent, plugins) on the terminal instead of writing
    /// them to <data-dir>/rhizos.log. RUST_LOG sets their level either way (default info).
    #[arg(long, short)]
    verbose: bool,
    /// Exit once everything is up (for scripts that only check it starts).
    #[arg(long, hide = true)]
    check: bool,
    /// Start nats-server without authentication (anyone who reaches its port can act as anyone:
    /// only for experiments on a machine nobody else can reach).
    #[arg(long)]
    insecure: bool,
    /// Where the OpenAI-compatible AI gateway listens (overrides [gateway] listen).
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// Do not start the AI gateway.
    #[arg(long, conflicts_with = "gateway")]
    no_gateway: bool,
    /// Where Prometheus metrics of the orchestrator, agent and gateway are served, at /metrics
    /// (overrides [metrics] listen; default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics")]
    no_metrics: bool,
    /// Start a NATS cluster of this many servers (at least 3) on this machine instead of one,
    /// with the streams, the lease and the replicated ledger kept on three of them, and two
    /// orchestrator processes (<data-dir>/orchestrators/1 and 2) sharing that ledger: one
    /// active, one following it. Kill a server (its pid is in
    /// <data-dir>/nats/rhizos-<i>/nats-server.pid) or the active orchestrator (its pid is in
    /// its data dir's lock file) and the network carries on. The first server listens on the
    /// configured URL's port.
    #[arg(long, value_name = "SERVERS", value_parser = clap::value_parser!(u8).range(3..=9))]
    cluster: Option<u8>,
}

impl UpArgs {
    /// Where the daemons' logs go: `<data-dir>/rhizos.log`, or `None` (the terminal) with
    /// `--verbose`.
    pub fn log_file(&self) -> Option<PathBuf> {
        (!self.verbose).then(|| self.data_dir.join("rhizos.log"))
    }
}

/// Sends the daemons' logs to `path` (appended, no colours), keeping the terminal for the lines
/// `rhizos up` writes for its user.
pub fn log_to_file(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

pub async fn run(global: &GlobalArgs, args: UpArgs) -> anyhow::Result<()> {
    let mut settings = global.settings()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("failed to create {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    if let Some(log) = args.log_file() {
        eprintln!(
            "✓ daemon logs in {} (--verbose to see them here)",
            log.display()
        );
    }

    let network = LocalNetwork {
        url: settings.nats.url.clone(),
        namespace: settings.nats.namespace.clone(),
        data_dir: data_dir.clone(),
    };
    let secure = !args.insecure && !is_reachable(&settings.nats.url);
    if secure {
        issue_local_credentials(&network, &args.node_id)?;
    }
    let _nats = start_nats(
        &mut settings,
        &data_dir,
        secure.then(|| network.auth().authorization_file()),
        args.cluster,
    )?;
    let as_party = |caller: &Caller| {
        let mut nats = settings.nats.clone();
        if secure {
            nats.credentials = Some(network.credentials_path(caller));
        }
        nats
    };
    if args.cluster.is_some() {
        // The meta leader is elected a moment after the servers start: streams wait for it.
        let bus = Bus::connect(&as_party(&Caller::orchestrator())).await?;
        rhizos_broker::server::NatsCluster::wait_jetstream(
            &bus.client,
            std::time::Duration::from_secs(60),
        )
        .await
        .context("the NATS cluster's JetStream did not come up")?;
    }
    if secure {
        let network = LocalNetwork {
            url: settings.nats.url.clone(),
            ..network.clone()
        };
        network.record()?;
        eprintln!(
            "✓ authentication on: credentials (mode 0600) in {} — the CLI finds them itself",
            network.credentials_dir().display()
        );
    } else if settings.nats.credentials.is_none() {
        // Nobody is authenticated: the orchestrator cannot tell one party from another anyway.
        settings.orchestrator.open_registration = true;
        eprintln!(
            "! no authentication: anyone who reaches {} can act as anyone",
            settings.nats.url
        );
    }

    let plugin_dir = match args.plugin_dir {
        Some(dir) => dir,
        None => link_built_plugins(&data_dir.join("plugins"))?,
    };
    settings.orchestrator.data_dir = data_dir.clone();
    settings.agent.plugin_dir = plugin_dir.clone();
    settings.agent.node_id = Some(args.node_id.clone());

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };

    let orchestrators = if args.cluster.is_some() {
        // Failover on this machine should be seen, not waited for: a short lease.
        if settings.orchestrator.lease_ttl_ms
            == rhizos_broker::config::OrchestratorSettings::default().lease_ttl_ms
        {
            settings.orchestrator.lease_ttl_ms = 3_000;
        }
        let processes = OrchestratorProcesses::start(
            global.config_path(),
            &settings,
            &data_dir,
            secure.then(|| network.credentials_path(&Caller::orchestrator())),
        )?;
        processes.announce(&settings);
        Orchestrators::Processes(tokio::spawn(processes.supervise(stopped(stop.clone()))))
    } else {
        let orchestrator = Orchestrator::open(
            Bus::connect(&as_party(&Caller::orchestrator())).await?,
            settings.orchestrator.clone(),
        )
        .await
        .context("failed to start the orchestrator")?;
        let task = tokio::spawn(orchestrator.clone().run(stopped(stop.clone())));
        eprintln!(
            "✓ orchestrator (ledger {}; receipts signed by {})",
            data_dir.join("ledger.db").display(),
            orchestrator.public_key()
        );
        Orchestrators::InProcess { orchestrator, task }
    };

    if secure {
        let node_key = rhizos_broker::Credentials::load(
            &network.credentials_path(&Caller::node(&args.node_id)),
        )?
        .public_key()
        .map_err(anyhow::Error::msg)?;
        enroll_local_node(
            &as_party(&Caller::operator(local::OPERATOR)),
            &args.node_id,
            &settings.agent.provider_account,
            &node_key,
        )
        .await?;
    }
    let agent = Agent::new(
        Bus::connect(&as_party(&Caller::node(&args.node_id))).await?,
        settings.agent.clone(),
        settings.pricing,
    )
    .context("failed to start the agent")?;
    print_plugins(&agent);
    let agent_metrics = agent.metrics_source();
    let agent_task = tokio::spawn(agent.run(stopped(stop.clone())));
    // Ready means ready: the agent has registered and can be given jobs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let operator = match &orchestrators {
        Orchestrators::Processes(_) => Some(rhizos_broker::Client::new(
            Bus::connect(&as_party(&Caller::operator(local::OPERATOR))).await?,
        )),
        Orchestrators::InProcess { .. } => None,
    };
    loop {
        let registered = match (&orchestrators, &operator) {
            (Orchestrators::InProcess { orchestrator, .. }, _) => orchestrator.live_nodes() > 0,
            (_, Some(operator)) => operator.node_list().await.is_ok_and(|list| {
                list.nodes
                    .iter()
                    .any(|node| node.node_id == args.node_id && node.status == "live")
            }),
            (_, None) => false,
        };
        if registered {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not register within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    eprintln!(
        "✓ agent {} registered (plugins from {})",
        args.node_id,
        plugin_dir.display()
    );
    let mut metrics_sources = vec![agent_metrics];
    if let Orchestrators::InProcess { orchestrator, .. } = &orchestrators {
        metrics_sources.push(orchestrator.metrics_source());
    }
    let gateway_task = if args.no_gateway {
        None
    } else {
        if let Some(listen) = &args.gateway {
            settings.gateway.listen = listen.clone();
        }
        let listener = tokio::net::TcpListener::bind(&settings.gateway.listen)
            .await
            .with_context(|| {
                format!(
                    "the AI gateway cannot listen on {} (in use? choose another with --gateway ADDR, or --no-gateway)",
                    settings.gateway.listen
                )
            })?;
        let address = listener.local_addr()?;
        let mut gateway = rhizos_core::Gateway::new(
            Bus::connect(&as_party(&Caller::gateway(local::GATEWAY))).await?,
            settings.gateway.clone(),
        );
        if settings.gateway.dashboard {
            gateway = gateway.with_dashboard(as_party(&Caller::operator(local::OPERATOR)));
        }
        metrics_sources.push(gateway.metrics_source());
        let models = orchestrator_models(&as_party(&Caller::operator(local::OPERATOR))).await;
        eprintln!(
            "✓ AI gateway http://{address}/v1 (OpenAI-compatible; models served now: {})",
            if models.is_empty() {
                "none — configure a backend such as [agent.plugins.openai]".to_owned()
            } else {
                models.join(", ")
            }
        );
        if settings.gateway.dashboard {
            eprintln!(
                "✓ dashboard http://{address}/dashboard (sign in with a credentials file, e.g. {})",
                network
                    .credentials_path(&Caller::operator(local::OPERATOR))
                    .display()
            );
        }
        Some(tokio::spawn(gateway.serve(listener, stopped(stop.clone()))))
    };
    if !args.no_metrics {
        let asked = args
            .metrics
            .clone()
            .or_else(|| settings.metrics.listen.clone());
        let address = asked.clone().unwrap_or_else(|| "127.0.0.1:9464".into());
        match tokio::net::TcpListener::bind(&address).await {
            Ok(listener) => {
                eprintln!(
                    "✓ metrics http://{}/metrics (Prometheus; docs/grafana-dashboard.json)",
                    listener.local_addr()?
                );
                tokio::spawn(rhizos_core::metrics::serve(
                    listener,
                    metrics_sources,
                    stopped(stop.clone()),
                ));
            }
            // The address asked for must work; the default may be taken by another network.
            Err(e) if asked.is_some() => {
                return Err(anyhow::anyhow!(e).context(format!(
                    "metrics cannot be served on {address} (in use? choose another with --metrics ADDR, or --no-metrics)"
                )));
            }
            Err(e) => eprintln!(
                "! metrics not served: {address} is not free ({e}); choose an address with --metrics ADDR"
            ),
        }
    }
    eprintln!(
        "\nRhizOS is up: NATS {} namespace {}.\nIn another terminal:\n  \
         rhizos user add alice && rhizos account deposit alice 1\n  \
         rhizos job submit --account alice --wasm <module.wasm> --max-cost 0.01 --wait\n  \
         rhizos top      (the network live: nodes, jobs, money; q quits)\n  \
         rhizos events\nCtrl-C stops everything.",
        settings.nats.url, settings.nats.namespace
    );
    if !args.check {
        rhizos_core::telemetry::shutdown_signal().await;
    }
    let _ = stop_sender.send(true);
    if let Some(task) = gateway_task {
        task.await.context("gateway task failed")??;
    }
    agent_task.await.context("agent task failed")??;
    match orchestrators {
        Orchestrators::InProcess { task, .. } | Orchestrators::Processes(task) => {
            task.await.context("orchestrator task failed")??;
        }
    }
    eprintln!("stopped");
    Ok(())
}

/// The models the network serves now, as `name (service)`.
async fn orchestrator_models(operator: &rhizos_broker::config::NatsSettings) -> Vec<String> {
    let Ok(bus) = Bus::connect(operator).await else {
        return Vec::new();
    };
    rhizos_broker::Client::new(bus)
        .model_list()
        .await
        .map(|list| {
            list.models
                .into_iter()
                .map(|m| format!("{} ({})", m.name, m.service))
                .collect()
        })
        .unwrap_or_default()
}

/// Credentials of the local orchestrator, operator, gateway and node (kept across restarts), let in by
/// the server's authorization file.
fn issue_local_credentials(network: &LocalNetwork, node_id: &str) -> anyhow::Result<()> {
    let subjects = rhizos_broker::Subjects::new(&network.namespace)?;
    let auth = network.auth();
    for caller in [
        Caller::orchestrator(),
        Caller::operator(local::OPERATOR),
        Caller::new(rhizos_broker::Role::Node, node_id)?,
        Caller::gateway(local::GATEWAY),
    ] {
        local::issue(&auth, &subjects, &network.credentials_dir(), &caller)?;
    }
    Ok(())
}

/// Enrols the local node with its key (retried while the orchestrator subscribes).
async fn enroll_local_node(
    operator: &rhizos_broker::config::NatsSettings,
    node_id: &str,
    provider_account: &str,
    node_key: &str,
) -> anyhow::Result<()> {
    let client = rhizos_broker::Client::new(Bus::connect(operator).await?);
    let key = Some(node_key);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match client.node_enroll(node_id, provider_account, key).await {
            Ok(_) => return Ok(()),
            Err(e) if e.remote().is_none() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("cannot enrol the local node"),
        }
    }
}

/// Starts nats-server on the configured port unless something answers there already; points
/// `settings` at it.
/// The NATS server(s) `up` started, stopped when dropped.
#[allow(dead_code, reason = "held only so that dropping it stops the servers")]
enum StartedNats {
    One(NatsServer),
    Cluster(rhizos_broker::server::NatsCluster),
}

fn start_nats(
    settings: &mut rhizos_broker::Settings,
    data_dir: &Path,
    authorization: Option<PathBuf>,
    cluster: Option<u8>,
) -> anyhow::Result<Option<StartedNats>> {
    let reachable = is_reachable(&settings.nats.url);
    if let Some(size) = cluster {
        anyhow::ensure!(
            !reachable,
            "a NATS server already answers at {}: --cluster starts its own servers (stop that one, or run without --cluster to use it)",
            settings.nats.url
        );
        let port = port_of(&settings.nats.url);
        eprintln!("… starting a cluster of {size} nats-servers (the first on 127.0.0.1:{port})");
        let cluster = rhizos_broker::server::NatsCluster::start_with(
            usize::from(size),
            "rhizos",
            &data_dir.join("nats"),
            Some(port),
            authorization,
        )
        .context("failed to start the NATS cluster")?;
        settings.nats.url = cluster.url();
        settings.nats.replicas = 3;
        eprintln!(
            "✓ nats cluster {} (JetStream in {}/rhizos-*; streams and the lease kept on 3 servers)",
            settings.nats.url,
            data_dir.join("nats").display()
        );
        return Ok(Some(StartedNats::Cluster(cluster)));
    }
    Ok(if reachable {
        eprintln!("✓ using the NATS server at {}", settings.nats.url);
        None
    } else {
        let port = port_of(&settings.nats.url);
        eprintln!("… starting nats-server on 127.0.0.1:{port}");
        let server = NatsServer::start(LaunchOptions {
            port: Some(port),
            data_dir: Some(data_dir.join("nats")),
            authorization,
            listen: None,
        })
        .context("failed to start nats-server")?;
        settings.nats.url = server.url();
        eprintln!(
            "✓ nats-server {} (JetStream in {})",
            server.url(),
            data_dir.join("nats").display()
        );
        Some(StartedNats::One(server))
    })
}

/// One line per plugin the agent loaded (or refused, or that offers nothing here, and why).
fn print_plugins(agent: &Agent) {
    for plugin in agent.plugin_views() {
        match (&plugin.name, &plugin.refused) {
            (Some(name), None) => match &plugin.note {
                None => eprintln!(
                    "✓ plugin {name} {} ({})",
                    plugin.version.unwrap_or_default(),
                    plugin.file
                ),
                Some(note) => eprintln!(
                    "! plugin {name} {} loaded but offers nothing here: {note}",
                    plugin.version.unwrap_or_default()
                ),
            },
            (_, Some(reason)) => eprintln!("✗ plugin {} refused: {reason}", plugin.file),
            _ => {}
        }
    }
}

/// The port of a `nats://host:port` URL (4222 when absent).
fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(4222)
}

/// Links the backend plugins built beside this executable into `dir` and returns it. The
/// resolver plugins (`librhizos_plugin_resolver_*`) are left out: each needs its registry's
/// address in config, and modules are resolved by the orchestrator (`resolver_dir`).
fn link_built_plugins(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let exe = std::env::current_exe().context("cannot locate the rhizos executable")?;
    let build_dir = exe.parent().context("executable has no directory")?;
    let mut found = 0;
    for entry in std::fs::read_dir(build_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("librhizos_plugin_")
            && !name.starts_with("librhizos_plugin_resolver_")
            && name.ends_with(".so")
        {
            let link = dir.join(&name);
            let _ = std::fs::remove_file(&link);
            #[cfg(unix)]
            std::os::unix::fs::symlink(&path, &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
            #[cfg(not(unix))]
            std::fs::copy(&path, &link)
                .with_context(|| format!("cannot copy {}", path.display()))?;
            found += 1;
        }
    }
    if found == 0 {
        eprintln!(
            "! no plugins found next to {}: build them with `cargo build --workspace` or pass --plugin-dir",
            exe.display()
        );
    }
    Ok(dir.to_path_buf())
}

/// The orchestrator(s) `up` runs.
enum Orchestrators {
    /// One, in this process (the default).
    InProcess {
        orchestrator: Orchestrator,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    /// `--cluster`: [`OrchestratorProcesses`], supervised by this task.
    Processes(tokio::task::JoinHandle<anyhow::Result<()>>),
}

/// How many orchestrators `up --cluster` runs.
const CLUSTER_ORCHESTRATORS: usize = 2;

/// `--cluster`: `rhizosd orchestrator` processes, each on its own data dir
/// (`<data-dir>/orchestrators/<i>`), sharing the replicated ledger: one active, the others
/// standbys following it. They are processes so that one can be killed like a machine lost;
/// one that exits is started again (as a standby until it may take over), like a service
/// manager would.
struct OrchestratorProcesses {
    rhizosd: PathBuf,
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    dirs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    children: Vec<std::process::Child>,
    /// When an exited orchestrator is to be started again.
    restart_at: Vec<Option<std::time::Instant>>,
    /// The lease TTL and a second: how long an exited orchestrator stays down.
    restart_delay: std::time::Duration,
}

impl OrchestratorProcesses {
    fn start(
        config: Option<&Path>,
        settings: &rhizos_broker::Settings,
        data_dir: &Path,
        credentials: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot locate the rhizos executable")?;
        let rhizosd = exe.with_file_name("rhizosd");
        anyhow::ensure!(
            rhizosd.exists(),
            "--cluster runs the orchestrators as rhizosd processes, but {} does not exist: build it beside rhizos (cargo build --workspace)",
            rhizosd.display()
        );
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(config) = config {
            args.extend(["--config".into(), config.into()]);
        }
        args.extend([
            "--nats-url".into(),
            settings.nats.url.clone().into(),
            "--namespace".into(),
            settings.nats.namespace.clone().into(),
        ]);
        if let Some(credentials) = credentials {
            args.extend(["--credentials".into(), credentials.into()]);
        }
        let orchestrator = &settings.orchestrator;
        let env = [
            ("RHIZOS_NATS__REPLICAS", settings.nats.replicas.to_string()),
            ("RHIZOS_ORCHESTRATOR__REPLICATED_LEDGER", "true".to_owned()),
            (
                "RHIZOS_ORCHESTRATOR__LEASE_TTL_MS",
                orchestrator.lease_ttl_ms.to_string(),
            ),
            (
                "RHIZOS_ORCHESTRATOR__OPEN_REGISTRATION",
                orchestrator.open_registration.to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        let dirs: Vec<PathBuf> = (1..=CLUSTER_ORCHESTRATORS)
            .map(|i| data_dir.join("orchestrators").join(i.to_string()))
            .collect();
        // One receipt key for all of them: a receipt verifies whichever was active.
        rhizos_core::orchestrator::ensure_signing_key(&dirs[0])?;
        let key = dirs[0].join(rhizos_core::orchestrator::SIGNING_KEY_FILE);
        for dir in &dirs[1..] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            let copy = dir.join(rhizos_core::orchestrator::SIGNING_KEY_FILE);
            if !copy.exists() {
                std::fs::copy(&key, &copy).with_context(|| {
                    format!("cannot copy the receipt key to {}", copy.display())
                })?;
            }
            rhizos_core::orchestrator::ensure_signing_key(dir)?;
        }
        let logs = (1..=CLUSTER_ORCHESTRATORS)
            .map(|i| data_dir.join(format!("orchestrator-{i}.log")))
            .collect();
        let mut processes = Self {
            rhizosd,
            args,
            env,
            dirs,
            logs,
            children: Vec::new(),
            restart_at: vec![None; CLUSTER_ORCHESTRATORS],
            restart_delay: std::time::Duration::from_millis(
                settings.orchestrator.lease_ttl_ms + 1_000,
            ),
        };
        for index in 0..CLUSTER_ORCHESTRATORS {
            let child = processes.spawn(index)?;
            processes.children.push(child);
        }
        Ok(processes)
    }

    fn spawn(&self, index: usize) -> anyhow::Result<std::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs[index])
            .with_context(|| format!("cannot open {}", self.logs[index].display()))?;
        std::process::Command::new(&self.rhizosd)
            .args(&self.args)
            .arg("orchestrator")
            .arg("--data-dir")
            .arg(&self.dirs[index])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.rhizosd.display()))
    }

    fn announce(&self, settings: &rhizos_broker::Settings) {
        let list: Vec<String> = self
            .children
            .iter()
            .zip(&self.dirs)
            .map(|(child, dir)| format!("pid {} on {}", child.id(), dir.display()))
            .collect();
        eprintln!(
            "✓ {} orchestrators sharing the replicated ledger (stream {}, {} copies): {}\n  one is active, the others follow its ledger; kill -9 the active one (its pid is in its data dir's lock file) and another takes over within {} ms; one that exits is started again as a standby (logs: {})",
            self.children.len(),
            rhizos_broker::Subjects::new(&settings.nats.namespace)
                .map(|s| s.ledger_stream())
                .unwrap_or_default(),
            settings.nats.replicas,
            list.join(", "),
            settings.orchestrator.lease_ttl_ms,
            self.logs
                .first()
                .and_then(|log| log.parent())
                .map(|dir| dir.join("orchestrator-<i>.log").display().to_string())
                .unwrap_or_default(),
        );
    }

    /// Restarts an orchestrator that exits, until `stop`; then stops them all (SIGINT, and
    /// `kill -9` past 15 s).
    async fn supervise(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
            for index in 0..self.children.len() {
                if let Some(due) = self.restart_at[index] {
                    if std::time::Instant::now() >= due {
                        self.restart_at[index] = None;
                        self.children[index] = self.spawn(index)?;
                        eprintln!(
                            "✓ orchestrator {} started again (pid {}): a standby following the ledger",
                            index + 1,
                            self.children[index].id()
                        );
                    }
                    continue;
                }
                if let Some(status) = self.children[index].try_wait()? {
                    // Started again only once its lease has lapsed, so that a standby takes
                    // over (the way a machine lost is survived), rather than the restarted
                    // process retaking its own lease at once.
                    let delay = self.restart_delay;
                    eprintln!(
                        "! orchestrator {} exited ({status}); a standby takes over, and it is started again in {} s (log: {})",
                        index + 1,
                        delay.as_secs(),
                        self.logs[index].display()
                    );
                    tracing::warn!(orchestrator = index + 1, %status, "orchestrator exited; restarting it");
                    self.restart_at[index] = Some(std::time::Instant::now() + delay);
                }
            }
        }
        for (child, _) in self
            .children
            .iter()
            .zip(&self.restart_at)
            .filter(|(_, restart)| restart.is_none())
        {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        for (index, child) in self.children.iter_mut().enumerate() {
            if self.restart_at[index].is_some() {
                continue;
            }
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        eprintln!("! orchestrator {} stopped with {status}", index + 1);
                    }
                    break;
                }
                if std::time::Instant::now() > deadline {
                    eprintln!(
                        "! orchestrator {} did not stop within 15 s: killed",
                        index + 1
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}
