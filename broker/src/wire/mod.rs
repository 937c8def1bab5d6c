//! Versioned wire messages (JSON) and the single reply envelope.
//!
//! Every message carries `v`, the schema version ([`WIRE_VERSION`]). A receiver first checks the
//! size and the version ([`decode`]) and only then the shape, so each kind of bad input gets its
//! own stable [`ErrorCode`]. Money is always integer micro-USD (`*_micros`, `i64`).
//!
//! This module holds the envelope (version, error codes, [`Reply`], [`encode`] / [`decode`],
//! base64); the messages live in one submodule per concern and are re-exported here, so every
//! message is `rhizos_broker::wire::<Name>`:
//! * [`jobs`]: workloads, job specs, submit / get / list / cancel, job views;
//! * [`modules`]: `chain://` references, manifests, resolve / list;
//! * [`accounts`]: accounts, deposits, statements, the ledger report;
//! * [`nodes`]: registrations, node views, prices, hardware;
//! * [`agent`]: orchestrator ↔ agent: assign, stop, report, heartbeat, log lines, plugins;
//! * [`events`]: what the event stream carries;
//! * [`flows`]: flows — graphs of jobs with one budget — and their check;
//! * [`validation`]: the form of fields handed to nodes and engines as given.
//!
//! Which request goes to which subject and gets which reply is in [`crate::ops`].

pub mod accounts;
pub mod agent;
pub mod ai;
pub mod events;
pub mod flows;
pub mod jobs;
pub mod keys;
pub mod modules;
pub mod nodes;
pub mod receipts;
pub mod validation;

pub use accounts::*;
pub use agent::*;
pub use ai::*;
pub use events::*;
pub use flows::*;
pub use jobs::*;
pub use keys::*;
pub use modules::*;
pub use nodes::*;
pub use receipts::*;
pub use validation::*;

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Schema version of every message in this module.
pub const WIRE_VERSION: u32 = 1;

/// Micro-USD per USD.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// Stable error codes carried by failed replies. Tooling may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The payload is not valid JSON or does not have the expected shape or values.
    BadRequest,
    /// The message's `v` is not a version this receiver speaks.
    UnsupportedVersion,
    /// The payload is larger than the receiver accepts.
    TooLarge,
    NotFound,
    AlreadyExists,
    /// The account balance cannot cover the hold.
    InsufficientFunds,
    /// No registered node can run the job.
    NoCapacity,
    /// The operation does not apply to the object in its current state.
    InvalidState,
    /// Nothing handles this subject.
    UnsupportedSubject,
    /// The caller's role may not do this, or the object is another party's.
    Forbidden,
    /// The receiver failed; the request may be retried.
    Internal,
    /// The receiver has as many requests in flight as it takes: retry after a moment.
    TooBusy,
    /// The orchestrator cannot write the ledger now — it is handing over to another (a
    /// failover) or catching up with the replicated ledger — and did nothing: send the same
    /// request again (with its id or idempotency key) in a moment.
    Unavailable,
    /// A code from a newer peer.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::InsufficientFunds => "insufficient_funds",
            Self::NoCapacity => "no_capacity",
            Self::InvalidState => "invalid_state",
            Self::UnsupportedSubject => "unsupported_subject",
            Self::Forbidden => "forbidden",
            Self::Internal => "internal",
            Self::TooBusy => "too_busy",
            Self::Unavailable => "unavailable",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the same request may succeed when sent again (idempotent requests are retried
    /// on these; every other code is final).
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Internal | Self::TooBusy | Self::Unavailable)
    }
}

/// The error half of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({})", code.as_str())]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The one reply envelope used by every request/reply subject.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply<T> {
    pub v: u32,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl<T> Reply<T> {
    pub fn ok(data: T) -> Self {
        Self {
            v: WIRE_VERSION,
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(error: WireError) -> Self {
        Self {
            v: WIRE_VERSION,
            ok: false,
            data: None,
            error: Some(error),
        }
    }
    pub fn into_result(self) -> Result<T, WireError> {
        match (self.ok, self.data, self.error) {
            (true, Some(data), _) => Ok(data),
            (_, _, Some(error)) => Err(error),
            _ => Err(WireError::new(
                ErrorCode::BadRequest,
                "reply has neither data nor error",
            )),
        }
    }
}

/// Encodes any wire message. Serialising these plain structs cannot fail.
pub fn encode<T: Serialize>(message: &T) -> bytes::Bytes {
    // serde_json only fails on maps with non-string keys or failing Serialize impls; none here.
    bytes::Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// Checks size, then version, then shape of an incoming message.
pub fn decode<T: DeserializeOwned>(payload: &[u8], max_bytes: usize) -> Result<T, WireError> {
    if payload.len() > max_bytes {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "message is {} bytes, the limit is {max_bytes} bytes",
                payload.len()
            ),
        ));
    }
    #[derive(Deserialize)]
    struct VersionProbe {
        v: Option<serde_json::Value>,
    }
    let probe: VersionProbe = serde_json::from_slice(payload).map_err(|e| {
        WireError::new(
            ErrorCode::BadRequest,
            format!("message is not a JSON object: {e}"),
        )
    })?;
    match probe.v {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(WIRE_VERSION)) => {}
        Some(other) => {
            return Err(WireError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "message schema version {other} is not supported; this receiver speaks v{WIRE_VERSION}"
                ),
            ));
        }
        None => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("message has no schema version field \"v\" (expected {WIRE_VERSION})"),
            ));
        }
    }
    serde_json::from_slice(payload)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("invalid message: {e}")))
}

