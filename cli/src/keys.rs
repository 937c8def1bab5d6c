//! `rhizos key ...`: the AI gateway's API keys of an account — create (printed once), list,
//! revoke.

use crate::{GlobalArgs, money};
use anyhow::Context as _;
use clap::Subcommand;
use rhizos_broker::Client;
use rhizos_broker::wire::{CreateKey, KEY_ROUTES, KeyView};
use std::io::Write as _;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Make an API key for an account: clients use it as their OpenAI API key. It is printed
    /// this once; only its SHA-256 is kept.
    Create {
        #[arg(long, env = "RHIZOS_ACCOUNT")]
        account: String,
        /// A label for your lists (`ci`, `laptop`…).
        #[arg(long)]
        name: Option<String>,
        /// Most the key may spend in all, in USD (default: the account's balance).
        #[arg(long)]
        credit_limit: Option<String>,
        /// Models it may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Routes it may use, comma-separated: chat, embeddings, speech, scrape, models (default:
        /// all).
        #[arg(long, value_delimiter = ',')]
        routes: Vec<String>,
        /// Requests per minute (default: unlimited).
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute (default: unlimited).
        #[arg(long)]
        tpm: Option<u64>,
        /// It stops working this many days from now (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// An account's keys, newest first: id, name, limits, spend, last use (never the key).
    List {
        #[arg(long, env = "RHIZOS_ACCOUNT")]
        account: String,
    },
    /// Revoke a key by its id (`rhz_<id>_…`): it stops working at once.
    Revoke {
        key_id: String,
        /// The key's account (to act with its credentials; the operator may revoke any key).
        #[arg(long, env = "RHIZOS_ACCOUNT")]
        account: Option<String>,
    },
}

pub async fn run(global: &GlobalArgs, command: KeyCommand) -> anyhow::Result<()> {
    let acting_for = match &command {
        KeyCommand::Create { account, .. } | KeyCommand::List { account } => Some(account.clone()),
        KeyCommand::Revoke { account, .. } => account.clone(),
    };
    let client = Client::new(global.bus_for(acting_for.as_deref()).await?);
    match command {
        KeyCommand::Create {
            account,
            name,
            credit_limit,
            models,
            routes,
            rpm,
            tpm,
            expires_in_days,
        } => {
            if let Some(route) = routes.iter().find(|r| !KEY_ROUTES.contains(&r.as_str())) {
                anyhow::bail!(
                    "--routes: {route:?} is not a route; the routes are {}",
                    KEY_ROUTES.join(", ")
                );
            }
            let credit_limit_micros = credit_limit
                .as_deref()
                .map(money::parse_usd)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--credit-limit: {e}"))?;
            let expires_ms = expires_in_days.map(|days| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                now + u64::from(days) * 86_400_000
            });
            let created = client
                .key_create(CreateKey {
                    account,
                    name,
                    credit_limit_micros,
                    models,
                    routes,
                    rpm,
                    tpm,
                    expires_ms,
                    ..CreateKey::default()
                })
                .await
                .context("the key was not created")?;
            if global.json {
                println!("{}", serde_json::to_string(&created)?);
            } else {
                println!("{}", created.key);
                eprintln!(
                    "· key {} of account {}: shown this once, keep it secret (rhizos key revoke {} stops it)",
                    created.view.key_id, created.view.account, created.view.key_id
                );
            }
            Ok(())
        }
        KeyCommand::List { account } => {
            let list = client.key_list(&account).await?;
            if global.json {
                println!("{}", serde_json::to_string(&list)?);
                return Ok(());
            }
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<14} {:<12} {:>12} {:>12}  limits",
                "key id", "name", "spent", "credit limit"
            )?;
            for key in &list.keys {
                writeln!(out, "{}", key_line(key))?;
            }
            Ok(())
        }
        KeyCommand::Revoke { key_id, .. } => {
            let key = client.key_revoke(&key_id).await?;
            if global.json {
                println!("{}", serde_json::to_string(&key)?);
            } else {
                println!("key {} of account {} revoked", key.key_id, key.account);
            }
            Ok(())
        }
    }
}

fn key_line(key: &KeyView) -> String {
    let mut limits = Vec::new();
    if !key.models.is_empty() {
        limits.push(format!("models {}", key.models.join(",")));
    }
    if !key.routes.is_empty() {
        limits.push(format!("routes {}", key.routes.join(",")));
    }
    if let Some(rpm) = key.rpm {
        limits.push(format!("{rpm} req/min"));
    }
    if let Some(tpm) = key.tpm {
        limits.push(format!("{tpm} tokens/min"));
    }
    if let Some(ms) = key.expires_ms {
        limits.push(format!("expires at {ms} ms"));
    }
    if key.revoked_ms.is_some() {
        limits.push("REVOKED".into());
    }
    format!(
        "{:<14} {:<12} {:>12} {:>12}  {}",
        key.key_id,
        key.name.as_deref().unwrap_or("-"),
        money::format_usd(key.spent_micros),
        key.credit_limit_micros
            .map_or_else(|| "-".to_owned(), money::format_usd),
        if limits.is_empty() {
            "none".to_owned()
        } else {
            limits.join("; ")
        }
    )
}
