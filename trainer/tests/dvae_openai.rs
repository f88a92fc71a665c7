//! OpenAI's released dVAE layout through Tessera's loading path (the one `trainer reconstruct`
//! and `data-prep encode` use: `DvaeWeights::locate` then `load`).
//!
//! - Always: a weights file of the release's exact layout (n_hid 256, n_blk_per_group 2,
//!   K 8192, n_init 128: 150 tensors, 97.6 M parameters, 390 MB), its names and shapes written
//!   here from `dall_e`'s module structure (not from `Dvae::table`), keyed as
//!   `tools/convert_openai_dvae.py` writes them; the sizes must be inferred, every tensor must
//!   land where its name says, and encode / decode must run on it.
//! - Always: a committed fixture (trainer/tests/fixtures/dall_e/, made by
//!   tools/make_dall_e_fixture.sh): small random `dall_e` modules converted by
//!   tools/convert_openai_dvae.py, and `dall_e`'s own logits, codes, decoder output and
//!   reconstruction on two images; Tessera must reproduce them. So the converter check runs in
//!   CI, which has no PyTorch.
//! - When a Python with torch and `dall_e` is at hand (`TESSERA_TORCH_PYTHON`, else `python3`):
//!   the same check on a fresh run of the converter's `--selftest` (which pickles the modules,
//!   converts them and records `dall_e`'s outputs). Without torch this extra is skipped with a
//!   note.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use safetensors::tensor::{Dtype, SafeTensors};
use trainer::checkpoint::{write_tensors, TensorEntry};
use trainer::model::dvae::{DvaeDims, DvaeWeights};

const GROUP_COUNT: usize = 4;

/// The state-dict names and shapes of `dall_e.Encoder` / `dall_e.Decoder`, prefixed, as the
/// modules build them (dall_e/encoder.py, decoder.py).
fn dall_e_layout(n_hid: usize, n_blk: usize, k: usize, n_init: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut conv = |name: String, c_in: usize, c_out: usize, kw: usize| {
        out.push((format!("{name}.w"), vec![c_out, c_in, kw, kw]));
        out.push((format!("{name}.b"), vec![c_out]));
    };
    // Encoder: input 7×7; groups of blocks (3×3, 3×3, 3×3, 1×1 residual convs) 1, 2, 4, 8 × n_hid
    // wide; output ReLU + 1×1 to K.
    conv("encoder.blocks.input".into(), 3, n_hid, 7);
    let mut c = n_hid;
    for g in 1..=GROUP_COUNT {
        let n_out = n_hid << (g - 1);
        for i in 1..=n_blk {
            let name = format!("encoder.blocks.group_{g}.block_{i}");
            if c != n_out {
                conv(format!("{name}.id_path"), c, n_out, 1);
            }
            let h = n_out / 4;
            conv(format!("{name}.res_path.conv_1"), c, h, 3);
            conv(format!("{name}.res_path.conv_2"), h, h, 3);
            conv(format!("{name}.res_path.conv_3"), h, h, 3);
            conv(format!("{name}.res_path.conv_4"), h, n_out, 1);
            c = n_out;
        }
    }
    conv("encoder.blocks.output.conv".into(), 8 * n_hid, k, 1);
    // Decoder: input 1×1 from K; groups (1×1, 3×3, 3×3, 3×3) 8, 4, 2, 1 × n_hid wide; output
    // ReLU + 1×1 to 2 × 3 channels.
    conv("decoder.blocks.input".into(), k, n_init, 1);
    let mut c = n_init;
    for g in 1..=GROUP_COUNT {
        let n_out = n_hid << (GROUP_COUNT - g);
        for i in 1..=n_blk {
            let name = format!("decoder.blocks.group_{g}.block_{i}");
            if c != n_out {
                conv(format!("{name}.id_path"), c, n_out, 1);
            }
            let h = n_out / 4;
            conv(format!("{name}.res_path.conv_1"), c, h, 1);
            conv(format!("{name}.res_path.conv_2"), h, h, 3);
            conv(format!("{name}.res_path.conv_3"), h, h, 3);
            conv(format!("{name}.res_path.conv_4"), h, n_out, 3);
            c = n_out;
        }
    }
    conv("decoder.blocks.output.conv".into(), n_hid, 6, 1);
    out
}

