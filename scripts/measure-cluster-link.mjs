#!/usr/bin/env node
// Cross-node broadcasts per second through one Redis (issue 17), the Redis link
// pipelined (`--redis-pipeline 256`, the default) against one round trip per broadcast
// (`--redis-pipeline 1`), side by side with local delivery and redis-benchmark, in one
// run on this box.
//
//   node scripts/measure-cluster-link.mjs [--messages N (100000)] [--rounds R (3)] [--history 1]
//                                         [--rate R (20000): the latency run's rate at most]
//                                         [--loadgen 1] [--window W (20000)] [--pin 1]
//
// With `--pin 1` (the default), node A runs on CPU 0 and node B on CPU 1 (`taskset`);
// ringcast pins its executor to the first CPU it may use, so unpinned (`--pin 0`, as
// before the ninth session) both nodes' cores run on CPU 0.
//
// With `--loadgen 1`, the clients are `ringcast-loadgen fanout` (Rust, release build)
// instead of this script's `ws` sockets, which cap near 90,000 messages/s on one Node.js
// thread: its publisher sends through node A (`--publish-url`) and its subscriber and
// sample subscriber listen on node B, so every delivery crosses Redis ("cross"); the
// local comparison publishes through node B itself ("local"). As fast as they go, with
// at most --window in flight, then paced at half the cross-node median (at most
// --rate). The loadgen's own CPU (workers included) is counted beside the nodes' and
// Redis's.
//
// With `--history 1`, the comparison is instead what history costs through Redis: the
// same pipelined link with `bench:link` keeping history (`serve --bench-history`: every
// broadcast is sequenced by Redis's Lua script, and the sender's node delivers it too
// only once Redis published it) against the plain topic.
//
// One redis-server, two `ringcast serve --cores 1 --redis` nodes (release build). A
// publisher on node A sends `new_msg` on `bench:link` as fast as the socket takes them
// (in bursts of 500); one subscriber on node B counts them, and one on node A (local).
// Broadcasts/s = N / (first send to last arrival on B). The latency run sends at a
// fixed rate (half the pipelined throughput, at most --rate: 20,000/s) and reports the p50 and
// p99 of send-to-arrival on B. Loopback only; stops by itself (hard limit 15 min).
// Uses `ws` from tests/e2e/node_modules.

import { spawn, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');
const opts = { messages: 100000, rounds: 3, history: 0, rate: 20000, loadgen: 0, window: 20000, pin: 1 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in opts)) throw new Error(`unknown option ${process.argv[i]}`);
  opts[key] = Number(process.argv[i + 1]);
}
const BIN = process.env.RINGCAST_BIN || path.join(ROOT, 'target', 'release', 'ringcast');
const SECRET = 'link-secret';
const log = (m) => process.stderr.write(`[measure-cluster-link] ${m}\n`);
setTimeout(() => { log('hard limit reached'); process.exit(2); }, 900_000).unref();

const freePort = () => new Promise((resolve) => {
  const s = net.createServer();
  s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
});
function token(user) {
  const claims = Buffer.from(JSON.stringify({ user_id: String(user), iat: Math.floor(Date.now() / 1000) })).toString('base64url');
  return `${claims}.${crypto.createHmac('sha256', SECRET).update(claims).digest('base64url')}`;
}
function waitLine(proc, text) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const t = setTimeout(() => reject(new Error(`no "${text}"`)), 10000);
    const on = (d) => { buf += d; if (buf.includes(text)) { clearTimeout(t); resolve(); } };
    proc.stdout?.on('data', on); proc.stderr?.on('data', on);
  });
}

async function node(redisPort, pipeline, name, history) {
  const port = await freePort();
  const cpu = name === 'a' ? '0' : String(Math.min(1, os.cpus().length - 1));
  const [prog, pre] = opts.pin ? ['taskset', ['-c', cpu, BIN]] : [BIN, []];
  const proc = spawn(prog, [...pre, 'serve', '--listen', `127.0.0.1:${port}`, '--cores', '1', '--secret', SECRET, '--max-rate', '10000000',
    '--max-outbound', '256MiB', '--redis', `redis://127.0.0.1:${redisPort}`, '--cluster-secret', 'c', '--node-name', name,
    '--redis-pipeline', String(pipeline), ...(history ? ['--bench-history'] : [])], { stdio: ['ignore', 'ignore', 'pipe'] });
  // Each node's log, when MEASURE_LOG_DIR names a directory: <dir>/<port>-<name>.log.
  if (process.env.MEASURE_LOG_DIR) proc.stderr.pipe(fs.createWriteStream(path.join(process.env.MEASURE_LOG_DIR, `${port}-${name}.log`)));
  await waitLine(proc, 'Redis link up');
  return { port, proc };
}

