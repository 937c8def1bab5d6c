//! `rhizos`: the RhizOS command line. Talks to the network only over NATS (the subjects in the
//! README), so everything it does can be done by any NATS client.

mod ai;
mod flow;
mod job;
mod keys;
mod local;
mod module;
mod money;
mod node;
mod plugins;
mod receipt;
mod top;
mod up;
mod users;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use rhizos_broker::wire::{EscrowKind, Event, EventBody};
use rhizos_broker::{Bus, Client, Settings};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rhizos",
    version,
    about = "RhizOS: run compute jobs on a peer-to-peer network, paid through escrow",
    long_about = "RhizOS: run compute jobs on a peer-to-peer network, paid through escrow.\n\n\
        Start a local network with `rhizos up`, then in another terminal:\n  \
        rhizos user add alice && rhizos account deposit alice 5\n  \
        rhizos job submit --account alice --wasm demo.wasm --max-cost 0.01 --wait\n\n\
        Settings come from ./rhizos.toml (or --config) and RHIZOS_<SECTION>__<KEY> variables."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// Config file (default: ./rhizos.toml when present).
    #[arg(long, global = true, env = "RHIZOS_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL (overrides [nats] url).
    #[arg(long, global = true, env = "RHIZOS_NATS_URL")]
    nats_url: Option<String>,
    /// Subject namespace (overrides [nats] namespace).
    #[arg(long, global = true, env = "RHIZOS_NAMESPACE")]
    namespace: Option<String>,
    /// Credentials file to authenticate with (`rhizos user add` / `rhizos node enroll` write
    /// them). Default: [nats] credentials, else on a network `rhizos up` runs here, the local
    /// user of the account a command names, or the local operator.
    #[arg(long, global = true, env = "RHIZOS_CREDENTIALS")]
    credentials: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// The request timeout of commands on a local cluster (`rhizos up --cluster`).
const CLUSTER_REQUEST_TIMEOUT_MS: u64 = 20_000;

