//! Native CUDA executions: the job's program in a private directory, on its GPUs only, watched.

use crate::config::{Config, Isolation};
use crate::gpu;
use crate::sandbox;
use nvml_wrapper::Nvml;
use rhizos_plugin_api::sdk::{LineSplitter, OutcomeSlot, PluginBackend, PluginExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, HostContext, LogStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;

pub struct CudaBackend {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    config: Config,
    /// `None` without a driver.
    nvml: Option<Nvml>,
    gpus: Vec<gpu::Gpu>,
    /// Why this node runs no CUDA job (no driver, no GPU, native execution off, no isolation).
    unavailable: Option<String>,
    work_dir: PathBuf,
    /// The executions' uids and where their cgroups go (`isolation = "uid-and-cgroup"`).
    uids: Arc<sandbox::UidPool>,
    cgroups: Option<PathBuf>,
}

impl CudaBackend {
    /// Never fails for lack of a GPU: the plugin loads and offers nothing, saying why.
    pub fn new(config: &str, host: &HostContext) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rhizos-cuda")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the cuda plugin's runtime: {e}"))?;
        let (nvml, gpus, unavailable) = match gpu::open(config.nvml_library.as_deref()) {
            Err(e) => (
                None,
                Vec::new(),
                Some(format!("no NVIDIA driver (NVML: {e})")),
            ),
            Ok(nvml) => match gpu::detect(&nvml) {
                Err(e) => (
                    None,
                    Vec::new(),
                    Some(format!("NVIDIA driver found, but NVML failed: {e}")),
                ),
                Ok((_, _, gpus)) if gpus.is_empty() => (
                    Some(nvml),
                    gpus,
                    Some("NVIDIA driver found, but no GPU".to_owned()),
                ),
                Ok((driver, cuda, gpus)) => {
                    for g in &gpus {
                        eprintln!(
                            "rhizos cuda plugin: node {}: GPU {} {} ({}), {} MiB VRAM ({} MiB free), compute {}, driver {driver}, CUDA {cuda}",
                            host.node_id,
                            g.index,
                            g.name,
                            g.uuid,
                            g.vram_total_mib,
                            g.vram_free_mib,
                            g.compute_capability
                        );
                    }
                    let off = (!config.allow_native).then(|| {
                        "native CUDA jobs are off on this node ([agent.plugins.cuda] allow_native = false); \
                         GPU containers run through the docker backend"
                            .to_owned()
                    });
                    (Some(nvml), gpus, off)
                }
            },
        };
        let work_dir = config
            .work_dir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let strict = config.isolation == Isolation::UidAndCgroup;
        let cgroups = strict.then(sandbox::cgroup_root).flatten();
        let unavailable = unavailable.or_else(|| {
            if !strict {
                None
            } else if !sandbox::can_switch_uid() {
                Some("native CUDA jobs run under a uid of their own, which needs the agent to run as root \
                      ([agent.plugins.cuda] isolation = \"uid-and-cgroup\"); run it as root, or set \
                      isolation = \"none\" to run them as the agent's user (they can then write what the agent can)".to_owned())
            } else if cgroups.is_none() {
                Some("native CUDA jobs run in a cgroup of their own, and /sys/fs/cgroup is not writable here; \
                      give the agent a writable cgroup hierarchy, or set [agent.plugins.cuda] isolation = \"none\"".to_owned())
            } else {
                None
            }
        });
        let uids = sandbox::UidPool::new(
            config.first_uid,
            config.uid_count,
            work_dir.join("rhizos-cuda-uids"),
        );
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                nvml,
                gpus,
                unavailable,
                work_dir,
                uids,
                cgroups,
            }),
            runtime: Some(runtime),
        })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub struct CudaExecution {
    slot: Arc<OutcomeSlot>,
    cancel: Arc<Notify>,
}

impl PluginExecution for CudaExecution {
    fn cancel(&self) {
        self.cancel.notify_one();
    }

    fn wait(&self) -> ExecOutcome {
        self.slot.wait()
    }
}

