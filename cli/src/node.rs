//! `rhizos node list|info`, `rhizos ledger verify`, `rhizos account statement`, and
//! `rhizos events --since` (replay from the JetStream event stream).

use crate::{GlobalArgs, money};
use anyhow::Context as _;
use clap::Subcommand;
use futures::StreamExt as _;
use rhizos_broker::Client;
use rhizos_broker::wire::{NodeList, NodeView};
use std::time::Duration;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Every registered node: status, tier, capacity, load, prices, record.
    List,
    /// One node in full, with its plugins.
    Info { node_id: String },
    /// Enrol a node (operator): fixes its id and the provider account its earnings are paid
    /// into, and writes its credentials (mode 0600) for the machine that runs it.
    Enroll {
        /// The node's id (a-z, 0-9, '_' and '-'): what its agent registers as.
        node_id: String,
        /// The account the node's earnings are paid into; fixed: its registrations cannot
        /// change it.
        #[arg(long)]
        provider_account: String,
        #[command(flatten)]
        target: crate::users::Target,
    },
    /// Revoke a node: its connection is closed and refused, its registrations too; its jobs are
    /// requeued when its heartbeats stop.
    Remove {
        /// The node to revoke.
        node_id: String,
        #[command(flatten)]
        target: crate::users::Target,
    },
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Check every invariant; exits 4 if one is broken.
    Verify,
    /// Which orchestrator is active (the lease holder: pid, host, data dir, lease age) and,
    /// with a replicated ledger, its stream: records, copies, leader, and any replica behind.
    Status,
}

pub async fn run_node(global: &GlobalArgs, command: NodeCommand) -> anyhow::Result<()> {
    let client = global.client().await?;
    match command {
        NodeCommand::Enroll {
            node_id,
            provider_account,
            target,
        } => {
            let caller = rhizos_broker::Caller::new(rhizos_broker::Role::Node, &node_id)?;
            let network = crate::users::network(global, &target)?;
            let creds = match (&network, &target.out) {
                (Some(network), _) => network.credentials_path(&caller),
                (None, Some(out)) => out.clone(),
                (None, None) => anyhow::bail!(
                    "no network brought up by `rhizos up` here: pass --out FILE for the node's \
                     credentials (and add the printed user to your nats-server's config)"
                ),
            };
            let key = if creds.is_file() {
                rhizos_broker::Credentials::load(&creds)?
                    .public_key()
                    .map_err(anyhow::Error::msg)?
            } else {
                let fresh = rhizos_broker::Credentials::generate(&caller);
                fresh.save(&creds)?;
                fresh.public_key().map_err(anyhow::Error::msg)?
            };
            // The orchestrator first: a refused enrolment lets no key in.
            let enrolment = client
                .node_enroll(&node_id, &provider_account, Some(&key))
                .await?;
            let (path, _) =
                crate::users::admit(global, network.as_ref(), &caller, target.out.as_ref())?;
            if global.json {
                println!(
                    "{}",
                    serde_json::json!({"enrolment": enrolment, "credentials": path})
                );
            } else {
                println!(
                    "✓ node {node_id} enrolled: paid into {}, credentials {} (key {key})",
                    enrolment.provider_account,
                    path.display()
                );
            }
        }
        NodeCommand::Remove { node_id, target } => {
            let caller = rhizos_broker::Caller::new(rhizos_broker::Role::Node, &node_id)?;
            let network = crate::users::network(global, &target)?;
            let enrolment = client.node_remove(&node_id).await?;
            crate::users::revoke(network.as_ref(), &caller)?;
            if global.json {
                println!("{}", serde_json::to_string(&enrolment)?);
            } else {
                println!("✓ node {node_id} removed: its connection and registrations are refused");
            }
        }
        NodeCommand::List => {
            let list = client.node_list().await?;
            if global.json {
                println!("{}", serde_json::to_string(&list)?);
            } else {
                print_node_list(&list);
            }
        }
        NodeCommand::Info { node_id } => {
            let node = client.node_info(&node_id).await?;
            if global.json {
                println!("{}", serde_json::to_string(&node)?);
            } else {
                print_node(&node);
            }
        }
    }
    Ok(())
}

