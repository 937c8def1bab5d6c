//! `rhizosd orchestrator`: serves the `ctl` subjects on the `orchestrator` queue group, keeps the
//! node registry, matches pending jobs to nodes, and owns the escrow ledger (see [`store`]).
//!
//! Requests are validated before anything is stored; a bad request gets an error reply with a
//! stable code and the service keeps serving. Events are written to the outbox in the same
//! transaction as the change they describe and published to JetStream afterwards by
//! the outbox publisher, so a crash between commit and publish loses no event.
//!
//! This file holds the service and its lifecycle ([`Orchestrator::open`],
//! [`Orchestrator::run`]); the rest is one file per concern:
//! * `writer`: the ledger thread that owns the [`Store`] and group-commits;
//! * `api`: request dispatch (an exhaustive match on `CtlOp`) and the handlers, per noun;
//! * [`validate`]: submit validation, per workload kind, with its limits in one block;
//! * `dispatch`: placement, `job.assign` / `job.stop`;
//! * `outbox`: publishing committed events to JetStream;
//! * `sweep`: heartbeats and reconciliation, lost nodes, queue and total timeouts;
//! * [`matching`], [`modules`], [`store`]: the registry and choice of node, the resolver chain,
//!   the SQLite state;
//! * [`lease`]: which of several orchestrators on one bus is active;
//! * [`replica`]: the replicated ledger (`replicated_ledger`): the stream each committed batch
//!   is appended to, and a standby following it.

mod api;
mod dispatch;
pub mod lease;
pub mod matching;
pub mod modules;
pub mod outbox;
pub mod replica;
pub mod store;
mod sweep;
pub mod validate;
mod writer;

use anyhow::Context as _;
use futures::StreamExt as _;
use matching::Registry;
use outbox::OutboxState;
use rhizos_broker::Bus;
use rhizos_broker::config::OrchestratorSettings;
use rhizos_broker::subjects::ORCHESTRATOR_QUEUE;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use store::Store;
use tokio::sync::Notify;
use writer::{Op, spawn_writer};

pub use validate::limits::*;

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
    /// Signs receipts (`<data_dir>/orchestrator.nk`).
    signing_key: nkeys::KeyPair,
    /// The bus connection was down at the last sweep (node-loss detection paused).
    bus_down: std::sync::atomic::AtomicBool,
    /// Nodes heard from without a registration, and when each was last asked to register
    /// again (`node.reregister`): at most one ask per node every 30 s, at most 10,000 nodes.
    reregister_asked: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Requests being served; past `max_requests_in_flight` new ones get `too_busy` at once
    /// (no task per request without limit, and so no unbounded queue to the ledger thread).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Heartbeat reconciliations running; a heartbeat that finds none free is not reconciled
    /// (the node's next one is).
    reconciling: Arc<tokio::sync::Semaphore>,
    /// The read-only handle for expensive reads (verify, lists), off the writer thread.
    reader: Arc<Mutex<Store>>,
    /// The blob stream results' large parts are stored in (checked before they are recorded).
    blobs: async_nats::jetstream::stream::Stream,
    metrics: Arc<crate::metrics::OrchestratorMetrics>,
    /// The network's figures for `network.stats`, read at most once a second however many
    /// monitors ask (one at a time reads; the others wait for its answer).
    network_stats:
        tokio::sync::Mutex<Option<(std::time::Instant, rhizos_broker::wire::NetworkStatsView)>>,
    /// The replicated ledger's stream, with `replicated_ledger` (None: the file is the ledger).
    log: Option<replica::LedgerLog>,
    /// The data dir's lock, held while this orchestrator lives: no second process writes the
    /// same ledger, and a lease naming this ledger on this host is known to be stale.
    _data_lock: std::fs::File,
}

/// The data dir's lock file (`flock`, released by the kernel when the process dies).
const DATA_LOCK_FILE: &str = "lock";

/// Locks `dir` for this process, writing its pid into the lock file; refuses if another
/// process holds it.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join(DATA_LOCK_FILE);
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            anyhow::bail!(
                "another orchestrator (pid {}) is using the data dir {}: stop it, or give this one another data_dir",
                if pid.trim().is_empty() {
                    "unknown"
                } else {
                    pid.trim()
                },
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Most heartbeat reconciliations at once.
const MAX_RECONCILES_IN_FLIGHT: usize = 256;

/// The data dir holds the ledger (and the receipt signing key): only this user may enter it
/// (0700), whatever the umask made it — no workload running on the same machine under another
/// uid (native CUDA programs, say) can read balances or the key.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
            || format!("cannot make the data dir {} private (0700)", dir.display()),
        )?;
        tracing::info!(data_dir = %dir.display(), "data dir made private (0700): it holds the ledger");
    }
    Ok(())
}

