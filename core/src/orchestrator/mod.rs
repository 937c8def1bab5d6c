//! `rhizosd orchestrator`: serves the `ctl` subjects on the `orchestrator` queue group, keeps the
//! node registry, matches pending jobs to nodes, and owns the escrow ledger (see [`store`]).
//!
//! Requests are validated before anything is stored; a bad request gets an error reply with a
//! stable code and the service keeps serving. Events are written to the outbox in the same
//! transaction as the change they describe and published to JetStream afterwards by
//! [`publish_outbox`], so a crash between commit and publish loses no event.

pub mod matching;
pub mod modules;
pub mod store;

use anyhow::Context as _;
use futures::StreamExt as _;
use matching::Registry;
use rhizos_broker::config::OrchestratorSettings;
use rhizos_broker::subjects::ORCHESTRATOR_QUEUE;
use rhizos_broker::wire::{
    self, AccountRef, Ack, AssignJob, Deposit, ErrorCode, Heartbeat, JobList, JobRef, JobReport,
    JobSpec, JobState, ListJobs, RegisterNode, Reply, ReportPhase, StopJob, SubmitJob,
    SubmitJobReply, WIRE_VERSION, WireError, Workload,
};
use rhizos_broker::{Bus, validate_token};
use serde::Serialize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use store::{ReportEffect, Store};
use tokio::sync::Notify;

/// Largest WASM module accepted inline in a submit.
pub const MAX_INLINE_MODULE_BYTES: usize = 512 * 1024;
/// Longest execution deadline a job may ask for.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
/// Largest `max_cost` accepted: $1,000,000.
pub const MAX_COST_MICROS: i64 = 1_000_000 * wire::MICROS_PER_USD;
/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 10;
/// Longest queue or total timeout a job may ask for: 30 days.
pub const MAX_JOB_LIFETIME_MS: u64 = 30 * 24 * 3_600_000;

/// The orchestrator service. Cheap to clone (all state behind `Arc`).
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    settings: OrchestratorSettings,
    /// Operations for the ledger writer thread, which owns the [`Store`].
    writer: std::sync::mpsc::Sender<Op>,
    /// The database's instance id, for event dedupe ids.
    instance: String,
    registry: Mutex<Registry>,
    dispatch_wake: Notify,
    outbox_wake: Notify,
    /// The event publisher's view of the outbox (one publisher at a time).
    outbox: tokio::sync::Mutex<OutboxState>,
    /// A delete of published outbox rows is on its way to the ledger thread.
    outbox_deleting: std::sync::atomic::AtomicBool,
    /// The resolver chain for `chain://` modules, when `resolver_dir` is set.
    modules: Option<modules::ModuleResolver>,
}

struct OutboxState {
    reader: store::OutboxReader,
    /// Highest outbox id JetStream has acknowledged (0 after a start: rows still in the table
    /// are published again; JetStream drops the repeats by their message id).
    published: i64,
    /// Highest outbox id a delete was sent for, and when.
    deleted: i64,
    deleted_at: std::time::Instant,
}

/// Published outbox rows are deleted once this many wait, or [`DELETE_AFTER`] after the last
/// delete (the outbox loop ticks every second, so leftovers go within about a second).
const DELETE_BATCH: i64 = 512;
const DELETE_AFTER: Duration = Duration::from_millis(500);

