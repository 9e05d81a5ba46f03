// permessage-deflate (RFC 7692, seed-app.md "Compression"): negotiation, broadcasts
// compressed once and shared byte for byte, the size threshold, presence_state
// compressed per connection, inflating what clients send (resetting or keeping their
// context), the deflate bomb, and `--compress off`.
//
// The unmodified phoenix client runs over `ws` with perMessageDeflate on (ws offers it by
// default). A hand-written client over raw TCP (`DeflateWire`) sees what ws hides: the
// RSV1 bit of each frame and its bytes on the wire.

import assert from 'node:assert/strict';
import net from 'node:net';
import crypto from 'node:crypto';
import zlib from 'node:zlib';
import {
  e2e, startServer, connect, rawConnect, mintToken, nextEvent, push, bystanders, assertUnharmed,
} from './lib.mjs';

const TRAILER = Buffer.from([0x00, 0x00, 0xff, 0xff]);
const OFFER = 'permessage-deflate; client_max_window_bits';

/** A WebSocket client over raw TCP that offers `permessage-deflate` and records frames. */
class DeflateWire {
  static async open(port, { userId = 'wire', offer = OFFER } = {}) {
    const wire = new DeflateWire();
    const sock = net.connect(port, '127.0.0.1');
    wire.sock = sock;
    await new Promise((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
    const key = crypto.randomBytes(16).toString('base64');
    const qs = new URLSearchParams({ token: mintToken(userId), vsn: '2.0.0' });
    sock.write(`GET /socket/websocket?${qs} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\n`
      + `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n`
      + (offer ? `Sec-WebSocket-Extensions: ${offer}\r\n` : '') + '\r\n');
    let buf = Buffer.alloc(0);
    wire.frames = [];
    wire.waiters = [];
    wire.closed = false;
    const head = new Promise((resolve, reject) => {
      sock.on('data', (d) => {
        buf = Buffer.concat([buf, d]);
        if (!wire.headers) {
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
          wire.status = Number(lines[0].split(' ')[1]);
          wire.headers = Object.fromEntries(lines.slice(1).map((l) => {
            const i = l.indexOf(':');
            return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()];
          }));
          buf = buf.subarray(end + 4);
          resolve();
        }
        buf = wire.parse(buf);
      });
      sock.on('close', () => { wire.closed = true; wire.check(); });
      sock.on('error', reject);
    });
    await head;
    assert.equal(wire.status, 101);
    return wire;
  }

  /** Consumes every complete server frame at the front of `buf`; returns the rest. */
  parse(buf) {
    for (;;) {
      if (buf.length < 2) return buf;
      let len = buf[1] & 0x7f;
      let at = 2;
      if (len === 126) { if (buf.length < 4) return buf; len = buf.readUInt16BE(2); at = 4; }
      else if (len === 127) { if (buf.length < 10) return buf; len = Number(buf.readBigUInt64BE(2)); at = 10; }
      if (buf.length < at + len) return buf;
      const frame = {
        fin: (buf[0] & 0x80) !== 0,
        rsv1: (buf[0] & 0x40) !== 0,
        opcode: buf[0] & 0x0f,
        wire: Buffer.from(buf.subarray(0, at + len)),
        payload: Buffer.from(buf.subarray(at, at + len)),
      };
      if (frame.opcode === 1 || frame.opcode === 2) {
        const data = frame.rsv1
          ? zlib.inflateRawSync(Buffer.concat([frame.payload, TRAILER]), { finishFlush: zlib.constants.Z_SYNC_FLUSH })
          : frame.payload;
        frame.text = data.toString('utf8');
        try { frame.msg = JSON.parse(frame.text); } catch { frame.msg = null; }
      } else if (frame.opcode === 8) {
        frame.code = frame.payload.length >= 2 ? frame.payload.readUInt16BE(0) : null;
      }
      this.frames.push(frame);
      buf = buf.subarray(at + len);
      this.check();
    }
  }

  check() { for (const w of [...this.waiters]) w(); }

  /** Resolves with the first recorded frame for which `pred(frame)` holds. */
  next(pred, timeout = 3000, what = 'a frame') {
    return new Promise((resolve, reject) => {
      const w = () => {
        const f = this.frames.find(pred);
        if (f) { done(); resolve(f); } else if (this.closed) { done(); reject(new Error(`closed before ${what}`)); }
      };
      const done = () => { clearTimeout(timer); this.waiters.splice(this.waiters.indexOf(w), 1); };
      const timer = setTimeout(() => { done(); reject(new Error(`no ${what} within ${timeout} ms`)); }, timeout);
      this.waiters.push(w);
      w();
    });
  }

  /** The data frame of `event` on `topic` (optionally one whose payload satisfies `where`). */
  event(topic, event, where = () => true, timeout) {
    return this.next((f) => f.msg && f.msg[2] === topic && f.msg[3] === event && where(f.msg[4]), timeout, `${event} on ${topic}`);
  }

  /** Sends a masked frame: `data` as is (`rsv1` false) or already deflated (`rsv1` true). */
  sendFrame(data, { rsv1 = false, opcode = 1 } = {}) {
    const mask = crypto.randomBytes(4);
    const len = data.length;
    const head = len < 126 ? Buffer.from([0, 0x80 | len])
      : len < 65536 ? Buffer.from([0, 0x80 | 126, len >> 8, len & 0xff])
        : Buffer.concat([Buffer.from([0, 0x80 | 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(len)); return b; })()]);
    head[0] = 0x80 | (rsv1 ? 0x40 : 0) | opcode;
    const body = Buffer.from(data);
    for (let i = 0; i < body.length; i++) body[i] ^= mask[i & 3];
    this.sock.write(Buffer.concat([head, mask, body]));
  }

