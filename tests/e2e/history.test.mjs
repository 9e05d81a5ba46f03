// History and recovery on `rooms:*` (seed-app.md, "History and recovery"; issue 16) with
// `--cores 2`: every broadcast carries its position "<epoch>:<offset>" in the ref slot
// (V2 and V1), the join reply carries `position`, and a join with `since` gets
// `recovered` and the broadcasts it missed, exactly once and in order, over WebSocket and
// long-poll, with the unmodified phoenix client doing what the snippet does.

import { before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, connect, rawConnect, join, push, waitFor, sleep,
} from './lib.mjs';
import { API_KEY, lpConnect, closeLpClients, apiStats } from './httplib.mjs';

const POSITION = /^[0-9a-f]{1,16}:\d+$/;
const offset = (pos) => Number(pos.split(':')[1]);
const epoch = (pos) => pos.split(':')[0];

/** The core that owns `topic` on a server of `cores` cores (FNV-1a 64, as the server does). */
function ownerCore(topic, cores) {
  let h = 0xcbf29ce484222325n;
  for (const b of Buffer.from(topic, 'utf8')) {
    h ^= BigInt(b);
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
  }
  return Number(h % BigInt(cores));
}

/** A topic named `prefix<n>` whose owner core is (`same`) or is not the given core. */
function topicFor(prefix, core, same) {
  for (let n = 0; ; n++) {
    const topic = `${prefix}${n}`;
    if ((ownerCore(topic, 2) === Number(core)) === same) return topic;
  }
}

let server;
before(async () => { server = await startServer({ cores: 2, args: ['--api-key', API_KEY] }); });
after(async () => { await closeLpClients(); await server.stop(); });
afterEach(closeLpClients);

const isBroadcast = (topic, event) => (m) => m.topic === topic && m.event === event && m.join_ref === null;

e2e('every broadcast carries "<epoch>:<offset>" in the ref slot, the same for V2 and V1 subscribers on both cores', async () => {
  const topic = 'rooms:pos-shape';
  const clients = [];
  for (let i = 0; i < 6; i++) {
    clients.push(await rawConnect(server.port, { userId: `ps${i}`, vsn: i % 2 ? '1.0.0' : '2.0.0' }));
  }
  assert.deepEqual(new Set(clients.map((c) => c.core)), new Set(['0', '1']), 'subscribers on both cores');
  const joinPositions = [];
  for (const [i, c] of clients.entries()) {
    let reply;
    if (i % 2) {
      c.send({ topic, event: 'phx_join', payload: {}, ref: 'j' });
      reply = (await c.reply('j')).payload;
    } else {
      reply = (await c.join(topic)).payload;
    }
    assert.equal(reply.status, 'ok');
    assert.match(reply.response.position, POSITION);
    assert.equal(reply.response.recovered, undefined, 'no since: no recovered');
    joinPositions.push(reply.response.position);
  }
  const [start] = joinPositions;
  assert.equal(offset(start), 0, 'nothing broadcast yet on a new room');
  assert.ok(joinPositions.every((p) => p === start), 'one position for all');

  clients[0].send(['1', 'm1', topic, 'new_msg', { body: 'one' }]);
  clients[2].send(['1', 'm2', topic, 'new_msg', { body: 'two' }]);
  clients[4].send(['1', 'm3', topic, 'shout', { body: 'three' }]);
  for (const [i, c] of clients.entries()) {
    const got = [];
    for (let k = 0; k < (i === 4 ? 2 : 3); k++) {
      got.push(await c.next((m) => m.topic === topic && ['new_msg', 'shout'].includes(m.event)));
    }
    const refs = got.map((m) => m.ref);
    for (const r of refs) {
      assert.equal(typeof r, 'string');
      assert.match(r, POSITION, 'a position, never a plain decimal');
      assert.equal(epoch(r), epoch(start));
    }
    const offsets = refs.map(offset);
    assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), `client ${i} gets them in the offsets' order`);
    if (i !== 4) assert.deepEqual(offsets, [1, 2, 3], `client ${i}: one offset per broadcast, from 1`);
    if (i % 2) assert.equal(got[0].join_ref, undefined, 'V1 has no join_ref');
  }
  // The same broadcast has the same ref everywhere (one frame, encoded once per serializer).
  const byBody = new Map();
  for (const c of clients) {
    for (const m of c.all.filter((x) => x.event === 'new_msg')) {
      const prev = byBody.get(m.payload.body);
      if (prev) assert.equal(m.ref, prev);
      else byBody.set(m.payload.body, m.ref);
    }
  }
  // Pushes and presence take no position.
  for (const c of clients) {
    for (const m of c.all.filter((x) => ['welcome', 'presence_state', 'presence_diff'].includes(x.event))) {
      assert.equal(m.ref, null, `${m.event} has no ref`);
    }
  }
  // A later join's position is the latest broadcast's.
  const late = await rawConnect(server.port, { userId: 'pslate' });
  assert.equal((await late.join(topic)).payload.response.position, `${epoch(start)}:3`);
});