struct Job {
    execution_id: String,
    program: Vec<u8>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
    timeout: Duration,
    vram_limit_bytes: u64,
    gpus: Vec<String>,
    input_files: Vec<(String, Vec<u8>)>,
}

impl PluginBackend for CudaBackend {
    type Execution = CudaExecution;

    fn unavailable(&self) -> Option<String> {
        self.shared.unavailable.clone()
    }

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<CudaExecution, String> {
        if let Some(why) = &self.shared.unavailable {
            return Err(format!("this node runs no CUDA job: {why}"));
        }
        if request.gpu_devices.is_empty() {
            return Err("a cuda job needs at least one GPU (gpus ≥ 1)".into());
        }
        for device in request.gpu_devices.iter() {
            if !self.shared.gpus.iter().any(|g| g.uuid == device.as_str()) {
                return Err(format!("GPU {device} is not one of this node's"));
            }
        }
        if request.workload.len() < 4 {
            return Err("the cuda workload holds no program".into());
        }
        let mut input_files = Vec::new();
        for pair in request.input_files.iter() {
            let name = pair.0.to_string();
            if !plain_path(&name) {
                return Err(format!(
                    "input file name {name:?} is not a plain relative path"
                ));
            }
            input_files.push((name, pair.1.to_vec()));
        }
        let job = Job {
            execution_id: request.execution_id.to_string(),
            program: request.workload.to_vec(),
            args: request.args.iter().map(|a| a.to_string()).collect(),
            env: request
                .env
                .iter()
                .map(|p| (p.0.to_string(), p.1.to_string()))
                .collect(),
            stdin: request.stdin.to_vec(),
            timeout: Duration::from_millis(request.limits.wall_timeout_ms),
            vram_limit_bytes: request.limits.vram_limit_bytes,
            gpus: request.gpu_devices.iter().map(|g| g.to_string()).collect(),
            input_files,
        };
        let Some(runtime) = &self.runtime else {
            return Err("the cuda backend is shutting down".into());
        };
        let slot = Arc::new(OutcomeSlot::default());
        let cancel = Arc::new(Notify::new());
        let (task_slot, task_cancel, shared) = (slot.clone(), cancel.clone(), self.shared.clone());
        runtime.spawn(async move {
            let outcome = run(&shared, job, &sink, &task_cancel).await;
            task_slot.set(outcome);
        });
        Ok(CudaExecution { slot, cancel })
    }
}

fn plain_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.contains('\0')
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// The execution's private directory: `program`, `input/` (read-only), `output/`.
fn prepare(dir: &Path, job: &Job) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir.join("input"))?;
    std::fs::create_dir_all(dir.join("output"))?;
    let program = dir.join("program");
    std::fs::write(&program, &job.program)?;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o555))?;
    for (name, content) in &job.input_files {
        let path = dir.join("input").join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))?;
    }
    Ok(())
}

enum End {
    Exited(std::process::ExitStatus),
    TimedOut,
    Cancelled,
    /// GPU uuid, bytes used.
    VramExceeded(String, u64),
    Lost(String),
}