  /** Sends `value` as JSON, compressed on its own (a client that resets its context). */
  sendDeflated(value) {
    const raw = zlib.deflateRawSync(Buffer.from(JSON.stringify(value)), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
    assert.ok(raw.subarray(-4).equals(TRAILER));
    this.sendFrame(raw.subarray(0, -4), { rsv1: true });
  }

  send(value) { this.sendFrame(Buffer.from(JSON.stringify(value))); }

  async join(topic, payload = {}, ref = 'j1') {
    this.send([ref, ref, topic, 'phx_join', payload]);
    return this.next((f) => f.msg && f.msg[1] === ref && f.msg[3] === 'phx_reply', 3000, `reply ${ref}`);
  }

  close() { this.sock.destroy(); }
}

/** A client compressor that keeps its context across messages, as browsers do unless asked. */
function contextDeflater() {
  const d = zlib.createDeflateRaw();
  const chunks = [];
  d.on('data', (c) => chunks.push(c));
  return (value) => new Promise((resolve) => {
    d.write(Buffer.from(JSON.stringify(value)));
    d.flush(zlib.constants.Z_SYNC_FLUSH, () => {
      const out = Buffer.concat(chunks.splice(0));
      assert.ok(out.subarray(-4).equals(TRAILER));
      resolve(out.subarray(0, -4));
    });
  });
}

const bigBody = (n, seed = 'x') => Array.from({ length: n }, (_, i) => `${seed}${i % 97} `).join('').slice(0, n);

e2e('negotiation: the answer is server_no_context_takeover plus client_no_context_takeover; the phoenix client over ws gets every message intact, big and small', async () => {
  const server = await startServer({ cores: 2 });
  try {
    const wire = await DeflateWire.open(server.port);
    assert.equal(wire.headers['sec-websocket-extensions'],
      'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
    wire.close();

    const a = await connect(server.port, 'alice');
    assert.equal(a.socket.conn.extensions, 'permessage-deflate');
    assert.equal(a.upgradeHeaders['sec-websocket-extensions'],
      'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
    const b = await connect(server.port, 'bob');
    const ca = await a.joined('rooms:zip');
    const cb = await b.joined('rooms:zip');
    for (const size of [10, 1023, 1024, 4096, 8000]) {
      const body = bigBody(size, `s${size}-`);
      const got = [nextEvent(ca, 'new_msg'), nextEvent(cb, 'new_msg')];
      ca.push('new_msg', { body });
      for (const m of await Promise.all(got)) assert.deepEqual(m, { body, user: 'alice' });
    }
    // Client to server, compressed by ws (its own threshold is 1 KiB): a big ping.
    const payload = { blob: bigBody(6000, 'p') };
    assert.deepEqual(await push(cb, 'ping', payload), { status: 'ok', response: payload });
    const metrics = await (await fetch(`${server.httpUrl}/metrics`)).text();
    const open = [...metrics.matchAll(/^ringcast_deflate_connections\{core="\d"\} (\d+)$/gm)].reduce((s, m) => s + Number(m[1]), 0);
    assert.equal(open, 2, 'both phoenix clients negotiated compression');
    await a.close();
    await b.close();
  } finally {
    await server.stop();
  }
});

e2e('a big broadcast arrives with RSV1, a small one without; two subscribers on two cores get byte-identical compressed frames', async () => {
  const server = await startServer({ cores: 2 });
  try {
    const wires = [];
    // Enough connections that both cores have some (connections are spread by the kernel).
    for (let i = 0; i < 6; i++) {
      const w = await DeflateWire.open(server.port, { userId: `w${i}` });
      w.core = w.headers['x-ringcast-core'];
      await w.join('rooms:same');
      wires.push(w);
    }
    const cores = new Set(wires.map((w) => w.core));
    const sender = await rawConnect(server.port, { userId: 'sender' });
    await sender.join('rooms:same');
    const big = bigBody(4096, 'big-');
    sender.send([null, null, 'rooms:same', 'new_msg', { body: big }]);
    const frames = await Promise.all(wires.map((w) => w.event('rooms:same', 'new_msg', (p) => p.body === big)));
    for (const f of frames) {
      assert.equal(f.rsv1, true, 'a 4 KiB broadcast is compressed');
      assert.ok(f.wire.length < big.length / 2, `${f.wire.length} bytes on the wire for a ${big.length}-byte body`);
      assert.deepEqual(f.msg[4], { body: big, user: 'sender' });
    }
    for (const f of frames.slice(1)) assert.ok(f.wire.equals(frames[0].wire), 'every subscriber gets the same bytes');
    if (cores.size < 2) console.log('# note: every wire landed on one core');

    sender.send([null, null, 'rooms:same', 'new_msg', { body: 'tiny' }]);
    const small = await Promise.all(wires.map((w) => w.event('rooms:same', 'new_msg', (p) => p.body === 'tiny')));
    for (const f of small) assert.equal(f.rsv1, false, 'a message under 1 KiB goes uncompressed');
    // Compressed once per core, not once per subscriber.
    const metrics = await (await fetch(`${server.httpUrl}/metrics`)).text();
    const made = [...metrics.matchAll(/^ringcast_deflate_broadcasts_total\{core="\d"\} (\d+)$/gm)].reduce((s, m) => s + Number(m[1]), 0);
    assert.ok(made >= 1 && made <= cores.size, `${made} compressions for one broadcast on ${cores.size} core(s)`);
    for (const w of wires) w.close();
    await sender.close();
  } finally {
    await server.stop();
  }
});

e2e('--compress-threshold: a 200-byte broadcast goes compressed under a 64-byte threshold', async () => {
  const server = await startServer({ args: ['--compress-threshold', '64'] });
  try {
    const w = await DeflateWire.open(server.port);
    await w.join('rooms:t');
    const body = bigBody(200, 'tt');
    w.send([null, null, 'rooms:t', 'new_msg', { body }]);
    const f = await w.event('rooms:t', 'new_msg', (p) => p.body === body);
    assert.equal(f.rsv1, true);
    w.close();
  } finally {
    await server.stop();
  }
});

e2e('a big presence_state is compressed for its joiner, and a resetting client\'s compressed messages are understood', async () => {
  const server = await startServer({ cores: 2 });
  try {
    const members = [];
    for (let i = 0; i < 120; i++) {
      const m = await rawConnect(server.port, { userId: `member${i}` });
      await m.join('rooms:crowd', { name: `member number ${i} `.repeat(8).slice(0, 200) });
      members.push(m);
    }
    const w = await DeflateWire.open(server.port, { userId: 'late' });
    await w.join('rooms:crowd');
    const state = await w.event('rooms:crowd', 'presence_state', () => true, 5000);
    assert.equal(Object.keys(state.msg[4]).length, 120);
    assert.equal(state.rsv1, true);
    assert.ok(state.wire.length * 4 < state.text.length, `${state.wire.length} bytes on the wire for ${state.text.length}`);
    // What the client sends compressed (context reset per message) is read.
    w.sendDeflated(['j1', 'p1', 'rooms:crowd', 'ping', { echo: bigBody(3000, 'e') }]);
    const reply = await w.next((f) => f.msg && f.msg[1] === 'p1');
    assert.deepEqual(reply.msg[4], { status: 'ok', response: { echo: bigBody(3000, 'e') } });
    w.close();
    for (const m of members) await m.close();
  } finally {
    await server.stop();
  }
});

e2e('--compress-client-context keep: a client that keeps its compression context across messages is understood; ws keeps its context there', async () => {
  const server = await startServer({ args: ['--compress-client-context', 'keep'] });
  try {
    const w = await DeflateWire.open(server.port);
    assert.equal(w.headers['sec-websocket-extensions'], 'permessage-deflate; server_no_context_takeover');
    await w.join('rooms:ctx');
    const deflate = contextDeflater();
    const sizes = [];
    for (let i = 0; i < 5; i++) {
      const msg = ['j1', `c${i}`, 'rooms:ctx', 'ping', { n: i, text: 'the same sentence again and again '.repeat(20) }];
      const data = await deflate(msg);
      sizes.push(data.length);
      w.sendFrame(data, { rsv1: true });
      const reply = await w.next((f) => f.msg && f.msg[1] === `c${i}`);
      assert.deepEqual(reply.msg[4].response, msg[4]);
    }
    assert.ok(sizes[1] < sizes[0] / 2, `later messages refer back to earlier ones: ${sizes}`);
    w.close();
    // The phoenix client over ws, which keeps its context unless told otherwise.
    const phx = await connect(server.port, 'carol');
    assert.equal(phx.upgradeHeaders['sec-websocket-extensions'], 'permessage-deflate; server_no_context_takeover');
    const chan = await phx.joined('rooms:ctx');
    for (let i = 0; i < 4; i++) {
      const payload = { i, blob: 'repeat me please '.repeat(200) };
      assert.deepEqual(await push(chan, 'ping', payload), { status: 'ok', response: payload });
    }
    await phx.close();
  } finally {
    await server.stop();
  }
});

e2e('a deflate bomb closes its sender with 1009 after at most --max-frame inflated; bystanders on the topic are unharmed', async () => {
  const server = await startServer({ cores: 2, args: ['--max-frame', '64KiB'] });
  try {
    const by = await bystanders(server, 'rooms:bomb');
    const w = await DeflateWire.open(server.port, { userId: 'bomber' });
    await w.join('rooms:bomb');
    // 32 MiB of one byte deflate to about 32 KiB: under --max-frame compressed.
    const bomb = zlib.deflateRawSync(Buffer.alloc(32 << 20, 0x20), { finishFlush: zlib.constants.Z_SYNC_FLUSH }).subarray(0, -4);
    assert.ok(bomb.length < 64 << 10, `${bomb.length} bytes`);
    w.sendFrame(bomb, { rsv1: true });
    const close = await w.next((f) => f.opcode === 8, 3000, 'a close frame');
    assert.equal(close.code, 1009);
    // A compressed frame without the extension negotiated is refused (reserved bit set).
    const plain = await DeflateWire.open(server.port, { userId: 'noext', offer: null });
    assert.equal(plain.headers['sec-websocket-extensions'], undefined);
    plain.sendDeflated(['1', '1', 'rooms:bomb', 'phx_join', {}]);
    assert.equal((await plain.next((f) => f.opcode === 8, 3000, 'a close frame')).code, 1007);
    plain.close();
    w.close();
    await assertUnharmed(server, by, 'rooms:bomb');
  } finally {
    await server.stop();
  }
});

e2e('--compress off declines every offer: no extension in the answer, nothing compressed', async () => {
  const server = await startServer({ args: ['--compress', 'off'] });
  try {
    const w = await DeflateWire.open(server.port);
    assert.equal(w.headers['sec-websocket-extensions'], undefined);
    await w.join('rooms:off');
    const body = bigBody(4096);
    w.send([null, null, 'rooms:off', 'new_msg', { body }]);
    assert.equal((await w.event('rooms:off', 'new_msg')).rsv1, false);
    w.close();
    const phx = await connect(server.port, 'dave');
    assert.equal(phx.socket.conn.extensions, '');
    await phx.close();
  } finally {
    await server.stop();
  }
});
