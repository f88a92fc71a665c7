//! Benchmarks of the CUDA kernels on a GPU, for scripts/gpu-check.sh: layernorm in GB/s against
//! the card's peak memory bandwidth (target ≥ 80 % for the forward pass), and the dense product
//! through cuBLAS in TFLOP/s. Without a GPU it says so and exits 0 (1 under
//! `TESSERA_REQUIRE_GPU=1`).
//!
//! `cargo run --release -p kernels --example bench_gpu`

use half::f16;
use kernels::device::Device;
use kernels::gpu::{Cuda, Gpu};
use kernels::layernorm::LayerNormOps;
use kernels::linear::MatmulOps;
use std::time::Instant;

/// Median milliseconds of `reps` timed runs of `f` after 3 warm-ups, the stream drained each time.
fn time_ms(gpu: &Gpu<Cuda>, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    gpu.0.synchronize().unwrap();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            gpu.0.synchronize().unwrap();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    let gpu = match Cuda::new(0) {
        Ok(c) => Gpu(c),
        Err(e) => {
            println!("bench_gpu: needs a CUDA GPU ({e})");
            // Under the GPU check a missing GPU is a failure, not a skip.
            std::process::exit(if kernels::gpu::gpu_required() { 1 } else { 0 });
        }
    };
    let peak = gpu.0.peak_bandwidth_gbs().unwrap_or(f64::NAN);
    println!(
        "{} ({}), peak memory bandwidth {peak:.0} GB/s",
        gpu.name(),
        gpu.0.arch()
    );

    // Layernorm over B·T = 8·1280 rows, at the paper's width and a small one.
    for c in [1024usize, 3968] {
        let n = 8 * 1280;
        let x = gpu.upload(&vec![0.5f32; n * c]).unwrap();
        let delta = gpu.upload(&vec![0.25f32; n * c]).unwrap();
        let w = gpu.upload(&vec![1.0f32; c]).unwrap();
        let b = gpu.upload(&vec![0.0f32; c]).unwrap();
        let mut x_out = gpu.zeros::<f32>(n * c).unwrap();
        let mut y = gpu.zeros::<f16>(n * c).unwrap();
        let mut mean = gpu.zeros::<f32>(n).unwrap();
        let mut rstd = gpu.zeros::<f32>(n).unwrap();
        let ms = time_ms(&gpu, 20, || {
            gpu.layernorm_forward(None, &mut y, &mut mean, &mut rstd, &x, None, &w, &b, n, c)
                .unwrap()
        });
        let bytes = (n * c * (4 + 2)) as f64;
        let gbs = bytes / ms / 1e6;
        println!(
            "layernorm_forward_f16   N={n} C={c}: {ms:.3} ms, {gbs:.0} GB/s ({:.0} % of peak)",
            100.0 * gbs / peak
        );
        let ms = time_ms(&gpu, 20, || {
            gpu.layernorm_forward(
                Some(&mut x_out),
                &mut y,
                &mut mean,
                &mut rstd,
                &x,
                Some(&delta),
                &w,
                &b,
                n,
                c,
            )
            .unwrap()
        });
        let bytes = (n * c * (4 + 4 + 4 + 2)) as f64;
        let gbs = bytes / ms / 1e6;
        println!(
            "layernorm residual+fwd  N={n} C={c}: {ms:.3} ms, {gbs:.0} GB/s ({:.0} % of peak)",
            100.0 * gbs / peak
        );
        let dy = gpu.upload(&vec![f16::from_f32(0.1); n * c]).unwrap();
        let mut dx = gpu.zeros::<f32>(n * c).unwrap();
        let mut dw = gpu.zeros::<f32>(c).unwrap();
        let mut db = gpu.zeros::<f32>(c).unwrap();
        let ms = time_ms(&gpu, 20, || {
            gpu.layernorm_backward(
                &mut dx, &mut dw, &mut db, &dy, &x_out, &w, &mean, &rstd, n, c,
            )
            .unwrap()
        });
        // dy and x read twice (input gradient, parameter partials), dx read and written.
        let bytes = (n * c * (2 * 2 + 2 * 4 + 8)) as f64;
        let gbs = bytes / ms / 1e6;
        println!(
            "layernorm_backward_f16  N={n} C={c}: {ms:.3} ms, {gbs:.0} GB/s ({:.0} % of peak)",
            100.0 * gbs / peak
        );
    }

    // Dense products through cuBLAS, f16 inputs and fp32 accumulation.
    for (m, n, k) in [(10240usize, 3968usize, 3968usize), (10240, 4 * 3968, 3968)] {
        let a = gpu.upload(&vec![f16::from_f32(0.01); m * k]).unwrap();
        let b = gpu.upload(&vec![f16::from_f32(0.01); n * k]).unwrap();
        let mut c = gpu.zeros::<f32>(m * n).unwrap();
        let ms = time_ms(&gpu, 10, || {
            gpu.matmul(&mut c, &a, false, &b, true, (m, n, k), false)
                .unwrap()
        });
        println!(
            "matmul f16→f32 (cuBLAS) {m}×{n}×{k}: {ms:.3} ms, {:.0} TFLOP/s",
            2.0 * (m * n * k) as f64 / ms / 1e9
        );
    }
}
