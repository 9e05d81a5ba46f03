//! The figures of one cluster size (`summary.json`) built from what the run recorded
//! and the loadgens' reports: joins, reach and loss, the broadcast latency of every
//! subscriber with the nodes' histograms added up (never "the worst node's p99"), and
//! memory per connection. Pure: the run hands everything in.

use std::collections::BTreeMap;

use ringcast_loadgen::report::{add_counts, ConnectReport, Latency, ServerConnect};
use ringcast_loadgen::NewcomerReport;
use serde::{Deserialize, Serialize};

use super::api::BroadcastAnswer;
use super::cpu::{self, CpuSample, CpuWindow};
use super::host::{Meminfo, Sockstat};

/// Node connections as `/api/stats` counts them, summed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ApiConnections {
    pub connections: u64,
    /// Bytes the nodes wrote to clients, summed.
    #[serde(default)]
    pub bytes_out: u64,
    /// Connections the nodes cut off for not reading (1008), summed.
    #[serde(default)]
    pub slow_closed: u64,
    pub nodes_answered: usize,
    pub nodes: usize,
}

/// One sample of the box and of the processes of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub unix_time: f64,
    pub meminfo: Meminfo,
    pub sockstat: Sockstat,
    /// The nodes' RSS, summed.
    pub server_rss_bytes: u64,
    /// Each node's RSS, in node order (0: not running).
    #[serde(default)]
    pub server_rss_per_node: Vec<u64>,
    /// The nodes' CPU seconds (user + system), summed.
    pub server_cpu_secs: f64,
    pub server_processes_alive: usize,
    /// The loadgens' RSS with their worker processes, summed.
    pub loadgen_rss_bytes: u64,
    pub loadgen_processes: usize,
    pub redis_rss_bytes: Option<u64>,
    pub api_stats: Option<ApiConnections>,
    pub loadavg: String,
}

/// The servers' count of broadcast frames queued to connections (`/api/stats`
/// `deliveries`), polled after the send.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryCount {
    pub expected: u64,
    pub delivered: u64,
    pub complete: bool,
    pub polls: u64,
    pub nodes_answering: usize,
    pub per_node_delta: Vec<i64>,
    /// When a poll round over every node first saw the full count (an upper bound:
    /// a round takes a few ms per node).
    pub seen_complete_after_s: Option<f64>,
}

/// What the subscribers themselves received, from the loadgens' reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Received {
    /// Connections that got the broadcast.
    pub receivers: u64,
    /// Deliveries, repeats included.
    pub deliveries: u64,
    /// Deliveries beyond one per receiver (duplicates).
    pub extra: u64,
    /// Joined connections that never got it.
    pub missing: u64,
}

/// Broadcast latency of one node's subscribers, for the node 0 / other nodes line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeLatency {
    pub node: usize,
    pub receivers: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// Memory deltas (all joined - before the loadgens) per joined connection, bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PerConnection {
    pub server_rss_bytes: f64,
    pub loadgen_rss_bytes: f64,
    pub kernel_slab_bytes: f64,
    pub kernel_sunreclaim_bytes: f64,
    pub kernel_tcp_mem_bytes: f64,
    pub memavailable_drop_bytes: f64,
    pub note: String,
}

impl PerConnection {
    /// What the whole box spends per connection (both ends): the estimate the next
    /// sizes are planned with.
    pub fn whole_box(&self) -> f64 {
        self.server_rss_bytes + self.loadgen_rss_bytes + self.kernel_slab_bytes + self.kernel_tcp_mem_bytes
    }
}