impl Orchestrator {
    /// Its metrics for [`crate::metrics::serve`]: counters and histograms as they happen; jobs
    /// by state, nodes live and lost, the outbox's backlog, escrow held and fees read (off the
    /// ledger thread) at each scrape.
    pub fn metrics_source(&self) -> crate::metrics::Source {
        let this = self.clone();
        crate::metrics::Source {
            registry: self.inner.metrics.registry.clone(),
            refresh: Some(Arc::new(move || {
                let this = this.clone();
                Box::pin(async move {
                    let metrics = &this.inner.metrics;
                    let (live, lost) = {
                        let registry = this.registry();
                        let live = registry.live_count();
                        (live, registry.registered_count().saturating_sub(live))
                    };
                    metrics.nodes.with_label_values(&["live"]).set(live as i64);
                    metrics.nodes.with_label_values(&["lost"]).set(lost as i64);
                    match this.read(|store| store.network_stats()).await {
                        Ok(stats) => {
                            metrics.jobs.reset();
                            for (state, count) in stats.jobs_by_state {
                                metrics.jobs.with_label_values(&[state.as_str()]).set(count);
                            }
                            metrics.outbox_pending.set(stats.outbox_pending);
                            metrics.escrow_held_micros.set(stats.escrow_held_micros);
                            metrics.fees_micros.set(stats.fees_micros);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e.message, "metrics: the ledger could not be read")
                        }
                    }
                })
            })),
        }
    }

    /// Opens the ledger in `settings.data_dir` and prepares the event stream.
    pub async fn open(bus: Bus, settings: OrchestratorSettings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir).with_context(|| {
            format!("failed to create data dir {}", settings.data_dir.display())
        })?;
        private_dir(&settings.data_dir)?;
        anyhow::ensure!(
            settings.fee_bps <= 10_000,
            "fee_bps must be at most 10000, got {}",
            settings.fee_bps
        );
        anyhow::ensure!(
            settings.max_requests_in_flight >= 1,
            "[orchestrator] max_requests_in_flight must be at least 1"
        );
        anyhow::ensure!(
            settings.lease_ttl_ms >= 300,
            "[orchestrator] lease_ttl_ms must be at least 300, got {}",
            settings.lease_ttl_ms
        );
        let data_lock = lock_data_dir(&settings.data_dir)?;
        let signing_key = signing_key(&settings.data_dir.join(SIGNING_KEY_FILE))?;
        let path = settings.data_dir.join("ledger.db");
        let log = if settings.replicated_ledger {
            Some(replica::LedgerLog::open(&bus).await?)
        } else {
            None
        };
        let mut store = match &log {
            Some(log) => {
                patiently(
                    "this orchestrator's projection of the replicated ledger",
                    || replica::open_projection(log, &path, &settings.data_dir, settings.fee_bps),
                )
                .await?
            }
            None => Store::open(&path, settings.fee_bps)
                .with_context(|| format!("failed to open ledger at {}", path.display()))?,
        };
        store.set_charge_policy(store::ChargePolicy {
            failed_workload: settings.failed_workload_charge,
            slack_ms: settings.timing_slack_ms,
        });
        store
            .checkpoint_in_background(&path, Duration::from_millis(200))
            .context("failed to start the WAL checkpointer")?;
        let mut reader = Store::open_reader(&path, settings.fee_bps)
            .with_context(|| format!("failed to open a reader on {}", path.display()))?;
        reader.set_charge_policy(store.charge_policy());
        let mut registry = Registry::new(settings.matching);
        for (registration, _) in store.nodes().map_err(|e| anyhow::anyhow!("{e}"))? {
            registry.upsert(registration);
        }
        let blobs = patiently("the event and blob streams", || async {
            bus.ensure_event_stream().await?;
            Ok(bus.ensure_blob_stream().await?)
        })
        .await?;
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
        let max_in_flight = settings.max_requests_in_flight;
        let metrics = Arc::new(crate::metrics::OrchestratorMetrics::new());
        Ok(Self {
            inner: Arc::new(Inner {
                bus,
                settings,
                instance: store.instance().to_owned(),
                writer: spawn_writer(store, metrics.clone())?,
                metrics,
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
                signing_key,
                bus_down: std::sync::atomic::AtomicBool::new(false),
                reregister_asked: Mutex::new(std::collections::HashMap::new()),
                in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
                reconciling: Arc::new(tokio::sync::Semaphore::new(MAX_RECONCILES_IN_FLIGHT)),
                reader: Arc::new(Mutex::new(reader)),
                blobs,
                network_stats: tokio::sync::Mutex::new(None),
                log,
                _data_lock: data_lock,
            }),
        })
    }

    /// Serves until `shutdown` resolves — while it holds the orchestrator lease ([`lease`]):
    /// until then it is a standby and serves nothing. A lease lost (taken by another, or not
    /// renewable for its TTL: the bus unreachable) stops the serving at once, and it is a
    /// standby again until it may take the lease back.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let bus = &self.inner.bus;
        tokio::pin!(shutdown);
        let ttl = Duration::from_millis(self.inner.settings.lease_ttl_ms);
        let bucket = patiently("the lease bucket", || {
            lease::bucket(&bus.jetstream, bus.subjects.namespace(), bus.replicas)
        })
        .await?;
        let me = lease::Holder::me(&self.inner.instance, &self.inner.settings.data_dir, ttl);
        let ledger = self.inner.instance.clone();
        loop {
            let acquire = lease::Lease::acquire(
                bucket.clone(),
                me.clone(),
                self.inner.settings.lease_take_over_other_ledger,
                |why| match why {
                    lease::Waiting::Held(holder) => tracing::warn!(
                        active = %holder,
                        "standby: another orchestrator is active on this bus; this one serves nothing until it lets go or stops renewing its lease"
                    ),
                    lease::Waiting::OtherLedger(holder) => tracing::error!(
                        previous = %holder,
                        this_ledger = %ledger,
                        "standby: the last active orchestrator is gone, but it wrote another ledger than this one; taking over would split the network's money between two ledgers, so this one stays a standby. Start that orchestrator again (or this one on its data dir), or set [orchestrator] lease_take_over_other_ledger = true to make this ledger the network's"
                    ),
                },
            );
            let lease = tokio::select! {
                () = &mut shutdown => {
                    tracing::info!("stopped while a standby");
                    return Ok(());
                }
                lease = acquire => lease?,
                fatal = self.follow_while_standby() => return Err(fatal),
            };
            let failed = match &self.inner.log {
                Some(log) => match self.become_writer(log).await {
                    Ok(failed) => Some(failed),
                    Err(e) if e.is::<replica::Mismatch>() => return Err(e),
                    Err(e) => {
                        // Let go at once: another standby may be able to take over now.
                        tracing::warn!(error = %e, "cannot catch up with the replicated ledger yet; lease released, trying again");
                        lease.release().await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                None => None,
            };
            match self.serve_while_held(lease, failed, &mut shutdown).await? {
                Some(lease) => {
                    lease.release().await;
                    tracing::info!("orchestrator stopped; lease released");
                    return Ok(());
                }
                None => continue,
            }
        }
    }

    /// Serves while `lease` holds: until `shutdown` (the lease is handed back, to release) or
    /// until the lease is lost (`None`).
    async fn serve_while_held(
        &self,
        mut lease: lease::Lease,
        failed: Option<Arc<replica::Failed>>,
        shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> anyhow::Result<Option<lease::Lease>> {
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
        self.inner.metrics.active.set(1);
        tracing::info!(namespace = bus.subjects.namespace(), data_dir = %self.inner.settings.data_dir.display(), lease = %lease.holder(), "orchestrator serving (active)");
        let mut renew = tokio::time::interval(lease.renew_every());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        let mut lost = false;
        let background = [
            tokio::spawn(self.clone().dispatch_loop()),
            tokio::spawn(self.clone().outbox_loop()),
            tokio::spawn(self.clone().sweep_loop()),
            tokio::spawn(self.clone().snapshot_loop()),
            tokio::spawn(self.clone().flows_loop()),
            tokio::spawn(self.clone().retention_loop()),
        ];
        self.inner.outbox_wake.notify_one();
        self.inner.dispatch_wake.notify_one();
        loop {
            tokio::select! {
                () = shutdown.as_mut() => break,
                () = replica::stopped(failed.as_deref()) => {
                    tracing::error!(why = failed.as_deref().and_then(replica::Failed::why).unwrap_or_default(), "stopped writing the replicated ledger: serving nothing more until caught up with it");
                    lost = true;
                    break;
                }
                _ = renew.tick() => {
                    if let Err(e) = lease.renew().await {
                        match &e {
                            lease::Lost::TakenBy(_) => tracing::error!(error = %e, "orchestrator lease lost: serving nothing more; a standby now"),
                            lease::Lost::Unrenewed(..) => tracing::warn!(error = %e, "orchestrator lease lost: serving nothing more until it can be taken back"),
                        }
                        lost = true;
                        break;
                    }
                }
                Some(message) = requests.next() => {
                    match self.inner.in_flight.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let this = self.clone();
                            tokio::spawn(async move {
                                this.handle_request(message).await;
                                drop(permit);
                            });
                        }
                        Err(_) => self.too_busy(message).await,
                    }
                }
                Some(message) = heartbeats.next() => self.handle_heartbeat(&message.payload),
                else => break,
            }
        }
        for task in background {
            task.abort();
        }
        // No more requests, heartbeats or reconciliations from here on.
        drop((requests, heartbeats));
        self.inner.metrics.active.set(0);
        // Publish what is already committed (events of this ledger, with their own dedupe ids,
        // whoever is active now).
        if let Err(e) = self.flush_outbox().await {
            tracing::warn!(error = %e, "events left unpublished are sent at the next start");
        }
        if self.inner.log.is_some() {
            // A standby again: its file changes only by what the stream holds. The switch is
            // made when the ledger thread runs it, whatever its batch's outcome: a write still
            // queued by a task stopped above shares the batch and rolls it back, as it should.
            if let Err(e) = self
                .db(|store| {
                    store.set_standby();
                    Ok::<_, store::StoreError>(())
                })
                .await
            {
                tracing::debug!(error = %e.message, "a write queued before the stop was refused");
            }
        }
        Ok((!lost).then_some(lease))
    }

    /// The public key receipts are signed with (nkey, `N…`).
    pub fn public_key(&self) -> String {
        self.inner.signing_key.public_key()
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
}

