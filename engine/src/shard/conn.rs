//! One connection's shared state on its core: the outbound frame queue, the mailbox of
//! intercepted broadcasts and channel messages, the joined channels, and the waker of the
//! task that drives it. Everything here is `Rc`/`Cell`: a connection never leaves its core.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;
use thin_vec::ThinVec;

use crate::proto::socket::ChannelTable;
use crate::proto::ws::{close_code, deflate};
use crate::proto::{Ref, Vsn};
use crate::shard::api::channel::DynChannel;
use crate::shard::api::socket::Socket;
use crate::shard::presence::Tracked;
use crate::shard::Broadcast;

/// A connection's key in its shard: slab slot plus a generation, so a stale id never
/// reaches a newer connection that reused the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub(crate) key: u32,
    pub(crate) gen: u32,
}

/// A finished frame waiting to be written.
#[derive(Debug, Clone)]
pub(crate) enum OutFrame {
    /// A broadcast frame shared by every local subscriber (non-atomic refcount).
    Shared(Rc<Bytes>),
    /// A frame for this connection alone.
    Own(Bytes),
    /// Presence the server made (`presence_diff` shared by subscribers): counted
    /// against its own, larger bound, so that a reading client is never cut off for
    /// presence traffic.
    PresenceShared(Rc<Bytes>),
    /// A `presence_state` for this connection alone (a big room's is big).
    PresenceOwn(Bytes),
}

impl OutFrame {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            OutFrame::Shared(b) | OutFrame::PresenceShared(b) => b,
            OutFrame::Own(b) | OutFrame::PresenceOwn(b) => b,
        }
    }

    /// Server-made presence, under [`PRESENCE_BOUND_FACTOR`] times the usual bound.
    pub(crate) fn is_presence(&self) -> bool {
        matches!(self, OutFrame::PresenceShared(_) | OutFrame::PresenceOwn(_))
    }
}

/// Presence frames may fill a queue this many times the connection's outbound bound
/// (`--max-outbound`, 4 MiB by default: 64 MiB) before they cut it off: a joiner of a
/// room of a hundred thousand members gets its whole `presence_state`.
pub(crate) const PRESENCE_BOUND_FACTOR: usize = 16;

/// The outbound queue: frames in order, the bytes they hold, and how much of the first
/// frame is already written.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    pub(crate) frames: VecDeque<OutFrame>,
    pub(crate) bytes: usize,
    /// Bytes of the first frame already written (frames are far below 4 GiB).
    pub(crate) head_written: u32,
    /// Bytes of the presence frames queued, counted whole until each is written.
    pub(crate) presence_bytes: u32,
}

impl OutQueue {
    /// Drops `n` written bytes from the front; returns how many frames were completed.
    pub(crate) fn consume(&mut self, mut n: usize) -> u64 {
        let mut done = 0;
        self.bytes -= n;
        while n > 0 {
            let head = self
                .frames
                .front()
                .expect("consumed more than queued")
                .bytes()
                .len();
            let left = head - self.head_written as usize;
            if n >= left {
                n -= left;
                self.head_written = 0;
                if let Some(frame) = self.frames.pop_front().filter(OutFrame::is_presence) {
                    self.presence_bytes -= frame.bytes().len() as u32;
                }
                done += 1;
            } else {
                self.head_written += n as u32;
                n = 0;
            }
        }
        if self.frames.is_empty() && self.frames.capacity() > 16 {
            // An idle connection keeps no large queue around.
            self.frames = VecDeque::new();
        }
        done
    }

    /// Calls `write` with the bytes of the next send: the rest of the first frame, plus
    /// as many whole frames after it as fit in `scratch` (several frames, one send).
    /// `None` when nothing is queued.
    pub(crate) fn next_write<R>(
        &self,
        scratch: &mut Vec<u8>,
        limit: usize,
        write: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        let head = self.frames.front()?;
        let head_rest = &head.bytes()[self.head_written as usize..];
        if self.frames.len() == 1 || head_rest.len() >= limit / 2 {
            return Some(write(head_rest));
        }
        scratch.clear();
        scratch.extend_from_slice(head_rest);
        for frame in self.frames.iter().skip(1) {
            if scratch.len() + frame.bytes().len() > limit {
                break;
            }
            scratch.extend_from_slice(frame.bytes());
        }
        Some(write(scratch))
    }

