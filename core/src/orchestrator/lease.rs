//! Which orchestrator is active (ADR 0009): a lease in the namespace's JetStream KV bucket
//! `rhizos-lease-<ns>`, key `orchestrator`, holding who has it and which ledger it writes.
//!
//! * **Acquire**: create the key (only if absent); JetStream's revision check makes exactly one
//!   creator win. A key already there is taken over only by an orchestrator on **the same
//!   ledger**, and only when its holder is known to be gone:
//!   - it ran on this host from the same data directory: this process holds that directory's
//!     lock, so that holder is dead (a restart after a crash takes over at once);
//!   - it let go on a clean shutdown (`released`);
//!   - it has not renewed for its own TTL (a shared volume mounted by a standby machine).
//!
//!   Anything else leaves this orchestrator a standby serving nothing: a live holder, or one
//!   gone that wrote *another* ledger — taking over would split the network's money between two
//!   ledgers (until the ledger is replicated, a standby has no copy of the active's). An operator
//!   who means to switch ledgers says so (`lease_take_over_other_ledger`), and even then only a
//!   released or lapsed lease is taken.
//! * **Renew** every third of the TTL, with the revision last written: if another process wrote
//!   the key since, the lease is lost and the orchestrator stops serving at once; if it cannot
//!   be renewed for a whole TTL (the bus unreachable) it stops too, because by then a standby
//!   may take over. Either way it is a standby again.
//! * **Release** on a clean shutdown: the value is rewritten with `released`, so whoever starts
//!   next becomes active at once.
//!
//! Lapse is judged by the standby's own monotonic clock (the revision has not moved for a TTL),
//! never by comparing clocks of different machines.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The lease's key in the bucket.
pub const KEY: &str = "orchestrator";

/// The bucket holding the lease of namespace `ns`.
pub fn bucket_name(ns: &str) -> String {
    format!("rhizos-lease-{ns}")
}

/// Who holds (or held) the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// This run of the process (random at each start).
    pub run: String,
    /// The instance id of the ledger it writes.
    pub ledger: String,
    pub host: String,
    /// The data directory it locked (absolute).
    #[serde(default)]
    pub data_dir: String,
    pub pid: u32,
    /// When it took the lease (its clock, ms since the epoch): for people reading it.
    pub since_ms: u64,
    /// Its lease lapses when unrenewed this long (standbys judge lapse by the holder's own
    /// TTL, whatever theirs is).
    pub ttl_ms: u64,
    /// It let go on a clean shutdown: anyone may take the lease.
    #[serde(default)]
    pub released: bool,
}

impl Holder {
    /// This process, writing the ledger `ledger` in the (locked) `data_dir`, renewing within
    /// `ttl`.
    pub fn me(ledger: &str, data_dir: &std::path::Path, ttl: Duration) -> Self {
        Self {
            run: uuid::Uuid::now_v7().simple().to_string(),
            ledger: ledger.to_owned(),
            host: hostname(),
            data_dir: std::path::absolute(data_dir)
                .unwrap_or_else(|_| data_dir.to_owned())
                .display()
                .to_string(),
            pid: std::process::id(),
            since_ms: crate::now_ms(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            released: false,
        }
    }

    fn encode(&self) -> bytes::Bytes {
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} (ledger {}, run {})",
            self.pid, self.host, self.ledger, self.run
        )
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// Opens (creating if needed) the lease bucket of namespace `ns`.
pub async fn bucket(
    jetstream: &jetstream::Context,
    ns: &str,
    replicas: usize,
) -> anyhow::Result<kv::Store> {
    let name = bucket_name(ns);
    if let Ok(store) = jetstream.get_key_value(&name).await {
        return Ok(store);
    }
    jetstream
        .create_key_value(kv::Config {
            bucket: name.clone(),
            description: "which rhizosd orchestrator is active".into(),
            history: 1,
            num_replicas: replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the lease bucket {name}: {e}"))
}

/// Why a standby is waiting, as it last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// Another orchestrator holds the lease and renews it.
    Held(Holder),
    /// The holder is gone (released, or stopped renewing) but wrote another ledger: this one
    /// will not take over.
    OtherLedger(Holder),
}

/// The lease, held.
pub struct Lease {
    kv: kv::Store,
    me: Holder,
    revision: u64,
    ttl: Duration,
    renewed: Instant,
}

/// The lease is no longer this orchestrator's.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("another orchestrator took the lease: {0}")]
    TakenBy(String),
    #[error(
        "the lease could not be renewed for {0:?} (last error: {1}); a standby may have taken over"
    )]
    Unrenewed(Duration, String),
}

