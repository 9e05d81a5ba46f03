#!/usr/bin/env python3
"""Helper of scripts/cluster-1m.sh (standard library only).

    sample    --nodes PIDS --loadgens PIDS [--stats-ports PORTS --api-key K]
              one JSON object: /proc/meminfo, /proc/net/sockstat, the RSS of the server
              and loadgen processes (loadgen worker processes included), and the sum of
              `connections` from every node's /api/stats when ports are given
    broadcast --port P --topic T --api-key K [--seq N]
              POST /api/broadcast of `new_msg` {"body": "<seq>:<unix nanos>", "user": "api"}
              (the loadgen's subscribers time it from the nanos in the body)
    deliveries --ports PORTS --api-key K [--before FILE --expected N --send-nanos-from FILE --timeout S]
              without --before: every node's /api/stats `deliveries` as JSON; with it: polls
              until the sum grew by --expected (or the timeout) and reports when
    summarize --dir D     combines D/lg-*.json (loadgen `connect` reports), D/sampler.json,
              D/deliveries.json, D/samples/*.json and D/run.env into D/summary.json
    readme    --out D     writes D/README.md from every D/size-*/summary.json
"""

import argparse
import glob
import json
import os
import sys
import time
import urllib.request

PAGE = os.sysconf("SC_PAGE_SIZE")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            parts = v.split()
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return {k: out.get(k) for k in ("MemTotal", "MemFree", "MemAvailable", "Slab", "SReclaimable", "SUnreclaim", "KernelStack", "PageTables")}


def sockstat():
    out = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            proto, rest = line.split(":", 1)
            vals = rest.split()
            out[proto] = {vals[i]: int(vals[i + 1]) for i in range(0, len(vals) - 1, 2)}
    tcp = out.get("TCP", {})
    return {"tcp_inuse": tcp.get("inuse"), "tcp_alloc": tcp.get("alloc"), "tcp_tw": tcp.get("tw"),
            "tcp_mem_bytes": tcp.get("mem", 0) * PAGE, "sockets_used": out.get("sockets", {}).get("used")}


def rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0


def children_of(pids):
    """Every descendant of `pids` (loadgen workers)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
                parent[int(d)] = int(s[s.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    found, frontier = set(), set(pids)
    while frontier:
        nxt = {c for c, p in parent.items() if p in frontier and c not in found}
        found |= nxt
        frontier = nxt
    return sorted(found)


def pid_list(s):
    return [int(x) for x in s.replace(",", " ").split() if x]


def api_connections(ports, key):
    # All nodes at once, so a round takes as long as the slowest node, not the sum.
    st = node_stats(ports, key)
    answered = [v for v in st.values() if v is not None]
    total = sum(int(v.get("connections", 0)) for v in answered)
    return {"connections": total, "nodes_answered": len(answered), "nodes": len(ports)}


def one_node_stats(port, key, timeout):
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/stats", headers={"authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except Exception:  # noqa: BLE001 - a node that does not answer is counted as such
        return None


def node_stats(ports, key, timeout=5):
    """Every node's /api/stats, asked in parallel; None for a node that did not answer."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=min(64, max(1, len(ports)))) as pool:
        got = list(pool.map(lambda p: one_node_stats(p, key, timeout), ports))
    return {str(p): v for p, v in zip(ports, got)}


def cmd_deliveries(a):
    ports = pid_list(a.ports)
    if not a.before:
        st = node_stats(ports, a.api_key)
        json.dump({str(p): (v or {}).get("deliveries") for p, v in st.items()}, sys.stdout)
        print()
        return 0
    before = load(a.before) or {}
    base = sum(v or 0 for v in before.values())
    if a.broadcast_port:
        # broadcast from this process, then poll right away
        import io
        saved, sys.stdout = sys.stdout, io.StringIO()
        try:
            cmd_broadcast(argparse.Namespace(port=a.broadcast_port, topic=a.topic, api_key=a.api_key, seq=1))
            text = sys.stdout.getvalue()
        finally:
            sys.stdout = saved
        with open(a.broadcast_out, "w") as f:
            f.write(text)
        send = json.loads(text).get("send_unix_nanos")
    else:
        send = (load(a.send_nanos_from) or {}).get("send_unix_nanos") if a.send_nanos_from else None
    end = time.time() + a.timeout
    polls = 0
    while True:
        st = node_stats(ports, a.api_key)
        polls += 1
        now = time.time_ns()
        per = {p: (v or {}).get("deliveries") for p, v in st.items()}
        total = sum(v or 0 for v in per.values()) - base
        if total >= a.expected or time.time() > end:
            res = {"expected": a.expected, "delivered": total, "complete": total >= a.expected, "polls": polls,
                   "nodes_answering": sum(1 for v in per.values() if v is not None),
                   "per_node_delta": {p: (v or 0) - (before.get(p) or 0) for p, v in per.items()},
                   "seen_complete_after_s": ((now - send) / 1e9) if send and total >= a.expected else None,
                   "note": "server-side: broadcast frames queued to connections (/api/stats deliveries), summed over all "
                           "nodes; the time is when a poll round over every node first saw the full count (an upper bound, "
                           "poll rounds take a few ms per node)"}
            json.dump(res, sys.stdout)
            print()
            return 0 if res["complete"] else 1
        time.sleep(0.02)


