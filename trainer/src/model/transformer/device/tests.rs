//! The device passes against the host model: on `Cpu` (the references behind the op traits), on
//! the emulated GPU (the CUDA sources run on the CPU), and on a real GPU when there is one.

use super::*;
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
    let mut acts = dm.new_acts(dev, b).unwrap();
    let mut losses = Vec::new();
    for (text, image) in batches {
        let scale = 1.0 / batches.len() as f32;
        losses.push(
            dm.forward(dev, &params, &mut acts, text, image, Some(scale))
                .unwrap(),
        );
        dm.backward(dev, &params, &mut grads, &mut acts, text, image)
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
