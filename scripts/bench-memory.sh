#!/usr/bin/env bash
# Speed of MemGen's memory paths on SmolLM2-135M (a benchmark, not a test):
#  - decoding, batch 1 and 4, 256 new tokens, greedy: plain vs with memory (nano trigger, 1 prompt +
#    5 inference memories spread over the answer: at least GAP tokens apart) vs the literal
#    reference implementation (recomputes everything; timed on its first REF_NEW tokens since it
#    is quadratic);
#  - one teacher-forced forward+backward on 4 GSM8K samples: memgen vs the literal reference,
#    each with its peak RSS.
# Env: THREADS (default: all cores), NEW (256), REF_NEW (48), GAP (40), REPS (3: alternating
#      plain / memory pairs per batch size; medians and per-pair ratios are printed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh >/dev/null
NEW="${NEW:-256}"
REF_NEW="${REF_NEW:-48}"
if [ -n "${THREADS:-}" ]; then export RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS"; fi
cargo bench --no-run --bench memory >/dev/null 2>&1
bin=$(ls -t target/release/deps/memory-* | grep -v '\.d$' | head -1)
echo "# load before: $(uptime)"
for b in 1 4; do "$bin" decode "$b" "$NEW" "$REF_NEW"; done
for w in sft sft-ref; do
  /usr/bin/time -v "$bin" "$w" 2> /tmp/memgen-bench-time.txt
  echo "  peak RSS: $(awk -F': ' '/Maximum resident/ {printf "%.2f GiB", $2/1048576}' /tmp/memgen-bench-time.txt)"
done
echo "# load after: $(uptime)"
