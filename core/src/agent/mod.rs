//! `rhizosd agent`: one per provider machine. Loads backend plugins, registers the node with its
//! capabilities and prices, heartbeats, takes assignments on `job.assign.<node_id>`, runs them
//! through the plugin, streams log lines on `job.log.<job_id>` while they run, and reports the
//! outcome (retrying until the orchestrator acknowledges it).
//!
//! Plugin calls are blocking FFI calls: they run on tokio's blocking pool, and log lines come back
//! through a host-implemented sink into a channel, so no tokio type crosses the ABI boundary.

pub mod artifacts;
pub mod hardware;
pub mod plugins;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString, RVec, Tuple2};
use anyhow::Context as _;
use futures::StreamExt as _;
use plugins::PluginSet;
use rhizos_broker::config::AgentSettings;
use rhizos_broker::wire::{
    self, Ack, AssignJob, ErrorCode, ExecutionOutcome, ExecutionRef, ExitKind, Heartbeat,
    JobReport, LogLine, LogStream, PluginView, Pricing, RegisterNode, Reply, ReportPhase, StopJob,
    WIRE_VERSION, WireError, Workload,
};
use rhizos_broker::{Bus, RequestError, validate_token};
use rhizos_plugin_api::{EventSink, EventSink_TO, ExecLimits, ExecRequest, ExecutionBox};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest assignment accepted (inline WASM modules are base64 in it).
const MAX_ASSIGN_BYTES: usize = 2 * 1024 * 1024;

/// Executions by (job, attempt); `None` while the plugin is still starting one.
type Executions = HashMap<(String, u32), Option<Arc<Running>>>;

/// An execution and the plugin it runs on. Fields drop in order: the execution goes before the
/// plugin, and the plugin (even if replaced or removed since) lives as long as the execution.
struct Running {
    execution: ExecutionBox,
    _plugin: Arc<plugins::LoadedPlugin>,
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
}

