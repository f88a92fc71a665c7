//! CLIP's tests: finite-difference checks of the new ops (the activations, the patch embedding,
//! L2 normalisation, end-token pooling, causal text attention, the InfoNCE loss) and of the whole
//! model's backward pass, and the pooling and masking rules.

use super::ops::{end_positions, normalize_rows, normalize_rows_backward, patches, Activation};
use super::*;
use kernels::linear::linear_forward;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A tiny model with every kind of tensor: two layers per tower, quick_gelu text, erf-GELU vision.
pub(super) fn tiny_dims() -> ClipDims {
    ClipDims {
        text_config: TextConfig {
            vocab_size: 20,
            hidden_size: 8,
            intermediate_size: 16,
            num_attention_heads: 2,
            num_hidden_layers: 2,
            max_position_embeddings: 7,
            eos_token_id: 19,
            hidden_act: Activation::QuickGelu,
        },
        vision_config: VisionConfig {
            hidden_size: 12,
            intermediate_size: 20,
            num_attention_heads: 3,
            num_hidden_layers: 2,
            image_size: 8,
            patch_size: 4,
            num_channels: 3,
            hidden_act: Activation::Gelu,
        },
        projection_dim: 6,
    }
}

/// Weights with non-trivial layer norms and larger matrices than the init's, so that every
/// gradient is well above round-off.
fn weights(model: &Clip, seed: u64) -> Vec<f32> {
    let mut w = model.init_params(seed, 1.5);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for spec in model.table().specs() {
        for x in &mut w[spec.range()] {
            let n: f32 = rng.random_range(-1.0..1.0);
            *x = match spec.kind {
                ParamKind::Gain => 1.0 + 0.3 * n,
                ParamKind::Bias if spec.name != "logit_scale" => 0.1 * n,
                ParamKind::Bias => *x,
                _ => 0.3 * n,
            };
        }
    }
    w
}

/// Three rows of ids with the end token (19) at different places and padding (0) after it.
fn batch(d: &ClipDims, b: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
    let s = 6;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = vec![0u32; b * s];
    for (row, r) in ids.chunks_exact_mut(s).enumerate() {
        let end = 2 + row % (s - 2);
        r[0] = 18;
        for x in &mut r[1..end] {
            *x = rng.random_range(1..18);
        }
        r[end] = d.text_config.eos_token_id;
    }
    let px = (0..b
        * d.vision_config.num_channels
        * d.vision_config.image_size
        * d.vision_config.image_size)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    (ids, px)
}

fn loss(model: &Clip, w: &[f32], ids: &[u32], px: &[f32], b: usize) -> f64 {
    let mut acts = Activations::new(model, b, ids.len() / b).unwrap();
    model.forward(w, &mut acts, ids, px).unwrap() as f64
}

#[test]
fn activations_match_finite_differences() {
    let xs: Vec<f32> = (0..41).map(|i| -4.0 + 0.2 * i as f32).collect();
    for act in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        let mut y = vec![0.0; xs.len()];
        act.forward(&mut y, &xs).unwrap();
        let mut dx = vec![0.0; xs.len()];
        act.backward(&mut dx, &vec![1.0; xs.len()], &xs).unwrap();
        for (i, &x) in xs.iter().enumerate() {
            let h = 1e-3f32;
            let (mut p, mut m) = ([0.0f32], [0.0f32]);
            act.forward(&mut p, &[x + h]).unwrap();
            act.forward(&mut m, &[x - h]).unwrap();
            let fd = (p[0] as f64 - m[0] as f64) / (2.0 * h as f64);
            assert!(
                (fd - dx[i] as f64).abs() < 2e-3,
                "{act:?} at {x}: fd {fd}, analytic {}",
                dx[i]
            );
        }
    }
    // The values themselves: quick_gelu(1) = σ(1.702), gelu(1) = Φ(1).
    let mut y = [0.0f32];
    Activation::QuickGelu.forward(&mut y, &[1.0]).unwrap();
    assert!((y[0] - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-6);
    Activation::Gelu.forward(&mut y, &[1.0]).unwrap();
    assert!((y[0] - 0.841_344_7).abs() < 1e-6, "{}", y[0]);
}

#[test]
fn hugging_face_activation_names() {
    assert_eq!(
        Activation::from_hf("quick_gelu"),
        Some(Activation::QuickGelu)
    );
    assert_eq!(Activation::from_hf("gelu"), Some(Activation::Gelu));
    assert_eq!(
        Activation::from_hf("gelu_pytorch_tanh"),
        Some(Activation::GeluTanh)
    );
    assert_eq!(Activation::from_hf("relu"), None);
    for a in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        assert_eq!(Activation::from_hf(a.hf_name()), Some(a));
    }
}

