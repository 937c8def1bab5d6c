//! `rhizos receipt get | verify`: a job's receipt, signed by the orchestrator, fetched over NATS
//! and verified offline (no network): the signature over the exact bytes, the key, and that the
//! money adds up.

use crate::{GlobalArgs, money};
use anyhow::Context as _;
use clap::Subcommand;
use rhizos_broker::wire::{ReceiptBody, SignedReceipt};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ReceiptCommand {
    /// Fetch the signed receipt of an ended job (JSON; to a file with --out).
    Get {
        job_id: String,
        /// Write the receipt here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a receipt file offline: exit 0 if it verifies, 4 (with the reason) if not.
    Verify {
        file: PathBuf,
        /// The orchestrator's public key (N…) the receipt must be signed with. Without it, the
        /// key the receipt names is used: that proves integrity, not who signed.
        #[arg(long)]
        orchestrator_key: Option<String>,
    },
}

pub async fn run(global: &GlobalArgs, command: ReceiptCommand) -> anyhow::Result<()> {
    match command {
        ReceiptCommand::Get { job_id, out } => {
            let receipt = global.client().await?.receipt_get(&job_id).await?;
            let text = serde_json::to_string_pretty(&receipt)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, format!("{text}\n"))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    if !global.json {
                        eprintln!(
                            "receipt of {job_id} written to {} (signed by {}); check it with: rhizos receipt verify {}",
                            path.display(),
                            receipt.orchestrator_key,
                            path.display()
                        );
                    }
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        ReceiptCommand::Verify {
            file,
            orchestrator_key,
        } => verify(global, &file, orchestrator_key.as_deref()),
    }
}

fn verify(global: &GlobalArgs, file: &PathBuf, key: Option<&str>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let receipt: SignedReceipt = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a receipt (expected {{body, orchestrator_key, signature_b64}})",
            file.display()
        )
    })?;
    match receipt.verify(key) {
        Ok(body) => {
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "orchestrator_key": receipt.orchestrator_key, "receipt": body})
                );
            } else {
                print_valid(&receipt, &body, key.is_some());
            }
            Ok(())
        }
        Err(error) => {
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": error.to_string()})
                );
            } else {
                eprintln!("receipt does NOT verify: {error}");
            }
            std::process::exit(4);
        }
    }
}

fn print_valid(receipt: &SignedReceipt, body: &ReceiptBody, key_given: bool) {
    println!(
        "receipt of job {} verifies: signed by {}{}",
        body.job_id,
        receipt.orchestrator_key,
        if key_given {
            ""
        } else {
            " (the key the receipt names; pass --orchestrator-key to check who signed)"
        }
    );
    println!(
        "  {} after attempt {} on {}",
        body.state.as_str(),
        body.attempt,
        body.node_id.as_deref().unwrap_or("no node")
    );
    println!(
        "  held {}  cost {}  provider {} ({})  fee {}  refund {}",
        money::format_usd(body.max_cost_micros),
        money::format_usd(body.cost_micros),
        money::format_usd(body.provider_micros),
        body.provider_account.as_deref().unwrap_or("-"),
        money::format_usd(body.fee_micros),
        money::format_usd(body.refund_micros)
    );
    println!(
        "  spec {}  result {}  ledger transaction {}",
        &body.spec_sha256[..16.min(body.spec_sha256.len())],
        &body.result_sha256[..16.min(body.result_sha256.len())],
        body.ledger_tx_id
    );
}
