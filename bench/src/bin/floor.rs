//! `ringcast-floor`: the kernel's limit on this box, as a server the loadgen can drive.
//!
//! It speaks just enough of the seed app's `bench:*` protocol to be measured through the
//! same loadgen as ringcast: it accepts WebSocket upgrades (httparse and tungstenite's
//! `derive_accept_key`; the token is not checked, only its user id is read), answers
//! `phx_join` on `bench:*` and `heartbeat` with the ok reply, and on `new_msg` builds the
//! broadcast frame once (the same bytes ringcast sends, through
//! `ringcast::proto::serializer::encode`) and writes it to every member of the topic.
//!
//! Nothing else: thread-per-core on plain edge-triggered **epoll** (no io_uring, no
//! runtime, no tasks), one SO_REUSEPORT listener per core (as ringcast binds), each
//! thread pinned to one CPU of the process's affinity mask. A broadcast that arrives on
//! one core reaches the others through a mutex-guarded inbox and an eventfd. Writes are
//! plain non-blocking `write`/`writev` per socket; frames queued for a socket during
//! one pass of the event loop go out in a single `writev` at the end of the pass (the
//! same coalescing ringcast's pump does when several frames are pending), and a socket
//! whose buffer is full waits for EPOLLOUT.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use ringcast::proto::serializer::{decode_text, encode, Outgoing};
use ringcast::proto::ws::{close_frame, pong_frame, FrameReader, Parsed, WsMessage};
use ringcast::proto::{Payload, Vsn};
use socket2::{Domain, Protocol, Socket, Type};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Read buffer of a core, and the most bytes one `writev` carries.
const IO_CHUNK: usize = 64 * 1024;
/// Most frames one `writev` carries.
const MAX_IOV: usize = 64;
const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

#[derive(Parser)]
#[command(
    name = "ringcast-floor",
    about = "Minimal epoll fanout server: the kernel's floor"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4601")]
    listen: SocketAddr,
    /// Threads (one per core, each pinned).
    #[arg(long, default_value_t = 1)]
    cores: usize,
}

/// Broadcasts (topic, frame) waiting for a core.
type Inbox = Mutex<Vec<(Arc<str>, Bytes)>>;

/// Cross-core delivery: one inbox and one eventfd per core.
struct Mesh {
    inboxes: Vec<Inbox>,
    wake: Vec<RawFd>,
}

struct Conn {
    fd: RawFd,
    upgraded: bool,
    user: Box<str>,
    /// Bytes of an incomplete request or frame.
    partial: Vec<u8>,
    reader: FrameReader,
    /// Joined topics and this connection's index in each topic's member list.
    joined: Vec<(Arc<str>, usize)>,
    out: VecDeque<Bytes>,
    head_written: usize,
    /// The socket said EAGAIN; wait for EPOLLOUT.
    blocked: bool,
    dirty: bool,
}

/// Per broadcast and core: nanoseconds from taking the broadcast in (the `new_msg`
/// parsed, or the inbox drained) to the end of the write pass that sent it to every
/// local member, and how many members that was. Printed on SIGTERM as `floor-stats`.
type WriteTimes = Arc<Mutex<Vec<(u64, u64)>>>;

struct Core {
    index: usize,
    stats: WriteTimes,
    /// Broadcasts taken in during this pass: (when, local members).
    pending: Vec<(Instant, u64)>,
    ep: RawFd,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    topics: HashMap<Arc<str>, Vec<usize>>,
    dirty: Vec<usize>,
    mesh: Arc<Mesh>,
    rbuf: Vec<u8>,
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn epoll_add(ep: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: valid fds and a valid event struct.
    if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn listener(addr: SocketAddr) -> io::Result<RawFd> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into_raw_fd())
}

impl Core {
    fn conn(&mut self, slot: usize) -> Option<&mut Conn> {
        self.conns.get_mut(slot).and_then(Option::as_mut)
    }

