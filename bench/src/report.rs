//! Tables: the progress lines, the targets table and the README of a run.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{CaseRun, Lat, PacedRun, PacedSummary, Results, ServerKind, Summary};

pub fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub fn fmt_bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn opt<T>(x: Option<T>, f: impl Fn(T) -> String) -> String {
    x.map_or("–".to_string(), f)
}

pub fn progress_line(r: &CaseRun, t: Duration) {
    let mut s = format!(
        "[{:>4.0}s] {:<10} cores {} n {:>6} rep {}:",
        t.as_secs_f64(),
        r.server.label(),
        r.cores,
        r.size,
        r.repeat
    );
    if let Some(c) = &r.connect {
        let _ = write!(s, " mem/conn {}", opt(c.rss_per_connection, fmt_bytes));
    }
    if let Some(f) = &r.fanout {
        let _ = write!(
            s,
            " | {} deliveries/s, {} per CPU-s, p99 {}, loss {}",
            fmt_rate(f.deliveries_per_sec),
            opt(f.deliveries_per_cpu_sec, fmt_rate),
            fmt_us(f.latency.p99),
            f.loss
        );
    }
    if let Some(e) = &r.error {
        let _ = write!(s, " | ERROR {e}");
    }
    eprintln!("{s}");
}

pub fn paced_line(r: &PacedRun, t: Duration) {
    let mut s = format!(
        "[{:>4.0}s] {:<10} cores {} n {:>6} rep {} paced:",
        t.as_secs_f64(),
        r.server.label(),
        r.cores,
        r.size,
        r.repeat
    );
    if let Some(f) = &r.fanout {
        let _ = write!(
            s,
            " p50 {} p99 {} max {}, loss {}",
            fmt_us(f.latency.p50),
            fmt_us(f.latency.p99),
            fmt_us(f.latency.max),
            f.loss
        );
    }
    if let Some(e) = &r.error {
        let _ = write!(s, " | ERROR {e}");
    }
    eprintln!("{s}");
}

/// The core count and size the targets are judged at: 1 core (the smallest run) and
/// 10k subscribers (or the largest size below it).
fn target_point(r: &Results) -> (usize, u64) {
    let cores = r.plan.cores.iter().copied().min().unwrap_or(1);
    let size = r
        .plan
        .sizes
        .iter()
        .copied()
        .filter(|&n| n <= 10_000)
        .max()
        .unwrap_or(r.plan.sizes[0]);
    (cores, size)
}

fn sum(r: &Results, s: ServerKind, cores: usize, size: u64) -> Option<&Summary> {
    r.summary
        .iter()
        .find(|x| x.server == s && x.cores == cores && x.size == size)
}

