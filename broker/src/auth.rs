//! Who may publish and subscribe to what: the `nats-server` permissions of each [`Role`], and the
//! server's `authorization` block for a set of enrolled parties (ADR 0006).
//!
//! | role | may publish | may subscribe |
//! |---|---|---|
//! | user `a` | `ctl.v1.<ns>.u.a.*.*`, `node.plugins.*`, direct get of `blob.v1.<ns>.u.a.>` | its inbox, `evt.v1.<ns>.u.a.>`, `out.v1.<ns>.u.a.>` |
//! | node `n` | `ctl.v1.<ns>.n.n.*.*`, its heartbeat, `out.v1.<ns>.u.*.job.log.*.n`, `blob.v1.<ns>.u.*.n.n.>` (and its direct get), replies | its inbox, `job.assign.n`, `job.stop.n`, `node.plugins.n` |
//! | operator `o` | `ctl.v1.<ns>.o.o.*.*`, `node.plugins.*`, `$JS.API.>` | everything |
//! | gateway `g` | `ctl.v1.<ns>.g.g.*.*` | its inbox |
//! | orchestrator | everything | everything |
//!
//! Nobody but the orchestrator and the operator reaches JetStream's API (`$JS.API.>`), so only they
//! can read, change or delete the event stream; a user reaches only direct gets of its own
//! account's blobs. Requests are answered under `allow_responses`
//! (a party may publish a reply only to a request it received), never by a right to publish to
//! inboxes, so no one can fake another party's replies.

use crate::identity::{Caller, Role};
use crate::ops::{CtlOp, Server};
use crate::subjects::Subjects;
use serde::{Deserialize, Serialize};

/// A party's publish and subscribe allow lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May reply to requests it received.
    pub allow_responses: bool,
}

/// The permissions of `caller` in the namespace of `subjects`.
pub fn permissions(subjects: &Subjects, caller: &Caller) -> Permissions {
    let ns = subjects.namespace();
    let name = &caller.name;
    let inbox = format!("{}.>", caller.inbox_prefix());
    let own_ops = format!("rhizos.ctl.v1.{ns}.{}.{name}.*.*", caller.role.token());
    let plugins_of_any = format!("rhizos.ctl.v1.{ns}.{}.*", CtlOp::NodePlugins);
    match caller.role {
        Role::User => Permissions {
            publish: vec![
                own_ops,
                plugins_of_any,
                // Reading its own results' blobs, chunk by chunk (nothing else of JetStream).
                format!(
                    "$JS.API.DIRECT.GET.{}.rhizos.blob.v1.{ns}.u.{name}.>",
                    subjects.blob_stream()
                ),
            ],
            subscribe: vec![
                inbox,
                format!("rhizos.evt.v1.{ns}.u.{name}.>"),
                format!("rhizos.out.v1.{ns}.u.{name}.>"),
            ],
            allow_responses: false,
        },
        Role::Node => {
            let mut subscribe = vec![inbox];
            subscribe.extend(
                CtlOp::ALL
                    .into_iter()
                    .filter(|op| op.server() == Server::Agent)
                    .map(|op| format!("rhizos.ctl.v1.{ns}.{op}.{name}")),
            );
            Permissions {
                publish: vec![
                    own_ops,
                    format!("rhizos.out.v1.{ns}.node.heartbeat.{name}"),
                    format!("rhizos.out.v1.{ns}.u.*.job.log.*.{name}"),
                    // Streaming AI responses to the gateway, only under its own node token.
                    format!("rhizos.out.v1.{ns}.ai.*.{name}"),
                    // Storing result blobs, only under its own node token.
                    format!("rhizos.blob.v1.{ns}.u.*.n.{name}.>"),
                    // Reading a job's input blobs, only under its own node token (the
                    // orchestrator files a flow step's input there before assigning it).
                    format!(
                        "$JS.API.DIRECT.GET.{}.rhizos.blob.v1.{ns}.u.*.n.{name}.>",
                        subjects.blob_stream()
                    ),
                ],
                subscribe,
                allow_responses: true,
            }
        }
        Role::Operator => Permissions {
            publish: vec![own_ops, plugins_of_any, "$JS.API.>".into()],
            subscribe: vec![">".into()],
            allow_responses: false,
        },
        // Its own operations (API keys by digest, jobs charged to its clients' keys), its inbox
        // and the AI responses nodes stream to it (answering their end of stream); nothing of
        // JetStream, no account's events or logs.
        Role::Gateway => Permissions {
            publish: vec![own_ops],
            subscribe: vec![inbox, format!("rhizos.out.v1.{ns}.ai.>")],
            allow_responses: true,
        },
        Role::Orchestrator => Permissions {
            publish: vec![">".into()],
            subscribe: vec![">".into()],
            allow_responses: true,
        },
    }
}

