//! The supervisor's processes: each started under `setpriv --pdeathsig KILL` (it dies with the
//! supervisor's main thread, whatever kills it), logging to `logs/<name>.log`, its PID recorded
//! in `pids/<name>`; stopped together, SIGTERM (the last started first) then SIGKILL.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

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

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught until [`StopSignals::wait`] takes one. Caught, never
/// blocked: the supervisor's children started with its blocked mask (measured: `SigBlk:
/// 0x4003` in `/proc/<pid>/status` of its `cloak portfwd`, whose SIGTERM stayed pending; the
/// test below, given a spawning thread that blocks SIGTERM, fails so), so `cloak portfwd`,
/// kube-apiserver and OpenVPN ignored their SIGTERM until killed 10 s later. A caught signal
/// is reset to its default in a child at exec.
pub(crate) struct StopSignals {
    runtime: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let failed = |e: std::io::Error| Error::Other(format!("catching signals: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(failed)?;
        let _in = runtime.enter();
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(failed)?,
            interrupt: signal(SignalKind::interrupt()).map_err(failed)?,
            hangup: signal(SignalKind::hangup()).map_err(failed)?,
            runtime,
        })
    }

    /// Until one of them comes (at once if one came since [`Self::install`]).
    pub(crate) fn wait(self) {
        let Self {
            runtime,
            mut term,
            mut interrupt,
            mut hangup,
        } = self;
        runtime.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
                _ = hangup.recv() => {}
            }
        });
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

    /// Stops every process: all told at once (SIGTERM, the last started first) and given one
    /// [`STOP_GRACE`] together, then whatever still runs is killed. (One grace each, in turn,
    /// took a lab a minute to stop.)
    pub(crate) fn stop_all(&mut self) {
        for p in self.list.iter_mut().rev() {
            if p.running() {
                signal(p.child.id(), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && self.list.iter_mut().any(Proc::running) {
            std::thread::sleep(Duration::from_millis(50));
        }
        while let Some(mut p) = self.list.pop() {
            if p.running() {
                eprintln!("{} still ran {STOP_GRACE:?} after SIGTERM: killed", p.name);
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The signals blocked (`SigBlk`) and ignored (`SigIgn`) of process `pid`, as bit masks.
    fn masks(pid: u32) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        (field("SigBlk:"), field("SigIgn:"))
    }

    #[test]
    fn a_process_started_while_stop_signals_are_caught_stops_at_its_sigterm() {
        let dir = std::env::temp_dir().join(format!("cloak-procs-{}", std::process::id()));
        let signals = StopSignals::install().unwrap();
        let mut procs = Procs::new(&dir).unwrap();
        let pid = procs
            .spawn("sleeper", &["sleep".into(), "30".into()], None)
            .unwrap();
        // Until setpriv has exec'd sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
            assert!(Instant::now() < deadline, "sleep never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let term = 1u64 << (Signal::SIGTERM as u64 - 1);
        let (blocked, ignored) = masks(pid);
        assert_eq!(
            blocked & term,
            0,
            "SIGTERM blocked in the child: {blocked:#x}"
        );
        assert_eq!(
            ignored & term,
            0,
            "SIGTERM ignored in the child: {ignored:#x}"
        );
        // So it goes at its SIGTERM, not at the SIGKILL after the grace.
        let started = Instant::now();
        procs.stop_all();
        assert!(
            started.elapsed() < STOP_GRACE / 2,
            "{:?}",
            started.elapsed()
        );
        drop(signals);
        let _ = fs::remove_dir_all(&dir);
    }
}
