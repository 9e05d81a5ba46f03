// Presence in the seed app's `rooms:*` channel (seed-app.md "rooms:*", PROTOCOL.md §13),
// driven by the phoenix client's own `Presence` class on a `--cores 2` server.
//
// The server tracks every joined connection under key <user_id> with meta
// {"name": <join payload name or user id>, "online_at": "<unix secs>", "phx_ref"}; leaving,
// crashing and disconnecting untrack. Each core keeps a replica, and every member must get
// every diff exactly once whichever core it is on.
//
// Diffs on a topic are batched per core (the first change after a quiet spell goes out at
// once, later ones within 50 ms are merged), so the scenarios below space their steps by
// GAP ms wherever they count diff frames.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Presence } from 'phoenix';
import { e2e, startServer, connect, join, waitFor, sleep } from './lib.mjs';

let server;
before(async () => { server = await startServer({ cores: 2 }); });
after(async () => { await server.stop(); });

/** Spacing between presence changes: longer than the 50 ms batching window. */
const GAP = 120;

const clone = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));
const otherCore = (core) => (core === '0' ? '1' : '0');

let roomSeq = 0;
const room = (name) => `rooms:presence-${name}-${++roomSeq}`;

/** Connects as `userId` until the connection lands on `core` (bounded tries). */
async function connectOnCore(userId, core, opts = {}, tries = 40) {
  const seen = [];
  for (let i = 0; i < tries; i++) {
    const c = await connect(server.port, userId, opts);
    if (c.core === core) return c;
    seen.push(c.core);
    await c.close();
  }
  throw new Error(`no connection of user ${userId} landed on core ${core} in ${tries} tries (got ${seen.join(',')})`);
}

/**
 * A channel on `topic` with a phoenix `Presence` that records every onJoin/onLeave/onSync.
 * `rec.joins` / `rec.leaves` hold `{key, cur, pres}` (deep copies, taken at callback time).
 */
function tracked(client, topic, params = {}) {
  const chan = client.channel(topic, params);
  const presence = new Presence(chan);
  const rec = { client, topic, chan, presence, joins: [], leaves: [], syncs: 0 };
  presence.onJoin((key, cur, pres) => rec.joins.push({ key, cur: clone(cur), pres: clone(pres) }));
  presence.onLeave((key, cur, pres) => rec.leaves.push({ key, cur: clone(cur), pres: clone(pres) }));
  presence.onSync(() => { rec.syncs++; });
  return rec;
}

async function trackedJoined(client, topic, params = {}) {
  const rec = tracked(client, topic, params);
  const res = await join(rec.chan);
  assert.equal(res.status, 'ok', `join ${topic} as ${client.userId}: ${JSON.stringify(res)}`);
  return rec;
}

