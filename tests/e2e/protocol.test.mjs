// The wire protocol spoken by hand over raw `ws` (PROTOCOL.md sections 3, 4, 7, 8, 9),
// for what the phoenix client will not send: pushes on topics it has not joined,
// duplicate joins, stale join_refs, V1 frames.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, rawConnect, connect, nextEvent, isPresence, sansPosition, POSITION,
} from './lib.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

const ok = (response = {}) => ({ status: 'ok', response });
const notPresence = (m) => !isPresence(m);

e2e('heartbeat gets phx_reply ok {} with join_ref null and the same ref', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send([null, '7', 'phoenix', 'heartbeat', {}]);
  const reply = await ws.reply('7');
  assert.deepEqual(reply.frame, [null, '7', 'phoenix', 'phx_reply', { status: 'ok', response: {} }]);
});

e2e('refs are opaque strings echoed byte for byte', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  const ref = 'réf-ü/007 ✓';
  ws.send([ref, ref, 'rooms:refs', 'phx_join', {}]);
  const reply = await ws.reply(ref);
  assert.deepEqual(sansPosition(reply.frame), [ref, ref, 'rooms:refs', 'phx_reply', ok()]);
  ws.send([ref, '00', 'rooms:refs', 'ping', { a: 1 }]);
  assert.deepEqual((await ws.reply('00')).frame, [ref, '00', 'rooms:refs', 'phx_reply', ok({ a: 1 })]);
});

e2e('join reply and welcome push have the V2 shapes of PROTOCOL.md', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['3', '3', 'rooms:shape', 'phx_join', { name: 'ada' }]);
  const msgs = [];
  while (!msgs.some((m) => m.event === 'welcome')) msgs.push(await ws.next(notPresence));
  assert.deepEqual(msgs.map((m, i) => (i === 0 ? sansPosition(m.frame) : m.frame)), [
    ['3', '3', 'rooms:shape', 'phx_reply', ok()],
    ['3', null, 'rooms:shape', 'welcome', { msg: 'Welcome to room shape!' }],
  ]);
});

e2e('a push on a topic not joined replies error "unmatched topic" (join_ref null)', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['5', '6', 'rooms:nojoin', 'ping', {}]);
  const reply = await ws.reply('6');
  assert.deepEqual(reply.frame, [null, '6', 'rooms:nojoin', 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }]);
});

e2e('a join of an unmatched topic replies error "unmatched topic" and creates nothing', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['1', '1', 'foo:bar', 'phx_join', {}]);
  const reply = await ws.reply('1');
  assert.equal(reply.topic, 'foo:bar');
  assert.deepEqual(reply.payload, { status: 'error', response: { reason: 'unmatched topic' } });
  ws.send(['1', '2', 'foo:bar', 'ping', {}]);
  assert.deepEqual((await ws.reply('2')).payload, { status: 'error', response: { reason: 'unmatched topic' } });
});

e2e('a refused join (rooms:locked) leaves no channel behind', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['1', '1', 'rooms:locked', 'phx_join', {}]);
  assert.deepEqual((await ws.reply('1')).frame, ['1', '1', 'rooms:locked', 'phx_reply', { status: 'error', response: { reason: 'unauthorized' } }]);
  ws.send(['1', '2', 'rooms:locked', 'ping', {}]);
  assert.deepEqual((await ws.reply('2')).payload, { status: 'error', response: { reason: 'unmatched topic' } });
  await ws.expectNone((m) => m.event === 'welcome', 200, 'welcome after a refused join');
});

e2e('phx_leave on a topic not joined replies ok {}', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['1', '4', 'rooms:never', 'phx_leave', {}]);
  assert.deepEqual((await ws.reply('4')).payload, ok());
});

e2e('phx_leave replies ok then phx_close; later pushes get "unmatched topic"', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:phxleave');
  ws.send(['1', '2', 'rooms:phxleave', 'phx_leave', {}]);
  const reply = await ws.reply('2');
  assert.deepEqual(reply.frame, ['1', '2', 'rooms:phxleave', 'phx_reply', ok()]);
  const close = await ws.event('rooms:phxleave', 'phx_close');
  assert.deepEqual(close.frame, ['1', '1', 'rooms:phxleave', 'phx_close', {}]);
  ws.send(['1', '3', 'rooms:phxleave', 'ping', {}]);
  assert.deepEqual((await ws.reply('3')).payload, { status: 'error', response: { reason: 'unmatched topic' } });
});

e2e('leave event: phx_close for the join_ref, then pushes on the topic get "unmatched topic"', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:rawleave', {}, '11');
  ws.send(['11', '12', 'rooms:rawleave', 'leave', {}]);
  const close = await ws.event('rooms:rawleave', 'phx_close');
  assert.deepEqual(close.frame, ['11', '11', 'rooms:rawleave', 'phx_close', {}]);
  ws.send(['11', '13', 'rooms:rawleave', 'ping', {}]);
  assert.deepEqual((await ws.reply('13')).frame,
    [null, '13', 'rooms:rawleave', 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }]);
  assert.equal(ws.all.filter((m) => m.event === 'phx_error').length, 0);
});

