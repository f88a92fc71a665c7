//! The dVAE's parameter names against OpenAI's release, and finite differences of the loss
//! against the backward pass.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny() -> DvaeDims {
    DvaeDims {
        resolution: 16,
        n_hid: 16,
        n_blk_per_group: 1,
        vocab_size: 6,
        n_init: 4,
    }
}

#[test]
fn parameter_names_and_shapes_follow_openai() {
    let m = Dvae::new(DvaeDims {
        resolution: 256,
        n_hid: 256,
        n_blk_per_group: 2,
        vocab_size: 8192,
        n_init: 128,
    })
    .unwrap();
    let shape = |n: &str| m.table().find(n).map(|s| s.shape.clone());
    assert_eq!(shape("encoder.blocks.input.w"), Some(vec![256, 3, 7, 7]));
    assert_eq!(shape("encoder.blocks.group_1.block_1.id_path.w"), None);
    assert_eq!(
        shape("encoder.blocks.group_2.block_1.id_path.w"),
        Some(vec![512, 256, 1, 1])
    );
    assert_eq!(shape("encoder.blocks.group_2.block_2.id_path.w"), None);
    assert_eq!(
        shape("encoder.blocks.group_1.block_1.res_path.conv_1.w"),
        Some(vec![64, 256, 3, 3])
    );
    assert_eq!(
        shape("encoder.blocks.group_4.block_2.res_path.conv_4.w"),
        Some(vec![2048, 512, 1, 1])
    );
    assert_eq!(
        shape("encoder.blocks.output.conv.w"),
        Some(vec![8192, 2048, 1, 1])
    );
    assert_eq!(shape("decoder.blocks.input.w"), Some(vec![128, 8192, 1, 1]));
    assert_eq!(
        shape("decoder.blocks.group_1.block_1.id_path.w"),
        Some(vec![2048, 128, 1, 1])
    );
    assert_eq!(
        shape("decoder.blocks.group_1.block_1.res_path.conv_1.w"),
        Some(vec![512, 128, 1, 1])
    );
    assert_eq!(
        shape("decoder.blocks.group_4.block_2.res_path.conv_4.w"),
        Some(vec![256, 64, 3, 3])
    );
    assert_eq!(
        shape("decoder.blocks.output.conv.w"),
        Some(vec![6, 256, 1, 1])
    );
    assert_eq!(shape("decoder.blocks.output.conv.b"), Some(vec![6]));
    // Every name is prefixed and every convolution has a weight and a bias.
    let names: Vec<&str> = m.table().specs().iter().map(|s| s.name.as_str()).collect();
    assert!(names
        .iter()
        .all(|n| n.starts_with("encoder.blocks.") || n.starts_with("decoder.blocks.")));
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".w")).count(),
        names.len() / 2
    );
}

#[test]
fn unit_branch_gain_draws_and_steps_the_branch_outputs_by_one_over_post_gain() {
    let d = DvaeDims {
        n_blk_per_group: 2,
        ..tiny()
    };
    let openai = Dvae::new(d).unwrap();
    let unit = Dvae::new(d).unwrap().with_branch_gain(BranchGain::Unit);
    assert_eq!(openai.branch_gain(), BranchGain::Openai);
    // post_gain = 1 / (4 · 2)² = 1/64.
    let inv = 64.0f32;
    let (a, b) = (openai.init_params(7), unit.init_params(7));
    let mut branch = 0;
    for (i, spec) in openai.table().specs().iter().enumerate() {
        let (x, y) = (openai.table().view(&a, i), unit.table().view(&b, i));
        let is_branch = spec.name.contains(".res_path.conv_4.");
        branch += is_branch as usize;
        let scale = if is_branch { inv } else { 1.0 };
        assert!(
            x.iter().zip(y).all(|(x, y)| x * scale == *y),
            "{}: not {scale}× OpenAI's draw",
            spec.name
        );
        assert_eq!(spec.lr_scale, 1.0, "{}", spec.name);
        assert_eq!(unit.table().spec(i).lr_scale, scale, "{}", spec.name);
    }
    // Weight and bias of 2 blocks × 4 groups × 2 networks.
    assert_eq!(branch, 2 * 2 * 4 * 2);
}

