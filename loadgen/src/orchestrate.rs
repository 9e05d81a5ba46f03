//! Process orchestration: the parent runs one slice in-process and the rest in worker
//! processes of the same binary; workers report JSON lines on stdout and take
//! `release` on stdin. The parent drives the phases, samples the server, merges.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::report::{self, ChurnReport, ConnectReport, FanoutReport, RoomsReport, ServerFigures};
use crate::run::{self, Job, Pace, PubShared, Shared, SliceReport};
use crate::sys::{self, unix_nanos};
use crate::{hard_deadline, job_of, Cli, Cmd};

/// What a slice tells its parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    /// Every connection of the slice is joined or has failed (or the ramp timed out).
    Ramped(Progress),
    Done {
        report: Box<SliceReport>,
    },
    Fatal {
        error: String,
    },
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub attempted: u64,
    pub joined: u64,
    pub failed: u64,
    pub ended_early: u64,
    pub deliveries: u64,
    pub subscribers_complete: u64,
    #[serde(default)]
    pub sent: u64,
    #[serde(default)]
    pub senders_done: u64,
    #[serde(default)]
    pub tasks_done: u64,
}

impl Progress {
    fn of(s: &Shared) -> Self {
        Progress {
            attempted: s.attempted.load(Relaxed),
            joined: s.joined.load(Relaxed),
            failed: s.failed.load(Relaxed),
            ended_early: s.ended_early.load(Relaxed),
            deliveries: s.deliveries.load(Relaxed),
            subscribers_complete: s.subscribers_complete.load(Relaxed),
            sent: s.sent.load(Relaxed),
            senders_done: s.senders_done.load(Relaxed),
            tasks_done: s.tasks_done.load(Relaxed),
        }
    }

    fn add(&mut self, o: &Progress) {
        self.attempted += o.attempted;
        self.joined += o.joined;
        self.failed += o.failed;
        self.ended_early += o.ended_early;
        self.deliveries += o.deliveries;
        self.subscribers_complete += o.subscribers_complete;
        self.sent += o.sent;
        self.senders_done += o.senders_done;
        self.tasks_done += o.tasks_done;
    }
}

/// Ends the process after `after`, whatever it is doing: runs are always bounded.
fn watchdog(after: Duration, who: &'static str) {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        eprintln!(
            "ringcast-loadgen {who}: run exceeded its time bound of {:.0}s; exiting",
            after.as_secs_f64()
        );
        std::process::exit(3);
    });
}

/// Starts a slice: the executors in one thread, a monitor that emits progress and
/// the ramp end. Setting `stop` on the returned `Shared` ends the slice; its report
/// then arrives as `Event::Done`.
fn start_slice(
    job: Arc<Job>,
    start: u64,
    count: u64,
    interval: Duration,
    emit: Arc<dyn Fn(Event) + Send + Sync>,
) -> Arc<Shared> {
    let shared = Arc::new(Shared::default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ramp_limit = job.ramp_limit.unwrap_or_else(|| {
        Duration::from_secs_f64(
            count as f64 / (job.rate * count as f64 / job.total.max(1) as f64).max(0.001)
                + 3.0 * job.stage_timeout.as_secs_f64()
                + 5.0,
        )
    });
    {
        let (shared, done, emit, job) = (shared.clone(), done.clone(), emit.clone(), job.clone());
        std::thread::spawn(move || {
            let r = run::run_slice(job, shared, start, count);
            done.store(true, Relaxed);
            match r {
                Ok(report) => emit(Event::Done {
                    report: Box::new(report),
                }),
                Err(e) => emit(Event::Fatal {
                    error: format!("{e:#}"),
                }),
            }
        });
    }
    {
        let (shared, emit) = (shared.clone(), emit.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut ramped = false;
            let mut watch = run::StallWatch::default();
            while !done.load(Relaxed) {
                std::thread::sleep(interval);
                watch.check(&shared);
                let p = Progress::of(&shared);
                if !ramped && (p.joined + p.failed >= count || t0.elapsed() > ramp_limit) {
                    ramped = true;
                    emit(Event::Ramped(p));
                } else {
                    emit(Event::Progress(p));
                }
            }
        });
    }
    shared
}

/// `START:COUNT`
fn parse_range(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s.split_once(':').context("--worker-of START:COUNT")?;
    Ok((a.parse()?, b.parse()?))
}

/// A command from the parent to a worker, one per line on its stdin.
#[derive(Debug, PartialEq, Eq)]
enum WorkerCmd {
    /// Rooms: start sending; presence: start looking, timing from these unix nanos.
    Go(u64),
    /// Close every connection and send the final report.
    Release,
    Other,
}

