//! The scaled backward pass against the plain one, and the case per-resblock scaling exists for.

use super::*;
use crate::model::transformer::{Activations, Transformer, TransformerDims};
use kernels::gradscale::{GradScaler, StepOutcome};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn dims(layers: usize) -> TransformerDims {
    TransformerDims {
        text_len: 4,
        text_vocab: 6,
        grid: 3,
        image_vocab: 5,
        d_model: 8,
        heads: 2,
        layers,
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

/// One forward and backward pass: the loss, the gradient in true units and the flags. With
/// `scales = None` the plain backward pass (no flags).
fn step(
    m: &Transformer,
    w: &[f32],
    data: &(Vec<u32>, Vec<u32>),
    b: usize,
    scales: Option<&[f32]>,
) -> (f64, Vec<f32>, Vec<u32>) {
    let mut acts = Activations::new(m, b);
    let loss = m
        .forward(w, &mut acts, &data.0, &data.1, Some(1.0))
        .unwrap();
    let mut grads = vec![0.0; w.len()];
    let mut flags = vec![0; 2 * m.dims().layers];
    match scales {
        None => m
            .backward(w, &mut grads, &mut acts, &data.0, &data.1)
            .unwrap(),
        Some(scales) => {
            let bs = BlockScales {
                scales,
                flags: &mut flags,
            };
            m.backward_scaled(w, &mut grads, &mut acts, &data.0, &data.1, bs)
                .unwrap();
            unscale_param_grads(&mut grads, &m.resblock_ranges(), scales, &mut flags).unwrap();
        }
    }
    (loss.loss, grads, flags)
}

/// ‖a − b‖ / ‖b‖ over one range.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn resblock_ranges_cover_each_blocks_parameters_in_order() {
    let m = Transformer::new(dims(3)).unwrap();
    let ranges = m.resblock_ranges();
    assert_eq!(ranges.len(), 6);
    let t = m.table();
    for (r, range) in ranges.iter().enumerate() {
        let (l, first, last) = match r % 2 {
            0 => (r / 2, "ln_1.weight", "attn.proj.bias"),
            _ => (r / 2, "ln_2.weight", "mlp.proj.bias"),
        };
        let f = t.find(&format!("blocks.{l}.{first}")).unwrap().range();
        let e = t.find(&format!("blocks.{l}.{last}")).unwrap().range();
        assert_eq!(*range, f.start..e.end, "resblock {r}");
        let inside: usize = t
            .specs()
            .iter()
            .filter(|s| s.range().start >= range.start && s.range().end <= range.end)
            .map(|s| s.numel())
            .sum();
        assert_eq!(inside, range.len(), "resblock {r} is contiguous");
    }
}

/// The worst relative error over the tensors of one range (NaN if any is NaN).
fn worst_err(m: &Transformer, got: &[f32], want: &[f32], range: &Range<usize>) -> f64 {
    m.table()
        .specs()
        .iter()
        .filter(|s| s.range().start >= range.start && s.range().end <= range.end)
        .map(|s| rel_err(&got[s.range()], &want[s.range()]))
        .fold(
            0.0,
            |a: f64, e| if e.is_nan() { f64::NAN } else { a.max(e) },
        )
}

#[test]
fn scaled_backward_in_f32_with_power_of_two_scales_is_the_plain_backward() {
    let d = dims(4);
    let m = Transformer::new(d).unwrap();
    let w = m.init_params(3);
    let data = batch(&d, 2, 4);
    let (_, want, _) = step(&m, &w, &data, 2, None);
    let scales: Vec<f32> = (0..8).map(|i| 2f32.powi(3 * i - 6)).collect();
    let (_, got, flags) = step(&m, &w, &data, 2, Some(&scales));
    assert_eq!(flags, vec![0; 8]);
    // Scaling by a power of two is exact; only the order of two additions into the residual
    // gradient differs from the plain pass.
    let max = want.iter().fold(0.0f32, |a, x| a.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * max, "gradient {i}: {g} vs {w}");
    }
}