e2e('crash: phx_error {"reason":"channel_crash"} with join_ref = ref = the join_ref; then unmatched', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:rawcrash', {}, '21');
  await ws.join('rooms:rawother', {}, '22');
  ws.send(['21', '23', 'rooms:rawcrash', 'crash', {}]);
  const err = await ws.event('rooms:rawcrash', 'phx_error');
  assert.deepEqual(err.frame, ['21', '21', 'rooms:rawcrash', 'phx_error', { reason: 'channel_crash' }]);
  ws.send(['21', '24', 'rooms:rawcrash', 'ping', {}]);
  assert.deepEqual((await ws.reply('24')).payload, { status: 'error', response: { reason: 'unmatched topic' } });
  ws.send(['22', '25', 'rooms:rawother', 'ping', { x: 1 }]);
  assert.deepEqual((await ws.reply('25')).frame, ['22', '25', 'rooms:rawother', 'phx_reply', ok({ x: 1 })]);
  ws.send(['26', '26', 'rooms:rawcrash', 'phx_join', {}]);
  assert.deepEqual(sansPosition((await ws.reply('26')).payload), ok(), 'the crashed topic can be joined again');
});

e2e('duplicate join: the new join is answered first, then phx_close for the old join_ref', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:dup', {}, '1');
  await ws.event('rooms:dup', 'welcome');
  ws.drain();
  ws.send(['2', '2', 'rooms:dup', 'phx_join', {}]);
  const seq = [];
  while (!seq.some((m) => m.event === 'welcome')) seq.push(await ws.next(notPresence));
  assert.deepEqual(seq.map((m, i) => (i === 0 ? sansPosition(m.frame) : m.frame)), [
    ['2', '2', 'rooms:dup', 'phx_reply', ok()],
    ['1', '1', 'rooms:dup', 'phx_close', {}],
    ['2', null, 'rooms:dup', 'welcome', { msg: 'Welcome to room dup!' }],
  ]);
  assert.equal(ws.all.filter((m) => m.event === 'phx_error').length, 0, 'replacing is not a crash');
  ws.send(['2', '3', 'rooms:dup', 'ping', { n: 3 }]);
  assert.deepEqual((await ws.reply('3')).frame, ['2', '3', 'rooms:dup', 'phx_reply', ok({ n: 3 })]);
});

e2e('after a duplicate join the topic delivers broadcasts once, not twice', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('bench:dup2', {}, '1');
  await ws.join('bench:dup2', {}, '2');
  ws.send(['2', '3', 'bench:dup2', 'new_msg', { body: 'once' }]);
  await ws.event('bench:dup2', 'new_msg');
  await ws.expectNone((m) => m.event === 'new_msg', 300, 'second copy of the broadcast');
});

e2e('a push with a stale join_ref is dropped silently', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:stale', {}, '1');
  await ws.join('rooms:stale', {}, '2');
  ws.send(['1', '10', 'rooms:stale', 'ping', { stale: true }]);
  ws.send(['2', '11', 'rooms:stale', 'ping', { fresh: true }]);
  assert.deepEqual((await ws.reply('11')).frame, ['2', '11', 'rooms:stale', 'phx_reply', ok({ fresh: true })]);
  await ws.expectNone((m) => m.ref === '10', 300, 'reply to the stale push');
});

e2e('a push with join_ref null is delivered to the channel', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:nulljr', {}, '1');
  ws.send([null, '5', 'rooms:nulljr', 'ping', { n: null }]);
  const reply = await ws.reply('5');
  assert.equal(reply.topic, 'rooms:nulljr');
  assert.deepEqual(reply.payload, ok({ n: null }));
});

e2e('elements after the fifth are ignored', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  ws.send(['1', '1', 'rooms:six', 'phx_join', {}, 'extra']);
  assert.deepEqual(sansPosition((await ws.reply('1')).payload), ok());
  ws.send(['1', '2', 'rooms:six', 'ping', { six: 6 }, 'extra', 7]);
  assert.deepEqual((await ws.reply('2')).payload, ok({ six: 6 }));
});

e2e('a raw binary ping is answered with a kind-1 binary reply (worked example)', async () => {
  const ws = await rawConnect(server.port, { userId: 'h1' });
  await ws.join('rooms:a', {}, '1');
  ws.send(Buffer.from([0x00, 0x01, 0x01, 0x07, 0x04, 0x31, 0x35, ...Buffer.from('rooms:a'), ...Buffer.from('ping'), 0x01, 0x02]));
  const reply = await ws.next((m) => m.binary, 2000, 'a binary frame');
  assert.equal(reply.kind, 'reply');
  assert.deepEqual(Buffer.from(reply.payload), Buffer.from([0x01, 0x02]));
  assert.deepEqual({ join_ref: reply.join_ref, ref: reply.ref, topic: reply.topic, status: reply.status },
    { join_ref: '1', ref: '5', topic: 'rooms:a', status: 'ok' });
});

