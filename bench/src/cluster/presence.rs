//! The presence workload of one cluster size (`--workload presence`): one
//! `ringcast-loadgen presence` per node, every member joining the same `rooms:*` room
//! (user ids `m<node>-<i>`, name `"m"`), at most `--window` joins under way per node;
//! once all are in, wait until the nodes' `bytes_out` stops growing (the presence
//! diffs have settled), arm the members (an arm file holding the time), then one
//! `ringcast-loadgen newcomer` per node joins and checks its `presence_state` and the
//! diffs after it; the members time the first diff with `newcomer-0`'s key. Then the
//! members are released (a release file) and write their reports.

use std::path::Path;
use std::time::{Duration, Instant};

use ringcast_loadgen::sys;

use super::api::Api;
use super::plan::SizePlan;
use super::run::{ramp, stop, take_sample, write_json, Ctx, Procs, Stop, SECRET};
use super::summary::{Record, SettleRecord};
use crate::server::{Proc, Spawn};

/// Bytes per member under which a window of `--settle-secs` counts as quiet: one diff
/// with a single join to every member is about 150 B each; heartbeat replies are far
/// less.
const QUIET_BYTES_PER_MEMBER: u64 = 50;

/// The presence options of the run.
#[derive(Debug, Clone)]
pub struct PresenceOpts {
    pub window: u64,
    pub newcomers: Option<u64>,
    pub settle_secs: u64,
    pub settle_timeout_secs: u64,
    pub newcomer_timeout_secs: u64,
}

/// The key of newcomer `i`.
pub fn newcomer_key(i: usize) -> String {
    format!("{}{i}", ringcast_loadgen::presence::NEWCOMER_PREFIX)
}

/// Newcomers of a size on `nodes` nodes: one per node, at most `cap`, at least one.
pub fn newcomer_count(nodes: usize, cap: Option<u64>) -> usize {
    cap.map_or(nodes, |c| (c as usize).min(nodes)).max(1)
}

/// Whether a window of the nodes' summed `bytes_out` counts as quiet for `members`.
pub fn quiet(grew_by: u64, members: u64) -> bool {
    grew_by < members.saturating_mul(QUIET_BYTES_PER_MEMBER).max(64 << 10)
}

fn bytes_out(api: &Api, procs: &Procs) -> Option<u64> {
    let st = api.all_stats(&procs.ports());
    st.iter()
        .all(Option::is_some)
        .then(|| st.iter().flatten().map(|s| s.bytes_out).sum())
}

