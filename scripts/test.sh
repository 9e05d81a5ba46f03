#!/usr/bin/env bash
# The whole test suite: install what the tests need, build the server, run the Rust
# tests, then the end-to-end tests (the unmodified `phoenix` npm client, Chromium and a
# real redis-server against `target/debug/ringcast`).
# Runnable from any directory; exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# apt_need COMMAND PACKAGE: install PACKAGE when COMMAND is missing. The tests that use
# it fail, not skip, without it.
apt_need() {
  command -v "$1" >/dev/null && return
  echo "==> apt-get install $2"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2"
}
apt_need chromium chromium          # tests/e2e/browser.test.mjs
apt_need redis-server redis-server  # tests/e2e/cluster.test.mjs
apt_need openssl openssl            # tests/e2e/tls.test.mjs (the test CA)

e2e=tests/e2e
# npm writes node_modules/.package-lock.json on every install: reinstall when it is
# missing or older than the lockfile.
if [ ! -f "$e2e/node_modules/.package-lock.json" ] || [ "$e2e/package-lock.json" -nt "$e2e/node_modules/.package-lock.json" ]; then
  echo "==> npm ci ($e2e)"
  (cd "$e2e" && npm ci --no-audit --no-fund)
fi

python3 scripts/check-layers.py

echo "==> cargo build -p ringcast (and its examples: tests/e2e/pubsub.test.mjs runs one)"
cargo build -p ringcast --bins --examples

# The fuzz targets are a workspace of their own (they need libFuzzer to run); checking
# that they still build keeps them in step with the engine's API.
echo "==> cargo check (engine/fuzz)"
cargo check --manifest-path engine/fuzz/Cargo.toml --bins

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> end-to-end tests"
export RINGCAST_BIN="${RINGCAST_BIN:-$PWD/target/debug/ringcast}"
node --test --test-concurrency=1 "$e2e"/