#[test]
fn patches_times_the_weight_is_the_strided_convolution() {
    let (b, ch, s, p, co) = (2, 3, 8, 4, 5);
    let g = s / p;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let px: Vec<f32> = (0..b * ch * s * s)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let w: Vec<f32> = (0..co * ch * p * p)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut rows = vec![0.0; b * g * g * ch * p * p];
    patches(&mut rows, &px, b, ch, s, p);
    let mut out = vec![0.0; b * g * g * co];
    linear_forward(&mut out, &rows, &w, None, b * g * g, ch * p * p, co).unwrap();
    for bi in 0..b {
        for o in 0..co {
            for gy in 0..g {
                for gx in 0..g {
                    let mut acc = 0.0f64;
                    for c in 0..ch {
                        for ky in 0..p {
                            for kx in 0..p {
                                let x = px[((bi * ch + c) * s + gy * p + ky) * s + gx * p + kx];
                                acc += x as f64 * w[((o * ch + c) * p + ky) * p + kx] as f64;
                            }
                        }
                    }
                    let got = out[(bi * g * g + gy * g + gx) * co + o] as f64;
                    assert!((got - acc).abs() < 1e-5, "b {bi} o {o} ({gy}, {gx})");
                }
            }
        }
    }
}

#[test]
fn normalisation_matches_finite_differences() {
    let d = 5;
    let x = [0.3f32, -1.2, 0.7, 2.0, -0.1, 1.0, 1.0, -1.0, 0.5, 0.25];
    let dy = [0.2f32, -0.4, 1.1, 0.3, -0.7, 0.9, -0.2, 0.6, 0.1, -1.3];
    let (mut y, mut n) = (vec![0.0; 10], vec![0.0; 2]);
    normalize_rows(&mut y, &mut n, &x, d);
    for r in y.chunks(d) {
        let norm: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
    }
    let mut dx = vec![0.0; 10];
    normalize_rows_backward(&mut dx, &dy, &y, &n, d);
    let f = |x: &[f32]| {
        let (mut y, mut n) = (vec![0.0; 10], vec![0.0; 2]);
        normalize_rows(&mut y, &mut n, x, d);
        y.iter()
            .zip(&dy)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum::<f64>()
    };
    for i in 0..10 {
        let (mut p, mut m) = (x, x);
        p[i] += 1e-3;
        m[i] -= 1e-3;
        let fd = (f(&p) - f(&m)) / 2e-3;
        assert!(
            (fd - dx[i] as f64).abs() < 1e-3,
            "x[{i}]: fd {fd}, analytic {}",
            dx[i]
        );
    }
}

#[test]
fn end_token_pooling_follows_hugging_face() {
    // Current configs: the first position holding eos_token_id.
    let ids = [5, 7, 9, 9, 0, 9, 1, 2];
    assert_eq!(end_positions(&ids, 4, 9).unwrap(), vec![2, 1]);
    // Legacy configs (eos_token_id 2): the first position of the row's largest id.
    assert_eq!(end_positions(&[0, 49407, 3, 49407], 4, 2).unwrap(), vec![1]);
    // No end token: refused, naming the row.
    let err = end_positions(&[5, 7, 9, 9, 1, 1, 1, 1], 4, 9).unwrap_err();
    assert!(
        err.contains("row 1") && err.contains("eos_token_id 9"),
        "{err}"
    );
}

#[test]
fn text_attention_is_causal_and_pooling_reads_the_end_token() {
    let d = tiny_dims();
    let model = Clip::new(d).unwrap();
    let w = weights(&model, 5);
    let (ids, _) = batch(&d, 3, 6);
    let embeds = |ids: &[u32]| {
        let mut acts = Activations::new(&model, 3, 6).unwrap();
        model.text_forward(&w, &mut acts, ids).unwrap();
        acts.text_embeds
    };
    let base = embeds(&ids);
    // Row 0 ends at position 2: what follows cannot change its embedding (causal mask, pooled
    // at the end token) …
    let mut after = ids.clone();
    after[4] = 7;
    assert_eq!(embeds(&after)[..6], base[..6]);
    // … while a token before the end does.
    let mut before = ids.clone();
    before[1] = if ids[1] == 3 { 4 } else { 3 };
    assert_ne!(embeds(&before)[..6], base[..6]);
}

