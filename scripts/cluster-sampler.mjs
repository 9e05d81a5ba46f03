// Timing subscribers of scripts/cluster-1m.sh: opens --per-node Phoenix V2 WebSocket
// connections to every node, joins --topic, prints {"ev":"ready",...} once all are joined,
// then waits (at most --timeout-ms) until each got a `new_msg` whose body is
// "<seq>:<send unix nanos>" and prints {"ev":"result",...}: per node and overall, how many
// got it and the send-to-receive latency (min/p50/p90/p99/max, microseconds).
//
// They join after the loadgens' connections, so a node that delivers in join order
// reaches them last. Uses the `ws` package of tests/e2e (npm ci there first).
//
//   node scripts/cluster-sampler.mjs --ports 4700,4701 --topic bench:x --secret S
//        [--per-node 20] [--timeout-ms 60000]

import crypto from 'node:crypto';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', 'tests', 'e2e', 'package.json'));
const WebSocket = require('ws');

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const ports = String(args.ports || '').split(',').filter(Boolean).map(Number);
const topic = args.topic;
const secret = args.secret;
const perNode = Number(args['per-node'] || 20);
const timeoutMs = Number(args['timeout-ms'] || 60000);
if (!ports.length || !topic || !secret) {
  console.error('usage: cluster-sampler.mjs --ports P1,P2 --topic T --secret S [--per-node N] [--timeout-ms MS]');
  process.exit(1);
}

const nowNanos = () => BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e3)) * 1000n;
const b64 = (s) => Buffer.from(s).toString('base64url');
function token(user) {
  const claims = b64(JSON.stringify({ user_id: user, iat: Math.floor(Date.now() / 1000) }));
  return `${claims}.${crypto.createHmac('sha256', secret).update(claims).digest('base64url')}`;
}
const out = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

const subs = [];
function open(port, node, k) {
  return new Promise((resolve) => {
    const sub = { node, port, joined: false, latencyNs: null, extra: 0, error: null };
    subs.push(sub);
    const ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?token=${token(`sampler${node}_${k}`)}&vsn=2.0.0`);
    sub.ws = ws;
    const timer = setTimeout(() => { sub.error = 'join timeout'; resolve(); }, 30000);
    ws.on('open', () => ws.send(JSON.stringify(['1', '1', topic, 'phx_join', {}])));
    ws.on('message', (data) => {
      const now = nowNanos();
      let msg;
      try { msg = JSON.parse(data.toString()); } catch { return; }
      const [, ref, t, event, payload] = msg;
      if (event === 'phx_reply' && ref === '1') {
        clearTimeout(timer);
        if (payload.status === 'ok') sub.joined = true; else sub.error = `join ${JSON.stringify(payload)}`;
        resolve();
        return;
      }
      if (t === topic && event === 'new_msg') {
        const m = /^(\d+):(\d+)$/.exec(payload?.body ?? '');
        if (!m) return;
        if (sub.latencyNs === null) {
          sub.latencyNs = Number(now - BigInt(m[2]));
          checkDone();
        } else {
          sub.extra += 1;
        }
      }
    });
    ws.on('error', (e) => { sub.error = sub.error || `error ${e.message}`; clearTimeout(timer); resolve(); });
    ws.on('close', (code) => { if (!sub.closedBy) sub.error = sub.error || `closed ${code}`; clearTimeout(timer); resolve(); });
  });
}

let finished = false;
let doneTimer;
function checkDone() {
  if (subs.filter((s) => s.joined).every((s) => s.latencyNs !== null)) finish('all joined samplers got the broadcast');
}

function pct(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}
function stats(list) {
  const l = list.map((x) => x / 1000).sort((a, b) => a - b);
  return { count: l.length, min_us: l[0] ?? null, p50_us: pct(l, 50), p90_us: pct(l, 90), p99_us: pct(l, 99), max_us: l[l.length - 1] ?? null };
}

function finish(why) {
  if (finished) return;
  finished = true;
  clearTimeout(doneTimer);
  const joined = subs.filter((s) => s.joined);
  const got = joined.filter((s) => s.latencyNs !== null);
  const perNodeOut = ports.map((port, node) => {
    const mine = joined.filter((s) => s.node === node);
    return { node, port, joined: mine.length, received: mine.filter((s) => s.latencyNs !== null).length, ...stats(mine.filter((s) => s.latencyNs !== null).map((s) => s.latencyNs)) };
  });
  out({
    ev: 'result',
    why,
    samplers: subs.length,
    joined: joined.length,
    received: got.length,
    missing: joined.length - got.length,
    extra_deliveries: joined.reduce((a, s) => a + s.extra, 0),
    errors: subs.filter((s) => s.error).map((s) => `node ${s.node}: ${s.error}`).slice(0, 20),
    latency: stats(got.map((s) => s.latencyNs)),
    per_node: perNodeOut,
  });
  for (const s of subs) { s.closedBy = true; try { s.ws.terminate(); } catch { /* gone */ } }
  setTimeout(() => process.exit(0), 100);
}

// Open in batches so that a few thousand samplers do not all hit the nodes at once.
const tasks = [];
for (const [node, port] of ports.entries()) for (let k = 0; k < perNode; k++) tasks.push([port, node, k]);
for (let i = 0; i < tasks.length; i += 200) {
  await Promise.all(tasks.slice(i, i + 200).map(([port, node, k]) => open(port, node, k)));
}
const hb = setInterval(() => {
  for (const s of subs) if (s.joined && s.ws.readyState === WebSocket.OPEN) s.ws.send(JSON.stringify([null, 'hb', 'phoenix', 'heartbeat', {}]));
}, 20000);
hb.unref();
const joinedN = subs.filter((s) => s.joined).length;
out({ ev: 'ready', samplers: subs.length, joined: joinedN, errors: subs.filter((s) => s.error).map((s) => `node ${s.node}: ${s.error}`).slice(0, 20) });
doneTimer = setTimeout(() => finish('timeout'), timeoutMs);