/// Value `i` of tensor `t`: a cheap deterministic hash in ±1/√fan_in (dall_e's init scale).
fn value(t: usize, i: usize, fan_in: usize) -> f32 {
    let mut x = (t as u64) << 40 ^ i as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let u = (x >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
    (2.0 * u - 1.0) / (fan_in as f32).sqrt()
}

#[test]
fn openai_release_layout_loads_through_the_encode_path() {
    let (n_hid, n_blk, k, n_init) = (256, 2, 8192, 128);
    let layout = dall_e_layout(n_hid, n_blk, k, n_init);
    assert_eq!(layout.len(), 150);
    let values: Vec<Vec<f32>> = layout
        .iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            // A bias has its convolution's fan-in: the weight just before it.
            let w = if name.ends_with(".b") {
                &layout[t - 1].1
            } else {
                shape
            };
            let fan_in = w[1..].iter().product();
            (0..shape.iter().product())
                .map(|i| value(t, i, fan_in))
                .collect()
        })
        .collect();
    let total: usize = values.iter().map(Vec::len).sum();
    assert_eq!(total, 97_616_006);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("openai-dvae.safetensors");
    let entries: Vec<TensorEntry> = layout
        .iter()
        .zip(&values)
        .map(|((name, shape), v)| TensorEntry {
            name: name.clone(),
            shape: shape.clone(),
            data: v,
        })
        .collect();
    write_tensors(&path, &entries).unwrap();
    drop(entries);

    let found = DvaeWeights::locate(&path, false, 256).unwrap();
    let release = DvaeDims {
        resolution: 256,
        n_hid,
        n_blk_per_group: n_blk,
        vocab_size: k,
        n_init,
    };
    assert_eq!(found.dims, release);
    assert_eq!(found.dims.grid(), 32);
    let (dvae, params) = found.load().unwrap();
    assert_eq!(dvae.table().len(), 150);
    for ((name, shape), v) in layout.iter().zip(&values) {
        let spec = dvae
            .table()
            .find(name)
            .unwrap_or_else(|| panic!("{name} not in the table"));
        assert_eq!(&spec.shape, shape, "{name}");
        assert!(
            params[spec.range()] == v[..],
            "{name} did not land where its name says"
        );
    }
    drop((dvae, params));

    // The same file through the same path at a small resolution (the networks are convolutional),
    // so that the encode → decode round trip runs in a test: 32 px → 4×4 codes of 8192.
    let small = DvaeWeights::locate(&path, false, 32).unwrap();
    let (dvae, params) = small.load().unwrap();
    let images: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| (i % 97) as f32 / 96.0)
        .collect();
    let codes = dvae.encode(&params, &images).unwrap();
    assert_eq!(codes.len(), 2 * 16);
    assert!(codes.iter().all(|&c| (c as usize) < k));
    let recon = dvae.decode_codes(&params, &codes).unwrap();
    assert_eq!(recon.len(), images.len());
    assert!(recon.iter().all(|v| (0.0..=1.0).contains(v)));
}

/// A Python that can run the converter's selftest against `dall_e`, or why not.
fn torch_python() -> Result<String, String> {
    let python = std::env::var("TESSERA_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python)
        .args(["-c", "import torch, dall_e, safetensors.torch"])
        .output()
    {
        Err(e) => Err(format!("cannot run {python}: {e}")),
        Ok(o) if !o.status.success() => {
            Err(format!(
            "{python} cannot import torch, dall_e and safetensors ({}); set TESSERA_TORCH_PYTHON \
             to a Python that can (pip install torch safetensors attrs requests && pip install \
             --no-deps dall-e)",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        ))
        }
        Ok(_) => Ok(python),
    }
}

fn read_f32(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}");
    let mut worst = (0.0f32, 0);
    let mut max_abs = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        max_abs = max_abs.max((g - w).abs());
        assert!(
            g.is_finite() && w.is_finite(),
            "{name}[{i}]: Tessera {g} vs dall_e {w}"
        );
        let err = (g - w).abs() - rtol * w.abs();
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(
        worst.0 <= atol,
        "{name}[{i}]: Tessera {} vs dall_e {} (|Δ| > {atol} + {rtol}·|ref|)",
        got[i],
        want[i]
    );
    eprintln!("{name}: max |Δ| = {max_abs:.2e}");
}