/// The whole backward pass against central differences of the loss: for every tensor, its
/// largest-gradient entry and two random ones. Covers the patch embedding (and class token),
/// both towers' attention (causal in text), the activations, end-token pooling, the
/// projections, normalisation and InfoNCE with its learnable temperature.
#[test]
fn gradients_match_finite_differences() {
    let d = tiny_dims();
    let model = Clip::new(d).unwrap();
    let b = 3;
    let w = weights(&model, 11);
    let (ids, px) = batch(&d, b, 12);
    let mut acts = Activations::new(&model, b, 6).unwrap();
    model.forward(&w, &mut acts, &ids, &px).unwrap();
    let mut grads = vec![0.0f32; w.len()];
    model.backward(&w, &mut grads, &mut acts).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let h = 1e-2f32;
    let mut checked = 0;
    for spec in model.table().specs() {
        let r = spec.range();
        let top = r
            .clone()
            .max_by(|&a, &b| grads[a].abs().total_cmp(&grads[b].abs()))
            .unwrap();
        let mut picks = vec![top];
        for _ in 0..2 {
            picks.push(rng.random_range(r.clone()));
        }
        for i in picks {
            let mut p = w.clone();
            p[i] += h;
            let mut m = w.clone();
            m[i] -= h;
            let fd = (loss(&model, &p, &ids, &px, b) - loss(&model, &m, &ids, &px, b))
                / (2.0 * h as f64);
            let an = grads[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-4 + 2e-2 * an.abs(),
                "{} [{}]: finite difference {fd}, backward {an}",
                spec.name,
                i - r.start
            );
            checked += 1;
        }
    }
    assert!(checked > 3 * 40, "{checked} entries checked");
    // The largest gradients are not vanishingly small: the check above means something.
    for name in [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.embeddings.token_embedding.weight",
        "logit_scale",
    ] {
        let spec = model.table().find(name).unwrap();
        let max = grads[spec.range()]
            .iter()
            .fold(0.0f32, |a, &g| a.max(g.abs()));
        assert!(max > 1e-3, "{name}: largest gradient {max}");
    }
    // The end token's row gets a gradient; an id that no row holds gets none.
    let tok = model
        .table()
        .find("text_model.embeddings.token_embedding.weight")
        .unwrap();
    let row = |id: usize| &grads[tok.offset + id * 8..tok.offset + (id + 1) * 8];
    assert!(row(19).iter().any(|&g| g != 0.0));
    let unused = (0..20u32).find(|id| !ids.contains(id)).unwrap() as usize;
    assert!(row(unused).iter().all(|&g| g == 0.0));
}

#[test]
fn bf16_products_stay_within_their_rounding_of_the_fp32_embeddings() {
    let d = tiny_dims();
    let mut model = Clip::new(d).unwrap();
    let b = 3;
    let w = weights(&model, 31);
    let (ids, px) = batch(&d, b, 32);
    let mut run = |products| {
        model.set_products(products);
        let mut acts = Activations::new(&model, b, 6).unwrap();
        model.forward(&w, &mut acts, &ids, &px).unwrap();
        [acts.text_embeds, acts.image_embeds]
    };
    let (fp32, bf16) = (run(Products::Fp32), run(Products::Bf16));
    let dp = d.projection_dim;
    for (tower, (x, y)) in ["text", "image"].iter().zip(fp32.iter().zip(&bf16)) {
        assert_ne!(x, y, "{tower}: bf16 products must round the operands");
        for (i, (x, y)) in x.chunks(dp).zip(y.chunks(dp)).enumerate() {
            let cos: f32 = x.iter().zip(y).map(|(a, b)| a * b).sum();
            // Unit vectors; bf16 keeps 8 bits, and the errors of 3 products a layer add up.
            assert!(
                cos > 0.999,
                "{tower} row {i}: cosine {cos} between bf16 and fp32"
            );
        }
    }
}

#[test]
fn infonce_is_the_mean_of_both_cross_entropies() {
    let d = tiny_dims();
    let model = Clip::new(d).unwrap();
    let b = 3;
    let w = weights(&model, 21);
    let (ids, px) = batch(&d, b, 22);
    let mut acts = Activations::new(&model, b, 6).unwrap();
    let l = model.forward(&w, &mut acts, &ids, &px).unwrap() as f64;
    let scale = (model.logit_scale(&w) as f64).exp();
    let dp = d.projection_dim;
    let cos = |i: usize, j: usize| -> f64 {
        (0..dp)
            .map(|k| acts.text_embeds[i * dp + k] as f64 * acts.image_embeds[j * dp + k] as f64)
            .sum()
    };
    let ce = |row: &dyn Fn(usize) -> f64, target: usize| {
        let lse = (0..b).map(|j| row(j).exp()).sum::<f64>().ln();
        lse - row(target)
    };
    let mut want = 0.0;
    for i in 0..b {
        want += ce(&|j| scale * cos(i, j), i) / (2 * b) as f64;
        want += ce(&|j| scale * cos(j, i), i) / (2 * b) as f64;
        for j in 0..b {
            let lpi = acts.logits_per_image[i * b + j] as f64;
            assert!((lpi - scale * cos(j, i)).abs() < 1e-5);
        }
    }
    assert!((l - want).abs() < 1e-5, "loss {l}, by hand {want}");
}

