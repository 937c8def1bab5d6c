//! Plugins as WebAssembly components (`<name>.wasm` + `<name>.json`), hosted with wasmtime's
//! component model against the WIT worlds in `plugin-api/wit/plugin.wit`.
//!
//! **Nothing ambient.** A component gets exactly what its manifest grants: the directories it
//! may read (preopened read-only at the guest path the manifest names), no environment, no
//! network, no host files beyond those. **Every call is bounded**: a fresh instance per call
//! with the manifest's fuel, memory and wall-clock limits, so calls share no state and a
//! runaway guest ends with an exact reason instead of hanging or growing the agent.
//!
//! Both worlds are hosted: `resolver` components join the node's resolver chain, `backend`
//! components run jobs (through the same `Backend` trait as stable-ABI plugins; for them the
//! manifest's limits are the operator's ceiling on every execution, the job's own limits apply
//! below it). Which world a component implements is read from its exports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-api/wit",
        world: "resolver",
    });
}

mod backend_bindings {
    wasmtime::component::bindgen!({
        path: "../plugin-api/wit",
        world: "backend",
    });
}

use bindings::rhizos::plugin::types::PluginKind as WitKind;
use rhizos_plugin_api::sdk::{OutcomeSlot, PluginBackend, PluginExecution};
use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, ExitKind, LogStream};

/// The WIT package version components are checked against.
pub const WIT_VERSION: &str = "rhizos:plugin@0.2.0";

pub use rhizos_plugin_api::manifest::{DirGrant, MAX_MEMORY_MIB, Manifest, parse_manifest};

/// How often the epoch advances: the granularity of per-call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The manifest path for a component file: `x.wasm` → `x.json`.
pub fn manifest_path(component: &Path) -> PathBuf {
    component.with_extension("json")
}

/// Reads and checks a manifest; relative grants are resolved against `base`.
pub fn read_manifest(path: &Path, base: &Path) -> Result<Manifest, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "no readable manifest {} beside it ({e}): a component runs only with the capabilities its manifest grants",
            path.display()
        )
    })?;
    parse_manifest(&text, base).map_err(|e| format!("manifest {}: {e}", path.display()))
}

/// The engine all component plugins of a process share (with its epoch ticker thread).
#[derive(Clone)]
pub struct ComponentHost {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    _ticker: Arc<Ticker>,
}

struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl ComponentHost {
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        // Calls instantiate afresh: pre-reserved slots and copy-on-write images make that cheap.
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(64)
            .total_core_instances(256)
            .total_memories(256)
            .total_tables(256)
            .max_memory_size((MAX_MEMORY_MIB << 20) as usize);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        config.memory_init_cow(true);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        // The backend world's one import: its log lines.
        backend_bindings::Backend::add_to_linker::<
            CallState,
            wasmtime::component::HasSelf<CallState>,
        >(&mut linker, |state| state)
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticking = engine.clone();
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("rhizos-component-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            _ticker: Arc::new(Ticker(stop)),
        })
    }

    /// Compiles `file` and loads it as the kind of plugin its exports say (`run`: a backend,
    /// `resolve`: a resolver), after asking it to describe itself within its manifest's limits.
    pub fn load(&self, file: &Path, manifest: Manifest) -> Result<LoadedComponent, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
        let component = Component::from_binary(&self.engine, &bytes)
            .map_err(|e| format!("not a WebAssembly component: {}", first_line(&e)))?;
        let is_backend = component
            .component_type()
            .exports(&self.engine)
            .any(|(name, _)| name == "run");
        if is_backend {
            self.load_backend(file, component, manifest)
                .map(LoadedComponent::Backend)
        } else {
            self.resolver_from(file, component, manifest)
                .map(LoadedComponent::Resolver)
        }
    }

    /// [`Self::load`], for a file that must be a resolver component.
    pub fn load_resolver(
        &self,
        file: &Path,
        manifest: Manifest,
    ) -> Result<ResolverComponent, String> {
        match self.load(file, manifest)? {
            LoadedComponent::Resolver(resolver) => Ok(resolver),
            LoadedComponent::Backend(backend) => Err(format!(
                "component {} is a backend, not a resolver",
                backend.name
            )),
        }
    }

    fn load_backend(
        &self,
        file: &Path,
        component: Component,
        manifest: Manifest,
    ) -> Result<BackendComponent, String> {
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "the component needs imports this host does not grant: {}",
                first_line(&e)
            )
        })?;
        let pre = backend_bindings::BackendPre::new(pre).map_err(|e| {
            format!(
                "not a {WIT_VERSION} backend component (its exports differ: {}); rebuild it against plugin-api/wit",
                first_line(&e)
            )
        })?;
        let mut backend = BackendComponent {
            file: file.to_path_buf(),
            name: String::new(),
            version: String::new(),
            backends: Vec::new(),
            manifest,
            host: self.clone(),
            pre,
        };
        let limits = CallLimits::of(&backend.manifest);
        let (info, _) = backend
            .host
            .run_call(&backend.manifest, limits, None, None, |store| {
                let bindings = backend.pre.instantiate(&mut *store)?;
                bindings.call_describe(store)
            });
        let info = info.map_err(|failure| failure.describe(&backend.manifest))?;
        if info.kind != backend_bindings::rhizos::plugin::types::PluginKind::Backend {
            return Err(format!(
                "component {} exports `run` (the backend world) but says it is a resolver",
                info.name
            ));
        }
        if info.backends.is_empty() {
            return Err(format!("backend component {} offers no backend", info.name));
        }
        backend.name = info.name;
        backend.version = info.version;
        backend.backends = info.backends;
        Ok(backend)
    }

    fn resolver_from(
        &self,
        file: &Path,
        component: Component,
        manifest: Manifest,
    ) -> Result<ResolverComponent, String> {
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "the component needs imports this host does not grant: {}",
                first_line(&e)
            )
        })?;
        let pre = bindings::ResolverPre::new(pre).map_err(|e| {
            format!(
                "not a {WIT_VERSION} resolver component (its exports differ: {}); rebuild it against plugin-api/wit",
                first_line(&e)
            )
        })?;
        let mut resolver = ResolverComponent {
            file: file.to_path_buf(),
            name: String::new(),
            version: String::new(),
            manifest,
            host: self.clone(),
            pre,
        };
        let info = resolver.call(|bindings, store| bindings.call_describe(store))?;
        if info.kind != WitKind::Resolver {
            return Err(format!(
                "component {} exports `resolve` (the resolver world) but says it is a backend",
                info.name
            ));
        }
        resolver.name = info.name;
        resolver.version = info.version;
        Ok(resolver)
    }
}

