//! The `substrate` module resolver: reads module manifests from a Substrate chain's storage.
//!
//! For `chain://<id>[@<version>]` it asks the node (JSON-RPC over HTTP) for the finalized head
//! (`chain_getFinalizedHead`), then for the storage value at that block (`state_getStorage`)
//! under the key of a storage map `<pallet>::<item>`:
//!
//! `twox128(pallet) ++ twox128(item) ++ blake2_128_concat(SCALE(id as Vec<u8>))`
//!
//! The value, SCALE-encoded, is `Vec<ModuleVersion>` with
//! `ModuleVersion { version: Vec<u8>, manifest: Vec<u8> }` (UTF-8 version and manifest JSON):
//! the asked version, or the highest (versions compare as dotted numbers). No value: the chain
//! does not know the module (the next resolver is asked). Reading at the finalized head means a
//! manifest never comes from a block that could still be reverted.
//!
//! `list` pages through the map's keys (`state_getKeysPaged` under the map prefix, 256 at a time,
//! at the finalized head) and reads each value.
//!
//! Config: `{"url": "http://127.0.0.1:9933", "pallet": "ModuleRegistry", "item": "Modules",
//! "timeout_ms": 5000}`.
#![allow(unsafe_code)] // `export_root_module` expands to an exported `extern "C"` symbol.

use blake2::Digest as _;
use parity_scale_codec::{Decode, Encode};
use rhizos_plugin_api::sdk::PluginResolver;
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node's JSON-RPC HTTP endpoint.
    pub url: String,
    #[serde(default = "default_pallet")]
    pub pallet: String,
    #[serde(default = "default_item")]
    pub item: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_pallet() -> String {
    "ModuleRegistry".into()
}
fn default_item() -> String {
    "Modules".into()
}
fn default_timeout_ms() -> u64 {
    5_000
}

/// One version of a module as stored on chain.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ModuleVersion {
    pub version: Vec<u8>,
    pub manifest: Vec<u8>,
}

/// `xxhash64` with seeds 0 and 1, little-endian, concatenated: Substrate's `Twox128`.
pub fn twox128(data: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&twox_hash::XxHash64::oneshot(0, data).to_le_bytes());
    out[8..].copy_from_slice(&twox_hash::XxHash64::oneshot(1, data).to_le_bytes());
    out
}

/// Substrate's `Blake2_128Concat`: the 16-byte BLAKE2b hash of `data`, then `data` itself.
pub fn blake2_128_concat(data: &[u8]) -> Vec<u8> {
    let hash = blake2::Blake2b::<blake2::digest::consts::U16>::digest(data);
    let mut out = hash.to_vec();
    out.extend_from_slice(data);
    out
}

/// The storage key of module `id` in map `pallet::item`.
pub fn storage_key(pallet: &str, item: &str, id: &str) -> Vec<u8> {
    let mut key = twox128(pallet.as_bytes()).to_vec();
    key.extend_from_slice(&twox128(item.as_bytes()));
    key.extend(blake2_128_concat(&id.as_bytes().to_vec().encode()));
    key
}

pub fn to_hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 + bytes.len() * 2);
    text.push_str("0x");
    for b in bytes {
        text.push_str(&format!("{b:02x}"));
    }
    text
}

/// `0x`-prefixed (or bare) hex → bytes. Works on bytes, so text with multi-byte characters is
/// an error, not a slice through a character (found by the `scale_decode` fuzz target).
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.strip_prefix("0x").unwrap_or(text).as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd-length hex {text:?}"));
    }
    let value = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    };
    digits
        .chunks_exact(2)
        .map(|pair| match (value(pair[0]), value(pair[1])) {
            (Some(high), Some(low)) => Ok(high << 4 | low),
            _ => Err(format!("not hex: {text:?}")),
        })
        .collect()
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split('.')
        .map(|part| part.trim().parse::<u64>().unwrap_or(0))
        .collect()
}

pub struct SubstrateResolver {
    config: Config,
    agent: ureq::Agent,
}

impl SubstrateResolver {
    pub fn new(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| {
            format!("invalid substrate resolver settings (it needs at least url): {e}")
        })?;
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err(format!(
                "substrate resolver: url {:?} must be the node's http:// or https:// JSON-RPC endpoint",
                config.url
            ));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(config.timeout_ms)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self { config, agent })
    }

    /// One JSON-RPC call; its `result`.
    fn call(&self, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
        let request =
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let mut response = self
            .agent
            .post(&self.config.url)
            .header("Content-Type", "application/json")
            .send(request.to_string().as_bytes())
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => format!(
                    "{method} at {}: no answer within {} ms",
                    self.config.url, self.config.timeout_ms
                ),
                other => format!("{method} at {}: unreachable: {other}", self.config.url),
            })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| format!("{method}: reading the answer failed: {e}"))?;
        if status != 200 {
            return Err(format!("{method} at {}: HTTP {status}", self.config.url));
        }
        let mut answer: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("{method}: malformed JSON-RPC answer: {e}"))?;
        if let Some(error) = answer.get("error") {
            return Err(format!(
                "{method}: the node answered error {}: {}",
                error["code"],
                error["message"].as_str().unwrap_or("(no message)")
            ));
        }
        answer
            .get_mut("result")
            .map(serde_json::Value::take)
            .ok_or_else(|| format!("{method}: JSON-RPC answer without a result"))
    }
}

