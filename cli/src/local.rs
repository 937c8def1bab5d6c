//! The local network `rhizos up` runs, and the credentials the CLI finds by itself.
//!
//! `rhizos up` keeps every party's credentials in `<data-dir>/credentials/` (mode 0600) and the
//! parties the server lets in in `<data-dir>/auth/`, and records the network in
//! `~/.config/rhizos/networks/<namespace>.json` (URL, namespace, data dir). A command with no
//! `--credentials` (nor `[nats] credentials`) on a recorded network acts as the user of the
//! account it names when that user's credentials are there, else as the local operator.

use anyhow::Context as _;
use rhizos_broker::auth::AuthDir;
use rhizos_broker::{Caller, Credentials, Subjects};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A network `rhizos up` brought up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalNetwork {
    pub url: String,
    pub namespace: String,
    pub data_dir: PathBuf,
}

impl LocalNetwork {
    /// `~/.config/rhizos/networks/<namespace>.json` (`$XDG_CONFIG_HOME` when set).
    fn record_path(namespace: &str) -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(
            base.join("rhizos")
                .join("networks")
                .join(format!("{namespace}.json")),
        )
    }

    /// The recorded network of `namespace` at `url`, if `rhizos up` recorded one.
    pub fn find(url: &str, namespace: &str) -> Option<Self> {
        let text = std::fs::read_to_string(Self::record_path(namespace)?).ok()?;
        let network: Self = serde_json::from_str(&text).ok()?;
        // A cluster's record names every server: the one configured is enough to find it.
        let serves = network.url == url || network.url.split(',').any(|u| u.trim() == url.trim());
        (serves && network.namespace == namespace).then_some(network)
    }

    pub fn record(&self) -> anyhow::Result<()> {
        let path = Self::record_path(&self.namespace)
            .context("neither HOME nor XDG_CONFIG_HOME is set: cannot record the network")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn auth(&self) -> AuthDir {
        AuthDir::new(self.data_dir.join("auth"))
    }

    pub fn credentials_dir(&self) -> PathBuf {
        self.data_dir.join("credentials")
    }

    /// Where the local credentials of `caller` are kept.
    pub fn credentials_path(&self, caller: &Caller) -> PathBuf {
        credentials_file(&self.credentials_dir(), caller)
    }

    /// The credentials a command acting for `account` (None: an operator command) uses.
    pub fn credentials_for(&self, account: Option<&str>) -> Option<PathBuf> {
        let user = account
            .map(|a| self.credentials_path(&Caller::user(a)))
            .filter(|p| p.is_file());
        user.or_else(|| {
            Some(self.credentials_path(&Caller::operator(OPERATOR))).filter(|p| p.is_file())
        })
    }
}

/// The local operator's name.
pub const OPERATOR: &str = "operator";
/// The identity of the local AI gateway `rhizos up` starts.
pub const GATEWAY: &str = "local";

/// `<dir>/<role>-<name>.creds`.
pub fn credentials_file(dir: &Path, caller: &Caller) -> PathBuf {
    dir.join(caller.credentials_file_name())
}

/// Makes credentials for `caller` in `dir` (kept if they exist), lets its key in through
/// `auth`, and returns the file. The server applies the change on its next reload.
pub fn issue(
    auth: &AuthDir,
    subjects: &Subjects,
    dir: &Path,
    caller: &Caller,
) -> anyhow::Result<(PathBuf, Credentials)> {
    let path = credentials_file(dir, caller);
    let creds = auth.admit(subjects, caller, &path)?;
    Ok((path, creds))
}