fn paced(r: &Results, s: ServerKind, cores: usize) -> Option<&PacedSummary> {
    r.paced_summary.iter().find(|x| x.server == s && x.cores == cores)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The targets table (Markdown).
pub fn targets_table(r: &Results) -> String {
    use ServerKind::*;
    let (cores, size) = target_point(r);
    let get = |k: ServerKind, f: fn(&Summary) -> Option<f64>| sum(r, k, cores, size).and_then(f);
    let mem = |k| get(k, |s| s.rss_per_connection);
    let dps = |k| get(k, |s| s.deliveries_per_sec);
    let dpc = |k| get(k, |s| s.deliveries_per_cpu_sec);
    let p99 = |k| paced(r, k, cores).and_then(|p| p.latency.as_ref().map(|l| l.p99));
    let mut t = String::new();
    let _ = writeln!(
        t,
        "At {cores} server core(s), {size} subscribers; medians of {} repeat(s), measured side by side in one run.\n",
        r.plan.repeats
    );
    t.push_str("| metric | ringcast | floor | tokio peer | ratio | target | status |\n");
    t.push_str("| --- | ---: | ---: | ---: | --- | --- | --- |\n");
    let m = mem(Ringcast);
    let _ = writeln!(
        t,
        "| user-space memory per idle joined connection (RSS delta / N) | {} | {} | {} | ringcast/floor {} | ringcast ≤ 2 KiB | {} |",
        opt(m, fmt_bytes),
        opt(mem(Floor), fmt_bytes),
        opt(mem(Tokio), fmt_bytes),
        opt(ratio(m, mem(Floor)), |x| format!("{x:.2}")),
        verdict(m.map(|m| m <= 2048.0))
    );
    let _ = writeln!(
        t,
        "| deliveries/s (as fast as possible, window 64) | {} | {} | {} | ringcast/floor {}, ringcast/tokio {} | – | – |",
        opt(dps(Ringcast), fmt_rate),
        opt(dps(Floor), fmt_rate),
        opt(dps(Tokio), fmt_rate),
        opt(ratio(dps(Ringcast), dps(Floor)), |x| format!("{x:.2}")),
        opt(ratio(dps(Ringcast), dps(Tokio)), |x| format!("{x:.2}")),
    );
    let rf = ratio(dpc(Ringcast), dpc(Floor));
    let rt = ratio(dpc(Ringcast), dpc(Tokio));
    let _ = writeln!(
        t,
        "| server deliveries per CPU-second | {} | {} | {} | ringcast/floor {} | ≥ 0.90 of the floor | {} |",
        opt(dpc(Ringcast), fmt_rate),
        opt(dpc(Floor), fmt_rate),
        opt(dpc(Tokio), fmt_rate),
        opt(rf, |x| format!("{x:.2}")),
        verdict(rf.map(|x| x >= 0.9))
    );
    let _ = writeln!(
        t,
        "| (same, vs the tokio peer) | | | | ringcast/tokio {} | ≥ 2x the tokio peer | {} |",
        opt(rt, |x| format!("{x:.2}")),
        verdict(rt.map(|x| x >= 2.0))
    );
    for &other in r.plan.cores.iter().filter(|&&c| c != cores) {
        let at = |k| sum(r, k, other, size).and_then(|s| s.deliveries_per_cpu_sec);
        let rt = ratio(at(Ringcast), at(Tokio));
        let _ = writeln!(
            t,
            "| (same, vs the tokio peer, at {other} server cores; the loadgen shares a core) | {} | {} | {} | ringcast/tokio {} | ≥ 2x the tokio peer | {} |",
            opt(at(Ringcast), fmt_rate),
            opt(at(Floor), fmt_rate),
            opt(at(Tokio), fmt_rate),
            opt(rt, |x| format!("{x:.2}")),
            verdict(rt.map(|x| x >= 2.0))
        );
    }
    let cpu = |k| paced(r, k, cores).and_then(|p| p.cpu_us_per_delivery);
    let _ = writeln!(
        t,
        "| server CPU per delivery, paced (one frame per send) | {} | {} | {} | ringcast/floor {}, tokio/ringcast {} | – | – |",
        opt(cpu(Ringcast), |v| format!("{v:.2} µs")),
        opt(cpu(Floor), |v| format!("{v:.2} µs")),
        opt(cpu(Tokio), |v| format!("{v:.2} µs")),
        opt(ratio(cpu(Ringcast), cpu(Floor)), |x| format!("{x:.2}")),
        opt(ratio(cpu(Tokio), cpu(Ringcast)), |x| format!("{x:.2}")),
    );
    let rp = ratio(p99(Ringcast), p99(Floor));
    let _ = writeln!(
        t,
        "| p99 delivery latency, {} subscribers, {} broadcasts/s | {} | {} | {} | ringcast/floor {} | ≤ 1.2x the floor | {} |",
        r.plan.paced_subscribers,
        r.plan.paced_rate,
        opt(p99(Ringcast), fmt_us),
        opt(p99(Floor), fmt_us),
        opt(p99(Tokio), fmt_us),
        opt(rp, |x| format!("{x:.2}")),
        verdict(rp.map(|x| x <= 1.2))
    );
    let fw = paced(r, Floor, cores).and_then(|p| p.floor_write.as_ref().map(|l| l.p99));
    let rw = ratio(p99(Ringcast), fw);
    let _ = writeln!(
        t,
        "| (same, vs the floor's own time to write {} frames, p99 per broadcast, self-measured) | {} | {} | | ringcast/floor-write {} | ≤ 1.2x (literal reading) | {} |",
        r.plan.paced_subscribers,
        opt(p99(Ringcast), fmt_us),
        opt(fw, fmt_us),
        opt(rw, |x| format!("{x:.2}")),
        verdict(rw.map(|x| x <= 1.2))
    );
    t
}

fn lat_cells(l: Option<&Lat>) -> String {
    match l {
        Some(l) => format!(
            "{} | {} | {} | {} | {}",
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max)
        ),
        None => "– | – | – | – | –".to_string(),
    }
}

