// The HTTP side of the socket port (seed-app.md "HTTP server API", "Bad input"):
// POST /api/broadcast (202/401/400, reaching WebSocket and long-poll subscribers, the
// `disconnect` broadcast), GET /api/stats, GET /metrics (strictly parsed Prometheus text),
// /healthz, HTTP/1.1 keep-alive and pipelining, and bad HTTP input that gets a clear
// answer on its own connection while a WebSocket client on the same server carries on.

import { before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, connect, rawConnect, rawTcp, join, push, nextEvent, collect, waitFor, sleep, within, assertAlive, sansPosition, POSITION,
} from './lib.mjs';
import {
  API_KEY, request, RawLongPoll, lpConnect, closeLpClients, apiBroadcast, apiStats, parsePrometheus,
} from './httplib.mjs';

let server;
before(async () => { server = await startServer({ cores: 2, args: ['--api-key', API_KEY] }); });
after(async () => { await closeLpClients(); await server.stop(); });
afterEach(closeLpClients);

const STAT_KEYS = [
  'connections', 'longpoll_sessions', 'channels', 'topics', 'messages_in', 'messages_out',
  'bytes_in', 'bytes_out', 'broadcasts', 'deliveries', 'slow_closed', 'parked',
];

/**
 * Parses as many complete HTTP/1.1 responses (content-length framed) as `buf` holds.
 * Returns `{responses: [{status, reason, headers, body}], rest}`.
 */
