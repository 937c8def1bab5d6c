//! The GPUs as NVML sees them, and how much VRAM a job's processes hold.

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

/// One GPU at detection time.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub vram_total_mib: u64,
    pub vram_free_mib: u64,
    /// `major.minor`, e.g. `9.0` for an H100.
    pub compute_capability: String,
}

/// Loads NVML (from `library` when given, else the loader's `libnvidia-ml.so.1`).
pub fn open(library: Option<&str>) -> Result<Nvml, String> {
    let opened = match library {
        Some(path) => Nvml::builder().lib_path(std::ffi::OsStr::new(path)).init(),
        None => Nvml::init(),
    };
    opened.map_err(|e| e.to_string())
}

/// Driver version, CUDA driver version (`12.4`) and every GPU.
pub fn detect(nvml: &Nvml) -> Result<(String, String, Vec<Gpu>), String> {
    let driver = nvml.sys_driver_version().map_err(|e| e.to_string())?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
        .unwrap_or_else(|_| "unknown".into());
    let mut gpus = Vec::new();
    for index in 0..nvml.device_count().map_err(|e| e.to_string())? {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let memory = device.memory_info().map_err(|e| e.to_string())?;
        let capability = device
            .cuda_compute_capability()
            .map(|c| format!("{}.{}", c.major, c.minor))
            .unwrap_or_else(|_| "unknown".into());
        gpus.push(Gpu {
            index,
            uuid: device.uuid().map_err(|e| e.to_string())?,
            name: device.name().map_err(|e| e.to_string())?,
            vram_total_mib: memory.total >> 20,
            vram_free_mib: memory.free >> 20,
            compute_capability: capability,
        });
    }
    Ok((driver, cuda, gpus))
}

/// Bytes of VRAM held on GPU `uuid` by the processes `is_job` says are the job's.
pub fn job_vram(nvml: &Nvml, uuid: &str, is_job: &dyn Fn(u32) -> bool) -> Result<u64, String> {
    let device = nvml.device_by_uuid(uuid).map_err(|e| e.to_string())?;
    let processes = device
        .running_compute_processes()
        .map_err(|e| e.to_string())?;
    Ok(processes
        .iter()
        .filter(|p| is_job(p.pid))
        .map(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => bytes,
            UsedGpuMemory::Unavailable => 0,
        })
        .sum())
}

/// The process group of `pid` (field 5 of `/proc/<pid>/stat`), if it still exists.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_found_in_its_own_group() {
        let me = std::process::id();
        let group = super::process_group(me);
        assert!(group.is_some_and(|g| g > 0), "{group:?}");
        assert_eq!(super::process_group(u32::MAX), None);
    }
}
