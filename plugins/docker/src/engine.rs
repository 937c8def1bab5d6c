//! One container per execution, on the local engine: create, copy files in, attach, start,
//! wait (deadline, cancel), read the end, copy files out, remove.

use crate::config::{Config, PullPolicy};
use crate::files::{self, Part};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    DownloadFromContainerOptionsBuilder, InspectContainerOptions, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt as _;
use rhizos_plugin_api::sdk::{LineSplitter, OutcomeSlot, PluginBackend, PluginExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, HostContext, LogStream};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Notify;

/// Label every container of this backend carries: the node it ran for.
const NODE_LABEL: &str = "rhizos.node";
/// Label naming the agent process that created the container (pid and start time).
const AGENT_LABEL: &str = "rhizos.agent";
/// Label with the execution (`<job>-<attempt>`).
const EXECUTION_LABEL: &str = "rhizos.execution";
/// How long the output stream may lag behind the container's exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest output archive read from the engine (the file limits apply within it).
const MAX_ARCHIVE_BYTES: usize = 80 << 20;

/// The job's workload as the agent hands it over (its `Workload` JSON).
#[derive(Debug, Deserialize)]
struct Workload {
    image: String,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    network: bool,
    /// The image id the job requires (`sha256:…`, from a module's registry entry).
    #[serde(default)]
    image_id: Option<String>,
}

pub struct DockerBackend {
    shared: Arc<Shared>,
    /// Always `Some` until drop.
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    docker: Docker,
    config: Config,
    node_id: String,
    /// This agent process (pid and start time): tells its containers from a dead agent's.
    agent: String,
    /// The engine has the NVIDIA container runtime (GPU device requests work).
    nvidia: bool,
}

impl DockerBackend {
    /// Connects to the engine (failing with why when it does not answer: the node then offers
    /// no `docker` backend) and removes containers left by an earlier agent of this node.
    pub fn new(config: &str, host: &HostContext) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("rhizos-docker")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the docker plugin's runtime: {e}"))?;
        let node_id = host.node_id.to_string();
        let shared = runtime.block_on(async {
            let docker = connect(&config).await?;
            let nvidia = match docker.info().await {
                Ok(info) => info.runtimes.is_some_and(|r| r.contains_key("nvidia")),
                Err(_) => false,
            };
            Ok::<_, String>(Shared {
                docker,
                config,
                node_id,
                agent: agent_token(),
                nvidia,
            })
        })?;
        let shared = Arc::new(shared);
        if shared.config.cleanup_orphans {
            match runtime.block_on(remove_orphans(&shared)) {
                Ok(0) => {}
                Ok(n) => eprintln!(
                    "rhizos docker plugin: removed {n} container(s) left by an earlier agent of node {}",
                    shared.node_id
                ),
                Err(e) => eprintln!("rhizos docker plugin: cannot clean up old containers: {e}"),
            }
        }
        Ok(Self {
            shared,
            runtime: Some(runtime),
        })
    }
}

/// Connects and checks that the engine answers.
async fn connect(config: &Config) -> Result<Docker, String> {
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let docker = match config.host.as_deref() {
        None => Docker::connect_with_defaults(),
        Some(host) if host.starts_with("unix://") => {
            Docker::connect_with_unix(host, timeout.as_secs().max(1), bollard::API_DEFAULT_VERSION)
        }
        Some(host) => {
            Docker::connect_with_http(host, timeout.as_secs().max(1), bollard::API_DEFAULT_VERSION)
        }
    };
    let where_ = config
        .host
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
    let docker = docker.map_err(|e| match e {
        DockerError::SocketNotFoundError(path) => {
            format!("no Docker engine: socket {path} does not exist (is dockerd running?)")
        }
        other => format!("no Docker engine at {where_}: {other}"),
    })?;
    let answered = tokio::time::timeout(timeout, async {
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, DockerError>(docker)
    })
    .await;
    match answered {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(format!("no Docker engine at {where_}: {e}")),
        Err(_) => Err(format!(
            "no Docker engine at {where_}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

/// `<pid>.<start time in clock ticks since boot>`: unique per process, also across pid reuse.
fn agent_token() -> String {
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command (which may hold spaces) start after the last ')'.
            let rest = stat.rsplit_once(')')?.1.to_owned();
            rest.split_whitespace().nth(19).map(str::to_owned)
        })
        .unwrap_or_else(|| "0".into());
    format!("{}.{start}", std::process::id())
}

/// Removes this node's containers made by any other agent process.
async fn remove_orphans(shared: &Shared) -> Result<usize, DockerError> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{NODE_LABEL}={}", shared.node_id)],
    )]);
    let containers = shared
        .docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await?;
    let mut removed = 0;
    for container in containers {
        let ours = container
            .labels
            .as_ref()
            .and_then(|l| l.get(AGENT_LABEL))
            .is_some_and(|a| *a == shared.agent);
        let Some(id) = container.id else { continue };
        if ours {
            continue;
        }
        match shared
            .docker
            .remove_container(
                &id,
                Some(
                    RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build(),
                ),
            )
            .await
        {
            Ok(()) => removed += 1,
            Err(e) => eprintln!("rhizos docker plugin: cannot remove old container {id}: {e}"),
        }
    }
    Ok(removed)
}

