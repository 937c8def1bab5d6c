//! Where a native program runs: under a uid of its own (one per execution, from
//! `[agent.plugins.cuda] first_uid`), inside a cgroup of its own that every process it starts
//! stays in (a `setsid` and a fork do not leave it), with no new privileges. At the end the
//! whole cgroup is killed, whatever is left in it. Under its own uid the program cannot write the
//! plugin directory, the agent's files or the ledger, nor signal another job's processes.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The uids handed to executions, `first .. first + count`; the ones in use here. A uid is
/// also claimed machine-wide by an exclusive `flock` on `<locks>/<uid>.lock` while leased, so
/// several agents (or agent processes) on one machine never share one; the kernel drops the lock
/// when its holder dies.
pub struct UidPool {
    first: u32,
    count: u32,
    locks: PathBuf,
    taken: Mutex<BTreeSet<u32>>,
}

impl UidPool {
    pub fn new(first: u32, count: u32, locks: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            first,
            count,
            locks,
            taken: Mutex::new(BTreeSet::new()),
        })
    }

    /// A uid no running execution on this machine has; processes left under it by a dead
    /// holder (an agent that crashed) are killed first, so nothing old shares it.
    pub fn lease(self: &Arc<Self>) -> Result<UidLease, String> {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.locks)
            .map_err(|e| format!("cannot create {}: {e}", self.locks.display()))?;
        let mut taken = self.taken.lock().unwrap_or_else(PoisonError::into_inner);
        for uid in self.first..self.first.saturating_add(self.count) {
            if taken.contains(&uid) {
                continue;
            }
            let path = self.locks.join(format!("{uid}.lock"));
            let Ok(file) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            // SAFETY: flock(2) on a descriptor this function owns.
            #[allow(unsafe_code)]
            let locked =
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if !locked {
                continue;
            }
            taken.insert(uid);
            drop(taken);
            kill_uid(uid);
            return Ok(UidLease {
                uid,
                pool: self.clone(),
                _lock: file,
            });
        }
        Err(format!(
            "all {} uids from [agent.plugins.cuda] first_uid = {} are in use on this machine: raise uid_count",
            self.count, self.first
        ))
    }
}

/// One execution's uid (its gid is the same number); returned to the pool when dropped, after
/// every process under it is killed.
pub struct UidLease {
    pub uid: u32,
    pool: Arc<UidPool>,
    /// Holds the machine-wide claim (released when closed).
    _lock: std::fs::File,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        kill_uid(self.uid);
        self.pool
            .taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.uid);
    }
}

/// Processes (from `/proc`) whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|status| {
                    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
                    line.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(uid)
        })
        .collect()
}

/// SIGKILLs every process of `uid` until none is left (bounded: a process cannot fork faster
/// than it is killed for long under the pids limit).
fn kill_uid(uid: u32) {
    for _ in 0..200 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            signal(pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) on a pid read from /proc or a cgroup; no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// One execution's cgroup: under the unified hierarchy (v2) or the v1 `pids` controller.
pub struct Cgroup {
    dir: PathBuf,
    /// `cgroup.procs`, for the child to move itself in before it runs the program.
    pub procs: CString,
}

/// Where the executions' cgroups are made, when the machine lets this process make them.
pub fn cgroup_root() -> Option<PathBuf> {
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let root = if unified {
        PathBuf::from("/sys/fs/cgroup/rhizos-cuda")
    } else {
        PathBuf::from("/sys/fs/cgroup/pids/rhizos-cuda")
    };
    std::fs::create_dir_all(&root).ok()?;
    Some(root)
}

impl Cgroup {
    /// Creates the cgroup `name` under `root`, with at most `pids_limit` processes where the
    /// pids controller is there.
    pub fn create(root: &Path, name: &str, pids_limit: u64) -> std::io::Result<Self> {
        let dir = root.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)?;
        let max = dir.join("pids.max");
        if max.exists() {
            std::fs::write(&max, pids_limit.to_string())?;
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Self { dir, procs })
    }

    /// The processes in the cgroup now.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills everything in the cgroup (`cgroup.kill` where the kernel has it, else each member
    /// until none is left).
    pub fn kill_all(&self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..200 {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                signal(pid);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Makes `dir` (the execution's directory) the program's own: owned by `uid`, private to it
/// (and to root); inputs stay read-only.
pub fn hand_over(dir: &Path, uid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// What the child does between fork and exec (async-signal-safe system calls only): join the
/// cgroup, drop to the execution's uid and gid with no supplementary groups, and forbid new
/// privileges (no setuid binary gives them back).
pub fn confine(procs: Option<&CString>, uid: Option<u32>) -> std::io::Result<()> {
    // SAFETY: plain system calls on a path prepared before the fork; no allocation, no locks.
    #[allow(unsafe_code)]
    unsafe {
        if let Some(procs) = procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if let Some(uid) = uid
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0)
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether this process may give programs their own uid (it runs as root).
pub fn can_switch_uid() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}