    /// Drops every frame not yet started. A frame already partly written stays: cutting
    /// it would corrupt the stream (the client would read the next frame, the close,
    /// as the rest of it).
    pub(crate) fn clear(&mut self) {
        let started = (self.head_written > 0).then(|| self.frames.pop_front()).flatten();
        self.frames = VecDeque::new();
        self.bytes = 0;
        self.presence_bytes = 0;
        if let Some(head) = started {
            self.bytes = head.bytes().len() - self.head_written as usize;
            if head.is_presence() {
                self.presence_bytes = head.bytes().len() as u32;
            }
            self.frames.push_back(head);
        } else {
            self.head_written = 0;
        }
    }
}

/// Parked connections (no task, no waker) that something woke, for the transport's
/// parking dispatcher to start again, and that dispatcher's waker. Per core thread, as
/// connections are.
#[derive(Default)]
struct Unparks {
    ids: Vec<ConnId>,
    waker: Option<Waker>,
}

thread_local! {
    static UNPARKS: RefCell<Unparks> = RefCell::default();
}

fn request_unpark(id: ConnId) {
    UNPARKS.with(|u| {
        let mut u = u.borrow_mut();
        u.ids.push(id);
        if let Some(w) = &u.waker {
            w.wake_by_ref();
        }
    });
}

/// Sets the waker of the task that restarts parked connections ([`take_unparks`]).
pub(crate) fn set_unpark_waker(waker: &Waker) {
    UNPARKS.with(|u| {
        let mut u = u.borrow_mut();
        if !u.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            u.waker = Some(waker.clone());
        }
    });
}

/// The parked connections woken since the last call, oldest first.
pub(crate) fn take_unparks() -> Vec<ConnId> {
    UNPARKS.with(|u| std::mem::take(&mut u.borrow_mut().ids))
}

/// Mails a connection may hold; past it the connection is closed with 1008.
pub(crate) const MAILBOX_BOUND: usize = 1024;

/// Work for the channel layer of a connection, run by its driver task.
pub(crate) enum Mail {
    /// An intercepted broadcast for the channel on its topic.
    Out(Arc<Broadcast>),
    /// A message for `handle_info` of the channel `(topic, join_ref)`.
    Info(Rc<str>, Ref, Box<dyn Any>),
    /// A frame that must wait behind the mails queued before it: a broadcast on a
    /// topic with history, after an intercepted one still in the mailbox, so that the
    /// client gets the topic's broadcasts in the offsets' order.
    Frame(OutFrame),
}

/// A joined channel's runtime slot. The channel and its socket are moved out while one
/// of its handlers runs.
pub(crate) struct Slot {
    pub(crate) running: Option<(Box<dyn DynChannel>, Socket)>,
    /// Where this channel's subscription sits in its topic's subscriber list.
    pub(crate) sub_pos: Cell<u32>,
}

/// Per-connection limits taken from the server config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnLimits {
    pub(crate) max_outbound_bytes: u32,
    pub(crate) messages_per_sec: u32,
    pub(crate) message_burst: u32,
    /// Frames of this connection's own at least this long go compressed once it
    /// negotiated `permessage-deflate` ([`Conn::deflate`]).
    pub(crate) deflate_min: u32,
}

/// Why a connection is being closed, for the close frame's reason: one byte in the
/// connection, the text when the close frame is made.
pub(crate) mod why {
    /// A close reason more specific than its code.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    #[repr(u8)]
    pub(crate) enum Why {
        /// None beyond the close code.
        #[default]
        None,
        Slow,
        Flood,
        Mailbox,
        LongPollInbound,
    }

    pub(crate) const SLOW: Why = Why::Slow;
    pub(crate) const FLOOD: Why = Why::Flood;
    pub(crate) const MAILBOX: Why = Why::Mailbox;
    pub(crate) const LONG_POLL_INBOUND: Why = Why::LongPollInbound;

