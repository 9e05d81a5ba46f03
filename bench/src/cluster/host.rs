//! The box a cluster run happens on: its memory and socket figures (`/proc/meminfo`,
//! `/proc/net/sockstat`, the load average), the processes a loadgen started, and the
//! host check that says what is missing before anything starts. Process RSS and CPU
//! come from `ringcast_loadgen::sys`, the one place that reads them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ringcast_loadgen::sys;
use serde::{Deserialize, Serialize};

/// Figures of `/proc/meminfo`, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Meminfo {
    pub mem_total: u64,
    pub mem_free: u64,
    pub mem_available: u64,
    pub slab: u64,
    pub s_reclaimable: u64,
    pub s_unreclaim: u64,
    pub kernel_stack: u64,
    pub page_tables: u64,
}

pub fn parse_meminfo(text: &str) -> Meminfo {
    let fields: BTreeMap<&str, u64> = text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut parts = v.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            Some((k.trim(), if parts.next() == Some("kB") { n * 1024 } else { n }))
        })
        .collect();
    let f = |k: &str| fields.get(k).copied().unwrap_or(0);
    Meminfo {
        mem_total: f("MemTotal"),
        mem_free: f("MemFree"),
        mem_available: f("MemAvailable"),
        slab: f("Slab"),
        s_reclaimable: f("SReclaimable"),
        s_unreclaim: f("SUnreclaim"),
        kernel_stack: f("KernelStack"),
        page_tables: f("PageTables"),
    }
}

pub fn meminfo() -> Meminfo {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

/// Figures of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sockstat {
    pub tcp_inuse: u64,
    pub tcp_alloc: u64,
    pub tcp_tw: u64,
    /// TCP buffer memory (`mem` is in pages).
    pub tcp_mem_bytes: u64,
    pub sockets_used: u64,
}

pub fn parse_sockstat(text: &str, page_size: u64) -> Sockstat {
    let mut out = Sockstat::default();
    for line in text.lines() {
        let Some((proto, rest)) = line.split_once(':') else {
            continue;
        };
        let vals: Vec<&str> = rest.split_whitespace().collect();
        for kv in vals.chunks(2) {
            let [k, v] = kv else { continue };
            let Ok(v) = v.parse::<u64>() else { continue };
            match (proto, *k) {
                ("TCP", "inuse") => out.tcp_inuse = v,
                ("TCP", "alloc") => out.tcp_alloc = v,
                ("TCP", "tw") => out.tcp_tw = v,
                ("TCP", "mem") => out.tcp_mem_bytes = v * page_size,
                ("sockets", "used") => out.sockets_used = v,
                _ => {}
            }
        }
    }
    out
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

pub fn sockstat() -> Sockstat {
    parse_sockstat(
        &std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default(),
        page_size(),
    )
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), as text.
pub fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Every living descendant of `roots` (a loadgen's worker processes), roots excluded.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, sys::parent_pid(pid)?)))
        .collect();
    descendants_in(&parents, roots)
}

/// Gives every thread of `roots` and their descendants the niceness `nice` and, with
/// `batch`, the `SCHED_BATCH` policy (Linux keeps both per thread). Returns the threads
/// changed and those that refused.
pub fn reprioritise(roots: &[u32], nice: i32, batch: bool) -> (usize, usize) {
    let mut pids = roots.to_vec();
    pids.extend(descendants(roots));
    let (mut done, mut failed) = (0, 0);
    for pid in pids {
        let tids = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok());
        for tid in tids {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: plain syscalls on a thread id; `param` outlives the call.
            let ok = unsafe {
                (!batch || libc::sched_setscheduler(tid, libc::SCHED_BATCH, &param) == 0)
                    && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) == 0
            };
            if ok {
                done += 1;
            } else {
                failed += 1;
            }
        }
    }
    (done, failed)
}

/// The descendants of `roots` in a (pid, parent) table.
fn descendants_in(parents: &[(u32, u32)], roots: &[u32]) -> Vec<u32> {
    let mut found = BTreeSet::new();
    let mut frontier: BTreeSet<u32> = roots.iter().copied().collect();
    while !frontier.is_empty() {
        let next: BTreeSet<u32> = parents
            .iter()
            .filter(|(pid, parent)| frontier.contains(parent) && !found.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        found.extend(&next);
        frontier = next;
    }
    found.into_iter().collect()
}

/// Host text like `uname -srm`.
pub fn uname() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_string();
    format!(
        "{} {} {}",
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/osrelease"),
        std::env::consts::ARCH
    )
}

