//! Weights found, sized and checked; `encode` and `decode_codes` against the training forward
//! pass.

use super::*;
use crate::checkpoint::{entries, write_tensors, TensorFile};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};

fn dims(resolution: usize, n_hid: usize, n_blk: usize, k: usize, n_init: usize) -> DvaeDims {
    DvaeDims {
        resolution,
        n_hid,
        n_blk_per_group: n_blk,
        vocab_size: k,
        n_init,
    }
}

fn small() -> DvaeDims {
    dims(32, 8, 1, 16, 12)
}

fn images(n: usize, resolution: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * 3 * resolution * resolution)
        .map(|_| rng.random_range(0.0..=1.0))
        .collect()
}

/// Writes fresh weights of `d` to `path`; returns the model and its parameters.
/// `w` with the encoder's output bias zeroed: at initialisation that bias, not the image,
/// decides the argmax, and every position gets the same code.
fn varied_codes(m: &Dvae, mut w: Vec<f32>) -> Vec<f32> {
    let b = m.table().find("encoder.blocks.output.conv.b").unwrap();
    w[b.range()].fill(0.0);
    w
}

fn write_fresh(path: &Path, d: DvaeDims, seed: u64) -> (Dvae, Vec<f32>) {
    let m = Dvae::new(d).unwrap();
    let w = m.init_params(seed);
    write_tensors(path, &entries(m.table(), "", &w)).unwrap();
    (m, w)
}

/// A tensor to write by hand: name, shape, dtype, little-endian bytes.
type Raw = (String, Vec<usize>, Dtype, Vec<u8>);

/// The tensors of fresh weights of `d`, as raw entries that a test can edit.
fn raw_tensors(d: DvaeDims) -> Vec<Raw> {
    let m = Dvae::new(d).unwrap();
    let w = m.init_params(1);
    m.table()
        .specs()
        .iter()
        .map(|s| {
            let bytes = w[s.range()].iter().flat_map(|x| x.to_le_bytes()).collect();
            (s.name.clone(), s.shape.clone(), Dtype::F32, bytes)
        })
        .collect()
}

fn write_raw(path: &Path, tensors: &[Raw]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
        .collect()
}

#[test]
fn dims_are_inferred_from_the_tensors_and_weights_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, d) in [
        dims(16, 4, 1, 2, 1),
        dims(32, 8, 2, 16, 12),
        dims(64, 12, 3, 40, 20),
    ]
    .into_iter()
    .enumerate()
    {
        let path = tmp.path().join(format!("w{i}.safetensors"));
        let (_, w) = write_fresh(&path, d, i as u64);
        let found = DvaeWeights::locate(&path, false, d.resolution).unwrap();
        assert_eq!(found.dims, d);
        assert_eq!(found.path, path);
        let (m, loaded) = found.load().unwrap();
        assert_eq!(*m.dims(), d);
        assert_eq!(
            loaded.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    // The resolution is the caller's: a bad one is refused, naming the file.
    let path = tmp.path().join("w1.safetensors");
    let e = DvaeDims::infer(&path, 36).unwrap_err().to_string();
    assert!(
        e.contains("w1.safetensors") && e.contains("resolution = 36"),
        "{e}"
    );
}

#[test]
fn checkpoint_and_run_directories_resolve_to_their_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let m = Dvae::new(small()).unwrap();
    let (w5, e5, w9) = (m.init_params(5), m.init_params(6), m.init_params(9));
    let save = |step, w: &[f32], ema: &[f32]| {
        let files = [
            TensorFile {
                file_name: MODEL_FILE,
                tensors: entries(m.table(), "", w),
            },
            TensorFile {
                file_name: EMA_FILE,
                tensors: entries(m.table(), "", ema),
            },
        ];
        checkpoint::save(&run, step, &files, &serde_json::json!({}), "", 5).unwrap()
    };
    let step5 = save(5, &w5, &e5);
    let step9 = save(9, &w9, &w9);
    let load = |src: &Path, ema| {
        DvaeWeights::locate(src, ema, 32).and_then(|w| w.load().map(|(_, p)| (w.path, p)))
    };
    // A run directory: the newest complete checkpoint.
    let (path, p) = load(&run, false).unwrap();
    assert_eq!((path, p), (step9.join(MODEL_FILE), w9.clone()));
    // A checkpoint directory: its model, or with --ema its EMA.
    assert_eq!(load(&step5, false).unwrap().1, w5);
    assert_eq!(load(&step5, true).unwrap().1, e5);
    // A newer directory without DONE is never chosen, and is refused by name.
    let partial = checkpoint::step_dir(&run, 12);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(step9.join(MODEL_FILE), partial.join(MODEL_FILE)).unwrap();
    assert_eq!(load(&run, false).unwrap().0, step9.join(MODEL_FILE));
    let e = load(&partial, false).unwrap_err().to_string();
    assert!(e.contains("step_00000012") && e.contains("DONE"), "{e}");
    // --ema of a plain file, a missing path, a directory that is no run, a run with no checkpoint.
    let e = load(&step5.join(MODEL_FILE), true).unwrap_err().to_string();
    assert!(e.contains("--ema") && e.contains(MODEL_FILE), "{e}");
    let e = load(&tmp.path().join("nope"), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let e = load(tmp.path(), false).unwrap_err().to_string();
    assert!(e.contains("is not dVAE weights"), "{e}");
    let empty = tmp.path().join("empty_run");
    std::fs::create_dir_all(checkpoint::checkpoints_dir(&empty)).unwrap();
    let e = load(&empty, false).unwrap_err().to_string();
    assert!(
        e.contains("empty_run") && e.contains("no complete checkpoint"),
        "{e}"
    );
    // A checkpoint whose weights changed after the save: refused, by its manifest's checksum.
    let model = step9.join(MODEL_FILE);
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, &bytes).unwrap();
    for src in [&run, &step9] {
        let e = load(src, false).unwrap_err().to_string();
        assert!(
            e.contains("step_00000009") && e.contains(MODEL_FILE) && e.contains("checksum"),
            "{e}"
        );
    }
}