fn print_node_list(list: &NodeList) {
    if list.nodes.is_empty() {
        println!("no nodes registered");
        return;
    }
    println!(
        "{:<20} {:<6} {:<4} {:<14} {:>5} {:>9} {:>6} {:>10} {:>6} {:>5}",
        "NODE", "STATUS", "TIER", "BACKENDS", "CORES", "MEM MIB", "LOAD", "CPU $/H", "JOBS", "REP"
    );
    for n in &list.nodes {
        println!(
            "{:<20} {:<6} {:<4} {:<14} {:>5} {:>9} {:>6} {:>10} {:>6} {:>5.2}",
            n.node_id,
            n.status,
            n.tier,
            n.backends.join(","),
            n.cpu_cores,
            n.memory_mib,
            format!("{}/{}", n.active, n.max_concurrent),
            money::format_usd(n.pricing.cpu_hour_cents as i64 * 10_000),
            n.jobs_run,
            n.reputation
        );
    }
}

fn print_node(node: &NodeView) {
    println!(
        "node {} ({}, tier {})",
        node.node_id, node.status, node.tier
    );
    println!("  provider account: {}", node.provider_account);
    println!("  last heartbeat:   {} ms ago", node.last_heartbeat_ms_ago);
    println!("  backends:         {}", node.backends.join(", "));
    println!(
        "  capacity:         {} cores, {} MiB, {} slots ({} busy)",
        node.cpu_cores, node.memory_mib, node.max_concurrent, node.active
    );
    if let Some(hw) = &node.hardware {
        println!(
            "  cpu:              {} ({} cores, {} threads; {})",
            hw.cpu_model,
            hw.cpu_cores,
            hw.cpu_threads,
            if hw.cpu_features.is_empty() {
                "no extended features".to_owned()
            } else {
                hw.cpu_features.join(" ")
            }
        );
        println!("  os:               {} (kernel {})", hw.os, hw.kernel);
        println!(
            "  runtimes:         {}",
            if hw.runtimes.is_empty() {
                "none".to_owned()
            } else {
                hw.runtimes.join(", ")
            }
        );
    }
    if node.gpus.is_empty() {
        let why = node
            .hardware
            .as_ref()
            .and_then(|hw| hw.gpu_note.clone())
            .unwrap_or_else(|| "none".to_owned());
        println!("  gpus:             {why}");
    }
    if let Some(driver) = node.hardware.as_ref().and_then(|hw| hw.gpu_driver.as_ref()) {
        println!("  gpu driver:       {driver}");
    }
    for gpu in &node.gpus {
        let now = gpu
            .uuid
            .as_ref()
            .and_then(|uuid| node.gpu_telemetry.iter().find(|t| &t.uuid == uuid));
        println!(
            "  gpu:              {} {} ({} MiB; {}{}){}",
            gpu.name,
            gpu.uuid.as_deref().unwrap_or(""),
            gpu.vram_mib,
            gpu.apis.join(", "),
            gpu.compute_capability
                .as_deref()
                .map(|c| format!(", compute {c}"))
                .unwrap_or_default(),
            now.map(|t| format!(
                " — now {}% busy, {}/{} MiB, {} °C, {:.1} W",
                t.utilization_pct,
                t.vram_used_mib,
                t.vram_total_mib,
                t.temperature_c,
                f64::from(t.power_mw) / 1000.0
            ))
            .unwrap_or_default()
        );
    }
    println!(
        "  prices per hour:  cpu {}, memory/GiB {}, gpu {}",
        money::format_usd(node.pricing.cpu_hour_cents as i64 * 10_000),
        money::format_usd(node.pricing.memory_gb_hour_cents as i64 * 10_000),
        money::format_usd(node.pricing.gpu_hour_cents as i64 * 10_000)
    );
    println!(
        "  record:           {} jobs ended, {} succeeded, reputation {:.2}",
        node.jobs_run, node.jobs_succeeded, node.reputation
    );
    for plugin in &node.plugins {
        match &plugin.refused {
            None => println!(
                "  plugin:           {} {} ({}){}",
                plugin.name.as_deref().unwrap_or("?"),
                plugin.version.as_deref().unwrap_or("?"),
                plugin.file,
                plugin
                    .note
                    .as_deref()
                    .map(|n| format!(" — offers nothing: {n}"))
                    .unwrap_or_default()
            ),
            Some(reason) => println!("  refused plugin:   {}: {reason}", plugin.file),
        }
    }
}

