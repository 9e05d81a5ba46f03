// The seed app's `rooms:*` channel, driven by the unmodified phoenix client
// (seed-app.md, "Channels / rooms:*"). Presence is out of scope here: presence
// events are ignored wherever they may show up.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, connect, join, push, nextEvent, collect, waitFor, sleep, assertAlive, within, sansPosition,
} from './lib.mjs';

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

e2e('join rooms:lobby replies ok {"position": <its position>}', async () => {
  const c = await connect(server.port, 'u1');
  const res = await join(c.channel('rooms:lobby'));
  assert.deepEqual(sansPosition(res), { status: 'ok', response: {} });
});

e2e('join rooms:locked replies error {"reason":"unauthorized"}', async () => {
  const c = await connect(server.port, 'u1');
  const res = await join(c.channel('rooms:locked'));
  assert.deepEqual(res, { status: 'error', response: { reason: 'unauthorized' } });
});

e2e('join payload with a name is accepted with ok {"position"}', async () => {
  const c = await connect(server.port, 'u1');
  const chan = c.channel('rooms:named', { name: 'ada' });
  const welcome = nextEvent(chan, 'welcome');
  const res = await join(chan);
  assert.deepEqual(sansPosition(res), { status: 'ok', response: {} });
  assert.deepEqual(await welcome, { msg: 'Welcome to room named!' });
});

e2e('welcome push {"msg":"Welcome to room lobby!"} arrives after the join reply', async () => {
  const c = await connect(server.port, 'u1');
  const chan = c.channel('rooms:lobby');
  const welcome = nextEvent(chan, 'welcome');
  const res = await join(chan);
  assert.equal(res.status, 'ok');
  assert.deepEqual(await welcome, { msg: 'Welcome to room lobby!' });
  const seq = c.received('rooms:lobby').filter((m) => m.event === 'phx_reply' || m.event === 'welcome');
  assert.deepEqual(seq.map((m) => m.event), ['phx_reply', 'welcome']);
  const [reply, push] = seq;
  assert.equal(reply.ref, chan.joinRef());
  assert.equal(reply.join_ref, chan.joinRef());
  assert.equal(push.join_ref, chan.joinRef(), 'a channel push carries the join_ref');
  assert.equal(push.ref, null, 'a channel push has no ref');
});

e2e('welcome names the whole room id after "rooms:"', async () => {
  const c = await connect(server.port, 'u1');
  const chan = c.channel('rooms:a:b c');
  const welcome = nextEvent(chan, 'welcome');
  assert.equal((await join(chan)).status, 'ok');
  assert.deepEqual(await welcome, { msg: 'Welcome to room a:b c!' });
});

e2e('new_msg reaches every member, sender included, as {"body","user"}', async () => {
  const a = await connect(server.port, 'alice');
  const b = await connect(server.port, 'bob');
  const chA = await a.joined('rooms:newmsg');
  const chB = await b.joined('rooms:newmsg');
  const gotA = nextEvent(chA, 'new_msg');
  const gotB = nextEvent(chB, 'new_msg');
  chA.push('new_msg', { body: 'hello' });
  assert.deepEqual(await gotA, { body: 'hello', user: 'alice' });
  assert.deepEqual(await gotB, { body: 'hello', user: 'alice' });
});

e2e('new_msg gets no reply', async () => {
  const a = await connect(server.port, 'alice');
  const chA = await a.joined('rooms:noreply');
  const got = nextEvent(chA, 'new_msg');
  const res = await push(chA, 'new_msg', { body: 'x' }, 700);
  await got;
  assert.equal(res.status, 'timeout');
  assert.equal(a.received('rooms:noreply', 'phx_reply').length, 1, 'only the join was answered');
});

