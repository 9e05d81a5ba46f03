// Plain-HTTP helpers for the long-poll, server-API and browser tests: one request over
// node:http (a fresh TCP connection each unless an agent is given), the raw long-poll
// protocol (PROTOCOL.md §12), a phoenix client on the LongPoll transport, and a strict
// Prometheus text-format parser.

import http from 'node:http';
import { Socket, LongPoll, Presence } from 'phoenix';
import { PhxClient, mintToken, within } from './lib.mjs';

export { LongPoll, Presence };

export const API_KEY = 'test-api-key';

/**
 * One HTTP request to 127.0.0.1:`port`. Without `agent` it goes over a fresh TCP
 * connection that is closed after the answer (`connection: close`), so consecutive
 * requests land on whatever core the kernel picks. Resolves
 * `{status, headers, text, json}` (`json` undefined when the body is not JSON).
 */
export function request(port, { method = 'GET', path = '/', headers = {}, body, agent, timeout = 15000 } = {}) {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(typeof body === 'string' ? body : JSON.stringify(body));
    const hdrs = { ...headers };
    if (data !== undefined) hdrs['content-length'] = String(data.length);
    if (!agent) hdrs.connection = 'close';
    const req = http.request({ host: '127.0.0.1', port, method, path, headers: hdrs, agent: agent ?? false }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks).toString('utf8');
        let json;
        try { json = JSON.parse(text); } catch { json = undefined; }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
      res.on('error', (e) => { clearTimeout(timer); reject(e); });
    });
    const timer = setTimeout(() => req.destroy(new Error(`no answer to ${method} ${path} within ${timeout} ms`)), timeout);
    req.on('error', (e) => { clearTimeout(timer); reject(e); });
    if (data !== undefined) req.write(data);
    req.end();
  });
}

// ---------------------------------------------------------------------------
// Raw long-poll
// ---------------------------------------------------------------------------

/** The long-poll path as the npm client builds it: auth token, vsn, then the session token. */
export function lpPath({ auth, session, vsn = '2.0.0' } = {}) {
  const qs = [];
  if (auth !== undefined && auth !== null) qs.push(`token=${encodeURIComponent(auth)}`);
  if (vsn !== null) qs.push(`vsn=${vsn}`);
  return `/socket/longpoll?${qs.join('&')}&${session ? `token=${encodeURIComponent(session)}` : ''}`;
}

/**
 * A long-poll session spoken by hand. `open()` asserts the 410 + token answer;
 * `post(lines)` sends ndjson; `poll()` one GET; `until(pred)` polls until a decoded
 * message matching `pred` arrived (collecting everything into `received`).
 */
export class RawLongPoll {
  constructor(port, userId, { auth, agent } = {}) {
    this.port = port;
    this.userId = String(userId);
    this.auth = auth ?? mintToken(userId);
    this.agent = agent;
    this.session = null;
    this.received = [];
    this.queue = [];
    this.polls = [];
  }

  get core() { return this.session && this.session.split('.')[0]; }

  async open() {
    const res = await request(this.port, { path: lpPath({ auth: this.auth }), agent: this.agent, headers: { accept: 'application/json' } });
    if (res.status !== 200 || !res.json || res.json.status !== 410 || typeof res.json.token !== 'string') {
      throw new Error(`long-poll open as ${this.userId}: expected HTTP 200 {"status":410,"token":...}, got ${res.status} ${res.text}`);
    }
    if (!/^\d+\.[0-9a-f]+$/.test(res.json.token)) throw new Error(`session token is not <core>.<hex>: ${res.json.token}`);
    this.session = res.json.token;
    return this;
  }

