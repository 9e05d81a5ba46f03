//! Where the box's CPU goes while a broadcast spreads: a thread samples `/proc/stat`
//! (the whole box, by kind) and the CPU time of each group of processes (the nodes,
//! the loadgens with their workers, Redis) from just before the send until the
//! subscribers have it, and [`window`] takes the difference over the reach: from the
//! send to the last receipt.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringcast_loadgen::sys;
use serde::{Deserialize, Serialize};

/// How often the sampler looks. Each look reads one `/proc/PID/stat` per process
/// (about 110 in a 53-node run), well under 1% of a CPU at this rate.
pub const EVERY: Duration = Duration::from_millis(100);
/// The sampler stops by itself after this long.
const AT_MOST: Duration = Duration::from_secs(120);

/// The box's counters from `/proc/stat`, in seconds (ticks over `CLK_TCK`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BoxCpu {
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub irq: f64,
    pub idle: f64,
    pub steal: f64,
    /// The rest: nice and iowait.
    pub other: f64,
    /// Context switches since boot.
    pub ctxt: u64,
}

impl BoxCpu {
    fn busy(&self) -> f64 {
        self.user + self.system + self.softirq + self.irq + self.other
    }

    fn minus(&self, o: &BoxCpu) -> BoxCpu {
        BoxCpu {
            user: self.user - o.user,
            system: self.system - o.system,
            softirq: self.softirq - o.softirq,
            irq: self.irq - o.irq,
            idle: self.idle - o.idle,
            steal: self.steal - o.steal,
            other: self.other - o.other,
            ctxt: self.ctxt.saturating_sub(o.ctxt),
        }
    }
}

/// The aggregate `cpu` line and `ctxt` of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<BoxCpu> {
    let hz = sys::clock_ticks();
    let cpu = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<f64>().map(|t| t / hz))
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    let ctxt = text
        .lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some(BoxCpu {
        user: at(0),
        other: at(1) + at(4),
        system: at(2),
        idle: at(3),
        irq: at(5),
        softirq: at(6),
        steal: at(7),
        ctxt,
    })
}

/// One look: when, the box, and each group's CPU seconds (user + system).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuSample {
    pub unix_nanos: u64,
    pub whole_box: BoxCpu,
    pub nodes_s: f64,
    pub loadgens_s: f64,
    pub redis_s: f64,
}

/// The processes whose CPU is counted, by group.
pub struct Groups {
    pub nodes: Vec<u32>,
    /// The loadgens' own pids; their workers are found once, when sampling starts.
    pub loadgens: Vec<u32>,
    pub redis: Option<u32>,
}

/// The sampling thread; [`Sampler::stop`] ends it and returns what it saw.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<CpuSample>>,
}

