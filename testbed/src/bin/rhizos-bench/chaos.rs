//! `chaos` and `cluster`: a whole network of real processes on this machine — three
//! nats-servers in a cluster (everything kept on three), two `rhizosd orchestrator`s sharing
//! the replicated ledger, `rhizosd agent`s running the demo WASM module — with jobs flowing
//! from a client that retries each request with its idempotency key, while processes are
//! killed with `kill -9` and started again.
//!
//! * `chaos`: at moments and on victims drawn from `--seed` (the same seed, the same faults):
//!   the active orchestrator, the standby, an agent, a nats-server (one at a time: the
//!   cluster keeps its quorum). `--seeds N` runs seeds `seed..seed+N`.
//! * `cluster`: one nats-server killed a third of the way through and started again at two
//!   thirds; the failover time is the longest a request waited.
//!
//! Afterwards every seed is checked: every job ended; none was settled twice (each job's
//! escrow events); `ledger verify` passes; the user's balance is the deposit less every job's
//! cost, and user + provider + fees hold exactly what was deposited; the stream and both
//! orchestrators' files agree row for row. Writes `<name>.json` and `<name>.png` (each
//! request's latency over time, the faults marked) to `--out`.

use crate::limits::{self, Limits};
use crate::report::{self, Tail};
use futures::StreamExt as _;
use rand::{RngExt as _, SeedableRng as _, rngs::StdRng};
use rhizos_broker::wire::{
    AccountRef, AccountView, CreateAccount, Deposit, ErrorCode, EscrowKind, Event, EventBody,
    JobRef, JobView, LedgerReport, SubmitJob, VerifyLedger, WIRE_VERSION,
};
use rhizos_broker::{Bus, RequestError, Settings};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `rhizos-bench chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The first seed: it draws the faults' moments and victims.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many seeds to run (seed, seed+1, …); the full run is 100.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Jobs submitted per seed.
    #[arg(long, default_value_t = 60)]
    pub jobs: usize,
    /// Jobs submitted per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Processes killed per seed.
    #[arg(long, default_value_t = 3)]
    pub faults: usize,
    /// Agent processes.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// The orchestrators' lease TTL: how soon a standby takes over a killed active one (and
    /// how long the active may go unable to renew it: a nats-server lost can cost a
    /// failover when it is short).
    #[arg(long, default_value_t = 2_000)]
    pub lease_ms: u64,
    /// `[orchestrator] ledger_snapshot_every`: small, so that snapshots are taken and the
    /// stream trimmed while processes die (0: never).
    #[arg(long, default_value_t = 40)]
    pub snapshot_every: u64,
    /// Where chaos.json and chaos.png go.
    #[arg(long, default_value = "target/chaos")]
    pub out: PathBuf,
}

/// `rhizos-bench cluster`.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterOptions {
    /// Jobs submitted.
    #[arg(long, default_value_t = 90)]
    pub jobs: usize,
    /// Jobs submitted per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// The orchestrators' lease TTL (the default of rhizosd: long enough that a nats-server
    /// lost does not cost an orchestrator failover).
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u64,
    /// Where cluster.json and cluster.png go.
    #[arg(long, default_value = "target/cluster")]
    pub out: PathBuf,
}

/// What a fault kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Victim {
    ActiveOrchestrator,
    StandbyOrchestrator,
    Agent(usize),
    NatsServer(usize),
}

impl std::fmt::Display for Victim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Victim::ActiveOrchestrator => write!(f, "active orchestrator"),
            Victim::StandbyOrchestrator => write!(f, "standby orchestrator"),
            Victim::Agent(i) => write!(f, "agent {}", i + 1),
            Victim::NatsServer(i) => write!(f, "nats-server {}", i + 1),
        }
    }
}

/// A fault as planned and as it happened.
#[derive(Debug, Clone, Serialize)]
struct Fault {
    victim: Victim,
    /// Seconds after the first submit.
    at_s: f64,
    down_s: f64,
    /// The process killed (orchestrators: which data dir, 1 or 2).
    killed: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// When the request was first sent, seconds after the first submit.
    at_s: f64,
    ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    seed: u64,
    jobs: usize,
    succeeded: usize,
    failed: usize,
    faults: Vec<Fault>,
    /// Submit latency (until answered, resends included).
    submit_ms: Tail,
    /// The longest any request waited: a failover's cost.
    longest_wait_ms: f64,
    violations: Vec<String>,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    seeds: Vec<SeedReport>,
    violations: usize,
    limits: Limits,
    chart: PathBuf,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} on 3 nats-servers, 2 orchestrators (replicated ledger), real agents ({} build):",
            self.bench, self.build
        )?;
        for seed in &self.seeds {
            let faults: Vec<String> = seed
                .faults
                .iter()
                .map(|fault| {
                    format!(
                        "{} at {:.1} s for {:.1} s",
                        fault.victim, fault.at_s, fault.down_s
                    )
                })
                .collect();
            writeln!(
                f,
                "  seed {}: {} jobs ({} succeeded, {} failed); faults: {}; submit p50 {:.1} ms p99 {:.1} ms; longest wait {:.0} ms; {}",
                seed.seed,
                seed.jobs,
                seed.succeeded,
                seed.failed,
                if faults.is_empty() {
                    "none".into()
                } else {
                    faults.join(", ")
                },
                seed.submit_ms.p50,
                seed.submit_ms.p99,
                seed.longest_wait_ms,
                if seed.violations.is_empty() {
                    "no violation".to_owned()
                } else {
                    format!("VIOLATIONS: {}", seed.violations.join("; "))
                }
            )?;
        }
        write!(f, "{}", self.limits)?;
        writeln!(
            f,
            "  {} seeds, {} violations; chart {}",
            self.seeds.len(),
            self.violations,
            self.chart.display()
        )
    }
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.jobs > 0 && options.rate > 0.0,
        "--jobs and --rate must be > 0"
    );
    anyhow::ensure!(options.agents >= 1, "--agents must be at least 1");
    let mut seeds = Vec::new();
    let mut limits = None;
    for seed in options.seed..options.seed + options.seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let window = options.jobs as f64 / options.rate;
        let mut moments: Vec<f64> = (0..options.faults)
            .map(|_| rng.random_range(0.1..0.8) * window)
            .collect();
        moments.sort_by(f64::total_cmp);
        let faults = moments
            .into_iter()
            .map(|at_s| {
                let victim = match rng.random_range(0..100) {
                    0..35 => Victim::ActiveOrchestrator,
                    35..50 => Victim::StandbyOrchestrator,
                    50..75 => Victim::Agent(rng.random_range(0..options.agents)),
                    _ => Victim::NatsServer(rng.random_range(0..3)),
                };
                Fault {
                    victim,
                    at_s,
                    down_s: rng.random_range(0.3..3.0),
                    killed: None,
                }
            })
            .collect();
        eprintln!("… seed {seed}");
        let (report, measured) = run_seed(seed, &options, faults, limits.is_none()).await?;
        limits = limits.or(measured);
        eprintln!(
            "  seed {seed}: {} succeeded, {} violations",
            report.succeeded,
            report.violations.len()
        );
        seeds.push(report);
    }
    finish("chaos", seeds, limits, &options.out)
}

pub async fn run_cluster(options: ClusterOptions) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.jobs > 0 && options.rate > 0.0,
        "--jobs and --rate must be > 0"
    );
    let window = options.jobs as f64 / options.rate;
    let faults = vec![Fault {
        victim: Victim::NatsServer(0),
        at_s: window / 3.0,
        down_s: window / 3.0,
        killed: None,
    }];
    let chaos = Options {
        seed: 0,
        seeds: 1,
        jobs: options.jobs,
        rate: options.rate,
        faults: 1,
        agents: 2,
        lease_ms: options.lease_ms,
        snapshot_every: 0,
        out: options.out.clone(),
    };
    let (report, limits) = run_seed(0, &chaos, faults, true).await?;
    finish("cluster", vec![report], limits, &options.out)
}

fn finish(
    name: &'static str,
    seeds: Vec<SeedReport>,
    limits: Option<Limits>,
    out: &Path,
) -> anyhow::Result<Report> {
    std::fs::create_dir_all(out)?;
    let chart = out.join(format!("{name}.png"));
    // The chart shows the seed with the most faults (the first such).
    if let Some(shown) = seeds
        .iter()
        .max_by_key(|s| (s.faults.len(), std::cmp::Reverse(s.seed)))
    {
        crate::chart::timeline(
            &chart,
            &format!(
                "{name}: seed {} — each submit's wait, faults marked",
                shown.seed
            ),
            "a submit's wait until answered, resends included (ms)",
            &shown
                .samples
                .iter()
                .map(|s| (s.at_s, s.ms))
                .collect::<Vec<_>>(),
            &shown
                .faults
                .iter()
                .map(|f| (f.at_s, f.at_s + f.down_s, format!("kill -9 {}", f.victim)))
                .collect::<Vec<_>>(),
        )?;
    }
    let report = Report {
        bench: name,
        build: report::build(),
        violations: seeds.iter().map(|s| s.violations.len()).sum(),
        seeds,
        limits: limits.ok_or_else(|| anyhow::anyhow!("no seed ran"))?,
        chart,
    };
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}

/// One process of the network, started again after a fault.
pub(crate) struct Process {
    pub(crate) name: String,
    command: Box<dyn Fn() -> anyhow::Result<Child> + Send + Sync>,
    child: Option<Child>,
}

impl Process {
    pub(crate) fn start(
        name: String,
        command: Box<dyn Fn() -> anyhow::Result<Child> + Send + Sync>,
    ) -> anyhow::Result<Self> {
        let child = command()?;
        Ok(Self {
            name,
            command,
            child: Some(child),
        })
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            self.child = Some((self.command)()?);
        }
        Ok(())
    }

    /// SIGINT and wait (up to 15 s, then `kill -9`); true when it exited cleanly.
    pub(crate) async fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Network {
    nats: rhizos_broker::server::NatsCluster,
    orchestrators: Vec<Process>,
    agents: Vec<Process>,
    dirs: Vec<PathBuf>,
}

/// `rhizosd ARGS` against `settings`' bus, logging to `log`; inside the network namespace
/// `netns` when given (`ip netns exec`).
pub(crate) fn rhizosd(
    settings: &Settings,
    log: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(&str, String)],
    netns: Option<&str>,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let binary = rhizos_testbed::build_dir().join("rhizosd");
    let mut command = match netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns]).arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    command
        .args([
            "--nats-url",
            &settings.nats.url,
            "--namespace",
            &settings.nats.namespace,
        ])
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start rhizosd (cargo build --workspace): {e}"))
}

/// A plugin dir in `dir` holding the WASM backend.
pub(crate) fn wasm_plugin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let plugin_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir)?;
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_wasm")?,
        plugin_dir.join("librhizos_plugin_wasm.so"),
    )?;
    Ok(plugin_dir)
}

/// `rhizosd agent` `node` (its log `<dir>/<node>.log`, heartbeats every second, 4 slots, and
/// `extra` settings), inside the network namespace `netns` when given.
pub(crate) fn agent_process(
    settings: &Settings,
    dir: &Path,
    plugin_dir: &Path,
    node: &str,
    extra: Vec<(&'static str, String)>,
    netns: Option<String>,
) -> anyhow::Result<Process> {
    let (settings, log, plugins, name) = (
        settings.clone(),
        dir.join(format!("{node}.log")),
        plugin_dir.to_owned(),
        node.to_owned(),
    );
    let mut env = vec![
        ("RHIZOS_AGENT__HEARTBEAT_INTERVAL_MS", "1000".to_owned()),
        ("RHIZOS_AGENT__MAX_CONCURRENT", "4".to_owned()),
    ];
    env.extend(extra);
    Process::start(
        node.to_owned(),
        Box::new(move || {
            rhizosd(
                &settings,
                &log,
                &[
                    "agent".as_ref(),
                    "--plugin-dir".as_ref(),
                    plugins.as_os_str(),
                    "--node-id".as_ref(),
                    name.as_ref(),
                ],
                &env,
                netns.as_deref(),
            )
        }),
    )
}

/// Waits (at most `limit`) until `count` nodes are live.
pub(crate) async fn wait_for_live_nodes(
    bus: &Bus,
    count: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let live = call(
            bus,
            &rhizos_broker::wire::ListNodes {
                v: WIRE_VERSION,
                ..Default::default()
            },
        )
        .await
        .map(|list| list.nodes.iter().filter(|n| n.status == "live").count())
        .unwrap_or(0);
        if live >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{live} of {count} nodes registered within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `request` until it is answered: resent with the same body (its job id or
/// idempotency key) after a timeout or while nothing serves it.
pub(crate) async fn call<R: rhizos_broker::Request>(
    bus: &Bus,
    request: &R,
) -> Result<R::Reply, RequestError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match bus.call(request).await {
            Err(
                RequestError::NoResponders { .. }
                | RequestError::TimedOut { .. }
                | RequestError::Transport { .. },
            ) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

async fn run_seed(
    seed: u64,
    options: &Options,
    mut faults: Vec<Fault>,
    measure_limits: bool,
) -> anyhow::Result<(SeedReport, Option<Limits>)> {
    let (jobs, rate, agents) = (options.jobs, options.rate, options.agents);
    let dir = tempfile::tempdir()?;
    let nats = rhizos_broker::server::NatsCluster::start(3, "chaos", dir.path())?;
    nats.ready_client().await?;
    let mut settings = Settings::default();
    settings.nats.url = nats.url();
    settings.nats.namespace = format!("chaos{seed}x{}", &rhizos_testbed::cluster::uuid_like()[..8]);
    settings.nats.replicas = 3;
    let limits = if measure_limits {
        Some(limits::measure(&settings.nats).await?)
    } else {
        None
    };
    let plugin_dir = wasm_plugin_dir(dir.path())?;
    let orchestrator_env = vec![
        ("RHIZOS_NATS__REPLICAS", "3".to_owned()),
        ("RHIZOS_ORCHESTRATOR__REPLICATED_LEDGER", "true".to_owned()),
        (
            "RHIZOS_ORCHESTRATOR__LEASE_TTL_MS",
            options.lease_ms.to_string(),
        ),
        ("RHIZOS_ORCHESTRATOR__OPEN_REGISTRATION", "true".to_owned()),
        (
            "RHIZOS_ORCHESTRATOR__LEDGER_SNAPSHOT_EVERY",
            options.snapshot_every.to_string(),
        ),
    ];
    let mut network = Network {
        nats,
        orchestrators: Vec::new(),
        agents: Vec::new(),
        dirs: Vec::new(),
    };
    for index in 1..=2 {
        let data_dir = dir.path().join(format!("orchestrator-{index}"));
        std::fs::create_dir_all(&data_dir)?;
        let (settings, env, log, data) = (
            settings.clone(),
            orchestrator_env.clone(),
            dir.path().join(format!("orchestrator-{index}.log")),
            data_dir.clone(),
        );
        network.orchestrators.push(Process::start(
            format!("orchestrator {index}"),
            Box::new(move || {
                rhizosd(
                    &settings,
                    &log,
                    &[
                        "orchestrator".as_ref(),
                        "--data-dir".as_ref(),
                        data.as_os_str(),
                    ],
                    &env,
                    None,
                )
            }),
        )?);
        network.dirs.push(data_dir);
    }
    for index in 0..agents {
        let node = format!("agent-{}", index + 1);
        network.agents.push(agent_process(
            &settings,
            dir.path(),
            &plugin_dir,
            &node,
            Vec::new(),
            None,
        )?);
    }
    let network = Arc::new(Mutex::new(network));
    let bus = Bus::connect(&settings.nats).await?;
    // Every agent registered before the first job (else it is refused: no capacity).
    wait_for_live_nodes(&bus, agents, Duration::from_secs(60)).await?;
    // Funded once; a retried deposit with the same key changes nothing.
    let deposited: i64 = 100_000_000;
    match call(
        &bus,
        &CreateAccount {
            v: WIRE_VERSION,
            account: "chaos".into(),
        },
    )
    .await
    {
        Ok(_) => {}
        Err(e)
            if e.remote()
                .is_some_and(|r| r.code == ErrorCode::AlreadyExists) => {}
        Err(e) => anyhow::bail!("cannot create the account: {e}"),
    }
    let _: AccountView = call(
        &bus,
        &Deposit {
            v: WIRE_VERSION,
            account: "chaos".into(),
            amount_micros: deposited,
            idempotency_key: Some(format!("chaos-{seed}")),
        },
    )
    .await?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let spec = rhizos_testbed::cluster::wasm_spec(&module, &["count", "1"], 20_000);

    // The faults, on their own task, at their moments.
    let started = Instant::now();
    let planned = faults.clone();
    let fault_task = {
        let (network, jetstream, ns) = (
            network.clone(),
            bus.jetstream.clone(),
            settings.nats.namespace.clone(),
        );
        tokio::spawn(async move {
            let mut happened = Vec::new();
            for mut fault in planned {
                let at = started + Duration::from_secs_f64(fault.at_s);
                tokio::time::sleep_until(at.into()).await;
                let active = active_orchestrator(&jetstream, &ns).await;
                let target = {
                    let mut network = network
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let process = match fault.victim {
                        Victim::ActiveOrchestrator => active.map(|i| &mut network.orchestrators[i]),
                        Victim::StandbyOrchestrator => {
                            active.map(|i| &mut network.orchestrators[1 - i])
                        }
                        Victim::Agent(i) => Some(&mut network.agents[i]),
                        Victim::NatsServer(i) => {
                            network.nats.kill(i);
                            fault.killed = Some(format!("nats-server {}", i + 1));
                            None
                        }
                    };
                    process.map(|process| {
                        process.kill();
                        fault.killed = Some(process.name.clone());
                        process.name.clone()
                    })
                };
                tracing::warn!(victim = %fault.victim, ?target, "killed");
                tokio::time::sleep(Duration::from_secs_f64(fault.down_s)).await;
                {
                    let mut guard = network
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let network = &mut *guard;
                    for process in network
                        .orchestrators
                        .iter_mut()
                        .chain(network.agents.iter_mut())
                    {
                        let _ = process.restart();
                    }
                    if let Victim::NatsServer(i) = fault.victim {
                        let _ = network.nats.restart(i);
                    }
                }
                happened.push(fault);
            }
            happened
        })
    };

    // Jobs at the rate asked, each submit in its own task, resent until answered.
    let mut submits = Vec::new();
    for index in 0..jobs {
        let at = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(at.into()).await;
        let (bus, spec) = (bus.clone(), spec.clone());
        submits.push(tokio::spawn(async move {
            let sent = Instant::now();
            let request = SubmitJob {
                v: WIRE_VERSION,
                job_id: Some(format!("chaos-{index}")),
                account: "chaos".into(),
                spec,
                max_cost_micros: 500_000,
                api_key_sha256: None,
            };
            let answered = call(&bus, &request).await;
            (
                sent.duration_since(started),
                sent.elapsed(),
                answered.map(|_| ()),
            )
        }));
    }
    let mut samples = Vec::new();
    let mut violations = Vec::new();
    for (index, submit) in submits.into_iter().enumerate() {
        let (at, waited, answered) = submit.await?;
        if let Err(e) = answered {
            violations.push(format!("chaos-{index} was never accepted: {e}"));
        }
        samples.push(Sample {
            at_s: at.as_secs_f64(),
            ms: report::ms(waited),
        });
    }
    faults = fault_task.await?;

    // Every job ends.
    let mut views: HashMap<usize, JobView> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while views.len() < jobs && Instant::now() < deadline {
        for index in 0..jobs {
            if views.contains_key(&index) {
                continue;
            }
            if let Ok(view) = call(
                &bus,
                &JobRef {
                    v: WIRE_VERSION,
                    job_id: format!("chaos-{index}"),
                },
            )
            .await
                && view.state.is_terminal()
            {
                views.insert(index, view);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for index in 0..jobs {
        if !views.contains_key(&index) {
            violations.push(format!("chaos-{index} never ended"));
        }
    }
    let succeeded = views
        .values()
        .filter(|v| v.state == rhizos_broker::wire::JobState::Succeeded)
        .count();
    let spent: i64 = views.values().map(|v| v.cost_micros.unwrap_or(0)).sum();

    // Money: exact to the micro.
    let report: LedgerReport = call(&bus, &VerifyLedger { v: WIRE_VERSION }).await?;
    if !report.ok {
        violations.push(format!("ledger verify: {}", report.problems.join("; ")));
    }
    let user = call(
        &bus,
        &AccountRef {
            v: WIRE_VERSION,
            account: "chaos".into(),
        },
    )
    .await?
    .balance_micros;
    if user != deposited - spent {
        violations.push(format!(
            "the user holds {user}, not the deposit {deposited} less the jobs' costs {spent}"
        ));
    }

    // None settled twice: each job's settlements, from the event stream (JetStream's API
    // asked again while the cluster settles after a fault).
    let mut closings = HashMap::new();
    for attempt in 1..=5 {
        match settlements(&bus).await {
            Ok(counted) => {
                closings = counted;
                break;
            }
            Err(e) if attempt == 5 => violations.push(format!("cannot read the events: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    for (job, settled) in &closings {
        if *settled > 1 {
            violations.push(format!("{job} settled {settled} times"));
        }
    }

    // The stream and both projections agree, once the standby has caught up.
    let dirs = network
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .dirs
        .clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<_> = dirs
            .iter()
            .map(|d| rhizos_testbed::ledger_rows(&d.join("ledger.db")))
            .collect();
        match (&rows[0], &rows[1]) {
            (Ok(a), Ok(b)) if a == b => break,
            _ if Instant::now() > deadline => {
                let applied: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        r.as_ref()
                            .map_or_else(|e| e.to_string(), |r| r.0.to_string())
                    })
                    .collect();
                violations.push(format!(
                    "the two orchestrators' ledgers differ (applied {})",
                    applied.join(" vs ")
                ));
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Σ balances = Σ deposits − Σ withdrawals: every account but the outside world's, read
    // from the (agreeing) ledger files.
    match account_sum(&dirs[0].join("ledger.db")) {
        Ok(held) if held == deposited => {}
        Ok(held) => violations.push(format!(
            "the accounts hold {held} in all, not the {deposited} deposited"
        )),
        Err(e) => violations.push(format!("cannot read the ledger file: {e}")),
    }
    // A daemon that exited on its own (not killed by a fault) is a violation: a service
    // manager would hide it, this scenario does not.
    {
        let mut network = network
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let network = &mut *network;
        for process in network
            .orchestrators
            .iter_mut()
            .chain(network.agents.iter_mut())
        {
            if let Some(status) = process
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                violations.push(format!("{} exited on its own ({status})", process.name));
            }
        }
    }
    let mut network = Arc::try_unwrap(network)
        .map_err(|_| anyhow::anyhow!("the network is still shared"))?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for process in network
        .agents
        .iter_mut()
        .chain(network.orchestrators.iter_mut())
    {
        if !process.stop().await {
            violations.push(format!("{} did not stop cleanly", process.name));
        }
    }
    let mut latencies: Vec<Duration> = samples
        .iter()
        .map(|s| Duration::from_secs_f64(s.ms / 1000.0))
        .collect();
    let submit_ms = Tail::of(&mut latencies);
    if !violations.is_empty() {
        // Kept for a post-mortem: the logs of every process.
        let kept = std::env::temp_dir().join(format!("rhizos-chaos-seed-{seed}"));
        let _ = std::fs::remove_dir_all(&kept);
        let _ = Command::new("cp")
            .arg("-r")
            .arg(dir.path())
            .arg(&kept)
            .status();
        violations.push(format!("logs kept in {}", kept.display()));
    }
    let report = SeedReport {
        seed,
        jobs,
        succeeded,
        failed: views.len() - succeeded,
        faults,
        longest_wait_ms: samples.iter().map(|s| s.ms).fold(0.0, f64::max),
        submit_ms,
        violations,
        samples,
    };
    Ok((report, limits))
}

/// How many `settled` escrow events each job has in the event stream.
async fn settlements(bus: &Bus) -> anyhow::Result<HashMap<String, usize>> {
    let mut closings: HashMap<String, usize> = HashMap::new();
    let stream = bus
        .jetstream
        .get_stream(bus.subjects.event_stream())
        .await?;
    let last = stream.cached_info().state.last_sequence;
    if last == 0 {
        return Ok(closings);
    }
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await?
    {
        let message = message?;
        let seq = message.info().map_err(anyhow::Error::msg)?.stream_sequence;
        if let Ok(Event {
            body:
                EventBody::Escrow {
                    job_id,
                    kind: EscrowKind::Settled,
                    ..
                },
            ..
        }) = serde_json::from_slice::<Event>(&message.payload)
        {
            *closings.entry(job_id).or_default() += 1;
        }
        if seq >= last {
            break;
        }
    }
    Ok(closings)
}

/// The sum of every account's balance but the outside world's (users, providers, the
/// platform's fees, escrows).
pub(crate) fn account_sum(path: &Path) -> anyhow::Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(balance_micros), 0) FROM accounts WHERE id != ?1",
        [rhizos_core::ledger::EXTERNAL],
        |r| r.get(0),
    )?)
}

/// Which orchestrator (0 or 1) holds the lease now, from the lease bucket.
async fn active_orchestrator(
    jetstream: &async_nats::jetstream::Context,
    ns: &str,
) -> Option<usize> {
    let kv = jetstream
        .get_key_value(rhizos_core::orchestrator::lease::bucket_name(ns))
        .await
        .ok()?;
    let entry = kv
        .entry(rhizos_core::orchestrator::lease::KEY)
        .await
        .ok()??;
    let holder: rhizos_core::orchestrator::lease::Holder =
        serde_json::from_slice(&entry.value).ok()?;
    match holder.data_dir.chars().last()? {
        '1' => Some(0),
        '2' => Some(1),
        _ => None,
    }
}

impl Report {
    /// Violations found over every seed.
    pub fn violations(&self) -> usize {
        self.violations
    }
}
