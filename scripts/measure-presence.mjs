#!/usr/bin/env node
// Measures what presence costs in `ringcast serve --cores 2`: server memory per member
// connection with and without a tracked presence, and how long one more join takes to
// reach every member as a presence_diff.
//
//   node scripts/measure-presence.mjs [--members N (<= 19000, default 10000)] [--batch B (250)] [--quiet-ms MS (1000)]
//                                     [--max-outbound SIZE] [--time-limit S (170)] [--rooms-only]
//   RINGCAST_BIN=/path/to/ringcast node scripts/measure-presence.mjs
//
// For `rooms:measure` (presence) and then `bench:measure` (no presence; same member
// count) it starts a fresh server, samples its RSS (/proc/PID/status VmRSS), opens N raw
// `ws` connections (V2 JSON frames, not the phoenix client) that join the topic, ramped in
// batches of B (each batch's joins answered before the next), waits until the server has
// gone quiet, and samples RSS again. Then one more connection joins:
// - rooms: per member connection, when the first frame containing the new key arrived
//   (join_to_first/last_diff_ms, from sending its phx_join);
// - bench: the newcomer broadcasts a new_msg of about a diff's size, timed the same way
//   (bench_broadcast_to_last_ms): the cost of reaching N sockets by itself.
// bytes_per_tracked_presence = ((rss_after - rss_before) rooms - (same) bench) / N.
// Members answer nothing; each sends a heartbeat every 20 s. Everything is on 127.0.0.1.
// A presence room of N members moves ~N^2 metas over the ramp (each joiner gets the whole
// state, every member gets every later join): ~10 GB for N = 10000, which takes ~1.5 min
// with a debug build. If the rooms ramp passes 65 % of --time-limit it stops there and
// measures with the members it has. The newcomer parses its `presence_state` and checks
// that every member is in it (state_keys, state_has_every_member, state_bytes).
// --max-outbound is passed to the server: below the state's size it shows that
// server-made presence frames do not get a reading joiner cut off. --rooms-only skips the
// bench phase. The JSON report goes to stdout, progress to stderr. Exits by itself (hard
// limit --time-limit).
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

const MAX_MEMBERS = 19000; // this process may hold at most 20,000 open files
const HEARTBEAT_MS = 20_000;

