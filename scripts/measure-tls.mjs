#!/usr/bin/env node
// What TLS costs ringcast, plain and TLS side by side in one run (issue 13): memory per
// idle joined connection, and server CPU per delivery of a fanout.
//
//   node scripts/measure-tls.mjs [--idle N (10000)] [--subs K (1000)] [--msgs M (1000)] [--paced P (200)]
//   RINGCAST_BIN=/path/to/ringcast node scripts/measure-tls.mjs
//
// For each mode (plain with parking on, plain with RINGCAST_PARK=off, TLS with a
// self-signed certificate) it starts a fresh `ringcast serve --cores 1` (release build,
// pinned to CPU 0 when taskset is there), and:
// - idle: opens N raw `ws` connections joining `bench:idle`, waits 3 s (idle WebSocket
//   connections park after 1 s), and reads VmRSS: (after - before) / N;
// - fanout: K subscribers of `bench:fan`; one of them pushes M `new_msg` (100-byte body)
//   as fast as the server takes them, and every subscriber counts what it gets; the
//   server's CPU time (/proc/PID/stat utime + stime) over the fanout divided by K x M
//   deliveries is CPU-us per delivery. Loss is reported (it should be 0). Burst: the
//   messages come 50 at a time, so each connection's write carries many frames (one
//   encryption for all of them under TLS). Paced: P messages 20 ms apart, a write and
//   an encryption per delivery.
// Everything is on 127.0.0.1; the JSON report goes to stdout, progress to stderr. Exits
// by itself (hard limit 300 s). Uses `ws` from tests/e2e/node_modules (`npm ci` there).

import { spawn, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');

const opts = { idle: 10000, subs: 1000, msgs: 1000, paced: 200 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in opts)) throw new Error(`unknown option ${process.argv[i]}`);
  opts[key] = Number(process.argv[i + 1]);
  if (!Number.isInteger(opts[key]) || opts[key] < 1) throw new Error(`--${key} takes a positive integer`);
}
if (opts.idle > 18000 || opts.subs > 18000) throw new Error('this process may hold at most 20,000 open files');
const BIN = process.env.RINGCAST_BIN || path.join(ROOT, 'target', 'release', 'ringcast');
const SECRET = `tls-${crypto.randomBytes(6).toString('hex')}`;
const log = (m) => process.stderr.write(`[measure-tls] ${m}\n`);
const hard = setTimeout(() => { log('hard limit of 300 s reached'); process.exit(2); }, 300_000);
hard.unref();

function token(user) {
  const claims = Buffer.from(JSON.stringify({ user_id: String(user), iat: Math.floor(Date.now() / 1000) })).toString('base64url');
  return `${claims}.${crypto.createHmac('sha256', SECRET).update(claims).digest('base64url')}`;
}

const taskset = spawnSync('taskset', ['--version']).status === 0 && os.cpus().length > 1;
let nextPort = 19300 + Math.floor(Math.random() * 500);

async function start(mode) {
  const port = nextPort++;
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '1', '--secret', SECRET, '--max-rate', '1000000'];
  if (mode === 'tls') args.push('--tls-self-signed');
  const env = { ...process.env, RINGCAST_PARK: mode === 'plain-unparked' ? 'off' : 'on' };
  const proc = taskset ? spawn('taskset', ['-c', '0', BIN, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] })
    : spawn(BIN, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${mode}: the server did not listen`)), 10000);
    proc.stderr.on('data', (d) => { if (String(d).includes('listening on')) { clearTimeout(t); resolve(); } });
    proc.on('exit', () => reject(new Error(`${mode}: the server exited`)));
  });
  const scheme = mode === 'tls' ? 'wss' : 'ws';
  return { proc, url: (user) => `${scheme}://127.0.0.1:${port}/socket/websocket?vsn=2.0.0&token=${token(user)}` };
}

const rssKb = (pid) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]);
function cpuSecs(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

/** Opens `n` connections joining `topic`, 200 at a time; `onMsg` sees every later frame. */
async function open(server, n, topic, prefix, onMsg) {
  const socks = [];
  for (let i = 0; i < n; i += 200) {
    await Promise.all(Array.from({ length: Math.min(200, n - i) }, (_, k) => new Promise((resolve, reject) => {
      const ws = new WebSocket(server.url(`${prefix}${i + k}`), { rejectUnauthorized: false, perMessageDeflate: false });
      let joined = false;
      ws.on('open', () => ws.send(JSON.stringify(['1', '1', topic, 'phx_join', {}])));
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
    for (const s of socks) s.terminate();
    return { connections: opts.idle, rss_before_kb: before, rss_after_kb: after, kib_per_connection: +((after - before) / opts.idle).toFixed(2) };
  } finally {
    server.proc.kill('SIGKILL');
  }
}

async function fanout(mode, msgs, gapMs) {
  const server = await start(mode);
  try {
    let received = 0;
    const socks = await open(server, opts.subs, 'bench:fan', 'f', () => { received++; });
    await sleep(1500);
    const expected = opts.subs * msgs;
    const body = 'x'.repeat(100);
    const cpu0 = cpuSecs(server.proc.pid);
    const t0 = performance.now();
    const sender = socks[0];
    for (let m = 0; m < msgs; m++) {
      sender.send(JSON.stringify(['1', String(m + 2), 'bench:fan', 'new_msg', { body }]));
      if (gapMs) await sleep(gapMs);
      else if (m % 50 === 49) await sleep(1);
    }
    const deadline = performance.now() + 60_000;
    let last = -1;
    let stillSince = performance.now();
    while (received < expected && performance.now() < deadline) {
      await sleep(50);
      if (received !== last) { last = received; stillSince = performance.now(); } else if (performance.now() - stillSince > 5000) break;
    }
    const secs = (performance.now() - t0) / 1000;
    const cpu = cpuSecs(server.proc.pid) - cpu0;
    for (const s of socks) s.terminate();
    return {
      subscribers: opts.subs, messages: msgs, gap_ms: gapMs, expected, received, lost: expected - received,
      seconds: +secs.toFixed(2), server_cpu_secs: +cpu.toFixed(2),
      cpu_us_per_delivery: +((cpu * 1e6) / Math.max(1, received)).toFixed(3),
    };
  } finally {
    server.proc.kill('SIGKILL');
  }
}

const report = { binary: BIN, host: os.hostname(), cpus: os.cpus().length, pinned: taskset, options: opts, idle: {}, fanout: {} };
for (const mode of ['plain', 'plain-unparked', 'tls']) {
  log(`${mode}: ${opts.idle} idle connections`);
  report.idle[mode] = await idle(mode);
  log(`${mode}: ${JSON.stringify(report.idle[mode])}`);
}
report.paced = {};
for (const mode of ['plain', 'tls']) {
  log(`${mode}: burst fanout of ${opts.msgs} to ${opts.subs}`);
  report.fanout[mode] = await fanout(mode, opts.msgs, 0);
  log(`${mode}: ${JSON.stringify(report.fanout[mode])}`);
  log(`${mode}: paced fanout of ${opts.paced} to ${opts.subs}, 20 ms apart`);
  report.paced[mode] = await fanout(mode, opts.paced, 20);
  log(`${mode}: ${JSON.stringify(report.paced[mode])}`);
}
const ratio = (r) => +(r.tls.cpu_us_per_delivery / r.plain.cpu_us_per_delivery).toFixed(2);
report.tls_over_plain_cpu_per_delivery = { burst: ratio(report.fanout), paced: ratio(report.paced) };
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
process.exit(0);
