//! `scale`: one orchestrator against fleets of growing size. The orchestrator is the real
//! `rhizosd` as its own process (so the CPU time and memory read from `/proc` are its alone);
//! the simulated fleet (`rhizos_testbed::sim`, heartbeats spread evenly over their interval)
//! and the submitters run in this process. For each fleet size, on a fresh nats-server and
//! ledger:
//!
//! 1. registration time;
//! 2. **idle**: `--idle-s` seconds with only heartbeats flowing — the daemon's CPU (% of one
//!    core) and the heartbeats it absorbed per second (its `rhizos_heartbeats_total` counter,
//!    scraped from `/metrics`, against what the fleet sent);
//! 3. **load**: `--jobs` jobs in a closed loop — jobs settled per second, submit → running
//!    p50/p99, the daemon's CPU meanwhile;
//! 4. its resident and peak memory at the end, and per 1,000 nodes what the registered fleet
//!    added (after the idle window, before any job) to what it held before;
//! 5. what one pick costs in the registry at that size (in process, a pick + allocate +
//!    release per job over a fleet of that many nodes in four classes).
//!
//! Writes `scale.json` and `scale.png` (plotters: each figure against the fleet size) to
//! `--out`.

use crate::limits::{self, Limits};
use crate::marketplace;
use crate::report::{self, Tail};
use rhizos_broker::server::{LaunchOptions, NatsServer};
use rhizos_broker::{Bus, Client};
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Options {
    /// Fleet sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    pub nodes: Vec<usize>,
    /// Jobs per fleet size (closed loop).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Submits in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds of heartbeats only, to measure the idle cost.
    #[arg(long, default_value_t = 10.0)]
    pub idle_s: f64,
    /// Each simulated node's heartbeat interval.
    #[arg(long, default_value_t = 5_000)]
    pub heartbeat_ms: u64,
    /// Where scale.json and scale.png go.
    #[arg(long, default_value = "target/scale")]
    pub out: PathBuf,
    /// The rhizosd binary (default: the one beside this one).
    #[arg(long)]
    pub rhizosd: Option<PathBuf>,
}

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    heartbeat_interval_ms: u64,
    jobs_per_size: usize,
    concurrency: usize,
    idle_window_s: f64,
    limits: Limits,
    points: Vec<Point>,
    /// Idle CPU at the largest fleet of at most 10,000 nodes (target: under 25 % of one core
    /// at 10,000 nodes heartbeating every 5 s).
    idle_cpu_percent_at_10k: Option<f64>,
    /// Jobs/s settled at 10,000 nodes ÷ at 1,000 (target ≥ 0.8), when both were measured.
    jobs_per_s_10k_over_1k: Option<f64>,
    json: PathBuf,
    chart: PathBuf,
}

