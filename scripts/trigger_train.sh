#!/usr/bin/env bash
# Train the trigger with GRPO on top of a trained weaver, like the original's trigger_train.sh.
#   LOAD_WEAVER_PATH=runs/gsm8k/weaver-sft/weaver DATASET_NAME=gsm8k scripts/trigger_train.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REASONER_MODEL=${REASONER_MODEL:-default}
WEAVER_MODEL=${WEAVER_MODEL:-null}
TRIGGER_MODEL=${TRIGGER_MODEL:-null}           # null: the reasoner's checkpoint
DATASET_NAME=${DATASET_NAME:-gsm8k}
TRAIN_METHOD=${TRAIN_METHOD:-grpo}             # the trigger trains with grpo only
MAX_PROMPT_AUG_NUM=${MAX_PROMPT_AUG_NUM:-1}
MAX_INFERENCE_AUG_NUM=${MAX_INFERENCE_AUG_NUM:-5}
PROMPT_LATENTS_LEN=${PROMPT_LATENTS_LEN:-8}
INFERENCE_LATENTS_LEN=${INFERENCE_LATENTS_LEN:-8}
LOAD_WEAVER_PATH=${LOAD_WEAVER_PATH:-runs/${DATASET_NAME}/weaver-sft/weaver}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${DATASET_NAME}/trigger-${TRAIN_METHOD}}

if [[ "$TRAIN_METHOD" != grpo ]]; then
  echo "error: TRAIN_METHOD must be grpo for the trigger" >&2
  exit 2
fi
exec cargo run --release --quiet -- trigger-train \
  --config "configs/latent_memory/${DATASET_NAME}.yaml" \
  --load-model-path "$LOAD_WEAVER_PATH" \
  --output-dir "$OUTPUT_DIR" \
  --options \
  model.reasoner_model_name "$REASONER_MODEL" \
  model.weaver.weaver_model_name "$WEAVER_MODEL" \
  model.trigger.trigger_model_name "$TRIGGER_MODEL" \
  model.max_prompt_aug_num "$MAX_PROMPT_AUG_NUM" \
  model.max_inference_aug_num "$MAX_INFERENCE_AUG_NUM" \
  model.weaver.prompt_latents_len "$PROMPT_LATENTS_LEN" \
  model.weaver.inference_latents_len "$INFERENCE_LATENTS_LEN" \
  "$@"