pub fn per_connection(before: &Sample, full: &Sample, joined: u64) -> Option<PerConnection> {
    if joined == 0 {
        return None;
    }
    let per = |b: u64, f: u64| (f as f64 - b as f64) / joined as f64;
    Some(PerConnection {
        server_rss_bytes: per(before.server_rss_bytes, full.server_rss_bytes),
        loadgen_rss_bytes: per(before.loadgen_rss_bytes, full.loadgen_rss_bytes),
        kernel_slab_bytes: per(before.meminfo.slab, full.meminfo.slab),
        kernel_sunreclaim_bytes: per(before.meminfo.s_unreclaim, full.meminfo.s_unreclaim),
        kernel_tcp_mem_bytes: per(before.sockstat.tcp_mem_bytes, full.sockstat.tcp_mem_bytes),
        memavailable_drop_bytes: -per(before.meminfo.mem_available, full.meminfo.mem_available),
        note: "server_rss: the nodes' summed RSS (all joined - before the loadgens) / joined; kernel: the whole \
               box's /proc/meminfo and sockstat deltas, i.e. BOTH ends of every loopback connection; \
               memavailable_drop: everything (servers, loadgens, kernel) per connection"
            .into(),
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    pub before: Option<Sample>,
    pub full: Option<Sample>,
    pub after: Option<Sample>,
}

/// One loadgen's report, shortened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: usize,
    pub joined: u64,
    pub failed: u64,
    pub time_to_last_join_s: f64,
    pub ended_early: u64,
    pub broadcast_receivers: u64,
    pub server: Option<ServerConnect>,
    pub problems: Vec<String>,
}

/// What the run of one size recorded, for [`summarize`].
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub size: u64,
    pub nodes: usize,
    pub per_node: u64,
    pub rate: f64,
    pub hold_secs: u64,
    pub outcome: String,
    pub notes: String,
    pub started: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub t_loadgen_start: Option<f64>,
    pub t_all_joined: Option<f64>,
    pub samples: Samples,
    pub broadcast: Option<BroadcastAnswer>,
    pub deliveries: Option<DeliveryCount>,
    /// `--workload presence`.
    pub presence: bool,
    pub settle: Option<SettleRecord>,
    pub samples_settled: Option<Sample>,
    pub armed_unix_nanos: Option<u64>,
    pub newcomers_started: usize,
    /// The box's and each group's CPU, sampled from just before the broadcast.
    pub cpu: Vec<CpuSample>,
}

/// How the wait for the presence traffic to settle went.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SettleRecord {
    /// The nodes' `bytes_out` stopped growing (see `presence::quiet`).
    pub settled: bool,
    pub waited_s: f64,
    /// What the nodes wrote while it was waited for.
    pub bytes_out_during: u64,
}

/// The presence figures of one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceSummary {
    pub members: u64,
    pub members_joined: u64,
    /// Members whose own `presence_state` arrived (what "joined" means here).
    pub members_with_state: u64,
    /// From starting the loadgens until every member had its state.
    pub ramp_s: Option<f64>,
    pub settle: Option<SettleRecord>,
    pub member_diff_frames: u64,
    pub member_diff_bytes: u64,
    pub member_state_frames: u64,
    pub member_state_bytes: u64,
    pub largest_state_bytes: u64,
    pub member_other_bytes: u64,
    /// Messages the members read in pieces (over 16 KiB).
    pub streamed_messages: u64,
    /// Every presence byte the members read (diffs + states), the whole run.
    pub member_presence_bytes: u64,
    /// The nodes' `bytes_out`, summed: over the ramp, and over the whole size.
    pub server_bytes_out_ramp: Option<u64>,
    pub server_bytes_out_total: Option<u64>,
    /// Server bytes over the ramp / ramp time, MB/s (10^6).
    pub ramp_mb_per_s: Option<f64>,
    /// Join sent → own `presence_state` read, every member (merged histograms).
    pub join_to_state: Option<Latency>,
    pub newcomers: Vec<NewcomerReport>,
    pub newcomers_missing: Vec<usize>,
    /// Newcomers whose state held every member and whose view then held members +
    /// newcomers.
    pub newcomers_ok: u64,
    /// The key the members timed, and how many saw it.
    pub reach_key: String,
    pub reached: u64,
    /// Arm time → first diff with the key, every member (merged).
    pub reach_from_arm: Option<Latency>,
    /// When newcomer 0 sent its join, after the arm time.
    pub newcomer0_join_after_arm_ms: Option<f64>,
    /// The reach from newcomer 0's join: p50 / p99 / max, ms.
    pub reach_from_join_ms: Option<[f64; 3]>,
    pub rss_per_node_full: Vec<u64>,
    pub rss_per_node_settled: Vec<u64>,
    pub rss_per_node_after: Vec<u64>,
    /// Closes by code (the loadgens' members), and the nodes' own 1008 count.
    pub closes: BTreeMap<String, u64>,
    pub closed_1008: u64,
    pub server_slow_closed: Option<u64>,
}

