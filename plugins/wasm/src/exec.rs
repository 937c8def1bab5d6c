//! Executions: compile (cached), instantiate with WASI preview1, run `_start` under limits.

use abi_stable::{sabi_trait::TD_Opaque, std_types::Tuple2};
use rhizos_plugin_api::{
    EventSinkBox, ExecOutcome, ExecRequest, Execution, Execution_TO, ExecutionBox, ExitKind,
    LogStream,
    sdk::{LineSplitter, OutcomeSlot, panic_message},
};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, Linker, Module, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How often the epoch advances: the granularity of the wall-clock deadline for guest code.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Compiled modules kept for reuse.
const MODULE_CACHE_ENTRIES: usize = 32;
/// Instances (and their memories, tables and async stacks) the pooling allocator keeps ready:
/// more executions than this at once on one node wait for a slot's error to retry.
const POOL_SLOTS: u32 = 64;
/// Most bytes of output files collected from `/output` (beyond: dropped, and said on stderr):
/// all a guest may write there. The agent sends the small ones in the result report and stores
/// the rest in the blob stream.
const MAX_OUTPUT_FILES_BYTES: u64 = MAX_OUTPUT_WRITE_BYTES;
/// Most output files collected.
const MAX_OUTPUT_FILES: usize = 256;
/// Fuel given to a guest without a fuel limit (never runs out in practice; still counted).
const UNLIMITED_FUEL: u64 = u64::MAX / 2;

pub struct WasmBackend {
    engine: Engine,
    linker: Arc<Linker<StoreData>>,
    /// WASI preview2 for command components.
    component_linker: Arc<wasmtime::component::Linker<StoreData<P2>>>,
    runtime: tokio::runtime::Runtime,
    cache: Arc<Mutex<ModuleCache>>,
    ticker_stop: Arc<AtomicBool>,
}

impl WasmBackend {
    pub fn new() -> wasmtime::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        // Fuel: deterministic metering (billing per million units, and a hard limit per job).
        config.consume_fuel(true);
        // Instances come from pre-reserved slots (no mmap per job), memories start from a
        // copy-on-write image of the module's data.
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .total_stacks(POOL_SLOTS)
            .max_memory_size(4 << 30);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        config.memory_init_cow(true);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |data: &mut StoreData| &mut data.wasi)?;
        let mut component_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut component_linker)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("rhizos-wasm")
            .enable_all()
            .build()?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("rhizos-wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            component_linker: Arc::new(component_linker),
            runtime,
            cache: Arc::default(),
            ticker_stop,
        })
    }

    /// Starts an execution on the plugin's runtime and returns its handle at once.
    pub fn spawn(&self, request: ExecRequest, sink: EventSinkBox) -> ExecutionBox {
        let shared = Arc::new(Shared {
            slot: OutcomeSlot::default(),
            cancel: Notify::new(),
        });
        let job = Job {
            engine: self.engine.clone(),
            linker: self.linker.clone(),
            component_linker: self.component_linker.clone(),
            cache: self.cache.clone(),
            shared: shared.clone(),
        };
        let supervisor_shared = shared.clone();
        let started = Instant::now();
        let task = self.runtime.spawn(job.run(request, Arc::new(sink)));
        // A panic in the execution task must end this execution, not the agent.
        self.runtime.spawn(async move {
            if let Err(join_error) = task.await {
                let message = match join_error.try_into_panic() {
                    Ok(payload) => format!("wasm backend panicked: {}", panic_message(&*payload)),
                    Err(e) => format!("wasm execution task ended abnormally: {e}"),
                };
                supervisor_shared.slot.set(ExecOutcome::abnormal(
                    ExitKind::BackendFailed,
                    message,
                    elapsed_ms(started),
                ));
            }
        });
        Execution_TO::from_value(Handle { shared }, TD_Opaque)
    }
}