impl SubstrateResolver {
    fn finalized_head(&self) -> Result<String, String> {
        let head = self.call("chain_getFinalizedHead", serde_json::json!([]))?;
        head.as_str()
            .filter(|h| h.starts_with("0x") && h.len() == 66)
            .map(str::to_owned)
            .ok_or_else(|| format!("chain_getFinalizedHead: not a block hash: {head}"))
    }

    /// The versions stored under `key` at block `head`.
    fn versions_at(
        &self,
        key: &str,
        head: &str,
        what: &str,
    ) -> Result<Option<Vec<ModuleVersion>>, String> {
        let value = self.call("state_getStorage", serde_json::json!([key, head]))?;
        let Some(value) = value.as_str() else {
            return if value.is_null() {
                Ok(None)
            } else {
                Err(format!("state_getStorage: not a hex value: {value}"))
            };
        };
        let bytes = from_hex(value).map_err(|e| format!("state_getStorage: {e}"))?;
        Vec::<ModuleVersion>::decode(&mut bytes.as_slice())
            .map(Some)
            .map_err(|e| {
                format!(
                    "malformed storage value for {what} at {}::{} (block {head}): not a SCALE Vec<ModuleVersion>: {e}",
                    self.config.pallet, self.config.item
                )
            })
    }
}

impl PluginResolver for SubstrateResolver {
    fn list(&self) -> Result<Option<Vec<String>>, String> {
        let head = self.finalized_head()?;
        let mut prefix = twox128(self.config.pallet.as_bytes()).to_vec();
        prefix.extend_from_slice(&twox128(self.config.item.as_bytes()));
        let prefix = to_hex(&prefix);
        let mut manifests = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let page = self.call(
                "state_getKeysPaged",
                serde_json::json!([prefix, 256, start, head]),
            )?;
            let keys: Vec<String> = page
                .as_array()
                .ok_or_else(|| format!("state_getKeysPaged: not a list: {page}"))?
                .iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect();
            for key in &keys {
                for entry in self.versions_at(key, &head, key)?.unwrap_or_default() {
                    manifests.push(
                        String::from_utf8(entry.manifest)
                            .map_err(|_| format!("a manifest under {key} is not UTF-8"))?,
                    );
                }
            }
            if keys.len() < 256 {
                break;
            }
            start = keys.last().cloned();
        }
        Ok(Some(manifests))
    }

    fn resolve(&self, id: &str, version: Option<&str>) -> Result<Option<String>, String> {
        let head = self.finalized_head()?;
        let key = to_hex(&storage_key(&self.config.pallet, &self.config.item, id));
        let Some(versions) = self.versions_at(&key, &head, id)? else {
            return Ok(None);
        };
        let mut found: Option<(String, String)> = None;
        for entry in versions {
            let entry_version = String::from_utf8(entry.version)
                .map_err(|_| format!("module {id}: a version on chain is not UTF-8"))?;
            let wanted = match version {
                Some(v) => v == entry_version,
                None => found
                    .as_ref()
                    .is_none_or(|(best, _)| version_key(&entry_version) > version_key(best)),
            };
            if wanted {
                let manifest = String::from_utf8(entry.manifest).map_err(|_| {
                    format!("module {id}@{entry_version}: the manifest on chain is not UTF-8")
                })?;
                found = Some((entry_version, manifest));
            }
        }
        Ok(found.map(|(_, manifest)| manifest))
    }
}

fn new_resolver(config: &str) -> Result<SubstrateResolver, String> {
    SubstrateResolver::new(config)
}

rhizos_plugin_api::export_resolver_plugin! {
    name: "substrate",
    new: new_resolver,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decodes_and_refuses_what_is_not_hex_without_panicking() {
        assert_eq!(from_hex("0x00ff10"), Ok(vec![0, 255, 16]));
        assert_eq!(from_hex("ABcd"), Ok(vec![0xab, 0xcd]));
        assert_eq!(from_hex("0x"), Ok(vec![]));
        assert!(from_hex("0x0").unwrap_err().contains("odd-length"));
        assert!(from_hex("zz").unwrap_err().contains("not hex"));
        // Found by the scale_decode fuzz target: a 2-byte character at an even offset used
        // to be sliced through (a panic in the resolver).
        assert!(from_hex("(\u{0698}/").unwrap_err().contains("not hex"));
        assert!(from_hex("+1").is_err(), "from_str_radix took a sign");
    }

    #[test]
    fn storage_prefixes_match_the_known_system_account_vector() {
        let mut prefix = twox128(b"System").to_vec();
        prefix.extend_from_slice(&twox128(b"Account"));
        assert_eq!(
            to_hex(&prefix),
            "0x26aa394eea5630e07c48ae0c9558cef7b99d880ec681799c0cf30e8886371da9"
        );
    }

    #[test]
    fn a_module_key_is_prefix_then_blake2_128_concat_of_the_scale_id() {
        let key = storage_key("ModuleRegistry", "Modules", "mod-ffmpeg");
        let scale_id = b"mod-ffmpeg".to_vec().encode();
        assert_eq!(scale_id[0], 10 << 2, "compact length prefix");
        assert_eq!(key.len(), 32 + 16 + scale_id.len());
        assert_eq!(&key[48..], scale_id.as_slice());
        assert_eq!(from_hex(&to_hex(&key)), Ok(key));
    }
}
