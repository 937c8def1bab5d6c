//! `rhizos job ...`: submit (and watch), get, list, cancel.

use crate::{GlobalArgs, money};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use rhizos_broker::wire::{
    self, Event, EventBody, JobSpec, JobState, JobView, LogBatch, LogLine, LogStream, SubmitJob,
    WIRE_VERSION, Workload,
};
use rhizos_broker::{Bus, Client};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum JobCommand {
    /// Submit a job; with --wait, stream its logs and print the result and the money.
    Submit(Box<SubmitArgs>),
    /// Show one job.
    Get { job_id: String },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        account: Option<String>,
        /// pending, assigned, running, succeeded, failed, cancelled or timed_out.
        #[arg(long)]
        state: Option<String>,
        /// Jobs per page (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue after this cursor (printed at the end of the previous page, `next` in
        /// --json).
        #[arg(long)]
        after: Option<String>,
    },
    /// Cancel a job: before it starts, everything is refunded; while it runs, it is stopped and
    /// the time used is paid.
    Cancel { job_id: String },
    /// A finished job's output: without WHAT, list it; `stdout` or `stderr` prints the whole
    /// stream (stored out of band when longer than the tail `job get` shows); a file's path
    /// saves that file. Large files and whole logs are kept for `[nats] blob_max_age_s`.
    Output {
        job_id: String,
        /// `stdout`, `stderr`, or the path of a file the job wrote under /output.
        what: Option<String>,
        /// Write there instead of standard output (a file's default is its name, in the
        /// current directory).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Save every output file into this directory.
        #[arg(long, conflicts_with_all = ["what", "out"])]
        dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct SubmitArgs {
    /// Paying account.
    #[arg(long, env = "RHIZOS_ACCOUNT")]
    account: String,
    /// WASI command module or component to run (.wasm binary or .wat text).
    #[arg(long, required_unless_present_any = ["image", "cuda_program", "backend", "module"], conflicts_with_all = ["image", "cuda_program", "backend", "module"])]
    wasm: Option<PathBuf>,
    /// Run a registry module instead: chain://<id>[@<version>] (resolved by the orchestrator;
    /// --arg, --env, --memory-mib… override or add to the module's defaults).
    #[arg(long, conflicts_with_all = ["image", "cuda_program", "backend"])]
    module: Option<String>,
    /// Run on another backend a node's plugin offers (e.g. a backend component) instead, with
    /// --payload as its workload.
    #[arg(long, requires = "payload", conflicts_with_all = ["image", "cuda_program"])]
    backend: Option<String>,
    /// With --backend: the file handed to that backend as the workload.
    #[arg(long, requires = "backend")]
    payload: Option<PathBuf>,
    /// Native Linux program to run on GPUs instead (e.g. built with nvcc; needs --gpus ≥ 1;
    /// --min-vram-mib is also its VRAM limit per GPU). Only nodes that allow native CUDA run it.
    #[arg(long, conflicts_with = "image")]
    cuda_program: Option<PathBuf>,
    /// Docker image to run instead (from the node's local image store); the --arg values are
    /// its command.
    #[arg(long)]
    image: Option<String>,
    /// With --image: replace the image's entrypoint (repeat for each word).
    #[arg(long, requires = "image", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// With --image: working directory inside the container.
    #[arg(long, requires = "image")]
    workdir: Option<String>,
    /// With --image: ask for network access (containers have none otherwise; only nodes whose
    /// operator allows it will run the job).
    #[arg(long, requires = "image")]
    network: bool,
    /// Whole GPUs the job needs.
    #[arg(long, default_value_t = 0)]
    gpus: u32,
    /// With --gpus: the least VRAM each GPU must have, in MiB.
    #[arg(long, default_value_t = 0)]
    min_vram_mib: u64,
    /// Argument passed to the program (repeat for several).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// Environment variable NAME=VALUE (repeat for several).
    #[arg(long = "env")]
    env: Vec<String>,
    /// File given to the program as stdin.
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// Input file NAME=PATH (repeat for several): the program reads it at /input/NAME.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// With --wait: save the files the program wrote under /output into this directory.
    #[arg(long, requires = "wait")]
    output_dir: Option<PathBuf>,
    /// The most you will pay, in USD (held in escrow until the job ends).
    #[arg(long)]
    max_cost: String,
    /// Execution deadline in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Memory limit in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// CPU cores to allocate.
    #[arg(long, default_value_t = 1)]
    cpu_cores: u32,
    /// Retries after an infrastructure failure (node lost or restarted), never after the job's
    /// own failure.
    #[arg(long, default_value_t = rhizos_broker::wire::DEFAULT_MAX_RETRIES)]
    max_retries: u32,
    /// How long to wait for a node before giving up (refunded); default: the orchestrator's.
    #[arg(long)]
    queue_timeout_secs: Option<u64>,
    /// Limit on the job's whole life from submit: it is stopped then (refunded if it never
    /// ran, paying the time used if it ran).
    #[arg(long)]
    total_timeout_secs: Option<u64>,
    /// Most WASM fuel (deterministic work units) the job may burn; past it the job fails with
    /// "fuel limit … exhausted". Nodes may price fuel; `job get` shows what was burned.
    #[arg(long)]
    fuel_limit: Option<u64>,
    /// Job id to use (default: generated). Resubmitting an id returns the existing job.
    #[arg(long)]
    job_id: Option<String>,
    /// Stream the job's logs and wait for its end; print the result and the money.
    #[arg(long)]
    wait: bool,
}

pub async fn run(global: &GlobalArgs, command: JobCommand) -> anyhow::Result<()> {
    let acting_for = match &command {
        JobCommand::Submit(args) => Some(args.account.as_str()),
        JobCommand::List { account, .. } => account.as_deref(),
        _ => None,
    };
    let client = Client::new(global.bus_for(acting_for).await?);
    match command {
        JobCommand::Submit(args) => submit(global, client.bus(), *args).await,
        JobCommand::Get { job_id } => {
            let job = client.job_get(&job_id).await?;
            print_job(global.json, &job)
        }
        JobCommand::List {
            account,
            state,
            limit,
            after,
        } => {
            let state = match state {
                Some(text) => Some(
                    JobState::parse(&text).with_context(|| format!("unknown state {text:?}"))?,
                ),
                None => None,
            };
            let list = client
                .job_list_after(account.as_deref(), state, Some(limit), after.as_deref())
                .await?;
            if global.json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.jobs.is_empty() {
                println!("no jobs");
            } else {
                println!(
                    "{:<40} {:<10} {:<10} {:>14} {:>14}",
                    "JOB", "ACCOUNT", "STATE", "MAX COST", "COST"
                );
                for job in list.jobs {
                    println!(
                        "{:<40} {:<10} {:<10} {:>14} {:>14}",
                        job.job_id,
                        job.account,
                        job.state.as_str(),
                        money::format_usd(job.max_cost_micros),
                        job.cost_micros
                            .map(money::format_usd)
                            .unwrap_or_else(|| "-".into())
                    );
                }
                if let Some(next) = &list.next {
                    println!("more: rhizos job list --limit {limit} --after {next}");
                }
            }
            Ok(())
        }
        JobCommand::Cancel { job_id } => {
            let job = client.job_cancel(&job_id).await?;
            if !global.json && job.state == JobState::Running {
                eprintln!(
                    "stop requested; the job ends when its node confirms (rhizos job get {})",
                    job.job_id
                );
            }
            print_job(global.json, &job)
        }
        JobCommand::Output {
            job_id,
            what,
            out,
            dir,
        } => {
            let job = client.job_get(&job_id).await?;
            anyhow::ensure!(
                job.state.is_terminal(),
                "job {job_id} is {}: its output is there once it ends (rhizos job submit --wait, or rhizos job get)",
                job.state.as_str()
            );
            if let Some(pruned) = job.pruned_ms {
                anyhow::bail!(
                    "job {job_id}'s output was dropped {} after it ended (the orchestrator keeps an ended job's payloads for [orchestrator] job_payload_max_age_s); its money and receipt digests remain: rhizos job get {job_id}, rhizos receipt get {job_id}",
                    ago(pruned)
                );
            }
            match (what, dir) {
                (_, Some(dir)) => save_outputs(global, client.bus(), &job, &dir).await,
                (Some(what), None) => output_one(client.bus(), &job, &what, out.as_deref()).await,
                (None, None) => list_outputs(global.json, &job),
            }
        }
    }
}

/// What a job left: inline files, files and whole logs stored out of band.
fn list_outputs(json: bool, job: &JobView) -> anyhow::Result<()> {
    let mut parts: Vec<serde_json::Value> = Vec::new();
    for (name, text) in [("stdout", &job.stdout), ("stderr", &job.stderr)] {
        let (bytes, whole) = match (name, &job.blobs.stdout, &job.blobs.stderr) {
            ("stdout", Some(blob), _) | ("stderr", _, Some(blob)) => (blob.size, true),
            _ => (text.as_ref().map_or(0, |t| t.len() as u64), false),
        };
        parts.push(serde_json::json!({"name": name, "bytes": bytes, "out_of_band": whole}));
    }
    for (name, content) in &job.output_files {
        let bytes = wire::b64_decode("output_files", content).map_or(0, |c| c.len());
        parts.push(serde_json::json!({"name": name, "bytes": bytes, "out_of_band": false}));
    }
    for (name, blob) in &job.blobs.files {
        parts.push(serde_json::json!({"name": name, "bytes": blob.size, "out_of_band": true, "sha256": blob.sha256}));
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "job_id": job.job_id, "outputs": parts })
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for part in parts {
        writeln!(
            out,
            "{:<40} {:>12} bytes{}",
            part["name"].as_str().unwrap_or_default(),
            part["bytes"],
            if part["out_of_band"] == true {
                "  (stored out of band)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// Writes one output (`stdout`, `stderr` or a file) to `out` (standard output for the logs by
/// default, the file's name for a file).
async fn output_one(
    bus: &Bus,
    job: &JobView,
    what: &str,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let open = |path: &std::path::Path| -> anyhow::Result<Box<dyn std::io::Write + Send>> {
        Ok(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )))
    };
    let blob = match what {
        "stdout" => job.blobs.stdout.as_ref(),
        "stderr" => job.blobs.stderr.as_ref(),
        file => job.blobs.files.get(file),
    };
    let inline: Option<Vec<u8>> = match what {
        "stdout" => Some(job.stdout.clone().unwrap_or_default().into_bytes()),
        "stderr" => Some(job.stderr.clone().unwrap_or_default().into_bytes()),
        file => job
            .output_files
            .get(file)
            .map(|content| wire::b64_decode("output_files", content))
            .transpose()?,
    };
    if blob.is_none() && inline.is_none() {
        anyhow::bail!(
            "job {} has no output {what:?} (rhizos job output {} lists what it has)",
            job.job_id,
            job.job_id
        );
    }
    let mut sink: Box<dyn std::io::Write + Send> = match (out, what) {
        (Some(path), _) => open(path)?,
        (None, "stdout" | "stderr") => Box::new(std::io::stdout()),
        (None, file) => {
            anyhow::ensure!(
                wire::valid_file_path(file),
                "the job returned an output file with an unsafe name {file:?}; give --out"
            );
            let name = std::path::Path::new(file)
                .file_name()
                .context("an output file without a name; give --out")?;
            open(std::path::Path::new(name))?
        }
    };
    match (blob, inline) {
        (Some(blob), _) => fetch_blob(bus, job, what, blob, &mut sink).await?,
        (None, Some(bytes)) => sink.write_all(&bytes)?,
        (None, None) => {}
    }
    sink.flush()?;
    Ok(())
}

/// Reads a blob of `job` (stored by its node) into `sink`.
async fn fetch_blob(
    bus: &Bus,
    job: &JobView,
    what: &str,
    blob: &wire::BlobRef,
    sink: &mut (dyn std::io::Write + Send),
) -> anyhow::Result<()> {
    let node = job
        .node_id
        .as_deref()
        .context("the job names out-of-band output but no node")?;
    bus.get_blob(&job.account, node, what, blob, sink)
        .await
        .with_context(|| format!("cannot fetch {what} of job {}", job.job_id))
}

/// Saves every output file of `job` (inline or out of band) under `dir`.
async fn save_outputs(
    global: &GlobalArgs,
    bus: &Bus,
    job: &JobView,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let names = job.output_files.keys().chain(job.blobs.files.keys());
    for name in names {
        anyhow::ensure!(
            wire::valid_file_path(name),
            "the job returned an output file with an unsafe name {name:?}; not saved"
        );
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut sink = std::io::BufWriter::new(file);
        match job.blobs.files.get(name) {
            Some(blob) => {
                // A large file comes in 256 KiB chunks from the blob stream: a byte bar.
                let bar = if global.json {
                    ProgressBar::hidden()
                } else {
                    ProgressBar::new(blob.size).with_style(
                        ProgressStyle::with_template(
                            "{msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    )
                };
                bar.set_message(name.clone());
                let mut counted = bar.wrap_write(&mut sink);
                fetch_blob(bus, job, name, blob, &mut counted).await?;
                bar.finish_and_clear();
            }
            None => sink.write_all(&wire::b64_decode("output_files", &job.output_files[name])?)?,
        }
        sink.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        if !global.json {
            eprintln!("· saved {}", path.display());
        }
    }
    Ok(())
}

/// The workload the flags name (exactly one of --wasm, --image, --cuda-program, --backend,
/// --module).
fn workload(args: &SubmitArgs) -> anyhow::Result<Workload> {
    Ok(match (&args.wasm, &args.image) {
        (None, None) if args.module.is_some() => {
            let uri = args.module.clone().unwrap_or_default();
            wire::ModuleRef::parse(&uri).map_err(anyhow::Error::msg)?;
            Workload::Module { uri }
        }
        (None, None) if args.backend.is_some() => {
            let name = args.backend.clone().unwrap_or_default();
            let path = args.payload.as_ref().context("--backend needs --payload")?;
            Workload::Custom {
                name,
                payload_b64: wire::b64_encode(
                    &std::fs::read(path)
                        .with_context(|| format!("cannot read --payload {}", path.display()))?,
                ),
            }
        }
        (None, None) if args.cuda_program.is_some() => {
            let path = args.cuda_program.as_ref().context("--cuda-program")?;
            anyhow::ensure!(args.gpus > 0, "--cuda-program needs --gpus 1 or more");
            Workload::Cuda {
                program_b64: wire::b64_encode(
                    &std::fs::read(path).with_context(|| {
                        format!("cannot read --cuda-program {}", path.display())
                    })?,
                ),
            }
        }
        (Some(path), _) => Workload::Wasm {
            module_b64: wire::b64_encode(
                &std::fs::read(path)
                    .with_context(|| format!("cannot read --wasm {}", path.display()))?,
            ),
        },
        (None, Some(image)) => {
            anyhow::ensure!(
                wire::valid_image_ref(image),
                "--image {image:?} is not a Docker image reference ([host[:port]/]name[:tag][@sha256:…])"
            );
            Workload::Docker {
                image: image.clone(),
                entrypoint: (!args.entrypoint.is_empty()).then(|| args.entrypoint.clone()),
                workdir: args.workdir.clone(),
                network: args.network,
            }
        }
        (None, None) => anyhow::bail!("give --wasm FILE, --image IMAGE or --cuda-program FILE"),
    })
}

fn build_spec(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    let workload = workload(args)?;
    let mut env = BTreeMap::new();
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?} is not NAME=VALUE"))?;
        env.insert(key.to_owned(), value.to_owned());
    }
    let mut input_files = std::collections::BTreeMap::new();
    for pair in &args.inputs {
        let (name, path) = pair
            .split_once('=')
            .with_context(|| format!("--input {pair:?} is not NAME=PATH"))?;
        anyhow::ensure!(
            wire::valid_file_path(name),
            "--input {name:?}: the name must be a plain relative path (no leading '/', no '..')"
        );
        let content =
            std::fs::read(path).with_context(|| format!("cannot read --input {name}={path}"))?;
        input_files.insert(name.to_owned(), wire::b64_encode(&content));
    }
    let stdin_b64 = match &args.stdin {
        Some(path) => Some(wire::b64_encode(
            &std::fs::read(path)
                .with_context(|| format!("cannot read --stdin {}", path.display()))?,
        )),
        None => None,
    };
    Ok(JobSpec {
        workload,
        args: args.args.clone(),
        env,
        stdin_b64,
        timeout_ms: args.timeout_secs.saturating_mul(1000),
        memory_mib: args.memory_mib,
        cpu_cores: args.cpu_cores,
        max_retries: args.max_retries,
        queue_timeout_ms: args.queue_timeout_secs.map(|s| s.saturating_mul(1000)),
        total_timeout_ms: args.total_timeout_secs.map(|s| s.saturating_mul(1000)),
        gpus: args.gpus,
        min_vram_mib: args.min_vram_mib,
        gpu_apis: if args.gpus > 0 {
            vec!["cuda".to_owned()]
        } else {
            vec![]
        },
        disk_mib: 0,
        fuel_limit: args.fuel_limit,
        input_files,
        input_blobs: Default::default(),
        artifact_sha256: None,
        artifact_url: None,
        module: None,
    })
}

async fn submit(global: &GlobalArgs, bus: &Bus, args: SubmitArgs) -> anyhow::Result<()> {
    let max_cost_micros = money::parse_usd(&args.max_cost)
        .map_err(anyhow::Error::msg)
        .context("invalid --max-cost")?;
    let spec = build_spec(&args)?;
    let job_id = args
        .job_id
        .clone()
        .unwrap_or_else(|| format!("job-{}", uuid::Uuid::now_v7().simple()));
    let request = SubmitJob {
        v: WIRE_VERSION,
        job_id: Some(job_id.clone()),
        account: args.account.clone(),
        spec,
        max_cost_micros,
        api_key_sha256: None,
    };

    // Subscribe before submitting so no log line or event can be missed.
    let (mut logs, mut events) = if args.wait {
        let account = Some(args.account.as_str());
        let logs = bus
            .client
            .subscribe(bus.subjects.job_logs_of(account, &job_id)?)
            .await?;
        let mut event_streams = Vec::new();
        for subject in bus.subjects.job_events_of(account, &job_id)? {
            event_streams.push(bus.client.subscribe(subject).await?);
        }
        bus.client.flush().await.context("cannot reach NATS")?;
        (Some(logs), Some(futures::stream::select_all(event_streams)))
    } else {
        (None, None)
    };

    let reply = Client::new(bus.clone()).submit(&request).await?;
    let output_dir = args.output_dir.as_deref();
    if !args.wait {
        if global.json {
            println!("{}", serde_json::to_string(&reply)?);
        } else {
            println!(
                "submitted {} ({}); follow it with: rhizos job get {}",
                reply.job_id,
                reply.state.as_str(),
                reply.job_id
            );
        }
        return Ok(());
    }
    if !global.json {
        eprintln!(
            "submitted {} with max cost {} — waiting for a node…",
            reply.job_id,
            money::format_usd(max_cost_micros)
        );
    }
    let (Some(logs), Some(events)) = (logs.as_mut(), events.as_mut()) else {
        unreachable!("subscribed above")
    };
    watch(global, bus, &job_id, logs, events, output_dir).await
}

/// Puts a waited job's transcript in the order things happened. Its first output lines can
/// arrive before its `running` event — the agent streams them straight to watchers, while the
/// event goes through the orchestrator's commit and outbox — so lines are held until the job is
/// shown running (or ended), at most [`Transcript::HOLD`] and [`Transcript::HELD_LINES`].
#[derive(Debug)]
struct Transcript<L = LogLine> {
    held: Vec<L>,
    released: bool,
}

impl<L> Default for Transcript<L> {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            released: false,
        }
    }
}

