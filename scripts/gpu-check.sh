#!/usr/bin/env bash
# For a machine with an NVIDIA GPU: builds memgen with `--features cuda` and checks it on the GPU,
# one line per check:
#   1. parity: every tiny fixture (../shared/fixtures/tiny) scored in f32 on the GPU against
#      transformers' logits (the 20 best ids at every position, within 2e-4, as the CPU is);
#   2. one weaver SFT step in bf16 (SmolLM2-135M on the built-in arith task): finite loss, time;
#   3. generation with memory (the weaver from 2, 1 prompt + up to 5 inference memories): tok/s.
# Usage: scripts/gpu-check.sh [cuda:N]        (default cuda:0)
# Env: CUDA_COMPUTE_CAP (default: asked of nvidia-smi by candle's build), MEMGEN_CUDA_TARGET_DIR
#      (default target/cuda: apart from the CPU build, so neither rebuilds the other).
# Exit status: 0 every check passed; 1 a check or the build failed; 3 no CUDA device is visible
# (nothing is built: `nvidia-smi -L` lists no GPU, or CUDA_VISIBLE_DEVICES hides them all).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
device="${1:-cuda:0}"
case "$device" in
    cuda | cuda:[0-9]*) ;;
    *) echo "error: expected a CUDA device such as cuda:0, got \`$device\`" >&2; exit 1 ;;
esac

. "$root/scripts/lib/cuda-devices.sh"
cuda_devices
if [ "$cuda_count" -eq 0 ]; then
    echo "gpu-check: no CUDA device ($cuda_why); nothing built or checked"
    exit 3
fi

fixtures="$root/../shared/fixtures/tiny"
[ -d "$fixtures" ] || { echo "error: $fixtures is missing (clone the shared data beside the repo)" >&2; exit 1; }
export CARGO_TARGET_DIR="${MEMGEN_CUDA_TARGET_DIR:-$root/target/cuda}"
start=$(date +%s)
if ! log=$(cargo build --release --locked --features cuda --bin memgen 2>&1); then
    printf '%s\n' "$log" | tail -20 >&2
    echo "error: the cuda build failed (output above)" >&2
    exit 1
fi
echo "build: memgen --features cuda in $(( $(date +%s) - start )) s"
bin="$CARGO_TARGET_DIR/release/memgen"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. Parity with transformers on every fixture, by the memgen CLI's `score` on the GPU.
python3 - "$fixtures" "$bin" "$device" <<'PY'
import json, pathlib, subprocess, sys
fixtures, binary, device = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tol, worst, bad, names = 2e-4, 0.0, [], sorted(fixtures.glob("*.dev.json"))
for fx in names:
    name = fx.name[: -len(".dev.json")]
    for p in json.load(open(fx))["prompts"]:
        # 40 of ours for their 20: a near-tie at their 20th must still find its id.
        run = subprocess.run(
            [binary, "score", "--model", str(fixtures / name), "--device", device,
             "--top-k", "40", "--text", p["text"]], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"error: score on {name}: {run.stderr.strip()}")
        o = json.loads(run.stdout)
        if o["token_ids"] != p["input_ids"]:
            bad.append(f"{name}: token ids differ")
            continue
        for pos, (ref, got) in enumerate(zip(p["topk"], o["top_logits"])):
            got = {i: l for i, l in got}
            for i, l in zip(ref["ids"], ref["logits"]):
                d = abs(got[i] - l) if i in got else float("inf")
                worst = max(worst, d)
                if d > tol:
                    bad.append(f"{name} pos {pos} id {i}: {got.get(i)} vs {l}")
status = "ok" if not bad else f"FAILED ({bad[0]}; {len(bad)} in all)"
print(f"parity on {device}: {len(names)} fixtures, max |Δlogit| {worst:.2e} (bound {tol:.0e}): {status}")
sys.exit(1 if bad else 0)
PY

# 2. One bf16 weaver SFT step on the default model.
scripts/fetch-model.sh >/dev/null
start=$(date +%s.%N)
"$bin" weaver-train --config configs/quickstart.yaml --output-dir "$work/sft" --options \
    model.dtype bf16 model.device "$device" run.weaver.sft.max_steps 1 \
    run.weaver.sft.eval_strategy no run.weaver.sft.save_strategy no datasets.arith.train_size 16 \
    datasets.arith.valid_size 4 >"$work/sft.log" 2>&1 || { tail -5 "$work/sft.log" >&2; echo "error: the bf16 SFT step failed" >&2; exit 1; }
loss=$(python3 -c 'import json, sys; print([json.loads(l) for l in open(sys.argv[1]) if "loss" in l][-1]["loss"])' "$work/sft/metrics.jsonl")
python3 -c 'import math, sys; sys.exit(0 if math.isfinite(float(sys.argv[1])) else 1)' "$loss" \
    || { echo "error: the bf16 SFT step's loss is $loss" >&2; exit 1; }
echo "bf16 SFT step on $device: loss $loss, $(python3 -c "import time; print(f'{time.time() - $start:.1f}')") s with loading"

# 3. Generation with memory from that weaver, timed.
start=$(date +%s.%N)
"$bin" generate --device "$device" --load-model-path "$work/sft/weaver" --json --ignore-eos \
    --max-new-tokens 256 --prompt "A farmer has 17 sheep and buys 25 more. Then he sells 9. How many now?" \
    >"$work/gen.json"
python3 - "$work/gen.json" "$start" "$device" <<'PY'
import json, sys, time
g = json.load(open(sys.argv[1]))
secs = time.time() - float(sys.argv[2])
n = len(g["token_ids"])
print(f"generation with memory on {sys.argv[3]}: {n} tokens, {len(g.get('insertions', []))} memories, "
      f"{n / secs:.1f} tok/s ({secs:.1f} s with loading)")
PY
