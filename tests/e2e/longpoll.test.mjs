// The long-poll transport (PROTOCOL.md §12, seed-app.md "Socket") against `--cores 2`:
// the phoenix client's LongPoll transport joins, pushes, broadcasts and tracks presence;
// long-poll and WebSocket clients share rooms; refused tokens, the `disconnect` broadcast,
// unknown sessions, malformed ndjson and session expiry get the answers the contract
// names; and a session answers correctly whichever core a request lands on.

import { before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import {
  e2e, startServer, connect, join, push, nextEvent, collect, waitFor, mintToken, nowSecs, sleep, assertAlive, encodeBinaryPush, within, sansPosition,
} from './lib.mjs';
import {
  API_KEY, request, lpPath, RawLongPoll, lpConnect, closeLpClients, LongPoll, Presence, presenceKeys, apiBroadcast,
} from './httplib.mjs';

let server;
before(async () => { server = await startServer({ cores: 2, args: ['--api-key', API_KEY] }); });
after(async () => { await closeLpClients(); await server.stop(); });
afterEach(closeLpClients);

/** Opens raw sessions on fresh connections until there is one on each of cores 0 and 1. */
async function sessionsOnBothCores(prefix) {
  const byCore = new Map();
  for (let i = 0; i < 40 && byCore.size < 2; i++) {
    const lp = await new RawLongPoll(server.port, `${prefix}${i}`).open();
    if (!byCore.has(lp.core)) byCore.set(lp.core, lp);
  }
  assert.deepEqual([...byCore.keys()].sort(), ['0', '1'], 'fresh connections opened sessions on both cores');
  return [byCore.get('0'), byCore.get('1')];
}

e2e('phoenix LongPoll client: join, welcome, push replies, new_msg, presence', async () => {
  const lp = await lpConnect(server.httpUrl, 'lp1');
  assert.equal(lp.socket.transport, LongPoll);
  assert.match(lp.session, /^[01]\.[0-9a-f]{16,}$/, 'session token is <core>.<hex>');

  const chan = lp.channel('rooms:lp-basic', { name: 'Ada' });
  const presence = new Presence(chan);
  const welcome = nextEvent(chan, 'welcome', 3000);
  assert.deepEqual(sansPosition(await join(chan, 3000)), { status: 'ok', response: {} });
  assert.deepEqual(await welcome, { msg: 'Welcome to room lp-basic!' });

  await waitFor(() => presenceKeys(presence).join() === 'lp1', { timeout: 3000, what: 'presence list [lp1]' });
  const [entry] = presence.list((id, { metas }) => ({ id, metas }));
  assert.equal(entry.metas.length, 1);
  assert.equal(entry.metas[0].name, 'Ada');
  assert.match(entry.metas[0].online_at, /^\d+$/);

  assert.deepEqual(await push(chan, 'ping', { n: 1, s: 'x' }, 3000), { status: 'ok', response: { n: 1, s: 'x' } });
  assert.deepEqual(await push(chan, 'bad_request', {}, 3000), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'shout', { body: 'hey' }, 3000), { status: 'ok', response: {} });

  const got = nextEvent(chan, 'new_msg', 3000);
  chan.push('new_msg', { body: 'over long-poll' });
  assert.deepEqual(await got, { body: 'over long-poll', user: 'lp1' });

  // several pushes in one tick go out as one ndjson POST; every reply comes back in order
  const replies = await Promise.all([1, 2, 3, 4, 5].map((n) => push(chan, 'ping', { n }, 3000)));
  assert.deepEqual(replies.map((r) => r.response.n), [1, 2, 3, 4, 5]);

  // the heartbeat topic answers over long-poll too: the client's ping callback runs on
  // the reply (it never runs without one)
  const hb = await within(new Promise((resolve) => lp.socket.ping((rtt) => resolve(rtt))), 3000, 'a heartbeat reply over long-poll');
  assert.ok(Number.isFinite(hb), `round trip ${hb}`);
  assert.deepEqual(lp.closes, [], 'the long-poll transport never closed');
  assertAlive(server);
}, { timeout: 10000 });

