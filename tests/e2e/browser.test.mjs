// The demo page (`GET /`, seed-app.md) in a real browser: Debian's chromium driven by
// playwright-core. Two tabs chat and see each other's presence over WebSocket; a tab whose
// WebSockets never open falls back to long-poll (`?fallback=300`, PROTOCOL.md §14
// `longPollFallbackMs`) and still chats with a WebSocket tab. A screenshot of the page
// goes to /tmp/ringcast-demo.png.
//
// Needs /usr/bin/chromium (scripts/test.sh installs it); without it these tests FAIL.

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';
import { e2e, startServer, connect, rawConnect, mintToken, collect, REPO_ROOT, SECRET } from './lib.mjs';

const CHROMIUM = process.env.RINGCAST_CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = '/tmp/ringcast-demo.png';

let server;
let browser;

before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install -y chromium; scripts/test.sh installs it)`);
  }
  server = await startServer({ cores: 2 });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 20000,
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) await server.stop();
});

/** Opens the chat page as `user` in a fresh browser context (its own sessionStorage). */
async function openTab(user, room, { query = '', blockWebSocket = false, base = server.httpUrl } = {}) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(String(e)));
  if (blockWebSocket) {
    // A WebSocket that never opens (as behind a proxy that swallows upgrades).
    await page.addInitScript(() => {
      window.__wsAttempts = 0;
      class NeverOpens {
        constructor(url) {
          window.__wsAttempts += 1;
          this.url = url;
          this.readyState = 0;
          this.bufferedAmount = 0;
          this.binaryType = 'blob';
        }

        send() { throw new Error('not open'); }

        close() { this.readyState = 3; }
      }
      NeverOpens.CONNECTING = 0;
      NeverOpens.OPEN = 1;
      NeverOpens.CLOSING = 2;
      NeverOpens.CLOSED = 3;
      window.WebSocket = NeverOpens;
    });
  }
  const qs = new URLSearchParams({ token: mintToken(user), user, room });
  await page.goto(`${base}/?${qs}${query}`, { timeout: 10000 });
  await page.waitForSelector('body[data-joined="true"]', { timeout: 8000 });
  return page;
}

const presenceUsers = (page) => page.$$eval('#presence li', (lis) => lis.map((li) => li.dataset.user).sort());
const messages = (page) => page.$$eval('#messages li', (lis) => lis.map((li) => li.textContent));

async function waitPresence(page, users) {
  const want = [...users].sort();
  await page.waitForFunction(
    (w) => JSON.stringify([...document.querySelectorAll('#presence li')].map((li) => li.dataset.user).sort()) === JSON.stringify(w),
    want, { timeout: 5000 },
  ).catch(async (e) => {
    throw new Error(`presence on the page is ${JSON.stringify(await presenceUsers(page))}, want ${JSON.stringify(want)}: ${e.message}`);
  });
}

async function waitMessage(page, text) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li')].some((li) => li.textContent === t),
    text, { timeout: 5000 },
  ).catch(async (e) => {
    throw new Error(`no message ${JSON.stringify(text)} on the page; it shows ${JSON.stringify(await messages(page))}: ${e.message}`);
  });
}

async function send(page, text) {
  await page.fill('#body', text);
  await page.press('#body', 'Enter');
}

/** The transport the page's socket uses: "WebSocket" or "LongPoll". */
const transportOf = (page) => page.evaluate(() => (socket.transport === Phoenix.LongPoll ? 'LongPoll' : socket.transport === window.WebSocket ? 'WebSocket' : String(socket.transport && socket.transport.name)));

e2e('two tabs in one room see each other in presence and chat over WebSocket', async () => {
  const alice = await openTab('alice', 'browser1');
  const bob = await openTab('bob', 'browser1');
  for (const page of [alice, bob]) {
    await waitPresence(page, ['alice', 'bob']);
    await waitMessage(page, 'Welcome to room browser1!');
    assert.equal(await transportOf(page), 'WebSocket');
    assert.equal(await page.textContent('#status'), 'connected (WebSocket)');
  }
  assert.equal(await alice.textContent('#presence li[data-user="bob"]'), 'user bob (1)');

  await send(alice, 'hello bob');
  await waitMessage(bob, 'alice: hello bob');
  await waitMessage(alice, 'alice: hello bob');
  await send(bob, 'hi alice');
  await waitMessage(alice, 'bob: hi alice');
  assert.equal(await alice.inputValue('#body'), '', 'the input is cleared after sending');

  // a phoenix client from Node in the same room sees the browser's messages too
  const node = await connect(server.port, 'nodeuser');
  const chan = await node.joined('rooms:browser1', { name: 'node' });
  const got = collect(chan, 'new_msg');
  await waitPresence(alice, ['alice', 'bob', 'nodeuser']);
  chan.push('new_msg', { body: 'from node' });
  await waitMessage(alice, 'nodeuser: from node');
  await waitMessage(bob, 'nodeuser: from node');
  await send(bob, 'to node');
  await got.waitFor(2, 3000);
  assert.deepEqual(got.items.at(-1), { body: 'to node', user: 'bob' });

  await alice.screenshot({ path: SCREENSHOT });

  // bob closes his tab: alice's presence drops him
  await bob.context().close();
  await waitPresence(alice, ['alice', 'nodeuser']);
  assert.deepEqual(alice.errors, [], 'no page errors');
  await alice.context().close();
}, { timeout: 30000 });

e2e('with WebSockets that never open, ?fallback=300 falls back to long-poll and chats with a WebSocket tab', async () => {
  const carol = await openTab('carol', 'browser2', { query: '&fallback=300', blockWebSocket: true });
  const dave = await openTab('dave', 'browser2');
  assert.ok(await carol.evaluate(() => window.__wsAttempts) >= 1, 'the page tried a WebSocket first');
  assert.equal(await transportOf(carol), 'LongPoll');
  assert.equal(await transportOf(dave), 'WebSocket');
  // the status names the transport (not a minified class name)
  assert.equal(await carol.textContent('#status'), 'connected (LongPoll)');
  assert.equal(await dave.textContent('#status'), 'connected (WebSocket)');
  for (const page of [carol, dave]) await waitPresence(page, ['carol', 'dave']);
  await waitMessage(carol, 'Welcome to room browser2!');

  await send(carol, 'over long-poll');
  await waitMessage(dave, 'carol: over long-poll');
  await waitMessage(carol, 'carol: over long-poll');
  await send(dave, 'over websocket');
  await waitMessage(carol, 'dave: over websocket');
  // the fallback is remembered for this tab
  assert.equal(await carol.evaluate(() => sessionStorage.getItem('phx:fallback:LongPoll')), 'true');
  assert.deepEqual(carol.errors, [], 'no page errors');
  await carol.screenshot({ path: '/tmp/ringcast-demo-longpoll.png' });
  await carol.context().close();
  await dave.context().close();
}, { timeout: 30000 });

e2e('?longpoll uses the LongPoll transport from the start', async () => {
  const erin = await openTab('erin', 'browser3', { query: '&longpoll' });
  const frank = await openTab('frank', 'browser3');
  assert.equal(await transportOf(erin), 'LongPoll');
  assert.equal(await erin.textContent('#status'), 'connected (LongPoll)');
  for (const page of [erin, frank]) await waitPresence(page, ['erin', 'frank']);
  await send(frank, 'ping erin');
  await waitMessage(erin, 'frank: ping erin');
  await send(erin, 'pong frank');
  await waitMessage(frank, 'erin: pong frank');
  await erin.context().close();
  await frank.context().close();
}, { timeout: 30000 });

/**
 * A TCP proxy in front of the server that counts, for each connection the server
 * upgrades to a WebSocket, the bytes it sends: what the browser receives on the wire.
 */
async function countingProxy(port) {
  const upgraded = [];
  const open = new Set();
  let cut = false;
  const proxy = net.createServer((client) => {
    // While cut, the network is away: connections are dropped at once.
    if (cut) { client.destroy(); return; }
    const upstream = net.connect(port, '127.0.0.1');
    open.add(client); open.add(upstream);
    const entry = { bytes: 0, websocket: null };
    upstream.on('data', (d) => {
      if (entry.websocket === null) {
        entry.websocket = d.subarray(0, 12).toString('latin1') === 'HTTP/1.1 101';
        if (entry.websocket) upgraded.push(entry);
      }
      if (entry.websocket) entry.bytes += d.length;
      client.write(d);
    });
    client.on('data', (d) => upstream.write(d));
    const end = () => { client.destroy(); upstream.destroy(); open.delete(client); open.delete(upstream); };
    for (const s of [client, upstream]) { s.on('close', end); s.on('error', end); }
  });
  await new Promise((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${proxy.address().port}`,
    upgraded,
    /** Takes the network away: every connection through the proxy drops, new ones too. */
    cut: () => { cut = true; for (const s of open) s.destroy(); },
    restore: () => { cut = false; },
    close: () => { for (const s of open) s.destroy(); return new Promise((r) => proxy.close(r)); },
  };
}

