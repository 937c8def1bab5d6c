//! Job files in and out of a container, as the tar archives the engine's archive API speaks.

use std::collections::BTreeSet;
use std::io::Read;

/// Owner of what is copied in: root, so an unprivileged workload can only read it.
const ROOT: u64 = 0;

/// The archive unpacked at `/` before the container starts: `input/` (0555) holding the job's
/// files (0444, parent directories created), and an empty `output/` (1777, like `/tmp`: any
/// user the workload runs as may write there). With `only` set to `Input` or `Output`, the archive
/// holds just that directory's content (for unpacking into a volume mounted there).
pub fn setup_archive(files: &[(String, Vec<u8>)], part: Part) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let (input_prefix, with_output) = match part {
        Part::Both => ("input/", true),
        Part::Input => ("", false),
    };
    if part == Part::Both {
        append_dir(&mut builder, "input/", 0o555)?;
    }
    let mut dirs = BTreeSet::new();
    for (name, _) in files {
        let mut parent = String::new();
        let segments: Vec<&str> = name.split('/').collect();
        for segment in &segments[..segments.len() - 1] {
            parent.push_str(segment);
            parent.push('/');
            dirs.insert(parent.clone());
        }
    }
    for dir in &dirs {
        append_dir(&mut builder, &format!("{input_prefix}{dir}"), 0o555)?;
    }
    for (name, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o444);
        header.set_uid(ROOT);
        header.set_gid(ROOT);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(
            &mut header,
            format!("{input_prefix}{name}"),
            content.as_slice(),
        )?;
    }
    if with_output {
        append_dir(&mut builder, "output/", 0o1777)?;
    }
    builder.into_inner()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `input/` and `output/`, unpacked at `/`.
    Both,
    /// The content of `/input` alone (a volume mounted there).
    Input,
}

fn append_dir(builder: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(mode);
    header.set_uid(ROOT);
    header.set_gid(ROOT);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Directory);
    builder.append_data(&mut header, path, std::io::empty())
}

/// What came out of `/output`.
#[derive(Debug, Default)]
pub struct Outputs {
    pub files: Vec<(String, Vec<u8>)>,
    /// Regular files left out because they went past the limits.
    pub dropped: usize,
}

/// Reads the archive the engine gives for `/output` (entries under `output/`): regular files only
/// (links and devices are skipped), at most `max_files` and `max_bytes` in all.
pub fn read_outputs(archive: &[u8], max_files: usize, max_bytes: u64) -> std::io::Result<Outputs> {
    let mut outputs = Outputs::default();
    let mut total = 0u64;
    let mut reader = tar::Archive::new(archive);
    for entry in reader.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = path.strip_prefix("output/") else {
            continue;
        };
        let name = name.to_owned();
        let size = entry.header().size()?;
        if outputs.files.len() >= max_files || total + size > max_bytes || !plain_path(&name) {
            outputs.dropped += 1;
            continue;
        }
        let mut content = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut content)?;
        total += size;
        outputs.files.push((name, content));
    }
    Ok(outputs)
}

/// A relative path without empty, `.` or `..` segments.
/// Bytes of the regular files under `dir` (symlinks not followed, no other file system crossed).
pub fn tree_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let device = std::fs::symlink_metadata(dir)?.dev();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.dev() != device {
                continue;
            }
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Ok(total)
}

pub fn plain_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.contains('\0')
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(archive: &[u8]) -> Vec<(String, u32, u64)> {
        let mut reader = tar::Archive::new(archive);
        reader
            .entries()
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|e| {
                let e = e.unwrap_or_else(|e| panic!("{e}"));
                let path = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                (
                    path,
                    e.header().mode().unwrap_or(0),
                    e.header().size().unwrap_or(0),
                )
            })
            .collect()
    }

    #[test]
    fn input_is_read_only_and_output_writable_by_anyone() {
        let files = vec![
            ("a.txt".to_owned(), b"hello".to_vec()),
            ("deep/er/b.bin".to_owned(), vec![1, 2, 3]),
        ];
        let archive = setup_archive(&files, Part::Both).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            entries(&archive),
            [
                ("input/".to_owned(), 0o555, 0),
                ("input/deep/".to_owned(), 0o555, 0),
                ("input/deep/er/".to_owned(), 0o555, 0),
                ("input/a.txt".to_owned(), 0o444, 5),
                ("input/deep/er/b.bin".to_owned(), 0o444, 3),
                ("output/".to_owned(), 0o1777, 0),
            ]
        );
        let volume = setup_archive(&files, Part::Input).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(entries(&volume)[0].0, "deep/");
    }

    #[test]
    fn outputs_stop_at_the_limits_and_skip_what_is_not_a_file() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, content: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, path, content)
                .unwrap_or_else(|e| panic!("{e}"));
        };
        add("output/one.txt", b"1");
        add("output/two.txt", b"22");
        add("output/three.txt", b"333");
        add("elsewhere.txt", b"x");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "output/link", "/etc/passwd")
            .unwrap_or_else(|e| panic!("{e}"));
        let archive = builder.into_inner().unwrap_or_else(|e| panic!("{e}"));
        let all = read_outputs(&archive, 10, 1_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            all.files
                .iter()
                .map(|(n, c)| (n.as_str(), c.len()))
                .collect::<Vec<_>>(),
            [("one.txt", 1), ("two.txt", 2), ("three.txt", 3)]
        );
        assert_eq!(all.dropped, 0);
        let capped = read_outputs(&archive, 10, 3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(capped.files.len(), 2);
        assert_eq!(capped.dropped, 1);
        let few = read_outputs(&archive, 1, 1_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((few.files.len(), few.dropped), (1, 2));
    }
}
