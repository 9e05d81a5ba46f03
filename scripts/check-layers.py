#!/usr/bin/env python3
"""The layering check of engine/src, run by scripts/test.sh (and so by CI).

The engine's top-level modules (folders and files directly under engine/src) form layers;
a module may use only modules of a lower layer:

    0  proto, clock                   sans-IO protocol: frames, heads, serializers, tokens;
                                      the wall clock, read in one place
    1  shard                          per-core state and the channel runtime (api/, app,
                                      the cluster handle); no sockets, io_uring, Redis or
                                      clock of its own: it is given a clock, and hands its
                                      timers, mesh messages and writes back
    2  transport, cluster             I/O around the shard: HTTP, WebSocket, long-poll,
                                      parking, the flusher; the Redis link
    3  server                         executors, the mesh's rings, inbox wake-ups, listeners
    4  seed, testing, bench_support,  what runs on a server, and the
       cli                           binary's settings (file, environment, flags)

A module's dependencies are the `crate::NAME` paths in its code (use statements and inline
paths, grouped imports included); `#[cfg(test)]` modules and comments are skipped. Two
modules of one layer may not use each other either. On top of that, proto stays sans-IO
(no runtime, socket or clock), and shard does no I/O (no glommio, socket, Redis or clock).

Prints every edge with its files; exits 1 on an upward or sideways edge, or on a module
missing from the table.
Usage: scripts/check-layers.py [engine/src]"""
import os
import re
import sys

LAYERS = [
    ["proto", "clock"],
    ["shard"],
    ["transport", "cluster"],
    ["server"],
    ["seed", "testing", "bench_support", "cli"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
SANS_IO = re.compile(r"glommio|std::net::(TcpStream|TcpListener|UdpSocket|ToSocketAddrs)|std::time::(Instant|SystemTime)|io_uring|libc::")
# The shard may name addresses (config, connect info) and read its file limit, no more.
NO_IO = re.compile(
    r"glommio|io_uring|redis::|std::net::(TcpStream|TcpListener|UdpSocket)|std::os::unix::net"
    r"|\bInstant\b|SystemTime|thread::sleep"
)
RULES = {"proto": ("must stay sans-IO", SANS_IO), "shard": ("must do no I/O", NO_IO)}


def strip_tests(text):
    """Drops `#[cfg(test)] mod x { ... }` blocks (brace matching) and line comments."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return re.sub(r"//[^\n]*", "", "".join(out))


def module_files(src, top):
    base = os.path.join(src, top)
    if not os.path.isdir(base):
        return [base + ".rs"]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(base) for f in fs if f.endswith(".rs"))


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "engine", "src")
    tops = sorted(
        e[:-3] if e.endswith(".rs") else e
        for e in os.listdir(src)
        if (os.path.isdir(os.path.join(src, e)) or e.endswith(".rs")) and e not in ("lib.rs", "main.rs")
    )
    failures = [f"module {t} is in no layer: add it to LAYERS in {__file__}" for t in tops if t not in RANK]
    edges = {}
    for top in tops:
        for path in module_files(src, top):
            text = strip_tests(open(path, encoding="utf-8").read())
            names = set(re.findall(r"\bcrate::(\w+)", text))
            for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
                names |= set(re.findall(r"(?:^|,)\s*(\w+)", group))
            for name in names & set(tops) - {top}:
                edges.setdefault((top, name), set()).add(os.path.relpath(path, src))
            if top in RULES:
                what, rule = RULES[top]
                for n, line in enumerate(text.splitlines(), 1):
                    if rule.search(line):
                        failures.append(f"{os.path.relpath(path, src)}:{n}: {top} {what}: {line.strip()}")
    for (a, b), files in sorted(edges.items()):
        bad = a in RANK and b in RANK and RANK[b] >= RANK[a]
        mark = "  <-- UPWARD" if bad and RANK[b] > RANK[a] else "  <-- SIDEWAYS" if bad else ""
        print(f"{a} -> {b}  ({', '.join(sorted(files))}){mark}")
        if bad:
            failures.append(f"{a} (layer {RANK[a]}) must not use {b} (layer {RANK[b]}): {', '.join(sorted(files))}")
    if failures:
        print("\ncheck-layers: FAILED", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"check-layers: {len(tops)} modules in {len(LAYERS)} layers, {len(edges)} edges, all pointing down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
