#!/usr/bin/env bash
# Prefill and decode throughput of the plain backbone on this machine (a benchmark, not a test).
#   SmolLM2-135M: batch 1 and 8; Qwen2.5-Coder-0.5B: batch 1; 128-token prompt, 128 new tokens.
# Env: THREADS (default: all cores), RUNS (default 3, median reported), DTYPE (default f32).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh all >/dev/null
RUNS="${RUNS:-3}"
DTYPE="${DTYPE:-f32}"
if [ -n "${THREADS:-}" ]; then export RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS"; fi
cargo build --release --bench backbone >/dev/null 2>&1 || cargo bench --no-run --bench backbone
echo "# threads: ${THREADS:-all cores}; load before: $(uptime)"
cargo bench -q --bench backbone -- default 1 128 128 "$RUNS" "$DTYPE" 2>/dev/null | grep '^model='
cargo bench -q --bench backbone -- default 8 128 128 "$RUNS" "$DTYPE" 2>/dev/null | grep '^model='
cargo bench -q --bench backbone -- qwen 1 128 128 "$RUNS" "$DTYPE" 2>/dev/null | grep '^model='
echo "# load after: $(uptime)"
