#!/usr/bin/env bash
# The GPU checks, in two halves, for a machine with a GPU but no Rust toolchain (the device
# machine of docs/benchmarks.md):
#
#   scripts/gpu-check.sh prepare   # here: builds the binaries into gpu-bin/ (git-ignored, stripped)
#   scripts/gpu-check.sh run       # there, with gpu-bin/ carried: prints everything to stdout
#
# `run` prints the GPU and library setup (nvidia-smi, `trainer cuda-libs`), then runs the tests
# that need a GPU (each skips with a reason where its GPU or library is missing): the NCCL
# collectives against the CPU ring through the real launcher, and the library search. Then the
# kernels: NVRTC compiles every kernel for this GPU's architecture; every kernel's parity test
# runs GPU vs CPU reference vs emulator (TESSERA_REQUIRE_GPU=1: a missing GPU fails instead of
# skipping); compute-sanitizer's racecheck, synccheck and memcheck run the GPU parity tests; and
# the kernel benchmarks print GB/s and TFLOP/s.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    cargo build --release -p trainer -p launcher
    cargo test --release -p launcher --test distributed --no-run
    cargo test --release -p trainer --test cuda_libs --no-run
    cargo test --release -p kernels --lib --test nvrtc --no-run
    cargo build --release -p kernels --examples
    rm -rf gpu-bin && mkdir gpu-bin
    cp target/release/trainer target/release/launcher gpu-bin/
    cp target/release/examples/bench_gpu gpu-bin/
    # The newest test executables (cargo names them <test>-<hash>).
    for t in distributed cuda_libs kernels nvrtc; do
        exe=$(ls -t target/release/deps/${t}-* | grep -v '\.d$' | head -1)
        cp "$exe" "gpu-bin/test-$t"
    done
    # Without debug info the four fit the device tool's 64 MiB carry limit.
    strip gpu-bin/*
    ls -l gpu-bin
    du -sh gpu-bin
    ;;
run)
    test -x gpu-bin/trainer || { echo "gpu-bin/ is missing: run '$0 prepare' first and carry it"; exit 2; }
    export TESSERA_TRAINER=$PWD/gpu-bin/trainer TESSERA_LAUNCHER=$PWD/gpu-bin/launcher
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    echo "--- trainer cuda-libs"
    gpu-bin/trainer cuda-libs --link-dir "${TMPDIR:-/tmp}/tessera-gpu-check-libs"
    echo "--- launcher tests (NCCL)"
    gpu-bin/test-distributed --nocapture --test-threads 1 nccl
    echo "--- library search tests"
    gpu-bin/test-cuda_libs --nocapture
    echo "--- kernels: NVRTC compile for sm_80 and sm_90 (ptxas report)"
    gpu-bin/test-nvrtc --nocapture
    echo "--- kernels: parity GPU vs CPU reference vs emulator"
    TESSERA_REQUIRE_GPU=1 gpu-bin/test-kernels --test-threads 1 gpu::
    for tool in racecheck synccheck memcheck; do
        echo "--- kernels: compute-sanitizer --tool $tool"
        TESSERA_REQUIRE_GPU=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            gpu-bin/test-kernels --test-threads 1 gpu::
    done
    echo "--- kernels: benchmarks"
    gpu-bin/bench_gpu
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
