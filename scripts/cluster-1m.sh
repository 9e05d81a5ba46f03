#!/usr/bin/env bash
# The many-node cluster run: builds the release binaries, then `ringcast-bench cluster "$@"` (see its --help).
set -euo pipefail; cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo build --release -p ringcast -p ringcast-loadgen -p ringcast-bench
exec "${CARGO_TARGET_DIR:-target}/release/ringcast-bench" cluster "$@"