impl Drop for WasmBackend {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

struct Shared {
    slot: OutcomeSlot,
    cancel: Notify,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Execution for Handle {
    fn cancel(&self) {
        // `notify_one` keeps a permit when nobody waits yet, so an early cancel is not lost.
        self.shared.cancel.notify_one();
    }

    fn wait(&self) -> ExecOutcome {
        self.shared.slot.wait()
    }
}

/// Ends an execution as `Crashed` when its task is dropped before it finished; a no-op after a
/// normal end (the slot keeps its first outcome).
struct EndOnDrop {
    shared: Arc<Shared>,
    started: Instant,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let message = "the wasm backend shut down before the execution finished";
        self.shared.slot.set(ExecOutcome::abnormal(
            ExitKind::BackendFailed,
            message,
            elapsed_ms(self.started),
        ));
    }
}

/// Per-store state: the WASI context (preview1 for modules, [`P2`] for components) and the
/// memory limiter.
struct StoreData<W = WasiP1Ctx> {
    wasi: W,
    limiter: MemoryLimiter,
}

/// WASI preview2 state of a command component.
struct P2 {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for StoreData<P2> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

/// A compiled workload: a core module (WASI preview1 command) or a component (WASI preview2
/// command, e.g. a Rust `wasm32-wasip2` binary).
#[derive(Clone)]
enum Compiled {
    Module(Module),
    Component(Component),
}

/// Whether `bytes` is a component binary (version 0x0d, layer 1) rather than a core module.
fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [0x0d, 0x00, 0x01, 0x00]
}

struct MemoryLimiter {
    limit_bytes: usize,
    /// The size a refused growth asked for, if any.
    refused_bytes: Option<usize>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit_bytes {
            self.refused_bytes = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold references; cap them so a guest cannot use them to dodge the memory limit.
        Ok(desired <= 1_000_000)
    }
}

struct Job {
    engine: Engine,
    linker: Arc<Linker<StoreData>>,
    component_linker: Arc<wasmtime::component::Linker<StoreData<P2>>>,
    cache: Arc<Mutex<ModuleCache>>,
    shared: Arc<Shared>,
}

enum Ending {
    Finished(wasmtime::Result<()>),
    Deadline,
    Cancelled,
    /// The guest wrote this many bytes under `/output`, past the quota.
    OutputQuota(u64),
}

/// Most bytes a guest may write under `/output` (checked every [`QUOTA_CHECK`]; a guest
/// writing faster overshoots by at most what it writes in one interval).
const MAX_OUTPUT_WRITE_BYTES: u64 = 64 << 20;
const QUOTA_CHECK: Duration = Duration::from_millis(50);

/// Resolves once the files under `dir` add up to more than [`MAX_OUTPUT_WRITE_BYTES`].
async fn output_over_quota(dir: &std::path::Path) -> u64 {
    loop {
        tokio::time::sleep(QUOTA_CHECK).await;
        let written = tree_bytes(dir);
        if written > MAX_OUTPUT_WRITE_BYTES {
            return written;
        }
    }
}

/// Bytes of the regular files under `dir` (at most 100,000 entries looked at: past that the
/// quota counts as spent).
fn tree_bytes(dir: &std::path::Path) -> u64 {
    let (mut total, mut seen) = (0u64, 0usize);
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > 100_000 {
                return u64::MAX;
            }
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => pending.push(entry.path()),
                Ok(meta) => total = total.saturating_add(meta.len()),
                Err(_) => {}
            }
        }
    }
    total
}

impl Job {
    async fn run(self, request: ExecRequest, sink: Arc<EventSinkBox>) {
        let started = Instant::now();
        // If this future is dropped unfinished (the backend's runtime is shutting down), `wait`
        // must still return.
        let _guard = EndOnDrop {
            shared: self.shared.clone(),
            started,
        };
        let outcome = self.execute(request, &sink, started).await;
        self.shared.slot.set(outcome);
    }

