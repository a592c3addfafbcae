#!/usr/bin/env bash
# Does the weaver help a real model on a public benchmark? GSM8K with Qwen2.5-Coder-0.5B-Instruct:
#   1. weaver SFT on the GSM8K train split (configs/gsm8k-qwen.yaml: the original's prompt, answer
#      format and validation split, with a CPU-sized budget);
#   2. greedy eval of the vanilla reasoner and of weaver + nano trigger on the first ROWS test rows
#      (scripts/bench-eval.sh's settings: 512 new tokens, batch 8, the original's grader);
#   3. optionally (TRIGGER_STEPS > 0) trigger GRPO on that weaver, then eval with the trained trigger.
# Resumable: run the same command again after a stop (Ctrl-C or SIGTERM saves a checkpoint) and
# each phase continues where it stopped — training through its checkpoint, eval row by row. A
# finished phase is skipped. Prints one line per phase: accuracy, lenient accuracy, memories per
# answer, tokens/s and wall time (summed over every sitting of the phase).
# Env (defaults in brackets):
#   OUT [runs/bench-gsm8k]   CONFIG [configs/gsm8k-qwen.yaml]   MODEL [qwen]   THREADS [all cores]
#   SFT_STEPS [300; `epochs`: the config's num_train_epochs]  SFT_LR [the config's]
#   ROWS [200]  MAX_NEW [512]  BATCH [8]
#   TRIGGER_STEPS [0 = no trigger phase; N steps; `epochs`: the config's num_train_epochs]
#   DEVICE [cpu; cuda:N]  DTYPE [the config's]  FEATURES [none; `cuda` builds into target/cuda]
#   DATA [hub: the config's hf://openai/gsm8k]; a directory with train.jsonl and test.jsonl reads
#        those instead and never touches the network, e.g. DATA=../shared/data/gsm8k
#   PHASES ["sft vanilla weaver trigger"]: a subset runs only those (e.g. PHASES=sft)
#   WEAVER [$OUT/sft/weaver]: the weaver the weaver and trigger phases use; another one (say a
#          checkpoint, for accuracy along the curve) evaluates into $OUT/weaver-<its folder name>
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

OUT="${OUT:-runs/bench-gsm8k}"
CONFIG="${CONFIG:-configs/gsm8k-qwen.yaml}"
MODEL="${MODEL:-qwen}"
SFT_STEPS="${SFT_STEPS:-300}"
ROWS="${ROWS:-200}"
MAX_NEW="${MAX_NEW:-512}"
BATCH="${BATCH:-8}"
TRIGGER_STEPS="${TRIGGER_STEPS:-0}"
DATA="${DATA:-hub}"
PHASES="${PHASES:-sft vanilla weaver trigger}"
WEAVER="${WEAVER:-$OUT/sft/weaver}"
weaver_eval="$OUT/weaver"
[ "$WEAVER" = "$OUT/sft/weaver" ] || weaver_eval="$OUT/weaver-$(basename "$WEAVER")"

features=()
if [ -n "${FEATURES:-}" ]; then
  features=(--features "$FEATURES")
  # Apart from the CPU build, so neither rebuilds the other.
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/$FEATURES}"
fi
cargo build --release --locked -q ${features[@]+"${features[@]}"}
bin="${CARGO_TARGET_DIR:-target}/release/memgen"
[ "$MODEL" = qwen ] && scripts/fetch-model.sh qwen >/dev/null
[ "$MODEL" = default ] && scripts/fetch-model.sh default >/dev/null
threads=(); [ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")

common=(model.reasoner_model_name "$MODEL")
[ -n "${DEVICE:-}" ] && common+=(model.device "$DEVICE")
[ -n "${DTYPE:-}" ] && common+=(model.dtype "$DTYPE")
if [ "$DATA" != hub ]; then
  for f in train.jsonl test.jsonl; do
    [ -f "$DATA/$f" ] || { echo "error: DATA=$DATA has no $f" >&2; exit 2; }
  done
  export HF_HUB_OFFLINE=1
  common+=(datasets.gsm8k.train_path "$DATA/train.jsonl" datasets.gsm8k.test_path "$DATA/test.jsonl")
fi
sft_opts=()
[ "$SFT_STEPS" = epochs ] || sft_opts+=(run.weaver.sft.max_steps "$SFT_STEPS")
[ -n "${SFT_LR:-}" ] && sft_opts+=(run.weaver.sft.learning_rate "$SFT_LR")
gen=(run.generation.max_new_tokens "$MAX_NEW" run.generation.temperature 0)

has() { [[ " $PHASES " == *" $1 "* ]]; }
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }
num() { [ -n "$2" ] && printf "$1" "$2" || echo -; }
lines=()

