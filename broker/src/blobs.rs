//! Result bytes that do not travel in a report: large output files and whole logs, stored by
//! their SHA-256 in the namespace's blob stream (ADR 0008).
//!
//! A blob is a run of chunks of [`CHUNK_BYTES`] (the last one shorter), chunk `i` on
//! `rhizos.blob.v1.<ns>.u.<account>.n.<node>.<sha256>.<i>`, one message per subject. The node
//! that ran the job stores them (nats-server lets a node publish only under its own `n.<node>`
//! token), its signed report names the digests, and the account reads them back chunk by chunk
//! with JetStream's direct get (it may ask only under its own `u.<account>` token). The reader
//! checks every chunk's length and the whole digest, so bytes a node swapped after reporting
//! are refused, never returned.
//!
//! JetStream's Object Store is not used: its subjects (`$O.<bucket>.M.<base64 name>`,
//! `$O.<bucket>.C.<nuid>`) carry no identity token, so any writer could overwrite or corrupt
//! another party's objects and no server permission could stop it.

use crate::bus::{Bus, ConnectError};
use crate::wire::BlobRef;
use async_nats::jetstream::stream;
use bytes::Bytes;
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::time::Duration;

/// Bytes per chunk message (well under NATS's default 1 MiB payload).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Chunk publishes awaiting their acknowledgement at once.
const IN_FLIGHT: usize = 16;

/// How many chunks a blob of `size` bytes has.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_BYTES as u64)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Whether `text` is a SHA-256 as blobs and API keys are named by: 64 lowercase hex digits.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    #[error(
        "the blob stream is not reachable: {0} (is the orchestrator running? it creates the stream)"
    )]
    Unavailable(String),
    #[error(
        "{what}: chunk {index} of {sha256} is not in the blob stream (expired past `[nats] blob_max_age_s` / `blob_max_bytes`, or never stored)"
    )]
    Missing {
        what: String,
        sha256: String,
        index: u64,
    },
    #[error("{what}: the stored bytes do not match the result's digest {sha256}: {problem}")]
    Corrupt {
        what: String,
        sha256: String,
        problem: String,
    },
    #[error("{0}")]
    Address(#[from] crate::subjects::TokenError),
    #[error("cannot write {what}: {source}")]
    Write {
        what: String,
        source: std::io::Error,
    },
}