/// A loaded resolver component.
pub struct ResolverComponent {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    pub manifest: Manifest,
    host: ComponentHost,
    pre: bindings::ResolverPre<CallState>,
}

/// What one call's store holds.
struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    /// Where a backend component's log lines go.
    sink: Option<EventSinkBox>,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct Limiter {
    memory_bytes: usize,
    refused: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes;
        self.refused |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl ResolverComponent {
    /// The manifest (JSON text) of `id` at `version`, `None` when this resolver does not know
    /// it. Blocking: call it off async worker threads.
    pub fn resolve(&self, id: &str, version: Option<&str>) -> Result<Option<String>, String> {
        let config = self.manifest.config.to_string();
        self.call(|bindings, store| {
            match bindings.call_configure(&mut *store, &config)? {
                Ok(()) => {}
                Err(message) => return Ok(Err(format!("configure: {message}"))),
            }
            bindings.call_resolve(store, id, version)
        })?
    }

    /// Every module the component knows (manifests), `None` when it cannot enumerate. Blocking.
    pub fn list(&self) -> Result<Option<Vec<String>>, String> {
        let config = self.manifest.config.to_string();
        self.call(|bindings, store| {
            match bindings.call_configure(&mut *store, &config)? {
                Ok(()) => {}
                Err(message) => return Ok(Err(format!("configure: {message}"))),
            }
            bindings.call_list(store)
        })?
    }

    /// For benchmarks: one `describe` call, on a fresh instance like every call.
    #[doc(hidden)]
    pub fn describe_call(&self) -> Result<String, String> {
        self.call(|bindings, store| bindings.call_describe(store))
            .map(|info| info.name)
    }

    /// For benchmarks: `calls` `describe` calls on one instance (the raw cost of crossing into
    /// the component, without the per-call instantiation the host normally does).
    #[doc(hidden)]
    pub fn describe_calls_on_one_instance(&self, calls: usize) -> Result<(), String> {
        self.call(|bindings, store| {
            for _ in 0..calls {
                std::hint::black_box(bindings.call_describe(&mut *store)?);
            }
            Ok(())
        })
    }

    /// Runs `f` on a fresh instance under the manifest's grants and limits.
    fn call<T>(
        &self,
        f: impl FnOnce(&bindings::Resolver, &mut Store<CallState>) -> wasmtime::Result<T>,
    ) -> Result<T, String> {
        let manifest = &self.manifest;
        let (result, _) =
            self.host
                .run_call(manifest, CallLimits::of(manifest), None, None, |store| {
                    let bindings = self.pre.instantiate(&mut *store)?;
                    f(&bindings, store)
                });
        result.map_err(|failure| failure.describe(manifest))
    }
}

/// What one call may use.
#[derive(Debug, Clone, Copy)]
struct CallLimits {
    fuel: u64,
    memory_bytes: usize,
    timeout: Duration,
}

impl CallLimits {
    /// A plugin call: the manifest's limits.
    fn of(manifest: &Manifest) -> Self {
        Self {
            fuel: manifest.fuel_per_call,
            memory_bytes: usize::try_from(manifest.memory_mib << 20).unwrap_or(usize::MAX),
            timeout: Duration::from_millis(manifest.timeout_ms),
        }
    }
}

/// Why a call did not return.
#[derive(Debug)]
enum CallFailure {
    Memory,
    Fuel,
    Deadline,
    Cancelled,
    Trap(String),
    Other(String),
}

impl CallFailure {
    /// The reason, for a plugin call under `manifest`'s limits.
    fn describe(self, manifest: &Manifest) -> String {
        match self {
            Self::Memory => format!(
                "memory limit of {} MiB per call exceeded",
                manifest.memory_mib
            ),
            Self::Fuel => format!(
                "fuel limit of {} units per call exhausted",
                manifest.fuel_per_call
            ),
            Self::Deadline | Self::Cancelled => {
                format!("call exceeded its time limit of {} ms", manifest.timeout_ms)
            }
            Self::Trap(trap) => format!("component trapped: {trap}"),
            Self::Other(message) => message,
        }
    }
}

impl ComponentHost {
    /// Runs `f` on a fresh store with the manifest's grants and `limits`, log lines going to
    /// `sink` and `cancel` stopping it; returns its result and the fuel it burned.
    fn run_call<T>(
        &self,
        manifest: &Manifest,
        limits: CallLimits,
        sink: Option<EventSinkBox>,
        cancel: Option<Arc<AtomicBool>>,
        f: impl FnOnce(&mut Store<CallState>) -> wasmtime::Result<T>,
    ) -> (Result<T, CallFailure>, u64) {
        let mut wasi = WasiCtxBuilder::new();
        for grant in &manifest.read_dirs {
            if let Err(e) = wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly) {
                return (
                    Err(CallFailure::Other(format!(
                        "cannot grant {}: {e}",
                        grant.host.display()
                    ))),
                    0,
                );
            }
        }
        let state = CallState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                refused: false,
            },
            sink,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if let Err(e) = store.set_fuel(limits.fuel) {
            return (Err(CallFailure::Other(format!("cannot set fuel: {e}"))), 0);
        }
        // Checked at every epoch tick: the wall-clock deadline and a cancel.
        let deadline = std::time::Instant::now() + limits.timeout;
        let stop = cancel.clone();
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            let cancelled = stop.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
            if cancelled || std::time::Instant::now() >= deadline {
                Err(Trap::Interrupt.into())
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }
        });
        let result = f(&mut store);
        let burned = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let result = result.map_err(|error| {
            if store.data().limiter.refused {
                CallFailure::Memory
            } else {
                match error.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => CallFailure::Fuel,
                    Some(Trap::Interrupt) => {
                        if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                            CallFailure::Cancelled
                        } else {
                            CallFailure::Deadline
                        }
                    }
                    Some(trap) => CallFailure::Trap(trap.to_string()),
                    None => {
                        CallFailure::Other(format!("component call failed: {}", first_line(&error)))
                    }
                }
            }
        });
        (result, burned)
    }
}

