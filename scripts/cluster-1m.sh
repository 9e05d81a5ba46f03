#!/usr/bin/env bash
# The million-connection cluster run on one box.
#
#   scripts/cluster-1m.sh [--target N] [--sweep "10000 50000 100000"] [--per-node 19000]
#                         [--rate CONN_PER_S] [--heartbeat SECS] [--time-limit SECS] [--min-free-gb G]
#                         [--base-port P] [--sources K] [--out DIR] [--check-only]
#
# For every size N (the --sweep sizes in order, else --target, default 1,000,000):
#   - redis-server, then K = ceil(N / per-node) `ringcast serve --cores 1 --redis ...`
#     nodes on 127.0.0.1 ports P..P+K-1 (release build), each re-pinned to CPU i mod ncpu;
#   - one `ringcast-loadgen connect` per node (it splits into worker processes by
#     itself past its fd limit and rotates source addresses 127.0.0.2..), all joining the
#     same `bench:cluster-<N>` topic and holding; the loadgen targets one URL per run,
#     so the K runs go in parallel and their JSON reports are combined;
#   - once every subscriber is joined, one broadcast through node 0's HTTP API
#     (`new_msg`, body "1:<send unix nanos>"), counted by the nodes' /api/stats
#     `deliveries` and timed by a few timing subscribers per node;
#   - every connection heartbeats every --heartbeat seconds (default 300; the nodes run
#     with --idle-timeout twice that). Phoenix's 30 s default would be 33,000 heartbeat
#     round trips a second at 1M connections, most of a 2-core box by itself;
#   - results in DIR/size-N/ (each loadgen's JSON, memory samples, log tails,
#     summary.json) and DIR/README.md.
#
# It checks the host first and says what is missing instead of failing midway; sizes
# that do not fit in memory or time are skipped with a note. It stops a size when
# MemAvailable falls below --min-free-gb (default 3), bounds the whole run by
# --time-limit (default 1800 s), and always stops every process it started. Sizes above
# 50,000 take the lock /tmp/ringcast-heavy.lock first (other benchmarks on this box use
# it too). All traffic stays on 127.0.0.0/8.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
HELPER="$ROOT/scripts/cluster_1m_helper.py"
SERVER_BIN="${RINGCAST_BIN_RELEASE:-$ROOT/target/release/ringcast}"
LOADGEN_BIN="${RINGCAST_LOADGEN_BIN:-$ROOT/target/release/ringcast-loadgen}"

TARGET=1000000
SWEEP=""
PER_NODE=19000
RATE=2500
HEARTBEAT=300
TIME_LIMIT=1800
MIN_FREE_GB=3
BASE_PORT=4700
SOURCES=64
OUT=""
CHECK_ONLY=0
# Whole-box memory per connection assumed by the host check (servers, loadgens and
# both kernel sockets); refined by the measured figure of each finished size.
EST_BYTES_PER_CONN=$((21 * 1024))
SECRET="cluster-1m-secret"
API_KEY="cluster-1m-key"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --sweep) SWEEP="$2"; shift 2 ;;
    --per-node) PER_NODE="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --heartbeat) HEARTBEAT="$2"; shift 2 ;;
    --time-limit) TIME_LIMIT="$2"; shift 2 ;;
    --min-free-gb) MIN_FREE_GB="$2"; shift 2 ;;
    --base-port) BASE_PORT="$2"; shift 2 ;;
    --sources) SOURCES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --check-only) CHECK_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "cluster-1m: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
done

SIZES="${SWEEP:-$TARGET}"
for n in $SIZES $PER_NODE $RATE $HEARTBEAT $TIME_LIMIT; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -gt 0 ] || { echo "cluster-1m: not a positive integer: $n" >&2; exit 1; }
done
MAXN=0; for n in $SIZES; do [ "$n" -gt "$MAXN" ] && MAXN=$n; done
START=$(date +%s)
DEADLINE=$((START + TIME_LIMIT))
[ -n "$OUT" ] || OUT="results/cluster-$(date +%Y-%m-%d-%H%M%S)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REDIS_PORT=$((BASE_PORT + 1000))
MIN_FREE_BYTES=$((MIN_FREE_GB * 1024 * 1024 * 1024))
NCPU=$(nproc)

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log" >&2; }
now() { date +%s.%N; }
mem_available() { echo $(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 )); }
left() { echo $((DEADLINE - $(date +%s))); }

