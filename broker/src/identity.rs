//! Who is calling. Every party on the bus has a [`Role`] and a name (an account, a node id, an
//! operator's name); the pair is the identity token of the subjects it may publish
//! (`rhizos.ctl.v1.<ns>.<role>.<name>.<noun>.<verb>`), and the server's permissions let only
//! that party publish them ([`crate::auth`]). A party proves who it is with an nkey (ed25519)
//! whose seed is kept in a [`Credentials`] file.

use crate::subjects::{TokenError, validate_token};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// What a party may do (the README's roles table; [`crate::CtlOp::allows`] per operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// One per account: its own jobs, balance, statement, events and logs; nodes and modules
    /// read-only.
    User,
    /// One per enrolled node: its own registration, heartbeats, reports and job logs; receives
    /// only its own assignments.
    Node,
    /// Money in and out, enrolment, `ledger.verify`, reading everything.
    Operator,
    /// The orchestrator service itself.
    Orchestrator,
    /// An AI gateway service (`rhizosd gateway`): checks API keys for the clients it serves.
    Gateway,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Self::User,
        Self::Node,
        Self::Operator,
        Self::Orchestrator,
        Self::Gateway,
    ];

    /// The role's token in subjects and inbox prefixes.
    pub const fn token(self) -> &'static str {
        match self {
            Self::User => "u",
            Self::Node => "n",
            Self::Operator => "o",
            Self::Orchestrator => "s",
            Self::Gateway => "g",
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Node => "node",
            Self::Operator => "operator",
            Self::Orchestrator => "orchestrator",
            Self::Gateway => "gateway",
        }
    }

    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.token() == token)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A party: role and name, both valid subject tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caller {
    pub role: Role,
    pub name: String,
}

impl Caller {
    pub fn new(role: Role, name: &str) -> Result<Self, TokenError> {
        validate_token(role.as_str(), name)?;
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }

    /// A user acting for `account` (an unvalidated name gives a subject the server refuses).
    pub fn user(account: &str) -> Self {
        Self {
            role: Role::User,
            name: account.to_owned(),
        }
    }

    pub fn node(node_id: &str) -> Self {
        Self {
            role: Role::Node,
            name: node_id.to_owned(),
        }
    }

    pub fn operator(name: &str) -> Self {
        Self {
            role: Role::Operator,
            name: name.to_owned(),
        }
    }

    pub fn gateway(name: &str) -> Self {
        Self {
            role: Role::Gateway,
            name: name.to_owned(),
        }
    }

    pub fn orchestrator() -> Self {
        Self {
            role: Role::Orchestrator,
            name: "orchestrator".to_owned(),
        }
    }

    /// The usual name of this party's credentials file: `<role>-<name>.creds`.
    pub fn credentials_file_name(&self) -> String {
        format!("{}-{}.creds", self.role.as_str(), self.name)
    }

    /// The prefix of this party's reply inboxes (`_INBOX.<role>.<name>`): the server lets it
    /// subscribe only below it, so nobody reads another party's replies.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX.{}.{}", self.role.token(), self.name)
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// The credentials file format version.
pub const CREDENTIALS_VERSION: u32 = 1;

/// A party's nkey seed with the identity it was enrolled as. Written with mode 0600; a file
/// that others can read is refused, like ssh refuses such a private key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub v: u32,
    pub role: Role,
    pub name: String,
    /// The nkey seed (`SU…`): the secret.
    pub seed: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("role", &self.role)
            .field("name", &self.name)
            .field("seed", &"<secret>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("cannot read credentials {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write credentials {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "credentials {path} can be read by other users (mode {mode:o}): run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("credentials {path} are not valid: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl Credentials {
    /// New credentials with a fresh nkey for `caller`.
    pub fn generate(caller: &Caller) -> Self {
        let key = nkeys::KeyPair::new_user();
        Self {
            v: CREDENTIALS_VERSION,
            role: caller.role,
            name: caller.name.clone(),
            // A generated key pair always holds its seed (only one made from a public key lacks it).
            seed: key.seed().unwrap_or_default(),
        }
    }

    pub fn caller(&self) -> Caller {
        Caller {
            role: self.role,
            name: self.name.clone(),
        }
    }

    /// The nkey public key (`U…`) the server's authorization lists.
    pub fn public_key(&self) -> Result<String, String> {
        nkeys::KeyPair::from_seed(&self.seed)
            .map(|k| k.public_key())
            .map_err(|e| e.to_string())
    }

    /// Reads and checks a credentials file: mode, shape, name and seed.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(CredentialsError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problem| CredentialsError::Invalid {
            path: path.to_owned(),
            problem,
        })
    }

    /// Checks credentials given as text (e.g. pasted into the web dashboard's sign-in): shape,
    /// version, name and seed; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let creds: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if creds.v != CREDENTIALS_VERSION {
            return Err(format!(
                "version {} (this build reads {CREDENTIALS_VERSION})",
                creds.v
            ));
        }
        validate_token(creds.role.as_str(), &creds.name).map_err(|e| e.to_string())?;
        creds.public_key().map_err(|e| format!("seed: {e}"))?;
        Ok(creds)
    }

    /// Writes the file with mode 0600 (whole: a temp file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let write_err = |source| CredentialsError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            // A directory made for secrets is private too.
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir).map_err(write_err)?;
        }
        // A plain struct of strings: serializing cannot fail.
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        write_private(path, text.as_bytes()).map_err(write_err)
    }
}

/// Writes `bytes` to `path` with mode 0600, whole (temp file + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_and_open_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.creds");
        let creds = Credentials::generate(&Caller::user("alice"));
        creds.save(&path).unwrap();
        let back = Credentials::load(&path).unwrap();
        assert_eq!(back.caller(), Caller::user("alice"));
        assert!(back.public_key().unwrap().starts_with('U'));
        assert!(
            !format!("{back:?}").contains(&creds.seed),
            "Debug leaks the seed"
        );

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credentials::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        std::fs::write(&path, r#"{"v":1,"role":"user","name":"A.B","seed":"x"}"#).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::Invalid { .. })
        ));
    }

    #[test]
    fn roles_have_distinct_tokens() {
        for role in Role::ALL {
            assert_eq!(Role::from_token(role.token()), Some(role));
        }
        assert_eq!(Caller::user("alice").inbox_prefix(), "_INBOX.u.alice");
    }
}