# One eval phase: $1 label, $2 output dir, then memgen's model arguments (which may add their own
# `--options`: memgen appends repeated ones).
evaluate() {
  local label=$1 dir=$2; shift 2
  echo "== eval: $label, first $ROWS test rows → $dir =="
  local line
  line=$("$bin" eval --config "$CONFIG" "${threads[@]}" --output-dir "$dir" --max-samples "$ROWS" \
    --batch-size "$BATCH" "$@" --options "${common[@]}" "${gen[@]}" | tail -1)
  # Each sitting's metrics line is kept, so speed and wall time cover every sitting of the phase.
  echo "$line" >> "$dir/sittings.jsonl"
  local wall tokens
  wall=$(field wall_time_secs < "$dir/sittings.jsonl" | awk '{s += $1} END {print s}')
  tokens=$(field generated_tokens < "$dir/sittings.jsonl" | awk '{s += $1} END {print s}')
  lines+=("$(printf '%-22s %5s %9s %9s %9s %9s %9s' "$label" "$(echo "$line" | field n)" \
    "$(num %.3f "$(echo "$line" | field accuracy)")" \
    "$(num %.3f "$(echo "$line" | field lenient_accuracy)")" \
    "$(num %.2f "$(echo "$line" | field insertions_per_answer)")" \
    "$(awk -v t="$tokens" -v w="$wall" 'BEGIN {if (w > 0) printf "%.1f", t / w; else print "-"}')" \
    "$(num %.0f "$wall")")")
}

# A training phase: skipped once its final model exists; otherwise started or resumed.
train() {
  local what=$1 dir=$2 final=$3; shift 3
  if [ -f "$final/model.safetensors" ]; then
    echo "== $what: done ($final) =="
    return
  fi
  echo "== $what → $dir (resumes from $dir/checkpoint-last when present) =="
  local t0; t0=$(date +%s)
  "$bin" "$what" --config "$CONFIG" "${threads[@]}" --output-dir "$dir" "$@"
  echo "$what wall time this sitting: $(( $(date +%s) - t0 )) s"
}

# The validation curve of a training run: one line per evaluation.
curve() {
  grep '"eval_loss"' "$1/metrics.jsonl" 2>/dev/null \
    | sed -n 's/.*"eval_loss":\([^,}]*\).*"step":\([0-9]*\).*/\2 \1/p' \
    | while read -r step loss; do printf '  step %s: validation loss %.4f\n' "$step" "$loss"; done || true
}

echo "# load before: $(uptime)"
if has sft; then
  train weaver-train "$OUT/sft" "$OUT/sft/weaver" --options "${common[@]}" ${sft_opts[@]+"${sft_opts[@]}"}
  curve "$OUT/sft"
fi
has vanilla && evaluate vanilla "$OUT/vanilla" --vanilla
if has weaver; then
  [ -f "$WEAVER/model.safetensors" ] || { echo "error: no trained weaver in $WEAVER (run PHASES=sft first)" >&2; exit 2; }
  evaluate "weaver + nano trigger" "$weaver_eval" --load-model-path "$WEAVER"
fi
if has trigger && [ "$TRIGGER_STEPS" != 0 ]; then
  trigger_opts=()
  [ "$TRIGGER_STEPS" = epochs ] || trigger_opts+=(run.trigger.grpo.max_steps "$TRIGGER_STEPS")
  train trigger-train "$OUT/trigger" "$OUT/trigger/trigger" --load-model-path "$WEAVER" \
    --options "${common[@]}" ${trigger_opts[@]+"${trigger_opts[@]}"}
  evaluate "weaver + GRPO trigger" "$OUT/trigger-eval" --load-model-path "$OUT/trigger/trigger" \
    --options model.trigger.active true
fi
echo "# load after: $(uptime)"
if [ ${#lines[@]} -gt 0 ]; then
  printf '%-22s %5s %9s %9s %9s %9s %9s\n' phase rows accuracy lenient mem/ans tok/s wall_s
  printf '%s\n' "${lines[@]}"
fi