/// A program on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What the host check looks at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub server_bin: PathBuf,
    pub server_bin_exists: bool,
    pub loadgen_bin: PathBuf,
    pub loadgen_bin_exists: bool,
    pub redis_server: Option<PathBuf>,
    pub taskset: bool,
    pub ncpu: usize,
    /// RLIMIT_NOFILE (soft, hard) after raising the soft limit to the hard one.
    pub nofile: (u64, u64),
    pub port_range: (u64, u64),
    pub somaxconn: u64,
    pub file_max: u64,
    /// nf_conntrack (count, max) when connection tracking is loaded.
    pub conntrack: Option<(u64, u64)>,
    pub mem_available: u64,
    /// Ports of the largest size (nodes and Redis) that something listens on.
    pub busy_ports: Vec<u16>,
    /// Why the highest source address cannot be bound, if it cannot.
    pub source_bind_error: Option<String>,
    pub tune_script: bool,
}

/// What the run asks of the host.
#[derive(Debug, Clone)]
pub struct Needs {
    pub per_node: u64,
    pub sources: u32,
    pub max_size: u64,
    pub nodes_of_max_size: u64,
    pub base_port: u16,
    pub bytes_per_conn: u64,
    pub reserve_bytes: u64,
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads the facts (and raises this process's RLIMIT_NOFILE, which every child
/// inherits).
pub fn gather(bin_dir: &Path, needs: &Needs, root: &Path) -> Facts {
    let server_bin = bin_dir.join("ringcast");
    let loadgen_bin = bin_dir.join("ringcast-loadgen");
    let port_range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let nodes = needs.nodes_of_max_size.min(super::plan::MAX_NODES) as u16;
    let busy_ports = (0..nodes)
        .map(|i| needs.base_port.saturating_add(i))
        .chain([needs.base_port.saturating_add(1000)])
        .filter(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_err())
        .collect();
    let last = super::plan::last_source(needs.sources);
    Facts {
        server_bin_exists: server_bin.is_file(),
        server_bin,
        loadgen_bin_exists: loadgen_bin.is_file(),
        loadgen_bin,
        redis_server: on_path("redis-server"),
        taskset: on_path("taskset").is_some(),
        ncpu: ringcast_bench::allowed_cpus().len(),
        nofile: sys::raise_nofile(),
        port_range,
        somaxconn: read_u64("/proc/sys/net/core/somaxconn").unwrap_or(0),
        file_max: read_u64("/proc/sys/fs/file-max").unwrap_or(0),
        conntrack: read_u64("/proc/sys/net/netfilter/nf_conntrack_count").map(|c| {
            (
                c,
                read_u64("/proc/sys/net/netfilter/nf_conntrack_max").unwrap_or(0),
            )
        }),
        mem_available: meminfo().mem_available,
        busy_ports,
        source_bind_error: std::net::TcpListener::bind((last, 0))
            .err()
            .map(|e| format!("{last}: {e}")),
        tune_script: root.join("scripts/tune-host.sh").is_file(),
    }
}

/// What is missing (the run cannot start) and what may hurt (it starts anyway).
pub fn judge(f: &Facts, n: &Needs) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let build = "build it with 'cargo build --release -p ringcast -p ringcast-loadgen -p ringcast-bench', or pass --bin-dir";
    if !f.server_bin_exists {
        problems.push(format!("no {}: {build}", f.server_bin.display()));
    }
    if !f.loadgen_bin_exists {
        problems.push(format!("no {}: {build}", f.loadgen_bin.display()));
    }
    if f.redis_server.is_none() {
        problems.push("redis-server is not installed (apt-get install -y redis-server)".into());
    }
    if !f.taskset {
        problems.push("taskset is missing (util-linux): the nodes are pinned with it".into());
    }
    let (soft, hard) = f.nofile;
    if soft < n.per_node + 300 {
        problems.push(format!(
            "ulimit -n is {soft} (hard {hard}): a node holds --per-node {} connections plus ~300 fds; \
             lower --per-node to {} or raise the limit",
            n.per_node,
            soft.saturating_sub(300)
        ));
    }
    let (lo, hi) = f.port_range;
    let width = hi.saturating_sub(lo) + 1;
    let need = super::plan::ports_per_source(n.per_node, n.sources);
    if need > width {
        problems.push(format!(
            "ip_local_port_range {lo}-{hi} gives {width} ports per source address and node; --per-node {} \
             over --sources {} needs {need} (raise --sources or widen net.ipv4.ip_local_port_range)",
            n.per_node, n.sources
        ));
    }
    // The nodes listen on base..base+K and Redis on base+1000 (see `Facts::busy_ports`):
    // an outbound connection given one of them as its ephemeral port (a loadgen's, an
    // earlier size's in TIME_WAIT) keeps a node from listening.
    let last = u64::from(n.base_port) + 1000;
    if lo <= last && hi >= u64::from(n.base_port) {
        problems.push(format!(
            "ip_local_port_range {lo}-{hi} holds the nodes' ports {}-{last}: an outbound connection can take \
             one (run scripts/tune-host.sh --apply, which starts it at 10000, or pass a --base-port above {hi})",
            n.base_port
        ));
    }
    if let Some(e) = &f.source_bind_error {
        problems.push(format!(
            "cannot bind the source address {e}; is 127.0.0.0/8 routed to lo? (or lower --sources)"
        ));
    }
    if f.somaxconn < 1024 {
        warnings.push(format!(
            "net.core.somaxconn is {}; connection bursts may see SYN drops (sysctl -w net.core.somaxconn=4096)",
            f.somaxconn
        ));
    }
    let fds = 2 * n.max_size + 20_000;
    if f.file_max < fds {
        problems.push(format!(
            "fs.file-max is {}; {} connections need both ends open: at least {fds} (sysctl -w fs.file-max={})",
            f.file_max,
            n.max_size,
            2 * n.max_size + 100_000
        ));
    }
    if let Some((count, max)) = f.conntrack {
        if count > 0 {
            warnings.push(format!(
                "connection tracking is active ({count} entries, max {max}): loopback connections beyond the max would be dropped"
            ));
        }
    }
    let need_mem = n.max_size.saturating_mul(n.bytes_per_conn) + n.reserve_bytes;
    if f.mem_available < need_mem {
        warnings.push(format!(
            "MemAvailable {} MiB; {} connections at an assumed {} KiB each (both ends, servers, loadgens, kernel) \
             plus the {} MiB reserve need {} MiB: sizes that do not fit are skipped",
            f.mem_available >> 20,
            n.max_size,
            n.bytes_per_conn / 1024,
            n.reserve_bytes >> 20,
            need_mem >> 20
        ));
    }
    if n.nodes_of_max_size > super::plan::MAX_NODES {
        problems.push(format!(
            "{} connections at --per-node {} need {} nodes (at most {}); raise --per-node",
            n.max_size,
            n.per_node,
            n.nodes_of_max_size,
            super::plan::MAX_NODES
        ));
    }
    if !f.busy_ports.is_empty() {
        let list: Vec<String> = f.busy_ports.iter().map(u16::to_string).collect();
        problems.push(format!(
            "ports in use: {} (pick another --base-port)",
            list.join(" ")
        ));
    }
    if f.tune_script && !(problems.is_empty() && warnings.is_empty()) {
        warnings.push("scripts/tune-host.sh exists: run it to fix the host settings above".into());
    }
    (problems, warnings)
}

/// The host check as written to `host.json` and shown in the README.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostCheck {
    pub date: String,
    pub host: String,
    pub summary: String,
    pub loadavg: String,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

impl HostCheck {
    pub fn of(f: &Facts, problems: Vec<String>, warnings: Vec<String>, date: String) -> HostCheck {
        HostCheck {
            date,
            host: uname(),
            summary: format!(
                "ncpu {}, MemAvailable {} MiB, ulimit -n {}/{}, ports {}-{}, somaxconn {}, file-max {}",
                f.ncpu,
                f.mem_available >> 20,
                f.nofile.0,
                f.nofile.1,
                f.port_range.0,
                f.port_range.1,
                f.somaxconn,
                f.file_max
            ),
            loadavg: loadavg(),
            problems,
            warnings,
        }
    }

