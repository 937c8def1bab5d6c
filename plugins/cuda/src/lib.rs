//! The RhizOS CUDA execution backend: runs a job's native program on whole GPUs.
//!
//! * Detection through NVML (nvml-wrapper): name, UUID, VRAM total/free, compute capability,
//!   driver and CUDA version, logged when the plugin starts. Without a driver the plugin still
//!   loads, offers nothing and says why ("no NVIDIA driver (NVML: …)"), so the node's
//!   `plugins list` / `node info` tell the operator.
//! * A job gets the GPUs the agent leased it and no others: `CUDA_VISIBLE_DEVICES` and
//!   `NVIDIA_VISIBLE_DEVICES` name their UUIDs. Its program (the workload bytes) runs in a
//!   private directory (`input/` read-only with the job's files, `output/` collected), with a
//!   clean environment, under a uid of its own and in a cgroup of its own (`sandbox`; or, with
//!   `isolation = "none"`, as the agent's user in a process group).
//! * VRAM: every `watch_interval_ms` the plugin sums, per GPU, the memory NVML reports for the
//!   job's processes; over the job's limit (`vram_limit_bytes`, what it asked per GPU) the whole
//!   group is killed and the job ends "VRAM limit exceeded". Peak VRAM and GPU-seconds are
//!   reported on the job's stderr at its end (billing counts GPUs × measured time).
//! * Timeout, cancel and the end of the program kill the whole cgroup: a `setsid` and a fork
//!   do not outlive the job.
//!
//! Native programs share the machine's kernel and file system (read-only where not theirs): the
//! operator turns them on with `[agent.plugins.cuda] allow_native = true`; GPU containers go
//! through the docker backend.
#![allow(unsafe_code)] // `export_root_module` expands to an exported `extern "C"` symbol.

pub mod config;
mod exec;
pub mod gpu;
mod sandbox;

pub use exec::CudaBackend;

rhizos_plugin_api::export_backend_plugin! {
    name: "cuda",
    backends: ["cuda"],
    new_with_host: exec::CudaBackend::new,
}
