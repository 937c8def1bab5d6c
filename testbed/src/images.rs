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

/// The probe as a native program of this machine (dynamically linked, small enough to travel
/// inline in a job): the workload of the CUDA backend tests. Built once per source.
pub fn probe_native() -> anyhow::Result<std::path::PathBuf> {
    static BUILT: OnceLock<Result<std::path::PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let source = crate::guests::workspace_root().join("testbed/images/probe.c");
            compile_c(&source, &[], "probe").map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Compiles a C file with `gcc -O2 <flags>` into `target/<profile>/c/<digest>/<name>` (once per
/// source and flags; concurrent test processes each write a temp file and rename it).
pub fn compile_c(
    source: &std::path::Path,
    flags: &[&str],
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let text =
        std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
    let mut key = text.clone();
    key.extend(flags.join(" ").bytes());
    let dir = crate::build_dir().join("c").join(short_digest(&key));
    let output = dir.join(name);
    if output.is_file() {
        return Ok(output);
    }
    std::fs::create_dir_all(&dir)?;
    let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
    let compiled = Command::new("gcc")
        .arg("-O2")
        .args(flags)
        .arg("-o")
        .arg(&partial)
        .arg(source)
        .output()
        .context("cannot run gcc (install it: apt-get install gcc libc6-dev)")?;
    anyhow::ensure!(
        compiled.status.success(),
        "gcc failed on {}: {}",
        source.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    std::fs::rename(&partial, &output)?;
    Ok(output)
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
    let binary = compile_c(&source_path, &["-static"], "probe")?;
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
