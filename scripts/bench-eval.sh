#!/usr/bin/env bash
# Vanilla accuracy and decode throughput of `memgen eval` (a benchmark, not a test), greedy:
#   SmolLM2-135M and Qwen2.5-Coder-0.5B on the first BENCH_ROWS GSM8K test rows (accuracy and
#   lenient_accuracy, the original grader's two scores), Qwen2.5-Coder-0.5B pass@1 on HumanEval,
#   SmolLM2-135M on the built-in arith task. Prints a table.
# Env: BENCH_ROWS (default 200; HumanEval and arith use min(BENCH_ROWS, 164)), MAX_NEW (default 512),
#      BATCH (default 8), PARTS (default "smol-gsm8k qwen-gsm8k qwen-humaneval smol-arith"),
#      OUT (default runs/bench-eval; each part starts fresh unless BENCH_RESUME=1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BENCH_ROWS="${BENCH_ROWS:-200}"
MAX_NEW="${MAX_NEW:-512}"
BATCH="${BATCH:-8}"
PARTS="${PARTS:-smol-gsm8k qwen-gsm8k qwen-humaneval smol-arith}"
OUT="${OUT:-runs/bench-eval}"
small=$(( BENCH_ROWS < 164 ? BENCH_ROWS : 164 ))
cargo build --release -q
bin="${CARGO_TARGET_DIR:-target}/release/memgen"
mkdir -p "$OUT"
# An offline benchmark: the configs name hub datasets, so pass the local copies and never fetch.
export HF_HUB_OFFLINE=1
data="$root/../shared/data"

# A config for the procedurally generated arith task (everything else at the defaults).
cat > "$OUT/arith.yaml" <<YAML
datasets:
  arith:
    test_size: $small
run:
  generation:
    max_new_tokens: $MAX_NEW
    batch_size: $BATCH
YAML

field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }

echo "# load before: $(uptime)"
table=()
for part in $PARTS; do
  case "$part" in
    smol-gsm8k)     model=default; cfg=configs/latent_memory/gsm8k.yaml;   rows=$BENCH_ROWS
                    local_data=(datasets.gsm8k.test_path "$data/gsm8k/test.jsonl") ;;
    qwen-gsm8k)     model=qwen;    cfg=configs/latent_memory/gsm8k.yaml;   rows=$BENCH_ROWS
                    local_data=(datasets.gsm8k.test_path "$data/gsm8k/test.jsonl") ;;
    qwen-humaneval) model=qwen;    cfg=configs/latent_memory/kodcode.yaml; rows=$small
                    local_data=(datasets.kodcode.test_path "$data/humaneval/HumanEval.jsonl.gz") ;;
    smol-arith)     model=default; cfg="$OUT/arith.yaml";                  rows=$small
                    local_data=() ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  dir="$OUT/$part"
  [ "${BENCH_RESUME:-0}" = 1 ] || rm -rf "$dir"
  line=$("$bin" eval --config "$cfg" --vanilla --output-dir "$dir" --max-samples "$rows" \
    --batch-size "$BATCH" --options model.reasoner_model_name "$model" ${local_data[@]+"${local_data[@]}"} \
    run.generation.max_new_tokens "$MAX_NEW" run.generation.temperature 0 | tail -1)
  table+=("$(printf '%-16s %5s %9s %9s %9s %9s' "$part" "$(echo "$line" | field n)" \
    "$(printf '%.3f' "$(echo "$line" | field accuracy)")" \
    "$(v=$(echo "$line" | field lenient_accuracy); [ -n "$v" ] && printf '%.3f' "$v" || echo -)" \
    "$(printf '%.1f' "$(echo "$line" | field tokens_per_sec)")" \
    "$(printf '%.0f' "$(echo "$line" | field wall_time_secs)")")")
done
echo "# load after: $(uptime)"
printf '%-16s %5s %9s %9s %9s %9s\n' part rows accuracy lenient tok/s wall_s
printf '%s\n' "${table[@]}"
