//! Helpers that keep a plugin short and safe: plain-Rust traits ([`PluginBackend`],
//! [`PluginExecution`]) with an export macro ([`crate::export_backend_plugin!`]) that contains
//! every panic at the FFI boundary, splitting raw output into log lines, and a completion slot
//! for [`crate::Execution::wait`].
//!
//! A whole backend plugin with the SDK (this compiles as a `cdylib`):
//!
//! ```
//! use rhizos_plugin_api::sdk::{PluginBackend, PluginExecution};
//! use rhizos_plugin_api::{EventSinkBox, ExecOutcome, ExecRequest, LogStream};
//!
//! struct Echo;
//! struct Done(ExecOutcome);
//!
//! impl PluginBackend for Echo {
//!     type Execution = Done;
//!     fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<Done, String> {
//!         let text = String::from_utf8(request.workload.to_vec()).map_err(|e| e.to_string())?;
//!         sink.log(LogStream::Stdout, text.as_str().into());
//!         Ok(Done(ExecOutcome::exited(0, 0)))
//!     }
//! }
//!
//! impl PluginExecution for Done {
//!     fn cancel(&self) {}
//!     fn wait(&self) -> ExecOutcome {
//!         self.0.clone()
//!     }
//! }
//!
//! fn new_echo(_config: &str) -> Result<Echo, String> {
//!     Ok(Echo)
//! }
//!
//! rhizos_plugin_api::export_backend_plugin! {
//!     name: "echo",
//!     backends: ["echo"],
//!     new: new_echo,
//! }
//! ```

use crate::{
    Backend, Backend_TO, BackendBox, EventSinkBox, ExecOutcome, ExecRequest, Execution,
    Execution_TO, ExecutionBox, ExitKind, LogStream, ModelInfo, Resolver, Resolver_TO, ResolverBox,
};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RErr, ROk, ROption, RResult, RStr, RString};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Condvar, Mutex, PoisonError};

/// Runs `body`, turning a panic into `Err` instead of letting it unwind across `extern "C"`
/// (which would abort the whole agent).
pub fn catch_panic<T>(
    what: &str,
    body: impl FnOnce() -> RResult<T, RString>,
) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => RErr(RString::from(format!(
            "plugin panicked in {what}: {}",
            panic_message(&*payload)
        ))),
    }
}

/// Runs `body`; a panic becomes a `BackendFailed` outcome saying so (for
/// [`crate::Execution::wait`]): the plugin failed, not the workload.
pub fn catch_panic_outcome(what: &str, body: impl FnOnce() -> ExecOutcome) -> ExecOutcome {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(outcome) => outcome,
        Err(payload) => ExecOutcome::abnormal(
            ExitKind::BackendFailed,
            format!("plugin panicked in {what}: {}", panic_message(&*payload)),
            0,
        ),
    }
}

/// An execution backend in plain Rust. [`crate::export_backend_plugin!`] exports it with every
/// call made panic-safe: a panic in `start` refuses that execution, one in `wait` ends it as
/// `BackendFailed`, one in `cancel` is logged and ignored — the agent keeps running.
pub trait PluginBackend: Send + Sync + 'static {
    type Execution: PluginExecution;
    /// Starts one execution and returns at once; `Err` refuses it (nothing ran).
    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> Result<Self::Execution, String>;

    /// Why this backend can run nothing here (no driver, no engine…); `None` (the default) when
    /// it offers everything it was exported with.
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// The models this backend serves now; empty (the default) for backends that run
    /// workloads. Must return quickly.
    fn models(&self) -> Vec<ModelInfo> {
        Vec::new()
    }
}

/// One running execution of a [`PluginBackend`].
pub trait PluginExecution: Send + Sync + 'static {
    /// Asks the execution to stop; must not block.
    fn cancel(&self);
    /// Blocks until the end; every log line has reached the sink before this returns.
    fn wait(&self) -> ExecOutcome;
}

/// Wraps a [`PluginBackend`] as the stable-ABI [`BackendBox`] (used by the export macro).
pub fn backend_box<B: PluginBackend>(backend: B) -> BackendBox {
    Backend_TO::from_value(Contained(backend), TD_Opaque)
}