impl Lease {
    /// Waits until this orchestrator may be active and takes the lease (at once when nobody
    /// holds it). `waiting` hears each new reason to wait.
    pub async fn acquire(
        kv: kv::Store,
        me: Holder,
        take_over_other_ledger: bool,
        mut waiting: impl FnMut(&Waiting),
    ) -> anyhow::Result<Self> {
        let ttl = Duration::from_millis(me.ttl_ms);
        let poll = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        // The revision last seen and since when (this machine's monotonic clock).
        let mut seen: Option<(u64, Instant)> = None;
        let mut told: Option<Waiting> = None;
        loop {
            match kv.create(KEY, me.encode()).await {
                Ok(revision) => return Ok(Self::held(kv, me, revision)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the lease bucket; trying again");
                    tokio::time::sleep(poll).await;
                    continue;
                }
            }
            let entry = match kv.entry(KEY).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
                // Gone (or deleted) since: create again.
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the lease; trying again");
                    tokio::time::sleep(poll).await;
                    continue;
                }
            };
            if seen.is_none_or(|(revision, _)| revision != entry.revision) {
                seen = Some((entry.revision, Instant::now()));
            }
            // Not ours to read (written by hand): held by an unknown party, never lapsing.
            let holder: Holder = serde_json::from_slice(&entry.value).unwrap_or_else(|_| Holder {
                run: "?".into(),
                ledger: "?".into(),
                host: "?".into(),
                data_dir: "?".into(),
                pid: 0,
                since_ms: 0,
                ttl_ms: u64::MAX,
                released: false,
            });
            let lapsed = seen
                .is_some_and(|(_, since)| since.elapsed() >= Duration::from_millis(holder.ttl_ms));
            let gone = holder.released || lapsed;
            let same_ledger = holder.ledger == me.ledger;
            let dead = holder.host == me.host && holder.data_dir == me.data_dir;
            let take = (same_ledger && (dead || gone)) || (take_over_other_ledger && gone);
            if take {
                match kv.update(KEY, me.encode(), entry.revision).await {
                    Ok(revision) => {
                        tracing::info!(previous = %holder, "took over the orchestrator lease");
                        return Ok(Self::held(kv, me, revision));
                    }
                    // Someone else wrote it first: look again.
                    Err(e) => tracing::debug!(error = %e, "lost the race for the lease"),
                }
                continue;
            }
            let reason = if gone {
                Waiting::OtherLedger(holder)
            } else {
                Waiting::Held(holder)
            };
            if told.as_ref() != Some(&reason) {
                waiting(&reason);
                told = Some(reason);
            }
            tokio::time::sleep(poll).await;
        }
    }

    fn held(kv: kv::Store, me: Holder, revision: u64) -> Self {
        Self {
            kv,
            ttl: Duration::from_millis(me.ttl_ms),
            me,
            revision,
            renewed: Instant::now(),
        }
    }

    /// How often [`Lease::renew`] should run.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Writes the lease again, expecting the revision this orchestrator wrote last. The lease
    /// counts from the moment a renewal was *sent* (a standby starts counting no earlier than
    /// when the write reached the server), and a renewal that cannot be answered before the
    /// lease runs out is given up: the caller stops serving by then.
    pub async fn renew(&mut self) -> Result<(), Lost> {
        let sent = Instant::now();
        let left = (self.renewed + self.ttl).saturating_duration_since(sent);
        let written =
            tokio::time::timeout(left, self.kv.update(KEY, self.me.encode(), self.revision)).await;
        match written {
            Ok(Ok(revision)) => {
                self.revision = revision;
                self.renewed = sent;
                Ok(())
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let holder = match self.kv.entry(KEY).await {
                    Ok(Some(entry)) => serde_json::from_slice::<Holder>(&entry.value).map_or_else(
                        |_| "someone (unreadable value)".to_owned(),
                        |h| h.to_string(),
                    ),
                    _ => "someone (the key is gone)".to_owned(),
                };
                Err(Lost::TakenBy(holder))
            }
            Ok(Err(e)) if self.renewed.elapsed() >= self.ttl => {
                Err(Lost::Unrenewed(self.ttl, e.to_string()))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot renew the orchestrator lease yet; trying again");
                Ok(())
            }
            Err(_) => Err(Lost::Unrenewed(
                self.ttl,
                "no answer before the lease ran out".to_owned(),
            )),
        }
    }

    /// Lets go (a clean shutdown): whoever starts next is active at once.
    pub async fn release(mut self) {
        self.me.released = true;
        if let Err(e) = self.kv.update(KEY, self.me.encode(), self.revision).await {
            tracing::warn!(error = %e, "could not release the orchestrator lease; a standby takes over once it lapses");
        }
    }

    /// Who this orchestrator says it is in the lease.
    pub fn holder(&self) -> &Holder {
        &self.me
    }
}