/// Runs `open` again while it fails, for at most a minute: JetStream may be unable to answer
/// for a while (a server of the cluster lost, its leaders being elected), and an orchestrator
/// starting then should wait, not exit.
async fn patiently<T, F: std::future::Future<Output = anyhow::Result<T>>>(
    what: &str,
    mut open: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match open().await {
            Ok(value) => return Ok(value),
            // Nothing to wait for: the operator must act.
            Err(e) if e.is::<replica::Mismatch>() => return Err(e),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "cannot open {what} yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The orchestrator's signing key, in its data dir.
pub const SIGNING_KEY_FILE: &str = "orchestrator.nk";

/// The receipt-signing key of an orchestrator on `data_dir`, made there if it has none yet;
/// returns its public key. Orchestrators sharing a replicated ledger share this key (copy the
/// file, mode 0600), so every receipt verifies against the one key whichever was active.
pub fn ensure_signing_key(data_dir: &std::path::Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("failed to create data dir {}", data_dir.display()))?;
    private_dir(data_dir)?;
    Ok(signing_key(&data_dir.join(SIGNING_KEY_FILE))?.public_key())
}

/// Loads the receipt-signing key from `path` (an nkey seed), or makes one and writes it there
/// readable by this user only.
fn signing_key(path: &std::path::Path) -> anyhow::Result<nkeys::KeyPair> {
    match std::fs::read_to_string(path) {
        Ok(seed) => nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| {
            anyhow::anyhow!(
                "{} is not an nkey seed ({e}): restore the orchestrator's key, or remove the file to make a new one (receipts signed with the old key then verify only against it)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = nkeys::KeyPair::new_server();
            let seed = key
                .seed()
                .map_err(|e| anyhow::anyhow!("cannot encode the new signing key: {e}"))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .with_context(|| format!("cannot create the signing key {}", path.display()))?;
            std::io::Write::write_all(&mut file, format!("{seed}\n").as_bytes())
                .with_context(|| format!("cannot write the signing key {}", path.display()))?;
            tracing::info!(public_key = %key.public_key(), path = %path.display(), "made the orchestrator's receipt-signing key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the signing key {}", path.display())),
    }
}
