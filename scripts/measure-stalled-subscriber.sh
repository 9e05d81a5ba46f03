#!/usr/bin/env bash
# What a stalled Rust subscriber costs the WebSocket subscribers of its topic (issue 15):
# engine/examples/pubsub.rs (release) on 2 cores pinned to CPU 0, with and without
# `--stalled bench:lat` (a subscription that is never read, so it lags on every
# broadcast), and `ringcast-loadgen fanout` (1,000 subscribers, 1,000 messages at
# 100/s) pinned to CPU 1. The modes alternate over ROUNDS rounds (default 5); the
# loadgen's JSON reports go to OUT (default /tmp/stalled-subscriber), a table to stdout.
# Loopback only; each run stops by itself (about 15 s).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS=${ROUNDS:-5}
OUT=${OUT:-/tmp/stalled-subscriber}
BIN=target/release/examples/pubsub
LG=target/release/ringcast-loadgen
[ -x "$BIN" ] && [ -x "$LG" ] || cargo build --release -p ringcast --example pubsub -p ringcast-loadgen
mkdir -p "$OUT"
for round in $(seq "$ROUNDS"); do
  for mode in none stalled; do
    port=$((19500 + RANDOM % 400))
    extra=()
    [ "$mode" = stalled ] && extra=(--stalled bench:lat)
    taskset -c 0 "$BIN" --listen "127.0.0.1:$port" "${extra[@]}" >/dev/null 2>"$OUT/server-$mode-$round.log" &
    pid=$!
    for _ in $(seq 50); do grep -q "listening on" "$OUT/server-$mode-$round.log" && break; sleep 0.1; done
    taskset -c 1 "$LG" --quiet --sources 4 fanout --url "ws://127.0.0.1:$port" -n 1000 -m 1000 --rate 100 \
      --topic bench:lat --json "$OUT/$mode-$round.json" >/dev/null
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics as st, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = {}
print("| mode | round | deliveries | loss | p50 ms | p99 ms |\n| --- | ---: | ---: | ---: | ---: | ---: |")
for r in range(1, rounds + 1):
    for m in ("none", "stalled"):
        j = json.load(open(f"{out}/{m}-{r}.json")); l = j["latency"]
        rows.setdefault(m, []).append((l["p50_us"] / 1e3, l["p99_us"] / 1e3, j["loss"]))
        print(f"| {m} | {r} | {j['deliveries']:,} | {j['loss']} | {l['p50_us']/1e3:.2f} | {l['p99_us']/1e3:.2f} |")
for m, v in rows.items():
    print(f"| **{m}, median** | | | {sum(x[2] for x in v)} | {st.median(x[0] for x in v):.2f} | {st.median(x[1] for x in v):.2f} |")
PY
