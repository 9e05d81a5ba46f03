// Redis as operators run it (issue 17): cluster mode through a Redis that asks for a user
// and password (an ACL user in the URL), and through a Redis that speaks only TLS
// (`rediss://`, the server's certificate checked against `--redis-ca`). Each is a real
// redis-server started here. A node with a wrong password or an untrusted certificate
// says so once in its log, as an error, serves its own clients locally, and harms no
// other node.
//
// Debian's redis-server is built with TLS, so the TLS test runs (it fails, never skips,
// if redis-server does not accept --tls-port).

import { after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  e2e, startServer, waitFor, freePort, assertAlive, startRedis, runCli,
} from './lib.mjs';
import { API_KEY } from './httplib.mjs';
import {
  CLUSTER_SECRET, testClients, connectT, stopAll, uniqueTopic, joinMembers, assertEachGotExactlyOnce,
  withCluster,
} from './clusterlib.mjs';

const redises = [];
after(async () => {
  for (const r of redises) {
    if (!r.exited) { r.proc.kill('SIGKILL'); await r.exitPromise; }
  }
});
process.on('exit', () => { for (const r of redises) { try { r.proc.kill('SIGKILL'); } catch { /* gone */ } } });

async function redisWith(port, args) {
  const r = await startRedis(port, { args });
  redises.push(r);
  return r;
}

/** A node that does not reach Redis: it logs why, once, and serves its clients locally. */
async function assertLocalOnly(url, extraArgs, why) {
  const node = await startServer({
    args: ['--api-key', API_KEY, '--redis', url, '--cluster-secret', CLUSTER_SECRET, ...extraArgs],
  });
  try {
    await waitFor(() => node.log().includes('cannot reach Redis'), {
      timeout: 5000, what: 'the node to log that it cannot reach Redis',
    });
    const line = node.log().split('\n').find((l) => l.includes('cannot reach Redis'));
    assert.match(line, /ERROR/, 'the first failure is an error in the log');
    assert.match(line, why);
    assert.doesNotMatch(node.log(), /Redis link up/);
    // Retries stay out of the log at the default level.
    await new Promise((r) => setTimeout(r, 800));
    assert.equal(node.log().split('cannot reach Redis').length - 1, 1, 'said once');
    const topic = uniqueTopic('local');
    const [m] = await joinMembers([node], 1, topic, 'local');
    m.chan.push('new_msg', { body: 'still served here' });
    await assertEachGotExactlyOnce([m], [{ body: 'still served here', user: m.user }]);
    assertAlive(node);
    return node.log();
  } finally {
    const clients = testClients.splice(0, testClients.length);
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await stopAll([node]);
  }
}

async function fanoutOn(nodes, prefix) {
  const topic = uniqueTopic(prefix);
  const members = await joinMembers(nodes, 2, topic, prefix);
  const senders = nodes.map((_, n) => members.find((m) => m.node === n));
  for (const s of senders) s.chan.push('new_msg', { body: `from node ${s.node}` });
  await assertEachGotExactlyOnce(members, senders.map((s) => ({ body: `from node ${s.node}`, user: s.user })));
  for (const n of nodes) assertAlive(n);
}

e2e('AUTH: nodes reach a Redis that wants a user and password through redis://user:password@host; a wrong password is an error in the log, never the password', async () => {
  const port = await freePort();
  await redisWith(port, ['--user', 'default', 'off', '--user', 'ringcast', 'on', '>e2e-redis-pass', '~*', '&*', '+@all']);
  const url = `redis://ringcast:e2e-redis-pass@127.0.0.1:${port}`;
  await withCluster([1, 2], (nodes) => fanoutOn(nodes, 'auth'), { url });
  const log = await assertLocalOnly(`redis://ringcast:not-the-pass@127.0.0.1:${port}`, [], /authentication failed|WRONGPASS|invalid username-password/i);
  assert.doesNotMatch(log, /not-the-pass/, 'the password is not logged');
  await assertLocalOnly(`redis://127.0.0.1:${port}`, [], /NOAUTH|NOPERM|auth/i);
}, { timeout: 30000 });

// ---------------------------------------------------------------------------
// TLS: a test CA made by openssl, a server certificate for 127.0.0.1 it signed.
// ---------------------------------------------------------------------------

function testPki() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ringcast-redis-tls-'));
  const file = (name) => path.join(dir, name);
  const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', file('ca.key'), '-out', file('ca.pem'), '-days', '2', '-subj', '/CN=ringcast redis test CA');
  fs.writeFileSync(file('srv.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', file('srv.key'), '-out', file('srv.csr'), '-subj', '/CN=redis');
  openssl('x509', '-req', '-in', file('srv.csr'), '-CA', file('ca.pem'), '-CAkey', file('ca.key'),
    '-CAcreateserial', '-out', file('srv.pem'), '-days', '2', '-extfile', file('srv.ext'));
  return { ca: file('ca.pem'), cert: file('srv.pem'), key: file('srv.key') };
}

e2e('TLS: nodes reach a TLS-only Redis through rediss:// with --redis-ca; without the CA, or in plain text, the node says why and serves locally', async () => {
  const pki = testPki();
  const port = await freePort();
  await redisWith(0, ['--tls-port', String(port), '--tls-cert-file', pki.cert, '--tls-key-file', pki.key,
    '--tls-ca-cert-file', pki.ca, '--tls-auth-clients', 'no']);
  const url = `rediss://127.0.0.1:${port}`;
  await withCluster([1, 1], (nodes) => fanoutOn(nodes, 'tls'), { url, args: ['--redis-ca', pki.ca] });
  // The system's roots do not know the test CA.
  await assertLocalOnly(url, [], /certificate|UnknownIssuer|invalid peer/i);
  // Plain text to a TLS port: Redis drops the connection.
  await assertLocalOnly(`redis://127.0.0.1:${port}`, [], /reset|closed|broken pipe|end of file/i);
}, { timeout: 30000 });

e2e('--redis-ca that cannot be read: serve refuses to start and names the file', async () => {
  const r = await runCli(['serve', '--dev', '--listen', '127.0.0.1:0', '--redis', 'rediss://127.0.0.1:1',
    '--cluster-secret', CLUSTER_SECRET, '--redis-ca', '/nonexistent/ca.pem']);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /cannot read --redis-ca \/nonexistent\/ca\.pem: No such file/);
});