/// The presence figures of a size from its record, the members' reports and the
/// newcomers' (`None`: no report from that newcomer).
pub fn presence_summary(
    r: &Record,
    reports: &[(usize, ConnectReport)],
    newcomers: Vec<Option<NewcomerReport>>,
) -> PresenceSummary {
    let mut p = PresenceSummary {
        members: r.size,
        settle: r.settle.clone(),
        reach_key: format!("{}0", ringcast_loadgen::presence::NEWCOMER_PREFIX),
        ..Default::default()
    };
    let mut states = Vec::new();
    let mut reach = Vec::new();
    for (_, rep) in reports {
        p.members_joined += rep.joined;
        add_counts(&mut p.closes, &rep.ends);
        if let Some(f) = &rep.presence {
            let t = &f.tally;
            p.members_with_state += t.members_with_state;
            p.member_diff_frames += t.diff_frames;
            p.member_diff_bytes += t.diff_bytes;
            p.member_state_frames += t.state_frames;
            p.member_state_bytes += t.state_bytes;
            p.largest_state_bytes = p.largest_state_bytes.max(t.largest_state_bytes);
            p.member_other_bytes += t.other_bytes;
            p.streamed_messages += t.streamed_messages;
            p.reached += t.reached;
            states.push(&f.join_to_state);
            reach.push(&f.reach);
        }
    }
    p.member_presence_bytes = p.member_diff_bytes + p.member_state_bytes;
    p.closed_1008 = p
        .closes
        .iter()
        .filter(|(k, _)| k.contains("1008"))
        .map(|(_, v)| v)
        .sum();
    if !states.is_empty() {
        p.join_to_state = Latency::merge(states).ok();
        p.reach_from_arm = Latency::merge(reach).ok();
    }
    if let (Some(t0), Some(t1)) = (r.t_loadgen_start, r.t_all_joined) {
        p.ramp_s = Some(t1 - t0);
    }
    // Only a count every node answered is a total.
    let out = |s: &Option<Sample>| {
        s.as_ref()
            .and_then(|s| s.api_stats.as_ref())
            .filter(|a| a.nodes_answered == a.nodes)
            .map(|a| a.bytes_out)
    };
    let before = out(&r.samples.before);
    if let (Some(b), Some(f)) = (before, out(&r.samples.full)) {
        p.server_bytes_out_ramp = Some(f.saturating_sub(b));
        p.ramp_mb_per_s = p
            .ramp_s
            .filter(|&t| t > 0.0)
            .map(|t| f.saturating_sub(b) as f64 / 1e6 / t);
    }
    if let (Some(b), Some(a)) = (before, out(&r.samples.after)) {
        p.server_bytes_out_total = Some(a.saturating_sub(b));
    }
    p.server_slow_closed = r
        .samples
        .after
        .as_ref()
        .and_then(|s| s.api_stats.as_ref())
        .map(|a| a.slow_closed);
    let rss = |s: &Option<Sample>| s.as_ref().map_or(Vec::new(), |s| s.server_rss_per_node.clone());
    p.rss_per_node_full = rss(&r.samples.full);
    p.rss_per_node_settled = rss(&r.samples_settled);
    p.rss_per_node_after = rss(&r.samples.after);
    for (i, n) in newcomers.into_iter().enumerate() {
        match n {
            Some(n) => p.newcomers.push(n),
            None => p.newcomers_missing.push(i),
        }
    }
    p.newcomers_ok = p
        .newcomers
        .iter()
        .filter(|n| n.state_has_every_member && n.complete)
        .count() as u64;
    if let (Some(armed), Some(n0)) = (
        r.armed_unix_nanos,
        p.newcomers.iter().find(|n| n.key == p.reach_key),
    ) {
        if n0.join_sent_unix_nanos > 0 {
            let offset_ms = (n0.join_sent_unix_nanos as f64 - armed as f64) / 1e6;
            p.newcomer0_join_after_arm_ms = Some(offset_ms);
            if let Some(l) = p.reach_from_arm.as_ref().filter(|l| l.count > 0) {
                p.reach_from_join_ms = Some([
                    l.p50_us / 1000.0 - offset_ms,
                    l.p99_us / 1000.0 - offset_ms,
                    l.max_us / 1000.0 - offset_ms,
                ]);
            }
        }
    }
    p
}

