//! The event outbox (table `outbox`, key `id` ascending: subject, payload, created_ms). Events
//! are written inside the transaction of the change they describe and read by the publisher
//! through its own read-only [`OutboxReader`]; published rows are deleted in batches.

use super::{Ctx, Store, StoreError};
use crate::ledger::exec;
use rhizos_broker::wire::{Event, EventBody, JobState, WIRE_VERSION};
use rusqlite::{Connection, params};
use std::path::Path;

/// An outbox row waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub subject: String,
    pub payload: Vec<u8>,
}

impl Store {
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, subject, payload FROM outbox ORDER BY id LIMIT ?1")?;
        let rows = statement.query_map([limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                subject: r.get(1)?,
                payload: r.get(2)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }

    pub fn outbox_done(&mut self, up_to_id: i64) -> Result<(), StoreError> {
        exec(&self.conn, "DELETE FROM outbox WHERE id <= ?1", [up_to_id])?;
        Ok(())
    }
}

impl Ctx {
    pub(super) fn emit(
        &self,
        tx: &Connection,
        subject: String,
        body: EventBody,
        now: u64,
    ) -> Result<(), StoreError> {
        let event = Event {
            v: WIRE_VERSION,
            ts_ms: now,
            body,
        };
        let payload = serde_json::to_vec(&event)?;
        exec(
            tx,
            "INSERT INTO outbox (subject, payload, created_ms) VALUES (?1, ?2, ?3)",
            params![subject, payload, now as i64],
        )?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn emit_job(
        &self,
        tx: &Connection,
        job_id: &str,
        state: JobState,
        attempt: u32,
        node_id: Option<&str>,
        reason: Option<&str>,
        now: u64,
    ) -> Result<(), StoreError> {
        let subject = self.subjects.job_event(state.as_str(), job_id)?;
        self.emit(
            tx,
            subject,
            EventBody::Job {
                job_id: job_id.to_owned(),
                state,
                attempt,
                node_id: node_id.map(str::to_owned),
                reason: reason.map(str::to_owned),
            },
            now,
        )
    }
}

/// A read-only connection for the event publisher: it reads committed outbox rows beside the
/// writer (WAL readers never wait for it), so publishing an event costs the ledger thread
/// nothing but the eventual delete.
pub struct OutboxReader {
    conn: Connection,
}
impl OutboxReader {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Committed rows with an id above `after_id`, oldest first. One writer commits rows in id
    /// order, so nothing below the last row seen can still appear.
    pub fn after(&self, after_id: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, subject, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = statement.query_map(params![after_id, limit as i64], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                subject: r.get(1)?,
                payload: r.get(2)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }
}
