// Soak run of a release ringcast server (run through scripts/soak.sh).
//
// For --minutes N it keeps, all at once:
//   - HOLD connections held by `ringcast-loadgen connect --hold` (heartbeats, 100 topics);
//   - churn: CHURNERS Node connections joining and leaving `rooms:soak:churn:*` (presence
//     tracked and untracked) and `bench:soak:churn:*` topics, each every 0.2–1 s;
//   - broadcasts: `ringcast-loadgen fanout` at a fixed rate to 1,000 subscribers, one run
//     per minute (loss, duplicates, reorders and p99 latency per run), plus NODE_SUBS Node
//     subscribers of a steady Node publisher (every message checked, in order);
//   - slow readers: every 20 s three connections join a topic that gets big broadcasts
//     and never read; the server should cut each off (1008) and they go away after 30 s;
//   - reconnect storms: every 30 s `ringcast-loadgen connect` opens 2,000 connections at
//     4,000/s, holds them 3 s and drops them;
//   - attacks (issue 12), a round every 15 s, each checked for its answer: request heads
//     trickled a byte a second and TCP connections that send nothing (closed at the
//     request timeout), a repeated Content-Length (400), a topic over 255 bytes (1007),
//     a 9 KB room message (error invalid), a forbidden close code (1002), a ping flood
//     (1008), and abandoned long-poll sessions (expired).
// It samples the server's VmRSS every 2 s. At the end it writes results/soak-<date>.json
// and prints RSS first/after warm-up/last/max, healthy-client loss and p99 per minute.
// Exit status: 0 when RSS stayed flat (last ≤ 1.2 × the value after warm-up) and no
// healthy client lost a message or was closed by the server; 1 otherwise; 2 when the run
// could not start.
//
// Everything talks to 127.0.0.1 only; every phase is bounded in time.

import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

const argv = process.argv.slice(2);
let minutes = 10;
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--minutes') minutes = Number(argv[++i]);
  else if (argv[i].startsWith('--minutes=')) minutes = Number(argv[i].split('=')[1]);
  else { console.error(`unknown argument ${argv[i]}\nusage: soak.sh [--minutes N]`); process.exit(2); }
}
if (!(minutes > 0 && minutes <= 24 * 60)) { console.error('--minutes must be in (0, 1440]'); process.exit(2); }

const DURATION_MS = Math.round(minutes * 60_000);
const HOLD = Number(process.env.SOAK_HOLD || 5000);
const CHURNERS = Number(process.env.SOAK_CHURNERS || 100);
const NODE_SUBS = Number(process.env.SOAK_NODE_SUBS || 200);
const NODE_RATE = 20; // messages/s of the Node publisher
const FAN_SUBS = Number(process.env.SOAK_FAN_SUBS || 1000);
const FAN_RATE = Number(process.env.SOAK_FAN_RATE || 100); // messages/s of each loadgen fanout run
const STORM = 2000;
const SECRET = 'soak-secret';
const API_KEY = 'soak-api-key';
const RSS_EVERY_MS = 2000;
const WARMUP_MS = Math.min(60_000, Math.max(20_000, DURATION_MS / 5));
const RSS_GROWTH = 1.2;

const BIN = process.env.RINGCAST_BIN || path.join(ROOT, 'target', 'release', 'ringcast');
const LOADGEN = process.env.RINGCAST_LOADGEN || path.join(ROOT, 'target', 'release', 'ringcast-loadgen');
const stamp = new Date().toISOString().replace(/[:.]/g, '-').replace('T', '_').slice(0, 19);
const OUT_DIR = path.join(ROOT, 'results');
const WORK = fs.mkdtempSync('/tmp/ringcast-soak-');

const t0 = Date.now();
const since = () => Date.now() - t0;
const log = (...a) => console.log(`[${(since() / 1000).toFixed(1).padStart(6)}s]`, ...a);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => { const { port } = srv.address(); srv.close(() => resolve(port)); });
  });
}

function mintToken(userId) {
  const b64 = (s) => Buffer.from(s).toString('base64url');
  const claims = b64(JSON.stringify({ user_id: String(userId), iat: Math.floor(Date.now() / 1000) }));
  return `${claims}.${crypto.createHmac('sha256', SECRET).update(claims).digest('base64url')}`;
}

function rssKiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : null;
  } catch { return null; }
}

function httpReq(port, { method = 'GET', path: p = '/', body, agent } = {}) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers = { authorization: `Bearer ${API_KEY}` };
    if (data) { headers['content-type'] = 'application/json'; headers['content-length'] = data.length; }
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent: agent ?? false }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, text: Buffer.concat(chunks).toString() }));
    });
    req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${p}: no answer in 10 s`)));
    req.on('error', reject);
    if (data) req.write(data);
    req.end();
  });
}

async function metrics(port) {
  const { text } = await httpReq(port, { path: '/metrics' });
  const out = {};
  for (const line of text.split('\n')) {
    const m = /^(ringcast_[a-z_]+)(\{[^}]*\})? (\S+)$/.exec(line);
    if (m) out[m[1]] = (out[m[1]] || 0) + Number(m[3]);
  }
  return out;
}

function quantile(xs, q) {
  if (xs.length === 0) return null;
  const s = Float64Array.from(xs).sort();
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

/** Runs the loadgen; resolves {code, json, tail}. Killed after `limitMs`. */
function loadgen(args, jsonName, limitMs) {
  const jsonFile = path.join(WORK, `${jsonName}.json`);
  return new Promise((resolve) => {
    const p = spawn(LOADGEN, [...args, '--quiet', '--json', jsonFile], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(p);
    let out = '';
    p.stdout.on('data', (d) => { out = (out + d).slice(-4000); });
    p.stderr.on('data', (d) => { out = (out + d).slice(-4000); });
    const timer = setTimeout(() => { out += '\n[soak: loadgen over its time limit, killed]'; p.kill('SIGKILL'); }, limitMs);
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      children.delete(p);
      let json = null;
      try { json = JSON.parse(fs.readFileSync(jsonFile, 'utf8')); } catch { /* none */ }
      resolve({ code: code ?? signal, json, tail: out });
    });
  });
}

const children = new Set();
const sockets = new Set();
let stopping = false;
function cleanup() {
  for (const c of children) { try { c.kill('SIGKILL'); } catch { /* gone */ } }
  for (const s of sockets) { try { s.terminate(); } catch { /* gone */ } }
}
process.on('exit', cleanup);
process.on('SIGINT', () => { cleanup(); process.exit(130); });
process.on('SIGTERM', () => { cleanup(); process.exit(143); });

/** A raw V2 WebSocket; resolves once open. */
function wsOpen(port, userId) {
  return new Promise((resolve, reject) => {
    const qs = new URLSearchParams({ token: mintToken(userId), vsn: '2.0.0' });
    const ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?${qs}`, { perMessageDeflate: false });
    sockets.add(ws);
    ws.once('open', () => resolve(ws));
    ws.once('error', reject);
    ws.once('unexpected-response', (req, res) => { res.resume(); reject(new Error(`HTTP ${res.statusCode}`)); });
    ws.on('close', () => sockets.delete(ws));
  });
}

// ---------------------------------------------------------------------------
// Run
// ---------------------------------------------------------------------------

for (const f of [BIN, LOADGEN]) {
  if (!fs.existsSync(f)) { console.error(`missing ${f}: cargo build --release -p ringcast -p ringcast-loadgen`); process.exit(2); }
}

const port = await freePort();
const serverArgs = ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '2', '--secret', SECRET, '--api-key', API_KEY,
  '--max-outbound', '256KiB'];
