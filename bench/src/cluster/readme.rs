//! DIR/README.md of a cluster run: how it was measured, the host check, one table row
//! and one section per size. Text only, from the summaries.

use std::fmt::Write;

use super::host::HostCheck;
use super::summary::{fmt_ms, fmt_secs, kib, mib, SizeSummary};

/// The README of a run over `sums` (sorted by size).
pub fn readme(host: &HostCheck, sums: &[SizeSummary]) -> String {
    let mut o = String::new();
    let mut line = |s: &str| {
        o.push_str(s);
        o.push('\n');
    };
    line("# ringcast cluster run: N connections on one box");
    line("");
    line(&format!(
        "Written by `ringcast-bench cluster` on {}. Host: {}, {}. Load average (1/5/15 min) at the start: {}.",
        host.date, host.host, host.summary, host.loadavg
    ));
    line("");
    line("## How it was measured");
    line("");
    for item in [
        "one `redis-server` (no persistence) and K `ringcast serve --cores 1 --redis ...` nodes (release build) on \
         127.0.0.1, ports P..P+K-1, about `--per-node` connections each; node i is pinned to CPU i mod ncpu \
         (`taskset -c`; ringcast pins its executors within its affinity mask).",
        "one `ringcast-loadgen connect` per node, all started at once (the loadgen targets one URL per run; it \
         rotates source addresses 127.0.0.2..), every connection joining the same `bench:cluster-<N>` topic, then \
         holding. Time to connect = from starting the loadgens until every one reported all its connections joined.",
        "ONE broadcast through node 0's `POST /api/broadcast` (`new_msg`, body `1:<send unix nanos>`), reaching the \
         other nodes through Redis. (`ringcast-loadgen fanout` is not used: every fanout run has its own publisher, \
         so K parallel runs on one topic would make K x N deliveries.)",
        "reach and latency: every loadgen connection is a subscriber. Each one that gets the broadcast records \
         send (the nanos in the body) to receipt in its loadgen's HdrHistogram, which the loadgen writes into its \
         report (HdrHistogram V2, base64). The latency here is the percentiles of the SUM of every node's \
         histogram, i.e. of all N subscribers together, not the worst node's p99. Loss = joined connections that \
         did not get it, counted by the subscribers themselves. Time to reach all = the last receipt at any \
         subscriber minus the send time (one clock: one box).",
        "the servers' side: every node's `/api/stats` `deliveries` counter, summed, polled until it grew by the \
         nodes' connection count (frames queued to connections).",
        "memory per connection: deltas between a sample before the loadgens start and one when all are joined, \
         divided by joined connections: the nodes' summed RSS, the loadgens' (workers included), and the box's \
         /proc/meminfo Slab / SUnreclaim and sockstat TCP mem (kernel figures cover BOTH ends of each loopback \
         connection). MemAvailable drop = everything (servers, loadgens, kernel) and is noisy on a shared box.",
        "connect + upgrade + join latency: the loadgens' histograms added the same way.",
    ] {
        line(&format!("- {item}"));
    }
    line("");
    line(&format!("Host check: {}", host.line()));
    line("");
    line("## Results");
    line("");
    line(
        "| N | nodes | joined | time to connect | conn/s | delivered (server) | received (subscribers) | loss | \
         time to reach all | latency p50 / p99 / max (all subscribers) | server RSS/conn | loadgen RSS/conn | \
         kernel Slab/conn (both ends) | outcome |",
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in sums {
        let pc = s.memory_per_connection.as_ref();
        let lat = s.broadcast_latency.as_ref().filter(|l| l.count > 0);
        line(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.size,
            s.nodes,
            s.connections_joined,
            fmt_secs(s.time_to_connect_s),
            s.achieved_connect_rate_per_s
                .map_or("n/a".into(), |r| format!("{r:.0}")),
            s.server_deliveries
                .as_ref()
                .map_or("n/a".into(), |d| format!("{} of {}", d.delivered, d.expected)),
            s.received
                .as_ref()
                .map_or("n/a".into(), |r| r.receivers.to_string()),
            s.loss.map_or("n/a".into(), |l| l.to_string()),
            fmt_secs(s.time_to_reach_all_s),
            lat.map_or("n/a".into(), |l| format!(
                "{} / {} / {}",
                fmt_ms(l.p50_us),
                fmt_ms(l.p99_us),
                fmt_ms(l.max_us)
            )),
            kib(pc.map(|p| p.server_rss_bytes)),
            kib(pc.map(|p| p.loadgen_rss_bytes)),
            kib(pc.map(|p| p.kernel_slab_bytes)),
            s.outcome
        ));
    }
    line("");
    for s in sums {
        section(&mut o, s);
    }
    o.push_str(
        "Raw figures: `size-*/summary.json` (combined; the merged histograms are in it too), `size-*/lg-<node>.json` \
         (each loadgen's report), `size-*/plan.json`, `size-*/broadcast.json`, `size-*/deliveries.json`, \
         `size-*/samples/` (memory samples), `size-*/logs/` (tails of the node, loadgen and redis logs), `host.json`, \
         `run.log` (the run's own log).\n",
    );
    o
}