#[test]
fn f16_with_a_suitable_scale_tracks_f32_and_an_overflow_flags_only_its_block() {
    let d = dims(4);
    let m32 = Transformer::new(d).unwrap();
    let m16 = Transformer::new(d).unwrap().with_precision(Precision::Fp16);
    let w = m32.init_params(5);
    let data = batch(&d, 2, 6);
    let (l32, g32, _) = step(&m32, &w, &data, 2, None);
    let (l16, g16, flags) = step(&m16, &w, &data, 2, Some(&[1024.0; 8]));
    assert_eq!(flags, vec![0; 8]);
    assert!((l16 - l32).abs() < 1e-2 * l32, "loss {l16} vs {l32}");
    for (r, range) in m32.resblock_ranges().iter().enumerate() {
        let e = worst_err(&m32, &g16, &g32, range);
        assert!(e < 0.05, "resblock {r}: relative error {e}");
    }
    // At a tiny scale f16 loses these gradients (f32 would not): the rounding is real, so the
    // agreement above is the scale's doing.
    let (_, g1, _) = step(&m16, &w, &data, 2, Some(&[2f32.powi(-16); 8]));
    let lost = m32
        .resblock_ranges()
        .into_iter()
        .map(|r| worst_err(&m32, &g1, &g32, &r));
    assert!(lost.fold(0.0, f64::max) > 0.5);
    // A scale that overflows f16 in layer 2's MLP block raises that flag alone (and the step's
    // gradient is not used: the scaler skips it).
    let mut scales = [1024.0f32; 8];
    scales[5] = 2f32.powi(40);
    let (_, _, flags) = step(&m16, &w, &data, 2, Some(&scales));
    assert_eq!(flags, [0, 0, 0, 0, 0, 1, 0, 0]);
}

