#!/usr/bin/env bash
# Runs every cargo-fuzz target of engine/fuzz for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]      # default 60
#   FUZZ_TARGETS="ws_frames presence" scripts/fuzz.sh 30
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer instrumentation needs nightly
# flags; on a stable toolchain RUSTC_BOOTSTRAP=1 unlocks them (set here). Targets are
# built as cargo-fuzz does by default: optimised, with debug assertions, overflow checks
# and AddressSanitizer.
#
# Each target keeps its corpus under engine/fuzz/corpus/<target>/ (git-ignored); a crash
# is saved by libFuzzer under engine/fuzz/artifacts/<target>/ (kept). FUZZ_NO_BUILD=1
# skips the build (binaries from an earlier `cargo fuzz build`). Exit status: 0 when
# no target crashed, 1 when one did (the others still run), 2 when the build failed.
set -uo pipefail

SECS="${1:-60}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/engine/fuzz"
TARGETS="${FUZZ_TARGETS:-ws_frames decode_v1 decode_v2 decode_binary http_request socket_events presence}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
  exit 2
fi

cd "$FUZZ"
BIN="$FUZZ/target/x86_64-unknown-linux-gnu/release"
if [ -z "${FUZZ_NO_BUILD:-}" ]; then
  echo "== building fuzz targets (cargo fuzz build)"
  if ! cargo fuzz build 2>&1 | tail -n 3; then
    echo "build failed" >&2
    exit 2
  fi
fi
for t in $TARGETS; do
  if [ ! -x "$BIN/$t" ]; then
    echo "no binary for $t under $BIN (build failed?)" >&2
    exit 2
  fi
done

LOGDIR="$FUZZ/logs"
mkdir -p "$LOGDIR"
failed=()
for t in $TARGETS; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${SECS}s"
  # -rss_limit_mb: a target that allocates without bound is a finding too.
  # -timeout: one input taking over 10 s is reported as a crash (slow-unit).
  # The binary directly (what `cargo fuzz run` runs, without a cargo call per target).
  "$BIN/$t" "corpus/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      >"$LOGDIR/$t.log" 2>&1
  status=$?
  execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$LOGDIR/$t.log" | grep -Eo '[0-9]+$' | tail -n1)
  cov=$(grep -Eo 'cov: [0-9]+' "$LOGDIR/$t.log" | tail -n1)
  if [ "$status" -ne 0 ]; then
    echo "   CRASH ($t, exit $status), ${execs:-?} runs; log: $LOGDIR/$t.log"
    grep -E "panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer|SUMMARY|Test unit written" "$LOGDIR/$t.log" | head -n 8 | sed 's/^/   /'
    for a in artifacts/"$t"/*; do
      [ -f "$a" ] && echo "   artifact $a: $(head -c 256 "$a" | xxd -p | tr -d '\n')"
    done
    failed+=("$t")
  else
    echo "   ok: ${execs:-?} runs, ${cov:-cov ?}"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]} (artifacts under engine/fuzz/artifacts/)"
  exit 1
fi
echo "no crash in: $TARGETS"
