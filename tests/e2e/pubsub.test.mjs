// engine/examples/pubsub.rs with the real phoenix client (issue 15): Rust code outside
// the channels hears what the client broadcasts (a plain thread through the blocking
// Iterator, a tokio task through the Stream), lists presence every second, and sends a
// typed `UserUpdated` that a `profile:<user>` channel pushes to its client. In cluster
// mode (a real redis-server) the example's subscribers hear a broadcast made on another
// node, exactly once.
//
// The example is built by `cargo test --workspace` (and `cargo build --examples`):
// target/debug/examples/pubsub, or RINGCAST_EXAMPLE_PUBSUB.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  e2e, startServer, connect, rawConnect, waitFor, freePort, startRedis, REPO_ROOT, sleep,
} from './lib.mjs';

const EXAMPLE = process.env.RINGCAST_EXAMPLE_PUBSUB || path.join(REPO_ROOT, 'target', 'debug', 'examples', 'pubsub');

function startExample(args = []) {
  if (!fs.existsSync(EXAMPLE)) throw new Error(`${EXAMPLE} is missing: build it with cargo build -p ringcast --examples`);
  return startServer({ bin: EXAMPLE, args });
}

/** The example's output lines that start with `prefix` and contain `text`. */
const lines = (server, prefix, text) => server.log().split('\n').filter((l) => l.startsWith(prefix) && l.includes(text));

e2e('a plain thread and a tokio task hear every new_msg the phoenix client broadcasts; presence_list shows the member; send_info reaches a profile channel', async () => {
  const server = await startExample();
  try {
    const alice = await connect(server.port, 'alice');
    const lobby = await alice.joined('rooms:lobby', { name: 'Alice' });
    for (let i = 0; i < 5; i++) lobby.push('new_msg', { body: `hello ${i}` });
    for (const who of ['thread:', 'tokio:']) {
      await waitFor(() => lines(server, who, 'new_msg').length === 5, { timeout: 3000, what: `five new_msg lines from the ${who}` });
      const got = lines(server, who, 'new_msg').map((l) => JSON.parse(l.slice(l.indexOf('{'))).body);
      assert.deepEqual(got, [0, 1, 2, 3, 4].map((i) => `hello ${i}`), `${who} in order, each once`);
    }
    await waitFor(() => lines(server, 'presence:', '"alice"').some((l) => l.includes('"Alice"')),
      { timeout: 3000, what: 'a presence line with alice' });

    const profile = await alice.joined('profile:alice');
    const updated = new Promise((resolve) => profile.on('user_updated', resolve));
    const admin = await alice.joined('rooms:admin');
    admin.push('new_msg', { body: 'rename:Ada Lovelace' });
    assert.deepEqual(await updated, { name: 'Ada Lovelace' });
    // The admin thread prints after send_info returns: the push may come first.
    await waitFor(() => lines(server, 'admin:', 'UserUpdated(Ada Lovelace) to updates:alice').length === 1,
      { timeout: 3000, what: 'the admin line' });
    await alice.close();
  } finally {
    await server.stop();
  }
});

e2e('cluster: the example\'s subscribers on one node hear a broadcast made on another node exactly once', async () => {
  const redisPort = await freePort();
  const redis = await startRedis(redisPort);
  const url = `redis://127.0.0.1:${redisPort}`;
  let node;
  let example;
  try {
    node = await startServer({ cores: 1, args: ['--redis', url, '--node-name', `pubsub-e2e-${process.pid}`, '--cluster-secret', 'pubsub-e2e'] });
    example = await startServer({ bin: EXAMPLE, args: ['--redis', url], env: { RINGCAST_CLUSTER_SECRET: 'pubsub-e2e' } });
    await waitFor(() => node.log().includes('Redis link up') && example.log().includes('Redis link up'),
      { timeout: 5000, what: 'both Redis links up' });
    // The example subscribed at start; give its Redis SUBSCRIBE a moment.
    await sleep(300);
    const bob = await connect(node.port, 'bob');
    const lobby = await bob.joined('rooms:lobby');
    await sleep(200);
    lobby.push('new_msg', { body: 'from the other node' });
    for (const who of ['thread:', 'tokio:']) {
      await waitFor(() => lines(example, who, 'from the other node').length >= 1, { timeout: 3000, what: `${who} hearing node A` });
    }
    await sleep(300);
    for (const who of ['thread:', 'tokio:']) {
      assert.equal(lines(example, who, 'from the other node').length, 1, `${who} exactly once`);
    }
    await waitFor(() => lines(example, 'presence:', '"bob"').length >= 1, { timeout: 3000, what: 'bob in the example node\'s presence_list' });
    // presence_list on node B (bob is on node A) equals the presence_state a joiner on
    // node B gets.
    const listed = JSON.parse(lines(example, 'presence:', '"bob"').at(-1).slice('presence: '.length));
    const joiner = await rawConnect(example.port, { userId: 'joiner' });
    await joiner.join('rooms:lobby');
    assert.deepEqual((await joiner.event('rooms:lobby', 'presence_state')).payload, listed);
    await joiner.close();
    await bob.close();
  } finally {
    if (example) await example.stop();
    if (node) await node.stop();
    redis.proc.kill('SIGKILL');
    await redis.exitPromise;
  }
});
