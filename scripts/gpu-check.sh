#!/usr/bin/env bash
# The GPU checks, in two halves, for a machine with a GPU but no Rust toolchain (the device
# machine of docs/benchmarks.md):
#
#   scripts/gpu-check.sh prepare   # here: builds the binaries into gpu-bin/ (git-ignored, stripped)
#   scripts/gpu-check.sh run       # there, with gpu-bin/ carried: prints everything to stdout
#
# `run` prints the GPU and library setup (nvidia-smi, `trainer cuda-libs`), then runs the tests
# that need a GPU (each skips with a reason where its GPU or library is missing): the NCCL
# collectives against the CPU ring through the real launcher, and the library search.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    cargo build --release -p trainer -p launcher
    cargo test --release -p launcher --test distributed --no-run
    cargo test --release -p trainer --test cuda_libs --no-run
    rm -rf gpu-bin && mkdir gpu-bin
    cp target/release/trainer target/release/launcher gpu-bin/
    # The newest test executables (cargo names them <test>-<hash>).
    for t in distributed cuda_libs; do
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
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