e2e('Chromium negotiates permessage-deflate: a 100-member presence_state arrives compressed on the wire and intact, as does a big message', async () => {
  const room = 'zipbrowser';
  const topic = `rooms:${room}`;
  const members = [];
  for (let i = 0; i < 100; i++) {
    const m = await rawConnect(server.port, { userId: `m${i}` });
    await m.join(topic, { name: `member ${i} with a long display name `.repeat(6).slice(0, 200) });
    members.push(m);
  }
  // The presence_state a joiner gets now, uncompressed.
  const probe = await rawConnect(server.port, { userId: 'probe' });
  await probe.join(topic);
  const stateLen = (await probe.event(topic, 'presence_state')).text.length;
  await probe.close();
  const proxy = await countingProxy(server.port);
  try {
    const page = await openTab('zip', room, { base: proxy.url });
    await waitPresence(page, ['zip', ...members.map((_, i) => `m${i}`)]);
    assert.match(await page.evaluate(() => socket.conn.extensions), /permessage-deflate/);
    assert.equal(proxy.upgraded.length, 1, 'one WebSocket through the proxy');
    const wire = proxy.upgraded[0].bytes;
    assert.ok(wire * 3 < stateLen, `${wire} bytes on the wire, the presence_state alone is ${stateLen}`);
    // A big broadcast arrives whole.
    const body = Array.from({ length: 700 }, (_, i) => `w${i}`).join(' ').slice(0, 6000);
    members[0].send([null, null, topic, 'new_msg', { body }]);
    await waitMessage(page, `m0: ${body}`);
    assert.deepEqual(page.errors, [], 'no page errors');
    await page.context().close();
  } finally {
    for (const m of members) await m.close();
    await proxy.close();
  }
}, { timeout: 40000 });

