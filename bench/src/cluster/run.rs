//! One cluster size, start to finish: Redis, the nodes, one loadgen `connect` per
//! node, the ramp (watched for memory, dead processes and time), one broadcast
//! through node 0, the servers' delivery count, the loadgens' reports, and the stop of
//! every process it started, whatever happened. Writes DIR/size-N/.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringcast_loadgen::report::ConnectReport;
use ringcast_loadgen::sys;

use super::api::{self, Api, BroadcastAnswer};
use super::cpu;
use super::host;
use super::plan::{memory_fit, MemoryFit, SizePlan};
use super::summary::{self, ApiConnections, DeliveryCount, Record, Sample, SizeSummary};
use crate::server::{stop_all, Proc, Server, Spawn};

/// The secret that signs the run's socket tokens and the key of the nodes' HTTP API
/// (loopback only; the nodes live as long as the run).
pub const SECRET: &str = "cluster-bench-secret";
pub const API_KEY: &str = "cluster-bench-key";
/// Bytes of each log kept in the results.
const LOG_TAIL: u64 = 20_000;

/// What every size shares.
pub struct Ctx {
    pub bin_dir: PathBuf,
    pub redis_server: PathBuf,
    pub heartbeat_secs: u64,
    pub loadgen_cpu: super::LoadgenCpu,
    pub loadgen_nice: i32,
    pub loadgen_batch: bool,
    pub perf: bool,
    pub retries: u32,
    pub sources: u32,
    pub min_free_bytes: u64,
    /// Whole-box bytes per connection the memory check assumes; refined by every size.
    pub est_bytes_per_conn: u64,
    pub deadline: Instant,
    pub stop: Arc<AtomicBool>,
    pub log: super::RunLog,
    /// `--workload presence`: its options (None: the broadcast workload).
    pub presence: Option<super::presence::PresenceOpts>,
}

impl Ctx {
    pub fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn interrupted(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

/// Why a size ended before its verdict.
pub(super) struct Stop {
    outcome: &'static str,
    notes: String,
}

pub(super) fn stop(outcome: &'static str, notes: impl Into<String>) -> Stop {
    Stop {
        outcome,
        notes: notes.into(),
    }
}

/// The processes of one size; all stopped on drop, loadgens first.
#[derive(Default)]
pub(super) struct Procs {
    pub(super) loadgens: Vec<Proc>,
    pub(super) nodes: Vec<Server>,
    redis: Option<Server>,
}

impl Procs {
    fn stop(&mut self) {
        stop_all(&mut self.loadgens.iter_mut().collect::<Vec<_>>());
        stop_all(&mut self.nodes.iter_mut().map(|s| &mut s.proc).collect::<Vec<_>>());
        if let Some(r) = &mut self.redis {
            stop_all(&mut [&mut r.proc]);
        }
        self.loadgens.clear();
        self.nodes.clear();
        self.redis = None;
    }

    fn node_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(Server::pid).collect()
    }

    /// The loadgens' own pids (their workers are their descendants).
    fn loadgen_pids(&self) -> Vec<u32> {
        self.loadgens.iter().map(Proc::pid).collect()
    }

    pub(super) fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|s| s.port).collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) fn now_unix() -> f64 {
    sys::unix_nanos() as f64 / 1e9
}

