//! The replicated ledger (ADR 0010): with `[orchestrator] replicated_ledger`, the ledger's
//! source of truth is the JetStream stream `RHIZOS_LEDGER_<NS>` (R3 on a 3-server cluster),
//! and each orchestrator's SQLite file is a projection of it.
//!
//! * The stream starts with a **snapshot** record: the whole database as the first active
//!   orchestrator had it, stored in the object store bucket `rhizos-ledger-<ns>`.
//! * The active orchestrator's ledger thread captures each batch's changes (a SQLite session
//!   changeset) and appends them — in parts when larger than a message may be — with an
//!   **expected last sequence**, before the batch commits locally and before anyone is
//!   answered ([`NatsJournal`]). A second writer's append fails on the sequence: it cannot fork
//!   the ledger, whatever its lease says.
//! * A standby applies the records in order as they come ([`Orchestrator::follow`]); once it
//!   holds the lease it catches up to the stream's last record before serving. A batch whose
//!   parts stop short, followed by another batch, was never committed by anyone (its writer
//!   answered nobody before every part was stored) and is skipped; one at the stream's end is
//!   fenced off by the new writer's first append, or completed by its writer first.
//! * A fresh data dir starts from the latest snapshot; a restart from its own file, replaying
//!   only what it has not applied.

use super::Orchestrator;
use super::store::Store;
use anyhow::Context as _;
use async_nats::jetstream::{self, object_store, stream};
use futures::StreamExt as _;
use rhizos_broker::Bus;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

// The records' headers (their wire format, ADR 0010): every record names its ledger and schema
// version; a changes record its part (`1/3`); a snapshot record its object and what it covers.
pub const LEDGER_HEADER: &str = "Rhizos-Ledger";
pub const SCHEMA_HEADER: &str = "Rhizos-Schema";
pub const PART_HEADER: &str = "Rhizos-Part";
pub const OBJECT_HEADER: &str = "Rhizos-Object";
pub const COVERS_HEADER: &str = "Rhizos-Covers";

/// Longest wait for a quorum to acknowledge one appended part: longer than the stream's
/// replicas take to elect a new leader when the old one's server is lost (a few seconds, up to
/// about ten), so losing a server stalls the writer rather than stopping it. Past it the writer
/// stops writing and catches up (the part may or may not be stored; the stream decides).
const APPEND_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an orchestrator starting waits for JetStream to open the ledger's stream.
const OPEN_PATIENCE: Duration = Duration::from_secs(60);

/// How long a follower waits for the next record before it checks that the stream has nothing
/// newer (an ordered consumer on a server that died can go quiet rather than fail).
const STALL_CHECK: Duration = Duration::from_secs(2);

/// How often the active orchestrator checks whether a snapshot of the ledger is due.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(5);

/// Applied records sent to the ledger thread and not yet answered, at most.
const APPLY_WINDOW: usize = 64;

/// The ledger stream and its snapshot bucket.
#[derive(Clone)]
pub struct LedgerLog {
    jetstream: jetstream::Context,
    stream_name: String,
    snapshots: object_store::ObjectStore,
    changes_subject: String,
    snapshot_subject: String,
    /// Largest payload of one record (the server's `max_payload`, less room for headers).
    part_bytes: usize,
}

/// Waits (at most 30 s) until the stream `name` has a leader: on a cluster, a stream just
/// created answers "no responders" until its replicas elected one.
async fn wait_for_leader(jetstream: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let leader = match jetstream.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.cluster.as_ref().is_none_or(|c| c.leader.is_some()),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if leader {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the stream {name} has no leader after 30 s: are a majority of its NATS servers up?"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A snapshot record: the whole ledger as it was after record `covers`, stored as `object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The record's own position in the stream.
    pub position: u64,
    /// The last record the snapshot holds: a member restoring it replays from the next one.
    /// The stream's first snapshot holds the ledger as it started: it covers itself.
    pub covers: u64,
    pub ledger: String,
    pub schema: u32,
    pub object: String,
}

/// One record of the stream.
#[derive(Debug)]
enum Record {
    Changes {
        ledger: String,
        schema: u32,
        part: u32,
        parts: u32,
        bytes: bytes::Bytes,
    },
    Snapshot(Snapshot),
}

fn header(headers: Option<&async_nats::HeaderMap>, name: &str) -> Option<String> {
    headers
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
}

fn parse(
    position: u64,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: bytes::Bytes,
    snapshot_subject: &str,
) -> anyhow::Result<Record> {
    let ledger = header(headers, LEDGER_HEADER)
        .with_context(|| format!("ledger record {position} has no {LEDGER_HEADER} header"))?;
    let schema = header(headers, SCHEMA_HEADER)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("ledger record {position} has no {SCHEMA_HEADER} header"))?;
    if subject == snapshot_subject {
        let object = header(headers, OBJECT_HEADER)
            .with_context(|| format!("snapshot record {position} names no object"))?;
        let covers = match header(headers, COVERS_HEADER) {
            None => position,
            Some(covers) => covers
                .parse()
                .ok()
                .filter(|&covers| covers < position)
                .with_context(|| {
                    format!("snapshot record {position} has an invalid {COVERS_HEADER} header")
                })?,
        };
        return Ok(Record::Snapshot(Snapshot {
            position,
            covers,
            ledger,
            schema,
            object,
        }));
    }
    let (part, parts) = header(headers, PART_HEADER)
        .and_then(|p| {
            let (part, parts) = p.split_once('/')?;
            Some((part.parse().ok()?, parts.parse().ok()?))
        })
        .filter(|&(part, parts): &(u32, u32)| part >= 1 && part <= parts)
        .with_context(|| format!("ledger record {position} has no valid {PART_HEADER} header"))?;
    Ok(Record::Changes {
        ledger,
        schema,
        part,
        parts,
        bytes: payload,
    })
}

