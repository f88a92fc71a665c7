//! The device passes against the host model: on `Cpu` (the references behind the op traits), on
//! the emulated GPU (the CUDA sources run on the CPU), and on a real GPU when there is one.

use super::*;
use crate::model::mixed::{unscale_param_grads, BlockScales, Precision};
use crate::model::transformer::{Activations, TransformerDims};
use kernels::device::Cpu;
use kernels::gpu::{Emu, Gpu, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Four layers (row, column, row, conv), two heads, a text part and a 3×3 grid.
fn tiny() -> Transformer {
    Transformer::new(TransformerDims {
        text_len: 4,
        text_vocab: 6,
        grid: 3,
        image_vocab: 5,
        d_model: 16,
        heads: 2,
        layers: 4,
        conv_kernel: 3,
    })
    .unwrap()
}

fn batch(m: &Transformer, b: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let d = m.dims();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let text = (0..b * d.text_len)
        .map(|_| rng.random_range(0..d.text_rows() as u32))
        .collect();
    let image = (0..b * d.image_tokens())
        .map(|_| rng.random_range(0..d.image_vocab as u32))
        .collect();
    (text, image)
}

/// The host model's loss and gradient (two micro-batches accumulated, scale 1/2 each).
fn host(
    m: &Transformer,
    w: &[f32],
    batches: &[(Vec<u32>, Vec<u32>)],
    b: usize,
) -> (Vec<Losses>, Vec<f32>) {
    let mut acts = Activations::new(m, b);
    let mut grads = vec![0.0; w.len()];
    let mut losses = Vec::new();
    for (text, image) in batches {
        let scale = 1.0 / batches.len() as f32;
        losses.push(m.forward(w, &mut acts, text, image, Some(scale)).unwrap());
        m.backward(w, &mut grads, &mut acts, text, image).unwrap();
    }
    (losses, grads)
}

fn device<D: TransformerDevice>(
    dev: &D,
    m: &Transformer,
    w: &[f32],
    batches: &[(Vec<u32>, Vec<u32>)],
    b: usize,
) -> (Vec<Losses>, Vec<f32>) {
    let dm = DeviceTransformer::new(m, dev).unwrap();
    let params = DeviceTensors::upload(dev, m.table(), w).unwrap();
    let mut grads = DeviceTensors::zeros(dev, m.table()).unwrap();
    let mut acts = dm.new_acts::<f32>(dev, b).unwrap();
    let half = HalfWeights::none();
    let mut losses = Vec::new();
    for (text, image) in batches {
        let scale = 1.0 / batches.len() as f32;
        losses.push(
            dm.forward(dev, &params, &half, &mut acts, text, image, Some(scale))
                .unwrap(),
        );
        dm.backward(
            dev, &params, &half, &mut grads, &mut acts, text, image, None,
        )
        .unwrap();
    }
    (losses, grads.download(dev, m.table()).unwrap())
}

/// Losses within 1e-5 relative; every gradient within 1e-4 of the largest gradient of its
/// tensor plus 1e-3 relative (f32 sums in another order: the GPU's reductions are blocked).
fn assert_agree(
    what: &str,
    m: &Transformer,
    got: &(Vec<Losses>, Vec<f32>),
    want: &(Vec<Losses>, Vec<f32>),
) {
    for (g, w) in got.0.iter().zip(&want.0) {
        for (x, y) in [(g.loss, w.loss), (g.text, w.text), (g.image, w.image)] {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: loss {x} vs {y}");
        }
    }
    let mut nonzero = 0;
    for spec in m.table().specs() {
        let (g, w) = (&got.1[spec.range()], &want.1[spec.range()]);
        let scale = w.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        for (i, (x, y)) in g.iter().zip(w).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale + 1e-3 * y.abs(),
                "{what}: {}[{i}] = {x}, host {y}",
                spec.name
            );
        }
        nonzero += usize::from(scale > 0.0);
    }
    assert_eq!(
        nonzero,
        m.table().len(),
        "{what}: every tensor has a gradient"
    );
}

