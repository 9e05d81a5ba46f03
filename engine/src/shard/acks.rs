//! The barrier a topic's first join on a core waits at: its interest must reach every
//! other core (they forward the topic's broadcasts here only once they know of it) and,
//! in cluster mode, Redis must have confirmed the node's `SUBSCRIBE` (before that, a
//! broadcast published on another node does not reach this one). Each of them acks the
//! announcement; the join is answered once all did, or after a timeout at the latest.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::task::{Context, Waker};

/// An announcement waiting for acks: how many are missing, who waits, and when it was
/// made (the shard's clock, ms).
type PendingAck = (usize, Option<Waker>, u32);

#[derive(Default)]
pub(crate) struct Acks {
    pending: RefCell<HashMap<u64, PendingAck>>,
    next: Cell<u64>,
}

impl Acks {
    /// A new announcement that `missing` parties must ack; `None` when nobody must.
    pub(crate) fn open(&self, missing: usize, now_ms: u32) -> Option<u64> {
        (missing > 0).then(|| {
            let id = self.next.get() + 1;
            self.next.set(id);
            self.pending.borrow_mut().insert(id, (missing, None, now_ms));
            id
        })
    }

    /// Counts one ack of announcement `id` (one nobody waits for any more is ignored).
    pub(crate) fn acked(&self, id: u64) {
        let mut pending = self.pending.borrow_mut();
        if let Some((missing, waiter, _)) = pending.get_mut(&id) {
            *missing = missing.saturating_sub(1);
            if *missing == 0 {
                if let Some(w) = waiter.take() {
                    w.wake();
                }
            }
        }
    }

    /// Whether every party acked announcement `id`; registers the waker if not.
    pub(crate) fn poll(&self, id: u64, cx: &mut Context<'_>) -> bool {
        let mut pending = self.pending.borrow_mut();
        match pending.get_mut(&id) {
            Some((0, _, _)) | None => {
                pending.remove(&id);
                true
            }
            Some((_, waiter, _)) => {
                *waiter = Some(cx.waker().clone());
                false
            }
        }
    }

    /// Gives up on announcements older than `limit_ms` at `now_ms` (a core that died
    /// or is wedged, or a Redis that does not answer, must not hold first joins
    /// forever): their waiters go on as if acked. Returns how many were given up.
    pub(crate) fn expire(&self, core: usize, now_ms: u32, limit_ms: u32) -> usize {
        let mut expired = 0;
        for (id, (missing, waiter, since)) in self.pending.borrow_mut().iter_mut() {
            if *missing > 0 && now_ms.wrapping_sub(*since) >= limit_ms {
                tracing::warn!(
                    core,
                    ack = id,
                    missing = *missing,
                    "interest not acked by every core (and Redis) within {limit_ms} ms; answering the join anyway"
                );
                *missing = 0;
                if let Some(w) = waiter.take() {
                    w.wake();
                }
                expired += 1;
            }
        }
        expired
    }

    /// Drops announcement `id`, which nobody waits for.
    pub(crate) fn forget(&self, id: u64) {
        self.pending.borrow_mut().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn an_announcement_is_done_once_every_party_acked() {
        let acks = Acks::default();
        assert_eq!(acks.open(0, 0), None, "nobody to wait for");
        let id = acks.open(2, 0).expect("two parties");
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(!acks.poll(id, &mut cx));
        acks.acked(id);
        assert!(!acks.poll(id, &mut cx));
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        acks.acked(id);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "the last ack wakes the waiter"
        );
        assert!(acks.poll(id, &mut cx));
        acks.acked(id); // late: ignored
    }

    #[test]
    fn a_missing_ack_gives_up_after_the_limit() {
        let acks = Acks::default();
        let id = acks.open(1, 100).unwrap();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        assert!(!acks.poll(id, &mut cx));
        assert_eq!(acks.expire(0, 150, 100), 0);
        assert!(!acks.poll(id, &mut cx));
        assert_eq!(acks.expire(0, 200, 100), 1);
        assert!(acks.poll(id, &mut cx));
    }
}
