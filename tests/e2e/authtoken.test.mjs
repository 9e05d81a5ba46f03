// Phoenix 1.8 `authToken` on both transports, and origin patterns (seed-app.md "TLS,
// auth tokens, drain, connect info"; issue 13 items 2 and 5).

import { before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import {
  e2e, startServer, connect, join, mintToken, upgradeStatus, WebSocket, SECRET,
} from './lib.mjs';
import { request, lpConnect, closeLpClients } from './httplib.mjs';

const PREFIX = 'base64url.bearer.phx.';

/** A raw upgrade offering `protocols`; resolves {status, protocol}. */
function offer(port, protocols, query = 'vsn=2.0.0') {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/socket/websocket?${query}`, protocols);
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('no answer within 3 s')); }, 3000);
    ws.on('error', () => {});
    ws.on('unexpected-response', (req, res) => {
      clearTimeout(timer);
      res.resume();
      req.destroy();
      resolve({ status: res.statusCode });
    });
    ws.on('open', () => {
      clearTimeout(timer);
      const { protocol } = ws;
      ws.terminate();
      resolve({ status: 101, protocol });
    });
  });
}

describe('Phoenix 1.8 authToken', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await closeLpClients(); await server.stop(); });

  e2e('WebSocket: the phoenix client with authToken and no query token connects as that user', async () => {
    const c = await connect(server.port, '71', { params: {}, socketOpts: { authToken: mintToken('71') } });
    assert.deepEqual(await join(c.channel('notifications:71')), { status: 'ok', response: {} });
    assert.deepEqual(await join(c.channel('notifications:72')), { status: 'error', response: { reason: 'unauthorized' } });
    assert.equal(c.socket.conn.protocol, 'phoenix', 'the server picked the phoenix subprotocol');
  });

  e2e('WebSocket: a header token wins over the token query param', async () => {
    const c = await connect(server.port, '73', {
      params: { token: mintToken('99') },
      socketOpts: { authToken: mintToken('73') },
    });
    assert.deepEqual(await join(c.channel('notifications:73')), { status: 'ok', response: {} });
    assert.deepEqual(await join(c.channel('notifications:99')), { status: 'error', response: { reason: 'unauthorized' } });
  });

  e2e('WebSocket: the upgrade that phoenix.js makes (btoa, padding stripped) is read and answered with phoenix', async () => {
    // A token is ASCII without '>', '?' or '~', so its base64 is the same in both
    // alphabets, and '=' may not appear in a subprotocol: the unit tests cover '+', '/',
    // '-', '_' and padding.
    const token = mintToken('76');
    const b64 = Buffer.from(token).toString('base64').replace(/=+$/, '');
    assert.deepEqual(await offer(server.port, ['phoenix', `${PREFIX}${b64}`]), { status: 101, protocol: 'phoenix' });
  });

  e2e('WebSocket: a forged or unreadable header token gets 403, and the query token does not rescue it', async () => {
    const forged = Buffer.from(mintToken('5', { secret: 'not-the-secret' })).toString('base64url');
    assert.deepEqual(await offer(server.port, ['phoenix', `${PREFIX}${forged}`], `vsn=2.0.0&token=${mintToken('5')}`), { status: 403 });
    assert.deepEqual(await offer(server.port, ['phoenix', `${PREFIX}*not*base64*`]), { status: 403 });
    assert.equal(await upgradeStatus(server.port, { userId: '5' }), 101, 'the same user with a good query token still connects');
  });

  e2e('long-poll: the phoenix client with authToken connects as that user', async () => {
    const lp = await lpConnect(`http://127.0.0.1:${server.port}`, '74', {
      socketOpts: { params: {}, authToken: mintToken('74') },
    });
    const ok = lp.socket.channel('notifications:74');
    assert.deepEqual(await join(ok), { status: 'ok', response: {} });
    const other = lp.socket.channel('notifications:75');
    assert.deepEqual(await join(other), { status: 'error', response: { reason: 'unauthorized' } });
  });

  e2e('long-poll: a forged X-Phoenix-AuthToken gets {"status":403}, even beside a good query token', async () => {
    const forged = mintToken('6', { secret: 'not-the-secret' });
    const res = await request(server.port, {
      path: `/socket/longpoll?vsn=2.0.0&token=${mintToken('6')}`,
      headers: { 'x-phoenix-authtoken': forged },
    });
    assert.equal(res.status, 200);
    assert.deepEqual(res.json, { status: 403 });
    const good = await request(server.port, {
      path: '/socket/longpoll?vsn=2.0.0',
      headers: { 'x-phoenix-authtoken': mintToken('6') },
    });
    assert.equal(good.json.status, 410, 'a good header token opens a session (410 with its token)');
    assert.match(good.json.token, /^\d+\./);
  });
});

describe('--allowed-origin patterns', () => {
  let server;
  before(async () => {
    server = await startServer({
      args: ['--allowed-origin', '//*.example.com', '--allowed-origin', 'http://localhost:4000', '--allowed-origin', 'https://exact.test'],
    });
  });
  after(async () => { await server.stop(); });

  const status = (origin) => upgradeStatus(server.port, { userId: '1', origin });

  e2e('a wildcard subdomain pattern allows the domain and its subdomains, any scheme, and nothing else', async () => {
    assert.equal(await status('https://app.example.com'), 101);
    assert.equal(await status('http://a.b.example.com:8080'), 101);
    assert.equal(await status('https://example.com'), 101);
    assert.equal(await status('https://badexample.com'), 403);
    assert.equal(await status('https://example.com.evil.net'), 403);
  });

  e2e('an explicit port allows that port only', async () => {
    assert.equal(await status('http://localhost:4000'), 101);
    assert.equal(await status('http://localhost:4001'), 403);
    assert.equal(await status('https://localhost:4000'), 403, 'and that scheme');
  });

  e2e('a full URL allows its scheme and default port only', async () => {
    assert.equal(await status('https://exact.test'), 101);
    assert.equal(await status('https://exact.test:443'), 101);
    assert.equal(await status('http://exact.test'), 403);
    assert.equal(await status('https://exact.test:8443'), 403);
  });

  e2e('no Origin header (not a browser) is still allowed', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1' }), 101);
  });
});

void SECRET;
