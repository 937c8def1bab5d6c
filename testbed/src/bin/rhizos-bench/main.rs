//! `rhizos-bench`: benchmarks that print numbers — never asserted in tests. Each runs against
//! real parts (nats-server, SQLite with synchronous=FULL, wasmtime, the Docker engine) and
//! prints a typed report: text, or one JSON object with `--json`. One file per benchmark:
//!
//! | benchmark | file | measures |
//! |---|---|---|
//! | `submit-latency` | `submit_latency.rs` | one real node, the demo job: submit → reply / assigned / running / finished |
//! | `round-trip` | `round_trip.rs` | a request through the orchestrator without a commit and with one |
//! | `marketplace` | `marketplace.rs` | simulated nodes: jobs settled per second, submit → running percentiles (closed or open loop) |
//! | `plugin-call` | `plugin_call.rs` | one stable-ABI call, start + wait, a component call |
//! | `wasm-instantiate` | `plugin_call.rs` | instantiating a cached module the way an execution does |
//! | `wasm-jobs` | `wasm_jobs.rs` | small WASM jobs through the whole network with real agents |
//! | `module-resolve` | `module_resolve.rs` | chain:// resolutions per second per resolver, cold and cached |
//! | `container-overhead` | `container_overhead.rs` | a container job against a bare `docker run`: the ratio |
//! | `log-flood` | `log_flood.rs` | a guest printing empty lines in a loop: lines/s, lines streamed, NATS messages per 10,000 lines, peak memory |
//! | `scale` | `scale.rs` (+ `chart.rs`) | one `rhizosd` orchestrator against 1,000 → 10,000 → 50,000 simulated nodes: CPU, heartbeats absorbed, jobs/s, submit → running, memory, pick cost; JSON + PNG |
//!
//! Build with `cargo build --release --workspace` and run `target/release/rhizos-bench <name>`:
//! figures from a debug build say so and are not comparable.

mod chaos;
mod chart;
mod container_overhead;
mod gateway;
mod limits;
mod log_flood;
mod marketplace;
mod module_resolve;
mod partition;
mod plugin_call;
mod replication;
mod report;
mod round_trip;
mod scale;
mod submit_latency;
mod wasm_jobs;