impl Transcript {
    const HOLD: Duration = Duration::from_millis(500);
    const HELD_LINES: usize = 1_000;
}

impl<L> Transcript<L> {
    /// A line arrived: what to print now (nothing while the job is not shown running).
    fn line(&mut self, line: L) -> Vec<L> {
        if self.released || self.held.len() >= Transcript::HELD_LINES {
            let mut out = std::mem::take(&mut self.held);
            out.push(line);
            out
        } else {
            self.held.push(line);
            Vec::new()
        }
    }

    /// The job is shown running or ended, or the hold ran out: the held lines, in order; from
    /// now on lines print as they come.
    fn release(&mut self) -> Vec<L> {
        self.released = true;
        std::mem::take(&mut self.held)
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }
}

/// Prints the job's log lines (in order with its state changes) and events until it ends and
/// its money is settled, then the result; Ctrl-C stops watching, not the job.
async fn watch(
    global: &GlobalArgs,
    bus: &Bus,
    job_id: &str,
    logs: &mut async_nats::Subscriber,
    events: &mut futures::stream::SelectAll<async_nats::Subscriber>,
    output_dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut next_seq = 0u64;
    // While the job waits for a node, a spinner says so (on a terminal; scripts and --json get
    // the plain lines below). It goes as soon as anything else is printed.
    let waiting = if global.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message("pending: waiting for a node with room");
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    let spinner = waiting.clone();
    // The node the job's events say it runs on: log lines are published under their node (only
    // that node may publish there), and lines from any other node are dropped.
    let job_node: std::cell::RefCell<Option<String>> = std::cell::RefCell::default();
    let mut print = |(node, line): &(String, LogLine)| {
        if global.json || job_node.borrow().as_ref().is_some_and(|n| n != node) {
            return;
        }
        spinner.finish_and_clear();
        if line.seq != next_seq {
            eprintln!("[{} log line(s) missed]", line.seq.saturating_sub(next_seq));
        }
        next_seq = line.seq + 1;
        match line.stream {
            LogStream::Stdout => println!("{}", line.line),
            LogStream::Stderr => eprintln!("{}", line.line),
        }
    };
    let mut transcript = Transcript::default();
    let mut release_at: Option<tokio::time::Instant> = None;
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                waiting.finish_and_clear();
                eprintln!("\nstopped watching; the job goes on: rhizos job get {job_id}");
                return Ok(());
            }
            Some(message) = logs.next() => {
                let Ok(batch) = serde_json::from_slice::<LogBatch>(&message.payload) else { continue };
                let node = rhizos_broker::Subjects::last_token(&message.subject).to_owned();
                for line in batch.into_lines() {
                    transcript.line((node.clone(), line)).iter().for_each(&mut print);
                }
                if transcript.holding() {
                    release_at.get_or_insert_with(|| tokio::time::Instant::now() + Transcript::HOLD);
                }
            }
            () = async { if let Some(at) = release_at { tokio::time::sleep_until(at).await } }, if release_at.is_some() => {
                release_at = None;
                transcript.release().iter().for_each(&mut print);
            }
            Some(message) = events.next() => {
                let Ok(Event { body, .. }) = serde_json::from_slice::<Event>(&message.payload) else { continue };
                if let EventBody::Job { state, node_id, .. } = body {
                    if node_id.is_some() {
                        job_node.replace(node_id.clone());
                    }
                    if !global.json && !state.is_terminal() {
                        let node = node_id.map(|n| format!(" on {n}")).unwrap_or_default();
                        if state == JobState::Running || waiting.is_hidden() {
                            waiting.finish_and_clear();
                            eprintln!("· {}{node}", state.as_str());
                        } else {
                            waiting.set_message(format!("{}{node}: starting", state.as_str()));
                        }
                    }
                    if state.is_terminal() {
                        waiting.finish_and_clear();
                    }
                    if state == JobState::Running || state.is_terminal() {
                        release_at = None;
                        transcript.release().iter().for_each(&mut print);
                    }
                    if state.is_terminal() && finish(global, bus, job_id, output_dir).await? {
                        return Ok(());
                    }
                }
            }
            _ = poll.tick() => {
                // Safety net if an event was missed (e.g. JetStream briefly unavailable).
                if finish(global, bus, job_id, output_dir).await? {
                    waiting.finish_and_clear();
                    return Ok(());
                }
            }
        }
    }
}

