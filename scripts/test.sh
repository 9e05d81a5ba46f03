#!/usr/bin/env bash
# The whole test suite: build the server, run the Rust tests, then the end-to-end tests
# (the unmodified `phoenix` npm client against `target/debug/ringcast`).
# Runnable from any directory; exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "==> cargo build -p ringcast"
cargo build -p ringcast

echo "==> cargo test --workspace"
cargo test --workspace

e2e=tests/e2e
# npm writes node_modules/.package-lock.json on every install: reinstall when it is
# missing or older than the lockfile.
if [ ! -f "$e2e/node_modules/.package-lock.json" ] || [ "$e2e/package-lock.json" -nt "$e2e/node_modules/.package-lock.json" ]; then
  echo "==> npm ci ($e2e)"
  (cd "$e2e" && npm ci --no-audit --no-fund)
fi

# The browser tests (tests/e2e/browser.test.mjs) drive Debian's chromium.
if ! command -v chromium >/dev/null; then
  echo "==> apt-get install chromium (for the browser tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  $sudo apt-get install -y chromium
fi

# The cluster tests (tests/e2e/cluster.test.mjs) start a real redis-server; they fail,
# not skip, without one.
if ! command -v redis-server >/dev/null; then
  echo "==> apt-get install redis-server (for the cluster tests)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  command -v redis-server >/dev/null || { $sudo apt-get update && $sudo apt-get install -y redis-server; }
fi

echo "==> end-to-end tests"
export RINGCAST_BIN="${RINGCAST_BIN:-$PWD/target/debug/ringcast}"
node --test --test-concurrency=1 "$e2e"/