impl Orchestrator {
    /// Opens the ledger in `settings.data_dir` and prepares the event stream.
    pub async fn open(bus: Bus, settings: OrchestratorSettings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!("failed to create data dir {}", settings.data_dir.display())
        })?;
        anyhow::ensure!(
            settings.fee_bps <= 10_000,
            "fee_bps must be at most 10000, got {}",
            settings.fee_bps
        );
        let path = settings.data_dir.join("ledger.db");
        let mut store = Store::open(&path, settings.fee_bps, bus.subjects.clone())
            .with_context(|| format!("failed to open ledger at {}", path.display()))?;
        store
            .checkpoint_in_background(&path, Duration::from_millis(200))
            .context("failed to start the WAL checkpointer")?;
        let mut registry = Registry::new(settings.matching);
        for (registration, _) in store.nodes().map_err(|e| anyhow::anyhow!("{e}"))? {
            registry.upsert(registration);
        }
        bus.ensure_event_stream().await?;
        let modules = match &settings.resolver_dir {
            Some(dir) => Some(
                modules::ModuleResolver::open(
                    dir,
                    settings
                        .resolvers
                        .iter()
                        .map(|(name, value)| (name.clone(), value.to_string()))
                        .collect(),
                    &settings.resolver_order,
                    Duration::from_millis(settings.resolver_timeout_ms),
                    Duration::from_millis(settings.resolver_cache_ttl_ms),
                )
                .with_context(|| format!("cannot open resolver dir {}", dir.display()))?,
            ),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                settings,
                instance: store.instance().to_owned(),
                writer: spawn_writer(store)?,
                registry: Mutex::new(registry),
                dispatch_wake: Notify::new(),
                outbox_wake: Notify::new(),
                outbox: tokio::sync::Mutex::new(OutboxState {
                    reader: store::OutboxReader::open(&path)
                        .context("failed to open the outbox reader")?,
                    published: 0,
                    deleted: 0,
                    deleted_at: std::time::Instant::now(),
                }),
                outbox_deleting: std::sync::atomic::AtomicBool::new(false),
                modules,
            }),
        })
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let bus = &self.inner.bus;
        let mut requests = bus
            .client
            .queue_subscribe(
                bus.subjects.orchestrator_wildcard(),
                ORCHESTRATOR_QUEUE.to_owned(),
            )
            .await
            .context("failed to subscribe to ctl subjects")?;
        let mut heartbeats = bus
            .client
            .subscribe(bus.subjects.node_heartbeat_wildcard())
            .await
            .context("failed to subscribe to heartbeats")?;
        tracing::info!(namespace = bus.subjects.namespace(), data_dir = %self.inner.settings.data_dir.display(), "orchestrator serving");
        let background = [
            tokio::spawn(self.clone().dispatch_loop()),
            tokio::spawn(self.clone().outbox_loop()),
            tokio::spawn(self.clone().sweep_loop()),
        ];
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(message) = requests.next() => {
                    let this = self.clone();
                    tokio::spawn(async move { this.handle_request(message).await });
                }
                Some(message) = heartbeats.next() => self.handle_heartbeat(&message.payload),
                else => break,
            }
        }
        for task in background {
            task.abort();
        }
        // Publish what is already committed before going away.
        if let Err(e) = self.flush_outbox().await {
            tracing::warn!(error = %e, "events left unpublished are sent at the next start");
        }
        tracing::info!("orchestrator stopped");
        Ok(())
    }

    /// Runs `f` on the ledger writer thread; its result arrives once the batch it ran in has
    /// been committed (or as an `internal` error if that commit failed).
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, WireError> + Send + 'static,
    ) -> Result<T, WireError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(move |store: &mut Store| {
            let result = f(store);
            Box::new(move |commit: &Result<(), String>| {
                let _ = sender.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(WireError::new(ErrorCode::Internal, format!("ledger {e}"))),
                });
            }) as Completion
        });
        self.inner
            .writer
            .send(op)
            .map_err(|_| WireError::new(ErrorCode::Internal, "the ledger writer has stopped"))?;
        receiver.await.map_err(|_| {
            WireError::new(
                ErrorCode::Internal,
                "the ledger writer dropped an operation",
            )
        })?
    }

    async fn handle_request(&self, message: async_nats::Message) {
        let Some(reply_to) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject, "request without reply subject ignored");
            return;
        };
        let subjects = &self.inner.bus.subjects;
        let operation = subjects
            .ctl_operation(&message.subject)
            .unwrap_or("")
            .to_owned();
        let payload = &message.payload;
        let reply = match operation.as_str() {
            "job.submit" => encode_reply(self.submit(payload).await),
            "job.get" => encode_reply(self.get_job(payload).await),
            "module.resolve" => encode_reply(self.module_resolve(payload).await),
            "module.list" => encode_reply(self.module_list(payload).await),
            "job.list" => encode_reply(self.list_jobs(payload).await),
            "job.cancel" => encode_reply(self.cancel_job(payload).await),
            "job.report" => encode_reply(self.report(payload).await),
            "account.create" => encode_reply(self.account_create(payload).await),
            "account.deposit" => encode_reply(self.account_deposit(payload).await),
            "account.balance" => encode_reply(self.account_balance(payload).await),
            "node.register" => encode_reply(self.register_node(payload).await),
            "node.list" => encode_reply(self.node_list(payload).await),
            "node.info" => encode_reply(self.node_info(payload).await),
            "account.statement" => encode_reply(self.account_statement(payload).await),
            "ledger.verify" => encode_reply(self.ledger_verify(payload).await),
            other => encode_reply::<()>(Err(WireError::new(
                ErrorCode::UnsupportedSubject,
                format!(
                    "unsupported subject {} (operation {other:?})",
                    message.subject
                ),
            ))),
        };
        if let Err(e) = self.inner.bus.client.publish(reply_to, reply).await {
            tracing::warn!(error = %e, %operation, "failed to send reply");
        }
    }

    async fn resolve_module(&self, uri: &str) -> Result<wire::ResolvedModule, WireError> {
        match &self.inner.modules {
            Some(modules) => modules.resolve(uri).await,
            None => Err(WireError::new(
                ErrorCode::NotFound,
                format!(
                    "cannot resolve {uri}: this orchestrator has no module resolvers ([orchestrator] resolver_dir)"
                ),
            )),
        }
    }

    async fn module_list(&self, payload: &[u8]) -> Result<wire::ModuleList, WireError> {
        let _: wire::ListModules = self.decode(payload)?;
        match &self.inner.modules {
            Some(modules) => Ok(modules.list().await),
            None => Ok(wire::ModuleList {
                modules: Vec::new(),
                unlisted: Vec::new(),
                problems: vec![
                    "this orchestrator has no module resolvers ([orchestrator] resolver_dir)"
                        .into(),
                ],
            }),
        }
    }

    async fn module_resolve(&self, payload: &[u8]) -> Result<wire::ResolvedModule, WireError> {
        let request: wire::ResolveModule = self.decode(payload)?;
        self.resolve_module(&request.uri).await
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, payload: &[u8]) -> Result<T, WireError> {
        wire::decode(payload, self.inner.settings.max_request_bytes)
    }

    async fn submit(&self, payload: &[u8]) -> Result<SubmitJobReply, WireError> {
        let mut request: SubmitJob = self.decode(payload)?;
        if let Workload::Module { uri } = &request.spec.workload {
            let resolved = self.resolve_module(uri).await?;
            request.spec = modules::materialize(&resolved.manifest, &request.spec)?;
        }
        let job_id = match request.job_id.clone() {
            Some(id) => id,
            None => format!("job-{}", uuid::Uuid::now_v7().simple()),
        };
        validate_submit(&request, &job_id)?;
        // Refuse at once what no known node could ever run.
        self.registry()
            .feasibility(&request.spec, request.max_cost_micros)?;
        let (account, spec, id, max_cost) = (
            request.account.clone(),
            request.spec.clone(),
            job_id.clone(),
            request.max_cost_micros,
        );
        let this = self.clone();
        let (mut job, created, placed) = self
            .db(move |store| {
                let (job, created) = store.submit(&id, &account, &spec, max_cost)?;
                // Fast path: with nobody queued ahead, place the job in the same operation (and
                // commit) that accepted it, instead of waiting for a dispatch pass.
                let placed = if created && !store.pending_other_than(&id)? {
                    this.place(store, &id, &spec, max_cost)
                } else {
                    None
                };
                Ok((job, created, placed))
            })
            .await?;
        if created {
            tracing::info!(job_id = %job.job_id, account = %job.account, max_cost_micros = job.max_cost_micros, "job accepted");
        }
        self.inner.outbox_wake.notify_one();
        match placed {
            Some((node_id, attempt, fuel_limit)) => {
                job.state = JobState::Assigned;
                let this = self.clone();
                let (id, mut spec) = (job.job_id.clone(), request.spec);
                spec.fuel_limit = fuel_limit;
                tokio::spawn(async move { this.send_assignment(id, attempt, spec, node_id).await });
            }
            None => self.inner.dispatch_wake.notify_one(),
        }
        Ok(SubmitJobReply {
            job_id: job.job_id,
            state: job.state,
        })
    }

    /// On the ledger thread: chooses a node for a pending job and records the assignment;
    /// returns the node and attempt to send, or `None` when no node has room now (or the job
    /// is no longer pending).
    fn place(
        &self,
        store: &mut Store,
        job_id: &str,
        spec: &JobSpec,
        max_cost_micros: i64,
    ) -> Option<(String, u32, Option<u64>)> {
        let mut registry = self.registry();
        let node = registry.pick(spec, max_cost_micros)?;
        let (node_id, pricing) = (node.registration.node_id.clone(), node.registration.pricing);
        let fuel_limit = matching::fuel_budget(spec, max_cost_micros, &node.registration);
        // The assignment has its own savepoint: failing leaves the rest of the batch.
        match store.assign(job_id, &node_id, &pricing) {
            Ok(Some(attempt)) => {
                registry.allocate(&node_id, spec);
                Some((node_id, attempt, fuel_limit))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(%job_id, error = %e, "cannot record the assignment");
                None
            }
        }
    }

    async fn get_job(&self, payload: &[u8]) -> Result<wire::JobView, WireError> {
        let request: JobRef = self.decode(payload)?;
        validate(validate_token("job id", &request.job_id))?;
        self.db(move |store| store.get_job(&request.job_id)).await
    }

    async fn list_jobs(&self, payload: &[u8]) -> Result<JobList, WireError> {
        let request: ListJobs = self.decode(payload)?;
        if let Some(account) = &request.account {
            validate(validate_token("account", account))?;
        }
        let jobs = self.db(move |store| store.list_jobs(&request)).await?;
        Ok(JobList { jobs })
    }

    async fn cancel_job(&self, payload: &[u8]) -> Result<wire::JobView, WireError> {
        let request: JobRef = self.decode(payload)?;
        validate(validate_token("job id", &request.job_id))?;
        let effect = self.db(move |store| store.cancel(&request.job_id)).await?;
        self.inner.outbox_wake.notify_one();
        if let Some((node_id, attempt)) = effect.stop {
            self.send_stop(&node_id, &effect.job.job_id, attempt).await;
        }
        Ok(effect.job)
    }

    /// Asks `node_id` to stop an attempt (best effort: a node that is gone is found by the
    /// sweeper, and its attempts requeued or ended).
    async fn send_stop(&self, node_id: &str, job_id: &str, attempt: u32) {
        let stop = StopJob {
            v: WIRE_VERSION,
            job_id: job_id.to_owned(),
            attempt,
        };
        match self.inner.bus.subjects.job_stop(node_id) {
            Ok(subject) => {
                if let Err(e) = self.inner.bus.request::<_, Ack>(subject, &stop).await {
                    tracing::warn!(%job_id, %node_id, error = %e, "node did not confirm the stop");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot address node"),
        }
    }

    async fn report(&self, payload: &[u8]) -> Result<Ack, WireError> {
        let report: JobReport = self.decode(payload)?;
        validate(validate_token("job id", &report.job_id))?;
        validate(validate_token("node id", &report.node_id))?;
        let max_output = self.inner.settings.max_output_bytes;
        let JobReport {
            node_id,
            job_id,
            attempt,
            phase,
            ..
        } = report;
        let (log_job, log_node) = (job_id.clone(), node_id.clone());
        let finished = matches!(phase, ReportPhase::Finished { .. });
        let effect = self
            .db(move |store| match &phase {
                ReportPhase::Running => store.mark_running(&job_id, &node_id, attempt),
                ReportPhase::Finished { outcome } => {
                    store.finish(&job_id, &node_id, attempt, outcome, max_output)
                }
            })
            .await?;
        self.inner.outbox_wake.notify_one();
        if finished {
            // Capacity came free: waiting jobs may fit now.
            self.inner.dispatch_wake.notify_one();
        }
        Ok(match effect {
            ReportEffect::Applied => Ack {
                accepted: true,
                note: None,
            },
            ReportEffect::Duplicate => Ack {
                accepted: true,
                note: Some("already recorded".into()),
            },
            ReportEffect::Stale(why) => {
                tracing::warn!(job_id = %log_job, node_id = %log_node, attempt, "{why}");
                Ack {
                    accepted: false,
                    note: Some(why),
                }
            }
        })
    }

    async fn account_create(&self, payload: &[u8]) -> Result<wire::AccountView, WireError> {
        let request: AccountRef = self.decode(payload)?;
        validate(validate_token("account", &request.account))?;
        self.db(move |store| store.create_account(&request.account))
            .await
    }

    async fn account_deposit(&self, payload: &[u8]) -> Result<wire::AccountView, WireError> {
        let request: Deposit = self.decode(payload)?;
        validate(validate_token("account", &request.account))?;
        if let Some(key) = &request.idempotency_key {
            validate(validate_token("idempotency key", key))?;
        }
        if request.amount_micros <= 0 || request.amount_micros > MAX_COST_MICROS {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "deposit must be between 1 and {MAX_COST_MICROS} micro-USD, got {}",
                    request.amount_micros
                ),
            ));
        }
        self.db(move |store| {
            store.deposit(
                &request.account,
                request.amount_micros,
                request.idempotency_key.as_deref(),
            )
        })
        .await
    }

    async fn account_balance(&self, payload: &[u8]) -> Result<wire::AccountView, WireError> {
        let request: AccountRef = self.decode(payload)?;
        validate(validate_token("account", &request.account))?;
        self.db(move |store| store.account(&request.account)).await
    }

    async fn register_node(&self, payload: &[u8]) -> Result<Ack, WireError> {
        let registration: RegisterNode = self.decode(payload)?;
        validate(validate_token("node id", &registration.node_id))?;
        validate(validate_token(
            "provider account",
            &registration.provider_account,
        ))?;
        for backend in &registration.backends {
            validate(validate_token("backend", backend))?;
        }
        if registration.heartbeat_interval_ms == 0 || registration.max_concurrent == 0 {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "heartbeat_interval_ms and max_concurrent must be > 0",
            ));
        }
        let stored = registration.clone();
        self.db(move |store| store.upsert_node(&stored)).await?;
        // Attempts the orchestrator believes run there but the node does not report were lost
        // with its restart: requeue them. Executions it reports that were moved elsewhere: stop.
        let node_id = registration.node_id.clone();
        let active = self.db(move |store| store.active_on_node(&node_id)).await?;
        for (job_id, attempt) in active {
            if !registration
                .running
                .iter()
                .any(|r| r.job_id == job_id && r.attempt == attempt)
            {
                let reason = format!(
                    "node {} restarted without attempt {attempt}",
                    registration.node_id
                );
                self.requeue_or_fail(job_id, attempt, reason).await?;
            }
        }
        self.stop_moved_executions(&registration.node_id, &registration.running)
            .await;
        tracing::info!(node_id = %registration.node_id, backends = ?registration.backends, "node registered");
        self.registry().upsert(registration);
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        Ok(Ack {
            accepted: true,
            note: None,
        })
    }

    /// Recounts every node's committed resources from the database (forgetting attempts that
    /// ended since the last recount) and reads the node totals. On the ledger thread, so no
    /// assignment can slip between the count and its use.
    async fn recount_and_stats(
        &self,
    ) -> Result<std::collections::HashMap<String, (u64, u64, f64)>, WireError> {
        let this = self.clone();
        self.db(move |store| {
            let allocations = store.active_per_node()?;
            this.registry().set_allocations(&allocations);
            store.node_stats()
        })
        .await
    }

    async fn node_views(&self) -> Result<Vec<wire::NodeView>, WireError> {
        let stats = self.recount_and_stats().await?;
        let registry = self.registry();
        Ok(registry
            .entries()
            .into_iter()
            .map(|entry| {
                let r = entry.registration;
                let (jobs_run, jobs_succeeded, reputation) =
                    stats.get(&r.node_id).copied().unwrap_or((0, 0, 1.0));
                wire::NodeView {
                    tier: wire::provider_tier(&r.gpus),
                    status: if entry.lost { "lost" } else { "live" }.to_owned(),
                    last_heartbeat_ms_ago: u64::try_from(entry.last_seen.elapsed().as_millis())
                        .unwrap_or(u64::MAX),
                    active: entry.allocated.jobs,
                    jobs_run,
                    jobs_succeeded,
                    reputation,
                    node_id: r.node_id,
                    provider_account: r.provider_account,
                    backends: r.backends,
                    pricing: r.pricing,
                    cpu_cores: r.cpu_cores,
                    memory_mib: r.memory_mib,
                    gpus: r.gpus,
                    max_concurrent: r.max_concurrent,
                    plugins: r.plugins,
                    hardware: r.hardware,
                    gpu_telemetry: entry.gpu_telemetry,
                }
            })
            .collect())
    }

    async fn node_list(&self, payload: &[u8]) -> Result<wire::NodeList, WireError> {
        let _: wire::VerifyLedger = self.decode(payload)?;
        Ok(wire::NodeList {
            nodes: self.node_views().await?,
        })
    }

    async fn node_info(&self, payload: &[u8]) -> Result<wire::NodeView, WireError> {
        let request: wire::NodeRef = self.decode(payload)?;
        validate(validate_token("node id", &request.node_id))?;
        self.node_views()
            .await?
            .into_iter()
            .find(|n| n.node_id == request.node_id)
            .ok_or_else(|| {
                WireError::new(ErrorCode::NotFound, format!("no node {}", request.node_id))
            })
    }

    async fn account_statement(&self, payload: &[u8]) -> Result<wire::Statement, WireError> {
        let request: wire::StatementRequest = self.decode(payload)?;
        validate(validate_token("account", &request.account))?;
        let limit = request.limit.unwrap_or(100);
        self.db(move |store| store.statement(&request.account, limit))
            .await
    }

    async fn ledger_verify(&self, payload: &[u8]) -> Result<wire::LedgerReport, WireError> {
        let _: wire::VerifyLedger = self.decode(payload)?;
        self.verify_ledger().await
    }

    /// Nodes currently registered and not lost.
    pub fn live_nodes(&self) -> usize {
        self.registry().live_count()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn handle_heartbeat(&self, payload: &[u8]) {
        match wire::decode::<Heartbeat>(payload, self.inner.settings.max_request_bytes) {
            Ok(mut heartbeat) => {
                let gpus = std::mem::take(&mut heartbeat.gpus);
                if !self.registry().heartbeat(&heartbeat.node_id, gpus) {
                    tracing::debug!(node_id = %heartbeat.node_id, "heartbeat from an unregistered node");
                    return;
                }
                let this = self.clone();
                tokio::spawn(async move { this.reconcile(heartbeat).await });
            }
            Err(e) => tracing::warn!(error = %e, "malformed heartbeat ignored"),
        }
    }

    /// Compares a heartbeat with the database: executions the node runs that were moved are
    /// stopped; attempts the node should run but does not list (an assignment lost in a crash
    /// between commit and send) are requeued.
    async fn reconcile(&self, heartbeat: Heartbeat) {
        if !heartbeat.running.is_empty() {
            self.stop_moved_executions(&heartbeat.node_id, &heartbeat.running)
                .await;
        }
        let (interval_ms, committed) = match self.registry().get(&heartbeat.node_id) {
            Some(node) => (node.registration.heartbeat_interval_ms, node.allocated.jobs),
            None => return,
        };
        if committed == 0 && heartbeat.running.is_empty() {
            // Nothing assigned there (the registry counts every assignment as it is recorded
            // and only forgets one at the next dispatch pass's recount) and nothing running.
            return;
        }
        let grace_ms = self.inner.settings.assign_timeout_ms + 2 * interval_ms;
        let (node_id, running) = (heartbeat.node_id.clone(), heartbeat.running);
        let missing = match self
            .db(move |store| store.unreported_on_node(&node_id, &running, grace_ms))
            .await
        {
            Ok(missing) => missing,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reconcile a heartbeat");
                return;
            }
        };
        for (job_id, attempt) in missing {
            let reason = format!("node {} does not run attempt {attempt}", heartbeat.node_id);
            if let Err(e) = self.requeue_or_fail(job_id, attempt, reason).await {
                tracing::warn!(error = %e, "cannot requeue");
            }
        }
    }

    /// Tells `node_id` to stop executions it runs that are no longer the job's current attempt
    /// there (the job was requeued elsewhere after the node was thought lost, or ended).
    async fn stop_moved_executions(&self, node_id: &str, running: &[wire::ExecutionRef]) {
        for execution in running {
            let job_id = execution.job_id.clone();
            let current = match self.db(move |store| store.current_execution(&job_id)).await {
                Ok(current) => current,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check an execution");
                    continue;
                }
            };
            if current
                .as_ref()
                .is_some_and(|(node, attempt)| node == node_id && *attempt == execution.attempt)
            {
                continue;
            }
            tracing::info!(job_id = %execution.job_id, attempt = execution.attempt, %node_id, "stopping an execution that was moved or ended");
            self.send_stop(node_id, &execution.job_id, execution.attempt)
                .await;
        }
    }

    async fn requeue_or_fail(
        &self,
        job_id: String,
        attempt: u32,
        reason: String,
    ) -> Result<(), WireError> {
        let id = job_id.clone();
        let outcome = self
            .db(move |store| store.requeue_or_fail(&id, attempt, &reason))
            .await?;
        if let Some(state) = outcome {
            tracing::warn!(%job_id, attempt, state = state.as_str(), "attempt lost");
        }
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        Ok(())
    }

    // ----- background work -----

    async fn dispatch_loop(self) {
        loop {
            tokio::select! {
                () = self.inner.dispatch_wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if let Err(e) = self.dispatch_pending().await {
                tracing::error!(error = %e, "dispatch failed");
            }
        }
    }

    /// Matches pending jobs to nodes and sends the assignments. A pass is one operation on the
    /// ledger thread: read the oldest pending jobs and what every node has committed, choose a
    /// node for each, record the assignments — all against one consistent view, in one commit.
    async fn dispatch_pending(&self) -> Result<(), WireError> {
        let this = self.clone();
        let chosen = self
            .db(move |store| {
                let pending = store.pending_jobs(DISPATCH_BATCH)?;
                if pending.is_empty() {
                    return Ok(Vec::new());
                }
                let allocations = store.active_per_node()?;
                this.registry().set_allocations(&allocations);
                let mut chosen = Vec::new();
                for job in pending {
                    if let Some((node_id, attempt, fuel_limit)) =
                        this.place(store, &job.job_id, &job.spec, job.max_cost_micros)
                    {
                        store.forget_spec(&job.job_id);
                        chosen.push((job, node_id, attempt, fuel_limit));
                    }
                }
                Ok(chosen)
            })
            .await?;
        if chosen.is_empty() {
            return Ok(());
        }
        self.inner.outbox_wake.notify_one();
        for (job, node_id, attempt, fuel_limit) in chosen {
            let this = self.clone();
            tokio::spawn(async move {
                let mut spec = std::sync::Arc::unwrap_or_clone(job.spec);
                spec.fuel_limit = fuel_limit;
                this.send_assignment(job.job_id, attempt, spec, node_id)
                    .await
            });
        }
        Ok(())
    }

    async fn send_assignment(&self, job_id: String, attempt: u32, spec: JobSpec, node_id: String) {
        let assign = AssignJob {
            v: WIRE_VERSION,
            job_id: job_id.clone(),
            attempt,
            spec,
        };
        let subject = match self.inner.bus.subjects.job_assign(&node_id) {
            Ok(subject) => subject,
            Err(e) => {
                tracing::error!(error = %e, "cannot address node");
                return;
            }
        };
        let timeout = Duration::from_millis(self.inner.settings.assign_timeout_ms);
        let result =
            tokio::time::timeout(timeout, self.inner.bus.request::<_, Ack>(subject, &assign)).await;
        let refused = match result {
            Ok(Ok(Ack { accepted: true, .. })) => {
                tracing::debug!(%job_id, %node_id, attempt, "assignment acknowledged");
                return;
            }
            Ok(Ok(Ack { note, .. })) => format!(
                "node {node_id} refused the job: {}",
                note.unwrap_or_default()
            ),
            Ok(Err(e)) => format!("node {node_id} did not take the job: {e}"),
            Err(_) => format!(
                "node {node_id} did not acknowledge within {} ms",
                timeout.as_millis()
            ),
        };
        tracing::warn!(%job_id, attempt, "{refused}; back to pending");
        self.registry().release(&node_id, &assign.spec);
        let (id, node) = (job_id.clone(), node_id.clone());
        if let Err(e) = self
            .db(move |store| store.unassign(&id, &node, attempt, &refused))
            .await
        {
            tracing::error!(%job_id, error = %e, "failed to return job to pending");
        }
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
    }

    async fn outbox_loop(self) {
        loop {
            tokio::select! {
                () = self.inner.outbox_wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.publish_outbox().await {
                tracing::warn!(error = %e, "publishing events failed; will retry");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Publishes committed events in order. Rows are read through the publisher's own
    /// connection and sent without waiting for each acknowledgement (up to a window in flight,
    /// acks taken in order); rows are deleted (off this path, one delete in flight at a time)
    /// once JetStream acknowledged them. After an error the next call resends from the last
    /// acknowledged row; JetStream drops the repeats by their message id.
    pub async fn publish_outbox(&self) -> anyhow::Result<()> {
        const WINDOW: usize = 1024;
        let mut state = self.inner.outbox.lock().await;
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut sent = state.published;
        // Look for new rows when the pipeline is empty, or half empty after a good number of
        // acks: not after every ack (each look is a read transaction on the database).
        let mut acked_since_read = usize::MAX;
        loop {
            if in_flight.is_empty() || (in_flight.len() < WINDOW / 2 && acked_since_read >= 64) {
                acked_since_read = 0;
                let rows = state.reader.after(sent, WINDOW - in_flight.len())?;
                if !rows.is_empty() {
                    for row in rows {
                        let message_id = format!("{}-{}", self.inner.instance, row.id);
                        let publish = async_nats::jetstream::message::PublishMessage::build()
                            .payload(row.payload.into())
                            .message_id(message_id);
                        let ack = self
                            .inner
                            .bus
                            .jetstream
                            .send_publish(row.subject, publish)
                            .await?;
                        let id = row.id;
                        in_flight.push_back(async move { (id, ack.await) });
                        sent = id;
                    }
                    continue;
                }
            }
            if in_flight.is_empty() {
                break;
            }
            let next = tokio::select! {
                biased;
                next = in_flight.next() => next,
                // Something new was committed and the pipeline is short (light load): look at
                // once. Under load the pipeline is long and acks pace the reads.
                () = self.inner.outbox_wake.notified(), if in_flight.len() < 64 => {
                    acked_since_read = usize::MAX;
                    continue;
                }
            };
            match next {
                Some((id, Ok(_))) => {
                    state.published = id;
                    acked_since_read += 1;
                }
                Some((_, Err(e))) => return Err(e.into()),
                None => break,
            }
        }
        let published = state.published;
        // Deleting costs a commit: gather published rows until enough are waiting or a while
        // passed (repeats after a crash are dropped by JetStream's duplicate window).
        let due = published - state.deleted >= DELETE_BATCH
            || (published > state.deleted && state.deleted_at.elapsed() >= DELETE_AFTER);
        if due
            && !self
                .inner
                .outbox_deleting
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            state.deleted = published;
            state.deleted_at = std::time::Instant::now();
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.db(move |store| store.outbox_done(published)).await {
                    tracing::warn!(error = %e, "cannot delete published events; the next delete covers them");
                }
                this.inner
                    .outbox_deleting
                    .store(false, std::sync::atomic::Ordering::Release);
            });
        }
        Ok(())
    }

    /// Publishes what is committed and deletes it before returning (at shutdown).
    async fn flush_outbox(&self) -> anyhow::Result<()> {
        self.publish_outbox().await?;
        let published = self.inner.outbox.lock().await.published;
        if published > 0 {
            self.db(move |store| store.outbox_done(published)).await?;
        }
        Ok(())
    }

    async fn sweep_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(e) = self.sweep().await {
                tracing::error!(error = %e, "sweep failed");
            }
        }
    }

    /// Ends jobs on lost nodes and jobs that waited too long for one; both are refunded.
    async fn sweep(&self) -> Result<(), WireError> {
        let stats = self.recount_and_stats().await?;
        let reputations = stats
            .into_iter()
            .map(|(node, (_, _, reputation))| (node, reputation))
            .collect();
        self.registry().set_reputations(&reputations);
        let lost = self
            .registry()
            .take_newly_lost(self.inner.settings.missed_heartbeats);
        for node_id in lost {
            tracing::warn!(%node_id, "node lost: no heartbeat");
            let node = node_id.clone();
            let active = self.db(move |store| store.active_on_node(&node)).await?;
            for (job_id, attempt) in active {
                let reason = format!("node {node_id} was lost (missed heartbeats)");
                self.requeue_or_fail(job_id, attempt, reason).await?;
            }
        }
        let default_queue_timeout_ms = self.inner.settings.queue_timeout_ms;
        let now = store::now_ms();
        let expired = self
            .db(move |store| store.queue_expired(now, default_queue_timeout_ms))
            .await?;
        for (job_id, queue_timeout_ms) in expired {
            let reason =
                format!("no node took the job within its queue timeout of {queue_timeout_ms} ms");
            self.db(move |store| store.end_with_refund(&job_id, JobState::TimedOut, &reason))
                .await?;
        }
        for job_id in self.db(move |store| store.overdue(now)).await? {
            let id = job_id.clone();
            if let Some((node_id, attempt)) = self.db(move |store| store.time_out(&id)).await? {
                tracing::info!(%job_id, %node_id, "total timeout passed; stopping the job");
                let this = self.clone();
                tokio::spawn(async move { this.send_stop(&node_id, &job_id, attempt).await });
            }
        }
        self.inner.outbox_wake.notify_one();
        Ok(())
    }

    /// Checks the ledger invariants (for `rhizos ledger verify` and tests).
    pub async fn verify_ledger(&self) -> Result<wire::LedgerReport, WireError> {
        self.db(|store| store.verify()).await
    }
}

