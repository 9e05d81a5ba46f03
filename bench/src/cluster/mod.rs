//! `ringcast-bench cluster`: the many-node run on one box (formerly
//! `scripts/cluster-1m.sh`).
//!
//! For every size N (the `--sweep` sizes in order, else `--target`, default 1,000,000):
//! redis-server, then K = ceil(N / `--per-node`) `ringcast serve --cores 1 --redis ...`
//! nodes on 127.0.0.1, node i pinned to CPU i mod ncpu; one `ringcast-loadgen connect`
//! per node, all at once, every connection joining `bench:cluster-<N>` and holding;
//! once all are joined, ONE broadcast through node 0's HTTP API, body
//! `"1:<send unix nanos>"`. Every subscriber times it; the loadgens' histograms are
//! added into one. The nodes' `/api/stats` count what they queued.
//!
//! Every connection heartbeats every `--heartbeat` seconds (default 300; the nodes run
//! with `--idle-timeout` twice that): Phoenix's 30 s default would be 33,000 heartbeat
//! round trips a second at 1M connections, most of a 2-core box by itself.
//!
//! It checks the host first and says what is missing instead of failing midway; sizes
//! that do not fit the memory or time left are skipped with a note. A size stops when
//! MemAvailable falls below `--min-free-gb`; the whole run is bounded by
//! `--time-limit`; every process it started is stopped, also on Ctrl-C (a second
//! Ctrl-C exits at once, and the children die with it). Sizes above 50,000 take the
//! lock /tmp/ringcast-heavy.lock first (other benchmarks on this box take it too). All
//! traffic stays on 127.0.0.0/8. Results: DIR/size-N/ and DIR/README.md.

mod api;
mod cpu;
pub mod host;
mod plan;
mod presence;
mod readme;
mod run;
mod summary;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use summary::SizeSummary;

/// Sizes above this take the heavy-benchmark lock.
const HEAVY_SIZE: u64 = 50_000;
const HEAVY_LOCK: &str = "/tmp/ringcast-heavy.lock";
/// Whole-box memory per connection the first size is planned with (servers, loadgens
/// and both kernel sockets); each finished size refines it.
const FIRST_ESTIMATE: u64 = 21 * 1024;

/// Where the loadgens run (`--loadgen-cpu`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadgenCpu {
    /// On its node's CPU.
    Node,
    /// Wherever the scheduler puts it.
    #[default]
    Any,
}

