// `--cores 2`: connections are spread over the cores (seen in the x-ringcast-core header
// of the 101 answer) and a broadcast reaches every subscriber on every core exactly
// once, in each sender's order.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { e2e, startServer, connect, collect, push, sleep } from './lib.mjs';

let server;
before(async () => { server = await startServer({ cores: 2 }); });
after(async () => { await server.stop(); });

const PER_SENDER = 50;

e2e('bench:xc with clients on both cores: every message once, per sender in order', async () => {
  const clients = [];
  const cores = () => new Set(clients.map((c) => c.core));
  while (clients.length < 16 || (cores().size < 2 && clients.length < 64)) {
    clients.push(await connect(server.port, `xc${clients.length}`));
  }
  for (const c of clients) assert.ok(c.core === '0' || c.core === '1', `x-ringcast-core is "${c.core}"`);
  assert.deepEqual([...cores()].sort(), ['0', '1'], `${clients.length} connections all landed on one core`);

  const chans = [];
  for (const c of clients) chans.push(await c.joined('bench:xc'));
  const cols = chans.map((ch) => collect(ch, 'new_msg'));
  await sleep(100);

  const senders = ['0', '1'].map((core) => clients.findIndex((c) => c.core === core));
  for (let i = 0; i < PER_SENDER; i++) {
    for (const s of senders) chans[s].push('new_msg', { body: `${clients[s].userId}:${i}` });
  }
  const total = PER_SENDER * senders.length;
  await Promise.all(cols.map((col) => col.waitFor(total, 8000)));
  await sleep(300);

  const want = Object.fromEntries(senders.map((s) => [clients[s].userId, Array.from({ length: PER_SENDER }, (_, i) => i)]));
  cols.forEach((col, k) => {
    const got = Object.fromEntries(senders.map((s) => [clients[s].userId, []]));
    for (const m of col.items) {
      const [user, idx] = m.body.split(':');
      assert.equal(m.user, user, `"user" names the sender: ${JSON.stringify(m)}`);
      assert.ok(user in got, `message from a non-sender: ${JSON.stringify(m)}`);
      got[user].push(Number(idx));
    }
    assert.deepEqual(got, want, `subscriber ${clients[k].userId} on core ${clients[k].core}`);
  });
}, { timeout: 20000 });

e2e('a shout from one core skips only the sender, on both cores', async () => {
  const clients = [];
  while (clients.length < 8 || (new Set(clients.map((c) => c.core)).size < 2 && clients.length < 64)) {
    clients.push(await connect(server.port, `sh${clients.length}`));
  }
  const chans = [];
  for (const c of clients) chans.push(await c.joined('rooms:xshout'));
  const cols = chans.map((ch) => collect(ch, 'shout'));
  chans[0].push('shout', { body: 'across' });
  await Promise.all(cols.slice(1).map((col) => col.waitFor(1, 3000)));
  await sleep(300);
  assert.deepEqual(cols[0].items, []);
  cols.slice(1).forEach((col) => assert.deepEqual(col.items, [{ body: 'across', user: 'sh0' }]));
}, { timeout: 15000 });

e2e('a whisper reaches its user on the other core', async () => {
  const clients = [];
  const onCore = (core) => clients.find((c) => c.core === core);
  while (!(onCore('0') && onCore('1')) && clients.length < 64) {
    clients.push(await connect(server.port, `wh${clients.length}`));
  }
  const from = onCore('0');
  const to = onCore('1');
  assert.ok(from && to, 'clients on both cores');
  const chFrom = await from.joined('rooms:xwhisper');
  const chTo = await to.joined('rooms:xwhisper');
  const got = collect(chTo, 'whisper');
  const res = await push(chFrom, 'whisper', { to: to.userId, body: 'hi there' });
  assert.deepEqual(res, { status: 'ok', response: {} });
  await got.waitFor(1, 3000);
  await sleep(200);
  assert.deepEqual(got.items, [{ to: to.userId, body: 'hi there', from: from.userId }]);
}, { timeout: 15000 });