e2e('a since that is not a position is refused with {"reason":"invalid"}; since null is no since', async () => {
  const c = await rawConnect(server.port, { userId: 'inv' });
  let n = 0;
  for (const since of [5, '5', 'x:1', 'A:1', '1f:', ':3', '1f:-1', {}, ['1f:1'], true]) {
    n += 1;
    const r = await c.join('rooms:inv', { since }, `i${n}`);
    assert.deepEqual(r.payload, { status: 'error', response: { reason: 'invalid' } }, `since ${JSON.stringify(since)}`);
  }
  const ok = await c.join('rooms:inv', { since: null }, 'ok1');
  assert.equal(ok.payload.status, 'ok');
  assert.match(ok.payload.response.position, POSITION);
  assert.equal(ok.payload.response.recovered, undefined);
  const phx = await connect(server.port, 'invphx');
  assert.deepEqual(await join(phx.channel('rooms:inv2', { since: 'nope' })), { status: 'error', response: { reason: 'invalid' } });
});

/**
 * The snippet: a room whose params closure sends `since` once it knows a
 * position, and that records every new_msg body with its ref.
 */
function recoveringRoom(client, topic) {
  const state = { pos: null, got: [], refs: [], replies: [] };
  const room = client.channel(topic, () => (state.pos ? { since: state.pos } : {}));
  room.on('new_msg', (msg, ref) => {
    if (ref) state.pos = ref;
    state.got.push(msg.body);
    state.refs.push(ref);
  });
  const joined = new Promise((resolve, reject) => {
    room.join()
      .receive('ok', (r) => { state.replies.push(r); state.pos = state.pos || r.position; resolve(); })
      .receive('error', (r) => reject(new Error(`join refused: ${JSON.stringify(r)}`)));
  });
  return { room, state, joined };
}

/** Sends `count` new_msg bodies "1".."count" from `publisher`'s `chan`, `every` ms apart. */
async function publish(chan, count, every, from = 1) {
  for (let i = from; i < from + count; i++) {
    chan.push('new_msg', { body: String(i) });
    await sleep(every);
  }
}

const bodies = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => String(from + i));

async function replayed() {
  const stats = await apiStats(server.port);
  assert.equal(stats.status, 200);
  return stats.json.history_replayed;
}

for (const same of [false, true]) {
  const where = same ? 'on the topic\'s owner core' : 'on the other core';

  e2e(`WebSocket: a phoenix client whose connection drops mid-stream recovers every missed new_msg exactly once, in order (${where})`, async () => {
    const sub = await connect(server.port, `wsr${same}`);
    const topic = topicFor(`rooms:wsrec${same}-`, sub.core, same);
    const { state, joined } = recoveringRoom(sub, topic);
    await joined;
    const pub = await connect(server.port, `wsp${same}`);
    const chan = await pub.joined(topic);
    const before = await replayed();

    const sending = publish(chan, 60, 10);
    await waitFor(() => state.got.length >= 15, { timeout: 3000, what: '15 messages before the drop' });
    sub.socket.conn.terminate(); // the network goes: no close frame, the client reconnects by itself
    await sending;
    await waitFor(() => state.got.length >= 60, { timeout: 5000, what: `all 60 (got ${state.got.length})` });
    await sleep(200);
    assert.deepEqual(state.got, bodies(1, 60), 'every message once, in order');
    assert.equal(state.replies.length, 2, 'joined, then rejoined once');
    assert.equal(state.replies[1].recovered, true);
    assert.equal(state.refs.map(offset).join(), bodies(1, 60).join(), 'offsets 1..60 as sent');
    assert.ok((await replayed()) > before, 'some came from history');
    assert.ok(sub.closes.length >= 1, 'the connection did drop');
    sub.closes.length = 0; // the drop was this test's own doing
  }, { timeout: 15000 });

  e2e(`long-poll: a phoenix LongPoll client that goes away mid-stream and comes back recovers every missed new_msg exactly once, in order (${where})`, async () => {
    const sub = await lpConnect(server.httpUrl, `lpr${same}`);
    const core = sub.session.split('.')[0];
    const topic = topicFor(`rooms:lprec${same}-`, core, same);
    const { state, joined } = recoveringRoom(sub, topic);
    await joined;
    const pub = await connect(server.port, `lpp${same}`);
    const chan = await pub.joined(topic);
    const before = await replayed();

    const sending = publish(chan, 50, 15);
    await waitFor(() => state.got.length >= 10, { timeout: 4000, what: '10 messages before going away' });
    sub.socket.disconnect();
    await sleep(300);
    sub.socket.connect();
    await sending;
    await waitFor(() => state.got.length >= 50, { timeout: 8000, what: `all 50 (got ${state.got.length})` });
    await sleep(300);
    assert.deepEqual(state.got, bodies(1, 50), 'every message once, in order');
    assert.equal(state.replies.length, 2, 'joined, then rejoined once');
    assert.equal(state.replies[1].recovered, true);
    assert.ok((await replayed()) > before, 'some came from history');
  }, { timeout: 20000 });
}

