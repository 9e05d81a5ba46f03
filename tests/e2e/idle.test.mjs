// `--idle-timeout`: a connection that sends nothing for that long is closed; heartbeats
// keep a connection alive (seed-app.md "Socket", PROTOCOL.md section 9).

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { e2e, startServer, rawConnect, connect, push, sleep } from './lib.mjs';

let server;
before(async () => { server = await startServer({ args: ['--idle-timeout', '1s'] }); });
after(async () => { await server.stop(); });

e2e('a connection that sends nothing is closed by the server after --idle-timeout 1s', async () => {
  const ws = await rawConnect(server.port, { userId: 'idle' });
  const opened = Date.now();
  const { at, code, reason } = await ws.waitClosed(4000);
  assert.deepEqual({ code, reason }, { code: 1001, reason: 'going away' }, 'an idle close is a going-away close, so that clients reconnect');
  // A lower bound only: a loaded machine makes the close later, never earlier.
  const after = at - opened;
  assert.ok(after >= 900, `closed after ${after} ms, before the idle timeout of 1 s`);
});

e2e('a connection that sends heartbeats stays open past the idle timeout', async () => {
  const ws = await rawConnect(server.port, { userId: 'busy' });
  for (let i = 0; i < 12; i++) {
    ws.send([null, `hb${i}`, 'phoenix', 'heartbeat', {}]);
    assert.deepEqual((await ws.reply(`hb${i}`)).payload, { status: 'ok', response: {} });
    await sleep(250);
  }
  assert.equal(ws.closeInfo, null, `closed although it sent heartbeats: ${JSON.stringify(ws.closeInfo)}`);
});

e2e('channel traffic also counts as activity', async () => {
  const c = await connect(server.port, 'chatty');
  const chan = await c.joined('rooms:idle');
  for (let i = 0; i < 10; i++) {
    assert.deepEqual(await push(chan, 'ping', { i }), { status: 'ok', response: { i } });
    await sleep(300);
  }
  assert.deepEqual(c.closes, [], 'the connection was never closed');
});
