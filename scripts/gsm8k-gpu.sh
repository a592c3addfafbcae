#!/usr/bin/env bash
# The paper-scale GSM8K protocol on an NVIDIA GPU (not run on the CPU machine this project is
# built on). scripts/bench-gsm8k.sh with the original's settings instead of the CPU budget:
#   - configs/latent_memory/gsm8k.yaml unchanged: weaver SFT for 2 epochs of the 6 725 training
#     rows at lr 1e-5, batch 4, cosine with 10% warm-up, max_length 1024, 8 + 8 latents, cap 5;
#     trigger GRPO for 1 epoch at lr 1e-6, 8 completions of up to 512 tokens per prompt;
#   - reasoner and weaver Qwen/Qwen2.5-1.5B-Instruct (the original code's model) from the hub, frozen
#     weights in bf16 (trainables and optimiser state stay f32);
#   - eval on all 1 319 test rows, greedy, 1 024 new tokens: vanilla, weaver + nano trigger, and
#     weaver + the trained trigger.
# Builds memgen with `--features cuda` (into target/cuda). Resumable like bench-gsm8k.sh: run it
# again after a stop. Any bench-gsm8k.sh variable overrides the defaults below, e.g.
#   MODEL=Qwen/Qwen3-8B DEVICE=cuda:1 scripts/gsm8k-gpu.sh
# Exit status 3, with one line, when no CUDA device is visible (nothing is built).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/lib/cuda-devices.sh"
cuda_devices
if [ "$cuda_count" -eq 0 ]; then
  echo "gsm8k-gpu: no CUDA device ($cuda_why); nothing built or run"
  exit 3
fi
export CONFIG="${CONFIG:-configs/latent_memory/gsm8k.yaml}"
export MODEL="${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}"
export DEVICE="${DEVICE:-cuda:0}" DTYPE="${DTYPE:-bf16}" FEATURES=cuda
export SFT_STEPS="${SFT_STEPS:-epochs}" TRIGGER_STEPS="${TRIGGER_STEPS:-epochs}"
export ROWS="${ROWS:-1319}" MAX_NEW="${MAX_NEW:-1024}" BATCH="${BATCH:-8}"
export OUT="${OUT:-runs/gsm8k-gpu}"
exec "$root/scripts/bench-gsm8k.sh"