/// Prints the result if the job has ended and its money is settled; `true` when done.
async fn finish(
    global: &GlobalArgs,
    bus: &Bus,
    job_id: &str,
    output_dir: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let job = Client::new(bus.clone()).job_get(job_id).await?;
    if !job.state.is_terminal() || job.cost_micros.is_none() {
        return Ok(false);
    }
    print_job(global.json, &job)?;
    if let Some(dir) = output_dir {
        save_outputs(global, bus, &job, dir).await?;
    }
    if job.state != JobState::Succeeded {
        std::process::exit(3);
    }
    Ok(true)
}

/// How long ago `ms` (since the Unix epoch) was, in words ("3 days ago").
fn ago(ms: u64) -> String {
    let s = rhizos_core::now_ms().saturating_sub(ms) / 1_000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3_600 => format!("{} min ago", s / 60),
        3_600..86_400 => format!("{} h ago", s / 3_600),
        _ => format!("{} days ago", s / 86_400),
    }
}

fn print_job(json: bool, job: &JobView) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(job)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "job {}: {}", job.job_id, job.state.as_str())?;
    if let Some(node) = &job.node_id {
        writeln!(out, "  node:      {node} (attempt {})", job.attempt)?;
    }
    if let Some(code) = job.exit_code {
        writeln!(out, "  exit code: {code}")?;
    }
    if let Some(reason) = &job.reason {
        writeln!(out, "  reason:    {reason}")?;
    }
    if let Some(ms) = job.elapsed_ms {
        writeln!(out, "  run time:  {ms} ms")?;
    }
    if let Some(fuel) = job.fuel_consumed {
        writeln!(out, "  fuel:      {fuel} units")?;
    }
    if let Some(pruned) = job.pruned_ms {
        writeln!(
            out,
            "  output:    dropped {} (kept for [orchestrator] job_payload_max_age_s after the job ended)",
            ago(pruned)
        )?;
    }
    for (name, content) in &job.output_files {
        writeln!(
            out,
            "  output:    {name} ({} bytes)",
            wire::b64_decode("output_files", content)
                .map(|c| c.len())
                .unwrap_or(0)
        )?;
    }
    for (name, blob) in job.blobs.iter() {
        writeln!(
            out,
            "  output:    {name} ({} bytes, stored out of band: rhizos job output {} {name})",
            blob.size, job.job_id
        )?;
    }
    writeln!(
        out,
        "  max cost:  {}",
        money::format_usd(job.max_cost_micros)
    )?;
    if let (Some(cost), Some(provider), Some(fee), Some(refund)) = (
        job.cost_micros,
        job.provider_micros,
        job.fee_micros,
        job.refund_micros,
    ) {
        writeln!(out, "  cost:      {}", money::format_usd(cost))?;
        writeln!(out, "  provider:  {}", money::format_usd(provider))?;
        writeln!(out, "  fee:       {}", money::format_usd(fee))?;
        writeln!(out, "  refund:    {}", money::format_usd(refund))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> LogLine {
        LogLine {
            v: WIRE_VERSION,
            job_id: "j".into(),
            attempt: 1,
            seq,
            stream: LogStream::Stdout,
            line: format!("line {seq}"),
            ts_ms: 0,
        }
    }

    fn seqs(lines: &[LogLine]) -> Vec<u64> {
        lines.iter().map(|l| l.seq).collect()
    }

    #[test]
    fn lines_before_running_are_held_and_released_in_order() {
        let mut t = Transcript::default();
        assert!(t.line(line(0)).is_empty());
        assert!(t.line(line(1)).is_empty());
        assert!(t.holding());
        assert_eq!(seqs(&t.release()), [0, 1]);
        assert!(!t.holding());
        // Released once: later lines print at once, and a second release has nothing.
        assert_eq!(seqs(&t.line(line(2))), [2]);
        assert!(t.release().is_empty());
    }

    #[test]
    fn holding_is_bounded() {
        let mut t = Transcript::default();
        for seq in 0..Transcript::HELD_LINES as u64 {
            assert!(t.line(line(seq)).is_empty());
        }
        let out = t.line(line(Transcript::HELD_LINES as u64));
        assert_eq!(out.len(), Transcript::HELD_LINES + 1);
        assert_eq!(out.first().map(|l| l.seq), Some(0));
        assert!(!t.holding());
    }
}
