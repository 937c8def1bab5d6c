//! What the machine offers: CPU (model, cores, threads, instruction-set features), memory,
//! disk, OS, container runtimes and GPUs (NVML, falling back to `nvidia-smi`). GPU memory is
//! only ever read from the GPU driver — never guessed from system RAM.

use rhizos_broker::wire::{GpuInfo, HardwareView};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    pub cpu_threads: u32,
    /// Physical cores (threads when the topology is not readable).
    pub cpu_cores: u32,
    pub cpu_model: String,
    /// Instruction-set features that matter to workloads (avx2, avx512f, …).
    pub cpu_features: Vec<String>,
    pub memory_mib: u64,
    /// Free space where the agent runs (job scratch space lives there).
    pub disk_free_mib: u64,
    /// `PRETTY_NAME` of /etc/os-release, and the kernel release.
    pub os: String,
    pub kernel: String,
    /// Container runtimes whose socket or binary is present (`docker`, `podman`).
    pub runtimes: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    /// Why no GPU is offered, when none is (e.g. "no NVIDIA driver (NVML: …)").
    pub gpu_note: Option<String>,
    /// "<driver>, CUDA <version>" when NVML answered.
    pub gpu_driver: Option<String>,
}

impl Hardware {
    pub fn view(&self) -> HardwareView {
        HardwareView {
            cpu_model: self.cpu_model.clone(),
            cpu_cores: self.cpu_cores,
            cpu_threads: self.cpu_threads,
            cpu_features: self.cpu_features.clone(),
            os: self.os.clone(),
            kernel: self.kernel.clone(),
            runtimes: self.runtimes.clone(),
            gpu_note: self.gpu_note.clone(),
            gpu_driver: self.gpu_driver.clone(),
        }
    }
}

/// CPU flags worth advertising (what workloads test for), in this order.
const INTERESTING_FLAGS: &[&str] = &[
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "aes",
    "sha_ni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

pub fn detect() -> Hardware {
    detect_with(None).0
}

/// [`detect`] with NVML loaded from `nvml_library` when given; also returns the NVML handle
/// for [`telemetry`] when it loaded.
pub fn detect_with(
    nvml_library: Option<&std::path::Path>,
) -> (Hardware, Option<nvml_wrapper::Nvml>) {
    let cpu_threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total_mib(&text))
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| parse_cpuinfo(&text))
        .unwrap_or_default();
    let (gpus, gpu_note, gpu_driver, nvml) = detect_gpus(nvml_library);
    let hardware = Hardware {
        cpu_threads,
        cpu_cores: if cpu.cores > 0 {
            cpu.cores
        } else {
            cpu_threads
        },
        cpu_model: cpu.model,
        cpu_features: cpu.features,
        memory_mib,
        disk_free_mib: disk_free_mib(std::path::Path::new(".")).unwrap_or(0),
        os: std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|text| parse_os_release(&text))
            .unwrap_or_else(|| std::env::consts::OS.to_owned()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_owned())
            .unwrap_or_default(),
        runtimes: container_runtimes(),
        gpus,
        gpu_note,
        gpu_driver,
    };
    (hardware, nvml)
}

/// Every GPU's state now (empty when NVML fails).
pub fn telemetry(nvml: &nvml_wrapper::Nvml) -> Vec<rhizos_broker::wire::GpuTelemetry> {
    let Ok(count) = nvml.device_count() else {
        return Vec::new();
    };
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok()?;
            Some(rhizos_broker::wire::GpuTelemetry {
                uuid: device.uuid().ok()?,
                utilization_pct: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                vram_used_mib: memory.used >> 20,
                vram_total_mib: memory.total >> 20,
                temperature_c: device
                    .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                    .unwrap_or(0),
                power_mw: device.power_usage().unwrap_or(0),
            })
        })
        .collect()
}

#[derive(Debug, Default, PartialEq, Eq)]
struct CpuInfo {
    model: String,
    cores: u32,
    features: Vec<String>,
}

