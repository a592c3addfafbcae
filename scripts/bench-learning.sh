#!/usr/bin/env bash
# Does training help? On the offline `arith` task with the embedded SmolLM2-135M-Instruct:
#   1. weaver SFT (fixed seed and budget),
#   2. trigger GRPO on top of that weaver,
#   3. held-out greedy accuracy and answer NLL: vanilla reasoner vs + weaver (nano trigger) vs
#      + weaver + trained trigger (with memories per answer), and the wall time of each phase.
# CONFIG=configs/arith-trigger.yaml runs the same on a weaver trained with a memory at only some
# boundaries (cap 12, insertion_probability 0.5), the setting for trigger experiments.
# Budget knobs (defaults sized for ≤ 30 min of SFT on a 2-core CPU):
#   SFT_STEPS=100 TRIGGER_STEPS=40 ROWS=100 OUT=runs/bench-learning CONFIG=configs/quickstart.yaml \
#     scripts/bench-learning.sh
# SFT_OPTIONS / TRIGGER_OPTIONS add `--options` key-value pairs to one phase, e.g. a weaver trained
# with memories at line ends only, then a trigger choosing among every boundary (docs/EXPERIMENTS.md):
#   CONFIG=configs/arith-trigger.yaml \
#   SFT_OPTIONS='model.delimiters ["\n"] run.weaver.sft.insertion_probability 1.0' \
#   TRIGGER_OPTIONS='run.trigger.grpo.scale_rewards false' scripts/bench-learning.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SFT_STEPS=${SFT_STEPS:-100}
TRIGGER_STEPS=${TRIGGER_STEPS:-40}
ROWS=${ROWS:-100}
SEED=${SEED:-42}
OUT=${OUT:-runs/bench-learning}
CONFIG=${CONFIG:-configs/quickstart.yaml}
read -r -a sft_options <<< "${SFT_OPTIONS:-}"
read -r -a trigger_options <<< "${TRIGGER_OPTIONS:-}"

cargo build --release --quiet
cargo bench --no-run --quiet --bench learning 2>/dev/null || true
BIN=${CARGO_TARGET_DIR:-target}/release/memgen

secs() { date +%s; }

echo "== weaver SFT: $SFT_STEPS steps (seed $SEED) =="
t0=$(secs)
"$BIN" weaver-train --config "$CONFIG" --output-dir "$OUT/sft" \
  --options run.seed "$SEED" run.weaver.sft.max_steps "$SFT_STEPS" \
  run.weaver.sft.eval_steps "$SFT_STEPS" run.weaver.sft.save_steps 10 ${sft_options[@]+"${sft_options[@]}"}
t1=$(secs)
echo "weaver SFT wall time: $((t1 - t0)) s"

echo "== trigger GRPO: $TRIGGER_STEPS steps =="
"$BIN" trigger-train --config "$CONFIG" --load-model-path "$OUT/sft/weaver" \
  --output-dir "$OUT/trigger" \
  --options run.seed "$SEED" run.trigger.grpo.max_steps "$TRIGGER_STEPS" \
  ${trigger_options[@]+"${trigger_options[@]}"}
t2=$(secs)
echo "trigger GRPO wall time: $((t2 - t1)) s"

echo "== held-out evaluation: $ROWS rows =="
cargo bench --quiet --bench learning -- --config "$CONFIG" --rows "$ROWS" \
  --weaver "$OUT/sft/weaver" --trigger "$OUT/trigger/trigger" --trigger-sample
t3=$(secs)
echo "evaluation wall time: $((t3 - t2)) s; total $((t3 - t0)) s"
