//! Benchmarks that print numbers (never asserted in tests).
//!
//! `rhizos-bench submit-latency [--jobs 20]`: starts a one-node network (real nats-server, SQLite
//! ledger, wasm plugin), submits small demo jobs one after another, and prints the time from
//! sending `job.submit` to seeing the job's `assigned` and `running` events, and to its end.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use rhizos_broker::wire::{Event, EventBody, JobState};
use rhizos_testbed::cluster::wasm_spec;
use rhizos_testbed::{Cluster, ClusterOptions};
use std::time::{Duration, Instant};

/// The allocator `rhizosd` uses (the orchestrator runs in this process).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "rhizos-bench",
    about = "RhizOS benchmarks: each prints its measurements"
)]
struct Cli {
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Time from `rhizos job submit` to the job running (median of N sequential jobs).
    SubmitLatency {
        #[arg(long, default_value_t = 20)]
        jobs: usize,
    },
    /// Request round trip through the orchestrator without a write (`account.balance`: bus +
    /// ledger thread, no commit) and with one (`account.deposit`: plus a durable commit), N
    /// sequential requests each.
    RoundTrip {
        #[arg(long, default_value_t = 1_000)]
        requests: usize,
    },
    /// Cost of a call across the stable-ABI plugin boundary: `cancel` on an execution of the
    /// testkit plugin (a dynamic call through abi_stable's trait object, a mutex inside), and a
    /// whole `start` + `wait` of an execution that ends at once.
    PluginCall {
        #[arg(long, default_value_t = 1_000_000)]
        calls: usize,
    },
    /// Instantiating a cached WASM module the way an execution does (store with WASI context,
    /// limits and fuel; pooled instance slot), without running it.
    WasmInstantiate {
        #[arg(long, default_value_t = 10_000)]
        iterations: usize,
    },
    /// Small WASM jobs through the whole network: real nats-server, orchestrator with its
    /// ledger, agents running the wasm plugin. Prints jobs/s and submit → finished latency.
    WasmJobs {
        #[arg(long, default_value_t = 1_000)]
        jobs: usize,
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Submits in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Container job overhead: submit → the container's first output line through the whole
    /// network (Docker plugin), against a bare `docker run` of the same image, as a ratio.
    ContainerOverhead {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// chain:// resolutions per second through the orchestrator's resolver chain, per resolver
    /// (index component, http against a local registry server, substrate against the JSON-RPC
    /// double): cold (every resolution reaches the resolver) and warm (from the cache).
    ModuleResolve {
        #[arg(long, default_value_t = 2_000)]
        calls: usize,
    },
    /// Jobs offered to many simulated nodes (they ack and report at once): jobs settled per
    /// second through the orchestrator and its ledger (real nats-server, SQLite with
    /// synchronous=FULL), and submit → running latency (to the `running` event a subscriber
    /// sees). Closed loop by default (`--concurrency` submits in flight: throughput); with
    /// `--rate` an open loop at that many submits per second (latency at a given load; a low
    /// rate such as 100 measures an unloaded orchestrator).
    Marketplace {
        #[arg(long, default_value_t = 1_000)]
        nodes: usize,
        #[arg(long, default_value_t = 5_000)]
        jobs: usize,
        /// Submits in flight at once (closed loop); with --rate, the most in flight.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Offer jobs at this many per second, whether or not earlier submits were answered.
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rhizos_core::telemetry::init("warn", false);
    let cli = Cli::parse();
    match cli.bench {
        Bench::SubmitLatency { jobs } => submit_latency(jobs, cli.json).await,
        Bench::RoundTrip { requests } => round_trip(requests, cli.json).await,
        Bench::PluginCall { calls } => plugin_call(calls, cli.json),
        // Runs its own runtime inside the backend: off this one's worker threads.
        Bench::WasmInstantiate { iterations } => {
            let json = cli.json;
            tokio::task::spawn_blocking(move || wasm_instantiate(iterations, json)).await?
        }
        Bench::WasmJobs {
            jobs,
            agents,
            concurrency,
        } => wasm_jobs(jobs, agents, concurrency, cli.json).await,
        Bench::ContainerOverhead { runs } => container_overhead(runs, cli.json).await,
        Bench::ModuleResolve { calls } => module_resolve(calls, cli.json).await,
        Bench::Marketplace {
            nodes,
            jobs,
            concurrency,
            rate,
        } => marketplace(nodes, jobs, concurrency, rate, cli.json).await,
    }
}

async fn submit_latency(jobs: usize, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(jobs > 0, "--jobs must be at least 1");
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    // One warm-up job: the first execution compiles the module, later ones hit the cache.
    let mut accepted = Vec::new();
    let mut assigned = Vec::new();
    let mut running = Vec::new();
    let mut finished = Vec::new();
    for index in 0..=jobs {
        let job_id = format!("bench-{index}");
        let mut events = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_events_of(&job_id)?[0].clone())
            .await?;
        cluster.bus.client.flush().await?;
        let request = rhizos_broker::wire::SubmitJob {
            v: rhizos_broker::wire::WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "bench".into(),
            spec: wasm_spec(&module, &["count", "1"], 10_000),
            max_cost_micros: 1_000_000,
        };
        let started = Instant::now();
        cluster.submit(&request).await?;
        let to_accepted = started.elapsed();
        let (mut to_assigned, mut to_running) = (None, None);
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .with_context(|| format!("no event for {job_id} within 30 s"))?
                .context("event subscription closed")?;
            let Ok(Event {
                body: EventBody::Job { state, .. },
                ..
            }) = serde_json::from_slice(&message.payload)
            else {
                continue;
            };
            match state {
                JobState::Assigned => to_assigned = Some(started.elapsed()),
                JobState::Running => to_running = Some(started.elapsed()),
                s if s.is_terminal() => break,
                _ => {}
            }
        }
        if index > 0 {
            accepted.push(to_accepted);
            assigned.push(to_assigned.context("no assigned event")?);
            running.push(to_running.context("no running event")?);
            finished.push(started.elapsed());
        }
    }
    let report = serde_json::json!({
        "bench": "submit-latency",
        "jobs": jobs,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "submit_reply_ms": summary(&mut accepted),
        "submit_to_assigned_ms": summary(&mut assigned),
        "submit_to_running_ms": summary(&mut running),
        "submit_to_finished_ms": summary(&mut finished),
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "submit → running over {jobs} sequential jobs ({} build, 1 node, real nats-server + SQLite):",
            report["build"].as_str().unwrap_or("?")
        );
        for key in [
            "submit_reply_ms",
            "submit_to_assigned_ms",
            "submit_to_running_ms",
            "submit_to_finished_ms",
        ] {
            let s = &report[key];
            let v = |name: &str| s[name].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {key:<24} median {:>8.3}  min {:>8.3}  p90 {:>8.3}  max {:>8.3}",
                v("median"),
                v("min"),
                v("p90"),
                v("max")
            );
        }
    }
    cluster.shutdown().await
}

