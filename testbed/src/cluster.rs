//! A whole RhizOS network in one process, for tests and benchmarks: a real `nats-server`, the
//! orchestrator with its SQLite ledger in a temp dir, and N agents loading real plugin files.

use anyhow::Context as _;
use rhizos_broker::auth::AuthDir;
use rhizos_broker::server::{LaunchOptions, NatsServer};
use rhizos_broker::wire::{
    AccountView, JobSpec, JobView, Pricing, SubmitJob, SubmitJobReply, Workload, b64_encode,
};
use rhizos_broker::{Bus, Caller, Client, Credentials, Settings, Subjects};
use rhizos_core::{Agent, Orchestrator};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub agents: usize,
    pub pricing: Pricing,
    /// Plugin files put in every agent's plugin dir (default: the wasm backend).
    pub plugin_files: Vec<PathBuf>,
    pub heartbeat_interval_ms: u64,
    pub max_concurrent: u32,
    pub fee_bps: u32,
    /// Missed heartbeats before the orchestrator declares a node lost.
    pub missed_heartbeats: u32,
    /// How often agents look at their plugin directory for changes (0: never).
    pub plugin_scan_ms: u64,
    /// `[agent.plugins.<name>]` for every agent.
    pub plugin_config: std::collections::BTreeMap<String, serde_json::Value>,
    /// `[agent.plugins.<name>]` of agent `i` when given (each node its own model server…);
    /// agents past the list's end get `plugin_config`.
    pub plugin_config_per_agent: Vec<std::collections::BTreeMap<String, serde_json::Value>>,
    /// Agents are `<node_prefix>-<index>` (default `node`). Tests sharing a machine-wide
    /// resource keyed by node id (the Docker engine's containers) give each cluster its own.
    pub node_prefix: String,
    /// `[agent] nvml_library` for every agent (e.g. the NVML test double).
    pub nvml_library: Option<PathBuf>,
    /// `[agent] artifact_sources` for every agent (URL prefixes they fetch artifacts from).
    pub artifact_sources: Vec<String>,
    /// `[orchestrator] resolver_dir`: the module resolver chain.
    pub resolver_dir: Option<PathBuf>,
    /// `[orchestrator.resolvers.<name>]`.
    pub resolver_config: std::collections::BTreeMap<String, serde_json::Value>,
    /// `[orchestrator] resolver_order`.
    pub resolver_order: Vec<String>,
    /// Authentication on: `nats-server` lets in only the nkeys of the cluster's parties (the
    /// orchestrator, the operator — the cluster's own connection — and each agent's node, all
    /// enrolled), each with its role's permissions; [`Cluster::user`] adds users. Off: no
    /// authentication, and nodes register without enrolment.
    pub secure: bool,
    /// `[orchestrator] replicated_ledger` (on this one server: the stream kept once).
    pub replicated_ledger: bool,
    /// `[agent] max_log_lines` for every agent (default: the agent's).
    pub max_log_lines: Option<u64>,
    /// `[agent] max_stored_log_bytes` for every agent (default: the agent's).
    pub max_stored_log_bytes: Option<u64>,
    /// `[orchestrator] failed_workload_charge`.
    pub failed_workload_charge: rhizos_broker::config::FailedWorkloadCharge,
    /// `[orchestrator] max_requests_in_flight` (default: the orchestrator's).
    pub max_requests_in_flight: Option<usize>,
    /// `[orchestrator] job_payload_max_age_s` (default: the orchestrator's).
    pub job_payload_max_age_s: Option<u64>,
    /// `[orchestrator] lost_node_max_age_s` (default: the orchestrator's).
    pub lost_node_max_age_s: Option<u64>,
    /// `[orchestrator] resolver_timeout_ms` (default: the orchestrator's).
    pub resolver_timeout_ms: Option<u64>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            agents: 1,
            // $36 per CPU-hour = 10 micro-USD per ms: costs big enough to show every rounding.
            pricing: Pricing {
                gpu_hour_cents: 0,
                cpu_hour_cents: 3_600,
                memory_gb_hour_cents: 0,
                fuel_million_micros: 0,
                // $1 / $2 per million tokens: each token's price a whole micro-USD or two.
                input_million_micros: 1_000_000,
                output_million_micros: 2_000_000,
            },
            plugin_files: Vec::new(),
            heartbeat_interval_ms: 1_000,
            max_concurrent: 4,
            fee_bps: 500,
            plugin_scan_ms: 200,
            plugin_config: std::collections::BTreeMap::new(),
            plugin_config_per_agent: Vec::new(),
            missed_heartbeats: 3,
            node_prefix: "node".into(),
            nvml_library: None,
            artifact_sources: Vec::new(),
            resolver_dir: None,
            resolver_config: std::collections::BTreeMap::new(),
            resolver_order: Vec::new(),
            secure: false,
            replicated_ledger: false,
            failed_workload_charge: Default::default(),
            max_log_lines: None,
            max_stored_log_bytes: None,
            max_requests_in_flight: None,
            job_payload_max_age_s: None,
            lost_node_max_age_s: None,
            resolver_timeout_ms: None,
        }
    }
}