function parseResponses(buf) {
  const responses = [];
  let off = 0;
  for (;;) {
    const end = buf.indexOf('\r\n\r\n', off);
    if (end < 0) break;
    const head = buf.subarray(off, end).toString('latin1');
    const [statusLine, ...lines] = head.split('\r\n');
    const m = /^HTTP\/1\.1 (\d{3}) (.*)$/.exec(statusLine);
    if (!m) throw new Error(`bad status line ${JSON.stringify(statusLine)} in ${JSON.stringify(buf.toString('latin1').slice(0, 300))}`);
    const headers = {};
    for (const l of lines) {
      const i = l.indexOf(':');
      if (i <= 0) throw new Error(`bad header line ${JSON.stringify(l)}`);
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    if (headers['content-length'] === undefined) throw new Error(`response without content-length: ${head}`);
    const len = Number(headers['content-length']);
    if (buf.length < end + 4 + len) break;
    responses.push({ status: Number(m[1]), reason: m[2], headers, body: buf.subarray(end + 4, end + 4 + len).toString('utf8') });
    off = end + 4 + len;
  }
  return { responses, rest: buf.subarray(off) };
}

/** Waits until `tcp` (from rawTcp) has received `n` complete responses. */
async function responses(tcp, n, timeout = 3000) {
  let parsed;
  await waitFor(() => {
    parsed = parseResponses(tcp.data());
    return parsed.responses.length >= n || (tcp.isClosed() && parsed.responses.length < n && 'closed');
  }, { timeout, what: `${n} HTTP responses (got ${JSON.stringify(tcp.data().toString('latin1').slice(0, 400))})` });
  if (parsed.responses.length < n) {
    throw new Error(`connection closed after ${parsed.responses.length} of ${n} responses: ${JSON.stringify(tcp.data().toString('latin1').slice(0, 400))}`);
  }
  return parsed.responses;
}

/** A WebSocket client in a room that must keep working while bad input arrives elsewhere. */
async function bystander(topic) {
  const phx = await connect(server.port, 'httpby');
  const chan = await phx.joined(topic);
  return { phx, chan, topic };
}

async function assertUnharmed({ phx, chan }) {
  assertAlive(server);
  assert.deepEqual(phx.closes, [], 'the bystander WebSocket was never disconnected');
  assert.deepEqual(await push(chan, 'ping', { still: 'fine' }), { status: 'ok', response: { still: 'fine' } });
  const got = nextEvent(chan, 'new_msg');
  chan.push('new_msg', { body: 'after' });
  assert.deepEqual(await got, { body: 'after', user: 'httpby' });
  const health = await request(server.port, { path: '/healthz' });
  assert.equal(health.status, 200);
}

// ---------------------------------------------------------------------------
// /api/broadcast
// ---------------------------------------------------------------------------

e2e('POST /api/broadcast: 202 {"ok":true} with the key; 401 without it or with a wrong one', async () => {
  const body = { topic: 'rooms:api-auth', event: 'announce', payload: { a: 1 } };
  const ok = await apiBroadcast(server.port, body);
  assert.equal(ok.status, 202, ok.text);
  assert.deepEqual(ok.json, { ok: true });
  assert.match(ok.headers['content-type'] || '', /^application\/json/);

  for (const [what, opts] of [
    ['no authorization header', { key: null }],
    ['a wrong key', { key: 'wrong-key' }],
    ['a prefix of the key', { key: API_KEY.slice(0, -1) }],
    ['the key plus a suffix', { key: `${API_KEY}x` }],
    ['an empty bearer', { key: '' }],
    ['basic auth', { key: null, headers: { authorization: `Basic ${Buffer.from(`x:${API_KEY}`).toString('base64')}` } }],
    ['the bare key', { key: null, headers: { authorization: API_KEY } }],
  ]) {
    const res = await apiBroadcast(server.port, body, opts);
    assert.equal(res.status, 401, `${what}: ${res.status} ${res.text}`);
  }
  // a bad body with a wrong key is still 401: the key is checked first
  const res = await apiBroadcast(server.port, 'not json', { key: 'wrong' });
  assert.equal(res.status, 401);

  for (const key of [null, 'wrong']) {
    const stats = await apiStats(server.port, { key });
    assert.equal(stats.status, 401, `/api/stats with key ${key}: ${stats.status}`);
  }
  assert.equal((await apiStats(server.port)).status, 200);
});

e2e('no --api-key configured: the server API answers 401 to everything; /metrics and /healthz still answer', async () => {
  const keyless = await startServer({ cores: 1 });
  try {
    for (const key of [API_KEY, '', 'anything', null]) {
      const b = await apiBroadcast(keyless.port, { topic: 'rooms:x', event: 'e', payload: {} }, { key });
      assert.equal(b.status, 401, `broadcast with key ${JSON.stringify(key)}: ${b.status} ${b.text}`);
      const s = await apiStats(keyless.port, { key });
      assert.equal(s.status, 401, `stats with key ${JSON.stringify(key)}: ${s.status} ${s.text}`);
    }
    assert.equal((await request(keyless.port, { path: '/metrics' })).status, 200);
    assert.equal((await request(keyless.port, { path: '/healthz' })).status, 200);
  } finally {
    await keyless.stop();
  }
});

e2e('POST /api/broadcast: 400 {"error": ...} on a bad body', async () => {
  const cases = [
    ['invalid JSON', '{"topic": "rooms:a", "event": '],
    ['not JSON at all', 'hello'],
    ['empty body', ''],
    ['a JSON array', [{ topic: 'rooms:a', event: 'e', payload: {} }]],
    ['a JSON string', '"rooms:a"'],
    ['missing topic', { event: 'e', payload: {} }],
    ['missing event', { topic: 'rooms:a', payload: {} }],
    ['missing payload', { topic: 'rooms:a', event: 'e' }],
    ['payload an array', { topic: 'rooms:a', event: 'e', payload: [1, 2] }],
    ['payload a string', { topic: 'rooms:a', event: 'e', payload: 'hi' }],
    ['payload a number', { topic: 'rooms:a', event: 'e', payload: 3 }],
    ['payload null', { topic: 'rooms:a', event: 'e', payload: null }],
    ['topic a number', { topic: 7, event: 'e', payload: {} }],
    ['event null', { topic: 'rooms:a', event: null, payload: {} }],
  ];
  for (const [what, body] of cases) {
    const res = await apiBroadcast(server.port, body);
    assert.equal(res.status, 400, `${what}: ${res.status} ${res.text}`);
    assert.equal(typeof res.json?.error, 'string', `${what}: body ${res.text}`);
    assert.ok(res.json.error.length > 0, `${what}: empty error`);
  }
  const notObject = await apiBroadcast(server.port, { topic: 'rooms:a', event: 'e', payload: [1] });
  assert.match(notObject.json.error, /payload/i, `the error names the payload: ${notObject.text}`);
  assertAlive(server);
});

e2e('a broadcast through the API reaches WebSocket (both cores, V1 and V2) and long-poll subscribers', async () => {
  const topic = 'rooms:api-fan';
  const clients = [];
  const onCores = () => new Set(clients.map((c) => c.core));
  while (clients.length < 4 || (onCores().size < 2 && clients.length < 40)) clients.push(await connect(server.port, `fan${clients.length}`));
  assert.equal(onCores().size, 2, 'WebSocket clients on both cores');
  const chans = [];
  for (const c of clients) chans.push(await c.joined(topic));
  const cols = chans.map((ch) => collect(ch, 'announce'));
  const v1 = await rawConnect(server.port, { userId: 'fanv1', vsn: '1.0.0' });
  v1.send({ topic, event: 'phx_join', payload: {}, ref: '1' });
  await v1.next((m) => m.ref === '1' && m.event === 'phx_reply');
  const lp = await lpConnect(server.httpUrl, 'fanlp');
  const lpChan = lp.channel(topic);
  assert.equal((await join(lpChan, 3000)).status, 'ok');
  const lpCol = collect(lpChan, 'announce');
  // a notifications channel gets a broadcast aimed at one user
  const notes = lp.channel('notifications:fanlp');
  assert.equal((await join(notes, 3000)).status, 'ok');
  const noteCol = collect(notes, 'note');

  const payload = { text: 'from the backend', n: 42, nested: { ok: true } };
  const res = await apiBroadcast(server.port, { topic, event: 'announce', payload });
  assert.equal(res.status, 202, res.text);
  await Promise.all(cols.map((c) => c.waitFor(1, 3000)));
  await lpCol.waitFor(1, 3000);
  const atV1 = await v1.event(topic, 'announce', 3000);
  assert.deepEqual(atV1.payload, payload);
  assert.match(atV1.ref, POSITION, 'a rooms:* broadcast carries its position');
  const n2 = await apiBroadcast(server.port, { topic: 'notifications:fanlp', event: 'note', payload: { hi: 'you' } });
  assert.equal(n2.status, 202);
  await noteCol.waitFor(1, 3000);
  await sleep(200);
  for (const c of cols) assert.deepEqual(c.items, [payload]);
  assert.deepEqual(lpCol.items, [payload]);
  assert.deepEqual(noteCol.items, [{ hi: 'you' }]);
  assert.deepEqual(lp.closes, []);
}, { timeout: 15000 });

e2e('disconnect via the API closes every WebSocket of that user with 1001; another user\'s socket stays', async () => {
  const victims = [];
  while (victims.length < 3 || (new Set(victims.map((v) => v.core)).size < 2 && victims.length < 40)) {
    victims.push(await rawConnect(server.port, { userId: 'dcvictim' }));
  }
  assert.equal(new Set(victims.map((v) => v.core)).size, 2, 'the victim has sockets on both cores');
  for (const v of victims) await v.join('rooms:dc');
  const v1victim = await rawConnect(server.port, { userId: 'dcvictim', vsn: '1.0.0' });
  const others = [];
  while (others.length < 2 || (new Set(others.map((v) => v.core)).size < 2 && others.length < 40)) {
    others.push(await rawConnect(server.port, { userId: 'dcother' }));
  }
  for (const o of others) await o.join('rooms:dc');
  const lpVictim = await new RawLongPoll(server.port, 'dcvictim').open();

  // another event on the socket topic is ignored
  const ignored = await apiBroadcast(server.port, { topic: 'user_socket:dcvictim', event: 'hello', payload: {} });
  assert.equal(ignored.status, 202);
  await sleep(200);
  for (const v of victims) assert.equal(v.closeInfo, null, 'a non-disconnect event does not close');
  // and the disconnect of a user with no connections is fine too
  assert.equal((await apiBroadcast(server.port, { topic: 'user_socket:nobody', event: 'disconnect', payload: {} })).status, 202);

  const res = await apiBroadcast(server.port, { topic: 'user_socket:dcvictim', event: 'disconnect', payload: {} });
  assert.equal(res.status, 202, res.text);
  for (const v of [...victims, v1victim]) {
    const { code } = await v.waitClosed(3000);
    assert.equal(code, 1001, `victim socket on core ${v.core} closed with ${code}`);
    assert.ok(!v.all.some((m) => m.event === 'phx_close'), 'channels end without phx_close');
  }
  const gone = await lpVictim.post([[null, 'h', 'phoenix', 'heartbeat', {}]]);
  assert.deepEqual(gone.json, { status: 410 }, `the victim's long-poll session ended: ${gone.text}`);

  // the peers see the victim's presence leave, and carry on
  for (const o of others) {
    await o.next((m) => m.event === 'presence_diff' && 'dcvictim' in (m.payload.leaves || {}), 3000, 'a presence leave of dcvictim');
    assert.equal(o.closeInfo, null, `the other user's socket on core ${o.core} stays open`);
    o.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
    assert.deepEqual((await o.reply('hb')).payload, { status: 'ok', response: {} });
  }
  // the victim can connect again (authenticated anew)
  const back = await rawConnect(server.port, { userId: 'dcvictim' });
  assert.equal((await back.join('rooms:dc')).payload.status, 'ok');
}, { timeout: 15000 });

// ---------------------------------------------------------------------------
// /metrics, /api/stats, /healthz
// ---------------------------------------------------------------------------

e2e('/metrics is Prometheus text (HELP, TYPE, one sample per core) and its counters move after traffic', async () => {
  const res = await request(server.port, { path: '/metrics' });
  assert.equal(res.status, 200);
  assert.match(res.headers['content-type'] || '', /^text\/plain/);
  const before = parsePrometheus(res.text);
  const want = {
    ringcast_connections: 'gauge',
    ringcast_longpoll_sessions: 'gauge',
    ringcast_channels: 'gauge',
    ringcast_topics: 'gauge',
    ringcast_messages_in_total: 'counter',
    ringcast_messages_out_total: 'counter',
    ringcast_bytes_in_total: 'counter',
    ringcast_bytes_out_total: 'counter',
    ringcast_broadcasts_total: 'counter',
    ringcast_deliveries_total: 'counter',
    ringcast_slow_closed_total: 'counter',
    ringcast_parked: 'gauge',
  };
  for (const [name, type] of Object.entries(want)) {
    const f = before.families.get(name);
    assert.ok(f, `metric ${name} present`);
    assert.equal(f.type, type, `${name} type`);
    assert.ok(f.help && f.help.length > 0, `${name} has help text`);
    assert.deepEqual(f.samples.map((s) => s.labels).sort((a, b) => a.core.localeCompare(b.core)), [{ core: '0' }, { core: '1' }], `${name}: one sample per core`);
    for (const s of f.samples) assert.ok(Number.isInteger(s.value) && s.value >= 0, `${name} ${JSON.stringify(s)}`);
  }

  // traffic: clients on both cores, joins, pushes, a broadcast, a long-poll session
  const clients = [];
  while (clients.length < 4 || (new Set(clients.map((c) => c.core)).size < 2 && clients.length < 40)) {
    clients.push(await connect(server.port, `met${clients.length}`));
  }
  const chans = [];
  for (const c of clients) chans.push(await c.joined('rooms:metrics'));
  for (const ch of chans) assert.equal((await push(ch, 'ping', { x: 1 })).status, 'ok');
  const col = collect(chans[0], 'new_msg');
  for (let i = 0; i < 5; i++) chans[1].push('new_msg', { body: `m${i}` });
  await col.waitFor(5, 3000);
  assert.equal((await apiBroadcast(server.port, { topic: 'rooms:metrics', event: 'announce', payload: {} })).status, 202);
  const lp = await new RawLongPoll(server.port, 'metlp').open();
  await sleep(200);

  const after = parsePrometheus((await request(server.port, { path: '/metrics' })).text);
  const grew = (name, by) => {
    const d = after.sum(name) - before.sum(name);
    assert.ok(d >= by, `${name} grew by ${d}, want >= ${by} (before ${before.sum(name)}, after ${after.sum(name)})`);
  };
  grew('ringcast_messages_in_total', clients.length * 2 + 5);
  grew('ringcast_messages_out_total', clients.length * 5);
  grew('ringcast_bytes_in_total', 100);
  grew('ringcast_bytes_out_total', 100);
  grew('ringcast_broadcasts_total', 6);
  grew('ringcast_deliveries_total', 5 * clients.length);
  assert.ok(after.sum('ringcast_connections') >= clients.length + 1, `connections ${after.sum('ringcast_connections')}`);
  assert.ok(after.sum('ringcast_longpoll_sessions') >= 1, `longpoll_sessions ${after.sum('ringcast_longpoll_sessions')}`);
  assert.ok(after.sum('ringcast_channels') >= clients.length, `channels ${after.sum('ringcast_channels')}`);
  assert.ok(after.value('ringcast_connections', { core: '0' }) >= 1 && after.value('ringcast_connections', { core: '1' }) >= 1, 'connections counted on both cores');
  for (const name of Object.keys(want).filter((n) => want[n] === 'counter')) {
    for (const core of ['0', '1']) {
      assert.ok(after.value(name, { core }) >= before.value(name, { core }), `${name}{core="${core}"} never decreases`);
    }
  }
  assert.equal(lp.core === '0' || lp.core === '1', true);
}, { timeout: 15000 });

e2e('test helper, not the server: parsePrometheus (which the /metrics tests rely on) refuses malformed exposition text', () => {
  const ok = '# HELP a_total A.\n# TYPE a_total counter\na_total{core="0"} 1\na_total{core="1"} 2\n';
  assert.equal(parsePrometheus(ok).sum('a_total'), 3);
  for (const bad of [
    'a_total{core="0"} 1\n', // no HELP/TYPE
    '# HELP a A.\n# TYPE a gauge\na{core="0"} x\n', // bad value
    '# HELP a A.\n# TYPE a gauge\na{core=0} 1\n', // unquoted label
    '# HELP a A.\n# TYPE a gauge\na{core="0"} 1', // no final newline
    '# HELP a A.\n# TYPE a sorta\na 1\n', // bad type
    '# HELP a A.\n# TYPE a gauge\na 1\na 2\n', // duplicate series
    '# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 1\na{x="1"} 2\n', // not contiguous
    '# HELP a A.\n# TYPE a counter\na -1\n', // negative counter
  ]) {
    assert.throws(() => parsePrometheus(bad), undefined, JSON.stringify(bad));
  }
});

e2e('/api/stats: totals and per-core numbers that move with traffic', async () => {
  const read = async () => {
    const res = await apiStats(server.port);
    assert.equal(res.status, 200, res.text);
    assert.match(res.headers['content-type'] || '', /^application\/json/);
    const s = res.json;
    for (const k of STAT_KEYS) assert.ok(Number.isInteger(s[k]) && s[k] >= 0, `stats.${k} = ${s[k]}`);
    assert.ok(Array.isArray(s.cores) && s.cores.length === 2, `cores: ${JSON.stringify(s.cores)}`);
    for (const c of s.cores) for (const k of STAT_KEYS) assert.ok(Number.isInteger(c[k]) && c[k] >= 0, `core stats.${k} = ${c[k]}`);
    return s;
  };
  await sleep(200);
  const s0 = await read();
  for (const k of STAT_KEYS) {
    assert.equal(s0[k], s0.cores.reduce((a, c) => a + c[k], 0), `total ${k} is the sum over cores (quiet server)`);
  }

  const clients = [];
  while (clients.length < 4 || (new Set(clients.map((c) => c.core)).size < 2 && clients.length < 40)) {
    clients.push(await connect(server.port, `st${clients.length}`));
  }
  const chans = [];
  for (const c of clients) chans.push(await c.joined('rooms:stats'));
  const col = collect(chans[0], 'new_msg');
  for (let i = 0; i < 3; i++) chans[2].push('new_msg', { body: `s${i}` });
  await col.waitFor(3, 3000);
  assert.equal((await apiBroadcast(server.port, { topic: 'rooms:stats', event: 'x', payload: {} })).status, 202);
  const lp = await new RawLongPoll(server.port, 'stlp').open();
  assert.deepEqual(sansPosition(await lp.join('rooms:stats-lp')), { status: 'ok', response: {} });
  await sleep(200);
  const s1 = await read();
  const d = (k) => s1[k] - s0[k];
  assert.ok(d('connections') >= clients.length + 1, `connections +${d('connections')}`);
  assert.ok(d('longpoll_sessions') >= 1, `longpoll_sessions +${d('longpoll_sessions')}`);
  assert.ok(d('channels') >= clients.length + 1, `channels +${d('channels')}`);
  assert.ok(s1.topics >= 2, `topics ${s1.topics}`);
  assert.ok(d('messages_in') >= clients.length + 3 + 1, `messages_in +${d('messages_in')}`);
  assert.ok(d('messages_out') >= clients.length * 3, `messages_out +${d('messages_out')}`);
  assert.ok(d('bytes_in') > 0 && d('bytes_out') > 0, `bytes +${d('bytes_in')} / +${d('bytes_out')}`);
  assert.ok(d('broadcasts') >= 4, `broadcasts +${d('broadcasts')}`);
  assert.ok(d('deliveries') >= clients.length * 4, `deliveries +${d('deliveries')}`);
  assert.ok(s1.cores[0].connections >= 1 && s1.cores[1].connections >= 1, 'connections on both cores');

  // closing the clients brings the gauges back down
  for (const c of clients) await c.close();
  await waitFor(async () => (await read()).connections <= s1.connections - clients.length, { timeout: 3000, interval: 100, what: 'connections to drop' });
}, { timeout: 15000 });

e2e('GET /healthz answers 200', async () => {
  const res = await request(server.port, { path: '/healthz' });
  assert.equal(res.status, 200);
});

// ---------------------------------------------------------------------------
// HTTP/1.1 framing
// ---------------------------------------------------------------------------

e2e('keep-alive: two requests one after the other on one TCP connection', async () => {
  const tcp = await rawTcp(server.port);
  tcp.sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n');
  const [first] = await responses(tcp, 1);
  assert.equal(first.status, 200);
  assert.notEqual((first.headers.connection || '').toLowerCase(), 'close');
  await sleep(100);
  assert.equal(tcp.isClosed(), false, 'the connection stays open after the first answer');
  tcp.sock.write(`GET /api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\n\r\n`);
  const [, second] = await responses(tcp, 2);
  assert.equal(second.status, 200);
  assert.equal(typeof JSON.parse(second.body).connections, 'number');
  // connection: close is honoured
  tcp.sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
  const [, , third] = await responses(tcp, 3);
  assert.equal(third.status, 200);
  assert.equal((third.headers.connection || '').toLowerCase(), 'close');
  await within(tcp.closed, 2000, 'the server to close after connection: close');
});

e2e('pipelining: requests written at once are answered in order', async () => {
  const tcp = await rawTcp(server.port);
  const body = JSON.stringify({ topic: 'rooms:pipe', event: 'e', payload: { p: 1 } });
  tcp.sock.write(
    'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
    + `POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
    + 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n'
    + `POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}`
    + `GET /api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\n\r\n`,
  );
  const rs = await responses(tcp, 5);
  assert.deepEqual(rs.map((r) => r.status), [200, 202, 200, 401, 200]);
  assert.equal(rs[0].body, 'ok\n');
  assert.deepEqual(JSON.parse(rs[1].body), { ok: true });
  parsePrometheus(rs[2].body);
  assert.ok('connections' in JSON.parse(rs[4].body));
  await sleep(100);
  assert.equal(tcp.isClosed(), false, 'still open');
  assert.equal(parseResponses(tcp.data()).rest.length, 0, 'nothing after the five answers');
});

e2e('two requests in one TCP segment, the second split across writes, both answered', async () => {
  const tcp = await rawTcp(server.port);
  tcp.sock.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /heal');
  await sleep(50);
  tcp.sock.write('thz HTTP/1.1\r\nHost: x\r\n\r\n');
  const rs = await responses(tcp, 2);
  assert.deepEqual(rs.map((r) => r.status), [200, 200]);
});

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/** Sends `bytes` on a fresh TCP connection; expects one response with `status`, then the close. */
async function expectRefusal(bytes, status, what) {
  const tcp = await rawTcp(server.port);
  tcp.sock.write(bytes);
  const [res] = await responses(tcp, 1);
  assert.equal(res.status, status, `${what}: got ${res.status} ${res.reason} ${JSON.stringify(res.body)}`);
  assert.ok(res.body.length > 0, `${what}: the answer says why`);
  await within(tcp.closed, 2000, `${what}: the server to close the connection`);
  return res;
}

e2e('garbage instead of HTTP: 400, then the connection closes; a WebSocket client carries on', async () => {
  const by = await bystander('rooms:http-bad1');
  await expectRefusal(Buffer.from('\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n', 'latin1'), 400, 'TLS-ish garbage');
  await expectRefusal('HELLO THERE\r\n\r\n', 400, 'a nonsense request line');
  await expectRefusal('GET / HTTP/1.1\r\nBad Header Line\r\n\r\n', 400, 'a header line without a colon');
  await assertUnharmed(by);
});

e2e('a body over 1 MiB: 413, connection closed; a WebSocket client carries on', async () => {
  const by = await bystander('rooms:http-bad2');
  await expectRefusal(
    `POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nContent-Type: application/json\r\nContent-Length: ${(1 << 20) + 1}\r\n\r\n`,
    413, 'content-length 1 MiB + 1');
  await expectRefusal(
    `POST /socket/longpoll?token=x&vsn=2.0.0&token=0.ab HTTP/1.1\r\nHost: x\r\nContent-Length: ${8 << 20}\r\n\r\n`,
    413, 'a long-poll POST of 8 MiB');
  // exactly 1 MiB is within the limit (a bad body, so 400, but read and answered)
  const body = Buffer.alloc(1 << 20, 0x20);
  const res = await request(server.port, {
    method: 'POST', path: '/api/broadcast', headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' }, body: body.toString('latin1'),
  });
  assert.equal(res.status, 400, `a 1 MiB body of spaces: ${res.status} ${res.text}`);
  await assertUnharmed(by);
});

e2e('a repeated or non-digit Content-Length: 400, connection closed, nothing broadcast; a WebSocket client carries on', async () => {
  const by = await bystander('rooms:http-smuggle');
  const seen = collect(by.chan, 'new_msg');
  const post = (lengths, body) => `POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\n`
    + `Content-Type: application/json\r\n${lengths.map((l) => `Content-Length: ${l}\r\n`).join('')}\r\n${body}`;
  const body = JSON.stringify({ topic: 'rooms:http-smuggle', event: 'new_msg', payload: { body: 'smuggled' } });
  const n = Buffer.byteLength(body);
  await expectRefusal(post([n, n], body), 400, 'two equal Content-Length headers');
  await expectRefusal(post([n, 2], body), 400, 'two different Content-Length headers');
  await expectRefusal(post([`+${n}`], body), 400, 'a signed Content-Length');
  await expectRefusal(post([`${n}, ${n}`], body), 400, 'a list as Content-Length');
  await expectRefusal(post([`0x${n.toString(16)}`], body), 400, 'a hex Content-Length');
  await expectRefusal(post([''], body), 400, 'an empty Content-Length');
  // The same request with one plain header goes through: the refusals were the headers'.
  const ok = await request(server.port, {
    method: 'POST', path: '/api/broadcast', headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ topic: 'rooms:http-smuggle', event: 'new_msg', payload: { body: 'plain' } }),
  });
  assert.equal(ok.status, 202);
  const [first] = await seen.waitFor(1);
  seen.stop();
  assert.equal(first.body, 'plain', 'the first broadcast the bystander sees is the plain one: none was smuggled');
  assert.equal(seen.items.length, 1);
  await assertUnharmed(by);
});

e2e('transfer-encoding: chunked: 411, connection closed; a WebSocket client carries on', async () => {
  const by = await bystander('rooms:http-bad3');
  await expectRefusal(
    `POST /api/broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${API_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n`,
    411, 'a chunked POST');
  await assertUnharmed(by);
});

e2e('a request head over 8 KiB: 431, connection closed; a WebSocket client carries on', async () => {
  const by = await bystander('rooms:http-bad4');
  // a head that never ends, past 8 KiB
  await expectRefusal(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(9000)}`, 431, 'an unterminated 9 KB head');
  // complete heads over 8 KiB, in one write
  await expectRefusal(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(12 * 1024)}\r\n\r\n`, 431, 'a complete 12 KiB head');
  await expectRefusal(`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(9 * 1024)}\r\n\r\n`, 431, 'a complete 9 KiB head');
  await assertUnharmed(by);
});

e2e('many headers: answered with 431, connection closed', async () => {
  const headers = Array.from({ length: 200 }, (_, i) => `X-H${i}: v`).join('\r\n');
  await expectRefusal(`GET /healthz HTTP/1.1\r\nHost: x\r\n${headers}\r\n\r\n`, 431, '200 headers');
});
