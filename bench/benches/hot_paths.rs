//! Microbenchmarks of the hot paths: encoding a broadcast frame, decoding a client
//! message, fanout of one frame to N in-memory subscribers on one core, and one hop
//! across the core mesh.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use ringcast::bench_support::FanoutFixture;
use ringcast::proto::serializer::{decode_text, encode, Outgoing};
use ringcast::proto::{Payload, Vsn};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn payload() -> Payload {
    Payload::Json(json!({"body": "1234:1732300000123456789", "user": "42"}))
}

fn encode_frames(c: &mut Criterion) {
    let p = payload();
    let mut g = c.benchmark_group("encode_broadcast");
    for vsn in [Vsn::V1, Vsn::V2] {
        g.bench_function(format!("{vsn:?}"), |b| {
            b.iter(|| encode(vsn, &Outgoing::broadcast(black_box("bench:fan"), "new_msg", &p)).unwrap())
        });
    }
    g.finish();
}

fn decode_messages(c: &mut Criterion) {
    let frame = br#"["3","17","bench:fan","new_msg",{"body":"1234:1732300000123456789"}]"#;
    c.bench_function("decode_v2_text", |b| {
        b.iter(|| {
            let mut data = frame.to_vec();
            decode_text(Vsn::V2, black_box(&mut data)).unwrap()
        })
    });
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_one_core");
    g.sample_size(10);
    let p = payload();
    for n in [1_000usize, 100_000, 1_000_000] {
        let fixture = FanoutFixture::new(n, 0);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    fixture.broadcast(&p);
                    total += start.elapsed();
                    // Emptying the queues (what the writers do) is not part of fanout.
                    black_box(fixture.drain());
                }
                total
            })
        });
    }
    g.finish();
}

/// The cost of history on a fanout: the same broadcast to the same subscribers on a
/// topic without history and on one that keeps the last 100 (sequenced, kept and
/// carrying its position).
fn fanout_history(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout_history");
    g.sample_size(10);
    let p = payload();
    for n in [1_000usize, 100_000] {
        for (name, fixture) in [
            ("none", FanoutFixture::new(n, 0)),
            ("kept", FanoutFixture::with_history(n, 0, 100)),
        ] {
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        fixture.broadcast(&p);
                        total += start.elapsed();
                        black_box(fixture.drain());
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

fn mesh_hop(c: &mut Criterion) {
    // A round trip core 0 -> core 1 -> core 0 over glommio's SPSC mesh, carrying what a
    // broadcast carries (an Arc of a finished frame); one hop is half of it.
    // Each iteration starts two executors; 2,000 round trips (about 150 ms) amortize
    // that, and 20 samples keep the bench to seconds.
    const ROUNDS: u64 = 2_000;
    let mut g = c.benchmark_group("mesh");
    g.sample_size(20);
    g.bench_function("round_trip", |b| {
        b.iter_custom(|iters| {
            let mesh = MeshBuilder::<Arc<Bytes>, _>::full(2, 1024);
            let frame = Arc::new(Bytes::from_static(b"\x81\x05hello"));
            let rounds = iters * ROUNDS;
            let echo = {
                let mesh = mesh.clone();
                LocalExecutorBuilder::new(Placement::Unbound)
                    .spawn(move || async move {
                        let (tx, mut rx) = mesh.join().await.unwrap();
                        let peer = 1 - tx.peer_id();
                        let (_, rx) = rx.streams().pop().unwrap();
                        for _ in 0..rounds {
                            let m = rx.recv().await.unwrap();
                            tx.send_to(peer, m).await.unwrap();
                        }
                    })
                    .unwrap()
            };
            let driver = LocalExecutorBuilder::new(Placement::Unbound)
                .spawn(move || async move {
                    let (tx, mut rx) = mesh.join().await.unwrap();
                    let peer = 1 - tx.peer_id();
                    let (_, rx) = rx.streams().pop().unwrap();
                    let start = Instant::now();
                    for _ in 0..rounds {
                        tx.send_to(peer, frame.clone()).await.unwrap();
                        black_box(rx.recv().await.unwrap());
                    }
                    start.elapsed()
                })
                .unwrap();
            let elapsed = driver.join().unwrap();
            echo.join().unwrap();
            elapsed / ROUNDS as u32
        })
    });
    g.finish();
}

fn presence_state(c: &mut Criterion) {
    // What a joiner of a 20,000-member topic costs its core: building presence_state.
    use ringcast::proto::presence::{Delta, Meta, Owner, PresenceState};
    let mut state = PresenceState::default();
    for i in 0..20_000u64 {
        let meta = Meta::new(
            json!({"name": format!("user {i}"), "online_at": "1732300000"}),
            format!("F{i:x}").into(),
            None,
            Owner::from_raw(i),
        );
        state.apply(
            "rooms:big",
            &Delta {
                joins: vec![(i.to_string().into(), meta)],
                leaves: vec![],
            },
        );
    }
    c.bench_function("presence_state_20k_members", |b| {
        b.iter(|| black_box(state.list_json("rooms:big")))
    });
}

criterion_group!(
    benches,
    encode_frames,
    decode_messages,
    fanout,
    fanout_history,
    mesh_hop,
    presence_state
);
criterion_main!(benches);
