//! Parked connections: an idle WebSocket keeps no task, no pump and no glommio I/O
//! source, only its [`Conn`] and one readiness poll in a per-core io_uring of our own.
//!
//! A connection's pump is a glommio task, and a task waiting to read holds a glommio
//! `Source` (about 640 bytes with its allocation) on top of the task and pump (about
//! 320). A million idle connections would spend most of their memory on those, so a
//! connection that has sent nothing for [`PARK_AFTER`] and has nothing in flight parks:
//! its socket gets a one-shot `POLL_ADD` in this core's parking ring (the kernel keeps
//! that state), and its task ends. The ring signals an eventfd that one task per core
//! reads through glommio; when a poll fires, or the connection is woken for any other
//! reason (a mail, a close request, a full socket), the dispatcher starts a new pump
//! for it from where it left off. Outbound broadcasts do not unpark anyone: the core's
//! flusher writes to the socket directly (a TLS connection's record layer, kept for it
//! meanwhile, seals them first: [`crate::transport::tls::flush_parked`]).
//!
//! `Config::park_idle` (`RINGCAST_PARK=off` for the binary) turns parking off, for
//! comparisons.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use glommio::io::BufferedFile;
use glommio::net::TcpStream;
use io_uring::{opcode, types, IoUring};

use crate::shard::conn::{self, Conn, ConnId};
use crate::shard::session::Session;
use crate::shard::Shard;
use crate::transport::tls::{self, TlsStream};
use crate::transport::websocket::Pump;

pub(crate) use crate::shard::PARK_AFTER;
/// Submission queue depth of a parking ring (its completion queue is twice that; the
/// kernel keeps overflowing completions and hands them over as the queue drains).
const RING_ENTRIES: u32 = 1024;
/// `user_data` of the removal requests themselves, whose completions are ignored.
const REMOVAL: u64 = u64::MAX;

type Wait = Pin<Box<dyn Future<Output = bool>>>;

/// This core's parking ring and the connections waiting to be unparked.
pub(crate) struct Parking {
    ring: RefCell<IoUring>,
    notify: Rc<BufferedFile>,
    next_seq: Cell<u32>,
}

thread_local! {
    static PARKING: RefCell<Option<Rc<Parking>>> = const { RefCell::new(None) };
}

fn parking() -> Option<Rc<Parking>> {
    PARKING.with(|p| p.borrow().clone())
}

/// Sets up this core's parking ring and its dispatcher task. Without one (io_uring
/// refused, eventfd failed) connections simply never park.
pub(crate) fn install(shard: Rc<Shard>) {
    if !shard.app.config.park_idle {
        tracing::info!("parking off: idle connections keep their tasks");
        return;
    }
    let parking = match Parking::new() {
        Ok(p) => Rc::new(p),
        Err(e) => {
            tracing::warn!("idle connections will not park on this core: {e}");
            return;
        }
    };
    PARKING.with(|p| *p.borrow_mut() = Some(parking.clone()));
    glommio::spawn_local(Dispatcher {
        shard,
        parking,
        wait: None,
    })
    .detach();
}

/// Whether parking works on this core.
pub(crate) fn available() -> bool {
    PARKING.with(|p| p.borrow().is_some())
}

/// Parks `conn`, whose socket is `fd` (owned by the parking from now on); `false` if
/// the poll could not be queued, in which case `fd` is left to the caller.
pub(crate) fn park(shard: &Shard, conn: &Conn, fd: RawFd) -> bool {
    let Some(parking) = parking() else {
        return false;
    };
    let seq = parking.next_seq.get().wrapping_add(1).max(1);
    parking.next_seq.set(seq);
    let poll = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
        .build()
        .user_data(user_data(conn.id, seq));
    if parking.push(&poll).is_err() {
        return false;
    }
    conn.fd.set(fd);
    conn.park_seq.set(seq);
    shard.stats.parked.add(1);
    true
}

fn user_data(id: ConnId, seq: u32) -> u64 {
    (u64::from(id.key) << 32) | u64::from(seq)
}