#[test]
fn logit_scale_is_clamped_at_ln_100() {
    let model = Clip::new(tiny_dims()).unwrap();
    let mut w = model.init_params(1, 2.659_26);
    assert_eq!(model.logit_scale(&w), 2.659_26);
    model.clamp_logit_scale(&mut w);
    assert_eq!(model.logit_scale(&w), 2.659_26);
    let i = model.table().find("logit_scale").unwrap().offset;
    w[i] = 7.0;
    model.clamp_logit_scale(&mut w);
    assert!((model.logit_scale(&w).exp() - 100.0).abs() < 1e-4);
    w[i] = -1.0;
    model.clamp_logit_scale(&mut w);
    assert_eq!(model.logit_scale(&w), 0.0);
}

#[test]
fn bad_sizes_and_inputs_are_refused_by_name() {
    let mut d = tiny_dims();
    d.vision_config.num_attention_heads = 5;
    let (field, msg) = d.check("").unwrap_err();
    assert_eq!(field, "vision_config.hidden_size");
    assert!(msg.contains("num_attention_heads = 5"), "{msg}");
    let mut d = tiny_dims();
    d.vision_config.image_size = 10;
    assert_eq!(d.check("").unwrap_err().0, "vision_config.image_size");
    let model = Clip::new(tiny_dims()).unwrap();
    let w = model.init_params(1, 1.0);
    let (mut ids, px) = batch(model.dims(), 3, 1);
    let mut acts = Activations::new(&model, 3, 6).unwrap();
    ids[7] = 20;
    let err = model
        .forward(&w, &mut acts, &ids, &px)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input_ids[1, 1] = 20") && err.contains("vocab_size = 20"),
        "{err}"
    );
    assert!(Activations::new(&model, 3, 8).is_err());
    let err = model
        .forward(&w, &mut acts, &ids[..6], &px)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_ids has 6 ids"), "{err}");
}

/// The vision tower on a device (`DeviceImageTower`) against `Clip::image_forward`, on the CPU
/// device and on the emulated GPU under every schedule, for each activation.
#[test]
fn the_image_tower_on_a_device_matches_the_host_forward() {
    use super::device::{ClipDevice, DeviceImageTower};
    use kernels::gpu::{Emu, Gpu, Schedule};
    fn run<D: ClipDevice>(dev: &D, model: &Clip, w: &[f32], px: &[f32], b: usize) -> Vec<f32> {
        let mut tower = DeviceImageTower::new(dev, model, w, b).unwrap();
        let mut out = vec![f32::NAN; b * model.dims().projection_dim];
        tower.forward(dev, model, w, px, &mut out).unwrap();
        // A second batch through the same buffers gives the same vectors.
        let mut again = vec![f32::NAN; out.len()];
        tower.forward(dev, model, w, px, &mut again).unwrap();
        assert_eq!(out, again);
        out
    }
    for act in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        let mut d = tiny_dims();
        d.vision_config.hidden_act = act;
        d.vision_config.num_hidden_layers = 3;
        let model = Clip::new(d).unwrap();
        let b = 3;
        let w = weights(&model, 41);
        let (_, px) = batch(&d, b, 42);
        let mut acts = Activations::new(&model, b, 6).unwrap();
        model.image_forward(&w, &mut acts, &px).unwrap();
        let want = acts.image_embeds.clone();
        let mut devices: Vec<(String, Vec<f32>)> =
            vec![("cpu".into(), run(&kernels::device::Cpu, &model, &w, &px, b))];
        for s in Schedule::ALL {
            let dev = Gpu(Emu::new(s));
            devices.push((format!("{s:?}"), run(&dev, &model, &w, &px, b)));
        }
        match kernels::gpu::cuda_for_tests() {
            Some(dev) => devices.push((
                kernels::device::Device::name(dev),
                run(dev, &model, &w, &px, b),
            )),
            None => eprintln!("skipped on CUDA: no GPU here (the CPU and the emulator ran)"),
        }
        for (name, got) in devices {
            // cuBLAS sums in other orders than the emulator's products: 1e-5 holds there too
            // for these sizes (the transformer's device test's bound).
            for (k, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() < 1e-5,
                    "{act:?} on {name}: embedding element {k} {g} vs host {e}"
                );
            }
        }
    }
    // A batch of another size is refused, naming both.
    let d = tiny_dims();
    let model = Clip::new(d).unwrap();
    let w = weights(&model, 1);
    let mut tower = DeviceImageTower::new(&kernels::device::Cpu, &model, &w, 2).unwrap();
    let (_, px) = batch(&d, 3, 2);
    let mut out = vec![0.0; 3 * d.projection_dim];
    let e = tower
        .forward(&kernels::device::Cpu, &model, &w, &px, &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch 2"), "{e}");
}
