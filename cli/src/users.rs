//! Operator commands that change who may connect: `rhizos user add/remove` and
//! `rhizos node enroll/remove`. They write credentials, update the parties the local server lets
//! in (`<data-dir>/auth`), make it re-read them (no restart: a removed party's connection is
//! closed at once), and tell the orchestrator (ledger account, enrolment).

use crate::GlobalArgs;
use crate::local::{self, LocalNetwork};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use rhizos_broker::wire::ErrorCode;
use rhizos_broker::{Caller, Credentials, Subjects};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user: its ledger account and a credentials file (mode 0600) that acts for that
    /// account only. Hand the file to the user (`rhizos --credentials FILE …`).
    Add {
        /// The user's name, which is also its account (a-z, 0-9, '_' and '-').
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a user's credentials: its connections are closed and refused from now on. The
    /// ledger account and its money stay.
    Remove {
        /// The user to revoke.
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which network's server to change, and where to put the credentials.
#[derive(Args)]
pub struct Target {
    /// The data dir of the network (`rhizos up --data-dir`). Default: the one `rhizos up`
    /// recorded for this URL and namespace.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Also write the credentials file here (for another machine).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The local network these commands change: `--data-dir`, else the one `rhizos up` recorded
/// for this URL and namespace, else None (a NATS server the operator runs: its config is theirs
/// to change).
pub fn network(global: &GlobalArgs, target: &Target) -> anyhow::Result<Option<LocalNetwork>> {
    let settings = global.settings()?;
    if let Some(dir) = &target.data_dir {
        let data_dir = dir
            .canonicalize()
            .with_context(|| format!("no data dir {}", dir.display()))?;
        return Ok(Some(LocalNetwork {
            url: settings.nats.url,
            namespace: settings.nats.namespace,
            data_dir,
        }));
    }
    Ok(LocalNetwork::find(
        &settings.nats.url,
        &settings.nats.namespace,
    ))
}

/// Issues credentials for `caller`: on a local network, lets them in and reloads its server;
/// otherwise writes them to `--out` and prints the user entry to add to the server's config.
pub fn admit(
    global: &GlobalArgs,
    network: Option<&LocalNetwork>,
    caller: &Caller,
    out: Option<&PathBuf>,
) -> anyhow::Result<(PathBuf, String)> {
    let Some(network) = network else {
        let out = out.with_context(|| {
            "no network brought up by `rhizos up` here: pass --out FILE for the credentials (and \
             add the printed user to your nats-server's config) or --data-dir of a local network"
        })?;
        let creds = if out.is_file() {
            Credentials::load(out)?
        } else {
            let creds = Credentials::generate(caller);
            creds.save(out)?;
            creds
        };
        let key = creds.public_key().map_err(anyhow::Error::msg)?;
        let subjects = Subjects::new(&global.settings()?.nats.namespace)?;
        let party = rhizos_broker::auth::Party {
            role: caller.role,
            name: caller.name.clone(),
            public_key: key.clone(),
        };
        eprintln!(
            "add this user to your nats-server's authorization (then `nats-server --signal reload`):\n{}",
            rhizos_broker::auth::authorization_block(&subjects, &[party])
        );
        return Ok((out.clone(), key));
    };
    let subjects = Subjects::new(&network.namespace)?;
    let (path, creds) = local::issue(
        &network.auth(),
        &subjects,
        &network.credentials_dir(),
        caller,
    )?;
    rhizos_broker::server::reload(&network.data_dir.join("nats"))
        .context("cannot make nats-server re-read its users")?;
    if let Some(out) = out {
        creds.save(out)?;
    }
    let key = creds.public_key().map_err(anyhow::Error::msg)?;
    Ok((out.cloned().unwrap_or(path), key))
}

/// Removes `caller` from the server's users, reloads it, and deletes the local credentials.
/// Without a local network the operator removes the user from its server's config.
pub fn revoke(network: Option<&LocalNetwork>, caller: &Caller) -> anyhow::Result<()> {
    let Some(network) = network else {
        eprintln!(
            "no network brought up by `rhizos up` here: remove {caller}'s nkey from your \
             nats-server's authorization and reload it (`nats-server --signal reload`)"
        );
        return Ok(());
    };
    let subjects = Subjects::new(&network.namespace)?;
    network.auth().remove(&subjects, caller)?;
    rhizos_broker::server::reload(&network.data_dir.join("nats"))
        .context("cannot make nats-server re-read its users")?;
    let _ = std::fs::remove_file(network.credentials_path(caller));
    Ok(())
}

pub async fn run(global: &GlobalArgs, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add { name, target } => {
            let caller = Caller::new(rhizos_broker::Role::User, &name)?;
            let network = network(global, &target)?;
            let client = global.client().await?;
            match client.account_create(&name).await {
                Ok(_) => {}
                Err(e)
                    if e.remote()
                        .is_some_and(|r| r.code == ErrorCode::AlreadyExists) => {}
                Err(e) => return Err(e).context("cannot create the user's account"),
            }
            let (path, key) = admit(global, network.as_ref(), &caller, target.out.as_ref())?;
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"user": name, "credentials": path, "public_key": key})
                );
            } else {
                println!(
                    "✓ user {name}: account {name}, credentials {} (key {key})",
                    path.display()
                );
            }
        }
        UserCommand::Remove { name, target } => {
            let caller = Caller::new(rhizos_broker::Role::User, &name)?;
            revoke(network(global, &target)?.as_ref(), &caller)?;
            if global.json {
                println!("{}", serde_json::json!({"removed": name}));
            } else {
                println!("✓ user {name} removed: its credentials are refused from now on");
            }
        }
    }
    Ok(())
}