e2e('V1 (vsn=1.0.0): join reply is an object with exactly topic/event/payload/ref', async () => {
  const ws = await rawConnect(server.port, { userId: 'v1', vsn: '1.0.0' });
  ws.send({ topic: 'rooms:v1', event: 'phx_join', payload: { name: 'ada' }, ref: '1' });
  const reply = await ws.next((m) => m.event === 'phx_reply');
  assert.ok(!Array.isArray(reply.frame), `V1 frames are objects, got ${reply.text}`);
  assert.deepEqual(sansPosition(reply.frame), { topic: 'rooms:v1', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: '1' });
  assert.deepEqual(Object.keys(reply.frame).sort(), ['event', 'payload', 'ref', 'topic'], 'no join_ref key in V1');
  const welcome = await ws.next((m) => m.event === 'welcome');
  assert.deepEqual(welcome.frame, { topic: 'rooms:v1', event: 'welcome', payload: { msg: 'Welcome to room v1!' }, ref: null });
});

e2e('V1: pushes with join_ref, replies and heartbeats work', async () => {
  const ws = await rawConnect(server.port, { userId: 'v1', vsn: '1.0.0' });
  ws.send({ topic: 'rooms:v1b', event: 'phx_join', payload: {}, ref: '1', join_ref: '1' });
  await ws.next((m) => m.event === 'phx_reply' && m.ref === '1');
  ws.send({ topic: 'rooms:v1b', event: 'ping', payload: { v: 1 }, ref: '2', join_ref: '1' });
  const reply = await ws.next((m) => m.ref === '2');
  assert.deepEqual(reply.frame, { topic: 'rooms:v1b', event: 'phx_reply', payload: { status: 'ok', response: { v: 1 } }, ref: '2' });
  ws.send({ topic: 'phoenix', event: 'heartbeat', payload: {}, ref: '3' });
  const hb = await ws.next((m) => m.ref === '3');
  assert.deepEqual(hb.frame, { topic: 'phoenix', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: '3' });
});

e2e('V1: an error reply is a V1 object too', async () => {
  const ws = await rawConnect(server.port, { userId: 'v1', vsn: '1.0.0' });
  ws.send({ topic: 'rooms:locked', event: 'phx_join', payload: {}, ref: '1' });
  const reply = await ws.next((m) => m.ref === '1');
  assert.deepEqual(reply.frame, { topic: 'rooms:locked', event: 'phx_reply', payload: { status: 'error', response: { reason: 'unauthorized' } }, ref: '1' });
});

e2e('no vsn parameter means V1', async () => {
  const ws = await rawConnect(server.port, { userId: 'v1', vsn: null });
  ws.send({ topic: 'phoenix', event: 'heartbeat', payload: {}, ref: '9' });
  const hb = await ws.next((m) => m.ref === '9');
  assert.deepEqual(hb.frame, { topic: 'phoenix', event: 'phx_reply', payload: { status: 'ok', response: {} }, ref: '9' });
});

e2e('a V1 and a V2 client in one room both get new_msg, each in its own encoding', async () => {
  const v1 = await rawConnect(server.port, { userId: 'one', vsn: '1.0.0' });
  v1.send({ topic: 'rooms:mixed', event: 'phx_join', payload: {}, ref: '1' });
  await v1.next((m) => m.ref === '1' && m.event === 'phx_reply');
  const v2 = await connect(server.port, 'two');
  const ch = await v2.joined('rooms:mixed');

  const got2 = nextEvent(ch, 'new_msg');
  ch.push('new_msg', { body: 'from v2' });
  assert.deepEqual(await got2, { body: 'from v2', user: 'two' });
  const at1 = await v1.next((m) => m.event === 'new_msg');
  assert.match(at1.frame.ref, POSITION, 'a rooms:* broadcast carries its position in V1 too');
  assert.deepEqual(at1.frame, { topic: 'rooms:mixed', event: 'new_msg', payload: { body: 'from v2', user: 'two' }, ref: at1.frame.ref });

  const again2 = nextEvent(ch, 'new_msg');
  v1.send({ topic: 'rooms:mixed', event: 'new_msg', payload: { body: 'from v1' }, ref: '2' });
  assert.deepEqual(await again2, { body: 'from v1', user: 'one' });
  const raw2 = v2.received('rooms:mixed', 'new_msg').at(-1);
  assert.equal(raw2.join_ref, null);
  assert.match(raw2.ref, POSITION);
  const self1 = await v1.next((m) => m.event === 'new_msg');
  assert.deepEqual(self1.frame, { topic: 'rooms:mixed', event: 'new_msg', payload: { body: 'from v1', user: 'one' }, ref: raw2.ref }, 'one position for both encodings');
});

e2e('a V2 broadcast arrives as [null,null,topic,event,payload]', async () => {
  const a = await rawConnect(server.port, { userId: 'a' });
  const b = await rawConnect(server.port, { userId: 'b' });
  await a.join('bench:v2shape');
  await b.join('bench:v2shape');
  a.send(['1', '2', 'bench:v2shape', 'new_msg', { body: 'shape' }]);
  const m = await b.event('bench:v2shape', 'new_msg');
  assert.deepEqual(m.frame, [null, null, 'bench:v2shape', 'new_msg', { body: 'shape', user: 'a' }]);
});
