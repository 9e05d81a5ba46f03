//! The core's flusher: one task that writes every connection the fanout left with queued
//! frames ([`Shard::poll_dirty`]), through the batched io_uring path ([`SendRing`]) or,
//! with `Config::batched_writes` off or no ring, one `send` per connection.

use std::cell::RefCell;
use std::rc::Rc;

use crate::shard::conn::Conn;
use crate::shard::Shard;
use crate::transport::send_ring::SendRing;
use crate::transport::tls;
use crate::transport::websocket::{IO_CHUNK, WRITE_BUF};

/// Runs this core's flusher for as long as the core runs.
pub(crate) async fn run(shard: Rc<Shard>) {
    let mut ring = if shard.app.config.batched_writes {
        SendRing::new()
            .inspect_err(|e| tracing::warn!("batched writes off on this core: {e}"))
            .ok()
    } else {
        None
    };
    loop {
        let batch = std::future::poll_fn(|cx| shard.poll_dirty(cx)).await;
        for chunk in batch.chunks(1024) {
            match ring.as_mut() {
                Some(ring) => ring.flush(&shard, chunk),
                None => chunk.iter().for_each(|conn| flush_direct(&shard, conn)),
            }
            glommio::yield_if_needed().await;
        }
        if let Some(since) = shard.take_fanout_since() {
            let now = crate::clock::unix_nanos() / 1000;
            shard.stats.fanout_latency.observe_us(now.saturating_sub(since));
        }
        shard.recycle_dirty(batch);
    }
}

/// Writes a connection's queued frames straight to its socket; anything the socket
/// cannot take now is left to the connection's own task, which waits for room.
fn flush_direct(shard: &Shard, conn: &Conn) {
    conn.dirty.set(false);
    let fd = conn.fd.get();
    if fd < 0 || conn.close.get().is_some() {
        conn.wake();
        return;
    }
    if tls::flush_parked(shard, conn, fd) {
        return;
    }
    loop {
        let mut out = conn.out.borrow_mut();
        let sent = WRITE_BUF.with(|buf: &RefCell<Vec<u8>>| {
            out.next_write(&mut buf.borrow_mut(), IO_CHUNK, |bytes| {
                // SAFETY: `fd` is the connection's open socket (its pump resets it to -1
                // before the socket closes) and `bytes` is a live, initialised slice.
                unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                }
            })
        });
        match sent {
            None => return,
            Some(n) if n > 0 => {
                let frames = out.consume(n as usize);
                shard.stats.bytes_out.add(n as u64);
                shard.stats.messages_out.add(frames);
            }
            Some(_) => {
                // Full (EAGAIN) or failing: the pump waits for room or sees the error.
                drop(out);
                conn.wake();
                return;
            }
        }
    }
}
