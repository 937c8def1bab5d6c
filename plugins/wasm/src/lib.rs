//! The `wasm` execution backend: runs WASI preview1 command modules and WASI preview2 command
//! components (`wasi:cli/run`) with wasmtime.
//!
//! Each execution gets its own `Store` with the job's args, env and stdin; stdout and stderr are
//! cut into lines and handed to the host's sink as they are written. Limits: a wall-clock deadline
//! (epoch interruption for guest code, plus a timer that also stops a guest blocked in a host call
//! such as `sleep`) and a memory limit (a `ResourceLimiter` that refuses growth past it).
//!
//! The plugin owns its tokio runtime (tokio does not cross the ABI boundary) and an epoch ticker
//! thread; compiled modules are cached by content so a repeated job does not compile again.
#![allow(unsafe_code)] // `export_root_module` expands to the exported `extern "C"` symbol.

#[doc(hidden)]
pub mod exec;

use abi_stable::{
    export_root_module,
    prefix_type::PrefixTypeTrait,
    sabi_extern_fn,
    sabi_trait::TD_Opaque,
    std_types::{RErr, ROk, RResult, RStr, RString, RVec},
};
use rhizos_plugin_api::{
    Backend, Backend_TO, BackendBox, BackendPlugin, BackendPluginRef, EventSinkBox, ExecRequest,
    ExecutionBox, HostContext, PluginInfo, PluginKind, sdk::catch_panic,
};

/// Exported root module: what the agent finds when it loads this library.
#[export_root_module]
pub fn get_library() -> BackendPluginRef {
    BackendPlugin {
        describe,
        new_backend,
    }
    .leak_into_prefix()
}

#[sabi_extern_fn]
fn describe() -> PluginInfo {
    PluginInfo {
        name: RString::from("wasm"),
        version: RString::from(env!("CARGO_PKG_VERSION")),
        kind: PluginKind::Backend,
        backends: RVec::from(vec![RString::from("wasm")]),
    }
}

#[sabi_extern_fn]
fn new_backend(config: RStr<'_>, _host: &HostContext) -> RResult<BackendBox, RString> {
    catch_panic("new_backend", || {
        let config = config.as_str().trim();
        if !(config.is_empty() || config == "{}") {
            return RErr(RString::from(format!(
                "the wasm backend takes no options, got {config}; remove [plugins.wasm] from the agent config"
            )));
        }
        match exec::WasmBackend::new() {
            Ok(backend) => ROk(Backend_TO::from_value(backend, TD_Opaque)),
            Err(e) => RErr(RString::from(format!(
                "cannot start the wasm backend: {e:#}"
            ))),
        }
    })
}

impl Backend for exec::WasmBackend {
    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> RResult<ExecutionBox, RString> {
        catch_panic("start", || ROk(self.spawn(request, sink)))
    }

    fn unavailable(&self) -> abi_stable::std_types::ROption<RString> {
        abi_stable::std_types::ROption::RNone
    }

    fn models(&self) -> abi_stable::std_types::RVec<rhizos_plugin_api::ModelInfo> {
        abi_stable::std_types::RVec::new()
    }
}