e2e('a rejoin with since gets the reply, then the replay, then live broadcasts, with none twice (raw client, both cores)', async () => {
  for (const core of ['0', '1']) {
    let c;
    for (let i = 0; !c || c.core !== core; i++) {
      if (c) await c.close();
      c = await rawConnect(server.port, { userId: `order${core}${i}` });
    }
    const topic = topicFor(`rooms:order${core}-`, core, false);
    const start = (await c.join(topic)).payload.response.position;
    const pub = await rawConnect(server.port, { userId: `orderpub${core}` });
    await pub.join(topic);
    for (let i = 1; i <= 5; i++) pub.send(['1', `p${i}`, topic, 'new_msg', { body: String(i) }]);
    await waitFor(() => c.all.filter(isBroadcast(topic, 'new_msg')).length === 5, { what: 'five on the first join' });
    c.send(['1', 'lv', topic, 'phx_leave', {}]);
    await c.reply('lv');
    for (let i = 6; i <= 8; i++) pub.send(['1', `p${i}`, topic, 'new_msg', { body: String(i) }]);
    await waitFor(() => pub.all.filter(isBroadcast(topic, 'new_msg')).length === 8, { what: 'eight at the publisher' });
    const mark = c.all.length;
    // Joins again from the fifth; two more are published while the join is on its way.
    c.send(['2', '2', topic, 'phx_join', { since: `${epoch(start)}:5` }]);
    for (let i = 9; i <= 10; i++) pub.send(['1', `p${i}`, topic, 'new_msg', { body: String(i) }]);
    await waitFor(() => c.all.filter(isBroadcast(topic, 'new_msg')).length === 10, { what: 'ten in all' });
    await sleep(150);
    const after = c.all.slice(mark).filter((m) => m.event === 'phx_reply' || isBroadcast(topic, 'new_msg')(m));
    assert.equal(after[0].event, 'phx_reply', 'the reply comes first');
    assert.equal(after[0].payload.response.recovered, true);
    const got = after.slice(1).map((m) => m.payload.body);
    assert.deepEqual(got, bodies(6, 10), `core ${core}: 6..8 replayed, 9..10 live, none twice`);
    assert.deepEqual(after.slice(1).map((m) => offset(m.ref)), [6, 7, 8, 9, 10]);
    await c.close();
    await pub.close();
  }
});

e2e('a whisper is replayed, through handle_out, to its addressee only, carrying its position', async () => {
  const topic = 'rooms:whisper-rec';
  const to = await rawConnect(server.port, { userId: 'wto' });
  const by = await rawConnect(server.port, { userId: 'wby' });
  const start = (await to.join(topic)).payload.response.position;
  await by.join(topic);
  const from = await rawConnect(server.port, { userId: 'wfrom' });
  await from.join(topic);
  for (const c of [to, by]) {
    c.send(['1', 'lv', topic, 'phx_leave', {}]);
    await c.reply('lv');
  }
  from.send(['1', 'a', topic, 'new_msg', { body: 'before' }]);
  from.send(['1', 'b', topic, 'whisper', { to: 'wto', body: 'psst' }]);
  from.send(['1', 'c', topic, 'new_msg', { body: 'after' }]);
  await from.reply('b');
  await waitFor(() => from.all.filter(isBroadcast(topic, 'new_msg')).length === 2, { what: 'both at the sender' });
  const since = `${epoch(start)}:0`;
  const rTo = await to.join(topic, { since }, '5');
  const rBy = await by.join(topic, { since }, '5');
  assert.equal(rTo.payload.response.recovered, true);
  assert.equal(rBy.payload.response.recovered, true);
  const seq = async (c, n) => {
    const out = [];
    for (let i = 0; i < n; i++) out.push(await c.next((m) => m.topic === topic && ['new_msg', 'whisper'].includes(m.event) && (m.join_ref === null || m.join_ref === '5')));
    return out;
  };
  const gotTo = await seq(to, 3);
  assert.deepEqual(gotTo.map((m) => [m.event, m.payload.body, offset(m.ref)]),
    [['new_msg', 'before', 1], ['whisper', 'psst', 2], ['new_msg', 'after', 3]]);
  assert.equal(gotTo[1].join_ref, '5', 'the whisper is a push of the new join');
  const gotBy = await seq(by, 2);
  assert.deepEqual(gotBy.map((m) => [m.event, m.payload.body, offset(m.ref)]), [['new_msg', 'before', 1], ['new_msg', 'after', 3]]);
  await by.expectNone((m) => m.event === 'whisper', 300, 'whisper at the bystander');
});

