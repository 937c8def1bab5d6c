//! The RhizOS Docker execution backend: runs a job as a sandboxed container on the node's own
//! Docker engine, through bollard.
//!
//! What a job gets (see [`config::Config`] for what the node operator sets):
//! * a container named `rhizos-<job>-<attempt>`, labelled with the node (`rhizos.node`) and the
//!   agent process (`rhizos.agent`), created from an image in the local store (pulled, with
//!   progress lines on the job's stderr, only when pulling is enabled and a registry answers);
//! * memory limit = the job's memory (no swap), CPU quota = its cores, a pids limit, every
//!   capability dropped, `no-new-privileges`, not privileged, no network unless the job asks and
//!   the node allows it, an unprivileged user (65534) by default, optionally a read-only root;
//! * the job's input files copied into `/input` (read-only to the workload), an empty writable
//!   `/output` whose files are copied out when it ends;
//! * its stdout/stderr streamed line by line while it runs; stdin written then closed;
//! * the allocated GPUs as an NVIDIA device request, when the engine has the NVIDIA runtime.
//!
//! The container is removed whatever the end (exit, timeout, cancel, an engine error), and
//! containers left by an earlier agent process of the same node (a crash, `kill -9`) are removed
//! when the plugin starts.
//!
//! The workload bytes of an [`rhizos_plugin_api::ExecRequest`] are the job's workload as JSON:
//! `{"backend":"docker","image":"…","entrypoint":["…"],"workdir":"/…","network":false}`.
#![allow(unsafe_code)] // `export_root_module` expands to an exported `extern "C"` symbol.

pub mod config;
mod engine;
mod files;

pub use engine::DockerBackend;

rhizos_plugin_api::export_backend_plugin! {
    name: "docker",
    backends: ["docker"],
    new_with_host: engine::DockerBackend::new,
}
