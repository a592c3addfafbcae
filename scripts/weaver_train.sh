#!/usr/bin/env bash
# Train the weaver, like the original's weaver_train.sh. Every variable can be set from the
# environment; the defaults use the embedded SmolLM2-135M-Instruct for every part.
#   DATASET_NAME=gsm8k TRAIN_METHOD=sft scripts/weaver_train.sh [extra --options pairs...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REASONER_MODEL=${REASONER_MODEL:-default}
WEAVER_MODEL=${WEAVER_MODEL:-null}             # null: the reasoner's checkpoint
DATASET_NAME=${DATASET_NAME:-gsm8k}            # configs/latent_memory/$DATASET_NAME.yaml
TRAIN_METHOD=${TRAIN_METHOD:-sft}              # sft or grpo
MAX_PROMPT_AUG_NUM=${MAX_PROMPT_AUG_NUM:-1}
MAX_INFERENCE_AUG_NUM=${MAX_INFERENCE_AUG_NUM:-5}
PROMPT_LATENTS_LEN=${PROMPT_LATENTS_LEN:-8}
INFERENCE_LATENTS_LEN=${INFERENCE_LATENTS_LEN:-8}
LOAD_WEAVER_PATH=${LOAD_WEAVER_PATH:-}         # optional: continue from a trained weaver
OUTPUT_DIR=${OUTPUT_DIR:-runs/${DATASET_NAME}/weaver-${TRAIN_METHOD}}

args=(weaver-train --config "configs/latent_memory/${DATASET_NAME}.yaml" --output-dir "$OUTPUT_DIR"
  --options
  model.reasoner_model_name "$REASONER_MODEL"
  model.weaver.weaver_model_name "$WEAVER_MODEL"
  model.max_prompt_aug_num "$MAX_PROMPT_AUG_NUM"
  model.max_inference_aug_num "$MAX_INFERENCE_AUG_NUM"
  model.weaver.prompt_latents_len "$PROMPT_LATENTS_LEN"
  model.weaver.inference_latents_len "$INFERENCE_LATENTS_LEN"
  run.train_weaver_method "$TRAIN_METHOD"
  "datasets.${DATASET_NAME}.mode" "$TRAIN_METHOD"
  "$@")
if [[ -n "$LOAD_WEAVER_PATH" ]]; then
  args+=(--load-model-path "$LOAD_WEAVER_PATH")
fi
exec cargo run --release --quiet -- "${args[@]}"
