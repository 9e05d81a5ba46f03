// TLS (seed-app.md "TLS, auth tokens, drain, connect info"; issue 13 item 1): the real
// phoenix client over wss:// and https:// long-poll with a test CA made by openssl, the
// API and metrics over https, SIGHUP reloading the certificate while connections stay,
// and bad TLS input closing only its own connection.

import { before, after, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { chromium } from 'playwright-core';
import {
  e2e, startServer, join, push, nextEvent, mintToken, within, sleep, WebSocket, Socket, REPO_ROOT, BIN, SECRET, freePort,
} from './lib.mjs';

// ---------------------------------------------------------------------------
// A test CA and two server certificates it signed, for localhost and 127.0.0.1.
// ---------------------------------------------------------------------------

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ringcast-tls-'));
const file = (name) => path.join(dir, name);
const openssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });

function makeCa() {
  openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', file('ca.key'), '-out', file('ca.pem'), '-days', '2', '-subj', '/CN=ringcast test CA');
}

/** A certificate for localhost/127.0.0.1 signed by the test CA; returns its paths. */
function makeCert(name) {
  fs.writeFileSync(file(`${name}.ext`), 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', file(`${name}.key`), '-out', file(`${name}.csr`), '-subj', `/CN=${name}`);
  openssl('x509', '-req', '-in', file(`${name}.csr`), '-CA', file('ca.pem'), '-CAkey', file('ca.key'),
    '-CAcreateserial', '-out', file(`${name}.pem`), '-days', '2', '-extfile', file(`${name}.ext`));
  return { cert: file(`${name}.pem`), key: file(`${name}.key`) };
}

makeCa();
const certA = makeCert('first');
const certB = makeCert('second');
const ca = fs.readFileSync(file('ca.pem'));
// The server reads these two paths; the reload test swaps what is in them.
const live = { cert: file('live.pem'), key: file('live.key') };
fs.copyFileSync(certA.cert, live.cert);
fs.copyFileSync(certA.key, live.key);

/** base64 SHA-256 of a certificate's public key, as Chromium's SPKI list takes it. */
function spki(certPath) {
  const pub = execFileSync('openssl', ['x509', '-in', certPath, '-pubkey', '-noout']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  return execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
}

/** The phoenix client's WebSocket transport, trusting the test CA. */
class CaWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols, { ca });
  }
}

async function wssConnect(port, userId) {
  const socket = new Socket(`wss://127.0.0.1:${port}/socket`, {
    transport: CaWebSocket,
    params: { token: mintToken(userId) },
    reconnectAfterMs: () => 60_000,
  });
  const opened = new Promise((resolve, reject) => {
    socket.onOpen(resolve);
    socket.onError((e) => reject(new Error(`wss did not open: ${e && (e.message || e.type)}`)));
  });
  socket.connect();
  await within(opened, 5000, 'the wss socket did not open');
  return socket;
}

/** An https request trusting the test CA: {status, text, cn} (cn: the server certificate's CN). */
function httpsGet(port, pathname, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = https.get({ host: '127.0.0.1', port, path: pathname, ca, servername: 'localhost', agent: false, headers }, (res) => {
      const cn = res.socket.getPeerCertificate().subject?.CN;
      let text = '';
      res.on('data', (d) => { text += d; });
      res.on('end', () => resolve({ status: res.statusCode, text, cn, alpn: res.socket.alpnProtocol }));
    });
    req.on('error', reject);
    req.setTimeout(5000, () => req.destroy(new Error(`no answer to ${pathname}`)));
  });
}

/** An https POST with the API key trusting the test CA; resolves the status. */
function httpsPost(port, pathname, body) {
  const data = Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1', port, path: pathname, method: 'POST', ca, servername: 'localhost', agent: false,
      headers: { authorization: 'Bearer k', 'content-type': 'application/json', 'content-length': data.length },
    }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode)); });
    req.on('error', reject);
    req.end(data);
  });
}

/** The CN of the certificate a fresh TLS handshake is shown. */
function handshakeCn(port) {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, ca, servername: 'localhost', ALPNProtocols: ['http/1.1'] }, () => {
      const cn = s.getPeerCertificate().subject?.CN;
      const version = s.getProtocol();
      const alpn = s.alpnProtocol;
      s.end();
      resolve({ cn, version, alpn });
    });
    s.on('error', reject);
  });
}

function metricSum(text, name) {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^(\S+?)(\{[^}]*\})? (\S+)$/.exec(line);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

