#!/usr/bin/env node
// What permessage-deflate costs and saves (issue 14), three server modes side by side in
// one run: compression off (`--compress off`), compressed once per broadcast (the
// default), and compressed again for every delivery (`RINGCAST_COMPRESS_PATH=per-connection`,
// what servers with a compressor per connection do).
//
//   node scripts/measure-compression.mjs [--subs N (10000)] [--msgs M (40)] [--idle I (10000)] [--members P (1000)] [--rounds R (3)]
//   RINGCAST_BIN=/path/to/ringcast node scripts/measure-compression.mjs
//
// For each mode a fresh `ringcast serve --cores 1` (release build, pinned to CPU 0 when
// taskset is there) and `ws` clients, which always offer permessage-deflate (the server
// declines when off):
// - idle: I connections joined to `bench:idle`, 3 s to park, VmRSS (after - before) / I;
// - fanout: N subscribers of `bench:fan`; M broadcasts 20 ms apart through
//   `POST /api/broadcast`, first the seed app's `new_msg` ({"body","user"}, a chat line),
//   then a 4 KiB JSON object; server CPU (utime + stime) and bytes written
//   (`ringcast_bytes_out_total`) per delivery, and loss;
// - presence: P members in `rooms:p`, then one raw TCP joiner that offers compression
//   counts the bytes it receives for its join (reply, welcome, presence_state of P
//   members, its own presence_diff).
// The modes alternate in R rounds and each figure is the median.
// JSON report to stdout, progress to stderr. Loopback only; exits by itself (hard limit
// 25 min). Uses `ws` from tests/e2e/node_modules (`npm ci` there).

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

const opts = { subs: 10000, msgs: 40, idle: 10000, members: 1000, rounds: 3 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in opts)) throw new Error(`unknown option ${process.argv[i]}`);
  opts[key] = Number(process.argv[i + 1]);
  if (!Number.isInteger(opts[key]) || opts[key] < 1) throw new Error(`--${key} takes a positive integer`);
}
if (opts.idle > 18000 || opts.subs > 18000 || opts.members > 18000) throw new Error('this process may hold at most 20,000 open files');
const BIN = process.env.RINGCAST_BIN || path.join(ROOT, 'target', 'release', 'ringcast');
const SECRET = `zip-${crypto.randomBytes(6).toString('hex')}`;
const API_KEY = `key-${crypto.randomBytes(6).toString('hex')}`;
const log = (m) => process.stderr.write(`[measure-compression] ${m}\n`);
const hard = setTimeout(() => { log('hard limit of 25 min reached'); process.exit(2); }, 1_500_000);
hard.unref();

function token(user) {
  const claims = Buffer.from(JSON.stringify({ user_id: String(user), iat: Math.floor(Date.now() / 1000) })).toString('base64url');
  return `${claims}.${crypto.createHmac('sha256', SECRET).update(claims).digest('base64url')}`;
}

const MODES = {
  off: { args: ['--compress', 'off'], env: {} },
  once: { args: [], env: {} },
  'per-connection': { args: [], env: { RINGCAST_COMPRESS_PATH: 'per-connection' } },
};
const taskset = spawnSync('taskset', ['--version']).status === 0 && os.cpus().length > 1;
let nextPort = 19800 + Math.floor(Math.random() * 500);