pub struct Cluster {
    pub nats: NatsServer,
    pub settings: Settings,
    pub bus: Bus,
    pub orchestrator: Orchestrator,
    pub agents: Vec<Agent>,
    pub data_dir: tempfile::TempDir,
    /// The parties the server lets in (secure clusters).
    pub auth: Option<AuthDir>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// One per agent, `None` once killed.
    agent_tasks: Vec<Option<JoinHandle<anyhow::Result<()>>>>,
    /// Each agent's own shutdown signal (besides the cluster's).
    agent_stops: Vec<watch::Sender<bool>>,
}

async fn stopped(mut receiver: watch::Receiver<bool>) {
    let _ = receiver.wait_for(|stop| *stop).await;
}

impl Cluster {
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new()
            .prefix("rhizos-cluster-")
            .tempdir()?;
        let mut settings = Settings::default();
        settings.nats.namespace = format!("t{}", &uuid_like()[..12]);
        let node_ids: Vec<String> = (0..options.agents)
            .map(|index| format!("{}-{index}", options.node_prefix))
            .collect();
        let auth = if options.secure {
            let auth = AuthDir::new(data_dir.path().join("auth"));
            let subjects = Subjects::new(&settings.nats.namespace)?;
            let mut parties = vec![Caller::orchestrator(), Caller::operator("operator")];
            parties.extend(node_ids.iter().map(|id| Caller::node(id)));
            for caller in parties {
                add_party(&auth, &subjects, &caller)?;
            }
            Some(auth)
        } else {
            None
        };
        let nats = NatsServer::start(LaunchOptions {
            port: None,
            data_dir: Some(data_dir.path().join("nats")),
            authorization: auth.as_ref().map(AuthDir::authorization_file),
            listen: None,
        })?;
        settings.nats.url = nats.url();
        settings.orchestrator.open_registration = auth.is_none();
        settings.orchestrator.data_dir = data_dir.path().join("orchestrator");
        settings.orchestrator.fee_bps = options.fee_bps;
        settings.orchestrator.replicated_ledger = options.replicated_ledger;
        settings.orchestrator.missed_heartbeats = options.missed_heartbeats;
        settings.orchestrator.failed_workload_charge = options.failed_workload_charge;
        if let Some(age) = options.job_payload_max_age_s {
            settings.orchestrator.job_payload_max_age_s = age;
        }
        if let Some(age) = options.lost_node_max_age_s {
            settings.orchestrator.lost_node_max_age_s = age;
        }
        if let Some(limit) = options.max_requests_in_flight {
            settings.orchestrator.max_requests_in_flight = limit;
        }
        if let Some(timeout) = options.resolver_timeout_ms {
            settings.orchestrator.resolver_timeout_ms = timeout;
        }
        settings.pricing = options.pricing;
        settings.orchestrator.resolver_dir = options.resolver_dir.clone();
        settings.orchestrator.resolvers = options.resolver_config.clone();
        settings.orchestrator.resolver_order = options.resolver_order.clone();
        let as_party = |caller: &Caller| {
            let mut nats = settings.nats.clone();
            if let Some(auth) = &auth {
                nats.credentials = Some(credentials_path(auth, caller));
            }
            nats
        };
        let bus = Bus::connect(&as_party(&Caller::operator("operator"))).await?;
        let (stop, receiver) = watch::channel(false);

        let orchestrator = Orchestrator::open(
            Bus::connect(&as_party(&Caller::orchestrator())).await?,
            settings.orchestrator.clone(),
        )
        .await?;
        let tasks = vec![tokio::spawn(
            orchestrator.clone().run(stopped(receiver.clone())),
        )];

