//! The stable-ABI contract between the RhizOS node agent (the host) and its plugins.
//!
//! A plugin is a `cdylib` that exports one [`BackendPluginRef`] root module through
//! `#[abi_stable::export_root_module]`. The host loads it with `abi_stable`, which refuses a
//! library whose root module was built against an incompatible version of this crate
//! ([`BackendPluginRef::VERSION_STRINGS`], taken from this crate's package version) or whose types
//! have a different layout, before any of the plugin's code is called.
//!
//! Everything that crosses the boundary is `#[repr(C)]` + [`StableAbi`]. No tokio, no NATS, no I/O
//! here: a plugin that needs async runs its own runtime, and the host calls the blocking methods of
//! [`Execution`] on its blocking pool. Log lines flow back through a host-implemented
//! [`EventSink`], which the plugin may call from any thread.
//!
//! **API Boundary:** adding a field to [`BackendPlugin`] after the `last_prefix_field` stays
//! compatible with plugins built earlier; any other change to a type here needs a minor version
//! bump of this crate (while it is 0.x), which makes the host refuse older plugins.
#![allow(non_local_definitions, non_camel_case_types)]
// `sabi_trait` and `StableAbi` derive expand to unsafe code; that is this crate's whole purpose.
#![allow(unsafe_code)]

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
};

pub mod ai;
pub mod manifest;
pub mod sdk;

/// The version of this contract, as plugins see it (the package version of this crate).
pub const PLUGIN_API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a plugin is for.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Runs jobs (WASM, Docker, CUDA, ...).
    Backend,
    /// Resolves `chain://` module ids to manifests.
    Resolver,
}

/// Self-description of a plugin, returned by [`BackendPlugin::describe`].
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginInfo {
    /// Unique plugin name, e.g. `wasm`.
    pub name: RString,
    /// The plugin's own version (its crate version).
    pub version: RString,
    pub kind: PluginKind,
    /// Job backends this plugin executes (e.g. `["wasm"]`); fed into the node's registration.
    pub backends: RVec<RString>,
}

/// Which output stream a log line came from.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Resource limits the host imposes on one execution.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct ExecLimits {
    /// Wall-clock deadline, counted from the start of the execution.
    pub wall_timeout_ms: u64,
    /// Maximum memory the workload may use, in bytes.
    pub memory_limit_bytes: u64,
    /// Most units of deterministic work (WASM fuel) the workload may use; 0: no limit.
    /// Backends that cannot meter fuel ignore it.
    pub fuel_limit: u64,
    /// CPU cores allocated to the workload (a container gets this many CPUs of quota); 0: no
    /// limit. Backends that cannot limit CPU ignore it.
    pub cpu_cores: u32,
    /// Most GPU memory the workload may hold on each of its GPUs, in bytes; 0: the whole GPU.
    pub vram_limit_bytes: u64,
    /// Most disk the workload may write (its files, a container's writable layer), in bytes;
    /// 0: the backend's own default. Backends without a disk of their own ignore it.
    pub disk_limit_bytes: u64,
}

/// One execution of a job, as handed to a backend.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ExecRequest {
    /// Host-chosen id (`<job_id>-<attempt>`), for the plugin's logs.
    pub execution_id: RString,
    /// The workload itself, in the backend's format (for `wasm`: the module bytes, binary or WAT).
    pub workload: RVec<u8>,
    /// Arguments after the program name.
    pub args: RVec<RString>,
    pub env: RVec<Tuple2<RString, RString>>,
    pub stdin: RVec<u8>,
    pub limits: ExecLimits,
    /// Files for the workload to read (relative path, content); a backend that supports files
    /// shows them read-only under `/input`.
    pub input_files: RVec<Tuple2<RString, RVec<u8>>>,
    /// The GPUs the agent allocated to this execution (UUIDs when the driver reports them,
    /// otherwise indices); empty for a CPU job. A backend exposes these and no others.
    pub gpu_devices: RVec<RString>,
}

/// How an execution ended.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The workload ran to its end; see `exit_code`.
    Exited,
    /// The wall-clock deadline passed and the workload was stopped.
    TimedOut,
    /// The workload tried to use more memory than its limit.
    MemoryExceeded,
    /// The workload crashed (a WASM trap, a signal).
    Crashed,
    /// The host cancelled the execution.
    Cancelled,
    /// The backend could not run the workload at all (invalid module, missing image...).
    Rejected,
    /// The workload used up its fuel limit and was stopped.
    FuelExhausted,
    /// The backend itself failed (its engine lost the container, the runtime panicked or shut
    /// down): not the workload's doing, so the job is not charged and is run elsewhere.
    BackendFailed,
}

/// The end of an execution.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct ExecOutcome {
    pub kind: ExitKind,
    /// The process exit code when `kind` is `Exited`, otherwise -1.
    pub exit_code: i32,
    /// Human-readable reason when the workload did not exit on its own, empty otherwise.
    pub message: RString,
    /// Measured execution time (what the node bills for).
    pub elapsed_ms: u64,
    /// Units of fuel the workload consumed (deterministic, the same on every machine); 0 when
    /// the backend does not meter fuel.
    pub fuel_consumed: u64,
    /// Files the workload wrote under `/output` (relative path, content).
    pub output_files: RVec<Tuple2<RString, RVec<u8>>>,
    /// What a metered service (an AI backend) served, as the backend counted it: input and
    /// output units (tokens for chat and embeddings, characters for speech, pages for
    /// scrape). `RNone` for time-billed workloads. The orchestrator bills no more than the
    /// network itself measured (the gateway's count of what it delivered).
    pub usage: ROption<Metered>,
}

