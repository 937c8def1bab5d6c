//! The ledger writer: one thread owns the [`Store`] and runs every operation on it, committing
//! many operations per fsync (group commit) while each keeps its own savepoint, and answers an
//! operation only once the commit that holds it is durable.

use super::Orchestrator;
use super::store::{CommitError, Store, StoreError};
use crate::ledger::LedgerError;
use anyhow::Context as _;
use rhizos_broker::wire::{ErrorCode, WireError};

/// Delivers an operation's result once its batch's commit outcome is known.
pub(super) type Completion = Box<dyn FnOnce(&Result<(), CommitError>) + Send>;
/// An operation for the ledger writer.
pub(super) type Op = Box<dyn FnOnce(&mut Store) -> Completion + Send>;

/// Most operations committed together.
const MAX_GROUP_COMMIT: usize = 512;

/// Starts the thread that owns the database. It takes every operation queued when it wakes (up to
/// [`MAX_GROUP_COMMIT`]), runs them in one transaction, commits once, then answers them all: under
/// load many operations share one fsync (group commit), while each still commits or rolls back on
/// its own through its savepoint, and nobody hears of a change before it is durable.
pub(super) fn spawn_writer(
    mut store: Store,
    metrics: std::sync::Arc<crate::metrics::OrchestratorMetrics>,
) -> anyhow::Result<std::sync::mpsc::Sender<Op>> {
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
                metrics.group_size.observe(batch.len() as f64);
                let started = std::time::Instant::now();
                let (completions, commit) = store.group_commit(|store| {
                    batch
                        .into_iter()
                        .map(|op| {
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(store))).unwrap_or_else(|_| {
                                Box::new(|_: &Result<(), CommitError>| {
                                    tracing::error!("a ledger operation panicked; its savepoint was rolled back");
                                }) as Completion
                            })
                        })
                        .collect::<Vec<_>>()
                });
                metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
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

impl Orchestrator {
    /// Runs `f` on the ledger writer thread; its result arrives once the batch it ran in has
    /// been committed (or as an `internal` error if that commit failed).
    pub(in crate::orchestrator) async fn db<
        T: Send + 'static,
        E: Into<WireError> + Send + 'static,
    >(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, WireError> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (queued, metrics) = (std::time::Instant::now(), self.inner.metrics.clone());
        let op: Op = Box::new(move |store: &mut Store| {
            let result = f(store).map_err(Into::into);
            Box::new(move |commit: &Result<(), CommitError>| {
                metrics
                    .ledger_wait_seconds
                    .observe(queued.elapsed().as_secs_f64());
                let _ = sender.send(match commit {
                    Ok(()) => result,
                    // Handing over or catching up: the same request may go again.
                    Err(CommitError::NotWriting(e)) => Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!("ledger {e}"),
                    )),
                    Err(CommitError::Failed(e)) => {
                        Err(WireError::new(ErrorCode::Internal, format!("ledger {e}")))
                    }
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
}

impl Orchestrator {
    /// Runs the read `f` on the read-only handle, on the blocking pool, in one snapshot: for
    /// reads that may take long (`ledger.verify` reads every job) and must not hold up commits.
    pub(in crate::orchestrator) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, WireError> {
        let reader = self.inner.reader.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            store.snapshot(f).map_err(WireError::from)
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("read task failed: {e}")))?
    }
}

/// The one place a store error becomes a wire error (with its stable code).
impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound(_) | StoreError::Ledger(LedgerError::NoAccount(_)) => {
                ErrorCode::NotFound
            }
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::Forbidden(_) => ErrorCode::Forbidden,
            StoreError::InvalidState(_) => ErrorCode::InvalidState,
            StoreError::InsufficientFunds(_)
            | StoreError::Ledger(LedgerError::InsufficientFunds { .. }) => {
                ErrorCode::InsufficientFunds
            }
            StoreError::Ledger(LedgerError::NonPositive(_)) => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        };
        WireError::new(code, e.to_string())
    }
}