pub(super) fn take_sample(procs: &Procs, api: Option<&Api>, loadgens: bool) -> Sample {
    let per_node: Vec<Option<sys::ProcSample>> = procs.node_pids().into_iter().map(sys::sample).collect();
    let nodes: Vec<_> = per_node.iter().flatten().collect();
    let (lg_rss, lg_n) = if loadgens {
        let roots = procs.loadgen_pids();
        let mut all = roots.clone();
        all.extend(host::descendants(&roots));
        let rss: Vec<u64> = all
            .iter()
            .filter_map(|&p| sys::sample(p))
            .map(|s| s.rss_bytes)
            .collect();
        (rss.iter().sum(), rss.len())
    } else {
        (0, 0)
    };
    let api_stats = api.map(|api| {
        let st = api.all_stats(&procs.ports());
        ApiConnections {
            connections: api::total(&st, |s| s.connections),
            bytes_out: api::total(&st, |s| s.bytes_out),
            slow_closed: api::total(&st, |s| s.slow_closed),
            nodes_answered: st.iter().flatten().count(),
            nodes: st.len(),
        }
    });
    Sample {
        unix_time: now_unix(),
        meminfo: host::meminfo(),
        sockstat: host::sockstat(),
        server_rss_bytes: nodes.iter().map(|s| s.rss_bytes).sum(),
        server_rss_per_node: per_node.iter().map(|s| s.map_or(0, |s| s.rss_bytes)).collect(),
        server_cpu_secs: nodes.iter().map(|s| s.cpu_secs).sum(),
        server_processes_alive: nodes.len(),
        loadgen_rss_bytes: lg_rss,
        loadgen_processes: lg_n,
        redis_rss_bytes: procs
            .redis
            .as_ref()
            .and_then(|r| sys::sample(r.pid()))
            .map(|s| s.rss_bytes),
        api_stats,
        loadavg: host::loadavg(),
    }
}

pub(super) fn write_json<T: serde::Serialize>(path: &Path, v: &T) {
    if let Ok(text) = serde_json::to_string_pretty(v) {
        let _ = std::fs::write(path, text + "\n");
    }
}

/// The line a loadgen prints once its ramp is over: `up: J joined, F failed; holding`.
pub fn ramp_line(log: &str) -> Option<(u64, u64)> {
    let line = log.lines().find_map(|l| l.strip_prefix("up: "))?;
    let (joined, rest) = line.split_once(" joined, ")?;
    let failed = rest.split_once(" failed")?.0;
    Some((joined.trim().parse().ok()?, failed.trim().parse().ok()?))
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" ")
}

/// Cuts every log in `dir` to its last [`LOG_TAIL`] bytes.
fn keep_tails(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        let Ok(bytes) = std::fs::read(&path) else { continue };
        if bytes.len() as u64 > LOG_TAIL {
            let _ = std::fs::write(&path, &bytes[bytes.len() - LOG_TAIL as usize..]);
        }
    }
}

/// Runs one size and writes its `summary.json`.
pub fn run_size(ctx: &mut Ctx, plan: &SizePlan, out: &Path) -> SizeSummary {
    let dir = out.join(format!("size-{}", plan.size));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(dir.join("logs"));
    let _ = std::fs::create_dir_all(dir.join("samples"));
    write_json(&dir.join("plan.json"), plan);
    let mut rec = Record {
        size: plan.size,
        nodes: plan.nodes.len(),
        per_node: plan.per_node,
        rate: plan.rate,
        hold_secs: plan.hold_secs,
        presence: ctx.presence.is_some(),
        started: super::utc_stamp(),
        loadavg_start: host::loadavg(),
        ..Default::default()
    };
    let api = Api::new(API_KEY, Duration::from_secs(5));
    let mut procs = Procs::default();
    let result = attempt(ctx, plan, &dir, &api, &mut rec, &mut procs);
    procs.stop();
    rec.loadavg_end = host::loadavg();
    if let Err(s) = result {
        rec.outcome = s.outcome.into();
        rec.notes = s.notes;
    }
    keep_tails(&dir.join("logs"));
    let mut reports = Vec::new();
    let mut missing = Vec::new();
    if !rec.outcome.starts_with("skipped") {
        for n in &plan.nodes {
            let path = dir.join(format!("lg-{}.json", n.index));
            match std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<ConnectReport>(&t).ok())
            {
                Some(r) => reports.push((n.index, r)),
                None => missing.push(n.index),
            }
        }
    }
    let mut s = summary::summarize(&rec, &reports, missing);
    if rec.presence {
        let newcomers = (0..rec.newcomers_started)
            .map(|i| dir.join(format!("newcomer-{i}.json")))
            .map(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<ringcast_loadgen::NewcomerReport>(&t).ok())
            })
            .collect();
        s.presence = Some(summary::presence_summary(&rec, &reports, newcomers));
    }
    if rec.outcome.is_empty() {
        (s.outcome, s.notes) = if rec.presence {
            summary::presence_verdict(&s)
        } else {
            summary::verdict(&s)
        };
    }
    write_json(&dir.join("summary.json"), &s);
    ctx.log.line(&format!(
        "size {}: {}{}",
        plan.size,
        s.outcome,
        if s.notes.is_empty() {
            String::new()
        } else {
            format!(" — {}", s.notes)
        }
    ));
    ctx.log.line(&summary::one_line(&s));
    if let Some(est) = s
        .memory_per_connection
        .as_ref()
        .and_then(|pc| super::plan::refined_estimate(pc.whole_box()))
    {
        ctx.est_bytes_per_conn = est;
        ctx.log.line(&format!(
            "  measured {} KiB per connection (server + loadgen RSS + kernel); next sizes assume {} KiB",
            est * 10 / 11 / 1024,
            est / 1024
        ));
    }
    s
}