function client(port, user, onMsg) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?vsn=2.0.0&token=${token(user)}`, { perMessageDeflate: false });
    ws.on('open', () => ws.send(JSON.stringify(['1', '1', 'bench:link', 'phx_join', {}])));
    let joined = false;
    ws.on('message', (d) => {
      if (!joined) { joined = true; resolve(ws); return; }
      onMsg?.(d);
    });
    ws.on('error', reject);
  });
}

/** The bucket bound (ms) holding the median of a node's `ringcast_fanout_seconds`. */
async function fanoutMedianMs(port) {
  try {
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const buckets = new Map();
    for (const m of text.matchAll(/^ringcast_fanout_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\d+)$/gm)) {
      buckets.set(m[1], (buckets.get(m[1]) || 0) + Number(m[2]));
    }
    const total = buckets.get('+Inf') || 0;
    for (const [le, n] of [...buckets].filter(([k]) => k !== '+Inf').sort((x, y) => Number(x[0]) - Number(y[0]))) {
      if (n >= total / 2) return +(Number(le) * 1000).toFixed(3);
    }
    return null;
  } catch { return null; }
}

/** CPU time (user + system, seconds) a process has used so far, from /proc/PID/stat. */
function cpuSecs(pid) {
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch { return NaN; }
}

async function run({ pipeline, history }, rate) {
  const redisPort = await freePort();
  const redis = spawn('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitLine(redis, 'Ready to accept connections');
  const a = await node(redisPort, pipeline, 'a', history);
  const b = await node(redisPort, pipeline, 'b', history);
  try {
    const n = opts.messages;
    let remote = 0; let local = 0; let lastRemote = 0; let lastLocal = 0;
    const lat = [];
    const latLocal = [];
    const sub = await client(b.port, 'sub', (d) => {
      remote++; lastRemote = performance.now();
      if (rate) { const m = /"body":"(\d+\.\d+)"/.exec(d); if (m) lat.push(performance.now() - Number(m[1])); }
    });
    const loc = await client(a.port, 'loc', (d) => {
      local++; lastLocal = performance.now();
      if (rate) { const m = /"body":"(\d+\.\d+)"/.exec(d); if (m) latLocal.push(performance.now() - Number(m[1])); }
    });
    const pub = await client(a.port, 'pub');
    await sleep(500);
    const procs = [a.proc, b.proc, redis];
    const cpu0 = procs.map((p) => cpuSecs(p.pid));
    const t0 = performance.now();
    for (let i = 0; i < n;) {
      if (rate) {
        const due = Math.min(n, Math.floor(((performance.now() - t0) / 1000) * rate) + 1);
        for (; i < due; i++) pub.send(`["1",null,"bench:link","new_msg",{"body":"${performance.now()}"}]`);
        await sleep(1);
      } else {
        for (let k = 0; k < 500 && i < n; k++, i++) pub.send('["1",null,"bench:link","new_msg",{"body":"x"}]');
        while (pub.bufferedAmount > 1 << 20) await sleep(1);
        await sleep(0);
      }
    }
    const deadline = performance.now() + 60000;
    let still = performance.now(); let seen = -1;
    while ((remote < n || local < n) && performance.now() < deadline) {
      await sleep(50);
      if (remote + local !== seen) { seen = remote + local; still = performance.now(); } else if (performance.now() - still > 3000) break;
    }
    const cpu = procs.map((p, i) => cpuSecs(p.pid) - cpu0[i]);
    // Node B's own part: from the link handing it a broadcast to its frames written.
    const bFanout = await fanoutMedianMs(b.port);
    for (const ws of [sub, loc, pub]) ws.terminate();
    lat.sort((x, y) => x - y);
    latLocal.sort((x, y) => x - y);
    const quantile = (l, p) => (l.length ? +l[Math.min(l.length - 1, Math.floor(p * l.length))].toFixed(2) : null);
    const q = (p) => quantile(lat, p);
    return {
      pipeline, history, messages: n, remote, local,
      remote_per_sec: Math.round(remote / ((lastRemote - t0) / 1000)),
      local_per_sec: Math.round(local / ((lastLocal - t0) / 1000)),
      // The same for the subscriber on node A itself: what the link adds is the difference.
      ...(rate ? {
        rate, p50_ms: q(0.5), p99_ms: q(0.99), local_p50_ms: quantile(latLocal, 0.5), local_p99_ms: quantile(latLocal, 0.99),
        b_fanout_p50_bucket_ms: bFanout,
      } : {}),
      // Deliveries (both subscribers) per CPU-second of the two nodes and Redis.
      cpu_secs: { a: +cpu[0].toFixed(2), b: +cpu[1].toFixed(2), redis: +cpu[2].toFixed(2) },
      deliveries_per_cpu_sec: Math.round((remote + local) / (cpu[0] + cpu[1] + cpu[2])),
    };
  } finally {
    for (const p of [a.proc, b.proc, redis]) p.kill('SIGKILL');
  }
}

/** CPU (user + system, seconds) of an exited child and the children it waited for. */
function cpuSecsWithChildren(pid) {
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14])) / 100;
  } catch { return NaN; }
}

/** One `ringcast-loadgen fanout` run on a fresh Redis and two nodes: `cross` publishes
 * through node A and subscribes on node B; `local` does both on node B. */
async function runLoadgen(variant, rate) {
  const redisPort = await freePort();
  // Above 150,000 broadcasts/s a subscriber connection falls behind by Redis's default
  // pub/sub output limit (32 MB, or 8 MB for 60 s) within a fraction of a second when
  // its node's CPU is busy: node A hears its own broadcasts back, and on this 2-CPU box
  // its reader shares CPU 0 with the node and the publisher. Redis then cuts the
  // connection, and the link's session ends (its loss counted). Operators raise the limit
  // for such rates; so does this run.
  const redis = spawn('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--client-output-buffer-limit', 'pubsub 512mb 256mb 60'], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitLine(redis, 'Ready to accept connections');
  const a = await node(redisPort, 256, 'a', false);
  const b = await node(redisPort, 256, 'b', false);
  const out = path.join(os.tmpdir(), `measure-cluster-link-${process.pid}.json`);
  try {
    const procs = [a.proc, b.proc, redis];
    const cpu0 = procs.map((p) => cpuSecs(p.pid));
    const lgBin = path.join(path.dirname(BIN), 'ringcast-loadgen');
    const args = ['fanout', '--url', `ws://127.0.0.1:${b.port}`, '-n', '1', '-m', String(opts.messages), '--topic', 'bench:link',
      ...(variant === 'cross' ? ['--publish-url', `ws://127.0.0.1:${a.port}`] : []),
      ...(rate ? ['--rate', String(rate)] : ['--window', String(opts.window)]),
      '--publish-timeout', '120s', '--quiet', '--json', out];
    const lg = spawn(lgBin, args, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RINGCAST_SECRET: SECRET } });
    let err = '';
    lg.stderr.on('data', (d) => { err += d; });
    // The loadgen's CPU (its workers' included, once it has waited for them), sampled
    // every 20 ms while it runs: the last sample misses at most its final 20 ms, so
    // the figure is a lower bound.
    const cpuLg = await new Promise((resolve) => {
      let last = NaN;
      const t = setInterval(() => { const c = cpuSecsWithChildren(lg.pid); if (!Number.isNaN(c)) last = c; }, 20);
      lg.on('exit', () => { clearInterval(t); resolve(last); });
    });
    const cpu = procs.map((p, i) => cpuSecs(p.pid) - cpu0[i]);
    const r = JSON.parse(fs.readFileSync(out, 'utf8'));
    const total = cpu[0] + cpu[1] + cpu[2];
    return {
      variant, rate: rate || null, sent: r.sent, deliveries: r.deliveries, loss: r.loss, reorders: r.reorders,
      duplicates: r.duplicates, per_sec: Math.round(r.deliveries_per_sec),
      p50_ms: +(r.latency.p50_us / 1000).toFixed(2), p99_ms: +(r.latency.p99_us / 1000).toFixed(2),
      cpu_secs: { a: +cpu[0].toFixed(2), b: +cpu[1].toFixed(2), redis: +cpu[2].toFixed(2), loadgen_lower_bound: +cpuLg.toFixed(2) },
      // Deliveries per CPU-second of the two nodes and Redis (the clients' CPU apart).
      deliveries_per_cpu_sec: Math.round(r.deliveries / total),
      ...(r.loss !== 0 || r.problems?.length ? { problems: r.problems, stderr_tail: err.slice(-400) } : {}),
    };
  } finally {
    for (const p of [a.proc, b.proc, redis]) p.kill('SIGKILL');
    fs.rmSync(out, { force: true });
  }
}

