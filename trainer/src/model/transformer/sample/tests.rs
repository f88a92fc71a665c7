//! The cached passes against the full forward pass, and the token choice.

use super::*;
use crate::model::transformer::{Activations, TransformerDims};

/// Five layers: row, column, row, row, conv (every mask kind, one kind shared by layers).
fn model() -> Transformer {
    Transformer::new(TransformerDims {
        text_len: 5,
        text_vocab: 7,
        grid: 4,
        image_vocab: 6,
        d_model: 16,
        heads: 2,
        layers: 5,
        conv_kernel: 3,
    })
    .unwrap()
}

fn tokens(m: &Transformer, s: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let d = m.dims();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let text = (0..s * d.text_len)
        .map(|_| rng.random_range(0..d.text_rows() as u32))
        .collect();
    let image = (0..s * d.image_tokens())
        .map(|_| rng.random_range(0..d.image_vocab as u32))
        .collect();
    (text, image)
}

#[test]
fn cached_logits_equal_the_full_forward_pass_at_every_position() {
    let m = model();
    let d = *m.dims();
    let w = m.init_params(4);
    let s = 2;
    let (text, image) = tokens(&m, s, 9);
    let mut acts = Activations::new(&m, s);
    m.forward(&w, &mut acts, &text, &image, None).unwrap();
    let full = m.full_logits(&w, &acts).unwrap();
    let (t, v) = (d.seq_len(), d.vocab_total());
    let mut sampler = KvSampler::new(&m, &w, s).unwrap();
    for p in 0..t - 1 {
        let got = sampler
            .feed(&positions(&m, &text, &image, s, p..p + 1))
            .unwrap();
        let (lo, hi) = match p + 1 < d.text_len {
            true => (0, d.text_rows()),
            false => (d.text_rows(), v),
        };
        let width = hi - lo;
        assert_eq!(got.len(), s * width, "position {p}");
        for si in 0..s {
            let want = &full[(si * t + p) * v + lo..(si * t + p) * v + hi];
            for (j, (x, y)) in got[si * width..(si + 1) * width]
                .iter()
                .zip(want)
                .enumerate()
            {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "sequence {si}, position {p}, logit {j}: cached {x}, full {y}"
                );
            }
        }
    }
    assert_eq!(sampler.position(), t - 1);
}