/// The README of a run; `prefix` leads the links to the run's files (empty inside
/// the run directory, `<run>/` in results/README.md).
pub fn readme(r: &Results, prefix: &str, plot_note: Option<&str>) -> String {
    let m = &r.machine;
    let mut s = String::new();
    s.push_str("# ringcast benchmark results\n\n");
    s.push_str(if r.side_run {
        "Written by the harness (`ringcast-bench`, the command below); do not edit by hand.\n\n"
    } else {
        "Regenerated by the harness (`scripts/bench.sh [--quick|--full]`, which runs `ringcast-bench`); do not edit by hand.\n\n"
    });
    let _ = writeln!(
        s,
        "Latest run: **{}**, {} mode ({} repeat(s), sizes {:?}, server cores {:?}), took {:.0} s. Every figure: [`{prefix}results.json`]({prefix}results.json); raw loadgen reports and logs in [`{prefix}raw/`]({prefix}raw/).\n",
        r.date, r.plan.mode, r.plan.repeats, r.plan.sizes, r.plan.cores, r.duration_secs
    );
    let _ = writeln!(
        s,
        "**Machine:** {}, {} CPU(s), {:.1} GiB RAM, Linux {}, host `{}`, RLIMIT_NOFILE {}.\n",
        m.cpu_model, m.cpus, m.mem_total_gib, m.kernel, m.host, m.nofile_limit
    );
    for (c, (srv, lg, shared)) in &r.plan.placement {
        let _ = writeln!(
            s,
            "- {c} server core(s): server pinned (`taskset`) to CPU {srv}, loadgen to CPU {lg}{}.",
            if *shared {
                " — **the loadgen shares a core with the server**, so these rows understate every server alike"
            } else {
                ""
            }
        );
    }
    if !r.plan.skipped_sizes.is_empty() {
        let _ = writeln!(
            s,
            "- Sizes skipped for the fd limit: {:?} (each process stays under 20,000 fds).",
            r.plan.skipped_sizes
        );
    }
    if !r.command.is_empty() {
        let _ = writeln!(s, "\n**Command:** `{}`", r.command);
    }
    s.push_str(&tls_section(r));
    s.push_str(&deflate_section(r));
    s.push_str("\n## Targets\n\n");
    s.push_str(&targets_table(r));
    s.push_str("\n## Fanout at every size (medians)\n\n");
    s.push_str("| server cores | subscribers | server | deliveries/s | deliveries per CPU-s | vs floor (per CPU-s) | p50 | p90 | p99 | p99.9 | max | memory per idle connection | loss |\n");
    s.push_str(
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for x in &r.summary {
        let floor = sum(r, ServerKind::Floor, x.cores, x.size).and_then(|f| f.deliveries_per_cpu_sec);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.cores,
            x.size,
            x.server.label(),
            opt(x.deliveries_per_sec, fmt_rate),
            opt(x.deliveries_per_cpu_sec, fmt_rate),
            opt(ratio(x.deliveries_per_cpu_sec, floor), |v| format!("{v:.2}")),
            lat_cells(x.latency.as_ref()),
            opt(x.rss_per_connection, fmt_bytes),
            x.loss
        );
    }
    if r.plan.servers.contains(&ServerKind::RingcastSend) {
        s.push_str(&write_path_steps(r));
    }
    let _ = writeln!(
        s,
        "\n## Paced fanout: {} broadcasts/s to {} subscribers (medians)\n",
        r.plan.paced_rate, r.plan.paced_subscribers
    );
    s.push_str(
        "| server cores | server | p50 | p90 | p99 | p99.9 | max | loss | server CPU per delivery |\n",
    );
    s.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for x in &r.paced_summary {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            x.cores,
            x.server.label(),
            lat_cells(x.latency.as_ref()),
            x.loss,
            opt(x.cpu_us_per_delivery, |v| format!("{v:.2} µs"))
        );
        if let Some(w) = &x.floor_write {
            let _ = writeln!(
                s,
                "| {} | floor: own write time per broadcast (server side only) | {} | – | – |",
                x.cores,
                lat_cells(Some(w))
            );
        }
    }
    s.push_str("\n## Plots\n\n");
    match plot_note {
        Some(n) => {
            let _ = writeln!(s, "{n}");
        }
        None => {
            for (file, title) in [
                ("deliveries.png", "deliveries/s vs subscribers"),
                (
                    "deliveries_per_cpu.png",
                    "deliveries per server CPU-second vs subscribers",
                ),
                ("latency_cdf.png", "latency CDF, paced fanout"),
                (
                    "memory_per_connection.png",
                    "memory per connection vs connections",
                ),
            ] {
                let _ = writeln!(s, "![{title}]({prefix}{file})\n");
            }
        }
    }
    if !r.criterion.is_empty() {
        s.push_str("## Microbenchmarks (criterion, `bench/benches/hot_paths.rs`, medians)\n\n");
        s.push_str("| benchmark | median |\n| --- | ---: |\n");
        for (id, ns) in &r.criterion {
            let t = if *ns < 1000.0 {
                format!("{ns:.1} ns")
            } else {
                fmt_us(ns / 1000.0)
            };
            let _ = writeln!(s, "| {id} | {t} |");
        }
        s.push('\n');
    }
    let errors: Vec<String> = r
        .runs
        .iter()
        .filter_map(|x| {
            x.error
                .as_ref()
                .map(|e| format!("{} c{} n{} r{}: {e}", x.server.label(), x.cores, x.size, x.repeat))
        })
        .chain(r.paced.iter().filter_map(|x| {
            x.error
                .as_ref()
                .map(|e| format!("{} c{} paced r{}: {e}", x.server.label(), x.cores, x.repeat))
        }))
        .chain(r.runs.iter().flat_map(|x| {
            let tag = format!("{} c{} n{} r{}", x.server.label(), x.cores, x.size, x.repeat);
            x.connect
                .iter()
                .flat_map(|c| c.problems.iter())
                .chain(x.fanout.iter().flat_map(|f| f.problems.iter()))
                .map(move |p| format!("{tag}: {p}"))
        }))
        .collect();
    if !errors.is_empty() {
        s.push_str("## Problems reported\n\n");
        for e in errors {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
    s.push_str(
        "## How it is measured\n\n\
- **Servers.** `ringcast serve` (release build, the seed app); `ringcast-floor` (`bench/src/bin/floor.rs`: thread-per-core epoll, writes the pre-encoded frame to every socket with non-blocking `write`/`writev`, coalescing the frames pending per socket — the kernel's limit); `ringcast-tokio-peer` (`bench/src/bin/tokio_peer.rs`: tokio multi-threaded runtime with one worker per core, tokio-tungstenite, a task per connection, a `tokio::sync::broadcast` channel per topic carrying the frame encoded once). All three serve the seed app's `bench:*` join and `new_msg` broadcast, so the same `ringcast-loadgen` drives them.\n\
- **Memory per connection.** `ringcast-loadgen connect`, N connections arriving at 2,000/s, each joining and then sending nothing: (server RSS at the end of a 4 s (quick) or 5 s (full) hold − RSS before) / N. RSS is user space only; kernel socket buffers are not in it. ringcast parks a connection silent for 1 s (its task, pump and glommio I/O source are freed; a kernel poll in a per-core io_uring waits for it), and later arrivals reuse that memory; the loadgen's JSON also has the figure at the moment the last connection joined.\n\
- **Deliveries/s and per CPU-second.** `ringcast-loadgen fanout`, publishing as fast as the server delivers (window 64) about 2M (quick) or 4M (full) deliveries in total. Deliveries per CPU-second = 1 / (server CPU time, user + system, from just before the first send to the last delivery, per delivery).\n\
- **Latency.** Send-to-receive per delivery, from the loadgen's HDR histogram; the CDF plot joins its p50/p90/p99/p99.9/max (the loadgen's JSON carries percentiles, not the full histogram). The latency target compares ringcast's p99 with the floor's p99 in the same paced run: the floor's p99 is the time the kernel needs to take 10k frames plus the loadgen's own reading time.\n\
- **Noise.** Loopback on a small shared VM: compare ratios measured side by side in one run, not absolute numbers across runs. Servers are started fresh for each size and run one after another at the same size.\n",
    );
    s
}

/// ringcast over TLS against plain ringcast, side by side in this run: memory per idle
/// joined connection and server CPU per delivery. Empty unless the run had both.
pub fn tls_section(r: &Results) -> String {
    use ServerKind::{Ringcast, RingcastTls};
    if !(r.plan.servers.contains(&Ringcast) && r.plan.servers.contains(&RingcastTls)) {
        return String::new();
    }
    let mut s = String::from(
        "\n## TLS against plain (`ringcast` over `ws://` vs `ringcast serve --tls-self-signed` over `wss://`)\n\n\
         The same build, servers started one after the other at each size, medians over the repeats. \
         The loadgen speaks `wss://` through rustls (ring, TLS 1.3) with `--tls-insecure`.",
    );
    if let Some(cap) = r.plan.tls_connect_rate {
        let _ = write!(
            s,
            " `wss://` connections arrive at {} per second at most (a handshake costs the server about 0.4 ms of CPU).",
            fmt_rate(cap)
        );
    }
    s.push_str(" *joined* is the fewest connections (subscribers) that joined in any repeat; a row below its size measured fewer than it says.\n\n");
    let joined = |k: ServerKind, cores: usize, size: u64, f: fn(&crate::CaseRun) -> Option<u64>| {
        r.runs
            .iter()
            .filter(|x| x.server == k && x.cores == cores && x.size == size)
            .filter_map(f)
            .min()
    };
    let idle_joined = |x: &crate::CaseRun| x.connect.as_ref().map(|c| c.joined);
    let fan_joined = |x: &crate::CaseRun| x.fanout.as_ref().map(|f| f.joined);
    let n = |v: Option<u64>| opt(v, |v| v.to_string());
    s.push_str(
        "User-space memory per idle joined connection (server RSS delta / N at the end of the hold):\n\n",
    );
    s.push_str(
        "| server cores | connections | joined ws / wss | ws | wss | wss − ws | wss / ws | wss target ≤ 4 KiB at 10,000 |\n",
    );
    s.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    let us = |v: Option<f64>| opt(v, |v| format!("{v:.2} µs"));
    let per_delivery = |x: Option<f64>| x.filter(|&x| x > 0.0).map(|x| 1e6 / x);
    for x in r.summary.iter().filter(|x| x.server == Ringcast) {
        let Some(t) = sum(r, RingcastTls, x.cores, x.size) else {
            continue;
        };
        let (a, b) = (x.rss_per_connection, t.rss_per_connection);
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} |",
            x.cores,
            x.size,
            n(joined(Ringcast, x.cores, x.size, idle_joined)),
            n(joined(RingcastTls, x.cores, x.size, idle_joined)),
            opt(a, fmt_bytes),
            opt(b, fmt_bytes),
            opt(a.zip(b).map(|(a, b)| b - a), fmt_bytes),
            opt(ratio(b, a), |v| format!("{v:.2}")),
            if x.size == 10_000 {
                verdict(b.map(|b| b <= 4096.0))
            } else {
                "–"
            }
        );
    }
    s.push_str("\nServer CPU per delivery, fanout as fast as the loadgen reads (window 64; several frames per write, one encryption for them under TLS):\n\n");
    s.push_str("| server cores | subscribers | joined ws / wss | ws | wss | wss / ws | ws deliveries/s | wss deliveries/s | loss ws / wss |\n");
    s.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for x in r.summary.iter().filter(|x| x.server == Ringcast) {
        let Some(t) = sum(r, RingcastTls, x.cores, x.size) else {
            continue;
        };
        let (a, b) = (
            per_delivery(x.deliveries_per_cpu_sec),
            per_delivery(t.deliveries_per_cpu_sec),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} / {} |",
            x.cores,
            x.size,
            n(joined(Ringcast, x.cores, x.size, fan_joined)),
            n(joined(RingcastTls, x.cores, x.size, fan_joined)),
            us(a),
            us(b),
            opt(ratio(b, a), |v| format!("{v:.2}")),
            opt(x.deliveries_per_sec, fmt_rate),
            opt(t.deliveries_per_sec, fmt_rate),
            x.loss,
            t.loss
        );
    }
    let _ = writeln!(
        s,
        "\nServer CPU per delivery, paced ({} broadcasts/s to {} subscribers: one frame per write, one encryption per delivery under TLS):\n",
        r.plan.paced_rate, r.plan.paced_subscribers
    );
    s.push_str("| server cores | joined ws / wss | ws | wss | wss / ws | p99 ws | p99 wss | loss ws / wss |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for x in r.paced_summary.iter().filter(|x| x.server == Ringcast) {
        let Some(t) = paced(r, RingcastTls, x.cores) else {
            continue;
        };
        let paced_joined = |k: ServerKind| {
            r.paced
                .iter()
                .filter(|p| p.server == k && p.cores == x.cores)
                .filter_map(|p| p.fanout.as_ref().map(|f| f.joined))
                .min()
        };
        let _ = writeln!(
            s,
            "| {} | {} / {} | {} | {} | {} | {} | {} | {} / {} |",
            x.cores,
            n(paced_joined(Ringcast)),
            n(paced_joined(RingcastTls)),
            us(x.cpu_us_per_delivery),
            us(t.cpu_us_per_delivery),
            opt(ratio(t.cpu_us_per_delivery, x.cpu_us_per_delivery), |v| format!(
                "{v:.2}"
            )),
            opt(x.latency.as_ref().map(|l| l.p99), fmt_us),
            opt(t.latency.as_ref().map(|l| l.p99), fmt_us),
            x.loss,
            t.loss
        );
    }
    s
}