/// "ok" when every member joined with its state and stayed, nobody was cut off, the
/// room settled, every newcomer saw every member (and then every newcomer), and every
/// member saw newcomer 0's join; otherwise "incomplete" with what fell short.
pub fn presence_verdict(s: &SizeSummary) -> (String, String) {
    let Some(p) = &s.presence else {
        return ("incomplete".into(), "no presence figures".into());
    };
    let mut short = Vec::new();
    if !s.loadgen_reports_missing_for_nodes.is_empty() {
        short.push(format!(
            "no loadgen report from nodes {:?}",
            s.loadgen_reports_missing_for_nodes
        ));
    }
    if p.members_with_state < p.members {
        short.push(format!(
            "{} of {} members got their presence_state",
            p.members_with_state, p.members
        ));
    }
    if s.ended_early > 0 || p.closed_1008 > 0 {
        short.push(format!(
            "{} members ended early ({} with 1008): {:?}",
            s.ended_early, p.closed_1008, p.closes
        ));
    }
    if p.server_slow_closed.unwrap_or(0) > 0 {
        short.push(format!(
            "the nodes cut off {} connections (1008)",
            p.server_slow_closed.unwrap_or(0)
        ));
    }
    if !p.settle.as_ref().is_some_and(|x| x.settled) {
        short.push("the presence traffic did not settle in time".into());
    }
    let expected_newcomers = p.newcomers.len() + p.newcomers_missing.len();
    if p.newcomers_ok < expected_newcomers as u64 || expected_newcomers == 0 {
        short.push(format!(
            "{} of {} newcomers saw every member and every newcomer",
            p.newcomers_ok, expected_newcomers
        ));
    }
    if p.reached < p.members_with_state {
        short.push(format!(
            "{} of {} members saw {}'s join",
            p.reached, p.members_with_state, p.reach_key
        ));
    }
    if short.is_empty() {
        ("ok".into(), String::new())
    } else {
        ("incomplete".into(), short.join("; "))
    }
}

/// `summary.json` of one size.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SizeSummary {
    pub size: u64,
    pub nodes: usize,
    pub per_node: u64,
    pub outcome: String,
    pub notes: String,
    pub started: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub connect_rate_requested_per_s: f64,
    pub hold_s: u64,
    pub connections_requested: u64,
    pub connections_joined: u64,
    pub connection_failures: BTreeMap<String, u64>,
    /// Failed attempts the loadgens tried again (`--retries`), by kind.
    #[serde(default)]
    pub connection_retries: BTreeMap<String, u64>,
    /// Loadgen executors found silent for 2 s or more (and woken), by thread state.
    #[serde(default)]
    pub loadgen_executor_stalls: BTreeMap<String, u64>,
    pub loadgen_reports_missing_for_nodes: Vec<usize>,
    /// From starting the loadgens until every one said all its connections joined.
    pub time_to_connect_s: Option<f64>,
    pub loadgen_time_to_last_join_s_max: Option<f64>,
    pub achieved_connect_rate_per_s: Option<f64>,
    /// Connect + upgrade + join of every connection, the loadgens' histograms added.
    pub join_latency: Option<Latency>,
    pub connected_at_hold_end: u64,
    pub ended_early: u64,
    pub ends: BTreeMap<String, u64>,
    pub broadcast: Option<BroadcastAnswer>,
    pub server_deliveries: Option<DeliveryCount>,
    pub received: Option<Received>,
    /// Send to receive at every subscriber of every node, the loadgens' histograms added.
    pub broadcast_latency: Option<Latency>,
    pub broadcast_latency_per_node: Vec<NodeLatency>,
    /// Joined connections that did not get the broadcast (the subscribers' own count).
    pub loss: Option<u64>,
    /// From the send to the last subscriber's receipt.
    pub time_to_reach_all_s: Option<f64>,
    /// What the box's CPU did over that time.
    #[serde(default)]
    pub reach_cpu: Option<CpuWindow>,
    pub memory_per_connection: Option<PerConnection>,
    pub samples: Samples,
    pub per_node_reports: Vec<NodeReport>,
    /// Reports whose histograms could not be read.
    pub problems: Vec<String>,
    /// `--workload presence`: the room's figures.
    #[serde(default)]
    pub presence: Option<PresenceSummary>,
}