#[test]
fn shapes_of_logits_and_stats() {
    let m = Dvae::new(tiny()).unwrap();
    let w = m.init_params(1);
    let mut acts = m.new_acts(2);
    let images = vec![0.5f32; 2 * 3 * 16 * 16];
    let l = m.forward(&w, &mut acts, &images, None, 1.0, 0.0).unwrap();
    assert_eq!(acts.logits().len(), 2 * 6 * 2 * 2);
    assert_eq!(acts.stats().len(), 2 * 6 * 16 * 16);
    assert!(l.loss.is_finite() && l.kl >= -1e-9);
    // Bad input: wrong size, out-of-range pixels, non-positive tau.
    assert!(m
        .forward(&w, &mut acts, &images[1..], None, 1.0, 0.0)
        .is_err());
    let mut bad = images.clone();
    bad[5] = 1.5;
    let e = m
        .forward(&w, &mut acts, &bad, None, 1.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pixel 5"), "{e}");
    assert!(m.forward(&w, &mut acts, &images, None, 0.0, 0.0).is_err());
}

#[test]
fn gradients_match_finite_differences() {
    assert_gradients_match_finite_differences(&Dvae::new(tiny()).unwrap());
}

#[test]
fn gradients_match_finite_differences_with_the_batch_kl() {
    let m = Dvae::new(tiny()).unwrap().with_kl_term(KlTerm::Batch);
    assert_gradients_match_finite_differences(&m);
    // Its kl is the batch's: N·KL(q̄ ‖ uniform), q̄ over both images' positions.
    let (b, k, hw) = (2, 6, 4);
    let w = m.init_params(5);
    let images = vec![0.25f32; b * 3 * 16 * 16];
    let mut acts = m.new_acts(b);
    let l = m.forward(&w, &mut acts, &images, None, 1.0, 0.5).unwrap();
    let q_bar = kernels::dvae::batch_code_distribution(acts.logits(), b, k, hw).unwrap();
    assert_eq!(l.kl, kernels::dvae::kl_batch(&q_bar, b * hw));
    let per_position = Dvae::new(tiny()).unwrap();
    let lp = per_position
        .forward(&w, &mut acts, &images, None, 1.0, 0.5)
        .unwrap();
    assert_eq!(lp.nll, l.nll);
    assert!(
        l.kl < lp.kl,
        "the batch KL {} ≥ the positions' {}",
        l.kl,
        lp.kl
    );
}

#[test]
fn the_argmax_decoder_input_decodes_the_argmax_codes_and_trains_the_decoder_alone() {
    let m = Dvae::new(tiny())
        .unwrap()
        .with_kl_term(KlTerm::Batch)
        .with_decoder_input(DecoderInput::Argmax);
    // Finite differences hold for the decoder; the encoder's gradient is exactly zero.
    assert_gradients_match_finite_differences(&m);
    // The decoder reads one-hot argmax codes, whatever the noise and τ: its statistics are those
    // of decoding the codes (`Dvae::decoder_stats`, what reconstruction and sampling use).
    let (b, k, hw) = (2, 6, 4);
    let w = m.init_params(7);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let images: Vec<f32> = (0..b * 3 * 16 * 16)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let noise: Vec<f32> = (0..b * k * hw)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let mut acts = m.new_acts(b);
    m.forward(&w, &mut acts, &images, Some(&noise), 0.3, 0.0)
        .unwrap();
    let codes = argmax_codes(acts.logits(), k, hw).unwrap();
    assert_eq!(acts.stats(), &m.decoder_stats(&w, &codes).unwrap()[..]);
    // The relaxed model's decoder reads something else from the same logits and noise.
    let relaxed = Dvae::new(tiny()).unwrap().with_kl_term(KlTerm::Batch);
    let mut racts = relaxed.new_acts(b);
    relaxed
        .forward(&w, &mut racts, &images, Some(&noise), 0.3, 0.0)
        .unwrap();
    assert_ne!(racts.stats(), acts.stats());
    // A KL term would move the encoder: refused.
    let e = m
        .forward(&w, &mut acts, &images, None, 1.0, 0.5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta must be 0"), "{e}");
}

fn assert_gradients_match_finite_differences(m: &Dvae) {
    // Only the decoder learns from argmax codes (and then β must be 0).
    let argmax = m.decoder_input() == DecoderInput::Argmax;
    let learns = |name: &str| !(argmax && name.starts_with("encoder."));
    let b = 2;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Weights large enough that the residual paths matter at post-gain 1/16.
    let mut w = m.init_params(2);
    let images: Vec<f32> = (0..b * 3 * 16 * 16)
        .map(|_| rng.random_range(0.0..1.0))
        .collect();
    let noise: Vec<f32> = (0..b * 6 * 2 * 2)
        .map(|_| {
            let u: f32 = rng.random_range(1e-6..1.0);
            -(-u.ln()).ln()
        })
        .collect();
    let (tau, beta) = (0.7, if argmax { 0.0 } else { 0.5 });
    let mut acts = m.new_acts(b);
    let mut grads = vec![0.0f32; w.len()];
    m.forward(&w, &mut acts, &images, Some(&noise), tau, beta)
        .unwrap();
    m.backward(&w, &mut grads, &mut acts, 1.0).unwrap();
    // Every tensor gets checked at a spread of entries (all of them for small tensors). ReLUs and
    // the |t − μ| of the likelihood have kinks: a difference quotient that straddles one is off
    // for that entry alone, so a few outliers (≤ 2%) are allowed, and every other entry must agree.
    let eps = 1e-3f32;
    let (mut checked, mut outliers) = (0, Vec::new());
    for spec in m.table().specs().iter().filter(|s| learns(&s.name)) {
        let n = spec.numel();
        let step = (n / 12).max(1);
        for i in (spec.offset..spec.offset + n).step_by(step) {
            let orig = w[i];
            let mut eval = |v: f32, w: &mut Vec<f32>| {
                w[i] = v;
                m.forward(w, &mut acts, &images, Some(&noise), tau, beta)
                    .unwrap()
                    .loss
            };
            let plus = eval(orig + eps, &mut w);
            let minus = eval(orig - eps, &mut w);
            w[i] = orig;
            let num = (plus - minus) / (2.0 * eps as f64);
            let got = grads[i] as f64;
            if (got - num).abs() > 1e-4 + 2e-2 * num.abs() {
                outliers.push(format!(
                    "{}[{}]: backward {got} vs {num}",
                    spec.name,
                    i - spec.offset
                ));
            }
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked}");
    eprintln!("{} of {checked} entries off: {outliers:#?}", outliers.len());
    assert!(outliers.len() * 50 <= checked, "{outliers:#?}");
    for (spec, g) in m.table().specs().iter().zip(m.table().split(&grads)) {
        match learns(&spec.name) {
            true => assert!(
                g.iter().any(|&x| x != 0.0),
                "{} has an all-zero gradient",
                spec.name
            ),
            false => assert!(
                g.iter().all(|&x| x.to_bits() == 0),
                "{} has a gradient",
                spec.name
            ),
        }
    }
}
