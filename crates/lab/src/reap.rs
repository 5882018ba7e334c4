//! Removing a lab by name, whatever state it was left in: what `cloak lab down` does after the
//! supervisor stopped, and what `cloak lab up` does first when a previous lab's supervisor is
//! gone. Processes are found by what they belong to (a namespace of the lab, a cgroup of the
//! lab) and killed by PID; nothing is matched by command line.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    error::{Error, Result},
    layout::{self, Lab},
    procs, sh,
};

/// The global sysctls the kubelet changes at start (NODENOTES trap 3): recorded before the
/// first lab's first kubelet starts, restored when the last lab goes down.
pub(crate) const KUBELET_SYSCTLS: [&str; 3] = [
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
];

/// What a reap removed, for the user.
#[derive(Debug, Default)]
pub struct Reaped {
    /// The lab's supervisor was running and took its lab down itself.
    pub supervisor_stopped: bool,
    pub processes: usize,
    pub namespaces: usize,
    pub cgroups: usize,
    pub sysctls_restored: bool,
}

impl std::fmt::Display for Reaped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.supervisor_stopped {
            f.write_str("its supervisor stopped every process and removed the lab; then ")?;
        }
        write!(
            f,
            "{} processes, {} network namespaces, {} cgroup directories removed{}",
            self.processes,
            self.namespaces,
            self.cgroups,
            if self.sysctls_restored {
                "; kubelet sysctls restored"
            } else {
                ""
            }
        )
    }
}

/// Removes everything of `lab`. Its supervisor must be gone already.
pub(crate) fn reap(lab: &Lab) -> Result<Reaped> {
    let mut reaped = Reaped::default();
    let namespaces = lab_namespaces(lab);
    // Processes: those in a namespace of the lab (servers, node agents, shims) and those in a
    // cgroup of the lab (pods' containers, in namespaces containerd made). Bounded: a process
    // that survives SIGKILL for 10 s is reported, not waited for.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let pids = lab_processes(lab, &namespaces);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Other(format!(
                "processes of lab {} survive SIGKILL: {pids:?}",
                lab.name()
            )));
        }
        for &pid in &pids {
            procs::signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        killed.extend(pids);
        std::thread::sleep(Duration::from_millis(100));
    }
    reaped.processes = killed.len();
    // Mounts of the host under the lab's directory (there are none unless a holder leaked one:
    // nodes mount inside mount namespaces of their own).
    for mount in mounts_under(lab.dir()) {
        let _ = sh::run(&[Path::new("umount"), Path::new("-l"), &mount]);
    }
    for ns in &namespaces {
        sh::run(&["ip", "netns", "delete", ns])?;
        reaped.namespaces += 1;
    }
    reaped.cgroups = remove_cgroups(lab)?;
    let dir = lab.dir();
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(Error::io(dir))?;
    }
    if !other_lab_running(lab) {
        reaped.sysctls_restored = restore_sysctls()?;
    }
    Ok(reaped)
}

/// Records the kubelet's sysctls unless a running lab already did.
pub(crate) fn record_sysctls() -> Result<()> {
    let file = saved_sysctls();
    if file.exists() {
        return Ok(());
    }
    let mut text = String::new();
    for key in KUBELET_SYSCTLS {
        let value = fs::read_to_string(sysctl_path(key)).map_err(Error::io(sysctl_path(key)))?;
        let _ = writeln!(text, "{key}={}", value.trim());
    }
    if let Some(parent) = file.parent() {
        fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    fs::write(&file, text).map_err(Error::io(&file))
}

fn restore_sysctls() -> Result<bool> {
    let file = saved_sysctls();
    let Ok(text) = fs::read_to_string(&file) else {
        return Ok(false);
    };
    for line in text.lines() {
        if let Some((key, value)) = line.split_once('=')
            && KUBELET_SYSCTLS.contains(&key)
        {
            fs::write(sysctl_path(key), value).map_err(Error::io(sysctl_path(key)))?;
        }
    }
    match fs::remove_file(&file) {
        // Another reap of the same lab (the supervisor's own, and `down`'s) restored them too.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&file)(e)),
        _ => Ok(true),
    }
}

fn saved_sysctls() -> PathBuf {
    layout::root().join("sysctls.saved")
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Whether a lab other than `lab` has a live supervisor.
fn other_lab_running(lab: &Lab) -> bool {
    let Ok(entries) = fs::read_dir(layout::root()) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        name != lab.name()
            && Lab::new(&name)
                .is_ok_and(|other| crate::supervisor::supervisor_pid(&other).is_some())
    })
}

/// `ck-<lab>-*` in `/run/netns`.
pub(crate) fn lab_namespaces(lab: &Lab) -> Vec<String> {
    let prefix = lab.netns_prefix();
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// PIDs of every process in one of `namespaces` or in a cgroup of the lab, except this one.
pub(crate) fn lab_processes(lab: &Lab, namespaces: &[String]) -> Vec<u32> {
    let inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|ns| fs::metadata(Path::new("/run/netns").join(ns)).ok())
        .map(|m| m.ino())
        .collect();
    let me = std::process::id();
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let in_netns =
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| inodes.contains(&m.ino()));
        if in_netns || in_lab_cgroup(lab, pid) {
            pids.push(pid);
        }
    }
    pids
}

fn in_lab_cgroup(lab: &Lab, pid: u32) -> bool {
    let prefix = format!("/{}", lab.cgroup_prefix());
    fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .any(|path| path.starts_with(&prefix))
    })
}

/// Every cgroup hierarchy's mount point: `/sys/fs/cgroup/<controller>` on the cgroup v1
/// (hybrid) hosts the lab is built for, `/sys/fs/cgroup` itself on a pure v2 host. Read from the
/// mount table, so a cgroup directory is never taken for a hierarchy.
pub(crate) fn hierarchies() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let mount_point = fields.get(4)?;
            // After the optional fields comes "-", then the filesystem type.
            let fstype = fields.iter().skip_while(|f| **f != "-").nth(1)?;
            (matches!(*fstype, "cgroup" | "cgroup2") && mount_point.starts_with("/sys/fs/cgroup"))
                .then(|| PathBuf::from(mount_point))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Removes the lab's cgroup directories, deepest first, in every hierarchy.
fn remove_cgroups(lab: &Lab) -> Result<usize> {
    let prefix = lab.cgroup_prefix();
    let mut removed = 0;
    for hierarchy in hierarchies() {
        let Ok(entries) = fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                removed += remove_cgroup_tree(&entry.path())?;
            }
        }
    }
    Ok(removed)
}

fn remove_cgroup_tree(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removed += remove_cgroup_tree(&entry.path())?;
            }
        }
    }
    // A cgroup whose last task just died can be busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(removed + 1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) if Instant::now() > deadline => return Err(Error::io(dir)(e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Mount points (of this mount namespace) at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}
