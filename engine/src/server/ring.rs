//! The mesh link between cores: glommio's `channel_mesh`, one SPSC ring per pair.
//!
//! A ring that is full never blocks a publisher: messages wait, in order, in a per-peer
//! backlog drained by a pump task.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use glommio::channels::channel_mesh::Senders;
use glommio::{GlommioError, ResourceType};

use crate::shard::mesh::{MeshLink, MeshMsg};
use crate::shard::stats::CoreStats;

/// Messages one core holds for another whose ring is full; past it broadcasts are
/// dropped and counted (`ringcast_mesh_dropped_total`).
pub(crate) const MESH_BACKLOG_BOUND: usize = 65_536;

struct Inner {
    senders: Senders<MeshMsg>,
    backlog: Vec<RefCell<VecDeque<MeshMsg>>>,
    pumping: Vec<Cell<bool>>,
    bound: usize,
    stats: Arc<CoreStats>,
}

/// This core's senders into the rings, with their backlogs.
pub(crate) struct RingLink(Rc<Inner>);

impl RingLink {
    pub(crate) fn new(senders: Senders<MeshMsg>, stats: Arc<CoreStats>, bound: usize) -> Self {
        let peers = senders.nr_consumers();
        RingLink(Rc::new(Inner {
            senders,
            backlog: (0..peers).map(|_| RefCell::default()).collect(),
            pumping: (0..peers).map(|_| Cell::new(false)).collect(),
            bound,
            stats,
        }))
    }
}

impl MeshLink for RingLink {
    fn send(&self, peer: usize, msg: MeshMsg) {
        let inner = &self.0;
        let mut backlog = inner.backlog[peer].borrow_mut();
        let msg = if backlog.is_empty() {
            match inner.senders.try_send_to(peer, msg) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => msg,
                Err(e) => {
                    tracing::error!("mesh send to core {peer} failed: {e}");
                    return;
                }
            }
        } else {
            msg
        };
        // Broadcasts are the volume and may be dropped, at most once like any delivery:
        // past the bound they are, and counted (one on its way to its topic's owner
        // too). Interest, acks, presence, history fetches and long-poll messages are
        // few and keep the cores' tables right: they always queue.
        if backlog.len() >= inner.bound && matches!(msg, MeshMsg::Broadcast(_) | MeshMsg::Sequence(_)) {
            inner.stats.mesh_dropped.add(1);
            return;
        }
        backlog.push_back(msg);
        drop(backlog);
        if !inner.pumping[peer].replace(true) {
            let inner = inner.clone();
            glommio::spawn_local(async move {
                loop {
                    let next = inner.backlog[peer].borrow_mut().pop_front();
                    let Some(msg) = next else { break };
                    if inner.senders.send_to(peer, msg).await.is_err() {
                        break;
                    }
                }
                inner.pumping[peer].set(false);
            })
            .detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use glommio::channels::channel_mesh::MeshBuilder;
    use glommio::LocalExecutorBuilder;

    use super::*;
    use crate::proto::Payload;
    use crate::shard::Broadcast;

    /// A core that does not read its ring: the publisher's ring fills, then its backlog
    /// up to the bound; past that broadcasts are dropped and counted while interest
    /// messages still queue, and once the peer reads, everything kept arrives in order.
    #[test]
    fn a_stalled_peer_costs_its_publisher_a_bounded_backlog_and_counted_drops() {
        const RING: usize = 4;
        const BOUND: usize = 8;
        const SENT: usize = 100;
        let mesh = MeshBuilder::<MeshMsg, _>::full(2, RING);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<usize>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<&'static str>>();
        let reader_mesh = mesh.clone();
        let reader = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (_senders, mut receivers) = reader_mesh.join().await.unwrap();
                // Stalled: this core reads nothing until the publisher is done.
                let expected = go_rx.recv().unwrap();
                let mut got = Vec::new();
                for (_, rx) in receivers.streams() {
                    while got.len() < expected {
                        match rx.recv().await {
                            Some(MeshMsg::Broadcast(_)) => got.push("broadcast"),
                            Some(MeshMsg::Interest { .. }) => got.push("interest"),
                            Some(_) => got.push("other"),
                            None => break,
                        }
                    }
                }
                done_tx.send(got).unwrap();
            })
            .unwrap();
        let publisher = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (senders, _receivers) = mesh.join().await.unwrap();
                let peer = 1 - senders.peer_id();
                let stats = Arc::new(CoreStats::default());
                let link = RingLink::new(senders, stats.clone(), BOUND);
                for _ in 0..SENT {
                    let b = Broadcast::new("t", "e", Payload::empty(), None);
                    link.send(peer, MeshMsg::Broadcast(Arc::new(b)));
                }
                for on in [true, false, true] {
                    let topic: Arc<str> = "u".into();
                    link.send(
                        peer,
                        MeshMsg::Interest {
                            topic,
                            core: 1 - peer,
                            on,
                            ack: None,
                        },
                    );
                }
                let dropped = stats.mesh_dropped.get() as usize;
                let backlog = link.0.backlog[peer].borrow().len();
                go_tx.send(SENT - dropped + 3).unwrap();
                // Keep the pump running until the reader has everything.
                let deadline = Instant::now() + Duration::from_secs(10);
                let got = loop {
                    if let Ok(got) = done_rx.try_recv() {
                        break got;
                    }
                    assert!(Instant::now() < deadline, "the reader did not get its messages");
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                };
                (dropped, backlog, got)
            })
            .unwrap();
        let (dropped, backlog, got) = publisher.join().unwrap();
        reader.join().unwrap();
        // glommio's ring holds its capacity, or one more.
        let in_ring = SENT - BOUND - dropped;
        assert!(
            (RING..=RING + 1).contains(&in_ring),
            "{in_ring} in a ring of {RING}"
        );
        assert_eq!(backlog, BOUND + 3, "interest messages queue past the bound");
        let mut want = vec!["broadcast"; in_ring + BOUND];
        want.extend(["interest"; 3]);
        assert_eq!(got, want, "what was kept arrives, in order");
    }
}
