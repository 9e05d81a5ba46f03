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
         holding, wherever the scheduler puts it (`--loadgen-cpu node` pins each to its node's CPU), and trying \
         a failed connection again `--retries` times (default 8, phoenix.js's delays). Time to connect = from starting the loadgens until every one reported all its connections joined.",
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
         (each loadgen's report), `size-*/plan.json`, `size-*/broadcast.json`, `size-*/deliveries.json`, `size-*/cpu.json` (CPU samples around the broadcast), \
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
    if !s.loadgen_executor_stalls.is_empty() {
        let _ = writeln!(
            o,
            "- loadgen executors silent for 2 s or more (each woken by its monitor), by thread state: {:?}",
            s.loadgen_executor_stalls
        );
    }
    if !s.connection_retries.is_empty() {
        let _ = writeln!(o, "- connection attempts tried again: {:?}", s.connection_retries);
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
    // Per frame the servers delivered: the CPU covers them all, also those whose
    // receipts a missing loadgen report leaves uncounted.
    if let (Some(w), Some(d)) = (&s.reach_cpu, &s.server_deliveries) {
        let _ = writeln!(
            o,
            "- CPU from the send to the last receipt (`cpu.json`, sampled every {} ms): {}",
            super::cpu::EVERY.as_millis(),
            super::cpu::describe(w, d.delivered)
        );
    }
    for p in &s.problems {
        let _ = writeln!(o, "- problem: {p}");
    }
    o.push('\n');
}

fn gb(x: u64) -> String {
    format!("{:.2} GB", x as f64 / 1e9)
}

fn mib_list(v: &[u64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.iter()
        .map(|b| (b >> 20).to_string())
        .collect::<Vec<_>>()
        .join(" / ")
        + " MiB"
}

/// The README of a `--workload presence` run over `sums` (sorted by size).
pub fn readme_presence(host: &HostCheck, sums: &[SizeSummary]) -> String {
    let mut o = String::new();
    let mut line = |s: &str| {
        o.push_str(s);
        o.push('\n');
    };
    line("# ringcast cluster run: one presence room across nodes");
    line("");
    line(&format!(
        "Written by `ringcast-bench cluster --workload presence` on {}. Host: {}, {}. Load average (1/5/15 min) at \
         the start: {}.",
        host.date, host.host, host.summary, host.loadavg
    ));
    line("");
    line("## How it was measured");
    line("");
    for item in [
        "one `redis-server` (no persistence) and K `ringcast serve --cores 1 --redis ...` nodes (release build) on \
         127.0.0.1, about `--per-node` members each, node i pinned to CPU i mod ncpu; presence replicates across the \
         nodes through Redis.",
        "one `ringcast-loadgen presence` per node: every member joins the same `rooms:presence-<N>` room with \
         `{\"name\":\"m\"}` (user id, i.e. presence key, `m<node>-<i>`), at most `--window` joins per node under way \
         at once (sent, their own `presence_state` not yet read), so the ramp slows down as the state grows. A member \
         counts as joined once its join's ok reply and its own `presence_state` are read. Ramp = from starting the \
         loadgens until every one said all its members are in.",
        "members never JSON-parse: messages up to 16 KiB are read whole, bigger ones in pieces as they arrive (the \
         read buffer stays <= 64 KiB); each is classified by its first 512 bytes (`[join_ref,ref,topic,event,`) and \
         counted (frames, bytes by kind); the join reply is found by that prefix check. Members keep reading to the \
         end; every close is counted by its code (a 1008 is a failure).",
        "settle: after the ramp, the run waits until the nodes' summed `/api/stats` `bytes_out` grows by less than \
         50 B per member over `--settle-secs` (one more diff to everyone would be about 150 B each).",
        "the check: the run writes an arm file (the members start looking for `\"newcomer-0\"` in diffs, with a \
         needle search across pieces), waits 1.5 s, then one `ringcast-loadgen newcomer` per node joins (keys \
         `newcomer-<i>`, all at once). Each parses its `presence_state` and the diffs after it as phoenix.js \
         `Presence` applies them (diffs before the state wait for it; joins add metas, leaves remove them by \
         `phx_ref`). Expected, exactly: its state holds all N members (plus the 0..K-1 newcomers the server \
         tracked before building it: they join at the same moment), and its view then reaches N + K keys (every \
         member and every newcomer, itself included: its own join comes back as a diff).",
        "diff reach: each member records the first diff holding `\"newcomer-0\"`, timed from the arm time; the \
         README gives it from newcomer 0's join (its send time minus the arm time is subtracted; one clock: one box).",
        "server bytes: the nodes' `bytes_out` delta over the ramp and over the whole size; member bytes: what the \
         members counted. RSS per node: when all were in, after settling, at the end.",
    ] {
        line(&format!("- {item}"));
    }
    line("");
    line(&format!("Host check: {}", host.line()));
    line("");
    line("## Results");
    line("");
    line(
        "| N | nodes | members with state | ramp | presence bytes read by members | server bytes (ramp) | MB/s (ramp) | \
         newcomers ok | newcomer keys: state / final (expected N / N+K) | state bytes | join → state (newcomer 0) | \
         diff reach p50 / max | closes | outcome |",
    );
    line("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in sums {
        let Some(p) = &s.presence else {
            line(&format!(
                "| {} | {} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | {} |",
                s.size, s.nodes, s.outcome
            ));
            continue;
        };
        let n0 = p.newcomers.first();
        let k = p.newcomers.len() + p.newcomers_missing.len();
        line(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} of {} | {} (N={}, N+K={}) | {} | {} | {} | {} | {} |",
            s.size,
            s.nodes,
            p.members_with_state,
            fmt_secs(p.ramp_s),
            gb(p.member_presence_bytes),
            p.server_bytes_out_ramp.map_or("n/a".into(), gb),
            p.ramp_mb_per_s.map_or("n/a".into(), |r| format!("{r:.0}")),
            p.newcomers_ok,
            k,
            p.newcomers
                .iter()
                .map(|n| format!("{} / {}", n.state_keys, n.final_keys))
                .collect::<Vec<_>>()
                .join(", "),
            p.members,
            p.members + k as u64,
            n0.map_or("n/a".into(), |n| format!("{:.2} MB", n.state_bytes as f64 / 1e6)),
            n0.and_then(|n| n.state_ms)
                .map_or("n/a".into(), |x| format!("{x:.0} ms")),
            p.reach_from_join_ms
                .map_or("n/a".into(), |[p50, _, max]| format!("{p50:.0} / {max:.0} ms")),
            if p.closes.is_empty() {
                "none".into()
            } else {
                format!("{:?}", p.closes)
            },
            s.outcome
        ));
    }
    line("");
    for s in sums {
        presence_section(&mut o, s);
    }
    o.push_str(
        "Raw figures: `size-*/summary.json` (combined, with the newcomers' reports), `size-*/lg-<node>.json` (each \
         loadgen's report: members' tallies and histograms), `size-*/newcomer-<i>.json`, `size-*/plan.json`, \
         `size-*/samples/`, `size-*/logs/` (log tails), `host.json`, `run.log`.\n",
    );
    o
}

