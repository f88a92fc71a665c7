//! Training-step benchmark of the stage-2 transformer on CPU.
//!
//! ```text
//! cargo run --release -p trainer --example bench_transformer -- --size tiny|small|paperseq [--steps N]
//! ```
//!
//! Prints one JSON line: the median over `--steps` (≥ 5) full training steps after two warm-up
//! steps (forward, backward, AdamW with clipping), with useful FLOPs counted by
//! `Transformer::train_flops` (attention only over allowed pairs; the head only over the
//! vocabulary segment each position is scored on).

use anyhow::Result;
use std::time::Instant;
use trainer::data::synthetic::SyntheticData;
use trainer::model::transformer::{Activations, Transformer};
use trainer::optim::{AdamW, AdamWParams};

#[path = "support/sizes.rs"]
mod sizes;
use sizes::size;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let name = arg("--size").unwrap_or_else(|| "tiny".into());
    let steps: usize = arg("--steps").map_or(Ok(7), |s| s.parse())?.max(5);
    let (dims, batch) = size(&name)?;
    let model = Transformer::new(dims)?;
    let mut params = model.init_params(1);
    let mut grads = vec![0.0f32; params.len()];
    let mut acts = Activations::new(&model, batch);
    let mut adam = AdamW::new(
        AdamWParams {
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-8,
            weight_decay: 0.045,
            grad_clip: 4.0,
        },
        params.len(),
    );
    let data = SyntheticData {
        seed: 7,
        text_len: dims.text_len,
        text_vocab: dims.text_vocab,
        grid: dims.grid,
        image_vocab: dims.image_vocab,
        min_caption_tokens: 4,
        max_caption_tokens: dims.text_len,
    };
    let mut times = Vec::new();
    let mut loss = 0.0;
    for step in 0..steps + 2 {
        let b = data.batch((step * batch) as u64, batch);
        let t0 = Instant::now();
        grads.fill(0.0);
        loss = model
            .forward(&params, &mut acts, &b.text, &b.image, Some(1.0))?
            .loss;
        model.backward(&params, &mut grads, &mut acts, &b.text, &b.image)?;
        adam.step(model.table(), &mut params, &grads, 1e-4)?;
        if step >= 2 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let flops = model.train_flops(batch);
    let line = serde_json::json!({
        "size": name,
        "params": model.table().numel(),
        "batch": batch,
        "seq_len": dims.seq_len(),
        "threads": rayon::current_num_threads(),
        "steps": steps,
        "step_ms": (ms * 100.0).round() / 100.0,
        "step_ms_min": (times[0] * 100.0).round() / 100.0,
        "image_tokens_per_s": ((batch * dims.image_tokens()) as f64 / (ms / 1e3)).round(),
        "tokens_per_s": ((batch * dims.seq_len()) as f64 / (ms / 1e3)).round(),
        "gflops_per_step": (flops / 1e9 * 100.0).round() / 100.0,
        "gflops_per_s": (flops / 1e9 / (ms / 1e3) * 10.0).round() / 10.0,
        "loss": loss,
    });
    println!("{line}");
    Ok(())
}