impl GlobalArgs {
    /// The config file named on the command line or by RHIZOS_CONFIG, if any.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut settings = Settings::load(self.config.as_deref())?;
        if let Some(url) = &self.nats_url {
            settings.nats.url.clone_from(url);
        }
        if let Some(namespace) = &self.namespace {
            settings.nats.namespace.clone_from(namespace);
        }
        if let Some(credentials) = &self.credentials {
            settings.nats.credentials = Some(credentials.clone());
        }
        Ok(settings)
    }

    /// Settings of a command acting for `account` (None: as the operator): the local
    /// credentials of a network `rhizos up` runs here when none are configured.
    pub fn settings_for(&self, account: Option<&str>) -> anyhow::Result<Settings> {
        let mut settings = self.settings()?;
        if settings.nats.credentials.is_none()
            && let Some(network) =
                local::LocalNetwork::find(&settings.nats.url, &settings.nats.namespace)
        {
            settings.nats.credentials = network.credentials_for(account);
            // All of a local cluster's servers, so a command still connects when one is down.
            if network.url.contains(',')
                && settings.nats.request_timeout_ms
                    == rhizos_broker::config::NatsSettings::default().request_timeout_ms
            {
                // A request can wait out a failover there: the replicated ledger's stream
                // electing a new leader after a server is lost (up to ~10 s).
                settings.nats.request_timeout_ms = CLUSTER_REQUEST_TIMEOUT_MS;
            }
            settings.nats.url = network.url;
        }
        Ok(settings)
    }

    /// A connection acting as the operator (or as the configured credentials).
    pub async fn bus(&self) -> anyhow::Result<Bus> {
        self.bus_for(None).await
    }

    /// A connection acting for `account`.
    pub async fn bus_for(&self, account: Option<&str>) -> anyhow::Result<Bus> {
        let settings = self.settings_for(account)?;
        Ok(Bus::connect(&settings.nats).await?)
    }

    /// The typed control client over [`GlobalArgs::bus`].
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(self.bus().await?))
    }

    /// The typed control client acting for `account`.
    pub async fn client_for(&self, account: &str) -> anyhow::Result<Client> {
        Ok(Client::new(self.bus_for(Some(account)).await?))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Bring up a whole local network: nats-server (if none answers), the orchestrator, and one
    /// agent with the built plugins. Ctrl-C stops everything.
    Up(up::UpArgs),
    /// Create accounts, deposit and withdraw money, show balances.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Add and remove users (operator): credentials for one account each.
    #[command(subcommand)]
    User(users::UserCommand),
    /// API keys of the AI gateway: create (printed once), list, revoke.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// The AI models online nodes serve now: service, nodes (warm), context, price per 1M units.
    Models,
    /// Ask a model through the AI gateway (OpenAI-compatible HTTP); the answer streams, then
    /// what it used and cost.
    Chat(ai::ChatArgs),
    /// Submit, watch, list and cancel jobs.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Print events (job state changes, escrow movements) as they happen, or replay history.
    Events(EventsArgs),
    /// List nodes and show one node's capacity, prices, tier and record.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Check the ledger: postings sum to zero, no negative balances, every escrow consistent.
    #[command(subcommand)]
    Ledger(node::LedgerCommand),
    /// Show the plugins nodes have loaded (kind, version, backends) and the files they refused,
    /// with the reason.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Resolve chain:// registry modules through the orchestrator's resolver chain.
    #[command(subcommand)]
    Module(module::ModuleCommand),
    /// Flows: graphs of jobs whose outputs feed other jobs' inputs, with one budget. `check`
    /// reads a flow file (TOML or JSON) and shows its stages offline; `estimate` prices each
    /// step on the nodes online now. (Running flows is being built: issue 19.)
    #[command(subcommand)]
    Flow(flow::FlowCommand),
    /// Fetch a job's signed receipt, or verify one offline.
    #[command(subcommand)]
    Receipt(receipt::ReceiptCommand),
    /// Watch the network live in the terminal: nodes (load, prices, GPU use), jobs as they
    /// change, money in escrow and fees, AI requests and tokens per second. Keys: 1-3 or Tab
    /// switch pages, ↑↓ select, Enter opens a job (with its live logs) or a node (its plugins
    /// and telemetry), s sorts nodes, / filters, q quits. A user sees their own account; the
    /// operator everything. `--json` prints one snapshot instead.
    Top(top::TopArgs),
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Create a user account (name: a-z, 0-9, '_' and '-').
    Create { account: String },
    /// Add money to an account (from outside the network).
    Deposit {
        account: String,
        /// Amount in USD, e.g. 5 or 0.25 (6 decimals at most).
        amount_usd: String,
        /// Makes retries safe: a second deposit with the same key changes nothing. Default: a
        /// fresh key, printed if the deposit's outcome is unknown.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Pay money out of an account (operator; e.g. a provider's earnings), never below zero.
    Withdraw {
        account: String,
        /// Amount in USD, e.g. 5 or 0.25 (6 decimals at most).
        amount_usd: String,
        /// Required: the withdrawal happens once per key, however often the command is retried.
        #[arg(long)]
        idempotency_key: String,
    },
    /// Show the balance and the money held in escrow for running jobs.
    Balance { account: String },
    /// Show an account's postings, newest first, with the balance after each.
    Statement {
        account: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Args)]
struct EventsArgs {
    /// Only events of this job.
    #[arg(long)]
    job: Option<String>,
    /// Include node heartbeats (live only: they are not kept in the event stream; operators).
    #[arg(long)]
    heartbeats: bool,
    /// Replay history from the event stream first: a stream sequence number (e.g. 1), a time
    /// (RFC 3339, e.g. 2026-11-21T10:00:00Z) or an age (e.g. 90s, 10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match &cli.command {
        Command::Up(args) => match args.log_file() {
            Some(path) => {
                if let Err(error) = up::log_to_file(&path) {
                    eprintln!("error: {error:#}");
                    std::process::exit(1);
                }
            }
            None => rhizos_core::telemetry::init("info", false),
        },
        _ => rhizos_core::telemetry::init("warn", false),
    }
    let json = cli.global.json;
    if let Err(error) = run(cli).await {
        if json {
            println!(
                "{}",
                serde_json::json!({ "ok": false, "error": format!("{error:#}") })
            );
        } else {
            eprintln!("error: {error:#}");
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Up(args) => up::run(&global, args).await,
        Command::Account(command) => account(&global, command).await,
        Command::User(command) => users::run(&global, command).await,
        Command::Key(command) => keys::run(&global, command).await,
        Command::Models => ai::models(&global).await,
        Command::Chat(args) => ai::chat(&global, args).await,
        Command::Job(command) => job::run(&global, command).await,
        Command::Events(args) => match args.since.clone() {
            Some(since) => {
                node::replay_events(&global, &since, args.job.as_deref(), args.heartbeats).await
            }
            None => events(&global, args).await,
        },
        Command::Node(command) => node::run_node(&global, command).await,
        Command::Ledger(command) => node::run_ledger(&global, command).await,
        Command::Plugins(command) => plugins::run(&global, command).await,
        Command::Module(command) => module::run(&global, command).await,
        Command::Flow(command) => flow::run(&global, command).await,
        Command::Receipt(command) => receipt::run(&global, command).await,
        Command::Top(args) => top::run(&global, args).await,
    }
}

async fn account(global: &GlobalArgs, command: AccountCommand) -> anyhow::Result<()> {
    let acting_for = match &command {
        AccountCommand::Balance { account } | AccountCommand::Statement { account, .. } => {
            Some(account.as_str())
        }
        _ => None,
    };
    let client = Client::new(global.bus_for(acting_for).await?);
    let view = match command {
        AccountCommand::Statement { account, limit } => {
            return node::statement(global, &client, &account, limit).await;
        }
        AccountCommand::Withdraw {
            account,
            amount_usd,
            idempotency_key,
        } => {
            let amount_micros = money::parse_usd(&amount_usd).map_err(anyhow::Error::msg)?;
            client
                .account_withdraw(&account, amount_micros, &idempotency_key)
                .await
                .with_context(|| {
                    format!(
                        "if the outcome is unknown, run the same command again (same \
                         --idempotency-key {idempotency_key}): it pays out at most once"
                    )
                })?
        }
        AccountCommand::Create { account } => client.account_create(&account).await?,
        AccountCommand::Deposit {
            account,
            amount_usd,
            idempotency_key,
        } => {
            let amount_micros = money::parse_usd(&amount_usd).map_err(anyhow::Error::msg)?;
            // Always keyed: if the reply is lost, the same command with this key applies the
            // deposit at most once.
            let key =
                idempotency_key.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7().simple()));
            client
                .account_deposit(&account, amount_micros, Some(&key))
                .await
                .with_context(|| {
                    format!(
                        "the deposit may or may not have been applied: run the same command with \
                         --idempotency-key {key} to apply it exactly once"
                    )
                })?
        }
        AccountCommand::Balance { account } => client.account_balance(&account).await?,
    };
    if global.json {
        println!("{}", serde_json::to_string(&view)?);
    } else {
        println!(
            "{}: balance {} (held in escrow: {})",
            view.account,
            money::format_usd(view.balance_micros),
            money::format_usd(view.held_micros)
        );
    }
    Ok(())
}