/// Delivers an operation's result once its batch's commit outcome is known.
type Completion = Box<dyn FnOnce(&Result<(), String>) + Send>;
/// An operation for the ledger writer.
type Op = Box<dyn FnOnce(&mut Store) -> Completion + Send>;

/// Most pending jobs matched in one dispatch pass.
const DISPATCH_BATCH: usize = 256;

/// Most operations committed together.
const MAX_GROUP_COMMIT: usize = 512;

/// Starts the thread that owns the database. It takes every operation queued when it wakes (up to
/// [`MAX_GROUP_COMMIT`]), runs them in one transaction, commits once, then answers them all: under
/// load many operations share one fsync (group commit), while each still commits or rolls back on
/// its own through its savepoint, and nobody hears of a change before it is durable.
fn spawn_writer(mut store: Store) -> anyhow::Result<std::sync::mpsc::Sender<Op>> {
    let (sender, receiver) = std::sync::mpsc::channel::<Op>();
    std::thread::Builder::new()
        .name("rhizos-ledger".into())
        .spawn(move || {
            while let Ok(first) = receiver.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_GROUP_COMMIT {
                    match receiver.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                let (completions, commit) = store.group_commit(|store| {
                    batch
                        .into_iter()
                        .map(|op| {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(store))).unwrap_or_else(|_| {
                                Box::new(|_: &Result<(), String>| {
                                    tracing::error!("a ledger operation panicked; its savepoint was rolled back");
                                }) as Completion
                            })
                        })
                        .collect::<Vec<_>>()
                });
                if let Err(e) = &commit {
                    tracing::error!(error = %e, "ledger batch not committed");
                }
                for completion in completions {
                    completion(&commit);
                }
            }
        })
        .context("cannot start the ledger writer thread")?;
    Ok(sender)
}

