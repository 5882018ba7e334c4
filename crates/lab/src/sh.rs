//! Running the commands the lab is built from (`ip`, `nft`, `mount`, `kubectl`, `helm`), with
//! their standard error in the error when they fail.

use std::{
    ffi::OsStr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

/// Runs `argv` and returns its standard output.
pub(crate) fn run<S: AsRef<OsStr>>(argv: &[S]) -> Result<String> {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    output(&mut command)
}

/// Runs `command` and returns its standard output, or an error with its standard error.
pub(crate) fn output(command: &mut Command) -> Result<String> {
    let shown = show(command);
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Command {
            command: shown.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `argv` with `input` on its standard input.
pub(crate) fn run_with_input<S: AsRef<OsStr>>(argv: &[S], input: &str) -> Result<String> {
    use std::io::Write;
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    let shown = show(&command);
    let fail = |status: String, stderr: String| Error::Command {
        command: shown.clone(),
        status,
        stderr,
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail("not started".into(), e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| fail("writing stdin".into(), e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail("waiting".into(), e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(
            out.status.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// `ip -n <netns> args...`
pub(crate) fn ip(netns: &str, args: &[&str]) -> Result<String> {
    let mut command = vec!["ip", "-n", netns];
    command.extend_from_slice(args);
    run(&command)
}

/// `argv` run inside the named network namespace (and the caller's mount namespace: unlike
/// `ip netns exec`, `nsenter --net` leaves `/sys` as it is).
pub(crate) fn in_netns(netns: &str, argv: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut full = vec![
        "nsenter".to_owned(),
        format!("--net=/var/run/netns/{netns}"),
        "--".to_owned(),
    ];
    full.extend(argv);
    full
}

/// Loads an nftables script into `netns`.
pub(crate) fn nft(netns: &str, script: &str) -> Result<()> {
    run_with_input(&["ip", "netns", "exec", netns, "nft", "-f", "-"], script).map(drop)
}

/// Sets a sysctl inside `netns` (network sysctls are per namespace).
pub(crate) fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run(&[
        "ip",
        "netns",
        "exec",
        netns,
        "sysctl",
        "-q",
        "-w",
        &format!("{key}={value}"),
    ])
    .map(drop)
}

/// Polls `check` every `every` until it returns `Ok(Some(_))`, for at most `limit`. The last
/// "not yet" reason goes into the timeout error.
pub(crate) fn wait_for<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> std::result::Result<Option<T>, String>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(reason) => last = reason,
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                seconds: limit.as_secs(),
                detail: if last.is_empty() {
                    String::new()
                } else {
                    format!(": {last}")
                },
            });
        }
        std::thread::sleep(every);
    }
}

fn show(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
