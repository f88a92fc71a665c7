//! Whole-model checks: an independent f64 reading of docs/model.md §1 (dense attention masked by
//! the brute-force rule) against the block-sparse forward, and finite differences of the loss
//! against the backward pass for every parameter.

use super::*;
use kernels::attention::allowed_reference;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Four layers, so row, column, row and conv layouts all appear.
fn tiny() -> TransformerDims {
    TransformerDims {
        text_len: 4,
        text_vocab: 6,
        grid: 3,
        image_vocab: 5,
        d_model: 8,
        heads: 2,
        layers: 4,
        conv_kernel: 3,
    }
}

fn batch(d: &TransformerDims, b: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let text = (0..b * d.text_len)
        .map(|_| rng.random_range(0..d.text_rows() as u32))
        .collect();
    let image = (0..b * d.image_tokens())
        .map(|_| rng.random_range(0..d.image_vocab as u32))
        .collect();
    (text, image)
}

/// Weights large enough that every gradient is well above finite-difference noise.
fn weights(m: &Transformer, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = m.init_params(seed);
    for (spec, v) in m.table().specs().iter().zip(m.table().split_mut(&mut w)) {
        for x in v.iter_mut() {
            *x = match spec.kind {
                ParamKind::Gain => 1.0 + rng.random_range(-0.3..0.3),
                _ => rng.random_range(-0.5..0.5),
            };
        }
    }
    w
}