/// Waits until the nodes' `bytes_out` grew by less than [`quiet`] over `window`,
/// polling every 500 ms, for `timeout` at most.
fn settle(
    ctx: &Ctx,
    api: &Api,
    procs: &Procs,
    members: u64,
    window: Duration,
    timeout: Duration,
) -> SettleRecord {
    let t0 = Instant::now();
    let end = t0 + timeout;
    let mut hist: Vec<(Instant, u64)> = Vec::new();
    let start_bytes = bytes_out(api, procs).unwrap_or(0);
    loop {
        let now = Instant::now();
        if let Some(b) = bytes_out(api, procs) {
            hist.push((now, b));
        }
        // The oldest sample at least `window` old.
        if let (Some(&(_, last)), Some(&(_, old))) = (
            hist.last(),
            hist.iter().rev().find(|(t, _)| now.duration_since(*t) >= window),
        ) {
            if quiet(last.saturating_sub(old), members) {
                return SettleRecord {
                    settled: true,
                    waited_s: t0.elapsed().as_secs_f64(),
                    bytes_out_during: last.saturating_sub(start_bytes),
                };
            }
        }
        if now >= end || ctx.left() <= Duration::from_secs(30) || ctx.interrupted() {
            let last = hist.last().map_or(start_bytes, |h| h.1);
            return SettleRecord {
                settled: false,
                waited_s: t0.elapsed().as_secs_f64(),
                bytes_out_during: last.saturating_sub(start_bytes),
            };
        }
        hist.retain(|(t, _)| now.duration_since(*t) <= window * 2);
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// From the loadgens' start to the members' reports: the presence part of a size
/// (Redis and the nodes are up, `rec.samples.before` taken).
pub fn run(
    ctx: &mut Ctx,
    plan: &SizePlan,
    dir: &Path,
    api: &Api,
    rec: &mut Record,
    procs: &mut Procs,
    opts: &PresenceOpts,
) -> Result<(), Stop> {
    let logs = dir.join("logs");
    let k = plan.nodes.len();
    let arm_file = dir.join("arm");
    let release_file = dir.join("release");
    let _ = std::fs::remove_file(&arm_file);
    let _ = std::fs::remove_file(&release_file);
    // What is left of the run after the ramp: settling, the newcomers, the release.
    let tail_secs = opts.settle_timeout_secs + opts.newcomer_timeout_secs + 120;
    let ramp_secs = ctx.left().as_secs().saturating_sub(tail_secs).max(60);
    rec.t_loadgen_start = Some(super::run::now_unix());
    for (n, node) in plan.nodes.iter().zip(&procs.nodes) {
        let spec = Spawn::new(
            format!("loadgen {}", n.index),
            ctx.bin_dir.join("ringcast-loadgen"),
            &logs.join(format!("lg-{}.log", n.index)),
        )
        .stdout_to(&logs.join(format!("lg-{}.out", n.index)))
        .env("RINGCAST_SECRET", SECRET)
        .args(["presence", "--url", &format!("ws://127.0.0.1:{}", n.port)])
        .args(["-n", &n.connections.to_string(), "--topic", &plan.topic])
        .args([
            "--rate",
            &plan.rate_per_node.to_string(),
            "--window",
            &opts.window.to_string(),
            "--user-prefix",
            &format!("m{}-", n.index),
            "--watch",
            &newcomer_key(0),
        ])
        .args(["--arm-file".into(), arm_file.clone().into_os_string()])
        .args(["--release-file".into(), release_file.clone().into_os_string()])
        .args([
            "--ramp-timeout",
            &format!("{ramp_secs}s"),
            "--max-hold",
            &format!("{}s", ctx.left().as_secs()),
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
        .args(["--quiet", "--json"])
        .args([dir.join(format!("lg-{}.json", n.index))]);
        procs.loadgens.push(
            Proc::spawn(&spec)
                .map_err(|e| stop("failed", format!("{e:#}")))?
                .with_grace(Duration::from_secs(5)),
        );
    }
    ramp(ctx, plan, dir, api, procs, Duration::from_secs(ramp_secs + 30))?;
    rec.t_all_joined = Some(super::run::now_unix());
    let full = take_sample(procs, Some(api), true);
    write_json(&dir.join("samples/full.json"), &full);
    ctx.log.line(&format!(
        "  all members in after {:.0}s: {} connections on the nodes; servers wrote {:.1} GB; MemAvailable {} MiB",
        rec.t_all_joined.unwrap_or(0.0) - rec.t_loadgen_start.unwrap_or(0.0),
        full.api_stats.as_ref().map_or(0, |a| a.connections),
        full.api_stats.as_ref().map_or(0, |a| a.bytes_out) as f64 / 1e9,
        full.meminfo.mem_available >> 20
    ));
    rec.samples.full = Some(full);

    let s = settle(
        ctx,
        api,
        procs,
        plan.size,
        Duration::from_secs(opts.settle_secs),
        Duration::from_secs(opts.settle_timeout_secs),
    );
    ctx.log.line(&format!(
        "  settle: {} after {:.1}s ({:.1} MB written meanwhile)",
        if s.settled { "quiet" } else { "NOT quiet" },
        s.waited_s,
        s.bytes_out_during as f64 / 1e6
    ));
    rec.settle = Some(s);
    let settled = take_sample(procs, Some(api), false);
    write_json(&dir.join("samples/settled.json"), &settled);
    rec.samples_settled = Some(settled);
    if ctx.interrupted() {
        return Err(stop("interrupted", "interrupted while the room settled"));
    }

    // Arm the members, give them a moment to see it, then the newcomers.
    let armed = sys::unix_nanos();
    std::fs::write(&arm_file, armed.to_string()).map_err(|e| stop("failed", format!("arm file: {e}")))?;
    rec.armed_unix_nanos = Some(armed);
    std::thread::sleep(Duration::from_millis(1500));
    let count = newcomer_count(k, opts.newcomers);
    rec.newcomers_started = count;
    let mut newcomers = Vec::new();
    for i in 0..count {
        let n = &plan.nodes[i];
        let spec = Spawn::new(
            format!("newcomer {i}"),
            ctx.bin_dir.join("ringcast-loadgen"),
            &logs.join(format!("newcomer-{i}.log")),
        )
        .env("RINGCAST_SECRET", SECRET)
        .args(["newcomer", "--url", &format!("ws://127.0.0.1:{}", n.port)])
        .args(["--topic", &plan.topic, "--key", &newcomer_key(i)])
        .args([
            "--members",
            &plan.size.to_string(),
            "--newcomers",
            &count.to_string(),
            "--timeout",
            &format!("{}s", opts.newcomer_timeout_secs),
            "--stage-timeout",
            "60s",
            "--json",
        ])
        .args([dir.join(format!("newcomer-{i}.json"))]);
        newcomers.push(Proc::spawn(&spec).map_err(|e| stop("failed", format!("{e:#}")))?);
    }
    ctx.log.line(&format!(
        "  armed; {count} newcomer(s) joining on node(s) 0..{}",
        count - 1
    ));
    let end = Instant::now() + Duration::from_secs(opts.newcomer_timeout_secs + 90);
    while newcomers.iter_mut().any(Proc::alive) {
        if Instant::now() >= end || ctx.left() <= Duration::from_secs(20) || ctx.interrupted() {
            ctx.log
                .line("  newcomer(s) still running at their bound; stopping them");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(newcomers);
    // The newcomers' joins (and leaves) reach every member; then release them.
    let s2 = settle(
        ctx,
        api,
        procs,
        plan.size,
        Duration::from_secs(opts.settle_secs),
        Duration::from_secs(60),
    );
    ctx.log.line(&format!(
        "  after the newcomers: {} after {:.1}s; releasing the members",
        if s2.settled { "quiet" } else { "NOT quiet" },
        s2.waited_s
    ));
    let _ = std::fs::write(&release_file, "release");
    let per_node_max = plan.nodes.iter().map(|n| n.connections).max().unwrap_or(0);
    let end = Instant::now() + Duration::from_secs(60 + per_node_max / 500);
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
            return Err(stop("interrupted", "interrupted while the members closed"));
        }
        if Instant::now() >= end || ctx.left() <= Duration::from_secs(5) {
            ctx.log.line(&format!(
                "  {running} loadgen(s) still running after the release; stopping them (no report from those)"
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = take_sample(procs, Some(api), false);
    write_json(&dir.join("samples/after.json"), &after);
    rec.samples.after = Some(after);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newcomers_and_quiet() {
        assert_eq!(newcomer_count(6, None), 6);
        assert_eq!(newcomer_count(6, Some(1)), 1);
        assert_eq!(newcomer_count(1, Some(4)), 1);
        assert_eq!(newcomer_count(3, Some(0)), 1);
        assert_eq!(newcomer_key(2), "newcomer-2");
        // One more diff to 100,000 members (~15 MB) is not quiet; heartbeats are.
        assert!(!quiet(15_000_000, 100_000));
        assert!(quiet(40_000, 100_000));
        // Small rooms: at least 64 KiB of slack.
        assert!(quiet(60_000, 100));
    }
}