impl LedgerLog {
    /// Opens (creating if needed) the namespace's ledger stream and snapshot bucket, kept on
    /// `[nats] replicas` servers.
    pub async fn open(bus: &Bus) -> anyhow::Result<Self> {
        let subjects = &bus.subjects;
        let config = stream::Config {
            name: subjects.ledger_stream(),
            description: Some(format!("RhizOS replicated ledger of {subjects}")),
            subjects: vec![subjects.ledger_wildcard()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            // Nothing is ever dropped to make room: a full stream refuses appends (and the
            // orchestrator stops writing) rather than losing the ledger's history.
            discard: stream::DiscardPolicy::New,
            num_replicas: bus.replicas,
            deny_delete: true,
            allow_direct: true,
            ..Default::default()
        };
        let name = config.name.clone();
        let bucket = subjects.ledger_snapshots_bucket();
        // Asked again while JetStream cannot answer (a server of the cluster lost, its
        // leaders being elected): an orchestrator starting then waits rather than exits.
        let deadline = std::time::Instant::now() + OPEN_PATIENCE;
        let snapshots = loop {
            let opened = async {
                bus.jetstream
                    .get_or_create_stream(config.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot open the ledger stream {name}: {e}"))?;
                match bus.jetstream.get_object_store(&bucket).await {
                    Ok(store) => Ok(store),
                    Err(_) => bus
                        .jetstream
                        .create_object_store(object_store::Config {
                            bucket: bucket.clone(),
                            description: Some("snapshots of the RhizOS replicated ledger".into()),
                            num_replicas: bus.replicas,
                            storage: stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("cannot create the snapshot bucket {bucket}: {e}")
                        }),
                }
            };
            match opened.await {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "the replicated ledger's stream cannot be opened yet; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        // A new replicated stream takes appends once its replicas elected a leader.
        for stream in [name.clone(), format!("OBJ_{bucket}")] {
            wait_for_leader(&bus.jetstream, &stream).await?;
        }
        Ok(Self::with(bus, snapshots))
    }

    /// The namespace's ledger stream and snapshot bucket if they exist (nothing is created):
    /// for tools reading the replicated ledger (`rhizos ledger status`).
    pub async fn existing(bus: &Bus) -> anyhow::Result<Option<Self>> {
        use jetstream::context::GetStreamErrorKind;
        match bus.jetstream.get_stream(bus.subjects.ledger_stream()).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(None);
            }
            Err(e) => anyhow::bail!("cannot read the ledger stream: {e}"),
        }
        let snapshots = bus
            .jetstream
            .get_object_store(bus.subjects.ledger_snapshots_bucket())
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the ledger's snapshot bucket: {e}"))?;
        Ok(Some(Self::with(bus, snapshots)))
    }

    fn with(bus: &Bus, snapshots: object_store::ObjectStore) -> Self {
        let max_payload = bus.client.server_info().max_payload;
        Self {
            jetstream: bus.jetstream.clone(),
            stream_name: bus.subjects.ledger_stream(),
            snapshots,
            changes_subject: bus.subjects.ledger_changes(),
            snapshot_subject: bus.subjects.ledger_snapshot(),
            part_bytes: max_payload.saturating_sub(16 * 1024).max(64 * 1024),
        }
    }

    /// The position of the stream's last record (0: empty), as its leader knows it.
    pub async fn last(&self) -> anyhow::Result<u64> {
        Ok(self.state().await?.1)
    }

    /// The positions of the stream's first and last records (first is last + 1 when it is
    /// empty), as its leader knows them. While the stream has no leader, a replica answers
    /// with its own copy's state — one that may be behind, even empty after a restart — so
    /// such an answer is not taken: it is asked again (for up to 30 s) until the leader
    /// answers.
    pub async fn state(&self) -> anyhow::Result<(u64, u64)> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let stream = self
                .jetstream
                .get_stream(&self.stream_name)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the ledger stream: {e}"))?;
            let info = stream.cached_info();
            let from_leader = info
                .cluster
                .as_ref()
                .is_none_or(|c| c.leader.as_deref().is_some_and(|l| !l.is_empty()));
            if from_leader {
                return Ok((info.state.first_sequence, info.state.last_sequence));
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the ledger stream {} has had no leader for 30 s, so where it ends is unknown: are a majority of its NATS servers up?",
                self.stream_name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The latest snapshot record, if any.
    pub async fn latest_snapshot(&self) -> anyhow::Result<Option<Snapshot>> {
        let stream = self
            .jetstream
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the ledger stream: {e}"))?;
        let message = match stream
            .get_last_raw_message_by_subject(&self.snapshot_subject)
            .await
        {
            Ok(message) => message,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(e) => anyhow::bail!("cannot read the ledger's latest snapshot: {e}"),
        };
        match parse(
            message.sequence,
            &message.subject,
            Some(&message.headers),
            message.payload,
            &self.snapshot_subject,
        )? {
            Record::Snapshot(snapshot) => Ok(Some(snapshot)),
            Record::Changes { .. } => anyhow::bail!("the ledger's snapshot record is damaged"),
        }
    }

    /// Writes the snapshot's database to `to` (a new file: the caller opens it next).
    pub async fn restore(&self, snapshot: &Snapshot, to: &Path) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt as _;
        let mut object = self
            .snapshots
            .get(&snapshot.object)
            .await
            .with_context(|| format!("cannot read the snapshot {}", snapshot.object))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("cannot read the snapshot {}", snapshot.object))?;
        let partial = to.with_extension("restoring");
        tokio::fs::write(&partial, &bytes)
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        tokio::fs::File::open(&partial).await?.sync_all().await?;
        // A write-ahead log or its index left beside `to` (a process killed while it removed
        // or set aside an earlier file) belongs to another database: opened with the restored
        // file, SQLite would replay that database's pages over it.
        for suffix in ["-wal", "-shm"] {
            let stale = std::path::PathBuf::from(format!("{}{suffix}", to.display()));
            match tokio::fs::remove_file(&stale).await {
                Ok(()) => {
                    tracing::warn!(file = %stale.display(), "removed a write-ahead log file left by another ledger file before restoring")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", stale.display()));
                }
            }
        }
        tokio::fs::rename(&partial, to)
            .await
            .with_context(|| format!("cannot move the snapshot to {}", to.display()))?;
        Ok(())
    }

    /// Copies the database at `db` in one read transaction and stores the copy as an object
    /// of its own name (a snapshot object is never replaced, so a snapshot whose record is
    /// then refused cannot change what the stream's records name). Returns the object's name
    /// and the last record the copy had applied.
    pub async fn store_copy(&self, db: &Path, ledger: &str) -> anyhow::Result<(String, u64)> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let copy = db.with_extension(format!("snapshot-{nonce}"));
        let covers = {
            let (db, copy) = (db.to_owned(), copy.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
                let conn = rusqlite::Connection::open_with_flags(
                    &db,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                conn.execute("VACUUM INTO ?1", [copy.to_string_lossy()])?;
                let copied = rusqlite::Connection::open_with_flags(
                    &copy,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                let applied: i64 = copied.query_row(
                    "SELECT value FROM replica WHERE key = 'applied'",
                    [],
                    |row| row.get(0),
                )?;
                Ok(u64::try_from(applied).unwrap_or(0))
            })
            .await?
            .context("cannot copy the ledger for a snapshot")?
        };
        let object = format!("{ledger}-{covers}-{nonce}");
        let stored = async {
            let mut file = tokio::fs::File::open(&copy).await?;
            self.snapshots
                .put(object.as_str(), &mut file)
                .await
                .map_err(|e| anyhow::anyhow!("cannot store the snapshot {object}: {e}"))
        }
        .await;
        let _ = tokio::fs::remove_file(&copy).await;
        stored?;
        Ok((object, covers))
    }

    /// Starts the stream with a snapshot of the database at `db` (a ledger that has applied
    /// no record) — only if the stream's last record is still `after` (0). Returns the
    /// record's position.
    pub async fn snapshot(&self, db: &Path, ledger: &str, after: u64) -> anyhow::Result<u64> {
        let (object, _) = self.store_copy(db, ledger).await?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(LEDGER_HEADER, ledger);
        headers.insert(
            SCHEMA_HEADER,
            super::store::schema::SCHEMA_VERSION.to_string().as_str(),
        );
        headers.insert(OBJECT_HEADER, object.as_str());
        let refused = match self
            .append(&self.snapshot_subject, headers, bytes::Bytes::new(), after)
            .await
        {
            Ok(ack) if !ack.duplicate => return Ok(ack.sequence),
            Ok(_) => "another orchestrator's came first".to_owned(),
            Err(e) => e,
        };
        // A refusal may answer a resend of a record that was in fact stored (its first
        // acknowledgement lost to a leader election): then the latest snapshot is this one.
        // Otherwise the object is nobody's (deleted when that is known for sure).
        match self.latest_snapshot().await {
            Ok(Some(latest)) if latest.object == object => return Ok(latest.position),
            Ok(_) => {
                if let Err(e) = self.snapshots.delete(object.as_str()).await {
                    tracing::debug!(object, error = %e, "an unused snapshot object was not deleted");
                }
            }
            Err(e) => {
                tracing::debug!(object, error = %e, "whose snapshot the stream holds is not known yet: its object is kept");
            }
        }
        anyhow::bail!("the snapshot record was not stored: {refused}")
    }

    /// Appends one record to `subject` if the stream's last record is `after`, sending it again
    /// while the stream cannot take it (a leader being elected: no responders, a timeout) —
    /// the expected last sequence makes a resend of what was in fact stored fail rather than
    /// store it twice — until [`APPEND_TIMEOUT`]. A genesis snapshot (`after` 0) also carries
    /// a message id, so that of two orchestrators starting the stream at once one is told it
    /// came second.
    async fn append(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
        after: u64,
    ) -> Result<jetstream::publish::PublishAck, String> {
        let attempts = async {
            loop {
                let mut publish = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .headers(headers.clone())
                    .expected_last_sequence(after);
                if after == 0 {
                    publish = publish.message_id("genesis");
                }
                let attempt = async {
                    self.jetstream
                        .send_publish(subject.to_owned(), publish)
                        .await?
                        .await
                };
                match attempt.await {
                    Ok(ack) => return Ok(ack),
                    Err(e)
                        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
                    {
                        return Err(format!(
                            "{e}: another orchestrator appended after record {after}"
                        ));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "the ledger stream did not take an append; sending it again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        tokio::time::timeout(APPEND_TIMEOUT, attempts)
            .await
            .map_err(|_| format!("no quorum acknowledged the append within {APPEND_TIMEOUT:?}"))?
    }

    /// The records from position `from` on, in order, as they come.
    async fn records(
        &self,
        from: u64,
    ) -> anyhow::Result<impl futures::Stream<Item = anyhow::Result<(u64, Record)>> + use<>> {
        use jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let stream = self
            .jetstream
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the ledger stream: {e}"))?;
        let messages = stream
            .create_consumer(OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                // Pulls of at most this many records (a new one when half are left: at most
                // 1.5× outstanding), so a slow standby holds a bounded read-ahead — the
                // client's default is 500.
                max_batch: FOLLOW_BATCH,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot follow the ledger stream: {e}"))?
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("cannot follow the ledger stream: {e}"))?;
        let snapshot_subject = self.snapshot_subject.clone();
        Ok(messages.map(move |message| {
            let message =
                message.map_err(|e| anyhow::anyhow!("following the ledger stream: {e}"))?;
            let position = message
                .info()
                .map_err(|e| anyhow::anyhow!("a ledger record without its position: {e}"))?
                .stream_sequence;
            let message = message.message;
            let record = parse(
                position,
                message.subject.as_str(),
                message.headers.as_ref(),
                message.payload,
                &snapshot_subject,
            )?;
            Ok((position, record))
        }))
    }

    /// Drops the records before `keep_from` (what no snapshot kept needs any more) and the
    /// snapshot objects other than `keep`.
    pub async fn trim(&self, keep_from: u64, keep: &[&str]) -> anyhow::Result<u64> {
        let stream = self
            .jetstream
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the ledger stream: {e}"))?;
        let purged = stream
            .purge()
            .sequence(keep_from)
            .await
            .map_err(|e| anyhow::anyhow!("cannot trim the ledger stream: {e}"))?
            .purged;
        let mut objects = self
            .snapshots
            .list()
            .await
            .map_err(|e| anyhow::anyhow!("cannot list the ledger's snapshots: {e}"))?;
        let mut unused = Vec::new();
        while let Some(object) = objects.next().await {
            match object {
                Ok(object) if !keep.contains(&object.name.as_str()) => unused.push(object.name),
                Ok(_) => {}
                Err(e) => anyhow::bail!("cannot list the ledger's snapshots: {e}"),
            }
        }
        for object in unused {
            if let Err(e) = self.snapshots.delete(object.as_str()).await {
                tracing::warn!(object, error = %e, "an old ledger snapshot was not deleted");
            }
        }
        Ok(purged)
    }

    /// The journal the ledger thread appends to, expecting the stream's last record to be
    /// `after`.
    pub fn journal(&self, ledger: &str, after: u64, failed: Arc<Failed>) -> NatsJournal {
        NatsJournal {
            log: self.clone(),
            ledger: ledger.to_owned(),
            last: after,
            failed,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

/// The writer stopped: an append was refused or not answered. The orchestrator stops serving
/// when it is set, and catches up with the stream before it writes again.
#[derive(Default)]
pub struct Failed {
    why: std::sync::Mutex<Option<String>>,
    pub(super) notify: tokio::sync::Notify,
}

impl Failed {
    fn set(&self, why: String) {
        let mut slot = self
            .why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(why);
            self.notify.notify_one();
        }
    }

    /// Why the writer stopped, if it did.
    pub fn why(&self) -> Option<String> {
        self.why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Appends batches to the ledger stream from the ledger thread (blocking it until a quorum
/// acknowledged every part).
pub struct NatsJournal {
    log: LedgerLog,
    ledger: String,
    /// The stream's last record as this writer knows it.
    last: u64,
    failed: Arc<Failed>,
    runtime: tokio::runtime::Handle,
}

impl NatsJournal {
    async fn publish(&self, changeset: Vec<u8>) -> Result<u64, String> {
        let changeset = bytes::Bytes::from(changeset);
        let parts = changeset.len().div_ceil(self.log.part_bytes).max(1);
        let mut last = self.last;
        for part in 0..parts {
            let start = part * self.log.part_bytes;
            let end = (start + self.log.part_bytes).min(changeset.len());
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(LEDGER_HEADER, self.ledger.as_str());
            headers.insert(
                SCHEMA_HEADER,
                super::store::schema::SCHEMA_VERSION.to_string().as_str(),
            );
            headers.insert(PART_HEADER, format!("{}/{parts}", part + 1).as_str());
            let appended = self
                .log
                .append(
                    &self.log.changes_subject,
                    headers,
                    changeset.slice(start..end),
                    last,
                )
                .await?;
            last = appended.sequence;
        }
        Ok(last)
    }

    /// Runs one append to the stream on the ledger thread (blocking it until answered); a
    /// refused or unanswered one stops the writer.
    fn appending(
        &mut self,
        append: impl AsyncFnOnce(&Self) -> Result<u64, String>,
    ) -> Result<u64, String> {
        if let Some(why) = self.failed.why() {
            return Err(format!(
                "this orchestrator stopped writing the ledger ({why})"
            ));
        }
        match self.runtime.block_on(append(self)) {
            Ok(last) => {
                self.last = last;
                Ok(last)
            }
            Err(e) => {
                let why = format!("the replicated ledger refused or did not answer an append: {e}");
                self.failed.set(why.clone());
                Err(why)
            }
        }
    }
}

impl super::store::Journal for NatsJournal {
    fn append(&mut self, changeset: Vec<u8>) -> Result<u64, String> {
        self.appending(async |this| this.publish(changeset).await)
    }

    fn stop(&mut self, why: String) {
        tracing::error!(
            why,
            "the replicated ledger's writer stops: this file is behind the stream; catching up"
        );
        self.failed.set(why);
    }

    fn append_snapshot(&mut self, object: &str, covers: u64) -> Result<u64, String> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(LEDGER_HEADER, self.ledger.as_str());
        headers.insert(
            SCHEMA_HEADER,
            super::store::schema::SCHEMA_VERSION.to_string().as_str(),
        );
        headers.insert(OBJECT_HEADER, object);
        headers.insert(COVERS_HEADER, covers.to_string().as_str());
        self.appending(async |this| {
            this.log
                .append(
                    &this.log.snapshot_subject,
                    headers,
                    bytes::Bytes::new(),
                    this.last,
                )
                .await
                .map(|ack| ack.sequence)
        })
    }
}

/// This data dir's ledger is not the stream's (or the stream was written by another schema):
/// no catching up can fix it, the operator must.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(pub String);

/// Resolves once the writer stopped (never without a writer).
pub(super) async fn stopped(failed: Option<&Failed>) {
    match failed {
        Some(failed) if failed.why().is_some() => {}
        Some(failed) => failed.notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Most records one pull of a follower's consumer asks for.
pub const FOLLOW_BATCH: i64 = 200;

/// A batch whose parts are still arriving.
struct Assembly {
    parts: u32,
    got: u32,
    bytes: Vec<u8>,
}

impl Orchestrator {
    /// Applies the stream's records to this orchestrator's file as they come (a standby), or
    /// — with `until` — up to that position and no further (a last batch whose parts stop
    /// short stays unapplied: see `become_writer`). Returns the position applied up to. A record of another ledger, or of another schema version, is an error.
    pub(super) async fn follow(&self, log: &LedgerLog, until: Option<u64>) -> anyhow::Result<u64> {
        let ledger = self.inner.instance.clone();
        let mut applied = self
            .db(|store| store.applied())
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if until.is_some_and(|until| applied >= until) {
            return Ok(applied);
        }
        let (first, _) = log.state().await?;
        if first > applied + 1 {
            applied = self.reset_to_latest_snapshot(log, applied, first).await?;
            if until.is_some_and(|until| applied >= until) {
                return Ok(applied);
            }
        }
        let mut records = std::pin::pin!(log.records(applied + 1).await?);
        let mut assembly: Option<Assembly> = None;
        let mut pending = futures::stream::FuturesOrdered::new();
        // The position of the last record seen (applied or waiting in `assembly`).
        let mut seen = applied;
        while until.is_none_or(|until| seen < until) {
            let (position, record) = tokio::select! {
                biased;
                Some(done) = pending.next(), if !pending.is_empty() => {
                    done?;
                    continue;
                }
                record = tokio::time::timeout(STALL_CHECK, records.next()) => match record {
                    Ok(Some(record)) => record?,
                    Ok(None) => anyhow::bail!("the ledger stream ended"),
                    // Quiet: fine if the stream has nothing newer; if it has, this consumer is
                    // stuck (its server lost, say) and the follow starts again from `applied`.
                    Err(_) => {
                        let last = log.last().await?;
                        anyhow::ensure!(
                            last <= seen,
                            "the ledger stream is at record {last} but nothing past {seen} arrived within {STALL_CHECK:?}: following it again"
                        );
                        continue;
                    }
                },
            };
            // Every record, one after the other: a jump means records this follower never saw
            // (trimmed after a snapshot while it was stalled, say) — their changes must not be
            // skipped silently. Following again starts from what was applied (and, when the
            // stream no longer has it, from the latest snapshot).
            anyhow::ensure!(
                position == seen + 1,
                "the ledger stream went from record {seen} to {position}: following it again"
            );
            seen = position;
            let changes = match record {
                Record::Snapshot(snapshot) => {
                    if snapshot.ledger != ledger {
                        return Err(Mismatch(format!(
                            "the replicated ledger stream holds ledger {}, this data dir ledger {ledger}: give this orchestrator an empty data dir to join it",
                            snapshot.ledger
                        ))
                        .into());
                    }
                    assembly = None;
                    Vec::new()
                }
                Record::Changes {
                    ledger: of,
                    schema,
                    part,
                    parts,
                    bytes,
                } => {
                    if of != ledger {
                        return Err(Mismatch(format!(
                            "ledger record {position} is of ledger {of}, this data dir holds ledger {ledger}: give this orchestrator an empty data dir to join it"
                        ))
                        .into());
                    }
                    if schema != super::store::schema::SCHEMA_VERSION {
                        return Err(Mismatch(format!(
                            "ledger record {position} was written with schema version {schema}, this rhizosd has {}: run the same rhizosd release on every orchestrator",
                            super::store::schema::SCHEMA_VERSION
                        ))
                        .into());
                    }
                    if part == 1 {
                        if assembly.is_some() {
                            tracing::warn!(
                                position,
                                "a ledger batch whose parts stopped short was skipped (its writer stopped before storing it all, and answered nobody)"
                            );
                        }
                        assembly = Some(Assembly {
                            parts,
                            got: 0,
                            bytes: Vec::new(),
                        });
                    }
                    match assembly.as_mut() {
                        Some(batch) if batch.got + 1 == part && batch.parts == parts => {
                            batch.got = part;
                            batch.bytes.extend_from_slice(&bytes);
                        }
                        _ => {
                            tracing::warn!(
                                position,
                                part,
                                parts,
                                "a ledger record out of its batch's order was skipped"
                            );
                            assembly = None;
                            continue;
                        }
                    }
                    if part < parts {
                        continue;
                    }
                    assembly.take().map(|batch| batch.bytes).unwrap_or_default()
                }
            };
            let after = applied;
            applied = position;
            pending.push_back(async move {
                self.db(move |store| store.apply_replicated(after, position, &changes))
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("cannot apply ledger record {position}: {}", e.message)
                    })
            });
            while pending.len() >= APPLY_WINDOW {
                if let Some(done) = pending.next().await {
                    done?;
                }
            }
        }
        while let Some(done) = pending.next().await {
            done?;
        }
        // Parts of a batch not complete yet at `until` are not applied — nor skipped: their
        // writer may still be appending the rest (it lost its lease but not its append). The
        // new writer's first append, expecting the stream's end, fences them off for good;
        // should that append find the stream moved on, following again from here sees the
        // whole batch (see `become_writer`).
        Ok(applied)
    }
}

/// Opens this orchestrator's projection of the replicated ledger at `path`, as a standby:
/// * a data dir with a ledger file keeps it (it must be of the stream's ledger);
/// * an empty one joins the stream's ledger from its latest snapshot;
/// * an empty one while the stream is empty makes a new ledger and starts the stream with its
///   snapshot — unless another orchestrator started it first: then it joins that one.
pub(super) async fn open_projection(
    log: &LedgerLog,
    path: &Path,
    data_dir: &Path,
    fee_bps: u32,
) -> anyhow::Result<Store> {
    let open = || {
        Store::open(path, fee_bps)
            .with_context(|| format!("failed to open ledger at {}", path.display()))
    };
    let restore = async |snapshot: &Snapshot| -> anyhow::Result<Store> {
        log.restore(snapshot, path).await?;
        let store = open()?;
        store.set_applied(snapshot.covers)?;
        tracing::info!(ledger = %snapshot.ledger, position = snapshot.position, covers = snapshot.covers, "ledger restored from the replicated ledger's latest snapshot");
        Ok(store)
    };
    let store = if path.exists() {
        let store = open()?;
        let applied = store.applied()?;
        let (first, last) = log.state().await?;
        tracing::info!(
            ledger = store.instance(),
            applied,
            stream_first = first,
            stream_last = last,
            "this data dir's ledger file opened"
        );
        // A projection stopped for longer than the stream keeps records (it was trimmed past
        // what this file applied): set aside, and the ledger restored from the latest snapshot.
        if applied > 0
            && first > applied + 1
            && last > applied
            && let Some(snapshot) = log.latest_snapshot().await?
            && snapshot.ledger == store.instance()
        {
            drop(store);
            let aside = path.with_extension(format!("db.behind-{applied}"));
            std::fs::rename(path, &aside)
                .with_context(|| format!("cannot move {} aside", path.display()))?;
            for suffix in ["-wal", "-shm"] {
                let from = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
                let to = std::path::PathBuf::from(format!("{}{suffix}", aside.display()));
                let _ = std::fs::rename(from, to);
            }
            tracing::warn!(applied, stream_starts_at = first, kept = %aside.display(), "this ledger file is older than what the replicated ledger keeps: restoring the latest snapshot (the old file is kept aside)");
            return finish(restore(&snapshot).await?, log, data_dir).await;
        }
        // A ledger kept before replication was turned on: it starts the stream, unless
        // another already did (then the check below tells the operator).
        // (Only a file that never applied a record: one that did is a projection of this
        // stream, whatever an empty stream says.)
        if applied == 0
            && last == 0
            && let Ok(position) = log.snapshot(path, store.instance(), 0).await
        {
            store.set_applied(position)?;
            tracing::info!(
                ledger = store.instance(),
                position,
                "the replicated ledger starts with a snapshot of this data dir's ledger"
            );
        }
        store
    } else if let Some(snapshot) = log.latest_snapshot().await? {
        restore(&snapshot).await?
    } else {
        let store = open()?;
        match log.snapshot(path, store.instance(), 0).await {
            Ok(position) => {
                store.set_applied(position)?;
                tracing::info!(
                    ledger = store.instance(),
                    position,
                    "a new replicated ledger, started with a snapshot of this one"
                );
                store
            }
            Err(e) => {
                // Another orchestrator started the stream a moment before: join its ledger.
                // Either way this new file is not the stream's ledger: it goes.
                drop(store);
                for suffix in ["", "-wal", "-shm"] {
                    let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
                    let _ = std::fs::remove_file(file);
                }
                let Some(snapshot) = log.latest_snapshot().await? else {
                    return Err(e.context("cannot start the replicated ledger"));
                };
                restore(&snapshot).await?
            }
        }
    };
    finish(store, log, data_dir).await
}

/// A projection just opened: checked to be of the stream's ledger, and made a standby.
async fn finish(mut store: Store, log: &LedgerLog, data_dir: &Path) -> anyhow::Result<Store> {
    if let Some(snapshot) = log.latest_snapshot().await?
        && snapshot.ledger != store.instance()
    {
        return Err(Mismatch(format!(
            "the replicated ledger stream holds ledger {}, but the data dir {} holds ledger {}: give this orchestrator an empty data dir to join the stream's ledger",
            snapshot.ledger,
            data_dir.display(),
            store.instance()
        ))
        .into());
    }
    store.set_standby();
    Ok(store)
}

impl Orchestrator {
    /// A standby's follow of the stream, for as long as it is a standby: errors other than a
    /// [`Mismatch`] are retried after a second; a mismatch is returned.
    pub(super) async fn follow_while_standby(&self) -> anyhow::Error {
        let Some(log) = &self.inner.log else {
            return std::future::pending().await;
        };
        loop {
            match self.follow(log, None).await {
                Err(e) if e.is::<Mismatch>() => return e,
                Err(e) => {
                    tracing::warn!(error = %e, "following the replicated ledger failed; following again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(_) => {}
            }
        }
    }

    /// Before serving with a replicated ledger: catches up with the stream (or, when it is
    /// empty, starts it with a snapshot of this file), then makes the ledger thread its writer
    /// and reloads what the orchestrator keeps in memory from the file.
    pub(super) async fn become_writer(&self, log: &LedgerLog) -> anyhow::Result<Arc<Failed>> {
        let started = std::time::Instant::now();
        let last = log.last().await?;
        let applied = if last == 0 {
            // The stream is new (or was deleted: this file is then its best copy).
            let path = self.inner.settings.data_dir.join("ledger.db");
            let position = log.snapshot(&path, &self.inner.instance, 0).await?;
            self.db(move |store| store.apply_replicated(store.applied()?, position, &[]))
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            tracing::info!(
                position,
                "the replicated ledger starts with a snapshot of this ledger"
            );
            position
        } else {
            let applied = self
                .db(|store| store.applied())
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            if applied > last {
                return Err(Mismatch(format!(
                    "this data dir has applied the replicated ledger up to record {applied}, but its stream ends at {last}: the stream lost records (deleted or recreated); restore it, or start every orchestrator but the most advanced with an empty data dir"
                ))
                .into());
            }
            self.follow(log, Some(last)).await?
        };
        // The journal expects the stream's end, not what this file applied: a batch whose
        // parts stop short at the end (its writer lost the lease mid-append) is then either
        // fenced off by this writer's first append, or — if its writer completed it first —
        // that append is refused and this orchestrator follows again and applies it.
        // (Chaos seed 28: skipping such parts as abandoned, while the old writer completed
        // and committed the batch, made the two files disagree.)
        let expected = last.max(applied);
        let failed = Arc::new(Failed::default());
        let journal = log.journal(&self.inner.instance, expected, failed.clone());
        self.db(move |store| store.set_journal(Some(Box::new(journal))))
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let nodes = self
            .read(|store| store.nodes())
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        {
            let mut registry = super::matching::Registry::new(self.inner.settings.matching);
            for (registration, _) in nodes {
                registry.upsert(registration);
            }
            *self.registry() = registry;
        }
        {
            let mut outbox = self.inner.outbox.lock().await;
            outbox.published = 0;
            outbox.deleted = 0;
        }
        tracing::info!(
            position = applied,
            caught_up_in_ms = started.elapsed().as_millis() as u64,
            "writing the replicated ledger"
        );
        Ok(failed)
    }
}

impl Orchestrator {
    /// A standby whose file the stream was trimmed past (it stopped following for longer than
    /// two snapshots' worth of writes) cannot replay what it missed: its ledger's rows are
    /// replaced by the latest snapshot's, in one transaction on the ledger thread. Returns the
    /// position now applied.
    async fn reset_to_latest_snapshot(
        &self,
        log: &LedgerLog,
        applied: u64,
        first: u64,
    ) -> anyhow::Result<u64> {
        let snapshot = log.latest_snapshot().await?.with_context(|| {
            format!("the ledger stream starts at record {first} but holds no snapshot")
        })?;
        if snapshot.ledger != self.inner.instance {
            return Err(Mismatch(format!(
                "the replicated ledger stream holds ledger {}, this data dir ledger {}: give this orchestrator an empty data dir to join it",
                snapshot.ledger, self.inner.instance
            ))
            .into());
        }
        anyhow::ensure!(
            snapshot.covers + 1 >= first,
            "the ledger stream starts at record {first}, after what its latest snapshot holds (up to {})",
            snapshot.covers
        );
        let incoming = self.inner.settings.data_dir.join("ledger.db.incoming");
        log.restore(&snapshot, &incoming).await?;
        let (path, covers) = (incoming.clone(), snapshot.covers);
        let reset = self
            .db(move |store| store.reset_from_snapshot(&path, covers))
            .await;
        let _ = tokio::fs::remove_file(&incoming).await;
        reset.map_err(|e| {
            anyhow::anyhow!(
                "cannot reset the ledger from the latest snapshot: {}",
                e.message
            )
        })?;
        tracing::warn!(
            applied,
            stream_starts_at = first,
            covers,
            "the replicated ledger was trimmed past this file while it was not following: its rows were replaced by the latest snapshot's"
        );
        Ok(covers)
    }

    /// While active: stores a snapshot whenever `[orchestrator] ledger_snapshot_every` records
    /// were appended since the latest one, and trims the stream ([`Self::snapshot_if_due`]).
    pub(super) async fn snapshot_loop(self) {
        let every = self.inner.settings.ledger_snapshot_every;
        let Some(log) = self.inner.log.clone().filter(|_| every > 0) else {
            return;
        };
        let mut check = tokio::time::interval(SNAPSHOT_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            check.tick().await;
            if let Err(e) = self.snapshot_if_due(&log, every).await {
                tracing::warn!(error = %e, "the ledger snapshot was not stored; trying again later");
            }
        }
    }

    /// When `every` records or more were applied since the latest snapshot covers: copies the
    /// ledger (a read transaction: the writer goes on), stores the copy, has the ledger thread
    /// append its record (so it keeps the stream's order), then drops the records and objects
    /// that only the snapshot before the latest needed — a member behind it restores the
    /// latest. Returns the new snapshot's position and the record it covers.
    pub(super) async fn snapshot_if_due(
        &self,
        log: &LedgerLog,
        every: u64,
    ) -> anyhow::Result<Option<(u64, u64)>> {
        let applied = self
            .read(|store| store.applied())
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let previous = log.latest_snapshot().await?;
        let covered = previous.as_ref().map_or(0, |snapshot| snapshot.covers);
        if applied < covered.saturating_add(every) {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let path = self.inner.settings.data_dir.join("ledger.db");
        let (object, covers) = log.store_copy(&path, &self.inner.instance).await?;
        let position = {
            let object = object.clone();
            // An object whose record is not stored is deleted by the next trim.
            self.db(move |store| store.record_snapshot(&object, covers))
                .await
                .map_err(|e| anyhow::anyhow!("the snapshot record was not stored: {}", e.message))?
        };
        let keep_from = previous.as_ref().map_or(1, |snapshot| snapshot.covers + 1);
        let keep: Vec<&str> = previous
            .iter()
            .map(|snapshot| snapshot.object.as_str())
            .chain([object.as_str()])
            .collect();
        let purged = log.trim(keep_from, &keep).await?;
        tracing::info!(
            position,
            covers,
            purged,
            took_ms = started.elapsed().as_millis() as u64,
            "ledger snapshot stored; the replicated ledger now keeps what the two latest snapshots need"
        );
        Ok(Some((position, covers)))
    }
}
