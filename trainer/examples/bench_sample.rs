//! Sampling benchmark of the stage-2 transformer on CPU: image tokens per second, with the
//! key-value cache of `trainer sample` and without it (docs/benchmarks.md, "Sampling").
//!
//! ```text
//! cargo run --release -p trainer --example bench_sample -- [--size tiny|small] [--batch 8]
//!     [--runs 3] [--full-passes 3]
//! ```
//!
//! `kv_cache`: [`sample_images`] draws every image token of `--batch` sequences after their
//! captions (the captions fed first, one position at a time, as `trainer sample` does); the
//! median of `--runs` whole generations after one warm-up. Then a breakdown of one generation:
//! the caption's positions (`prefill`), the image positions ([`KvSampler::feed`]) and the token
//! choice, and, for scale, the sampler's weight products of the image positions alone
//! ([`rows_product`](trainer::model::transformer::sample::rows_product) on the same shapes: qkv,
//! attention projection, MLP, head): what `image_feed` spends beyond them is attention over the
//! cache, layer norms, GELU and copies.
//!
//! `no_cache`: a sampler without a cache runs the whole forward pass for every new token (the
//! training forward over all T positions; causal masks make the logits of the next position
//! exact). One pass is timed `--full-passes` times; the generation's rate is batch / pass time.
//!
//! One JSON line per mode. Weights are the init's (the cost does not depend on their values).

use anyhow::Result;
use std::time::Instant;
use trainer::data::synthetic::SyntheticData;
use trainer::model::transformer::sample::{rows_product, sample_images, KvSampler, Sampling};
use trainer::model::transformer::{Activations, Transformer};

#[path = "support/sizes.rs"]
mod sizes;
use sizes::size;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let name = arg("--size").unwrap_or_else(|| "small".into());
    let batch: usize = arg("--batch").map_or(Ok(8), |s| s.parse())?;
    let runs: usize = arg("--runs").map_or(Ok(3), |s| s.parse())?.max(1);
    let passes: usize = arg("--full-passes").map_or(Ok(3), |s| s.parse())?;
    let (dims, _) = size(&name)?;
    let model = Transformer::new(dims)?;
    let params = model.init_params(1);
    let data = SyntheticData {
        seed: 7,
        text_len: dims.text_len,
        text_vocab: dims.text_vocab,
        grid: dims.grid,
        image_vocab: dims.image_vocab,
        min_caption_tokens: 4,
        max_caption_tokens: dims.text_len,
    };
    let b = data.batch(0, batch);
    let how = Sampling::default();
    let gi = dims.image_tokens();
    let threads = rayon::current_num_threads();

    // With the cache: whole generations.
    let mut times = Vec::new();
    for run in 0..=runs {
        let t0 = Instant::now();
        let codes = sample_images(&model, &params, &b.text, &how, 0)?;
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(codes.len(), batch * gi);
        if run > 0 {
            times.push(secs);
        }
    }
    let secs = median(times.clone());

    // Breakdown of one cached generation: feeding positions (products, attention, layer norms)
    // against the token choice.
    let mut sampler = KvSampler::new(&model, &params, batch)?;
    let (mut feed_s, mut choose_s) = (0.0f64, 0.0f64);
    let mut logits = Vec::new();
    let tt = dims.text_len;
    let t0 = Instant::now();
    for p in 0..tt {
        let col: Vec<u32> = (0..batch).map(|s| b.text[s * tt + p]).collect();
        logits = sampler.feed(&col)?;
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let vi = dims.image_vocab;
    for i in 0..gi {
        let t0 = Instant::now();
        let next: Vec<u32> = (0..batch)
            .map(|s| how.choose(&logits[s * vi..(s + 1) * vi], 0.5) as u32)
            .collect();
        choose_s += t0.elapsed().as_secs_f64();
        if i + 1 < gi {
            let t0 = Instant::now();
            logits = sampler.feed(&next)?;
            feed_s += t0.elapsed().as_secs_f64();
        }
    }
    // The weight products alone on the shapes of one image position: their share of feed_s.
    let c = dims.d_model;
    let (mut out3, mut out1, mut out4) = (
        vec![0.0f32; batch * 3 * c],
        vec![0.0f32; batch * c],
        vec![0.0f32; batch * 4 * c],
    );
    let x = vec![0.01f32; batch * 4 * c];
    let w = vec![0.01f32; 4 * c * c];
    let head = vec![0.01f32; vi * c];
    let mut logits = vec![0.0f32; batch * vi];
    let t0 = Instant::now();
    for _ in 0..gi - 1 {
        for _ in 0..dims.layers {
            let xc = &x[..batch * c];
            rows_product(&mut out3, xc, &w[..3 * c * c], None, batch, c, 3 * c)?;
            rows_product(&mut out1, xc, &w[..c * c], None, batch, c, c)?;
            rows_product(&mut out4, xc, &w, None, batch, c, 4 * c)?;
            rows_product(&mut out1, &x, &w, None, batch, 4 * c, c)?;
        }
        rows_product(&mut logits, &x[..batch * c], &head, None, batch, c, vi)?;
    }
    let products_s = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "impl": "tessera",
            "mode": "kv_cache",
            "size": name,
            "batch": batch,
            "image_tokens": gi,
            "runs": runs,
            "seconds": (secs * 1e3).round() / 1e3,
            "seconds_min": (times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3).round() / 1e3,
            "tokens_per_s": ((batch * gi) as f64 / secs).round(),
            "breakdown_s": {
                "prefill": (prefill_s * 1e3).round() / 1e3,
                "image_feed": (feed_s * 1e3).round() / 1e3,
                "of_which_products": (products_s * 1e3).round() / 1e3,
                "choose": (choose_s * 1e3).round() / 1e3,
            },
            "threads": threads,
        })
    );

    if passes > 0 {
        // Without a cache: one whole forward pass per token.
        let mut acts = Activations::new(&model, batch);
        let mut times = Vec::new();
        for pass in 0..=passes {
            let t0 = Instant::now();
            model.forward(&params, &mut acts, &b.text, &b.image, None)?;
            if pass > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let pass_s = median(times);
        println!(
            "{}",
            serde_json::json!({
                "impl": "tessera",
                "mode": "no_cache",
                "size": name,
                "batch": batch,
                "image_tokens": gi,
                "pass_ms": (pass_s * 1e4).round() / 10.0,
                "seconds_estimated": (pass_s * gi as f64 * 10.0).round() / 10.0,
                "tokens_per_s": (batch as f64 / pass_s * 10.0).round() / 10.0,
                "threads": threads,
            })
        );
    }
    Ok(())
}
