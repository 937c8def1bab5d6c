//! The outbox publisher: events committed with the change they describe are read through the
//! publisher's own read-only connection, sent to JetStream in order with a window in flight, and
//! deleted in batches once acknowledged. A crash between commit and publish delays events, never
//! loses them (JetStream drops repeats by their dedupe id).

use super::Orchestrator;
use super::store::{self, DomainEvent, Movement, OutboxEvent, Recorded};
use futures::StreamExt as _;
use rhizos_broker::subjects::EscrowEventKind;
use rhizos_broker::wire::{self, EscrowKind, Event, EventBody, WIRE_VERSION};
use rhizos_broker::{Subjects, TokenError};
use std::time::Duration;

/// An outbox row as it goes on the wire: its subject and the encoded [`Event`]. The one place a
/// domain event becomes a wire event.
pub fn encode(
    subjects: &Subjects,
    event: OutboxEvent,
) -> Result<(String, bytes::Bytes), TokenError> {
    let Recorded { ts_ms, event } = match event {
        OutboxEvent::Domain(recorded) => recorded,
        OutboxEvent::Encoded { subject, payload } => return Ok((subject, payload.into())),
    };
    let (subject, body) = match event {
        DomainEvent::Job {
            job_id,
            account,
            state,
            attempt,
            node_id,
            reason,
        } => (
            subjects.job_event(&account, state.as_str(), &job_id)?,
            EventBody::Job {
                job_id,
                state,
                attempt,
                node_id,
                reason,
            },
        ),
        DomainEvent::Escrow {
            job_id,
            movement,
            account,
            amount_micros,
            provider_account,
            provider_micros,
            fee_micros,
            refund_micros,
        } => {
            let (subject_kind, kind) = match movement {
                Movement::Held => (EscrowEventKind::Held, EscrowKind::Held),
                Movement::Settled => (EscrowEventKind::Settled, EscrowKind::Settled),
                Movement::Refunded => (EscrowEventKind::Refunded, EscrowKind::Refunded),
            };
            (
                subjects.escrow_event(&account, subject_kind, &job_id)?,
                EventBody::Escrow {
                    job_id,
                    kind,
                    account,
                    amount_micros,
                    provider_account,
                    provider_micros,
                    fee_micros,
                    refund_micros,
                },
            )
        }
        DomainEvent::Flow {
            flow_id,
            account,
            step,
            state,
            job_id,
            reason,
        } => (
            subjects.flow_event(&account, &state, &flow_id)?,
            EventBody::Flow {
                flow_id,
                step,
                state,
                job_id,
                reason,
            },
        ),
    };
    let event = Event {
        v: WIRE_VERSION,
        ts_ms,
        body,
    };
    Ok((subject, wire::encode(&event)))
}

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
                        let id = row.id;
                        sent = id;
                        let (subject, payload) = match encode(&self.inner.bus.subjects, row.event) {
                            Ok(encoded) => encoded,
                            Err(e) => {
                                // Ids are validated before anything is stored, so this is a
                                // damaged row: it can never be published, and must not stop
                                // the ones after it.
                                tracing::error!(outbox_id = id, error = %e, "outbox row cannot be published; skipped");
                                continue;
                            }
                        };
                        let message_id = format!("{}-{}", self.inner.instance, id);
                        let publish = async_nats::jetstream::message::PublishMessage::build()
                            .payload(payload)
                            .message_id(message_id);
                        let ack = self
                            .inner
                            .bus
                            .jetstream
                            .send_publish(subject, publish)
                            .await?;
                        in_flight.push_back(async move { (id, ack.await) });
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

#[cfg(test)]
mod tests {
    use super::*;
    use rhizos_broker::wire::JobState;

    fn wire(event: DomainEvent) -> (String, String) {
        let subjects = Subjects::new("t").unwrap();
        let (subject, payload) =
            encode(&subjects, OutboxEvent::Domain(Recorded { ts_ms: 7, event })).unwrap();
        (subject, String::from_utf8(payload.to_vec()).unwrap())
    }

    /// The wire format of events is public (the README's subject table): a domain event becomes
    /// exactly the event the store used to write itself.
    #[test]
    fn domain_events_become_the_public_wire_events() {
        assert_eq!(
            wire(DomainEvent::Job {
                job_id: "j1".into(),
                account: "alice".into(),
                state: JobState::Running,
                attempt: 2,
                node_id: Some("n1".into()),
                reason: None,
            }),
            (
                "rhizos.evt.v1.t.u.alice.job.running.j1".to_owned(),
                r#"{"v":1,"ts_ms":7,"type":"job","job_id":"j1","state":"running","attempt":2,"node_id":"n1","reason":null}"#.to_owned()
            )
        );
        assert_eq!(
            wire(DomainEvent::Escrow {
                job_id: "j1".into(),
                movement: Movement::Settled,
                account: "u".into(),
                amount_micros: 12_340,
                provider_account: Some("prov".into()),
                provider_micros: Some(11_723),
                fee_micros: Some(617),
                refund_micros: Some(187_660),
            }),
            (
                "rhizos.evt.v1.t.u.u.escrow.settled.j1".to_owned(),
                r#"{"v":1,"ts_ms":7,"type":"escrow","job_id":"j1","kind":"settled","account":"u","amount_micros":12340,"provider_account":"prov","provider_micros":11723,"fee_micros":617,"refund_micros":187660}"#.to_owned()
            )
        );
        // A row written before domain events is published as it was stored.
        let legacy = OutboxEvent::Encoded {
            subject: "rhizos.evt.v1.t.job.pending.j0".into(),
            payload: b"{\"v\":1}".to_vec(),
        };
        let (subject, payload) = encode(&Subjects::new("t").unwrap(), legacy).unwrap();
        assert_eq!(
            (subject.as_str(), &payload[..]),
            ("rhizos.evt.v1.t.job.pending.j0", &b"{\"v\":1}"[..])
        );
    }
}