struct Contained<T>(T);

impl<B: PluginBackend> Backend for Contained<B> {
    fn start(&self, request: ExecRequest, sink: EventSinkBox) -> RResult<ExecutionBox, RString> {
        catch_panic("start", || match self.0.start(request, sink) {
            Ok(execution) => ROk(Execution_TO::from_value(Contained(execution), TD_Opaque)),
            Err(message) => RErr(RString::from(message)),
        })
    }

    fn unavailable(&self) -> ROption<RString> {
        match catch_unwind(AssertUnwindSafe(|| self.0.unavailable())) {
            Ok(reason) => reason.map(RString::from).into(),
            Err(payload) => ROption::RSome(RString::from(format!(
                "plugin panicked in unavailable: {}",
                panic_message(&*payload)
            ))),
        }
    }

    fn models(&self) -> abi_stable::std_types::RVec<ModelInfo> {
        match catch_unwind(AssertUnwindSafe(|| self.0.models())) {
            Ok(models) => models.into(),
            Err(payload) => {
                eprintln!(
                    "rhizos plugin: panic in models (offering none): {}",
                    panic_message(&*payload)
                );
                abi_stable::std_types::RVec::new()
            }
        }
    }
}

impl<E: PluginExecution> Execution for Contained<E> {
    fn cancel(&self) {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.0.cancel())) {
            eprintln!(
                "rhizos plugin: panic in cancel ignored: {}",
                panic_message(&*payload)
            );
        }
    }

    fn wait(&self) -> ExecOutcome {
        catch_panic_outcome("wait", || self.0.wait())
    }
}

/// A module resolver in plain Rust; [`crate::export_resolver_plugin!`] exports it with
/// panics contained (a panic becomes that resolution's error).
pub trait PluginResolver: Send + Sync + 'static {
    /// The manifest (JSON text) of `id` at `version` (latest when `None`); `Ok(None)` when
    /// unknown here.
    fn resolve(&self, id: &str, version: Option<&str>) -> Result<Option<String>, String>;

    /// Every module known here, as manifests (every version); `Ok(None)` (the default) when
    /// the registry cannot be enumerated.
    fn list(&self) -> Result<Option<Vec<String>>, String> {
        Ok(None)
    }
}

/// Wraps a [`PluginResolver`] as the stable-ABI [`ResolverBox`] (used by the export macro).
pub fn resolver_box<R: PluginResolver>(resolver: R) -> ResolverBox {
    Resolver_TO::from_value(Contained(resolver), TD_Opaque)
}

impl<R: PluginResolver> Resolver for Contained<R> {
    fn resolve(
        &self,
        id: RStr<'_>,
        version: ROption<RStr<'_>>,
    ) -> RResult<ROption<RString>, RString> {
        catch_panic("resolve", || {
            match self
                .0
                .resolve(id.as_str(), version.map(|v| v.as_str()).into_option())
            {
                Ok(found) => ROk(found.map(RString::from).into()),
                Err(message) => RErr(RString::from(message)),
            }
        })
    }

    fn list(&self) -> RResult<ROption<abi_stable::std_types::RVec<RString>>, RString> {
        catch_panic("list", || match self.0.list() {
            Ok(found) => ROk(found
                .map(|all| all.into_iter().map(RString::from).collect())
                .into()),
            Err(message) => RErr(RString::from(message)),
        })
    }
}