/** redis-benchmark's PUBLISH, unpipelined and -P 64, against a redis-server of its own. */
async function redisBenchmark() {
  const benchPort = await freePort();
  const benchRedis = spawn('redis-server', ['--port', String(benchPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'pipe'] });
  await waitLine(benchRedis, 'Ready to accept connections');
  const runs = ['1', '64'].map((p) => spawnSync('redis-benchmark',
    ['-p', String(benchPort), '-q', '-n', p === '1' ? '200000' : '1000000', '-P', p, 'PUBLISH', 'ringcast:t:bench:link', 'hello'], { encoding: 'utf8' }));
  benchRedis.kill('SIGKILL');
  return runs;
}

if (opts.loadgen) {
  const bench = await redisBenchmark();
  const rep = { host: os.hostname(), cpus: os.cpus().length, options: opts, client: 'ringcast-loadgen fanout', throughput: [], latency: [] };
  for (let r = 0; r < opts.rounds; r++) {
    for (const v of ['cross', 'local']) {
      const x = await runLoadgen(v, 0);
      log(JSON.stringify(x));
      rep.throughput.push(x);
    }
  }
  const med = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
  rep.median_per_sec = Object.fromEntries(['cross', 'local'].map((v) => [v, med(rep.throughput.filter((x) => x.variant === v).map((x) => x.per_sec))]));
  const half = Math.min(opts.rate, Math.round(rep.median_per_sec.cross / 2));
  for (const v of ['cross', 'local']) {
    const x = await runLoadgen(v, half);
    log(JSON.stringify(x));
    rep.latency.push(x);
  }
  rep.redis_benchmark_publish = bench.map((b) => (b.stdout || '').split('\r').pop().trim() || String(b.error || b.stderr));
  process.stdout.write(`${JSON.stringify(rep, null, 2)}\n`);
  process.exit(0);
}