    /// One line: the summary, then the problems and warnings.
    pub fn line(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join("; ")
            }
        };
        format!(
            "{}; problems: {}; warnings: {}",
            self.summary,
            list(&self.problems),
            list(&self.warnings)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_sockstat() {
        let m = parse_meminfo(
            "MemTotal:       24575472 kB\nMemFree:        23000000 kB\nMemAvailable:   23360000 kB\n\
             Slab:             102400 kB\nSReclaimable:      51200 kB\nSUnreclaim:        51200 kB\n\
             HugePages_Total:       0\n",
        );
        assert_eq!(m.mem_total, 24_575_472 * 1024);
        assert_eq!(m.mem_available, 23_360_000 * 1024);
        assert_eq!(m.slab, 100 << 20);
        assert_eq!(m.page_tables, 0);
        let s = parse_sockstat(
            "sockets: used 2000300\nTCP: inuse 2000267 orphan 0 tw 12 alloc 2000270 mem 5\nUDP: inuse 1 mem 0\n",
            4096,
        );
        assert_eq!(s.sockets_used, 2_000_300);
        assert_eq!(s.tcp_inuse, 2_000_267);
        assert_eq!(s.tcp_tw, 12);
        assert_eq!(s.tcp_alloc, 2_000_270);
        assert_eq!(s.tcp_mem_bytes, 5 * 4096);
    }

    #[test]
    fn finds_workers_of_workers() {
        let table = [(10, 1), (11, 10), (12, 10), (13, 11), (20, 1), (21, 20)];
        assert_eq!(descendants_in(&table, &[10]), [11, 12, 13]);
        assert_eq!(descendants_in(&table, &[10, 20]), [11, 12, 13, 21]);
        assert!(descendants_in(&table, &[13]).is_empty());
        // This test's own process has no children at this point, and is alive.
        assert!(descendants(&[std::process::id()])
            .iter()
            .all(|&p| p != std::process::id()));
    }

    fn good_facts() -> Facts {
        Facts {
            server_bin: "target/release/ringcast".into(),
            server_bin_exists: true,
            loadgen_bin: "target/release/ringcast-loadgen".into(),
            loadgen_bin_exists: true,
            redis_server: Some("/usr/bin/redis-server".into()),
            taskset: true,
            ncpu: 2,
            nofile: (20_000, 20_000),
            port_range: (10_000, 65535),
            somaxconn: 4096,
            file_max: 2_466_170,
            conntrack: None,
            mem_available: 23 << 30,
            busy_ports: vec![],
            source_bind_error: None,
            tune_script: true,
        }
    }

    fn needs(max_size: u64) -> Needs {
        Needs {
            per_node: 19_000,
            sources: 64,
            max_size,
            nodes_of_max_size: super::super::plan::node_count(max_size, 19_000),
            base_port: 4700,
            bytes_per_conn: 21 * 1024,
            reserve_bytes: 3 << 30,
        }
    }

    #[test]
    fn a_ready_host_has_no_problems() {
        let (p, w) = judge(&good_facts(), &needs(40_000));
        assert!(p.is_empty(), "{p:?}");
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn says_what_is_missing() {
        let f = Facts {
            loadgen_bin_exists: false,
            redis_server: None,
            nofile: (1024, 1024),
            port_range: (60000, 60100),
            busy_ports: vec![4700, 5700],
            somaxconn: 128,
            ..good_facts()
        };
        let (p, w) = judge(&f, &needs(40_000));
        let all = p.join("\n");
        assert!(all.contains("ringcast-loadgen"), "{all}");
        assert!(all.contains("redis-server is not installed"), "{all}");
        assert!(all.contains("ulimit -n is 1024"), "{all}");
        assert!(all.contains("ip_local_port_range 60000-60100"), "{all}");
        assert!(all.contains("ports in use: 4700 5700"), "{all}");
        assert_eq!(p.len(), 5);
        // An ephemeral range that holds the nodes' ports.
        let f = Facts {
            port_range: (1024, 65535),
            ..good_facts()
        };
        let (p, _) = judge(&f, &needs(40_000));
        assert!(
            p.iter().any(|x| x.contains("holds the nodes' ports 4700-5700")),
            "{p:?}"
        );
        assert!(w.iter().any(|x| x.contains("somaxconn")));
        assert!(w.iter().any(|x| x.contains("tune-host.sh")));
        // A million connections do not fit 23 GiB at 21 KiB each plus 3 GiB: a
        // warning (the size is skipped or tried when its turn comes), not a problem.
        let (p, w) = judge(&good_facts(), &needs(1_000_000));
        assert!(p.is_empty(), "{p:?}");
        assert!(w[0].starts_with("MemAvailable"), "{w:?}");
        let (p, _) = judge(
            &good_facts(),
            &Needs {
                per_node: 100,
                nodes_of_max_size: 10_000,
                ..needs(1_000_000)
            },
        );
        assert!(p.iter().any(|x| x.contains("raise --per-node")), "{p:?}");
    }
}