pub struct DockerExecution {
    slot: Arc<OutcomeSlot>,
    cancel: Arc<Notify>,
}

impl PluginExecution for DockerExecution {
    fn cancel(&self) {
        self.cancel.notify_one();
    }

    fn wait(&self) -> ExecOutcome {
        self.slot.wait()
    }
}

impl PluginBackend for DockerBackend {
    type Execution = DockerExecution;

    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<DockerExecution, String> {
        let workload: Workload = serde_json::from_slice(&request.workload)
            .map_err(|e| format!("the docker workload is not valid: {e}"))?;
        if workload.image.is_empty() {
            return Err("the docker workload names no image".into());
        }
        if workload.network && !self.shared.config.allow_network {
            return Err(
                "the job asks for network access, which this node does not give containers \
                 ([agent.plugins.docker] allow_network is off)"
                    .into(),
            );
        }
        if !request.gpu_devices.is_empty() && !self.shared.nvidia {
            return Err(format!(
                "the job was given {} GPU(s) but this Docker engine has no NVIDIA runtime \
                 (install the NVIDIA Container Toolkit)",
                request.gpu_devices.len()
            ));
        }
        let mut input_files = Vec::with_capacity(request.input_files.len());
        for pair in request.input_files.iter() {
            let name = pair.0.to_string();
            if !files::plain_path(&name) {
                return Err(format!(
                    "input file name {name:?} is not a plain relative path"
                ));
            }
            input_files.push((name, pair.1.to_vec()));
        }
        let job = Job {
            name: container_name(&self.shared.node_id, request.execution_id.as_str()),
            execution_id: request.execution_id.to_string(),
            workload,
            args: request.args.iter().map(|a| a.to_string()).collect(),
            env: request
                .env
                .iter()
                .map(|pair| format!("{}={}", pair.0, pair.1))
                .collect(),
            stdin: request.stdin.to_vec(),
            timeout: Duration::from_millis(request.limits.wall_timeout_ms),
            memory_bytes: request.limits.memory_limit_bytes,
            disk_bytes: match request.limits.disk_limit_bytes {
                0 => self.shared.config.default_disk_mib.saturating_mul(1 << 20),
                bytes => bytes,
            },
            cpu_cores: request.limits.cpu_cores,
            gpus: request.gpu_devices.iter().map(|g| g.to_string()).collect(),
            input_files,
        };
        let slot = Arc::new(OutcomeSlot::default());
        let cancel = Arc::new(Notify::new());
        let shared = self.shared.clone();
        let (task_slot, task_cancel) = (slot.clone(), cancel.clone());
        let Some(runtime) = &self.runtime else {
            return Err("the docker backend is shutting down".into());
        };
        runtime.spawn(async move {
            let (outcome, created) = run(&shared, &job, &sink, &task_cancel).await;
            // The result goes out first; removing the container does not delay it (a crash
            // in between leaves an orphan the next agent start removes).
            task_slot.set(outcome);
            if created {
                remove(&shared, &job).await;
            }
        });
        Ok(DockerExecution { slot, cancel })
    }
}