fn parse_command(line: &str) -> WorkerCmd {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("go") {
        let rest = rest.trim();
        if rest.is_empty() {
            return WorkerCmd::Go(0);
        }
        if let Ok(n) = rest.parse() {
            return WorkerCmd::Go(n);
        }
    }
    match line {
        "release" => WorkerCmd::Release,
        _ => WorkerCmd::Other,
    }
}

/// A worker process: runs its slice, reports on stdout, starts sending on `go`, stops
/// on `release` or when its parent goes away (stdin closed).
pub fn worker_main(cli: &Cli, range: &str) -> anyhow::Result<bool> {
    let (start, count) = parse_range(range)?;
    let (job, _) = job_of(cli)?;
    sys::raise_nofile();
    watchdog(hard_deadline(cli) + Duration::from_secs(15), "worker");
    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let emit: Arc<dyn Fn(Event) + Send + Sync> = Arc::new(move |e| {
        let _ = tx.send(e);
    });
    let shared = start_slice(Arc::new(job), start, count, Duration::from_millis(100), emit);
    {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => match parse_command(&line) {
                        WorkerCmd::Go(at) => {
                            shared.go_nanos.store(at, Relaxed);
                            shared.go.store(true, Relaxed);
                        }
                        WorkerCmd::Release => break,
                        WorkerCmd::Other => {}
                    },
                }
            }
            shared.stop.store(true, Relaxed);
        });
    }
    let stdout = std::io::stdout();
    for ev in rx {
        let last = matches!(ev, Event::Done { .. } | Event::Fatal { .. });
        let mut out = stdout.lock();
        serde_json::to_writer(&mut out, &ev)?;
        out.write_all(b"\n")?;
        out.flush()?;
        if last {
            break;
        }
    }
    Ok(true)
}

enum PeerCtl {
    Local(Arc<Shared>),
    Worker(Option<ChildStdin>),
}

/// The parent's view of every slice.
struct Peers {
    ctl: Vec<PeerCtl>,
    children: Vec<Child>,
    rx: Receiver<(usize, Event)>,
    progress: Vec<Progress>,
    ramped: Vec<bool>,
    done: Vec<Option<SliceReport>>,
    fatal: Vec<String>,
}

