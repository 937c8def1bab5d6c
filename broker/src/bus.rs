//! A connected NATS client bound to one namespace: typed request/reply through the [`Reply`]
//! envelope, and the JetStream stream that captures the namespace's events.

use crate::config::NatsSettings;
use crate::identity::{Caller, Credentials, CredentialsError};
use crate::ops::{CtlOp, Request, Server};
use crate::subjects::Subjects;
use crate::wire::{self, Reply, WireError};
use async_nats::jetstream::{self, stream};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// Largest reply a client accepts (job results carry bounded output).
const MAX_REPLY_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(transparent)]
    Namespace(#[from] crate::subjects::TokenError),
    #[error(
        "cannot connect to NATS at {url}: {source} (is nats-server running? `rhizos up` starts one)"
    )]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "cannot create the JetStream stream {stream}: {message} (its size limit is [nats] event_max_bytes or blob_max_bytes: lower it if the server has less storage than that)"
    )]
    Stream { stream: String, message: String },
    #[error("[nats] {setting} = {path}: {problem}")]
    TlsFile {
        setting: &'static str,
        path: String,
        problem: String,
    },
    #[error("[nats] tls_cert and tls_key go together: set both (mutual TLS) or neither")]
    TlsPair,
    #[error("[nats] credentials: {0}")]
    Credentials(#[from] CredentialsError),
    #[error(
        "[nats] url = {url}: {message} (one server, or several comma-separated: nats://host:4222,nats://other:4222)"
    )]
    Url { url: String, message: String },
}

/// A request that got no usable reply, or an error reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error(
        "nothing is serving {subject}: is the orchestrator (or the node) running in this namespace?"
    )]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout_ms} ms")]
    TimedOut { subject: String, timeout_ms: u64 },
    #[error("request on {subject} failed: {message}")]
    Transport { subject: String, message: String },
    #[error("malformed reply on {subject}: {message}")]
    BadReply { subject: String, message: String },
    #[error("{0}")]
    Remote(WireError),
    #[error("cannot address {op}: {reason}")]
    Address { op: CtlOp, reason: String },
}

impl RequestError {
    /// The remote error, when the peer answered with one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            Self::Remote(e) => Some(e),
            _ => None,
        }
    }
}

/// Connected client + subjects of one namespace.
#[derive(Clone, Debug)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub subjects: Subjects,
    pub request_timeout: Duration,
    /// How long an orchestrator request is resent while nothing serves it (`[nats]
    /// failover_wait_ms`).
    pub failover_wait: Duration,
    /// Who this connection authenticated as (from `[nats] credentials`); None without
    /// credentials, when each request claims the party it speaks for ([`Request::claim`]).
    pub identity: Option<Caller>,
    /// This party's key pair (from its credentials), for what it signs (a node its reports).
    pub signer: Option<std::sync::Arc<nkeys::KeyPair>>,
    /// The event stream's retention (`[nats] event_max_bytes`, `event_max_age_s`).
    pub event_limits: EventLimits,
    /// The blob stream's retention (`[nats] blob_max_bytes`, `blob_max_age_s`).
    pub blob_limits: EventLimits,
    /// Copies JetStream keeps of what RhizOS stores (`[nats] replicas`).
    pub replicas: usize,
}

/// How much a stream keeps (the event stream's history, the blob stream's results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    pub max_bytes: u64,
    pub max_age_s: u64,
}