/// A component plugin of either kind.
pub enum LoadedComponent {
    Resolver(ResolverComponent),
    Backend(BackendComponent),
}

/// A loaded backend component: runs each execution on a fresh instance, on its own thread.
pub struct BackendComponent {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    pub backends: Vec<String>,
    pub manifest: Manifest,
    host: ComponentHost,
    pre: backend_bindings::BackendPre<CallState>,
}

/// One execution of a backend component.
pub struct ComponentExecution {
    slot: Arc<OutcomeSlot>,
    cancel: Arc<AtomicBool>,
}

impl PluginExecution for ComponentExecution {
    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    fn wait(&self) -> ExecOutcome {
        self.slot.wait()
    }
}

impl PluginBackend for BackendComponent {
    type Execution = ComponentExecution;

    fn start(
        &self,
        request: ExecRequest,
        sink: EventSinkBox,
    ) -> Result<ComponentExecution, String> {
        let manifest = &self.manifest;
        let ceiling = CallLimits::of(manifest);
        // The job's limits, under the operator's ceiling.
        let limits = CallLimits {
            fuel: match request.limits.fuel_limit {
                0 => ceiling.fuel,
                asked => asked.min(ceiling.fuel),
            },
            memory_bytes: match usize::try_from(request.limits.memory_limit_bytes) {
                Ok(0) | Err(_) => ceiling.memory_bytes,
                Ok(asked) => asked.min(ceiling.memory_bytes),
            },
            timeout: Duration::from_millis(request.limits.wall_timeout_ms).min(ceiling.timeout),
        };
        let wit_request = backend_bindings::rhizos::plugin::types::ExecRequest {
            execution_id: request.execution_id.to_string(),
            workload: request.workload.to_vec(),
            args: request.args.iter().map(|a| a.to_string()).collect(),
            env: request
                .env
                .iter()
                .map(|pair| (pair.0.to_string(), pair.1.to_string()))
                .collect(),
            stdin: request.stdin.to_vec(),
            wall_timeout_ms: limits.timeout.as_millis() as u64,
            memory_limit_bytes: limits.memory_bytes as u64,
        };
        let slot = Arc::new(OutcomeSlot::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let (host, pre, manifest) = (self.host.clone(), self.pre.clone(), manifest.clone());
        let (task_slot, task_cancel) = (slot.clone(), cancel.clone());
        std::thread::Builder::new()
            .name(format!("rhizos-component-{}", self.name))
            .spawn(move || {
                let started = std::time::Instant::now();
                let config = manifest.config.to_string();
                let (result, burned) =
                    host.run_call(&manifest, limits, Some(sink), Some(task_cancel), |store| {
                        let bindings = pre.instantiate(&mut *store)?;
                        if let Err(message) = bindings.call_configure(&mut *store, &config)? {
                            return Ok(backend_bindings::rhizos::plugin::types::ExecEnd::Rejected(
                                format!("configure: {message}"),
                            ));
                        }
                        bindings.call_run(store, &wit_request)
                    });
                let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                use backend_bindings::rhizos::plugin::types::ExecEnd;
                let outcome = match result {
                    Ok(ExecEnd::Exited(code)) => ExecOutcome::exited(code, elapsed),
                    Ok(ExecEnd::TimedOut(m)) => {
                        ExecOutcome::abnormal(ExitKind::TimedOut, m, elapsed)
                    }
                    Ok(ExecEnd::MemoryExceeded(m)) => {
                        ExecOutcome::abnormal(ExitKind::MemoryExceeded, m, elapsed)
                    }
                    Ok(ExecEnd::Crashed(m)) => ExecOutcome::abnormal(ExitKind::Crashed, m, elapsed),
                    Ok(ExecEnd::Rejected(m)) => {
                        ExecOutcome::abnormal(ExitKind::Rejected, m, elapsed)
                    }
                    Err(CallFailure::Memory) => ExecOutcome::abnormal(
                        ExitKind::MemoryExceeded,
                        format!(
                            "memory limit exceeded: the limit is {} MiB",
                            limits.memory_bytes >> 20
                        ),
                        elapsed,
                    ),
                    Err(CallFailure::Fuel) => ExecOutcome::abnormal(
                        ExitKind::FuelExhausted,
                        format!("fuel limit of {} units exhausted", limits.fuel),
                        elapsed,
                    ),
                    Err(CallFailure::Deadline) => ExecOutcome::abnormal(
                        ExitKind::TimedOut,
                        format!(
                            "wall-clock deadline of {} ms exceeded",
                            limits.timeout.as_millis()
                        ),
                        elapsed,
                    ),
                    Err(CallFailure::Cancelled) => {
                        ExecOutcome::abnormal(ExitKind::Cancelled, "cancelled", elapsed)
                    }
                    Err(CallFailure::Trap(trap)) => ExecOutcome::abnormal(
                        ExitKind::Crashed,
                        format!("component trapped: {trap}"),
                        elapsed,
                    ),
                    Err(CallFailure::Other(message)) => {
                        ExecOutcome::abnormal(ExitKind::Rejected, message, elapsed)
                    }
                };
                // Fuel is reported like the wasm backend's: what the job burned.
                task_slot.set(outcome.with_fuel(burned));
            })
            .map_err(|e| format!("cannot start a thread for the execution: {e}"))?;
        Ok(ComponentExecution { slot, cancel })
    }
}

impl backend_bindings::BackendImports for CallState {
    fn log(&mut self, stream: backend_bindings::rhizos::plugin::types::LogStream, line: String) {
        if let Some(sink) = &self.sink {
            let stream = match stream {
                backend_bindings::rhizos::plugin::types::LogStream::Stdout => LogStream::Stdout,
                backend_bindings::rhizos::plugin::types::LogStream::Stderr => LogStream::Stderr,
            };
            sink.log(stream, line.as_str().into());
        }
    }
}

impl backend_bindings::rhizos::plugin::types::Host for CallState {}

fn first_line(error: &wasmtime::Error) -> String {
    format!("{error:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
