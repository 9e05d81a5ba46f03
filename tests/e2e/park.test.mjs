// Parked connections: a WebSocket that has sent nothing for 1 s gives up its task and
// I/O source and waits in a kernel poll (engine/src/transport/park.rs). Nothing about
// it may change for the client: it still gets broadcasts (written by the core's
// flusher without waking it), answers heartbeats and pushes at once, is closed by
// `disconnect`, by its client going away and by a shutdown.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import {
  e2e, startServer, rawConnect, connect, collect, waitFor, sleep, assertAlive, BIN, SECRET, freePort,
} from './lib.mjs';
import { API_KEY, apiBroadcast, apiStats } from './httplib.mjs';

let server;
before(async () => { server = await startServer({ cores: 2, args: ['--api-key', API_KEY] }); });
after(async () => { await server.stop(); });

async function stats(port = server.port) {
  const res = await apiStats(port);
  assert.equal(res.status, 200);
  return JSON.parse(res.text);
}

/** Raw clients joined to `topic` until both cores hold at least one. */
async function clientsOnBothCores(topic, user, min = 2) {
  const clients = [];
  while (clients.length < min || (new Set(clients.map((c) => c.core)).size < 2 && clients.length < 40)) {
    const c = await rawConnect(server.port, { userId: `${user}${clients.length}` });
    assert.equal((await c.join(topic)).payload.status, 'ok');
    clients.push(c);
  }
  assert.equal(new Set(clients.map((c) => c.core)).size, 2, 'clients on both cores');
  return clients;
}

const waitParked = (n, what, port = server.port) => waitFor(async () => (await stats(port)).parked >= n,
  { timeout: 5000, interval: 100, what });

e2e('idle connections park; parked, they get broadcasts in order without waking, and answer heartbeats and pushes at once', async () => {
  const topic = 'rooms:park-basic';
  const clients = await clientsOnBothCores(topic, 'pk');
  await waitParked(clients.length, `all ${clients.length} idle connections to park`);
  for (const c of clients) c.drain();

  // broadcasts go out through the flusher; the connections stay parked
  for (let i = 0; i < 20; i++) {
    assert.equal((await apiBroadcast(server.port, { topic, event: 'new_msg', payload: { body: `b${i}` } })).status, 202);
  }
  for (const c of clients) {
    const got = [];
    while (got.length < 20) got.push((await c.event(topic, 'new_msg')).payload.body);
    assert.deepEqual(got, Array.from({ length: 20 }, (_, i) => `b${i}`), 'every broadcast once, in order');
  }
  assert.ok((await stats()).parked >= clients.length, 'broadcast delivery did not unpark anyone');

  // a heartbeat and a push from a parked connection are answered at once
  const [a] = clients;
  a.send([null, 'hb1', 'phoenix', 'heartbeat', {}]);
  assert.deepEqual((await a.reply('hb1', 1000)).payload, { status: 'ok', response: {} });
  await waitParked(clients.length, 'the connection to park again after its heartbeat');
  a.send(['1', 'p1', topic, 'new_msg', { body: 'from a parked socket' }]);
  for (const c of clients) {
    const m = await c.event(topic, 'new_msg', 1000);
    assert.equal(m.payload.body, 'from a parked socket');
  }
  for (const c of clients) assert.equal(c.closeInfo, null);
}, { timeout: 20000 });

e2e('a parked member still sees presence: joins and leaves of others arrive as presence_diff', async () => {
  const topic = 'rooms:park-presence';
  const watcher = await connect(server.port, 'pwatch');
  const chan = await watcher.joined(topic);
  const diffs = collect(chan, 'presence_diff');
  await waitParked(1, 'the watcher to park');
  const visitor = await connect(server.port, 'pvisitor');
  await visitor.joined(topic);
  await waitFor(() => diffs.items.some((d) => d.joins.pvisitor), { timeout: 3000, what: 'the visitor\'s join diff' });
  visitor.close();
  await waitFor(() => diffs.items.some((d) => d.leaves.pvisitor), { timeout: 3000, what: 'the visitor\'s leave diff' });
  assert.deepEqual(watcher.closes, []);
}, { timeout: 15000 });

e2e('a parked connection whose client goes away is released; disconnect closes parked sockets with 1001', async () => {
  const base = (await stats()).connections;
  const gone = await clientsOnBothCores('rooms:park-gone', 'pgone');
  // every one of these is user pdcuser, for the disconnect
  const dcs = [];
  while (dcs.length < 2 || (new Set(dcs.map((c) => c.core)).size < 2 && dcs.length < 40)) {
    const c = await rawConnect(server.port, { userId: 'pdcuser' });
    await c.join('rooms:park-dc');
    dcs.push(c);
  }
  await waitParked(gone.length + dcs.length, 'every connection to park');

  for (const c of gone) c.ws.terminate();
  await waitFor(async () => (await stats()).connections <= base + dcs.length,
    { timeout: 3000, interval: 50, what: 'the server to release the connections whose clients left' });

  assert.equal((await apiBroadcast(server.port, { topic: 'user_socket:pdcuser', event: 'disconnect', payload: {} })).status, 202);
  for (const c of dcs) {
    const { code } = await c.waitClosed(2000);
    assert.equal(code, 1001);
  }
  await waitFor(async () => (await stats()).connections <= base,
    { timeout: 3000, interval: 50, what: 'the disconnected connections to be gone' });
  assertAlive(server);
}, { timeout: 20000 });

e2e('the idle timeout and SIGTERM reach parked connections: 1001 to all, exit 0', async () => {
  const port = await freePort();
  const proc = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '2', '--secret', SECRET,
    '--api-key', API_KEY, '--idle-timeout', '4s'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  let log = '';
  proc.stderr.on('data', (b) => { log += b; });
  await waitFor(() => log.includes('listening on'), { timeout: 10000, what: 'the server to listen' });
  try {
    const silent = [];
    for (let i = 0; i < 50; i++) {
      const c = await rawConnect(port, { userId: `ps${i}` });
      await c.join('rooms:park-term');
      silent.push(c);
    }
    await waitParked(50, 'the silent connections to park', port);
    const closes = await Promise.all(silent.map((c) => c.waitClosed(6000)));
    for (const { code } of closes) assert.equal(code, 1001, 'closed by the idle timeout');

    const later = [];
    for (let i = 0; i < 50; i++) {
      const c = await rawConnect(port, { userId: `pl${i}` });
      await c.join('rooms:park-term');
      later.push(c);
    }
    await waitParked(50, 'the new connections to park', port);
    proc.kill('SIGTERM');
    const codes = await Promise.all(later.map((c) => c.waitClosed(3000).then((x) => x.code)));
    assert.deepEqual([...new Set(codes)], [1001], 'every parked connection got 1001');
    const { code } = await exited;
    assert.equal(code, 0, `exit code (log: ${log.slice(-500)})`);
  } finally {
    proc.kill('SIGKILL');
  }
}, { timeout: 30000 });
