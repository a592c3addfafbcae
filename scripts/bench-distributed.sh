#!/usr/bin/env bash
# Data parallelism on this machine: weaver SFT steps of the quickstart config (SmolLM2-135M,
# arith) as 1 rank × 2 threads against 2 ranks × 1 thread over the same global batch
# (per-device 4 on one rank = per-device 2 on each of two), and the gradient all-reduce time
# per step. Needs the `mpi` build (OpenMPI installed, as scripts/test.sh sets up).
#   STEPS=6 BATCH=4 OUT=runs/bench-distributed scripts/bench-distributed.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

STEPS=${STEPS:-6}
BATCH=${BATCH:-4}
OUT=${OUT:-runs/bench-distributed}
CONFIG=${CONFIG:-configs/quickstart.yaml}
# The MPI build has a target directory of its own (as in scripts/test.sh); MPI_TARGET_DIR moves it.
export CARGO_TARGET_DIR="${MPI_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/mpi}"
cargo build --release --locked --quiet --features mpi --bin memgen
BIN="$CARGO_TARGET_DIR/release/memgen"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
rm -rf "$OUT"
mkdir -p "$OUT"

# run NAME PER_DEVICE LAUNCH...: one SFT run; prints its wall seconds per step (model loading
# included, the same in both).
run() {
    local name=$1 per_device=$2
    shift 2
    local start end
    start=$(date +%s.%N)
    MEMGEN_LOG=memgen::distributed=debug "$@" weaver-train --config "$CONFIG" \
        --output-dir "$OUT/$name" --options run.weaver.sft.max_steps "$STEPS" \
        run.weaver.sft.per_device_train_batch_size "$per_device" \
        run.weaver.sft.gradient_accumulation_steps 1 run.weaver.sft.eval_strategy no \
        >"$OUT/$name.out" 2>"$OUT/$name.err"
    end=$(date +%s.%N)
    awk -v s="$start" -v e="$end" -v n="$STEPS" 'BEGIN { printf "%.2f", (e - s) / n }'
}

one=$(run one-rank "$BATCH" "$BIN" --threads 2)
two=$(run two-ranks $((BATCH / 2)) mpirun -q --oversubscribe --bind-to none --mca btl self,vader \
    -np 2 "$BIN" --threads 1)
# The log's fields, without its colours. An all-reduce's time includes waiting for the slower
# rank, so the median of both ranks' updates is reported.
log=$(sed 's/\x1b\[[0-9;]*m//g' "$OUT/two-ranks.err")
reduce=$(grep -o 'seconds=[0-9.e-]*' <<<"$log" | cut -d= -f2 | sort -g |
    awk '{ v[n++] = $1 } END { if (n) printf "%.4f", v[int(n / 2)]; else print "n/a" }')
values=$(grep -o 'values=[0-9]*' <<<"$log" | head -1 | cut -d= -f2)
echo "weaver SFT, $STEPS steps of global batch $BATCH (wall time incl. model load, per step):"
echo "  1 rank  x 2 threads: ${one}s/step"
echo "  2 ranks x 1 thread : ${two}s/step"
echo "  gradient all-reduce (median): ${reduce}s/step over ${values:-?} f32 values ($(( ${values:-0} * 4 )) bytes)"
