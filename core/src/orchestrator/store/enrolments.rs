//! Enrolments (table `enrolments`, key `node_id`): the operator fixes a node's id and the
//! provider account it is paid into; its registrations cannot change either, and a removed node's
//! registrations are refused.

use super::{Store, StoreError};
use crate::ledger::{self, AccountKind, exec, query_row};
use crate::now_ms;
use rhizos_broker::wire::Enrolment;
use rusqlite::{OptionalExtension, params};

impl Store {
    /// Enrols `node_id` (creating its provider account). Enrolling again with the same provider
    /// account re-admits a removed node and updates its key; another account is refused.
    pub fn enroll(
        &mut self,
        node_id: &str,
        provider_account: &str,
        public_key: Option<&str>,
    ) -> Result<Enrolment, StoreError> {
        let now = now_ms();
        let tx = self.tx()?;
        if let Some(known) = enrolment_in(&tx, node_id)?
            && known.provider_account != provider_account
        {
            return Err(StoreError::AlreadyExists(format!(
                "node {node_id} is enrolled with provider account {}: remove it and enrol it under a new node id to pay another account",
                known.provider_account
            )));
        }
        let enrolled: u32 = query_row(
            &tx,
            "SELECT COUNT(*) FROM enrolments WHERE provider_account = ?1 AND removed_ms IS NULL AND node_id != ?2",
            params![provider_account, node_id],
            |r| r.get(0),
        )?;
        let most = crate::orchestrator::validate::limits::MAX_NODES_PER_PROVIDER;
        if enrolled >= most {
            return Err(StoreError::InvalidState(format!(
                "provider account {provider_account} already has {enrolled} enrolled nodes, the most one provider may have ({most}): remove some first"
            )));
        }
        ledger::ensure_account(&tx, provider_account, AccountKind::Provider, now)?;
        exec(
            &tx,
            "INSERT INTO enrolments (node_id, provider_account, public_key, enrolled_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(node_id) DO UPDATE SET public_key = COALESCE(excluded.public_key, public_key),
                 removed_ms = NULL",
            params![node_id, provider_account, public_key, now as i64],
        )?;
        let enrolment = enrolment_in(&tx, node_id)?
            .ok_or_else(|| StoreError::NotFound(format!("node {node_id}'s enrolment vanished")))?;
        tx.commit()?;
        Ok(enrolment)
    }

    /// Marks the node removed (its registrations are refused from then on).
    pub fn remove_enrolment(&mut self, node_id: &str) -> Result<Enrolment, StoreError> {
        let tx = self.tx()?;
        exec(
            &tx,
            "UPDATE enrolments SET removed_ms = COALESCE(removed_ms, ?2) WHERE node_id = ?1",
            params![node_id, now_ms() as i64],
        )?;
        let enrolment = enrolment_in(&tx, node_id)?
            .ok_or_else(|| StoreError::NotFound(format!("node {node_id} is not enrolled")))?;
        tx.commit()?;
        Ok(enrolment)
    }

    pub fn enrolment(&self, node_id: &str) -> Result<Option<Enrolment>, StoreError> {
        enrolment_in(&self.conn, node_id)
    }
}

fn enrolment_in(
    conn: &rusqlite::Connection,
    node_id: &str,
) -> Result<Option<Enrolment>, StoreError> {
    query_row(
        conn,
        "SELECT provider_account, public_key, enrolled_ms, removed_ms FROM enrolments WHERE node_id = ?1",
        [node_id],
        |r| {
            Ok(Enrolment {
                node_id: node_id.to_owned(),
                provider_account: r.get(0)?,
                public_key: r.get(1)?,
                enrolled_ms: r.get::<_, i64>(2)? as u64,
                removed_ms: r.get::<_, Option<i64>>(3)?.map(|ms| ms as u64),
            })
        },
    )
    .optional()
    .map_err(StoreError::from)
}
