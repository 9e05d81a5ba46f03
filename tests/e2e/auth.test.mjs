// Connecting: tokens, `ringcast token`, `vsn`, and `--allowed-origin` (seed-app.md
// "Tokens" and "Socket"; PROTOCOL.md section 2).

import { before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  e2e, startServer, connect, join, push, runCli, mintToken, upgradeStatus, rawConnect, nowSecs, SECRET, sansPosition,
} from './lib.mjs';
import { request } from './httplib.mjs';

describe('tokens and versions', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server.stop(); });

  e2e('a token minted as seed-app.md says is accepted (101) and names the user', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('31') }), 101);
    const c = await connect(server.port, '31');
    assert.deepEqual(await join(c.channel('notifications:31')), { status: 'ok', response: {} });
  });

  e2e('`ringcast token --user 42 --secret test-secret` prints a token the server accepts', async () => {
    const out = await runCli(['token', '--user', '42', '--secret', SECRET]);
    assert.equal(out.code, 0, `ringcast token failed: ${out.stderr}`);
    const token = out.stdout.trim();
    assert.match(token, /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/, 'two base64url parts without padding');
    const [claimsB64, sig] = token.split('.');
    const claims = JSON.parse(Buffer.from(claimsB64, 'base64url').toString('utf8'));
    assert.equal(claims.user_id, '42');
    assert.ok(Number.isInteger(claims.iat) && Math.abs(claims.iat - nowSecs()) < 60, `iat ${claims.iat} is now`);
    assert.equal(sig, crypto.createHmac('sha256', SECRET).update(claimsB64).digest('base64url'), 'HMAC-SHA256 over B64(claims)');
    const c = await connect(server.port, '42', { token });
    assert.deepEqual(await join(c.channel('notifications:42')), { status: 'ok', response: {} });
    assert.deepEqual(await join(c.channel('notifications:43')), { status: 'error', response: { reason: 'unauthorized' } });
  });

  e2e('missing token: upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: null }), 403);
  });

  e2e('empty token: upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: '' }), 403);
  });

  e2e('forged token (signed with another secret): upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('1', { secret: 'not-the-secret' }) }), 403);
  });

  e2e('tampered claims with the original signature: upgrade refused with 403', async () => {
    const sig = mintToken('1').split('.')[1];
    const claims = Buffer.from(JSON.stringify({ user_id: '2', iat: nowSecs() })).toString('base64url');
    assert.equal(await upgradeStatus(server.port, { token: `${claims}.${sig}` }), 403);
  });

  e2e('garbage token: upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: 'not-a-token' }), 403);
  });

  e2e('expired token (older than 86,400 s): upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('1', { iat: nowSecs() - 86400 - 120 }) }), 403);
  });

  e2e('a token almost a day old is still accepted', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('1', { iat: nowSecs() - 86400 + 120 }) }), 101);
  });

  e2e('the phoenix client with a forged token does not open', async () => {
    await assert.rejects(connect(server.port, '1', { token: mintToken('1', { secret: 'nope' }), timeout: 2000 }));
  });

  e2e('vsn=3.0.0: upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1', vsn: '3.0.0' }), 403);
  });

  e2e('vsn=2.1.0: upgrade refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1', vsn: '2.1.0' }), 403);
  });

  e2e('vsn=2.0.7 is V2', async () => {
    const ws = await rawConnect(server.port, { userId: '1', vsn: '2.0.7' });
    const reply = await ws.join('rooms:v207');
    assert.deepEqual(sansPosition(reply.frame), ['1', '1', 'rooms:v207', 'phx_reply', { status: 'ok', response: {} }]);
  });

  e2e('the 101 answer names the core in x-ringcast-core', async () => {
    const c = await connect(server.port, '1');
    assert.equal(c.core, '0', 'with --cores 1 every connection is on core 0');
    const chan = await c.joined('rooms:core');
    assert.deepEqual(await push(chan, 'ping', {}), { status: 'ok', response: {} });
  });
});

describe('--allowed-origin', () => {
  let server;
  before(async () => { server = await startServer({ args: ['--allowed-origin', 'http://good.example'] }); });
  after(async () => { await server.stop(); });

  e2e('an upgrade from a foreign Origin is refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1', origin: 'http://evil.example' }), 403);
  });

  e2e('an upgrade from the allowed Origin is accepted', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1', origin: 'http://good.example' }), 101);
  });

  e2e('an upgrade without an Origin header is accepted', async () => {
    assert.equal(await upgradeStatus(server.port, { userId: '1' }), 101);
    const c = await connect(server.port, '1');
    assert.deepEqual(sansPosition(await join(c.channel('rooms:origin'))), { status: 'ok', response: {} });
  });

  e2e('a good Origin does not excuse a bad token', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('1', { secret: 'x' }), origin: 'http://good.example' }), 403);
  });
});

describe('secret from RINGCAST_SECRET', () => {
  let server;
  before(async () => { server = await startServer({ secret: null, env: { RINGCAST_SECRET: 'env-secret' } }); });
  after(async () => { await server.stop(); });

  e2e('a token signed with RINGCAST_SECRET is accepted', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('5', { secret: 'env-secret' }) }), 101);
  });

  e2e('a token signed with another secret is refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('5', { secret: SECRET }) }), 403);
  });

  e2e('`ringcast token` reads RINGCAST_SECRET too', async () => {
    const out = await runCli(['token', '--user', '5'], { env: { RINGCAST_SECRET: 'env-secret' } });
    assert.equal(out.code, 0, out.stderr);
    assert.equal(await upgradeStatus(server.port, { token: out.stdout.trim() }), 101);
  });
});

describe('no secret and no --dev', () => {
  e2e('serve refuses to start, naming --secret and --dev', async () => {
    const out = await runCli(['serve', '--listen', '127.0.0.1:0', '--cores', '1']);
    assert.notEqual(out.code, 0, `serve started without a secret: ${out.stderr}`);
    assert.match(out.stderr, /--secret/);
    assert.match(out.stderr, /--dev/);
  });

  e2e('with a secret but without --dev, GET /demo/token is 404', async () => {
    const server = await startServer();
    try {
      const res = await request(server.port, { path: '/demo/token?user=7' });
      assert.equal(res.status, 404);
      assert.equal(await upgradeStatus(server.port, { token: mintToken('7') }), 101, 'the server itself works');
    } finally {
      await server.stop();
    }
  });
});

describe('--dev without a secret', () => {
  let server;
  before(async () => { server = await startServer({ secret: null, args: ['--dev'] }); });
  after(async () => { await server.stop(); });

  e2e('GET /demo/token mints a token the server accepts', async () => {
    const res = await request(server.port, { path: '/demo/token?user=8' });
    assert.equal(res.status, 200);
    assert.equal(await upgradeStatus(server.port, { token: res.text.trim() }), 101);
  });

  e2e('server and `ringcast token` share the development secret', async () => {
    const out = await runCli(['token', '--user', '6']);
    assert.equal(out.code, 0, out.stderr);
    const c = await connect(server.port, '6', { token: out.stdout.trim() });
    assert.deepEqual(await join(c.channel('notifications:6')), { status: 'ok', response: {} });
  });

  e2e('a token signed with test-secret is refused with 403', async () => {
    assert.equal(await upgradeStatus(server.port, { token: mintToken('6') }), 403);
  });
});
