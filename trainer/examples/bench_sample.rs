//! Sampling benchmark of the stage-2 transformer on CPU: image tokens per second, with the
//! key-value cache of `trainer sample` and without it (docs/benchmarks.md, "Sampling").
//!
//! ```text
//! cargo run --release -p trainer --example bench_sample -- [--size tiny|small] [--batch 8]
//!     [--runs 3] [--full-passes 3]
//! ```
//!
//! `kv_cache`, once with f32 products and once with bf16 (`trainer sample --precision`):
//! [`sample_images`] draws every image token of `--batch` sequences after their captions (the
//! captions fed in one pass, as `trainer sample` does); the median of `--runs` whole generations
//! after one warm-up. Then a breakdown of one generation: the captions (`prefill`), the image
//! positions ([`KvSampler::feed`]) and the token choice, and, for scale, the sampler's weight
//! products of the image positions alone (`kernels::rows` on the same shapes: qkv, attention
//! projection, MLP, head): what `image_feed` spends beyond them is attention over the cache,
//! layer norms, GELU and copies.
//!
//! `no_cache`: a sampler without a cache runs the whole forward pass for every new token (the
//! training forward over all T positions; causal masks make the logits of the next position
//! exact). One pass is timed `--full-passes` times; the generation's rate is batch / pass time.
//!
//! One JSON line per mode. Weights are the init's (the cost does not depend on their values).

use anyhow::Result;
use kernels::rows::{rows_product, RowsWeight};
use std::time::Instant;
use trainer::data::synthetic::SyntheticData;
use trainer::model::transformer::sample::{sample_images, KvSampler, Sampling};
use trainer::model::transformer::{Activations, Transformer, TransformerDims};
use trainer::model::Products;

#[path = "support/sizes.rs"]
mod sizes;
use sizes::size;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The weight products alone on the shapes of the image positions of one generation (qkv,
/// attention projection, MLP, head): their share of `image_feed`.
fn products_alone(dims: &TransformerDims, batch: usize, products: Products) -> Result<f64> {
    let (c, vi, gi) = (dims.d_model, dims.image_vocab, dims.image_tokens());
    let mut out = vec![0.0f32; batch * 4 * c];
    let x = vec![0.01f32; batch * 4 * c];
    // Every layer its own weights, as in the model: [qkv, attention projection, fc, MLP
    // projection] per layer, then the head; (rows, columns) of each.
    let shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)];
    let mut f32s: Vec<Vec<f32>> = Vec::new();
    for _ in 0..dims.layers {
        f32s.extend(shapes.iter().map(|&(n, k)| vec![0.01f32; n * k]));
    }
    f32s.push(vec![0.01f32; vi * c]);
    let packed = f32s
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let (n, k) = match i < 4 * dims.layers {
                true => shapes[i % 4],
                false => (vi, c),
            };
            match products {
                Products::Fp32 => RowsWeight::f32(w, n, k),
                Products::Bf16 => RowsWeight::bf16(w, n, k),
            }
        })
        .collect::<kernels::Result<Vec<_>>>()?;
    let mut logits = vec![0.0f32; batch * vi];
    let t0 = Instant::now();
    for _ in 0..gi - 1 {
        for l in 0..dims.layers {
            for (i, &(n, k)) in shapes.iter().enumerate() {
                let (out, inp) = (&mut out[..batch * n], &x[..batch * k]);
                rows_product(out, inp, &packed[4 * l + i], None, batch)?;
            }
        }
        let head = &packed[4 * dims.layers];
        rows_product(&mut logits, &x[..batch * c], head, None, batch)?;
    }
    Ok(t0.elapsed().as_secs_f64())
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

    // With the cache: whole generations, with f32 and with bf16 products.
    for products in [Products::Fp32, Products::Bf16] {
        let mut times = Vec::new();
        for run in 0..=runs {
            let t0 = Instant::now();
            let codes = sample_images(&model, &params, &b.text, &how, 0, products)?;
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(codes.len(), batch * gi);
            if run > 0 {
                times.push(secs);
            }
        }
        let secs = median(times.clone());

        // Breakdown of one cached generation: feeding positions (products, attention, layer
        // norms) against the token choice.
        let mut sampler = KvSampler::with_products(&model, &params, batch, products)?;
        let (mut feed_s, mut choose_s) = (0.0f64, 0.0f64);
        let t0 = Instant::now();
        let mut logits = sampler.feed_positions(&b.text, dims.text_len)?;
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
        let products_s = products_alone(&dims, batch, products)?;
        println!(
            "{}",
            serde_json::json!({
                "impl": "tessera",
                "mode": "kv_cache",
                "precision": products.to_string(),
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
    }

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