async fn container_overhead(runs: usize, json: bool) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    anyhow::ensure!(runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        rhizos_testbed::images::docker_available(),
        "no Docker engine answers (`docker info`)"
    );
    let image = rhizos_testbed::images::probe_image()?;
    let args = ["out:started", "exit:0"];

    // Bare: `docker run --rm` with the same sandbox flags, first line on stdout, then exit.
    let mut bare_first = Vec::new();
    let mut bare_total = Vec::new();
    for _ in 0..=runs {
        let started = Instant::now();
        let mut child = tokio::process::Command::new("docker")
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--memory",
                "64m",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--user",
                "65534:65534",
                &image,
            ])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("docker run has no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = lines.next_line().await?;
        let to_first = started.elapsed();
        anyhow::ensure!(
            first.as_deref() == Some("started"),
            "docker run printed {first:?}"
        );
        anyhow::ensure!(child.wait().await?.success(), "docker run failed");
        bare_first.push(to_first);
        bare_total.push(started.elapsed());
    }
    bare_first.remove(0);
    bare_total.remove(0);

    // Through RhizOS: submit over NATS, placed, assigned, the plugin creates/copies/attaches/
    // starts; the first line arrives on the job's log subject; the end is the settled event.
    let cluster = Cluster::start(ClusterOptions {
        plugin_files: vec![rhizos_testbed::plugin_file("rhizos_plugin_docker")?],
        plugin_config: [("docker".to_owned(), serde_json::json!({"pull": "never"}))].into(),
        node_prefix: format!("bench{}", &rhizos_testbed::cluster::uuid_like()[..8]),
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("bench", 1_000_000_000).await?;
    let mut job_first = Vec::new();
    let mut job_total = Vec::new();
    for index in 0..=runs {
        let job_id = format!("overhead-{index}");
        let mut logs = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_log(&job_id)?)
            .await?;
        let mut events = cluster
            .bus
            .client
            .subscribe(cluster.bus.subjects.job_events_of(&job_id)?[0].clone())
            .await?;
        cluster.bus.client.flush().await?;
        let request = rhizos_broker::wire::SubmitJob {
            v: rhizos_broker::wire::WIRE_VERSION,
            job_id: Some(job_id.clone()),
            account: "bench".into(),
            spec: rhizos_testbed::cluster::docker_spec(&image, &args, 30_000),
            max_cost_micros: 1_000_000,
        };
        let started = Instant::now();
        cluster.submit(&request).await?;
        tokio::time::timeout(Duration::from_secs(30), logs.next())
            .await
            .with_context(|| format!("no output from {job_id} within 30 s"))?
            .context("log subscription closed")?;
        let to_first = started.elapsed();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .with_context(|| format!("{job_id} did not end within 30 s"))?
                .context("event subscription closed")?;
            if let Ok(Event {
                body: EventBody::Job { state, .. },
                ..
            }) = serde_json::from_slice(&message.payload)
                && state.is_terminal()
            {
                anyhow::ensure!(state == JobState::Succeeded, "{job_id} ended {state:?}");
                break;
            }
        }
        if index > 0 {
            job_first.push(to_first);
            job_total.push(started.elapsed());
        }
    }
    cluster.shutdown().await?;
    let median = |v: &mut Vec<Duration>| summary(v)["median"].as_f64().unwrap_or(f64::NAN);
    let (bare_first_ms, bare_total_ms) = (median(&mut bare_first), median(&mut bare_total));
    let (job_first_ms, job_total_ms) = (median(&mut job_first), median(&mut job_total));
    let report = serde_json::json!({
        "bench": "container-overhead",
        "runs": runs,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "image": image,
        "docker_run_first_line_ms": summary(&mut bare_first),
        "docker_run_exit_ms": summary(&mut bare_total),
        "rhizos_submit_to_first_line_ms": summary(&mut job_first),
        "rhizos_submit_to_settled_ms": summary(&mut job_total),
        "ratio_first_line": job_first_ms / bare_first_ms,
        "ratio_end": job_total_ms / bare_total_ms,
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "container job overhead, medians over {runs} sequential runs ({} build, image {image}):",
            report["build"].as_str().unwrap_or("?")
        );
        println!(
            "  bare `docker run --rm`: first line {bare_first_ms:>8.1} ms, exited {bare_total_ms:>8.1} ms"
        );
        println!(
            "  rhizos job (submit):    first line {job_first_ms:>8.1} ms, settled {job_total_ms:>8.1} ms"
        );
        println!(
            "  ratio rhizos / docker run: to first line {:.2}×, to the end {:.2}×",
            job_first_ms / bare_first_ms,
            job_total_ms / bare_total_ms
        );
    }
    Ok(())
}