pub async fn run_ledger(global: &GlobalArgs, command: LedgerCommand) -> anyhow::Result<()> {
    let client = global.client().await?;
    match command {
        LedgerCommand::Status => ledger_status(global).await?,
        LedgerCommand::Verify => {
            let report = client.ledger_verify().await?;
            if global.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "{}: {} accounts, {} transactions, {} jobs; postings sum to {}",
                    if report.ok {
                        "ledger OK"
                    } else {
                        "LEDGER BROKEN"
                    },
                    report.accounts,
                    report.transactions,
                    report.jobs_checked,
                    report.postings_sum_micros
                );
                for problem in &report.problems {
                    println!("  ✗ {problem}");
                }
            }
            if !report.ok {
                std::process::exit(4);
            }
        }
    }
    Ok(())
}

pub async fn statement(
    global: &GlobalArgs,
    client: &Client,
    account: &str,
    limit: u32,
) -> anyhow::Result<()> {
    let statement = client.account_statement(account, Some(limit)).await?;
    if global.json {
        println!("{}", serde_json::to_string(&statement)?);
        return Ok(());
    }
    println!(
        "{}: balance {}",
        statement.account,
        money::format_usd(statement.balance_micros)
    );
    println!(
        "{:>8} {:<9} {:<40} {:>14} {:>14}",
        "TX", "KIND", "JOB", "AMOUNT", "BALANCE"
    );
    for line in &statement.lines {
        println!(
            "{:>8} {:<9} {:<40} {:>14} {:>14}",
            line.tx_id,
            line.kind,
            line.job_id.as_deref().unwrap_or("-"),
            money::format_usd(line.amount_micros),
            money::format_usd(line.balance_after_micros)
        );
    }
    Ok(())
}

/// Where a replay starts.
#[derive(Debug, PartialEq)]
enum Since {
    Sequence(u64),
    Time(time::OffsetDateTime),
}

fn parse_since(text: &str, now: time::OffsetDateTime) -> anyhow::Result<Since> {
    if let Ok(sequence) = text.parse::<u64>() {
        return Ok(Since::Sequence(sequence.max(1)));
    }
    if let Ok(at) =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(Since::Time(at));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().with_context(|| {
        format!("--since {text:?}: use a sequence (42), an RFC 3339 time (2026-11-21T10:00:00Z) or an age (90s, 10m, 2h, 1d)")
    })?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3_600,
        "d" => number * 86_400,
        other => anyhow::bail!("--since {text:?}: unknown unit {other:?} (s, m, h or d)"),
    };
    Ok(Since::Time(now - Duration::from_secs(seconds)))
}

/// Replays the event stream from `since`, then keeps following it.
pub async fn replay_events(
    global: &GlobalArgs,
    since: &str,
    job: Option<&str>,
    heartbeats: bool,
) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let bus = global.bus().await?;
    let deliver_policy = match parse_since(since, time::OffsetDateTime::now_utc())? {
        Since::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
        Since::Time(start_time) => DeliverPolicy::ByStartTime { start_time },
    };
    let filter_subjects = crate::event_subjects(&bus, job)?;
    let stream = bus.ensure_event_stream().await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy,
            filter_subjects,
            ..Default::default()
        })
        .await
        .context("cannot read the event stream")?;
    let mut messages = consumer
        .messages()
        .await
        .context("cannot read the event stream")?;
    let printer = crate::EventPrinter::new(&bus, global.json, heartbeats);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                let message = message.context("event stream failed")?;
                let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                if printer.print(&message.subject, &message.payload, Some(sequence)).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// `rhizos ledger status`: read straight from JetStream (the lease bucket and the ledger
