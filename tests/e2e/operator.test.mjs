// The operator's settings and logs (issue 18): `--config` (TOML, the flags' long names
// with underscores), RINGCAST_* over the file and flags over both, `ringcast config
// check`, clear errors for unknown keys and bad values, `--log-format json`, the
// connection lifecycle at debug, the summary line, and no token, API key or secret in
// any log line of a run that uses them all.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  e2e, startServer, connect, mintToken, runCli, waitFor, sleep, SECRET, REPO_ROOT,
} from './lib.mjs';
import { apiBroadcast, lpConnect, closeLpClients } from './httplib.mjs';


const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ringcast-operator-'));
function writeConfig(name, text) {
  const p = path.join(dir, name);
  fs.writeFileSync(p, text);
  return p;
}

e2e('--config sets serve flags; RINGCAST_* overrides the file and a flag overrides both', async () => {
  const file = writeConfig('keys.toml', 'api_key = "file-key"\nmax_rate = 100\ncompress = "off"\n');
  const body = { topic: 'rooms:x', event: 'new_msg', payload: { body: 'hi' } };
  let server = await startServer({ args: ['--config', file] });
  try {
    assert.equal((await apiBroadcast(server.port, body, { key: 'file-key' })).status, 202);
  } finally { await server.stop(); }
  server = await startServer({ args: ['--config', file], env: { RINGCAST_API_KEY: 'env-key' } });
  try {
    assert.equal((await apiBroadcast(server.port, body, { key: 'env-key' })).status, 202);
    assert.equal((await apiBroadcast(server.port, body, { key: 'file-key' })).status, 401);
  } finally { await server.stop(); }
  server = await startServer({ args: ['--config', file, '--api-key', 'flag-key'], env: { RINGCAST_API_KEY: 'env-key' } });
  try {
    assert.equal((await apiBroadcast(server.port, body, { key: 'flag-key' })).status, 202);
    assert.equal((await apiBroadcast(server.port, body, { key: 'env-key' })).status, 401);
  } finally { await server.stop(); }
});

