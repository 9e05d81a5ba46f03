//! Starting and stopping the processes a benchmark runs: the servers under test, the
//! cluster's nodes and Redis, the loadgens. Owns how a child is started (pinned with
//! `taskset`, its output in a log file) and that it always stops; knows nothing of what
//! the child measures.
//!
//! Every child gets its own process group, so that a stop reaches the processes it
//! started itself (the loadgen's workers) and a Ctrl-C in the terminal reaches only the
//! harness, which then stops its children in order. Every child also gets the kernel's
//! parent-death signal: should the harness die without unwinding (SIGKILL), its
//! children die with it. That signal follows the *thread* that started the child, so
//! start children from the main thread.

use std::ffi::OsString;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How to start one child process.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Names the process in messages.
    pub label: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// `taskset -c` CPU list; `None` runs unpinned.
    pub cpus: Option<String>,
    /// Where stderr goes (and stdout, unless `stdout` is set).
    pub log: PathBuf,
    pub stdout: Option<PathBuf>,
}

impl Spawn {
    pub fn new(label: impl Into<String>, program: impl Into<PathBuf>, log: &Path) -> Spawn {
        Spawn {
            label: label.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cpus: None,
            log: log.to_path_buf(),
            stdout: None,
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Spawn
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Spawn {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn pinned(mut self, cpus: Option<String>) -> Spawn {
        self.cpus = cpus;
        self
    }

    pub fn stdout_to(mut self, path: &Path) -> Spawn {
        self.stdout = Some(path.to_path_buf());
        self
    }
}

/// A running child; stopped (its whole process group) when dropped.
pub struct Proc {
    child: Child,
    label: String,
    /// How long a stop waits after SIGTERM before SIGKILL.
    grace: Duration,
    /// Set once the child has been waited for.
    status: Option<std::process::ExitStatus>,
    /// Set once a stop has run to its end.
    stopped: bool,
}

impl Proc {
    pub fn spawn(spec: &Spawn) -> anyhow::Result<Proc> {
        if !spec.program.exists() && spec.program.components().count() > 1 {
            bail!("{} not found", spec.program.display());
        }
        let mut cmd = match &spec.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&spec.program);
                c
            }
            None => Command::new(&spec.program),
        };
        cmd.args(&spec.args);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let log = File::create(&spec.log).with_context(|| format!("creating {}", spec.log.display()))?;
        let out = match &spec.stdout {
            Some(p) => File::create(p).with_context(|| format!("creating {}", p.display()))?,
            None => log.try_clone()?,
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(log);
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.label, spec.program.display()))?;
        Ok(Proc {
            child,
            label: spec.label.clone(),
            grace: Duration::from_secs(5),
            status: None,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long a stop waits between SIGTERM and SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Proc {
        self.grace = grace;
        self
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn alive(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Signals the process group; it outlives its leader while a worker of the
    /// leader lives (and its id is not reused before the last member is gone).
    fn signal_group(&self, sig: libc::c_int) {
        // SAFETY: signalling the process group our own child leads.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), sig) };
    }
}

/// Stops every process: SIGTERM to all of their process groups at once, up to the
/// longest grace for them to exit, then SIGKILL to what is left.
pub fn stop_all(procs: &mut [&mut Proc]) {
    for p in procs.iter().filter(|p| !p.stopped) {
        p.signal_group(libc::SIGTERM);
    }
    let grace = procs
        .iter()
        .filter(|p| !p.stopped)
        .map(|p| p.grace)
        .max()
        .unwrap_or_default();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter_mut().any(|p| p.alive()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut().filter(|p| !p.stopped) {
        p.signal_group(libc::SIGKILL);
        if p.status.is_none() {
            p.status = p.child.wait().ok();
        }
        p.stopped = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop_all(&mut [self]);
    }
}

/// A child that listens on a TCP port on 127.0.0.1.
pub struct Server {
    pub proc: Proc,
    pub port: u16,
}

impl Server {
    /// Starts the process; does not wait for it to listen ([`Server::wait_listening`]).
    pub fn spawn(spec: &Spawn, port: u16) -> anyhow::Result<Server> {
        Ok(Server {
            proc: Proc::spawn(spec)?,
            port,
        })
    }

    /// Starts the process and waits (15 s at most) until it accepts connections.
    pub fn start(spec: &Spawn, port: u16) -> anyhow::Result<Server> {
        let mut server = Server::spawn(spec, port)?;
        server.wait_listening(Instant::now() + Duration::from_secs(15), &spec.log)?;
        // Let the probe connection go away and the RSS settle.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = server.proc.exited() {
            bail!(
                "{} exited at start ({status}); see {}",
                spec.label,
                spec.log.display()
            );
        }
        Ok(server)
    }

    /// Waits until the port accepts a connection, the process exits or `deadline`.
    pub fn wait_listening(&mut self, deadline: Instant, log: &Path) -> anyhow::Result<()> {
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.proc.exited() {
                bail!(
                    "{} exited at start ({status}); see {}",
                    self.proc.label,
                    log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {} in time", self.proc.label, self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_process_group_is_gone() {
        let dir = std::env::temp_dir().join(format!("ringcast-bench-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A shell whose own child would outlive it if only the shell were signalled.
        let spec = Spawn::new("sleeper", "/bin/sh", &dir.join("sleeper.log"))
            .args(["-c", "sleep 30 & echo $! ; wait"])
            .stdout_to(&dir.join("sleeper.out"));
        let mut p = Proc::spawn(&spec).unwrap().with_grace(Duration::from_millis(200));
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild: u32 = loop {
            let text = std::fs::read_to_string(dir.join("sleeper.out")).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the shell never printed its child's pid"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(p.alive());
        drop(p);
        // Gone, or a zombie waiting for whoever inherited it to reap it.
        let gone = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(grandchild), "the child's own child {grandchild} survived");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