impl Peers {
    /// Slice 0 in-process, the others in workers.
    fn start(job: Arc<Job>, slices: &[(u64, u64)]) -> anyhow::Result<Peers> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut ctl = Vec::new();
        let mut children = Vec::new();
        let exe = std::env::current_exe().context("cannot find my own executable")?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        for (i, &(start, count)) in slices.iter().enumerate() {
            if i == 0 {
                let tx: Sender<(usize, Event)> = tx.clone();
                let emit: Arc<dyn Fn(Event) + Send + Sync> = Arc::new(move |e| {
                    let _ = tx.send((0, e));
                });
                ctl.push(PeerCtl::Local(start_slice(
                    job.clone(),
                    start,
                    count,
                    Duration::from_millis(50),
                    emit,
                )));
                continue;
            }
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--worker-of")
                .arg(format!("{start}:{count}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("cannot start worker process {i}"))?;
            let stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut finished = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            finished |= matches!(ev, Event::Done { .. } | Event::Fatal { .. });
                            let _ = tx.send((i, ev));
                        }
                        Err(e) => {
                            let _ = tx.send((
                                i,
                                Event::Fatal {
                                    error: format!("worker {i} sent an unreadable line: {e}"),
                                },
                            ));
                        }
                    }
                }
                if !finished {
                    let _ = tx.send((
                        i,
                        Event::Fatal {
                            error: format!("worker {i} exited without a report"),
                        },
                    ));
                }
            });
            ctl.push(PeerCtl::Worker(child.stdin.take()));
            children.push(child);
        }
        let n = slices.len();
        Ok(Peers {
            ctl,
            children,
            rx,
            progress: vec![Progress::default(); n],
            ramped: vec![false; n],
            done: vec![None; n],
            fatal: Vec::new(),
        })
    }

    /// Handles events for at most `wait`.
    fn pump(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((i, ev)) => match ev {
                    Event::Progress(p) => self.progress[i] = p,
                    Event::Ramped(p) => {
                        self.progress[i] = p;
                        self.ramped[i] = true;
                    }
                    Event::Done { report } => {
                        self.ramped[i] = true;
                        self.done[i] = Some(*report);
                    }
                    Event::Fatal { error } => {
                        self.ramped[i] = true;
                        if self.done[i].is_none() {
                            self.done[i] = Some(SliceReport::default());
                        }
                        self.fatal.push(error);
                    }
                },
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    fn total(&self) -> Progress {
        let mut t = Progress::default();
        for p in &self.progress {
            t.add(p);
        }
        t
    }

    fn all_ramped(&self) -> bool {
        self.ramped.iter().all(|&r| r)
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(Option::is_some)
    }

    /// Rooms: every slice starts sending.
    /// Every slice starts (rooms: sending; presence: looking for the watched key,
    /// timing from `at_nanos`).
    fn go(&mut self, at_nanos: u64) {
        for c in &mut self.ctl {
            match c {
                PeerCtl::Local(s) => {
                    s.go_nanos.store(at_nanos, Relaxed);
                    s.go.store(true, Relaxed);
                }
                PeerCtl::Worker(Some(w)) => {
                    let _ = w.write_all(format!("go {at_nanos}\n").as_bytes());
                    let _ = w.flush();
                }
                PeerCtl::Worker(None) => {}
            }
        }
    }

    fn release(&mut self) {
        for c in &mut self.ctl {
            match c {
                PeerCtl::Local(s) => s.stop.store(true, Relaxed),
                PeerCtl::Worker(stdin) => {
                    if let Some(mut w) = stdin.take() {
                        let _ = w.write_all(b"release\n");
                        // Dropping stdin closes it: a second stop signal.
                    }
                }
            }
        }
    }

    /// Waits (bounded) for every report and merges them.
    fn collect(&mut self, limit: Duration) -> SliceReport {
        let deadline = Instant::now() + limit;
        while !self.all_done() && Instant::now() < deadline {
            self.pump(Duration::from_millis(50));
        }
        let mut merged = SliceReport::default();
        for (i, d) in self.done.iter().enumerate() {
            match d {
                Some(r) => merged.merge(r),
                None => {
                    self.fatal.push(format!("slice {i} sent no report in time"));
                    if let PeerCtl::Local(shared) = &self.ctl[i] {
                        // Say what its executors are doing, and keep the stalls seen.
                        for b in shared.beats.lock().unwrap().iter() {
                            eprintln!("slice {i} without a report: {}", sys::thread_report(b.tid));
                        }
                        for l in sys::uring_report() {
                            eprintln!("  {l}");
                        }
                        report::add_counts(&mut merged.executor_stalls, &shared.stalls.lock().unwrap());
                    }
                }
            }
        }
        for c in &mut self.children {
            let waited = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if waited.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        merged
    }
}

/// Splits `n` connections over processes of at most `cap` each (the parent's own
/// slice leaves room for `parent_extra` connections).
fn plan_slices(n: u64, cap: u64, parent_extra: u64) -> Vec<(u64, u64)> {
    let mut slices = Vec::new();
    let first = n.min(cap.saturating_sub(parent_extra));
    slices.push((0, first));
    let mut start = first;
    while start < n {
        let c = (n - start).min(cap);
        slices.push((start, c));
        start += c;
    }
    slices
}

/// Checks everything that can be known before the first connection and says what is
/// missing. Returns the slices.
fn preflight(cli: &Cli, job: &Job, parent_extra: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let (soft, hard) = sys::raise_nofile();
    let default_cap = soft.saturating_sub(100);
    let cap = cli.max_per_process.unwrap_or(default_cap).min(default_cap);
    if cap <= parent_extra {
        bail!(
            "too few file descriptors: RLIMIT_NOFILE is {soft} (hard {hard}); a process needs \
             100 spare plus its connections. Raise it (ulimit -n) and retry."
        );
    }
    let slices = plan_slices(job.total, cap, parent_extra);
    if slices.len() > 64 {
        bail!(
            "{} connections at {cap} per process would need {} processes (limit 64); raise \
             RLIMIT_NOFILE (ulimit -n, now {soft}) or --max-per-process",
            job.total,
            slices.len()
        );
    }
    let ports = sys::ephemeral_ports();
    let per_dest = if job.sources.is_empty() {
        1
    } else {
        job.sources.len() as u64
    };
    if job.total + parent_extra > ports * per_dest {
        bail!(
            "{} connections need more source ports than {} source address(es) x {ports} \
             ephemeral ports; raise --sources (loopback targets only) or \
             net.ipv4.ip_local_port_range",
            job.total + parent_extra,
            per_dest
        );
    }
    if let Some(last) = job.sources.last() {
        std::net::TcpListener::bind((*last, 0))
            .with_context(|| format!("cannot bind source address {last}; is 127.0.0.0/8 routed to lo?"))?;
    }
    match &job.target.tls {
        None => match std::net::TcpStream::connect_timeout(&job.target.addr, Duration::from_secs(3)) {
            Ok(_) => {}
            Err(e) => bail!("no server reachable at {}: {e}", job.target.addr),
        },
        // One handshake first, so that a certificate the flags do not trust is one
        // clear error rather than N failed connections.
        Some(tls) => crate::tls::probe(job.target.addr, tls, Duration::from_secs(3))?,
    }
    if let Some(pid) = cli.server_pid {
        if sys::sample(pid).is_none() {
            bail!("--server-pid {pid}: cannot read /proc/{pid}/status and stat");
        }
        if let Some(limit) = sys::process_nofile(pid) {
            if limit < job.total + parent_extra + 50 {
                eprintln!(
                    "warning: the server (pid {pid}) may open only {limit} files; {} connections \
                     will fail past that",
                    job.total + parent_extra
                );
            }
        }
    }
    let src = match (job.sources.first(), job.sources.last()) {
        (Some(a), Some(b)) => format!("source addresses {a}..{b}"),
        _ => "kernel-chosen source address".to_string(),
    };
    eprintln!(
        "plan: {} connection(s) to {} in {} process(es) x {} executor(s); RLIMIT_NOFILE {soft}, \
         at most {cap} per process; {src}",
        job.total + parent_extra,
        job.target.addr,
        slices.len(),
        job.cores,
    );
    Ok(slices)
}

fn bar(cli: &Cli, len: u64, template: &str) -> ProgressBar {
    let pb = if cli.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

fn sample(pid: Option<u32>) -> Option<sys::ProcSample> {
    pid.and_then(sys::sample)
}

/// Runs the command; `Ok(false)` when the run finished but reported problems.
pub fn parent_main(cli: &Cli) -> anyhow::Result<bool> {
    let deadline = hard_deadline(cli);
    watchdog(deadline, "parent");
    if let Cmd::Recover(a) = &cli.cmd {
        return crate::recover::main(cli, a);
    }
    if let Cmd::Newcomer(a) = &cli.cmd {
        return crate::newcomer::main(cli, a);
    }
    let (job, _) = job_of(cli)?;
    match &cli.cmd {
        Cmd::Connect(a) => connect(cli, job, a),
        Cmd::Fanout(a) => fanout(cli, job, a),
        Cmd::Rooms(a) => rooms(cli, job, a),
        Cmd::Churn(a) => churn(cli, job, a),
        Cmd::Presence(a) => presence(cli, job, a),
        Cmd::Newcomer(_) | Cmd::Recover(_) => unreachable!("handled above"),
    }
}

/// The arm time in an arm file: its unix nanoseconds, or now when it holds none.
fn arm_time(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(unix_nanos)
}

fn presence(cli: &Cli, job: Job, a: &crate::PresenceArgs) -> anyhow::Result<bool> {
    let slices = preflight(cli, &job, 0)?;
    let job = Arc::new(job);
    let before = sample(cli.server_pid);
    let t_start = unix_nanos();
    eprintln!(
        "ramping to {} members at {}/s at most, {} joins under way at most, on {} ...",
        a.connections, a.rate, a.window, a.topic
    );
    let mut peers = Peers::start(job.clone(), &slices)?;
    let at_full = ramp(
        cli,
        &mut peers,
        a.connections,
        "ramp",
        a.ramp_timeout + Duration::from_secs(5),
    );
    let t_ramped = unix_nanos();
    let full = sample(cli.server_pid);
    // The line `ringcast-bench cluster` waits for.
    eprintln!(
        "up: {} joined, {} failed; holding until {} (at most {:.0}s) ...",
        at_full.joined,
        at_full.failed,
        a.release_file
            .as_ref()
            .map_or("the hold ends".to_string(), |p| p.display().to_string()),
        a.max_hold.as_secs_f64()
    );
    let t0 = Instant::now();
    let mut armed = None;
    let mut last_note = Instant::now();
    while t0.elapsed() < a.max_hold {
        peers.pump(Duration::from_millis(100));
        if armed.is_none() && a.arm_file.as_ref().is_some_and(|p| p.exists()) {
            let at = arm_time(a.arm_file.as_ref().expect("checked"));
            peers.go(at);
            armed = Some(at);
            eprintln!("armed: looking for {:?} in diffs, times from {at}", a.watch);
        }
        if a.release_file.as_ref().is_some_and(|p| p.exists()) {
            eprintln!("released");
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(30) {
            last_note = Instant::now();
            let p = peers.total();
            eprintln!(
                "holding: {} connected, {} ended early",
                p.joined - p.ended_early,
                p.ended_early
            );
        }
    }
    let at_hold_end = peers.total();
    let (merged, after_hold, after_close) =
        end_hold(cli, &mut peers, a.connections, &at_full, t_start, t_ramped);
    let server = cli.server_pid.map(|pid| ServerFigures {
        pid,
        before,
        full,
        after_hold,
        after_close,
        before_publish: None,
        after_publish: None,
    });
    let as_connect = crate::ConnectArgs {
        url: a.url.clone(),
        connections: a.connections,
        rate: a.rate,
        topic: a.topic.clone(),
        topics: 1,
        hold: t0.elapsed(),
    };
    let mut rep = ConnectReport::build(
        &as_connect,
        &job,
        slices.len(),
        &merged,
        t_start,
        at_hold_end.joined - at_hold_end.ended_early,
        server,
        peers.fatal.clone(),
    );
    rep.command = "presence".into();
    rep.presence = Some(report::PresenceFigures::of(
        &merged.presence,
        a.watch.clone(),
        armed,
    ));
    report::print_connect(&rep);
    if let Some(path) = &cli.json {
        report::write_json(path, &rep)?;
    }
    Ok(rep.problems.is_empty())
}

/// Ends a hold: samples the server, releases the slices and collects their reports,
/// then samples again once they closed. Returns the merged report and both samples.
fn end_hold(
    cli: &Cli,
    peers: &mut Peers,
    connections: u64,
    at_full: &Progress,
    t_start: u64,
    t_ramped: u64,
) -> (SliceReport, Option<sys::ProcSample>, Option<sys::ProcSample>) {
    let after_hold = sample(cli.server_pid);
    peers.release();
    // Closing many connections on a starved box takes a while: the million-connection
    // run (load average 100) needed more than a second per 1,000; allow one per 250.
    let mut merged = peers.collect(Duration::from_secs(60 + connections / 250));
    if merged.joined < at_full.joined {
        // A slice's final report did not arrive in time; its live counts did, and its
        // last join was before the ramp was seen complete.
        merged.attempted = merged.attempted.max(at_full.attempted);
        merged.joined = at_full.joined;
        merged.failed = merged.failed.max(at_full.failed);
        merged.last_join_nanos = merged.last_join_nanos.max(t_ramped);
        if merged.first_attempt_nanos == 0 {
            merged.first_attempt_nanos = t_start;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after_close = sample(cli.server_pid);
    (merged, after_hold, after_close)
}

fn ramp(cli: &Cli, peers: &mut Peers, total: u64, what: &str, limit: Duration) -> Progress {
    let pb = bar(
        cli,
        total,
        &format!("{what} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {{msg}}"),
    );
    let t0 = Instant::now();
    while !peers.all_ramped() && t0.elapsed() < limit {
        peers.pump(Duration::from_millis(100));
        let p = peers.total();
        pb.set_position(p.joined + p.failed);
        pb.set_message(format!("joined {} failed {}", p.joined, p.failed));
    }
    pb.finish_and_clear();
    if !peers.all_ramped() {
        peers
            .fatal
            .push(format!("ramp did not finish within {:.0}s", limit.as_secs_f64()));
    }
    peers.total()
}

fn connect(cli: &Cli, job: Job, a: &crate::ConnectArgs) -> anyhow::Result<bool> {
    let slices = preflight(cli, &job, 0)?;
    let job = Arc::new(job);
    let before = sample(cli.server_pid);
    let t_start = unix_nanos();
    eprintln!(
        "ramping to {} connections at {}/s on {} ...",
        a.connections, a.rate, a.topic
    );
    let mut peers = Peers::start(job.clone(), &slices)?;
    let ramp_limit =
        Duration::from_secs_f64(a.connections as f64 / a.rate + 3.0 * job.stage_timeout.as_secs_f64() + 10.0);
    let at_full = ramp(cli, &mut peers, a.connections, "ramp", ramp_limit);
    let t_ramped = unix_nanos();
    let full = sample(cli.server_pid);
    eprintln!(
        "up: {} joined, {} failed; holding {:.1}s ...",
        at_full.joined,
        at_full.failed,
        a.hold.as_secs_f64()
    );
    let pb = bar(
        cli,
        a.hold.as_millis() as u64,
        "hold [{elapsed_precise}] {bar:40} {msg}",
    );
    let t0 = Instant::now();
    while t0.elapsed() < a.hold {
        peers.pump(Duration::from_millis(100).min(a.hold.saturating_sub(t0.elapsed())));
        let p = peers.total();
        pb.set_position(t0.elapsed().as_millis() as u64);
        pb.set_message(format!(
            "connected {} ended {}",
            p.joined - p.ended_early,
            p.ended_early
        ));
    }
    pb.finish_and_clear();
    let at_hold_end = peers.total();
    let (merged, after_hold, after_close) =
        end_hold(cli, &mut peers, a.connections, &at_full, t_start, t_ramped);
    let server = cli.server_pid.map(|pid| ServerFigures {
        pid,
        before,
        full,
        after_hold,
        after_close,
        before_publish: None,
        after_publish: None,
    });
    let rep = ConnectReport::build(
        a,
        &job,
        slices.len(),
        &merged,
        t_start,
        at_hold_end.joined - at_hold_end.ended_early,
        server,
        peers.fatal.clone(),
    );
    report::print_connect(&rep);
    if let Some(path) = &cli.json {
        report::write_json(path, &rep)?;
    }
    Ok(rep.problems.is_empty())
}

fn fanout(cli: &Cli, job: Job, a: &crate::FanoutArgs) -> anyhow::Result<bool> {
    // The parent also holds the publisher and the sample subscriber.
    let slices = preflight(cli, &job, 2)?;
    let job = Arc::new(job);
    eprintln!(
        "ramping {} subscribers of {} at {}/s ...",
        a.subscribers, a.topic, a.connect_rate
    );
    let mut peers = Peers::start(job.clone(), &slices)?;
    let ramp_limit = Duration::from_secs_f64(
        a.subscribers as f64 / a.connect_rate + 3.0 * job.stage_timeout.as_secs_f64() + 10.0,
    );
    let ramped = ramp(cli, &mut peers, a.subscribers, "subscribers", ramp_limit);
    let full = sample(cli.server_pid);
    let pace = if a.rate > 0.0 {
        Pace::Rate(a.rate)
    } else {
        Pace::Window(a.window)
    };
    eprintln!(
        "{} subscribers joined ({} failed); publishing {} messages ({}) ...",
        ramped.joined,
        ramped.failed,
        a.messages,
        match pace {
            Pace::Rate(r) => format!("{r}/s"),
            Pace::Window(w) => format!("as fast as possible, window {w}"),
        }
    );
    let ps = Arc::new(PubShared::default());
    let publish_to = match &a.publish_url {
        Some(url) => crate::client::Target {
            compress: job.target.compress,
            ..crate::parse_url(url, crate::trust_of(cli))?
        },
        None => job.target.clone(),
    };
    let publisher = run::run_publisher(
        job.clone(),
        publish_to,
        ps.clone(),
        a.messages,
        pace,
        cli.server_pid,
        a.pad,
    )?;
    let expected = ramped.joined * a.messages;
    let pb = bar(
        cli,
        expected.max(1),
        "deliveries [{elapsed_precise}] {bar:40} {pos}/{len} {per_sec} {msg}",
    );
    // Publisher connects (bounded by the stage timeouts), then publishes.
    let connect_limit = 6.0 * job.stage_timeout.as_secs_f64() + 5.0;
    let t0 = Instant::now();
    let mut publish_started: Option<Instant> = None;
    let mut sending_done: Option<Instant> = None;
    let mut why_stopped = "all deliveries arrived";
    loop {
        peers.pump(Duration::from_millis(20));
        let p = peers.total();
        pb.set_position(p.deliveries);
        pb.set_message(format!("sent {}", ps.sent.load(Relaxed)));
        if ps.failed.load(Relaxed) {
            why_stopped = "the publisher failed";
            break;
        }
        if publish_started.is_none() && ps.publishing.load(Relaxed) {
            publish_started = Some(Instant::now());
        }
        match publish_started {
            None if t0.elapsed().as_secs_f64() > connect_limit => {
                ps.fail("publisher did not connect in time".into());
                why_stopped = "the publisher failed";
                break;
            }
            Some(s) if sending_done.is_none() && s.elapsed() > a.publish_timeout => {
                why_stopped = "publish timeout";
                break;
            }
            _ => {}
        }
        if sending_done.is_none() && ps.done_sending.load(Relaxed) {
            sending_done = Some(Instant::now());
        }
        if let Some(d) = sending_done {
            // Every joined subscriber has everything, or is gone.
            if p.subscribers_complete + p.ended_early >= ramped.joined {
                break;
            }
            if d.elapsed() > a.drain_timeout {
                why_stopped = "drain timeout";
                break;
            }
        }
        if peers.all_done() {
            why_stopped = "every slice ended";
            break;
        }
    }
    pb.finish_and_clear();
    let after_publish = sample(cli.server_pid);
    ps.stop.store(true, Relaxed);
    peers.release();
    let merged = peers.collect(Duration::from_secs(30));
    let _ = publisher.join();
    let mut fatal = peers.fatal.clone();
    if let Some(e) = ps.error.lock().unwrap().clone() {
        fatal.push(e);
    }
    let server = cli.server_pid.map(|pid| ServerFigures {
        pid,
        before: None,
        full,
        after_hold: None,
        after_close: None,
        before_publish: *ps.server_before.lock().unwrap(),
        after_publish,
    });
    let rep = FanoutReport::build(
        a,
        &job,
        slices.len(),
        &merged,
        &ps,
        pace,
        why_stopped,
        server,
        fatal,
    );
    report::print_fanout(&rep);
    if let Some(path) = &cli.json {
        report::write_json(path, &rep)?;
    }
    Ok(rep.problems.is_empty())
}

/// When the rooms' drain may stop: every expected delivery arrived, or none arrived
/// for a while (members that failed or left make "expected" unknowable live).
fn drained(deliveries: u64, expected_if_all_joined: Option<u64>, quiet_for: Duration) -> bool {
    expected_if_all_joined.is_some_and(|e| deliveries >= e) || quiet_for >= Duration::from_secs(2)
}

fn rooms(cli: &Cli, job: Job, a: &crate::RoomsArgs) -> anyhow::Result<bool> {
    let slices = preflight(cli, &job, 0)?;
    let job = Arc::new(job);
    let total = job.total;
    eprintln!(
        "ramping {} rooms x {} members ({}room-<i>) at {}/s ...",
        a.rooms, a.members, a.topic_prefix, a.connect_rate
    );
    let mut peers = Peers::start(job.clone(), &slices)?;
    let ramp_limit =
        Duration::from_secs_f64(total as f64 / a.connect_rate + 3.0 * job.stage_timeout.as_secs_f64() + 10.0);
    let ramped = ramp(cli, &mut peers, total, "members", ramp_limit);
    let full = sample(cli.server_pid);
    let (per_sender, _) = crate::room_schedule(a.rate_per_member, a.duration);
    eprintln!(
        "{} members joined ({} failed); each sends {per_sender} messages at {}/s ...",
        ramped.joined, ramped.failed, a.rate_per_member
    );
    let before_publish = sample(cli.server_pid);
    peers.go(unix_nanos());
    // With every member joined, the expected deliveries are known up front.
    let all_joined = ramped.joined == total;
    let expected_if_all = all_joined.then(|| per_sender * a.members * total);
    let pb = bar(
        cli,
        expected_if_all
            .unwrap_or(per_sender * a.members * ramped.joined)
            .max(1),
        "deliveries [{elapsed_precise}] {bar:40} {pos}/{len} {per_sec} {msg}",
    );
    let send_limit = a.duration + job.stage_timeout + Duration::from_secs(2);
    let t0 = Instant::now();
    let mut sending_done: Option<Instant> = None;
    let (mut last_deliveries, mut last_change) = (0u64, Instant::now());
    let mut why_stopped = "all deliveries arrived";
    loop {
        peers.pump(Duration::from_millis(50));
        let p = peers.total();
        pb.set_position(p.deliveries);
        pb.set_message(format!("sent {}", p.sent));
        if p.deliveries != last_deliveries {
            (last_deliveries, last_change) = (p.deliveries, Instant::now());
        }
        if sending_done.is_none() && (p.senders_done + p.ended_early >= p.joined || t0.elapsed() > send_limit)
        {
            if p.senders_done + p.ended_early < p.joined {
                peers.fatal.push(format!(
                    "only {} of {} members sent everything within {:.0}s",
                    p.senders_done,
                    p.joined,
                    send_limit.as_secs_f64()
                ));
            }
            sending_done = Some(Instant::now());
        }
        if let Some(d) = sending_done {
            if drained(p.deliveries, expected_if_all, last_change.elapsed()) {
                if expected_if_all.is_none_or(|e| p.deliveries < e) {
                    why_stopped = "no more deliveries for 2s";
                }
                break;
            }
            if d.elapsed() > a.drain_timeout {
                why_stopped = "drain timeout";
                break;
            }
        }
        if peers.all_done() {
            why_stopped = "every slice ended";
            break;
        }
    }
    pb.finish_and_clear();
    let after_publish = sample(cli.server_pid);
    peers.release();
    let merged = peers.collect(Duration::from_secs(30));
    let server = cli.server_pid.map(|pid| ServerFigures {
        pid,
        before: None,
        full,
        after_hold: None,
        after_close: None,
        before_publish,
        after_publish,
    });
    let rep = RoomsReport::build(
        a,
        &job,
        slices.len(),
        &merged,
        per_sender,
        why_stopped,
        server,
        peers.fatal.clone(),
    );
    report::print_rooms(&rep);
    if let Some(path) = &cli.json {
        report::write_json(path, &rep)?;
    }
    Ok(rep.problems.is_empty())
}

fn churn(cli: &Cli, job: Job, a: &crate::ChurnArgs) -> anyhow::Result<bool> {
    let slices = preflight(cli, &job, 0)?;
    // A closed connection may hold its source port in TIME_WAIT for about 60 s.
    let ports = sys::ephemeral_ports() * job.sources.len().max(1) as u64;
    let cycles = a.cycle_rate * a.duration.as_secs_f64().min(60.0);
    if cycles > ports as f64 * 0.8 {
        eprintln!(
            "warning: {cycles:.0} cycles within 60 s may run out of the {ports} source ports              (TIME_WAIT); raise --sources or lower --cycle-rate"
        );
    }
    let job = Arc::new(job);
    let before = sample(cli.server_pid);
    eprintln!(
        "churning {} slots at {} cycles/s for {:.1}s on {} ...",
        a.connections,
        a.cycle_rate,
        a.duration.as_secs_f64(),
        a.topic
    );
    let mut peers = Peers::start(job.clone(), &slices)?;
    let pb = bar(
        cli,
        a.duration.as_millis() as u64,
        "churn [{elapsed_precise}] {bar:40} {msg}",
    );
    // Every slot ends by itself: no cycle starts after the duration, and one takes at
    // most four stage timeouts plus the close.
    let limit = a.duration + job.stage_timeout * 5 + Duration::from_secs(5);
    let t0 = Instant::now();
    loop {
        peers.pump(Duration::from_millis(100));
        let p = peers.total();
        pb.set_position((t0.elapsed().as_millis() as u64).min(a.duration.as_millis() as u64));
        pb.set_message(format!("cycles {} failed {}", p.joined, p.failed));
        if p.tasks_done >= a.connections || peers.all_done() {
            break;
        }
        if t0.elapsed() > limit {
            peers.fatal.push(format!(
                "slots still cycling {:.0}s after the start",
                limit.as_secs_f64()
            ));
            break;
        }
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    let at_end = sample(cli.server_pid);
    peers.release();
    let merged = peers.collect(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let after_close = sample(cli.server_pid);
    let server = cli.server_pid.map(|pid| ServerFigures {
        pid,
        before,
        full: at_end,
        after_hold: None,
        after_close,
        before_publish: None,
        after_publish: None,
    });
    let rep = ChurnReport::build(
        a,
        &job,
        slices.len(),
        &merged,
        elapsed,
        server,
        peers.fatal.clone(),
    );
    report::print_churn(&rep);
    if let Some(path) = &cli.json {
        report::write_json(path, &rep)?;
    }
    Ok(rep.problems.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_respect_the_cap() {
        assert_eq!(plan_slices(10, 100, 2), vec![(0, 10)]);
        assert_eq!(plan_slices(250, 100, 2), vec![(0, 98), (98, 100), (198, 52)]);
        assert_eq!(plan_slices(0, 100, 0), vec![(0, 0)]);
    }

    #[test]
    fn rooms_drain_ends() {
        let s = Duration::from_millis(100);
        assert!(drained(100, Some(100), s));
        assert!(!drained(99, Some(100), s));
        assert!(!drained(99, None, s));
        assert!(drained(99, None, Duration::from_secs(3)));
    }

    #[test]
    fn worker_commands() {
        assert_eq!(
            parse_command("go 1764600000000000000\n"),
            WorkerCmd::Go(1_764_600_000_000_000_000)
        );
        assert_eq!(parse_command("go\n"), WorkerCmd::Go(0));
        assert_eq!(parse_command("gone\n"), WorkerCmd::Other);
        assert_eq!(parse_command("release\n"), WorkerCmd::Release);
        assert_eq!(parse_command("hello\n"), WorkerCmd::Other);
    }

    #[test]
    fn events_round_trip_as_json_lines() {
        let ev = Event::Ramped(Progress {
            joined: 3,
            ..Default::default()
        });
        let line = serde_json::to_string(&ev).unwrap();
        assert!(line.starts_with("{\"ev\":\"ramped\""));
        let back: Event = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Event::Ramped(Progress { joined: 3, .. })));
    }
}