fn encode_reply<T: Serialize>(result: Result<T, WireError>) -> bytes::Bytes {
    match result {
        Ok(data) => wire::encode(&Reply::ok(data)),
        Err(error) => wire::encode(&Reply::<T>::err(error)),
    }
}

fn validate(result: Result<(), rhizos_broker::TokenError>) -> Result<(), WireError> {
    result.map_err(|e| WireError::new(ErrorCode::BadRequest, e.to_string()))
}

fn bad(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, message)
}

/// Checks every field of a submit before anything is stored.
/// A workload whose bytes the node fetches from `url`: the form of the URL, a digest to check
/// them against, and an empty bytes field.
fn validate_by_reference(spec: &JobSpec, url: &str) -> Result<(), WireError> {
    wire::validate_artifact_url(url).map_err(bad)?;
    if !spec
        .artifact_sha256
        .as_deref()
        .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(bad(
            "artifact_url needs artifact_sha256 (64 hex digits): a node runs only the bytes with that digest",
        ));
    }
    let (field, bytes) = match &spec.workload {
        Workload::Wasm { module_b64 } => ("module_b64", module_b64),
        Workload::Cuda { program_b64 } => {
            if spec.gpus == 0 {
                return Err(bad("a cuda job needs at least one GPU: set gpus"));
            }
            ("program_b64", program_b64)
        }
        Workload::Custom { name, payload_b64 } => {
            validate(rhizos_broker::validate_token("workload.name", name))?;
            ("payload_b64", payload_b64)
        }
        _ => {
            return Err(bad(
                "artifact_url gives the bytes of a wasm, cuda or plugin-backend workload; a docker job names its image",
            ));
        }
    };
    if !bytes.is_empty() {
        return Err(bad(format!(
            "workload.{field} must be empty when artifact_url gives the bytes"
        )));
    }
    Ok(())
}

