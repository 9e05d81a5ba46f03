// Refs as clients other than phoenix.js send them (PROTOCOL.md §1): integers as well as
// strings, in V1 and V2 frames. Every answer carries the ref back in the type it came in
// (the raw client matches refs with ===, so "1" never answers 1), and a join_ref is
// compared by value.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { e2e, startServer, rawConnect, isPresence, sansPosition } from './lib.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

const ok = (response = {}) => ({ status: 'ok', response });

e2e('V2 with number refs: join, push with a reply, heartbeat, leave and phx_close keep the numbers', async () => {
  const ws = await rawConnect(server.port, { userId: 'n2' });
  ws.send([null, 0, 'phoenix', 'heartbeat', {}]);
  assert.deepEqual((await ws.reply(0)).frame, [null, 0, 'phoenix', 'phx_reply', ok()]);

  ws.send([1, 1, 'rooms:p3', 'phx_join', {}]);
  assert.deepEqual(sansPosition((await ws.reply(1)).frame), [1, 1, 'rooms:p3', 'phx_reply', ok()]);
  const welcome = await ws.event('rooms:p3', 'welcome');
  assert.deepEqual(welcome.frame, [1, null, 'rooms:p3', 'welcome', { msg: 'Welcome to room p3!' }]);
  const state = await ws.event('rooms:p3', 'presence_state');
  assert.strictEqual(state.join_ref, 1, 'presence_state carries the number join_ref');

  ws.send([1, 2, 'rooms:p3', 'ping', { a: 1 }]);
  assert.deepEqual((await ws.reply(2)).frame, [1, 2, 'rooms:p3', 'phx_reply', ok({ a: 1 })]);

  ws.send([1, 3, 'rooms:p3', 'phx_leave', {}]);
  assert.deepEqual((await ws.reply(3)).frame, [1, 3, 'rooms:p3', 'phx_reply', ok()]);
  const close = await ws.event('rooms:p3', 'phx_close');
  assert.deepEqual(close.frame, [1, 1, 'rooms:p3', 'phx_close', {}]);
  assert.equal(ws.closeInfo, null, 'the connection stays open');
});

e2e('a number join_ref is compared by value: the string "1" is a stale ref for join_ref 1', async () => {
  const ws = await rawConnect(server.port, { userId: 'n3' });
  ws.send([1, 1, 'rooms:byvalue', 'phx_join', {}]);
  await ws.reply(1);
  ws.send(['1', 'str', 'rooms:byvalue', 'ping', {}]);
  ws.send([1, 'num', 'rooms:byvalue', 'ping', {}]);
  assert.deepEqual((await ws.reply('num')).frame, [1, 'num', 'rooms:byvalue', 'phx_reply', ok()]);
  // Frames are handled in order, so a reply to 'str' would have come before this one.
  assert.equal(ws.all.filter((m) => m.ref === 'str').length, 0, 'a push under a stale join_ref is dropped');
});

e2e('V2 number refs on phx_error and on the phx_close of a replaced join', async () => {
  const ws = await rawConnect(server.port, { userId: 'n4' });
  ws.send([5, 5, 'rooms:crashy', 'phx_join', {}]);
  await ws.reply(5);
  ws.send([5, 6, 'rooms:crashy', 'crash', {}]);
  const err = await ws.event('rooms:crashy', 'phx_error');
  assert.deepEqual(err.frame.slice(0, 4), [5, 5, 'rooms:crashy', 'phx_error']);

  ws.send([7, 7, 'rooms:twice', 'phx_join', {}]);
  await ws.reply(7);
  ws.send([8, 8, 'rooms:twice', 'phx_join', {}]);
  assert.deepEqual(sansPosition((await ws.reply(8)).frame), [8, 8, 'rooms:twice', 'phx_reply', ok()]);
  const close = await ws.event('rooms:twice', 'phx_close');
  assert.deepEqual(close.frame, [7, 7, 'rooms:twice', 'phx_close', {}]);
});

e2e('V1 as phxsocket sends it: number refs on heartbeat, join, push and leave come back as numbers', async () => {
  const ws = await rawConnect(server.port, { userId: 'n1', vsn: '1.0.0' });
  ws.send({ event: 'heartbeat', topic: 'phoenix', ref: 0, payload: {} });
  assert.deepEqual((await ws.reply(0)).frame, { topic: 'phoenix', event: 'phx_reply', payload: ok(), ref: 0 });

  ws.send({ event: 'phx_join', topic: 'rooms:trace', ref: 1, payload: { name: 'ada' } });
  assert.deepEqual(sansPosition((await ws.reply(1)).frame), { topic: 'rooms:trace', event: 'phx_reply', payload: ok(), ref: 1 });
  const diff = await ws.next((m) => m.event === 'presence_diff');
  assert.equal(diff.frame.payload.joins.n1.metas[0].name, 'ada');

  ws.send({ event: 'ping', topic: 'rooms:trace', ref: 2, join_ref: 1, payload: { n: 2 } });
  assert.deepEqual((await ws.reply(2)).frame, { topic: 'rooms:trace', event: 'phx_reply', payload: ok({ n: 2 }), ref: 2 });

  // Without a join_ref key V1 pushes go to the joined channel too.
  ws.send({ event: 'ping', topic: 'rooms:trace', ref: 3, payload: {} });
  assert.deepEqual((await ws.reply(3)).frame.ref, 3);

  ws.send({ event: 'phx_leave', topic: 'rooms:trace', ref: 4, join_ref: 1, payload: {} });
  assert.deepEqual((await ws.reply(4)).frame, { topic: 'rooms:trace', event: 'phx_reply', payload: ok(), ref: 4 });
  // V1 carries no join_ref: the phx_close's ref is the join's ref, the number 1.
  const close = await ws.event('rooms:trace', 'phx_close');
  assert.deepEqual(close.frame, { topic: 'rooms:trace', event: 'phx_close', payload: {}, ref: 1 });
});

e2e('a ref of any other type (object, array, float, boolean) closes with 1007; others are unharmed', async () => {
  const bystander = await rawConnect(server.port, { userId: 'by' });
  await bystander.join('rooms:refbad');
  const cases = [
    [{ r: 1 }, '1', 'rooms:refbad', 'phx_join', {}],
    ['1', [1], 'rooms:refbad', 'phx_join', {}],
    ['1', 1.5, 'rooms:refbad', 'phx_join', {}],
    [true, '1', 'rooms:refbad', 'phx_join', {}],
  ];
  for (const frame of cases) {
    const ws = await rawConnect(server.port, { userId: 'bad' });
    ws.send(frame);
    const { code } = await ws.waitClosed();
    assert.equal(code, 1007, `close code for ${JSON.stringify(frame)}`);
  }
  const v1 = await rawConnect(server.port, { userId: 'bad', vsn: '1.0.0' });
  v1.send({ event: 'heartbeat', topic: 'phoenix', ref: { n: 0 }, payload: {} });
  assert.equal((await v1.waitClosed()).code, 1007);

  bystander.send(['1', '9', 'rooms:refbad', 'ping', { still: 'here' }]);
  assert.deepEqual((await bystander.reply('9')).payload, ok({ still: 'here' }));
  assert.ok(!bystander.all.some((m) => !isPresence(m) && m.event === 'phx_error'));
});