describe('TLS', () => {
  let server;
  before(async () => {
    server = await startServer({
      cores: 2,
      args: ['--tls-cert', live.cert, '--tls-key', live.key, '--request-timeout', '1s', '--api-key', 'k'],
    });
  });
  after(async () => {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  e2e('the phoenix client over wss:// joins, pushes and receives a broadcast', async () => {
    const a = await wssConnect(server.port, '1');
    const b = await wssConnect(server.port, '2');
    const ca1 = a.channel('rooms:tls', { name: 'ann' });
    const cb = b.channel('rooms:tls', { name: 'bob' });
    assert.equal((await join(ca1)).status, 'ok');
    assert.equal((await join(cb)).status, 'ok');
    const got = nextEvent(cb, 'new_msg', 3000);
    ca1.push('new_msg', { body: 'over tls' }); // new_msg has no reply, only the broadcast
    assert.deepEqual(await push(ca1, 'ping', { n: 1 }), { status: 'ok', response: { n: 1 } });
    const msg = await got;
    assert.equal(msg.body, 'over tls');
    a.disconnect();
    b.disconnect();
  });

  e2e('a 200 KB broadcast reaches 100 wss subscribers whole and in order with the small ones around it', async () => {
    const subs = [];
    for (let i = 0; i < 100; i++) {
      const ws = new WebSocket(`wss://127.0.0.1:${server.port}/socket/websocket?vsn=2.0.0&token=${mintToken(`f${i}`)}`, { ca, perMessageDeflate: false });
      const got = [];
      ws.on('message', (d) => {
        const [, , , event, payload] = JSON.parse(d.toString());
        if (event === 'big' || event === 'small') got.push(payload.seq === undefined ? payload : payload.seq);
      });
      await within(new Promise((resolve, reject) => {
        ws.on('open', () => ws.send(JSON.stringify(['1', '1', 'bench:tlsfan', 'phx_join', {}])));
        ws.on('message', (d) => { if (d.toString().includes('phx_reply')) resolve(); });
        ws.on('error', reject);
      }), 5000, `subscriber ${i} did not join`);
      subs.push({ ws, got });
    }
    const big = 'x'.repeat(200_000);
    const send = (event, payload) => httpsPost(server.port, '/api/broadcast', { topic: 'bench:tlsfan', event, payload });
    assert.equal(await send('small', { seq: 0 }), 202);
    assert.equal(await send('big', { seq: 1, big }), 202);
    assert.equal(await send('small', { seq: 2 }), 202);
    for (const [i, s] of subs.entries()) {
      await within((async () => { while (s.got.length < 3) await sleep(20); })(), 10000, `subscriber ${i} got ${s.got.length} of 3`);
      assert.deepEqual(s.got, [0, 1, 2], `subscriber ${i}`);
      s.ws.close();
    }
  }, { timeout: 30000 });

  e2e('idle wss connections park; parked, they get broadcasts sealed by the flusher (big ones, to a paused reader too) and answer at once', async () => {
    const stats = async () => JSON.parse((await httpsGet(server.port, '/api/stats', { authorization: 'Bearer k' })).text);
    const topic = 'bench:tlspark';
    const before = (await stats()).parked;
    const subs = [];
    for (let i = 0; i < 8; i++) {
      const ws = new WebSocket(`wss://127.0.0.1:${server.port}/socket/websocket?vsn=2.0.0&token=${mintToken(`pk${i}`)}`, { ca, perMessageDeflate: false });
      const got = [];
      const replies = new Map();
      ws.on('message', (d) => {
        const [, ref, , event, payload] = JSON.parse(d.toString());
        if (event === 'phx_reply') replies.set(ref, payload);
        if (event === 'm') got.push(payload.big === undefined ? payload.seq : `${payload.seq}:${payload.big.length}:${payload.big === 'z'.repeat(200_000)}`);
      });
      await within(new Promise((resolve, reject) => {
        ws.on('open', () => ws.send(JSON.stringify(['1', '1', topic, 'phx_join', {}])));
        ws.on('message', () => { if (replies.has('1')) resolve(); });
        ws.on('error', reject);
      }), 5000, `subscriber ${i} did not join`);
      subs.push({ ws, got, replies });
    }
    const parkedNow = async () => (await stats()).parked - before;
    await within((async () => { while (await parkedNow() < subs.length) await sleep(100); })(), 5000,
      'the idle wss connections did not park');

    // One reader stops reading: what its socket cannot take waits, and it wakes up.
    const paused = subs[0];
    paused.ws._socket.pause();
    const send = (payload) => httpsPost(server.port, '/api/broadcast', { topic, event: 'm', payload });
    const big = 'z'.repeat(200_000);
    const expected = [];
    for (let seq = 0; seq < 30; seq++) {
      const isBig = seq % 5 === 4;
      assert.equal(await send(isBig ? { seq, big } : { seq }), 202);
      expected.push(isBig ? `${seq}:200000:true` : seq);
    }
    for (const [i, s] of subs.entries()) {
      if (s === paused) continue;
      await within((async () => { while (s.got.length < expected.length) await sleep(20); })(), 10000,
        `subscriber ${i} got ${s.got.length} of ${expected.length}`);
      assert.deepEqual(s.got, expected, `subscriber ${i}: every broadcast once, in order, whole`);
    }
    assert.ok(await parkedNow() >= subs.length - 1, 'delivery to parked wss connections did not wake them');
    await sleep(300);
    paused.ws._socket.resume();
    await within((async () => { while (paused.got.length < expected.length) await sleep(20); })(), 10000,
      `the paused reader got ${paused.got.length} of ${expected.length}`);
    assert.deepEqual(paused.got, expected, 'the paused reader: every broadcast once, in order, whole');

    // A parked connection answers a push at once and parks again.
    const [, asker] = subs;
    asker.ws.send(JSON.stringify([null, 'hb1', 'phoenix', 'heartbeat', {}]));
    await within((async () => { while (!asker.replies.has('hb1')) await sleep(10); })(), 1000, 'no reply from a parked wss connection');
    assert.deepEqual(asker.replies.get('hb1'), { status: 'ok', response: {} });
    await within((async () => { while (await parkedNow() < subs.length) await sleep(100); })(), 5000,
      'the wss connections did not park again');
    for (const s of subs) s.ws.close();
  }, { timeout: 30000 });

  e2e('a 200 KB message from a wss client (many records, read in parts) is broadcast back whole', async () => {
    const open = (user) => new Promise((resolve, reject) => {
      const ws = new WebSocket(`wss://127.0.0.1:${server.port}/socket/websocket?vsn=2.0.0&token=${mintToken(user)}`, { ca, perMessageDeflate: false });
      ws.on('open', () => ws.send(JSON.stringify(['1', '1', 'bench:tlsbig', 'phx_join', {}])));
      ws.once('message', () => resolve(ws));
      ws.on('error', reject);
    });
    const [sender, watcher] = [await open('big1'), await open('big2')];
    const body = 'y'.repeat(200_000);
    const got = new Promise((resolve) => watcher.on('message', (d) => {
      const [, , , event, payload] = JSON.parse(d.toString());
      if (event === 'new_msg') resolve(payload.body);
    }));
    sender.send(JSON.stringify(['1', '2', 'bench:tlsbig', 'new_msg', { body }]));
    assert.equal(await within(got, 5000, 'the 200 KB broadcast did not arrive'), body);
    sender.close();
    watcher.close();
  });

  e2e('Chromium loads the demo page over https and chats over wss://', async () => {
    const CHROMIUM = process.env.RINGCAST_CHROMIUM || '/usr/bin/chromium';
    assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing (scripts/test.sh installs chromium)`);
    // Chromium trusts exactly the test certificates' keys (not every certificate).
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
        `--ignore-certificate-errors-spki-list=${spki(certA.cert)},${spki(certB.cert)}`],
      timeout: 20000,
    });
    try {
      const page = await (await browser.newContext()).newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      const qs = new URLSearchParams({ token: mintToken('tab'), user: 'tab', room: 'tlsbrowser' });
      await page.goto(`https://localhost:${server.port}/?${qs}`, { timeout: 10000 });
      await page.waitForSelector('body[data-joined="true"]', { timeout: 8000 });
      assert.equal(await page.textContent('#status'), 'connected (WebSocket)');
      assert.equal(await page.evaluate(() => location.protocol), 'https:');
      // A Node client in the same room over wss sees what the tab sends.
      const node = await wssConnect(server.port, 'nodetls');
      const ch = node.channel('rooms:tlsbrowser', { name: 'node' });
      assert.equal((await join(ch)).status, 'ok');
      const got = nextEvent(ch, 'new_msg', 5000);
      await page.fill('#body', 'from chromium over wss');
      await page.press('#body', 'Enter');
      assert.deepEqual(await got, { body: 'from chromium over wss', user: 'tab' });
      assert.deepEqual(errors, []);
      node.disconnect();
    } finally {
      await browser.close();
    }
  }, { timeout: 40000 });

  e2e('TLS 1.3 and 1.2 handshakes, ALPN http/1.1; the API and metrics answer over https', async () => {
    const hello = await handshakeCn(server.port);
    assert.equal(hello.version, 'TLSv1.3');
    assert.equal(hello.alpn, 'http/1.1');
    const v12 = await new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: server.port, ca, servername: 'localhost', maxVersion: 'TLSv1.2' }, () => {
        const v = s.getProtocol();
        s.end();
        resolve(v);
      });
      s.on('error', reject);
    });
    assert.equal(v12, 'TLSv1.2');
    const health = await httpsGet(server.port, '/healthz');
    assert.equal(health.status, 200);
    const metrics = await httpsGet(server.port, '/metrics');
    assert.equal(metrics.status, 200);
    assert.match(metrics.text, /ringcast_connections/);
  });

  e2e('long-poll over https with the phoenix LongPoll transport (a Node process trusting the test CA)', async () => {
    // fetch() takes its CAs at process start: the client runs in a child with
    // NODE_EXTRA_CA_CERTS.
    const script = `
      import { Socket, LongPoll } from 'phoenix';
      const socket = new Socket('https://127.0.0.1:${server.port}/socket', { transport: LongPoll, params: { token: ${JSON.stringify(mintToken('9'))} } });
      socket.onError((e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });
      socket.connect();
      const ch = socket.channel('notifications:9');
      ch.join().receive('ok', () => {
        console.log(JSON.stringify({ joined: true, transport: socket.transport === LongPoll }));
        process.exit(0);
      }).receive('error', (r) => { console.log(JSON.stringify({ refused: r })); process.exit(1); });
      setTimeout(() => { console.log(JSON.stringify({ timeout: true })); process.exit(2); }, 8000);
    `;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
      cwd: path.join(REPO_ROOT, 'tests', 'e2e'),
      env: { ...process.env, NODE_EXTRA_CA_CERTS: file('ca.pem') },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    const code = await new Promise((resolve) => child.on('exit', resolve));
    assert.equal(code, 0, `long-poll client: ${out} ${err}`);
    assert.deepEqual(JSON.parse(out.trim().split('\n').pop()), { joined: true, transport: true });
  }, { timeout: 15000 });

  e2e('a plain HTTP request to the TLS port gets no HTTP answer', async () => {
    const reply = await new Promise((resolve) => {
      const s = net.connect(server.port, '127.0.0.1', () => s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'));
      let data = '';
      s.on('data', (d) => { data += d; });
      s.on('close', () => resolve(data));
      s.on('error', () => resolve(data));
    });
    assert.ok(!reply.startsWith('HTTP/1.1 200'), `answered in plain text: ${reply.slice(0, 40)}`);
  });

  e2e('garbage instead of a ClientHello, and a handshake that never finishes, close only their own connections', async () => {
    const by = await wssConnect(server.port, 'bystander');
    const room = by.channel('rooms:tlsbad', { name: 'by' });
    assert.equal((await join(room)).status, 'ok');
    const before = metricSum((await httpsGet(server.port, '/metrics')).text, 'ringcast_tls_failed_total');
    const closedAfter = (write) => new Promise((resolve) => {
      const t0 = performance.now();
      const s = net.connect(server.port, '127.0.0.1', () => write(s));
      s.on('data', () => {});
      s.on('error', () => {});
      s.on('close', () => resolve(performance.now() - t0));
    });
    // Garbage: the server's TLS refuses it at once.
    const garbage = await closedAfter((s) => s.write(Buffer.alloc(600, 0x41)));
    // Half a ClientHello, then silence; and nothing at all: the 1 s request timeout.
    const hello = Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
    const stalled = await closedAfter((s) => s.write(hello));
    const silent = await closedAfter(() => {});
    assert.ok(garbage < 900, `garbage closed after ${garbage.toFixed(0)} ms`);
    assert.ok(stalled >= 900 && stalled < 5000, `a stalled handshake closed after ${stalled.toFixed(0)} ms (timeout 1 s)`);
    assert.ok(silent >= 900 && silent < 5000, `a silent connection closed after ${silent.toFixed(0)} ms (timeout 1 s)`);
    const afterMetrics = metricSum((await httpsGet(server.port, '/metrics')).text, 'ringcast_tls_failed_total');
    assert.equal(afterMetrics - before, 3, 'each failed handshake counted');
    // The bystander is unharmed.
    assert.deepEqual(await push(room, 'ping', { still: 'here' }), { status: 'ok', response: { still: 'here' } });
    by.disconnect();
  }, { timeout: 20000 });

  e2e('SIGHUP reloads the certificate: new connections see the new one, an old one stays up', async () => {
    assert.equal((await handshakeCn(server.port)).cn, 'first');
    const old = await wssConnect(server.port, '3');
    const ch = old.channel('notifications:3');
    assert.equal((await join(ch)).status, 'ok');
    fs.copyFileSync(certB.cert, live.cert);
    fs.copyFileSync(certB.key, live.key);
    server.proc.kill('SIGHUP');
    let cn;
    for (let i = 0; i < 50; i++) {
      ({ cn } = await handshakeCn(server.port));
      if (cn === 'second') break;
      await sleep(50);
    }
    assert.equal(cn, 'second', 'a new handshake after SIGHUP shows the new certificate');
    assert.equal((await httpsGet(server.port, '/healthz')).cn, 'second');
    // The connection made before the reload goes on.
    const reply = await push(ch, 'ping', {});
    assert.notEqual(reply.status, 'timeout', 'the old connection still answers');
    assert.ok(old.isConnected(), 'the old connection is still open');
    // A broken file on SIGHUP keeps the certificate that works.
    fs.writeFileSync(live.cert, 'not a certificate');
    server.proc.kill('SIGHUP');
    await sleep(300);
    assert.equal((await handshakeCn(server.port)).cn, 'second', 'a bad reload keeps the old certificate');
    assert.ok(!server.exited, 'the server survived a bad reload');
    old.disconnect();
  }, { timeout: 20000 });
});