    async fn execute(
        &self,
        request: ExecRequest,
        sink: &Arc<EventSinkBox>,
        started: Instant,
    ) -> ExecOutcome {
        let module = match self.module(&request.workload) {
            Ok(module) => module,
            Err(e) => {
                return ExecOutcome::abnormal(
                    ExitKind::Rejected,
                    format!("invalid WASM module: {e:#}"),
                    elapsed_ms(started),
                );
            }
        };
        let limit_bytes = usize::try_from(request.limits.memory_limit_bytes).unwrap_or(usize::MAX);
        let timeout = Duration::from_millis(request.limits.wall_timeout_ms);
        let fuel_limit = request.limits.fuel_limit;
        let stdout = LineWriter::new(sink.clone(), LogStream::Stdout);
        let stderr = LineWriter::new(sink.clone(), LogStream::Stderr);
        let dirs = match ExecDirs::create(&request) {
            Ok(dirs) => dirs,
            Err(e) => {
                return ExecOutcome::abnormal(
                    ExitKind::Rejected,
                    format!("cannot prepare the input files: {e}"),
                    elapsed_ms(started),
                );
            }
        };
        let ran = match module {
            Compiled::Module(module) => {
                self.run_module(&module, &request, &dirs, &stdout, &stderr, timeout)
                    .await
            }
            Compiled::Component(component) => {
                self.run_component(&component, &request, &dirs, &stdout, &stderr, timeout)
                    .await
            }
        };
        let elapsed = elapsed_ms(started);
        let (output_files, dropped) = dirs.collect_outputs();
        if dropped > 0 {
            stderr.write(
                format!(
                    "\nrhizos: {dropped} output file(s) dropped: outputs are limited to {MAX_OUTPUT_FILES} files and {} KiB\n",
                    MAX_OUTPUT_FILES_BYTES >> 10
                )
                .as_bytes(),
            );
        }
        drop(dirs);
        stdout.finish();
        stderr.finish();
        let (ending, fuel_consumed, refused) = match ran {
            Ok(ran) => ran,
            Err(e) => {
                return ExecOutcome::abnormal(
                    ExitKind::Rejected,
                    format!("cannot set up the execution: {e:#}"),
                    elapsed,
                );
            }
        };
        let memory_message = |desired: usize| {
            format!(
                "memory limit exceeded: the module tried to grow its memory to {} MiB, the limit is {} MiB",
                desired.div_ceil(1 << 20),
                limit_bytes >> 20
            )
        };
        let deadline_message =
            || format!("wall-clock deadline of {} ms exceeded", timeout.as_millis());
        let outcome = match ending {
            Ending::Deadline => {
                ExecOutcome::abnormal(ExitKind::TimedOut, deadline_message(), elapsed)
            }
            Ending::Cancelled => {
                ExecOutcome::abnormal(ExitKind::Cancelled, "cancelled by the host", elapsed)
            }
            Ending::OutputQuota(written) => ExecOutcome::abnormal(
                ExitKind::MemoryExceeded,
                format!(
                    "disk quota exceeded: the module wrote {} MiB under /output, the quota is {} MiB",
                    written >> 20,
                    MAX_OUTPUT_WRITE_BYTES >> 20
                ),
                elapsed,
            ),
            Ending::Finished(Ok(())) => ExecOutcome::exited(0, elapsed),
            Ending::Finished(Err(error)) => {
                if let Some(exit) = error.downcast_ref::<I32Exit>() {
                    match refused {
                        Some(desired) if exit.0 != 0 => ExecOutcome::abnormal(
                            ExitKind::MemoryExceeded,
                            memory_message(desired),
                            elapsed,
                        ),
                        _ => ExecOutcome::exited(exit.0, elapsed),
                    }
                } else if let Some(desired) = refused {
                    ExecOutcome::abnormal(
                        ExitKind::MemoryExceeded,
                        memory_message(desired),
                        elapsed,
                    )
                } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    ExecOutcome::abnormal(ExitKind::TimedOut, deadline_message(), elapsed)
                } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
                    ExecOutcome::abnormal(
                        ExitKind::FuelExhausted,
                        format!("fuel limit of {fuel_limit} units exhausted"),
                        elapsed,
                    )
                } else if error.downcast_ref::<Trap>().is_some() {
                    ExecOutcome::abnormal(
                        ExitKind::Crashed,
                        format!("wasm trap: {}", root_message(&error)),
                        elapsed,
                    )
                } else {
                    ExecOutcome::abnormal(ExitKind::Rejected, format!("{error:#}"), elapsed)
                }
            }
        };
        let mut outcome = outcome.with_fuel(fuel_consumed);
        outcome.output_files = output_files;
        outcome
    }

    /// Runs `run` until it ends, the wall-clock deadline passes, the host cancels, or what the
    /// guest wrote under `/output` passes [`MAX_OUTPUT_WRITE_BYTES`].
    async fn race(
        &self,
        run: impl std::future::Future<Output = wasmtime::Result<()>>,
        timeout: Duration,
        output: &std::path::Path,
    ) -> Ending {
        tokio::select! {
            result = run => Ending::Finished(result),
            () = tokio::time::sleep(timeout) => Ending::Deadline,
            () = self.shared.cancel.notified() => Ending::Cancelled,
            written = output_over_quota(output) => Ending::OutputQuota(written),
        }
    }

    /// Runs a core module's `_start` (WASI preview1). Returns how it ended, the fuel burned
    /// and the memory growth refused, if any.
    async fn run_module(
        &self,
        module: &Module,
        request: &ExecRequest,
        dirs: &ExecDirs,
        stdout: &LineWriter,
        stderr: &LineWriter,
        timeout: Duration,
    ) -> wasmtime::Result<(Ending, u64, Option<usize>)> {
        let (mut store, fuel_given) = new_store(
            &self.engine,
            request,
            stdout.clone(),
            stderr.clone(),
            Some(dirs),
            |b| b.build_p1(),
        )?;
        let ending = {
            let linker = self.linker.clone();
            let run = async {
                let instance = linker.instantiate_async(&mut store, module).await?;
                let entry = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(|e| {
                    e.context("the module exports no `_start` function: build it as a WASI command (a binary)")
                })?;
                entry.call_async(&mut store, ()).await
            };
            self.race(run, timeout, &dirs.output).await
        };
        Ok(spent(&store, ending, fuel_given))
    }

    /// Runs a command component's `wasi:cli/run` (WASI preview2).
    async fn run_component(
        &self,
        component: &Component,
        request: &ExecRequest,
        dirs: &ExecDirs,
        stdout: &LineWriter,
        stderr: &LineWriter,
        timeout: Duration,
    ) -> wasmtime::Result<(Ending, u64, Option<usize>)> {
        let (mut store, fuel_given) = new_store(
            &self.engine,
            request,
            stdout.clone(),
            stderr.clone(),
            Some(dirs),
            |b| P2 {
                ctx: b.build(),
                table: ResourceTable::new(),
            },
        )?;
        let ending = {
            let linker = self.component_linker.clone();
            let run = async {
                let command = wasmtime_wasi::p2::bindings::Command::instantiate_async(
                    &mut store, component, &linker,
                )
                .await
                .map_err(|e| {
                    e.context("the component is not a WASI command (it must export wasi:cli/run)")
                })?;
                match command.wasi_cli_run().call_run(&mut store).await? {
                    Ok(()) => Ok(()),
                    // `run` returned its error variant: the command failed without a code.
                    Err(()) => Err(wasmtime::Error::new(I32Exit(1))),
                }
            };
            self.race(run, timeout, &dirs.output).await
        };
        Ok(spent(&store, ending, fuel_given))
    }

    /// Compiles `bytes` (binary or WAT), reusing an earlier compilation of identical bytes.
    fn module(&self, bytes: &[u8]) -> wasmtime::Result<Compiled> {
        let mut hasher = DefaultHasher::new();
        bytes.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(module) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key, bytes)
        {
            return Ok(module);
        }
        let module = if is_component(bytes) {
            Compiled::Component(Component::from_binary(&self.engine, bytes)?)
        } else {
            Compiled::Module(Module::new(&self.engine, bytes)?)
        };
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, bytes, module.clone());
        Ok(module)
    }
}

