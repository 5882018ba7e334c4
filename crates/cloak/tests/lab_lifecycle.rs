//! `cloak lab` life cycle (root): `up` twice is a no-op, `down` leaves nothing behind
//! (processes, namespaces, cgroups, files) and restores the sysctls the kubelet changed, and a
//! SIGKILLed `up` is reaped by the next `down`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers

mod labkit;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use labkit::{cloak_lab, eventually, up};

const SYSCTLS: [&str; 3] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
];

fn sysctls() -> Vec<String> {
    SYSCTLS
        .iter()
        .map(|k| {
            std::fs::read_to_string(Path::new("/proc/sys").join(k))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect()
}

/// What is left of lab `name` on this machine, listed; empty when nothing is.
fn leftovers(name: &str) -> Vec<String> {
    let mut left = Vec::new();
    let netns_prefix = format!("ck-{name}-");
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = entry.file_name().to_string_lossy().into_owned();
        if n.starts_with(&netns_prefix) {
            left.push(format!("netns {n}"));
        }
    }
    let cgroup_prefix = format!("cloak-lab-{name}-");
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for entry in std::fs::read_dir(hierarchy.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&cgroup_prefix)
            {
                left.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if cgroup.contains(&format!("/{cgroup_prefix}")) {
            left.push(format!("process {}", entry.file_name().to_string_lossy()));
        }
    }
    let dir = Path::new("/var/lib/cloak/lab").join(name);
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// Labs of earlier test binaries tear down after their owner exited; the sysctls are restored
/// when the last lab goes, so wait for the others first (bounded).
fn wait_for_other_labs() {
    eventually("other labs gone", Duration::from_mins(2), || {
        let others: Vec<String> = std::fs::read_dir("/var/lib/cloak/lab")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| cloak_lab::Lab::new(n).is_ok_and(|lab| lab.supervisor_alive()))
            .collect();
        if others.is_empty() {
            Ok(())
        } else {
            Err(format!("{others:?}"))
        }
    });
}

#[test]
fn up_twice_is_a_no_op_and_down_leaves_nothing_and_restores_the_kubelets_sysctls() {
    let _turn = labkit::serial();
    wait_for_other_labs();
    let before = sysctls();
    let name = labkit::unique_name('l');
    let lab = up(&name, 1).unwrap();
    let supervisor = std::fs::read_to_string(lab.lab.dir().join("supervisor.pid")).unwrap();
    assert_ne!(
        sysctls(),
        before,
        "the kubelet changes its sysctls (or this test checks nothing)"
    );

    let again = cloak_lab(&name, &["up", "--nodes", "1"]);
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already up"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(lab.lab.dir().join("supervisor.pid")).unwrap(),
        supervisor,
        "the second up started nothing"
    );
    let status = cloak_lab(&name, &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("n1    Ready"),
        "{status:?}"
    );

    let namespaces = netns_inodes(&name);
    let down = cloak_lab(&name, &["down"]);
    assert!(down.status.success(), "{down:?}");
    assert_eq!(leftovers(&name), Vec::<String>::new());
    assert_eq!(
        processes_in(&namespaces),
        Vec::<u32>::new(),
        "nothing runs in the lab's namespaces"
    );
    assert_eq!(sysctls(), before, "sysctls restored");
}

#[test]
fn a_sigkilled_up_is_reaped_by_the_next_down() {
    let _turn = labkit::serial();
    let name = labkit::unique_name('k');
    let mut up = Command::new(env!("CARGO_BIN_EXE_cloak"))
        .args(["lab", "up", "--nodes", "1", "--name", &name])
        .env("CLOAK_REPO", cloak_testkit::repo_path(""))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = Path::new("/var/lib/cloak/lab").join(&name);
    // Killed while cloak is being installed: the node runs containerd, the kubelet, containerd's
    // shims and CoreDNS's container, which only the lab's namespaces and cgroups lead to.
    eventually("the lab installing cloak", Duration::from_mins(2), || {
        let progress = std::fs::read_to_string(dir.join("progress")).unwrap_or_default();
        if progress.contains("begin\tcloak (helm install)") {
            Ok(())
        } else {
            Err(progress)
        }
    });
    let namespaces = netns_inodes(&name);
    let supervisor: i32 = std::fs::read_to_string(dir.join("supervisor.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = up.kill();
    let _ = up.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{supervisor}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivors = processes_in(&namespaces);
    assert!(
        !survivors.is_empty() && leftovers(&name).iter().any(|l| l.starts_with("process")),
        "a killed supervisor leaves processes in the lab's namespaces and cgroups (or this test checks nothing): {survivors:?}"
    );

    let down = cloak_lab(&name, &["down"]);
    assert!(down.status.success(), "{down:?}");
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(
        !said.contains(" 0 processes"),
        "down reaped the survivors: {said}"
    );
    assert!(
        !said.contains(" 0 network namespaces"),
        "and the namespaces: {said}"
    );
    assert_eq!(leftovers(&name), Vec::<String>::new(), "after: {said}");
    assert_eq!(
        processes_in(&namespaces),
        Vec::<u32>::new(),
        "after: {said}"
    );
}

/// The inodes of lab `name`'s network namespaces: they identify the namespaces after their
/// names are gone.
fn netns_inodes(name: &str) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("ck-{name}-");
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok().map(|m| m.ino()))
        .collect()
}

/// PIDs of the processes in one of the network namespaces `inodes`.
fn processes_in(inodes: &[u64]) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&m.ino()))
        })
        .collect()
}