/// stream), so it answers while no orchestrator serves — during a failover, say.
async fn ledger_status(global: &GlobalArgs) -> anyhow::Result<()> {
    use rhizos_core::orchestrator::lease;
    let bus = global.bus().await?;
    let ns = bus.subjects.namespace().to_owned();
    // Asked again a few times: mid-failover the bucket's servers may be electing a leader.
    let mut active = None;
    let mut last_error = None;
    for _ in 0..10 {
        use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
        let bucket = lease::bucket_name(&ns);
        match bus.jetstream.get_stream(format!("KV_{bucket}")).await {
            Ok(_) => {}
            // No bucket: no orchestrator ever served this namespace.
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                last_error = None;
                break;
            }
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        }
        let kv = match bus.jetstream.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        match kv.entry(lease::KEY).await {
            Ok(Some(entry)) => {
                let written = std::time::SystemTime::from(entry.created);
                let age_ms = written
                    .elapsed()
                    .map(|age| age.as_millis() as u64)
                    .unwrap_or(0);
                let holder: Option<lease::Holder> = serde_json::from_slice(&entry.value).ok();
                active = Some(serde_json::json!({
                    "holder": holder,
                    "renewed_ms_ago": age_ms,
                    "revision": entry.revision,
                }));
                last_error = None;
                break;
            }
            Ok(None) => {
                last_error = None;
                break;
            }
            Err(e) => {
                last_error = Some(e.to_string());
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
    if let Some(e) = last_error {
        anyhow::bail!(
            "cannot read the orchestrator lease: {e} (operator credentials are needed; mid-failover, try again)"
        );
    }
    let replicated = match bus.jetstream.get_stream(bus.subjects.ledger_stream()).await {
        Ok(mut stream) => {
            let info = stream.info().await?;
            let cluster = info.cluster.clone();
            // Asked again a few times too: mid-failover its leader may be being elected.
            let mut snapshot = None;
            for _ in 0..5 {
                if let Ok(Some(log)) =
                    rhizos_core::orchestrator::replica::LedgerLog::existing(&bus).await
                    && let Ok(latest) = log.latest_snapshot().await
                {
                    snapshot = latest;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Some(serde_json::json!({
                "stream": info.config.name,
                "records": info.state.last_sequence,
                "first_kept": info.state.first_sequence,
                "bytes": info.state.bytes,
                "latest_snapshot": snapshot.map(|s| serde_json::json!({
                    "position": s.position, "covers": s.covers, "object": s.object,
                })),
                "copies": info.config.num_replicas,
                "leader": cluster.as_ref().and_then(|c| c.leader.clone()),
                "replicas": cluster.map(|c| c.replicas.into_iter().map(|r| serde_json::json!({
                    "server": r.name, "current": r.current, "lag": r.lag,
                })).collect::<Vec<_>>()).unwrap_or_default(),
            }))
        }
        Err(_) => None,
    };
    let status = serde_json::json!({ "active": active, "replicated_ledger": replicated });
    if global.json {
        println!("{status}");
        return Ok(());
    }
    match &status["active"] {
        serde_json::Value::Null => {
            println!("no orchestrator has taken the lease in namespace {ns}")
        }
        active => {
            let holder = &active["holder"];
            let state = if holder["released"].as_bool() == Some(true) {
                "released (stopped cleanly)"
            } else if active["renewed_ms_ago"].as_u64() > holder["ttl_ms"].as_u64() {
                "LAPSED (not renewed within its TTL: a standby takes over)"
            } else {
                "active"
            };
            println!(
                "orchestrator: {state} — pid {} on {} ({}), ledger {}, lease renewed {} ms ago (TTL {} ms)",
                holder["pid"],
                holder["host"].as_str().unwrap_or("?"),
                holder["data_dir"].as_str().unwrap_or("?"),
                holder["ledger"].as_str().unwrap_or("?"),
                active["renewed_ms_ago"],
                holder["ttl_ms"]
            );
        }
    }
    match &status["replicated_ledger"] {
        serde_json::Value::Null => {
            println!("ledger: not replicated (the active orchestrator's SQLite file is the ledger)")
        }
        ledger => {
            println!(
                "replicated ledger: stream {}, {} records (kept from {}, {} bytes), {} copies, leader {}",
                ledger["stream"].as_str().unwrap_or("?"),
                ledger["records"],
                ledger["first_kept"],
                ledger["bytes"],
                ledger["copies"],
                ledger["leader"].as_str().unwrap_or("none (no quorum?)")
            );
            match &ledger["latest_snapshot"] {
                serde_json::Value::Null => println!("  latest snapshot: none readable"),
                snapshot => println!(
                    "  latest snapshot: record {}, holding the ledger up to record {}",
                    snapshot["position"], snapshot["covers"]
                ),
            }
            for replica in ledger["replicas"].as_array().into_iter().flatten() {
                println!(
                    "  replica {}: {}, {} records behind",
                    replica["server"].as_str().unwrap_or("?"),
                    if replica["current"].as_bool() == Some(true) {
                        "current"
                    } else {
                        "NOT current"
                    },
                    replica["lag"]
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_sequences_times_and_ages() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        assert_eq!(parse_since("42", now).unwrap(), Since::Sequence(42));
        assert_eq!(parse_since("0", now).unwrap(), Since::Sequence(1));
        assert_eq!(
            parse_since("10m", now).unwrap(),
            Since::Time(now - Duration::from_secs(600))
        );
        assert_eq!(
            parse_since("1d", now).unwrap(),
            Since::Time(now - Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_since("1970-01-12T13:46:40Z", now).unwrap(),
            Since::Time(time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap())
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(
            parse_since("5w", now)
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
    }
}
