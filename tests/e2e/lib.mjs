// Helpers for the end-to-end tests: start the real `ringcast serve` binary, mint tokens,
// connect the unmodified `phoenix` npm client (over `ws`), and speak the wire protocol
// by hand (raw `ws` and raw TCP) where the client would not do what a test needs.
//
// Every test is declared with `e2e(...)` instead of `node:test`'s `test`: it gives the
// test a deadline of its own, closes every client the test opened, and on failure prints
// the tail of the log of every server still running.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import WebSocket from 'ws';
import { Socket } from 'phoenix';

export { WebSocket, Socket };

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BIN = process.env.RINGCAST_BIN || path.join(REPO_ROOT, 'target', 'debug', 'ringcast');
export const SECRET = 'test-secret';
export const sleep = (ms) => delay(ms);

/**
 * Resolves like `promise` if it settles within `ms`; otherwise rejects with
 * "<what> within <ms> ms" (or resolves `onTimeout` when given). Leaves no timer behind.
 */
export function within(promise, ms, what = 'no answer', { onTimeout } = {}) {
  let timer;
  const timeout = new Promise((resolve, reject) => {
    timer = setTimeout(() => (onTimeout !== undefined ? resolve(onTimeout) : reject(new Error(`${what} within ${ms} ms`))), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const liveServers = new Set();
const openClients = new Set();

process.on('exit', () => {
  for (const s of liveServers) {
    try { s.proc.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

// ---------------------------------------------------------------------------
// Test wrapper
// ---------------------------------------------------------------------------

/**
 * Declares one end-to-end test. `fn` gets node's test context. The test fails after
 * `timeout` ms; whatever it opened with `connect`/`rawConnect`/`rawTcp` is closed after it.
 */
export function e2e(name, fn, { timeout = 8000 } = {}) {
  return test(name, { timeout: timeout + 3000 }, async (t) => {
    let timer;
    try {
      await Promise.race([
        Promise.resolve().then(() => fn(t)),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`test did not finish within ${timeout} ms`)), timeout);
        }),
      ]);
      // No test expects the server to drop a phoenix client; the client would reconnect
      // and rejoin silently, which could hide such a drop from the test's own assertions.
      for (const c of openClients) {
        if (c instanceof PhxClient && c.opened && c.closes.length > 0) {
          throw new Error(`phoenix client of user ${c.userId} was disconnected during the test: ${JSON.stringify(c.closes)}`);
        }
      }
    } catch (err) {
      for (const s of liveServers) {
        const tail = s.log().slice(-4000);
        process.stderr.write(`\n--- test "${name}" failed; ringcast on port ${s.port} (${s.exited ? `exited: ${s.exited}` : 'running'}), log tail:\n${tail}\n---\n`);
      }
      throw err;
    } finally {
      clearTimeout(timer);
      await closeAllClients();
    }
  });
}

async function closeAllClients() {
  const clients = [...openClients];
  openClients.clear();
  await Promise.all(clients.map((c) => c.close().catch(() => {})));
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Starts `ringcast serve` on a free port and resolves once it logged `listening on`.
 * `secret: null` starts it without `--secret` (it then reads RINGCAST_SECRET or uses its
 * development secret); RINGCAST_SECRET is removed from its environment unless `env` sets it.
 * Returns `{port, url, httpUrl, proc, log(), stop()}`; `url` is the phoenix endpoint
 * (`ws://127.0.0.1:PORT/socket`).
 */
export async function startServer({ cores = 1, args = [], env = {}, secret = SECRET, bin = null } = {}) {
  const port = await freePort();
  // `bin`: another program that serves like `ringcast serve` (an example embedding the
  // library): it gets `--listen` and `args`, and the secret through the environment.
  const argv = bin
    ? ['--listen', `127.0.0.1:${port}`, ...args]
    : ['serve', '--listen', `127.0.0.1:${port}`, '--cores', String(cores), ...(secret === null ? [] : ['--secret', secret]), ...args];
  const proc = spawn(bin || BIN, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { NO_COLOR: '1', ...withoutSecretEnv(process.env), ...(bin && secret !== null ? { RINGCAST_SECRET: secret } : {}), ...env },
  });
  const chunks = [];
  let logLen = 0;
  const keep = (buf) => {
    chunks.push(buf.toString('utf8'));
    logLen += buf.length;
    while (logLen > 1 << 20 && chunks.length > 1) logLen -= chunks.shift().length;
  };
  const server = {
    port,
    url: `ws://127.0.0.1:${port}/socket`,
    httpUrl: `http://127.0.0.1:${port}`,
    proc,
    argv,
    exited: null,
    log: () => chunks.join(''),
    stop: () => stopServer(server),
  };
  const exitPromise = new Promise((resolve) => {
    proc.on('exit', (code, signal) => {
      server.exited = signal ? `signal ${signal}` : `code ${code}`;
      resolve();
    });
  });
  server.exitPromise = exitPromise;
  liveServers.add(server);

  let stderrLine = '';
  await new Promise((resolve, reject) => {
    let done = false;
    const finish = (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(() => {
      finish(new Error(`ringcast did not print "listening on" within 10 s\n${BIN} ${argv.join(' ')}\n${server.log()}`));
    }, 10000);
    proc.on('error', (err) => finish(new Error(`cannot start ${BIN}: ${err.message}`)));
    proc.on('exit', () => finish(new Error(`ringcast exited (${server.exited}) before listening\n${BIN} ${argv.join(' ')}\n${server.log()}`)));
    proc.stdout.on('data', keep);
    proc.stderr.on('data', (buf) => {
      keep(buf);
      stderrLine += buf.toString('utf8');
      if (stderrLine.includes('listening on')) finish();
      const nl = stderrLine.lastIndexOf('\n');
      if (nl >= 0) stderrLine = stderrLine.slice(nl + 1);
    });
  }).catch(async (err) => {
    await stopServer(server);
    throw err;
  });
  return server;
}

function withoutSecretEnv(env) {
  const { RINGCAST_SECRET: _secret, RINGCAST_API_KEY: _key, ...rest } = env;
  return rest;
}

async function stopServer(server) {
  liveServers.delete(server);
  if (server.exited) return;
  server.proc.kill('SIGTERM');
  const killed = await within(server.exitPromise.then(() => true), 3000, '', { onTimeout: false });
  if (!killed) {
    server.proc.kill('SIGKILL');
    await server.exitPromise;
  }
}

/** Asserts that the server process is still running (it did not crash on what a test sent). */
export function assertAlive(server) {
  if (server.exited) {
    throw new Error(`ringcast exited (${server.exited})\n${server.log().slice(-4000)}`);
  }
}

/** Runs the ringcast binary with `args`; resolves `{code, stdout, stderr}`. */
export function runCli(args, { timeout = 10000, env = {} } = {}) {
  return new Promise((resolve) => {
    execFile(BIN, args, { timeout, env: { ...withoutSecretEnv(process.env), ...env } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

export const b64url = (data) => Buffer.from(data).toString('base64url');
export const nowSecs = () => Math.floor(Date.now() / 1000);

/** A socket token as seed-app.md defines it: B64(claims) + "." + B64(HMAC-SHA256(secret, B64(claims))). */
export function mintToken(userId, { secret = SECRET, iat = nowSecs() } = {}) {
  const claims = b64url(JSON.stringify({ user_id: String(userId), iat }));
  const sig = crypto.createHmac('sha256', secret).update(claims).digest('base64url');
  return `${claims}.${sig}`;
}

// ---------------------------------------------------------------------------
// The phoenix client
// ---------------------------------------------------------------------------

/**
 * Connects a phoenix `Socket` as `userId` and resolves once it is open.
 * Returns a `PhxClient`: `{socket, userId, core, messages, closes, channel(), joined(), close()}`.
 * `core` is the `x-ringcast-core` header of the 101 answer; `messages` every decoded
 * message the socket received, in order; `closes` every close of its transport.
 */
export async function connect(port, userId, { token, params, timeout = 3000, socketOpts = {} } = {}) {
  const client = new PhxClient(userId);
  class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.on('upgrade', (res) => {
        client.core = res.headers['x-ringcast-core'];
        client.upgradeHeaders = res.headers;
      });
    }
  }
  const socket = new Socket(`ws://127.0.0.1:${port}/socket`, {
    transport: RecordingWebSocket,
    params: params || { token: token ?? mintToken(userId) },
    reconnectAfterMs: () => 200,
    ...socketOpts,
  });
  client.socket = socket;
  socket.onMessage((msg) => client.messages.push(msg));
  socket.onClose((event) => client.closes.push({ code: event.code, reason: event.reason }));
  openClients.add(client);
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`phoenix socket did not open within ${timeout} ms`)), timeout);
    const refs = [];
    const done = () => { clearTimeout(timer); socket.off(refs); };
    const fail = (err) => { done(); socket.disconnect(); reject(err); };
    refs.push(socket.onOpen(() => { done(); client.opened = true; resolve(); }));
    refs.push(socket.onError((e) => fail(new Error(`phoenix socket failed to open: ${e && (e.message || e.type) || e}`))));
    socket.connect();
  });
  return client;
}

export class PhxClient {
  constructor(userId) {
    this.userId = String(userId);
    this.core = undefined;
    this.messages = [];
    this.socket = null;
    this.channels = [];
    this.pushes = [];
    /** Close events of the transport ({code, reason}), including ones the client recovered from. */
    this.closes = [];
    this.opened = false;
  }

  channel(topic, params = {}) {
    const chan = this.socket.channel(topic, params);
    // Track pushes so that close() can cancel their timeout timers, which would
    // otherwise keep the test process alive for seconds after the last test.
    const push = chan.push.bind(chan);
    chan.push = (...args) => {
      const p = push(...args);
      this.pushes.push(p);
      return p;
    };
    this.channels.push(chan);
    return chan;
  }

  /** Joins `topic`, asserts the join is accepted, and returns the channel. */
  async joined(topic, params = {}, timeout = 2000) {
    const chan = this.channel(topic, params);
    const res = await join(chan, timeout);
    if (res.status !== 'ok') {
      throw new Error(`join ${topic} as ${this.userId}: expected ok, got ${res.status} ${JSON.stringify(res.response)}`);
    }
    return chan;
  }

  /** Messages received so far on `topic` (optionally only `event`). */
  received(topic, event) {
    return this.messages.filter((m) => m.topic === topic && (event === undefined || m.event === event));
  }

  close() {
    openClients.delete(this);
    for (const chan of this.channels) {
      chan.rejoinTimer.reset();
      chan.joinPush.cancelTimeout();
    }
    for (const p of this.pushes) p.cancelTimeout();
    if (!this.socket) return Promise.resolve();
    const ws = this.socket.conn;
    this.socket.disconnect();
    if (!ws || ws.readyState === WebSocket.CLOSED) return Promise.resolve();
    return within(new Promise((resolve) => ws.once('close', resolve)), 1000, '', { onTimeout: null }).then(() => {});
  }
}

function awaitPush(push) {
  return new Promise((resolve) => {
    push
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => resolve({ status: 'error', response }))
      .receive('timeout', () => resolve({ status: 'timeout', response: undefined }));
  });
}

/** Joins a channel; resolves `{status, response}` (status "ok", "error" or "timeout"). */
export function join(channel, timeout = 2000) {
  return awaitPush(channel.join(timeout));
}

/** Pushes `event` and resolves with the reply `{status, response}`; status "timeout" if none came. */
export function push(channel, event, payload = {}, timeout = 2000) {
  return awaitPush(channel.push(event, payload, timeout));
}

/** Resolves with the payload of the next `event` on `channel`; rejects after `timeout` ms. */
export function nextEvent(channel, event, timeout = 2000) {
  return new Promise((resolve, reject) => {
    const ref = channel.on(event, (payload) => {
      clearTimeout(timer);
      channel.off(event, ref);
      resolve(payload);
    });
    const timer = setTimeout(() => {
      channel.off(event, ref);
      reject(new Error(`no "${event}" on ${channel.topic} within ${timeout} ms`));
    }, timeout);
  });
}

/**
 * Collects every `event` on `channel` from now on: `{items, waitFor(n, timeout), stop()}`;
 * `waitFor` resolves once at least `n` arrived.
 */
export function collect(channel, event) {
  const items = [];
  const waiters = [];
  const ref = channel.on(event, (payload) => {
    items.push(payload);
    for (const w of [...waiters]) if (items.length >= w.n) w.resolve(items);
  });
  return {
    items,
    waitFor(n, timeout = 2000) {
      if (items.length >= n) return Promise.resolve(items);
      return new Promise((resolve, reject) => {
        const w = {
          n,
          resolve: (v) => { clearTimeout(w.timer); waiters.splice(waiters.indexOf(w), 1); resolve(v); },
        };
        w.timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          reject(new Error(`only ${items.length} of ${n} "${event}" on ${channel.topic} within ${timeout} ms: ${JSON.stringify(items).slice(0, 500)}`));
        }, timeout);
        waiters.push(w);
      });
    },
    stop() { channel.off(event, ref); },
  };
}