e2e('the admin page: log in with the API key, numbers and charts move while a loadgen runs, a broadcast from its form reaches a phoenix client', async () => {
  const key = 'admin-test-key';
  const admin = await startServer({ cores: 2, args: ['--api-key', key] });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(String(e)));
  let loadgen;
  try {
    await page.goto(`${admin.httpUrl}/admin`, { timeout: 10000 });
    // A wrong key is refused, the right one logs in.
    await page.fill('#key', 'wrong');
    await page.click('#login-form button');
    await page.waitForFunction(() => /refused/.test(document.getElementById('login-error').textContent), null, { timeout: 5000 });
    await page.fill('#key', key);
    await page.click('#login-form button');
    await page.waitForSelector('body[data-ready="true"]', { timeout: 5000 });

    const node = await connect(admin.port, 'watcher');
    const lobby = await node.joined('rooms:lobby', { name: 'watcher' });
    const loadgenBin = process.env.RINGCAST_LOADGEN_BIN || path.join(REPO_ROOT, 'target', 'debug', 'ringcast-loadgen');
    loadgen = spawn(loadgenBin, ['--quiet', '--sources', '4', '--secret', SECRET, 'fanout', '--url', `ws://127.0.0.1:${admin.port}`,
      '-n', '40', '-m', '400', '--rate', '50', '--topic', 'bench:admin'], { stdio: 'ignore' });
    await page.waitForFunction(() => Number(document.getElementById('total-connections').textContent) >= 41, null, { timeout: 15000 });
    await page.waitForFunction(() => Number(document.getElementById('deliveries-rate').textContent) > 100, null, { timeout: 15000 });
    await page.waitForFunction(() => [...document.querySelectorAll('#topics tbody tr')]
      .some((tr) => tr.cells[0].textContent === 'bench:admin' && Number(tr.cells[1].textContent) >= 40), null, { timeout: 5000 });
    await page.waitForFunction(() => [...document.querySelectorAll('#topics tbody tr')]
      .some((tr) => tr.cells[0].textContent === 'rooms:lobby' && tr.cells[2].textContent === '1'), null, { timeout: 5000 });
    assert.ok(await page.$('#chart canvas'), 'the chart is drawn');
    await page.waitForFunction(() => Number(document.body.dataset.points) >= 5, null, { timeout: 10000 });
    await page.screenshot({ path: '/tmp/ringcast-admin.png', fullPage: true });

    const got = new Promise((resolve) => lobby.on('new_msg', resolve));
    await page.fill('#b-topic', 'rooms:lobby');
    await page.fill('#b-event', 'new_msg');
    await page.fill('#b-payload', '{"body": "from the admin page", "user": "admin"}');
    await page.click('#broadcast-form button');
    assert.deepEqual(await got, { body: 'from the admin page', user: 'admin' });
    await page.waitForFunction(() => document.getElementById('broadcast-status').textContent === 'sent', null, { timeout: 3000 });
    assert.deepEqual(page.errors, [], 'no page errors');
    await node.close();
  } finally {
    if (loadgen) loadgen.kill('SIGKILL');
    await context.close();
    await admin.stop();
  }
}, { timeout: 60000 });