async fn events(global: &GlobalArgs, args: EventsArgs) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let bus = global.bus().await?;
    let mut subjects = event_subjects(&bus, args.job.as_deref())?;
    if args.heartbeats && args.job.is_none() {
        // Heartbeats are not events in the stream: they travel live on core NATS only.
        subjects.push(bus.subjects.node_heartbeat_wildcard());
    }
    let mut streams = Vec::new();
    for subject in subjects {
        streams.push(
            bus.client
                .subscribe(subject.clone())
                .await
                .with_context(|| format!("cannot subscribe to {subject}"))?,
        );
    }
    let mut messages = futures::stream::select_all(streams);
    if !global.json {
        eprintln!(
            "listening for events in namespace {} (Ctrl-C to stop)",
            bus.subjects.namespace()
        );
    }
    let printer = EventPrinter::new(&bus, global.json, args.heartbeats);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            message = messages.next() => {
                let Some(message) = message else { return Ok(()) };
                if printer.print(&message.subject, &message.payload, None).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The events a connection may follow: a user only its own account's, the operator all.
pub fn event_subjects(bus: &Bus, job: Option<&str>) -> anyhow::Result<Vec<String>> {
    let own = bus
        .identity
        .as_ref()
        .filter(|c| c.role == rhizos_broker::Role::User)
        .map(|c| c.name.as_str());
    Ok(match (job, own) {
        (Some(job_id), own) => bus.subjects.job_events_of(own, job_id)?,
        (None, Some(account)) => vec![bus.subjects.account_events(account)?],
        (None, None) => vec![bus.subjects.events_wildcard()],
    })
}

/// Prints events for `rhizos events`, live or replayed: heartbeats skipped unless asked for,
/// one JSON object per line with `--json`, else one readable line (prefixed by the stream
/// sequence when replaying, so a later `--since` can resume there).
pub struct EventPrinter {
    json: bool,
    heartbeats: bool,
    heartbeat_prefix: String,
}

impl EventPrinter {
    pub fn new(bus: &Bus, json: bool, heartbeats: bool) -> Self {
        let heartbeat_prefix = bus
            .subjects
            .node_heartbeat_wildcard()
            .trim_end_matches('*')
            .to_owned();
        Self {
            json,
            heartbeats,
            heartbeat_prefix,
        }
    }

    /// Prints one event. An error means stdout is gone (e.g. piped into `head`): stop quietly.
    pub fn print(
        &self,
        subject: &str,
        payload: &[u8],
        sequence: Option<u64>,
    ) -> std::io::Result<()> {
        use std::io::Write as _;
        if subject.starts_with(self.heartbeat_prefix.as_str()) && !self.heartbeats {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        if self.json {
            let body: serde_json::Value = serde_json::from_slice(payload).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
            });
            let mut line = serde_json::json!({ "subject": subject, "event": body });
            if let Some(sequence) = sequence {
                line["seq"] = sequence.into();
            }
            writeln!(out, "{line}")
        } else {
            match sequence {
                Some(sequence) => {
                    writeln!(out, "[{sequence}] {}", describe_event(subject, payload))
                }
                None => writeln!(out, "{}", describe_event(subject, payload)),
            }
        }
    }
}