async fn run(shared: &Shared, job: Job, sink: &EventSinkBox, cancel: &Notify) -> ExecOutcome {
    let dir = shared.work_dir.join(format!(
        "rhizos-cuda-{}-{}",
        job.execution_id
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = prepare(&dir, &job) {
        let _ = std::fs::remove_dir_all(&dir);
        return ExecOutcome::abnormal(
            ExitKind::Rejected,
            format!("cannot prepare the job's directory {}: {e}", dir.display()),
            0,
        );
    }
    let confined = match confinement(shared, &dir) {
        Ok(confined) => confined,
        Err(message) => {
            let _ = std::fs::remove_dir_all(&dir);
            return ExecOutcome::abnormal(ExitKind::BackendFailed, message, 0);
        }
    };
    let outcome = execute(shared, &job, &dir, &confined, sink, cancel).await;
    // The cgroup, then the uid: nothing the program started is left.
    drop(confined);
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// An execution's own uid and cgroup (none with `isolation = "none"`).
#[derive(Default)]
struct Confined {
    cgroup: Option<sandbox::Cgroup>,
    uid: Option<sandbox::UidLease>,
}

impl Drop for Confined {
    fn drop(&mut self) {
        self.cgroup.take();
        self.uid.take();
    }
}

fn confinement(shared: &Shared, dir: &Path) -> Result<Confined, String> {
    if shared.config.isolation == Isolation::None {
        return Ok(Confined::default());
    }
    let root = shared
        .cgroups
        .as_deref()
        .ok_or("no cgroup hierarchy to confine the program in")?;
    let uid = shared.uids.lease()?;
    sandbox::hand_over(dir, uid.uid)
        .map_err(|e| format!("cannot give {} to uid {}: {e}", dir.display(), uid.uid))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("rhizos-cuda");
    let cgroup = sandbox::Cgroup::create(root, name, shared.config.pids_limit).map_err(|e| {
        format!(
            "cannot create the execution's cgroup under {}: {e}",
            root.display()
        )
    })?;
    Ok(Confined {
        cgroup: Some(cgroup),
        uid: Some(uid),
    })
}

async fn execute(
    shared: &Shared,
    job: &Job,
    dir: &Path,
    confined: &Confined,
    sink: &EventSinkBox,
    cancel: &Notify,
) -> ExecOutcome {
    let devices = job.gpus.join(",");
    let mut command = tokio::process::Command::new(dir.join("program"));
    command
        .args(&job.args)
        .current_dir(dir)
        .env_clear()
        .envs(job.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("CUDA_VISIBLE_DEVICES", &devices)
        .env("NVIDIA_VISIBLE_DEVICES", &devices)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
        .process_group(0)
        .stdin(if job.stdin.is_empty() {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::piped()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let procs = confined.cgroup.as_ref().map(|c| c.procs.clone());
    let uid = confined.uid.as_ref().map(|lease| lease.uid);
    // SAFETY: `confine` makes only async-signal-safe system calls (open, write, close,
    // setgroups, setgid, setuid, prctl) on memory prepared before the fork.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || sandbox::confine(procs.as_ref(), uid));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return ExecOutcome::abnormal(
                ExitKind::Rejected,
                format!("cannot start the program: {e}"),
                0,
            );
        }
    };
    let started = Instant::now();
    let pgid = child.id().unwrap_or(0);
    if let Some(mut stdin) = child.stdin.take() {
        let bytes = job.stdin.clone();
        tokio::spawn(async move {
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let readers = async {
        tokio::join!(
            pump(stdout, LogStream::Stdout, sink),
            pump(stderr, LogStream::Stderr, sink)
        );
    };
    tokio::pin!(readers);
    let mut readers_done = false;
    let deadline = tokio::time::sleep(job.timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.watch_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak_vram = 0u64;
    let end = loop {
        tokio::select! {
            status = child.wait() => break match status {
                Ok(status) => End::Exited(status),
                Err(e) => End::Lost(e.to_string()),
            },
            () = &mut readers, if !readers_done => readers_done = true,
            () = &mut deadline => break End::TimedOut,
            () = cancel.notified() => break End::Cancelled,
            _ = tick.tick() => {
                if let Some(nvml) = &shared.nvml
                    && let Some(exceeded) = check_vram(nvml, job, pgid, confined, &mut peak_vram)
                {
                    break exceeded;
                }
            }
        }
    };
    // Whatever ended it, nothing of the job survives it: the whole process group goes, and
    // the whole cgroup (what left the group with setsid).
    kill_group(pgid);
    if let Some(cgroup) = &confined.cgroup {
        cgroup.kill_all();
    }
    let _ = child.wait().await;
    if !readers_done {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut readers).await;
    }
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let gpu_seconds = elapsed_ms as f64 * job.gpus.len() as f64 / 1000.0;
    sink.log(
        LogStream::Stderr,
        format!(
            "rhizos: {gpu_seconds:.3} GPU-seconds on {} GPU(s) ({}), peak VRAM {} MiB",
            job.gpus.len(),
            job.gpus.join(","),
            peak_vram >> 20
        )
        .as_str()
        .into(),
    );
    let mut outcome = match end {
        End::Exited(status) => match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => ExecOutcome::exited(code, elapsed_ms),
            (None, Some(signal)) => ExecOutcome::abnormal(
                ExitKind::Crashed,
                format!("the program was killed by signal {signal}"),
                elapsed_ms,
            ),
            (None, None) => ExecOutcome::abnormal(
                ExitKind::Crashed,
                "the program ended without a status",
                elapsed_ms,
            ),
        },
        End::TimedOut => ExecOutcome::abnormal(
            ExitKind::TimedOut,
            format!(
                "wall-clock deadline of {} ms exceeded: program killed",
                job.timeout.as_millis()
            ),
            elapsed_ms,
        ),
        End::Cancelled => {
            ExecOutcome::abnormal(ExitKind::Cancelled, "cancelled: program killed", elapsed_ms)
        }
        End::VramExceeded(uuid, used) => ExecOutcome::abnormal(
            ExitKind::MemoryExceeded,
            format!(
                "VRAM limit exceeded: the job held {} MiB on GPU {uuid}, its limit is {} MiB",
                used >> 20,
                job.vram_limit_bytes >> 20
            ),
            elapsed_ms,
        ),
        End::Lost(e) => ExecOutcome::abnormal(
            ExitKind::BackendFailed,
            format!("lost track of the program: {e}"),
            elapsed_ms,
        ),
    };
    let (files, dropped) = collect_outputs(
        &dir.join("output"),
        shared.config.max_output_files,
        shared.config.max_output_bytes,
    );
    if dropped > 0 {
        sink.log(
            LogStream::Stderr,
            format!(
                "rhizos: {dropped} output file(s) dropped: outputs are limited to {} files and {} KiB",
                shared.config.max_output_files,
                shared.config.max_output_bytes >> 10
            )
            .as_str()
            .into(),
        );
    }
    outcome.output_files = files
        .into_iter()
        .map(|(name, content)| abi_stable::std_types::Tuple2(name.as_str().into(), content.into()))
        .collect();
    outcome
}

/// Reads the job's VRAM on each of its GPUs — its cgroup's processes, else its process
/// group's; the end when it went over its limit.
fn check_vram(
    nvml: &Nvml,
    job: &Job,
    pgid: u32,
    confined: &Confined,
    peak: &mut u64,
) -> Option<End> {
    let members: Option<Vec<i32>> = confined.cgroup.as_ref().map(sandbox::Cgroup::members);
    let is_job = |pid: u32| match &members {
        Some(members) => members.iter().any(|m| u32::try_from(*m) == Ok(pid)),
        None => gpu::process_group(pid) == Some(pgid),
    };
    for uuid in &job.gpus {
        let Ok(used) = gpu::job_vram(nvml, uuid, &is_job) else {
            continue;
        };
        *peak = (*peak).max(used);
        if job.vram_limit_bytes > 0 && used > job.vram_limit_bytes {
            return Some(End::VramExceeded(uuid.clone(), used));
        }
    }
    None
}

/// Reads one output pipe to its end, handing each line to the sink.
async fn pump(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    stream: LogStream,
    sink: &EventSinkBox,
) {
    let mut splitter = LineSplitter::new(stream);
    if let Some(mut pipe) = pipe {
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n) = pipe.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            splitter.push(sink, &buffer[..n]);
        }
    }
    splitter.finish(sink);
}

fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group the program leads (it was
    // started with process_group(0), so its pid is the group id); no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Regular files under `output/` (recursively), within the limits; how many were left out.
fn collect_outputs(
    root: &Path,
    max_files: usize,
    max_bytes: u64,
) -> (Vec<(String, Vec<u8>)>, usize) {
    let mut files = Vec::new();
    let mut dropped = 0;
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let Ok(name) = path.strip_prefix(root) else {
                continue;
            };
            let name = name.to_string_lossy().into_owned();
            let size = entry.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if files.len() >= max_files || total.saturating_add(size) > max_bytes {
                dropped += 1;
                continue;
            }
            match std::fs::read(&path) {
                Ok(content) => {
                    total += content.len() as u64;
                    files.push((name, content));
                }
                Err(_) => dropped += 1,
            }
        }
    }
    (files, dropped)
}