e2e('new_msg is delivered exactly once per member, in send order', async () => {
  const a = await connect(server.port, 'alice');
  const b = await connect(server.port, 'bob');
  const chA = await a.joined('rooms:order');
  const chB = await b.joined('rooms:order');
  const colA = collect(chA, 'new_msg');
  const colB = collect(chB, 'new_msg');
  for (let i = 0; i < 30; i++) chA.push('new_msg', { body: `m${i}` });
  await colA.waitFor(30, 3000);
  await colB.waitFor(30, 3000);
  await sleep(200);
  const want = Array.from({ length: 30 }, (_, i) => ({ body: `m${i}`, user: 'alice' }));
  assert.deepEqual(colA.items, want);
  assert.deepEqual(colB.items, want);
});

e2e('shout reaches every member but the sending connection; sender gets ok {}', async () => {
  const a1 = await connect(server.port, 'alice');
  const a2 = await connect(server.port, 'alice');
  const b = await connect(server.port, 'bob');
  const ch1 = await a1.joined('rooms:shout');
  const ch2 = await a2.joined('rooms:shout');
  const chB = await b.joined('rooms:shout');
  const col1 = collect(ch1, 'shout');
  const got2 = nextEvent(ch2, 'shout');
  const gotB = nextEvent(chB, 'shout');
  const res = await push(ch1, 'shout', { body: 'hey' });
  assert.deepEqual(res, { status: 'ok', response: {} });
  assert.deepEqual(await gotB, { body: 'hey', user: 'alice' });
  assert.deepEqual(await got2, { body: 'hey', user: 'alice' }, "the same user's other connection gets it");
  await sleep(300);
  assert.deepEqual(col1.items, [], 'the sending connection must not get its own shout');
});

e2e('whisper reaches only the sockets of user "to"; sender gets ok {}', async () => {
  const a1 = await connect(server.port, 'alice');
  const a2 = await connect(server.port, 'alice');
  const b = await connect(server.port, 'bob');
  const c = await connect(server.port, 'carol');
  const ch1 = await a1.joined('rooms:whisper');
  const ch2 = await a2.joined('rooms:whisper');
  const chB = await b.joined('rooms:whisper');
  const chC = await c.joined('rooms:whisper');
  const got1 = nextEvent(ch1, 'whisper');
  const got2 = nextEvent(ch2, 'whisper');
  const colB = collect(chB, 'whisper');
  const colC = collect(chC, 'whisper');
  const res = await push(chB, 'whisper', { to: 'alice', body: 'psst' });
  assert.deepEqual(res, { status: 'ok', response: {} });
  const want = { to: 'alice', body: 'psst', from: 'bob' };
  assert.deepEqual(await got1, want);
  assert.deepEqual(await got2, want);
  await sleep(300);
  assert.deepEqual(colB.items, [], 'the sender is not "to"');
  assert.deepEqual(colC.items, [], 'a bystander is not "to"');
  const pushed = a1.received('rooms:whisper', 'whisper');
  assert.equal(pushed.length, 1);
  assert.equal(pushed[0].join_ref, ch1.joinRef(), 'an intercepted whisper is a channel push (carries the join_ref)');
});

e2e('ping with a JSON payload replies ok with the same payload', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:ping');
  const payload = { n: 1, s: 'héllo ✓', nested: { list: [1, 2.5, null, true, 'x'] }, empty: {} };
  assert.deepEqual(await push(chan, 'ping', payload), { status: 'ok', response: payload });
});

e2e('ping with a non-object JSON payload echoes it', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:ping2');
  assert.deepEqual(await push(chan, 'ping', [1, 'two', { three: 3 }]), { status: 'ok', response: [1, 'two', { three: 3 }] });
  assert.deepEqual(await push(chan, 'ping', 'just a string'), { status: 'ok', response: 'just a string' });
  assert.deepEqual(await push(chan, 'ping', 42), { status: 'ok', response: 42 });
});

e2e('ping with an ArrayBuffer payload replies with binary holding the same bytes', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:binping');
  const bytes = new Uint8Array(300);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7) % 256;
  const res = await push(chan, 'ping', bytes.buffer);
  assert.equal(res.status, 'ok');
  assert.ok(res.response instanceof ArrayBuffer, `response should be an ArrayBuffer, got ${JSON.stringify(res.response)}`);
  assert.deepEqual(new Uint8Array(res.response), bytes);
});