/// Tessera on the converted weights `dir/dvae.safetensors` against `dall_e`'s outputs in
/// `dir/check.safetensors`.
fn compare_with_dall_e(dir: &Path) {
    let bytes = std::fs::read(dir.join("check.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let shape = st.tensor("images").unwrap().shape().to_vec();
    let res = shape[2];
    let weights = DvaeWeights::locate(&dir.join("dvae.safetensors"), false, res).unwrap();
    let (dvae, params) = weights.load().unwrap();
    let d = *dvae.dims();
    let images = read_f32(&st, "images");
    let logits = dvae.encoder_logits(&params, &images).unwrap();
    let want_logits = read_f32(&st, "logits");
    close("logits", &logits, &want_logits, 1e-4, 1e-4);

    // Codes: dall_e's argmax, except where two logits are closer than float32 noise.
    let t = st.tensor("codes").unwrap();
    let want_codes: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect();
    let codes = dvae.encode(&params, &images).unwrap();
    let (k, hw) = (d.vocab_size, d.grid() * d.grid());
    let mut differ = BTreeMap::new();
    for (i, (&a, &b)) in codes.iter().zip(&want_codes).enumerate() {
        if a != b {
            let l = |c: u32| want_logits[(i / hw) * k * hw + c as usize * hw + i % hw];
            assert!(
                (l(a) - l(b)).abs() < 1e-4,
                "code {i}: Tessera {a}, dall_e {b}"
            );
            differ.insert(i, (a, b));
        }
    }
    assert!(differ.len() <= 1, "{differ:?}");

    // Decoder and reconstruction on dall_e's codes.
    let stats = dvae.decoder_stats(&params, &want_codes).unwrap();
    close("stats", &stats, &read_f32(&st, "stats"), 1e-4, 1e-4);
    let recon = dvae.decode_codes(&params, &want_codes).unwrap();
    close("recon", &recon, &read_f32(&st, "recon"), 1e-5, 0.0);
}

#[test]
fn converted_dall_e_modules_compute_what_dall_e_computes() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dall_e");
    compare_with_dall_e(&fixture);
}

/// The same check on a fresh run of the converter, where PyTorch and `dall_e` are installed.
#[test]
fn freshly_converted_dall_e_modules_compute_what_dall_e_computes() {
    let python = match torch_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("skipped: the fresh dall_e conversion check (the fixture check ran): {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/convert_openai_dvae.py");
    let o = Command::new(&python)
        .arg(&script)
        .args(["--selftest", "--out"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    compare_with_dall_e(tmp.path());
}

/// The converter's writer gives byte-identical files for the same tensors and metadata, whatever
/// order they are handed over in, and the files read back through the `safetensors` crate (the
/// reader Tessera uses). Needs only numpy; without it the check is skipped with a note, except
/// under CI (`CI` set), where it fails.
#[test]
fn the_converter_writes_the_same_bytes_for_the_same_tensors() {
    let python = std::env::var("TESSERA_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools");
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, reversed: bool| {
        let out = tmp.path().join(name);
        let program = format!(
            "import sys; sys.path.insert(0, sys.argv[1]); import numpy as np; \
             import convert_openai_dvae as c; \
             t = [('encoder.b', np.arange(6, dtype=np.float32).reshape(2, 3)), \
                  ('decoder.w', np.full((4,), -1.5, dtype=np.float32))]; \
             m = [('format', 'pt'), ('n_hid', '2'), ('source', 'test')]; \
             r = {reversed}; \
             c.write_safetensors(dict(t[::-1] if r else t), sys.argv[2], dict(m[::-1] if r else m))",
            reversed = if reversed { "True" } else { "False" }
        );
        Command::new(&python)
            .args(["-c", &program])
            .arg(&tools)
            .arg(&out)
            .output()
            .map(|o| (o, out))
    };
    let (o, a) = match write("a.safetensors", false) {
        Ok(r) if r.0.status.success() => r,
        other => {
            let why = match other {
                Ok((o, _)) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var_os("CI").is_none(),
                "{python} cannot run the converter's writer: {why}"
            );
            eprintln!("skipped: {python} cannot run the converter's writer (needs numpy): {why}");
            return;
        }
    };
    assert!(o.status.success());
    let (o, b) = write("b.safetensors", true).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (fa, fb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(fa, fb, "the same tensors gave different bytes");
    let st = SafeTensors::deserialize(&fa).unwrap();
    assert_eq!(read_f32(&st, "encoder.b"), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(st.tensor("encoder.b").unwrap().shape(), [2, 3]);
    assert_eq!(read_f32(&st, "decoder.w"), [-1.5; 4]);
    let (_, meta) = SafeTensors::read_metadata(&fa).unwrap();
    let meta: BTreeMap<_, _> = meta.metadata().clone().unwrap().into_iter().collect();
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["source"], "test");
}