def cmd_sample(a):
    nodes = pid_list(a.nodes)
    lgs = pid_list(a.loadgens or "")
    lg_all = sorted(set(lgs) | set(children_of(lgs))) if lgs else []
    node_rss = [rss(p) for p in nodes]
    out = {
        "unix_time": time.time(),
        "meminfo": meminfo(),
        "sockstat": sockstat(),
        "server_rss_bytes": sum(r for r in node_rss if r),
        "server_processes_alive": sum(1 for r in node_rss if r is not None),
        "loadgen_rss_bytes": sum(rss(p) or 0 for p in lg_all),
        "loadgen_processes": len(lg_all),
    }
    if a.redis_pid:
        out["redis_rss_bytes"] = rss(a.redis_pid) or 0
    if a.stats_ports:
        out["api_stats"] = api_connections(pid_list(a.stats_ports), a.api_key)
    json.dump(out, sys.stdout)
    print()


def cmd_broadcast(a):
    nanos = time.time_ns()
    body = json.dumps({"topic": a.topic, "event": "new_msg", "payload": {"body": f"{a.seq}:{nanos}", "user": "api"}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{a.port}/api/broadcast", data=body, method="POST",
                                 headers={"authorization": f"Bearer {a.api_key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    except Exception as e:  # noqa: BLE001
        status, text = 0, str(e)
    answered = time.time_ns()
    json.dump({"send_unix_nanos": nanos, "answer_unix_nanos": answered, "status": status, "answer": text}, sys.stdout)
    print()
    return 0 if status == 202 else 1


def read_env(path):
    env = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if "=" in line and not line.startswith("#"):
                    k, v = line.split("=", 1)
                    env[k] = v
    return env


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_summarize(a):
    d = a.dir
    env = read_env(os.path.join(d, "run.env"))
    size = int(env.get("size", 0))
    nodes = int(env.get("nodes", 0))
    lgs, missing = [], []
    for i in range(nodes):
        j = load(os.path.join(d, f"lg-{i}.json"))
        if j is None:
            missing.append(i)
        else:
            j["_node"] = i
            lgs.append(j)
    s = {k: load(os.path.join(d, "samples", f"{k}.json")) for k in ("before", "full", "after")}
    bc = load(os.path.join(d, "broadcast.json"))
    sampler = load(os.path.join(d, "sampler.json"))
    dl = load(os.path.join(d, "deliveries.json"))

    def add_maps(key):
        m = {}
        for j in lgs:
            for k, v in (j.get(key) or {}).items():
                m[k] = m.get(k, 0) + v
        return m

    joined = sum(j.get("joined", 0) for j in lgs)
    requested = sum(j.get("requested", 0) for j in lgs)
    ended_early = sum(j.get("ended_early", 0) for j in lgs)
    held = sum(j.get("connected_at_hold_end", 0) for j in lgs)
    jl = [j["join_latency"] for j in lgs if (j.get("join_latency") or {}).get("count")]
    join_latency = None
    if jl:
        join_latency = {"p50_ms_worst_node": max(x["p50_us"] for x in jl) / 1e3, "p99_ms_worst_node": max(x["p99_us"] for x in jl) / 1e3,
                        "max_ms": max(x["max_us"] for x in jl) / 1e3}

    def delta(key, sub=None):
        b, f = s.get("before"), s.get("full")
        if not b or not f:
            return None
        return (f[sub][key] - b[sub][key]) if sub else (f[key] - b[key])

    per_conn = None
    if joined and s.get("before") and s.get("full"):
        per_conn = {
            "server_rss_bytes": delta("server_rss_bytes") / joined,
            "loadgen_rss_bytes": delta("loadgen_rss_bytes") / joined,
            "kernel_slab_bytes": delta("Slab", "meminfo") / joined,
            "kernel_sunreclaim_bytes": delta("SUnreclaim", "meminfo") / joined,
            "kernel_tcp_mem_bytes": delta("tcp_mem_bytes", "sockstat") / joined,
            "memavailable_drop_bytes": -delta("MemAvailable", "meminfo") / joined,
            "note": "server_rss: sum of the ringcast nodes' RSS (all joined - before the loadgens) / joined; kernel: the whole "
                    "box's /proc/meminfo deltas, i.e. BOTH ends of every loopback connection; memavailable_drop: everything "
                    "(servers, loadgens, kernel) per connection",
        }
    t0 = float(env.get("t_loadgen_start", 0) or 0)
    t_all = float(env.get("t_all_joined", 0) or 0)
    samplers = (sampler or {}).get("joined", 0)
    # every bulk connection counts as reached when the server queued the frame and the
    # connection was still open at the end of the hold (TCP then delivers it)
    delivered_server = (dl or {}).get("delivered")
    loss = None
    if dl is not None and lgs:
        loss = max(0, joined + samplers - delivered_server) + ended_early
    out = {
        "size": size,
        "nodes": nodes,
        "per_node": env.get("per_node"),
        "outcome": env.get("outcome", "unknown"),
        "notes": env.get("notes", ""),
        "connect_rate_requested_per_s": float(env.get("rate", 0) or 0),
        "connections_requested": requested or size,
        "connections_joined": joined,
        "connection_failures": add_maps("failures"),
        "loadgen_reports_missing_for_nodes": missing,
        "time_to_connect_s": (t_all - t0) if t0 and t_all else None,
        "loadgen_time_to_last_join_s_max": max((j.get("time_to_last_join_secs") or 0 for j in lgs), default=None),
        "achieved_connect_rate_per_s": (joined / (t_all - t0)) if t0 and t_all and t_all > t0 else None,
        "join_latency": join_latency,
        "connected_at_hold_end": held,
        "ended_early": ended_early,
        "ends": add_maps("ends"),
        "broadcast": bc,
        "server_deliveries": dl,
        "samplers": sampler,
        "loss": loss,
        "time_to_reach_all_s": max(x for x in [
            ((sampler or {}).get("latency") or {}).get("max_us", 0) / 1e6 if sampler else 0,
            (dl or {}).get("seen_complete_after_s") or 0] if x is not None) if (sampler or dl) else None,
        "memory_per_connection": per_conn,
        "samples": s,
        "per_node_reports": [{"node": j["_node"], "joined": j.get("joined"), "failed": j.get("failed"),
                              "time_to_last_join_s": j.get("time_to_last_join_secs"), "ended_early": j.get("ended_early"),
                              "server": j.get("server"), "problems": j.get("problems")} for j in lgs],
    }
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(one_line(out))


def mib(x):
    return "n/a" if x is None else f"{x / 2**20:.0f} MiB"


def kib(x):
    return "n/a" if x is None else f"{x / 1024:.2f} KiB"


def one_line(o):
    sl = ((o.get("samplers") or {}).get("latency")) or {}
    return (f"size {o['size']}: {o['outcome']}; joined {o['connections_joined']}/{o['connections_requested']} on {o['nodes']} node(s)"
            f" in {fmt(o.get('time_to_connect_s'), 's')}; server deliveries {(o.get('server_deliveries') or {}).get('delivered')}"
            f" (loss {o.get('loss')}); reach-all {fmt(o.get('time_to_reach_all_s'), 's')}; samplers p50 {fmt(sl.get('p50_us'), 'us')}"
            f" max {fmt(sl.get('max_us'), 'us')}")


def fmt(x, unit):
    if x is None:
        return "n/a"
    return f"{x:.3f} {unit}" if unit == "s" else f"{x:.0f} {unit}"


def cmd_readme(a):
    sums = []
    for p in sorted(glob.glob(os.path.join(a.out, "size-*", "summary.json")), key=lambda p: int(p.split("size-")[1].split("/")[0])):
        sums.append(load(p))
    env = read_env(os.path.join(a.out, "host.env"))
    L = ["# ringcast cluster run: N connections on one box", ""]
    L.append(f"Written by `scripts/cluster-1m.sh` on {env.get('date', '?')}. Host: {env.get('host', '?')}.")
    L.append("")
    L.append("## How it was measured")
    L.append("")
    L.append("- one `redis-server` (no persistence) and K `ringcast serve --cores 1 --redis ...` nodes (release build) on "
             "127.0.0.1, ports P..P+K-1, about `--per-node` connections each; node i is pinned to CPU i mod ncpu "
             "(`taskset -a -p`; ringcast pins its executors within its affinity mask).")
    L.append("- one `ringcast-loadgen connect` per node (the loadgen targets one URL per run; it rotates source addresses "
             "127.0.0.2..), every connection joining the same `bench:cluster-<N>` topic, then holding. Time to connect = from "
             "starting the loadgens until every one reported all its connections joined.")
    L.append("- `ringcast-loadgen fanout` is not used: it needs `-m >= 1` and every fanout run has its own publisher, so K "
             "parallel runs on one topic would make K publishers each broadcast to all N (K x N deliveries, and every "
             "subscriber would count the other runs' seqs as duplicates). Instead ONE broadcast goes to node 0's "
             "`POST /api/broadcast` (`new_msg`, body `1:<send unix nanos>`) and reaches the other nodes through Redis.")
    L.append("- reach and loss: every node's `/api/stats` `deliveries` counter, summed, polled until it grew by (connections "
             "+ timing subscribers); loss = expected - delivered + connections the server ended during the hold (a frame "
             "queued on a connection that stays open arrives: TCP). Time to reach all = the later of (a) the first poll "
             "round that saw the full count (upper bound; a round over K nodes takes a few ms per node) and (b) the "
             "largest latency seen by the timing subscribers.")
    L.append("- timing subscribers (`scripts/cluster-sampler.mjs`): up to 20 per node, joined after the loadgens' "
             "connections (a node that delivers in join order reaches them last); send-to-receive latency from the "
             "nanos in the body.")
    L.append("- memory per connection: deltas between a sample before the loadgens start and one when all are joined, "
             "divided by joined connections: the nodes' summed RSS, and the box's /proc/meminfo Slab / SUnreclaim and "
             "sockstat TCP mem (kernel figures cover BOTH ends of each loopback connection, the loadgen's socket too). "
             "MemAvailable drop = everything (servers, loadgens, kernel) and is noisy on a shared box.")
    L.append("")
    L.append("Host check: " + env.get("host_check", "?"))
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| N | nodes | joined | time to connect | conn/s | delivered (server) | loss | time to reach all | timing subs p50 / max | server RSS/conn | loadgen RSS/conn | kernel Slab/conn (both ends) | outcome |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for o in sums:
        pc = o.get("memory_per_connection") or {}
        sl = ((o.get("samplers") or {}).get("latency")) or {}
        rate = o.get("achieved_connect_rate_per_s")
        dl = o.get("server_deliveries") or {}
        L.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |".format(
            o["size"], o["nodes"], o.get("connections_joined"), fmt(o.get("time_to_connect_s"), "s"),
            "n/a" if rate is None else f"{rate:.0f}",
            "n/a" if not dl else f"{dl.get('delivered')} of {dl.get('expected')}", o.get("loss"),
            fmt(o.get("time_to_reach_all_s"), "s"), fmt(sl.get("p50_us"), "us"), fmt(sl.get("max_us"), "us"),
            kib(pc.get("server_rss_bytes")), kib(pc.get("loadgen_rss_bytes")), kib(pc.get("kernel_slab_bytes")),
            o["outcome"]))
    L.append("")
    for o in sums:
        L.append(f"### N = {o['size']}")
        L.append("")
        L.append(f"- outcome: **{o['outcome']}**" + (f" — {o['notes']}" if o.get("notes") else ""))
        if o.get("connection_failures"):
            L.append(f"- connection failures: {json.dumps(o['connection_failures'])}")
        if o.get("ends"):
            L.append(f"- connections the server ended: {json.dumps(o['ends'])}")
        if o.get("loadgen_reports_missing_for_nodes"):
            L.append(f"- no loadgen report for nodes {o['loadgen_reports_missing_for_nodes']}")
        jl = o.get("join_latency")
        if jl:
            L.append(f"- connect+upgrade+join latency: p50 (worst node) {jl['p50_ms_worst_node']:.0f} ms, p99 (worst node) {jl['p99_ms_worst_node']:.0f} ms, max {jl['max_ms']:.0f} ms")
        pc = o.get("memory_per_connection") or {}
        if pc:
            L.append(f"- per connection: server RSS {kib(pc['server_rss_bytes'])}, loadgen RSS {kib(pc['loadgen_rss_bytes'])}, "
                     f"kernel Slab {kib(pc['kernel_slab_bytes'])} (SUnreclaim {kib(pc['kernel_sunreclaim_bytes'])}, "
                     f"TCP buffers {kib(pc['kernel_tcp_mem_bytes'])}), MemAvailable drop {kib(pc['memavailable_drop_bytes'])}")
        full = (o.get("samples") or {}).get("full")
        if full:
            L.append(f"- when all joined: servers' RSS {mib(full['server_rss_bytes'])}, loadgens' RSS {mib(full['loadgen_rss_bytes'])} "
                     f"({full['loadgen_processes']} processes), redis RSS {mib(full.get('redis_rss_bytes'))}, Slab {mib(full['meminfo']['Slab'])}, "
                     f"MemAvailable {mib(full['meminfo']['MemAvailable'])}, TCP sockets in use {full['sockstat']['tcp_inuse']}"
                     + (f", /api/stats connections {full['api_stats']['connections']} ({full['api_stats']['nodes_answered']}/{full['api_stats']['nodes']} nodes answered)"
                        if full.get("api_stats") else ""))
        dl = o.get("server_deliveries")
        if dl:
            L.append(f"- server deliveries: {dl.get('delivered')} of {dl.get('expected')} expected; full count seen "
                     f"{fmt(dl.get('seen_complete_after_s'), 's')} after the send ({dl.get('polls')} poll rounds)")
        sm = o.get("samplers")
        if sm:
            lat = sm.get("latency") or {}
            L.append(f"- timing subscribers: {sm.get('received')} of {sm.get('joined')} got it, {sm.get('extra_deliveries')} extra (duplicate) deliveries; "
                     f"latency min {fmt(lat.get('min_us'), 'us')}, p50 {fmt(lat.get('p50_us'), 'us')}, p99 {fmt(lat.get('p99_us'), 'us')}, max {fmt(lat.get('max_us'), 'us')}")
            pn = sm.get("per_node") or []
            if pn:
                local = pn[0]
                remote = [x for x in pn[1:] if x.get("max_us") is not None]
                L.append(f"  - node 0 (where the API call landed): p50 {fmt(local.get('p50_us'), 'us')}, max {fmt(local.get('max_us'), 'us')}"
                         + (f"; other nodes (through Redis): p50 {fmt(min(x['p50_us'] for x in remote), 'us')}..{fmt(max(x['p50_us'] for x in remote), 'us')}, "
                            f"max {fmt(max(x['max_us'] for x in remote), 'us')}" if remote else ""))
        L.append("")
    L.append("Raw figures: `size-*/summary.json` (combined), `size-*/lg-<node>.json` (each loadgen's report), "
             "`size-*/sampler.json`, `size-*/deliveries.json`, `size-*/samples/` (memory samples), `size-*/logs/` "
             "(tails of the node, loadgen and redis logs), `run.log` (the script's own log).")
    L.append("")
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write("\n".join(L))
    print(f"wrote {os.path.join(a.out, 'README.md')}")


def main():
    p = argparse.ArgumentParser()
    sp = p.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("sample")
    s.add_argument("--nodes", required=True)
    s.add_argument("--loadgens", default="")
    s.add_argument("--redis-pid", type=int)
    s.add_argument("--stats-ports", default="")
    s.add_argument("--api-key", default="")
    b = sp.add_parser("broadcast")
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--topic", required=True)
    b.add_argument("--api-key", required=True)
    b.add_argument("--seq", type=int, default=1)
    dv = sp.add_parser("deliveries")
    dv.add_argument("--ports", required=True)
    dv.add_argument("--api-key", required=True)
    dv.add_argument("--before")
    dv.add_argument("--expected", type=int, default=0)
    dv.add_argument("--send-nanos-from")
    dv.add_argument("--timeout", type=float, default=30)
    dv.add_argument("--broadcast-port", type=int, help="broadcast through this node's API first (then poll)")
    dv.add_argument("--topic")
    dv.add_argument("--broadcast-out")
    m = sp.add_parser("summarize")
    m.add_argument("--dir", required=True)
    r = sp.add_parser("readme")
    r.add_argument("--out", required=True)
    a = p.parse_args()
    rc = {"sample": cmd_sample, "broadcast": cmd_broadcast, "summarize": cmd_summarize, "readme": cmd_readme, "deliveries": cmd_deliveries}[a.cmd](a)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