/// DALL·E's reason for per-resblock scaling: the resblocks' activation gradients span more than
/// f16 can hold. Here layer 0's MLP block has output weights 2¹⁶ times the initial ones and every
/// later resblock 2⁻¹⁶ times: a deep, narrow model whose gradients inside the large block
/// overflow f16 at a scale that leaves those of the small blocks in f16's subnormals or below.
/// Every single scale the paper's rule allows (2⁷ … 2²⁴, one replica) either overflows (the update
/// is skipped) or loses a block's gradients to underflow; one scale per resblock keeps them all,
/// and trains the model as f32 does.
#[test]
fn one_scale_loses_gradients_that_per_resblock_scales_keep() {
    let d = dims(8);
    let m32 = Transformer::new(d).unwrap();
    let m16 = Transformer::new(d).unwrap().with_precision(Precision::Fp16);
    let mut w = m32.init_params(1);
    for l in 0..d.layers {
        for (name, f) in [
            (
                "attn.proj.weight",
                if l == 0 { 1.0 } else { 2f32.powi(-16) },
            ),
            (
                "mlp.proj.weight",
                if l == 0 {
                    2f32.powi(16)
                } else {
                    2f32.powi(-16)
                },
            ),
        ] {
            let range = m32
                .table()
                .find(&format!("blocks.{l}.{name}"))
                .unwrap()
                .range();
            w[range].iter_mut().for_each(|x| *x *= f);
        }
    }
    // The products read the matrices rounded to f16; rounding them here first gives the f32
    // reference the same weights, so that what differs is the activations' precision alone.
    for l in 0..d.layers {
        for name in [
            "attn.qkv.weight",
            "attn.proj.weight",
            "mlp.fc.weight",
            "mlp.proj.weight",
        ] {
            let range = m32
                .table()
                .find(&format!("blocks.{l}.{name}"))
                .unwrap()
                .range();
            Precision::Fp16.round(&mut w[range]);
        }
    }
    let data = batch(&d, 2, 7);
    let (_, g32, _) = step(&m32, &w, &data, 2, None);
    let ranges = m32.resblock_ranges();
    let blocks = ranges.len();

    // One scale for all: for every allowed power of two, a flag or a lost gradient.
    let mut best = vec![7; blocks];
    for k in 7..=24 {
        let (_, g16, flags) = step(&m16, &w, &data, 2, Some(&vec![2f32.powi(k); blocks]));
        let worst = ranges
            .iter()
            .map(|r| worst_err(&m32, &g16, &g32, r))
            .fold(
                0.0,
                |a: f64, e| if e.is_nan() { f64::NAN } else { a.max(e) },
            );
        assert!(
            flags.iter().any(|&f| f != 0) || worst > 0.15,
            "scale 2^{k} keeps every gradient (worst relative error {worst})"
        );
        // Each block's own largest scale without an overflow.
        for (b, &f) in flags.iter().enumerate() {
            if f == 0 && best[b] == k - 1 {
                best[b] = k;
            }
        }
    }

    // One scale per resblock, found as the rule finds it: lower a flagged block's scale until
    // no block overflows (a block's incoming gradient depends on the blocks after it keeping
    // theirs, so this takes a few rounds). Then nothing is lost.
    let mut rounds = 0;
    let g16 = loop {
        let scales: Vec<f32> = best.iter().map(|&k| 2f32.powi(k)).collect();
        let (_, g16, flags) = step(&m16, &w, &data, 2, Some(&scales));
        if flags.iter().all(|&f| f == 0) {
            break g16;
        }
        for (k, &f) in best.iter_mut().zip(&flags) {
            if f != 0 {
                assert!(*k > 7, "no allowed scale keeps a block finite: 2^{best:?}");
                *k -= 1;
            }
        }
        rounds += 1;
        assert!(rounds < 40);
    };
    for (r, range) in ranges.iter().enumerate() {
        let e = worst_err(&m32, &g16, &g32, range);
        assert!(
            e < 0.05,
            "resblock {r} at 2^{}: relative error {e}",
            best[r]
        );
    }

    // Training: SGD on one batch, per-resblock scales under the paper's rule against f32. The
    // weights move, so a block at the edge of overflow starts one power of two lower.
    let replicas = 1;
    let log2_milli: Vec<i32> = best
        .iter()
        .map(|&k| 1000 * if k < 24 { k - 1 } else { k })
        .collect();
    let mut scaler = GradScaler::from_state(replicas, log2_milli, vec![0; blocks]).unwrap();
    let (mut w32, mut w16) = (w.clone(), w.clone());
    let mut losses = Vec::new();
    for t in 0..20 {
        let (l32, g32, _) = step(&m32, &w32, &data, 2, None);
        let scales: Vec<f32> = (0..blocks).map(|i| scaler.scale(i)).collect();
        let (l16, g16, flags) = step(&m16, &w16, &data, 2, Some(&scales));
        assert_eq!(
            scaler.update(&flags).unwrap(),
            StepOutcome::Applied,
            "step {t}"
        );
        assert!(
            (l16 - l32).abs() < 1e-3 * l32,
            "step {t}: loss {l16} vs {l32}"
        );
        for (w, g) in [(&mut w32, &g32), (&mut w16, &g16)] {
            w.iter_mut().zip(g).for_each(|(w, g)| *w -= 0.01 * g);
        }
        losses.push(l32);
    }
    assert!(losses[19] < 0.95 * losses[0], "f32 trains: {losses:?}");

    // The same rule with one scale for every block, from the largest scale it allows: every
    // update overflows and is skipped (a scale comes down by √2 at most once per 125 updates).
    let mut scaler =
        GradScaler::from_state(replicas, vec![24_000; blocks], vec![0; blocks]).unwrap();
    for t in 0..20 {
        let scales: Vec<f32> = (0..blocks).map(|i| scaler.scale(i)).collect();
        let (_, _, flags) = step(&m16, &w, &data, 2, Some(&scales));
        assert_eq!(
            scaler.update(&flags).unwrap(),
            StepOutcome::Skipped,
            "step {t}"
        );
    }
}