#[derive(Serialize, Clone)]
pub struct Point {
    pub nodes: usize,
    pub registration_s: f64,
    /// The daemon's CPU with only heartbeats flowing, % of one core.
    pub idle_cpu_percent: f64,
    /// Heartbeats the orchestrator counted per second, and what the fleet sent.
    pub heartbeats_absorbed_per_s: f64,
    pub heartbeats_sent_per_s: f64,
    /// The daemon's CPU while the jobs flowed, % of one core.
    pub load_cpu_percent: f64,
    pub jobs_settled: usize,
    pub jobs_rejected: usize,
    pub jobs_settled_per_s: f64,
    pub submit_to_running_ms: Tail,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Resident memory with the fleet registered and heartbeating (before any job) above the
    /// daemon's before any node registered, per 1,000 nodes.
    pub rss_mib_per_1000_nodes: f64,
    /// One pick + allocate + release in a registry of this many nodes, µs (median of runs).
    pub pick_us: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "one orchestrator (rhizosd, own process) against growing fleets ({} build; heartbeats every {} ms; {} jobs per size, {} in flight):",
            self.build, self.heartbeat_interval_ms, self.jobs_per_size, self.concurrency
        )?;
        writeln!(
            f,
            "  {:>7} {:>7} {:>9} {:>14} {:>9} {:>9} {:>17} {:>10} {:>9} {:>8}",
            "nodes",
            "reg s",
            "idle CPU",
            "heartbeats/s",
            "load CPU",
            "jobs/s",
            "→running p50/p99",
            "RSS MiB",
            "MiB/1k",
            "pick µs"
        )?;
        for p in &self.points {
            writeln!(
                f,
                "  {:>7} {:>7.2} {:>8.1}% {:>6.0}/{:<7.0} {:>8.1}% {:>9.0} {:>8.2}/{:<8.2} {:>10.1} {:>9.2} {:>8.2}",
                p.nodes,
                p.registration_s,
                p.idle_cpu_percent,
                p.heartbeats_absorbed_per_s,
                p.heartbeats_sent_per_s,
                p.load_cpu_percent,
                p.jobs_settled_per_s,
                p.submit_to_running_ms.p50,
                p.submit_to_running_ms.p99,
                p.peak_rss_mib,
                p.rss_mib_per_1000_nodes,
                p.pick_us
            )?;
        }
        write!(f, "{}", self.limits)?;
        if let Some(cpu) = self.idle_cpu_percent_at_10k {
            writeln!(
                f,
                "  idle CPU at 10,000 nodes: {cpu:.1}% of one core (target < 25%)"
            )?;
        }
        if let Some(ratio) = self.jobs_per_s_10k_over_1k {
            writeln!(
                f,
                "  jobs/s at 10,000 nodes ÷ at 1,000: {:.0}% (target ≥ 80%)",
                ratio * 100.0
            )?;
        }
        writeln!(
            f,
            "  wrote {} and {}",
            self.json.display(),
            self.chart.display()
        )
    }
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !options.nodes.is_empty() && options.nodes.iter().all(|&n| n > 0),
        "--nodes takes fleet sizes above 0, comma-separated (e.g. 1000,10000,50000)"
    );
    anyhow::ensure!(
        options.jobs > 0 && options.concurrency > 0 && options.heartbeat_ms > 0,
        "--jobs, --concurrency and --heartbeat-ms must be > 0"
    );
    anyhow::ensure!(
        options.idle_s.is_finite() && options.idle_s > 0.0,
        "--idle-s must be a positive number of seconds"
    );
    let rhizosd = options
        .rhizosd
        .clone()
        .unwrap_or_else(|| rhizos_testbed::build_dir().join("rhizosd"));
    anyhow::ensure!(
        rhizosd.is_file(),
        "{} is missing: build it with `cargo build --release --workspace` (or name one with --rhizosd)",
        rhizosd.display()
    );
    std::fs::create_dir_all(&options.out)?;
    let mut points = Vec::new();
    let mut limits = None;
    for &nodes in &options.nodes {
        let (point, measured) = measure(&options, &rhizosd, nodes, limits.is_none()).await?;
        if let Some(measured) = measured {
            limits = Some(measured);
        }
        tracing::info!(nodes, "measured");
        eprintln!(
            "  {nodes} nodes: {:.0} jobs/s, idle CPU {:.1}%",
            point.jobs_settled_per_s, point.idle_cpu_percent
        );
        points.push(point);
    }
    let limits = limits.ok_or_else(|| anyhow::anyhow!("no fleet size was measured"))?;
    let at = |n: usize| points.iter().find(|p| p.nodes == n);
    let json = options.out.join("scale.json");
    let chart = options.out.join("scale.png");
    crate::chart::scale(&chart, &points)?;
    let report = Report {
        bench: "scale",
        build: report::build(),
        heartbeat_interval_ms: options.heartbeat_ms,
        jobs_per_size: options.jobs,
        concurrency: options.concurrency,
        idle_window_s: options.idle_s,
        limits,
        idle_cpu_percent_at_10k: at(10_000).map(|p| p.idle_cpu_percent),
        jobs_per_s_10k_over_1k: at(10_000)
            .zip(at(1_000))
            .map(|(big, small)| big.jobs_settled_per_s / small.jobs_settled_per_s),
        points,
        json: json.clone(),
        chart,
    };
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

/// The `rhizosd` child: killed when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why the daemon is not running, with the end of its log, if it stopped.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            anyhow::bail!("rhizosd orchestrator exited ({status}); its log ends:\n{tail}");
        }
        Ok(())
    }
}

/// User + system CPU time of process `pid` so far (`/proc/<pid>/stat`, in the kernel's
/// USER_HZ = 100 ticks per second).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses: state is the
    // 3rd field of the line, utime the 14th and stime the 15th.
    let (_, after) = stat
        .rsplit_once(')')
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// (resident, peak resident) MiB of process `pid` (`/proc/<pid>/status`).
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
}

/// The daemon's `rhizos_heartbeats_total`.
async fn heartbeats_counted(metrics: &str) -> anyhow::Result<f64> {
    let url = format!("http://{metrics}/metrics");
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        Ok(ureq::get(&url).call()?.body_mut().read_to_string()?)
    })
    .await??;
    body.lines()
        .find_map(|line| line.strip_prefix("rhizos_heartbeats_total "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("the daemon's /metrics has no rhizos_heartbeats_total"))
}

/// CPU % of one core between two samples.
fn cpu_percent(before: (Duration, Instant), after: (Duration, Instant)) -> f64 {
    let wall = after.1.duration_since(before.1).as_secs_f64();
    after.0.saturating_sub(before.0).as_secs_f64() / wall * 100.0
}

