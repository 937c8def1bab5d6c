//! `rhizosd agent`: one per provider machine. Loads backend plugins, registers the node with its
//! capabilities and prices, heartbeats, takes assignments on `job.assign.<node_id>`, runs them
//! through the plugin, streams log lines on `job.log.<job_id>` while they run, and reports the
//! outcome (retrying until the orchestrator acknowledges it).
//!
//! Plugin calls are blocking FFI calls: they run on tokio's blocking pool, and log lines come back
//! through a host-implemented sink into a channel, so no tokio type crosses the ABI boundary.

pub mod artifacts;
mod execution;
pub mod hardware;
pub mod plugins;

use anyhow::Context as _;
use futures::StreamExt as _;
use plugins::PluginSet;
use rhizos_broker::config::AgentSettings;
use rhizos_broker::wire::Workload;
use rhizos_broker::wire::{
    self, Ack, AssignJob, ErrorCode, ExecutionRef, Heartbeat, PluginView, Pricing, RegisterNode,
    Reply, StopJob, WIRE_VERSION, WireError,
};
use rhizos_broker::{Bus, validate_token};
use rhizos_plugin_api::ExecutionBox;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Largest assignment accepted (inline WASM modules are base64 in it).
const MAX_ASSIGN_BYTES: usize = 2 * 1024 * 1024;

/// Executions by (job, attempt); `None` while the plugin is still starting one.
type Executions = HashMap<(String, u32), Option<Arc<Running>>>;

/// An execution and the plugin it runs on. Fields drop in order: the execution goes before the
/// plugin, and the plugin (even if replaced or removed since) lives as long as the execution.
struct Running {
    execution: ExecutionBox,
    _plugin: Arc<plugins::LoadedPlugin>,
    /// The orchestrator asked to stop it (a cancel ends the job; a shutdown hands it back).
    stop_requested: std::sync::atomic::AtomicBool,
}

/// The node agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    node_id: String,
    settings: AgentSettings,
    /// Artifacts fetched by reference, cached by digest.
    artifacts: Arc<artifacts::ArtifactStore>,
    pricing: Pricing,
    /// The plugins in force (swapped whole when the directory changes).
    plugins: std::sync::RwLock<PluginSet>,
    /// The directory as last scanned; owned by the watcher.
    plugin_dir: Mutex<plugins::PluginDir>,
    hardware: hardware::Hardware,
    executions: Mutex<Executions>,
    /// Which of `hardware.gpus` an execution holds (whole GPUs).
    gpus_busy: Mutex<Vec<bool>>,
    /// NVML, when it loaded: GPU telemetry for heartbeats.
    nvml: Option<nvml_wrapper::Nvml>,
    /// Set when the agent begins to shut down: executions it cancels then are handed back.
    shutting_down: std::sync::atomic::AtomicBool,
    /// A registration asked for by the orchestrator (`node.reregister`) is under way: more
    /// asks meanwhile are answered without starting another.
    reregistering: std::sync::atomic::AtomicBool,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

impl Agent {
    /// Its metrics for [`crate::metrics::serve`].
    pub fn metrics_source(&self) -> crate::metrics::Source {
        crate::metrics::Source::of(&self.inner.metrics.registry)
    }