/** Polls `cond` until it is truthy; rejects with `what` after `timeout` ms. */
export async function waitFor(cond, { timeout = 2000, interval = 20, what = 'condition' } = {}) {
  const end = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await delay(interval);
  }
}

export const isPresence = (m) => m.event === 'presence_state' || m.event === 'presence_diff';

/** A broadcast's position on a topic with history: "<epoch>:<offset>" (seed-app.md, "History and recovery"). */
export const POSITION = /^[0-9a-f]{1,16}:\d+$/;

/**
 * Takes the "position" out of a `rooms:*` join reply, after checking that it is one, so
 * that a test of another contract compares the rest as before. Takes a reply
 * `{status, response}`, a V2 reply frame (array) or a V1 reply frame (object).
 */
export function sansPosition(x) {
  const strip = (reply) => {
    if (!reply || typeof reply.response !== 'object' || reply.response === null) {
      throw new Error(`not a join reply: ${JSON.stringify(reply)}`);
    }
    const { position, ...rest } = reply.response;
    assert.match(String(position), POSITION, `a rooms:* join reply carries its position: ${JSON.stringify(reply)}`);
    return { ...reply, response: rest };
  };
  if (Array.isArray(x)) return [...x.slice(0, 4), strip(x[4]), ...x.slice(5)];
  if (x && x.event === 'phx_reply' && x.payload) return { ...x, payload: strip(x.payload) };
  return strip(x);
}