/// The figures of one size from what it recorded and the loadgens' reports
/// (`(node, report)`; nodes without a report are in `missing`).
pub fn summarize(r: &Record, reports: &[(usize, ConnectReport)], missing: Vec<usize>) -> SizeSummary {
    let mut s = SizeSummary {
        size: r.size,
        nodes: r.nodes,
        per_node: r.per_node,
        outcome: r.outcome.clone(),
        notes: r.notes.clone(),
        started: r.started.clone(),
        loadavg_start: r.loadavg_start.clone(),
        loadavg_end: r.loadavg_end.clone(),
        connect_rate_requested_per_s: r.rate,
        hold_s: r.hold_secs,
        connections_requested: r.size,
        loadgen_reports_missing_for_nodes: missing,
        broadcast: r.broadcast.clone(),
        server_deliveries: r.deliveries.clone(),
        samples: r.samples.clone(),
        ..Default::default()
    };
    for (_, rep) in reports {
        s.connections_joined += rep.joined;
        s.connected_at_hold_end += rep.connected_at_hold_end;
        s.ended_early += rep.ended_early;
        add_counts(&mut s.connection_failures, &rep.failures);
        add_counts(&mut s.connection_retries, &rep.retried);
        add_counts(&mut s.loadgen_executor_stalls, &rep.executor_stalls);
        add_counts(&mut s.ends, &rep.ends);
    }
    if let (Some(t0), Some(t1)) = (r.t_loadgen_start, r.t_all_joined) {
        let secs = t1 - t0;
        s.time_to_connect_s = Some(secs);
        let joined = if reports.is_empty() {
            r.samples
                .full
                .as_ref()
                .and_then(|f| f.api_stats.as_ref())
                .map_or(0, |a| a.connections)
        } else {
            s.connections_joined
        };
        s.achieved_connect_rate_per_s = (secs > 0.0).then(|| joined as f64 / secs);
    }
    s.loadgen_time_to_last_join_s_max = reports
        .iter()
        .map(|(_, rep)| rep.time_to_last_join_secs)
        .reduce(f64::max);
    if !reports.is_empty() {
        match Latency::merge(reports.iter().map(|(_, rep)| &rep.join_latency)) {
            Ok(l) => s.join_latency = Some(l),
            Err(e) => s.problems.push(format!("join latency: {e:#}")),
        }
    }
    if r.broadcast.as_ref().is_some_and(|b| b.status == 202) && !reports.is_empty() {
        let receivers: u64 = reports.iter().map(|(_, rep)| rep.broadcasts.receivers).sum();
        let deliveries: u64 = reports.iter().map(|(_, rep)| rep.broadcasts.deliveries).sum();
        s.received = Some(Received {
            receivers,
            deliveries,
            extra: deliveries.saturating_sub(receivers),
            missing: s.connections_joined.saturating_sub(receivers),
        });
        match Latency::merge(reports.iter().map(|(_, rep)| &rep.broadcasts.latency)) {
            Ok(l) => s.broadcast_latency = Some(l),
            Err(e) => s.problems.push(format!("broadcast latency: {e:#}")),
        }
        s.broadcast_latency_per_node = reports
            .iter()
            .map(|(node, rep)| NodeLatency {
                node: *node,
                receivers: rep.broadcasts.receivers,
                p50_us: rep.broadcasts.latency.p50_us,
                p99_us: rep.broadcasts.latency.p99_us,
                max_us: rep.broadcasts.latency.max_us,
            })
            .collect();
        // Only with every report is the count of those that missed it complete.
        if s.loadgen_reports_missing_for_nodes.is_empty() {
            s.loss = Some(s.connections_joined.saturating_sub(receivers));
        }
        let send = r.broadcast.as_ref().map_or(0, |b| b.send_unix_nanos);
        let last = reports
            .iter()
            .map(|(_, rep)| rep.broadcasts.last_recv_unix_nanos)
            .max()
            .unwrap_or(0);
        s.time_to_reach_all_s = (receivers > 0 && last > send).then(|| (last - send) as f64 / 1e9);
        s.reach_cpu = s
            .time_to_reach_all_s
            .and_then(|_| cpu::window(&r.cpu, send, last));
    }
    if let (Some(b), Some(f)) = (&r.samples.before, &r.samples.full) {
        let joined = if reports.is_empty() {
            f.api_stats.as_ref().map_or(0, |a| a.connections)
        } else {
            s.connections_joined
        };
        s.memory_per_connection = per_connection(b, f, joined);
    }
    s.per_node_reports = reports
        .iter()
        .map(|(node, rep)| NodeReport {
            node: *node,
            joined: rep.joined,
            failed: rep.failed,
            time_to_last_join_s: rep.time_to_last_join_secs,
            ended_early: rep.ended_early,
            broadcast_receivers: rep.broadcasts.receivers,
            server: rep.server.clone(),
            problems: rep.problems.clone(),
        })
        .collect();
    s
}

/// "ok" when every connection joined, stayed to the end of the hold, every server
/// queued the broadcast to all and every subscriber got it; otherwise "incomplete"
/// with what fell short.
pub fn verdict(s: &SizeSummary) -> (String, String) {
    let complete = s.server_deliveries.as_ref().is_some_and(|d| d.complete);
    let ok = s.loadgen_reports_missing_for_nodes.is_empty()
        && s.connections_joined >= s.size
        && s.connected_at_hold_end >= s.size
        && complete
        && s.loss == Some(0);
    if ok {
        return ("ok".into(), String::new());
    }
    let d = s.server_deliveries.as_ref();
    let notes = format!(
        "{} of {} joined, {} still connected at the end of the hold, server deliveries {} of {}, \
         subscribers that did not get it: {}{}",
        s.connections_joined,
        s.size,
        s.connected_at_hold_end,
        d.map_or(0, |d| d.delivered),
        d.map_or(0, |d| d.expected),
        s.loss.map_or("unknown".to_string(), |l| l.to_string()),
        if s.loadgen_reports_missing_for_nodes.is_empty() {
            String::new()
        } else {
            format!(
                "; no loadgen report from nodes {:?}",
                s.loadgen_reports_missing_for_nodes
            )
        }
    );
    ("incomplete".into(), notes)
}