async fn measure(
    options: &Options,
    rhizosd: &Path,
    nodes: usize,
    with_limits: bool,
) -> anyhow::Result<(Point, Option<Limits>)> {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start(LaunchOptions {
        port: None,
        data_dir: Some(dir.path().join("nats")),
        authorization: None,
        listen: None,
    })?;
    let mut settings = rhizos_broker::config::NatsSettings {
        url: nats.url(),
        namespace: "scale".into(),
        ..rhizos_broker::config::Settings::default().nats
    };
    settings.request_timeout_ms = settings.request_timeout_ms.max(30_000);
    let limits = if with_limits {
        Some(limits::measure(&settings).await?)
    } else {
        None
    };
    let metrics = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.to_string()
    };
    let log = dir.path().join("orchestrator.log");
    let mut daemon = Daemon {
        child: Command::new(rhizosd)
            .args(["--nats-url", &settings.url, "--namespace", "scale"])
            .args(["--metrics", &metrics, "orchestrator", "--data-dir"])
            .arg(dir.path().join("orchestrator"))
            .env("RUST_LOG", "warn")
            .env("RHIZOS_ORCHESTRATOR__OPEN_REGISTRATION", "true")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
        log,
    };
    let bus = Bus::connect(&settings).await?;
    let client = Client::new(bus.clone());
    // Up when it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        daemon.check_alive()?;
        match client.account_create("load").await {
            Ok(_) => break,
            Err(e) if e.remote().is_none() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => anyhow::bail!("the orchestrator did not answer: {e}"),
        }
    }
    client
        .account_deposit("load", 1_000_000_000_000, None)
        .await?;
    let (base_rss, _) = memory_mib(daemon.pid())?;

    let started = Instant::now();
    let fleet = rhizos_testbed::sim::SimFleet::start_with(
        Bus::connect(&settings).await?,
        nodes,
        rhizos_broker::config::Settings::default().pricing,
        10,
        Duration::from_millis(options.heartbeat_ms),
    )
    .await?;
    let registration_s = started.elapsed().as_secs_f64();

    // Idle: one heartbeat interval to settle, then the window.
    tokio::time::sleep(Duration::from_millis(options.heartbeat_ms.min(5_000))).await;
    daemon.check_alive()?;
    let pid = daemon.pid();
    let before = (cpu_time(pid)?, Instant::now());
    let beats_before = heartbeats_counted(&metrics).await?;
    tokio::time::sleep(Duration::from_secs_f64(options.idle_s)).await;
    let after = (cpu_time(pid)?, Instant::now());
    let beats_after = heartbeats_counted(&metrics).await?;
    let idle_wall = after.1.duration_since(before.1).as_secs_f64();
    let idle_cpu_percent = cpu_percent(before, after);
    let (fleet_rss, _) = memory_mib(pid)?;
    let heartbeats_absorbed_per_s = (beats_after - beats_before) / idle_wall;

    // Load.
    let before = (cpu_time(pid)?, Instant::now());
    let driven = marketplace::drive(
        &bus,
        client.clone(),
        options.jobs,
        options.concurrency,
        None,
    )
    .await?;
    let after = (cpu_time(pid)?, Instant::now());
    daemon.check_alive()?;
    let (rss_mib, peak_rss_mib) = memory_mib(pid)?;
    drop(fleet);
    drop(daemon);
    drop(nats);

    let pick_us = tokio::task::spawn_blocking(move || pick_cost_us(nodes)).await?;
    Ok((
        Point {
            nodes,
            registration_s,
            idle_cpu_percent,
            heartbeats_absorbed_per_s,
            heartbeats_sent_per_s: nodes as f64 * 1_000.0 / options.heartbeat_ms as f64,
            load_cpu_percent: cpu_percent(before, after),
            jobs_settled: driven.settled,
            jobs_rejected: driven.rejected,
            jobs_settled_per_s: driven.jobs_per_s(),
            submit_to_running_ms: driven.running,
            rss_mib,
            peak_rss_mib,
            rss_mib_per_1000_nodes: (fleet_rss - base_rss).max(0.0) * 1_000.0 / nodes as f64,
            pick_us,
        },
        limits,
    ))
}

/// One pick + allocate + release in a registry of `nodes` nodes in four classes (prices
/// differ), half of them busy: µs, the median of five runs of 20,000 picks.
fn pick_cost_us(nodes: usize) -> f64 {
    use rhizos_core::orchestrator::matching::Registry;
    let mut registry = Registry::new(Default::default());
    let base = rhizos_broker::config::Settings::default().pricing;
    for index in 0..nodes {
        let mut pricing = base;
        pricing.cpu_hour_cents += (index % 4) as u64;
        registry.upsert(rhizos_testbed::sim::registration(index, pricing, 5_000));
    }
    let job = rhizos_broker::wire::JobSpec::new(
        rhizos_broker::wire::Workload::Wasm {
            module_b64: String::new(),
        },
        1_000,
        64,
    );
    // Half the fleet with one job each: loads differ, as in a running network.
    for index in (0..nodes).step_by(2) {
        registry.allocate(&rhizos_testbed::sim::node_id(index), &job);
    }
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..20_000 {
                let picked = registry
                    .pick(&job, 1_000_000)
                    .map(|n| n.registration.node_id.clone());
                if let Some(id) = picked {
                    registry.allocate(&id, &job);
                    registry.release(&id, &job);
                }
            }
            started.elapsed().as_secs_f64() * 1e6 / 20_000.0
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}