const server = spawn(BIN, serverArgs, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
children.add(server);
let serverLog = '';
let serverExit = null;
server.stderr.on('data', (d) => { serverLog = (serverLog + d).slice(-20000); });
server.on('exit', (code, signal) => { serverExit = signal ? `signal ${signal}` : `code ${code}`; });
for (let i = 0; !serverLog.includes('listening on'); i++) {
  if (serverExit || i > 100) { console.error(`server did not start (${serverExit})\n${serverLog}`); process.exit(2); }
  await sleep(100);
}
const url = `ws://127.0.0.1:${port}`;
const pid = server.pid;
log(`server pid ${pid} on ${url} (${BIN} ${serverArgs.join(' ')}); soak ${minutes} min`);

const endAt = t0 + DURATION_MS;
const left = () => endAt - Date.now();
const problems = [];

// RSS sampler
const rss = [];
const sampleRss = () => { const v = rssKiB(pid); if (v !== null) rss.push({ t_s: +(since() / 1000).toFixed(1), rss_kib: v }); };
sampleRss();
const rssTimer = setInterval(sampleRss, RSS_EVERY_MS);

// Held connections
// Held past the end of the soak, so the last RSS samples are taken with them still up.
const holdSecs = Math.ceil(DURATION_MS / 1000) + 5;
const holdRun = loadgen(['connect', '--url', url, '--secret', SECRET, '-n', String(HOLD), '--rate', '2000',
  '--topic', 'bench:soak:hold', '--topics', '100', '--hold', `${holdSecs}s`, '--heartbeat', '20s', '--server-pid', String(pid)],
'hold', DURATION_MS + 120_000);
log(`holding ${HOLD} connections for ${holdSecs}s`);

// Node subscribers + publisher (every message checked, in order, latency per minute)
const nodeSubs = [];
const nodeLat = []; // [minute] -> array of ms
const nodeStats = { subscribers: 0, published: 0, missing: 0, reordered: 0, closed_by_server: [] };
{
  const opened = [];
  for (let i = 0; i < NODE_SUBS; i += 50) {
    const batch = [];
    for (let j = i; j < Math.min(NODE_SUBS, i + 50); j++) batch.push(wsOpen(port, `ns${j}`));
    opened.push(...await Promise.all(batch));
  }
  for (const [i, ws] of opened.entries()) {
    const sub = { ws, next: 0, missing: 0, reordered: 0, joined: false };
    ws.on('message', (data) => {
      const s = data.toString();
      const m = /"new_msg",\{"body":"(\d+):(\d+)"/.exec(s);
      if (!m) { if (s.includes('phx_reply')) sub.joined = true; return; }
      const seq = Number(m[1]);
      const lat = Date.now() - Number(m[2]);
      const minute = Math.floor(since() / 60_000);
      (nodeLat[minute] ||= []).push(lat);
      if (seq > sub.next) sub.missing += seq - sub.next;
      if (seq < sub.next) sub.reordered++;
      sub.next = Math.max(sub.next, seq + 1);
    });
    ws.on('close', (code, reason) => { if (!stopping) nodeStats.closed_by_server.push({ who: `ns${i}`, code, reason: reason.toString() }); });
    ws.send(JSON.stringify(['1', '1', 'bench:soak:node', 'phx_join', {}]));
    nodeSubs.push(sub);
  }
  await sleep(500);
  nodeStats.subscribers = nodeSubs.filter((s) => s.joined).length;
}
// Phoenix heartbeats, as a real client sends them (a silent connection is closed after
// --idle-timeout, 60 s).
const heartbeatTimer = setInterval(() => {
  for (const s of nodeSubs) if (s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify([null, 'hb', 'phoenix', 'heartbeat', {}]));
}, 20_000);
const nodePub = await wsOpen(port, 'npub');
nodePub.on('message', () => {});
nodePub.on('close', (code, reason) => { if (!stopping) nodeStats.closed_by_server.push({ who: 'npub', code, reason: reason.toString() }); });
nodePub.send(JSON.stringify(['1', '1', 'bench:soak:node', 'phx_join', {}]));
await sleep(200);
const pubTimer = setInterval(() => {
  nodePub.send(JSON.stringify(['1', null, 'bench:soak:node', 'new_msg', { body: `${nodeStats.published++}:${Date.now()}` }]));
}, 1000 / NODE_RATE);
log(`${nodeStats.subscribers} Node subscribers of a ${NODE_RATE} msg/s publisher`);

// Churn: join/leave loops
const churn = { joins: 0, join_errors: 0, leaves: 0, closed_by_server: [] };
const churnLoops = [];
for (let i = 0; i < CHURNERS; i++) {
  churnLoops.push((async () => {
    let ws;
    try { ws = await wsOpen(port, `churn${i}`); } catch (e) { churn.join_errors++; return; }
    const waiting = new Map();
    ws.on('message', (data) => {
      const s = data.toString();
      if (!s.includes('phx_reply')) return;
      const [, ref, , , payload] = JSON.parse(s);
      const w = waiting.get(ref);
      if (w) { waiting.delete(ref); w(payload); }
    });
    ws.on('close', (code, reason) => { if (!stopping && !byMe) churn.closed_by_server.push({ who: `churn${i}`, code, reason: reason.toString() }); });
    const call = (msg) => new Promise((resolve) => {
      waiting.set(msg[1], resolve);
      ws.send(JSON.stringify(msg));
      setTimeout(() => { if (waiting.delete(msg[1])) resolve({ status: 'timeout' }); }, 5000);
    });
    let n = 0;
    let byMe = false;
    ws.on('close', () => { byMe = byMe || stopping; });
    while (!stopping && left() > 5000) {
      const topic = n % 2 ? `rooms:soak:churn:${i % 20}` : `bench:soak:churn:${i % 20}`;
      const jr = `j${n}`;
      const r = await call([jr, jr, topic, 'phx_join', {}]);
      if (r.status === 'ok') churn.joins++; else churn.join_errors++;
      await sleep(200 + Math.random() * 800);
      const l = await call([jr, `l${n}`, topic, 'phx_leave', {}]);
      if (l.status === 'ok') churn.leaves++;
      n++;
    }
    byMe = true;
    ws.close();
  })());
}
log(`${CHURNERS} churners joining and leaving`);

// Slow readers + big broadcasts on their topic
const slow = { opened: 0, saw_close: {}, big_broadcasts: 0 };
const bigAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const bigBody = 'x'.repeat(16 * 1024);
const bigLoop = (async () => {
  while (!stopping && left() > 3000) {
    try {
      const r = await httpReq(port, { method: 'POST', path: '/api/broadcast', agent: bigAgent,
        body: { topic: 'bench:soak:slow', event: 'new_msg', payload: { body: bigBody } } });
      if (r.status === 202) slow.big_broadcasts++;
    } catch { /* counted as missing broadcasts */ }
    await sleep(50);
  }
})();
const slowLoop = (async () => {
  let k = 0;
  while (!stopping && left() > 35_000) {
    for (let j = 0; j < 3; j++, k++) {
      const id = k;
      wsOpen(port, `slow${id}`).then((ws) => {
        slow.opened++;
        ws.on('message', () => {});
        ws.on('close', (code) => { slow.saw_close[code] = (slow.saw_close[code] || 0) + 1; });
        ws.send(JSON.stringify(['1', '1', 'bench:soak:slow', 'phx_join', {}]));
        setTimeout(() => ws._socket && ws._socket.pause(), 200);
        // After 30 s the slow reader reads what is left (finding the close frame) and goes.
        setTimeout(() => { ws._socket && ws._socket.resume(); setTimeout(() => ws.terminate(), 2000); }, 30_000);
      }).catch(() => {});
    }
    await sleep(20_000);
  }
})();

// Attacks: each round opens a bounded set of hostile connections and records how the
// server answered; the healthy clients above are the bystanders.
const attacks = { rounds: 0, answered: {}, unexpected: [] };
const tally = (what, got, want) => {
  const key = `${what}: ${got}`;
  attacks.answered[key] = (attacks.answered[key] || 0) + 1;
  if (got !== want && attacks.unexpected.length < 20) attacks.unexpected.push({ what, got, want, at_s: +(since() / 1000).toFixed(1) });
};
function rawSocket() {
  const sock = net.connect(port, '127.0.0.1');
  const chunks = [];
  sock.on('data', (d) => chunks.push(d));
  sock.on('error', () => {});
  const closed = new Promise((resolve) => sock.on('close', resolve));
  return { sock, closed, data: () => Buffer.concat(chunks) };
}
/** Upgrades a raw socket; resolves once the 101 came (the bytes after it are frames). */
async function rawUpgrade(userId) {
  const c = rawSocket();
  await new Promise((resolve) => c.sock.once('connect', resolve));
  const qs = new URLSearchParams({ token: mintToken(userId), vsn: '2.0.0' });
  c.sock.write(`GET /socket/websocket?${qs} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n`
    + `Sec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  for (let i = 0; i < 100 && c.data().indexOf('\r\n\r\n') < 0; i++) await sleep(20);
  c.body = () => c.data().subarray(c.data().indexOf('\r\n\r\n') + 4);
  return c;
}
function maskedFrame(op, payload) {
  const data = Buffer.from(payload);
  const head = data.length < 126 ? Buffer.from([0x80 | op, 0x80 | data.length])
    : Buffer.from([0x80 | op, 0x80 | 126, data.length >> 8, data.length & 0xff]);
  const key = crypto.randomBytes(4);
  return Buffer.concat([head, key, Buffer.from(data.map((b, i) => b ^ key[i % 4]))]);
}
/** The close code the server sent on `c` (the first close frame after the 101), or null. */
function closeCodeOf(c) {
  const buf = c.body();
  for (let o = 0; o + 2 <= buf.length;) {
    let len = buf[o + 1] & 0x7f;
    let h = 2;
    if (len === 126) { len = buf.readUInt16BE(o + 2); h = 4; }
    if ((buf[o] & 0x0f) === 0x8) return len >= 2 ? buf.readUInt16BE(o + h) : null;
    o += h + len;
  }
  return null;
}
const attackLoop = (async () => {
  await sleep(5000);
  let round = 0;
  while (!stopping && left() > 25_000) {
    const r = round++;
    attacks.rounds++;
    const jobs = [];
    // Slowloris: 10 heads trickled a byte a second, 20 connections that send nothing.
    for (let i = 0; i < 30; i++) {
      jobs.push((async () => {
        const c = rawSocket();
        const head = 'GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n';
        let k = 0;
        const timer = i < 10 ? setInterval(() => { if (k < head.length) c.sock.write(head[k++]); }, 1000) : null;
        const how = await Promise.race([c.closed.then(() => 'closed'), sleep(14_000).then(() => 'open')]);
        if (timer) clearInterval(timer);
        c.sock.destroy();
        tally('slow request', how === 'closed' ? (c.data().toString('latin1').match(/^HTTP\/1\.1 (\d+)/)?.[1] ?? 'closed') : 'still open after 14 s', '408');
      })());
    }
    // A repeated Content-Length.
    jobs.push((async () => {
      const c = rawSocket();
      c.sock.write(`POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}`);
      await Promise.race([c.closed, sleep(3000)]);
      c.sock.destroy();
      tally('repeated content-length', c.data().toString('latin1').match(/^HTTP\/1\.1 (\d+)/)?.[1] ?? 'no answer', '400');
    })());
    // WebSocket abuse: a long topic, a big room body, a forbidden close code, a ping flood.
    const wsAttack = async (what, frames, want, settle = 3000) => {
      const c = await rawUpgrade(`attacker${r}`);
      c.sock.write(Buffer.concat(frames));
      await Promise.race([c.closed, sleep(settle)]);
      tally(what, String(closeCodeOf(c) ?? (what === 'big room body' ? 'open' : 'no close')), want);
      c.sock.destroy();
    };
    jobs.push(wsAttack('topic over 255 bytes', [maskedFrame(1, JSON.stringify(['1', '1', `rooms:${'x'.repeat(300)}`, 'phx_join', {}]))], '1007'));
    jobs.push(wsAttack('forbidden close code', [maskedFrame(8, Buffer.from([0x03, 0xed]))], '1002'));
    jobs.push(wsAttack('ping flood', Array.from({ length: 12_000 }, () => maskedFrame(9, 'p')), '1008', 5000));
    jobs.push((async () => {
      const c = await rawUpgrade(`bigbody${r}`);
      c.sock.write(maskedFrame(1, JSON.stringify(['1', '1', 'rooms:soak:attack', 'phx_join', {}])));
      await sleep(300);
      c.sock.write(maskedFrame(1, JSON.stringify(['1', '2', 'rooms:soak:attack', 'new_msg', { body: 'y'.repeat(9000) }])));
      await sleep(500);
      tally('big room body', c.body().toString('latin1').includes('"2","rooms:soak:attack","phx_reply",{"status":"error","response":{"reason":"invalid"}}') ? 'invalid' : 'no error reply', 'invalid');
      c.sock.destroy();
    })());
    // Abandoned long-poll sessions (they expire after 15 s without a poll).
    for (let i = 0; i < 5; i++) {
      jobs.push(httpReq(port, { path: `/socket/longpoll?token=${encodeURIComponent(mintToken(`lp${r}_${i}`))}&vsn=2.0.0` })
        .then((res) => tally('long-poll open', String(JSON.parse(res.text).status), '410'))
        .catch((e) => tally('long-poll open', e.message, '410')));
    }
    await Promise.all(jobs);
    await sleep(1000);
  }
})();

// Reconnect storms
const storms = [];
const stormLoop = (async () => {
  await sleep(Math.min(20_000, DURATION_MS / 4));
  let i = 0;
  while (!stopping && left() > 20_000) {
    const r = await loadgen(['connect', '--url', url, '--secret', SECRET, '-n', String(STORM), '--rate', '4000',
      '--topic', 'bench:soak:storm', '--topics', '20', '--hold', '3s'], `storm${i}`, 60_000);
    const j = r.json || {};
    storms.push({ at_s: +(since() / 1000).toFixed(1), code: r.code, joined: j.joined ?? j.connections_joined ?? null, failures: j.failures ?? null });
    if (r.code !== 0) log(`storm ${i}: loadgen exit ${r.code}\n${r.tail.slice(-800)}`);
    i++;
    await sleep(Math.max(0, 30_000 - 8_000));
  }
})();

// Fanout runs, one per minute
const fanouts = [];
const fanLoop = (async () => {
  await sleep(3000);
  let i = 0;
  while (left() > 25_000) {
    const startedAt = since();
    const secs = Math.min(50, Math.floor((left() - 20_000) / 1000));
    if (secs < 5) break;
    const r = await loadgen(['fanout', '--url', url, '--secret', SECRET, '-n', String(FAN_SUBS), '--topic', 'bench:soak:fan',
      '-m', String(FAN_RATE * secs), '--rate', String(FAN_RATE), '--connect-rate', '2000'], `fanout${i}`, (secs + 60) * 1000);
    const j = r.json || {};
    const run = {
      minute: i, at_s: +(startedAt / 1000).toFixed(1), code: r.code,
      subscribers: j.subscribers_joined, sent: j.sent, expected: j.expected, deliveries: j.deliveries,
      loss: j.loss, duplicates: j.duplicates, reorders: j.reorders, ended_early: j.ended_early, ends: j.ends,
      p50_ms: j.latency ? j.latency.p50_us / 1000 : null, p99_ms: j.latency ? j.latency.p99_us / 1000 : null,
      max_ms: j.latency ? j.latency.max_us / 1000 : null, problems: j.problems,
    };
    fanouts.push(run);
    log(`fanout ${i}: ${run.subscribers} subs, sent ${run.sent}, loss ${run.loss}, reorders ${run.reorders}, p99 ${run.p99_ms?.toFixed(1)} ms (exit ${r.code})`);
    if (r.code !== 0 || !r.json) log(r.tail.slice(-1500));
    i++;
    const wait = 60_000 - (since() - startedAt);
    if (wait > 0 && left() > wait + 25_000) await sleep(wait);
  }
})();

// Progress
const progress = setInterval(async () => {
  try {
    const m = await metrics(port);
    const last = rss[rss.length - 1];
    log(`conns ${m.ringcast_connections} channels ${m.ringcast_channels} slow_closed ${m.ringcast_slow_closed_total} rss ${(last.rss_kib / 1024).toFixed(1)} MiB`);
  } catch (e) { log(`metrics: ${e.message}`); }
}, 15_000);

await sleep(Math.max(0, left()));
// The last RSS sample under full load, before anything is torn down.
sampleRss();
const rssUnderLoad = rss.slice();
const finalMetrics = await metrics(port).catch(() => ({}));
stopping = true;
clearInterval(pubTimer);
clearInterval(heartbeatTimer);
clearInterval(progress);
log('stopping');
await Promise.race([Promise.all([fanLoop, stormLoop, bigLoop, slowLoop, attackLoop, ...churnLoops]), sleep(90_000)]);
await sleep(1500); // last deliveries of the Node publisher
const hold = await holdRun;
bigAgent.destroy();
for (const s of nodeSubs) {
  nodeStats.missing += s.missing + Math.max(0, nodeStats.published - s.next);
  nodeStats.reordered += s.reordered;
}
clearInterval(rssTimer);
for (const ws of [...sockets]) ws.terminate();
await sleep(2000);
const rssAfterClose = rssKiB(pid);

server.kill('SIGTERM');
for (let i = 0; i < 100 && !serverExit; i++) await sleep(100);
if (!serverExit) { server.kill('SIGKILL'); problems.push('server did not exit within 10 s of SIGTERM'); }
else if (serverExit !== 'code 0') problems.push(`server exit after SIGTERM: ${serverExit}`);

// ---------------------------------------------------------------------------
// Verdict
// ---------------------------------------------------------------------------

const kib = (v) => (v == null ? null : +(v / 1024).toFixed(1));
const first = rssUnderLoad[0]?.rss_kib;
const warmSample = rssUnderLoad.find((s) => s.t_s * 1000 >= WARMUP_MS) || rssUnderLoad[rssUnderLoad.length - 1];
const lastRss = rssUnderLoad[rssUnderLoad.length - 1]?.rss_kib;
const maxRss = Math.max(...rssUnderLoad.map((s) => s.rss_kib));
// Like against like: the load comes in waves (a storm every 30 s, slow readers every 20 s),
// so the verdict compares the peak of the 30 s window right after warm-up with the peak
// of the last 30 s, both under the full load.
const windowMax = (from, to) => Math.max(...rssUnderLoad.filter((x) => x.t_s * 1000 >= from && x.t_s * 1000 < to).map((x) => x.rss_kib));
const warmWindow = windowMax(WARMUP_MS, WARMUP_MS + 30_000);
const lastWindow = windowMax(DURATION_MS - 30_000, DURATION_MS + 5_000);
const flat = lastWindow <= warmWindow * RSS_GROWTH;
if (!flat) problems.push(`RSS grew: peak ${kib(lastWindow)} MiB in the last 30 s vs ${kib(warmWindow)} MiB in the 30 s after warm-up (bound +${Math.round((RSS_GROWTH - 1) * 100)}%)`);

const holdEnds = hold.json?.ends || {};
const holdClosedByServer = Object.entries(holdEnds).reduce((a, [, n]) => a + n, 0);
const fanLoss = fanouts.reduce((a, f) => a + (f.loss || 0), 0);
const fanBad = fanouts.filter((f) => f.code !== 0 || f.loss !== 0 || f.reorders !== 0 || f.ended_early !== 0 || f.subscribers !== FAN_SUBS);
const healthyLoss = fanLoss + nodeStats.missing;
if (fanouts.length === 0) problems.push('no fanout run completed');
if (fanLoss > 0) problems.push(`loadgen fanout lost ${fanLoss} deliveries`);
for (const f of fanBad) problems.push(`fanout minute ${f.minute}: exit ${f.code}, ${f.subscribers} subscribers, loss ${f.loss}, reorders ${f.reorders}, ended early ${f.ended_early} ${JSON.stringify(f.ends || {})}`);
if (nodeStats.missing > 0) problems.push(`Node subscribers missed ${nodeStats.missing} messages`);
if (nodeStats.reordered > 0) problems.push(`Node subscribers saw ${nodeStats.reordered} reorders`);
if (nodeStats.closed_by_server.length) problems.push(`healthy Node clients closed by the server: ${JSON.stringify(nodeStats.closed_by_server.slice(0, 5))}`);
if (churn.closed_by_server.length) problems.push(`churners closed by the server: ${JSON.stringify(churn.closed_by_server.slice(0, 5))}`);
if (churn.join_errors > 0) problems.push(`${churn.join_errors} churn joins failed`);
if (hold.code !== 0) problems.push(`held connections: loadgen exit ${hold.code}: ${hold.tail.slice(-600)}`);
if (holdClosedByServer > 0) problems.push(`held connections ended by the server: ${JSON.stringify(holdEnds)}`);
if ((hold.json?.joined ?? HOLD) < HOLD) problems.push(`only ${hold.json?.joined} of ${HOLD} held connections joined`);
for (const s of storms) if (s.code !== 0) problems.push(`reconnect storm at ${s.at_s}s: loadgen exit ${s.code}`);
if (attacks.rounds === 0) problems.push('no attack round ran');
for (const u of attacks.unexpected) problems.push(`attack "${u.what}" at ${u.at_s}s: answered ${u.got}, expected ${u.want}`);
if (slow.opened > 0 && !(finalMetrics.ringcast_slow_closed_total > 0)) problems.push('no slow reader was cut off (slow_closed_total 0)');

const perMinute = [];
for (let m = 0; m * 60_000 < DURATION_MS; m++) {
  const f = fanouts.find((x) => x.minute === m);
  perMinute.push({
    minute: m,
    fanout_p99_ms: f?.p99_ms ?? null,
    fanout_loss: f?.loss ?? null,
    node_p99_ms: quantile(nodeLat[m] || [], 0.99),
    node_samples: (nodeLat[m] || []).length,
  });
}

const result = {
  kind: 'soak',
  started: new Date(t0).toISOString(),
  minutes,
  server: { bin: BIN, args: serverArgs, pid, exit: serverExit },
  load: { held: HOLD, churners: CHURNERS, node_subscribers: NODE_SUBS, node_rate: NODE_RATE, fanout_subscribers: FAN_SUBS, fanout_rate: FAN_RATE, storm_size: STORM },
  rss: {
    every_s: RSS_EVERY_MS / 1000,
    warmup_s: WARMUP_MS / 1000,
    first_mib: kib(first), after_warmup_mib: kib(warmSample.rss_kib), after_warmup_at_s: warmSample.t_s,
    last_mib: kib(lastRss), max_mib: kib(maxRss), after_close_mib: kib(rssAfterClose),
    warm_window_peak_mib: kib(warmWindow), last_window_peak_mib: kib(lastWindow),
    last_vs_after_warmup: +(lastRss / warmSample.rss_kib).toFixed(3),
    bound: `peak of the last 30 s <= ${RSS_GROWTH} x peak of the 30 s after warm-up`, flat,
    samples: rssUnderLoad,
  },
  healthy_loss: healthyLoss,
  per_minute: perMinute,
  fanouts,
  node: nodeStats,
  churn,
  slow_readers: { ...slow, slow_closed_total: finalMetrics.ringcast_slow_closed_total ?? null },
  storms,
  attacks,
  hold: hold.json ? { joined: hold.json.joined, failures: hold.json.failures, ends: hold.json.ends, problems: hold.json.problems } : { code: hold.code, tail: hold.tail.slice(-1000) },
  final_metrics: finalMetrics,
  problems,
  pass: problems.length === 0,
};
fs.mkdirSync(OUT_DIR, { recursive: true });
const outFile = path.join(OUT_DIR, `soak-${stamp}.json`);
fs.writeFileSync(outFile, `${JSON.stringify(result, null, 1)}\n`);
fs.rmSync(WORK, { recursive: true, force: true });

console.log('\n== soak summary');
console.log(`RSS (MiB): first ${kib(first)}, after warm-up (${warmSample.t_s}s) ${kib(warmSample.rss_kib)}, last ${kib(lastRss)} (x${(lastRss / warmSample.rss_kib).toFixed(2)}), max ${kib(maxRss)}, after close ${kib(rssAfterClose)}`);
console.log(`RSS peaks: 30 s after warm-up ${kib(warmWindow)}, last 30 s ${kib(lastWindow)} -> ${flat ? 'flat' : 'GREW'} (bound +${Math.round((RSS_GROWTH - 1) * 100)}%)`);
console.log(`healthy-client loss: ${healthyLoss} (fanout ${fanLoss}, Node subscribers ${nodeStats.missing} of ${nodeStats.published} x ${nodeStats.subscribers})`);
console.log(`churn: ${churn.joins} joins, ${churn.leaves} leaves, ${churn.join_errors} errors; storms: ${storms.length} x ${STORM}; slow readers: ${slow.opened} opened, slow_closed_total ${finalMetrics.ringcast_slow_closed_total}, close codes seen ${JSON.stringify(slow.saw_close)}`);
console.log('p99 latency per minute (ms):');
for (const m of perMinute) console.log(`  minute ${m.minute}: fanout ${m.fanout_p99_ms?.toFixed(1) ?? '-'} (loss ${m.fanout_loss ?? '-'}), Node ${m.node_p99_ms?.toFixed(1) ?? '-'} (n=${m.node_samples})`);
console.log(`written ${path.relative(ROOT, outFile)}`);
if (problems.length) {
  console.log(`FAIL:\n  - ${problems.join('\n  - ')}`);
  process.exit(1);
}
console.log('PASS');
process.exit(0);