e2e('ping with an empty ArrayBuffer replies with empty binary', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:binping0');
  const res = await push(chan, 'ping', new ArrayBuffer(0));
  assert.equal(res.status, 'ok');
  assert.ok(res.response instanceof ArrayBuffer);
  assert.equal(res.response.byteLength, 0);
});

e2e('bad_request replies error {"reason":"invalid"} and the channel stays joined', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:bad');
  assert.deepEqual(await push(chan, 'bad_request', {}), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
});

e2e('an unknown event replies error {"reason":"unknown event"} and the channel stays joined', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:unknown');
  assert.deepEqual(await push(chan, 'no_such_event', { a: 1 }), { status: 'error', response: { reason: 'unknown event' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
});

e2e('new_msg without a body replies error {"reason":"invalid"} and broadcasts nothing', async () => {
  const a = await connect(server.port, 'u1');
  const b = await connect(server.port, 'u2');
  const chan = await a.joined('rooms:nobody');
  const chB = await b.joined('rooms:nobody');
  const colB = collect(chB, 'new_msg');
  assert.deepEqual(await push(chan, 'new_msg', {}), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
  await sleep(200);
  assert.deepEqual(colB.items, []);
});

e2e('new_msg with a non-string body replies error {"reason":"invalid"}', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:numbody');
  assert.deepEqual(await push(chan, 'new_msg', { body: 5 }), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'new_msg', { body: null }), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'new_msg', { body: ['x'] }), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
});

e2e('a body over 8,192 bytes in new_msg, shout or whisper replies error {"reason":"invalid"} and reaches nobody', async () => {
  const a = await connect(server.port, 'big1');
  const b = await connect(server.port, 'big2');
  const chan = await a.joined('rooms:bigbody');
  const chB = await b.joined('rooms:bigbody');
  const got = { new_msg: collect(chB, 'new_msg'), shout: collect(chB, 'shout'), whisper: collect(chB, 'whisper') };
  const invalid = { status: 'error', response: { reason: 'invalid' } };
  const over = 'x'.repeat(8193);
  // An attacker's burst of big messages: none is broadcast.
  for (let i = 0; i < 20; i++) assert.deepEqual(await push(chan, 'new_msg', { body: over }), invalid);
  assert.deepEqual(await push(chan, 'shout', { body: over }), invalid);
  assert.deepEqual(await push(chan, 'whisper', { to: 'big2', body: over }), invalid);
  // At the limit all three go through.
  const at = 'y'.repeat(8192);
  chan.push('new_msg', { body: at });
  assert.deepEqual(await push(chan, 'shout', { body: at }), { status: 'ok', response: {} });
  assert.deepEqual(await push(chan, 'whisper', { to: 'big2', body: at }), { status: 'ok', response: {} });
  await got.whisper.waitFor(1);
  await got.new_msg.waitFor(1);
  await got.shout.waitFor(1);
  assert.deepEqual(got.new_msg.items.map((m) => m.body.length), [8192], 'only the message at the limit was broadcast');
  assert.deepEqual(got.shout.items.map((m) => m.body.length), [8192]);
  assert.deepEqual(got.whisper.items.map((m) => m.body.length), [8192]);
  assert.deepEqual(b.closes, [], 'the member was never cut off');
});

e2e('a join name that is not a string or is over 256 bytes replies error {"reason":"invalid"}; 256 bytes joins', async () => {
  const c = await connect(server.port, 'namer');
  const invalid = { status: 'error', response: { reason: 'invalid' } };
  assert.deepEqual(await join(c.channel('rooms:names', { name: 'n'.repeat(257) })), invalid);
  assert.deepEqual(await join(c.channel('rooms:names2', { name: 42 })), invalid);
  assert.deepEqual(await join(c.channel('rooms:names3', { name: { a: 1 } })), invalid);
  const ok = c.channel('rooms:names4', { name: 'n'.repeat(256) });
  const welcome = nextEvent(ok, 'welcome');
  const diff = nextEvent(ok, 'presence_diff');
  assert.deepEqual(sansPosition(await join(ok)), { status: 'ok', response: {} });
  await welcome;
  assert.equal((await diff).joins.namer.metas[0].name, 'n'.repeat(256));
});

e2e('shout without a body replies error {"reason":"invalid"}', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:shoutbad');
  assert.deepEqual(await push(chan, 'shout', { text: 'x' }), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
});

e2e('whisper without "to" replies error {"reason":"invalid"}', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:whisperbad');
  assert.deepEqual(await push(chan, 'whisper', { body: 'x' }), { status: 'error', response: { reason: 'invalid' } });
  assert.deepEqual(await push(chan, 'ping', { after: 1 }), { status: 'ok', response: { after: 1 } });
});