#[test]
fn the_choice_follows_temperature_top_k_and_top_p() {
    // Probabilities 0.1, 0.2, 0.3, 0.4.
    let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
    let count = |how: Sampling| {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut n = [0usize; 4];
        for _ in 0..20_000 {
            n[how.choose(&logits, rng.random())] += 1;
        }
        n.map(|k| k as f64 / 20_000.0)
    };
    let close = |got: [f64; 4], want: [f64; 4]| {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 0.015, "{got:?} vs {want:?}");
        }
    };
    close(count(Sampling::default()), [0.1, 0.2, 0.3, 0.4]);
    // Top-2 renormalises 0.3 and 0.4.
    let top2 = Sampling {
        top_k: 2,
        ..Sampling::default()
    };
    close(count(top2), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // Top-p 0.65: 0.4 + 0.3 reaches it.
    let nucleus = Sampling {
        top_p: 0.65,
        ..Sampling::default()
    };
    close(count(nucleus), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // Temperature 1/2 squares the odds: 1, 4, 9, 16 over 30.
    let cold = Sampling {
        temperature: 0.5,
        ..Sampling::default()
    };
    close(
        count(cold),
        [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0],
    );
    let greedy = Sampling {
        top_k: 1,
        ..Sampling::default()
    };
    assert_eq!(count(greedy), [0.0, 0.0, 0.0, 1.0]);
}

#[test]
fn samples_are_deterministic_per_seed_and_independent_of_the_batch() {
    let m = model();
    let d = *m.dims();
    let w = m.init_params(4);
    let (text, _) = tokens(&m, 3, 2);
    let how = Sampling {
        seed: 5,
        ..Sampling::default()
    };
    let all = sample_images(&m, &w, &text, &how, 0, Products::Fp32).unwrap();
    assert_eq!(all.len(), 3 * d.image_tokens());
    assert!(all.iter().all(|&x| (x as usize) < d.image_vocab));
    assert_eq!(
        all,
        sample_images(&m, &w, &text, &how, 0, Products::Fp32).unwrap()
    );
    let first = sample_images(&m, &w, &text[..d.text_len], &how, 0, Products::Fp32).unwrap();
    assert_eq!(first, all[..d.image_tokens()]);
    let last = sample_images(&m, &w, &text[2 * d.text_len..], &how, 2, Products::Fp32).unwrap();
    assert_eq!(last, all[2 * d.image_tokens()..]);
    let other = Sampling { seed: 6, ..how };
    assert_ne!(
        all,
        sample_images(&m, &w, &text, &other, 0, Products::Fp32).unwrap()
    );
    // Bad options and inputs are errors, not panics.
    let hot = Sampling {
        temperature: 0.0,
        ..how
    };
    assert!(sample_images(&m, &w, &text, &hot, 0, Products::Fp32).is_err());
    assert!(sample_images(&m, &w, &text[..d.text_len - 1], &how, 0, Products::Fp32).is_err());
}

/// The tokens of every sequence at positions `range`, [S, len] sequence-major.
fn positions(
    m: &Transformer,
    text: &[u32],
    image: &[u32],
    s: usize,
    range: std::ops::Range<usize>,
) -> Vec<u32> {
    let d = m.dims();
    (0..s)
        .flat_map(|si| {
            range.clone().map(move |p| match p < d.text_len {
                true => text[si * d.text_len + p],
                false => image[si * d.image_tokens() + p - d.text_len],
            })
        })
        .collect()
}

#[test]
fn feeding_positions_together_equals_feeding_them_one_at_a_time() {
    let m = model();
    let d = *m.dims();
    let w = m.init_params(4);
    let s = 3;
    let (text, image) = tokens(&m, s, 9);
    let t = d.seq_len();
    for products in [Products::Fp32, Products::Bf16] {
        let mut one = KvSampler::with_products(&m, &w, s, products).unwrap();
        let mut each = Vec::new();
        for p in 0..t - 1 {
            each.push(
                one.feed(&positions(&m, &text, &image, s, p..p + 1))
                    .unwrap(),
            );
        }
        // The caption at once, then blocks of 3, 1 and the rest (across the text/image border
        // and the image rows).
        let mut many = KvSampler::with_products(&m, &w, s, products).unwrap();
        let mut p = 0;
        for count in [d.text_len, 3, 1, t - 1 - d.text_len - 4] {
            let got = many
                .feed_positions(&positions(&m, &text, &image, s, p..p + count), count)
                .unwrap();
            p += count;
            assert_eq!(
                got,
                each[p - 1],
                "{products}: logits after position {}",
                p - 1
            );
        }
        assert_eq!(many.position(), t - 1);
        assert!(many.cache == one.cache, "{products}: the caches differ");
    }
    let mut sampler = KvSampler::new(&m, &w, s).unwrap();
    assert!(sampler.feed_positions(&[], 0).is_err());
    assert!(sampler.feed_positions(&text[..s * 2 - 1], 2).is_err());
    let all = positions(&m, &text, &image, s, 0..t);
    assert!(sampler.feed_positions(&all, t).is_ok());
    assert!(
        sampler.feed(&all[..s]).is_err(),
        "all {t} positions are fed"
    );
}

#[test]
fn bf16_products_stay_near_the_f32_logits_and_sample_deterministically() {
    let m = model();
    let d = *m.dims();
    // Larger weights than the init's, so that the logits spread and rounding shows.
    let w: Vec<f32> = m.init_params(4).iter().map(|x| 8.0 * x).collect();
    let s = 2;
    let (text, image) = tokens(&m, s, 9);
    let t = d.seq_len();
    let all = positions(&m, &text, &image, s, 0..t - 1);
    let logits = |products| {
        KvSampler::with_products(&m, &w, s, products)
            .unwrap()
            .feed_positions(&all, t - 1)
            .unwrap()
    };
    let (f32s, bf16s) = (logits(Products::Fp32), logits(Products::Bf16));
    let spread = f32s.iter().fold(0.0f32, |a, &x| a.max(x.abs()));
    let worst = f32s
        .iter()
        .zip(&bf16s)
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(spread > 0.5, "logits too flat to compare: {spread}");
    assert!(worst > 0.0, "bf16 changed nothing");
    assert!(
        worst <= 0.03 * spread,
        "bf16 logits {worst} from fp32's (largest {spread})"
    );
    let how = Sampling::default();
    let bf16 =
        |text: &[u32], first| sample_images(&m, &w, text, &how, first, Products::Bf16).unwrap();
    let both = bf16(&text, 0);
    assert_eq!(both, bf16(&text, 0));
    assert_eq!(bf16(&text[d.text_len..], 1), both[d.image_tokens()..]);
}

#[test]
fn a_bf16_cache_attends_as_f32_over_the_rounded_keys_and_values() {
    // Two sequences of 7 positions, 3 rows fed at positions 4..6 of each, 2 heads of 8: every
    // row may see every key up to its own (a causal mask row).
    let (s, t, count, p0, c, hs) = (2, 7, 3, 4, 16, 8);
    let allowed: Vec<Vec<usize>> = (0..t).map(|p| (0..=p).collect()).collect();
    let rows = Rows {
        allowed: &allowed,
        count,
        p0,
        t,
        c,
        hs,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
    let qkv = draw(s * count * 3 * c);
    let earlier = draw(s * t * c);
    let round = |v: f32| half::bf16::from_f32(v).to_f32();
    // The f32 cache holds the rounded keys and values, earlier positions included.
    let rounded_qkv: Vec<f32> = qkv
        .chunks_exact(3 * c)
        .flat_map(|row| {
            row[..c]
                .iter()
                .copied()
                .chain(row[c..].iter().map(|&v| round(v)))
        })
        .collect();
    let (mut k32, mut v32): (Vec<f32>, Vec<f32>) = (
        earlier.iter().map(|&v| round(v)).collect(),
        earlier.iter().map(|&v| round(-v)).collect(),
    );
    let (mut k16, mut v16): (Vec<u16>, Vec<u16>) = (
        earlier.iter().map(|&v| u16::store(v)).collect(),
        earlier.iter().map(|&v| u16::store(-v)).collect(),
    );
    let (mut out32, mut out16) = (vec![0.0; s * count * c], vec![1.0; s * count * c]);
    rows.attend(&mut k32, &mut v32, &rounded_qkv, &mut out32);
    rows.attend(&mut k16, &mut v16, &qkv, &mut out16);
    assert_eq!(out16, out32);
    let widen = |b: &[u16]| b.iter().map(|&b| b.widen()).collect::<Vec<f32>>();
    assert_eq!(widen(&k16), k32);
    assert_eq!(widen(&v16), v32);
    // Not f32 in disguise: the unrounded cache attends differently.
    let (mut k, mut v) = (
        earlier.clone(),
        earlier.iter().map(|&v| -v).collect::<Vec<_>>(),
    );
    let mut out = vec![0.0; s * count * c];
    rows.attend(&mut k, &mut v, &qkv, &mut out);
    assert_ne!(out, out32);
    assert!(out.iter().zip(&out32).all(|(a, b)| (a - b).abs() < 0.05));
}