        let plugin_files = if options.plugin_files.is_empty() && options.agents > 0 {
            vec![crate::plugin_file("rhizos_plugin_wasm")?]
        } else {
            options.plugin_files.clone()
        };
        let mut agents = Vec::new();
        let mut agent_tasks = Vec::new();
        let mut agent_stops = Vec::new();
        for (index, node_id) in node_ids.iter().enumerate() {
            let plugin_dir = data_dir.path().join(format!("plugins-{index}"));
            std::fs::create_dir_all(&plugin_dir)?;
            for file in &plugin_files {
                let name = file.file_name().context("plugin path has no file name")?;
                std::fs::copy(file, plugin_dir.join(name))
                    .with_context(|| format!("copying {}", file.display()))?;
            }
            let mut agent_settings = settings.agent.clone();
            let node_id = node_id.clone();
            agent_settings.node_id = Some(node_id.clone());
            agent_settings.provider_account = format!("provider-{index}");
            agent_settings.plugin_dir = plugin_dir;
            agent_settings.heartbeat_interval_ms = options.heartbeat_interval_ms;
            agent_settings.max_concurrent = options.max_concurrent;
            agent_settings.plugin_scan_ms = options.plugin_scan_ms;
            agent_settings.plugins = options
                .plugin_config_per_agent
                .get(index)
                .unwrap_or(&options.plugin_config)
                .clone();
            agent_settings.nvml_library = options.nvml_library.clone();
            agent_settings.artifact_sources = options.artifact_sources.clone();
            if let Some(bytes) = options.max_stored_log_bytes {
                agent_settings.max_stored_log_bytes = bytes;
            }
            if let Some(lines) = options.max_log_lines {
                agent_settings.max_log_lines = lines;
            }
            // Each cluster its own artifact cache: what a test fetches, it fetched.
            agent_settings.artifact_cache_dir =
                Some(data_dir.path().join(format!("artifacts-{index}")));
            if auth.is_some() {
                // Secure networks register only enrolled nodes (the orchestrator may still be
                // subscribing: retried until it answers).
                let key = auth
                    .as_ref()
                    .map(|auth| Credentials::load(&credentials_path(auth, &Caller::node(&node_id))))
                    .transpose()?
                    .map(|creds| creds.public_key().map_err(anyhow::Error::msg))
                    .transpose()?;
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let enrolled = Client::new(bus.clone())
                        .node_enroll(&node_id, &format!("provider-{index}"), key.as_deref())
                        .await;
                    match enrolled {
                        Ok(_) => break,
                        Err(e) if e.remote().is_none() && Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => anyhow::bail!("cannot enrol {node_id}: {e}"),
                    }
                }
            }
            let agent = Agent::new(
                Bus::connect(&as_party(&Caller::node(&node_id))).await?,
                agent_settings,
                options.pricing,
            )?;
            let (own_stop, own) = watch::channel(false);
            let everyone = receiver.clone();
            agent_stops.push(own_stop);
            agent_tasks.push(Some(tokio::spawn(agent.clone().run(async move {
                tokio::select! {
                    () = stopped(everyone) => {}
                    () = stopped(own) => {}
                }
            }))));
            agents.push(agent);
        }
        let cluster = Self {
            nats,
            settings,
            bus,
            orchestrator,
            agents,
            data_dir,
            auth,
            stop,
            tasks,
            agent_tasks,
            agent_stops,
        };
        cluster.wait_for_orchestrator().await?;
        cluster.wait_for_nodes(options.agents).await?;
        Ok(cluster)
    }

    /// Waits until the orchestrator answers requests (its subscriptions are in place): a
    /// cluster without agents has nothing else to wait for.
    async fn wait_for_orchestrator(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.client().node_list().await {
                Ok(_) => return Ok(()),
                Err(e) if e.remote().is_none() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => anyhow::bail!("the orchestrator does not answer: {e}"),
            }
        }
    }

    /// Waits until `count` nodes are registered and live in the orchestrator.
    async fn wait_for_nodes(&self, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let registered = self.orchestrator.live_nodes();
            if registered >= count {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {registered} of {count} nodes registered within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The plugin directory agent `index` follows.
    pub fn plugin_dir(&self, index: usize) -> PathBuf {
        self.data_dir.path().join(format!("plugins-{index}"))
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.settings.orchestrator.data_dir.join("ledger.db")
    }

    /// The typed control client, over the cluster's connection.
    pub fn client(&self) -> Client {
        Client::new(self.bus.clone())
    }

    /// Settings of a client acting as `caller` (its credentials file in a secure cluster, made
    /// and let in on first use; the server re-reads its users).
    pub fn settings_as(
        &self,
        caller: &Caller,
    ) -> anyhow::Result<rhizos_broker::config::NatsSettings> {
        let mut nats = self.settings.nats.clone();
        if let Some(auth) = &self.auth {
            let path = credentials_path(auth, caller);
            if !path.is_file() {
                add_party(auth, &self.bus.subjects, caller)?;
                self.nats.reload()?;
            }
            nats.credentials = Some(path);
        }
        Ok(nats)
    }

    /// A typed client connected as `caller`.
    pub async fn client_as(&self, caller: &Caller) -> anyhow::Result<Client> {
        Ok(Client::new(Bus::connect(&self.settings_as(caller)?).await?))
    }

    /// Creates `account` and deposits `micros` into it.
    pub async fn funded_account(&self, account: &str, micros: i64) -> anyhow::Result<AccountView> {
        let client = self.client();
        client.account_create(account).await?;
        Ok(client.account_deposit(account, micros, None).await?)
    }

    pub async fn balance(&self, account: &str) -> anyhow::Result<AccountView> {
        Ok(self.client().account_balance(account).await?)
    }

    pub async fn submit(
        &self,
        request: &SubmitJob,
    ) -> Result<SubmitJobReply, rhizos_broker::RequestError> {
        self.client().submit(request).await
    }

    pub async fn job(&self, job_id: &str) -> anyhow::Result<JobView> {
        Ok(self.client().job_get(job_id).await?)
    }

    /// Polls until the job has ended and its money is settled or refunded.
    pub async fn wait_for_end(&self, job_id: &str, limit: Duration) -> anyhow::Result<JobView> {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(job_id).await?;
            if job.state.is_terminal() && job.cost_micros.is_some() {
                return Ok(job);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "job {job_id} still {:?} after {limit:?}",
                job.state
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills agent `index` the way a crash or a pulled cable would: no goodbye, no reports, no
    /// more heartbeats. Executions already inside its plugin run on unobserved.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(Some(task)) = self.agent_tasks.get_mut(index).map(Option::take) {
            task.abort();
        }
    }

    /// Shuts agent `index` down gracefully (as on SIGTERM) and waits until it has stopped: its
    /// running executions are stopped and handed back.
    pub async fn stop_agent(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(stop) = self.agent_stops.get(index) {
            let _ = stop.send(true);
        }
        if let Some(Some(task)) = self.agent_tasks.get_mut(index).map(Option::take) {
            task.await??;
        }
        Ok(())
    }

    /// Stops every daemon and waits for them.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for task in self.agent_tasks.drain(..).flatten() {
            task.await??;
        }
        for task in self.tasks.drain(..) {
            task.await??;
        }
        Ok(())
    }
}

