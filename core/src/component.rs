//! Plugins as WebAssembly components (`<name>.wasm` + `<name>.json`), hosted with wasmtime's
//! component model against the WIT worlds in `plugin-api/wit/plugin.wit`.
//!
//! **Nothing ambient.** A component gets exactly what its manifest grants: the directories it
//! may read (preopened read-only at the guest path the manifest names), no environment, no
//! network, no host files beyond those. **Every call is bounded**: a fresh instance per call
//! with the manifest's fuel, memory and wall-clock limits, so calls share no state and a
//! runaway guest ends with an exact reason instead of hanging or growing the agent.
//!
//! Resolver components are supported (issue: module registry); the `backend` world is
//! specified in the WIT but not hosted yet.

use serde::Deserialize;
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

use bindings::rhizos::plugin::types::PluginKind as WitKind;

/// The WIT package version components are checked against.
pub const WIT_VERSION: &str = "rhizos:plugin@0.1.0";

/// Largest memory a component call may be granted (the size of a pooled memory slot).
pub const MAX_MEMORY_MIB: u64 = 1024;

/// How often the epoch advances: the granularity of per-call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The manifest beside a component: its capabilities and limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Directories the component may read: `host` (relative to the plugin directory, or
    /// absolute) appears read-only at `guest`.
    #[serde(default)]
    pub read_dirs: Vec<DirGrant>,
    /// Fuel (deterministic work units) for one call.
    #[serde(default = "default_fuel")]
    pub fuel_per_call: u64,
    /// Memory one call may use, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Wall-clock limit of one call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Given to the component's `configure` before each call.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
}

fn default_fuel() -> u64 {
    500_000_000
}
fn default_memory_mib() -> u64 {
    64
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

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
    let mut manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("manifest {}: {e}", path.display()))?;
    if manifest.memory_mib == 0 || manifest.timeout_ms == 0 || manifest.fuel_per_call == 0 {
        return Err(format!(
            "manifest {}: fuel_per_call, memory_mib and timeout_ms must be > 0",
            path.display()
        ));
    }
    if manifest.memory_mib > MAX_MEMORY_MIB {
        return Err(format!(
            "manifest {}: memory_mib is at most {MAX_MEMORY_MIB}, got {}",
            path.display(),
            manifest.memory_mib
        ));
    }
    for grant in &mut manifest.read_dirs {
        if grant.host.is_relative() {
            grant.host = base.join(&grant.host);
        }
        if !grant.host.is_dir() {
            return Err(format!(
                "manifest {}: read_dirs: {} is not a directory",
                path.display(),
                grant.host.display()
            ));
        }
        if !grant.guest.starts_with('/') {
            return Err(format!(
                "manifest {}: read_dirs: guest path {:?} must be absolute",
                path.display(),
                grant.guest
            ));
        }
    }
    Ok(manifest)
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

    /// Compiles `file` and checks it is a resolver component by asking it to describe itself
    /// (within its manifest's limits).
    pub fn load_resolver(
        &self,
        file: &Path,
        manifest: Manifest,
    ) -> Result<ResolverComponent, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
        let component = Component::from_binary(&self.engine, &bytes)
            .map_err(|e| format!("not a WebAssembly component: {}", first_line(&e)))?;
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
                "component {} is a backend, and backend components are not hosted yet",
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
        let mut wasi = WasiCtxBuilder::new();
        for grant in &manifest.read_dirs {
            wasi.preopened_dir(&grant.host, &grant.guest, FsPerms::ReadOnly)
                .map_err(|e| format!("cannot grant {}: {e}", grant.host.display()))?;
        }
        let state = CallState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: usize::try_from(manifest.memory_mib << 20).unwrap_or(usize::MAX),
                refused: false,
            },
        };
        let mut store = Store::new(&self.host.engine, state);
        store.limiter(|state| &mut state.limiter);
        store
            .set_fuel(manifest.fuel_per_call)
            .map_err(|e| format!("cannot set fuel: {e}"))?;
        store.set_epoch_deadline(
            manifest
                .timeout_ms
                .div_ceil(EPOCH_TICK.as_millis() as u64)
                .max(1),
        );
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|bindings| f(&bindings, &mut store));
        result.map_err(|error| {
            if store.data().limiter.refused {
                format!(
                    "memory limit of {} MiB per call exceeded",
                    manifest.memory_mib
                )
            } else {
                match error.downcast_ref::<Trap>() {
                    Some(Trap::OutOfFuel) => format!(
                        "fuel limit of {} units per call exhausted",
                        manifest.fuel_per_call
                    ),
                    Some(Trap::Interrupt) => {
                        format!("call exceeded its time limit of {} ms", manifest.timeout_ms)
                    }
                    Some(trap) => format!("component trapped: {trap}"),
                    None => format!("component call failed: {}", first_line(&error)),
                }
            }
        })
    }
}

fn first_line(error: &wasmtime::Error) -> String {
    format!("{error:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}