pub fn fmt_secs(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{x:.3} s"))
}

pub fn fmt_ms(us: f64) -> String {
    format!("{:.1} ms", us / 1000.0)
}

pub fn kib(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:.2} KiB", x / 1024.0))
}

pub fn mib(x: Option<u64>) -> String {
    x.map_or("n/a".into(), |x| format!("{} MiB", x >> 20))
}

/// The one line the run logs per size.
pub fn one_line(s: &SizeSummary) -> String {
    let lat = s.broadcast_latency.as_ref();
    format!(
        "size {}: {}; joined {}/{} on {} node(s) in {}; server deliveries {}; received by {} (loss {}); \
         reach-all {}; latency p50 {} p99 {} max {}",
        s.size,
        s.outcome,
        s.connections_joined,
        s.connections_requested,
        s.nodes,
        fmt_secs(s.time_to_connect_s),
        s.server_deliveries
            .as_ref()
            .map_or("n/a".into(), |d| format!("{} of {}", d.delivered, d.expected)),
        s.received
            .as_ref()
            .map_or("n/a".into(), |r| r.receivers.to_string()),
        s.loss.map_or("n/a".into(), |l| l.to_string()),
        fmt_secs(s.time_to_reach_all_s),
        lat.map_or("n/a".into(), |l| fmt_ms(l.p50_us)),
        lat.map_or("n/a".into(), |l| fmt_ms(l.p99_us)),
        lat.map_or("n/a".into(), |l| fmt_ms(l.max_us)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_loadgen::report::HeldBroadcasts;

    fn hist(values: &[u64]) -> Latency {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).unwrap();
        for &v in values {
            h.record(v).unwrap();
        }
        Latency::from_hist(&h)
    }

    fn report(joined: u64, receivers: u64, lat: &[u64], last_recv: u64) -> ConnectReport {
        let json = serde_json::json!({
            "command": "connect", "url": "ws://127.0.0.1:4700", "topic": "bench:cluster-3",
            "topics": 1, "requested": joined, "target_rate": 100.0, "processes": 1,
            "cores_per_process": 1, "attempted": joined, "joined": joined, "failed": 0,
            "failures": {}, "time_to_last_join_secs": 2.5, "time_to_n_secs": 2.5,
            "achieved_rate": 100.0, "join_latency": hist(&[1_000_000, 3_000_000]),
            "hold_secs": 40.0, "connected_at_hold_end": joined, "ended_early": 0, "ends": {},
            "server": null, "problems": []
        });
        let mut r: ConnectReport = serde_json::from_value(json).unwrap();
        r.broadcasts = HeldBroadcasts {
            deliveries: receivers,
            receivers,
            first_recv_unix_nanos: 0,
            last_recv_unix_nanos: last_recv,
            latency: hist(lat),
        };
        r
    }

    fn sample(server_rss: u64, slab: u64, avail: u64) -> Sample {
        Sample {
            server_rss_bytes: server_rss,
            meminfo: Meminfo {
                slab,
                mem_available: avail,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn record() -> Record {
        Record {
            size: 5,
            nodes: 2,
            per_node: 3,
            rate: 100.0,
            t_loadgen_start: Some(100.0),
            t_all_joined: Some(102.0),
            samples: Samples {
                before: Some(sample(1000, 0, 10_000)),
                full: Some(sample(6000, 5000, 0)),
                after: None,
            },
            broadcast: Some(BroadcastAnswer {
                port: 4700,
                send_unix_nanos: 1_000_000_000,
                answer_unix_nanos: 1_000_100_000,
                status: 202,
                answer: "{\"ok\":true}".into(),
            }),
            deliveries: Some(DeliveryCount {
                expected: 5,
                delivered: 5,
                complete: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_latency_of_all_subscribers_is_one_merged_histogram() {
        // Node 0 (where the API call lands) is fast; node 1 (through Redis) slower.
        let reports = [
            (0, report(3, 3, &[1_000_000, 1_000_000, 1_000_000], 1_001_000_000)),
            (1, report(2, 2, &[5_000_000, 9_000_000], 1_009_000_000)),
        ];
        let s = summarize(&record(), &reports, vec![]);
        let lat = s.broadcast_latency.as_ref().unwrap();
        assert_eq!(lat.count, 5);
        // 3 of 5 at 1 ms: the merged median is 1 ms, where node 1's own is 5 ms or more.
        assert!((lat.p50_us - 1000.0).abs() < 10.0, "{}", lat.p50_us);
        assert!((lat.max_us - 9000.0).abs() < 10.0, "{}", lat.max_us);
        assert!(s.broadcast_latency_per_node[1].p50_us >= 5000.0);
        assert_eq!(s.join_latency.as_ref().unwrap().count, 4);
        assert_eq!(s.connections_joined, 5);
        assert_eq!(s.loss, Some(0));
        let r = s.received.as_ref().unwrap();
        assert_eq!((r.receivers, r.deliveries, r.extra, r.missing), (5, 5, 0, 0));
        assert_eq!(s.time_to_reach_all_s, Some(0.009));
        assert_eq!(s.achieved_connect_rate_per_s, Some(2.5));
        assert_eq!(s.time_to_connect_s, Some(2.0));
        assert_eq!(verdict(&s).0, "ok");
    }

    #[test]
    fn the_cpu_of_the_reach_is_from_the_send_to_the_last_receipt() {
        let at = |ms: u64, busy: f64| CpuSample {
            unix_nanos: 1_000_000_000 + ms * 1_000_000,
            whole_box: cpu::BoxCpu {
                user: busy,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut r = record();
        // The send is at 1 s; the last receipt (below) at 1.009 s.
        r.cpu = vec![at(0, 1.0), at(5, 1.5), at(10, 2.5), at(20, 9.0)];
        let reports = [
            (0, report(3, 3, &[1000, 2000, 3000], 1_005_000_000)),
            (1, report(2, 2, &[8000, 9000], 1_009_000_000)),
        ];
        let s = summarize(&r, &reports, vec![]);
        let w = s.reach_cpu.unwrap();
        assert!((w.busy_s - 1.5).abs() < 1e-9, "{w:?}");
        assert!((w.secs - 0.010).abs() < 1e-9, "{w:?}");
        // Without samples after the last receipt, no figure.
        r.cpu.truncate(2);
        assert_eq!(summarize(&r, &reports, vec![]).reach_cpu, None);
    }

    #[test]
    fn memory_per_connection_is_the_delta_over_joined() {
        let s = summarize(
            &record(),
            &[(0, report(3, 3, &[1], 0)), (1, report(2, 2, &[1], 0))],
            vec![],
        );
        let pc = s.memory_per_connection.unwrap();
        assert_eq!(pc.server_rss_bytes, 1000.0);
        assert_eq!(pc.kernel_slab_bytes, 1000.0);
        assert_eq!(pc.memavailable_drop_bytes, 2000.0);
        assert_eq!(pc.whole_box(), 2000.0);
        assert!(per_connection(&sample(0, 0, 0), &sample(1, 1, 1), 0).is_none());
    }

    #[test]
    fn a_subscriber_that_missed_it_is_loss() {
        let reports = [
            (0, report(3, 2, &[1_000_000, 1_000_000], 1_001_000_000)),
            (1, report(2, 2, &[1_000_000, 1_000_000], 1_001_000_000)),
        ];
        let s = summarize(&record(), &reports, vec![]);
        assert_eq!(s.loss, Some(1));
        assert_eq!(s.received.as_ref().unwrap().missing, 1);
        let (outcome, notes) = verdict(&s);
        assert_eq!(outcome, "incomplete");
        assert!(notes.contains("did not get it: 1"), "{notes}");
        // Without node 1's report the loss is not known.
        let s = summarize(&record(), &reports[..1], vec![1]);
        assert_eq!(s.loss, None);
        assert_eq!(verdict(&s).0, "incomplete");
    }

    #[test]
    fn no_broadcast_no_reach_figures() {
        let mut r = record();
        r.broadcast = None;
        let s = summarize(&r, &[(0, report(3, 0, &[], 0))], vec![1]);
        assert!(s.received.is_none() && s.broadcast_latency.is_none() && s.loss.is_none());
        assert!(one_line(&s).contains("latency p50 n/a"));
    }

    fn presence_report(joined: u64, reached: u64, ends: &[(&str, u64)]) -> ConnectReport {
        let mut r = report(joined, 0, &[], 0);
        r.ends = ends.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        r.ended_early = ends.iter().map(|(_, v)| v).sum();
        let mut tally = ringcast_loadgen::presence::PresenceTally {
            diff_bytes: 1000,
            state_bytes: 500,
            members_with_state: joined,
            reached,
            ..Default::default()
        };
        // 10 ms .. 30 ms after the arm time.
        tally.reach = vec![[10_000_000, 1], [30_000_000, 1]];
        r.presence = Some(ringcast_loadgen::report::PresenceFigures::of(
            &tally,
            Some("newcomer-0".into()),
            Some(1_000),
        ));
        r
    }

    fn newcomer(key: &str, members: u64, newcomers: u64, complete: bool) -> NewcomerReport {
        NewcomerReport {
            key: key.into(),
            expected_members: members,
            expected_newcomers: newcomers,
            state_member_keys: members,
            state_has_every_member: true,
            complete,
            final_keys: members + if complete { newcomers } else { 0 },
            // Its join went out 4 ms after the arm time (1,000 ns).
            join_sent_unix_nanos: 1_000 + 4_000_000,
            ..Default::default()
        }
    }

    fn presence_record() -> Record {
        let mut r = record();
        r.presence = true;
        r.settle = Some(SettleRecord {
            settled: true,
            waited_s: 3.0,
            bytes_out_during: 0,
        });
        r.armed_unix_nanos = Some(1_000);
        r.newcomers_started = 2;
        let with_bytes = |b: u64| {
            let mut s = sample(0, 0, 0);
            s.api_stats = Some(ApiConnections {
                bytes_out: b,
                nodes_answered: 2,
                nodes: 2,
                ..Default::default()
            });
            s
        };
        r.samples.before = Some(with_bytes(100));
        r.samples.full = Some(with_bytes(4_100));
        r
    }

    #[test]
    fn a_presence_size_is_ok_only_when_every_check_holds() {
        let reports = [(0, presence_report(3, 3, &[])), (1, presence_report(2, 2, &[]))];
        let n = |c| {
            vec![
                Some(newcomer("newcomer-0", 5, 2, c)),
                Some(newcomer("newcomer-1", 5, 2, true)),
            ]
        };
        let mut s = summarize(&presence_record(), &reports, vec![]);
        s.presence = Some(presence_summary(&presence_record(), &reports, n(true)));
        let p = s.presence.as_ref().unwrap();
        assert_eq!((p.members_with_state, p.reached, p.newcomers_ok), (5, 5, 2));
        assert_eq!(p.member_presence_bytes, 2 * 1500);
        // 4,000 bytes over the 2 s ramp.
        assert_eq!(p.server_bytes_out_ramp, Some(4_000));
        assert!((p.ramp_mb_per_s.unwrap() - 0.002).abs() < 1e-12);
        // Reach from newcomer 0's join: the arm-relative times less its 4 ms.
        let [p50, _, max] = p.reach_from_join_ms.unwrap();
        assert!((p50 - 6.0).abs() < 0.1 && (max - 26.0).abs() < 0.1, "{p50} {max}");
        assert_eq!(presence_verdict(&s).0, "ok");

        // A newcomer that never saw every newcomer.
        s.presence = Some(presence_summary(&presence_record(), &reports, n(false)));
        let (outcome, notes) = presence_verdict(&s);
        assert_eq!(outcome, "incomplete");
        assert!(notes.contains("1 of 2 newcomers"), "{notes}");

        // A member cut off with 1008, and one that missed the diff.
        let bad = [
            (0, presence_report(3, 2, &[("server close 1008", 1)])),
            (1, presence_report(2, 2, &[])),
        ];
        let mut s = summarize(&presence_record(), &bad, vec![]);
        s.presence = Some(presence_summary(&presence_record(), &bad, n(true)));
        assert_eq!(s.presence.as_ref().unwrap().closed_1008, 1);
        let notes = presence_verdict(&s).1;
        assert!(
            notes.contains("1 with 1008") && notes.contains("4 of 5 members saw"),
            "{notes}"
        );

        // A missing newcomer report, and a count a node did not answer: no total.
        let mut r = presence_record();
        if let Some(f) = r.samples.full.as_mut() {
            f.api_stats.as_mut().unwrap().nodes_answered = 1;
        }
        let p = presence_summary(&r, &reports, vec![Some(newcomer("newcomer-0", 5, 2, true)), None]);
        assert_eq!(p.newcomers_missing, [1]);
        assert_eq!(p.server_bytes_out_ramp, None);
    }
}
