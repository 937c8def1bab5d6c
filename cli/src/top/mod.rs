//! `rhizos top`: the network live in the terminal (ratatui + crossterm).
//!
//! Everything comes from the bus, with no request per node: one `network.stats` a second (the
//! orchestrator reads the network's figures at most once a second however many ask), the node
//! list every few seconds (one paged request), and subscriptions — job and escrow events (a
//! user's own account's; the operator's all), node heartbeats (operator: load and GPU telemetry
//! between lists), and the open job's log lines. The bus enforces who sees what: a user's
//! connection can subscribe only to its own account's events and logs.

mod model;
mod ui;

pub use model::{Command, Model, Scope, Update};

use crate::GlobalArgs;
use anyhow::Context as _;
use clap::Args;
use crossterm::event::{Event as TermEvent, EventStream, KeyEventKind};
use futures::StreamExt as _;
use rhizos_broker::wire::{Event, Heartbeat, LogBatch};
use rhizos_broker::{Bus, Client, Role};
use std::io::IsTerminal as _;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Args, Debug)]
pub struct TopArgs {
    /// Watch one account (its jobs, balance and escrow) instead of the whole network. Default:
    /// the account of the credentials when they are a user's, else the whole network.
    #[arg(long)]
    account: Option<String>,
    /// How often to ask for the network's figures, in milliseconds (the node list: every 5th
    /// time).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    interval_ms: u64,
}

pub async fn run(global: &GlobalArgs, args: TopArgs) -> anyhow::Result<()> {
    let bus = global.bus_for(args.account.as_deref()).await?;
    let scope = match (&args.account, &bus.identity) {
        (Some(account), _) => Scope::Account(account.clone()),
        (None, Some(caller)) if caller.role == Role::User => Scope::Account(caller.name.clone()),
        _ => Scope::Operator,
    };
    let client = Client::new(bus.clone());
    if global.json {
        // One snapshot for scripts: the figures and the nodes, as the bus answered them.
        let account = match &scope {
            Scope::Account(account) => Some(account.as_str()),
            Scope::Operator => None,
        };
        let stats = client.network_stats(account).await?;
        let nodes = client.node_list().await?;
        println!(
            "{}",
            serde_json::json!({ "ok": true, "stats": stats, "nodes": nodes.nodes })
        );
        return Ok(());
    }
    anyhow::ensure!(
        std::io::stdout().is_terminal(),
        "rhizos top draws in a terminal; for a snapshot a script can read, run `rhizos top --json`"
    );
    let (updates, mut receiver) = mpsc::channel::<Update>(8_192);
    let mut tasks = feeds(&bus, &client, &scope, args.interval_ms, &updates).await?;
    let mut model = Model::new(scope, bus.subjects.namespace(), rhizos_core::now_ms());
    let mut terminal = ratatui::init();
    let result = ui_loop(
        &mut terminal,
        &mut model,
        &mut receiver,
        &bus,
        &client,
        &updates,
        &mut tasks,
    )
    .await;
    ratatui::restore();
    for task in tasks {
        task.abort();
    }
    result
}

async fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    model: &mut Model,
    receiver: &mut mpsc::Receiver<Update>,
    bus: &Bus,
    client: &Client,
    updates: &mpsc::Sender<Update>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<()> {
    let mut keys = EventStream::new();
    // Redraws at most 5 times a second however fast the bus is, at once after a key.
    let mut frame = tokio::time::interval(Duration::from_millis(200));
    frame.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut detail: Option<JoinHandle<()>> = None;
    let mut dirty = true;
    loop {
        let command = tokio::select! {
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(key))) if key.kind != KeyEventKind::Release => {
                    let command = model.key(key);
                    terminal.draw(|f| ui::draw(f, model))?;
                    command
                }
                Some(Ok(TermEvent::Resize(..))) => {
                    terminal.draw(|f| ui::draw(f, model))?;
                    None
                }
                Some(Ok(_)) => None,
                Some(Err(e)) => return Err(e).context("cannot read the terminal"),
                None => return Ok(()),
            },
            update = receiver.recv() => {
                let Some(update) = update else { return Ok(()) };
                dirty = true;
                let mut command = model.apply(update);
                // Take what else is waiting before drawing again.
                while command.is_none()
                    && let Ok(update) = receiver.try_recv()
                {
                    command = model.apply(update);
                }
                command
            }
            _ = frame.tick() => {
                let now = rhizos_core::now_ms();
                if dirty || now / 1_000 != model.now_ms / 1_000 {
                    model.now_ms = now;
                    terminal.draw(|f| ui::draw(f, model))?;
                    dirty = false;
                }
                None
            }
        };
        match command {
            None => {}
            Some(Command::Quit) => return Ok(()),
            Some(Command::Close) => {
                if let Some(task) = detail.take() {
                    task.abort();
                }
            }
            Some(Command::OpenJob(job_id, account)) => {
                if let Some(task) = detail.take() {
                    task.abort();
                }
                detail = Some(follow_job(bus, client, updates, job_id, account).await);
            }
            Some(Command::RefreshJob(job_id)) => {
                let (client, updates) = (client.clone(), updates.clone());
                tasks.push(tokio::spawn(async move {
                    if let Ok(view) = client.job_get(&job_id).await {
                        let _ = updates.send(Update::Job(Box::new(view))).await;
                    }
                }));
                tasks.retain(|t| !t.is_finished());
            }
            Some(Command::OpenNode(node_id)) => {
                if let Some(task) = detail.take() {
                    task.abort();
                }
                let (client, updates) = (client.clone(), updates.clone());
                detail = Some(tokio::spawn(async move {
                    let answer = client
                        .node_plugins(&node_id)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = updates.send(Update::Plugins(node_id, answer)).await;
                }));
            }
        }
    }
}