// ---------------------------------------------------------------------------
// Raw WebSocket
// ---------------------------------------------------------------------------

function wsUrl(port, { userId, token, vsn = '2.0.0', query } = {}) {
  if (query !== undefined) return `ws://127.0.0.1:${port}/socket/websocket${query ? `?${query}` : ''}`;
  const qs = new URLSearchParams();
  const tok = token !== undefined ? token : userId !== undefined ? mintToken(userId) : undefined;
  if (tok !== undefined && tok !== null) qs.set('token', tok);
  if (vsn !== null) qs.set('vsn', vsn);
  return `ws://127.0.0.1:${port}/socket/websocket?${qs}`;
}

/**
 * Tries a WebSocket upgrade and resolves with the HTTP status: 101 when it upgraded
 * (the socket is closed again right away), else the refusal's status (e.g. 403).
 * Options as `rawConnect`.
 */
export function upgradeStatus(port, opts = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl(port, opts), { headers: opts.headers, origin: opts.origin });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('no answer to the upgrade within 3 s')); }, 3000);
    ws.on('error', (err) => { clearTimeout(timer); reject(err); });
    ws.on('unexpected-response', (req, res) => {
      clearTimeout(timer);
      res.resume();
      req.destroy();
      resolve(res.statusCode);
    });
    ws.on('open', () => {
      clearTimeout(timer);
      ws.terminate();
      resolve(101);
    });
  });
}