fn presence_section(o: &mut String, s: &SizeSummary) {
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
    let Some(p) = &s.presence else {
        o.push('\n');
        return;
    };
    let _ = writeln!(
        o,
        "- members: {} of {} with their state on {} node(s) (<= {} each); ramp {}; connection failures {:?}",
        p.members_with_state,
        p.members,
        s.nodes,
        s.per_node,
        fmt_secs(p.ramp_s),
        s.connection_failures
    );
    if let Some(j) = p.join_to_state.as_ref().filter(|l| l.count > 0) {
        let _ = writeln!(
            o,
            "- join sent → own presence_state read (all members): p50 {}, p99 {}, max {}",
            fmt_ms(j.p50_us),
            fmt_ms(j.p99_us),
            fmt_ms(j.max_us)
        );
    }
    let _ = writeln!(
        o,
        "- presence read by the members: {} in {} diffs + {} in {} states (largest {:.2} MB), {} in pieces; \
         other frames {}",
        gb(p.member_diff_bytes),
        p.member_diff_frames,
        gb(p.member_state_bytes),
        p.member_state_frames,
        p.largest_state_bytes as f64 / 1e6,
        p.streamed_messages,
        gb(p.member_other_bytes)
    );
    let _ = writeln!(
        o,
        "- the nodes wrote {} during the ramp ({} MB/s), {} over the whole size",
        p.server_bytes_out_ramp.map_or("n/a".into(), gb),
        p.ramp_mb_per_s.map_or("n/a".into(), |r| format!("{r:.0}")),
        p.server_bytes_out_total.map_or("n/a".into(), gb)
    );
    if let Some(st) = &p.settle {
        let _ = writeln!(
            o,
            "- settle: {} after {:.1} s ({:.1} MB written meanwhile)",
            if st.settled {
                "quiet"
            } else {
                "NOT quiet (bounded wait over)"
            },
            st.waited_s,
            st.bytes_out_during as f64 / 1e6
        );
    }
    for n in &p.newcomers {
        let _ = writeln!(
            o,
            "- {}: presence_state {} keys ({} members of {}, {} newcomers), {} metas, {} bytes, {} after its join \
             (reply {}); then {} diffs; view {} keys ({} members, {} newcomers of {}), complete {} at {}{}",
            n.key,
            n.state_keys,
            n.state_member_keys,
            n.expected_members,
            n.state_newcomer_keys,
            n.state_metas,
            n.state_bytes,
            n.state_ms.map_or("n/a".into(), |x| format!("{x:.0} ms")),
            n.reply_ms.map_or("n/a".into(), |x| format!("{x:.0} ms")),
            n.diffs_after_state,
            n.final_keys,
            n.final_member_keys,
            n.final_newcomer_keys,
            n.expected_newcomers,
            n.complete,
            n.complete_ms.map_or("n/a".into(), |x| format!("{x:.0} ms")),
            if n.problems.is_empty() {
                String::new()
            } else {
                format!("; problems: {}", n.problems.join("; "))
            }
        );
    }
    if !p.newcomers_missing.is_empty() {
        let _ = writeln!(o, "- no report from newcomer(s) {:?}", p.newcomers_missing);
    }
    let _ = writeln!(
        o,
        "- {}'s join reached {} of {} members as a diff{}",
        p.reach_key,
        p.reached,
        p.members_with_state,
        match (p.reach_from_join_ms, p.newcomer0_join_after_arm_ms) {
            (Some([p50, p99, max]), Some(off)) => format!(
                "; from its join: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (its join went out {off:.0} ms \
                 after the arm time)"
            ),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        o,
        "- RSS per node: all in {}; settled {}; end {}",
        mib_list(&p.rss_per_node_full),
        mib_list(&p.rss_per_node_settled),
        mib_list(&p.rss_per_node_after)
    );
    let _ = writeln!(
        o,
        "- closes by code (members): {}; the nodes' own 1008 count (slow_closed): {}",
        if p.closes.is_empty() {
            "none".into()
        } else {
            format!("{:?}", p.closes)
        },
        p.server_slow_closed.map_or("n/a".into(), |x| x.to_string())
    );
    if let Some(f) = &s.samples.full {
        let _ = writeln!(
            o,
            "- when all were in: servers' RSS {}, loadgens' RSS {} ({} processes), redis RSS {}, MemAvailable {}",
            mib(Some(f.server_rss_bytes)),
            mib(Some(f.loadgen_rss_bytes)),
            f.loadgen_processes,
            mib(f.redis_rss_bytes),
            mib(Some(f.meminfo.mem_available))
        );
    }
    for pr in &s.problems {
        let _ = writeln!(o, "- problem: {pr}");
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
