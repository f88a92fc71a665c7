//! Times the CUDA block-sparse attention kernels (`kernels/cuda/attention.cu`), forward and
//! backward, at the paper's sequence (T = 1280: 256 text positions and a 32 × 32 image) with the
//! paper's three layouts and head size 64, fp16 storage, one JSON line per layout:
//!
//! ```text
//! cargo run --release -p kernels --example bench_attention_gpu [-- B NH]
//! ```
//!
//! `fwd_ms`, `bwd_ms` are the launcher's kernels (tensor cores for f16 at block 32); `simt_*` the
//! SIMT fallback at the same shapes. (`bench_attention` times the CPU reference.) Needs a GPU:
//! without one it says so and exits 0 (1 under `TESSERA_REQUIRE_GPU=1`).
//! Times are medians of `RUNS` runs after `WARMUP` warm-up runs, each run synchronised. Effective
//! TFLOP/s count useful work only, as `bench_attention` does: `4·HS` FLOPs per allowed pair forward
//! (q·k and p·v), `8·HS` backward (the recomputation of P not counted), times `B·NH`.
//!
//! The issue's target compares forward + backward against dense masked attention through cuBLAS
//! at the same shapes (`dense_baseline_ms` below; `speedup` = dense ÷ block-sparse, target ≥ 3).

use std::time::Instant;

use cudarc::driver::CudaSlice;
use half::f16;
use kernels::attention::{AttentionOps, BlockLayout, MaskKind};
use kernels::dense_attention::DenseAttention;
use kernels::device::{narrow, Device};
use kernels::gpu::attention::GPU_BLOCK;
use kernels::gpu::{Cuda, Gpu};

const WARMUP: usize = 3;
const RUNS: usize = 10;
const TEXT_LEN: usize = 256;
const GRID: usize = 32;
const HS: usize = 64;

/// Deterministic values in [-1, 1) without a random-number dependency.
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Median of `RUNS` timings of `f` (which must synchronise), in milliseconds.
fn time_ms(mut f: impl FnMut() -> kernels::Result<()>) -> kernels::Result<f64> {
    for _ in 0..WARMUP {
        f()?;
    }
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// Dense masked attention at the same shapes, forward + backward, in milliseconds: the issue's
/// baseline. `kernels::dense_attention::DenseAttention`: cuBLAS for `S = Q Kᵀ`, `O = P V`,
/// `dP = dO Vᵀ`, `dQ = dS K`, `dK = dSᵀ Q`, `dV = Pᵀ dO` (f16 inputs, f32 accumulation and
/// outputs, heads read in place from the interleaved qkv), the masked softmax kernels between
/// them. Also returns the forward and backward times separately.
fn dense_baseline_ms(
    dev: &Gpu<Cuda>,
    layout: &BlockLayout,
    qkv: &CudaSlice<f16>,
    dout: &CudaSlice<f16>,
    b: usize,
    nh: usize,
) -> kernels::Result<(f64, f64)> {
    let t = layout.seq_len();
    let mut dense = DenseAttention::<_, f16>::new(dev, layout, b, nh, HS)?;
    let mut out = dev.zeros::<f32>(b * t * nh * HS)?;
    let mut dqkv = dev.zeros::<f32>(b * t * 3 * nh * HS)?;
    let fwd_ms = time_ms(|| {
        dense.forward(dev, &mut out, qkv)?;
        dev.0.synchronize()
    })?;
    let bwd_ms = time_ms(|| {
        dense.backward(dev, &mut dqkv, dout, qkv)?;
        dev.0.synchronize()
    })?;
    Ok((fwd_ms, bwd_ms))
}

fn main() -> kernels::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments: B NH (integers)"))
        .collect();
    let (b, nh) = match args[..] {
        [] => (4, 16),
        [b, nh] => (b, nh),
        _ => panic!("arguments: B NH"),
    };
    let dev = match Cuda::new(0) {
        Ok(c) => Gpu(c),
        Err(e) => {
            println!("bench_attention_gpu needs a GPU; skipped ({e})");
            // Under the GPU check a missing GPU is a failure, not a skip.
            std::process::exit(if kernels::gpu::gpu_required() { 1 } else { 0 });
        }
    };
    let t = TEXT_LEN + GRID * GRID;
    let c = nh * HS;
    eprintln!(
        "{}: B {b}, NH {nh}, HS {HS}, T {t}, block {GPU_BLOCK}",
        dev.name()
    );
    let qkv = dev.upload(&narrow::<f16>(&pseudo_random(b * t * 3 * c, 1)))?;
    let dout = dev.upload(&narrow::<f16>(&pseudo_random(b * t * c, 2)))?;
    let mut out = dev.zeros::<f16>(b * t * c)?;
    let mut lse = dev.zeros::<f32>(b * nh * t)?;
    let mut dqkv = dev.zeros::<f16>(b * t * 3 * c)?;
    for kind in [
        MaskKind::Row,
        MaskKind::Column,
        MaskKind::Conv { kernel: 11 },
    ] {
        let host = BlockLayout::new(TEXT_LEN, GRID, kind, GPU_BLOCK)?;
        // Forward and backward times on tensor cores (the launcher's choice) and SIMT.
        let mut times = [(0.0, 0.0); 2];
        for (tc, slot) in [true, false].into_iter().zip(&mut times) {
            let layout = dev.attention_layout(&host)?.with_tensor_cores(tc);
            let fwd = time_ms(|| {
                dev.attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, HS)?;
                dev.0.synchronize()
            })?;
            let bwd = time_ms(|| {
                dev.attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, HS)?;
                dev.0.synchronize()
            })?;
            *slot = (fwd, bwd);
        }
        let [(fwd_ms, bwd_ms), (simt_fwd, simt_bwd)] = times;
        let work = (host.allowed_pairs() * (b * nh * HS) as u64) as f64;
        let total_ms = fwd_ms + bwd_ms;
        let tflops = |flops: f64, ms: f64| flops / (ms * 1e9);
        let (dense_fwd, dense_bwd) = dense_baseline_ms(&dev, &host, &qkv, &dout, b, nh)?;
        let dense_ms = dense_fwd + dense_bwd;
        let dense = format!(
            ",\"dense_fwd_ms\":{dense_fwd:.3},\"dense_bwd_ms\":{dense_bwd:.3},\
             \"dense_ms\":{dense_ms:.3},\"speedup\":{:.2},\"target_speedup\":3.0",
            dense_ms / total_ms
        ) + &format!(",\"simt_fwd_ms\":{simt_fwd:.3},\"simt_bwd_ms\":{simt_bwd:.3}");
        println!(
            "{{\"kind\":\"{kind:?}\",\"block\":{GPU_BLOCK},\"T\":{t},\"B\":{b},\"NH\":{nh},\"HS\":{HS},\
             \"allowed_pairs\":{},\"nonzero_blocks\":{},\"fwd_ms\":{fwd_ms:.3},\"bwd_ms\":{bwd_ms:.3},\
             \"total_ms\":{total_ms:.3},\"fwd_tflops\":{:.2},\"bwd_tflops\":{:.2},\"total_tflops\":{:.2}{dense}}}",
            host.allowed_pairs(),
            host.nonzero_blocks(),
            tflops(4.0 * work, fwd_ms),
            tflops(8.0 * work, bwd_ms),
            tflops(12.0 * work, total_ms),
        );
    }
    Ok(())
}
