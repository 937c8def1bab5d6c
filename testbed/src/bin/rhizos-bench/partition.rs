//! `partition`: a node cut off from the bus and reconnected. One agent runs on this machine's
//! own network, the other in a network namespace of its own joined by a veth pair (a host on
//! a network, as far as TCP is concerned); nats-server listens on the veth's address. While the
//! second agent runs jobs, its link goes down: its packets are dropped, not refused, the way a
//! cable pulled or a switch failing behaves. The orchestrator declares it lost and requeues its
//! jobs to the other agent; the cut node's executions run on and finish in the dark. When the
//! link is back, its late reports reach the orchestrator and are refused (the attempt is no
//! longer the job's), and the node rejoins.
//!
//! Checked: every job ended and succeeded; the jobs running on the cut node were requeued once
//! (attempt 2, on the other node) and no job ran a third time; each provider was paid exactly
//! the provider share of the jobs whose final attempt it ran — nothing executed and paid twice;
//! the cut node's late reports were refused; `ledger verify`; Σ accounts = Σ deposits. Needs
//! root and iproute2 (`ip netns`). Writes partition.json and partition.png.

use crate::chaos::{
    Process, account_sum, agent_process, call, rhizosd, wait_for_live_nodes, wasm_plugin_dir,
};
use crate::limits::{self, Limits};
use crate::report;
use rhizos_broker::wire::{
    AccountRef, CreateAccount, Deposit, JobRef, JobState, JobView, LedgerReport, SubmitJob,
    VerifyLedger, WIRE_VERSION,
};
use rhizos_broker::{Bus, Settings};
use serde::Serialize;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Jobs submitted at once (each sleeps --job-ms on its node).
    #[arg(long, default_value_t = 12)]
    pub jobs: usize,
    /// How long each job runs.
    #[arg(long, default_value_t = 4_000)]
    pub job_ms: u64,
    /// How long the node stays cut off (longer than the orchestrator's node-loss window:
    /// 3 missed heartbeats of 1 s here).
    #[arg(long, default_value_t = 8.0)]
    pub cut_s: f64,
    /// Where partition.json and partition.png go.
    #[arg(long, default_value = "target/partition")]
    pub out: PathBuf,
}

#[derive(Serialize)]
pub struct Report {
    bench: &'static str,
    build: &'static str,
    jobs: usize,
    succeeded: usize,
    /// Jobs running on the cut node when its link went down.
    running_when_cut: Vec<String>,
    /// Of those, requeued once and finished on the other node.
    requeued_once: usize,
    /// Reports of the cut node refused once it was back (its attempts were no longer current).
    late_reports_refused: usize,
    /// From the cut until the first cut job was running again elsewhere.
    requeued_after_s: Option<f64>,
    /// From the link back until the node was live again.
    rejoined_after_s: Option<f64>,
    cut_at_s: f64,
    healed_at_s: f64,
    violations: Vec<String>,
    limits: Limits,
    chart: PathBuf,
}

impl Report {
    pub fn violations(&self) -> usize {
        self.violations.len()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "partition: a node in its own network namespace cut off for {:.1} s while running jobs ({} build):",
            self.healed_at_s - self.cut_at_s,
            self.build
        )?;
        writeln!(
            f,
            "  {} jobs, {} succeeded; {} were running on the cut node, {} requeued once (running elsewhere {} after the cut); {} late reports refused; the node live again {} after the link came back",
            self.jobs,
            self.succeeded,
            self.running_when_cut.len(),
            self.requeued_once,
            self.requeued_after_s
                .map_or("never".to_owned(), |s| format!("{s:.1} s")),
            self.late_reports_refused,
            self.rejoined_after_s
                .map_or("never".to_owned(), |s| format!("{s:.1} s")),
        )?;
        write!(f, "{}", self.limits)?;
        writeln!(
            f,
            "  {}; chart {}",
            if self.violations.is_empty() {
                "no violation".to_owned()
            } else {
                format!("VIOLATIONS: {}", self.violations.join("; "))
            },
            self.chart.display()
        )
    }
}

