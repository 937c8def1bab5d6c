//! API keys of the AI gateway (table `api_keys`, key `key_id`): an account's keys with their
//! limits and what they have spent. Only the SHA-256 of a key is stored; the key is shown once.

use super::{Store, StoreError};
use crate::ledger::{self, exec, query_row};
use crate::now_ms;
use rhizos_broker::wire::{CreateKey, KeyView};
use rusqlite::{OptionalExtension, params};

/// Most live (not revoked) keys one account may have.
pub const MAX_KEYS_PER_ACCOUNT: u32 = 100;

const KEY_COLUMNS: &str =
    "key_id, account_id, name, credit_limit_micros, spent_micros, models, routes, rpm, tpm,
    expires_ms, created_ms, last_used_ms, revoked_ms";

impl Store {
    /// Records a key of `request.account` whose id is `key_id` and whose SHA-256 is `key_sha256`
    /// (the caller made the key; it is never stored).
    pub fn create_key(
        &mut self,
        key_id: &str,
        key_sha256: &str,
        request: &CreateKey,
    ) -> Result<KeyView, StoreError> {
        let tx = self.tx()?;
        if ledger::balance(&tx, &request.account)?.is_none() {
            return Err(StoreError::NotFound(format!(
                "no account {} (rhizos user add creates it)",
                request.account
            )));
        }
        let live: u32 = query_row(
            &tx,
            "SELECT COUNT(*) FROM api_keys WHERE account_id = ?1 AND revoked_ms IS NULL",
            params![request.account],
            |r| r.get(0),
        )?;
        if live >= MAX_KEYS_PER_ACCOUNT {
            return Err(StoreError::InvalidState(format!(
                "account {} already has {live} API keys, the most one account may have: revoke some first",
                request.account
            )));
        }
        exec(
            &tx,
            "INSERT INTO api_keys (key_id, key_sha256, account_id, name, credit_limit_micros, spent_micros,
                 models, routes, rpm, tpm, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                key_id,
                key_sha256,
                request.account,
                request.name,
                request.credit_limit_micros,
                serde_json::to_string(&request.models)?,
                serde_json::to_string(&request.routes)?,
                request.rpm,
                request.tpm.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                request.expires_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                now_ms() as i64,
            ],
        )?;
        let view = key_in(&tx, key_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("key {key_id} vanished")))?;
        tx.commit()?;
        Ok(view)
    }

    /// The account's keys, newest first.
    pub fn keys_of(&self, account: &str) -> Result<Vec<KeyView>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = ?1 ORDER BY created_ms DESC, key_id"
        ))?;
        let rows = statement.query_map(params![account], key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn key(&self, key_id: &str) -> Result<Option<KeyView>, StoreError> {
        key_in(&self.conn, key_id)
    }

    /// The key whose SHA-256 is `key_sha256`.
    pub fn key_by_digest(&self, key_sha256: &str) -> Result<Option<KeyView>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_sha256 = ?1"),
                params![key_sha256],
                key_from_row,
            )
            .optional()?)
    }

    /// Records that the key was used at `now_ms`.
    pub fn touch_key(&mut self, key_id: &str, now_ms: u64) -> Result<(), StoreError> {
        let tx = self.tx()?;
        exec(
            &tx,
            "UPDATE api_keys SET last_used_ms = MAX(COALESCE(last_used_ms, 0), ?2) WHERE key_id = ?1",
            params![key_id, now_ms as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Marks the key revoked (once: revoking again keeps the first time).
    pub fn revoke_key(&mut self, key_id: &str) -> Result<KeyView, StoreError> {
        let tx = self.tx()?;
        exec(
            &tx,
            "UPDATE api_keys SET revoked_ms = COALESCE(revoked_ms, ?2) WHERE key_id = ?1",
            params![key_id, now_ms() as i64],
        )?;
        let view = key_in(&tx, key_id)?
            .ok_or_else(|| StoreError::NotFound(format!("no API key {key_id}")))?;
        tx.commit()?;
        Ok(view)
    }
}

fn key_in(conn: &rusqlite::Connection, key_id: &str) -> Result<Option<KeyView>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ?1"),
            params![key_id],
            key_from_row,
        )
        .optional()?)
}

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyView> {
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        Ok(r.get::<_, Option<String>>(i)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default())
    };
    let ms = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok(KeyView {
        key_id: r.get(0)?,
        account: r.get(1)?,
        name: r.get(2)?,
        credit_limit_micros: r.get(3)?,
        spent_micros: r.get(4)?,
        models: list(5)?,
        routes: list(6)?,
        rpm: r.get(7)?,
        tpm: ms(8)?,
        expires_ms: ms(9)?,
        created_ms: ms(10)?.unwrap_or(0),
        last_used_ms: ms(11)?,
        revoked_ms: ms(12)?,
    })
}