impl Sampler {
    pub fn start(groups: Groups) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut loadgens = groups.loadgens.clone();
            loadgens.extend(super::host::descendants(&groups.loadgens));
            let sum = |pids: &[u32]| pids.iter().filter_map(|&p| sys::cpu_secs(p)).sum::<f64>();
            let start = Instant::now();
            let mut samples = Vec::new();
            while !flag.load(Relaxed) && start.elapsed() < AT_MOST {
                let Some(whole_box) = std::fs::read_to_string("/proc/stat")
                    .ok()
                    .and_then(|t| parse_proc_stat(&t))
                else {
                    break;
                };
                samples.push(CpuSample {
                    unix_nanos: sys::unix_nanos(),
                    whole_box,
                    nodes_s: sum(&groups.nodes),
                    loadgens_s: sum(&loadgens),
                    redis_s: sum(groups.redis.as_slice()),
                });
                std::thread::sleep(EVERY);
            }
            samples
        });
        Sampler { stop, thread }
    }

    pub fn stop(self) -> Vec<CpuSample> {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What the box spent over a window, in CPU-seconds, and per delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuWindow {
    /// The window as sampled (a little wider than asked: the samples around it).
    pub secs: f64,
    /// CPU-seconds the box could give (wall time times CPUs, from idle + busy + steal).
    pub capacity_s: f64,
    pub busy_s: f64,
    pub idle_s: f64,
    pub steal_s: f64,
    pub user_s: f64,
    pub system_s: f64,
    pub softirq_s: f64,
    pub nodes_s: f64,
    pub loadgens_s: f64,
    pub redis_s: f64,
    pub context_switches: u64,
}

/// The difference between the last sample at or before `from` and the first at or
/// after `to` (unix nanos); `None` when the samples do not cover the window.
pub fn window(samples: &[CpuSample], from: u64, to: u64) -> Option<CpuWindow> {
    let a = samples.iter().rev().find(|s| s.unix_nanos <= from)?;
    let b = samples.iter().find(|s| s.unix_nanos >= to)?;
    let d = b.whole_box.minus(&a.whole_box);
    Some(CpuWindow {
        secs: (b.unix_nanos - a.unix_nanos) as f64 / 1e9,
        capacity_s: d.busy() + d.idle + d.steal,
        busy_s: d.busy(),
        idle_s: d.idle,
        steal_s: d.steal,
        user_s: d.user,
        system_s: d.system,
        softirq_s: d.softirq,
        nodes_s: b.nodes_s - a.nodes_s,
        loadgens_s: b.loadgens_s - a.loadgens_s,
        redis_s: b.redis_s - a.redis_s,
        context_switches: d.ctxt,
    })
}

/// The README's line for the reach window: CPU per delivery by group and kind.
pub fn describe(w: &CpuWindow, deliveries: u64) -> String {
    let per = |s: f64| s * 1e6 / deliveries.max(1) as f64;
    format!(
        "{:.2} of {:.2} CPU-seconds busy over {:.2} s (idle {:.2}, steal {:.2}): {:.1} µs per delivery; \
         nodes {:.1} µs, loadgens {:.1} µs, Redis {:.1} µs, the rest {:.1} µs; \
         user {:.2} s, system {:.2} s, softirq {:.2} s; {:.2} context switches per delivery",
        w.busy_s,
        w.capacity_s,
        w.secs,
        w.idle_s,
        w.steal_s,
        per(w.busy_s),
        per(w.nodes_s),
        per(w.loadgens_s),
        per(w.redis_s),
        per(w.busy_s - w.nodes_s - w.loadgens_s - w.redis_s),
        w.user_s,
        w.system_s,
        w.softirq_s,
        w.context_switches as f64 / deliveries.max(1) as f64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_read_by_kind() {
        let hz = sys::clock_ticks();
        let text = format!(
            "cpu  {} 0 {} {} 0 0 {} 0 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1 2\nctxt 12345\nbtime 1\n",
            2.0 * hz,
            3.0 * hz,
            10.0 * hz,
            1.0 * hz
        );
        let b = parse_proc_stat(&text).unwrap();
        assert_eq!((b.user, b.system, b.idle, b.softirq), (2.0, 3.0, 10.0, 1.0));
        assert_eq!(b.ctxt, 12345);
        assert_eq!(b.busy(), 6.0);
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    fn sample(at_ms: u64, busy: f64, idle: f64, nodes: f64) -> CpuSample {
        CpuSample {
            unix_nanos: at_ms * 1_000_000,
            whole_box: BoxCpu {
                user: busy,
                idle,
                ctxt: at_ms,
                ..Default::default()
            },
            nodes_s: nodes,
            loadgens_s: 0.0,
            redis_s: 0.0,
        }
    }

    #[test]
    fn the_window_is_from_the_sample_before_the_send_to_the_one_after_the_last_receipt() {
        let s = [
            sample(0, 0.0, 0.0, 0.0),
            sample(100, 0.1, 0.1, 0.05),
            sample(200, 0.3, 0.1, 0.15),
            sample(300, 0.5, 0.1, 0.25),
            sample(400, 0.5, 0.3, 0.25),
        ];
        // Send at 150 ms, last receipt at 250 ms: samples 100 and 300.
        let w = window(&s, 150_000_000, 250_000_000).unwrap();
        assert!((w.secs - 0.2).abs() < 1e-9);
        assert!((w.busy_s - 0.4).abs() < 1e-9);
        assert!((w.idle_s - 0.0).abs() < 1e-9);
        assert!((w.nodes_s - 0.2).abs() < 1e-9);
        assert_eq!(w.context_switches, 200);
        // Not covered: the last receipt after the last sample.
        assert_eq!(window(&s, 150_000_000, 450_000_000), None);
        assert_eq!(window(&s[1..], 50_000_000, 250_000_000), None);
        let line = describe(&w, 100_000);
        assert!(line.contains("4.0 µs per delivery"), "{line}");
        assert!(line.contains("nodes 2.0 µs"), "{line}");
    }
}
