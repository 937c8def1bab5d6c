//! Container images the tests and the demo build themselves: there is no registry to pull from.
//!
//! `rhizos-test/probe:<digest>` holds one static binary, `/probe` (from `testbed/images/probe.c`,
//! compiled with `gcc -static`), as its entrypoint, plus an empty `/output` (1777) so it also
//! works on nodes with a read-only root filesystem. The tag is the digest of the source, so a
//! changed probe is a new image and an unchanged one is built once per machine.

use anyhow::Context as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Builds (once per machine and source) and returns the probe image's reference.
pub fn probe_image() -> anyhow::Result<String> {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_probe().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Whether a Docker engine answers here (`docker info`).
pub fn docker_available() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn build_probe() -> anyhow::Result<String> {
    let source_path = crate::guests::workspace_root().join("testbed/images/probe.c");
    let source = std::fs::read(&source_path)
        .with_context(|| format!("cannot read {}", source_path.display()))?;
    let tag = format!("rhizos-test/probe:{}", short_digest(&source));
    if image_exists(&tag) {
        return Ok(tag);
    }
    let dir = tempfile::Builder::new().prefix("rhizos-probe-").tempdir()?;
    let binary = dir.path().join("probe");
    let compiled = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(&source_path)
        .output()
        .context("cannot run gcc (install it: apt-get install gcc libc6-dev)")?;
    anyhow::ensure!(
        compiled.status.success(),
        "gcc -static failed: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let mut rootfs = tar::Builder::new(Vec::new());
    rootfs.append_path_with_name(&binary, "probe")?;
    let mut output = tar::Header::new_gnu();
    output.set_entry_type(tar::EntryType::Directory);
    output.set_mode(0o1777);
    output.set_size(0);
    rootfs.append_data(&mut output, "output/", std::io::empty())?;
    let rootfs = rootfs.into_inner()?;
    let mut import = Command::new("docker")
        .args(["import", "--change", r#"ENTRYPOINT ["/probe"]"#, "-", &tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run docker")?;
    import
        .stdin
        .take()
        .context("docker import has no stdin")?
        .write_all(&rootfs)?;
    let imported = import.wait_with_output()?;
    anyhow::ensure!(
        imported.status.success(),
        "docker import failed: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    Ok(tag)
}

fn image_exists(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// FNV-1a of the bytes, 16 hex digits: a tag, not a security boundary.
fn short_digest(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