    fn accept_all(&mut self, lfd: RawFd) {
        loop {
            // SAFETY: accept4 on a listening socket; no peer address wanted.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                match errno() {
                    libc::EINTR | libc::ECONNABORTED => continue,
                    // EAGAIN, or out of fds (EMFILE): try again on the next event.
                    _ => return,
                }
            }
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a c_int option value.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let slot = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            self.conns[slot] = Some(Conn {
                fd,
                upgraded: false,
                user: "anonymous".into(),
                partial: Vec::new(),
                reader: FrameReader::new(1 << 20),
                joined: Vec::new(),
                out: VecDeque::new(),
                head_written: 0,
                blocked: false,
                dirty: false,
            });
            let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            if epoll_add(self.ep, fd, events, slot as u64).is_err() {
                self.close(slot);
            }
        }
    }

    fn close(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        for (topic, at) in conn.joined {
            let Some(members) = self.topics.get_mut(&topic) else {
                continue;
            };
            members.swap_remove(at);
            if let Some(&moved) = members.get(at) {
                if let Some(m) = self.conns[moved].as_mut() {
                    if let Some(entry) = m.joined.iter_mut().find(|(t, _)| *t == topic) {
                        entry.1 = at;
                    }
                }
            }
            if members.is_empty() {
                self.topics.remove(&topic);
            }
        }
        // SAFETY: the fd is ours; closing it also removes it from the epoll set.
        unsafe { libc::close(conn.fd) };
        self.free.push(slot);
    }

    fn enqueue(&mut self, slot: usize, frame: Bytes) {
        let Some(conn) = self.conn(slot) else { return };
        conn.out.push_back(frame);
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Queues `frame` to every local member of `topic`.
    fn deliver_local(&mut self, topic: &str, frame: &Bytes) {
        let Core {
            topics, conns, dirty, ..
        } = self;
        let Some(members) = topics.get(topic) else { return };
        self.pending.push((Instant::now(), members.len() as u64));
        for &slot in members {
            if let Some(conn) = conns[slot].as_mut() {
                conn.out.push_back(frame.clone());
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(slot);
                }
            }
        }
    }

    fn broadcast(&mut self, topic: &str, frame: Bytes) {
        let shared: Arc<str> = Arc::from(topic);
        for (i, inbox) in self.mesh.inboxes.iter().enumerate() {
            if i == self.index {
                continue;
            }
            let was_empty = {
                let mut q = inbox.lock().expect("inbox lock");
                let was_empty = q.is_empty();
                q.push((shared.clone(), frame.clone()));
                was_empty
            };
            if was_empty {
                let one: u64 = 1;
                // SAFETY: writing 8 bytes to an eventfd.
                unsafe { libc::write(self.mesh.wake[i], (&one as *const u64).cast(), 8) };
            }
        }
        self.deliver_local(topic, &frame);
    }

    fn drain_inbox(&mut self) {
        let mut n = 0u64;
        // SAFETY: reading the 8-byte counter of our non-blocking eventfd.
        unsafe { libc::read(self.mesh.wake[self.index], (&mut n as *mut u64).cast(), 8) };
        let batch = std::mem::take(&mut *self.mesh.inboxes[self.index].lock().expect("inbox lock"));
        for (topic, frame) in batch {
            self.deliver_local(&topic, &frame);
        }
    }

    fn read(&mut self, slot: usize) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        while let Some(conn) = self.conn(slot) {
            let fd = conn.fd;
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::read(fd, rbuf.as_mut_ptr().cast(), rbuf.len()) };
            if n == 0 {
                self.close(slot);
                break;
            }
            if n < 0 {
                match errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => break,
                    _ => {
                        self.close(slot);
                        break;
                    }
                }
            }
            let n = n as usize;
            let mut partial = std::mem::take(&mut conn.partial);
            if partial.is_empty() {
                let used = self.process(slot, &mut rbuf[..n]);
                if used < n {
                    if let Some(conn) = self.conn(slot) {
                        conn.partial.extend_from_slice(&rbuf[used..n]);
                    }
                }
            } else {
                partial.extend_from_slice(&rbuf[..n]);
                let used = self.process(slot, &mut partial);
                partial.drain(..used);
                if let Some(conn) = self.conn(slot) {
                    conn.partial = partial;
                }
            }
        }
        self.rbuf = rbuf;
    }

    /// Handles the complete requests and frames at the front of `buf`; returns the
    /// bytes used.
    fn process(&mut self, slot: usize, buf: &mut [u8]) -> usize {
        let mut at = 0;
        if !self.conn(slot).is_some_and(|c| c.upgraded) {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let len = match req.parse(buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return 0,
                Err(_) => {
                    self.close(slot);
                    return buf.len();
                }
            };
            let key = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|h| h.value);
            let Some(key) = key else {
                let _ = self.write_now(slot, b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                self.close(slot);
                return buf.len();
            };
            let accept = tungstenite::handshake::derive_accept_key(key);
            let query = req.path.and_then(|p| p.split_once('?')).map_or("", |(_, q)| q);
            let user = ringcast_bench::user_from_query(query);
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            );
            if let Some(conn) = self.conn(slot) {
                conn.upgraded = true;
                conn.user = user.into();
            }
            self.enqueue(slot, Bytes::from(response));
            at = len;
        }
        while at < buf.len() {
            let Some(conn) = self.conn(slot) else {
                return buf.len();
            };
            let (consumed, message) = match conn.reader.read(&mut buf[at..]) {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::Frame { consumed, message }) => (consumed, message),
                Err(_) => {
                    self.close(slot);
                    return buf.len();
                }
            };
            at += consumed;
            match message {
                None | Some(WsMessage::Pong) | Some(WsMessage::Binary(_)) => {}
                Some(WsMessage::Ping(p)) => self.enqueue(slot, pong_frame(p)),
                Some(WsMessage::Close(_)) => {
                    let _ = self.write_now(slot, &close_frame(1000, ""));
                    self.close(slot);
                    return buf.len();
                }
                Some(WsMessage::Text(mut text)) => match decode_text(Vsn::V2, text.as_mut_slice()) {
                    Ok(msg) => self.handle(slot, msg),
                    Err(_) => {
                        self.close(slot);
                        return buf.len();
                    }
                },
            }
        }
        at
    }

    fn reply(&mut self, slot: usize, msg: &ringcast::proto::Message, status: &str, response: &Payload) {
        let frame = encode(
            Vsn::V2,
            &Outgoing::reply(
                msg.join_ref.as_ref(),
                msg.msg_ref.as_ref(),
                &msg.topic,
                status,
                response,
            ),
        )
        .expect("JSON replies encode");
        self.enqueue(slot, frame);
    }

    fn handle(&mut self, slot: usize, msg: ringcast::proto::Message) {
        match (msg.topic.as_str(), msg.event.as_str()) {
            ("phoenix", "heartbeat") => self.reply(slot, &msg, "ok", &Payload::empty()),
            (topic, "phx_join") if topic.starts_with("bench:") => {
                let Core { topics, conns, .. } = self;
                let Some(conn) = conns[slot].as_mut() else { return };
                if !conn.joined.iter().any(|(t, _)| &**t == topic) {
                    let key: Arc<str> = match topics.get_key_value(topic) {
                        Some((k, _)) => k.clone(),
                        None => Arc::from(topic),
                    };
                    let members = topics.entry(key.clone()).or_default();
                    conn.joined.push((key, members.len()));
                    members.push(slot);
                }
                self.reply(slot, &msg, "ok", &Payload::empty());
            }
            (_, "phx_join") => {
                let reason = Payload::from(serde_json::json!({"reason": "unmatched topic"}));
                self.reply(slot, &msg, "error", &reason);
            }
            (topic, "new_msg") => {
                let Some(conn) = self.conn(slot) else { return };
                if !conn.joined.iter().any(|(t, _)| &**t == topic) {
                    return;
                }
                let Some(body) = msg.payload.str_field("body") else {
                    return;
                };
                let payload = Payload::from(serde_json::json!({"body": body, "user": &*conn.user}));
                let frame = encode(Vsn::V2, &Outgoing::broadcast(topic, "new_msg", &payload))
                    .expect("JSON broadcasts encode");
                self.broadcast(topic, frame);
            }
            _ => {}
        }
    }

    /// One direct write (for a last frame before closing).
    fn write_now(&mut self, slot: usize, data: &[u8]) -> isize {
        let Some(conn) = self.conn(slot) else { return -1 };
        // SAFETY: writing our own bytes to our own socket.
        unsafe { libc::write(conn.fd, data.as_ptr().cast(), data.len()) }
    }

    fn writable(&mut self, slot: usize) {
        let Some(conn) = self.conn(slot) else { return };
        conn.blocked = false;
        if !conn.out.is_empty() && !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Writes every queued frame of every dirty socket: one `writev` of all pending
    /// frames (up to 64 frames / 64 KiB) per call, until the queue is empty or EAGAIN.
    fn flush_dirty(&mut self) {
        self.flush_pass();
        if !self.pending.is_empty() {
            let mut stats = self.stats.lock().expect("stats lock");
            for (t, n) in self.pending.drain(..) {
                stats.push((t.elapsed().as_nanos() as u64, n));
            }
        }
    }

    fn flush_pass(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_IOV);
        for &slot in &dirty {
            let mut failed = false;
            if let Some(conn) = self.conns[slot].as_mut() {
                conn.dirty = false;
                while !conn.blocked && !conn.out.is_empty() {
                    iov.clear();
                    let mut bytes = 0;
                    for (i, frame) in conn.out.iter().enumerate() {
                        let data = if i == 0 {
                            &frame[conn.head_written..]
                        } else {
                            &frame[..]
                        };
                        if i > 0 && (iov.len() == MAX_IOV || bytes + data.len() > IO_CHUNK) {
                            break;
                        }
                        bytes += data.len();
                        iov.push(libc::iovec {
                            iov_base: data.as_ptr() as *mut libc::c_void,
                            iov_len: data.len(),
                        });
                    }
                    // SAFETY: the iovecs point into frames the queue keeps alive.
                    let n = unsafe {
                        if iov.len() == 1 {
                            libc::write(conn.fd, iov[0].iov_base, iov[0].iov_len)
                        } else {
                            libc::writev(conn.fd, iov.as_ptr(), iov.len() as libc::c_int)
                        }
                    };
                    if n < 0 {
                        match errno() {
                            libc::EINTR => continue,
                            libc::EAGAIN => conn.blocked = true,
                            _ => failed = true,
                        }
                        break;
                    }
                    let mut n = n as usize;
                    while n > 0 {
                        let left = conn.out[0].len() - conn.head_written;
                        if n >= left {
                            n -= left;
                            conn.head_written = 0;
                            conn.out.pop_front();
                        } else {
                            conn.head_written += n;
                            n = 0;
                        }
                    }
                }
                if conn.out.is_empty() && conn.out.capacity() > 16 {
                    conn.out = VecDeque::new();
                }
            }
            if failed {
                self.close(slot);
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }
}

fn run_core(
    index: usize,
    cpu: Option<usize>,
    lfd: RawFd,
    mesh: Arc<Mesh>,
    stats: WriteTimes,
) -> io::Result<()> {
    if let Some(cpu) = cpu {
        ringcast_bench::pin_current_thread(cpu);
    }
    // SAFETY: plain syscalls creating our own epoll instance.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    epoll_add(ep, lfd, libc::EPOLLIN as u32, LISTENER)?;
    epoll_add(ep, mesh.wake[index], libc::EPOLLIN as u32, WAKE)?;
    let mut core = Core {
        index,
        stats,
        pending: Vec::new(),
        ep,
        conns: Vec::new(),
        free: Vec::new(),
        topics: HashMap::new(),
        dirty: Vec::new(),
        mesh,
        rbuf: vec![0; IO_CHUNK],
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        // SAFETY: the events buffer holds 1024 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        for ev in &events[..n as usize] {
            let (flags, token) = (ev.events, ev.u64);
            match token {
                LISTENER => core.accept_all(lfd),
                WAKE => core.drain_inbox(),
                slot => {
                    let slot = slot as usize;
                    let read_mask =
                        (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
                    if flags & libc::EPOLLOUT as u32 != 0 {
                        core.writable(slot);
                    }
                    if flags & read_mask != 0 {
                        core.read(slot);
                    }
                }
            }
        }
        core.flush_dirty();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = args.cores.max(1);
    let cpus = ringcast_bench::allowed_cpus();
    let mut wake = Vec::new();
    let mut listeners = Vec::new();
    for _ in 0..cores {
        // SAFETY: creating a non-blocking eventfd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        anyhow::ensure!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        wake.push(fd);
        listeners.push(listener(args.listen)?);
    }
    let mesh = Arc::new(Mesh {
        inboxes: (0..cores).map(|_| Mutex::new(Vec::new())).collect(),
        wake,
    });
    let stats: WriteTimes = Arc::default();
    let _threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, lfd)| {
            let mesh = mesh.clone();
            let stats = stats.clone();
            let cpu = (cpus.len() > 1).then(|| cpus[i % cpus.len()]);
            std::thread::Builder::new()
                .name(format!("floor-{i}"))
                .spawn(move || {
                    if let Err(e) = run_core(i, cpu, lfd, mesh, stats) {
                        eprintln!("core {i}: {e}");
                        std::process::exit(1);
                    }
                })
                .expect("spawn core thread")
        })
        .collect();
    eprintln!(
        "ringcast-floor listening on {} with {cores} core(s) (epoll)",
        args.listen
    );
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    signals.forever().next();
    print_stats(&stats.lock().expect("stats lock"));
    std::process::exit(0);
}

/// One line on stderr: `floor-stats {"broadcasts":..,"write_us":{p50,p90,p99,p999,max},..}`,
/// over the broadcasts that reached the largest member count seen (the fanout ones).
fn print_stats(times: &[(u64, u64)]) {
    let most = times.iter().map(|t| t.1).max().unwrap_or(0);
    let mut ns: Vec<u64> = times.iter().filter(|t| t.1 == most).map(|t| t.0).collect();
    ns.sort_unstable();
    let q = |p: f64| {
        if ns.is_empty() {
            0.0
        } else {
            ns[((ns.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
        }
    };
    let line = serde_json::json!({
        "broadcasts": ns.len(),
        "members": most,
        "write_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": q(1.0)},
    });
    eprintln!("floor-stats {line}");
}