use clap::{Parser, Subcommand};

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
    /// A guest printing empty lines as fast as it can on a real agent (wasm plugin): lines/s it
    /// emits, lines streamed within the agent's log budget and the NATS messages they took,
    /// and the process's peak memory during the flood.
    LogFlood {
        #[arg(long, default_value_t = 1_000_000)]
        lines: u64,
        /// The agent's `max_log_lines` (default: the agent's default).
        #[arg(long)]
        budget_lines: Option<u64>,
        /// The agent's `max_stored_log_bytes` (default: the agent's; 0 keeps only the tail,
        /// to measure what storing the whole stdout costs).
        #[arg(long)]
        stored_log_bytes: Option<u64>,
    },
    /// What the AI gateway adds to a streamed chat completion: the same requests to a fast
    /// local mock model server directly and through the whole network (gateway, orchestrator,
    /// agent, openai plugin), at concurrency 1 and 64: time to the first chunk and the last,
    /// p50/p99, requests per second — and through LiteLLM's proxy against the same mock, side
    /// by side, where it is installed (`bash testbed/ai/litellm-setup.sh`).
    Gateway {
        #[arg(long, default_value_t = 640)]
        requests: usize,
        /// Tokens in each answer.
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// LiteLLM's `litellm` command (default: the one testbed/ai/litellm-setup.sh installs,
        /// if it is there; the comparison is left out without it).
        #[arg(long)]
        litellm: Option<std::path::PathBuf>,
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
        /// Authentication on: nats-server checks every party's nkey and permissions, the
        /// submitter is a user, the nodes are enrolled (the simulated fleet shares one
        /// service connection).
        #[arg(long)]
        secure: bool,
        /// The replicated ledger on (each group commit's changeset appended to the ledger
        /// stream before it commits; one server here, so the append is acknowledged by one):
        /// what capture and append add to the hot path.
        #[arg(long)]
        replicated: bool,
        /// `[orchestrator] job_payload_max_age_s` (default: the orchestrator's, 30 days): with
        /// 1, ended jobs' payloads are dropped while the load runs — what pruning costs the
        /// hot path, and what it saves in the ledger file (`ledger_bytes`).
        #[arg(long)]
        payload_max_age_s: Option<u64>,
    },
    /// One orchestrator (the real rhizosd, its own process) against growing fleets of
    /// simulated nodes heartbeating, each on a fresh nats-server and ledger: registration
    /// time, its CPU with heartbeats only and with jobs flowing, heartbeats absorbed per second,
    /// jobs settled per second, submit → running p50/p99, its memory, and what one pick costs
    /// in the registry at that size. Writes scale.json and scale.png to --out. The full run is
    /// the default; the test suite runs a short one (`--nodes 100,400 --jobs 200 --concurrency 32 --idle-s 1.5 --heartbeat-ms 500`).
    Scale(scale::Options),
    /// What replicating the ledger would cost (ADR 0009): on a 3-server NATS cluster on this
    /// machine, records of --bytes (a group commit's changeset) appended one after the other
    /// with an expected last sequence, acknowledged by one server (R1) and by a quorum of three
    /// (R3), beside a durable SQLite commit and a NATS round trip.
    /// Chaos on a whole network of processes (3 nats-servers, 2 orchestrators sharing the
    /// replicated ledger, real agents): while jobs flow, `kill -9` and restart the active
    /// orchestrator, the standby, agents and nats-servers at moments drawn from the seed; then
    /// check every job ended, none settled twice, `ledger verify`, the money exact to the
    /// micro, both orchestrators' ledgers equal. Writes chaos.json and chaos.png (each
    /// request's wait over time, faults marked) to --out; exits 1 on any violation. The full
    /// run is `--seeds 100`; the test suite runs two short seeds.
    Chaos(chaos::Options),
    /// The cluster scenario: the same network, one nats-server killed a third of the way
    /// through and started again at two thirds; the failover's cost is the longest wait.
    /// Writes cluster.json and cluster.png to --out.
    Cluster(chaos::ClusterOptions),
    /// The partition scenario: an agent in a network namespace of its own cut off from the bus
    /// (its link down: packets dropped) while it runs jobs, then reconnected. Its jobs are
    /// requeued once to the other agent; its late reports are refused; each provider paid
    /// exactly for what it ran last. Needs root and iproute2. Writes partition.json and
    /// partition.png to --out.
    Partition(partition::Options),
    Replication {
        #[arg(long, default_value_t = 2_000)]
        appends: usize,
        #[arg(long, default_value_t = 4_096)]
        bytes: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rhizos_core::telemetry::init("warn", false);
    let cli = Cli::parse();
    let json = cli.json;
    match cli.bench {
        Bench::SubmitLatency { jobs } => report::print(&submit_latency::run(jobs).await?, json),
        Bench::RoundTrip { requests } => report::print(&round_trip::run(requests).await?, json),
        Bench::Gateway {
            requests,
            tokens,
            litellm,
        } => report::print(&gateway::run(requests, tokens, litellm).await?, json),
        Bench::PluginCall { calls } => report::print(&plugin_call::plugin_call(calls)?, json),
        // Runs its own runtime inside the backend: off this one's worker threads.
        Bench::WasmInstantiate { iterations } => {
            let report =
                tokio::task::spawn_blocking(move || plugin_call::wasm_instantiate(iterations))
                    .await??;
            report::print(&report, json)
        }
        Bench::WasmJobs {
            jobs,
            agents,
            concurrency,
        } => report::print(&wasm_jobs::run(jobs, agents, concurrency).await?, json),
        Bench::ContainerOverhead { runs } => {
            report::print(&container_overhead::run(runs).await?, json)
        }
        Bench::LogFlood {
            lines,
            budget_lines,
            stored_log_bytes,
        } => report::print(
            &log_flood::run(lines, budget_lines, stored_log_bytes).await?,
            json,
        ),
        Bench::ModuleResolve { calls } => report::print(&module_resolve::run(calls).await?, json),
        Bench::Marketplace {
            nodes,
            jobs,
            concurrency,
            rate,
            secure,
            replicated,
            payload_max_age_s,
        } => report::print(
            &marketplace::run(
                nodes,
                jobs,
                concurrency,
                rate,
                secure,
                replicated,
                payload_max_age_s,
            )
            .await?,
            json,
        ),
        Bench::Scale(options) => report::print(&scale::run(options).await?, json),
        Bench::Chaos(options) => {
            let report = chaos::run(options).await?;
            exit_on_violation(&report, report.violations(), json)
        }
        Bench::Cluster(options) => {
            let report = chaos::run_cluster(options).await?;
            exit_on_violation(&report, report.violations(), json)
        }
        Bench::Partition(options) => {
            let report = partition::run(options).await?;
            let violations = report.violations();
            exit_on_violation(&report, violations, json)
        }
        Bench::Replication { appends, bytes } => {
            report::print(&replication::run(appends, bytes).await?, json)
        }
    }
}

/// Prints a scenario's report; exits 1 when it found a violation.
fn exit_on_violation<R: serde::Serialize + std::fmt::Display>(
    report: &R,
    violations: usize,
    json: bool,
) -> anyhow::Result<()> {
    report::print(report, json)?;
    if violations > 0 {
        eprintln!("{violations} violations: see the report");
        std::process::exit(1);
    }
    Ok(())
}
