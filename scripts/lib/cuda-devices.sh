# Sourced by the GPU scripts. `cuda_devices` sets `cuda_count` to how many GPUs the CUDA runtime
# will see and, when that is none, `cuda_why` to the reason; it builds nothing.
cuda_devices() {
    cuda_count=0
    # An empty CUDA_VISIBLE_DEVICES, or one starting with -1, hides every GPU from the CUDA runtime.
    if [ "${CUDA_VISIBLE_DEVICES+set}" = set ]; then
        case "$CUDA_VISIBLE_DEVICES" in "" | -1*) cuda_why="CUDA_VISIBLE_DEVICES hides every GPU"; return ;; esac
    fi
    cuda_why="nvidia-smi lists no GPU"
    if command -v nvidia-smi >/dev/null 2>&1; then
        cuda_count=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
    fi
}