fn attempt(
    ctx: &mut Ctx,
    plan: &SizePlan,
    dir: &Path,
    api: &Api,
    rec: &mut Record,
    procs: &mut Procs,
) -> Result<(), Stop> {
    let k = plan.nodes.len();
    let logs = dir.join("logs");
    // Time and memory budget.
    if ctx.left().as_secs() < plan.need_secs {
        return Err(stop(
            "skipped",
            format!(
                "needs about {}s (ramp {}s at {}/s), only {}s left of --time-limit",
                plan.need_secs,
                plan.ramp_secs,
                plan.rate,
                ctx.left().as_secs()
            ),
        ));
    }
    let avail = host::meminfo().mem_available;
    let est_kib = ctx.est_bytes_per_conn / 1024;
    match memory_fit(plan.size, ctx.est_bytes_per_conn, ctx.min_free_bytes, avail) {
        MemoryFit::Skip { need_bytes } => {
            return Err(stop(
                "skipped",
                format!(
                    "needs about {} MiB (at {est_kib} KiB per connection + the {} MiB reserve), MemAvailable is {} MiB",
                    need_bytes >> 20,
                    ctx.min_free_bytes >> 20,
                    avail >> 20
                ),
            ))
        }
        MemoryFit::Tight { need_bytes } => ctx.log.line(&format!(
            "size {}: may not fit: about {} MiB at {est_kib} KiB per connection, MemAvailable {} MiB; trying, \
             and stopping if MemAvailable falls below {} MiB",
            plan.size,
            need_bytes >> 20,
            avail >> 20,
            ctx.min_free_bytes >> 20
        )),
        MemoryFit::Fits => {}
    }
    ctx.log.line(&format!(
        "size {}: {k} node(s) of <= {}, connect rate {}/s, hold {}s, {}s left",
        plan.size,
        plan.per_node,
        plan.rate,
        plan.hold_secs,
        ctx.left().as_secs()
    ));

    // Redis.
    let redis_log = logs.join("redis.log");
    let spec = Spawn::new("redis-server", &ctx.redis_server, &redis_log).args([
        "--port",
        &plan.redis_port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxclients",
        "4000",
    ]);
    let mut redis = Server::spawn(&spec, plan.redis_port).map_err(|e| stop("failed", format!("{e:#}")))?;
    let started = redis.wait_listening(Instant::now() + Duration::from_secs(10), &redis_log);
    procs.redis = Some(redis);
    started.map_err(|e| {
        stop(
            "failed",
            format!("redis-server on port {}: {e:#}", plan.redis_port),
        )
    })?;

    // Nodes, each pinned to its CPU.
    let redis_url = format!("redis://127.0.0.1:{}", plan.redis_port);
    let idle = format!("{}s", ctx.heartbeat_secs * 2);
    for n in &plan.nodes {
        let spec = Spawn::new(
            format!("node {}", n.index),
            ctx.bin_dir.join("ringcast"),
            &logs.join(format!("node-{}.log", n.index)),
        )
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", n.port),
            "--cores",
            "1",
        ])
        .args([
            "--redis",
            &redis_url,
            "--node-name",
            &format!("c-{}", n.index),
            "--idle-timeout",
            &idle,
            // The node holds its connections upgraded; its HTTP phase sees only the
            // handshakes and the run's API calls. The default (1,024 per core) would
            // leave room for 18,720 upgraded connections under the 20,000 open files,
            // fewer than --per-node's 19,000.
            "--max-http-connections",
            "256",
        ])
        .env("RINGCAST_SECRET", SECRET)
        .env("RINGCAST_CLUSTER_SECRET", "ringcast-bench-cluster-secret")
        .env("RINGCAST_API_KEY", API_KEY)
        .env("NO_COLOR", "1")
        .pinned(Some(n.cpu.to_string()));
        procs
            .nodes
            .push(Server::spawn(&spec, n.port).map_err(|e| stop("failed", format!("{e:#}")))?);
    }
    let listen_deadline = Instant::now() + Duration::from_secs(20 + k as u64 / 2);
    for (i, node) in procs.nodes.iter_mut().enumerate() {
        node.wait_listening(listen_deadline, &logs.join(format!("node-{i}.log")))
            .map_err(|e| stop("failed", format!("{e:#}")))?;
    }
    let link_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = api.all_stats(&procs.ports());
        let up = st.iter().flatten().filter(|s| s.link_up()).count();
        if up == k {
            break;
        }
        if Instant::now() > link_deadline || ctx.interrupted() {
            return Err(stop(
                if ctx.interrupted() {
                    "interrupted"
                } else {
                    "failed"
                },
                format!("only {up} of {k} nodes got their Redis link up (see logs/node-*.log)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = take_sample(procs, Some(api), false);
    write_json(&dir.join("samples/before.json"), &before);
    rec.samples.before = Some(before);
    if let Some(opts) = &ctx.presence {
        let opts = opts.clone();
        return super::presence::run(ctx, plan, dir, api, rec, procs, &opts);
    }

    // Loadgens, one per node, in parallel: ramp, then hold while the broadcast is timed.
    rec.t_loadgen_start = Some(now_unix());
    for (n, node) in plan.nodes.iter().zip(&procs.nodes) {
        let log = logs.join(format!("lg-{}.log", n.index));
        let spec = Spawn::new(
            format!("loadgen {}", n.index),
            ctx.bin_dir.join("ringcast-loadgen"),
            &log,
        )
        .stdout_to(&logs.join(format!("lg-{}.out", n.index)))
        .env("RINGCAST_SECRET", SECRET)
        .args(["connect", "--url", &format!("ws://127.0.0.1:{}", n.port)])
        .args(["-n", &n.connections.to_string(), "--topic", &plan.topic])
        .args([
            "--rate",
            &plan.rate_per_node.to_string(),
            "--hold",
            &format!("{}s", plan.hold_secs),
        ])
        .args([
            "--stage-timeout",
            "120s",
            "--heartbeat",
            &format!("{}s", ctx.heartbeat_secs),
        ])
        .args([
            "--sources",
            &ctx.sources.to_string(),
            "--server-pid",
            &node.pid().to_string(),
        ])
        .args(["--retries", &ctx.retries.to_string()])
        .args(["--quiet", "--json"])
        .args([dir.join(format!("lg-{}.json", n.index))])
        .pinned((ctx.loadgen_cpu == super::LoadgenCpu::Node).then(|| n.cpu.to_string()));
        procs.loadgens.push(
            Proc::spawn(&spec)
                .map_err(|e| stop("failed", format!("{e:#}")))?
                .with_grace(Duration::from_millis(500)),
        );
    }
    ramp(
        ctx,
        plan,
        dir,
        api,
        procs,
        Duration::from_secs(plan.ramp_limit_secs()),
    )?;
    rec.t_all_joined = Some(now_unix());
    let full = take_sample(procs, Some(api), true);
    write_json(&dir.join("samples/full.json"), &full);
    let ups: Vec<(u64, u64)> = (0..k)
        .filter_map(|i| {
            ramp_line(&std::fs::read_to_string(logs.join(format!("lg-{i}.log"))).unwrap_or_default())
        })
        .collect();
    let expected = full.api_stats.as_ref().map_or(0, |a| a.connections);
    ctx.log.line(&format!(
        "  all up: {} joined, {} failed; {expected} connections on the nodes; MemAvailable {} MiB",
        ups.iter().map(|u| u.0).sum::<u64>(),
        ups.iter().map(|u| u.1).sum::<u64>(),
        full.meminfo.mem_available >> 20
    ));
    rec.samples.full = Some(full);

    // A node's Redis SUBSCRIBE is asynchronous: the topic is long subscribed on every
    // node by now, but give the last joins a moment anyway.
    std::thread::sleep(Duration::from_secs(1));
    let ports = procs.ports();
    let base = api.all_stats(&ports);
    if base.iter().any(Option::is_none) {
        return Err(stop(
            "failed",
            "a node did not answer /api/stats before the broadcast",
        ));
    }
    if ctx.loadgen_nice != 0 || ctx.loadgen_batch {
        let (threads, failed) =
            host::reprioritise(&procs.loadgen_pids(), ctx.loadgen_nice, ctx.loadgen_batch);
        ctx.log.line(&format!(
            "  loadgens for the broadcast: nice {}, SCHED_BATCH {}: {threads} threads, {failed} refused",
            ctx.loadgen_nice, ctx.loadgen_batch
        ));
    }
    let sampler = cpu::Sampler::start(cpu::Groups {
        nodes: procs.node_pids(),
        loadgens: procs.loadgen_pids(),
        redis: procs.redis.as_ref().map(Server::pid),
    });
    let perf = if ctx.perf {
        Profile::start(dir, &ctx.log)
    } else {
        None
    };
    // A sample before the send.
    std::thread::sleep(Duration::from_millis(150));
    let send = sys::unix_nanos();
    let payload = serde_json::json!({ "body": ringcast_loadgen::timed_body(1, send), "user": "api" });
    let (status, answer) = api.broadcast(ports[0], &plan.topic, "new_msg", payload);
    let b = BroadcastAnswer {
        port: ports[0],
        send_unix_nanos: send,
        answer_unix_nanos: sys::unix_nanos(),
        status,
        answer,
    };
    write_json(&dir.join("broadcast.json"), &b);
    ctx.log.line(&format!(
        "  broadcast via node 0: {} {}",
        b.status,
        b.answer.trim()
    ));
    rec.broadcast = Some(b.clone());
    if status != 202 {
        return Err(stop(
            "failed",
            format!("the broadcast was answered {status}: {}", b.answer.trim()),
        ));
    }
    let d = count_deliveries(api, &ports, &base, expected, send);
    write_json(&dir.join("deliveries.json"), &d);
    ctx.log.line(&format!(
        "  server deliveries: {} of {} (complete: {}, seen after {})",
        d.delivered,
        d.expected,
        d.complete,
        summary::fmt_secs(d.seen_complete_after_s)
    ));
    rec.deliveries = Some(d);
    // The last receipts come after the last frames were queued.
    std::thread::sleep(Duration::from_secs(5));
    let samples = sampler.stop();
    if let Some(p) = perf {
        p.finish(dir, &ctx.log);
    }
    write_json(&dir.join("cpu.json"), &samples);
    rec.cpu = samples;

    // The loadgens end after their hold and write their reports.
    let per_node_max = plan.nodes.iter().map(|n| n.connections).max().unwrap_or(0);
    // The loadgens' own limit for closing and reporting (a second per 250 connections,
    // see ringcast-loadgen's end_hold), and some.
    let end = Instant::now() + Duration::from_secs(plan.hold_secs + 90 + per_node_max / 250);
    loop {
        let running = procs
            .loadgens
            .iter_mut()
            .map(|p| p.alive())
            .filter(|&a| a)
            .count();
        if running == 0 {
            break;
        }
        if ctx.interrupted() {
            return Err(stop(
                "interrupted",
                "interrupted while the loadgens held their connections",
            ));
        }
        if Instant::now() >= end || ctx.left() <= Duration::from_secs(10) {
            ctx.log.line(&format!(
                "  {running} loadgen(s) still running after their hold; stopping them (no report from those)"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = take_sample(procs, None, false);
    write_json(&dir.join("samples/after.json"), &after);
    rec.samples.after = Some(after);
    Ok(())
}

/// `perf record -a -g` of the whole box (`--perf`).
struct Profile(std::process::Child);

impl Profile {
    /// Starts recording; `None` (and a log line) when perf cannot start.
    fn start(dir: &Path, log: &super::RunLog) -> Option<Profile> {
        let out = dir.join("perf.data");
        let child = std::process::Command::new("perf")
            .args(["record", "-a", "-g", "-F", "199", "-q", "-o"])
            .arg(&out)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("perf.log")).ok()?)
            .spawn();
        match child {
            Ok(c) => {
                // perf needs a moment to open its events on every CPU.
                std::thread::sleep(Duration::from_millis(500));
                log.line(&format!("  perf record -a -g -F 199 into {}", out.display()));
                Some(Profile(c))
            }
            Err(e) => {
                log.line(&format!("  --perf: cannot start perf: {e}"));
                None
            }
        }
    }

    /// Stops the recording (SIGINT, as perf expects) and writes the hottest symbols.
    fn finish(mut self, dir: &Path, log: &super::RunLog) {
        // SAFETY: kill with a pid we spawned and still own (not yet waited for).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
        let report = std::process::Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--percent-limit",
                "0.3",
            ])
            .args(["--sort", "sym", "-i"])
            .arg(dir.join("perf.data"))
            .output();
        match report {
            Ok(o) if o.status.success() => {
                let _ = std::fs::write(dir.join("perf-top.txt"), &o.stdout);
                log.line(&format!(
                    "  perf: hottest symbols in {}",
                    dir.join("perf-top.txt").display()
                ));
            }
            Ok(o) => log.line(&format!(
                "  perf report failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => log.line(&format!("  perf report: {e}")),
        }
    }
}

/// Waits until every loadgen says its connections are up, watching memory, the
/// processes and the time.
pub(super) fn ramp(
    ctx: &mut Ctx,
    plan: &SizePlan,
    dir: &Path,
    api: &Api,
    procs: &mut Procs,
    limit: Duration,
) -> Result<(), Stop> {
    let logs = dir.join("logs");
    let k = plan.nodes.len();
    let t0 = Instant::now();
    let limit = t0 + limit;
    let mut last_progress = Instant::now();
    let (mut last_written, mut last_at) = (0u64, Instant::now());
    loop {
        let up: Vec<bool> = (0..k)
            .map(|i| {
                ramp_line(&std::fs::read_to_string(logs.join(format!("lg-{i}.log"))).unwrap_or_default())
                    .is_some()
            })
            .collect();
        let up_count = up.iter().filter(|&&u| u).count();
        if up_count == k {
            return Ok(());
        }
        if ctx.interrupted() {
            return Err(stop(
                "interrupted",
                format!("interrupted during the ramp ({up_count} of {k} loadgens up)"),
            ));
        }
        let avail = host::meminfo().mem_available;
        if avail < ctx.min_free_bytes {
            let s = take_sample(procs, Some(api), true);
            write_json(&dir.join("samples/abort.json"), &s);
            return Err(stop(
                "aborted",
                format!(
                    "MemAvailable fell to {} MiB (< {} MiB) during the ramp with {} connections on the nodes",
                    avail >> 20,
                    ctx.min_free_bytes >> 20,
                    s.api_stats.map_or(0, |a| a.connections)
                ),
            ));
        }
        let dead: Vec<String> = procs
            .nodes
            .iter_mut()
            .enumerate()
            .filter_map(|(i, n)| n.proc.exited().map(|_| i.to_string()))
            .collect();
        if !dead.is_empty() {
            return Err(stop(
                "failed",
                format!(
                    "node(s) {} exited during the ramp (see logs/node-*.log)",
                    dead.join(" ")
                ),
            ));
        }
        for (i, lg) in procs.loadgens.iter_mut().enumerate() {
            if !up[i] && lg.exited().is_some() {
                return Err(stop(
                    "failed",
                    format!(
                        "loadgen {i} exited before its ramp finished: {}",
                        tail_lines(&logs.join(format!("lg-{i}.log")), 3)
                    ),
                ));
            }
        }
        if Instant::now() >= limit || ctx.left() <= Duration::from_secs(30) {
            return Err(stop(
                "failed",
                format!("the ramp did not finish in time ({up_count} of {k} loadgens up)"),
            ));
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let s = take_sample(procs, Some(api), false);
            write_json(&dir.join("samples/progress.json"), &s);
            // A node that did not answer in time would make the sum drop and the next
            // rate jump: the rate counts only rounds every node answered.
            let all = s.api_stats.as_ref().filter(|a| a.nodes_answered == a.nodes);
            let written = all.map(|a| a.bytes_out);
            let closed = s.api_stats.as_ref().map_or(0, |a| a.slow_closed);
            ctx.log.line(&format!(
                "  ramp {:.0}s: {} connections on the nodes, {up_count}/{k} loadgens up, MemAvailable {} MiB, servers' RSS {} MiB \
                 (per node {:?} MiB), servers wrote {}, {closed} cut off (1008)",
                t0.elapsed().as_secs_f64(),
                s.api_stats.as_ref().map_or(0, |a| a.connections),
                avail >> 20,
                s.server_rss_bytes >> 20,
                s.server_rss_per_node.iter().map(|r| r >> 20).collect::<Vec<_>>(),
                match written {
                    Some(w) => format!(
                        "{:.2} GB ({:.0} MB/s since the last full count)",
                        w as f64 / 1e9,
                        w.saturating_sub(last_written) as f64 / 1e6 / last_at.elapsed().as_secs_f64()
                    ),
                    None => "n/a (a node did not answer)".into(),
                },
            ));
            if let Some(w) = written {
                last_written = w;
                last_at = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Polls every node's `deliveries` until the sum grew by `expected` (40 s at most).
fn count_deliveries(
    api: &Api,
    ports: &[u16],
    base: &[Option<api::NodeStats>],
    expected: u64,
    send_nanos: u64,
) -> DeliveryCount {
    let base_of = |i: usize| base[i].as_ref().map_or(0, |s| s.deliveries);
    let end = Instant::now() + Duration::from_secs(40);
    let mut polls = 0;
    loop {
        let st = api.all_stats(ports);
        polls += 1;
        let now = sys::unix_nanos();
        let per_node_delta: Vec<i64> = st
            .iter()
            .enumerate()
            .map(|(i, s)| s.as_ref().map_or(0, |s| s.deliveries as i64 - base_of(i) as i64))
            .collect();
        let delivered = per_node_delta.iter().sum::<i64>().max(0) as u64;
        let complete = delivered >= expected;
        if complete || Instant::now() > end {
            return DeliveryCount {
                expected,
                delivered,
                complete,
                polls,
                nodes_answering: st.iter().flatten().count(),
                per_node_delta,
                seen_complete_after_s: complete.then(|| now.saturating_sub(send_nanos) as f64 / 1e9),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_loadgens_ramp_line() {
        let log = "plan: 13334 connection(s) to 127.0.0.1:4700 in 1 process(es) x 1 executor(s)\n\
                   ramping to 13334 connections at 833.3/s on bench:cluster-40000 ...\n\
                   up: 13330 joined, 4 failed; holding 43.0s ...\n";
        assert_eq!(ramp_line(log), Some((13_330, 4)));
        assert_eq!(ramp_line("ramping to 5 connections ...\n"), None);
        assert_eq!(ramp_line("up: x joined, 0 failed; holding"), None);
    }
}