/// ringcast with the loadgen offering `permessage-deflate` against plain ringcast, side
/// by side in this run: bytes on the wire and server CPU per delivery. Empty unless the
/// run had both.
pub fn deflate_section(r: &Results) -> String {
    use ServerKind::{Ringcast, RingcastDeflate};
    if !(r.plan.servers.contains(&Ringcast) && r.plan.servers.contains(&RingcastDeflate)) {
        return String::new();
    }
    let mut s = format!(
        "\n## Compression against plain (`ringcast` with the loadgen offering `permessage-deflate` or not)\n\n\
         The same build, servers started one after the other at each size, medians over the repeats. \
         Every fanout message's body is padded with {} bytes of chat-like text (`--pad`). A broadcast is \
         compressed once per core and the same frame goes to every subscriber that negotiated it. \
         *bytes* are the WebSocket bytes the subscribers read per delivery.\n\n\
         | server cores | subscribers | bytes plain | bytes deflate | plain / deflate | CPU plain | CPU deflate | deflate / plain | loss plain / deflate |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
        r.plan.pad
    );
    let per_delivery = |x: Option<f64>| x.filter(|&x| x > 0.0).map(|x| 1e6 / x);
    for x in r.summary.iter().filter(|x| x.server == Ringcast) {
        let Some(d) = sum(r, RingcastDeflate, x.cores, x.size) else {
            continue;
        };
        let (a, b) = (
            per_delivery(x.deliveries_per_cpu_sec),
            per_delivery(d.deliveries_per_cpu_sec),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            x.cores,
            x.size,
            opt(x.wire_bytes_per_delivery, fmt_bytes),
            opt(d.wire_bytes_per_delivery, fmt_bytes),
            opt(
                ratio(x.wire_bytes_per_delivery, d.wire_bytes_per_delivery),
                |v| format!("{v:.2}")
            ),
            opt(a, |v| format!("{v:.2} µs")),
            opt(b, |v| format!("{v:.2} µs")),
            opt(ratio(b, a), |v| format!("{v:.2}")),
            x.loss,
            d.loss
        );
    }
    s
}