impl Agent {
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
        loop {
            tokio::time::sleep(every).await;
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

    fn registration(&self) -> RegisterNode {
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
        }
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
    /// cancelled on shutdown and their outcome reported before this returns.
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
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(heartbeat);
        let running: Vec<Arc<Running>> = self.executions().values().flatten().cloned().collect();
        if !running.is_empty() {
            tracing::info!(count = running.len(), "stopping running executions");
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
        let backend = assign.spec.workload.backend();
        if self.plugins().backend(backend).is_none() {
            return refuse(WireError::new(
                ErrorCode::InvalidState,
                format!("no {backend} backend on this node"),
            ));
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

    /// Runs one attempt to its end and reports it.
    async fn execute(self, assign: AssignJob) {
        let key = (assign.job_id.clone(), assign.attempt);
        let outcome = self.run_plugin(&assign).await;
        tracing::info!(job_id = %assign.job_id, attempt = assign.attempt, kind = ?outcome.kind, exit_code = ?outcome.exit_code, elapsed_ms = outcome.elapsed_ms, "execution ended");
        let report = JobReport {
            v: WIRE_VERSION,
            node_id: self.inner.node_id.clone(),
            job_id: assign.job_id,
            attempt: assign.attempt,
            phase: ReportPhase::Finished { outcome },
        };
        self.send_report(report).await;
        // Only now: until the orchestrator has the result, heartbeats keep listing the attempt,
        // so it is never mistaken for one the node lost.
        self.executions().remove(&key);
    }

    async fn run_plugin(&self, assign: &AssignJob) -> ExecutionOutcome {
        let rejected = |message: String| ExecutionOutcome {
            kind: ExitKind::Rejected,
            exit_code: None,
            message: Some(message),
            elapsed_ms: 0,
            fuel_consumed: None,
            output_files: Default::default(),
            stdout: String::new(),
            stderr: String::new(),
        };
        // Bytes by reference: fetched (or found in the cache) before anything is leased.
        let fetched = match &assign.spec.artifact_url {
            Some(url) => {
                let (store, url, digest) = (
                    self.inner.artifacts.clone(),
                    url.clone(),
                    assign.spec.artifact_sha256.clone().unwrap_or_default(),
                );
                let started = std::time::Instant::now();
                match tokio::task::spawn_blocking(move || store.get(&url, &digest)).await {
                    Ok(Ok((bytes, origin))) => {
                        tracing::info!(job_id = %assign.job_id, bytes = bytes.len(), ?origin, ms = started.elapsed().as_millis() as u64, "artifact ready");
                        Some(bytes)
                    }
                    Ok(Err(message)) => return rejected(message),
                    Err(e) => return rejected(format!("fetching the artifact failed: {e}")),
                }
            }
            None => None,
        };
        let gpus = match GpuLease::take(&self.inner, assign.spec.gpus) {
            Ok(lease) => lease,
            Err(message) => return rejected(message),
        };
        let request = match exec_request(assign, &gpus.devices, fetched) {
            Ok(request) => request,
            Err(e) => return rejected(e.message),
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let sink = EventSink_TO::from_value(
            ChannelSink {
                sender: sender.clone(),
            },
            TD_Opaque,
        );
        let backend_name = assign.spec.workload.backend();
        // Held until the execution ends: a plugin replaced or removed meanwhile stays alive for it.
        let Some(plugin) = self.plugins().backend(backend_name).cloned() else {
            return rejected(format!(
                "no {backend_name} backend on this node any more (its plugin was removed)"
            ));
        };
        let starter = plugin.clone();
        let started =
            tokio::task::spawn_blocking(move || match starter.backend.start(request, sink) {
                RResult::ROk(execution) => Ok(execution),
                RResult::RErr(message) => Err(message.into_string()),
            })
            .await;
        let execution = match started {
            Ok(Ok(execution)) => Arc::new(Running {
                execution,
                _plugin: plugin,
            }),
            Ok(Err(message)) => return rejected(message),
            Err(e) => return rejected(format!("backend start failed: {e}")),
        };
        self.executions().insert(
            (assign.job_id.clone(), assign.attempt),
            Some(execution.clone()),
        );

        let running = JobReport {
            v: WIRE_VERSION,
            node_id: self.inner.node_id.clone(),
            job_id: assign.job_id.clone(),
            attempt: assign.attempt,
            phase: ReportPhase::Running,
        };
        let reporter = tokio::spawn({
            let this = self.clone();
            async move { this.send_report(running).await }
        });
        let forwarder = tokio::spawn(self.clone().forward_logs(
            assign.job_id.clone(),
            assign.attempt,
            receiver,
        ));
        let waited = tokio::task::spawn_blocking(move || execution.execution.wait()).await;
        // Every line reached the sink before `wait` returned; this marker follows them.
        let _ = sender.send(SinkMessage::Done);
        let (stdout, stderr) = forwarder.await.unwrap_or_default();
        let _ = reporter.await;
        match waited {
            Ok(outcome) => ExecutionOutcome {
                kind: match outcome.kind {
                    rhizos_plugin_api::ExitKind::Exited => ExitKind::Exited,
                    rhizos_plugin_api::ExitKind::TimedOut => ExitKind::TimedOut,
                    rhizos_plugin_api::ExitKind::MemoryExceeded => ExitKind::MemoryExceeded,
                    rhizos_plugin_api::ExitKind::Crashed => ExitKind::Crashed,
                    rhizos_plugin_api::ExitKind::Cancelled => ExitKind::Cancelled,
                    rhizos_plugin_api::ExitKind::Rejected => ExitKind::Rejected,
                    rhizos_plugin_api::ExitKind::FuelExhausted => ExitKind::FuelExhausted,
                },
                exit_code: (outcome.kind == rhizos_plugin_api::ExitKind::Exited)
                    .then_some(outcome.exit_code),
                message: (!outcome.message.is_empty()).then(|| outcome.message.into_string()),
                elapsed_ms: outcome.elapsed_ms,
                fuel_consumed: (outcome.fuel_consumed > 0).then_some(outcome.fuel_consumed),
                output_files: outcome
                    .output_files
                    .iter()
                    .map(|Tuple2(name, content)| (name.to_string(), wire::b64_encode(content)))
                    .collect(),
                stdout,
                stderr,
            },
            Err(e) => ExecutionOutcome {
                kind: ExitKind::Crashed,
                exit_code: None,
                message: Some(format!("waiting for the execution failed: {e}")),
                elapsed_ms: 0,
                fuel_consumed: None,
                output_files: Default::default(),
                stdout,
                stderr,
            },
        }
    }

    /// Publishes each line on the job's log subject, in order, and keeps bounded tails.
    async fn forward_logs(
        self,
        job_id: String,
        attempt: u32,
        mut receiver: mpsc::UnboundedReceiver<SinkMessage>,
    ) -> (String, String) {
        let max = self.inner.settings.max_output_bytes;
        let (mut stdout, mut stderr) = (Tail::new(max), Tail::new(max));
        let subject = match self.inner.bus.subjects.job_log(&job_id) {
            Ok(subject) => subject,
            Err(_) => return (String::new(), String::new()),
        };
        let mut seq = 0;
        while let Some(SinkMessage::Line(stream, line)) = receiver.recv().await {
            let message = LogLine {
                v: WIRE_VERSION,
                job_id: job_id.clone(),
                attempt,
                seq,
                stream,
                line,
                ts_ms: crate::now_ms(),
            };
            seq += 1;
            if let Err(e) = self
                .inner
                .bus
                .client
                .publish(subject.clone(), wire::encode(&message))
                .await
            {
                tracing::debug!(error = %e, "log line not published");
            }
            match stream {
                LogStream::Stdout => stdout.push(&message.line),
                LogStream::Stderr => stderr.push(&message.line),
            }
        }
        (stdout.into_string(), stderr.into_string())
    }

    /// Sends a report until the orchestrator answers (it may be restarting).
    async fn send_report(&self, report: JobReport) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.inner.bus.call(&report).await {
                Ok(Ack { accepted: true, .. }) => return,
                Ok(Ack { note, .. }) => {
                    tracing::warn!(job_id = %report.job_id, attempt = report.attempt, note = ?note, "report not accepted");
                    return;
                }
                Err(RequestError::Remote(e)) if e.code != ErrorCode::Internal => {
                    tracing::error!(job_id = %report.job_id, error = %e, "report refused");
                    return;
                }
                Err(e) => {
                    tracing::warn!(job_id = %report.job_id, error = %e, "report not delivered; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The plugin's request for `assign`, on the GPUs `gpu_devices`, with the workload's bytes
/// `fetched` by reference or else as the job carries them ([`inline_workload`]).
fn exec_request(
    assign: &AssignJob,
    gpu_devices: &[String],
    fetched: Option<Vec<u8>>,
) -> Result<ExecRequest, WireError> {
    let workload = match fetched {
        // By reference (`artifact_url`): `ArtifactStore::get` checked the digest.
        Some(bytes) => bytes,
        None => inline_workload(assign)?,
    };
    let stdin = match &assign.spec.stdin_b64 {
        Some(text) => wire::b64_decode("stdin_b64", text)?,
        None => Vec::new(),
    };
    let mut input_files = RVec::new();
    for (name, content) in &assign.spec.input_files {
        if !wire::valid_file_path(name) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("input file name {name:?} is not a plain relative path"),
            ));
        }
        let content = wire::b64_decode("input_files", content)?;
        input_files.push(Tuple2(RString::from(name.as_str()), RVec::from(content)));
    }
    Ok(ExecRequest {
        input_files,
        execution_id: RString::from(format!("{}-{}", assign.job_id, assign.attempt)),
        workload: RVec::from(workload),
        args: assign
            .spec
            .args
            .iter()
            .map(|a| RString::from(a.as_str()))
            .collect(),
        env: assign
            .spec
            .env
            .iter()
            .map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str())))
            .collect(),
        stdin: RVec::from(stdin),
        limits: ExecLimits {
            wall_timeout_ms: assign.spec.timeout_ms,
            memory_limit_bytes: assign.spec.memory_mib.saturating_mul(1024 * 1024),
            fuel_limit: assign.spec.fuel_limit.unwrap_or(0),
            cpu_cores: assign.spec.cpu_cores,
            vram_limit_bytes: assign.spec.min_vram_mib.saturating_mul(1024 * 1024),
        },
        gpu_devices: gpu_devices
            .iter()
            .map(|d| RString::from(d.as_str()))
            .collect(),
    })
}

/// The workload's bytes as the job carries them: a WASM module, CUDA program or plugin payload
/// decoded, any other workload as its JSON; a module's artifact checked against its digest.
fn inline_workload(assign: &AssignJob) -> Result<Vec<u8>, WireError> {
    let workload = match &assign.spec.workload {
        Workload::Wasm { module_b64 } => wire::b64_decode("workload.module_b64", module_b64)?,
        Workload::Cuda { program_b64 } => wire::b64_decode("workload.program_b64", program_b64)?,
        Workload::Custom { payload_b64, .. } => {
            wire::b64_decode("workload.payload_b64", payload_b64)?
        }
        Workload::Module { uri } => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("{uri} reached the node unresolved"),
            ));
        }
        other => {
            let mut value = serde_json::to_value(other).map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("cannot encode the workload: {e}"),
                )
            })?;
            // A container image from a module: the docker plugin checks the local image's id.
            if let (Some(digest), Some(object)) =
                (&assign.spec.artifact_sha256, value.as_object_mut())
            {
                object.insert("image_id".into(), format!("sha256:{digest}").into());
            }
            serde_json::to_vec(&value).map_err(|e| {
                WireError::new(
                    ErrorCode::Internal,
                    format!("cannot encode the workload: {e}"),
                )
            })?
        }
    };
    // A module's artifact must be the one its registry entry names, byte for byte.
    if let Some(expected) = &assign.spec.artifact_sha256
        && !matches!(assign.spec.workload, Workload::Docker { .. })
    {
        let actual = crate::sha256_hex(&workload);
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "artifact digest mismatch: the workload's sha256 is {actual}, the job requires {expected}; refusing to run it"
                ),
            ));
        }
    }
    Ok(workload)
}