/// `rhizos-<node>-<execution>`. Container names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]`; anything else
/// becomes `_`.
fn container_name(node_id: &str, execution_id: &str) -> String {
    let clean: String = format!("{node_id}-{execution_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("rhizos-{clean}")
}

struct Job {
    name: String,
    execution_id: String,
    workload: Workload,
    args: Vec<String>,
    env: Vec<String>,
    stdin: Vec<u8>,
    timeout: Duration,
    memory_bytes: u64,
    /// Most bytes the container may write (its layer, and its volumes where measurable).
    disk_bytes: u64,
    cpu_cores: u32,
    gpus: Vec<String>,
    input_files: Vec<(String, Vec<u8>)>,
}

/// How the wait for the container ended.
enum End {
    Exited,
    TimedOut,
    Cancelled,
    /// Stopped past its disk limit, having written this many bytes.
    DiskExceeded(u64),
}

/// Runs the execution to its outcome; says whether a container was created (to be removed).
async fn run(
    shared: &Shared,
    job: &Job,
    sink: &EventSinkBox,
    cancel: &Notify,
) -> (ExecOutcome, bool) {
    let image_ready = tokio::select! {
        ready = ensure_image(shared, &job.workload.image, sink) => ready,
        () = cancel.notified() => Err("cancelled while the image was being pulled".into()),
    };
    if let Err(message) = image_ready {
        return (ExecOutcome::abnormal(ExitKind::Rejected, message, 0), false);
    }
    if let Some(expected) = &job.workload.image_id {
        let actual = shared
            .docker
            .inspect_image(&job.workload.image)
            .await
            .ok()
            .and_then(|image| image.id)
            .unwrap_or_default();
        if !actual.eq_ignore_ascii_case(expected) {
            return (
                ExecOutcome::abnormal(
                    ExitKind::Rejected,
                    format!(
                        "artifact digest mismatch: image {} is {actual}, the job requires {expected}; refusing to run it",
                        job.workload.image
                    ),
                    0,
                ),
                false,
            );
        }
    }
    // A container of the same name is a leftover of this very execution on this node (an agent
    // that died between create and remove): it never ran to a result, so it goes.
    let _ = shared
        .docker
        .remove_container(
            &job.name,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await;
    if let Err(e) = create(shared, job).await {
        return (
            ExecOutcome::abnormal(
                ExitKind::Rejected,
                format!("cannot create the container: {}", engine_message(&e)),
                0,
            ),
            false,
        );
    }
    (drive(shared, job, sink, cancel).await, true)
}

/// Removes the execution's container (and its anonymous volumes).
async fn remove(shared: &Shared, job: &Job) {
    if let Err(e) = shared
        .docker
        .remove_container(
            &job.name,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await
    {
        eprintln!(
            "rhizos docker plugin: cannot remove container {} of execution {}: {e}",
            job.name, job.execution_id
        );
    }
}

/// The engine's own message for a server error (without bollard's status-code preamble).
fn engine_message(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Makes sure `image` is in the local store, pulling it (progress on the job's stderr) when the
/// policy allows.
async fn ensure_image(shared: &Shared, image: &str, sink: &EventSinkBox) -> Result<(), String> {
    match shared.docker.inspect_image(image).await {
        Ok(_) => return Ok(()),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => {
            return Err(format!(
                "cannot look up image {image}: {}",
                engine_message(&e)
            ));
        }
    }
    if shared.config.pull == PullPolicy::Never {
        return Err(format!(
            "image {image} is not in this node's local image store, and this node does not pull images"
        ));
    }
    if !shared.config.pulls_from(image) {
        return Err(format!(
            "image {image} is not in this node's local image store, and its registry {} is not one this node pulls from ([agent.plugins.docker] pull_registries = {:?})",
            crate::config::registry_of(image),
            shared.config.pull_registries
        ));
    }
    sink.log(
        LogStream::Stderr,
        format!("rhizos: pulling image {image}").as_str().into(),
    );
    let pull = async {
        let mut progress = shared.docker.create_image(
            Some(
                CreateImageOptionsBuilder::default()
                    .from_image(image)
                    .build(),
            ),
            None,
            None,
        );
        let mut last_status = String::new();
        while let Some(step) = progress.next().await {
            let step = step.map_err(|e| engine_message(&e))?;
            let status = step.status.unwrap_or_default();
            // One line per layer state change, not per progress tick.
            let line = match step.id {
                Some(id) => format!("rhizos: pull {id}: {status}"),
                None => format!("rhizos: pull: {status}"),
            };
            if line != last_status && !status.is_empty() {
                sink.log(LogStream::Stderr, line.as_str().into());
                last_status = line;
            }
        }
        Ok::<_, String>(())
    };
    let limit = Duration::from_millis(shared.config.pull_timeout_ms);
    match tokio::time::timeout(limit, pull).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "image {image} is not in this node's local image store and could not be pulled: {e}"
        )),
        Err(_) => Err(format!(
            "image {image} is not in this node's local image store and pulling it took longer than {} ms",
            limit.as_millis()
        )),
    }
}

async fn create(shared: &Shared, job: &Job) -> Result<(), DockerError> {
    let config = &shared.config;
    let memory = i64::try_from(job.memory_bytes).unwrap_or(i64::MAX);
    let device_requests = (!job.gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(job.gpus.clone()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let host_config = HostConfig {
        memory: (memory > 0).then_some(memory),
        // Swap is memory too: the limit is the limit.
        memory_swap: (memory > 0).then_some(memory),
        nano_cpus: (job.cpu_cores > 0).then(|| i64::from(job.cpu_cores) * 1_000_000_000),
        pids_limit: Some(config.pids_limit),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        network_mode: Some(if job.workload.network {
            config.network.clone()
        } else {
            "none".into()
        }),
        readonly_rootfs: Some(config.read_only_rootfs),
        device_requests,
        ..Default::default()
    };
    let mut env = job.env.clone();
    if !job.gpus.is_empty() {
        let list = job.gpus.join(",");
        env.push(format!("NVIDIA_VISIBLE_DEVICES={list}"));
        env.push(format!("CUDA_VISIBLE_DEVICES={list}"));
    }
    let body = ContainerCreateBody {
        image: Some(job.workload.image.clone()),
        cmd: (!job.args.is_empty()).then(|| job.args.clone()),
        entrypoint: job.workload.entrypoint.clone(),
        working_dir: job.workload.workdir.clone(),
        env: Some(env),
        user: (!config.user.is_empty()).then(|| config.user.clone()),
        labels: Some(HashMap::from([
            (NODE_LABEL.to_owned(), shared.node_id.clone()),
            (AGENT_LABEL.to_owned(), shared.agent.clone()),
            (EXECUTION_LABEL.to_owned(), job.execution_id.clone()),
        ])),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(!job.stdin.is_empty()),
        open_stdin: Some(!job.stdin.is_empty()),
        stdin_once: Some(!job.stdin.is_empty()),
        tty: Some(false),
        volumes: config
            .read_only_rootfs
            .then(|| vec!["/input".to_owned(), "/output".to_owned()]),
        host_config: Some(host_config),
        ..Default::default()
    };
    shared
        .docker
        .create_container(
            Some(
                CreateContainerOptionsBuilder::default()
                    .name(&job.name)
                    .build(),
            ),
            body,
        )
        .await?;
    Ok(())
}

/// Runs the created container to its end and reads the result.
async fn drive(shared: &Shared, job: &Job, sink: &EventSinkBox, cancel: &Notify) -> ExecOutcome {
    let docker = &shared.docker;
    let setup = if shared.config.read_only_rootfs {
        files::setup_archive(&job.input_files, Part::Input).map(|a| ("/input", a))
    } else {
        files::setup_archive(&job.input_files, Part::Both).map(|a| ("/", a))
    };
    let (target, archive) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            return ExecOutcome::abnormal(
                ExitKind::Rejected,
                format!("cannot pack the input files: {e}"),
                0,
            );
        }
    };
    if let Err(e) = docker
        .upload_to_container(
            &job.name,
            Some(
                UploadToContainerOptionsBuilder::default()
                    .path(target)
                    .build(),
            ),
            bollard::body_full(archive.into()),
        )
        .await
    {
        return ExecOutcome::abnormal(
            ExitKind::Rejected,
            format!("cannot copy the input files in: {}", engine_message(&e)),
            0,
        );
    }
    let with_stdin = !job.stdin.is_empty();
    let attached = match docker
        .attach_container(
            &job.name,
            Some(
                AttachContainerOptionsBuilder::default()
                    .stdin(with_stdin)
                    .stdout(true)
                    .stderr(true)
                    .stream(true)
                    .build(),
            ),
        )
        .await
    {
        Ok(attached) => attached,
        Err(e) => {
            return ExecOutcome::abnormal(
                ExitKind::Rejected,
                format!("cannot attach to the container: {}", engine_message(&e)),
                0,
            );
        }
    };
    let mut output = attached.output;
    let mut input = attached.input;
    if let Err(e) = docker.start_container(&job.name, None).await {
        return ExecOutcome::abnormal(
            ExitKind::Rejected,
            format!("cannot start the container: {}", engine_message(&e)),
            0,
        );
    }
    let started = Instant::now();
    if with_stdin {
        let stdin = job.stdin.clone();
        tokio::spawn(async move {
            // A workload that exits without reading its stdin closes the pipe: not an error.
            let _ = input.write_all(&stdin).await;
            let _ = input.shutdown().await;
        });
    } else {
        drop(input);
    }
    // The reader owns the sink calls until the stream ends (the container exited).
    let reader = async {
        let mut stdout = LineSplitter::new(LogStream::Stdout);
        let mut stderr = LineSplitter::new(LogStream::Stderr);
        while let Some(chunk) = output.next().await {
            match chunk {
                Ok(bollard::container::LogOutput::StdOut { message })
                | Ok(bollard::container::LogOutput::Console { message }) => {
                    stdout.push(sink, &message);
                }
                Ok(bollard::container::LogOutput::StdErr { message }) => {
                    stderr.push(sink, &message);
                }
                Ok(bollard::container::LogOutput::StdIn { .. }) => {}
                Err(_) => break,
            }
        }
        stdout.finish(sink);
        stderr.finish(sink);
    };
    let waiting = async {
        let mut wait = docker.wait_container(
            &job.name,
            Some(
                WaitContainerOptionsBuilder::default()
                    .condition("not-running")
                    .build(),
            ),
        );
        match wait.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the engine ended the wait without a status".into()),
        }
    };
    let (end, waited) = {
        tokio::pin!(waiting);
        tokio::pin!(reader);
        let mut reader_done = false;
        let deadline = tokio::time::sleep(job.timeout);
        tokio::pin!(deadline);
        let over_disk = over_disk(shared, job);
        tokio::pin!(over_disk);
        let mut end = End::Exited;
        let waited = loop {
            tokio::select! {
                waited = &mut waiting => break waited,
                () = &mut reader, if !reader_done => reader_done = true,
                () = &mut deadline, if matches!(end, End::Exited) => {
                    end = End::TimedOut;
                    kill(docker, &job.name).await;
                }
                () = cancel.notified(), if matches!(end, End::Exited) => {
                    end = End::Cancelled;
                    kill(docker, &job.name).await;
                }
                used = &mut over_disk, if matches!(end, End::Exited) => {
                    end = End::DiskExceeded(used);
                    kill(docker, &job.name).await;
                }
            }
        };
        if !reader_done {
            // The stream ends with the container; bounded in case the engine keeps it open.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut reader).await;
        }
        (end, waited)
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let exit_code = match waited {
        Ok(code) => code,
        Err(e) => {
            return ExecOutcome::abnormal(
                ExitKind::BackendFailed,
                format!("lost track of the container: {e}"),
                elapsed_ms,
            );
        }
    };
    let inspect_oom = async || {
        docker
            .inspect_container(&job.name, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.oom_killed)
            .unwrap_or(false)
    };
    let mut oom_killed = inspect_oom().await;
    // Killed by SIGKILL, and not by us: on cgroup v2 the engine learns of an OOM kill from an
    // event that can come after the exit (moby's OOMKilled flag, seen flaky by Nomad's driver
    // too), so it is asked again for up to a second before the exit is taken as a plain 137.
    if exit_code == 137 && matches!(end, End::Exited) && !oom_killed {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            oom_killed = inspect_oom().await;
            if oom_killed {
                break;
            }
        }
    }
    let mut outcome = match end {
        End::TimedOut => ExecOutcome::abnormal(
            ExitKind::TimedOut,
            format!(
                "wall-clock deadline of {} ms exceeded: container killed",
                job.timeout.as_millis()
            ),
            elapsed_ms,
        ),
        End::Cancelled => ExecOutcome::abnormal(
            ExitKind::Cancelled,
            "cancelled: container killed",
            elapsed_ms,
        ),
        // The workload's own limit, like its memory: charged for the time used.
        End::DiskExceeded(used) => ExecOutcome::abnormal(
            ExitKind::MemoryExceeded,
            format!(
                "disk quota exceeded: the container wrote {} MiB, the limit is {} MiB: container killed",
                used >> 20,
                job.disk_bytes >> 20
            ),
            elapsed_ms,
        ),
        End::Exited if oom_killed => ExecOutcome::abnormal(
            ExitKind::MemoryExceeded,
            format!(
                "memory limit exceeded: the container went over its {} MiB and the kernel's OOM killer stopped it",
                job.memory_bytes >> 20
            ),
            elapsed_ms,
        ),
        End::Exited => {
            ExecOutcome::exited(i32::try_from(exit_code).unwrap_or(i32::MAX), elapsed_ms)
        }
    };
    match collect_outputs(shared, &job.name).await {
        Ok(outputs) => {
            if outputs.dropped > 0 {
                sink.log(
                    LogStream::Stderr,
                    format!(
                        "rhizos: {} output file(s) dropped: outputs are limited to {} files and {} KiB",
                        outputs.dropped,
                        shared.config.max_output_files,
                        shared.config.max_output_bytes >> 10
                    )
                    .as_str()
                    .into(),
                );
            }
            outcome.output_files = outputs
                .files
                .into_iter()
                .map(|(name, content)| {
                    abi_stable::std_types::Tuple2(name.as_str().into(), content.into())
                })
                .collect();
        }
        Err(e) => sink.log(
            LogStream::Stderr,
            format!("rhizos: cannot copy /output out of the container: {e}")
                .as_str()
                .into(),
        ),
    }
    outcome
}

/// Resolves with the bytes written once the container has written more than its disk limit,
/// measured every `disk_check_ms`: its writable layer (`SizeRw`), and with a read-only root its
/// volumes' host directories when the agent can read them.
async fn over_disk(shared: &Shared, job: &Job) -> u64 {
    let interval = Duration::from_millis(shared.config.disk_check_ms.max(50));
    let mut unmeasured_logged = false;
    loop {
        tokio::time::sleep(interval).await;
        let Ok(info) = shared
            .docker
            .inspect_container(&job.name, Some(InspectContainerOptions { size: true }))
            .await
        else {
            continue;
        };
        let mut used = u64::try_from(info.size_rw.unwrap_or(0)).unwrap_or(0);
        if shared.config.read_only_rootfs {
            for mount in info.mounts.iter().flatten() {
                let Some(source) = mount
                    .source
                    .as_deref()
                    .filter(|_| mount.destination.as_deref() == Some("/output"))
                else {
                    continue;
                };
                let path = std::path::PathBuf::from(source);
                match tokio::task::spawn_blocking(move || files::tree_bytes(&path)).await {
                    Ok(Ok(bytes)) => used = used.saturating_add(bytes),
                    _ if !unmeasured_logged => {
                        unmeasured_logged = true;
                        eprintln!(
                            "rhizos docker plugin: {}: cannot measure the /output volume at {source} (not readable by the agent): only the writable layer counts towards the disk limit",
                            job.name
                        );
                    }
                    _ => {}
                }
            }
        }
        if used > job.disk_bytes {
            return used;
        }
    }
}

async fn kill(docker: &Docker, name: &str) {
    // An error here means it already stopped: the wait returns either way.
    let _ = docker
        .kill_container(
            name,
            Some(
                KillContainerOptionsBuilder::default()
                    .signal("SIGKILL")
                    .build(),
            ),
        )
        .await;
}

async fn collect_outputs(shared: &Shared, name: &str) -> Result<files::Outputs, String> {
    let mut stream = shared.docker.download_from_container(
        name,
        Some(
            DownloadFromContainerOptionsBuilder::default()
                .path("/output")
                .build(),
        ),
    );
    let mut archive = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| engine_message(&e))?;
        if archive.len() + chunk.len() > MAX_ARCHIVE_BYTES {
            return Err(format!(
                "/output holds more than {} MiB",
                MAX_ARCHIVE_BYTES >> 20
            ));
        }
        archive.extend_from_slice(&chunk);
    }
    files::read_outputs(
        &archive,
        shared.config.max_output_files,
        shared.config.max_output_bytes,
    )
    .map_err(|e| format!("unreadable archive: {e}"))
}

impl Drop for DockerBackend {
    fn drop(&mut self) {
        // The backend goes once no execution holds it (the agent keeps the plugin alive for its
        // executions); its runtime may be dropped from an async context, which must not block.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