/// What each step of the write path bought, measured side by side in this run.
fn write_path_steps(r: &Results) -> String {
    let mut s = String::from(
        "\n## Write path: what each step bought\n\n\
         1. **Per-core flusher** (2026-11-25): fanout marks each subscriber dirty and one task per core writes \
         every dirty connection's queued frames in one `send`, instead of waking one task per subscriber. \
         At 10,000 subscribers, deliveries per server CPU-second went from 0.79 to 1.00 of the floor's \
         (two single quick runs before and after; not re-measured side by side).\n\
         2. **Batched io_uring submissions**: the flusher queues one `SEND`/`SENDMSG` (`MSG_DONTWAIT`, one iovec \
         per frame) per dirty connection and submits the batch with one `io_uring_enter`. Measured here \
         against the same build with one `send` per connection (`RINGCAST_WRITE_PATH=send`), medians:\n\n",
    );
    s.push_str("As fast as the loadgen reads (window 64; several frames per send), deliveries per server CPU-second:\n\n");
    s.push_str("| server cores | subscribers | batched io_uring (per CPU-s) | send() per connection (per CPU-s) | ratio |\n");
    s.push_str("| ---: | ---: | ---: | ---: | ---: |\n");
    let mut any = false;
    for x in r.summary.iter().filter(|x| x.server == ServerKind::Ringcast) {
        let Some(plain) = sum(r, ServerKind::RingcastSend, x.cores, x.size) else {
            continue;
        };
        any = true;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            x.cores,
            x.size,
            opt(x.deliveries_per_cpu_sec, fmt_rate),
            opt(plain.deliveries_per_cpu_sec, fmt_rate),
            opt(
                ratio(x.deliveries_per_cpu_sec, plain.deliveries_per_cpu_sec),
                |v| format!("{v:.2}")
            )
        );
    }
    if !any {
        s.push_str("| – | – | (this run had no `ringcast-send` server) | | |\n");
    }
    let _ = writeln!(
        s,
        "\nPaced ({} broadcasts/s to {} subscribers: one frame per send), server CPU per delivery:\n",
        r.plan.paced_rate, r.plan.paced_subscribers
    );
    s.push_str("| server cores | batched io_uring | send() per connection | ratio |\n| ---: | ---: | ---: | ---: |\n");
    for x in r
        .paced_summary
        .iter()
        .filter(|x| x.server == ServerKind::Ringcast)
    {
        let plain = r
            .paced_summary
            .iter()
            .find(|p| p.server == ServerKind::RingcastSend && p.cores == x.cores);
        let Some(plain) = plain else { continue };
        let us = |v: Option<f64>| opt(v, |v| format!("{v:.2} µs"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            x.cores,
            us(x.cpu_us_per_delivery),
            us(plain.cpu_us_per_delivery),
            opt(
                ratio(x.cpu_us_per_delivery, plain.cpu_us_per_delivery),
                |v| format!("{v:.2}")
            )
        );
    }
    s.push_str(
        "\nIn isolation (`ringcast-sendpath`: one 64-byte send to each of 1,000 or 5,000 loopback sockets, \
         writer CPU only, medians of 5 alternating runs on this machine), a batched submission cost 0.78-0.82 \
         of a `send` syscall per socket.\n",
    );
    s
}