e2e('the demo page recovers: a tab whose network goes away and comes back shows every message the other tab sent meanwhile, once each', async () => {
  const room = 'recover1';
  const proxy = await countingProxy(server.port);
  try {
    const away = await openTab('away', room, { base: proxy.url });
    const here = await openTab('here', room);
    await waitPresence(away, ['away', 'here']);
    await send(here, 'before');
    await waitMessage(away, 'here: before');
    proxy.cut();
    await away.waitForFunction(() => !/^connected/.test(document.getElementById('status').textContent) || document.getElementById('status').textContent === 'connection error', null, { timeout: 5000 }).catch(() => {});
    for (let i = 1; i <= 5; i++) {
      await send(here, `while away ${i}`);
      await waitMessage(here, `here: while away ${i}`);
    }
    proxy.restore();
    await away.waitForFunction(() => Number(document.body.dataset.joins) >= 2, null, { timeout: 15000 });
    for (let i = 1; i <= 5; i++) await waitMessage(away, `here: while away ${i}`);
    await send(here, 'after');
    await waitMessage(away, 'here: after');
    const shown = (await messages(away)).filter((t) => t.startsWith('here: '));
    assert.deepEqual(shown, ['here: before', ...[1, 2, 3, 4, 5].map((i) => `here: while away ${i}`), 'here: after'],
      'every message once, in order');
    assert.equal(await away.evaluate(() => document.body.dataset.recovered), 'true');
    assert.deepEqual(away.errors, [], 'no page errors');
    await away.context().close();
    await here.context().close();
  } finally {
    await proxy.close();
  }
}, { timeout: 40000 });
