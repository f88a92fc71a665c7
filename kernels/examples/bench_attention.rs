//! Times block-sparse attention forward and backward at the benchmark's target shapes, one JSON line
//! per (size, mask kind, block):
//!
//! ```text
//! cargo run --release -p kernels --example bench_attention [-- BLOCK...]
//! ```
//!
//! Times are medians (and minima) of `RUNS` runs after `WARMUP` warm-up runs; `BENCH_SIZE=small`
//! runs one size only. GFLOP/s counts useful work only:
//! `4·HS` FLOPs per allowed pair forward (q·k and p·v), `8·HS` backward, times `B·NH`.

use std::time::Instant;

use kernels::attention::{
    attention_backward, attention_forward, BlockLayout, MaskKind, DEFAULT_BLOCK,
};

const WARMUP: usize = 5;
const RUNS: usize = 7;

struct Size {
    name: &'static str,
    text_len: usize,
    grid: usize,
    b: usize,
    nh: usize,
    hs: usize,
}

const SIZES: [Size; 3] = [
    Size {
        name: "tiny",
        text_len: 32,
        grid: 8,
        b: 16,
        nh: 8,
        hs: 32,
    },
    Size {
        name: "small",
        text_len: 64,
        grid: 16,
        b: 8,
        nh: 6,
        hs: 64,
    },
    Size {
        name: "paperseq",
        text_len: 256,
        grid: 32,
        b: 2,
        nh: 4,
        hs: 64,
    },
];

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

/// (median, minimum) of `RUNS` timings of `f`, in milliseconds, after `WARMUP` untimed calls. The
/// minimum is the steadier number on a shared machine.
fn time_ms(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..WARMUP {
        f();
    }
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[RUNS / 2], times[0])
}

fn main() -> kernels::Result<()> {
    let blocks: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let blocks = if blocks.is_empty() {
        vec![DEFAULT_BLOCK]
    } else {
        blocks
    };
    // BENCH_SIZE=name runs one size only.
    let only = std::env::var("BENCH_SIZE").ok();
    for size in SIZES
        .iter()
        .filter(|s| only.as_deref().is_none_or(|o| o == s.name))
    {
        let Size {
            name,
            text_len,
            grid,
            b,
            nh,
            hs,
        } = *size;
        let t = text_len + grid * grid;
        let c = nh * hs;
        let qkv = pseudo_random(b * t * 3 * c, 1);
        let dout = pseudo_random(b * t * c, 2);
        let mut out = vec![0.0; b * t * c];
        let mut lse = vec![0.0; b * nh * t];
        let mut dqkv = vec![0.0; b * t * 3 * c];
        for kind in [
            MaskKind::Row,
            MaskKind::Column,
            MaskKind::Conv { kernel: 11 },
        ] {
            for &block in &blocks {
                let layout = BlockLayout::new(text_len, grid, kind, block)?;
                let (fwd_ms, fwd_min_ms) = time_ms(|| {
                    attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs).unwrap()
                });
                attention_forward(&mut out, &mut lse, &qkv, &layout, b, t, nh, hs)?;
                let (bwd_ms, bwd_min_ms) = time_ms(|| {
                    attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &layout, b, t, nh, hs)
                        .unwrap()
                });
                let pairs = layout.allowed_pairs();
                let work = (pairs * (b * nh * hs) as u64) as f64;
                let fwd_gflops = 4.0 * work / (fwd_ms * 1e6);
                let bwd_gflops = 8.0 * work / (bwd_ms * 1e6);
                println!(
                    "{{\"size\":\"{name}\",\"kind\":\"{kind:?}\",\"block\":{block},\"T\":{t},\"B\":{b},\"NH\":{nh},\"HS\":{hs},\
                     \"allowed_pairs\":{pairs},\"nonzero_blocks\":{},\"fwd_ms\":{fwd_ms:.3},\"bwd_ms\":{bwd_ms:.3},\"fwd_min_ms\":{fwd_min_ms:.3},\"bwd_min_ms\":{bwd_min_ms:.3},\
                     \"fwd_gflops\":{fwd_gflops:.2},\"bwd_gflops\":{bwd_gflops:.2}}}",
                    layout.nonzero_blocks()
                );
            }
        }
    }
    Ok(())
}