e2e('ringcast config check prints the effective settings with their sources and secrets masked', async () => {
  const file = writeConfig('check.toml', 'secret = "s3cr3t-value"\napi_key = "k3y-value"\nmax_rate = 100\nallowed_origin = ["//a.example"]\n');
  const r = await runCli(['config', 'check', file], { env: { RINGCAST_MAX_RATE: '250' } });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^max_rate = "250"  # environment RINGCAST_MAX_RATE$/m);
  assert.match(r.stdout, /^allowed_origin = \["\/\/a\.example"\]  # config file$/m);
  assert.match(r.stdout, /^secret = "\*\*\*\*\*\*\*\*"  # config file$/m);
  assert.match(r.stdout, /^idle_timeout = "60s"  # default$/m);
  assert.ok(!r.stdout.includes('s3cr3t-value') && !r.stdout.includes('k3y-value'), r.stdout);
});

e2e('an unknown key or a bad value is an error that names it, for config check and for serve', async () => {
  const unknown = writeConfig('unknown.toml', 'max_rates = 5\n');
  let r = await runCli(['config', 'check', unknown]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /unknown key `max_rates`/);
  const bad = writeConfig('bad.toml', 'idle_timeout = "soon"\n');
  r = await runCli(['serve', '--dev', '--config', bad]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /config file .*bad\.toml, key `idle_timeout`: invalid value 'soon'/);
  r = await runCli(['serve', '--dev', '--listen', '127.0.0.1:1'], { env: { RINGCAST_MAX_RATE: 'lots' } });
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /environment RINGCAST_MAX_RATE: invalid value 'lots'/);
  r = await runCli(['config', 'check', path.join(dir, 'missing.toml')]);
  assert.notEqual(r.code, 0);
  assert.match(r.stderr, /config file .*missing\.toml: /);
});

e2e('JSON logs at debug: the lifecycle and summary lines are there, and no token, API key or secret is in any line', async () => {
  const apiKey = 'operator-api-key-do-not-log';
  const server = await startServer({
    cores: 2,
    args: ['--log-format', 'json', '--log-summary', '1s', '--api-key', apiKey, '--allowed-origin', '//allowed.example'],
    env: { RINGCAST_LOG: 'debug' },
  });
  const tokens = [];
  try {
    // A query token, an authToken subprotocol, a long-poll token, a forged one, the API.
    const t1 = mintToken('u1'); tokens.push(t1);
    const a = await connect(server.port, 'u1', { token: t1 });
    await a.joined('rooms:ops');
    const t2 = mintToken('u2'); tokens.push(t2);
    const b = await connect(server.port, 'u2', { params: {}, socketOpts: { authToken: t2 } });
    await b.joined('rooms:ops');
    const t3 = mintToken('u3'); tokens.push(t3);
    const lp = await lpConnect(server.httpUrl, 'u3', { token: t3 });
    await waitFor(() => lp.opened, { what: 'long-poll open' });
    const forged = `${mintToken('u4').split('.')[0]}.forgedsignature`; tokens.push(forged);
    await assert.rejects(connect(server.port, 'u4', { token: forged, timeout: 500 }));
    assert.equal((await apiBroadcast(server.port, { topic: 'rooms:ops', event: 'new_msg', payload: { body: 'x' } }, { key: apiKey })).status, 202);
    assert.equal((await apiBroadcast(server.port, { topic: 'rooms:ops', event: 'new_msg', payload: {} }, { key: 'wrong-key-also-secret' })).status, 401);
    await a.close();
    await waitFor(() => server.log().includes('"summary"'), { timeout: 3000, what: 'a summary line' });
    await waitFor(() => server.log().includes('websocket closed') || server.log().includes('websocket ended'),
      { timeout: 3000, what: 'a close event' });
    await b.close();
    closeLpClients();
  } finally {
    await server.stop();
  }
  const log = server.log();
  const lines = log.split('\n').filter((l) => l.trim());
  for (const line of lines) JSON.parse(line); // every line is one JSON object
  const events = lines.map((l) => JSON.parse(l));
  const messages = events.map((e) => e.fields?.message ?? '');
  assert.ok(messages.includes('websocket connected'), 'connect events at debug');
  assert.ok(messages.includes('long-poll connected'), 'long-poll sessions too');
  assert.ok(messages.includes('websocket refused'), 'refusals at debug, with their reason');
  assert.ok(events.some((e) => e.fields?.message === 'websocket refused' && /Forbidden/.test(e.fields.reason)));
  const summary = events.find((e) => e.fields?.message === 'summary');
  for (const k of ['connections', 'channels', 'joins_per_sec', 'deliveries_per_sec', 'dropped']) assert.ok(k in summary.fields, k);
  for (const secret of [...tokens, ...tokens.map((t) => t.split('.')[1]), apiKey, 'wrong-key-also-secret', SECRET]) {
    assert.ok(!log.includes(secret), `the log contains a secret: ${secret}`);
  }
});



e2e('/metrics answers "is it healthy": latency histograms, closes by code, drops by reason, top topics; every metric the Grafana dashboard queries exists', async () => {
  const server = await startServer({ cores: 2, args: ['--api-key', 'metrics-key', '--max-rate', '5'] });
  try {
    const a = await connect(server.port, 'm1');
    const chan = await a.joined('rooms:big');
    const b = await connect(server.port, 'm2');
    await b.joined('rooms:big');
    chan.push('new_msg', { body: 'one' });
    assert.equal((await apiBroadcast(server.port, { topic: 'rooms:big', event: 'new_msg', payload: { body: 'two' } }, { key: 'metrics-key' })).status, 202);
    // A flooder, cut off for its rate (1008).
    const flooder = await connect(server.port, 'flood');
    const fc = await flooder.joined('rooms:small');
    for (let i = 0; i < 40; i++) fc.push('ping', {});
    await waitFor(() => flooder.closes.some((c) => c.code === 1008), { timeout: 3000, what: 'the flooder cut off' });
    await flooder.close();
    await sleep(1300); // the top-topics list refreshes once a second
    const text = await (await fetch(`${server.httpUrl}/metrics`)).text();
    const sum = (re) => [...text.matchAll(re)].reduce((s, m) => s + Number(m[1]), 0);
    assert.ok(sum(/^ringcast_join_seconds_count\{core="\d"\} (\d+)$/gm) >= 3, 'joins timed');
    assert.ok(sum(/^ringcast_fanout_seconds_count\{core="\d"\} (\d+)$/gm) >= 1, 'fanouts timed');
    assert.ok(sum(/^ringcast_api_seconds_count\{core="\d"\} (\d+)$/gm) >= 1, 'API requests timed');
    assert.match(text, /^ringcast_fanout_seconds_bucket\{core="0",le="\+Inf"\} \d+$/m);
    assert.ok(sum(/^ringcast_closes_total\{core="\d",code="1008"\} (\d+)$/gm) >= 1, 'the 1008 close counted');
    assert.ok(sum(/^ringcast_dropped_total\{core="\d",reason="rate_limit"\} (\d+)$/gm) >= 1, 'the flood counted as a drop');
    assert.match(text, /^ringcast_topic_subscribers\{topic="rooms:big"\} 2$/m);
    // The dashboard only queries metrics that exist.
    const dashboard = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'ops', 'grafana', 'ringcast.json'), 'utf8'));
    const exprs = dashboard.panels.flatMap((p) => p.targets.map((t) => t.expr));
    assert.ok(exprs.length >= 10);
    const names = new Set(exprs.flatMap((e) => e.match(/ringcast_[a-z0-9_]+/g) || []));
    const present = new Set(text.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => l.split(/[{ ]/)[0]));
    for (const name of names) assert.ok(present.has(name), `the dashboard queries ${name}, which /metrics does not have`);
    await a.close();
    await b.close();
  } finally {
    await server.stop();
  }
});