/// Where a secure cluster keeps `caller`'s credentials.
pub fn credentials_path(auth: &AuthDir, caller: &Caller) -> PathBuf {
    auth.dir().join(caller.credentials_file_name())
}

/// Makes credentials for `caller` and lets its key in (the server applies it on reload).
pub fn add_party(auth: &AuthDir, subjects: &Subjects, caller: &Caller) -> anyhow::Result<()> {
    auth.admit(subjects, caller, &credentials_path(auth, caller))?;
    Ok(())
}

/// A job spec running `module` with `args`, 1 core, 64 MiB, `timeout_ms`.
pub fn wasm_spec(module: &[u8], args: &[&str], timeout_ms: u64) -> JobSpec {
    JobSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..JobSpec::new(
            Workload::Wasm {
                module_b64: b64_encode(module),
            },
            timeout_ms,
            64,
        )
    }
}

/// A job spec running a container of `image` with `args` as its command, 1 core, 64 MiB.
pub fn docker_spec(image: &str, args: &[&str], timeout_ms: u64) -> JobSpec {
    JobSpec {
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..JobSpec::new(
            Workload::Docker {
                image: image.to_owned(),
                entrypoint: None,
                workdir: None,
                network: false,
            },
            timeout_ms,
            64,
        )
    }
}

/// A fresh id usable as a subject token.
pub fn uuid_like() -> String {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(std::time::SystemTime::now());
    let b = RandomState::new().hash_one(std::process::id());
    format!("{a:016x}{b:016x}")
}