e2e('a long-poll client and a WebSocket client in one room see each other', async () => {
  const ws = await connect(server.port, 'wsm');
  const lp = await lpConnect(server.httpUrl, 'lpm');
  const wsChan = ws.channel('rooms:mixed', { name: 'web' });
  const lpChan = lp.channel('rooms:mixed', { name: 'poll' });
  const wsPresence = new Presence(wsChan);
  const lpPresence = new Presence(lpChan);
  assert.equal((await join(wsChan)).status, 'ok');
  assert.equal((await join(lpChan, 3000)).status, 'ok');

  await waitFor(() => presenceKeys(wsPresence).join() === 'lpm,wsm', { timeout: 3000, what: 'WebSocket presence [lpm, wsm]' });
  await waitFor(() => presenceKeys(lpPresence).join() === 'lpm,wsm', { timeout: 3000, what: 'long-poll presence [lpm, wsm]' });
  const names = (p) => Object.fromEntries(p.list((id, { metas }) => [id, metas.map((m) => m.name)]));
  assert.deepEqual(names(wsPresence), { lpm: ['poll'], wsm: ['web'] });
  assert.deepEqual(names(lpPresence), { lpm: ['poll'], wsm: ['web'] });

  const atLp = collect(lpChan, 'new_msg');
  const atWs = collect(wsChan, 'new_msg');
  wsChan.push('new_msg', { body: 'from ws' });
  await atLp.waitFor(1, 3000);
  lpChan.push('new_msg', { body: 'from lp' });
  await atWs.waitFor(2, 3000);
  await atLp.waitFor(2, 3000);
  assert.deepEqual(atLp.items, [{ body: 'from ws', user: 'wsm' }, { body: 'from lp', user: 'lpm' }]);
  assert.deepEqual(atWs.items, [{ body: 'from ws', user: 'wsm' }, { body: 'from lp', user: 'lpm' }]);

  // a whisper from the WebSocket user reaches only the long-poll user, not its sender
  const whispers = collect(lpChan, 'whisper');
  const atSender = collect(wsChan, 'whisper');
  assert.deepEqual(await push(wsChan, 'whisper', { to: 'lpm', body: 'psst' }), { status: 'ok', response: {} });
  await whispers.waitFor(1, 3000);
  assert.deepEqual(whispers.items, [{ to: 'lpm', body: 'psst', from: 'wsm' }]);
  // A broadcast after it reaches the sender in order: had the whisper been pushed to the
  // sender, it would have come first.
  const marker = collect(wsChan, 'new_msg');
  lpChan.push('new_msg', { body: 'after the whisper' });
  await marker.waitFor(1, 3000);
  assert.deepEqual(atSender.items, [], 'the whisper was not pushed to its sender');

  // the long-poll user leaves: the WebSocket user's presence drops it
  await new Promise((resolve, reject) => lpChan.leave(3000).receive('ok', resolve).receive('timeout', () => reject(new Error('no reply to the leave within 3 s'))));
  await waitFor(() => presenceKeys(wsPresence).join() === 'wsm', { timeout: 3000, what: 'lpm to leave the WebSocket presence' });
  assert.deepEqual(lp.closes, [], 'the long-poll transport never closed');
}, { timeout: 12000 });

e2e('a bad token: the long-poll client never opens; the server answers {"status":403}', async () => {
  // raw: forged, missing, expired tokens and an unsupported vsn
  const forged = mintToken('lpbad', { secret: 'not-the-secret' });
  const expired = mintToken('lpbad', { iat: nowSecs() - 90000 });
  for (const [what, path] of [
    ['forged token', lpPath({ auth: forged })],
    ['no token', lpPath({})],
    ['expired token', lpPath({ auth: expired })],
    ['garbage token', lpPath({ auth: 'not.a-token' })],
    ['vsn 3.0.0', lpPath({ auth: mintToken('lpbad'), vsn: '3.0.0' })],
  ]) {
    const res = await request(server.port, { path });
    assert.equal(res.status, 200, `${what}: HTTP status`);
    assert.deepEqual(res.json, { status: 403 }, `${what}: body ${res.text}`);
    assert.match(res.headers['content-type'] || '', /^application\/json/, `${what}: content-type`);
  }

  // the phoenix client: an error (403), a close 1008, and no open
  const lp = await lpConnect(server.httpUrl, 'lpbad', { token: forged, waitOpen: false });
  await waitFor(() => lp.errors.length > 0, { timeout: 3000, what: 'the long-poll client to report an error' });
  await sleep(500);
  assert.equal(lp.opens, 0, 'the socket never opened');
  assert.equal(lp.errors[0], 403);
  assert.equal(lp.closes[0]?.code, 1008);
  await lp.close();
});