    /// Loads the plugins from `settings.plugin_dir` and detects the machine.
    pub fn new(bus: Bus, settings: AgentSettings, pricing: Pricing) -> anyhow::Result<Self> {
        let (hardware, nvml) = hardware::detect_with(settings.nvml_library.as_deref());
        let node_id = match &settings.node_id {
            Some(id) => id.clone(),
            None => hardware::default_node_id(),
        };
        validate_token("node id", &node_id).context("invalid [agent] node_id")?;
        validate_token("provider account", &settings.provider_account)
            .context("invalid [agent] provider_account")?;
        anyhow::ensure!(
            settings.max_concurrent > 0,
            "[agent] max_concurrent must be at least 1"
        );
        anyhow::ensure!(
            settings.heartbeat_interval_ms > 0,
            "[agent] heartbeat_interval_ms must be > 0"
        );
        let configs = settings
            .plugins
            .iter()
            .map(|(name, value)| (name.clone(), value.to_string()))
            .collect();
        let (plugin_dir, plugins) = plugins::load_dir(&settings.plugin_dir, configs, &node_id)
            .context("cannot create the directory for plugin copies")?;
        if plugins.loaded.is_empty() {
            tracing::warn!(dir = %settings.plugin_dir.display(), "no backend plugin loaded: this node can run nothing");
        }
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                artifacts: Arc::new(artifacts::ArtifactStore::new(&settings, &node_id)),
                node_id,
                settings,
                pricing,
                plugins: std::sync::RwLock::new(plugins),
                plugin_dir: Mutex::new(plugin_dir),
                gpus_busy: Mutex::new(vec![false; hardware.gpus.len()]),
                nvml,
                hardware,
                executions: Mutex::new(HashMap::new()),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
                reregistering: std::sync::atomic::AtomicBool::new(false),
                metrics: Arc::new(crate::metrics::AgentMetrics::new()),
            }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// What was loaded and refused, for registration and `plugins list`.
    pub fn plugin_views(&self) -> Vec<PluginView> {
        let plugins = self.plugins();
        let loaded = plugins.loaded.iter().map(|p| PluginView {
            file: p.file.display().to_string(),
            name: Some(p.name.clone()),
            version: Some(p.version.clone()),
            kind: Some("backend".into()),
            backends: p.backends.clone(),
            refused: None,
            note: p.unavailable.clone(),
        });
        let components = plugins.resolvers.iter().map(|c| PluginView {
            file: c.file().display().to_string(),
            name: Some(c.name().to_owned()),
            version: Some(c.version().to_owned()),
            kind: Some("resolver".into()),
            backends: vec![],
            refused: None,
            note: None,
        });
        let refused = plugins.refused.iter().map(|r| PluginView {
            file: r.file.display().to_string(),
            name: None,
            version: None,
            kind: None,
            backends: vec![],
            refused: Some(r.reason.clone()),
            note: None,
        });
        loaded.chain(components).chain(refused).collect()
    }

    /// The answer to `rhizos plugins list --node <this node>`.
    pub fn plugin_list(&self) -> wire::PluginList {
        wire::PluginList {
            node_id: self.inner.node_id.clone(),
            plugin_dir: self.inner.settings.plugin_dir.display().to_string(),
            plugins: self.plugin_views(),
        }
    }

    /// Resolves a module through this node's resolver components, in file name order: the
    /// first that knows `id` answers; `Ok(None)` when none does. Each call runs in a fresh
    /// instance under its manifest's limits.
    pub async fn resolve_module(
        &self,
        id: &str,
        version: Option<&str>,
    ) -> Result<Option<(String, String)>, String> {
        let resolvers = self.plugins().resolvers;
        let (id, version) = (id.to_owned(), version.map(str::to_owned));
        tokio::task::spawn_blocking(move || {
            for resolver in resolvers {
                match resolver.resolve(&id, version.as_deref()) {
                    Ok(Some(manifest)) => {
                        return Ok(Some((resolver.name().to_owned(), manifest)));
                    }
                    Ok(None) => continue,
                    Err(e) => return Err(format!("resolver {}: {e}", resolver.name())),
                }
            }
            Ok(None)
        })
        .await
        .map_err(|e| format!("resolver task failed: {e}"))?
    }