/// Model name, physical cores (distinct `physical id`/`core id` pairs) and the interesting
/// flags, from /proc/cpuinfo.
fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut cores = std::collections::BTreeSet::new();
    let (mut physical, mut core) = (None::<String>, None::<String>);
    let mut flags: Option<Vec<&str>> = None;
    for line in text.lines().chain(std::iter::once("")) {
        let Some((key, value)) = line.split_once(':') else {
            // A blank line ends one processor's block.
            if let (Some(p), Some(c)) = (physical.take(), core.take()) {
                cores.insert((p, c));
            }
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "model name" if info.model.is_empty() => info.model = value.to_owned(),
            "physical id" => physical = Some(value.to_owned()),
            "core id" => core = Some(value.to_owned()),
            "flags" if flags.is_none() => flags = Some(value.split_whitespace().collect()),
            _ => {}
        }
    }
    info.cores = u32::try_from(cores.len()).unwrap_or(u32::MAX);
    let flags = flags.unwrap_or_default();
    info.features = INTERESTING_FLAGS
        .iter()
        .filter(|f| flags.contains(f))
        .map(|f| (*f).to_owned())
        .collect();
    info
}

/// `PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"` → `Debian GNU/Linux 12 (bookworm)`.
fn parse_os_release(text: &str) -> Option<String> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))?
        .trim()
        .trim_matches('"');
    (!value.is_empty()).then(|| value.to_owned())
}

/// Runtimes whose engine socket exists (the Docker backend checks that the engine answers).
fn container_runtimes() -> Vec<String> {
    let mut found = Vec::new();
    let docker_host = std::env::var("DOCKER_HOST").ok();
    if docker_host.is_some() || std::path::Path::new("/var/run/docker.sock").exists() {
        found.push("docker".to_owned());
    }
    let podman = std::env::var("XDG_RUNTIME_DIR")
        .map(|dir| {
            std::path::Path::new(&dir)
                .join("podman/podman.sock")
                .exists()
        })
        .unwrap_or(false)
        || std::path::Path::new("/run/podman/podman.sock").exists();
    if podman {
        found.push("podman".to_owned());
    }
    found
}

type GpuDetection = (
    Vec<GpuInfo>,
    Option<String>,
    Option<String>,
    Option<nvml_wrapper::Nvml>,
);

/// GPUs through NVML; when NVML cannot load, through `nvidia-smi`; otherwise none, with why.
/// Returns the GPUs, why there are none, the driver versions, and NVML when it loaded.
fn detect_gpus(nvml_library: Option<&std::path::Path>) -> GpuDetection {
    let opened = match nvml_library {
        Some(path) => nvml_wrapper::Nvml::builder()
            .lib_path(path.as_os_str())
            .init(),
        None => nvml_wrapper::Nvml::init(),
    };
    let nvml_error = match opened {
        Ok(nvml) => match nvml_gpus(&nvml) {
            Ok(gpus) if !gpus.is_empty() => {
                let driver = nvml.sys_driver_version().ok().map(|driver| {
                    match nvml.sys_cuda_driver_version() {
                        Ok(v) => format!("{driver}, CUDA {}.{}", v / 1000, (v % 1000) / 10),
                        Err(_) => driver,
                    }
                });
                return (gpus, None, driver, Some(nvml));
            }
            Ok(_) => {
                return (
                    Vec::new(),
                    Some("NVIDIA driver found, but no GPU".to_owned()),
                    None,
                    None,
                );
            }
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    match nvidia_smi_gpus() {
        Some(gpus) if !gpus.is_empty() => (gpus, None, None, None),
        _ => (
            Vec::new(),
            Some(format!("no NVIDIA driver (NVML: {nvml_error})")),
            None,
            None,
        ),
    }
}

fn nvml_gpus(nvml: &nvml_wrapper::Nvml) -> Result<Vec<GpuInfo>, nvml_wrapper::error::NvmlError> {
    let mut gpus = Vec::new();
    for index in 0..nvml.device_count()? {
        let device = nvml.device_by_index(index)?;
        let memory = device.memory_info()?;
        gpus.push(GpuInfo {
            name: device.name()?,
            vram_mib: memory.total / (1024 * 1024),
            uuid: device.uuid().ok(),
            compute_capability: device
                .cuda_compute_capability()
                .ok()
                .map(|c| format!("{}.{}", c.major, c.minor)),
            apis: vec!["cuda".to_owned()],
        });
    }
    Ok(gpus)
}

/// `nvidia-smi --query-gpu=name,memory.total,uuid --format=csv,noheader,nounits`, when installed.
fn nvidia_smi_gpus() -> Option<Vec<GpuInfo>> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,uuid",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout)))
}

/// One `name, MiB, uuid` line per GPU (the name may itself hold commas; the uuid is optional).
fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|line| {
            let (rest, last) = line.rsplit_once(',')?;
            let (name, mib, uuid) = match last.trim().parse::<u64>() {
                Ok(mib) => (rest, mib, None),
                Err(_) => {
                    let (name, mib) = rest.rsplit_once(',')?;
                    let uuid = last.trim();
                    (
                        name,
                        mib.trim().parse().ok()?,
                        (!uuid.is_empty()).then(|| uuid.to_owned()),
                    )
                }
            };
            Some(GpuInfo {
                name: name.trim().to_owned(),
                vram_mib: mib,
                uuid,
                compute_capability: None,
                apis: vec!["cuda".to_owned()],
            })
        })
        .collect()
}