async function start(mode) {
  const port = nextPort++;
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '1', '--secret', SECRET, '--api-key', API_KEY,
    '--max-rate', '1000000', '--idle-timeout', '10m', ...MODES[mode].args];
  const env = { ...process.env, ...MODES[mode].env };
  const proc = taskset ? spawn('taskset', ['-c', '0', BIN, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(BIN, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${mode}: the server did not listen`)), 10000);
    proc.stderr.on('data', (d) => { if (String(d).includes('listening on')) { clearTimeout(t); resolve(); } });
    proc.on('exit', () => reject(new Error(`${mode}: the server exited`)));
  });
  return { proc, port, url: (user) => `ws://127.0.0.1:${port}/socket/websocket?vsn=2.0.0&token=${token(user)}` };
}

const rssKb = (pid) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
function cpuSecs(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}
async function metric(server, name) {
  const text = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
  return [...text.matchAll(new RegExp(`^${name}\\{core="\\d+"\\} (\\d+)$`, 'gm'))].reduce((s, m) => s + Number(m[1]), 0);
}

/** Opens `n` connections (offering permessage-deflate) joining `topic`, 200 at a time. */
async function open(server, n, topic, prefix, onMsg, joinPayload = () => ({})) {
  const socks = [];
  for (let i = 0; i < n; i += 200) {
    await Promise.all(Array.from({ length: Math.min(200, n - i) }, (_, k) => new Promise((resolve, reject) => {
      const ws = new WebSocket(server.url(`${prefix}${i + k}`), { perMessageDeflate: true });
      let joined = false;
      ws.on('open', () => ws.send(JSON.stringify(['1', '1', topic, 'phx_join', joinPayload(i + k)])));
      ws.on('message', (d) => {
        if (!joined) { joined = true; resolve(); return; }
        if (onMsg) onMsg(d);
      });
      ws.on('error', reject);
      socks.push(ws);
    })));
  }
  return socks;
}

async function idle(mode) {
  const server = await start(mode);
  try {
    await sleep(500);
    const before = rssKb(server.proc.pid);
    const socks = await open(server, opts.idle, 'bench:idle', 'i');
    await sleep(3000);
    const after = rssKb(server.proc.pid);
    const negotiated = await metric(server, 'ringcast_deflate_connections');
    for (const s of socks) s.terminate();
    return { connections: opts.idle, negotiated, kib_per_connection: +((after - before) / opts.idle).toFixed(3) };
  } finally {
    server.proc.kill('SIGKILL');
  }
}

/** A 4 KiB JSON object: a page of a chat's history. */
function page4k() {
  const items = [];
  for (let i = 0; JSON.stringify({ items }).length < 4096 - 120; i++) {
    items.push({ id: 1000 + i, user: `user${i % 7}`, text: `message number ${i} about the weather and the match`, at: 1764600000 + i * 17 });
  }
  return { items };
}

async function fanout(mode) {
  const server = await start(mode);
  try {
    let received = 0;
    const socks = await open(server, opts.subs, 'bench:fan', 'f', () => { received++; });
    await sleep(2000);
    const result = {};
    const payloads = { new_msg: { body: 'hello everyone, how is it going today?', user: 'alice' }, json_4k: page4k() };
    for (const [name, payload] of Object.entries(payloads)) {
      received = 0;
      const expected = opts.subs * opts.msgs;
      const cpu0 = cpuSecs(server.proc.pid);
      const bytes0 = await metric(server, 'ringcast_bytes_out_total');
      for (let m = 0; m < opts.msgs; m++) {
        const r = await fetch(`http://127.0.0.1:${server.port}/api/broadcast`, {
          method: 'POST',
          headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
          body: JSON.stringify({ topic: 'bench:fan', event: 'new_msg', payload }),
        });
        if (r.status !== 202) throw new Error(`broadcast: HTTP ${r.status}`);
        await sleep(20);
      }
      const deadline = performance.now() + 60_000;
      let last = -1;
      let stillSince = performance.now();
      while (received < expected && performance.now() < deadline) {
        await sleep(50);
        if (received !== last) { last = received; stillSince = performance.now(); } else if (performance.now() - stillSince > 5000) break;
      }
      const cpu = cpuSecs(server.proc.pid) - cpu0;
      const bytes = (await metric(server, 'ringcast_bytes_out_total')) - bytes0;
      result[name] = {
        payload_bytes: JSON.stringify(payload).length,
        expected, received, lost: expected - received,
        server_cpu_secs: +cpu.toFixed(3),
        cpu_us_per_delivery: +((cpu * 1e6) / Math.max(1, received)).toFixed(3),
        wire_bytes_per_delivery: +(bytes / Math.max(1, received)).toFixed(1),
      };
      log(`${mode} ${name}: ${JSON.stringify(result[name])}`);
    }
    result.deflate_broadcasts = await metric(server, 'ringcast_deflate_broadcasts_total');
    for (const s of socks) s.terminate();
    return result;
  } finally {
    server.proc.kill('SIGKILL');
  }
}

/** Bytes a raw TCP joiner (offering permessage-deflate) receives for its join of `topic`. */
function joinBytes(server, topic) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(server.port, '127.0.0.1');
    let total = 0;
    let upgraded = false;
    let head = Buffer.alloc(0);
    sock.on('connect', () => {
      sock.write(`GET /socket/websocket?vsn=2.0.0&token=${token('joiner')} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n`
        + `Connection: Upgrade\r\nSec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n`
        + 'Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n');
    });
    sock.on('data', (d) => {
      if (!upgraded) {
        head = Buffer.concat([head, d]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        upgraded = true;
        total += head.length - end - 4;
        // A masked join frame under 126 bytes (the mask is zero: the payload goes as is).
        const payload = Buffer.from(JSON.stringify(['1', '1', topic, 'phx_join', {}]));
        sock.write(Buffer.concat([Buffer.from([0x81, 0x80 | payload.length, 0, 0, 0, 0]), payload]));
        setTimeout(() => { sock.destroy(); resolve(total); }, 3000);
        return;
      }
      total += d.length;
    });
    sock.on('error', reject);
  });
}