/// Base64 (standard alphabet) for binary fields.
pub fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn b64_decode(field: &str, text: &str) -> Result<Vec<u8>, WireError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            WireError::new(
                ErrorCode::BadRequest,
                format!("{field} is not valid base64: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_paths_stay_inside_their_directory() {
        for good in ["a", "a/b.txt", "data/in.txt", "x..y"] {
            assert!(super::valid_file_path(good), "{good}");
        }
        for bad in [
            "", "/a", "a/", "../a", "a/../b", "./a", "a//b", "a\\b", "a\0b",
        ] {
            assert!(!super::valid_file_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn module_names() {
        use super::ModuleRef;
        let latest = ModuleRef::parse("chain://mod-ffmpeg").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((latest.id.as_str(), latest.version), ("mod-ffmpeg", None));
        let pinned = ModuleRef::parse("chain://mod-hello@1.2.0").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pinned.version.as_deref(), Some("1.2.0"));
        assert_eq!(pinned.to_string(), "chain://mod-hello@1.2.0");
        for bad in [
            "mod-hello",
            "http://mod",
            "chain://",
            "chain://a@",
            "chain://a b",
            "chain://a/../b",
        ] {
            assert!(ModuleRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "rhizos-test/probe:3f2a",
            "registry.example.com:5000/team/app:v1.2_RC",
            "localhost/x",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(super::valid_image_ref(good), "{good}");
        }
        for bad in [
            "",
            "-v",
            "Busybox",
            "app:",
            "app:bad tag",
            "/abs",
            "a//b",
            "app@sha256:short",
            "app@:0123456789abcdef0123456789abcdef",
            "app:$(reboot)",
            &"a".repeat(600),
        ] {
            assert!(!super::valid_image_ref(bad), "{bad:?}");
        }
        assert!(!super::valid_file_path(&"x".repeat(256)));
    }

    use super::*;

    #[test]
    fn decode_checks_size_then_version_then_shape() {
        let err = decode::<JobRef>(&[b' '; 100], 10).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        let err = decode::<JobRef>(b"not json", 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = decode::<JobRef>(br#"{"v":2,"job_id":"x"}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        let err = decode::<JobRef>(br#"{"job_id":"x"}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        let err = decode::<JobRef>(br#"{"v":1}"#, 100).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("job_id"), "{}", err.message);
        let ok = decode::<JobRef>(br#"{"v":1,"job_id":"x"}"#, 100).unwrap();
        assert_eq!(ok.job_id, "x");
    }

    #[test]
    fn reply_envelope_round_trips_and_keeps_unknown_codes() {
        let reply: Reply<u32> = Reply::err(WireError::new(ErrorCode::NotFound, "no job j1"));
        let text = String::from_utf8(encode(&reply).to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"ok":false,"error":{"code":"not_found","message":"no job j1"}}"#
        );
        let future: Reply<u32> = serde_json::from_str(
            r#"{"v":1,"ok":false,"error":{"code":"quota_exceeded","message":"m"}}"#,
        )
        .unwrap();
        assert_eq!(future.into_result().unwrap_err().code, ErrorCode::Unknown);
    }

    #[test]
    fn job_report_wire_format_is_flat() {
        let report = JobReport {
            v: 1,
            node_id: "n1".into(),
            job_id: "j1".into(),
            attempt: 1,
            phase: ReportPhase::Running,
            signature: None,
        };
        assert_eq!(
            String::from_utf8(encode(&report).to_vec()).unwrap(),
            r#"{"v":1,"node_id":"n1","job_id":"j1","attempt":1,"phase":"running"}"#
        );
    }
}
