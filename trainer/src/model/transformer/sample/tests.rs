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
        let fed: Vec<u32> = (0..s)
            .map(|si| match p < d.text_len {
                true => text[si * d.text_len + p],
                false => image[si * d.image_tokens() + p - d.text_len],
            })
            .collect();
        let got = sampler.feed(&fed).unwrap();
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
    let all = sample_images(&m, &w, &text, &how, 0).unwrap();
    assert_eq!(all.len(), 3 * d.image_tokens());
    assert!(all.iter().all(|&x| (x as usize) < d.image_vocab));
    assert_eq!(all, sample_images(&m, &w, &text, &how, 0).unwrap());
    let first = sample_images(&m, &w, &text[..d.text_len], &how, 0).unwrap();
    assert_eq!(first, all[..d.image_tokens()]);
    let last = sample_images(&m, &w, &text[2 * d.text_len..], &how, 2).unwrap();
    assert_eq!(last, all[2 * d.image_tokens()..]);
    let other = Sampling { seed: 6, ..how };
    assert_ne!(all, sample_images(&m, &w, &text, &other, 0).unwrap());
    // Bad options and inputs are errors, not panics.
    let hot = Sampling {
        temperature: 0.0,
        ..how
    };
    assert!(sample_images(&m, &w, &text, &hot, 0).is_err());
    assert!(sample_images(&m, &w, &text[..d.text_len - 1], &how, 0).is_err());
}
