// Helpers for the cluster-mode tests (cluster.test.mjs, redis-ops.test.mjs): nodes of
// `ringcast serve --redis` and the phoenix clients on them.

import assert from 'node:assert/strict';
import {
  startServer, connect, rawConnect, collect, waitFor, sleep,
} from './lib.mjs';
import { API_KEY, Presence } from './httplib.mjs';

export const CLUSTER_SECRET = 'e2e-cluster-secret';

let nodeSeq = 0;

// Clients of the running test. `withCluster` closes them before it stops the nodes: a
// node that shuts down closes its sockets with 1001, which the e2e wrapper would
// (rightly) report as an unexpected disconnect of a phoenix client.
export const testClients = [];
export async function connectT(port, userId, opts) {
  const c = await connect(port, userId, opts);
  testClients.push(c);
  return c;
}
export async function rawConnectT(port, opts) {
  const c = await rawConnect(port, opts);
  testClients.push(c);
  return c;
}

/**
 * Starts `coresList.length` nodes (one entry per node: its --cores) in cluster mode on
 * the shared Redis and waits until each has its Redis link up.
 */
export async function startCluster(coresList, { url, urls = [], args = [], flag = '--redis' } = {}) {
  const nodes = [];
  try {
    for (const [n, cores] of coresList.entries()) {
      nodes.push(await startServer({
        cores,
        args: ['--api-key', API_KEY, flag, urls[n] ?? url, '--node-name', `e2e-${process.pid}-${++nodeSeq}`,
          '--cluster-secret', CLUSTER_SECRET, ...args],
      }));
    }
    await Promise.all(nodes.map((n) => waitFor(() => linkUps(n) >= 1, {
      timeout: 5000, what: `"Redis link up" in the log of the node on port ${n.port}`,
    })));
  } catch (err) {
    await stopAll(nodes);
    throw err;
  }
  return nodes;
}

export const linkUps = (node) => node.log().split('Redis link up').length - 1;

export async function stopAll(nodes) {
  await Promise.all(nodes.map((n) => n.stop()));
}

/** Runs `fn(nodes)` on a fresh cluster, stopping every node afterwards. */
export async function withCluster(coresList, fn, opts) {
  const nodes = await startCluster(coresList, opts);
  try {
    await fn(nodes);
  } finally {
    const clients = testClients.splice(0, testClients.length);
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await stopAll(nodes);
  }
}

let topicSeq = 0;
export const uniqueTopic = (what, route = 'rooms') => `${route}:cl-${what}-${process.pid}-${++topicSeq}`;

/**
 * Connects `perNode` phoenix clients to every node and joins `topic` with each; every
 * member gets a `Presence` and a collector of `new_msg`. Returns the members in node
 * order: `{node, i, user, client, chan, presence, msgs}`.
 */
export async function joinMembers(nodes, perNode, topic, prefix) {
  const members = [];
  for (const [n, node] of nodes.entries()) {
    for (let i = 0; i < perNode; i++) {
      const user = `${prefix}${n}_${i}`;
      const client = await connectT(node.port, user);
      const chan = client.channel(topic, { name: user });
      const presence = new Presence(chan);
      const msgs = collect(chan, 'new_msg');
      members.push({ node: n, i, user, client, chan, presence, msgs, joined: chan.join() });
    }
  }
  for (const m of members) {
    const res = await new Promise((resolve) => {
      m.joined.receive('ok', () => resolve('ok')).receive('error', (r) => resolve(`error ${JSON.stringify(r)}`))
        .receive('timeout', () => resolve('timeout'));
    });
    assert.equal(res, 'ok', `join ${topic} as ${m.user} on node ${m.node}`);
  }
  return members;
}

/** A presence list in a comparable form: [[key, [phx_ref, ...sorted]], ...sorted by key]. */
export function presenceView(presence) {
  return presence.list((key, { metas }) => [key, metas.map((m) => m.phx_ref).sort()])
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
}

/** Waits until every member's presence list has exactly `keys` and all lists are equal. */
export async function presenceAgrees(members, keys, { timeout = 3000, what = 'presence lists to agree' } = {}) {
  const want = [...keys].sort();
  try {
    await waitFor(() => {
      const views = members.map((m) => JSON.stringify(presenceView(m.presence)));
      return views.every((v) => v === views[0])
        && JSON.stringify(presenceView(members[0].presence).map(([k]) => k)) === JSON.stringify(want);
    }, { timeout, interval: 25, what });
  } catch (err) {
    const views = members.map((m) => `  ${m.user}@node${m.node}: ${JSON.stringify(presenceView(m.presence))}`).join('\n');
    throw new Error(`${err.message}; wanted keys ${JSON.stringify(want)}, views:\n${views}`);
  }
  return presenceView(members[0].presence);
}

/**
 * Waits until every member has `expected.length` new_msg, then a little longer (a
 * duplicate would arrive in that time), and asserts each got exactly `expected`
 * (bodies, any order) with the right `user`.
 */
export async function assertEachGotExactlyOnce(members, expected, { timeout = 3000 } = {}) {
  await Promise.all(members.map((m) => m.msgs.waitFor(expected.length, timeout).catch((err) => {
    throw new Error(`${m.user} on node ${m.node}: ${err.message}`);
  })));
  await sleep(300);
  const want = expected.map(({ body, user }) => `${body}|${user}`).sort();
  for (const m of members) {
    const got = m.msgs.items.map(({ body, user }) => `${body}|${user}`).sort();
    assert.deepEqual(got, want, `${m.user} on node ${m.node} got each message exactly once`);
  }
}