impl Bus {
    /// Creates the namespace's blob stream if it does not exist (idempotent), with the
    /// retention of `[nats] blob_max_bytes` / `blob_max_age_s` (applied to an existing stream).
    pub async fn ensure_blob_stream(&self) -> Result<stream::Stream, ConnectError> {
        let config = stream::Config {
            name: self.subjects.blob_stream(),
            description: Some(format!("RhizOS result blobs of {}", self.subjects)),
            subjects: vec![self.subjects.blobs_wildcard()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            // A chunk stored again (a retried upload) replaces itself.
            max_messages_per_subject: 1,
            max_message_size: i32::try_from(CHUNK_BYTES + 4096).unwrap_or(i32::MAX),
            max_bytes: i64::try_from(self.blob_limits.max_bytes).unwrap_or(i64::MAX),
            max_age: Duration::from_secs(self.blob_limits.max_age_s),
            num_replicas: self.replicas,
            allow_direct: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.ensure_stream(config).await
    }

    /// Publishes chunk `index` of blob `sha256` of `account` under node `node_id`; returns
    /// the acknowledgement to wait for.
    async fn publish_chunk(
        &self,
        account: &str,
        node_id: &str,
        sha256: &str,
        index: u64,
        chunk: Bytes,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, BlobError> {
        let subject = self.subjects.blob_chunk(account, node_id, sha256, index)?;
        let mut headers = async_nats::HeaderMap::new();
        // Per node: the same bytes filed under another node (a flow's hand-over) are
        // another message, not a repeat of the first.
        headers.insert(
            "Nats-Msg-Id",
            format!("{node_id}.{sha256}.{index}").as_str(),
        );
        self.jetstream
            .publish_with_headers(subject, headers, chunk)
            .await
            .map_err(|e| BlobError::Unavailable(e.to_string()))
    }

    /// Stores `content` as a blob of `account` under this node's id `node_id`; returns its
    /// reference once every chunk is acknowledged by JetStream (durable).
    pub async fn put_blob(
        &self,
        account: &str,
        node_id: &str,
        content: &[u8],
    ) -> Result<BlobRef, BlobError> {
        let sha256 = sha256_hex(content);
        let mut acks = Acks::default();
        for (index, chunk) in content.chunks(CHUNK_BYTES).enumerate() {
            let ack = self
                .publish_chunk(
                    account,
                    node_id,
                    &sha256,
                    index as u64,
                    Bytes::copy_from_slice(chunk),
                )
                .await?;
            acks.push(ack).await?;
        }
        acks.finish().await?;
        Ok(BlobRef {
            sha256,
            size: content.len() as u64,
        })
    }

    /// Chunk `index` of the blob `blob` that `node_id` stored for `account`, its length
    /// checked (`what` names it in errors).
    async fn fetch_chunk(
        &self,
        account: &str,
        node_id: &str,
        what: &str,
        blob: &BlobRef,
        index: u64,
    ) -> Result<Bytes, BlobError> {
        let stream = self.subjects.blob_stream();
        let subject = self
            .subjects
            .blob_chunk(account, node_id, &blob.sha256, index)?;
        let message = self
            .client
            .request(
                format!("$JS.API.DIRECT.GET.{stream}.{subject}"),
                Bytes::new(),
            )
            .await
            .map_err(|e| BlobError::Unavailable(e.to_string()))?;
        if let Some(status) = message.status {
            if status == async_nats::StatusCode::NOT_FOUND {
                return Err(BlobError::Missing {
                    what: what.to_owned(),
                    sha256: blob.sha256.clone(),
                    index,
                });
            }
            return Err(BlobError::Unavailable(format!(
                "direct get answered {status}: {}",
                message.description.as_deref().unwrap_or_default()
            )));
        }
        let chunks = chunk_count(blob.size);
        let expected = if index + 1 == chunks {
            blob.size - index * CHUNK_BYTES as u64
        } else {
            CHUNK_BYTES as u64
        };
        if message.payload.len() as u64 != expected {
            return Err(corrupt(
                what,
                blob,
                format!(
                    "chunk {index} has {} bytes, {expected} expected",
                    message.payload.len()
                ),
            ));
        }
        Ok(message.payload)
    }

    /// Reads the blob `blob` that `node_id` stored for `account` into `out`, checking every
    /// chunk's length and the whole digest (`what` names it in errors). Only `account` (or
    /// the operator) may read it.
    pub async fn get_blob(
        &self,
        account: &str,
        node_id: &str,
        what: &str,
        blob: &BlobRef,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), BlobError> {
        let mut hasher = Sha256::new();
        for index in 0..chunk_count(blob.size) {
            let payload = self
                .fetch_chunk(account, node_id, what, blob, index)
                .await?;
            hasher.update(&payload);
            out.write_all(&payload).map_err(|source| BlobError::Write {
                what: what.to_owned(),
                source,
            })?;
        }
        let digest = format!("{:x}", hasher.finalize());
        if digest != blob.sha256 {
            return Err(corrupt(what, blob, format!("the bytes hash to {digest}")));
        }
        Ok(())
    }
}

/// Chunk publishes awaiting their acknowledgements, at most [`IN_FLIGHT`] at once.
#[derive(Default)]
struct Acks(VecDeque<async_nats::jetstream::context::PublishAckFuture>);

impl Acks {
    /// Adds `ack`, first waiting for the oldest when [`IN_FLIGHT`] are pending.
    async fn push(
        &mut self,
        ack: async_nats::jetstream::context::PublishAckFuture,
    ) -> Result<(), BlobError> {
        self.0.push_back(ack);
        if self.0.len() >= IN_FLIGHT
            && let Some(ack) = self.0.pop_front()
        {
            ack.await
                .map_err(|e| BlobError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    /// Waits for every pending acknowledgement.
    async fn finish(self) -> Result<(), BlobError> {
        for ack in self.0 {
            ack.await
                .map_err(|e| BlobError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }
}

fn corrupt(what: &str, blob: &BlobRef, problem: String) -> BlobError {
    BlobError::Corrupt {
        what: what.to_owned(),
        sha256: blob.sha256.clone(),
        problem,
    }
}

/// Most bytes of one input blob a job takes: its node reads it into memory to hand it to the
/// backend. (The orchestrator's hand-over between nodes streams it chunk by chunk.)
pub const MAX_COPY_BYTES: u64 = 512 << 20;

impl Bus {
    /// Files `blob`, stored by `from_node` for `account`, under `to_node` too (the
    /// orchestrator, before a node that did not store it runs a job that reads it: a node
    /// reads blobs only under its own node token), chunk by chunk — at most [`IN_FLIGHT`]
    /// chunks held at once, whatever the blob's size. Every chunk's length and the whole
    /// digest are checked on the way; copied chunks whose whole does not match the digest are
    /// purged again, so nothing is filed under a digest it does not have.
    pub async fn copy_blob(
        &self,
        account: &str,
        from_node: &str,
        to_node: &str,
        what: &str,
        blob: &BlobRef,
    ) -> Result<(), BlobError> {
        if blob.size > MAX_COPY_BYTES {
            return Err(BlobError::Unavailable(format!(
                "{what} is {} bytes: more than the {MAX_COPY_BYTES} bytes a job takes as an input",
                blob.size
            )));
        }
        let mut hasher = Sha256::new();
        let mut acks = Acks::default();
        for index in 0..chunk_count(blob.size) {
            let payload = self
                .fetch_chunk(account, from_node, what, blob, index)
                .await?;
            hasher.update(&payload);
            let ack = self
                .publish_chunk(account, to_node, &blob.sha256, index, payload)
                .await?;
            acks.push(ack).await?;
        }
        acks.finish().await?;
        let digest = format!("{:x}", hasher.finalize());
        if digest != blob.sha256 {
            let prefix = self.subjects.blob_chunks(account, to_node, &blob.sha256)?;
            let purged = async {
                self.jetstream
                    .get_stream(self.subjects.blob_stream())
                    .await
                    .map_err(|e| e.to_string())?
                    .purge()
                    .filter(format!("{prefix}.*"))
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = purged {
                tracing::warn!(error = %e, "a mismatching copy could not be purged; its reader refuses it by digest");
            }
            return Err(corrupt(what, blob, format!("the bytes hash to {digest}")));
        }
        Ok(())
    }
}

/// Whether every chunk of `blob` (stored by `node_id` for `account`) is in the blob stream:
/// one stream-info request listing the blob's chunk subjects. What a report names but the node
/// never stored is not recorded as the job's output.
pub async fn is_stored(
    stream: &stream::Stream,
    subjects: &crate::Subjects,
    account: &str,
    node_id: &str,
    blob: &BlobRef,
) -> Result<bool, BlobError> {
    let chunks = chunk_count(blob.size);
    let prefix = subjects.blob_chunks(account, node_id, &blob.sha256)?;
    let mut info = stream
        .info_with_subjects(format!("{prefix}.*"))
        .await
        .map_err(|e| BlobError::Unavailable(e.to_string()))?;
    let mut seen = vec![false; usize::try_from(chunks).unwrap_or(0)];
    while let Some((subject, _)) = info
        .try_next()
        .await
        .map_err(|e| BlobError::Unavailable(e.to_string()))?
    {
        if let Some(index) = subject
            .rsplit('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            && let Some(slot) = seen.get_mut(index)
        {
            *slot = true;
        }
    }
    Ok(chunks > 0 && seen.iter().all(|s| *s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_counts_round_up_and_digests_are_lowercase_hex() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_BYTES as u64), 1);
        assert_eq!(chunk_count(CHUNK_BYTES as u64 + 1), 2);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&sha256_hex(b"abc")));
        assert!(!is_sha256_hex(&sha256_hex(b"abc").to_uppercase()));
        assert!(!is_sha256_hex("abc"));
    }
}
