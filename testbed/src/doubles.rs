//! Test doubles for what cannot run here, each following the real API exactly.
//!
//! [`NvmlDouble`]: a stand-in NVIDIA driver library (`libnvidia-ml.so.1`, built from
//! `testbed/doubles/nvml/nvml_double.c`) implementing the NVML C API calls RhizOS makes, with GPUs
//! the test declares. It is what lets the CUDA backend's GPU path (detection, allocation,
//! `CUDA_VISIBLE_DEVICES`, VRAM enforcement, telemetry) run on a machine without a GPU. It is a
//! double: nothing here touches a real GPU.

use std::path::{Path, PathBuf};

/// One GPU of the double.
#[derive(Debug, Clone)]
pub struct DoubleGpu {
    pub name: &'static str,
    pub uuid: &'static str,
    pub vram_mib: u64,
    pub compute_capability: &'static str,
}

/// A private copy of the NVML double with its own GPUs (the library reads `gpus` beside itself).
pub struct NvmlDouble {
    dir: tempfile::TempDir,
}

impl NvmlDouble {
    pub fn new(gpus: &[DoubleGpu]) -> anyhow::Result<Self> {
        let source = crate::guests::workspace_root().join("testbed/doubles/nvml/nvml_double.c");
        let built =
            crate::images::compile_c(&source, &["-shared", "-fPIC", "-Wall"], "libnvidia-ml.so.1")?;
        let dir = tempfile::Builder::new().prefix("rhizos-nvml-").tempdir()?;
        std::fs::copy(&built, dir.path().join("libnvidia-ml.so.1"))?;
        let lines: String = gpus
            .iter()
            .map(|g| {
                format!(
                    "{}|{}|{}|{}\n",
                    g.name, g.uuid, g.vram_mib, g.compute_capability
                )
            })
            .collect();
        std::fs::write(dir.path().join("gpus"), lines)?;
        std::fs::create_dir_all(dir.path().join("procs"))?;
        Ok(Self { dir })
    }

    /// The library to hand to `[agent] nvml_library` and `[agent.plugins.cuda] nvml_library`.
    pub fn library(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// The double's directory: a workload that "allocates VRAM" writes `procs/<pid>` here
    /// (pass it to the job as `RHIZOS_NVML_DOUBLE_DIR`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
