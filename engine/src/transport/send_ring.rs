//! The flusher's batched write path: one io_uring submission per batch of dirty
//! connections instead of one `send` syscall each.
//!
//! After a fanout, every subscriber with queued frames gets one `SEND` (one frame) or
//! `SENDMSG` (several frames, one iovec each, no copy) request, all submitted with a
//! single `io_uring_enter` that also waits for their completions. Every request carries
//! `MSG_DONTWAIT`, so the kernel completes each one inline: it takes what the socket has
//! room for, or answers `EAGAIN`, and never parks a request on a poll. A socket that
//! could not take everything is left to its connection's own task, which waits for room.
//!
//! `Config::batched_writes` (`RINGCAST_WRITE_PATH=send` for the binary) selects the plain
//! syscall path instead, for comparisons; a core whose ring cannot be set up uses it too.

use std::rc::Rc;

use io_uring::{opcode, types, IoUring};

use crate::shard::conn::Conn;
use crate::shard::Shard;
use crate::transport::tls;
use crate::transport::websocket::IO_CHUNK;

/// Requests per submission.
const RING_ENTRIES: u32 = 1024;
/// Frames per `SENDMSG` at most.
const MAX_IOV: usize = 64;

pub(crate) struct SendRing {
    ring: IoUring,
    /// Per request of the batch being submitted; never reallocated while it is in
    /// flight (capacity reserved up front).
    msgs: Vec<libc::msghdr>,
    iovs: Vec<libc::iovec>,
    /// Per request: the connection (index in the batch) and the bytes asked for.
    asked: Vec<(usize, usize)>,
}

impl SendRing {
    pub(crate) fn new() -> std::io::Result<Self> {
        let entries = RING_ENTRIES as usize;
        Ok(SendRing {
            ring: IoUring::new(RING_ENTRIES)?,
            msgs: Vec::with_capacity(entries),
            iovs: Vec::with_capacity(entries * MAX_IOV),
            asked: Vec::with_capacity(entries),
        })
    }

    /// Writes the queued frames of `batch`; connections that still have frames the
    /// socket took no part of, or that failed, are woken for their own task to go on.
    pub(crate) fn flush(&mut self, shard: &Shard, batch: &[Rc<Conn>]) {
        let mut again = Vec::new();
        for chunk in batch.chunks(RING_ENTRIES as usize) {
            self.flush_chunk(shard, chunk, &mut again);
        }
        // Connections with more queued than one request carried (many frames).
        while !again.is_empty() {
            let round = std::mem::take(&mut again);
            for chunk in round.chunks(RING_ENTRIES as usize) {
                self.flush_chunk(shard, chunk, &mut again);
            }
        }
    }

