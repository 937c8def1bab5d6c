//! The outbox publisher: events committed with the change they describe are read through the
//! publisher's own read-only connection, sent to JetStream in order with a window in flight, and
//! deleted in batches once acknowledged. A crash between commit and publish delays events, never
//! loses them (JetStream drops repeats by their dedupe id).

use super::Orchestrator;
use super::store;
use futures::StreamExt as _;
use std::time::Duration;

/// The event publisher's view of the outbox (one publisher at a time).
pub(super) struct OutboxState {
    pub(super) reader: store::OutboxReader,
    /// Highest outbox id JetStream has acknowledged (0 after a start: rows still in the table
    /// are published again; JetStream drops the repeats by their message id).
    pub(super) published: i64,
    /// Highest outbox id a delete was sent for, and when.
    pub(super) deleted: i64,
    pub(super) deleted_at: std::time::Instant,
}

/// Published outbox rows are deleted once this many wait, or [`DELETE_AFTER`] after the last
/// delete (the outbox loop ticks every second, so leftovers go within about a second).
const DELETE_BATCH: i64 = 512;
const DELETE_AFTER: Duration = Duration::from_millis(500);

impl Orchestrator {
    pub(in crate::orchestrator) async fn outbox_loop(self) {
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
    pub(in crate::orchestrator) async fn flush_outbox(&self) -> anyhow::Result<()> {
        self.publish_outbox().await?;
        let published = self.inner.outbox.lock().await.published;
        if published > 0 {
            self.db(move |store| store.outbox_done(published)).await?;
        }
        Ok(())
    }
}
