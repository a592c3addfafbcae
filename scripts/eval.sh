#!/usr/bin/env bash
# Evaluate a trained weaver (and trigger) on a task's test split — the original project's eval.sh,
# with memgen's defaults so it runs as is (the embedded SmolLM2-135M-Instruct everywhere).
# Every variable below can be set from the environment. Writes <output_dir>/evaluate/{answers.jsonl,
# metrics.json}; running it again resumes an interrupted evaluation.
#   LOAD_MODEL_PATH=runs/gsm8k/weaver scripts/eval.sh
#   LOAD_MODEL_PATH=vanilla scripts/eval.sh          # the plain reasoner
#   DATASET_NAME=triviaqa LOAD_MODEL_PATH=... scripts/eval.sh   (needs a retriever: memgen retriever serve)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

REASONER_MODEL="${REASONER_MODEL:-default}"
WEAVER_MODEL="${WEAVER_MODEL:-null}"            # null: the reasoner's checkpoint, shared in memory
TRIGGER_MODEL="${TRIGGER_MODEL:-null}"          # null: the nano trigger (always insert)
DATASET_NAME="${DATASET_NAME:-gsm8k}"            # gsm8k, gpqa, kodcode, triviaqa
MAX_PROMPT_AUG_NUM="${MAX_PROMPT_AUG_NUM:-1}"
MAX_INFERENCE_AUG_NUM="${MAX_INFERENCE_AUG_NUM:-5}"
PROMPT_LATENTS_LEN="${PROMPT_LATENTS_LEN:-8}"
INFERENCE_LATENTS_LEN="${INFERENCE_LATENTS_LEN:-8}"
LOAD_MODEL_PATH="${LOAD_MODEL_PATH:-runs/$DATASET_NAME/weaver}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/$DATASET_NAME}"
EXTRA_ARGS=("$@")                                 # e.g. --max-samples 50 --batch-size 4

trigger_opts=()
if [ "$TRIGGER_MODEL" != "null" ]; then
  trigger_opts=(model.trigger.trigger_model_name "$TRIGGER_MODEL" model.trigger.active true)
fi
if [ "$LOAD_MODEL_PATH" = "vanilla" ]; then
  model_args=(--vanilla)
else
  model_args=(--load-model-path "$LOAD_MODEL_PATH")
fi

cargo run --release -- eval \
  --config "configs/latent_memory/$DATASET_NAME.yaml" \
  --output-dir "$OUTPUT_DIR" \
  "${model_args[@]}" \
  "${EXTRA_ARGS[@]}" \
  --options \
    model.reasoner_model_name "$REASONER_MODEL" \
    model.weaver.weaver_model_name "$WEAVER_MODEL" \
    model.max_prompt_aug_num "$MAX_PROMPT_AUG_NUM" \
    model.max_inference_aug_num "$MAX_INFERENCE_AUG_NUM" \
    model.weaver.prompt_latents_len "$PROMPT_LATENTS_LEN" \
    model.weaver.inference_latents_len "$INFERENCE_LATENTS_LEN" \
    run.output_dir "$OUTPUT_DIR" \
    "${trigger_opts[@]}"