/// docs/model.md §1 read literally, in f64: returns (loss, text loss, image loss, logits [B,T,V]).
fn reference(
    m: &Transformer,
    w: &[f32],
    text: &[u32],
    image: &[u32],
    b: usize,
) -> (f64, f64, f64, Vec<f64>) {
    let d = *m.dims();
    let (tt, g, c, t) = (d.text_len, d.grid, d.d_model, d.seq_len());
    let (nh, hs) = (d.heads, d.head_size());
    let get = |name: &str| -> Vec<f64> {
        let s = m.table().find(name).unwrap();
        w[s.range()].iter().map(|&x| x as f64).collect()
    };
    let ln = |x: &[f64], wt: &[f64], bs: &[f64]| -> Vec<f64> {
        let mu = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / x.len() as f64;
        x.iter()
            .zip(wt.iter().zip(bs))
            .map(|(v, (a, bb))| (v - mu) / (var + 1e-5).sqrt() * a + bb)
            .collect()
    };
    let lin = |x: &[f64], wt: &[f64], bs: Option<&[f64]>, out: usize| -> Vec<f64> {
        let inn = x.len();
        (0..out)
            .map(|o| {
                (0..inn).map(|i| x[i] * wt[o * inn + i]).sum::<f64>() + bs.map_or(0.0, |bb| bb[o])
            })
            .collect()
    };
    let gelu = |u: f64| {
        0.5 * u * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (u + 0.044715 * u.powi(3))).tanh())
    };
    let (te, tp, ie, ir, ic) = (
        get("text_emb.weight"),
        get("text_pos.weight"),
        get("image_emb.weight"),
        get("image_row.weight"),
        get("image_col.weight"),
    );
    let mut all_logits = Vec::new();
    let (mut text_ce, mut image_ce) = (Vec::new(), Vec::new());
    for bi in 0..b {
        let mut x: Vec<Vec<f64>> = (0..t)
            .map(|p| {
                (0..c)
                    .map(|k| {
                        if p < tt {
                            te[text[bi * tt + p] as usize * c + k] + tp[p * c + k]
                        } else {
                            let i = p - tt;
                            ie[image[bi * g * g + i] as usize * c + k]
                                + ir[(i / g) * c + k]
                                + ic[(i % g) * c + k]
                        }
                    })
                    .collect()
            })
            .collect();
        for l in 0..d.layers {
            let pre = |s: &str| get(&format!("blocks.{l}.{s}"));
            let kind = attention::layer_mask_kind(l, d.layers, d.conv_kernel);
            let a: Vec<Vec<f64>> = x
                .iter()
                .map(|r| ln(r, &pre("ln_1.weight"), &pre("ln_1.bias")))
                .collect();
            let qkv: Vec<Vec<f64>> = a
                .iter()
                .map(|r| {
                    lin(
                        r,
                        &pre("attn.qkv.weight"),
                        Some(&pre("attn.qkv.bias")),
                        3 * c,
                    )
                })
                .collect();
            let mut att = vec![vec![0.0; c]; t];
            for h in 0..nh {
                for p in 0..t {
                    let keys: Vec<usize> = (0..t)
                        .filter(|&q| allowed_reference(tt, g, kind, p, q))
                        .collect();
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&q| {
                            (0..hs)
                                .map(|k| qkv[p][h * hs + k] * qkv[q][c + h * hs + k])
                                .sum::<f64>()
                                / (hs as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    for (j, &q) in keys.iter().enumerate() {
                        let pr = (s[j] - mx).exp() / z;
                        for k in 0..hs {
                            att[p][h * hs + k] += pr * qkv[q][2 * c + h * hs + k];
                        }
                    }
                }
            }
            for p in 0..t {
                let o = lin(
                    &att[p],
                    &pre("attn.proj.weight"),
                    Some(&pre("attn.proj.bias")),
                    c,
                );
                for k in 0..c {
                    x[p][k] += o[k];
                }
                let a2 = ln(&x[p], &pre("ln_2.weight"), &pre("ln_2.bias"));
                let h1: Vec<f64> =
                    lin(&a2, &pre("mlp.fc.weight"), Some(&pre("mlp.fc.bias")), 4 * c)
                        .into_iter()
                        .map(gelu)
                        .collect();
                let o = lin(&h1, &pre("mlp.proj.weight"), Some(&pre("mlp.proj.bias")), c);
                for k in 0..c {
                    x[p][k] += o[k];
                }
            }
        }
        let head = get("head.weight");
        for p in 0..t {
            let z = lin(
                &ln(&x[p], &get("ln_f.weight"), &get("ln_f.bias")),
                &head,
                None,
                d.vocab_total(),
            );
            let ce = |seg: &[f64], target: usize| {
                let mx = seg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                mx + seg.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() - seg[target]
            };
            if p + 1 < tt {
                text_ce.push(ce(&z[..d.text_rows()], text[bi * tt + p + 1] as usize));
            } else if p + 1 < t {
                image_ce.push(ce(
                    &z[d.text_rows()..],
                    image[bi * g * g + p + 1 - tt] as usize,
                ));
            }
            all_logits.extend(z);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (lt, li) = (mean(&text_ce), mean(&image_ce));
    (lt / 8.0 + li * 7.0 / 8.0, lt, li, all_logits)
}

#[test]
fn forward_matches_a_literal_f64_reading_of_the_spec() {
    let m = Transformer::new(tiny()).unwrap();
    let b = 2;
    let w = weights(&m, 3);
    let (text, image) = batch(m.dims(), b, 4);
    let mut acts = Activations::new(&m, b);
    let losses = m.forward(&w, &mut acts, &text, &image, None).unwrap();
    let logits = m.full_logits(&w, &acts).unwrap();
    let (loss, lt, li, want_logits) = reference(&m, &w, &text, &image, b);
    assert!(
        (losses.loss - loss).abs() < 1e-5,
        "{} vs {loss}",
        losses.loss
    );
    assert!((losses.text - lt).abs() < 1e-5 && (losses.image - li).abs() < 1e-5);
    for (i, (&a, &e)) in logits.iter().zip(&want_logits).enumerate() {
        assert!(
            (a as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
            "logit {i}: {a} vs {e}"
        );
    }
}

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let m = Transformer::new(tiny()).unwrap();
    let b = 2;
    let mut w = weights(&m, 5);
    let (text, image) = batch(m.dims(), b, 6);
    let mut acts = Activations::new(&m, b);
    let mut grads = vec![0.0f32; m.table().numel()];
    m.forward(&w, &mut acts, &text, &image, Some(1.0)).unwrap();
    m.backward(&w, &mut grads, &mut acts, &text, &image)
        .unwrap();
    let eps = 1e-2f32;
    let mut worst = (0.0f64, String::new());
    for spec in m.table().specs() {
        for i in spec.range() {
            let orig = w[i];
            let mut eval = |v: f32, w: &mut Vec<f32>| {
                w[i] = v;
                m.forward(w, &mut acts, &text, &image, None).unwrap().loss
            };
            let plus = eval(orig + eps, &mut w);
            let minus = eval(orig - eps, &mut w);
            w[i] = orig;
            let num = (plus - minus) / (2.0 * eps as f64);
            let err = (grads[i] as f64 - num).abs();
            assert!(
                err <= 2e-3 + 2e-2 * num.abs(),
                "{}[{}]: backward {} vs finite difference {num}",
                spec.name,
                i - spec.offset,
                grads[i]
            );
            if err > worst.0 {
                worst = (err, spec.name.clone());
            }
        }
    }
    // Every tensor received a gradient (a missing backward term would leave zeros).
    for (spec, g) in m.table().specs().iter().zip(m.table().split(&grads)) {
        assert!(
            g.iter().any(|&x| x != 0.0),
            "{} has an all-zero gradient",
            spec.name
        );
    }
}

#[test]
fn backward_accumulates_and_scales_linearly() {
    let m = Transformer::new(tiny()).unwrap();
    let w = weights(&m, 7);
    let (text, image) = batch(m.dims(), 1, 8);
    let mut acts = Activations::new(&m, 1);
    let mut g1 = vec![0.0f32; m.table().numel()];
    m.forward(&w, &mut acts, &text, &image, Some(1.0)).unwrap();
    m.backward(&w, &mut g1, &mut acts, &text, &image).unwrap();
    let mut g2 = vec![0.0f32; m.table().numel()];
    for _ in 0..2 {
        m.forward(&w, &mut acts, &text, &image, Some(0.5)).unwrap();
        m.backward(&w, &mut g2, &mut acts, &text, &image).unwrap();
    }
    for (a, b) in g1.iter().zip(&g2) {
        assert!((a - b).abs() <= 1e-6 + 1e-5 * a.abs(), "{a} vs {b}");
    }
}

#[test]
fn bad_sizes_and_tokens_are_errors() {
    let mut d = tiny();
    d.d_model = 9;
    assert!(Transformer::new(d).is_err());
    let mut d = tiny();
    d.text_len = 1;
    assert!(Transformer::new(d).is_err());
    let m = Transformer::new(tiny()).unwrap();
    let w = m.init_params(0);
    let mut acts = Activations::new(&m, 1);
    let (mut text, image) = batch(m.dims(), 1, 1);
    text[2] = m.dims().text_rows() as u32;
    let err = m
        .forward(&w, &mut acts, &text, &image, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text token"), "{err}");
}