e2e('leave: the server sends phx_close and the channel closes', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:leave');
  const joinRef = chan.joinRef();
  const closed = new Promise((resolve) => chan.onClose(resolve));
  chan.push('leave', {});
  await within(closed, 2000, 'channel.onClose did not fire');
  const close = c.received('rooms:leave', 'phx_close');
  assert.equal(close.length, 1);
  assert.equal(close[0].join_ref, joinRef);
  assert.deepEqual(close[0].payload, {});
  assert.equal(c.received('rooms:leave', 'phx_error').length, 0, 'a leave is not a crash');
  assert.ok(!c.socket.channels.includes(chan), 'the client forgot the channel');
});

e2e('client leave() gets ok and the topic can be joined again', async () => {
  const c = await connect(server.port, 'u1');
  const chan = await c.joined('rooms:clientleave');
  assert.deepEqual(await awaitLeave(chan), { status: 'ok', response: {} });
  const again = await c.joined('rooms:clientleave');
  assert.deepEqual(await push(again, 'ping', { n: 2 }), { status: 'ok', response: { n: 2 } });
});

function awaitLeave(chan) {
  return new Promise((resolve) => {
    chan.leave(2000)
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => resolve({ status: 'error', response }))
      .receive('timeout', () => resolve({ status: 'timeout' }));
  });
}

e2e('crash: phx_error {"reason":"channel_crash"}, other channels go on, the client rejoins', async () => {
  const c = await connect(server.port, 'u1');
  const crashy = await c.joined('rooms:crashy');
  const other = await c.joined('rooms:steady');
  const firstJoinRef = crashy.joinRef();
  const errored = new Promise((resolve) => crashy.onError(resolve));
  crashy.push('crash', {});
  const reason = await within(errored, 2000, 'no phx_error');
  assert.deepEqual(reason, { reason: 'channel_crash' });
  const errs = c.received('rooms:crashy', 'phx_error');
  assert.equal(errs.length, 1);
  assert.equal(errs[0].join_ref, firstJoinRef);
  assert.equal(errs[0].ref, firstJoinRef);
  assert.equal(c.received('rooms:crashy', 'phx_close').length, 0, 'a crash is not a close');

  // Meanwhile (the client waits ~1 s before rejoining) the other channel works.
  assert.deepEqual(await push(other, 'ping', { still: 'here' }, 800), { status: 'ok', response: { still: 'here' } });
  const got = nextEvent(other, 'new_msg');
  other.push('new_msg', { body: 'still here' });
  assert.deepEqual(await got, { body: 'still here', user: 'u1' });
  assert.deepEqual(c.closes, [], 'the connection survived the crash');

  await waitFor(() => crashy.state === 'joined' && crashy.joinRef() !== firstJoinRef, { timeout: 3000, what: 'the automatic rejoin' });
  assert.deepEqual(await push(crashy, 'ping', { back: true }), { status: 'ok', response: { back: true } });
  assertAlive(server);
});

e2e('join of a topic no route matches replies error {"reason":"unmatched topic"}', async () => {
  const c = await connect(server.port, 'u1');
  assert.deepEqual(await join(c.channel('foo:bar')), { status: 'error', response: { reason: 'unmatched topic' } });
});

e2e('a topic that only looks like a room is unmatched ("rooms" without colon)', async () => {
  const c = await connect(server.port, 'u1');
  assert.deepEqual(await join(c.channel('rooms')), { status: 'error', response: { reason: 'unmatched topic' } });
});
