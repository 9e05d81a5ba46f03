#!/usr/bin/env node
// Kill one of three nodes under load (issue 16, "a cluster run"): its clients reconnect
// to the other nodes and rejoin with `since`; reports loss (goal 0), duplicates, order,
// recovered joins and the time until every client of the killed node is back.
//
//   node scripts/measure-cluster-kill.mjs [--subscribers N (600)] [--rate R (200)]
//        [--seconds S (12)] [--kill-at K (4)]
//
// One redis-server and three `ringcast serve --cores 1 --redis` nodes (release build,
// RINGCAST_BIN to override). N subscribers (raw WebSockets speaking the V2 protocol, as
// the phoenix client does: the position of the last `new_msg` is kept, and a rejoin
// sends it as `since`) spread over the three nodes, on one `rooms:*` topic (history in
// Redis). A publisher on node 0 sends `new_msg` at R per second for S seconds; node 2
// is SIGKILLed at K seconds. Its subscribers reconnect at once to node 0 or 1. Every
// subscriber must end with every message exactly once, in order. Loopback only; stops
// by itself (hard limit 5 min). Uses `ws` from tests/e2e/node_modules.

import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import crypto from 'node:crypto';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(ROOT, 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');
const opts = { subscribers: 600, rate: 200, seconds: 12, 'kill-at': 4 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '');
  if (!(key in opts)) throw new Error(`unknown option ${process.argv[i]}`);
  opts[key] = Number(process.argv[i + 1]);
}
const BIN = process.env.RINGCAST_BIN || path.join(ROOT, 'target', 'release', 'ringcast');
const SECRET = 'kill-secret';
const TOPIC = 'rooms:kill';
const log = (m) => process.stderr.write(`[measure-cluster-kill] ${m}\n`);
setTimeout(() => { log('hard limit reached'); process.exit(2); }, 300_000).unref();