describe('--tls-self-signed', () => {
  let server;
  before(async () => { server = await startServer({ args: ['--tls-self-signed'] }); });
  after(async () => { await server.stop(); });

  e2e('serves wss:// with a certificate for localhost and 127.0.0.1', async () => {
    const names = await new Promise((resolve, reject) => {
      const s = tls.connect({ host: '127.0.0.1', port: server.port, rejectUnauthorized: false, servername: 'localhost' }, () => {
        const alt = s.getPeerCertificate().subjectaltname;
        s.end();
        resolve(alt);
      });
      s.on('error', reject);
    });
    assert.match(names, /DNS:localhost/);
    assert.match(names, /IP Address:127\.0\.0\.1/);
    const ws = new WebSocket(`wss://127.0.0.1:${server.port}/socket/websocket?vsn=2.0.0&token=${mintToken('4')}`, { rejectUnauthorized: false });
    await within(new Promise((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject); }), 5000, 'wss did not open');
    ws.close();
  });

  e2e('SIGTERM reaches parked wss connections: each gets its 1001 close over TLS, and the process exits 0', async () => {
    const port = await freePort();
    const proc = spawn(BIN, ['serve', '--listen', `127.0.0.1:${port}`, '--cores', '2', '--secret', SECRET,
      '--api-key', 'k', '--tls-self-signed'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise((resolve) => proc.on('exit', (code) => resolve(code)));
    let log = '';
    proc.stderr.on('data', (b) => { log += b; });
    try {
      await within((async () => { while (!log.includes('listening on')) await sleep(20); })(), 10000, 'the server did not listen');
      const parked = () => new Promise((resolve, reject) => {
        https.get({ host: '127.0.0.1', port, path: '/api/stats', rejectUnauthorized: false, agent: false, headers: { authorization: 'Bearer k' } }, (res) => {
          let text = '';
          res.on('data', (d) => { text += d; });
          res.on('end', () => resolve(JSON.parse(text).parked));
        }).on('error', reject);
      });
      const clients = [];
      for (let i = 0; i < 30; i++) {
        const ws = new WebSocket(`wss://127.0.0.1:${port}/socket/websocket?vsn=2.0.0&token=${mintToken(`t${i}`)}`, { rejectUnauthorized: false });
        const closed = new Promise((resolve) => ws.on('close', (code) => resolve(code)));
        await within(new Promise((resolve, reject) => {
          ws.on('open', () => ws.send(JSON.stringify(['1', '1', 'bench:tlsterm', 'phx_join', {}])));
          ws.once('message', resolve);
          ws.on('error', reject);
        }), 5000, `client ${i} did not join`);
        clients.push(closed);
      }
      await within((async () => { while (await parked() < clients.length) await sleep(100); })(), 5000, 'the wss connections did not park');
      proc.kill('SIGTERM');
      const codes = await within(Promise.all(clients), 5000, 'not every parked wss connection was closed');
      assert.deepEqual([...new Set(codes)], [1001], 'every parked wss connection got 1001');
      assert.equal(await within(exited, 5000, 'the server did not exit'), 0, `exit code (log: ${log.slice(-500)})`);
    } finally {
      proc.kill('SIGKILL');
    }
  }, { timeout: 30000 });
});