/** Decodes a V2 binary frame (server → client kinds 0, 1, 2). */
export function decodeBinary(buf) {
  const kind = buf[0];
  const str = (start, len) => buf.subarray(start, start + len).toString('utf8');
  if (kind === 0) {
    const [jl, tl, el] = [buf[1], buf[2], buf[3]];
    let o = 4;
    const join_ref = str(o, jl); o += jl;
    const topic = str(o, tl); o += tl;
    const event = str(o, el); o += el;
    return { binary: true, kind: 'push', join_ref, ref: null, topic, event, payload: buf.subarray(o) };
  }
  if (kind === 1) {
    const [jl, rl, tl, sl] = [buf[1], buf[2], buf[3], buf[4]];
    let o = 5;
    const join_ref = str(o, jl); o += jl;
    const ref = str(o, rl); o += rl;
    const topic = str(o, tl); o += tl;
    const status = str(o, sl); o += sl;
    return { binary: true, kind: 'reply', join_ref, ref, topic, event: 'phx_reply', status, payload: buf.subarray(o) };
  }
  if (kind === 2) {
    const [tl, el] = [buf[1], buf[2]];
    let o = 3;
    const topic = str(o, tl); o += tl;
    const event = str(o, el); o += el;
    return { binary: true, kind: 'broadcast', join_ref: null, ref: null, topic, event, payload: buf.subarray(o) };
  }
  return { binary: true, kind: `unknown(${kind})`, raw: buf };
}

