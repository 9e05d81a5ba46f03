//! What one cluster size runs: how many nodes, their ports and CPUs, the connections
//! and connect rate of each node's loadgen, how long the ramp and the hold take, and
//! whether the size fits the time and memory left. Pure arithmetic; no I/O.

use std::net::Ipv4Addr;

use serde::Serialize;

/// Nodes a run may use at most (ports base .. base + 249).
pub const MAX_NODES: u64 = 250;

/// Sizes from `--sweep` (commas and/or spaces) or, without it, the one `--target`.
pub fn sizes(sweep: Option<&str>, target: u64) -> Result<Vec<u64>, String> {
    let Some(list) = sweep else {
        return if target > 0 {
            Ok(vec![target])
        } else {
            Err("--target must be a positive integer".into())
        };
    };
    let sizes: Vec<u64> = list
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("--sweep: not a positive integer: {s}"))
        })
        .collect::<Result<_, _>>()?;
    if sizes.is_empty() {
        return Err("--sweep names no size".into());
    }
    Ok(sizes)
}

/// Nodes for `size` connections at most `per_node` each.
pub fn node_count(size: u64, per_node: u64) -> u64 {
    size.div_ceil(per_node.max(1))
}

/// One node and its loadgen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodePlan {
    pub index: usize,
    pub port: u16,
    /// The CPU the node is pinned to (`taskset -c`).
    pub cpu: usize,
    /// Connections its loadgen opens.
    pub connections: u64,
}

/// Everything one size runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SizePlan {
    pub size: u64,
    pub per_node: u64,
    pub nodes: Vec<NodePlan>,
    pub redis_port: u16,
    /// Requested connect rate, all loadgens together.
    pub rate: f64,
    /// Each loadgen's share of it.
    pub rate_per_node: f64,
    /// The ramp at `rate`, rounded up.
    pub ramp_secs: u64,
    /// How long the loadgens hold their connections once up: the broadcast and its
    /// deliveries happen inside it. Each loadgen counts from its own ramp's end, and on a
    /// saturated box those ends spread: in the 1,000,000 run of 2026-12-02 over 130 s of
    /// a 400 s ramp, so a hold of a fifth of the ramp let the first loadgens close before
    /// the last were up. Three quarters of the ramp covers that.
    pub hold_secs: u64,
    /// Time the size needs at least (ramp with slack, broadcast, hold, teardown).
    pub need_secs: u64,
    pub topic: String,
}

/// The plan of `size`: nodes of at most `per_node` connections on ports `base_port..`
/// (Redis on `base_port + 1000`), node i on `cpus[i mod len]`, connections split as
/// evenly as they go.
pub fn plan_size(size: u64, per_node: u64, rate: f64, base_port: u16, cpus: &[usize]) -> SizePlan {
    let k = node_count(size, per_node).max(1);
    let (base, extra) = (size / k, size % k);
    let nodes = (0..k)
        .map(|i| NodePlan {
            index: i as usize,
            port: base_port.saturating_add(i as u16),
            cpu: if cpus.is_empty() {
                0
            } else {
                cpus[i as usize % cpus.len()]
            },
            connections: base + u64::from(i < extra),
        })
        .collect();
    let ramp_secs = (size as f64 / rate) as u64 + 1;
    SizePlan {
        size,
        per_node,
        nodes,
        redis_port: base_port.saturating_add(1000),
        rate,
        rate_per_node: (rate / k as f64).max(1.0),
        ramp_secs,
        hold_secs: 40 + ramp_secs * 3 / 4,
        need_secs: ramp_secs * 2 + 90,
        topic: format!("bench:cluster-{size}"),
    }
}

impl SizePlan {
    /// How long to wait for every loadgen to report its ramp done.
    pub fn ramp_limit_secs(&self) -> u64 {
        self.ramp_secs * 3 + 120
    }
}

/// Whether a size fits the memory the box has.
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryFit {
    Fits,
    /// Tried anyway; the run stops if MemAvailable falls under the reserve.
    Tight {
        need_bytes: u64,
    },
    Skip {
        need_bytes: u64,
    },
}

/// `size` connections at `bytes_per_conn` each (both ends, servers, loadgens, kernel)
/// plus `reserve` against `available`: a size that needs more than 1.5 x what is
/// available is skipped; one that needs more than what is available is tight.
pub fn memory_fit(size: u64, bytes_per_conn: u64, reserve: u64, available: u64) -> MemoryFit {
    let need_bytes = size.saturating_mul(bytes_per_conn).saturating_add(reserve);
    if available.saturating_mul(3) / 2 < need_bytes {
        MemoryFit::Skip { need_bytes }
    } else if available < need_bytes {
        MemoryFit::Tight { need_bytes }
    } else {
        MemoryFit::Fits
    }
}