#[test]
fn every_bad_weights_file_is_an_error_naming_the_file_and_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = dims(32, 8, 2, 16, 12);
    let good = raw_tensors(d);
    let case = |name: &str, edit: &dyn Fn(&mut Vec<Raw>)| -> String {
        let mut t = good.clone();
        edit(&mut t);
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_raw(&path, &t);
        let e = DvaeWeights::locate(&path, false, 32)
            .and_then(|w| w.load())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{name}.safetensors")), "{name}: {e}");
        e
    };
    let set_shape = |t: &mut Vec<Raw>, name: &str, shape: Vec<usize>| {
        let r = t.iter_mut().find(|r| r.0 == name).unwrap();
        r.3 = f32_bytes(shape.iter().product());
        r.1 = shape;
    };

    let gone = "decoder.blocks.group_2.block_1.res_path.conv_3.b";
    let e = case("missing", &|t| t.retain(|r| r.0 != gone));
    assert!(e.contains("missing tensor") && e.contains(gone), "{e}");

    let extra = "encoder.blocks.group_1.block_1.res_path.conv_5.w";
    let e = case("unexpected", &|t| {
        t.push((extra.into(), vec![2], Dtype::F32, f32_bytes(2)))
    });
    assert!(e.contains("unexpected tensor") && e.contains(extra), "{e}");

    let name = "encoder.blocks.group_3.block_2.res_path.conv_2.w";
    let e = case("shape", &|t| set_shape(t, name, vec![8, 8, 3, 1]));
    assert!(
        e.contains(name) && e.contains("[8, 8, 3, 1]") && e.contains("[8, 8, 3, 3]"),
        "{e}"
    );

    let name = "decoder.blocks.output.conv.b";
    let e = case("dtype", &|t| {
        let r = t.iter_mut().find(|r| r.0 == name).unwrap();
        r.2 = Dtype::F16;
        r.3.truncate(r.3.len() / 2);
    });
    assert!(e.contains(name) && e.contains("F16"), "{e}");

    // The tensors the sizes are read from.
    let name = "encoder.blocks.input.w";
    let e = case("no_input", &|t| t.retain(|r| r.0 != name));
    assert!(e.contains(name) && e.contains("n_hid"), "{e}");
    let e = case("input_channels", &|t| set_shape(t, name, vec![8, 4, 7, 7]));
    assert!(e.contains(name) && e.contains("[8, 4, 7, 7]"), "{e}");
    let name = "encoder.blocks.output.conv.w";
    let e = case("output_width", &|t| set_shape(t, name, vec![16, 32, 1, 1]));
    assert!(e.contains(name) && e.contains("8·n_hid = 64"), "{e}");
    let name = "decoder.blocks.input.w";
    let e = case("decoder_vocab", &|t| set_shape(t, name, vec![12, 15, 1, 1]));
    assert!(e.contains(name) && e.contains("K = 16"), "{e}");
    let e = case("no_blocks", &|t| {
        t.retain(|r| !r.0.starts_with("encoder.blocks.group_1."))
    });
    assert!(
        e.contains("encoder.blocks.group_1.block_1.res_path.conv_1.w")
            && e.contains("n_blk_per_group"),
        "{e}"
    );
    // Decoder groups with more blocks than the encoder's: the extra ones are named.
    let e = case("decoder_blocks", &|t| {
        t.push((
            "decoder.blocks.group_1.block_3.res_path.conv_1.w".into(),
            vec![8, 64, 1, 1],
            Dtype::F32,
            f32_bytes(8 * 64),
        ))
    });
    assert!(e.contains("decoder.blocks.group_1.block_3"), "{e}");

    // Not safetensors at all, and truncated.
    let path = tmp.path().join("garbage.safetensors");
    std::fs::write(&path, b"not a tensor file").unwrap();
    let e = DvaeWeights::locate(&path, false, 32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.safetensors") && e.contains("not a safetensors file"),
        "{e}"
    );
    let full = tmp.path().join("full.safetensors");
    write_raw(&full, &good);
    let bytes = std::fs::read(&full).unwrap();
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let e = DvaeWeights::locate(&cut, false, 32)
        .and_then(|w| w.load())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cut.safetensors"), "{e}");
}