    /// The plugins in force now.
    pub fn plugins(&self) -> PluginSet {
        self.inner
            .plugins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Scans the plugin directory once (see [`plugins::PluginDir::scan`]); when anything
    /// changed, the new set takes effect for new executions and is returned.
    pub fn rescan_plugins(&self, settle: bool) -> Option<plugins::ScanChanges> {
        let mut dir = self
            .inner
            .plugin_dir
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changes = dir.scan(settle);
        if changes.is_empty() {
            return None;
        }
        let set = dir.set();
        *self
            .inner
            .plugins
            .write()
            .unwrap_or_else(PoisonError::into_inner) = set;
        Some(changes)
    }

    /// Follows the plugin directory; after a change, registers again so the orchestrator
    /// matches jobs against what this node offers now.
    async fn watch_plugins(self) {
        let every = Duration::from_millis(self.inner.settings.plugin_scan_ms);
        let mut models = self.model_offers();
        loop {
            tokio::time::sleep(every).await;
            // A model-serving backend's models come and go with its server (and warm up).
            let now = {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.model_offers())
                    .await
                    .unwrap_or_default()
            };
            if now != models {
                tracing::info!(models = ?now.iter().map(|m| format!("{}:{}{}", m.service, m.name, if m.warm { " (warm)" } else { "" })).collect::<Vec<_>>(), "served models changed; registering again");
                models = now;
                self.register().await;
            }
            let this = self.clone();
            let changes = tokio::task::spawn_blocking(move || this.rescan_plugins(true))
                .await
                .ok()
                .flatten();
            if let Some(changes) = changes {
                tracing::info!(added = changes.added.len(), replaced = changes.replaced.len(), removed = changes.removed.len(), backends = ?self.plugins().backends(), "plugins changed; registering again");
                self.register().await;
            }
        }
    }

    /// The plugin that runs `workload`: its backend's, or for an inference job the one serving
    /// the model now (through the backend the job names, if any).
    pub(crate) fn plugin_for(&self, workload: &Workload) -> Option<Arc<plugins::LoadedPlugin>> {
        let plugins = self.plugins();
        match workload {
            Workload::Inference {
                service,
                model,
                via,
                ..
            } => plugins
                .loaded
                .iter()
                .find(|p| {
                    p.unavailable.is_none()
                        && (via.is_empty() || p.backends.iter().any(|b| b == via))
                        && p.backend
                            .models()
                            .iter()
                            .any(|m| m.service.as_str() == service && m.name.as_str() == model)
                })
                .cloned(),
            other => plugins.backend(other.backend()).cloned(),
        }
    }

    /// What this agent registers with (its id, provider account, capacity, prices, plugins).
    pub fn registration(&self) -> RegisterNode {
        let settings = &self.inner.settings;
        RegisterNode {
            v: WIRE_VERSION,
            node_id: self.inner.node_id.clone(),
            provider_account: settings.provider_account.clone(),
            backends: self.plugins().backends(),
            pricing: self.inner.pricing,
            cpu_cores: settings
                .cpu_cores
                .unwrap_or(self.inner.hardware.cpu_threads),
            memory_mib: settings
                .memory_mib
                .unwrap_or(self.inner.hardware.memory_mib),
            max_concurrent: settings.max_concurrent,
            heartbeat_interval_ms: settings.heartbeat_interval_ms,
            plugins: self.plugin_views(),
            running: self.running(),
            gpus: self.inner.hardware.gpus.clone(),
            disk_mib: self.inner.hardware.disk_free_mib,
            hardware: Some(self.inner.hardware.view()),
            artifact_sources: settings.artifact_sources.clone(),
            models: self.model_offers(),
        }
    }

    /// The models the loaded backends serve now, each at this node's price for it
    /// (`[agent.model_prices.<name>]`, else `[pricing]`'s token prices). A name a plugin
    /// reports that is not a valid model name, or a service it cannot offer, is left out.
    pub fn model_offers(&self) -> Vec<wire::ModelOffer> {
        let plugins = self.plugins();
        let mut offers: Vec<wire::ModelOffer> = Vec::new();
        for plugin in &plugins.loaded {
            if plugin.unavailable.is_some() {
                continue;
            }
            let Some(backend) = plugin.backends.first() else {
                continue;
            };
            for model in plugin.backend.models() {
                let (service, name) = (model.service.as_str(), model.name.as_str());
                if rhizos_plugin_api::ai::Service::parse(service).is_none()
                    || !rhizos_plugin_api::ai::is_model_name(name)
                {
                    tracing::warn!(plugin = %plugin.name, service, name, "plugin reports a model that cannot be offered; left out");
                    continue;
                }
                if offers
                    .iter()
                    .any(|o| o.name == name && o.service == service)
                {
                    continue;
                }
                let price = self.inner.settings.model_prices.get(name).copied();
                offers.push(wire::ModelOffer {
                    backend: backend.clone(),
                    service: service.into(),
                    name: name.into(),
                    context_length: model.context_length,
                    warm: model.warm,
                    input_million_micros: price
                        .map_or(self.inner.pricing.input_million_micros, |p| {
                            p.input_million_micros
                        }),
                    output_million_micros: price
                        .map_or(self.inner.pricing.output_million_micros, |p| {
                            p.output_million_micros
                        }),
                });
            }
        }
        offers.sort_by(|a, b| (&a.name, &a.service).cmp(&(&b.name, &b.service)));
        offers
    }