/** Encodes a V2 client → server binary push (kind 0). */
export function encodeBinaryPush(joinRef, ref, topic, event, data) {
  const parts = [joinRef, ref, topic, event].map((s) => Buffer.from(s, 'utf8'));
  return Buffer.concat([Buffer.from([0, ...parts.map((p) => p.length)]), ...parts, Buffer.from(data)]);
}

/**
 * Opens a raw WebSocket to `/socket/websocket` and resolves once it is open.
 * Options: `userId` (a token is minted) or `token`, `vsn` (default "2.0.0"; null to omit),
 * `query` (the whole query string, overrides the others), `headers`, `origin`.
 */
export async function rawConnect(port, opts = {}) {
  const client = new RawClient(new WebSocket(wsUrl(port, opts), { headers: opts.headers, origin: opts.origin }));
  openClients.add(client);
  await client.opened;
  return client;
}

export class RawClient {
  constructor(ws) {
    this.ws = ws;
    this.core = undefined;
    this.queue = [];
    this.all = [];
    this.waiters = [];
    this.closeInfo = null;
    ws.on('upgrade', (res) => { this.core = res.headers['x-ringcast-core']; });
    this.opened = new Promise((resolve, reject) => {
      ws.on('open', resolve);
      ws.on('unexpected-response', (req, res) => {
        res.resume();
        req.destroy();
        reject(new Error(`upgrade refused: HTTP ${res.statusCode}`));
      });
      ws.on('error', (err) => reject(err));
    });
    this.closed = new Promise((resolve) => {
      ws.on('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString('utf8'), at: Date.now() };
        resolve(this.closeInfo);
        for (const w of [...this.waiters]) w.check();
      });
    });
    ws.on('message', (data, isBinary) => {
      let msg;
      if (isBinary) {
        msg = decodeBinary(Buffer.from(data));
      } else {
        const text = data.toString('utf8');
        try {
          const v = JSON.parse(text);
          if (Array.isArray(v)) {
            const [join_ref, ref, topic, event, payload] = v;
            msg = { join_ref, ref, topic, event, payload, frame: v, text };
          } else {
            msg = { ...v, frame: v, text };
          }
        } catch {
          msg = { invalid: true, text };
        }
      }
      this.all.push(msg);
      this.queue.push(msg);
      for (const w of [...this.waiters]) w.check();
    });
  }

  /** Sends a JSON value (arrays and objects are encoded), a string as text, a Buffer as binary. */
  send(value, options) {
    if (Buffer.isBuffer(value) || value instanceof Uint8Array) this.ws.send(value, { binary: true, ...options });
    else if (typeof value === 'string') this.ws.send(value, { binary: false, ...options });
    else this.ws.send(JSON.stringify(value), options);
  }

  /**
   * Resolves with (and removes from the queue) the first received message, old or new,
   * for which `pred` is true; rejects after `timeout` ms or once the socket closed.
   */
  next(pred = () => true, timeout = 2000, what = 'a message') {
    return new Promise((resolve, reject) => {
      const w = {
        check: () => {
          const i = this.queue.findIndex(pred);
          if (i >= 0) {
            const [m] = this.queue.splice(i, 1);
            finish();
            resolve(m);
          } else if (this.closeInfo) {
            finish();
            reject(new Error(`socket closed (${this.closeInfo.code}) before ${what} arrived; received: ${this.dump()}`));
          }
        },
      };
      const finish = () => { clearTimeout(timer); this.waiters.splice(this.waiters.indexOf(w), 1); };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`no ${what} within ${timeout} ms; received: ${this.dump()}`));
      }, timeout);
      this.waiters.push(w);
      w.check();
    });
  }

  /** The next message that answers `ref`. */
  reply(ref, timeout = 2000) {
    return this.next((m) => m.event === 'phx_reply' && m.ref === ref, timeout, `a reply to ref ${ref}`);
  }

  /** The next message on `topic` with `event`. */
  event(topic, event, timeout = 2000) {
    return this.next((m) => m.topic === topic && m.event === event, timeout, `"${event}" on ${topic}`);
  }

  /** Resolves if no message matching `pred` arrives within `ms`; rejects otherwise. */
  async expectNone(pred, ms = 300, what = 'message') {
    await delay(ms);
    const hit = this.queue.find(pred);
    if (hit) throw new Error(`unexpected ${what}: ${JSON.stringify(hit.frame ?? hit)}`);
  }

  /** Removes and returns everything queued so far. */
  drain() {
    return this.queue.splice(0, this.queue.length);
  }

  /** Joins (V2 frame) and resolves with the reply message. */
  async join(topic, payload = {}, joinRef = '1') {
    this.send([joinRef, joinRef, topic, 'phx_join', payload]);
    return this.reply(joinRef);
  }

  /** Resolves `{code, reason}` once closed; rejects after `timeout` ms. */
  async waitClosed(timeout = 3000) {
    const r = await within(this.closed, timeout, '', { onTimeout: null });
    if (!r) throw new Error(`socket still open after ${timeout} ms`);
    return r;
  }

  dump() {
    return JSON.stringify(this.all.map((m) => (m.binary ? { ...m, payload: `<${m.payload?.length} bytes>` } : m.frame ?? m.text))).slice(0, 1500);
  }

  close() {
    openClients.delete(this);
    if (this.closeInfo) return Promise.resolve();
    this.ws.terminate();
    return within(this.closed, 500, '', { onTimeout: null }).then(() => {});
  }
}