/// What the connections of a cluster run do.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workload {
    /// Join `bench:cluster-<N>`, hold, ONE timed broadcast through node 0.
    #[default]
    Broadcast,
    /// Members of one `rooms:presence-<N>` room (presence tracked, diffs to all), then
    /// newcomers check its `presence_state`.
    Presence,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// What the connections do.
    #[arg(long, value_enum, default_value_t = Workload::Broadcast)]
    pub workload: Workload,
    /// Presence: joins under way at once per node (sent, their presence_state not yet
    /// read); the ramp slows down as the room's state grows.
    #[arg(long, default_value_t = 8)]
    pub window: u64,
    /// Presence: newcomers, one per node from node 0 (default: one on every node).
    #[arg(long)]
    pub newcomers: Option<u64>,
    /// Presence: the room has settled when the nodes' bytes_out grew by less than
    /// 50 B per member over this many seconds.
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// Presence: longest wait for the room to settle, seconds.
    #[arg(long, default_value_t = 300)]
    pub settle_timeout: u64,
    /// Presence: longest check of each newcomer, seconds.
    #[arg(long, default_value_t = 180)]
    pub newcomer_timeout: u64,
    /// Connections of the run when there is no --sweep.
    #[arg(long, default_value_t = 1_000_000)]
    pub target: u64,
    /// Sizes to run in order, e.g. 10000,50000,100000 (commas or spaces).
    #[arg(long)]
    pub sweep: Option<String>,
    /// Connections per node at most (a node holds them plus ~300 fds).
    #[arg(long, default_value_t = 19_000)]
    pub per_node: u64,
    /// New connections per second, all loadgens together.
    #[arg(long, default_value_t = 2500.0)]
    pub rate: f64,
    /// Phoenix heartbeat interval of every connection, seconds.
    #[arg(long, default_value_t = 300)]
    pub heartbeat: u64,
    /// Where each loadgen runs: `any` leaves it to the scheduler; `node` pins it to its
    /// node's CPU, so that a frame the node writes wakes a reader on the same CPU. Pinned
    /// is cheaper per delivery at 38,000 and 200,000 connections on this 2-CPU VM
    /// (reach-all 0.283 s against 0.345 s at 38,000), and far worse at 1,000,000: the
    /// scheduler can no longer even out the CPUs (results/cluster-1m-2026-12-02-pinned).
    #[arg(long, value_enum, default_value_t = LoadgenCpu::Any)]
    pub loadgen_cpu: LoadgenCpu,
    /// `nice` given to every thread of every loadgen (workers included) once all are
    /// joined, just before the broadcast, -20..19: a positive one lets a node that
    /// writes a broadcast go on before the readers it wakes take the CPU, so that they
    /// read in batches (0 leaves them at the nodes' priority).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub loadgen_nice: i32,
    /// Put every loadgen thread under `SCHED_BATCH` before the broadcast, so that a
    /// reader a node's write wakes never preempts the node in the middle of its fanout.
    #[arg(long)]
    pub loadgen_batch: bool,
    /// Profile the whole box around the broadcast: `perf record -a -g` at 199 Hz from
    /// just before the send until the CPU sampler stops, into `perf.data` beside the
    /// size's results, with the hottest symbols in `perf-top.txt`.
    #[arg(long)]
    pub perf: bool,
    /// Times each loadgen connection is tried again after a failed connect, upgrade or
    /// join (`ringcast-loadgen --retries`, phoenix.js's reconnect delays).
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
    /// Bound of the whole run, seconds.
    #[arg(long, default_value_t = 1800)]
    pub time_limit: u64,
    /// Stop a size when MemAvailable falls below this many GiB.
    #[arg(long, default_value_t = 3.0)]
    pub min_free_gb: f64,
    /// First node port; Redis listens on it + 1000.
    #[arg(long, default_value_t = 4700)]
    pub base_port: u16,
    /// Loopback source addresses each loadgen rotates over (127.0.0.2 ..).
    #[arg(long, default_value_t = 64)]
    pub sources: u32,
    /// Results directory (default results/cluster-<date>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check the host, start nothing.
    #[arg(long)]
    pub check_only: bool,
    /// Where `ringcast` and `ringcast-loadgen` are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// The run's log: stderr and DIR/run.log, each line with its UTC time.
#[derive(Clone)]
pub struct RunLog {
    file: Arc<Mutex<Option<File>>>,
}

impl RunLog {
    fn new() -> RunLog {
        RunLog {
            file: Arc::new(Mutex::new(None)),
        }
    }

    fn to_file(&self, path: &Path) -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        *self.file.lock().unwrap() = Some(f);
        Ok(())
    }

    pub fn line(&self, msg: &str) {
        let text = format!("[{}] {msg}", clock_utc());
        eprintln!("{text}");
        if let Some(f) = self.file.lock().unwrap().as_mut() {
            let _ = writeln!(f, "{text}");
        }
    }
}

fn unix_secs() -> u64 {
    ringcast_loadgen::sys::unix_nanos() / 1_000_000_000
}