e2e('the disconnect broadcast ends the long-poll session; the client reconnects and rejoins', async () => {
  const watcher = await connect(server.port, 'lpwatch');
  const wChan = watcher.channel('rooms:lpdisc');
  const wPresence = new Presence(wChan);
  assert.equal((await join(wChan)).status, 'ok');

  const lp = await lpConnect(server.httpUrl, 'lpd');
  const chan = lp.channel('rooms:lpdisc');
  assert.equal((await join(chan, 3000)).status, 'ok');
  await waitFor(() => presenceKeys(wPresence).join() === 'lpd,lpwatch', { timeout: 3000, what: 'lpd in presence' });
  const firstSession = lp.session;

  // another user's raw session must survive the disconnect of lpd
  const other = await new RawLongPoll(server.port, 'lpother').open();
  // and a raw session of lpd itself goes too
  const rawLpd = await new RawLongPoll(server.port, 'lpd').open();
  const leaves = collect(wChan, 'presence_diff');

  const res = await apiBroadcast(server.port, { topic: 'user_socket:lpd', event: 'disconnect', payload: {} });
  assert.equal(res.status, 202, res.text);

  await waitFor(() => lp.closes.some((c) => c.code === 3410), { timeout: 3000, what: `a 3410 close of the long-poll client (closes ${JSON.stringify(lp.closes)})` });
  await waitFor(() => lp.opens >= 2, { timeout: 3000, what: 'the long-poll client to reopen' });
  assert.notEqual(lp.session, firstSession, 'a new session');
  await waitFor(() => leaves.items.some((d) => 'lpd' in d.leaves), { timeout: 3000, what: 'a presence leave of lpd' });
  await waitFor(() => chan.state === 'joined', { timeout: 3000, what: 'the channel to rejoin' });
  await waitFor(() => presenceKeys(wPresence).join() === 'lpd,lpwatch', { timeout: 3000, what: 'lpd back in presence' });

  // the old sessions answer 410
  const stale = await rawLpd.post([[null, 'h1', 'phoenix', 'heartbeat', {}]]);
  assert.equal(stale.status, 200);
  assert.deepEqual(stale.json, { status: 410 }, `POST to the disconnected session: ${stale.text}`);
  const staleClient = await request(server.port, {
    method: 'POST', path: lpPath({ auth: mintToken('lpd'), session: firstSession }),
    headers: { 'content-type': 'application/x-ndjson' }, body: '[null,"h1","phoenix","heartbeat",{}]',
  });
  assert.deepEqual(staleClient.json, { status: 410 }, `POST to the client's old session: ${staleClient.text}`);

  // the other user's session is unharmed
  const ok = await other.post([[null, 'h2', 'phoenix', 'heartbeat', {}]]);
  assert.deepEqual(ok.json, { status: 200 });
  assert.deepEqual((await other.reply('h2')).payload, { status: 'ok', response: {} });
  // and the reconnected client works
  assert.deepEqual(await push(chan, 'ping', { again: true }, 3000), { status: 'ok', response: { again: true } });
}, { timeout: 12000 });

e2e('cross-core: polls and POSTs on fresh connections (random cores) are all answered by the session', async () => {
  const sessions = await sessionsOnBothCores('fwd');
  for (const lp of sessions) {
    assert.deepEqual(sansPosition(await lp.join(`rooms:fwd${lp.core}`)), { status: 'ok', response: {} });
  }
  const ROUNDS = 15;
  for (let i = 0; i < ROUNDS; i++) {
    for (const lp of sessions) {
      const ref = `p${i}`;
      const res = await lp.post([[`j1`, ref, `rooms:fwd${lp.core}`, 'ping', { i, core: lp.core }]]);
      assert.equal(res.status, 200, `POST ${i} on session ${lp.session}: HTTP ${res.status} ${res.text}`);
      assert.deepEqual(res.json, { status: 200 }, `POST ${i} on session ${lp.session}`);
      const reply = await lp.reply(ref);
      assert.deepEqual(reply.payload, { status: 'ok', response: { i, core: lp.core } });
      assert.equal(reply.join_ref, 'j1');
      assert.equal(reply.topic, `rooms:fwd${lp.core}`);
    }
  }
  // every poll named the session; each got its welcome and its presence
  for (const lp of sessions) {
    assert.ok(lp.polls.length >= ROUNDS, `${lp.polls.length} polls`);
    assert.ok(lp.polls.every((p) => p && p.token === lp.session && (p.status === 200 || p.status === 204)), JSON.stringify(lp.polls).slice(0, 500));
    assert.ok(lp.received.some((m) => m.event === 'welcome'), 'welcome arrived');
    assert.ok(lp.received.some((m) => m.event === 'presence_state'), 'presence_state arrived');
  }
  assertAlive(server);
}, { timeout: 20000 });