async fn module_resolve(calls: usize, json: bool) -> anyhow::Result<()> {
    use rhizos_core::orchestrator::modules::ModuleResolver;
    anyhow::ensure!(calls > 0, "--calls must be at least 1");
    let manifest = serde_json::json!({
        "id": "mod-bench", "version": "1.0.0", "backend": "wasm",
        "artifact": {"data_b64": "AGFzbQEAAAA=", "sha256": "0".repeat(64)},
    })
    .to_string();
    // One directory per resolver, so each is measured alone.
    let index_dir = tempfile::tempdir()?;
    std::fs::create_dir_all(index_dir.path().join("registry"))?;
    std::fs::write(
        index_dir.path().join("registry/index.json"),
        format!(r#"{{"modules": [{manifest}]}}"#),
    )?;
    std::fs::copy(
        rhizos_testbed::guests::resolver_index_wasm()?,
        index_dir.path().join("index.wasm"),
    )?;
    std::fs::write(
        index_dir.path().join("index.json"),
        r#"{"read_dirs": [{"host": "registry", "guest": "/registry"}], "config": {"index": "/registry/index.json"}}"#,
    )?;
    let server = rhizos_testbed::registry_server::RegistryServer::start(
        [(
            "/modules/mod-bench".to_owned(),
            rhizos_testbed::registry_server::Route::Json {
                body: manifest.clone(),
                etag: "\"b\"".into(),
            },
        )]
        .into(),
    )?;
    let http_dir = tempfile::tempdir()?;
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_http")?,
        http_dir.path().join("http.so"),
    )?;
    let node = rhizos_testbed::doubles::SubstrateDouble::start()?;
    node.put_module(
        "ModuleRegistry",
        "Modules",
        "mod-bench",
        &[("1.0.0", &manifest)],
    );
    let substrate_dir = tempfile::tempdir()?;
    std::fs::copy(
        rhizos_testbed::plugin_file("rhizos_plugin_resolver_substrate")?,
        substrate_dir.path().join("substrate.so"),
    )?;
    let cases = [
        ("index (component)", index_dir.path(), None),
        (
            "http (stable ABI)",
            http_dir.path(),
            Some(("http", serde_json::json!({"base_url": server.base_url}))),
        ),
        (
            "substrate (stable ABI)",
            substrate_dir.path(),
            Some(("substrate", serde_json::json!({"url": node.url}))),
        ),
    ];
    let mut rows = Vec::new();
    for (name, dir, config) in cases {
        let configs: std::collections::BTreeMap<String, String> = config
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.to_string()))
            .collect();
        let mut rates = Vec::new();
        for ttl in [Duration::ZERO, Duration::from_secs(3600)] {
            let resolver =
                ModuleResolver::open(dir, configs.clone(), &[], Duration::from_secs(5), ttl)?;
            resolver
                .resolve("chain://mod-bench")
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let started = Instant::now();
            for _ in 0..calls {
                std::hint::black_box(
                    resolver
                        .resolve("chain://mod-bench")
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", e.message))?,
                );
            }
            rates.push(calls as f64 / started.elapsed().as_secs_f64());
        }
        rows.push(
            serde_json::json!({"resolver": name, "cold_per_s": rates[0], "warm_per_s": rates[1]}),
        );
    }
    let report = serde_json::json!({
        "bench": "module-resolve",
        "calls": calls,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "resolvers": rows,
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "chain:// resolutions per second, {calls} sequential per case ({} build; cold: no cache, every call reaches the resolver; warm: orchestrator cache):",
            report["build"].as_str().unwrap_or("?")
        );
        for row in &rows {
            println!(
                "  {:<24} cold {:>10.0}/s   warm {:>10.0}/s",
                row["resolver"].as_str().unwrap_or("?"),
                row["cold_per_s"].as_f64().unwrap_or(f64::NAN),
                row["warm_per_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

/// An event sink that drops every line.
struct NullSink;

impl rhizos_plugin_api::EventSink for NullSink {
    fn log(&self, _stream: rhizos_plugin_api::LogStream, _line: abi_stable::std_types::RStr<'_>) {}
}

fn null_sink() -> rhizos_plugin_api::EventSinkBox {
    rhizos_plugin_api::EventSink_TO::from_value(NullSink, abi_stable::sabi_trait::TD_Opaque)
}

fn per_call_ns(total: Duration, calls: usize) -> f64 {
    total.as_secs_f64() * 1e9 / calls.max(1) as f64
}

fn plugin_call(calls: usize, json: bool) -> anyhow::Result<()> {
    use abi_stable::std_types::RResult;
    anyhow::ensure!(calls > 0, "--calls must be at least 1");
    let file = rhizos_testbed::plugin_file("rhizos_fixture_plugin_testkit")?;
    let plugin = rhizos_core::agent::plugins::load_file(&file).map_err(anyhow::Error::msg)?;
    let request = || rhizos_plugin_api::ExecRequest {
        execution_id: "bench".into(),
        workload: b"(testkit exit 0)".to_vec().into(),
        args: Default::default(),
        env: Default::default(),
        stdin: Default::default(),
        limits: rhizos_plugin_api::ExecLimits {
            wall_timeout_ms: 1_000,
            memory_limit_bytes: 1 << 20,
            fuel_limit: 0,
            cpu_cores: 0,
            vram_limit_bytes: 0,
        },
        input_files: Default::default(),
        gpu_devices: Default::default(),
    };
    let execution = match plugin.backend.start(request(), null_sink()) {
        RResult::ROk(execution) => execution,
        RResult::RErr(e) => anyhow::bail!("testkit refused: {e}"),
    };
    let started = Instant::now();
    for _ in 0..calls {
        execution.cancel();
    }
    let cancel_ns = per_call_ns(started.elapsed(), calls);
    let cycles = (calls / 10).max(1);
    let started = Instant::now();
    for _ in 0..cycles {
        let RResult::ROk(execution) = plugin.backend.start(request(), null_sink()) else {
            anyhow::bail!("testkit refused");
        };
        std::hint::black_box(execution.wait());
    }
    let start_wait_ns = per_call_ns(started.elapsed(), cycles);
    // The component path: every call gets a fresh instance (isolation by design), so a call
    // costs instantiation + the call itself.
    let host = rhizos_core::component::ComponentHost::new()?;
    let resolver = host
        .load_resolver(
            &rhizos_testbed::guests::resolver_index_wasm()?,
            rhizos_core::component::Manifest {
                read_dirs: vec![],
                // Room for the one-instance loop below (a million calls in one "call").
                fuel_per_call: u64::MAX / 4,
                memory_mib: 16,
                timeout_ms: 600_000,
                config: serde_json::json!({}),
            },
        )
        .map_err(anyhow::Error::msg)?;
    let component_calls = (calls / 100).max(1);
    let started = Instant::now();
    for _ in 0..component_calls {
        std::hint::black_box(resolver.describe_call().map_err(anyhow::Error::msg)?);
    }
    let component_ns = per_call_ns(started.elapsed(), component_calls);
    let started = Instant::now();
    resolver
        .describe_calls_on_one_instance(calls)
        .map_err(anyhow::Error::msg)?;
    let component_raw_ns = per_call_ns(started.elapsed(), calls);
    let report = serde_json::json!({
        "bench": "plugin-call",
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "abi_stable_call_ns": cancel_ns,
        "abi_stable_start_wait_ns": start_wait_ns,
        "component_call_ns": component_ns,
        "component_raw_call_ns": component_raw_ns,
        "calls": calls,
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "stable-ABI plugin calls (testkit plugin, {} build):",
            report["build"].as_str().unwrap_or("?")
        );
        println!(
            "  one call (Execution::cancel)          {cancel_ns:>10.1} ns  over {calls} calls"
        );
        println!(
            "  start + wait of an ended execution    {start_wait_ns:>10.1} ns  over {cycles} cycles"
        );
        println!(
            "  component call (new instance + call)  {component_ns:>10.1} ns  over {component_calls} calls"
        );
        println!(
            "  component call on one instance        {component_raw_ns:>10.1} ns  over {calls} calls"
        );
    }
    Ok(())
}

fn wasm_instantiate(iterations: usize, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(iterations > 0, "--iterations must be at least 1");
    let backend =
        rhizos_plugin_wasm::exec::WasmBackend::new().map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    // The first instantiation compiles and caches the module; it is not counted.
    backend
        .time_instantiations(&module, 1, null_sink())
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let mut times = backend
        .time_instantiations(&module, iterations, null_sink())
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    times.sort();
    let us = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    let report = serde_json::json!({
        "bench": "wasm-instantiate",
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "module_bytes": module.len(),
        "iterations": iterations,
        "instantiate_us": { "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "min": us(0.0) },
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "instantiating the cached demo module ({} bytes; pooling allocator; {} build):",
            module.len(),
            report["build"].as_str().unwrap_or("?")
        );
        println!(
            "  p50 {:.1} µs  p90 {:.1} µs  p99 {:.1} µs  min {:.1} µs  over {iterations}",
            us(0.5),
            us(0.9),
            us(0.99),
            us(0.0)
        );
    }
    Ok(())
}

async fn wasm_jobs(
    jobs: usize,
    agents: usize,
    concurrency: usize,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        jobs > 0 && agents > 0 && concurrency > 0,
        "--jobs, --agents and --concurrency must be > 0"
    );
    let cluster = Cluster::start(ClusterOptions {
        agents,
        max_concurrent: 16,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("wasm", 1_000_000_000_000).await?;
    let module = std::fs::read(rhizos_testbed::guests::demo_wasm()?)?;
    let spec = wasm_spec(&module, &["count", "1"], 30_000);
    let bus = cluster.bus.clone();
    let subjects = &cluster.bus.subjects;
    let ended_wildcard = subjects
        .escrow_event(rhizos_broker::subjects::EscrowEventKind::Settled, "x")?
        .trim_end_matches('x')
        .to_owned()
        + "*";
    let mut settled = cluster.bus.client.subscribe(ended_wildcard).await?;
    cluster.bus.client.flush().await?;
    let started = Instant::now();
    let submitted_at: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Default::default();
    let mut submits = futures::stream::iter((0..jobs).map(|index| {
        let (bus, spec, submitted_at) = (bus.clone(), spec.clone(), submitted_at.clone());
        async move {
            let job_id = format!("wasm-{index}");
            if let Ok(mut map) = submitted_at.lock() {
                map.insert(job_id.clone(), Instant::now());
            }
            bus.request::<_, rhizos_broker::wire::SubmitJobReply>(
                bus.subjects.job_submit(),
                &rhizos_broker::wire::SubmitJob {
                    v: rhizos_broker::wire::WIRE_VERSION,
                    job_id: Some(job_id),
                    account: "wasm".into(),
                    spec,
                    max_cost_micros: 10_000_000,
                },
            )
            .await
        }
    }))
    .buffer_unordered(concurrency);
    let mut rejected = 0usize;
    let collector = tokio::spawn({
        let submitted_at = submitted_at.clone();
        async move {
            let mut latencies = Vec::new();
            while latencies.len() < jobs {
                match tokio::time::timeout(Duration::from_secs(120), settled.next()).await {
                    Ok(Some(message)) => {
                        let job_id =
                            rhizos_broker::Subjects::last_token(&message.subject).to_owned();
                        if let Some(at) = submitted_at
                            .lock()
                            .ok()
                            .and_then(|m| m.get(&job_id).copied())
                        {
                            latencies.push(at.elapsed());
                        }
                    }
                    _ => break,
                }
            }
            latencies
        }
    });
    while let Some(result) = submits.next().await {
        if result.is_err() {
            rejected += 1;
        }
    }
    anyhow::ensure!(rejected == 0, "{rejected} submits were refused");
    let mut latencies = collector.await?;
    let total_s = started.elapsed().as_secs_f64();
    let done = latencies.len();
    let report = serde_json::json!({
        "bench": "wasm-jobs",
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "jobs": jobs,
        "agents": agents,
        "concurrency": concurrency,
        "settled": done,
        "total_s": total_s,
        "jobs_per_s": done as f64 / total_s,
        "submit_to_settled_ms": summary(&mut latencies),
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "{done} of {jobs} WASM jobs (demo `count 1`) through the network in {total_s:.2} s = {:.0} jobs/s ({} agents, {} build)",
            done as f64 / total_s,
            agents,
            report["build"].as_str().unwrap_or("?")
        );
        let s = &report["submit_to_settled_ms"];
        let v = |name: &str| s[name].as_f64().unwrap_or(f64::NAN);
        println!(
            "  submit → settled: median {:.2} ms  p90 {:.2} ms  max {:.2} ms",
            v("median"),
            v("p90"),
            v("max")
        );
    }
    cluster.shutdown().await
}

async fn round_trip(requests: usize, json: bool) -> anyhow::Result<()> {
    use rhizos_broker::wire::{AccountRef, AccountView, Deposit, WIRE_VERSION};
    anyhow::ensure!(requests > 0, "--requests must be at least 1");
    let cluster = Cluster::start(ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.funded_account("rt", 1).await?;
    let bus = &cluster.bus;
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for index in 0..requests {
        let started = Instant::now();
        let _: AccountView = bus
            .request(
                bus.subjects.account_balance(),
                &AccountRef {
                    v: WIRE_VERSION,
                    account: "rt".into(),
                },
            )
            .await?;
        reads.push(started.elapsed());
        let started = Instant::now();
        let _: AccountView = bus
            .request(
                bus.subjects.account_deposit(),
                &Deposit {
                    v: WIRE_VERSION,
                    account: "rt".into(),
                    amount_micros: 1,
                    idempotency_key: Some(format!("rt-{index}")),
                },
            )
            .await?;
        writes.push(started.elapsed());
    }
    let report = serde_json::json!({
        "bench": "round-trip",
        "requests": requests,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "read_ms": summary(&mut reads),
        "write_ms": summary(&mut writes),
    });
    if json {
        println!("{report}");
    } else {
        println!("request round trips through the orchestrator ({requests} each, sequential):");
        for (key, label) in [
            ("read_ms", "balance (no commit)"),
            ("write_ms", "deposit (commit)"),
        ] {
            let s = &report[key];
            let v = |name: &str| s[name].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {label:<22} median {:>7.3} ms  min {:>7.3}  p90 {:>7.3}  max {:>7.3}",
                v("median"),
                v("min"),
                v("p90"),
                v("max")
            );
        }
    }
    cluster.shutdown().await
}

async fn marketplace(
    nodes: usize,
    jobs: usize,
    concurrency: usize,
    rate: Option<f64>,
    json: bool,
) -> anyhow::Result<()> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    anyhow::ensure!(
        jobs > 0 && nodes > 0 && concurrency > 0,
        "--nodes, --jobs and --concurrency must be > 0"
    );
    anyhow::ensure!(
        rate.is_none_or(|r| r.is_finite() && r > 0.0),
        "--rate must be a positive number of jobs per second"
    );
    let options = ClusterOptions {
        agents: 0,
        ..ClusterOptions::default()
    };
    let pricing = options.pricing;
    let cluster = Cluster::start(options).await?;
    let setup = Instant::now();
    let fleet = rhizos_testbed::sim::SimFleet::start(
        rhizos_broker::Bus::connect(&cluster.settings.nats).await?,
        nodes,
        pricing,
        10,
    )
    .await?;
    let registration_s = setup.elapsed().as_secs_f64();
    cluster.funded_account("load", 1_000_000_000_000).await?;

    // Watch every job's events: running (latency) and settled (throughput).
    let subjects = &cluster.bus.subjects;
    let running_wildcard = subjects
        .job_event("running", "x")?
        .trim_end_matches('x')
        .to_owned()
        + "*";
    let settled_wildcard = subjects
        .escrow_event(rhizos_broker::subjects::EscrowEventKind::Settled, "x")?
        .trim_end_matches('x')
        .to_owned()
        + "*";
    let mut running_events = cluster.bus.client.subscribe(running_wildcard).await?;
    let mut settled_events = cluster.bus.client.subscribe(settled_wildcard).await?;
    cluster.bus.client.flush().await?;
    let submitted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let watcher = {
        let (submitted_at, latencies) = (submitted_at.clone(), latencies.clone());
        tokio::spawn(async move {
            while let Some(message) = running_events.next().await {
                let job_id = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
                let started = submitted_at
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&job_id).copied());
                if let (Some(started), Ok(mut l)) = (started, latencies.lock()) {
                    l.push(started.elapsed());
                }
            }
        })
    };
    let module = rhizos_broker::wire::b64_encode(b"(module (func (export \"_start\")))");
    let started = Instant::now();
    let bus = cluster.bus.clone();
    let submit = |index: usize| {
        let (bus, module, submitted_at) = (bus.clone(), module.clone(), submitted_at.clone());
        async move {
            let job_id = format!("load-{index}");
            let spec = rhizos_broker::wire::JobSpec {
                max_retries: 0,
                ..rhizos_broker::wire::JobSpec::new(
                    rhizos_broker::wire::Workload::Wasm { module_b64: module },
                    1_000,
                    64,
                )
            };
            let request = rhizos_broker::wire::SubmitJob {
                v: rhizos_broker::wire::WIRE_VERSION,
                job_id: Some(job_id.clone()),
                account: "load".into(),
                spec,
                max_cost_micros: 1_000_000,
            };
            if let Ok(mut map) = submitted_at.lock() {
                map.insert(job_id, Instant::now());
            }
            bus.request::<_, rhizos_broker::wire::SubmitJobReply>(
                bus.subjects.job_submit(),
                &request,
            )
            .await
        }
    };
    let mut rejected = 0usize;
    match rate {
        None => {
            let mut submits =
                futures::stream::iter((0..jobs).map(submit)).buffer_unordered(concurrency);
            while let Some(result) = submits.next().await {
                rejected += usize::from(result.is_err());
            }
        }
        Some(rate) => {
            // Open loop: job i goes out at started + i / rate (late ones at once), answers
            // collected meanwhile; never more than `concurrency` unanswered.
            let mut in_flight = futures::stream::FuturesUnordered::new();
            for index in 0..jobs {
                let due = started + Duration::from_secs_f64(index as f64 / rate);
                loop {
                    tokio::select! {
                        biased;
                        Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                            let result: Result<_, rhizos_broker::bus::RequestError> = result;
                            rejected += usize::from(result.is_err());
                        }
                        () = tokio::time::sleep_until(due.into()), if in_flight.len() < concurrency => break,
                    }
                }
                in_flight.push(submit(index));
            }
            while let Some(result) = in_flight.next().await {
                rejected += usize::from(result.is_err());
            }
        }
    }
    let submit_s = started.elapsed().as_secs_f64();
    let mut settled = 0usize;
    while settled < jobs - rejected {
        match tokio::time::timeout(Duration::from_secs(60), settled_events.next()).await {
            Ok(Some(_)) => settled += 1,
            _ => break,
        }
    }
    let total_s = started.elapsed().as_secs_f64();
    watcher.abort();
    let mut latencies = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    let report = serde_json::json!({
        "bench": "marketplace",
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "nodes": nodes,
        "jobs": jobs,
        "concurrency": concurrency,
        "rate": rate,
        "registration_s": registration_s,
        "rejected": rejected,
        "settled": settled,
        "submit_phase_s": submit_s,
        "total_s": total_s,
        "jobs_settled_per_s": settled as f64 / total_s,
        "submit_to_running_ms": { "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0), "samples": latencies.len() },
    });
    if json {
        println!("{report}");
    } else {
        let load = match rate {
            Some(rate) => format!("offered at {rate} jobs/s, at most {concurrency} in flight"),
            None => format!("concurrency {concurrency}"),
        };
        println!(
            "{} jobs over {} simulated nodes ({} build, {load}):",
            jobs,
            nodes,
            report["build"].as_str().unwrap_or("?")
        );
        println!("  registered {nodes} nodes in {registration_s:.2} s");
        println!(
            "  settled {settled} (rejected {rejected}) in {total_s:.2} s = {:.0} jobs/s",
            settled as f64 / total_s
        );
        println!(
            "  submit → running: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            pick(0.5),
            pick(0.99),
            pick(1.0)
        );
    }
    drop(fleet);
    cluster.shutdown().await
}

fn summary(samples: &mut [Duration]) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::Value::Null;
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
    serde_json::json!({ "median": at(0.5), "min": at(0.0), "p90": at(0.9), "max": at(1.0) })
}
