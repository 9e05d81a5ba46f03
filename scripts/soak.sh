#!/usr/bin/env bash
# Soak test of a release server: thousands of held connections, join/leave churn, fixed-
# rate fanout, slow readers and reconnect storms for --minutes N (default 10; --minutes 1
# for a CI-style run). Writes results/soak-<date>.json; exits non-zero when the server's
# RSS grew past +20% of its value after warm-up or a healthy client lost a message.
#
#   scripts/soak.sh [--minutes N]
#
# Heavy: run it alone (take `flock /tmp/ringcast-heavy.lock` where others share the box).
# Builds the release server and loadgen when they are missing; set SOAK_NO_BUILD=1 to
# skip that. Tuning (env): SOAK_HOLD (5000 held connections), SOAK_CHURNERS (100),
# SOAK_NODE_SUBS (200), SOAK_FAN_SUBS (1000), SOAK_FAN_RATE (100 msg/s).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${SOAK_NO_BUILD:-}" ] && { [ ! -x target/release/ringcast ] || [ ! -x target/release/ringcast-loadgen ]; }; then
  cargo build --release -p ringcast -p ringcast-loadgen
fi
if [ ! -d tests/e2e/node_modules/ws ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi
# Held connections + storms + fanout need file descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec node scripts/soak.mjs "$@"
