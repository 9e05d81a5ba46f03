//! A core's timers, handed back to whoever drives the shard instead of spawned as
//! tasks: presence windows and `Socket::send_after` add one; the driver asks for the
//! earliest deadline ([`Timers::poll_timeout`]), sleeps until then, and fires what is
//! due ([`Timers::take_due`]) with the time it read.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::task::Waker;

/// What a timer does when it fires: runs on the shard's thread.
pub(crate) type Action = Box<dyn FnOnce(&super::Shard)>;

struct Entry {
    deadline_ms: u64,
    seq: u64,
    action: Action,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline_ms, self.seq) == (other.deadline_ms, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline_ms, self.seq).cmp(&(other.deadline_ms, other.seq))
    }
}

/// Deadlines in the shard's clock (ms), earliest first, in the order they were added
/// within one millisecond.
#[derive(Default)]
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    next_seq: Cell<u64>,
    /// The driver's waker, woken when a new timer is the earliest.
    driver: RefCell<Option<Waker>>,
}

impl Timers {
    /// Runs `action` at `deadline_ms` or at the first firing after it.
    pub(crate) fn add(&self, deadline_ms: u64, action: Action) {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let mut heap = self.heap.borrow_mut();
        let earliest = heap.peek().is_none_or(|Reverse(e)| deadline_ms < e.deadline_ms);
        heap.push(Reverse(Entry {
            deadline_ms,
            seq,
            action,
        }));
        drop(heap);
        if earliest {
            if let Some(w) = self.driver.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// The earliest deadline, if any; `waker` is woken when an earlier one is added.
    pub(crate) fn poll_timeout(&self, waker: &Waker) -> Option<u64> {
        let mut driver = self.driver.borrow_mut();
        if !driver.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *driver = Some(waker.clone());
        }
        self.next_deadline()
    }

    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.heap.borrow().peek().map(|Reverse(e)| e.deadline_ms)
    }

    /// Removes and returns the actions due at `now_ms`, earliest first. The caller runs
    /// them after this returns, so that an action may add timers.
    pub(crate) fn take_due(&self, now_ms: u64) -> Vec<Action> {
        let mut heap = self.heap.borrow_mut();
        let mut due = Vec::new();
        while heap.peek().is_some_and(|Reverse(e)| e.deadline_ms <= now_ms) {
            due.push(heap.pop().expect("peeked").0.action);
        }
        due
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.borrow().len()
    }
}
