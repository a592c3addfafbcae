#!/usr/bin/env bash
# The README's main job: fetch the embedded default model (SmolLM2-135M-Instruct), train a weaver by
# SFT on the built-in offline `arith` task (configs/quickstart.yaml), then evaluate the vanilla
# reasoner and the reasoner + weaver on held-out problems and print both accuracies.
# Env: OUT (default runs/quickstart), EVAL_ROWS (default 64), THREADS, SFT_STEPS (default: the
# config's 36; a small value is a smoke run). Needs nothing outside the repository but the model
# download (or MEMGEN_MODELS_DIR holding it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-runs/quickstart}"
EVAL_ROWS="${EVAL_ROWS:-64}"
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi

scripts/fetch-model.sh
cargo build --release --quiet
memgen="${CARGO_TARGET_DIR:-target}/release/memgen"   # where cargo just built it
start=$(date +%s)

echo "== 1/3 weaver SFT on arith (configs/quickstart.yaml) -> $OUT/weaver"
steps=()
if [ -n "${SFT_STEPS:-}" ]; then steps=(--options run.weaver.sft.max_steps "$SFT_STEPS"); fi
"$memgen" "${threads[@]}" weaver-train --config configs/quickstart.yaml --output-dir "$OUT" \
  ${steps[@]+"${steps[@]}"}

echo "== 2/3 evaluate the vanilla reasoner on $EVAL_ROWS held-out problems"
"$memgen" "${threads[@]}" eval --config configs/quickstart.yaml --vanilla \
  --output-dir "$OUT/vanilla" --max-samples "$EVAL_ROWS"

echo "== 3/3 evaluate reasoner + weaver on the same problems"
"$memgen" "${threads[@]}" eval --config configs/quickstart.yaml --load-model-path "$OUT/weaver" \
  --output-dir "$OUT/memgen" --max-samples "$EVAL_ROWS"

python3 - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, secs = sys.argv[1], int(sys.argv[2])
v = json.load(open(f"{out}/vanilla/evaluate/metrics.json"))
m = json.load(open(f"{out}/memgen/evaluate/metrics.json"))
print()
print(f"arith held-out accuracy ({v.get('n', '?')} problems):")
print(f"  vanilla SmolLM2-135M-Instruct : {v['accuracy']:.3f}")
print(f"  + MemGen weaver               : {m['accuracy']:.3f}   "
      f"({m.get('insertions_per_answer', 0):.1f} memories per answer)")
print(f"wall time: {secs // 60} min {secs % 60} s")
PY
