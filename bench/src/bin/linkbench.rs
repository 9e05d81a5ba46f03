//! `ringcast-linkbench`: the cluster link alone, through one real redis-server. Node
//! `a`'s link publishes broadcasts handed to it as a core would hand them; node `b`'s
//! link receives them from Redis, checks their signature, decodes them and hands them
//! to its core's inbox, which this program reads in the core's place
//! ([`ringcast::bench_support::LinkPair`]). No WebSocket clients and no cores: what it
//! shows is how many broadcasts per second the link carries from node to node, and at
//! what latency, when nothing else limits it.
//!
//!     ringcast-linkbench [--messages 1000000] [--rounds 3] [--rates 20000,75000]
//!                        [--paced-secs 5] [--pipeline 256] [--out results/DIR]
//!
//! For each round: `--messages` broadcasts as fast as they go (`a`'s queue is kept
//! under 8,192 deep, so none is dropped for a full queue, and at most 20,000 are on
//! their way, so that Redis does not cut node `b` off), then each rate of
//! `--rates` for `--paced-secs`. It prints one JSON line per phase, the medians, and
//! redis-benchmark's `PUBLISH` (unpipelined and `-P 64`) against the same server; with
//! `--out` it writes them to `DIR/report.json`.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ringcast::bench_support::{LinkCounters, LinkPair};
use ringcast_bench::median;
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Cli {
    /// Broadcasts of each as-fast-as-it-goes phase.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Rounds (the figures are their medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Paced rates, broadcasts/s.
    #[arg(long, value_delimiter = ',', default_value = "20000,75000")]
    rates: Vec<u64>,
    /// How long each paced phase publishes.
    #[arg(long, default_value_t = 5)]
    paced_secs: u64,
    /// Broadcasts per pipelined round trip (`serve --redis-pipeline`).
    #[arg(long, default_value_t = ringcast::cluster::DEFAULT_PIPELINE)]
    pipeline: usize,
    /// The redis-server to start.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Its port.
    #[arg(long, default_value_t = 7391)]
    port: u16,
    /// Where to write report.json.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
struct Phase {
    round: usize,
    /// `max` or the paced rate.
    kind: String,
    sent: u64,
    received: u64,
    /// Received in the order sent (a broadcast before one sent earlier counts here).
    out_of_order: u64,
    /// Received per second, from the first send to the last arrival.
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU seconds of node a's link thread, node b's, both nodes' subscriber readers,
    /// this program's other threads (feeder and receiver), and redis-server.
    a_cpu_s: f64,
    b_cpu_s: f64,
    readers_cpu_s: f64,
    bench_cpu_s: f64,
    redis_cpu_s: f64,
    /// What the links counted meanwhile.
    published: u64,
    queue_dropped: u64,
    lost: u64,
    forged: u64,
    inbox_dropped: u64,
}

#[derive(Serialize)]
struct Report {
    host: String,
    ncpu: usize,
    pipeline: usize,
    messages: u64,
    paced_secs: u64,
    phases: Vec<Phase>,
    medians: BTreeMap<String, BTreeMap<&'static str, f64>>,
    redis_benchmark: BTreeMap<String, String>,
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(cli: &Cli) -> Result<Redis> {
    let child = Command::new(&cli.redis_server)
        .args(["--port", &cli.port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {} (apt-get install -y redis-server)", cli.redis_server))?;
    let redis = Redis(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", cli.port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not listen on port {} within 10 s", cli.port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(redis)
}

fn ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a /proc stat line, seconds, and its comm.
fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let comm = s[open + 1..close].to_string();
    let fields: Vec<&str> = s[close + 2..].split(' ').collect();
    // After the comm: state is field 3 of stat(5); utime and stime are 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / ticks()))
}

/// CPU seconds so far: node a's link thread, node b's (started second: the higher
/// thread id), this program's other threads, and redis-server.
#[derive(Clone, Copy, Default)]
struct Cpu {
    a: f64,
    b: f64,
    /// Both nodes' subscriber connections' readers.
    readers: f64,
    bench: f64,
    redis: f64,
}

fn cpu(redis_pid: u32) -> Cpu {
    let mut links = Vec::new();
    let (mut bench, mut readers) = (0.0, 0.0);
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let tid: u64 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            if let Some((comm, s)) = stat_cpu(&format!("{}/stat", t.path().display())) {
                if comm == "ringcast-redis" {
                    links.push((tid, s));
                } else if comm == "ringcast-rsub" {
                    readers += s;
                } else {
                    bench += s;
                }
            }
        }
    }
    links.sort_by_key(|l| l.0);
    let link = |i: usize| links.get(i).map_or(0.0, |l| l.1);
    Cpu {
        a: link(0),
        b: link(1),
        readers,
        bench,
        redis: stat_cpu(&format!("/proc/{redis_pid}/stat")).map_or(0.0, |(_, s)| s),
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e6
}

/// Broadcasts sent and not yet read on node b, at most, in the as-fast-as-it-goes
/// phase: beyond what Redis buffers for a subscriber (`client-output-buffer-limit
/// pubsub`, 8 MiB for a minute by default, about 40,000 of these), it would cut node
/// b off.
const IN_FLIGHT: u64 = 20_000;

/// Sends `count` broadcasts, at `rate` per second or (`None`) as fast as they go (at
/// most [`IN_FLIGHT`] not yet read on node b), and reads them on `b`; returns the
/// phase's figures.
fn phase(pair: &Arc<LinkPair>, round: usize, count: u64, rate: Option<u64>, redis_pid: u32) -> Phase {
    let before = pair.counters();
    let cpu_before = cpu(redis_pid);
    let started = Instant::now();
    let read = Arc::new(AtomicU64::new(0));
    let feeder = {
        let pair = pair.clone();
        let read = read.clone();
        std::thread::Builder::new()
            .name("feeder".into())
            .spawn(move || {
                for seq in 0..count {
                    match rate {
                        None => {
                            while pair.backlog() > 8192 || seq - read.load(Ordering::Relaxed) > IN_FLIGHT {
                                std::thread::yield_now();
                            }
                        }
                        Some(r) => {
                            let due = started + Duration::from_secs_f64(seq as f64 / r as f64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                        }
                    }
                    pair.publish(seq);
                }
            })
            .expect("spawn the feeder")
    };
    let mut latencies = Vec::with_capacity(count as usize);
    let (mut last_seq, mut out_of_order) = (None, 0);
    let mut last_arrival = started;
    while (latencies.len() as u64) < count {
        let Some(d) = pair.recv(Duration::from_secs(3)) else {
            break;
        };
        last_arrival = Instant::now();
        read.fetch_add(1, Ordering::Relaxed);
        latencies.push(d.received_ns.saturating_sub(d.sent_ns));
        if last_seq.is_some_and(|l| d.seq <= l) {
            out_of_order += 1;
        }
        last_seq = Some(d.seq);
    }
    feeder.join().expect("the feeder");
    let elapsed = last_arrival.duration_since(started).as_secs_f64();
    let cpu_after = cpu(redis_pid);
    let after = pair.counters();
    latencies.sort_unstable();
    let d = |f: fn(&LinkCounters) -> u64| f(&after) - f(&before);
    Phase {
        round,
        kind: rate.map_or("max".into(), |r| r.to_string()),
        sent: count,
        received: latencies.len() as u64,
        out_of_order,
        per_sec: latencies.len() as f64 / elapsed.max(1e-9),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: percentile(&latencies, 1.0),
        a_cpu_s: cpu_after.a - cpu_before.a,
        b_cpu_s: cpu_after.b - cpu_before.b,
        readers_cpu_s: cpu_after.readers - cpu_before.readers,
        bench_cpu_s: cpu_after.bench - cpu_before.bench,
        redis_cpu_s: cpu_after.redis - cpu_before.redis,
        published: d(|c| c.published),
        queue_dropped: d(|c| c.dropped),
        lost: d(|c| c.lost),
        forged: d(|c| c.forged),
        inbox_dropped: d(|c| c.inbox_dropped),
    }
}

fn redis_benchmark(port: u16, pipeline: &str) -> String {
    let n = if pipeline == "1" { "200000" } else { "1000000" };
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-q", "-n", n, "-P", pipeline])
        // A channel nobody subscribes to: node b must not spend the run rejecting them.
        .args(["PUBLISH", "bench:nobody", "hello"])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .split(['\r', '\n'])
            .rfind(|l| l.contains("requests per second"))
            .unwrap_or("no result")
            .trim()
            .to_string(),
        Err(e) => format!("redis-benchmark: {e}"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let redis = start_redis(&cli)?;
    let url = format!("redis://127.0.0.1:{}/", cli.port);
    let pair = Arc::new(LinkPair::start(&url, cli.pipeline).map_err(anyhow::Error::msg)?);
    let mut phases = Vec::new();
    for round in 0..cli.rounds {
        let mut runs = vec![None];
        runs.extend(cli.rates.iter().map(|&r| Some(r)));
        for rate in runs {
            let count = rate.map_or(cli.messages, |r| r * cli.paced_secs);
            let p = phase(&pair, round, count, rate, redis.0.id());
            println!("{}", serde_json::to_string(&p)?);
            phases.push(p);
        }
    }
    let mut medians = BTreeMap::new();
    let kinds: Vec<String> = phases.iter().map(|p| p.kind.clone()).collect();
    for kind in kinds {
        if medians.contains_key(&kind) {
            continue;
        }
        let of = |f: fn(&Phase) -> f64| {
            median(phases.iter().filter(|p| p.kind == kind).map(f).collect()).unwrap_or(f64::NAN)
        };
        let received = of(|p| p.received as f64);
        let m: BTreeMap<&'static str, f64> = [
            ("per_sec", of(|p| p.per_sec)),
            ("p50_ms", of(|p| p.p50_ms)),
            ("p99_ms", of(|p| p.p99_ms)),
            ("max_ms", of(|p| p.max_ms)),
            (
                "a_cpu_us_per_msg",
                of(|p| p.a_cpu_s / p.received.max(1) as f64 * 1e6),
            ),
            (
                "b_cpu_us_per_msg",
                of(|p| p.b_cpu_s / p.received.max(1) as f64 * 1e6),
            ),
            (
                "readers_cpu_us_per_msg",
                of(|p| p.readers_cpu_s / p.received.max(1) as f64 * 1e6),
            ),
            (
                "redis_cpu_us_per_msg",
                of(|p| p.redis_cpu_s / p.received.max(1) as f64 * 1e6),
            ),
            ("lost", of(|p| (p.sent - p.received) as f64)),
            ("received", received),
        ]
        .into_iter()
        .collect();
        println!("median {kind}: {}", serde_json::to_string(&m)?);
        medians.insert(kind, m);
    }
    let mut bench = BTreeMap::new();
    for p in ["1", "64"] {
        let line = redis_benchmark(cli.port, p);
        println!("redis-benchmark -P {p}: {line}");
        bench.insert(format!("-P {p}"), line);
    }
    let report = Report {
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        ncpu: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pipeline: cli.pipeline,
        messages: cli.messages,
        paced_secs: cli.paced_secs,
        phases,
        medians,
        redis_benchmark: bench,
    };
    if let Some(dir) = &cli.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