/// Units a metered service counted for one execution (see [`ExecOutcome::usage`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub input_units: u64,
    pub output_units: u64,
}

/// What a model-serving backend offers right now (see [`Backend::models`]).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The service: `chat`, `embeddings`, `speech` or `scrape` ([`ai::Service`]).
    pub service: RString,
    /// The model's name as the network knows it (`[a-z0-9._:-]`, e.g. `smollm2-135m`).
    pub name: RString,
    /// Most tokens of prompt + completion the model takes; 0 when it has no such limit.
    pub context_length: u32,
    /// Loaded and ready to answer without a load delay.
    pub warm: bool,
}

/// Receives the output of an execution, line by line, in order. Implemented by the host.
#[sabi_trait]
pub trait EventSink: Send + Sync {
    /// One complete line (without its newline) written by the workload. Invalid UTF-8 is replaced.
    fn log(&self, stream: LogStream, line: RStr<'_>);

    /// One piece of a streamed response (a model-serving backend's [`ai::Chunk`], JSON), sent on
    /// to the requester as it comes, in order. Time-billed workloads do not use it.
    #[sabi(last_prefix_field)]
    fn chunk(&self, data: RSlice<'_, u8>);
}

/// Host handle on the sink, as passed to [`Backend::start`].
pub type EventSinkBox = EventSink_TO<'static, RBox<()>>;

/// A running execution. Implemented by the plugin.
#[sabi_trait]
pub trait Execution: Send + Sync {
    /// Asks the execution to stop; `wait` then returns `Cancelled` (or the natural end if it won
    /// the race). Must not block.
    fn cancel(&self);

    /// Blocks until the execution has ended and every log line has been given to the sink.
    #[sabi(last_prefix_field)]
    fn wait(&self) -> ExecOutcome;
}

pub type ExecutionBox = Execution_TO<'static, RBox<()>>;

/// What the host tells a plugin about itself when it starts the plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct HostContext {
    /// The id of the node this agent runs (stable across agent restarts): a plugin that leaves
    /// things behind (containers, files) labels them with it to clean up after a crash.
    pub node_id: RString,
}

/// An execution backend. Implemented by the plugin.
#[sabi_trait]
pub trait Backend: Send + Sync {
    /// Starts one execution and returns at once. `Err` means the request was refused before
    /// anything ran (the host fails the job with that message).
    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> RResult<ExecutionBox, RString>;

    /// Why this backend can run nothing on this machine (e.g. "no NVIDIA driver (NVML: …)"),
    /// or `RNone` when it offers every backend it `describe`s. A plugin that cannot work here
    /// still loads: the node offers none of its backends and shows the reason.
    fn unavailable(&self) -> ROption<RString>;

    /// The models this backend serves now (empty for backends that run workloads rather than
    /// serve models). Asked at load and on every plugin scan; a change re-registers the node.
    /// Must return quickly (a backend caches what it learns from its server).
    #[sabi(last_prefix_field)]
    fn models(&self) -> RVec<ModelInfo>;
}

pub type BackendBox = Backend_TO<'static, RBox<()>>;

/// The root module every backend plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = BackendPluginRef)))]
#[sabi(missing_field(panic))]
pub struct BackendPlugin {
    /// Name, version, kind and offered backends. Must not fail.
    pub describe: extern "C" fn() -> PluginInfo,
    /// Creates the backend. `config` is a JSON object from the agent's configuration
    /// (`[agent.plugins.<name>]`), `{}` when there is none; `host` says which node it serves.
    #[sabi(last_prefix_field)]
    pub new_backend:
        extern "C" fn(config: RStr<'_>, host: &HostContext) -> RResult<BackendBox, RString>,
}

impl RootModule for BackendPluginRef {
    declare_root_module_statics! {BackendPluginRef}
    const BASE_NAME: &'static str = "rhizos_backend";
    const NAME: &'static str = "rhizos_backend";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// A module resolver: turns a `chain://<id>[@<version>]` name into the module's manifest.
/// Implemented by the plugin.
#[sabi_trait]
pub trait Resolver: Send + Sync {
    /// The manifest (JSON text) of `id` at `version` (the latest when `RNone`); `RNone` when
    /// this resolver does not know the module (the next one in the chain is asked); `RErr`
    /// when it knows it but cannot answer.
    fn resolve(
        &self,
        id: RStr<'_>,
        version: ROption<RStr<'_>>,
    ) -> RResult<ROption<RString>, RString>;

    /// Every module this resolver knows, as manifests (JSON text, every version); `RNone` when
    /// it cannot enumerate its registry.
    #[sabi(last_prefix_field)]
    fn list(&self) -> RResult<ROption<RVec<RString>>, RString>;
}

pub type ResolverBox = Resolver_TO<'static, RBox<()>>;

/// The root module every resolver plugin exports (a library exports one root module: a
/// backend or a resolver).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ResolverPluginRef)))]
#[sabi(missing_field(panic))]
pub struct ResolverPlugin {
    /// Name, version and kind (`Resolver`). Must not fail.
    pub describe: extern "C" fn() -> PluginInfo,
    /// Creates the resolver from its JSON config (`{}` when none).
    #[sabi(last_prefix_field)]
    pub new_resolver: extern "C" fn(config: RStr<'_>) -> RResult<ResolverBox, RString>,
}

impl RootModule for ResolverPluginRef {
    declare_root_module_statics! {ResolverPluginRef}
    const BASE_NAME: &'static str = "rhizos_resolver";
    const NAME: &'static str = "rhizos_resolver";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