/// One party the server lets in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub role: Role,
    pub name: String,
    /// nkey public key (`U…`).
    pub public_key: String,
}

impl Party {
    pub fn caller(&self) -> Caller {
        Caller {
            role: self.role,
            name: self.name.clone(),
        }
    }
}

/// The server's `authorization { users = [...] }` block for `parties` (nats-server config
/// syntax; JSON strings are valid there). An empty list lets nobody in.
pub fn authorization_block(subjects: &Subjects, parties: &[Party]) -> String {
    // A JSON string is a valid quoted string in nats-server's config syntax.
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let quoted = |items: &[String]| {
        let items: Vec<String> = items.iter().map(|s| quote(s)).collect();
        format!("[{}]", items.join(", "))
    };
    let mut out = String::from("# Written by RhizOS (rhizos user/node commands): do not edit.\n");
    out.push_str("authorization {\n  users = [\n");
    for party in parties {
        let p = permissions(subjects, &party.caller());
        out.push_str(&format!(
            "    # {} {}\n    {{ nkey: {}, permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }}{} }} }}\n",
            party.role,
            party.name,
            quote(&party.public_key),
            quoted(&p.publish),
            quoted(&p.subscribe),
            if p.allow_responses {
                ", allow_responses: true"
            } else {
                ""
            },
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

/// File of the enrolled parties in an [`AuthDir`].
pub const PARTIES_FILE: &str = "parties.json";
/// The `authorization` block written from it, `include`d by the server's config.
pub const AUTHORIZATION_FILE: &str = "authorization.conf";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid parties file: {problem}")]
    Invalid {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("{0} is already enrolled with another key: remove it first")]
    Exists(Caller),
    #[error("{0} is not enrolled")]
    Unknown(Caller),
    #[error(transparent)]
    Credentials(#[from] crate::identity::CredentialsError),
}

/// The operator's list of parties for a server it runs (`rhizos up`'s `<data-dir>/auth`):
/// `parties.json` and the `authorization.conf` written from it. Changing it rewrites the
/// authorization file whole; [`crate::server::reload`] makes the server apply it.
#[derive(Debug, Clone)]
pub struct AuthDir {
    dir: std::path::PathBuf,
}

impl AuthDir {
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn authorization_file(&self) -> std::path::PathBuf {
        self.dir.join(AUTHORIZATION_FILE)
    }

    pub fn exists(&self) -> bool {
        self.dir.join(PARTIES_FILE).is_file()
    }

    pub fn parties(&self) -> Result<Vec<Party>, AuthError> {
        let path = self.dir.join(PARTIES_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| AuthError::Invalid {
                path,
                problem: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(AuthError::Io { path, source }),
        }
    }

    /// Adds `party` (the same party with the same key again is a no-op) and rewrites the
    /// authorization file.
    pub fn add(&self, subjects: &Subjects, party: Party) -> Result<(), AuthError> {
        let mut parties = self.parties()?;
        match parties
            .iter()
            .find(|p| p.role == party.role && p.name == party.name)
        {
            Some(known) if known.public_key == party.public_key => {}
            Some(_) => return Err(AuthError::Exists(party.caller())),
            None => parties.push(party),
        }
        self.write(subjects, &parties)
    }

    /// The credentials of `caller` in `file` — kept if the file exists, else made — with their
    /// key let in (the server applies it on its next reload).
    pub fn admit(
        &self,
        subjects: &Subjects,
        caller: &Caller,
        file: &std::path::Path,
    ) -> Result<crate::Credentials, AuthError> {
        let creds = if file.is_file() {
            crate::Credentials::load(file)?
        } else {
            let creds = crate::Credentials::generate(caller);
            creds.save(file)?;
            creds
        };
        let public_key = creds.public_key().map_err(|problem| AuthError::Invalid {
            path: file.to_owned(),
            problem,
        })?;
        self.add(
            subjects,
            Party {
                role: caller.role,
                name: caller.name.clone(),
                public_key,
            },
        )?;
        Ok(creds)
    }

    /// Removes a party and rewrites the authorization file.
    pub fn remove(&self, subjects: &Subjects, caller: &Caller) -> Result<Party, AuthError> {
        let mut parties = self.parties()?;
        let index = parties
            .iter()
            .position(|p| p.role == caller.role && p.name == caller.name)
            .ok_or_else(|| AuthError::Unknown(caller.clone()))?;
        let removed = parties.remove(index);
        self.write(subjects, &parties)?;
        Ok(removed)
    }

    /// Writes `parties` and the authorization block for them (each file whole, mode 0600).
    pub fn write(&self, subjects: &Subjects, parties: &[Party]) -> Result<(), AuthError> {
        let io = |path: std::path::PathBuf| move |source| AuthError::Io { path, source };
        std::fs::create_dir_all(&self.dir).map_err(io(self.dir.clone()))?;
        // Plain structs of strings: serializing cannot fail.
        let list = serde_json::to_string_pretty(parties).unwrap_or_default();
        let parties_path = self.dir.join(PARTIES_FILE);
        crate::identity::write_private(&parties_path, list.as_bytes()).map_err(io(parties_path))?;
        let auth_path = self.authorization_file();
        crate::identity::write_private(
            &auth_path,
            authorization_block(subjects, parties).as_bytes(),
        )
        .map_err(io(auth_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_may_publish_only_their_own_identity_and_read_only_their_own_events() {
        let s = Subjects::new("dev").unwrap();
        let p = permissions(&s, &Caller::user("alice"));
        assert!(
            p.publish
                .contains(&"rhizos.ctl.v1.dev.u.alice.*.*".to_owned())
        );
        assert_eq!(
            p.publish
                .iter()
                .filter(|s| s.contains("$JS"))
                .collect::<Vec<_>>(),
            ["$JS.API.DIRECT.GET.RHIZOS_BLOB_DEV.rhizos.blob.v1.dev.u.alice.>"]
        );
        assert!(p.subscribe.contains(&"_INBOX.u.alice.>".to_owned()));
        assert!(
            !p.subscribe
                .iter()
                .any(|s| s == ">" || s.starts_with("_INBOX.>"))
        );
        assert!(!p.allow_responses);

        let n = permissions(&s, &Caller::node("n1"));
        assert!(
            n.subscribe
                .contains(&"rhizos.ctl.v1.dev.job.assign.n1".to_owned())
        );
        assert!(
            n.publish
                .contains(&"rhizos.out.v1.dev.node.heartbeat.n1".to_owned())
        );
        assert!(!n.publish.iter().any(|s| s.contains("job.assign")));
        assert!(
            n.publish
                .contains(&"rhizos.blob.v1.dev.u.*.n.n1.>".to_owned())
        );
    }

    #[test]
    fn the_authorization_block_lists_every_party() {
        let s = Subjects::new("dev").unwrap();
        let parties = [
            Party {
                role: Role::User,
                name: "alice".into(),
                public_key: "UALICE".into(),
            },
            Party {
                role: Role::Node,
                name: "n1".into(),
                public_key: "UNODE".into(),
            },
        ];
        let block = authorization_block(&s, &parties);
        assert!(block.contains(r#"nkey: "UALICE""#), "{block}");
        assert!(block.contains(r#""rhizos.ctl.v1.dev.n.n1.*.*""#), "{block}");
        assert_eq!(block.matches("allow_responses: true").count(), 1, "{block}");
    }
}