pub fn describe_event(subject: &str, payload: &[u8]) -> String {
    match serde_json::from_slice::<Event>(payload) {
        Ok(Event {
            body:
                EventBody::Job {
                    job_id,
                    state,
                    attempt,
                    node_id,
                    reason,
                },
            ..
        }) => {
            let mut line = format!("job {job_id} {} (attempt {attempt}", state.as_str());
            if let Some(node) = node_id {
                line.push_str(&format!(", node {node}"));
            }
            line.push(')');
            if let Some(reason) = reason {
                line.push_str(&format!(": {reason}"));
            }
            line
        }
        Ok(Event {
            body:
                EventBody::Flow {
                    flow_id,
                    step,
                    state,
                    job_id,
                    reason,
                },
            ..
        }) => {
            let mut line = match step {
                Some(step) => format!("flow {flow_id} step {step} {state}"),
                None => format!("flow {flow_id} {state}"),
            };
            if let Some(job_id) = job_id {
                line.push_str(&format!(" (job {job_id})"));
            }
            if let Some(reason) = reason {
                line.push_str(&format!(": {reason}"));
            }
            line
        }
        Ok(Event {
            body:
                EventBody::Escrow {
                    job_id,
                    kind,
                    account,
                    amount_micros,
                    provider_micros,
                    fee_micros,
                    refund_micros,
                    ..
                },
            ..
        }) => {
            let kind = match kind {
                EscrowKind::Held => "held",
                EscrowKind::Settled => "settled",
                EscrowKind::Refunded => "refunded",
            };
            let mut line = format!(
                "escrow {kind} for job {job_id}: {} ({account})",
                money::format_usd(amount_micros)
            );
            if let (Some(p), Some(f), Some(r)) = (provider_micros, fee_micros, refund_micros) {
                line.push_str(&format!(
                    ", provider {}, fee {}, refund {}",
                    money::format_usd(p),
                    money::format_usd(f),
                    money::format_usd(r)
                ));
            }
            line
        }
        Err(_) => format!("{subject}: {}", String::from_utf8_lossy(payload)),
    }
}