    impl Why {
        /// The close frame's reason text ("" for [`Why::None`]).
        pub(crate) fn text(self) -> &'static str {
            match self {
                Why::None => "",
                Why::Slow => "outbound queue over its bound",
                Why::Flood => "message rate over its limit",
                Why::Mailbox => "mailbox over its bound",
                Why::LongPollInbound => "long-poll messages over their bound",
            }
        }
    }
}
/// Field order is deliberate (`repr(C)`): what fanout touches for every subscriber
/// (the close flag, the outbound queue, its bound, the waker) sits in the first two
/// cache lines; the rest is for the connection's own task.
#[repr(C)]
pub(crate) struct Conn {
    /// Close requested with this code (first request wins).
    pub(crate) close: Cell<Option<u16>>,
    /// Queued frames wait for the core's flusher ([`crate::shard::Shard::mark_dirty`]).
    pub(crate) dirty: Cell<bool>,
    pub(crate) vsn: Vsn,
    /// A long-poll session rather than a WebSocket.
    pub(crate) long_poll: bool,
    /// Negotiated `permessage-deflate`: large frames go to it compressed.
    pub(crate) deflate: Cell<bool>,
    /// The socket to write to directly, or -1 (long-poll, test kit, closed).
    pub(crate) fd: Cell<i32>,
    /// Milliseconds (wrapping) since the shard's epoch when the client last sent anything.
    pub(crate) last_in: Cell<u32>,
    pub(crate) id: ConnId,
    pub(crate) out: RefCell<OutQueue>,
    pub(crate) limits: ConnLimits,
    /// Inbound rate limit: tokens left, and when they were last refilled (ms).
    tokens: Cell<f32>,
    refilled: Cell<u32>,
    /// Non-zero while parked ([`crate::transport::park`]): the sequence of its poll.
    pub(crate) park_seq: Cell<u32>,
    /// Parked with TLS: its record layer waits in the transport's table of parked TLS
    /// connections ([`crate::transport::tls`]), and the flusher seals its frames.
    pub(crate) sealed: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Allocated at the first mail: most connections never get any, and an empty
    /// boxed queue costs the connection 8 bytes instead of 32.
    #[allow(clippy::box_collection)]
    mailbox: RefCell<Option<Box<VecDeque<Mail>>>>,
    pub(crate) assigns: Rc<dyn Any>,
    pub(crate) socket_id: Option<Box<str>>,
    pub(crate) channels: RefCell<ChannelTable<Slot>>,
    /// Presences this connection tracked.
    pub(crate) tracked: RefCell<ThinVec<Tracked>>,
    /// The reason sent with that close, when it is more specific than the code.
    pub(crate) close_why: Cell<why::Why>,
}

impl Conn {
    pub(crate) fn new(
        id: ConnId,
        vsn: Vsn,
        assigns: Rc<dyn Any>,
        socket_id: Option<Box<str>>,
        limits: ConnLimits,
        now: u32,
        long_poll: bool,
    ) -> Self {
        Conn {
            id,
            vsn,
            assigns,
            socket_id,
            limits,
            long_poll,
            out: RefCell::default(),
            mailbox: RefCell::default(),
            channels: RefCell::default(),
            tracked: RefCell::new(ThinVec::new()),
            close: Cell::new(None),
            dirty: Cell::new(false),
            deflate: Cell::new(false),
            fd: Cell::new(-1),
            close_why: Cell::new(why::Why::None),
            tokens: Cell::new(limits.message_burst as f32),
            refilled: Cell::new(now),
            park_seq: Cell::new(0),
            sealed: Cell::new(false),
            last_in: Cell::new(now),
            waker: RefCell::new(None),
        }
    }

    /// Queues a frame and wakes the driver. A queue over its bound closes the
    /// connection with 1008 instead.
    pub(crate) fn enqueue(&self, frame: OutFrame) {
        self.push(frame);
        self.wake();
    }

