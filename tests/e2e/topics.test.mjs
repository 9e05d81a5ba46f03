// `notifications:<user_id>` and `bench:*` (seed-app.md), with the phoenix client.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { e2e, startServer, connect, join, push, nextEvent, collect, sleep } from './lib.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

e2e('join notifications:<own user id> replies ok {}', async () => {
  const c = await connect(server.port, '7');
  assert.deepEqual(await join(c.channel('notifications:7')), { status: 'ok', response: {} });
});

e2e("join notifications:<another user's id> replies error {\"reason\":\"unauthorized\"}", async () => {
  const c = await connect(server.port, '7');
  assert.deepEqual(await join(c.channel('notifications:8')), { status: 'error', response: { reason: 'unauthorized' } });
});

e2e('join notifications:<id> with a prefix of the own id is unauthorized', async () => {
  const c = await connect(server.port, '77');
  assert.deepEqual(await join(c.channel('notifications:7')), { status: 'error', response: { reason: 'unauthorized' } });
});

e2e('join bench:x replies ok {} and nothing is pushed after it', async () => {
  const c = await connect(server.port, 'b1');
  const other = await connect(server.port, 'b2');
  await other.joined('bench:x');
  const res = await join(c.channel('bench:x'));
  assert.deepEqual(res, { status: 'ok', response: {} });
  await sleep(400);
  const seen = c.received('bench:x').map((m) => m.event);
  assert.deepEqual(seen, ['phx_reply'], 'no welcome, no presence on bench:*');
  assert.deepEqual(other.received('bench:x').map((m) => m.event), ['phx_reply'], 'members see nothing of a join');
});

e2e('bench: new_msg is broadcast to every member, sender included, with no reply', async () => {
  const a = await connect(server.port, 'b1');
  const b = await connect(server.port, 'b2');
  const chA = await a.joined('bench:fan');
  const chB = await b.joined('bench:fan');
  const gotA = nextEvent(chA, 'new_msg');
  const gotB = nextEvent(chB, 'new_msg');
  const res = push(chA, 'new_msg', { body: 'fan' }, 700);
  assert.deepEqual(await gotA, { body: 'fan', user: 'b1' });
  assert.deepEqual(await gotB, { body: 'fan', user: 'b1' });
  assert.equal((await res).status, 'timeout', 'new_msg gets no reply');
  const bc = b.received('bench:fan', 'new_msg')[0];
  assert.equal(bc.join_ref, null, 'a fastlane broadcast carries no join_ref');
  assert.equal(bc.ref, null);
});

e2e('a broadcast on one topic does not leak to another topic', async () => {
  const a = await connect(server.port, 'b1');
  const chA = await a.joined('bench:one');
  const chB = await a.joined('bench:two');
  const colB = collect(chB, 'new_msg');
  const got = nextEvent(chA, 'new_msg');
  chA.push('new_msg', { body: 'only one' });
  await got;
  await sleep(200);
  assert.deepEqual(colB.items, []);
});