/// How an execution ended, with the fuel it burned and the memory growth refused, if any.
fn spent<W>(
    store: &Store<StoreData<W>>,
    ending: Ending,
    fuel_given: u64,
) -> (Ending, u64, Option<usize>) {
    let fuel = fuel_given.saturating_sub(store.get_fuel().unwrap_or(fuel_given));
    (ending, fuel, store.data().limiter.refused_bytes)
}

/// An execution's private directories: `input/` (the job's files, mapped read-only at
/// `/input`) and `output/` (writable at `/output`, collected at the end). Removed on drop.
struct ExecDirs {
    root: std::path::PathBuf,
    input: std::path::PathBuf,
    output: std::path::PathBuf,
}

impl ExecDirs {
    fn create(request: &ExecRequest) -> io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let safe_id: String = request
            .execution_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let root = std::env::temp_dir().join(format!(
            "rhizos-wasm-{}-{unique}-{safe_id}",
            std::process::id()
        ));
        let dirs = Self {
            input: root.join("input"),
            output: root.join("output"),
            root,
        };
        std::fs::create_dir_all(&dirs.input)?;
        std::fs::create_dir_all(&dirs.output)?;
        for Tuple2(name, content) in request.input_files.iter() {
            let name = name.as_str();
            // Checked by the orchestrator too; a path must stay inside input/.
            if name.is_empty()
                || name.starts_with('/')
                || name
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad input file name {name:?}"),
                ));
            }
            let path = dirs.input.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content.as_slice())?;
        }
        Ok(dirs)
    }

    /// Regular files under output/ (relative path, content), in path order, within the
    /// limits; and how many were dropped for them. Symlinks are not followed.
    fn collect_outputs(
        &self,
    ) -> (
        abi_stable::std_types::RVec<
            Tuple2<abi_stable::std_types::RString, abi_stable::std_types::RVec<u8>>,
        >,
        usize,
    ) {
        let mut files = Vec::new();
        let mut pending = vec![self.output.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_dir() {
                    pending.push(entry.path());
                } else if kind.is_file() {
                    files.push(entry.path());
                }
            }
        }
        files.sort();
        let (mut kept, mut dropped, mut total) = (abi_stable::std_types::RVec::new(), 0usize, 0u64);
        for path in files {
            let Ok(relative) = path.strip_prefix(&self.output) else {
                continue;
            };
            let name = relative.to_string_lossy().replace('\\', "/");
            let size = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if kept.len() >= MAX_OUTPUT_FILES || total.saturating_add(size) > MAX_OUTPUT_FILES_BYTES
            {
                dropped += 1;
                continue;
            }
            match std::fs::read(&path) {
                Ok(content) => {
                    total += content.len() as u64;
                    kept.push(Tuple2(name.as_str().into(), content.into()));
                }
                Err(_) => dropped += 1,
            }
        }
        (kept, dropped)
    }
}