    /// Queues a frame without waking anyone; `false` if the connection is closing (the
    /// frame is dropped) or just went over its bound (and will close).
    pub(crate) fn push(&self, frame: OutFrame) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let frame = self.compress_own(frame);
        let over = {
            let mut out = self.out.borrow_mut();
            let len = frame.bytes().len();
            out.bytes += len;
            if frame.is_presence() {
                out.presence_bytes = out.presence_bytes.saturating_add(len as u32);
            }
            if out.frames.capacity() == 0 {
                // An idle connection keeps room for one frame, not the default four.
                out.frames.reserve_exact(1);
            }
            out.frames.push_back(frame);
            let bound = self.limits.max_outbound_bytes as usize;
            let presence = out.presence_bytes as usize;
            out.bytes - presence.min(out.bytes) > bound
                || presence > bound.saturating_mul(PRESENCE_BOUND_FACTOR)
        };
        if over {
            self.out.borrow_mut().clear();
            self.close_why.set(why::SLOW);
            self.request_close(close_code::POLICY);
        }
        !over
    }

    /// A frame made for this connection alone, compressed for it when it negotiated
    /// compression and the frame is large enough; shared frames come compressed already
    /// (once per broadcast, [`crate::shard::Shard::deliver_local`]).
    fn compress_own(&self, frame: OutFrame) -> OutFrame {
        if !self.deflate.get() {
            return frame;
        }
        let min = self.limits.deflate_min as usize;
        let packed = match &frame {
            OutFrame::Own(b) | OutFrame::PresenceOwn(b) if b.len() >= min => {
                deflate::compress_frame(b, deflate::OWN_LEVEL)
            }
            _ => None,
        };
        match (packed, frame) {
            (Some(packed), OutFrame::PresenceOwn(_)) => OutFrame::PresenceOwn(packed),
            (Some(packed), _) => OutFrame::Own(packed),
            (None, frame) => frame,
        }
    }

    pub(crate) fn enqueue_own(&self, frame: Bytes) {
        self.enqueue(OutFrame::Own(frame));
    }

    /// Queues work for the channel layer; a mailbox over [`MAILBOX_BOUND`] (a channel
    /// whose handler does not finish while broadcasts or messages pile up) closes the
    /// connection with 1008 instead. `false` when the mail was not queued.
    pub(crate) fn mail(&self, mail: Mail) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let over = {
            let mut mailbox = self.mailbox.borrow_mut();
            let mailbox = mailbox.get_or_insert_with(Box::default);
            mailbox.push_back(mail);
            mailbox.len() > MAILBOX_BOUND
        };
        if over {
            self.clear_mail();
            self.close_why.set(why::MAILBOX);
            self.request_close(close_code::POLICY);
            return false;
        }
        self.wake();
        true
    }

    /// Queues `mails`, in order, ahead of every mail already waiting; past
    /// [`MAILBOX_BOUND`] the connection is closed as by [`Conn::mail`].
    pub(crate) fn mail_first(&self, mails: Vec<Mail>) {
        if mails.is_empty() || self.close.get().is_some() {
            return;
        }
        let over = {
            let mut mailbox = self.mailbox.borrow_mut();
            let mailbox = mailbox.get_or_insert_with(Box::default);
            for mail in mails.into_iter().rev() {
                mailbox.push_front(mail);
            }
            mailbox.len() > MAILBOX_BOUND
        };
        if over {
            self.clear_mail();
            self.close_why.set(why::MAILBOX);
            self.request_close(close_code::POLICY);
            return;
        }
        self.wake();
    }

    /// The oldest mail, if any.
    pub(crate) fn next_mail(&self) -> Option<Mail> {
        self.mailbox.borrow_mut().as_mut()?.pop_front()
    }

    /// Drops every mail not yet handled.
    pub(crate) fn clear_mail(&self) {
        self.mailbox.borrow_mut().take();
    }

    /// Takes one message's worth from the inbound token bucket; `false` (and a close
    /// with 1008) once the client sends faster than its limit allows.
    pub(crate) fn take_token(&self, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.refilled.get()) as f32 / 1000.0;
        self.refilled.set(now_ms);
        let burst = self.limits.message_burst as f32;
        let tokens = (self.tokens.get() + elapsed * self.limits.messages_per_sec as f32).min(burst) - 1.0;
        self.tokens.set(tokens.max(-1.0));
        if tokens < 0.0 {
            self.close_why.set(why::FLOOD);
            self.request_close(close_code::POLICY);
            return false;
        }
        true
    }

    pub(crate) fn request_close(&self, code: u16) {
        if self.close.get().is_none() {
            self.close.set(Some(code));
            self.wake();
        }
    }

    pub(crate) fn set_waker(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Wakes the connection's task, or has a parked connection's task started again.
    pub(crate) fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        } else if self.park_seq.get() != 0 {
            request_unpark(self.id);
        }
    }

    /// Forgets the task's waker: the task is ending while the connection lives on.
    pub(crate) fn clear_waker(&self) {
        self.waker.borrow_mut().take();
    }

    /// Whether mail is waiting.
    pub(crate) fn has_mail(&self) -> bool {
        self.mailbox.borrow().as_ref().is_some_and(|m| !m.is_empty())
    }

    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection with these limits, in no shard.
    fn conn(max_outbound_bytes: u32, messages_per_sec: u32, message_burst: u32) -> Conn {
        let limits = ConnLimits {
            max_outbound_bytes,
            messages_per_sec,
            message_burst,
            deflate_min: 1024,
        };
        Conn::new(
            ConnId { key: 0, gen: 1 },
            Vsn::V2,
            Rc::new(()),
            None,
            limits,
            0,
            false,
        )
    }

    #[test]
    fn presence_frames_have_their_own_bound_and_leave_it_as_they_are_written() {
        let conn = conn(100, 10, 10);
        let frame = |n: usize| Bytes::from(vec![b'p'; n]);
        // A presence_state ten times the bound queues; so do ordinary frames up to it.
        assert!(conn.push(OutFrame::PresenceOwn(frame(1000))));
        assert!(conn.push(OutFrame::Own(frame(100))));
        assert_eq!(conn.out.borrow().presence_bytes, 1000);
        // Written, the presence leaves its count: only then would more ordinary bytes fit.
        conn.out.borrow_mut().consume(600);
        assert_eq!(
            conn.out.borrow().presence_bytes,
            1000,
            "counted whole until written"
        );
        conn.out.borrow_mut().consume(400);
        assert_eq!(conn.out.borrow().presence_bytes, 0);
        // Past its own bound (16 times), presence cuts a connection off too.
        assert!(conn.push(OutFrame::PresenceShared(Rc::new(frame(1500)))));
        assert!(!conn.push(OutFrame::PresenceShared(Rc::new(frame(200)))));
        assert_eq!(conn.close.get(), Some(close_code::POLICY));
    }

    #[test]
    fn ordinary_frames_over_the_bound_cut_off_even_beside_presence() {
        let conn = conn(100, 10, 10);
        assert!(conn.push(OutFrame::PresenceOwn(Bytes::from(vec![0; 500]))));
        assert!(!conn.push(OutFrame::Own(Bytes::from(vec![0; 101]))));
        assert_eq!(conn.close_why.get(), why::SLOW);
    }

    #[test]
    fn a_connection_fits_a_256_byte_allocation() {
        // `Rc<Conn>` is two counters plus the connection; every idle connection pays
        // for one, so it stays within one 256-byte allocator size class.
        let size = std::mem::size_of::<Conn>() + 2 * std::mem::size_of::<usize>();
        assert!(size <= 256, "Rc<Conn> is {size} bytes");
    }

    #[test]
    fn consume_walks_partial_frames() {
        let mut q = OutQueue::default();
        for s in ["abc", "de", "fghi"] {
            q.bytes += s.len();
            q.frames
                .push_back(OutFrame::Own(Bytes::from_static(s.as_bytes())));
        }
        q.consume(2);
        assert_eq!((q.frames.len(), q.head_written, q.bytes), (3, 2, 7));
        q.consume(3);
        assert_eq!((q.frames.len(), q.head_written, q.bytes), (1, 0, 4));
        q.consume(4);
        assert!(q.frames.is_empty() && q.bytes == 0);
    }

    #[test]
    fn clearing_keeps_a_partly_written_frame() {
        let mut q = OutQueue::default();
        for s in ["abcd", "ef"] {
            q.bytes += s.len();
            q.frames
                .push_back(OutFrame::Own(Bytes::from_static(s.as_bytes())));
        }
        q.consume(1);
        q.clear();
        assert_eq!((q.frames.len(), q.head_written, q.bytes), (1, 1, 3));
        q.consume(3);
        assert!(q.frames.is_empty());
        q.bytes += 2;
        q.frames.push_back(OutFrame::Own(Bytes::from_static(b"gh")));
        q.clear();
        assert_eq!((q.frames.len(), q.head_written, q.bytes), (0, 0, 0));
    }

    #[test]
    fn overflow_closes_with_policy_code() {
        let conn = conn(5, 10, 3);
        conn.enqueue_own(Bytes::from_static(b"1234"));
        assert_eq!(conn.close.get(), None);
        conn.enqueue_own(Bytes::from_static(b"56"));
        assert_eq!(conn.close.get(), Some(close_code::POLICY));
        assert_eq!(conn.queued_bytes(), 0);
        conn.enqueue_own(Bytes::from_static(b"7"));
        assert_eq!(conn.queued_bytes(), 0, "nothing is queued once closing");
        assert_eq!(conn.close_why.get(), why::SLOW);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let conn = conn(1 << 20, 10, 3);
        assert!(conn.take_token(0) && conn.take_token(0) && conn.take_token(0));
        // 100 ms later: one more token at 10/s.
        assert!(conn.take_token(100));
        assert_eq!(conn.close.get(), None);
        assert!(!conn.take_token(100));
        assert_eq!(conn.close.get(), Some(close_code::POLICY));
        assert_eq!(conn.close_why.get(), why::FLOOD);
    }
}