    fn running(&self) -> Vec<ExecutionRef> {
        self.executions()
            .keys()
            .map(|(job_id, attempt)| ExecutionRef {
                job_id: job_id.clone(),
                attempt: *attempt,
            })
            .collect()
    }

    fn executions(&self) -> std::sync::MutexGuard<'_, Executions> {
        self.inner
            .executions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers, then serves assignments until `shutdown` resolves. Running executions are
    /// stopped on shutdown and handed back to the orchestrator (to run elsewhere) before this
    /// returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let bus = &self.inner.bus;
        let node_id = self.inner.node_id.clone();
        let mut assignments = bus
            .client
            .subscribe(bus.subjects.job_assign(&node_id)?)
            .await?;
        let mut stops = bus
            .client
            .subscribe(bus.subjects.job_stop(&node_id)?)
            .await?;
        let mut plugin_queries = bus
            .client
            .subscribe(bus.subjects.node_plugins(&node_id)?)
            .await?;
        let mut reregisters = bus
            .client
            .subscribe(bus.subjects.node_reregister(&node_id)?)
            .await?;
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = self.register() => {}
        }
        // Aborted when `run` ends or is dropped: a dead agent must stop heartbeating.
        let heartbeat = AbortOnDrop(tokio::spawn(self.clone().heartbeat_loop()));
        let mut tasks = tokio::task::JoinSet::new();
        let _watcher = (self.inner.settings.plugin_scan_ms > 0)
            .then(|| AbortOnDrop(tokio::spawn(self.clone().watch_plugins())));
        tracing::info!(%node_id, backends = ?self.plugins().backends(), "agent ready");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(message) = assignments.next() => {
                    let (reply, accepted) = self.take_assignment(&message.payload);
                    if let Some(reply_to) = message.reply {
                        let _ = bus.client.publish(reply_to, reply).await;
                    }
                    if let Some(assign) = accepted {
                        tasks.spawn(self.clone().execute(assign));
                    }
                }
                Some(message) = stops.next() => {
                    let reply = self.stop(&message.payload);
                    if let Some(reply_to) = message.reply {
                        let _ = bus.client.publish(reply_to, reply).await;
                    }
                }
                Some(message) = plugin_queries.next() => {
                    let reply = match wire::decode::<wire::ListPlugins>(&message.payload, 64 * 1024) {
                        Ok(_) => wire::encode(&Reply::ok(self.plugin_list())),
                        Err(e) => wire::encode(&Reply::<wire::PluginList>::err(e)),
                    };
                    if let Some(reply_to) = message.reply {
                        let _ = bus.client.publish(reply_to, reply).await;
                    }
                }
                Some(message) = reregisters.next() => {
                    let reply = match wire::decode::<wire::RegisterAgain>(&message.payload, 64 * 1024) {
                        Ok(_) => {
                            use std::sync::atomic::Ordering::AcqRel;
                            if !self.inner.reregistering.swap(true, AcqRel) {
                                tracing::warn!(%node_id, "the orchestrator holds no registration of this node (it forgot it, or its ledger is older): registering again");
                                let this = self.clone();
                                tasks.spawn(async move {
                                    this.register().await;
                                    this.inner.reregistering.store(false, std::sync::atomic::Ordering::Release);
                                });
                            }
                            wire::encode(&Reply::ok(Ack { accepted: true, note: None }))
                        }
                        Err(e) => wire::encode(&Reply::<Ack>::err(e)),
                    };
                    if let Some(reply_to) = message.reply {
                        let _ = bus.client.publish(reply_to, reply).await;
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(heartbeat);
        self.inner
            .shutting_down
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let running: Vec<Arc<Running>> = self.executions().values().flatten().cloned().collect();
        if !running.is_empty() {
            tracing::info!(
                count = running.len(),
                "stopping running executions and handing them back"
            );
        }
        for running in running {
            running.execution.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tracing::info!(%node_id, "agent stopped");
        Ok(())
    }

    async fn register(&self) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.inner.bus.call(&self.registration()).await {
                Ok(_) => {
                    tracing::info!(node_id = %self.inner.node_id, "registered with the orchestrator");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "registration failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn heartbeat_loop(self) {
        let interval = Duration::from_millis(self.inner.settings.heartbeat_interval_ms);
        let Ok(subject) = self.inner.bus.subjects.node_heartbeat(&self.inner.node_id) else {
            return;
        };
        loop {
            let running = self.running();
            let free_slots = self
                .inner
                .settings
                .max_concurrent
                .saturating_sub(running.len() as u32);
            let heartbeat = Heartbeat {
                v: WIRE_VERSION,
                node_id: self.inner.node_id.clone(),
                running,
                free_slots,
                ts_ms: crate::now_ms(),
                gpus: self
                    .inner
                    .nvml
                    .as_ref()
                    .map(hardware::telemetry)
                    .unwrap_or_default(),
            };
            if let Err(e) = self
                .inner
                .bus
                .client
                .publish(subject.clone(), wire::encode(&heartbeat))
                .await
            {
                tracing::warn!(error = %e, "heartbeat not sent");
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Validates an assignment and reserves a slot for it. Returns the reply and, if accepted,
    /// the assignment to execute.
    fn take_assignment(&self, payload: &[u8]) -> (bytes::Bytes, Option<AssignJob>) {
        let refuse = |error: WireError| (wire::encode(&Reply::<Ack>::err(error)), None);
        let assign: AssignJob = match wire::decode(payload, MAX_ASSIGN_BYTES) {
            Ok(assign) => assign,
            Err(e) => return refuse(e),
        };
        if let Err(e) = validate_token("job id", &assign.job_id) {
            return refuse(WireError::new(ErrorCode::BadRequest, e.to_string()));
        }
        if self.plugin_for(&assign.spec.workload).is_none() {
            let what = match &assign.spec.workload {
                Workload::Inference { service, model, .. } => {
                    format!("{model} is not served for {service} on this node (now)")
                }
                other => format!("no {} backend on this node", other.backend()),
            };
            return refuse(WireError::new(ErrorCode::InvalidState, what));
        }
        let mut executions = self.executions();
        let key = (assign.job_id.clone(), assign.attempt);
        if executions.contains_key(&key) {
            return (
                wire::encode(&Reply::ok(Ack {
                    accepted: true,
                    note: Some("already running".into()),
                })),
                None,
            );
        }
        if executions.len() >= self.inner.settings.max_concurrent as usize {
            return refuse(WireError::new(
                ErrorCode::NoCapacity,
                "all execution slots are busy",
            ));
        }
        executions.insert(key, None);
        tracing::info!(job_id = %assign.job_id, attempt = assign.attempt, "assignment accepted");
        (
            wire::encode(&Reply::ok(Ack {
                accepted: true,
                note: None,
            })),
            Some(assign),
        )
    }

    fn stop(&self, payload: &[u8]) -> bytes::Bytes {
        let stop: StopJob = match wire::decode(payload, 64 * 1024) {
            Ok(stop) => stop,
            Err(e) => return wire::encode(&Reply::<Ack>::err(e)),
        };
        let execution = self
            .executions()
            .get(&(stop.job_id.clone(), stop.attempt))
            .cloned();
        let ack = match execution {
            Some(Some(execution)) => {
                tracing::info!(job_id = %stop.job_id, attempt = stop.attempt, "stopping execution");
                execution
                    .stop_requested
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                execution.execution.cancel();
                Ack {
                    accepted: true,
                    note: None,
                }
            }
            Some(None) => Ack {
                accepted: false,
                note: Some("execution is still starting; retry".into()),
            },
            None => Ack {
                accepted: true,
                note: Some("not running here".into()),
            },
        };
        wire::encode(&Reply::ok(ack))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