/// Exports a [`PluginResolver`] as this library's RhizOS root module: `name`, and `new`, a
/// `fn(&str) -> Result<impl PluginResolver, impl Display>` given the plugin's JSON config.
#[macro_export]
macro_rules! export_resolver_plugin {
    (name: $name:expr, new: $new:path $(,)?) => {
        /// The RhizOS root module of this plugin.
        #[::abi_stable::export_root_module]
        pub fn get_library() -> $crate::ResolverPluginRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait as _;
            $crate::ResolverPlugin {
                describe: __rhizos_describe,
                new_resolver: __rhizos_new_resolver,
            }
            .leak_into_prefix()
        }

        #[::abi_stable::sabi_extern_fn]
        fn __rhizos_describe() -> $crate::PluginInfo {
            $crate::PluginInfo {
                name: ::abi_stable::std_types::RString::from($name),
                version: ::abi_stable::std_types::RString::from(env!("CARGO_PKG_VERSION")),
                kind: $crate::PluginKind::Resolver,
                backends: ::abi_stable::std_types::RVec::new(),
            }
        }

        #[::abi_stable::sabi_extern_fn]
        fn __rhizos_new_resolver(
            config: ::abi_stable::std_types::RStr<'_>,
        ) -> ::abi_stable::std_types::RResult<$crate::ResolverBox, ::abi_stable::std_types::RString>
        {
            $crate::sdk::catch_panic("new_resolver", || match $new(config.as_str()) {
                Ok(resolver) => ::abi_stable::std_types::ROk($crate::sdk::resolver_box(resolver)),
                Err(e) => ::abi_stable::std_types::RErr(::abi_stable::std_types::RString::from(
                    e.to_string(),
                )),
            })
        }
    };
}

/// Exports a [`PluginBackend`] as this library's RhizOS root module.
///
/// `name` is the plugin's unique name, `backends` the job backends it runs, and either `new`, a
/// `fn(&str) -> Result<impl PluginBackend, impl Display>` that gets the plugin's JSON config
/// (`{}` when none), or `new_with_host`, a `fn(&str, &HostContext) -> Result<…>` that also
/// learns which node it serves. The plugin's version is its crate version.
#[macro_export]
macro_rules! export_backend_plugin {
    (name: $name:expr, backends: [$($backend:expr),* $(,)?], new: $new:path $(,)?) => {
        $crate::export_backend_plugin! {
            @export $name, [$($backend),*],
            |config: &str, _host: &$crate::HostContext| $new(config)
        }
    };
    (name: $name:expr, backends: [$($backend:expr),* $(,)?], new_with_host: $new:path $(,)?) => {
        $crate::export_backend_plugin! {
            @export $name, [$($backend),*],
            |config: &str, host: &$crate::HostContext| $new(config, host)
        }
    };
    (@export $name:expr, [$($backend:expr),*], $new:expr) => {
        /// The RhizOS root module of this plugin.
        #[::abi_stable::export_root_module]
        pub fn get_library() -> $crate::BackendPluginRef {
            use ::abi_stable::prefix_type::PrefixTypeTrait as _;
            $crate::BackendPlugin {
                describe: __rhizos_describe,
                new_backend: __rhizos_new_backend,
            }
            .leak_into_prefix()
        }

        #[::abi_stable::sabi_extern_fn]
        fn __rhizos_describe() -> $crate::PluginInfo {
            $crate::PluginInfo {
                name: ::abi_stable::std_types::RString::from($name),
                version: ::abi_stable::std_types::RString::from(env!("CARGO_PKG_VERSION")),
                kind: $crate::PluginKind::Backend,
                backends: ::abi_stable::std_types::RVec::from(vec![
                    $(::abi_stable::std_types::RString::from($backend)),*
                ]),
            }
        }

        #[::abi_stable::sabi_extern_fn]
        fn __rhizos_new_backend(
            config: ::abi_stable::std_types::RStr<'_>,
            host: &$crate::HostContext,
        ) -> ::abi_stable::std_types::RResult<$crate::BackendBox, ::abi_stable::std_types::RString> {
            $crate::sdk::catch_panic("new_backend", || match ($new)(config.as_str(), host) {
                Ok(backend) => ::abi_stable::std_types::ROk($crate::sdk::backend_box(backend)),
                Err(e) => ::abi_stable::std_types::RErr(::abi_stable::std_types::RString::from(e.to_string())),
            })
        }
    };
}

