//! Training-step benchmark of the stage-1 dVAE on CPU.
//!
//! ```text
//! cargo run --release -p trainer --example bench_dvae [-- --steps N]
//! ```
//!
//! 64×64 images, n_hid 64, n_blk_per_group 1, K 512, decoder n_init 64, batch 8; one full
//! training step = Gumbel noise, forward, loss, backward, AdamW. Prints one JSON line with the
//! median over `--steps` (≥ 5) steps after two warm-up steps.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;
use trainer::model::dvae::{Dvae, DvaeDims};
use trainer::optim::{AdamW, AdamWParams};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(7), |s| s.parse())?
        .max(5);
    let dims = DvaeDims {
        resolution: 64,
        n_hid: 64,
        n_blk_per_group: 1,
        vocab_size: 512,
        n_init: 64,
    };
    let batch = 8;
    let model = Dvae::new(dims)?;
    let mut params = model.init_params(1);
    let mut grads = vec![0.0f32; params.len()];
    let mut acts = model.new_acts(batch);
    let mut adam = AdamW::new(
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            grad_clip: 0.0,
        },
        params.len(),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let images: Vec<f32> = (0..batch * 3 * 64 * 64)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let codes = batch * 512 * 8 * 8;
    let mut noise = vec![0.0f32; codes];
    let mut times = Vec::new();
    let mut loss = 0.0;
    for step in 0..steps + 2 {
        let t0 = Instant::now();
        trainer::model::dvae::gumbel_noise(5, step as u64, &mut noise);
        grads.fill(0.0);
        loss = model
            .forward(&params, &mut acts, &images, Some(&noise), 1.0, 0.0)?
            .loss;
        model.backward(&params, &mut grads, &mut acts, 1.0)?;
        adam.step(model.table(), &mut params, &grads, 1e-4)?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let line = serde_json::json!({
        "bench": "dvae",
        "params": model.table().numel(),
        "batch": batch,
        "resolution": 64,
        "threads": rayon::current_num_threads(),
        "steps": steps,
        "step_ms": (ms * 100.0).round() / 100.0,
        "step_ms_min": (times[0] * 100.0).round() / 100.0,
        "images_per_s": (batch as f64 / (ms / 1e3) * 10.0).round() / 10.0,
        "gflops_per_step": (model.train_flops(batch) / 1e9 * 100.0).round() / 100.0,
        "gflops_per_s": (model.train_flops(batch) / 1e9 / (ms / 1e3) * 10.0).round() / 10.0,
        "loss": loss,
    });
    println!("{line}");
    Ok(())
}
