#!/usr/bin/env node
// Measures what presence costs in `ringcast serve --cores 2`: server memory per member
// connection with and without a tracked presence, and how long one more join takes to
// reach every member as a presence_diff.
//
//   node scripts/measure-presence.mjs [--members N] [--batch B] [--json-only]
//   RINGCAST_BIN=/path/to/ringcast node scripts/measure-presence.mjs
//
// For each of `bench:measure` (no presence) and `rooms:measure` (presence) it starts a
// fresh server, samples its RSS (/proc/PID/status VmRSS), opens N raw `ws` connections
// (V2 JSON frames, not the phoenix client) that join the topic, ramped in batches of B,
// waits until the server has gone quiet, samples RSS again, then lets one more connection
// join and records, per member connection, when a frame containing the new key arrived.
// Members answer nothing; they send a heartbeat every 20 s. Everything is on 127.0.0.1.
// The JSON report goes to stdout, progress to stderr. Exits by itself (hard limit 170 s).
//
// Uses `ws` from tests/e2e/node_modules (run `npm ci` there first).

import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(REPO_ROOT, 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

const MAX_MEMBERS = 12000; // this process may hold at most 20,000 open files
const HARD_LIMIT_MS = 170_000;
const HEARTBEAT_MS = 20_000;

function parseArgs(argv) {
  const opts = { members: 10000, batch: 250, quietMs: 1000, settleMaxMs: 60_000, diffWaitMs: 15_000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--members') opts.members = Number(val());
    else if (a === '--batch') opts.batch = Number(val());
    else if (a === '--quiet-ms') opts.quietMs = Number(val());
    else if (a === '-h' || a === '--help') {
      process.stderr.write('usage: node scripts/measure-presence.mjs [--members N (<= 12000)] [--batch B] [--quiet-ms MS]\n');
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  if (!Number.isInteger(opts.members) || opts.members < 1 || opts.members > MAX_MEMBERS) {
    throw new Error(`--members must be an integer in 1..${MAX_MEMBERS}`);
  }
  if (!Number.isInteger(opts.batch) || opts.batch < 1) throw new Error('--batch must be a positive integer');
  return opts;
}

function defaultBin() {
  if (process.env.RINGCAST_BIN) return process.env.RINGCAST_BIN;
  const release = path.join(REPO_ROOT, 'target', 'release', 'ringcast');
  if (fs.existsSync(release)) return release;
  return path.join(REPO_ROOT, 'target', 'debug', 'ringcast');
}

const log = (msg) => process.stderr.write(`[measure ${((performance.now()) / 1000).toFixed(1)}s] ${msg}\n`);

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

const SECRET = `measure-${crypto.randomBytes(6).toString('hex')}`;

function mintToken(userId) {
  const claims = Buffer.from(JSON.stringify({ user_id: String(userId), iat: Math.floor(Date.now() / 1000) })).toString('base64url');
  const sig = crypto.createHmac('sha256', SECRET).update(claims).digest('base64url');
  return `${claims}.${sig}`;
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const liveProcs = new Set();

async function startServer(bin) {
  const port = await freePort();
  const argv = ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '2', '--secret', SECRET];
  const env = { ...process.env, NO_COLOR: '1' };
  delete env.RINGCAST_SECRET;
  delete env.RINGCAST_API_KEY;
  const proc = spawn(bin, argv, { stdio: ['ignore', 'pipe', 'pipe'], env });
  liveProcs.add(proc);
  let tail = '';
  const keep = (buf) => { tail = (tail + buf.toString('utf8')).slice(-8000); };
  proc.stdout.on('data', keep);
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => { liveProcs.delete(proc); resolve(signal || code); }));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`ringcast did not listen within 10 s:\n${tail}`)), 10_000);
    proc.on('error', (e) => { clearTimeout(timer); reject(e); });
    proc.on('exit', () => { clearTimeout(timer); reject(new Error(`ringcast exited before listening:\n${tail}`)); });
    proc.stderr.on('data', (buf) => {
      keep(buf);
      if (tail.includes('listening on')) { clearTimeout(timer); resolve(); }
    });
  });
  return {
    port,
    proc,
    tail: () => tail,
    async stop() {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(t);
    },
  };
}

function rssKb(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = status.match(/^VmRSS:\s+(\d+)\s+kB/m);
  return m ? Number(m[1]) : null;
}

// ---------------------------------------------------------------------------
// Raw member connections
// ---------------------------------------------------------------------------

/**
 * One raw V2 connection. It parses frames only until its join is answered; afterwards it
 * just counts bytes and, while `watchFor` is set, records when a frame containing that
 * string first arrived.
 */
