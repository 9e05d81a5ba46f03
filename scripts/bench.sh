#!/usr/bin/env bash
# The whole benchmark in one command (issue 5): ringcast vs the floor vs the tokio peer,
# side by side in one run, plus the criterion microbenchmarks.
#
#   scripts/bench.sh [--quick|--full] [extra ringcast-bench options]
#
#   --quick (default)  1 repeat; 1k, 5k, 10k subscribers; 1 server core. Under 5 minutes
#                      once the release binaries are built.
#   --full             3 repeats; 1k, 5k, 10k, 19k subscribers; 1 and 2 server cores.
#
# Builds the release binaries, takes the exclusive lock /tmp/ringcast-heavy.lock (so
# two load tests never share the machine), runs the criterion microbenches in quick
# mode, then `ringcast-bench`, which writes results/<YYYY-MM-DD>-<host>/ (results.json,
# raw loadgen reports, PNG plots, README.md) and regenerates results/README.md.
# Extra options go to ringcast-bench (see `target/release/ringcast-bench --help`), e.g.
#   scripts/bench.sh --quick --sizes 1000,2000 --servers ringcast,floor
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=--quick
case "${1:-}" in
  --quick | --full) mode=$1; shift ;;
  -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

for tool in taskset flock cargo; do
  command -v "$tool" >/dev/null || { echo "bench.sh: $tool not found (taskset and flock come with util-linux)" >&2; exit 1; }
done

echo "==> cargo build --release -p ringcast -p ringcast-loadgen -p ringcast-bench"
cargo build --release -p ringcast -p ringcast-loadgen -p ringcast-bench
echo "==> cargo bench --no-run (build the microbenches before taking the lock)"
cargo bench -p ringcast-bench --bench hot_paths --no-run

exec 9>/tmp/ringcast-heavy.lock
if ! flock -n 9; then
  echo "==> waiting for /tmp/ringcast-heavy.lock (another load test is running)"
  flock 9
fi

since=$(date +%s)
start=$since
echo "==> criterion microbenches (quick: --warm-up-time 1 --measurement-time 2)"
cargo bench -p ringcast-bench --bench hot_paths -- --warm-up-time 1 --measurement-time 2

echo "==> ringcast-bench $mode"
target/release/ringcast-bench "$mode" --criterion-dir target/criterion --criterion-since "$since" "$@"

echo "==> done in $(($(date +%s) - start)) s (after the build); latest table: results/README.md"
