//! Bandwidth of the CPU ring all-reduce ([`dist::ring::TcpRing`]) between W ranks on
//! this machine: one thread per rank, loopback TCP, the same code path as worker processes.
//! Prints one JSON line per (world size, buffer size):
//!
//! - `algbw_gb_s`: buffer bytes / time per all-reduce;
//! - `busbw_gb_s`: algbw × 2(W−1)/W, the bytes each rank actually sends (NCCL's convention), so
//!   numbers compare across world sizes.
//!
//! ```text
//! cargo run --release -p trainer --example bench_allreduce [-- --worlds 2,4 --sizes-kib 4,256,4096,65536]
//! ```

use dist::collectives::Collectives;
use dist::ring::with_local_rings;
use std::time::{Duration, Instant};

fn list(args: &[String], flag: &str, default: &[usize]) -> Vec<usize> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{flag} {v}: {x:?} is not a whole number"))
                })
                .collect()
        })
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let worlds = list(&args, "--worlds", &[2, 4]);
    let sizes_kib = list(&args, "--sizes-kib", &[4, 256, 4096, 65536]);
    for &world in &worlds {
        for &kib in &sizes_kib {
            let n = kib * 1024 / 4;
            // Every rank times the same iterations; rank 0's numbers are reported.
            let times = with_local_rings(world, Duration::from_secs(120), |rank, ring| {
                let mut buf: Vec<f32> = (0..n)
                    .map(|i| (i % 97) as f32 * 1e-3 + rank as f32)
                    .collect();
                ring.all_reduce_sum(&mut buf).expect("warm-up all-reduce");
                // Agree on the iteration count: enough for ~0.5 s, at least 3.
                let t = Instant::now();
                ring.all_reduce_sum(&mut buf).expect("all-reduce");
                let mut iters = [(0.5 / t.elapsed().as_secs_f64()).clamp(3.0, 1000.0) as f32];
                ring.broadcast(&mut iters, 0).expect("broadcast");
                let iters = iters[0] as usize;
                ring.barrier().expect("barrier");
                let t = Instant::now();
                for _ in 0..iters {
                    ring.all_reduce_sum(&mut buf).expect("all-reduce");
                }
                (iters, t.elapsed().as_secs_f64() / iters as f64)
            });
            let (iters, secs) = times[0];
            let bytes = (n * 4) as f64;
            let algbw = bytes / secs / 1e9;
            println!(
                "{{\"bench\":\"ring_allreduce\",\"transport\":\"tcp_loopback_threads\",\"world\":{world},\"bytes\":{},\"iters\":{iters},\"ms_per_op\":{:.4},\"algbw_gb_s\":{:.3},\"busbw_gb_s\":{:.3}}}",
                n * 4,
                secs * 1e3,
                algbw,
                algbw * 2.0 * (world as f64 - 1.0) / world as f64
            );
        }
    }
}
