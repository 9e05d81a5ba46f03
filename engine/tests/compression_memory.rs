//! What `permessage-deflate` costs an idle joined connection, counted exactly: live heap
//! bytes per connection (a counting allocator) with and without compression negotiated,
//! through a real server and real sockets. The issue's bound is 64 bytes more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use ringcast::{Config, Server};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SECRET: &str = "memory-test-secret";
const CONNECTIONS: usize = 400;

fn start() -> SocketAddr {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cores: 1,
        ..Config::default()
    };
    let running = Server::bind(
        config,
        ringcast::seed::UserSocket::new(SECRET),
        ringcast::seed::router(),
    )
    .unwrap()
    .start()
    .unwrap();
    let addr = running.local_addr();
    std::mem::forget(running);
    addr
}

/// Reads until `needle` has arrived; returns what was read.
fn read_until(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// Opens a connection (offering compression or not), joins `bench:idle` and returns it.
fn joined(addr: SocketAddr, i: usize, offer: bool) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token =
        ringcast::proto::token::sign(SECRET.as_bytes(), &format!("u{i}"), ringcast::clock::unix_now());
    let ext = if offer {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    write!(
        s,
        "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    )
    .unwrap();
    let head = String::from_utf8(read_until(&mut s, b"\r\n\r\n")).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(head.contains("permessage-deflate"), offer, "{head}");
    let join = br#"["1","1","bench:idle","phx_join",{}]"#;
    let mut frame = vec![0x81, 0x80 | join.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(join);
    s.write_all(&frame).unwrap();
    read_until(&mut s, b"phx_reply");
    s
}

/// Live heap bytes per idle joined connection on a fresh server.
fn bytes_per_connection(offer: bool) -> f64 {
    let addr = start();
    // Warm the server up (first-use allocations of its core), then measure from here.
    let warm: Vec<_> = (0..20).map(|i| joined(addr, i, offer)).collect();
    let mut held = Vec::with_capacity(CONNECTIONS);
    std::thread::sleep(Duration::from_millis(1500));
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..CONNECTIONS {
        held.push(joined(addr, 100 + i, offer));
    }
    // Idle connections park after a second of silence.
    std::thread::sleep(Duration::from_millis(2500));
    let after = LIVE.load(Ordering::Relaxed);
    drop(warm);
    std::mem::forget(held);
    (after - before) as f64 / CONNECTIONS as f64
}

#[test]
fn an_idle_connection_with_compression_costs_at_most_64_bytes_more() {
    let plain = bytes_per_connection(false);
    let compressed = bytes_per_connection(true);
    eprintln!(
        "live heap per idle joined connection: {plain:.0} B plain, {compressed:.0} B with permessage-deflate"
    );
    assert!(plain > 100.0, "the count sees connections at all ({plain:.0} B)");
    assert!(
        compressed - plain <= 64.0,
        "{compressed:.0} B with compression against {plain:.0} B without"
    );
}