fn section(o: &mut String, s: &SizeSummary) {
    let _ = writeln!(o, "### N = {}\n", s.size);
    let notes = if s.notes.is_empty() {
        String::new()
    } else {
        format!(" — {}", s.notes)
    };
    let _ = writeln!(o, "- outcome: **{}**{notes}", s.outcome);
    if !s.started.is_empty() {
        let _ = writeln!(
            o,
            "- started {}; load average {} at the start, {} at the end",
            s.started, s.loadavg_start, s.loadavg_end
        );
    }
    if !s.connection_failures.is_empty() {
        let _ = writeln!(o, "- connection failures: {:?}", s.connection_failures);
    }
    if !s.ends.is_empty() {
        let _ = writeln!(o, "- connections the server ended: {:?}", s.ends);
    }
    if !s.loadgen_reports_missing_for_nodes.is_empty() {
        let _ = writeln!(
            o,
            "- no loadgen report for nodes {:?}",
            s.loadgen_reports_missing_for_nodes
        );
    }
    if let Some(j) = s.join_latency.as_ref().filter(|l| l.count > 0) {
        let _ = writeln!(
            o,
            "- connect+upgrade+join latency (all {} connections): p50 {}, p99 {}, max {}",
            j.count,
            fmt_ms(j.p50_us),
            fmt_ms(j.p99_us),
            fmt_ms(j.max_us)
        );
    }
    if let Some(pc) = &s.memory_per_connection {
        let _ = writeln!(
            o,
            "- per connection: server RSS {}, loadgen RSS {}, kernel Slab {} (SUnreclaim {}, TCP buffers {}), \
             MemAvailable drop {}",
            kib(Some(pc.server_rss_bytes)),
            kib(Some(pc.loadgen_rss_bytes)),
            kib(Some(pc.kernel_slab_bytes)),
            kib(Some(pc.kernel_sunreclaim_bytes)),
            kib(Some(pc.kernel_tcp_mem_bytes)),
            kib(Some(pc.memavailable_drop_bytes))
        );
    }
    if let Some(f) = &s.samples.full {
        let api = f.api_stats.as_ref().map_or(String::new(), |a| {
            format!(
                ", /api/stats connections {} ({}/{} nodes answered)",
                a.connections, a.nodes_answered, a.nodes
            )
        });
        let _ = writeln!(
            o,
            "- when all joined: servers' RSS {}, loadgens' RSS {} ({} processes), redis RSS {}, Slab {}, \
             MemAvailable {}, TCP sockets in use {}{api}",
            mib(Some(f.server_rss_bytes)),
            mib(Some(f.loadgen_rss_bytes)),
            f.loadgen_processes,
            mib(f.redis_rss_bytes),
            mib(Some(f.meminfo.slab)),
            mib(Some(f.meminfo.mem_available)),
            f.sockstat.tcp_inuse
        );
    }
    if let Some(d) = &s.server_deliveries {
        let _ = writeln!(
            o,
            "- server deliveries: {} of {} expected; full count seen {} after the send ({} poll rounds)",
            d.delivered,
            d.expected,
            fmt_secs(d.seen_complete_after_s),
            d.polls
        );
    }
    if let (Some(r), Some(l)) = (&s.received, &s.broadcast_latency) {
        let _ = writeln!(
            o,
            "- subscribers: {} of {} joined got it, {} extra (duplicate) deliveries; latency over all of them \
             (merged histograms): p50 {}, p90 {}, p99 {}, p99.9 {}, max {}",
            r.receivers,
            s.connections_joined,
            r.extra,
            fmt_ms(l.p50_us),
            fmt_ms(l.p90_us),
            fmt_ms(l.p99_us),
            fmt_ms(l.p999_us),
            fmt_ms(l.max_us)
        );
        let pn = &s.broadcast_latency_per_node;
        if let Some(local) = pn.first() {
            let remote: Vec<_> = pn[1..].iter().filter(|x| x.receivers > 0).collect();
            let others = if remote.is_empty() {
                String::new()
            } else {
                let min = remote.iter().map(|x| x.p50_us).fold(f64::INFINITY, f64::min);
                let max = remote.iter().map(|x| x.p50_us).fold(0.0, f64::max);
                let worst = remote.iter().map(|x| x.max_us).fold(0.0, f64::max);
                format!(
                    "; other nodes (through Redis): p50 {}..{}, max {}",
                    fmt_ms(min),
                    fmt_ms(max),
                    fmt_ms(worst)
                )
            };
            let _ = writeln!(
                o,
                "  - node 0 (where the API call landed): p50 {}, max {}{others}",
                fmt_ms(local.p50_us),
                fmt_ms(local.max_us)
            );
        }
    }
    for p in &s.problems {
        let _ = writeln!(o, "- problem: {p}");
    }
    o.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_size_still_has_its_row() {
        let s = SizeSummary {
            size: 100_000,
            nodes: 6,
            outcome: "skipped".into(),
            notes: "time limit reached".into(),
            ..Default::default()
        };
        let host = HostCheck {
            date: "2026-12-01T12:00:00Z".into(),
            summary: "ncpu 2".into(),
            ..Default::default()
        };
        let text = readme(&host, &[s]);
        assert!(text.contains(
            "| 100000 | 6 | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | skipped |"
        ));
        assert!(text.contains("- outcome: **skipped** — time limit reached"));
        assert!(text.contains("Host check: ncpu 2; problems: none; warnings: none"));
    }
}