  /** POSTs `lines` (arrays are JSON-encoded) as one ndjson body; resolves the HTTP answer. */
  post(lines, { contentType = 'application/x-ndjson', session = this.session, agent = this.agent } = {}) {
    const body = lines.map((l) => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n');
    return request(this.port, {
      method: 'POST',
      path: lpPath({ auth: this.auth, session }),
      headers: { 'content-type': contentType, accept: 'application/json' },
      body,
      agent,
    });
  }

  /** One poll; resolves the HTTP answer and queues its decoded messages. */
  async poll({ agent = this.agent, timeout = 15000 } = {}) {
    const res = await request(this.port, { path: lpPath({ auth: this.auth, session: this.session }), agent, timeout, headers: { accept: 'application/json' } });
    this.polls.push(res.json);
    if (res.json && res.json.status === 200) {
      for (const text of res.json.messages) {
        if (typeof text !== 'string') throw new Error(`poll message is not a string: ${JSON.stringify(text)}`);
        const [join_ref, ref, topic, event, payload] = JSON.parse(text);
        const msg = { join_ref, ref, topic, event, payload };
        this.received.push(msg);
        this.queue.push(msg);
      }
    }
    return res;
  }

  /** Polls until a queued message matches `pred`; removes and returns it. */
  async until(pred, { what = 'message', maxPolls = 10, agent } = {}) {
    for (let i = 0; ; i++) {
      const k = this.queue.findIndex(pred);
      if (k >= 0) return this.queue.splice(k, 1)[0];
      if (i >= maxPolls) throw new Error(`no ${what} after ${maxPolls} polls; received ${JSON.stringify(this.received).slice(0, 1500)}`);
      const res = await this.poll({ agent });
      if (res.status !== 200 || !res.json || ![200, 204].includes(res.json.status)) {
        throw new Error(`poll while waiting for ${what}: HTTP ${res.status} ${res.text}`);
      }
      if (res.json.token !== this.session) throw new Error(`poll answered token ${res.json.token}, session is ${this.session}`);
    }
  }

  /** The reply to `ref` (polled for). */
  reply(ref, opts = {}) {
    return this.until((m) => m.event === 'phx_reply' && m.ref === ref, { what: `reply to ref ${ref}`, ...opts });
  }

  /** Joins `topic` (POST + polls for the reply); resolves the reply payload. */
  async join(topic, payload = {}, ref = 'j1') {
    const res = await this.post([[ref, ref, topic, 'phx_join', payload]]);
    if (res.status !== 200 || res.json?.status !== 200) throw new Error(`POST join: HTTP ${res.status} ${res.text}`);
    return (await this.reply(ref)).payload;
  }
}

// ---------------------------------------------------------------------------
// The phoenix client over LongPoll
// ---------------------------------------------------------------------------

const lpClients = new Set();

/** A phoenix client on the LongPoll transport; `opens` counts its opens, `errors` its errors. */
export class LpClient extends PhxClient {
  constructor(userId) {
    super(userId);
    this.opens = 0;
    this.errors = [];
  }

  /** The current session token (`<core>.<hex>`), once open. */
  get session() { return this.socket?.conn?.token ?? null; }