const freePort = () => new Promise((resolve) => {
  const s = net.createServer();
  s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
const waitLine = (proc, text) => new Promise((resolve, reject) => {
  let buf = '';
  const on = (d) => { buf += d; if (buf.includes(text)) { proc.stderr?.off('data', on); proc.stdout?.off('data', on); resolve(); } };
  proc.stderr?.on('data', on);
  proc.stdout?.on('data', on);
  proc.on('exit', (c) => reject(new Error(`exited ${c} before "${text}": ${buf.slice(-500)}`)));
});
const token = (user) => {
  const claims = Buffer.from(JSON.stringify({ user_id: user, iat: Math.floor(Date.now() / 1000) })).toString('base64url');
  return `${claims}.${crypto.createHmac('sha256', SECRET).update(claims).digest('base64url')}`;
};

const redisPort = await freePort();
const redis = spawn('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: ['ignore', 'pipe', 'pipe'] });
await waitLine(redis, 'Ready to accept connections');
const nodes = [];
for (let i = 0; i < 3; i++) {
  const port = await freePort();
  const proc = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '1', '--secret', SECRET, '--max-rate', '1000000',
    '--redis', `redis://127.0.0.1:${redisPort}`, '--cluster-secret', 'c', '--node-name', `kill-${i}`], { stdio: ['ignore', 'ignore', 'pipe'] });
  await waitLine(proc, 'Redis link up');
  nodes.push({ port, proc, alive: true });
}
const cleanup = () => { for (const p of [...nodes.map((n) => n.proc), redis]) p.kill('SIGKILL'); };
process.on('exit', cleanup);

/** A subscriber: joins TOPIC on `node`, keeps every new_msg body and the last position. */
class Sub {
  constructor(i) { this.i = i; this.user = `s${i}`; this.bodies = []; this.pos = null; this.ref = 0; this.rejoins = []; }

  connect(nodeIndex) {
    this.node = nodeIndex;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${nodes[nodeIndex].port}/socket/websocket?vsn=2.0.0&token=${token(this.user)}`, { perMessageDeflate: false });
      this.ws = ws;
      const joinRef = String(++this.ref);
      const params = { name: this.user, ...(this.pos ? { since: this.pos } : {}) };
      ws.on('open', () => ws.send(JSON.stringify([joinRef, joinRef, TOPIC, 'phx_join', params])));
      ws.on('message', (data) => {
        const [, ref, topic, event, payload] = JSON.parse(data);
        if (topic !== TOPIC) return;
        if (event === 'phx_reply' && ref === joinRef) {
          if (payload.status !== 'ok') { reject(new Error(`${this.user}: join ${JSON.stringify(payload)}`)); return; }
          this.pos = this.pos || payload.response.position;
          resolve(payload.response);
        } else if (event === 'new_msg') {
          this.bodies.push(Number(payload.body));
          if (ref) this.pos = ref;
        }
      });
      ws.on('error', () => {});
      ws.on('close', () => this.onClose?.());
    });
  }
}

// Subscribers, round robin over the nodes, in batches.
const subs = Array.from({ length: opts.subscribers }, (_, i) => new Sub(i));
for (let k = 0; k < subs.length; k += 100) await Promise.all(subs.slice(k, k + 100).map((s) => s.connect(s.i % 3)));
log(`${subs.length} subscribers joined ${TOPIC} on 3 nodes`);

const pub = new Sub('pub');
pub.user = 'publisher';
await pub.connect(0);
const killed = subs.filter((s) => s.node === 2);
let killedAt = 0;
const recovery = [];
for (const s of killed) {
  s.onClose = () => {
    if (nodes[2].alive) return;
    const t = performance.now();
    const to = s.i % 2; // node 0 or 1
    s.connect(to).then((r) => { s.rejoins.push(r); recovery.push(performance.now() - t); }, (e) => log(e.message));
  };
}
let sent = 0;
const t0 = performance.now();
while (performance.now() - t0 < opts.seconds * 1000) {
  const due = Math.floor(((performance.now() - t0) / 1000) * opts.rate);
  for (; sent < due; sent++) pub.ws.send(JSON.stringify([null, null, TOPIC, 'new_msg', { body: String(sent) }]));
  if (!killedAt && performance.now() - t0 >= opts['kill-at'] * 1000) {
    nodes[2].alive = false;
    nodes[2].proc.kill('SIGKILL');
    killedAt = sent;
    log(`SIGKILLed node 2 after ${sent} messages; ${killed.length} subscribers reconnect`);
  }
  await sleep(5);
}
await sleep(3000);

let missing = 0; let dups = 0; let outOfOrder = 0; let perfect = 0;
for (const s of subs) {
  const seen = new Set(s.bodies);
  dups += s.bodies.length - seen.size;
  for (let k = 0; k < sent; k++) if (!seen.has(k)) missing++;
  for (let k = 1; k < s.bodies.length; k++) if (s.bodies[k] < s.bodies[k - 1]) outOfOrder++;
  if (seen.size === sent && s.bodies.length === sent) perfect++;
}
recovery.sort((x, y) => x - y);
const report = {
  host: os.hostname(), cpus: os.cpus().length, options: opts,
  sent, killed_at_message: killedAt, subscribers: subs.length, on_killed_node: killed.length,
  rejoined: recovery.length,
  recovered_true: killed.filter((s) => s.rejoins.some((r) => r.recovered === true)).length,
  recovered_false: killed.filter((s) => s.rejoins.some((r) => r.recovered === false)).length,
  missing, duplicates: dups, out_of_order: outOfOrder, subscribers_with_every_message_once_in_order: perfect,
  time_to_rejoin_ms: recovery.length ? {
    p50: +recovery[Math.floor(recovery.length / 2)].toFixed(1), max: +recovery[recovery.length - 1].toFixed(1),
  } : null,
};
process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
cleanup();
process.exit(0);
