//! The supervisor's processes: each started under `setpriv --pdeathsig KILL` (it dies with the
//! supervisor's main thread, whatever kills it), logging to `logs/<name>.log`, its PID recorded
//! in `pids/<name>`; stopped in reverse order of start, SIGTERM then SIGKILL.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Whether it still runs; `Err` with its log's tail when it exited.
    pub(crate) fn check(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Other(format!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 25)
            ))),
            Err(e) => Err(Error::io(&self.log)(e)),
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process the supervisor started, in order.
#[derive(Debug)]
pub(crate) struct Procs {
    logs: PathBuf,
    pids: PathBuf,
    list: Vec<Proc>,
}

impl Procs {
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        let logs = dir.join("logs");
        let pids = dir.join("pids");
        for d in [&logs, &pids] {
            fs::create_dir_all(d).map_err(Error::io(d))?;
        }
        Ok(Self {
            logs,
            pids,
            list: Vec::new(),
        })
    }

    pub(crate) fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts `argv` (through `setpriv --pdeathsig KILL`) with `cwd`, logging to its own file.
    pub(crate) fn spawn(&mut self, name: &str, argv: &[String], cwd: Option<&Path>) -> Result<u32> {
        let log = self.log_path(name);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(Error::io(&log))?;
        let err = file.try_clone().map_err(Error::io(&log))?;
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = command.spawn().map_err(|e| Error::Command {
            command: argv.join(" "),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
        let pid = child.id();
        let pidfile = self.pids.join(name);
        fs::write(&pidfile, pid.to_string()).map_err(Error::io(&pidfile))?;
        self.list.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
        Ok(pid)
    }

    /// The first process that exited, with its log.
    pub(crate) fn check_all(&mut self) -> Result<()> {
        self.list.iter_mut().try_for_each(Proc::check)
    }

    /// Stops every process, last started first.
    pub(crate) fn stop_all(&mut self) {
        while let Some(mut p) = self.list.pop() {
            p.stop();
            let _ = fs::remove_file(self.pids.join(&p.name));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}

pub(crate) fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// `"<pid> <start time>"` (field 22 of `/proc/<pid>/stat`): tells a live process from an
/// unrelated one that reused its PID.
pub(crate) fn identity(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let started_at = after_comm.split_whitespace().nth(19)?;
    Some(format!("{pid} {started_at}"))
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
