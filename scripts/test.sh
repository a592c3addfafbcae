#!/usr/bin/env bash
# The test command from the README: fetches the models the tests need, then runs every test, the mpi
# feature's tests under mpirun, then
# compiles the `cuda` feature (no GPU needed; MEMGEN_CUDA_BUILD=0 leaves it out).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The code sandbox needs bubblewrap (namespaces); without it code grading refuses to run.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing bubblewrap for the code sandbox" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "error: the code sandbox needs bubblewrap: install it (apt-get install bubblewrap)" >&2
        exit 1
    fi
fi
# The `mpi` feature's tests (tests/distributed.rs under mpirun) need OpenMPI and bindgen's libclang.
if ! command -v mpirun >/dev/null 2>&1 || ! pkg-config --exists ompi 2>/dev/null \
    || ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing OpenMPI, libclang and pkgconf for the mpi feature's tests" >&2
        apt-get update -qq >/dev/null
        apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev pkgconf >/dev/null
    else
        echo "error: the mpi tests need OpenMPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev pkgconf" >&2
        exit 1
    fi
fi
scripts/fetch-model.sh all
cargo test --release --locked "$@"
# The MPI build in a target directory of its own, so the default build never links libmpi.
# As root, OpenMPI needs these to start ranks at all.
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/mpi" \
    cargo test --release --locked --features mpi --test distributed
if [ "${MEMGEN_CUDA_BUILD:-1}" != 0 ]; then
    scripts/setup-cuda.sh
    # Its own target dir, so the CPU build above is not invalidated. No GPU to ask for its compute
    # capability: sm_80 PTX runs (JIT-compiled) on Ampere and newer; 90 would need CUDA 12.
    cuda_target="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR-cuda}"
    export CARGO_TARGET_DIR="${cuda_target:-target/cuda}" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
    echo "compiling the cuda feature (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, $CARGO_TARGET_DIR)" >&2
    cargo build --release --locked --features cuda
    cargo test --release --locked --features cuda --no-run
fi
