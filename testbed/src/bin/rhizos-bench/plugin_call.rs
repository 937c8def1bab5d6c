//! `plugin-call` and `wasm-instantiate`: the cost of a call across the stable-ABI plugin
//! boundary (and a whole start + wait), of a call into a component, and of instantiating a cached
//! WASM module the way an execution does.

use crate::report;
use serde::Serialize;
use std::fmt;
use std::time::{Duration, Instant};

/// An event sink that drops every line.
struct NullSink;

impl rhizos_plugin_api::EventSink for NullSink {
    fn log(&self, _stream: rhizos_plugin_api::LogStream, _line: abi_stable::std_types::RStr<'_>) {}
    fn chunk(&self, _data: abi_stable::std_types::RSlice<'_, u8>) {}
}

fn null_sink() -> rhizos_plugin_api::EventSinkBox {
    rhizos_plugin_api::EventSink_TO::from_value(NullSink, abi_stable::sabi_trait::TD_Opaque)
}

fn per_call_ns(total: Duration, calls: usize) -> f64 {
    total.as_secs_f64() * 1e9 / calls.max(1) as f64
}

#[derive(Serialize)]
pub struct PluginCallReport {
    bench: &'static str,
    build: &'static str,
    abi_stable_call_ns: f64,
    abi_stable_start_wait_ns: f64,
    component_call_ns: f64,
    component_raw_call_ns: f64,
    calls: usize,
    #[serde(skip)]
    start_wait_cycles: usize,
    #[serde(skip)]
    component_calls: usize,
}

impl fmt::Display for PluginCallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stable-ABI plugin calls (testkit plugin, {} build):",
            self.build
        )?;
        writeln!(
            f,
            "  one call (Execution::cancel)          {:>10.1} ns  over {} calls",
            self.abi_stable_call_ns, self.calls
        )?;
        writeln!(
            f,
            "  start + wait of an ended execution    {:>10.1} ns  over {} cycles",
            self.abi_stable_start_wait_ns, self.start_wait_cycles
        )?;
        writeln!(
            f,
            "  component call (new instance + call)  {:>10.1} ns  over {} calls",
            self.component_call_ns, self.component_calls
        )?;
        writeln!(
            f,
            "  component call on one instance        {:>10.1} ns  over {} calls",
            self.component_raw_call_ns, self.calls
        )
    }
}

fn testkit_request() -> rhizos_plugin_api::ExecRequest {
    rhizos_plugin_api::ExecRequest {
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
            disk_limit_bytes: 0,
        },
        input_files: Default::default(),
        gpu_devices: Default::default(),
    }
}

pub fn plugin_call(calls: usize) -> anyhow::Result<PluginCallReport> {
    use abi_stable::std_types::RResult;
    anyhow::ensure!(calls > 0, "--calls must be at least 1");
    let file = rhizos_testbed::plugin_file("rhizos_fixture_plugin_testkit")?;
    let plugin = rhizos_core::agent::plugins::load_file(&file).map_err(anyhow::Error::msg)?;
    let execution = match plugin.backend.start(testkit_request(), null_sink()) {
        RResult::ROk(execution) => execution,
        RResult::RErr(e) => anyhow::bail!("testkit refused: {e}"),
    };
    let started = Instant::now();
    for _ in 0..calls {
        execution.cancel();
    }
    let abi_stable_call_ns = per_call_ns(started.elapsed(), calls);
    let start_wait_cycles = (calls / 10).max(1);
    let started = Instant::now();
    for _ in 0..start_wait_cycles {
        let RResult::ROk(execution) = plugin.backend.start(testkit_request(), null_sink()) else {
            anyhow::bail!("testkit refused");
        };
        std::hint::black_box(execution.wait());
    }
    let abi_stable_start_wait_ns = per_call_ns(started.elapsed(), start_wait_cycles);
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
    let component_call_ns = per_call_ns(started.elapsed(), component_calls);
    let started = Instant::now();
    resolver
        .describe_calls_on_one_instance(calls)
        .map_err(anyhow::Error::msg)?;
    let component_raw_call_ns = per_call_ns(started.elapsed(), calls);
    Ok(PluginCallReport {
        bench: "plugin-call",
        build: report::build(),
        abi_stable_call_ns,
        abi_stable_start_wait_ns,
        component_call_ns,
        component_raw_call_ns,
        calls,
        start_wait_cycles,
        component_calls,
    })
}

/// Instantiation time quantiles, µs.
#[derive(Serialize)]
struct Micros {
    p50: f64,
    p90: f64,
    p99: f64,
    min: f64,
}

#[derive(Serialize)]
pub struct InstantiateReport {
    bench: &'static str,
    build: &'static str,
    module_bytes: usize,
    iterations: usize,
    instantiate_us: Micros,
}

impl fmt::Display for InstantiateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = &self.instantiate_us;
        writeln!(
            f,
            "instantiating the cached demo module ({} bytes; pooling allocator; {} build):",
            self.module_bytes, self.build
        )?;
        writeln!(
            f,
            "  p50 {:.1} µs  p90 {:.1} µs  p99 {:.1} µs  min {:.1} µs  over {}",
            us.p50, us.p90, us.p99, us.min, self.iterations
        )
    }
}

pub fn wasm_instantiate(iterations: usize) -> anyhow::Result<InstantiateReport> {
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
    Ok(InstantiateReport {
        bench: "wasm-instantiate",
        build: report::build(),
        module_bytes: module.len(),
        iterations,
        instantiate_us: Micros {
            p50: us(0.5),
            p90: us(0.9),
            p99: us(0.99),
            min: us(0.0),
        },
    })
}