impl Bus {
    /// Connects to the server(s) in `settings`.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, ConnectError> {
        let credentials = match &settings.credentials {
            Some(path) => Some(Credentials::load(path)?),
            None => None,
        };
        Self::connect_with(settings, credentials).await
    }

    /// Connects to the server(s) in `settings` as the party of `credentials` (None: without
    /// credentials), whatever `settings` names: the web dashboard connects each signed-in
    /// user as themselves.
    pub async fn connect_with(
        settings: &NatsSettings,
        credentials: Option<Credentials>,
    ) -> Result<Self, ConnectError> {
        let subjects = Subjects::new(&settings.namespace)?;
        let request_timeout = Duration::from_millis(settings.request_timeout_ms);
        let mut options = async_nats::ConnectOptions::new()
            .request_timeout(Some(request_timeout))
            .connection_timeout(Duration::from_secs(5));
        if let Some(name) = &settings.client_name {
            options = options.name(name);
        }
        options = tls_options(options, settings)?;
        let (identity, signer) = match credentials {
            Some(creds) => {
                let caller = creds.caller();
                // `load` checked the seed.
                let key = nkeys::KeyPair::from_seed(&creds.seed)
                    .ok()
                    .map(std::sync::Arc::new);
                options = options
                    .nkey(creds.seed.clone())
                    .custom_inbox_prefix(caller.inbox_prefix());
                (Some(caller), key)
            }
            None => (None, None),
        };
        // Several servers (a cluster): the client picks one and fails over to the others.
        let servers = settings
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse::<async_nats::ServerAddr>()
                    .map_err(|e| ConnectError::Url {
                        url: url.to_owned(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ConnectError::Url {
                url: settings.url.clone(),
                message: "no server named".into(),
            });
        }
        let client = options
            .connect(servers)
            .await
            .map_err(|source| ConnectError::Connect {
                url: settings.url.clone(),
                source,
            })?;
        let jetstream = jetstream::new(client.clone());
        Ok(Self {
            client,
            jetstream,
            subjects,
            request_timeout,
            failover_wait: Duration::from_millis(settings.failover_wait_ms),
            identity,
            signer,
            event_limits: EventLimits {
                max_bytes: settings.event_max_bytes,
                max_age_s: settings.event_max_age_s,
            },
            blob_limits: EventLimits {
                max_bytes: settings.blob_max_bytes,
                max_age_s: settings.blob_max_age_s,
            },
            replicas: settings.replicas.max(1),
        })
    }

    /// Who requests are sent as: this connection's identity, else what `request` claims.
    pub fn caller_for<R: Request>(&self, request: &R) -> Caller {
        self.identity.clone().unwrap_or_else(|| request.claim())
    }

    /// The subject [`Bus::call`] sends `request` to (tests that send raw payloads use it).
    pub fn subject_for<R: Request>(&self, request: &R) -> Result<String, RequestError> {
        self.subjects
            .op(R::OP, &self.caller_for(request))
            .map_err(|e| RequestError::Address {
                op: R::OP,
                reason: e.to_string(),
            })
    }

    /// Sends `request` to the orchestrator, on its operation's subject, and reads the reply type
    /// that operation answers with.
    pub async fn call<R: Request>(&self, request: &R) -> Result<R::Reply, RequestError> {
        if R::OP.server() != Server::Orchestrator {
            return Err(RequestError::Address {
                op: R::OP,
                reason: "it is served by each node's agent: name the node (call_node)".into(),
            });
        }
        let subject = self.subject_for(request)?;
        // Nobody received it: during a failover (the active orchestrator gone, a standby about
        // to take over) it is sent again until someone answers or the wait is over. So is a
        // request the orchestrator answered `unavailable` (it could not write the ledger: it
        // is handing over), when sending it again cannot do it twice.
        let deadline = std::time::Instant::now() + self.failover_wait;
        let mut pause = Duration::from_millis(50);
        loop {
            let result = self.request(subject.clone(), request).await;
            let again = match &result {
                Err(RequestError::NoResponders { .. }) => true,
                Err(RequestError::Remote(e)) => {
                    e.code == crate::wire::ErrorCode::Unavailable && request.resendable()
                }
                _ => false,
            };
            if !again || std::time::Instant::now() >= deadline {
                return result;
            }
            tracing::debug!(op = %R::OP, "no orchestrator can serve this now; sending it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends `request` to the agent of `node_id`, on its operation's subject.
    pub async fn call_node<R: Request>(
        &self,
        node_id: &str,
        request: &R,
    ) -> Result<R::Reply, RequestError> {
        if R::OP.server() != Server::Agent {
            return Err(RequestError::Address {
                op: R::OP,
                reason: "it is served by the orchestrator, not by a node (call)".into(),
            });
        }
        let subject = self
            .subjects
            .node_op(R::OP, node_id)
            .map_err(|e| RequestError::Address {
                op: R::OP,
                reason: e.to_string(),
            })?;
        self.request(subject, request).await
    }

    /// Sends `request` to `subject` and decodes the [`Reply`] envelope. Prefer [`Bus::call`],
    /// which picks the subject and the reply type from the request; this is for tests that
    /// send to the wrong place on purpose.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: String,
        request: &Req,
    ) -> Result<Resp, RequestError> {
        self.request_raw(subject, wire::encode(request)).await
    }

    /// Like [`Bus::request`] with an already encoded payload (tests send malformed ones).
    pub async fn request_raw<Resp: DeserializeOwned>(
        &self,
        subject: String,
        payload: bytes::Bytes,
    ) -> Result<Resp, RequestError> {
        use async_nats::RequestErrorKind;
        let message = self
            .client
            .request(subject.clone(), payload)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => RequestError::NoResponders {
                    subject: subject.clone(),
                },
                RequestErrorKind::TimedOut => RequestError::TimedOut {
                    subject: subject.clone(),
                    timeout_ms: u64::try_from(self.request_timeout.as_millis()).unwrap_or(u64::MAX),
                },
                _ => RequestError::Transport {
                    subject: subject.clone(),
                    message: e.to_string(),
                },
            })?;
        if message.payload.len() > MAX_REPLY_BYTES {
            return Err(RequestError::BadReply {
                subject,
                message: format!(
                    "reply of {} bytes exceeds {MAX_REPLY_BYTES}",
                    message.payload.len()
                ),
            });
        }
        let reply: Reply<Resp> =
            serde_json::from_slice(&message.payload).map_err(|e| RequestError::BadReply {
                subject: subject.clone(),
                message: e.to_string(),
            })?;
        reply.into_result().map_err(RequestError::Remote)
    }

    /// Creates the namespace's event stream if it does not exist (idempotent).
    pub async fn ensure_event_stream(&self) -> Result<stream::Stream, ConnectError> {
        let config = stream::Config {
            name: self.subjects.event_stream(),
            description: Some(format!("RhizOS events of {}", self.subjects)),
            subjects: vec![self.subjects.events_wildcard()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            // Job and escrow history only (heartbeats travel on core NATS, `rhizos.out`, and
            // never push history out): bounded by the operator's `[nats] event_max_bytes` and
            // `event_max_age_s`.
            max_messages_per_subject: 100_000,
            max_bytes: i64::try_from(self.event_limits.max_bytes).unwrap_or(i64::MAX),
            max_age: Duration::from_secs(self.event_limits.max_age_s),
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        };
        self.ensure_stream(config).await
    }

    /// Creates the stream `config` describes if it does not exist (idempotent), and applies its
    /// retention (`max_bytes`, `max_age`) to one that does: the operator may have changed it.
    pub(crate) async fn ensure_stream(
        &self,
        config: stream::Config,
    ) -> Result<stream::Stream, ConnectError> {
        let name = config.name.clone();
        let error = |e: &dyn std::fmt::Display| ConnectError::Stream {
            stream: name.clone(),
            message: e.to_string(),
        };
        let mut stream = self
            .jetstream
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| error(&e))?;
        let current = &stream.cached_info().config;
        if current.max_bytes != config.max_bytes || current.max_age != config.max_age {
            self.jetstream
                .update_stream(config)
                .await
                .map_err(|e| error(&e))?;
            stream = self
                .jetstream
                .get_stream(&name)
                .await
                .map_err(|e| error(&e))?;
        }
        Ok(stream)
    }
}

/// `[nats] tls_ca`, `tls_cert`, `tls_key` applied to the connection: files checked first, so a
/// wrong path is an error naming the setting, not a TLS handshake failure.
fn tls_options(
    mut options: async_nats::ConnectOptions,
    settings: &NatsSettings,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let readable = |setting: &'static str, path: &std::path::Path| {
        std::fs::metadata(path)
            .map_err(|e| ConnectError::TlsFile {
                setting,
                path: path.display().to_string(),
                problem: e.to_string(),
            })
            .and_then(|meta| {
                if meta.is_file() {
                    Ok(())
                } else {
                    Err(ConnectError::TlsFile {
                        setting,
                        path: path.display().to_string(),
                        problem: "not a file".into(),
                    })
                }
            })
    };
    if let Some(ca) = &settings.tls_ca {
        readable("tls_ca", ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => {
            readable("tls_cert", cert)?;
            readable("tls_key", key)?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        (None, None) => {}
        _ => return Err(ConnectError::TlsPair),
    }
    Ok(options)
}
