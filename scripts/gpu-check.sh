#!/usr/bin/env bash
# The GPU checks, in two halves, for a machine with a GPU but no Rust toolchain (the device
# machine of docs/benchmarks.md):
#
#   scripts/gpu-check.sh prepare   # here: builds the binaries into gpu-bin/ (git-ignored, stripped)
#   scripts/gpu-check.sh run       # there, with gpu-bin/ carried: prints everything to stdout
#   scripts/gpu-check.sh bench     # there too, in a call of its own: step time, tokens/s, MFU
#
# `bench` trains the `small` size and a paper-shaped layer stack (d 2048, 32 heads, 24 layers,
# 256 text + 32×32 image tokens, the paper's row/column/conv layouts, batch 4) on the GPU with
# `trainer train` for a few updates and prints the median step time, tokens/s and MFU against the
# card's dense fp16 tensor-core peak, beside PyTorch eager (tools/bench_pytorch.py, autocast fp16,
# dense masked attention) of the same model on the same GPU. About 3 minutes on an H100.
#
# It also runs the transformer's forward and backward passes on the GPU against the host model,
# and 20 updates of `trainer train` with run.device cuda against cpu in fp32 (losses within 1e-4)
# and in fp16 (within 1e-3, no update skipped); then the dVAE's step on the GPU against the host
# model, and 20 updates of configs/dvae-cpu.yaml with run.device cuda against cpu (fp32, losses
# within 1e-4) on image shards that `prepare` writes into gpu-bin/dvae-images.
#
# `run` prints the GPU and library setup (nvidia-smi, `trainer cuda-libs`), then runs the tests
# that need a GPU, with TESSERA_REQUIRE_GPU=1 so that one whose GPU or NCCL is missing fails
# instead of skipping: the NCCL collectives against the CPU ring through the real launcher (two
# ranks on one GPU, and on two GPUs where there are two; a rank killed mid-run), with
# NCCL_DEBUG=INFO; then the library search. NCCL from a wheel is found by this script first and
# passed in TESSERA_CUDA_LIB_PATH. Then the kernels (docs/kernels.md): NVRTC compiles every kernel
# (ptxas report); every kernel's parity test runs GPU vs CPU reference vs emulator;
# compute-sanitizer's racecheck, synccheck and memcheck run the small-shape GPU parity tests; and
# the kernel benchmarks print GB/s, TFLOP/s and attention times (block-sparse on tensor cores and
# SIMT fallback aside, dense masked attention through cuBLAS, and the speed-up, target ≥ 3). Every
# step runs; the script exits non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Directories that hold NCCL from NVIDIA's wheels (site-packages/nvidia/*/lib/libnccl.so.2):
# those of `python3` (or $TESSERA_PYTHON, given two minutes to start), then the usual places.
nccl_wheel_dirs() {
    local sites
    sites=$(timeout 120 "${TESSERA_PYTHON:-python3}" -c 'import sys; print("\n".join(sys.path))' 2>/dev/null || true)
    for site in $sites ${VIRTUAL_ENV:+$VIRTUAL_ENV/lib/python3*/site-packages} \
        "$HOME"/.local/lib/python3*/site-packages /usr/local/lib/python3*/dist-packages \
        /usr/lib/python3/dist-packages; do
        for lib in "$site"/nvidia/*/lib; do
            if [ -e "$lib/libnccl.so.2" ]; then echo "$lib"; fi
        done
    done | awk '!seen[$0]++'
}

case "${1:-}" in
prepare)
    cargo build --release -p trainer -p launcher -p data-prep
    cargo test --release -p launcher --test distributed --no-run
    cargo test --release -p trainer --test cuda_libs --no-run
    cargo test --release -p kernels --lib --test nvrtc --no-run
    cargo build --release -p kernels --examples
    # The trainer's unit tests (the device transformer's parity test): their executable is
    # named like the binary's, so cargo is asked for its path.
    trainer_tests=$(cargo test --release -p trainer --lib --no-run --message-format=json |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    rm -rf gpu-bin && mkdir gpu-bin
    cp "$trainer_tests" gpu-bin/test-trainer
    cp target/release/trainer target/release/launcher gpu-bin/
    cp target/release/examples/bench_gpu target/release/examples/bench_attention_gpu gpu-bin/
    # The newest test executables (cargo names them <test>-<hash>).
    for t in distributed cuda_libs kernels nvrtc; do
        exe=$(ls -t target/release/deps/${t}-* | grep -v '\.d$' | head -1)
        cp "$exe" "gpu-bin/test-$t"
    done
    # Without debug info the four fit the device tool's 64 MiB carry limit.
    strip gpu-bin/*
    # The dVAE run's data: 256 synthetic 64×64 images in shards, and configs/dvae-cpu.yaml
    # reading them (paths relative to the repository root, where `run` works).
    synth=$(mktemp -d)
    target/release/data-prep synth --count 256 --resolution 64 --out "$synth/files"
    target/release/data-prep ingest --input "$synth/files" --out gpu-bin/dvae-images --resolution 64
    rm -rf "$synth"
    sed 's|paths: \["data/synth-images/\*.tis"\]|paths: ["gpu-bin/dvae-images/*.tis"]|' \
        configs/dvae-cpu.yaml > gpu-bin/dvae-gpu-check.yaml
    grep -q 'gpu-bin/dvae-images' gpu-bin/dvae-gpu-check.yaml
    ls -l gpu-bin
    du -sh gpu-bin
    ;;
run)
    test -x gpu-bin/trainer || { echo "gpu-bin/ is missing: run '$0 prepare' first and carry it"; exit 2; }
    export TESSERA_TRAINER=$PWD/gpu-bin/trainer TESSERA_LAUNCHER=$PWD/gpu-bin/launcher
    # A GPU test that cannot run here (no GPU, no NCCL) fails instead of skipping: a GPU is lent
    # rarely and briefly, and a skip would pass with nothing learned.
    export TESSERA_REQUIRE_GPU=1
    # NCCL from a Python wheel, found here first (a cold python may take more than the library
    # search's own bound to answer) and named first in the search.
    nccl_dirs=$(nccl_wheel_dirs | paste -sd: -)
    if [ -n "$nccl_dirs" ]; then
        export TESSERA_CUDA_LIB_PATH=$nccl_dirs${TESSERA_CUDA_LIB_PATH:+:$TESSERA_CUDA_LIB_PATH}
    fi
    echo "TESSERA_CUDA_LIB_PATH=${TESSERA_CUDA_LIB_PATH:-<unset: no NCCL wheel found>}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    echo "--- trainer cuda-libs"
    status=0
    gpu-bin/trainer cuda-libs --link-dir "${TMPDIR:-/tmp}/tessera-gpu-check-libs" || status=1
    echo "--- launcher tests (NCCL)"
    NCCL_DEBUG=INFO gpu-bin/test-distributed --nocapture --test-threads 1 nccl || status=1
    echo "--- library search tests"
    gpu-bin/test-cuda_libs --nocapture || status=1
    echo "--- kernels: NVRTC compile for sm_80 and sm_90 (ptxas report)"
    gpu-bin/test-nvrtc --nocapture || status=1
    echo "--- kernels: parity GPU vs CPU reference vs emulator"
    gpu-bin/test-kernels --test-threads 8 gpu:: || status=1
    for tool in racecheck synccheck memcheck; do
        echo "--- kernels: compute-sanitizer --tool $tool (small shapes)"
        compute-sanitizer --tool "$tool" --error-exitcode 1 \
            gpu-bin/test-kernels --test-threads 8 gpu:: --skip cuda_matches_the_cpu_reference \
            || status=1
    done
    echo "--- trainer: the transformer's passes on the GPU vs the host model"
    gpu-bin/test-trainer --nocapture model::transformer::device || status=1
    # fp32: the losses within 1e-4 relative (the emulator: 1e-8). fp16: both runs round the same
    # values to f16, and differ where a sum in another order crosses an f16 rounding boundary (one
    # f16 step, 4.9e-4, in that element); the emulator's ten updates agree within 3.3e-7 (bound
    # 1e-5, tests/tests/device.rs), but cuBLAS and the tensor cores sum in orders the emulator
    # does not copy (fp32's bound is 1e-4 here for that), and each f32 difference can become a
    # whole f16 step: 1e-3, ten times fp32's bound and a tenth of the issue's 1 % target. No fp16
    # update may be skipped at the initial scales (the issue's target).
    runs=${TMPDIR:-/tmp}/tessera-gpu-check-runs
    rm -rf "$runs"
    for prec in fp32 fp16; do
        echo "--- trainer train: run.device cuda vs cpu, $prec, 20 updates of configs/small-cpu.yaml"
        for dev in cpu cuda; do
            gpu-bin/trainer train --config configs/small-cpu.yaml --set run.device=$dev \
                --set run.precision=$prec --set train.steps=20 --set train.log_every=1 \
                --set run.out_dir="$runs/$prec-$dev" >/dev/null || status=1
        done
        python3 - "$runs" "$prec" <<'PY' || status=1
import json, sys
runs, prec = sys.argv[1], sys.argv[2]
rows = lambda d: [json.loads(l) for l in open(f"{runs}/{prec}-{d}/metrics.jsonl")]
cpu, gpu = rows("cpu"), rows("cuda")
lc, lg = [r["loss"] for r in cpu], [r["loss"] for r in gpu]
worst = max(abs(a - b) / abs(a) for a, b in zip(lc, lg))
tol = 1e-4 if prec == "fp32" else 1e-3
skipped = max(r.get("skipped_updates", 0) for r in gpu)
print(f"{prec}: updates {len(lc)}/{len(lg)}  first loss {lc[0]:.6f}/{lg[0]:.6f}  last {lc[-1]:.6f}/{lg[-1]:.6f}  largest relative difference {worst:.2e} (tolerance {tol:.0e})  skipped updates on the GPU {skipped:.0f}")
sys.exit(0 if len(lc) == len(lg) == 20 and worst < tol and skipped == 0 else 1)
PY
    done
    # The dVAE in fp32: the same bound as the transformer's fp32 run (the emulator's ten updates
    # of a tiny dVAE agree within 3.2e-8, tests/tests/device.rs; cuBLAS sums the convolutions'
    # products in orders the emulator does not copy).
    echo "--- trainer: CLIP's vision tower on the GPU vs the host model (data-prep embed --device cuda)"
    gpu-bin/test-trainer --nocapture model::clip::tests::the_image_tower || status=1
    echo "--- trainer: the dVAE's step on the GPU vs the host model"
    gpu-bin/test-trainer --nocapture model::dvae::device || status=1
    echo "--- trainer train: run.device cuda vs cpu, the dVAE (fp32), 20 updates of configs/dvae-cpu.yaml"
    for dev in cpu cuda; do
        gpu-bin/trainer train --config gpu-bin/dvae-gpu-check.yaml --set run.device=$dev \
            --set train.steps=20 --set train.log_every=1 \
            --set run.out_dir="$runs/dvae-$dev" >/dev/null || status=1
    done
    python3 - "$runs" <<'PY' || status=1
import json, sys
runs = sys.argv[1]
rows = lambda d: [json.loads(l) for l in open(f"{runs}/dvae-{d}/metrics.jsonl")]
cpu, gpu = rows("cpu"), rows("cuda")
lc, lg = [r["loss"] for r in cpu], [r["loss"] for r in gpu]
worst = max(abs(a - b) / abs(a) for a, b in zip(lc, lg))
ms = lambda rs: sorted(r["step_ms"] for r in rs[1:])[len(rs[1:]) // 2]
print(f"dvae fp32: updates {len(lc)}/{len(lg)}  first loss {lc[0]:.6f}/{lg[0]:.6f}  last {lc[-1]:.6f}/{lg[-1]:.6f}  largest relative difference {worst:.2e} (tolerance 1e-04)  median step {ms(cpu):.1f}/{ms(gpu):.1f} ms (cpu/cuda)")
sys.exit(0 if len(lc) == len(lg) == 20 and worst < 1e-4 else 1)
PY
    # PowerSGD with the gradient on the GPU (the products, orthonormalisation, decompression
    # and error buffers there) against the host's PowerSGD on the CPU: fp32's bound.
    echo "--- trainer train: PowerSGD on the GPU vs on the CPU, 20 updates of configs/small-cpu.yaml"
    for dev in cpu cuda; do
        gpu-bin/trainer train --config configs/small-cpu.yaml --set run.device=$dev \
            --set compression.kind=powersgd --set compression.rank=4 \
            --set train.steps=20 --set train.log_every=1 \
            --set run.out_dir="$runs/powersgd-$dev" >/dev/null || status=1
    done
    python3 - "$runs" <<'PY' || status=1
import json, sys
runs = sys.argv[1]
rows = lambda d: [json.loads(l) for l in open(f"{runs}/powersgd-{d}/metrics.jsonl")]
cpu, gpu = rows("cpu"), rows("cuda")
lc, lg = [r["loss"] for r in cpu], [r["loss"] for r in gpu]
worst = max(abs(a - b) / abs(a) for a, b in zip(lc, lg))
same_bytes = all(a.get("bytes_sent") == b.get("bytes_sent") for a, b in zip(cpu, gpu))
print(f"powersgd fp32: updates {len(lc)}/{len(lg)}  last loss {lc[-1]:.6f}/{lg[-1]:.6f}  largest relative difference {worst:.2e} (tolerance 1e-04)  bytes per update {gpu[-1].get('bytes_sent')} of {gpu[-1].get('bytes_uncompressed')}, equal on both: {same_bytes}")
sys.exit(0 if len(lc) == len(lg) == 20 and worst < 1e-4 and same_bytes else 1)
PY
    echo "--- kernels: benchmarks"
    gpu-bin/bench_gpu || status=1
    gpu-bin/bench_attention_gpu || status=1
    exit $status
    ;;
bench)
    test -x gpu-bin/trainer || { echo "gpu-bin/ is missing: run '$0 prepare' first and carry it"; exit 2; }
    # The MFU denominator: the card's dense fp16 tensor-core peak (H100 SXM and H200: 989.4
    # TFLOP/s; H100 PCIe: 756), TESSERA_PEAK_GFLOPS for another card.
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$card" in
    *PCIe*) peak=756000 ;;
    *H100* | *H200*) peak=989400 ;;
    *) peak=${TESSERA_PEAK_GFLOPS:?unknown card "$card": set TESSERA_PEAK_GFLOPS to its dense fp16 peak} ;;
    esac
    echo "card: $card, dense fp16 peak $peak GFLOP/s"
    runs=${TMPDIR:-/tmp}/tessera-gpu-bench
    rm -rf "$runs"
    status=0
    paperstack="--set model.text_len=256 --set model.text_vocab=16384 --set model.grid=32"
    paperstack+=" --set model.image_vocab=8192 --set model.d_model=2048 --set model.heads=32"
    paperstack+=" --set model.layers=24 --set train.batch_size=4"
    for case in small:fp32 small:fp16 paperstack:fp16; do
        size=${case%:*} prec=${case#*:}
        dims=""
        steps=20
        if [ "$size" = paperstack ]; then dims=$paperstack steps=8; fi
        echo "--- $size, $prec: Tessera (trainer train, run.device cuda) and PyTorch eager"
        # shellcheck disable=SC2086 # $dims is a list of arguments
        TESSERA_PEAK_GFLOPS=$peak gpu-bin/trainer train --config configs/small-cpu.yaml \
            --set run.device=cuda --set run.precision=$prec $dims --set train.steps=$steps \
            --set train.log_every=1 --set optim.ema=0 --set checkpoint.every=0 \
            --set run.out_dir="$runs/$size-$prec" >/dev/null || status=1
        torch_ms=$(python3 tools/bench_pytorch.py --device cuda --size "$size" --precision "$prec" \
            --attn both --steps 5 | tee /dev/stderr |
            python3 -c 'import json,sys; print(min(json.loads(l)["step_ms"] for l in sys.stdin))') ||
            { status=1; torch_ms=nan; }
        python3 - "$runs/$size-$prec" "$peak" "$torch_ms" <<'PY' || status=1
import json, statistics, sys
out, peak, torch_ms = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")][2:]
ms = statistics.median(r["step_ms"] for r in rows)
gflops = statistics.median(r["gflops_per_s"] for r in rows)
flops = gflops * ms / 1e3  # GFLOP per update, useful FLOPs (Transformer::train_flops)
cfg = {}
for line in open(f"{out}/config.yaml"):
    k, _, v = line.strip().partition(": ")
    cfg.setdefault(k, v)
tokens = int(cfg["batch_size"]) * (int(cfg["text_len"]) + int(cfg["grid"]) ** 2)
print(f"tessera: {ms:.1f} ms/update  {tokens / ms * 1e3:,.0f} tokens/s  MFU {gflops / peak:.1%}  ({flops:.1f} GFLOP per update)")
print(f"pytorch eager (faster attention variant): {torch_ms:.1f} ms/update  {tokens / torch_ms * 1e3:,.0f} tokens/s  MFU {flops / torch_ms * 1e3 / peak:.1%} (Tessera's FLOP count)  Tessera/PyTorch time {ms / torch_ms:.2f}")
PY
    done
    exit $status
    ;;
*)
    echo "usage: $0 prepare|run|bench" >&2
    exit 2
    ;;
esac
