//! Pod sandboxes' network namespaces as the node daemon holds them: open handles, never paths
//! that a later open could resolve to another namespace, and found again among the node's
//! processes by the pod's UID when no handle is held (after a restart, or for a pod the plugin
//! never saw).

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

/// A network namespace's identity: the device and inode of its nsfs file.
pub type NamespaceId = (u64, u64);

/// The identity of the namespace `file` is a handle to.
pub fn namespace_id(file: &File) -> Option<NamespaceId> {
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// A path to the namespace behind `file` that is good for as long as `file` is open (a child
/// process such as `ip` can open it): this process's descriptor.
pub fn fd_path(file: &File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd())
}

/// Runs `f` on a thread of its own inside the network namespace `netns` (a pod's).
pub fn in_sandbox<T: Send + 'static>(
    netns: File,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the pod's namespace: {e}"))?;
        f()
    })
    .join()
    .unwrap_or_else(|_| Err("the pod's namespace: a thread panicked".into()))
}

/// Whether a `/proc/<pid>/cgroup` listing puts the process in the pod with this UID: a path
/// component `pod<uid>` (cgroupfs driver) or `…-pod<uid with underscores>.slice` (systemd
/// driver), exactly.
pub fn cgroup_names_pod(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    cgroup.lines().any(|line| {
        line.splitn(3, ':').nth(2).is_some_and(|path| {
            path.split('/')
                .any(|c| c == cgroupfs || c.ends_with(&systemd))
        })
    })
}

/// When a process started, in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The network namespace of the pod with this UID among the node's processes, never the node's
/// own (`node`: its path; None: this process's), as a hostNetwork pod's is. With `want`, only
/// that namespace (the one recorded at the sandbox's ADD: a process of the pod that made a
/// namespace of its own is not the sandbox); without, the namespace of the pod's oldest process
/// (the sandbox's, which starts first).
pub fn find_pod_netns(uid: &str, want: Option<NamespaceId>, node: Option<&Path>) -> Option<File> {
    let node = std::fs::metadata(node.unwrap_or(Path::new("/proc/self/ns/net")))
        .ok()
        .map(|m| (m.dev(), m.ino()));
    let mut oldest: Option<(u64, File)> = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let in_pod = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cgroup| cgroup_names_pod(&cgroup, uid));
        if !in_pod {
            continue;
        }
        let Ok(file) = File::open(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let id = namespace_id(&file);
        if id.is_none() || id == node {
            continue;
        }
        if want.is_some() {
            if id == want {
                return Some(file);
            }
            continue;
        }
        let Some(started) = start_time(pid) else {
            continue;
        };
        if oldest.as_ref().is_none_or(|(t, _)| started < *t) {
            oldest = Some((started, file));
        }
    }
    oldest.map(|(_, file)| file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_cgroup_is_found_under_either_driver_and_no_other_pods_is() {
        let uid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";
        let cgroupfs =
            "12:memory:/kubepods/besteffort/pod0f1e2d3c-aaaa-bbbb-cccc-123456789abc/4a5b\n";
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb_cccc_123456789abc.slice/cri-containerd-4a5b.scope\n";
        assert!(cgroup_names_pod(cgroupfs, uid));
        assert!(cgroup_names_pod(systemd, uid));
        assert!(!cgroup_names_pod(
            cgroupfs,
            "0f1e2d3c-aaaa-bbbb-cccc-000000000000"
        ));
        assert!(!cgroup_names_pod("0::/user.slice\n", uid));
        assert!(!cgroup_names_pod(cgroupfs, ""));
        // A name that only contains the UID is not the pod's.
        assert!(!cgroup_names_pod(
            "0::/tenant/mypod0f1e2d3c-aaaa-bbbb-cccc-123456789abc-copy\n",
            uid
        ));
    }

    #[test]
    fn this_process_start_time_is_read_past_its_command_name() {
        let me = std::process::id().to_string();
        assert!(start_time(&me).is_some_and(|t| t > 0));
    }
}
