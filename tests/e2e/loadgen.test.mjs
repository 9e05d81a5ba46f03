// The loadgen options the cluster measurements rely on, against real servers:
//
// - `fanout --publish-url`: the publisher sends through one node of a cluster and the
//   subscribers listen on another, so every delivery crosses a real redis-server (what
//   `scripts/measure-cluster-link.mjs --loadgen 1` measures). Without the cluster link
//   nothing would arrive, so the test shows that the publisher went where it was told.
// - `--retries`: a connection refused with 503 (the node's connection limit) is tried
//   again after phoenix.js's delays and gets in once a slot frees; without retries the
//   same run counts it failed. The client that held the slot is a bystander that must
//   not be harmed.
//
// redis-server must be installed (scripts/test.sh installs it).

import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  e2e, startServer, connect, freePort, startRedis, REPO_ROOT, SECRET,
} from './lib.mjs';
import { withCluster } from './clusterlib.mjs';

const LOADGEN = process.env.RINGCAST_LOADGEN_BIN || path.join(REPO_ROOT, 'target', 'debug', 'ringcast-loadgen');

let redis = null;
let redisPort = 0;
before(async () => {
  redisPort = await freePort();
  redis = await startRedis(redisPort);
});
after(async () => {
  if (redis && !redis.exited) { redis.proc.kill('SIGKILL'); await redis.exitPromise; }
});

/** Runs the loadgen with `args`; resolves to its JSON report (and its stderr). */
function loadgen(args, name) {
  const json = path.join(os.tmpdir(), `ringcast-e2e-lg-${process.pid}-${name}.json`);
  return new Promise((resolve, reject) => {
    const p = spawn(LOADGEN, ['--quiet', '--sources', '4', '--secret', SECRET, ...args, '--json', json], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => { err += d; });
    p.on('error', reject);
    p.on('exit', (code) => {
      try {
        const report = JSON.parse(fs.readFileSync(json, 'utf8'));
        fs.rmSync(json, { force: true });
        resolve({ code, report, err });
      } catch (e) {
        reject(new Error(`loadgen exited ${code} without a report: ${e.message}\n${err}`));
      }
    });
  });
}

/** Bytes a node has read from clients, all cores (`ringcast_bytes_in_total`). */
async function bytesIn(node) {
  const text = await (await fetch(`${node.httpUrl}/metrics`)).text();
  return [...text.matchAll(/^ringcast_bytes_in_total(?:\{[^}]*\})? (\d+)$/gm)].reduce((n, m) => n + Number(m[1]), 0);
}

e2e('fanout --publish-url: published through node A, every message reaches the subscribers on node B through Redis', async () => {
  await withCluster([1, 1], async ([a, b]) => {
    const { code, report, err } = await loadgen(['fanout', '--url', `ws://127.0.0.1:${b.port}`, '--publish-url', `ws://127.0.0.1:${a.port}`,
      '-n', '5', '-m', '300', '--rate', '1000', '--topic', `bench:lg-publish-${process.pid}`], 'publish');
    assert.equal(code, 0, err);
    assert.equal(report.publish_url, `ws://127.0.0.1:${a.port}`);
    assert.equal(report.subscribers_joined, 5);
    assert.equal(report.sent, 300);
    assert.equal(report.loss, 0, JSON.stringify(report));
    assert.equal(report.deliveries, 5 * 300);
    assert.equal(report.duplicates, 0);
    assert.equal(report.reorders, 0);
    // The 300 pushes (about 100 bytes each) came in on node A; node B read only its two
    // subscribers' joins.
    const [inA, inB] = [await bytesIn(a), await bytesIn(b)];
    assert.ok(inA > 300 * 40, `node A read ${inA} bytes`);
    assert.ok(inB < 300 * 40, `node B read ${inB} bytes`);
  }, { url: `redis://127.0.0.1:${redisPort}` });
}, { timeout: 30000 });

e2e('--retries: a connection refused at the connection limit gets in once a slot frees; without retries it fails', async () => {
  const server = await startServer({ args: ['--max-connections', '3'] });
  try {
    const run = async (retries, name) => {
      const holder = await connect(server.port, `holder-${name}`);
      await holder.joined('rooms:lobby', {});
      // Two slots are free: the third of three loadgen connections is refused (503)
      // until the holder leaves, 400 ms in.
      const lg = loadgen(['--retries', String(retries), 'connect', '--url', `ws://127.0.0.1:${server.port}`, '-n', '3',
        '--rate', '50', '--hold', '2s', '--topic', `bench:lg-retry-${name}`], name);
      await new Promise((r) => setTimeout(r, 400));
      assert.deepEqual(holder.closes, [], 'the holder was not disconnected by the server');
      await holder.close();
      return (await lg).report;
    };
    const retried = await run(8, 'retried');
    assert.equal(retried.joined, 3, JSON.stringify(retried));
    assert.equal(retried.failed, 0);
    assert.ok((retried.retried['handshake status 503'] ?? 0) >= 1, JSON.stringify(retried.retried));
    const once = await run(0, 'once');
    assert.equal(once.joined, 2, JSON.stringify(once));
    assert.deepEqual(once.failures, { 'handshake status 503': 1 });
    assert.deepEqual(once.retried, {});
  } finally {
    await server.stop();
  }
}, { timeout: 30000 });
