//! Running the kernel tools (`nft`, `ip`): one place that feeds stdin, collects stderr and turns a
//! non-zero exit into an [`Error::Command`] naming the command (never its stdin, which may carry
//! keys).

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::Error;

/// Runs `program args`, writing `stdin` to it; returns stdout.
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, Error> {
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
    let out = child.wait_with_output().map_err(Error::io(what()))?;
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