/** `{key: [phx_ref, ...]}` of a `Presence`, keys and refs sorted. */
function refsView(rec) {
  const out = {};
  for (const [key, refs] of rec.presence.list((key, p) => [key, p.metas.map((m) => m.phx_ref).sort()])) out[key] = refs;
  return Object.fromEntries(Object.entries(out).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** `{key: number of metas}` of a `Presence`. */
function shape(rec) {
  return Object.fromEntries(Object.entries(refsView(rec)).map(([k, refs]) => [k, refs.length]));
}

/** Waits until `rec`'s presence list has exactly the shape `want` (`{key: metas count}`). */
async function waitShape(rec, want, timeout = 3000) {
  try {
    await waitFor(() => {
      try { assert.deepEqual(shape(rec), want); return true; } catch { return false; }
    }, { timeout, what: `presence shape ${JSON.stringify(want)}` });
  } catch (err) {
    throw new Error(`user ${rec.client.userId} (core ${rec.client.core}) on ${rec.topic}: wanted ${JSON.stringify(want)}, `
      + `list is ${JSON.stringify(rec.presence.list((k, p) => [k, p.metas]))}; ${err.message}`);
  }
}

/** The presence_diff payloads `client` received on `topic`, in order. */
const diffsOf = (client, topic) => client.received(topic, 'presence_diff').map((m) => m.payload);

/** Every phx_ref under `side` ("joins" or "leaves") across `diffs`, in order (duplicates kept). */
const refsIn = (diffs, side) => diffs.flatMap((d) => Object.values(d[side] || {}).flatMap((p) => p.metas.map((m) => m.phx_ref)));

function assertNoDuplicates(list, what) {
  const dups = list.filter((r, i) => list.indexOf(r) !== i);
  assert.deepEqual(dups, [], `${what}: duplicated phx_refs ${JSON.stringify(dups)} in ${JSON.stringify(list)}`);
}

/**
 * A (user "1", name "ada"), then B (user "2"), then C (user "2" again, on the other core
 * than B) join `topic`, GAP ms apart; resolves once all three list {"1": 1 meta, "2": 2}.
 */
async function trio(topic, { bOpts = {} } = {}) {
  const a = await connect(server.port, '1');
  const b = await connect(server.port, '2', bOpts);
  const c = await connectOnCore('2', otherCore(b.core));
  assert.notEqual(b.core, c.core, 'B and C are on different cores');

  const A = await trackedJoined(a, topic, { name: 'ada' });
  await waitShape(A, { 1: 1 });
  await sleep(GAP);
  const B = await trackedJoined(b, topic, {});
  await waitShape(A, { 1: 1, 2: 1 });
  await waitShape(B, { 1: 1, 2: 1 });
  await sleep(GAP);
  const C = await trackedJoined(c, topic, {});
  for (const X of [A, B, C]) await waitShape(X, { 1: 1, 2: 2 });
  await sleep(GAP);
  return { a, b, c, A, B, C };
}

// ---------------------------------------------------------------------------

e2e('three members on two cores: list(), metas, names and onJoin', async () => {
  const topic = room('trio');
  const { a, b, c, A, B, C } = await trio(topic);

  const viewA = refsView(A);
  assert.deepEqual(Object.keys(viewA), ['1', '2']);
  for (const X of [B, C]) assert.deepEqual(refsView(X), viewA, `user ${X.client.userId} on core ${X.client.core} agrees with A`);
  const allRefs = [...viewA['1'], ...viewA['2']];
  assertNoDuplicates(allRefs, 'phx_refs are unique per track');

  const now = Math.floor(Date.now() / 1000);
  for (const X of [A, B, C]) {
    const byKey = Object.fromEntries(X.presence.list((key, p) => [key, p.metas]));
    assert.deepEqual(Object.keys(byKey).sort(), ['1', '2']);
    assert.equal(byKey['1'].length, 1);
    assert.equal(byKey['2'].length, 2);
    assert.equal(byKey['1'][0].name, 'ada', 'a join payload name becomes the meta name');
    for (const m of byKey['2']) assert.equal(m.name, '2', 'without a name the meta name is the user id');
    for (const m of [...byKey['1'], ...byKey['2']]) {
      assert.equal(typeof m.phx_ref, 'string');
      assert.ok(m.phx_ref.length > 0);
      assert.match(m.online_at, /^\d+$/, `online_at is a string of unix seconds: ${JSON.stringify(m)}`);
      assert.ok(Math.abs(Number(m.online_at) - now) < 60, `online_at ${m.online_at} is about now (${now})`);
      assert.deepEqual(Object.keys(m).sort(), ['name', 'online_at', 'phx_ref'], `meta fields: ${JSON.stringify(m)}`);
    }
  }

  // The metas of key "2" are B's and C's: each sees its own track arrive in a diff.
  const bOwn = refsIn(diffsOf(b, topic), 'joins').filter((r) => viewA['2'].includes(r));
  const cOwn = refsIn(diffsOf(c, topic), 'joins').filter((r) => viewA['2'].includes(r));
  const bRef = bOwn[0];
  const cRef = cOwn.find((r) => r !== bRef);
  assert.ok(bRef && cRef, `B and C saw their tracks: B ${JSON.stringify(bOwn)}, C ${JSON.stringify(cOwn)}`);

  // A: onJoin for "2" twice, first with no current presence and B's meta, then with B's
  // meta current and C's meta joining.
  const aJoins2 = A.joins.filter((j) => j.key === '2');
  assert.equal(aJoins2.length, 2, `A's onJoin for "2": ${JSON.stringify(aJoins2)}`);
  assert.equal(aJoins2[0].cur, undefined, 'first join of key "2": no current presence');
  assert.deepEqual(aJoins2[0].pres.metas.map((m) => m.phx_ref), [bRef]);
  assert.deepEqual(aJoins2[1].cur.metas.map((m) => m.phx_ref), [bRef]);
  assert.deepEqual(aJoins2[1].pres.metas.map((m) => m.phx_ref), [cRef]);
  assert.deepEqual(A.joins.filter((j) => j.key === '1').map((j) => j.pres.metas.map((m) => m.name)), [['ada']],
    'A saw its own track join once');
  assert.deepEqual(A.leaves, [], 'nobody left');

  // C came last: its presence_state had "1" and B's meta; then its own meta joined "2".
  const cState = c.received(topic, 'presence_state');
  assert.equal(cState.length, 1);
  assert.deepEqual(Object.keys(cState[0].payload).sort(), ['1', '2']);
  assert.deepEqual(cState[0].payload['2'].metas.map((m) => m.phx_ref), [bRef]);
  assert.equal(a.received(topic, 'presence_state').length, 1);
  assert.deepEqual(a.received(topic, 'presence_state')[0].payload, {}, 'the first member gets an empty presence_state');
  assert.ok(C.syncs >= 2 && A.syncs >= 3 && B.syncs >= 2, `onSync ran (A ${A.syncs}, B ${B.syncs}, C ${C.syncs})`);
}, { timeout: 10000 });

e2e('channel.leave(), then rejoin and crash: peers see "1" leave; it comes back after the auto-rejoin', async () => {
  const topic = room('leave-crash');
  const { a, A, B, C } = await trio(topic);
  const firstRef = refsView(A)['1'][0];

  // channel.leave() untracks A.
  const leaveRes = await new Promise((resolve) => {
    A.chan.leave().receive('ok', () => resolve('ok')).receive('timeout', () => resolve('timeout'));
  });
  assert.equal(leaveRes, 'ok');
  for (const X of [B, C]) {
    await waitShape(X, { 2: 2 });
    const left = X.leaves.filter((l) => l.key === '1');
    assert.equal(left.length, 1, `onLeave of "1" on user ${X.client.userId} core ${X.client.core}: ${JSON.stringify(X.leaves)}`);
    assert.deepEqual(left[0].pres.metas.map((m) => m.phx_ref), [firstRef]);
    assert.deepEqual(left[0].cur.metas, [], 'no meta of "1" is left');
  }
  await sleep(GAP);

  // A rejoins with a new channel object.
  const A2 = await trackedJoined(a, topic, { name: 'ada' });
  await waitShape(A2, { 1: 1, 2: 2 });
  for (const X of [B, C]) await waitShape(X, { 1: 1, 2: 2 });
  const secondRef = refsView(A2)['1'][0];
  assert.notEqual(secondRef, firstRef, 'a new track has a new phx_ref');
  assert.deepEqual(refsView(B), refsView(A2));
  await sleep(GAP);

  // crash: the server sends phx_error and untracks; the client rejoins after ~1 s.
  const leavesBefore = B.leaves.length;
  const crashedAt = Date.now();
  A2.chan.push('crash', {}, 3000);
  for (const X of [B, C]) await waitShape(X, { 2: 2 }, 2000);
  const goneAfter = Date.now() - crashedAt;
  assert.ok(goneAfter < 900, `"1" left ${goneAfter} ms after the crash, before the client's rejoin`);
  const crashLeave = B.leaves.slice(leavesBefore);
  assert.deepEqual(crashLeave.map((l) => [l.key, l.pres.metas.map((m) => m.phx_ref)]), [['1', [secondRef]]]);
  assert.ok(a.received(topic, 'phx_error').length >= 1, 'A got phx_error');

  for (const X of [B, C]) await waitShape(X, { 1: 1, 2: 2 }, 3000);
  await waitShape(A2, { 1: 1, 2: 2 });
  const thirdRef = refsView(B)['1'][0];
  assert.ok(![firstRef, secondRef].includes(thirdRef), 'the rejoin tracked anew');
  assert.deepEqual(refsView(A2), refsView(B));
  assert.deepEqual(refsView(C), refsView(B));
  const rejoinedMeta = B.presence.list((k, p) => [k, p.metas]).find(([k]) => k === '1')[1][0];
  assert.equal(rejoinedMeta.name, 'ada', 'the rejoin carries the join payload again');
}, { timeout: 10000 });

e2e('the seed app\'s "leave" event untracks like channel.leave()', async () => {
  const topic = room('leave-event');
  const { a, A, B, C } = await trio(topic);
  const ref = refsView(A)['1'][0];
  A.chan.push('leave', {});
  for (const X of [B, C]) {
    await waitShape(X, { 2: 2 });
    assert.deepEqual(X.leaves.map((l) => [l.key, l.pres.metas.map((m) => m.phx_ref)]), [['1', [ref]]]);
  }
  await waitFor(() => a.received(topic, 'phx_close').length > 0, { what: 'phx_close to A' });
});

e2e('C disconnects: A and B keep key "2" with B\'s meta only', async () => {
  const topic = room('disconnect');
  const { c, A, B } = await trio(topic);
  const refs2 = refsView(A)['2'];
  const bRef = refsIn(diffsOf(B.client, topic), 'joins').find((r) => refs2.includes(r));
  const cRef = refs2.find((r) => r !== bRef);

  await c.close(); // socket.disconnect(); close() also tells the e2e wrapper it was intended
  for (const X of [A, B]) {
    await waitShape(X, { 1: 1, 2: 1 });
    const left = X.leaves.filter((l) => l.key === '2');
    assert.equal(left.length, 1, `onLeave of "2" on user ${X.client.userId}: ${JSON.stringify(X.leaves)}`);
    assert.deepEqual(left[0].pres.metas.map((m) => m.phx_ref), [cRef], 'leftPres has C\'s meta');
    assert.deepEqual(left[0].cur.metas.map((m) => m.phx_ref), [bRef], 'B\'s meta remains');
    assert.deepEqual(refsView(X)['2'], [bRef]);
  }
});

e2e('a dropped TCP connection (no close frame) untracks: A sees key "2" gone entirely', async () => {
  const topic = room('drop');
  // B must not reconnect during the test: its rejoin would track "2" again.
  const { b, c, A, B } = await trio(topic, { bOpts: { socketOpts: { reconnectAfterMs: () => 60000 } } });
  await c.close();
  await waitShape(A, { 1: 1, 2: 1 });
  await waitShape(B, { 1: 1, 2: 1 });
  const bRef = refsView(A)['2'][0];
  await sleep(GAP);

  const droppedAt = Date.now();
  b.socket.conn._socket.destroy(); // no close frame, just the TCP connection going away
  await waitShape(A, { 1: 1 }, 4000);
  const took = Date.now() - droppedAt;
  const left = A.leaves.filter((l) => l.key === '2');
  assert.equal(left.length, 2, 'onLeave of "2": C, then B');
  assert.deepEqual(left[1].pres.metas.map((m) => m.phx_ref), [bRef]);
  assert.deepEqual(left[1].cur.metas, [], 'no meta of "2" is left');
  assert.ok(b.closes.length > 0, 'B\'s transport did close');
  await b.close(); // the drop was intended
  process.stderr.write(`# dropped connection untracked after ${took} ms\n`);
});

e2e('presence_state of fresh joiners on either core matches the members\' lists', async () => {
  const topic = room('state');
  const { A, B, C } = await trio(topic);
  const metasView = (rec) => Object.fromEntries(rec.presence.list((k, p) => [k, [...p.metas].sort((x, y) => (x.phx_ref < y.phx_ref ? -1 : 1))]));
  const stateView = (payload) => Object.fromEntries(Object.entries(payload).map(([k, p]) => [k, [...p.metas].sort((x, y) => (x.phx_ref < y.phx_ref ? -1 : 1))]));

  const members = [A, B, C];
  let expected = { 1: 1, 2: 2 };
  for (const [userId, core] of [['3', '0'], ['4', '1']]) {
    const d = await connectOnCore(userId, core);
    const before = metasView(A);
    for (const X of members) assert.deepEqual(metasView(X), before);
    const D = await trackedJoined(d, topic, {});
    await waitFor(() => d.received(topic, 'presence_state').length > 0, { what: `presence_state for user ${userId}` });
    const state = d.received(topic, 'presence_state');
    assert.equal(state.length, 1);
    assert.equal(state[0].join_ref, D.chan.joinRef(), 'presence_state is a push carrying the join_ref');
    assert.deepEqual(stateView(state[0].payload), before, `presence_state of user ${userId} (core ${core}) = the members' list`);
    expected = { ...expected, [userId]: 1 };
    for (const X of [...members, D]) await waitShape(X, expected);
    members.push(D);
    await sleep(GAP);
  }
  for (const X of members) assert.deepEqual(refsView(X), refsView(A));
}, { timeout: 10000 });

e2e('every member gets every diff once, spaced and in bursts, on both cores', async () => {
  const topic = room('once');
  const { a, b, c, A, B, C } = await trio(topic);
  const view = refsView(A);
  const aRef = view['1'][0];
  const bRef = refsIn(diffsOf(b, topic), 'joins').find((r) => view['2'].includes(r));
  const cRef = view['2'].find((r) => r !== bRef);

  // Spaced joins: one diff per change.
  assert.deepEqual(diffsOf(a, topic).map((d) => refsIn([d], 'joins')), [[aRef], [bRef], [cRef]], 'diffs seen by A');
  assert.deepEqual(diffsOf(b, topic).map((d) => refsIn([d], 'joins')), [[bRef], [cRef]], 'diffs seen by B');
  assert.deepEqual(diffsOf(c, topic).map((d) => refsIn([d], 'joins')), [[cRef]], 'diffs seen by C');
  for (const x of [a, b, c]) {
    for (const d of diffsOf(x, topic)) assert.deepEqual(Object.keys(d).sort(), ['joins', 'leaves'], 'both keys are present');
  }

  // A burst: six more members join at once, then leave at once.
  const extra = await Promise.all(['10', '11', '12', '13', '14', '15'].map((u) => connect(server.port, u)));
  const extraRecs = await Promise.all(extra.map((x) => trackedJoined(x, topic, {})));
  const want = { 1: 1, 2: 2, 10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 15: 1 };
  for (const X of [A, B, C, ...extraRecs]) await waitShape(X, want);
  const full = refsView(A);
  for (const X of [B, C, ...extraRecs]) assert.deepEqual(refsView(X), full);
  const extraRefs = Object.entries(full).filter(([k]) => Number(k) >= 10).flatMap(([, r]) => r).sort();
  await sleep(GAP);
  await Promise.all(extra.map((x) => x.close()));
  for (const X of [A, B, C]) await waitShape(X, { 1: 1, 2: 2 });
  await sleep(300); // anything duplicated would have arrived by now

  const expectJoins = { 1: [aRef, bRef, cRef], 2: [bRef, cRef], 3: [cRef] };
  [[a, A, 1], [b, B, 2], [c, C, 3]].forEach(([x, X, n]) => {
    const diffs = diffsOf(x, topic);
    const joins = refsIn(diffs, 'joins');
    const leaves = refsIn(diffs, 'leaves');
    const who = `user ${x.userId} on core ${x.core}`;
    assertNoDuplicates(joins, `${who}: joins across ${diffs.length} diffs`);
    assertNoDuplicates(leaves, `${who}: leaves across ${diffs.length} diffs`);
    assert.deepEqual([...joins].sort(), [...expectJoins[n], ...extraRefs].sort(), `${who}: every join once`);
    assert.deepEqual([...leaves].sort(), extraRefs, `${who}: every leave once`);
    // the burst took between 2 diffs (all merged) and 12 (none merged)
    const burst = diffs.length - expectJoins[n].length;
    assert.ok(burst >= 2 && burst <= 12, `${who}: ${burst} diffs for the burst`);
    assert.deepEqual(refsView(X), view);
    process.stderr.write(`# ${who}: ${diffs.length} presence_diff frames (${burst} for 12 burst changes)\n`);
  });
  // B and C are the same key: each of its metas left no one behind or twice.
  for (const X of [A, B, C]) {
    const leftKeys = X.leaves.map((l) => l.key).sort();
    assert.deepEqual(leftKeys, ['10', '11', '12', '13', '14', '15']);
  }
}, { timeout: 12000 });
