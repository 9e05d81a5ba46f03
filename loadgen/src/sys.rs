//! Operating-system facts: clocks, file-descriptor limits, a server's RSS and CPU time.

use serde::{Deserialize, Serialize};

/// Nanoseconds since the unix epoch (CLOCK_REALTIME: comparable across processes).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// RLIMIT_NOFILE after raising the soft limit to the hard one: (soft, hard).
pub fn raise_nofile() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (1024, 1024);
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        (r.rlim_cur, r.rlim_max)
    }
}

/// The local ephemeral port range: how many ports one source address can use.
pub fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            let lo = it.next()??;
            let hi = it.next()??;
            Some(hi.saturating_sub(lo) + 1)
        })
        .unwrap_or(28_232)
}

/// One sample of a process: resident memory and CPU seconds (user + system).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ProcSample {
    pub rss_bytes: u64,
    pub cpu_secs: f64,
    pub unix_nanos: u64,
}

/// Samples `/proc/PID/status` (VmRSS) and `/proc/PID/stat` (utime + stime).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let cpu_secs = parse_stat_cpu(&stat)?;
    Some(ProcSample {
        rss_bytes: rss_kb * 1024,
        cpu_secs,
        unix_nanos: unix_nanos(),
    })
}

/// The CPU time of a process (utime + stime, children not included), from
/// `/proc/PID/stat` alone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    parse_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Ticks per second of `/proc`'s CPU times (`CLK_TCK`).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// The parent of a process, from `/proc/PID/stat` (to find a loadgen's workers).
pub fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

fn parse_stat_ppid(stat: &str) -> Option<u32> {
    // Past the command name (see parse_stat_cpu): state, then ppid.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The soft "Max open files" of another process, from `/proc/PID/limits`.
pub fn process_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The calling thread's id (what `/proc/self/task/TID` names).
pub fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// The scheduler state of one of this process's threads (`R` runnable, `S` asleep,
/// `D` in uninterruptible wait), from `/proc/self/task/TID/stat`.
pub fn thread_state(tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    parse_stat_state(&stat)
}

fn parse_stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// What a thread of this process is doing, for a stall report: its state, the kernel
/// function it waits in, its system call (number and arguments) and kernel stack
/// (readable by root only).
pub fn thread_report(tid: u32) -> String {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}"))
            .map(|s| s.trim().replace('\n', " | "))
            .unwrap_or_else(|e| format!("({e})"))
    };
    format!(
        "thread {tid} ({}): state {}, wchan {}, syscall {}, stack {}",
        read("comm"),
        thread_state(tid).unwrap_or('?'),
        read("wchan"),
        read("syscall"),
        read("stack")
    )
}

/// One line per io_uring of this process: its ring positions (a completion the
/// thread has not consumed shows as CqTail ahead of CqHead) and its armed polls by
/// opcode, from `/proc/self/fdinfo`.
pub fn uring_report() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return vec!["(cannot read /proc/self/fd)".into()];
    };
    let mut lines = Vec::new();
    for e in dir.flatten() {
        let is_uring = std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"));
        let fd = e.file_name().to_string_lossy().into_owned();
        if !is_uring {
            continue;
        }
        if let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) {
            lines.push(format!("io_uring fd {fd}: {}", summarize_uring_fdinfo(&info)));
        }
    }
    lines
}

fn summarize_uring_fdinfo(info: &str) -> String {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map_or("?", str::trim)
    };
    let mut polls = std::collections::BTreeMap::<u32, u64>::new();
    for op in info.lines().filter_map(|l| l.trim().strip_prefix("op=")) {
        if let Some(n) = op.split(',').next().and_then(|n| n.parse().ok()) {
            *polls.entry(n).or_default() += 1;
        }
    }
    let polls: Vec<String> = polls.iter().map(|(op, n)| format!("op {op} x{n}")).collect();
    format!(
        "sq {}/{} (cached {}), cq {}/{} (cached {}), {} SQEs and {} CQEs waiting, overflow {}; polls: {}",
        field("SqHead"),
        field("SqTail"),
        field("CachedSqHead"),
        field("CqHead"),
        field("CqTail"),
        field("CachedCqTail"),
        field("SQEs"),
        field("CQEs"),
        info.lines()
            .skip_while(|l| !l.starts_with("CqOverflowList"))
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .count(),
        if polls.is_empty() {
            "none".into()
        } else {
            polls.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_name() {
        let stat =
            "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 50";
        assert_eq!(parse_stat_cpu(stat), Some(300.0 / clock_ticks()));
        assert_eq!(parse_stat_ppid(stat), Some(1));
        assert_eq!(parse_stat_state(stat), Some('S'));
    }

    #[test]
    fn summarizes_uring_fdinfo() {
        let info = "pos:\t0\nSqMask:\t0xfff\nSqHead:\t42\nSqTail:\t42\nCachedSqHead:\t42\n\
                    CqMask:\t0x1fff\nCqHead:\t37\nCqTail:\t39\nCachedCqTail:\t39\nSQEs:\t0\n\
                    CQEs:\t2\nPollList:\n  op=6, task_works=0\n  op=27, task_works=0\n  \
                    op=27, task_works=1\nCqOverflowList:\nNAPI:\tdisabled\n";
        assert_eq!(
            summarize_uring_fdinfo(info),
            "sq 42/42 (cached 42), cq 37/39 (cached 39), 0 SQEs and 2 CQEs waiting, overflow 0; \
             polls: op 6 x1, op 27 x2"
        );
    }

    #[test]
    fn reports_own_threads_and_rings() {
        let tid = gettid();
        assert_eq!(thread_state(tid), Some('R'));
        assert!(thread_report(tid).starts_with(&format!("thread {tid} (")));
        // This test process has no io_uring: no lines, and no error line either.
        assert!(uring_report().iter().all(|l| l.starts_with("io_uring fd ")));
    }

    #[test]
    fn samples_self() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
        assert!(process_nofile(std::process::id()).is_some());
        assert!(parent_pid(std::process::id()).is_some_and(|p| p > 0));
    }
}