#[test]
fn encode_is_the_argmax_of_the_training_forward_logits() {
    let d = small();
    let m = Dvae::new(d).unwrap();
    let w = varied_codes(&m, m.init_params(3));
    let b = 3;
    let x = images(b, d.resolution, 4);
    let mut acts = m.new_acts(b);
    m.forward(&w, &mut acts, &x, None, 1.0, 0.0).unwrap();
    let logits = m.encoder_logits(&w, &x).unwrap();
    assert_eq!(
        logits,
        acts.logits(),
        "the inference encoder is the training encoder"
    );
    let (k, hw) = (d.vocab_size, d.grid() * d.grid());
    let expected: Vec<u32> = (0..b * hw)
        .map(|i| {
            let (bi, pos) = (i / hw, i % hw);
            let l = |c: usize| acts.logits()[bi * k * hw + c * hw + pos];
            (0..k).fold(0, |best, c| if l(c) > l(best) { c } else { best }) as u32
        })
        .collect();
    let codes = m.encode(&w, &x).unwrap();
    assert_eq!(codes, expected);
    let distinct: std::collections::BTreeSet<_> = codes.iter().collect();
    assert!(
        distinct.len() > 1,
        "a test whose codes are all alike checks little: {codes:?}"
    );
    // Each image's codes do not depend on the batch it is in.
    let px = 3 * d.resolution * d.resolution;
    for bi in 0..b {
        let one = m.encode(&w, &x[bi * px..(bi + 1) * px]).unwrap();
        assert_eq!(one, codes[bi * hw..(bi + 1) * hw]);
    }
    // Bad input.
    assert!(m.encode(&w, &x[1..]).is_err());
    let mut bad = x.clone();
    bad[7] = -0.5;
    let e = m.encode(&w, &bad).unwrap_err().to_string();
    assert!(e.contains("pixel 7"), "{e}");
    assert!(m.encode(&w, &[]).unwrap().is_empty());
}

