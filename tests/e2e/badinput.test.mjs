// Bad input (seed-app.md "Bad input", PROTOCOL.md sections 4, 5, 15): a malformed frame
// closes only that connection with 1007, an oversized one with 1009, garbage instead of
// HTTP closes only that socket; everybody else carries on.

import { before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, rawConnect, rawTcp, connect, push, nextEvent, assertAlive, encodeBinaryPush, within, sleep,
  bystanders, assertUnharmed,
} from './lib.mjs';

/** Sends `bad` on a fresh connection (after joining `topic`) and expects close code `code`. */
async function expectClose(server, bad, code, { vsn, topic = 'rooms:victim' } = {}) {
  const ws = await rawConnect(server.port, { userId: 'bad', vsn });
  if (vsn && vsn.startsWith('1.')) {
    ws.send({ topic, event: 'phx_join', payload: {}, ref: '1' });
    await ws.next((m) => m.ref === '1');
  } else {
    await ws.join(topic);
  }
  ws.send(bad);
  const { code: got } = await ws.waitClosed(3000);
  assert.equal(got, code, `expected close ${code}, got ${got}`);
}

describe('malformed frames (default limits)', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server.stop(); });

  e2e('a non-JSON text frame closes that connection with 1007; others carry on', async () => {
    const by = await bystanders(server, 'rooms:bad1');
    await expectClose(server, 'this is not json', 1007);
    await assertUnharmed(server, by, 'rooms:bad1');
  });

  e2e('a V2 array with 3 elements closes with 1007', async () => {
    const by = await bystanders(server, 'rooms:bad2');
    await expectClose(server, ['1', '2', 'rooms:victim'], 1007);
    await assertUnharmed(server, by, 'rooms:bad2');
  });

  e2e('a V2 frame that is a JSON object, not an array, closes with 1007', async () => {
    await expectClose(server, { topic: 'rooms:victim', event: 'ping', payload: {}, ref: '2' }, 1007);
    assertAlive(server);
  });

  e2e('a V2 frame with a non-string topic closes with 1007', async () => {
    await expectClose(server, ['1', '2', 42, 'ping', {}], 1007);
    assertAlive(server);
  });

  e2e('a V2 frame with a non-string event closes with 1007', async () => {
    await expectClose(server, ['1', '2', 'rooms:victim', null, {}], 1007);
    assertAlive(server);
  });

  e2e('a text frame that is not valid UTF-8 closes with 1007', async () => {
    const ws = await rawConnect(server.port, { userId: 'bad' });
    ws.ws.send(Buffer.from([0x5b, 0x22, 0xff, 0xfe, 0x22, 0x5d]), { binary: false });
    assert.equal((await ws.waitClosed(3000)).code, 1007);
    assertAlive(server);
  });

  e2e('a binary frame whose header announces more bytes than present closes with 1007', async () => {
    const by = await bystanders(server, 'rooms:bad3');
    // kind 0, join_ref 1, ref 1, topic 50 (only 12 present), event 4 bytes
    await expectClose(server, Buffer.from([0x00, 0x01, 0x01, 50, 0x04, 0x31, 0x32, ...Buffer.from('rooms:victim')]), 1007);
    await assertUnharmed(server, by, 'rooms:bad3');
  });

  e2e('a binary frame shorter than its fixed header closes with 1007', async () => {
    await expectClose(server, Buffer.from([0x00, 0x01]), 1007);
    assertAlive(server);
  });

  e2e('a binary frame of an unknown kind closes with 1007', async () => {
    const frame = encodeBinaryPush('1', '2', 'rooms:victim', 'ping', [1, 2, 3]);
    frame[0] = 0x07;
    await expectClose(server, frame, 1007);
    assertAlive(server);
  });

  e2e('a binary frame on a V1 connection closes with 1007', async () => {
    await expectClose(server, encodeBinaryPush('1', '2', 'rooms:victim', 'ping', [1, 2, 3]), 1007, { vsn: '1.0.0' });
    assertAlive(server);
  });

  e2e('a V1 object missing "ref" closes with 1007', async () => {
    await expectClose(server, { topic: 'rooms:victim', event: 'ping', payload: {} }, 1007, { vsn: '1.0.0' });
    assertAlive(server);
  });

  e2e('a topic over 255 bytes, or an event, ref or join_ref over 64, closes with 1007; at the limits all works', async () => {
    const by = await bystanders(server, 'rooms:lengths');
    const long = (n) => 'x'.repeat(n);
    await expectClose(server, ['1', '2', `rooms:${long(250)}`, 'phx_join', {}], 1007);
    await expectClose(server, ['1', '2', 'rooms:victim', long(65), {}], 1007);
    await expectClose(server, ['1', long(65), 'rooms:victim', 'ping', {}], 1007);
    await expectClose(server, [long(65), '2', 'rooms:victim', 'ping', {}], 1007);
    await expectClose(server, { topic: `rooms:${long(250)}`, event: 'phx_join', payload: {}, ref: '3' }, 1007, { vsn: '1.0.0' });
    await expectClose(server, encodeBinaryPush('1', '2', 'rooms:victim', long(65), [1]), 1007);
    // A message at every limit at once is served: a 255-byte topic, 64-byte event and refs.
    const ws = await rawConnect(server.port, { userId: 'edge' });
    const topic = `rooms:${long(249)}`;
    const ref = long(64);
    ws.send([ref, ref, topic, 'phx_join', {}]);
    assert.equal((await ws.reply(ref)).payload.status, 'ok');
    ws.send([ref, 'p', topic, 'ping', { at: 'the limits' }]);
    assert.deepEqual((await ws.reply('p')).payload, { status: 'ok', response: { at: 'the limits' } });
    ws.send([ref, 'e', topic, long(64), {}]);
    assert.deepEqual((await ws.reply('e')).payload, { status: 'error', response: { reason: 'unknown event' } });
    await ws.close();
    await assertUnharmed(server, by, 'rooms:lengths');
  });

  e2e('garbage bytes instead of an HTTP request: that socket is closed, others unaffected', async () => {
    const by = await bystanders(server, 'rooms:bad4');
    const tcp = await rawTcp(server.port);
    // the start of a TLS ClientHello, then an end of headers
    tcp.sock.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x00, 0xff, 0x0d, 0x0a, 0x0d, 0x0a]));
    await within(tcp.closed, 3000, 'the server did not close the garbage connection');
    const answer = tcp.data().toString('latin1');
    assert.ok(answer === '' || /^HTTP\/1\.[01] 4\d\d/.test(answer), `garbage may get a 4xx or nothing, got ${JSON.stringify(answer.slice(0, 80))}`);
    await assertUnharmed(server, by, 'rooms:bad4');
  });

  e2e('an HTTP request that ends half-way and the client goes away harms no one', async () => {
    const by = await bystanders(server, 'rooms:bad5');
    const tcp = await rawTcp(server.port);
    tcp.sock.write('GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr');
    await sleep(100);
    tcp.sock.destroy();
    await assertUnharmed(server, by, 'rooms:bad5');
  });
});

describe('--max-frame 1KiB', () => {
  let server;
  before(async () => { server = await startServer({ args: ['--max-frame', '1KiB'] }); });
  after(async () => { await server.stop(); });

  e2e('a frame under the limit is fine', async () => {
    const ws = await rawConnect(server.port, { userId: 'mf' });
    await ws.join('rooms:mf');
    const pad = 'x'.repeat(700);
    ws.send(['1', '2', 'rooms:mf', 'ping', { pad }]);
    assert.deepEqual((await ws.reply('2')).payload, { status: 'ok', response: { pad } });
  });

  e2e('a 2 KiB frame closes that connection with 1009; others carry on', async () => {
    const by = await bystanders(server, 'rooms:mf2');
    await expectClose(server, ['1', '2', 'rooms:victim', 'ping', { pad: 'x'.repeat(2048) }], 1009);
    await assertUnharmed(server, by, 'rooms:mf2');
  });

  e2e('a 2 KiB binary frame closes with 1009', async () => {
    await expectClose(server, encodeBinaryPush('1', '2', 'rooms:victim', 'ping', Buffer.alloc(2048, 7)), 1009);
    assertAlive(server);
  });
});