impl Drop for ExecDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A store for one execution: WASI p1 context (args, env, stdin, line-cut stdout/stderr),
/// memory limiter, fuel and epoch deadline. Returns it with the fuel it was given.
fn new_store<W: 'static>(
    engine: &Engine,
    request: &ExecRequest,
    stdout: LineWriter,
    stderr: LineWriter,
    dirs: Option<&ExecDirs>,
    build: impl FnOnce(&mut WasiCtxBuilder) -> W,
) -> wasmtime::Result<(Store<StoreData<W>>, u64)> {
    let mut argv: Vec<String> = vec!["main.wasm".to_owned()];
    argv.extend(request.args.iter().map(|a| a.to_string()));
    let env: Vec<(String, String)> = request
        .env
        .iter()
        .map(|Tuple2(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut builder = WasiCtxBuilder::new();
    builder
        .args(&argv)
        .envs(&env)
        .stdin(MemoryInputPipe::new(request.stdin.to_vec()))
        .stdout(stdout)
        .stderr(stderr);
    if let Some(dirs) = dirs {
        builder.preopened_dir(&dirs.input, "/input", wasmtime_wasi::FsPerms::ReadOnly)?;
        builder.preopened_dir(&dirs.output, "/output", wasmtime_wasi::FsPerms::ReadWrite)?;
    }
    let data = StoreData {
        wasi: build(&mut builder),
        limiter: MemoryLimiter {
            limit_bytes: usize::try_from(request.limits.memory_limit_bytes).unwrap_or(usize::MAX),
            refused_bytes: None,
        },
    };
    let mut store = Store::new(engine, data);
    store.limiter(|data| &mut data.limiter);
    let fuel_given = match request.limits.fuel_limit {
        0 => UNLIMITED_FUEL,
        limit => limit,
    };
    store.set_fuel(fuel_given)?;
    // The ticker runs free, so the first tick can come at once: one tick more than the
    // timeout holds means the guest is never interrupted before its whole timeout has passed
    // (a job is billed for exactly its timeout, not a tick less).
    let ticks = request
        .limits
        .wall_timeout_ms
        .div_ceil(EPOCH_TICK.as_millis() as u64)
        .saturating_add(1);
    store.set_epoch_deadline(ticks);
    Ok((store, fuel_given))
}

impl WasmBackend {
    /// For benchmarks: prepares a store and instantiates `module` `iterations` times the way an
    /// execution does (module from the cache, pooled instance slot), without running it.
    /// Returns the time each instantiation took (store setup included).
    #[doc(hidden)]
    pub fn time_instantiations(
        &self,
        module: &[u8],
        iterations: usize,
        sink: EventSinkBox,
    ) -> wasmtime::Result<Vec<Duration>> {
        let job = Job {
            engine: self.engine.clone(),
            linker: self.linker.clone(),
            component_linker: self.component_linker.clone(),
            cache: self.cache.clone(),
            shared: Arc::new(Shared {
                slot: OutcomeSlot::default(),
                cancel: Notify::new(),
            }),
        };
        let sink = Arc::new(sink);
        let request = ExecRequest {
            execution_id: "bench".into(),
            workload: module.to_vec().into(),
            args: Default::default(),
            env: Default::default(),
            stdin: Default::default(),
            limits: rhizos_plugin_api::ExecLimits {
                wall_timeout_ms: 10_000,
                memory_limit_bytes: 64 << 20,
                fuel_limit: 0,
                cpu_cores: 0,
                vram_limit_bytes: 0,
                disk_limit_bytes: 0,
            },
            input_files: Default::default(),
            gpu_devices: Default::default(),
        };
        self.runtime.block_on(async {
            let mut times = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let started = Instant::now();
                let module = job.module(&request.workload)?;
                let stdout = LineWriter::new(sink.clone(), LogStream::Stdout);
                let stderr = LineWriter::new(sink.clone(), LogStream::Stderr);
                let Compiled::Module(module) = module else {
                    return Err(wasmtime::Error::msg("benchmark expects a core module"));
                };
                let (mut store, _) = new_store(&job.engine, &request, stdout, stderr, None, |b| {
                    b.build_p1()
                })?;
                let instance = job.linker.instantiate_async(&mut store, &module).await?;
                std::hint::black_box(instance);
                times.push(started.elapsed());
            }
            Ok(times)
        })
    }
}

/// The trap description plus the guest's wasm backtrace headline, without the long frame list.
fn root_message(error: &wasmtime::Error) -> String {
    let trap = error
        .downcast_ref::<Trap>()
        .map(|t| t.to_string())
        .unwrap_or_default();
    if trap.is_empty() {
        format!("{error}")
    } else {
        trap
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Small content-addressed cache: the hash picks the bucket, full byte equality decides.
#[derive(Default)]
struct ModuleCache {
    entries: HashMap<u64, (Vec<u8>, Compiled, u64)>,
    clock: u64,
}

impl ModuleCache {
    fn get(&mut self, key: u64, bytes: &[u8]) -> Option<Compiled> {
        self.clock += 1;
        let clock = self.clock;
        let (stored, module, used) = self.entries.get_mut(&key)?;
        if stored.as_slice() != bytes {
            return None;
        }
        *used = clock;
        Some(module.clone())
    }

    fn insert(&mut self, key: u64, bytes: &[u8], module: Compiled) {
        if self.entries.len() >= MODULE_CACHE_ENTRIES
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| *k)
        {
            self.entries.remove(&oldest);
        }
        self.clock += 1;
        self.entries
            .insert(key, (bytes.to_vec(), module, self.clock));
    }
}

/// A guest output stream that cuts what is written into lines for the host's sink.
#[derive(Clone)]
struct LineWriter {
    sink: Arc<EventSinkBox>,
    splitter: Arc<Mutex<LineSplitter>>,
}

impl LineWriter {
    fn new(sink: Arc<EventSinkBox>, stream: LogStream) -> Self {
        Self {
            sink,
            splitter: Arc::new(Mutex::new(LineSplitter::new(stream))),
        }
    }

    fn write(&self, bytes: &[u8]) {
        self.splitter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(&self.sink, bytes);
    }

    fn finish(&self) {
        self.splitter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .finish(&self.sink);
    }
}

impl IsTerminal for LineWriter {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LineWriter {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