function parseArgs(argv) {
  const opts = { members: 10000, batch: 250, quietMs: 1000, settleMaxMs: 25_000, diffWaitMs: 10_000, timeLimitS: 170, maxOutbound: null, roomsOnly: false };
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
    else if (a === '--time-limit') opts.timeLimitS = Number(val());
    else if (a === '--max-outbound') opts.maxOutbound = val();
    else if (a === '--rooms-only') opts.roomsOnly = true;
    else if (a === '-h' || a === '--help') {
      process.stderr.write('usage: node scripts/measure-presence.mjs [--members N (<= 19000)] [--batch B] [--quiet-ms MS] [--max-outbound SIZE] [--time-limit S] [--rooms-only]\n');
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  if (!Number.isInteger(opts.members) || opts.members < 1 || opts.members > MAX_MEMBERS) {
    throw new Error(`--members must be an integer in 1..${MAX_MEMBERS}`);
  }
  if (!Number.isInteger(opts.batch) || opts.batch < 1) throw new Error('--batch must be a positive integer');
  if (!(opts.timeLimitS > 0)) throw new Error('--time-limit must be a positive number of seconds');
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

async function startServer(bin, maxOutbound) {
  const port = await freePort();
  const argv = ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '2', '--secret', SECRET];
  if (maxOutbound) argv.push('--max-outbound', maxOutbound);
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
    this.lastSentAt = Infinity; // no heartbeats before the join
    this.ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?token=${mintToken(userId)}&vsn=2.0.0`, {
      perMessageDeflate: false,
      skipUTF8Validation: true,
    });
    this.ws.on('upgrade', (res) => { this.core = res.headers['x-ringcast-core']; });
    this.ws.on('message', (data) => this.onMessage(data));
    this.ws.on('close', (code) => {
      this.closed = true;
      stats.closed++;
      stats.closeCodes[code] = (stats.closeCodes[code] || 0) + 1;
    });
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
      this.lastSentAt = this.joinSentAt;
      this.ws.send(JSON.stringify(['1', '1', this.topic, 'phx_join', payload]));
    });
  }

  heartbeat() {
    if (this.closed || this.ws.readyState !== WebSocket.OPEN) return;
    this.lastSentAt = performance.now();
    this.ws.send(JSON.stringify([null, String(++this.ref), 'phoenix', 'heartbeat', {}]));
  }

  onMessage(data) {
    const now = performance.now();
    this.stats.frames++;
    this.stats.bytes += data.length;
    // heartbeat replies do not count as traffic when waiting for the server to go quiet
    if (!data.subarray(0, 48).includes('"phoenix","phx_reply"')) this.stats.lastAt = now;
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
    if (this.isProbe && this.stateAt === undefined && data.subarray(0, 80).includes('"presence_state"')) {
      this.stateAt = now;
      this.state = data;
    }
    if (this.sawAt === null && this.stats.watchFor && data.includes(this.stats.watchFor)) {
      this.sawAt = now;
      const text = data.toString('utf8');
      this.sawEvent = ['presence_diff', 'presence_state', 'new_msg'].find((e) => text.includes(`"${e}"`)) || 'other';
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

async function runPhase({ bin, topic, members: n, batch, quietMs, settleMaxMs, diffWaitMs, rampDeadline, maxOutbound }) {
  log(`${topic}: starting ${bin} --cores 2${maxOutbound ? ` --max-outbound ${maxOutbound}` : ''}`);
  const server = await startServer(bin, maxOutbound);
  const pid = server.proc.pid;
  const stats = { frames: 0, bytes: 0, lastAt: performance.now(), closed: 0, closeCodes: {}, watchFor: null };
  const members = [];
  const result = { topic, members: n };
  let hb;
  try {
    await sleep(300);
    result.rss_before_kb = rssKb(pid);

    // a heartbeat from each member 20 s after the last thing it sent (the idle timeout is
    // 60 s); by the clock, not a tick count, as this busy process runs timers late
    hb = setInterval(() => {
      const now = performance.now();
      for (const m of members) if (now - m.lastSentAt >= HEARTBEAT_MS) m.heartbeat();
    }, 250);

    const rampStart = performance.now();
    for (let i = 0; i < n; i += batch) {
      if (performance.now() > rampDeadline) {
        log(`${topic}: ramp deadline reached with ${members.length} of ${n} members; measuring with those`);
        result.ramp_cut_short = true;
        break;
      }
      const group = [];
      for (let j = i; j < Math.min(n, i + batch); j++) group.push(new Member(server.port, `m${j}`, topic, stats));
      members.push(...group);
      await Promise.all(group.map((m) => m.open()));
      const statuses = await Promise.all(group.map((m) => m.join({})));
      const bad = statuses.filter((s) => s !== 'ok').length;
      if (bad) throw new Error(`${bad} joins of ${topic} not ok`);
      if (stats.closed) throw new Error(`${stats.closed} member connections were closed by the server (close codes ${JSON.stringify(stats.closeCodes)})`);
      if ((i / batch) % 8 === 7) log(`${topic}: ${members.length} joined, ${(stats.bytes / 1e6).toFixed(0)} MB received, server RSS ${rssKb(pid)} kB`);
    }
    result.ramp_ms = Math.round(performance.now() - rampStart);
    n = members.length;
    result.members = n;

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
    if (stats.closed) throw new Error(`${stats.closed} member connections were closed by the server (close codes ${JSON.stringify(stats.closeCodes)})`);

    // One more join.
    const probeId = `probe${crypto.randomBytes(4).toString('hex')}`;
    stats.watchFor = `"${probeId}"`;
    const probe = new Member(server.port, probeId, topic, stats);
    probe.isProbe = true;
    await probe.open();
    const sent = performance.now();
    const status = await probe.join({});
    result.join_reply_ms = +(performance.now() - sent).toFixed(2);
    if (status !== 'ok') throw new Error(`probe join: ${status}`);
    // bench: no presence, so time a plain broadcast instead (new_msg naming the probe,
    // as big as a one-member diff): the fanout baseline of server and this client.
    let from = sent;
    if (topic.startsWith('bench:')) {
      await sleep(200);
      from = performance.now();
      probe.ws.send(JSON.stringify(['1', '2', topic, 'new_msg', { body: `{"${probeId}":{"metas":[{"name":"${probeId}","online_at":"1795561395","phx_ref":"F18eb1d936d642e03-1-1"}]}}` }]));
    }
    {
      const end = performance.now() + diffWaitMs;
      while (members.some((m) => m.sawAt === null) && performance.now() < end) await sleep(20);
      const times = members.filter((m) => m.sawAt !== null).map((m) => m.sawAt - from).sort((a, b) => a - b);
      const pre = topic.startsWith('bench:') ? 'broadcast_to' : 'join_to';
      result.members_reached = times.length;
      result.events_seen = [...new Set(members.filter((m) => m.sawAt !== null).map((m) => m.sawEvent))];
      if (times.length) {
        result[`${pre}_first_ms`] = +times[0].toFixed(2);
        result[`${pre}_p50_ms`] = +pct(times, 50).toFixed(2);
        result[`${pre}_p99_ms`] = +pct(times, 99).toFixed(2);
        result[`${pre}_last_ms`] = +times[times.length - 1].toFixed(2);
        const byCore = {};
        for (const m of members) if (m.sawAt !== null) byCore[m.core] = Math.max(byCore[m.core] || 0, m.sawAt - from);
        result[`${pre}_last_ms_by_core`] = Object.fromEntries(Object.entries(byCore).map(([k, v]) => [k, +v.toFixed(2)]));
      }
      if (probe.stateAt !== undefined) {
        result.join_to_own_presence_state_ms = +(probe.stateAt - sent).toFixed(2);
        const [, , , , state] = JSON.parse(probe.state.toString('utf8'));
        result.state_bytes = probe.state.length;
        result.state_keys = Object.keys(state).length;
        result.state_has_every_member = members.every((m) => state[m.userId]?.metas?.length >= 1);
      }
      result.probe_closed = probe.closed;
      if (probe.sawAt !== null) result[`${pre}_own_ms`] = +(probe.sawAt - from).toFixed(2);
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
  armHardLimit(opts.timeLimitS);
  const bin = defaultBin();
  if (!fs.existsSync(bin)) throw new Error(`no ringcast binary at ${bin} (set RINGCAST_BIN)`);
  // rooms first: it is the slow one (every join sends the whole state to the joiner and a
  // diff to everyone); if its ramp has to stop early, bench uses the same member count.
  const started = performance.now();
  const rooms = await runPhase({ ...opts, bin, topic: 'rooms:measure', rampDeadline: started + opts.timeLimitS * 650 });
  const bench = opts.roomsOnly
    ? {}
    : await runPhase({ ...opts, members: rooms.members, settleMaxMs: 10_000, bin, topic: 'bench:measure', rampDeadline: Infinity });
  const n = rooms.members;
  const report = {
    binary: bin,
    members: n,
    members_requested: opts.members,
    rss_before_kb: rooms.rss_before_kb,
    rss_after_kb: rooms.rss_after_kb,
    bytes_per_member_with_presence: rooms.bytes_per_member,
    bytes_per_member_without_presence: bench.bytes_per_member,
    // (rss_rooms - rss_bench) / N, each taken as growth over its own idle server
    bytes_per_tracked_presence: Math.round((((rooms.rss_after_kb - rooms.rss_before_kb) - (bench.rss_after_kb - bench.rss_before_kb)) * 1024) / n),
    join_to_first_diff_ms: rooms.join_to_first_ms,
    join_to_last_diff_ms: rooms.join_to_last_ms,
    members_with_diff: rooms.members_reached,
    max_outbound: opts.maxOutbound,
    newcomer_state_keys: rooms.state_keys,
    newcomer_state_bytes: rooms.state_bytes,
    newcomer_state_has_every_member: rooms.state_has_every_member,
    // the same fanout for a plain broadcast on bench:measure (no presence): what delivery
    // to N connections costs the server and this client by itself
    bench_broadcast_to_last_ms: bench.broadcast_to_last_ms,
    rooms,
    bench,
  };
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
}

function armHardLimit(seconds) {
  const hardLimit = setTimeout(() => {
    log(`hard time limit of ${seconds} s reached; giving up`);
    for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } }
    process.exit(2);
  }, seconds * 1000);
  hardLimit.unref();
}

process.on('exit', () => { for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } } });

main().then(
  () => process.exit(0),
  (err) => {
    log(`failed: ${err.stack || err}`);
    for (const p of liveProcs) { try { p.kill('SIGKILL'); } catch { /* gone */ } }
    process.exit(1);
  },
);