/// A network namespace joined to this machine by a veth pair, removed when dropped.
struct Namespace {
    name: String,
    host_link: String,
    inner_link: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("partition needs iproute2 (`ip`): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "ip {} failed: {} (partition needs root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

impl Namespace {
    fn create() -> anyhow::Result<Self> {
        let tag = &rhizos_testbed::cluster::uuid_like()[..6];
        let octet = u8::from_str_radix(&tag[..2], 16).unwrap_or(7);
        let namespace = Self {
            name: format!("rhzp-{tag}"),
            host_link: format!("rzh{tag}"),
            inner_link: format!("rzn{tag}"),
            host_ip: format!("10.213.{octet}.1"),
        };
        let inner_ip = format!("10.213.{octet}.2/30");
        ip(&["netns", "add", &namespace.name])?;
        ip(&[
            "link",
            "add",
            &namespace.host_link,
            "type",
            "veth",
            "peer",
            "name",
            &namespace.inner_link,
        ])?;
        ip(&[
            "link",
            "set",
            &namespace.inner_link,
            "netns",
            &namespace.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", namespace.host_ip),
            "dev",
            &namespace.host_link,
        ])?;
        ip(&["link", "set", &namespace.host_link, "up"])?;
        ip(&[
            "netns",
            "exec",
            &namespace.name,
            "ip",
            "addr",
            "add",
            &inner_ip,
            "dev",
            &namespace.inner_link,
        ])?;
        ip(&[
            "netns",
            "exec",
            &namespace.name,
            "ip",
            "link",
            "set",
            &namespace.inner_link,
            "up",
        ])?;
        ip(&[
            "netns",
            "exec",
            &namespace.name,
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])?;
        Ok(namespace)
    }

    /// The namespace's side of the link down (`false`) or up: its packets are dropped.
    fn link(&self, up: bool) -> anyhow::Result<()> {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.inner_link,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.jobs > 0, "--jobs must be > 0");
    let dir = tempfile::tempdir()?;
    let namespace = Namespace::create()?;
    let nats = rhizos_broker::server::NatsServer::start(rhizos_broker::server::LaunchOptions {
        port: None,
        data_dir: Some(dir.path().join("nats")),
        authorization: None,
        listen: Some(namespace.host_ip.parse()?),
    })?;
    let mut settings = Settings::default();
    settings.nats.url = format!("nats://{}:{}", namespace.host_ip, nats.port());
    settings.nats.namespace = format!("part{}", &rhizos_testbed::cluster::uuid_like()[..8]);
    let limits = limits::measure(&settings.nats).await?;
    let plugin_dir = wasm_plugin_dir(dir.path())?;
    let orchestrator_log = dir.path().join("orchestrator.log");
    let orchestrator = {
        let (settings, log, data) = (
            settings.clone(),
            orchestrator_log.clone(),
            dir.path().join("orchestrator"),
        );
        Process::start(
            "orchestrator".into(),
            Box::new(move || {
                rhizosd(
                    &settings,
                    &log,
                    &[
                        "orchestrator".as_ref(),
                        "--data-dir".as_ref(),
                        data.as_os_str(),
                    ],
                    &[("RHIZOS_ORCHESTRATOR__OPEN_REGISTRATION", "true".to_owned())],
                    None,
                )
            }),
        )?
    };
    let agent = |node: &str, netns: Option<String>| {
        let provider = vec![("RHIZOS_AGENT__PROVIDER_ACCOUNT", format!("prov-{node}"))];
        agent_process(&settings, dir.path(), &plugin_dir, node, provider, netns)
    };
    let mut processes = vec![
        orchestrator,
        agent("steady", None)?,
        agent("cut", Some(namespace.name.clone()))?,
    ];
    let bus = Bus::connect(&settings.nats).await?;
    // Both nodes registered before the jobs go.
    wait_for_live_nodes(&bus, 2, Duration::from_secs(30)).await?;
    let deposited: i64 = 100_000_000;
    call(
        &bus,
        &CreateAccount {
            v: WIRE_VERSION,
            account: "part".into(),
        },
    )
    .await?;
    call(
        &bus,
        &Deposit {
            v: WIRE_VERSION,
            account: "part".into(),
            amount_micros: deposited,
            idempotency_key: Some("part".into()),
        },
    )
    .await?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let spec = rhizos_testbed::cluster::wasm_spec(
        &module,
        &["sleep", &options.job_ms.to_string()],
        options.job_ms + 60_000,
    );
    let started = Instant::now();
    let started_ms = rhizos_core::now_ms();
    for index in 0..options.jobs {
        call(
            &bus,
            &SubmitJob {
                v: WIRE_VERSION,
                job_id: Some(format!("part-{index}")),
                account: "part".into(),
                spec: spec.clone(),
                max_cost_micros: 5_000_000,
                api_key_sha256: None,
            },
        )
        .await?;
    }
    let view = |index: usize| {
        let bus = bus.clone();
        async move {
            call(
                &bus,
                &JobRef {
                    v: WIRE_VERSION,
                    job_id: format!("part-{index}"),
                },
            )
            .await
        }
    };
    // Cut once the cut node runs jobs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let running_when_cut = loop {
        let mut on_cut = Vec::new();
        for index in 0..options.jobs {
            let job = view(index).await?;
            if job.state == JobState::Running && job.node_id.as_deref() == Some("cut") {
                on_cut.push(job.job_id);
            }
        }
        if !on_cut.is_empty() {
            break on_cut;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no job ran on the node to cut off within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    namespace.link(false)?;
    let cut_at = started.elapsed();
    let mut requeued_after = None;
    let cut_until = Instant::now() + Duration::from_secs_f64(options.cut_s);
    while Instant::now() < cut_until {
        if requeued_after.is_none() {
            for id in &running_when_cut {
                let job = call(
                    &bus,
                    &JobRef {
                        v: WIRE_VERSION,
                        job_id: id.clone(),
                    },
                )
                .await?;
                if job.attempt >= 2 && job.node_id.as_deref() == Some("steady") {
                    requeued_after = Some(started.elapsed() - cut_at);
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    namespace.link(true)?;
    let healed_at = started.elapsed();

    // Every job ends; the cut node rejoins.
    let mut views: Vec<Option<JobView>> = vec![None; options.jobs];
    let mut rejoined_after = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (views.iter().any(Option::is_none) || rejoined_after.is_none())
        && Instant::now() < deadline
    {
        for (index, slot) in views.iter_mut().enumerate() {
            if slot.is_none()
                && let Ok(job) = view(index).await
                && job.state.is_terminal()
            {
                *slot = Some(job);
            }
        }
        if rejoined_after.is_none() {
            let cut_live = call(
                &bus,
                &rhizos_broker::wire::ListNodes {
                    v: WIRE_VERSION,
                    ..Default::default()
                },
            )
            .await
            .is_ok_and(|list| {
                list.nodes
                    .iter()
                    .any(|n| n.node_id == "cut" && n.status == "live")
            });
            if cut_live {
                rejoined_after = Some(started.elapsed() - healed_at);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The cut node's late reports: give them a moment to arrive once it is back.
    let strip = |text: String| {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let refused = || {
        strip(std::fs::read_to_string(&orchestrator_log).unwrap_or_default())
            .lines()
            .filter(|line| {
                line.contains("WARN") && line.contains("api::jobs") && line.contains("node_id=cut")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused() < running_when_cut.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late_reports_refused = refused();

    let mut violations = Vec::new();
    let ended: Vec<&JobView> = views.iter().flatten().collect();
    if ended.len() < options.jobs {
        violations.push(format!("{} jobs never ended", options.jobs - ended.len()));
    }
    let succeeded = ended
        .iter()
        .filter(|j| j.state == JobState::Succeeded)
        .count();
    if succeeded < ended.len() {
        violations.push(format!("{} jobs did not succeed", ended.len() - succeeded));
    }
    let mut requeued_once = 0;
    for job in &ended {
        let was_cut = running_when_cut.contains(&job.job_id);
        match (was_cut, job.attempt, job.node_id.as_deref()) {
            (true, 2, Some("steady")) => requeued_once += 1,
            (true, attempt, node) => violations.push(format!(
                "{} was running on the cut node: ended at attempt {attempt} on {node:?}, not requeued once to the other",
                job.job_id
            )),
            (false, attempt, _) if attempt > 2 => violations.push(format!("{} ran {attempt} times", job.job_id)),
            _ => {}
        }
    }
    if late_reports_refused < running_when_cut.len() {
        violations.push(format!(
            "{} late reports of the cut node refused, {} expected",
            late_reports_refused,
            running_when_cut.len()
        ));
    }
    // Each provider paid exactly the provider share of the jobs it ran last.
    for node in ["steady", "cut"] {
        let owed: i64 = ended
            .iter()
            .filter(|j| j.node_id.as_deref() == Some(node))
            .map(|j| j.provider_micros.unwrap_or(0))
            .sum();
        let paid = call(
            &bus,
            &AccountRef {
                v: WIRE_VERSION,
                account: format!("prov-{node}"),
            },
        )
        .await
        .map(|a| a.balance_micros)
        .unwrap_or(0);
        if paid != owed {
            violations.push(format!(
                "prov-{node} holds {paid}, owed {owed} for the jobs it ran last"
            ));
        }
    }
    let report: LedgerReport = call(&bus, &VerifyLedger { v: WIRE_VERSION }).await?;
    if !report.ok {
        violations.push(format!("ledger verify: {}", report.problems.join("; ")));
    }
    for process in &mut processes {
        if !process.stop().await {
            violations.push(format!("{} did not stop cleanly", process.name));
        }
    }
    match account_sum(&dir.path().join("orchestrator").join("ledger.db")) {
        Ok(held) if held == deposited => {}
        Ok(held) => violations.push(format!(
            "the accounts hold {held} in all, not the {deposited} deposited"
        )),
        Err(e) => violations.push(format!("cannot read the ledger: {e}")),
    }
    if !violations.is_empty() {
        let kept = std::env::temp_dir().join("rhizos-partition");
        let _ = std::fs::remove_dir_all(&kept);
        let _ = Command::new("cp")
            .arg("-r")
            .arg(dir.path())
            .arg(&kept)
            .status();
        violations.push(format!("logs kept in {}", kept.display()));
    }
    std::fs::create_dir_all(&options.out)?;
    let chart = options.out.join("partition.png");
    let points: Vec<(f64, f64)> = ended
        .iter()
        .map(|j| {
            let ended_s = j.updated_ms.saturating_sub(started_ms) as f64 / 1000.0;
            (ended_s, j.updated_ms.saturating_sub(j.created_ms) as f64)
        })
        .collect();
    crate::chart::timeline(
        &chart,
        "partition: each job's submit → end (at the moment it ended), the cut node's link down shaded",
        "a job's submit → end (ms)",
        &points,
        &[(
            cut_at.as_secs_f64(),
            healed_at.as_secs_f64(),
            "the cut node's link down".to_owned(),
        )],
    )?;
    let report = Report {
        bench: "partition",
        build: report::build(),
        jobs: options.jobs,
        succeeded,
        requeued_once,
        running_when_cut,
        late_reports_refused,
        requeued_after_s: requeued_after.map(|d| d.as_secs_f64()),
        rejoined_after_s: rejoined_after.map(|d| d.as_secs_f64()),
        cut_at_s: cut_at.as_secs_f64(),
        healed_at_s: healed_at.as_secs_f64(),
        violations,
        limits,
        chart,
    };
    std::fs::write(
        options.out.join("partition.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    Ok(report)
}