/// The next sizes' memory estimate from what a finished size measured per connection:
/// 10 % over it.
pub fn refined_estimate(measured_bytes_per_conn: f64) -> Option<u64> {
    (measured_bytes_per_conn.is_finite() && measured_bytes_per_conn > 0.0)
        .then_some((measured_bytes_per_conn * 1.1) as u64)
}

/// Source ports one node needs per source address (the loadgen binds with
/// IP_BIND_ADDRESS_NO_PORT, so ports count per source and destination pair).
pub fn ports_per_source(per_node: u64, sources: u32) -> u64 {
    per_node.div_ceil(u64::from(sources.max(1)))
}

/// The highest source address of `sources` (127.0.0.2 upward), as the loadgen uses them.
pub fn last_source(sources: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (1 + sources.clamp(1, 253)) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_sweep_or_target() {
        assert_eq!(sizes(None, 1_000_000), Ok(vec![1_000_000]));
        assert_eq!(sizes(Some("10000,40000"), 5), Ok(vec![10_000, 40_000]));
        // The old script took a space-separated list.
        assert_eq!(
            sizes(Some("10000 50000  100000"), 5),
            Ok(vec![10_000, 50_000, 100_000])
        );
        assert!(sizes(Some("10000,x"), 5).is_err());
        assert!(sizes(Some("0"), 5).is_err());
        assert!(sizes(Some(" , "), 5).is_err());
        assert!(sizes(None, 0).is_err());
    }

    #[test]
    fn nodes_per_size() {
        let p = plan_size(40_000, 19_000, 2500.0, 4700, &[0, 1]);
        assert_eq!(p.nodes.len(), 3);
        assert_eq!(
            p.nodes.iter().map(|n| n.connections).collect::<Vec<_>>(),
            [13_334, 13_333, 13_333]
        );
        assert_eq!(p.nodes.iter().map(|n| n.connections).sum::<u64>(), 40_000);
        assert_eq!(
            p.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
            [4700, 4701, 4702]
        );
        // Node i on CPU i mod ncpu.
        assert_eq!(p.nodes.iter().map(|n| n.cpu).collect::<Vec<_>>(), [0, 1, 0]);
        assert_eq!(p.redis_port, 5700);
        assert!((p.rate_per_node - 2500.0 / 3.0).abs() < 1e-9);
        assert_eq!(p.ramp_secs, 17);
        assert_eq!(p.hold_secs, 52);
        assert_eq!(p.need_secs, 17 * 2 + 90);
        assert_eq!(p.topic, "bench:cluster-40000");

        let one = plan_size(10_000, 19_000, 2500.0, 4700, &[3]);
        assert_eq!(one.nodes.len(), 1);
        assert_eq!(one.nodes[0].connections, 10_000);
        assert_eq!(one.nodes[0].cpu, 3);
        // Exactly full nodes, and the million of the old script.
        assert_eq!(node_count(38_000, 19_000), 2);
        assert_eq!(node_count(1_000_000, 19_000), 53);
        // A tiny rate over many nodes still gives each loadgen a positive rate.
        assert_eq!(plan_size(1_000_000, 19_000, 10.0, 4700, &[0]).rate_per_node, 1.0);
    }

    #[test]
    fn memory_budget() {
        let kib = 1024;
        assert_eq!(memory_fit(10_000, 21 * kib, 3 << 30, 20 << 30), MemoryFit::Fits);
        // 1M x 21 KiB + 3 GiB is about 23 GiB: tight on 20 GiB, skipped on 10 GiB.
        assert!(matches!(
            memory_fit(1_000_000, 21 * kib, 3 << 30, 20 << 30),
            MemoryFit::Tight { .. }
        ));
        assert!(matches!(
            memory_fit(1_000_000, 21 * kib, 3 << 30, 10 << 30),
            MemoryFit::Skip { .. }
        ));
        assert_eq!(refined_estimate(10_000.0), Some(11_000));
        assert_eq!(refined_estimate(0.0), None);
        assert_eq!(refined_estimate(f64::NAN), None);
    }

    #[test]
    fn source_ports() {
        assert_eq!(ports_per_source(19_000, 64), 297);
        assert_eq!(ports_per_source(19_000, 0), 19_000);
        assert_eq!(last_source(64), Ipv4Addr::new(127, 0, 0, 65));
        assert_eq!(last_source(300), Ipv4Addr::new(127, 0, 0, 254));
    }
}
