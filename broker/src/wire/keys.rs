//! API keys of the AI gateway: an account's keys, each with its own limits. The key itself is
//! shown once, at creation; the orchestrator keeps only its SHA-256.

use serde::{Deserialize, Serialize};

/// How every key begins: `rhz_<key_id>_<secret>`.
pub const KEY_PREFIX: &str = "rhz_";

/// The key id of `key` (`rhz_<key_id>_<secret>`), when it has the shape of one.
pub fn key_id_of(key: &str) -> Option<&str> {
    let (id, secret) = key.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (id.len() == 12 && secret.len() == 64 && hex(id) && hex(secret)).then_some(id)
}

/// The gateway routes a key may be limited to.
pub const KEY_ROUTES: [&str; 5] = ["chat", "embeddings", "speech", "scrape", "models"];

/// `key.create` request (the account's user, or the operator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub v: u32,
    pub account: String,
    /// A label for the owner's lists (`ci`, `laptop`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Most the key may spend in all, in micro-USD; none: the account's balance is the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_limit_micros: Option<i64>,
    /// Models the key may use; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Routes ([`KEY_ROUTES`]) the key may use; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    /// Requests per minute; none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Tokens per minute; none: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// When the key stops working (Unix ms); none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// A key as its owner and the operator see it: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    /// The key's public id: the part after `rhz_` and before the second `_` of the key.
    pub key_id: String,
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_limit_micros: Option<i64>,
    /// What requests made with the key have cost so far.
    pub spent_micros: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// `key.create` reply: the key, shown this once, and its view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    /// `rhz_<key_id>_<secret>`: give it to the client as its OpenAI API key.
    pub key: String,
    pub view: KeyView,
}

/// `key.list` request: an account's keys (the account's user, or the operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListKeys {
    pub v: u32,
    pub account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

/// `key.authenticate` request (a gateway, or the operator): the key a client presented, by its
/// SHA-256 (lowercase hex) — the orchestrator never needs the key itself. The reply is the key's
/// view when it works: unknown → `not_found`, revoked or expired → `forbidden`, saying which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticateKey {
    pub v: u32,
    pub key_sha256: String,
}

/// `key.revoke` request (the key's account's user, or the operator): the key stops working at
/// once; revoking again changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeKey {
    pub v: u32,
    pub key_id: String,
}