#[test]
fn device_passes_match_the_host_model_on_the_cpu_and_the_emulated_gpu() {
    let m = tiny();
    let w = m.init_params(11);
    let b = 2;
    let batches = [batch(&m, b, 1), batch(&m, b, 2)];
    let want = host(&m, &w, &batches, b);
    assert_agree("cpu", &m, &device(&Cpu, &m, &w, &batches, b), &want);
    for s in Schedule::ALL {
        let dev = Gpu(Emu::new(s));
        assert_agree(&dev.name(), &m, &device(&dev, &m, &w, &batches, b), &want);
    }
    match kernels::gpu::cuda_for_tests() {
        Some(dev) => assert_agree(&dev.name(), &m, &device(dev, &m, &w, &batches, b), &want),
        None => eprintln!("skipped on CUDA: no GPU here (the CPU and the emulator ran)"),
    }
}

/// The host's fp16 reference (`with_precision(Fp16)`, `backward_scaled`, then the unscaling):
/// the losses, the gradient in true units and the resblock flags.
fn host_fp16(
    m: &Transformer,
    w: &[f32],
    batches: &[(Vec<u32>, Vec<u32>)],
    b: usize,
    scales: &[f32],
) -> (Vec<Losses>, Vec<f32>, Vec<u32>) {
    let mut acts = Activations::new(m, b);
    let mut grads = vec![0.0; w.len()];
    let mut flags = vec![0; scales.len()];
    let mut losses = Vec::new();
    for (text, image) in batches {
        let scale = 1.0 / batches.len() as f32;
        losses.push(m.forward(w, &mut acts, text, image, Some(scale)).unwrap());
        let bs = BlockScales {
            scales,
            flags: &mut flags,
        };
        m.backward_scaled(w, &mut grads, &mut acts, text, image, bs)
            .unwrap();
    }
    unscale_param_grads(&mut grads, &m.resblock_ranges(), scales, &mut flags).unwrap();
    (losses, grads, flags)
}

/// The same on a device: f16 activations, the f16 copies of the matrices, the scales' kernels.
fn device_fp16<D: TransformerDevice>(
    dev: &D,
    m: &Transformer,
    w: &[f32],
    batches: &[(Vec<u32>, Vec<u32>)],
    b: usize,
    scales: &[f32],
) -> (Vec<Losses>, Vec<f32>, Vec<u32>) {
    let dm = DeviceTransformer::new(m, dev).unwrap();
    let params = DeviceTensors::upload(dev, m.table(), w).unwrap();
    let half = HalfWeights::of(dev, m, &params).unwrap();
    let mut grads = DeviceTensors::zeros(dev, m.table()).unwrap();
    let mut acts = dm.new_acts::<f16>(dev, b).unwrap();
    let mut flags = dev.zeros::<u32>(scales.len()).unwrap();
    let mut spare = dm.unscale_scratch(dev).unwrap();
    let mut losses = Vec::new();
    for (text, image) in batches {
        let scale = 1.0 / batches.len() as f32;
        losses.push(
            dm.forward(dev, &params, &half, &mut acts, text, image, Some(scale))
                .unwrap(),
        );
        let sc = DeviceScales {
            scales,
            flags: &mut flags,
        };
        dm.backward(
            dev,
            &params,
            &half,
            &mut grads,
            &mut acts,
            text,
            image,
            Some(sc),
        )
        .unwrap();
    }
    let sc = DeviceScales {
        scales,
        flags: &mut flags,
    };
    dm.unscale_param_grads(dev, &mut grads, &mut spare, sc)
        .unwrap();
    (
        losses,
        grads.download(dev, m.table()).unwrap(),
        dev.download(&flags).unwrap(),
    )
}