  close() {
    lpClients.delete(this);
    for (const chan of this.channels) {
      chan.rejoinTimer.reset();
      chan.joinPush.cancelTimeout();
    }
    for (const p of this.pushes) p.cancelTimeout();
    if (this.socket) this.socket.disconnect();
    return Promise.resolve();
  }
}

/** Closes every long-poll phoenix client still open (call it in `afterEach`). */
export async function closeLpClients() {
  const all = [...lpClients];
  lpClients.clear();
  await Promise.all(all.map((c) => c.close()));
}

/**
 * Connects the phoenix `Socket` with `transport: LongPoll` to `httpUrl/socket` as `userId`.
 * `waitOpen: false` returns right away (for refused tokens).
 */
export async function lpConnect(httpUrl, userId, { token, timeout = 3000, waitOpen = true, socketOpts = {} } = {}) {
  const client = new LpClient(userId);
  const socket = new Socket(`${httpUrl}/socket`, {
    transport: LongPoll,
    params: { token: token ?? mintToken(userId) },
    reconnectAfterMs: () => 200,
    ...socketOpts,
  });
  client.socket = socket;
  socket.onMessage((msg) => client.messages.push(msg));
  socket.onClose((event) => client.closes.push({ code: event.code, reason: event.reason }));
  socket.onOpen(() => { client.opens += 1; client.opened = true; });
  socket.onError((e) => client.errors.push(e));
  lpClients.add(client);
  const opened = new Promise((resolve) => {
    const ref = socket.onOpen(() => { socket.off([ref]); resolve(); });
  });
  socket.connect();
  if (waitOpen) await within(opened, timeout, `long-poll socket of ${userId} did not open`);
  return client;
}

/** The keys of a `Presence` list, sorted. */
export function presenceKeys(presence) {
  return presence.list((id) => id).sort();
}

// ---------------------------------------------------------------------------
// Server API
// ---------------------------------------------------------------------------

/** POST /api/broadcast with `key` (null: no authorization header). */
export function apiBroadcast(port, body, { key = API_KEY, headers = {} } = {}) {
  const h = { 'content-type': 'application/json', ...headers };
  if (key !== null) h.authorization = `Bearer ${key}`;
  return request(port, { method: 'POST', path: '/api/broadcast', headers: h, body });
}

export function apiStats(port, { key = API_KEY } = {}) {
  const h = {};
  if (key !== null) h.authorization = `Bearer ${key}`;
  return request(port, { path: '/api/stats', headers: h });
}

// ---------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * Parses Prometheus text exposition format (0.0.4) strictly: every line is a
 * `# HELP name text`, `# TYPE name type`, other comment, blank, or
 * `name{label="value",...} value [timestamp]`. Every sample's family must have had its
 * HELP and TYPE lines first, HELP/TYPE appear at most once per family, and a family's
 * samples are contiguous. Throws on anything else. Returns
 * `{families: Map(name → {help, type, samples: [{name, labels, value}]})}` and
 * `value(name, labels)` / `sum(name)`.
 */
export function parsePrometheus(text) {
  if (!text.endsWith('\n')) throw new Error('metrics text does not end with a newline');
  const families = new Map();
  const family = (name) => {
    if (!families.has(name)) families.set(name, { name, help: undefined, type: undefined, samples: [] });
    return families.get(name);
  };
  const closed = new Set();
  let current = null;
  const lines = text.slice(0, -1).split('\n');
  lines.forEach((line, i) => {
    const where = `metrics line ${i + 1} ${JSON.stringify(line)}`;
    if (line === '') return;
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (!m) {
        if (/^# ?(HELP|TYPE)\b/.test(line)) throw new Error(`malformed ${where}`);
        return; // plain comment
      }
      const [, kind, name, rest = ''] = m;
      if (!METRIC_NAME.test(name)) throw new Error(`bad metric name in ${where}`);
      const f = family(name);
      if (f.samples.length > 0) throw new Error(`${kind} after samples of ${name}: ${where}`);
      if (kind === 'HELP') {
        if (f.help !== undefined) throw new Error(`second HELP for ${name}: ${where}`);
        f.help = rest;
      } else {
        if (f.type !== undefined) throw new Error(`second TYPE for ${name}: ${where}`);
        if (!TYPES.has(rest)) throw new Error(`unknown type in ${where}`);
        f.type = rest;
      }
      return;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([^ ]+)(?: (-?\d+))?$/.exec(line);
    if (!m) throw new Error(`malformed sample ${where}`);
    const [, name, rawLabels, rawValue] = m;
    const labels = {};
    if (rawLabels) {
      const inner = rawLabels.slice(1, -1);
      const re = /([^=,\s]+)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/gy;
      let pos = 0;
      while (pos < inner.length) {
        re.lastIndex = pos;
        const lm = re.exec(inner);
        if (!lm) throw new Error(`malformed labels in ${where}`);
        const [, ln, lv] = lm;
        if (!LABEL_NAME.test(ln)) throw new Error(`bad label name ${ln} in ${where}`);
        if (ln in labels) throw new Error(`duplicate label ${ln} in ${where}`);
        labels[ln] = lv.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
        pos = re.lastIndex;
        if (lm[3] === '' && pos < inner.length) throw new Error(`malformed labels in ${where}`);
      }
    }
    let value;
    if (/^[+-]?Inf$/.test(rawValue)) value = rawValue.startsWith('-') ? -Infinity : Infinity;
    else if (rawValue === 'NaN') value = NaN;
    else if (/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(rawValue)) value = Number(rawValue);
    else throw new Error(`bad value in ${where}`);
    // histogram/summary children belong to their base family
    const base = [...families.keys()].find((k) => name === k || (
      ['histogram', 'summary'].includes(families.get(k).type) && ['_bucket', '_sum', '_count'].some((s) => name === k + s)));
    if (base === undefined) throw new Error(`sample without HELP/TYPE: ${where}`);
    const f = families.get(base);
    if (f.help === undefined || f.type === undefined) throw new Error(`sample of ${base} before its HELP and TYPE: ${where}`);
    if (current !== base) {
      if (closed.has(base)) throw new Error(`samples of ${base} are not contiguous: ${where}`);
      if (current !== null) closed.add(current);
      current = base;
    }
    const key = JSON.stringify([name, Object.entries(labels).sort()]);
    if (f.samples.some((s) => JSON.stringify([s.name, Object.entries(s.labels).sort()]) === key)) {
      throw new Error(`duplicate series in ${where}`);
    }
    if (f.type === 'counter' && !(value >= 0)) throw new Error(`negative or NaN counter in ${where}`);
    f.samples.push({ name, labels, value });
  });
  return {
    families,
    value(name, labels = {}) {
      const f = families.get(name);
      const s = f && f.samples.find((x) => Object.entries(labels).every(([k, v]) => x.labels[k] === v));
      return s ? s.value : undefined;
    },
    sum(name) {
      const f = families.get(name);
      if (!f) throw new Error(`no metric ${name}`);
      return f.samples.reduce((a, s) => a + s.value, 0);
    },
  };
}