e2e('recovered is false past the window (size and ttl) and for another epoch, and nothing is replayed', async () => {
  const small = await startServer({ cores: 2, args: ['--history-size', '5', '--history-ttl', '1s'] });
  try {
    const c = await rawConnect(small.port, { userId: 'win' });
    const pub = await rawConnect(small.port, { userId: 'winpub' });
    const topic = 'rooms:window';
    const start = (await c.join(topic)).payload.response.position;
    await pub.join(topic);
    for (let i = 1; i <= 8; i++) pub.send(['1', `p${i}`, topic, 'new_msg', { body: String(i) }]);
    await waitFor(() => c.all.filter(isBroadcast(topic, 'new_msg')).length === 8, { what: 'eight' });
    c.send(['1', 'lv', topic, 'phx_leave', {}]);
    await c.reply('lv');
    const e = epoch(start);

    const tooOld = await c.join(topic, { since: `${e}:2` }, '2');
    assert.deepEqual(tooOld.payload.response, { position: `${e}:8`, recovered: false }, 'only 4..8 are kept');
    const kept = await c.join(topic, { since: `${e}:3` }, '3');
    assert.deepEqual(kept.payload.response, { position: `${e}:8`, recovered: true }, '4..8 are all kept');
    const wrongEpoch = await c.join(topic, { since: `${e === 'a' ? 'b' : 'a'}:8` }, '4');
    assert.equal(wrongEpoch.payload.response.recovered, false);
    const ahead = await c.join(topic, { since: `${e}:9` }, '5');
    assert.equal(ahead.payload.response.recovered, false);
    await sleep(1200);
    const expired = await c.join(topic, { since: `${e}:7` }, '6');
    assert.deepEqual(expired.payload.response, { position: `${e}:8`, recovered: false }, '8 expired after 1 s');
    const latest = await c.join(topic, { since: `${e}:8` }, '7');
    assert.equal(latest.payload.response.recovered, true, 'nothing missed since the latest');
    await sleep(200);
    const replays = c.all.filter((m) => isBroadcast(topic, 'new_msg')(m)).length;
    assert.equal(replays, 8 + 5, 'only the recovered join (3 -> 4..8) replayed anything');
    await c.close();
    await pub.close();
  } finally {
    await small.stop();
  }
});

e2e('after a restart (no Redis) the epoch is new: recovered is false and nothing is replayed', async () => {
  const topic = 'rooms:restart';
  const first = await startServer({ cores: 2 });
  let since;
  try {
    const c = await connect(first.port, 'rs1');
    const { state, joined } = recoveringRoom(c, topic);
    await joined;
    const pub = await connect(first.port, 'rs2');
    const chan = await pub.joined(topic);
    chan.push('new_msg', { body: 'x' });
    await waitFor(() => state.got.length === 1, { what: 'one message' });
    since = state.pos;
    assert.equal(offset(since), 1);
    await c.close();
    await pub.close();
  } finally {
    await first.stop();
  }
  const second = await startServer({ cores: 2 });
  try {
    const c = await rawConnect(second.port, { userId: 'rs3' });
    const r = await c.join(topic, { since });
    assert.equal(r.payload.response.recovered, false);
    assert.notEqual(epoch(r.payload.response.position), epoch(since), 'a new epoch');
    assert.equal(offset(r.payload.response.position), 0);
    await c.expectNone(isBroadcast(topic, 'new_msg'), 200, 'replay');
  } finally {
    await second.stop();
  }
});