const report = { host: os.hostname(), cpus: os.cpus().length, options: opts, throughput: [], latency: [] };
const bench = await redisBenchmark();
const variants = opts.history
  ? [{ pipeline: 256, history: false, name: 'plain' }, { pipeline: 256, history: true, name: 'history' }]
  : [{ pipeline: 256, history: false, name: '256' }, { pipeline: 1, history: false, name: '1' }];
for (let r = 0; r < opts.rounds; r++) {
  for (const v of variants) {
    const x = { variant: v.name, ...await run(v, 0) };
    log(JSON.stringify(x));
    report.throughput.push(x);
  }
}
const med = (xs) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
const piped = med(report.throughput.filter((x) => x.variant === variants[0].name).map((x) => x.remote_per_sec));
const rate = Math.min(opts.rate, Math.round(piped / 2));
for (const v of variants) {
  const x = { variant: v.name, ...await run(v, rate) };
  log(JSON.stringify(x));
  report.latency.push(x);
}
report.redis_benchmark_publish = bench.map((b) => (b.stdout || '').split('\r').pop().trim() || String(b.error || b.stderr));
report.median_remote_per_sec = Object.fromEntries(variants.map((v) => [v.name, med(report.throughput.filter((x) => x.variant === v.name).map((x) => x.remote_per_sec))]));
report.median_deliveries_per_cpu_sec = Object.fromEntries(variants.map((v) => [v.name, med(report.throughput.filter((x) => x.variant === v.name).map((x) => x.deliveries_per_cpu_sec))]));
report.median_local_per_sec = Object.fromEntries(variants.map((v) => [v.name, med(report.throughput.filter((x) => x.variant === v.name).map((x) => x.local_per_sec))]));
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
process.exit(0);