/// Free space of the filesystem holding `path`, from `df` (POSIX output format).
fn disk_free_mib(path: &std::path::Path) -> Option<u64> {
    let output = std::process::Command::new("df")
        .arg("-Pk")
        .arg(path)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// `MemTotal:  24576000 kB` → MiB.
fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// `node-<hostname>`, lower-cased, with characters outside `[a-z0-9_-]` replaced by `-`.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "local".into());
    let clean: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(58)
        .collect();
    format!(
        "node-{}",
        if clean.is_empty() {
            "local".into()
        } else {
            clean
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_mib() {
        assert_eq!(
            parse_mem_total_mib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_000)
        );
        assert_eq!(parse_mem_total_mib("nothing"), None);
    }

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu sse2 sse4_2 avx avx2 fma aes avx512f avx512bw amx_tile\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu sse2\n\nprocessor\t: 2\nphysical id\t: 0\ncore id\t\t: 1\n\nprocessor\t: 3\nphysical id\t: 1\ncore id\t\t: 0\n";

    #[test]
    fn cpuinfo_gives_the_model_physical_cores_and_features() {
        assert_eq!(
            parse_cpuinfo(CPUINFO),
            CpuInfo {
                model: "Intel(R) Xeon(R) Platinum 8480C".into(),
                // (0,0) twice (hyper-threads), (0,1), (1,0).
                cores: 3,
                features: [
                    "sse4_2", "avx", "avx2", "fma", "aes", "avx512f", "avx512bw", "amx_tile"
                ]
                .map(String::from)
                .to_vec(),
            }
        );
        assert_eq!(parse_cpuinfo(""), CpuInfo::default());
    }

    #[test]
    fn os_release_and_nvidia_smi_are_parsed() {
        assert_eq!(
            parse_os_release("NAME=\"Debian\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n")
                .as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(parse_os_release("NAME=x\n"), None);
        let gpus = parse_nvidia_smi(
            "NVIDIA H100 80GB HBM3, 81559, GPU-5a1c0f3e-aaaa-bbbb-cccc-0123456789ab\n\
             NVIDIA A10, 23028\nbad line\n",
        );
        assert_eq!(
            gpus.iter()
                .map(|g| (g.name.as_str(), g.vram_mib, g.uuid.as_deref()))
                .collect::<Vec<_>>(),
            [
                (
                    "NVIDIA H100 80GB HBM3",
                    81_559,
                    Some("GPU-5a1c0f3e-aaaa-bbbb-cccc-0123456789ab")
                ),
                ("NVIDIA A10", 23_028, None)
            ]
        );
    }

    #[test]
    fn this_machine_is_described_and_gpus_come_only_from_the_gpu_driver() {
        let hardware = detect();
        assert!(hardware.cpu_threads >= 1 && hardware.cpu_cores >= 1);
        assert!(hardware.cpu_cores <= hardware.cpu_threads);
        assert!(hardware.memory_mib > 0);
        #[cfg(target_arch = "x86_64")]
        assert!(!hardware.cpu_model.is_empty());
        assert!(!hardware.os.is_empty());
        if hardware.gpus.is_empty() {
            // No driver here: the node says why, naming NVML's error; no RAM passed off as VRAM.
            let note = hardware.gpu_note.expect("a reason when there is no GPU");
            assert!(note.contains("NVML") || note.contains("no GPU"), "{note}");
        } else {
            assert!(
                hardware
                    .gpus
                    .iter()
                    .all(|g| g.vram_mib > 0 && g.vram_mib != hardware.memory_mib)
            );
            assert_eq!(hardware.gpu_note, None);
        }
    }

    #[test]
    fn default_node_id_is_a_valid_token() {
        assert!(rhizos_broker::validate_token("node id", &default_node_id()).is_ok());
    }
}
