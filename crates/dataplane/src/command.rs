//! Running the kernel tools (`nft`, `ip`, `conntrack`): one place that feeds stdin, collects
//! stderr, bounds the time a tool may take, and turns a non-zero exit into an [`Error::Command`]
//! naming the command (never its stdin, which may carry keys).

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use crate::Error;

/// The longest a kernel tool may run. They answer in milliseconds; one that hangs (a wedged
/// netlink socket, a lock held by another tool) is killed, and its caller's apply fails and is
/// retried, instead of the node's only kernel thread waiting forever behind it.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `program args`, writing `stdin` to it; returns stdout.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, Error> {
    run_within(program, args, stdin, TIMEOUT)
}

/// [`run`], killing the tool after `limit`.
pub(crate) fn run_within(
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<String, Error> {
    let what = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(what()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(Error::io(what()))?;
    }
    // Waited for on a thread of its own, so this one can give up on it: the child is reaped
    // only there, so its PID stays its own until it is killed.
    let pid = child.id();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let Ok(out) = outcome.recv_timeout(limit) else {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = outcome.recv();
        return Err(Error::Command {
            command: what(),
            stderr: format!("no answer within {limit:?}: killed"),
        });
    };
    let out = out.map_err(Error::io(what()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: what(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `ip args`.
pub(crate) fn ip(args: &[&str]) -> Result<String, Error> {
    run("ip", args, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_that_hangs_is_killed_and_its_run_fails_naming_it() {
        let started = std::time::Instant::now();
        let err = run_within("sleep", &["30"], None, Duration::from_millis(200)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("sleep 30"), "{err}");
        assert!(err.to_string().contains("killed"), "{err}");
        assert_eq!(run("echo", &["ok"], None).unwrap(), "ok\n");
        assert_eq!(run("cat", &[], Some(b"in")).unwrap(), "in");
    }
}
