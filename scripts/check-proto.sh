#!/usr/bin/env bash
# The protocol layer stays sans-IO: no runtime, socket, clock or shard in engine/src/proto.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if grep -vE "^[^:]+:[0-9]+:\s*//" <(grep -nE 'glommio|std::net|std::time::(Instant|SystemTime)|crate::(shard|transport|server|api)' engine/src/proto/*.rs); then
  echo "check-proto: engine/src/proto must not use a runtime, sockets, clocks or the layers above it" >&2
  exit 1
fi
echo "check-proto: engine/src/proto is sans-IO"