# ---------------------------------------------------------------------------
# Processes we started, and their cleanup
# ---------------------------------------------------------------------------

NODE_PIDS=()
LG_PIDS=()
REDIS_PID=""
SAMPLER_PID=""

kill_tree() { # pid signal: the process and its children (loadgen workers)
  local pid=$1 sig=$2 c
  for c in $(pgrep -P "$pid" 2>/dev/null); do kill "-$sig" "$c" 2>/dev/null; done
  kill "-$sig" "$pid" 2>/dev/null
}

stop_loadgens() {
  local p
  for p in "${LG_PIDS[@]}"; do kill_tree "$p" TERM; done
  sleep 0.5
  for p in "${LG_PIDS[@]}"; do kill_tree "$p" KILL; done
  for p in "${LG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
  LG_PIDS=()
}

stop_nodes() {
  local p i
  for p in "${NODE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for i in $(seq 1 50); do
    local alive=0
    for p in "${NODE_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  for p in "${NODE_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  NODE_PIDS=()
  if [ -n "$REDIS_PID" ]; then
    kill -KILL "$REDIS_PID" 2>/dev/null; wait "$REDIS_PID" 2>/dev/null
    REDIS_PID=""
  fi
}

cleanup() {
  [ -n "$SAMPLER_PID" ] && { kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; }
  stop_loadgens
  stop_nodes
}
trap cleanup EXIT
trap 'log "interrupted; cleaning up"; exit 130' INT TERM HUP

# ---------------------------------------------------------------------------
# Host check
# ---------------------------------------------------------------------------

PROBLEMS=()
WARNINGS=()
problem() { PROBLEMS+=("$1"); }
warning() { WARNINGS+=("$1"); }

check_host() {
  local soft hard lo hi width need_pairs filemax somax avail need k
  [ -x "$SERVER_BIN" ] || problem "no $SERVER_BIN: build it with 'cargo build --release -p ringcast -p ringcast-loadgen'"
  [ -x "$LOADGEN_BIN" ] || problem "no $LOADGEN_BIN: build it with 'cargo build --release -p ringcast -p ringcast-loadgen'"
  command -v redis-server >/dev/null || problem "redis-server is not installed (apt-get install -y redis-server)"
  command -v python3 >/dev/null || problem "python3 is missing (the helper scripts/cluster_1m_helper.py needs it)"
  command -v jq >/dev/null || problem "jq is missing (apt-get install -y jq)"
  command -v node >/dev/null || problem "node is missing (scripts/cluster-sampler.mjs needs it)"
  [ -d tests/e2e/node_modules/ws ] || problem "tests/e2e/node_modules/ws is missing: run 'npm ci' in tests/e2e (the timing subscribers use it)"
  command -v taskset >/dev/null || warning "taskset missing: every --cores 1 node stays pinned to CPU 0"

  ulimit -n "$(ulimit -Hn)" 2>/dev/null
  soft=$(ulimit -n); hard=$(ulimit -Hn)
  if [ "$soft" != unlimited ] && [ "$soft" -lt $((PER_NODE + 300)) ]; then
    problem "ulimit -n is $soft (hard $hard): a node holds --per-node $PER_NODE connections plus ~300 fds; lower --per-node to $((soft - 300)) or raise the limit"
  fi
  read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range
  width=$((hi - lo + 1))
  # the loadgen binds with IP_BIND_ADDRESS_NO_PORT: ports are per (source, destination) pair
  need_pairs=$(( (PER_NODE + SOURCES - 1) / SOURCES ))
  if [ "$need_pairs" -gt "$width" ]; then
    problem "ip_local_port_range $lo-$hi gives $width ports per source address and node; $PER_NODE per node over $SOURCES sources needs $need_pairs (raise --sources or widen net.ipv4.ip_local_port_range)"
  fi
  somax=$(cat /proc/sys/net/core/somaxconn)
  [ "$somax" -ge 1024 ] || warning "net.core.somaxconn is $somax; connection bursts may see SYN drops (sysctl -w net.core.somaxconn=4096)"
  filemax=$(cat /proc/sys/fs/file-max)
  if [ "$filemax" -lt $((2 * MAXN + 20000)) ]; then
    problem "fs.file-max is $filemax; $MAXN connections need both ends open: at least $((2 * MAXN + 20000)) (sysctl -w fs.file-max=$((2 * MAXN + 100000)))"
  fi
  if [ -r /proc/sys/net/netfilter/nf_conntrack_count ]; then
    local ct; ct=$(cat /proc/sys/net/netfilter/nf_conntrack_count)
    [ "$ct" -gt 0 ] && warning "connection tracking is active ($ct entries, max $(cat /proc/sys/net/netfilter/nf_conntrack_max)): loopback connections beyond the max would be dropped"
  fi
  avail=$(mem_available)
  need=$((MAXN * EST_BYTES_PER_CONN + MIN_FREE_BYTES))
  if [ "$avail" -lt "$need" ]; then
    warning "MemAvailable $((avail >> 20)) MiB; $MAXN connections at an assumed $((EST_BYTES_PER_CONN / 1024)) KiB each (both ends, servers, loadgens, kernel) plus the ${MIN_FREE_GB} GiB reserve need $((need >> 20)) MiB: sizes that do not fit are skipped"
  fi
  k=$(( (MAXN + PER_NODE - 1) / PER_NODE ))
  if [ "$k" -gt 250 ]; then
    problem "$MAXN connections at --per-node $PER_NODE need $k nodes (ports $BASE_PORT..); raise --per-node"
  fi
  local p busy=""
  for p in $(seq "$BASE_PORT" $((BASE_PORT + k - 1))) "$REDIS_PORT"; do
    ss -Hltn "sport = :$p" 2>/dev/null | grep -q . && busy="$busy $p"
  done
  [ -z "$busy" ] || problem "ports in use:$busy (pick another --base-port)"
  if [ -x scripts/tune-host.sh ]; then
    [ ${#PROBLEMS[@]} -eq 0 ] && [ ${#WARNINGS[@]} -eq 0 ] || warning "scripts/tune-host.sh exists: run it to fix the host settings above"
  fi
  local summary="ncpu $NCPU, MemAvailable $((avail >> 20)) MiB, ulimit -n $soft/$hard, ports $lo-$hi, somaxconn $somax, file-max $filemax"
  {
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host=$(uname -srm), $summary"
    echo "host_check=$summary; problems: ${PROBLEMS[*]:-none}; warnings: ${WARNINGS[*]:-none}"
  } > "$OUT/host.env"
  log "host: $summary"
  local w; for w in "${WARNINGS[@]}"; do log "WARNING: $w"; done
  for w in "${PROBLEMS[@]}"; do log "MISSING: $w"; done
}

# ---------------------------------------------------------------------------
# One size
# ---------------------------------------------------------------------------

wait_logs() { # pattern count timeout_s files...
  local pat=$1 want=$2 limit=$3; shift 3
  local end=$(( $(date +%s) + limit )) n
  while :; do
    n=0
    for f in "$@"; do grep -q "$pat" "$f" 2>/dev/null && n=$((n + 1)); done
    [ "$n" -ge "$want" ] && return 0
    [ "$(date +%s)" -ge "$end" ] && { echo "$n"; return 1; }
    sleep 0.2
  done
}

run_size() {
  local N=$1
  local DIR="$OUT/size-$N"
  mkdir -p "$DIR/logs" "$DIR/samples"
  : > "$DIR/run.env"
  local K=$(( (N + PER_NODE - 1) / PER_NODE ))
  local rate=$RATE
  setenv() { echo "$1=$2" >> "$DIR/run.env"; }
  setenv size "$N"; setenv nodes "$K"; setenv per_node "$PER_NODE"; setenv rate "$rate"
  finish_size() { # outcome notes
    setenv outcome "$1"; setenv notes "${2:-}"
    log "size $N: $1${2:+ — $2}"
    [ -n "$SAMPLER_PID" ] && { kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=""; }
    stop_loadgens
    stop_nodes
    local f
    for f in "$DIR"/logs/*.log; do [ -f "$f" ] && { tail -c 20000 "$f" > "$f.tail"; mv "$f.tail" "$f"; }; done
    python3 "$HELPER" summarize --dir "$DIR" | tee -a "$OUT/run.log" >&2
  }

  # Time and memory budget.
  local ramp_s=$(( N / rate + 1 ))
  local need_s=$(( ramp_s * 3 / 2 + 90 ))
  if [ "$(left)" -lt "$need_s" ]; then
    finish_size "skipped" "needs about ${need_s}s (ramp ${ramp_s}s at $rate/s), only $(left)s left of --time-limit $TIME_LIMIT"
    return 1
  fi
  local avail; avail=$(mem_available)
  if [ $((avail * 3 / 2)) -lt $((N * EST_BYTES_PER_CONN + MIN_FREE_BYTES)) ]; then
    finish_size "skipped" "needs about $(( (N * EST_BYTES_PER_CONN + MIN_FREE_BYTES) >> 20 )) MiB (at $((EST_BYTES_PER_CONN / 1024)) KiB per connection + ${MIN_FREE_GB} GiB reserve), MemAvailable is $((avail >> 20)) MiB"
    return 1
  fi
  if [ "$avail" -lt $((N * EST_BYTES_PER_CONN + MIN_FREE_BYTES)) ]; then
    log "size $N: may not fit: about $(( (N * EST_BYTES_PER_CONN) >> 20 )) MiB at $((EST_BYTES_PER_CONN / 1024)) KiB per connection, MemAvailable $((avail >> 20)) MiB; trying, and stopping if MemAvailable falls below ${MIN_FREE_GB} GiB"
  fi
  log "size $N: $K node(s) of <= $PER_NODE, connect rate $rate/s, $(left)s left"

  # Redis.
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --maxclients 4000 \
    > "$DIR/logs/redis.log" 2>&1 < /dev/null &
  REDIS_PID=$!
  if ! wait_logs "Ready to accept connections" 1 10 "$DIR/logs/redis.log" >/dev/null; then
    finish_size "failed" "redis-server did not start on port $REDIS_PORT (see logs/redis.log)"
    return 1
  fi

  # Nodes.
  local i port ports=() files=()
  for i in $(seq 0 $((K - 1))); do
    port=$((BASE_PORT + i))
    "$SERVER_BIN" serve --listen "127.0.0.1:$port" --cores 1 --secret "$SECRET" --api-key "$API_KEY" \
      --redis "redis://127.0.0.1:$REDIS_PORT" --node-name "c1m-$i" --idle-timeout "$((HEARTBEAT * 2))s" \
      > "$DIR/logs/node-$i.log" 2>&1 < /dev/null &
    NODE_PIDS+=($!)
    ports+=("$port"); files+=("$DIR/logs/node-$i.log")
  done
  local got
  if ! got=$(wait_logs "listening on" "$K" $((20 + K / 2)) "${files[@]}"); then
    finish_size "failed" "only $got of $K nodes started listening (see logs/node-*.log)"
    return 1
  fi
  if ! got=$(wait_logs "Redis link up" "$K" 20 "${files[@]}"); then
    finish_size "failed" "only $got of $K nodes got their Redis link up"
    return 1
  fi
  if command -v taskset >/dev/null; then
    for i in $(seq 0 $((K - 1))); do taskset -a -p -c $((i % NCPU)) "${NODE_PIDS[$i]}" > /dev/null 2>&1; done
  fi
  local node_pids_csv; node_pids_csv=$(IFS=,; echo "${NODE_PIDS[*]}")
  local ports_csv; ports_csv=$(IFS=,; echo "${ports[*]}")
  python3 "$HELPER" sample --nodes "$node_pids_csv" --redis-pid "$REDIS_PID" > "$DIR/samples/before.json"

  # Loadgens (`connect`), one per node: ramp, then hold while the broadcast is measured.
  local topic="bench:cluster-$N"
  local per_rate base=$((N / K)) extra=$((N % K)) n
  per_rate=$(python3 -c "print(max(1.0, $rate / $K))")
  local hold=$(( 40 + ramp_s / 5 ))
  setenv hold_s "$hold"
  local lgfiles=()
  setenv t_loadgen_start "$(now)"
  for i in $(seq 0 $((K - 1))); do
    n=$base; [ "$i" -lt "$extra" ] && n=$((n + 1))
    RINGCAST_SECRET="$SECRET" "$LOADGEN_BIN" connect --url "ws://127.0.0.1:${ports[$i]}" -n "$n" \
      --topic "$topic" --rate "$per_rate" --hold "${hold}s" --stage-timeout 120s --heartbeat "${HEARTBEAT}s" \
      --sources "$SOURCES" --server-pid "${NODE_PIDS[$i]}" --quiet \
      --json "$DIR/lg-$i.json" > "$DIR/logs/lg-$i.out" 2> "$DIR/logs/lg-$i.log" < /dev/null &
    LG_PIDS+=($!)
    lgfiles+=("$DIR/logs/lg-$i.log")
  done
  local lg_pids_csv; lg_pids_csv=$(IFS=,; echo "${LG_PIDS[*]}")

  # Ramp: wait until every loadgen says its connections are up ("up: ... holding").
  local ramp_deadline=$(( $(date +%s) + ramp_s * 3 + 120 ))
  local last_progress=0 up_count dead
  while :; do
    up_count=$(grep -l "holding" "${lgfiles[@]}" 2>/dev/null | wc -l)
    if [ "$up_count" -ge "$K" ]; then break; fi
    avail=$(mem_available)
    if [ "$avail" -lt "$MIN_FREE_BYTES" ]; then
      python3 "$HELPER" sample --nodes "$node_pids_csv" --loadgens "$lg_pids_csv" --stats-ports "$ports_csv" --api-key "$API_KEY" > "$DIR/samples/abort.json"
      finish_size "aborted" "MemAvailable fell to $((avail >> 20)) MiB (< ${MIN_FREE_GB} GiB) during the ramp with $(jq .api_stats.connections "$DIR/samples/abort.json") connections on the nodes"
      return 1
    fi
    dead=""
    for i in $(seq 0 $((K - 1))); do kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || dead="$dead $i"; done
    if [ -n "$dead" ]; then
      finish_size "failed" "node(s)$dead exited during the ramp (see logs/node-*.log)"
      return 1
    fi
    for i in $(seq 0 $((K - 1))); do
      if ! kill -0 "${LG_PIDS[$i]}" 2>/dev/null && ! grep -q "holding" "${lgfiles[$i]}"; then
        finish_size "failed" "loadgen $i exited before its ramp finished: $(tail -n 3 "${lgfiles[$i]}" | tr '\n' ' ')"
        return 1
      fi
    done
    if [ "$(date +%s)" -ge "$ramp_deadline" ] || [ "$(left)" -le 30 ]; then
      finish_size "failed" "ramp did not finish in time ($up_count of $K loadgens up)"
      return 1
    fi
    if [ $(( $(date +%s) - last_progress )) -ge 10 ]; then
      last_progress=$(date +%s)
      python3 "$HELPER" sample --nodes "$node_pids_csv" --stats-ports "$ports_csv" --api-key "$API_KEY" > "$DIR/samples/progress.json"
      log "  ramp: $(jq .api_stats.connections "$DIR/samples/progress.json") connections on the nodes, $up_count/$K loadgens up, MemAvailable $((avail >> 20)) MiB, servers' RSS $(( $(jq .server_rss_bytes "$DIR/samples/progress.json") >> 20 )) MiB"
    fi
    sleep 0.3
  done
  setenv t_all_joined "$(now)"
  python3 "$HELPER" sample --nodes "$node_pids_csv" --loadgens "$lg_pids_csv" --redis-pid "$REDIS_PID" \
    --stats-ports "$ports_csv" --api-key "$API_KEY" > "$DIR/samples/full.json"
  log "  all up: $(grep -h "^up:" "${lgfiles[@]}" | awk '{j+=$2; f+=$4} END {print j " joined, " f " failed"}'); $(jq .api_stats.connections "$DIR/samples/full.json") connections on the nodes; MemAvailable $(( $(mem_available) >> 20 )) MiB"

  # Timing subscribers, joined last on every node.
  local samplers_per_node=$(( 2000 / K )); [ "$samplers_per_node" -gt 20 ] && samplers_per_node=20
  [ "$samplers_per_node" -lt 2 ] && samplers_per_node=2
  node "$ROOT/scripts/cluster-sampler.mjs" --ports "$ports_csv" --topic "$topic" --secret "$SECRET" \
    --per-node "$samplers_per_node" --timeout-ms 45000 > "$DIR/sampler.out" 2> "$DIR/logs/sampler.log" < /dev/null &
  SAMPLER_PID=$!
  local t_s=$(( $(date +%s) + 40 ))
  until grep -q '"ev":"ready"' "$DIR/sampler.out" 2>/dev/null; do
    if ! kill -0 "$SAMPLER_PID" 2>/dev/null || [ "$(date +%s)" -ge "$t_s" ]; then
      finish_size "failed" "the timing subscribers did not get ready: $(tail -c 300 "$DIR/logs/sampler.log" | tr '\n' ' ')"
      return 1
    fi
    sleep 0.2
  done
  local sjoined; sjoined=$(grep '"ev":"ready"' "$DIR/sampler.out" | jq .joined)
  log "  $sjoined timing subscribers joined ($samplers_per_node per node)"
  # A node's Redis SUBSCRIBE is asynchronous; the topic is long subscribed on every node
  # by now, but give the last joins a moment anyway.
  sleep 1

  # One broadcast through node 0's HTTP API.
  python3 "$HELPER" deliveries --ports "$ports_csv" --api-key "$API_KEY" > "$DIR/deliveries-before.json"
  local expected
  expected=$(( $(jq '.api_stats.connections' "$DIR/samples/full.json") + sjoined ))
  python3 "$HELPER" deliveries --ports "$ports_csv" --api-key "$API_KEY" --before "$DIR/deliveries-before.json" \
    --expected "$expected" --broadcast-port "${ports[0]}" --topic "$topic" --broadcast-out "$DIR/broadcast.json" \
    --timeout 40 > "$DIR/deliveries.json"
  log "  broadcast via node 0: $(cat "$DIR/broadcast.json")"
  log "  server deliveries: $(jq -c '{expected, delivered, seen_complete_after_s}' "$DIR/deliveries.json")"
  local t_w=$(( $(date +%s) + 50 ))
  while kill -0 "$SAMPLER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$t_w" ]; do sleep 0.2; done
  kill "$SAMPLER_PID" 2>/dev/null; wait "$SAMPLER_PID" 2>/dev/null; SAMPLER_PID=""
  grep '"ev":"result"' "$DIR/sampler.out" > "$DIR/sampler.json" || true
  log "  timing subscribers: $(jq -c '{received, missing, extra_deliveries, latency}' "$DIR/sampler.json" 2>/dev/null)"

  # The loadgens end after their hold and write their reports.
  local end=$(( $(date +%s) + hold + 60 )) running
  while :; do
    running=0
    for i in $(seq 0 $((K - 1))); do kill -0 "${LG_PIDS[$i]}" 2>/dev/null && running=$((running + 1)); done
    [ "$running" -eq 0 ] && break
    if [ "$(date +%s)" -ge "$end" ] || [ "$(left)" -le 10 ]; then
      log "  $running loadgen(s) still running after their hold; stopping them (no report from those)"
      break
    fi
    sleep 0.5
  done
  for i in $(seq 0 $((K - 1))); do wait "${LG_PIDS[$i]}" 2>/dev/null; done
  python3 "$HELPER" sample --nodes "$node_pids_csv" --redis-pid "$REDIS_PID" > "$DIR/samples/after.json"
  local joined_all held
  joined_all=$(cat "$DIR"/lg-*.json 2>/dev/null | jq -s 'map(.joined) | add // 0')
  held=$(cat "$DIR"/lg-*.json 2>/dev/null | jq -s 'map(.connected_at_hold_end) | add // 0')
  if [ "$joined_all" -ge "$N" ] && [ "$held" -ge "$N" ] && [ "$(jq .complete "$DIR/deliveries.json")" = true ] \
     && [ "$(jq .missing "$DIR/sampler.json" 2>/dev/null)" = 0 ]; then
    finish_size "ok" ""
  else
    finish_size "incomplete" "$joined_all of $N joined, $held still connected at the end of the hold, server deliveries $(jq -c '{expected, delivered}' "$DIR/deliveries.json"), timing subscribers missing $(jq .missing "$DIR/sampler.json" 2>/dev/null)"
  fi
  # Refine the memory estimate for the next sizes from what this one used.
  local per
  per=$(jq -r '.memory_per_connection | if . then (.server_rss_bytes + .loadgen_rss_bytes + .kernel_slab_bytes + .kernel_tcp_mem_bytes) else empty end' "$DIR/summary.json" 2>/dev/null)
  if [ -n "$per" ]; then
    per=${per%.*}
    if [ "$per" -gt 0 ]; then
      EST_BYTES_PER_CONN=$(( per * 11 / 10 ))
      log "  measured $((per / 1024)) KiB per connection (server + loadgen RSS + kernel); next sizes assume $((EST_BYTES_PER_CONN / 1024)) KiB"
    fi
  fi
  return 0
}

# ---------------------------------------------------------------------------

log "cluster-1m: sizes [$SIZES], --per-node $PER_NODE, --rate $RATE/s, --time-limit ${TIME_LIMIT}s, results in $OUT"
check_host
if [ ${#PROBLEMS[@]} -gt 0 ]; then
  log "the host is not ready (see MISSING above); nothing was started"
  exit 1
fi
[ "$CHECK_ONLY" -eq 1 ] && { log "host check only: ready"; exit 0; }

status=0
LOCKED=0
for N in $SIZES; do
  if [ "$(left)" -le 60 ]; then
    log "size $N: skipped, $(left)s left of the time limit"
    mkdir -p "$OUT/size-$N"; printf 'size=%s\nnodes=%s\noutcome=skipped\nnotes=time limit reached\n' "$N" $(( (N + PER_NODE - 1) / PER_NODE )) > "$OUT/size-$N/run.env"
    python3 "$HELPER" summarize --dir "$OUT/size-$N" >/dev/null
    continue
  fi
  if [ "$N" -gt 50000 ] && [ "$LOCKED" -eq 0 ]; then
    log "taking /tmp/ringcast-heavy.lock (sizes above 50,000) ..."
    exec 9>/tmp/ringcast-heavy.lock
    if ! flock -w "$(( $(left) > 60 ? $(left) - 60 : 1 ))" 9; then
      log "could not take /tmp/ringcast-heavy.lock within the time limit (another benchmark holds it); sizes from $N on not run"
      for M in $SIZES; do
        [ "$M" -ge "$N" ] || continue
        mkdir -p "$OUT/size-$M"; printf 'size=%s\nnodes=%s\noutcome=not run\nnotes=/tmp/ringcast-heavy.lock held by another benchmark until the time limit\n' "$M" $(( (M + PER_NODE - 1) / PER_NODE )) > "$OUT/size-$M/run.env"
        python3 "$HELPER" summarize --dir "$OUT/size-$M" >/dev/null
      done
      status=1
      break
    fi
    LOCKED=1
    log "lock taken"
  fi
  run_size "$N" || status=1
done
python3 "$HELPER" readme --out "$OUT" | tee -a "$OUT/run.log" >&2
log "done in $(( $(date +%s) - START ))s"
exit $status
