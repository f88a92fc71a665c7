//! The cross-implementation check of docs/model.md §4: `trainer debug-state` on a small model
//! against the independent NumPy reference `tools/reference_transformer.py`, and debug-state's
//! refusal of malformed batch files.
//!
//! The reference needs `python3` with numpy and safetensors (`tools/requirements.txt`). Without
//! them the check is skipped with a note on stderr, except under CI (`CI` set), where it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

// Sizes: Tt 6, Vt 20, G 4, Vi 12, d 16, h 2, L 5 (layers row, column, row, row, conv), kernel 3.
const TEXT_LEN: usize = 6;
const TEXT_VOCAB: i64 = 20;
const IMAGE_TOKENS: usize = 16;
const IMAGE_VOCAB: i64 = 12;
const HEADS: &str = "2";
const CONV_KERNEL: &str = "3";

fn config_yaml(out_dir: &Path) -> String {
    format!(
        "\
run:
  name: reference-check
  out_dir: {}
  seed: 11
  device: cpu
model:
  text_len: {TEXT_LEN}
  text_vocab: {TEXT_VOCAB}
  grid: 4
  image_vocab: {IMAGE_VOCAB}
  d_model: 16
  heads: {HEADS}
  layers: 5
  conv_kernel: {CONV_KERNEL}
data:
  source: synthetic
train:
  steps: 1
  batch_size: 1
",
        out_dir.display()
    )
}

/// Runs the `trainer` binary with `args`.
fn trainer(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running the trainer binary")
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a batch file: `text` [rows, text_cols] and `image` [rows, image_cols], both i64.
fn write_batch(path: &Path, text: &[i64], text_cols: usize, image: &[i64], image_cols: usize) {
    let (tb, ib) = (i64_bytes(text), i64_bytes(image));
    let tensors = [
        (
            "text",
            TensorView::new(Dtype::I64, vec![text.len() / text_cols, text_cols], &tb).unwrap(),
        ),
        (
            "image",
            TensorView::new(Dtype::I64, vec![image.len() / image_cols, image_cols], &ib).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, path).unwrap();
}

/// Three captions: one with two padding positions, one without, one of a single token; padding
/// at position p is id Vt + p.
fn good_text() -> Vec<i64> {
    let pad = |p: i64| TEXT_VOCAB + p;
    vec![
        3,
        7,
        19,
        0,
        pad(4),
        pad(5), //
        5,
        5,
        1,
        2,
        9,
        11, //
        12,
        pad(1),
        pad(2),
        pad(3),
        pad(4),
        pad(5),
    ]
}

fn good_image() -> Vec<i64> {
    (0..3 * IMAGE_TOKENS as i64)
        .map(|i| (i * 7 + i / 5) % IMAGE_VOCAB)
        .collect()
}

/// Adds 0.3·u, u uniform in [−1, 1) from a fixed stream, to every weight, so that gains, biases
/// and matrices are all generic and every gradient is clearly non-zero.
fn perturb_weights(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut perturbed = Vec::new();
    for name in names {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let data: Vec<u8> = t
            .data()
            .chunks_exact(4)
            .flat_map(|b| {
                let v = f32::from_le_bytes(b.try_into().unwrap()) + 0.3 * uniform();
                v.to_le_bytes()
            })
            .collect();
        perturbed.push((name, t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = perturbed
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    weights: PathBuf,
}

/// A temporary directory with the config and perturbed weights.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_yaml(&dir.path().join("run"))).unwrap();
    let weights = dir.path().join("weights.safetensors");
    let out = trainer(&[
        "init-weights".as_ref(),
        "--config".as_ref(),
        &config,
        "--out".as_ref(),
        &weights,
    ]);
    assert!(
        out.status.success(),
        "init-weights failed: {}",
        describe(&out)
    );
    perturb_weights(&weights);
    Setup {
        dir,
        config,
        weights,
    }
}

fn debug_state(s: &Setup, batch: &Path, out: &Path) -> Output {
    trainer(&[
        "debug-state".as_ref(),
        "--config".as_ref(),
        &s.config,
        "--weights".as_ref(),
        &s.weights,
        "--batch".as_ref(),
        batch,
        "--out".as_ref(),
        out,
    ])
}

#[test]
fn debug_state_matches_numpy_reference() {
    let s = setup();
    let batch = s.dir.path().join("batch.safetensors");
    write_batch(&batch, &good_text(), TEXT_LEN, &good_image(), IMAGE_TOKENS);
    let state = s.dir.path().join("state.safetensors");
    let out = debug_state(&s, &batch, &state);
    assert!(
        out.status.success(),
        "debug-state failed: {}",
        describe(&out)
    );

    if !support::python_ready("the NumPy reference check") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference_transformer.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--weights".as_ref(), s.weights.as_os_str()])
        .args(["--batch".as_ref(), batch.as_os_str()])
        .args(["--debug-state".as_ref(), state.as_os_str()])
        .args(["--heads", HEADS, "--conv-kernel", CONV_KERNEL])
        // About 1 in 18 of the 17,872 gradient entries, in a few seconds.
        .args(["--fd-samples", "1000"])
        .output()
        .expect("running python3");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the NumPy reference disagrees with debug-state: {}",
        describe(&out)
    );
}

/// A malformed batch: its label, `text` with its column count, `image`, and the tensor the
/// error must name.
struct BadBatch {
    label: &'static str,
    text: Vec<i64>,
    text_cols: usize,
    image: Vec<i64>,
    tensor: &'static str,
}

#[test]
fn debug_state_names_file_and_tensor_of_a_bad_batch() {
    let s = setup();
    let out_path = s.dir.path().join("state.safetensors");
    let bad = |label, text, text_cols, image, tensor| BadBatch {
        label,
        text,
        text_cols,
        image,
        tensor,
    };
    // `text` with one column too few.
    let narrow: Vec<i64> = good_text()
        .chunks(TEXT_LEN)
        .flat_map(|r| r[..TEXT_LEN - 1].to_vec())
        .collect();
    // A text id past the last padding id Vt + Tt − 1.
    let mut text_range = good_text();
    text_range[8] = TEXT_VOCAB + TEXT_LEN as i64;
    // An image id past Vi − 1.
    let mut image_range = good_image();
    image_range[20] = IMAGE_VOCAB;
    // A negative text id.
    let mut negative = good_text();
    negative[1] = -1;
    let cases = [
        bad("narrow", narrow, TEXT_LEN - 1, good_image(), "text"),
        bad("text-range", text_range, TEXT_LEN, good_image(), "text"),
        bad("image-range", good_text(), TEXT_LEN, image_range, "image"),
        bad("negative", negative, TEXT_LEN, good_image(), "text"),
    ];

    for BadBatch {
        label,
        text,
        text_cols,
        image,
        tensor,
    } in cases
    {
        let batch = s.dir.path().join(format!("bad-{label}.safetensors"));
        write_batch(&batch, &text, text_cols, &image, IMAGE_TOKENS);
        let out = debug_state(&s, &batch, &out_path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let shown = batch.display().to_string();
        assert!(
            !out.status.success(),
            "{label}: accepted: {}",
            describe(&out)
        );
        // The tensor must be named in the message itself, not just inside the file's path.
        assert!(
            stderr.contains(&shown) && stderr.replace(&shown, "<batch>").contains(tensor),
            "{label}: the error should name {} and `{tensor}`: {}",
            batch.display(),
            describe(&out)
        );
        assert!(!out_path.exists(), "{label}: wrote {}", out_path.display());
    }
}