e2e('cross-core: one kept-alive connection drives a session that lives on the other core', async () => {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    // the core this kept-alive connection landed on: a session opened over it lives there
    const probe = await new RawLongPoll(server.port, 'kaprobe', { agent }).open();
    const sessions = await sessionsOnBothCores('ka');
    const remote = sessions.find((s) => s.core !== probe.core);
    remote.agent = agent;
    assert.deepEqual(sansPosition(await remote.join('rooms:karemote')), { status: 'ok', response: {} });
    for (let i = 0; i < 10; i++) {
      const res = await remote.post([['j1', `k${i}`, 'rooms:karemote', 'ping', { i }]]);
      assert.deepEqual(res.json, { status: 200 }, `POST ${i}: ${res.text}`);
      assert.deepEqual((await remote.reply(`k${i}`)).payload, { status: 'ok', response: { i } });
    }
    assert.equal(Object.values(agent.sockets).flat().length + Object.values(agent.freeSockets).flat().length, 1, 'all over one connection');
  } finally {
    agent.destroy();
  }
}, { timeout: 15000 });

e2e('a POST naming an unknown session answers {"status":410}; a GET with one opens a new session', async () => {
  const auth = mintToken('lpunknown');
  for (const session of ['0.00112233445566778899aabbccddeeff', '1.00112233445566778899aabbccddeeff', '7.abcdef', 'nodot', '']) {
    const res = await request(server.port, {
      method: 'POST', path: `/socket/longpoll?token=${auth}&vsn=2.0.0&token=${session}`,
      headers: { 'content-type': 'application/x-ndjson' }, body: '[null,"1","phoenix","heartbeat",{}]',
    });
    assert.equal(res.status, 200, `session ${JSON.stringify(session)}: HTTP ${res.status}`);
    assert.deepEqual(res.json, { status: 410 }, `session ${JSON.stringify(session)}: ${res.text}`);
  }
  // the header names the session too, and takes precedence over the param
  const live = await new RawLongPoll(server.port, 'lpunknown').open();
  const viaHeader = await request(server.port, {
    method: 'POST', path: `/socket/longpoll?token=${auth}&vsn=2.0.0&token=1.dead`,
    headers: { 'content-type': 'application/x-ndjson', 'x-phoenix-longpoll-token': live.session }, body: '[null,"hh","phoenix","heartbeat",{}]',
  });
  assert.deepEqual(viaHeader.json, { status: 200 }, `POST naming the session in the header: ${viaHeader.text}`);
  assert.deepEqual((await live.reply('hh')).payload, { status: 'ok', response: {} });
  const deadHeader = await request(server.port, {
    method: 'POST', path: `/socket/longpoll?token=${auth}&vsn=2.0.0&token=${live.session}`,
    headers: { 'content-type': 'application/x-ndjson', 'x-phoenix-longpoll-token': '0.dead' }, body: '[null,"hx","phoenix","heartbeat",{}]',
  });
  assert.deepEqual(deadHeader.json, { status: 410 }, `a dead session in the header wins over a live param: ${deadHeader.text}`);

  // GET with an unknown session and a valid auth token is a fresh connect
  const res = await request(server.port, { path: `/socket/longpoll?token=${auth}&vsn=2.0.0&token=0.00112233445566778899aabbccddeeff` });
  assert.equal(res.json?.status, 410, res.text);
  assert.match(res.json.token, /^[01]\.[0-9a-f]+$/);
  assert.notEqual(res.json.token, '0.00112233445566778899aabbccddeeff');
  assert.deepEqual(res.json.messages, []);
});

e2e('a malformed ndjson line: HTTP 400 with a clear error; the session works afterwards', async () => {
  const lp = await new RawLongPoll(server.port, 'lpmal').open();
  assert.deepEqual(sansPosition(await lp.join('rooms:lpmal')), { status: 'ok', response: {} });
  for (const bad of [
    ['this is {not json'],
    ['[1,2'],
    ['["1","2","rooms:lpmal"]'],
    ['[null,"ok1","phoenix","heartbeat",{}]', '%%% not base64 %%%'],
  ]) {
    const res = await lp.post(bad);
    assert.equal(res.status, 400, `${JSON.stringify(bad)}: HTTP ${res.status} ${res.text}`);
    assert.equal(res.json?.status, 400, `${JSON.stringify(bad)}: ${res.text}`);
    assert.match(res.json.error, /^malformed message: .+/, `${JSON.stringify(bad)}: ${res.text}`);
  }
  const res = await lp.post([['j1', 'after', 'rooms:lpmal', 'ping', { still: 'here' }]]);
  assert.deepEqual(res.json, { status: 200 }, res.text);
  assert.deepEqual((await lp.reply('after')).payload, { status: 'ok', response: { still: 'here' } });
  // a binary push as a base64 line works too
  const bin = encodeBinaryPush('j1', 'b1', 'rooms:lpmal', 'ping', Buffer.from([1, 2, 3]));
  const b = await lp.post([bin.toString('base64')]);
  assert.deepEqual(b.json, { status: 200 }, `base64 line: HTTP ${b.status} ${b.text}`);
  assertAlive(server);
});