impl Parking {
    fn new() -> std::io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // Blocking on purpose: glommio's read of it then waits in the kernel for the
        // next completion instead of failing with EAGAIN.
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Err(e) = ring.submitter().register_eventfd(efd) {
            // SAFETY: `efd` is ours and not shared yet.
            unsafe { libc::close(efd) };
            return Err(e);
        }
        // SAFETY: `efd` is an open eventfd owned by nothing else; the file closes it.
        let notify = Rc::new(unsafe { BufferedFile::from_raw_fd(efd) });
        Ok(Parking {
            ring: RefCell::new(ring),
            notify,
            next_seq: Cell::new(0),
        })
    }

    /// Queues one request and submits it.
    fn push(&self, entry: &io_uring::squeue::Entry) -> std::io::Result<()> {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: poll requests reference no user memory.
        if unsafe { ring.submission().push(entry) }.is_err() {
            ring.submit()?;
            // SAFETY: as above.
            unsafe { ring.submission().push(entry) }
                .map_err(|_| std::io::Error::other("parking ring full"))?;
        }
        ring.submit()?;
        Ok(())
    }

    /// Completed polls, as the `user_data` they carried.
    fn completed(&self, into: &mut Vec<u64>) {
        let mut ring = self.ring.borrow_mut();
        loop {
            let before = into.len();
            into.extend(ring.completion().map(|c| c.user_data()));
            if ring.submission().cq_overflow() {
                // Completions the queue had no room for: have the kernel move them in.
                let _ = ring.submit();
                continue;
            }
            if into.len() == before {
                return;
            }
        }
    }
}

/// Restarts a parked connection's pump.
fn unpark(shard: &Rc<Shard>, parking: &Parking, conn: Rc<Conn>, poll_fired: bool) {
    let seq = conn.park_seq.replace(0);
    if seq == 0 {
        return;
    }
    shard.stats.parked.sub(1);
    if !poll_fired {
        // The socket must not stay referenced by a poll once its pump may close it.
        let remove = opcode::PollRemove::new(user_data(conn.id, seq))
            .build()
            .user_data(REMOVAL);
        if let Err(e) = parking.push(&remove) {
            tracing::warn!(conn = ?conn.id, "could not cancel a parked poll: {e}");
        }
    }
    let fd = conn.fd.get();
    // SAFETY: a parked connection's `fd` is an open socket that only the parking
    // owns; the new stream takes it over.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let records = tls::take_parked(&conn);
    let session = Session::new(shard.clone(), conn);
    match records {
        None => {
            glommio::spawn_local(Pump::new(stream, session, Vec::new())).detach();
        }
        Some(records) => {
            let stream = TlsStream::resume(stream, records);
            glommio::spawn_local(Pump::new(stream, session, Vec::new())).detach();
        }
    }
}

/// The per-core task that turns fired polls and wake-ups into running pumps.
struct Dispatcher {
    shard: Rc<Shard>,
    parking: Rc<Parking>,
    wait: Option<Wait>,
}

/// Unparks the connections whose poll fired or that were woken.
fn dispatch(shard: &Rc<Shard>, parking: &Parking) {
    let mut fired = Vec::new();
    parking.completed(&mut fired);
    for data in fired {
        if data == REMOVAL {
            continue;
        }
        let (key, seq) = ((data >> 32) as u32, data as u32);
        let Some(conn) = shard.conn_by_key(key) else {
            continue;
        };
        if conn.park_seq.get() == seq {
            unpark(shard, parking, conn, true);
        }
    }
    for id in conn::take_unparks() {
        if let Some(conn) = shard.conn_by_key(id.key).filter(|c| c.id == id) {
            unpark(shard, parking, conn, false);
        }
    }
}

impl Future for Dispatcher {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        conn::set_unpark_waker(cx.waker());
        loop {
            dispatch(&this.shard, &this.parking);
            let wait = this.wait.get_or_insert_with(|| {
                let notify = this.parking.notify.clone();
                Box::pin(async move { notify.read_at(0, 8).await.is_ok() })
            });
            match wait.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(true) => this.wait = None,
                Poll::Ready(false) => {
                    // The eventfd failed: keep going on the sweeper's calls to `poll_now`.
                    tracing::error!(
                        "the parking ring's eventfd failed; parked connections wake on the sweep"
                    );
                    this.wait = Some(Box::pin(std::future::pending()));
                }
            }
        }
    }
}

/// Unparks whatever is due without waiting for the eventfd (a safety net run by the
/// idle sweep).
pub(crate) fn poll_now(shard: &Rc<Shard>) {
    if let Some(parking) = parking() {
        dispatch(shard, &parking);
    }
}