/// Fetches the job and follows its log lines until the detail closes.
async fn follow_job(
    bus: &Bus,
    client: &Client,
    updates: &mpsc::Sender<Update>,
    job_id: String,
    account: String,
) -> JoinHandle<()> {
    let account = (!account.is_empty()).then_some(account);
    let subscription = match bus.subjects.job_logs_of(account.as_deref(), &job_id) {
        Ok(subject) => bus.client.subscribe(subject).await.ok(),
        Err(_) => None,
    };
    let (client, updates) = (client.clone(), updates.clone());
    tokio::spawn(async move {
        match client.job_get(&job_id).await {
            Ok(view) => {
                let _ = updates.send(Update::Job(Box::new(view))).await;
            }
            Err(e) => {
                let _ = updates
                    .send(Update::Problem(Some(format!("job {job_id}: {e}"))))
                    .await;
            }
        }
        let Some(mut logs) = subscription else { return };
        while let Some(message) = logs.next().await {
            if let Ok(batch) = serde_json::from_slice::<LogBatch>(&message.payload)
                && updates.send(Update::Logs(batch)).await.is_err()
            {
                return;
            }
        }
    })
}

/// The tasks that feed the model: pollers for the figures and the nodes, and the event and
/// heartbeat subscriptions.
async fn feeds(
    bus: &Bus,
    client: &Client,
    scope: &Scope,
    interval_ms: u64,
    updates: &mpsc::Sender<Update>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let account = match scope {
        Scope::Account(account) => Some(account.clone()),
        Scope::Operator => None,
    };
    let mut tasks = Vec::new();
    {
        let (client, updates, account) = (client.clone(), updates.clone(), account.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut round = 0_u64;
            loop {
                tick.tick().await;
                let mut problem = None;
                match client.network_stats(account.as_deref()).await {
                    Ok(stats) => {
                        if updates.send(Update::Stats(Box::new(stats))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => problem = Some(format!("network.stats: {e}")),
                }
                if round.is_multiple_of(5) {
                    match client.node_list().await {
                        Ok(list) => {
                            let _ = updates.send(Update::Nodes(list.nodes)).await;
                        }
                        Err(e) => problem = Some(format!("node.list: {e}")),
                    }
                }
                if round == 0 {
                    match client.job_list(account.as_deref(), None, Some(200)).await {
                        Ok(list) => {
                            let _ = updates.send(Update::Jobs(list.jobs)).await;
                        }
                        Err(e) => problem = Some(format!("job.list: {e}")),
                    }
                }
                round += 1;
                if updates.send(Update::Problem(problem)).await.is_err() {
                    return;
                }
            }
        }));
    }
    let events = match &account {
        Some(account) => bus.subjects.account_events(account)?,
        None => bus.subjects.events_wildcard(),
    };
    let mut subscription = bus
        .client
        .subscribe(events.clone())
        .await
        .with_context(|| format!("cannot subscribe to {events}"))?;
    let namespace = bus.subjects.namespace().to_owned();
    let sender = updates.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(message) = subscription.next().await {
            let Ok(event) = serde_json::from_slice::<Event>(&message.payload) else {
                continue;
            };
            let account = event_account(&namespace, &message.subject);
            if sender.send(Update::Event(account, event)).await.is_err() {
                return;
            }
        }
    }));
    if account.is_none() {
        // Heartbeats are the operator's to read: live load and GPU telemetry between lists.
        let subject = bus.subjects.node_heartbeat_wildcard();
        let mut beats = bus
            .client
            .subscribe(subject.clone())
            .await
            .with_context(|| format!("cannot subscribe to {subject}"))?;
        let sender = updates.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = beats.next().await {
                let Ok(beat) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
                    continue;
                };
                if sender.send(Update::Heartbeat(beat)).await.is_err() {
                    return;
                }
            }
        }));
    }
    Ok(tasks)
}

/// The account an event's subject names: `rhizos.evt.v1.<ns>.u.<account>.…`.
fn event_account(namespace: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix("rhizos.evt.v1.")?;
    let rest = rest.strip_prefix(namespace)?.strip_prefix(".u.")?;
    rest.split('.').next().map(str::to_owned)
}

#[cfg(test)]
mod tests;