#[test]
fn decode_codes_is_the_training_decoder_on_exactly_one_hot_codes() {
    // The training forward decodes y = softmax((logits + g)/τ). With g = −logits everywhere,
    // minus 10⁴ off the chosen code, (logits + g)/τ is exactly 0 at the code and ≈ −10⁴ elsewhere,
    // so y is exactly one-hot: the decoder sees the same input as `decode_codes` gives it.
    let d = small();
    let m = Dvae::new(d).unwrap();
    let w = m.init_params(7);
    let b = 2;
    let x = images(b, d.resolution, 8);
    let (k, hw) = (d.vocab_size, d.grid() * d.grid());
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let codes: Vec<u32> = (0..b * hw).map(|_| rng.random_range(0..k as u32)).collect();
    let mut acts = m.new_acts(b);
    m.forward(&w, &mut acts, &x, None, 1.0, 0.0).unwrap();
    let mut noise = vec![0.0f32; b * k * hw];
    for (i, &code) in codes.iter().enumerate() {
        let (bi, pos) = (i / hw, i % hw);
        for c in 0..k {
            let at = bi * k * hw + c * hw + pos;
            noise[at] = -acts.logits()[at] - if c == code as usize { 0.0 } else { 1e4 };
        }
    }
    m.forward(&w, &mut acts, &x, Some(&noise), 1.0, 0.0)
        .unwrap();
    let mut one_hot = vec![0.0f32; b * k * hw];
    for (i, &code) in codes.iter().enumerate() {
        one_hot[(i / hw) * k * hw + code as usize * hw + i % hw] = 1.0;
    }
    assert_eq!(acts.y, one_hot, "the relaxation is exactly one-hot");
    let stats = m.decoder_stats(&w, &codes).unwrap();
    assert_eq!(stats, acts.stats());
    let px = 3 * d.resolution * d.resolution;
    let expected: Vec<f32> = (0..b)
        .flat_map(|bi| {
            acts.stats()[bi * 2 * px..][..px]
                .iter()
                .map(|&m| unmap_pixel(m))
        })
        .collect();
    let decoded = m.decode_codes(&w, &codes).unwrap();
    assert_eq!(decoded, expected);
    assert!(decoded.iter().all(|v| (0.0..=1.0).contains(v)));
    // Each image decodes the same alone.
    let one = m.decode_codes(&w, &codes[hw..]).unwrap();
    assert_eq!(one, decoded[px..]);
    // Bad codes.
    let mut bad = codes.clone();
    bad[5] = k as u32;
    let e = m.decode_codes(&w, &bad).unwrap_err().to_string();
    assert!(e.contains("code 5") && e.contains("K = 16"), "{e}");
    assert!(m.decode_codes(&w, &codes[1..]).is_err());
}

#[test]
fn unmap_pixel_inverts_the_pixel_mapping_and_clamps() {
    for x in [0.0f32, 0.1, 0.5, 0.77, 1.0] {
        let t = squash(x);
        let mu = (t / (1.0 - t)).ln() as f32;
        assert!((unmap_pixel(mu) - x).abs() < 1e-6, "{x}");
    }
    assert_eq!(unmap_pixel(0.0), 0.5);
    assert_eq!(unmap_pixel(50.0), 1.0);
    assert_eq!(unmap_pixel(-50.0), 0.0);
}

#[test]
fn non_finite_logits_are_an_error_not_a_code() {
    let d = small();
    let m = Dvae::new(d).unwrap();
    let mut w = m.init_params(1);
    let bias = m
        .table()
        .find("encoder.blocks.output.conv.b")
        .unwrap()
        .offset;
    w[bias + 3] = f32::NAN;
    let e = m
        .encode(&w, &images(1, d.resolution, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("code 3") && e.contains("NaN"), "{e}");
}

/// A header whose shapes describe a dVAE far larger than the file is refused before the model
/// is built or its parameters allocated (it used to abort the process).
#[test]
fn shapes_larger_than_the_file_are_refused_before_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("huge.safetensors");
    let n_hid: u64 = 1 << 36;
    let t = |shape: [u64; 4]| serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [0, 0]});
    let header = serde_json::json!({
        "encoder.blocks.input.w": t([n_hid, 3, 7, 7]),
        "encoder.blocks.group_1.block_1.res_path.conv_1.w": t([n_hid / 4, n_hid, 3, 3]),
        "encoder.blocks.output.conv.w": t([64, 8 * n_hid, 1, 1]),
        "decoder.blocks.input.w": t([16, 64, 1, 1]),
    })
    .to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = DvaeWeights::locate(&path, false, 32)
        .and_then(|w| w.load())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge.safetensors")
            && e.contains("more than its")
            && e.contains("bytes can hold"),
        "{e}"
    );
}
