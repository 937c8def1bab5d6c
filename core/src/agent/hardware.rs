//! What the machine offers: CPU threads and memory (more detail — CPU features, disk, GPUs — is
//! the hardware-detection issue's work).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardware {
    pub cpu_threads: u32,
    pub memory_mib: u64,
    /// Free space where the agent runs (job scratch space lives there).
    pub disk_free_mib: u64,
}

pub fn detect() -> Hardware {
    let cpu_threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_total_mib(&text))
        .unwrap_or(0);
    Hardware {
        cpu_threads,
        memory_mib,
        disk_free_mib: disk_free_mib(std::path::Path::new(".")).unwrap_or(0),
    }
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

    #[test]
    fn default_node_id_is_a_valid_token() {
        assert!(rhizos_broker::validate_token("node id", &default_node_id()).is_ok());
    }
}