async function presence(mode) {
  const server = await start(mode);
  try {
    const name = (i) => ({ name: `member ${i} of the big room` });
    const socks = await open(server, opts.members, 'rooms:p', 'p', null, name);
    await sleep(2000);
    const bytes = await joinBytes(server, 'rooms:p');
    for (const s of socks) s.terminate();
    return { members: opts.members, join_wire_bytes: bytes };
  } finally {
    server.proc.kill('SIGKILL');
  }
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const report = {
  binary: BIN, host: os.hostname(), cpus: os.cpus().length, pinned: taskset, options: opts,
  idle: {}, presence: {}, fanout: {}, runs: { idle: [], fanout: [] },
};
// Modes alternate within each round, so that the box's drift hits them alike; every
// figure is the median of the rounds.
for (let round = 0; round < opts.rounds; round++) {
  for (const mode of ['off', 'once']) {
    log(`round ${round + 1} ${mode}: ${opts.idle} idle connections`);
    const r = await idle(mode);
    report.runs.idle.push({ mode, ...r });
    log(`${mode} idle: ${JSON.stringify(r)}`);
  }
  for (const mode of Object.keys(MODES)) {
    log(`round ${round + 1} ${mode}: fanout to ${opts.subs}`);
    report.runs.fanout.push({ mode, ...(await fanout(mode)) });
  }
}
for (const mode of ['off', 'once']) {
  const runs = report.runs.idle.filter((r) => r.mode === mode);
  report.idle[mode] = { negotiated: runs[0].negotiated, kib_per_connection: median(runs.map((r) => r.kib_per_connection)) };
  log(`${mode}: presence_state of ${opts.members} members`);
  report.presence[mode] = await presence(mode);
}
for (const mode of Object.keys(MODES)) {
  const runs = report.runs.fanout.filter((r) => r.mode === mode);
  report.fanout[mode] = {};
  for (const name of ['new_msg', 'json_4k']) {
    const rs = runs.map((r) => r[name]);
    report.fanout[mode][name] = {
      payload_bytes: rs[0].payload_bytes,
      cpu_us_per_delivery: median(rs.map((r) => r.cpu_us_per_delivery)),
      wire_bytes_per_delivery: median(rs.map((r) => r.wire_bytes_per_delivery)),
      lost: rs.reduce((n, r) => n + r.lost, 0),
    };
  }
  report.fanout[mode].deflate_broadcasts = median(runs.map((r) => r.deflate_broadcasts));
}
report.idle.extra_bytes_per_connection_with_compression = Math.round((report.idle.once.kib_per_connection - report.idle.off.kib_per_connection) * 1024);
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
process.exit(0);