// ---------------------------------------------------------------------------
// Raw TCP
// ---------------------------------------------------------------------------

/**
 * Opens a plain TCP connection; resolves with `{sock, data(), closed, close()}` once connected.
 * `closed` resolves when the server closed (end or reset) the connection.
 */
export async function rawTcp(port) {
  const sock = net.connect(port, '127.0.0.1');
  const chunks = [];
  let closedFlag = false;
  const client = {
    sock,
    data: () => Buffer.concat(chunks),
    closed: null,
    isClosed: () => closedFlag,
    close: async () => { openClients.delete(client); sock.destroy(); },
  };
  client.closed = new Promise((resolve) => {
    const done = (how) => { if (!closedFlag) { closedFlag = true; resolve(how); } };
    sock.on('end', () => done('end'));
    sock.on('close', () => done('close'));
    sock.on('error', (e) => done(`error ${e.code}`));
  });
  sock.on('data', (d) => chunks.push(d));
  openClients.add(client);
  await new Promise((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  return client;
}

/** Bystanders of a bad-input test: a phoenix client and a raw V2 client joined to `topic`. */
export async function bystanders(server, topic) {
  const phx = await connect(server.port, 'by1');
  const chan = await phx.joined(topic);
  const raw = await rawConnect(server.port, { userId: 'by2' });
  await raw.join(topic);
  return { phx, chan, raw };
}

/**
 * The bystanders were never disconnected, still get replies and broadcasts, and a fresh
 * connection is still served. Closes them afterwards, before the test stops its server
 * (which would disconnect them with 1001).
 */
export async function assertUnharmed(server, { phx, chan, raw }, topic) {
  assertAlive(server);
  assert.deepEqual(phx.closes, [], 'the bystander phoenix client was never disconnected');
  assert.equal(raw.closeInfo, null, 'the bystander raw client was never disconnected');
  assert.deepEqual(await push(chan, 'ping', { still: 'fine' }), { status: 'ok', response: { still: 'fine' } });
  const got = nextEvent(chan, 'new_msg');
  chan.push('new_msg', { body: 'after' });
  assert.deepEqual(await got, { body: 'after', user: 'by1' });
  assert.deepEqual((await raw.event(topic, 'new_msg')).payload, { body: 'after', user: 'by1' });
  const fresh = await rawConnect(server.port, { userId: 'fresh' });
  fresh.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
  assert.deepEqual((await fresh.reply('hb')).payload, { status: 'ok', response: {} });
  await fresh.close();
  await phx.close();
  await raw.close();
}

// ---------------------------------------------------------------------------
// redis-server
// ---------------------------------------------------------------------------

/**
 * Starts redis-server on `port` (0: no plain port, with `--tls-port` in `args`) with the
 * extra `args`, in `cwd` (cluster mode writes its nodes file there), and resolves once
 * it accepts connections.
 */
export function startRedis(port, { args = [], cwd } = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn('redis-server', [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...args,
    ], { stdio: ['ignore', 'pipe', 'pipe'], cwd });
    const chunks = [];
    const r = { port, proc, exited: null, log: () => chunks.join('') };
    r.exitPromise = new Promise((res) => proc.on('exit', (code, signal) => {
      r.exited = signal ? `signal ${signal}` : `code ${code}`;
      res();
    }));
    let done = false;
    const finish = (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (err) reject(err); else resolve(r);
    };
    const timer = setTimeout(() => { proc.kill('SIGKILL'); finish(new Error(`redis-server did not get ready within 5 s:\n${r.log()}`)); }, 5000);
    proc.on('error', (err) => finish(err.code === 'ENOENT'
      ? new Error('redis-server is not installed (not on PATH): the cluster tests need a real Redis. '
        + 'Install it (apt-get install -y redis-server; scripts/test.sh does so) and run again.')
      : new Error(`cannot start redis-server: ${err.message}`)));
    proc.on('exit', () => finish(new Error(`redis-server exited (${r.exited}) before it was ready:\n${r.log()}`)));
    const onData = (buf) => {
      chunks.push(buf.toString('utf8'));
      if (r.log().includes('Ready to accept connections')) finish();
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
  });
}

/** Runs redis-cli with `args` against 127.0.0.1:`port`; resolves with its stdout. */
export function redisCli(port, args, { timeout = 20000 } = {}) {
  return new Promise((resolve, reject) => {
    execFile('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], { timeout }, (err, stdout, stderr) => {
      if (err) reject(new Error(`redis-cli -p ${port} ${args.join(' ')}: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/**
 * Starts a real Redis Cluster on free loopback ports: `masters` redis-servers with
 * `--cluster-enabled yes`, each with `replicas` replicas, joined by `redis-cli --cluster
 * create`; resolves once every node says `cluster_state:ok`. Returns `{ nodes, urls(),
 * masters(), kill(port), stop() }`; `nodes` are startRedis results, each in its own
 * directory (its nodes file).
 */
export async function startRedisCluster({ masters = 3, replicas = 1, nodeTimeoutMs = 1000 } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ringcast-redis-cluster-'));
  const nodes = [];
  const stop = async () => {
    for (const n of nodes) {
      if (!n.exited) { n.proc.kill('SIGKILL'); await n.exitPromise; }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    for (let i = 0; i < masters * (1 + replicas); i++) {
      const port = await freePort();
      const cwd = path.join(dir, String(port));
      fs.mkdirSync(cwd);
      nodes.push(await startRedis(port, {
        cwd,
        args: ['--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
          '--cluster-node-timeout', String(nodeTimeoutMs),
          // A replica always tries to take over from its failed master (tests kill
          // masters moments after the cluster formed).
          '--cluster-replica-validity-factor', '0'],
      }));
    }
    await redisCli(nodes[0].port, ['--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`),
      '--cluster-replicas', String(replicas), '--cluster-yes']);
    await waitFor(async () => {
      const infos = await Promise.all(nodes.map((n) => redisCli(n.port, ['CLUSTER', 'INFO']).catch(() => '')));
      return infos.every((i) => i.includes('cluster_state:ok'));
    }, { timeout: 20000, interval: 200, what: 'every Redis Cluster node to say cluster_state:ok' });
    // Every replica in sync with its master, so that a failover can happen at once.
    await waitFor(async () => {
      const infos = await Promise.all(nodes.map((n) => redisCli(n.port, ['INFO', 'replication']).catch(() => '')));
      const replicasUp = infos.filter((i) => i.includes('role:slave') && i.includes('master_link_status:up')).length;
      return replicasUp === masters * replicas;
    }, { timeout: 20000, interval: 200, what: 'every Redis Cluster replica to be in sync with its master' });
  } catch (err) {
    await stop();
    throw err;
  }
  const alive = () => nodes.filter((n) => !n.exited);
  return {
    nodes,
    urls: () => alive().map((n) => `redis://127.0.0.1:${n.port}`),
    /** The ports of the nodes that are masters now. */
    masters: async () => {
      const roles = await Promise.all(alive().map(async (n) => [n.port, await redisCli(n.port, ['ROLE']).catch(() => '')]));
      return roles.filter(([, r]) => r.startsWith('master')).map(([p]) => p);
    },
    kill: async (port) => {
      const n = nodes.find((x) => x.port === port);
      n.proc.kill('SIGKILL');
      await n.exitPromise;
    },
    stop,
  };
}
