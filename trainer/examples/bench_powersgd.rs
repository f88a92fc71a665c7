//! PowerSGD compression cost for the `small` transformer of `bench_transformer` on CPU.
//!
//! ```text
//! cargo run --release -p trainer --example bench_powersgd [-- --steps N --ranks 1,4,8]
//! ```
//!
//! Random gradients (three draws, taken in turn), one rank (`SingleProcess`, so every all-reduce is
//! free and the time is the compression alone: error feedback, the P and Q products,
//! orthonormalisation, decompression, gathers and scatters). Prints one JSON line per rank r:
//! the median milliseconds per `reduce` over `--steps` (≥ 5) after two warm-up steps, and the
//! payload bytes one step all-reduces with and without compression.

use anyhow::{Context, Result};
use dist::collectives::SingleProcess;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::model::transformer::{Transformer, TransformerDims};
use trainer::powersgd::{PowerSgd, PowerSgdConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let steps: usize = arg("--steps").map_or(Ok(9), |s| s.parse())?.max(5);
    let ranks: Vec<usize> = arg("--ranks")
        .unwrap_or_else(|| "1,4,8".into())
        .split(',')
        .map(|r| r.parse().with_context(|| format!("bad rank {r}")))
        .collect::<Result<_>>()?;
    // The `small` size of bench_transformer.rs.
    let dims = TransformerDims {
        text_len: 64,
        text_vocab: 4096,
        grid: 16,
        image_vocab: 1024,
        d_model: 384,
        heads: 6,
        layers: 12,
        conv_kernel: 11,
    };
    let model = Transformer::new(dims)?;
    let n = model.table().numel();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let draws: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..n).map(|_| rng.random_range(-1e-3..1e-3)).collect())
        .collect();
    let mut comm = SingleProcess;
    for rank in ranks {
        let cfg = PowerSgdConfig {
            rank,
            ..PowerSgdConfig::default()
        };
        let mut ps = PowerSgd::new(model.table(), &cfg)?;
        let mut grads = vec![0.0f32; n];
        let mut times = Vec::new();
        let mut last = None;
        for step in 0..steps + 2 {
            grads.copy_from_slice(&draws[step % draws.len()]);
            let stats = ps.reduce(&mut grads, &mut comm)?;
            anyhow::ensure!(!stats.non_finite, "non-finite result");
            if step >= 2 {
                times.push((stats.compute_secs + stats.comm_secs) * 1e3);
            }
            last = Some(stats);
        }
        let stats = last.expect("at least one step");
        times.sort_by(f64::total_cmp);
        let compressed_numel: usize = ps.compressed().iter().map(|c| c.numel()).sum();
        let line = serde_json::json!({
            "size": "small",
            "params": n,
            "compressed_params": compressed_numel,
            "compressed_tensors": ps.compressed().len(),
            "buckets": ps.buckets().len(),
            "rank": rank,
            "threads": rayon::current_num_threads(),
            "steps": steps,
            "compress_ms": (times[times.len() / 2] * 100.0).round() / 100.0,
            "compress_ms_min": (times[0] * 100.0).round() / 100.0,
            "all_reduces_per_step": stats.all_reduces,
            "bytes_per_step": stats.bytes_sent,
            "bytes_per_step_uncompressed": stats.bytes_uncompressed,
            "ratio": (stats.ratio() * 10000.0).round() / 10000.0,
        });
        println!("{line}");
    }
    Ok(())
}