/// HH:MM:SS (UTC) of `unix`.
fn hms(unix: u64) -> String {
    let s = unix % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn clock_utc() -> String {
    hms(unix_secs())
}

/// YYYY-MM-DDTHH:MM:SSZ now.
pub fn utc_stamp() -> String {
    let now = unix_secs();
    format!("{}T{}Z", crate::civil_date(now), hms(now))
}

/// The exclusive lock of heavy benchmarks (flock(2), as `flock` in scripts/bench.sh),
/// held while this lives.
struct HeavyLock {
    _file: File,
}

impl HeavyLock {
    /// Waits for the lock until `until` or a stop; `None` when it did not come.
    fn acquire(path: &Path, until: Instant, stop: &AtomicBool) -> anyhow::Result<Option<HeavyLock>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(HeavyLock { _file: file }));
            }
            if Instant::now() >= until || stop.load(Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Writes `summary.json` of a size that did not run.
fn not_run(out: &Path, size: u64, per_node: u64, outcome: &str, notes: &str) -> SizeSummary {
    let s = SizeSummary {
        size,
        nodes: plan::node_count(size, per_node) as usize,
        per_node,
        outcome: outcome.into(),
        notes: notes.into(),
        connections_requested: size,
        ..Default::default()
    };
    let dir = out.join(format!("size-{size}"));
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(text) = serde_json::to_string_pretty(&s) {
        let _ = std::fs::write(dir.join("summary.json"), text + "\n");
    }
    s
}

/// Every `size-*/summary.json` under `out`, by size.
fn summaries(out: &Path) -> Vec<SizeSummary> {
    let mut v: Vec<SizeSummary> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("size-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("summary.json")).ok())
        .filter_map(|t| serde_json::from_str(&t).ok())
        .collect();
    v.sort_by_key(|s| s.size);
    v
}

pub fn main(a: &ClusterArgs) -> anyhow::Result<ExitCode> {
    let log = RunLog::new();
    let sizes = plan::sizes(a.sweep.as_deref(), a.target).map_err(anyhow::Error::msg)?;
    if a.per_node == 0 || a.heartbeat == 0 || a.time_limit == 0 || a.sources == 0 {
        anyhow::bail!("--per-node, --heartbeat, --time-limit and --sources must be positive");
    }
    let positive_rate = a.rate.is_finite() && a.rate > 0.0;
    if !positive_rate || !a.min_free_gb.is_finite() || a.min_free_gb < 0.0 {
        anyhow::bail!("--rate must be above 0 and --min-free-gb at least 0");
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.time_limit);
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // The second signal exits at once (the children die with us); the first one
        // asks the run to stop and clean up.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let bin_dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .context("no directory of my own executable")?,
    };
    let max_size = sizes.iter().copied().max().unwrap_or(0);
    let min_free_bytes = (a.min_free_gb * (1u64 << 30) as f64) as u64;
    let needs = host::Needs {
        per_node: a.per_node,
        sources: a.sources,
        max_size,
        nodes_of_max_size: plan::node_count(max_size, a.per_node),
        base_port: a.base_port,
        bytes_per_conn: FIRST_ESTIMATE,
        reserve_bytes: min_free_bytes,
    };
    let facts = host::gather(&bin_dir, &needs, Path::new("."));
    let (problems, warnings) = host::judge(&facts, &needs);
    let check = host::HostCheck::of(&facts, problems, warnings, utc_stamp());
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("results/cluster-{}", utc_stamp().replace(':', ""))));
    if !a.check_only || a.out.is_some() {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        log.to_file(&out.join("run.log"))?;
        std::fs::write(
            out.join("host.json"),
            serde_json::to_string_pretty(&check)? + "\n",
        )?;
    }
    log.line(&format!(
        "ringcast-bench cluster: workload {:?}, sizes {sizes:?}, --per-node {}, --rate {}/s, --loadgen-cpu {:?}, \
         --loadgen-nice {}, --loadgen-batch {}, --perf {}, --time-limit {}s, results in {}",
        a.workload,
        a.per_node,
        a.rate,
        a.loadgen_cpu,
        a.loadgen_nice,
        a.loadgen_batch,
        a.perf,
        a.time_limit,
        out.display()
    ));
    log.line(&format!(
        "host: {}; load average {}",
        check.summary, check.loadavg
    ));
    for w in &check.warnings {
        log.line(&format!("WARNING: {w}"));
    }
    for p in &check.problems {
        log.line(&format!("MISSING: {p}"));
    }
    if !check.problems.is_empty() {
        log.line("the host is not ready (see MISSING above); nothing was started");
        return Ok(ExitCode::FAILURE);
    }
    if a.check_only {
        log.line("host check only: ready");
        return Ok(ExitCode::SUCCESS);
    }
    let mut ctx = run::Ctx {
        bin_dir,
        redis_server: facts
            .redis_server
            .clone()
            .unwrap_or_else(|| "redis-server".into()),
        heartbeat_secs: a.heartbeat,
        loadgen_cpu: a.loadgen_cpu,
        loadgen_nice: a.loadgen_nice,
        loadgen_batch: a.loadgen_batch,
        perf: a.perf,
        retries: a.retries,
        sources: a.sources,
        min_free_bytes,
        est_bytes_per_conn: FIRST_ESTIMATE,
        deadline,
        stop: stop.clone(),
        log: log.clone(),
        presence: (a.workload == Workload::Presence).then(|| presence::PresenceOpts {
            window: a.window.max(1),
            newcomers: a.newcomers,
            settle_secs: a.settle_secs.max(1),
            settle_timeout_secs: a.settle_timeout,
            newcomer_timeout_secs: a.newcomer_timeout.max(10),
        }),
    };
    let cpus = ringcast_bench::allowed_cpus();
    let mut all_ok = true;
    let mut lock = None;
    for (i, &n) in sizes.iter().enumerate() {
        if stop.load(Relaxed) {
            not_run(&out, n, a.per_node, "not run", "interrupted");
            continue;
        }
        if ctx.left() <= Duration::from_secs(60) {
            log.line(&format!(
                "size {n}: skipped, {}s left of the time limit",
                ctx.left().as_secs()
            ));
            not_run(&out, n, a.per_node, "skipped", "time limit reached");
            all_ok = false;
            continue;
        }
        if n > HEAVY_SIZE && lock.is_none() {
            log.line(&format!("taking {HEAVY_LOCK} (sizes above {HEAVY_SIZE}) ..."));
            let until = deadline.checked_sub(Duration::from_secs(60)).unwrap_or(start);
            match HeavyLock::acquire(Path::new(HEAVY_LOCK), until, &stop)? {
                Some(l) => {
                    lock = Some(l);
                    log.line("lock taken");
                }
                None => {
                    log.line(&format!(
                        "could not take {HEAVY_LOCK} within the time limit (another benchmark holds it); sizes from {n} on not run"
                    ));
                    for &m in &sizes[i..] {
                        not_run(
                            &out,
                            m,
                            a.per_node,
                            "not run",
                            &format!("{HEAVY_LOCK} held by another benchmark until the time limit"),
                        );
                    }
                    all_ok = false;
                    break;
                }
            }
        }
        let mut p = plan::plan_size(n, a.per_node, a.rate, a.base_port, &cpus);
        if a.workload == Workload::Presence {
            p.topic = format!("rooms:presence-{n}");
        }
        let s = run::run_size(&mut ctx, &p, &out);
        all_ok &= s.outcome == "ok";
    }
    drop(lock);
    let text = match a.workload {
        Workload::Broadcast => readme::readme(&check, &summaries(&out)),
        Workload::Presence => readme::readme_presence(&check, &summaries(&out)),
    };
    std::fs::write(out.join("README.md"), text)?;
    log.line(&format!("wrote {}", out.join("README.md").display()));
    log.line(&format!("done in {}s", start.elapsed().as_secs()));
    Ok(if stop.load(Relaxed) {
        ExitCode::from(130)
    } else if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_text() {
        assert_eq!(hms(0), "00:00:00");
        assert_eq!(hms(1_764_547_200 + 3 * 3600 + 4 * 60 + 5), "03:04:05");
    }

    #[test]
    fn the_heavy_lock_is_exclusive() {
        let path = std::env::temp_dir().join(format!("ringcast-bench-lock-{}", std::process::id()));
        let stop = AtomicBool::new(false);
        let soon = || Instant::now() + Duration::from_millis(600);
        let held = HeavyLock::acquire(&path, soon(), &stop).unwrap();
        assert!(held.is_some());
        assert!(HeavyLock::acquire(&path, soon(), &stop).unwrap().is_none());
        drop(held);
        assert!(HeavyLock::acquire(&path, soon(), &stop).unwrap().is_some());
        let _ = std::fs::remove_file(&path);
    }
}