/// GPUs held by one execution, given back when it is dropped.
struct GpuLease<'a> {
    inner: &'a Inner,
    indices: Vec<usize>,
    /// What the backend is told: the UUID when the driver gave one, else the index.
    devices: Vec<String>,
}

impl<'a> GpuLease<'a> {
    fn take(inner: &'a Inner, count: u32) -> Result<Self, String> {
        let mut busy = inner
            .gpus_busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let free: Vec<usize> = (0..inner.hardware.gpus.len())
            .filter(|i| !busy.get(*i).copied().unwrap_or(true))
            .take(count as usize)
            .collect();
        if free.len() < count as usize {
            return Err(format!(
                "the job needs {count} GPU(s); this node has {} free of {}",
                free.len(),
                inner.hardware.gpus.len()
            ));
        }
        for &i in &free {
            busy[i] = true;
        }
        let devices = free
            .iter()
            .map(|&i| {
                inner.hardware.gpus[i]
                    .uuid
                    .clone()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect();
        Ok(Self {
            inner,
            indices: free,
            devices,
        })
    }
}

impl Drop for GpuLease<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .inner
            .gpus_busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for &i in &self.indices {
            busy[i] = false;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum SinkMessage {
    Line(LogStream, String),
    Done,
}

/// The host side of the plugin's log sink: lines go into a channel, in order.
struct ChannelSink {
    sender: mpsc::UnboundedSender<SinkMessage>,
}

impl EventSink for ChannelSink {
    fn log(&self, stream: rhizos_plugin_api::LogStream, line: RStr<'_>) {
        let stream = match stream {
            rhizos_plugin_api::LogStream::Stdout => LogStream::Stdout,
            rhizos_plugin_api::LogStream::Stderr => LogStream::Stderr,
        };
        let _ = self
            .sender
            .send(SinkMessage::Line(stream, line.to_string()));
    }
}

/// The last `max_bytes` of a stream of lines.
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
}

impl Tail {
    fn new(max_bytes: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn push(&mut self, line: &str) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line.to_owned());
        while self.bytes > self.max_bytes {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    fn into_string(self) -> String {
        let mut text = String::with_capacity(self.bytes);
        for line in self.lines {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}
