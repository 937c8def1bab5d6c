//! `key.*` requests: the AI gateway's API keys of an account — create (the key is made here,
//! shown once, and only its SHA-256 kept), list, revoke.

use super::super::Orchestrator;
use super::super::store::StoreError;
use super::super::validate::{limits, party_account, token};
use super::{acts_for, own_account};
use rhizos_broker::wire::{
    self, AuthenticateKey, CreateKey, CreatedKey, ErrorCode, KEY_ROUTES, KeyList, KeyView,
    ListKeys, RevokeKey, WireError,
};
use rhizos_broker::{Caller, validate_token};

/// Most models one key may be limited to, and the longest model name.
const MAX_KEY_MODELS: usize = 64;
const MAX_MODEL_NAME: usize = 128;
const MAX_KEY_NAME: usize = 64;
/// A key's last use is recorded at most this often (not one write per request).
const LAST_USED_EVERY_MS: u64 = 60_000;

impl Orchestrator {
    pub(in crate::orchestrator) async fn key_create(
        &self,
        caller: Caller,
        request: CreateKey,
    ) -> Result<CreatedKey, WireError> {
        party_account("account", &request.account)?;
        own_account(&caller, &request.account)?;
        validate_key_request(&request, crate::now_ms())?;
        let key_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let key = format!("{}{key_id}_{secret}", wire::KEY_PREFIX);
        let digest = rhizos_broker::blobs::sha256_hex(key.as_bytes());
        let id = key_id.clone();
        let view = self
            .db(move |store| store.create_key(&id, &digest, &request))
            .await?;
        tracing::info!(%caller, key_id = %view.key_id, account = %view.account, "API key created");
        Ok(CreatedKey { key, view })
    }

    pub(in crate::orchestrator) async fn key_list(
        &self,
        caller: Caller,
        request: ListKeys,
    ) -> Result<KeyList, WireError> {
        party_account("account", &request.account)?;
        own_account(&caller, &request.account)?;
        let keys = self
            .read(move |store| store.keys_of(&request.account))
            .await?;
        Ok(KeyList { keys })
    }

    pub(in crate::orchestrator) async fn key_authenticate(
        &self,
        caller: Caller,
        request: AuthenticateKey,
    ) -> Result<KeyView, WireError> {
        let digest = request.key_sha256;
        if !rhizos_broker::blobs::is_sha256_hex(&digest) {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "key_sha256: the SHA-256 of the key, 64 lowercase hex digits",
            ));
        }
        let key = self
            .read(move |store| store.key_by_digest(&digest))
            .await?
            .ok_or_else(|| WireError::new(ErrorCode::NotFound, "invalid API key"))?;
        let now = crate::now_ms();
        if let Some(when) = key.revoked_ms {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                format!("API key {} was revoked (at {when} ms)", key.key_id),
            ));
        }
        if let Some(when) = key.expires_ms
            && when <= now
        {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                format!("API key {} expired (at {when} ms)", key.key_id),
            ));
        }
        if key
            .last_used_ms
            .is_none_or(|last| now.saturating_sub(last) >= LAST_USED_EVERY_MS)
        {
            let id = key.key_id.clone();
            if let Err(e) = self.db(move |store| store.touch_key(&id, now)).await {
                tracing::warn!(%caller, key_id = %key.key_id, error = %e, "cannot record the key's last use");
            }
        }
        Ok(key)
    }

    pub(in crate::orchestrator) async fn key_revoke(
        &self,
        caller: Caller,
        request: RevokeKey,
    ) -> Result<KeyView, WireError> {
        token(validate_token("key id", &request.key_id))?;
        let c = caller.clone();
        let view = self
            .db(move |store| {
                // Another account's key is "not found": its existence is not disclosed.
                let not_found = || StoreError::NotFound(format!("no API key {}", request.key_id));
                let key = store.key(&request.key_id)?.ok_or_else(not_found)?;
                if !acts_for(&c, &key.account) {
                    return Err(not_found());
                }
                store.revoke_key(&request.key_id)
            })
            .await?;
        tracing::info!(%caller, key_id = %view.key_id, account = %view.account, "API key revoked");
        Ok(view)
    }
}

/// The limits of a new key, field by field.
fn validate_key_request(request: &CreateKey, now_ms: u64) -> Result<(), WireError> {
    let bad = |message: String| Err(WireError::new(ErrorCode::BadRequest, message));
    if let Some(name) = &request.name
        && (name.is_empty() || name.len() > MAX_KEY_NAME || name.chars().any(char::is_control))
    {
        return bad(format!(
            "name: 1 to {MAX_KEY_NAME} bytes of printable text, got {name:?}"
        ));
    }
    if let Some(limit) = request.credit_limit_micros
        && !(0..=limits::MAX_COST_MICROS).contains(&limit)
    {
        return bad(format!(
            "credit_limit_micros: 0 to {}, got {limit}",
            limits::MAX_COST_MICROS
        ));
    }
    if request.models.len() > MAX_KEY_MODELS {
        return bad(format!(
            "models: at most {MAX_KEY_MODELS}, got {}",
            request.models.len()
        ));
    }
    if let Some(model) = request.models.iter().find(|m| {
        m.is_empty() || m.len() > MAX_MODEL_NAME || m.chars().any(|c| c.is_control() || c == ',')
    }) {
        return bad(format!(
            "models: {model:?} is not a model name (1 to {MAX_MODEL_NAME} bytes, no commas)"
        ));
    }
    if let Some(route) = request
        .routes
        .iter()
        .find(|r| !KEY_ROUTES.contains(&r.as_str()))
    {
        return bad(format!(
            "routes: {route:?} is not a route (one of {})",
            KEY_ROUTES.join(", ")
        ));
    }
    if request.rpm == Some(0) || request.tpm == Some(0) {
        return bad("rpm and tpm: at least 1 (leave them out for no limit)".into());
    }
    if let Some(expires) = request.expires_ms
        && expires <= now_ms
    {
        return bad(format!(
            "expires_ms: {expires} is not in the future (now {now_ms})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_keys_limits_are_checked_field_by_field() {
        let ok = CreateKey {
            account: "alice".into(),
            name: Some("ci".into()),
            credit_limit_micros: Some(10_000),
            models: vec!["smollm2".into()],
            routes: vec!["chat".into(), "models".into()],
            rpm: Some(60),
            tpm: Some(10_000),
            expires_ms: Some(2_000),
            ..CreateKey::default()
        };
        assert!(validate_key_request(&ok, 1_000).is_ok());
        let cases: [(CreateKey, &str); 7] = [
            (
                CreateKey {
                    name: Some(String::new()),
                    ..ok.clone()
                },
                "name",
            ),
            (
                CreateKey {
                    credit_limit_micros: Some(-1),
                    ..ok.clone()
                },
                "credit_limit_micros",
            ),
            (
                CreateKey {
                    models: vec!["a,b".into()],
                    ..ok.clone()
                },
                "models",
            ),
            (
                CreateKey {
                    models: vec!["m".into(); 65],
                    ..ok.clone()
                },
                "at most 64",
            ),
            (
                CreateKey {
                    routes: vec!["admin".into()],
                    ..ok.clone()
                },
                "routes",
            ),
            (
                CreateKey {
                    rpm: Some(0),
                    ..ok.clone()
                },
                "rpm",
            ),
            (
                CreateKey {
                    expires_ms: Some(1_000),
                    ..ok.clone()
                },
                "expires_ms",
            ),
        ];
        for (request, field) in cases {
            let error = validate_key_request(&request, 1_000).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(error.message.contains(field), "{field}: {}", error.message);
        }
    }
}