e2e('a session that closes with messages queued hands them to the next poll before it answers 410', async () => {
  const lp = await new RawLongPoll(server.port, 'lpqueued').open();
  assert.deepEqual(sansPosition(await lp.join('rooms:lpqueued')), { status: 'ok', response: {} });
  // Drain what the join queued (welcome, presence), then, while no poll is outstanding,
  // a broadcast reaches the session and a disconnect closes it.
  await lp.until((m) => m.event === 'presence_diff', { what: 'the join\'s presence_diff' });
  const sent = await apiBroadcast(server.port, { topic: 'rooms:lpqueued', event: 'new_msg', payload: { body: 'last words' } });
  assert.equal(sent.status, 202);
  await sleep(100);
  const bye = await apiBroadcast(server.port, { topic: 'user_socket:lpqueued', event: 'disconnect', payload: {} });
  assert.equal(bye.status, 202);
  await sleep(100);
  const last = await lp.poll();
  assert.equal(last.json?.status, 200, `the poll after the close: ${last.text}`);
  assert.ok(lp.received.some((m) => m.event === 'new_msg' && m.payload.body === 'last words'), `queued broadcast delivered: ${JSON.stringify(lp.received)}`);
  const after = await lp.poll();
  assert.equal(after.json?.status, 410, `then the session is gone: ${after.text}`);
  assert.notEqual(after.json.token, lp.session, 'a poll of the gone session is a fresh connect');
});

e2e('a binary reply to a long-poll client is answered as an error reply and counted; nothing is dropped unseen', async () => {
  const lp = await new RawLongPoll(server.port, 'lpbin').open();
  assert.deepEqual(sansPosition(await lp.join('rooms:lpbin')), { status: 'ok', response: {} });
  const before = await metricSum('ringcast_longpoll_binary_total');
  // The seed's ping answers a binary payload with a binary reply.
  const bin = encodeBinaryPush('j1', 'b1', 'rooms:lpbin', 'ping', Buffer.from([1, 2, 3]));
  assert.deepEqual((await lp.post([bin.toString('base64')])).json, { status: 200 });
  const reply = await lp.reply('b1');
  assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'binary payloads need the WebSocket transport' } });
  assert.equal(reply.join_ref, 'j1');
  assert.equal(await metricSum('ringcast_longpoll_binary_total'), before + 1);
  // The session goes on with JSON.
  assert.deepEqual((await lp.post([['j1', 'p2', 'rooms:lpbin', 'ping', { json: true }]])).json, { status: 200 });
  assert.deepEqual((await lp.reply('p2')).payload, { status: 'ok', response: { json: true } });
});

/** The sum over cores of one `/metrics` sample. */
async function metricSum(name) {
  const res = await request(server.port, { path: '/metrics' });
  return res.text.split('\n').filter((l) => l.startsWith(`${name}{`)).reduce((a, l) => a + Number(l.split(' ').pop()), 0);
}

e2e('a session with no poll for ~15 s expires: presence untracked, POST answers 410', async () => {
  const watcher = await connect(server.port, 'expwatch');
  const wChan = watcher.channel('rooms:lpexp');
  const wPresence = new Presence(wChan);
  assert.equal((await join(wChan)).status, 'ok');
  const lp = await new RawLongPoll(server.port, 'lpexp').open();
  assert.deepEqual(sansPosition(await lp.join('rooms:lpexp')), { status: 'ok', response: {} });
  await waitFor(() => presenceKeys(wPresence).join() === 'expwatch,lpexp', { timeout: 3000, what: 'lpexp in presence' });
  // POSTs do not keep a session alive; only polls do
  const lastPoll = Date.now();
  await sleep(5000);
  assert.deepEqual((await lp.post([[null, 'h', 'phoenix', 'heartbeat', {}]])).json, { status: 200 }, 'alive after 5 s');
  await waitFor(() => presenceKeys(wPresence).join() === 'expwatch', { timeout: 13000, interval: 100, what: 'lpexp to leave presence on expiry' });
  const after = Date.now() - lastPoll;
  assert.ok(after >= 14000, `expired ${after} ms after the last poll (want ~15 s)`);
  const res = await lp.post([[null, 'h2', 'phoenix', 'heartbeat', {}]]);
  assert.deepEqual(res.json, { status: 410 }, `POST after expiry: ${res.text}`);
}, { timeout: 20000 });