/// The text of a panic payload, when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Longest line handed to the sink; longer lines are split (a workload printing megabytes
/// without a newline must not hold them all in memory).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Cuts a byte stream into lines and gives each complete line to the sink.
pub struct LineSplitter {
    stream: LogStream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: LogStream) -> Self {
        Self {
            stream,
            pending: Vec::new(),
        }
    }

    /// Feeds bytes; emits every line they complete.
    pub fn push(&mut self, sink: &EventSinkBox, mut bytes: &[u8]) {
        while let Some(pos) = bytes.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&bytes[..pos]);
            self.emit(sink);
            bytes = &bytes[pos + 1..];
        }
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= MAX_LINE_BYTES {
            let rest = self.pending.split_off(MAX_LINE_BYTES);
            self.emit(sink);
            self.pending = rest;
        }
    }

    /// Emits a last line that had no newline.
    pub fn finish(&mut self, sink: &EventSinkBox) {
        if !self.pending.is_empty() {
            self.emit(sink);
        }
    }

    fn emit(&mut self, sink: &EventSinkBox) {
        let mut line = String::from_utf8_lossy(&self.pending).into_owned();
        if line.ends_with('\r') {
            line.pop();
        }
        sink.log(self.stream, line.as_str().into());
        self.pending.clear();
    }
}

/// An execution that runs on a thread of its own (a request to a server, a child process): a
/// cancel flag it watches and the slot its outcome goes into. [`ThreadExecution::spawn`] starts
/// it; `cancel` sets the flag, `wait` blocks on the slot. A panic in `body` becomes a
/// `BackendFailed` outcome.
pub struct ThreadExecution {
    slot: std::sync::Arc<OutcomeSlot>,
    cancelled: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ThreadExecution {
    /// Runs `body` on a thread named `name`; it gets the cancel flag to watch.
    pub fn spawn(
        name: String,
        body: impl FnOnce(&std::sync::atomic::AtomicBool) -> ExecOutcome + Send + 'static,
    ) -> Result<Self, String> {
        let execution = Self {
            slot: std::sync::Arc::new(OutcomeSlot::default()),
            cancelled: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let (slot, cancelled) = (execution.slot.clone(), execution.cancelled.clone());
        std::thread::Builder::new()
            .name(name)
            .spawn(move || slot.set(catch_panic_outcome("the execution", || body(&cancelled))))
            .map_err(|e| format!("cannot start the execution's thread: {e}"))?;
        Ok(execution)
    }
}

impl PluginExecution for ThreadExecution {
    fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn wait(&self) -> ExecOutcome {
        self.slot.wait()
    }
}

/// A one-shot slot an execution thread fills and [`crate::Execution::wait`] blocks on.
#[derive(Default)]
pub struct OutcomeSlot {
    outcome: Mutex<Option<ExecOutcome>>,
    ready: Condvar,
}

impl OutcomeSlot {
    pub fn set(&self, outcome: ExecOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.ready.notify_all();
    }

    pub fn wait(&self) -> ExecOutcome {
        let mut slot = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = slot.as_ref() {
                return outcome.clone();
            }
            slot = self
                .ready
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl ExecOutcome {
    /// The same outcome with the units a metered service counted.
    pub fn with_usage(mut self, input_units: u64, output_units: u64) -> Self {
        self.usage = ROption::RSome(crate::Metered {
            input_units,
            output_units,
        });
        self
    }

    /// The same outcome with the fuel it consumed.
    pub fn with_fuel(mut self, fuel_consumed: u64) -> Self {
        self.fuel_consumed = fuel_consumed;
        self
    }

    pub fn exited(exit_code: i32, elapsed_ms: u64) -> Self {
        Self {
            kind: ExitKind::Exited,
            exit_code,
            message: RString::new(),
            elapsed_ms,
            fuel_consumed: 0,
            output_files: abi_stable::std_types::RVec::new(),
            usage: ROption::RNone,
        }
    }

    pub fn abnormal(kind: ExitKind, message: impl Into<String>, elapsed_ms: u64) -> Self {
        Self {
            kind,
            exit_code: -1,
            message: RString::from(message.into()),
            elapsed_ms,
            fuel_consumed: 0,
            output_files: abi_stable::std_types::RVec::new(),
            usage: ROption::RNone,
        }
    }
}