fn validate_submit(request: &SubmitJob, job_id: &str) -> Result<(), WireError> {
    validate(validate_token("account", &request.account))?;
    validate(validate_token("job id", job_id))?;
    if request.max_cost_micros <= 0 || request.max_cost_micros > MAX_COST_MICROS {
        return Err(bad(format!(
            "max_cost_micros must be between 1 and {MAX_COST_MICROS}, got {}",
            request.max_cost_micros
        )));
    }
    let spec = &request.spec;
    if spec.timeout_ms == 0 || spec.timeout_ms > MAX_TIMEOUT_MS {
        return Err(bad(format!(
            "timeout_ms must be between 1 and {MAX_TIMEOUT_MS}, got {}",
            spec.timeout_ms
        )));
    }
    if spec.memory_mib == 0 || spec.memory_mib > 1024 * 1024 {
        return Err(bad(format!(
            "memory_mib must be between 1 and 1048576, got {}",
            spec.memory_mib
        )));
    }
    for (name, value) in [
        ("queue_timeout_ms", spec.queue_timeout_ms),
        ("total_timeout_ms", spec.total_timeout_ms),
    ] {
        if let Some(ms) = value
            && (ms == 0 || ms > MAX_JOB_LIFETIME_MS)
        {
            return Err(bad(format!(
                "{name} must be between 1 and {MAX_JOB_LIFETIME_MS}, got {ms}"
            )));
        }
    }
    if spec.gpus > 64 || spec.gpu_apis.len() > 16 {
        return Err(bad("at most 64 GPUs and 16 GPU APIs per job"));
    }
    for api in &spec.gpu_apis {
        validate(validate_token("GPU API", api))?;
    }
    if spec.max_retries > MAX_RETRIES {
        return Err(bad(format!(
            "max_retries must be at most {MAX_RETRIES}, got {}",
            spec.max_retries
        )));
    }
    if spec.cpu_cores == 0 || spec.cpu_cores > 1024 {
        return Err(bad(format!(
            "cpu_cores must be between 1 and 1024, got {}",
            spec.cpu_cores
        )));
    }
    if spec.args.len() > 1024 || spec.args.iter().any(|a| a.len() > 4096) {
        return Err(bad("at most 1024 args of at most 4096 bytes each"));
    }
    if spec.env.len() > 1024
        || spec
            .env
            .keys()
            .any(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(bad(
            "env: at most 1024 variables; names must be non-empty without '=' or NUL",
        ));
    }
    if let Some(stdin) = &spec.stdin_b64 {
        wire::b64_decode("stdin_b64", stdin)?;
    }
    if spec.input_files.len() > 256 {
        return Err(bad("input_files: at most 256 files"));
    }
    for (name, content) in &spec.input_files {
        if !wire::valid_file_path(name) {
            return Err(bad(format!(
                "input_files: {name:?} is not a plain relative path (no leading '/', no '.' or '..' segments, at most 255 bytes)"
            )));
        }
        wire::b64_decode(&format!("input_files[{name}]"), content)?;
    }
    if let Some(url) = &spec.artifact_url {
        return validate_by_reference(spec, url);
    }
    match &spec.workload {
        Workload::Wasm { module_b64 } => {
            let module = wire::b64_decode("workload.module_b64", module_b64)?;
            if module.is_empty() {
                return Err(bad("workload.module_b64 is empty"));
            }
            if module.len() > MAX_INLINE_MODULE_BYTES {
                return Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "WASM module is {} bytes, the inline limit is {MAX_INLINE_MODULE_BYTES}",
                        module.len()
                    ),
                ));
            }
            let is_binary = module.starts_with(b"\0asm");
            let is_text =
                std::str::from_utf8(&module).is_ok_and(|t| t.trim_start().starts_with('('));
            if !is_binary && !is_text {
                return Err(bad(
                    "workload.module_b64 is neither a WASM binary (\\0asm) nor WAT text",
                ));
            }
        }
        Workload::Docker {
            image,
            entrypoint,
            workdir,
            network: _,
        } => {
            if !wire::valid_image_ref(image) {
                return Err(bad(format!(
                    "workload.image {image:?} is not a Docker image reference ([host[:port]/]name[:tag][@sha256:…], lowercase name)"
                )));
            }
            if entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
                return Err(bad(
                    "workload.entrypoint is empty: leave it out to keep the image's",
                ));
            }
            if let Some(dir) = workdir
                && !dir.starts_with('/')
            {
                return Err(bad(format!(
                    "workload.workdir {dir:?} must be an absolute path"
                )));
            }
        }
        Workload::Cuda { program_b64 } => {
            let program = wire::b64_decode("workload.program_b64", program_b64)?;
            if !program.starts_with(b"\x7fELF") {
                return Err(bad(
                    "workload.program_b64 is not a Linux executable (ELF): build it for x86-64 Linux",
                ));
            }
            if program.len() > MAX_INLINE_MODULE_BYTES {
                return Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "CUDA program is {} bytes, the inline limit is {MAX_INLINE_MODULE_BYTES}",
                        program.len()
                    ),
                ));
            }
            if spec.gpus == 0 {
                return Err(bad("a cuda job needs at least one GPU: set gpus"));
            }
        }
        Workload::Module { uri } => {
            return Err(bad(format!(
                "{uri} was not resolved (module workloads are resolved at submit)"
            )));
        }
        Workload::Custom { name, payload_b64 } => {
            validate(rhizos_broker::validate_token("workload.name", name))?;
            if matches!(name.as_str(), "wasm" | "docker" | "cuda" | "custom") {
                return Err(bad(format!(
                    "workload.name {name:?} is a built-in backend: use its own workload form"
                )));
            }
            let payload = wire::b64_decode("workload.payload_b64", payload_b64)?;
            if payload.len() > MAX_INLINE_MODULE_BYTES {
                return Err(WireError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "workload payload is {} bytes, the inline limit is {MAX_INLINE_MODULE_BYTES}",
                        payload.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_reference(workload: Workload, sha256: Option<&str>, url: &str) -> SubmitJob {
        let mut spec = JobSpec::new(workload, 1_000, 64);
        spec.artifact_url = Some(url.to_owned());
        spec.artifact_sha256 = sha256.map(str::to_owned);
        SubmitJob {
            v: WIRE_VERSION,
            job_id: None,
            account: "a".into(),
            spec,
            max_cost_micros: 1_000,
        }
    }

    fn wasm(bytes: &str) -> Workload {
        Workload::Wasm {
            module_b64: bytes.into(),
        }
    }

    #[test]
    fn a_workload_by_reference_needs_a_digest_an_http_url_and_no_inline_bytes() {
        let digest = "ab".repeat(32);
        let check = |request: SubmitJob| validate_submit(&request, "j").map_err(|e| e.message);
        assert_eq!(
            check(by_reference(
                wasm(""),
                Some(&digest),
                "https://r.example/a.wasm"
            )),
            Ok(())
        );
        let cases = [
            (
                by_reference(wasm(""), None, "https://r.example/a.wasm"),
                "artifact_url needs artifact_sha256",
            ),
            (
                by_reference(wasm(""), Some("abc"), "https://r.example/a.wasm"),
                "artifact_url needs artifact_sha256",
            ),
            (
                by_reference(wasm(""), Some(&digest), "file:///etc/passwd"),
                "must start with http:// or https://",
            ),
            (
                by_reference(wasm(""), Some(&digest), "https://r.example/a b"),
                "without whitespace",
            ),
            (
                by_reference(wasm("AGFzbQ=="), Some(&digest), "https://r.example/a.wasm"),
                "workload.module_b64 must be empty",
            ),
            (
                by_reference(
                    Workload::Docker {
                        image: "alpine".into(),
                        entrypoint: None,
                        workdir: None,
                        network: false,
                    },
                    Some(&digest),
                    "https://r.example/a",
                ),
                "a docker job names its image",
            ),
            (
                by_reference(
                    Workload::Cuda {
                        program_b64: String::new(),
                    },
                    Some(&digest),
                    "https://r.example/a",
                ),
                "needs at least one GPU",
            ),
        ];
        for (request, expected) in cases {
            let err = check(request).unwrap_err();
            assert!(err.contains(expected), "{err} (expected {expected:?})");
        }
    }
}
