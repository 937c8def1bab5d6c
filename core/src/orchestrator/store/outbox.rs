//! The event outbox (table `outbox`, key `id` ascending: `event`, a [`DomainEvent`] as JSON, and
//! `created_ms`; rows from before migration 0002 have `subject` and `payload` instead). Events
//! are written inside the transaction of the change they describe and read by the publisher
//! through its own read-only [`OutboxReader`]; published rows are deleted in batches.

use super::events::{DomainEvent, Recorded};
use super::{Ctx, Store, StoreError};
use crate::ledger::exec;
use rhizos_broker::wire::JobState;
use rusqlite::{Connection, params};
use std::path::Path;

/// What an outbox row holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxEvent {
    /// A domain event, turned into a wire event by the publisher.
    Domain(Recorded),
    /// A row written before schema migration 0002, already encoded for the wire: published
    /// as it is.
    Encoded { subject: String, payload: Vec<u8> },
}

/// An outbox row waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event: OutboxEvent,
}

const OUTBOX_COLUMNS: &str = "id, event, subject, payload";

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    let id = r.get(0)?;
    let event = match r.get::<_, Option<String>>(1)? {
        Some(json) => OutboxEvent::Domain(serde_json::from_str(&json).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
        })?),
        None => OutboxEvent::Encoded {
            subject: r.get(2)?,
            payload: r.get(3)?,
        },
    };
    Ok(OutboxRow { id, event })
}

impl Store {
    /// The oldest rows, up to `limit`.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox ORDER BY id LIMIT ?1"
        ))?;
        let rows = statement.query_map([limit as i64], outbox_row)?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }

    /// Deletes the rows up to `up_to_id` (published).
    pub fn outbox_done(&mut self, up_to_id: i64) -> Result<(), StoreError> {
        exec(&self.conn, "DELETE FROM outbox WHERE id <= ?1", [up_to_id])?;
        Ok(())
    }
}

impl Ctx {
    /// Records `event` in the outbox, inside the caller's transaction.
    pub(super) fn emit(
        &self,
        tx: &Connection,
        event: DomainEvent,
        now: u64,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(&Recorded { ts_ms: now, event })?;
        exec(
            tx,
            "INSERT INTO outbox (subject, payload, created_ms, event) VALUES ('', x'', ?1, ?2)",
            params![now as i64, json],
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
        // The paying account names the event's subject (only it may subscribe there).
        let account: String = crate::ledger::query_row(
            tx,
            "SELECT account_id FROM jobs WHERE id = ?1",
            [job_id],
            |r| r.get(0),
        )?;
        self.emit(
            tx,
            DomainEvent::Job {
                job_id: job_id.to_owned(),
                account,
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
        super::stable_plans(&conn)?;
        Ok(Self { conn })
    }

    /// Committed rows with an id above `after_id`, oldest first. One writer commits rows in id
    /// order, so nothing below the last row seen can still appear.
    pub fn after(&self, after_id: i64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))?;
        let rows = statement.query_map(params![after_id, limit as i64], outbox_row)?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(StoreError::from)
    }
}
