//! `ringcast-sendpath`: the kernel cost of one small send to each of N loopback
//! sockets, written with one `send` syscall per socket or with batched io_uring
//! submissions (the two write paths of ringcast's flusher), measured in the writer's
//! own CPU time with a reader draining the other ends on another CPU.
//!
//!     ringcast-sendpath [--sockets 5000] [--rounds 200] [--frame 64] [--batch 1024]
//!                       [--writer-cpu 0] [--reader-cpu 1]
//!
//! Prints one JSON line per path (alternating, several times) and the medians.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use io_uring::{opcode, types, IoUring};

#[derive(Parser, Debug)]
struct Cli {
    #[arg(long, default_value_t = 5000)]
    sockets: usize,
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    #[arg(long, default_value_t = 64)]
    frame: usize,
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Alternating repetitions of each path.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    writer_cpu: usize,
    #[arg(long, default_value_t = 1)]
    reader_cpu: usize,
}

fn pin(cpu: usize) {
    // SAFETY: plain syscall on this thread with a valid cpu set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn send_plain(fds: &[i32], frame: &[u8]) -> usize {
    let mut sent = 0;
    for &fd in fds {
        // SAFETY: open socket, live buffer.
        let n = unsafe {
            libc::send(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n == frame.len() as isize {
            sent += 1;
        }
    }
    sent
}

fn send_uring(ring: &mut IoUring, fds: &[i32], frame: &[u8], batch: usize) -> Result<usize> {
    let mut sent = 0;
    for chunk in fds.chunks(batch) {
        for (i, &fd) in chunk.iter().enumerate() {
            let e = opcode::Send::new(types::Fd(fd), frame.as_ptr(), frame.len() as u32)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
            // SAFETY: `frame` outlives the submission, reaped below.
            unsafe { ring.submission().push(&e) }.ok().context("ring full")?;
        }
        ring.submit_and_wait(chunk.len())?;
        for c in ring.completion() {
            if c.result() == frame.len() as i32 {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(cli.sockets);
    let mut readers = Vec::with_capacity(cli.sockets);
    for _ in 0..cli.sockets {
        let w = TcpStream::connect(addr)?;
        let (r, _) = listener.accept()?;
        w.set_nodelay(true)?;
        r.set_nonblocking(true)?;
        writers.push(w);
        readers.push(r);
    }
    let fds: Vec<i32> = writers.iter().map(|w| w.as_raw_fd()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let cpu = cli.reader_cpu;
        std::thread::spawn(move || {
            pin(cpu);
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                for r in readers.iter_mut() {
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }
        })
    };
    pin(cli.writer_cpu);
    let frame = vec![b'x'; cli.frame];
    let mut ring = IoUring::new(cli.batch.next_power_of_two() as u32)?;
    let mut results: Vec<(&str, f64)> = Vec::new();
    for rep in 0..cli.repeats {
        for path in ["send", "io_uring"] {
            let cpu0 = thread_cpu_secs();
            let t0 = Instant::now();
            let mut sent = 0;
            for _ in 0..cli.rounds {
                sent += match path {
                    "send" => send_plain(&fds, &frame),
                    _ => send_uring(&mut ring, &fds, &frame, cli.batch)?,
                };
                // Let the reader catch up so sockets rarely fill.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let cpu = thread_cpu_secs() - cpu0;
            let us = cpu * 1e6 / sent.max(1) as f64;
            println!(
                "{{\"path\":\"{path}\",\"repeat\":{rep},\"sockets\":{},\"sends\":{sent},\"writer_cpu_us_per_send\":{us:.3},\"wall_s\":{:.3}}}",
                cli.sockets,
                t0.elapsed().as_secs_f64()
            );
            results.push((path, us));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let median = |p: &str| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, u) = (median("send"), median("io_uring"));
    println!(
        "{{\"median_us_per_send\":{{\"send\":{s:.3},\"io_uring\":{u:.3}}},\"io_uring_over_send\":{:.3}}}",
        u / s
    );
    let _ = std::io::stdout().flush();
    Ok(())
}