class Member {
  constructor(port, userId, topic, stats) {
    this.userId = userId;
    this.topic = topic;
    this.stats = stats;
    this.core = undefined;
    this.joinStatus = null;
    this.sawAt = null;
    this.ref = 1;
    this.closed = false;
    this.ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?token=${mintToken(userId)}&vsn=2.0.0`, {
      perMessageDeflate: false,
      skipUTF8Validation: true,
    });
    this.ws.on('upgrade', (res) => { this.core = res.headers['x-ringcast-core']; });
    this.ws.on('message', (data) => this.onMessage(data));
    this.ws.on('close', () => { this.closed = true; stats.closed++; });
    this.ws.on('error', () => {});
  }

  open(timeout = 10_000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`connection ${this.userId} did not open`)), timeout);
      this.ws.once('open', () => { clearTimeout(timer); resolve(); });
      this.ws.once('error', (e) => { clearTimeout(timer); reject(e); });
      this.ws.once('unexpected-response', (_req, res) => { clearTimeout(timer); reject(new Error(`upgrade refused: ${res.statusCode}`)); });
    });
  }

  join(payload = {}, timeout = 20_000) {
    return new Promise((resolve, reject) => {
      this.joinResolve = resolve;
      this.joinTimer = setTimeout(() => reject(new Error(`join of ${this.userId} not answered in ${timeout} ms`)), timeout);
      this.joinSentAt = performance.now();
      this.ws.send(JSON.stringify(['1', '1', this.topic, 'phx_join', payload]));
    });
  }

  heartbeat() {
    if (this.closed || this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(JSON.stringify([null, String(++this.ref), 'phoenix', 'heartbeat', {}]));
  }

  onMessage(data) {
    const now = performance.now();
    this.stats.frames++;
    this.stats.bytes += data.length;
    this.stats.lastAt = now;
    if (this.joinStatus === null) {
      // Before the join reply only: parse to find it.
      try {
        const [, ref, topic, event, payload] = JSON.parse(data.toString('utf8'));
        if (ref === '1' && topic === this.topic && event === 'phx_reply') {
          this.joinStatus = payload.status;
          clearTimeout(this.joinTimer);
          this.joinResolve(payload.status);
        }
      } catch { /* not ours */ }
    }
    if (this.sawAt === null && this.stats.watchFor && data.includes(this.stats.watchFor)) {
      this.sawAt = now;
      const text = data.toString('utf8');
      this.sawEvent = text.includes('"presence_diff"') ? 'presence_diff' : text.includes('"presence_state"') ? 'presence_state' : 'other';
    }
  }

  close() {
    try { this.ws.terminate(); } catch { /* gone */ }
  }
}

async function quiet(stats, quietMs, maxMs) {
  const start = performance.now();
  for (;;) {
    const now = performance.now();
    if (now - stats.lastAt >= quietMs) return now - start;
    if (now - start > maxMs) return null;
    await sleep(100);
  }
}

const pct = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

async function runPhase({ bin, topic, members: n, batch, quietMs, settleMaxMs, diffWaitMs }) {
  log(`${topic}: starting ${bin} --cores 2`);
  const server = await startServer(bin);
  const pid = server.proc.pid;
  const stats = { frames: 0, bytes: 0, lastAt: performance.now(), closed: 0, watchFor: null };
  const members = [];
  const result = { topic, members: n };
  let hb;
  try {
    await sleep(300);
    result.rss_before_kb = rssKb(pid);

    const rampStart = performance.now();
    for (let i = 0; i < n; i += batch) {
      const group = [];
      for (let j = i; j < Math.min(n, i + batch); j++) group.push(new Member(server.port, `m${j}`, topic, stats));
      members.push(...group);
      await Promise.all(group.map((m) => m.open()));
      const statuses = await Promise.all(group.map((m) => m.join({})));
      const bad = statuses.filter((s) => s !== 'ok').length;
      if (bad) throw new Error(`${bad} joins of ${topic} not ok`);
      if (stats.closed) throw new Error(`${stats.closed} member connections were closed by the server`);
      if ((i / batch) % 8 === 7) log(`${topic}: ${members.length} joined, ${(stats.bytes / 1e6).toFixed(0)} MB received, server RSS ${rssKb(pid)} kB`);
    }
    result.ramp_ms = Math.round(performance.now() - rampStart);
    // heartbeats every 20 s, spread over the interval
    let hbIdx = 0;
    const perTick = Math.ceil(members.length / (HEARTBEAT_MS / 100));
    hb = setInterval(() => {
      for (let k = 0; k < perTick; k++) members[(hbIdx++) % members.length].heartbeat();
    }, 100);

    log(`${topic}: ${n} joined in ${result.ramp_ms} ms; waiting for ${quietMs} ms of quiet`);
    const settled = await quiet(stats, quietMs, settleMaxMs);
    result.settle_ms = settled === null ? null : Math.round(settled);
    if (settled === null) log(`${topic}: still receiving after ${settleMaxMs} ms; measuring anyway`);
    result.rss_after_kb = rssKb(pid);
    await sleep(500);
    result.rss_after_kb = Math.max(result.rss_after_kb, rssKb(pid));
    result.bytes_per_member = Math.round(((result.rss_after_kb - result.rss_before_kb) * 1024) / n);
    result.frames_received = stats.frames;
    result.bytes_received = stats.bytes;
    result.cores = members.reduce((acc, m) => { acc[m.core] = (acc[m.core] || 0) + 1; return acc; }, {});
    if (stats.closed) throw new Error(`${stats.closed} member connections were closed by the server`);

    // One more join.
    const probeId = `probe${crypto.randomBytes(4).toString('hex')}`;
    stats.watchFor = `"${probeId}"`;
    const probe = new Member(server.port, probeId, topic, stats);
    await probe.open();
    const sent = performance.now();
    const status = await probe.join({});
    result.join_reply_ms = +(performance.now() - sent).toFixed(2);
    if (status !== 'ok') throw new Error(`probe join: ${status}`);
    if (topic.startsWith('rooms:')) {
      const end = performance.now() + diffWaitMs;
      while (members.some((m) => m.sawAt === null) && performance.now() < end) await sleep(20);
      const times = members.filter((m) => m.sawAt !== null).map((m) => m.sawAt - sent).sort((a, b) => a - b);
      result.members_with_diff = times.length;
      result.diff_events = [...new Set(members.filter((m) => m.sawAt !== null).map((m) => m.sawEvent))];
      if (times.length) {
        result.join_to_first_diff_ms = +times[0].toFixed(2);
        result.join_to_p50_diff_ms = +pct(times, 50).toFixed(2);
        result.join_to_p99_diff_ms = +pct(times, 99).toFixed(2);
        result.join_to_last_diff_ms = +times[times.length - 1].toFixed(2);
        const byCore = {};
        for (const m of members) if (m.sawAt !== null) byCore[m.core] = Math.max(byCore[m.core] || 0, m.sawAt - sent);
        result.join_to_last_diff_ms_by_core = Object.fromEntries(Object.entries(byCore).map(([k, v]) => [k, +v.toFixed(2)]));
      }
      if (probe.sawAt !== null) result.join_to_own_diff_ms = +(probe.sawAt - sent).toFixed(2);
    }
    members.push(probe);
    result.rss_end_kb = rssKb(pid);
    result.server_alive = server.proc.exitCode === null && server.proc.signalCode === null;
    return result;
  } catch (err) {
    err.message += `\nserver log tail:\n${server.tail().slice(-2000)}`;
    throw err;
  } finally {
    clearInterval(hb);
    await server.stop();
    for (const m of members) m.close();
    await sleep(300);
  }
}

// ---------------------------------------------------------------------------

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const bin = defaultBin();
  if (!fs.existsSync(bin)) throw new Error(`no ringcast binary at ${bin} (set RINGCAST_BIN)`);
  const bench = await runPhase({ ...opts, bin, topic: 'bench:measure' });
  const rooms = await runPhase({ ...opts, bin, topic: 'rooms:measure' });
  const n = opts.members;
  const report = {
    binary: bin,
    members: n,
    rss_before_kb: rooms.rss_before_kb,
    rss_after_kb: rooms.rss_after_kb,
    bytes_per_member_with_presence: rooms.bytes_per_member,
    bytes_per_member_without_presence: bench.bytes_per_member,
    bytes_per_tracked_presence: Math.round((((rooms.rss_after_kb - rooms.rss_before_kb) - (bench.rss_after_kb - bench.rss_before_kb)) * 1024) / n),
    join_to_first_diff_ms: rooms.join_to_first_diff_ms,
    join_to_last_diff_ms: rooms.join_to_last_diff_ms,
    members_with_diff: rooms.members_with_diff,
    rooms,
    bench,
  };
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

const hardLimit = setTimeout(() => {
  log(`hard time limit of ${HARD_LIMIT_MS / 1000} s reached; giving up`);
  for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } }
  process.exit(2);
}, HARD_LIMIT_MS);
hardLimit.unref();

process.on('exit', () => { for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } } });

main().then(
  () => process.exit(0),
  (err) => {
    log(`failed: ${err.stack || err}`);
    for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } }
    process.exit(1);
  },
);