    fn flush_chunk(&mut self, shard: &Shard, chunk: &[Rc<Conn>], again: &mut Vec<Rc<Conn>>) {
        self.msgs.clear();
        self.iovs.clear();
        self.asked.clear();
        for (i, conn) in chunk.iter().enumerate() {
            conn.dirty.set(false);
            let fd = conn.fd.get();
            if fd < 0 || conn.close.get().is_some() {
                conn.wake();
                continue;
            }
            // A parked TLS connection: sealed and sent on its own.
            if tls::flush_parked(shard, conn, fd) {
                continue;
            }
            let out = conn.out.borrow();
            let start = self.iovs.len();
            let mut bytes = 0;
            for (k, frame) in out.frames.iter().enumerate() {
                let data = if k == 0 {
                    &frame.bytes()[out.head_written as usize..]
                } else {
                    frame.bytes()
                };
                if k > 0 && (k == MAX_IOV || bytes + data.len() > IO_CHUNK) {
                    break;
                }
                self.iovs.push(libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                });
                bytes += data.len();
            }
            let count = self.iovs.len() - start;
            if count == 0 {
                continue;
            }
            let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
            let entry = if count == 1 {
                let iov = self.iovs[start];
                opcode::Send::new(types::Fd(fd), iov.iov_base as *const u8, iov.iov_len as u32)
                    .flags(flags)
                    .build()
            } else {
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = self.iovs[start..].as_mut_ptr();
                msg.msg_iovlen = count;
                self.msgs.push(msg);
                let msg = self.msgs.last().expect("just pushed");
                opcode::SendMsg::new(types::Fd(fd), msg)
                    .flags(flags as u32)
                    .build()
            };
            let entry = entry.user_data(self.asked.len() as u64);
            self.asked.push((i, bytes));
            // SAFETY: the frames, iovecs and msghdrs this request points to stay alive
            // and unmoved until its completion is reaped below (nothing runs between:
            // no await, and the vectors never grow past the capacity reserved for a
            // full chunk).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            debug_assert!(pushed.is_ok(), "a chunk never exceeds the ring");
        }
        let n = self.asked.len();
        if n == 0 {
            return;
        }
        let mut reaped = 0;
        while reaped < n {
            match self.ring.submit_and_wait(n - reaped) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Should not happen; the requests still complete, so wait them out.
                    tracing::warn!("io_uring submit failed: {e}");
                    std::thread::yield_now();
                }
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                let (i, asked) = self.asked[cqe.user_data() as usize];
                let conn = &chunk[i];
                let res = cqe.result();
                if res > 0 {
                    let sent = res as usize;
                    let mut out = conn.out.borrow_mut();
                    let frames = out.consume(sent);
                    shard.stats.bytes_out.add(sent as u64);
                    shard.stats.messages_out.add(frames);
                    if sent < asked {
                        // The socket is full: the connection's task waits for room.
                        drop(out);
                        conn.wake();
                    } else if !out.frames.is_empty() {
                        drop(out);
                        again.push(conn.clone());
                    }
                } else {
                    // EAGAIN, or an error the connection's task will see for itself.
                    conn.wake();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::bench_support::lone_shard;
    use crate::proto::Vsn;
    use crate::shard::app::Config;
    use crate::shard::conn::OutFrame;

    fn shard() -> Rc<Shard> {
        lone_shard(Config {
            max_outbound_bytes: 64 << 20,
            ..Config::default()
        })
    }

    fn connected(shard: &Shard) -> (Rc<Conn>, UnixStream, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let conn = shard.add_conn(Vsn::V2, Rc::new(()), None, false);
        conn.fd.set(ours.as_raw_fd());
        (conn, ours, theirs)
    }

    fn read_all(mut from: &UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn queued_frames_go_out_in_order_in_one_request() {
        let shard = shard();
        let (conn, _ours, theirs) = connected(&shard);
        for frame in ["one", "two", "three"] {
            assert!(conn.push(OutFrame::Own(Bytes::from_static(frame.as_bytes()))));
        }
        let mut ring = SendRing::new().expect("io_uring");
        ring.flush(&shard, std::slice::from_ref(&conn));
        assert_eq!(read_all(&theirs), b"onetwothree");
        assert!(conn.out.borrow().frames.is_empty());
        assert_eq!(conn.out.borrow().bytes, 0);
        assert_eq!(shard.stats.messages_out.get(), 3);
    }

    #[test]
    fn more_frames_than_one_request_carries_go_in_further_rounds_of_the_same_flush() {
        let shard = shard();
        let (conn, _ours, theirs) = connected(&shard);
        let frames: Vec<Bytes> = (0..150u32).map(|i| Bytes::from(format!("<{i}>"))).collect();
        for f in &frames {
            assert!(conn.push(OutFrame::Own(f.clone())));
        }
        let mut ring = SendRing::new().expect("io_uring");
        ring.flush(&shard, std::slice::from_ref(&conn));
        assert_eq!(read_all(&theirs), frames.concat());
        assert!(conn.out.borrow().frames.is_empty());
    }

    #[test]
    fn a_full_socket_keeps_the_rest_queued_from_where_it_stopped() {
        let shard = shard();
        let (conn, _ours, theirs) = connected(&shard);
        let frames: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![b'a' + i; 200_000])).collect();
        for f in &frames {
            assert!(conn.push(OutFrame::Own(f.clone())));
        }
        let mut ring = SendRing::new().expect("io_uring");
        let mut got = Vec::new();
        for _ in 0..1000 {
            ring.flush(&shard, std::slice::from_ref(&conn));
            got.extend(read_all(&theirs));
            if conn.out.borrow().frames.is_empty() {
                break;
            }
        }
        assert_eq!(
            got,
            frames.concat(),
            "every byte once, in order, across partial writes"
        );
        assert_eq!(shard.stats.messages_out.get(), 8);
    }

    #[test]
    fn connections_without_a_socket_or_closing_are_left_to_their_task() {
        let shard = shard();
        let (closing, _ours, theirs) = connected(&shard);
        let socketless = shard.add_conn(Vsn::V2, Rc::new(()), None, false);
        for conn in [&closing, &socketless] {
            assert!(conn.push(OutFrame::Own(Bytes::from_static(b"x"))));
        }
        closing.request_close(1000);
        let mut ring = SendRing::new().expect("io_uring");
        ring.flush(&shard, &[closing.clone(), socketless.clone()]);
        assert!(read_all(&theirs).is_empty());
        assert_eq!(socketless.out.borrow().frames.len(), 1);
    }
}