/// fp16 against the host's fp16 reference. Both round the same values to f16 at the same
/// points, but the f32 values before each rounding come from sums in another order (blocked
/// products, the attention kernels' tiles), and a difference of one f32 ulp can move a value
/// across an f16 rounding boundary: that element then differs by one f16 step (2⁻¹¹ relative,
/// 4.9e-4), and the difference travels on through the later layers. Losses: within 1e-5
/// relative, a mean over every position where such flips average out (measured on the emulator:
/// 5.0e-7; fp16 against fp32 differs by ~1e-4, so a device path that did not round fails here).
/// Gradients: within 5e-3 of the largest gradient of the tensor plus 1e-2 relative, ten f16
/// steps of the largest value (measured: 5.8e-4 on the emulator, one step; 1e-7 on `Cpu`, whose
/// products are the host's). The flags agree exactly.
fn assert_agree_fp16(
    what: &str,
    m: &Transformer,
    got: &(Vec<Losses>, Vec<f32>, Vec<u32>),
    want: &(Vec<Losses>, Vec<f32>, Vec<u32>),
) {
    let mut worst_loss = 0.0f64;
    for (g, w) in got.0.iter().zip(&want.0) {
        for (x, y) in [(g.loss, w.loss), (g.text, w.text), (g.image, w.image)] {
            worst_loss = worst_loss.max((x - y).abs() / y.abs());
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: loss {x} vs {y}");
        }
    }
    assert_eq!(got.2, want.2, "{what}: resblock flags");
    let mut worst_grad = 0.0f32;
    let mut nonzero = 0;
    for spec in m.table().specs() {
        let (g, w) = (&got.1[spec.range()], &want.1[spec.range()]);
        let scale = w.iter().fold(0.0f32, |a, x| a.max(x.abs()));
        for (i, (x, y)) in g.iter().zip(w).enumerate() {
            if scale > 0.0 {
                worst_grad = worst_grad.max((x - y).abs() / scale);
            }
            assert!(
                (x - y).abs() <= 5e-3 * scale + 1e-2 * y.abs(),
                "{what}: {}[{i}] = {x}, host {y}",
                spec.name
            );
        }
        nonzero += usize::from(scale > 0.0);
    }
    eprintln!(
        "{what}: worst loss difference {worst_loss:.2e} relative, worst gradient {worst_grad:.2e} \
         of its tensor's largest"
    );
    assert_eq!(
        nonzero,
        m.table().len(),
        "{what}: every tensor has a gradient"
    );
}

/// A different scale per resblock, none a power of two (the divisions round), as the rule
/// M·2^(e/1000) makes them.
fn fp16_scales(m: &Transformer) -> Vec<f32> {
    (0..2 * m.dims().layers)
        .map(|i| 2f32.powf((11_000 + 700 * i) as f32 / 1000.0))
        .collect()
}

#[test]
fn fp16_device_passes_match_the_host_fp16_reference() {
    let m = tiny().with_precision(Precision::Fp16);
    let w = m.init_params(11);
    let b = 2;
    let batches = [batch(&m, b, 1), batch(&m, b, 2)];
    let scales = fp16_scales(&m);
    let want = host_fp16(&m, &w, &batches, b, &scales);
    assert!(want.2.iter().all(|&f| f == 0), "no flag at these scales");
    // The fp16 reference is not the fp32 model: a device path that ignored the precision
    // would fail below.
    let f32_grads = host(&tiny(), &w, &batches, b).1;
    assert_ne!(f32_grads, want.1, "fp16 rounds something");
    let got = device_fp16(&Cpu, &m, &w, &batches, b, &scales);
    assert_agree_fp16("cpu", &m, &got, &want);
    for s in Schedule::ALL {
        let dev = Gpu(Emu::new(s));
        let got = device_fp16(&dev, &m, &w, &batches, b, &scales);
        assert_agree_fp16(&dev.name(), &m, &got, &want);
    }
    match kernels::gpu::cuda_for_tests() {
        Some(dev) => {
            let got = device_fp16(dev, &m, &w, &batches, b, &scales);
            assert_agree_fp16(&dev.name(), &m, &got, &want)
        }
        None => eprintln!("skipped on CUDA: no GPU here (the CPU and the emulator ran)"),
    }
}

/// A scale that overflows f16 in one resblock: the host and the device zero the same values and
/// raise the same flags (that block's, and no other).
#[test]
fn fp16_overflow_raises_the_same_flags_as_the_host() {
    let m = tiny().with_precision(Precision::Fp16);
    let w = m.init_params(5);
    let b = 2;
    let batches = [batch(&m, b, 3)];
    let mut scales = fp16_scales(&m);
    let blown = GradScaler::mlp(2);
    scales[blown] = 1e12;
    let want = host_fp16(&m, &w, &batches, b, &scales);
    let mut expected = vec![0; scales.len()];
    expected[blown] = 1;
    assert_eq!(
        want.2, expected,
        "the host flags the overflowing block only"
    );
    for dev in [
        Gpu(Emu::new(Schedule::Forward)),
        Gpu(Emu::new(Schedule::Reverse)),
    ] {
        let got = device_fp16(&dev, &m, &w, &batches, b, &scales);
        assert_eq!(got.2, want.2, "{}: flags", dev.name());
    }
    let got = device_fp16(&Cpu, &m, &w, &batches, b, &scales);
    assert_eq!(got.2, want.2, "cpu: flags");
}
