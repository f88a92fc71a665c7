//! CLIP (docs/model.md §3) loaded from a directory in Hugging Face's layout that the test writes
//! (`config.json` with the usual extra fields, `model.safetensors` with random weights and the
//! `position_ids` buffer, a word-level `tokenizer.json`, `preprocessor_config.json`): captions
//! tokenised and images preprocessed by the directory's own files, one forward and backward pass,
//! and the independent NumPy reference `tools/reference_clip.py` agreeing on the embeddings, the
//! logits, the loss and sampled gradient entries. Then the directory's bad forms, each refused
//! with an error naming the tensor or field.
//!
//! The reference needs `python3` with numpy and safetensors (`tools/requirements.txt`). Without
//! them that check is skipped with a note on stderr, except under CI (`CI` set), where it fails.

mod support;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use support::clip::{
    config, preprocessor_json, tokenizer_json, write_dir, write_safetensors, END, START,
};
use trainer::checkpoint::{entries, write_tensors, TensorEntry};
use trainer::model::clip::hf::{self, load_dir};
use trainer::model::clip::{Activations, Clip};

/// Three RGB images of different shapes and contents.
fn images(seed: u64) -> Vec<image::RgbImage> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    [(12u32, 9u32), (8, 8), (9, 16)]
        .iter()
        .map(|&(w, h)| {
            image::RgbImage::from_fn(w, h, |_, _| {
                image::Rgb([rng.random(), rng.random(), rng.random()])
            })
        })
        .collect()
}

fn entry<'a>(name: &str, shape: Vec<usize>, data: &'a [f32]) -> TensorEntry<'a> {
    TensorEntry {
        name: name.into(),
        shape,
        data,
    }
}

fn check_against_reference(eos_token_id: u32, text_act: &str, vision_act: &str, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let w = write_dir(
        dir.path(),
        &config(eos_token_id, text_act, vision_act),
        seed,
    );
    let clip = load_dir(dir.path()).unwrap();
    assert_eq!(clip.params, w, "the weights load unchanged");
    let tok = &clip.tokenizer;
    assert_eq!((tok.start_id, tok.end_id), (START, END));
    let captions = [
        "A photo of a cat",
        "red square",
        "a photo of a big green circle on the",
    ];
    let ids: Vec<u32> = captions
        .iter()
        .flat_map(|c| tok.encode(c).unwrap())
        .collect();
    // Start, words, end, then the end token as padding; the long caption is truncated to the
    // context of 7 with its end token kept.
    assert_eq!(&ids[..7], &[START, 1, 2, 3, 1, 4, END]);
    assert_eq!(&ids[7..14], &[START, 6, 8, END, END, END, END]);
    assert_eq!(&ids[14..], &[START, 1, 2, 3, 1, 13, END]);
    let mut pixels = Vec::new();
    for img in images(seed) {
        let (px, h, w) = clip.preprocessor.apply(&img).unwrap();
        assert_eq!((h, w), (8, 8));
        pixels.extend(px);
    }

    let model = &clip.model;
    let b = captions.len();
    let mut acts = Activations::new(model, b, 7).unwrap();
    let loss = model
        .forward(&clip.params, &mut acts, &ids, &pixels)
        .unwrap();
    let mut grads = vec![0.0f32; clip.params.len()];
    model.backward(&clip.params, &mut grads, &mut acts).unwrap();

    if !support::python_ready("the NumPy CLIP reference check") {
        return;
    }
    let inputs = dir.path().join("inputs.safetensors");
    let outputs = dir.path().join("outputs.safetensors");
    let ids64: Vec<u8> = ids.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
    let px_entry = entry("pixel_values", vec![b, 3, 8, 8], &pixels);
    write_safetensors(
        &inputs,
        &[px_entry],
        &[("input_ids", Dtype::I64, vec![b, 7], ids64)],
    );
    let loss = [loss];
    let mut outs = vec![
        entry("text_embeds", vec![b, 6], &acts.text_embeds),
        entry("image_embeds", vec![b, 6], &acts.image_embeds),
        entry("logits_per_image", vec![b, b], &acts.logits_per_image),
        entry("loss", vec![1], &loss),
    ];
    outs.extend(entries(model.table(), "grad.", &grads));
    write_tensors(&outputs, &outs).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference_clip.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--dir".as_ref(), dir.path().as_os_str()])
        .args(["--inputs".as_ref(), inputs.as_os_str()])
        .args(["--outputs".as_ref(), outputs.as_os_str()])
        .args(["--fd-samples", "150"])
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the NumPy CLIP reference disagrees (eos_token_id {eos_token_id}, {text_act}/{vision_act}): \
         status {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hugging_face_directory_matches_numpy_reference() {
    check_against_reference(END, "quick_gelu", "quick_gelu", 1);
}

/// The legacy configs' `eos_token_id: 2` (pooled at the largest id, here the end token) and the
/// two other activations.
#[test]
fn legacy_end_token_and_gelu_match_numpy_reference() {
    check_against_reference(2, "gelu", "gelu_pytorch_tanh", 2);
}

/// Loads `dir` after `edit` changed it, and returns the error text.
fn load_error(edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &config(END, "quick_gelu", "quick_gelu"), 3);
    edit(dir.path());
    match load_dir(dir.path()) {
        Ok(_) => panic!("the edited directory loaded"),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites model.safetensors from the loaded weights with `f` applied to the entry list.
fn edit_weights(dir: &Path, f: impl FnOnce(&mut Vec<TensorEntry>)) {
    let (dims, _) = hf::read_config(&dir.join("config.json")).unwrap();
    let model = Clip::new(dims).unwrap();
    let w = hf::read_weights(&dir.join("model.safetensors"), &model).unwrap();
    let mut list = entries(model.table(), "", &w);
    f(&mut list);
    write_safetensors(&dir.join("model.safetensors"), &list, &[]);
}

#[test]
fn bad_directories_are_refused_naming_the_tensor_or_field() {
    let err = load_error(|d| edit_weights(d, |l| l.retain(|t| t.name != "text_projection.weight")));
    assert!(
        err.contains("missing tensor `text_projection.weight`")
            && err.contains("model.safetensors"),
        "{err}"
    );

    let err = load_error(|d| {
        edit_weights(d, |l| {
            let t = l
                .iter_mut()
                .find(|t| t.name == "vision_model.embeddings.patch_embedding.weight")
                .unwrap();
            t.shape = vec![12, 3, 16];
        })
    });
    assert!(
        err.contains("`vision_model.embeddings.patch_embedding.weight` has shape [12, 3, 16], expected [12, 3, 4, 4]"),
        "{err}"
    );

    let err = load_error(|d| {
        edit_weights(d, |l| {
            let extra = l[0].clone();
            l.push(TensorEntry {
                name: "text_model.pooler.weight".into(),
                ..extra
            });
        })
    });
    assert!(
        err.contains("unexpected tensor `text_model.pooler.weight`"),
        "{err}"
    );

    let err = load_error(|d| edit_config(d, |v| v["vision_config"]["hidden_act"] = json!("relu")));
    assert!(
        err.contains("`vision_config.hidden_act` = \"relu\" is not supported"),
        "{err}"
    );

    let err = load_error(|d| {
        edit_config(d, |v| {
            v["text_config"]["position_embedding_type"] = json!("rotary")
        })
    });
    assert!(
        err.contains("unknown field `text_config.position_embedding_type`")
            && err.contains("config.json"),
        "{err}"
    );

    let err = load_error(|d| edit_config(d, |v| v["text_config"]["layer_norm_eps"] = json!(1e-6)));
    assert!(
        err.contains("`text_config.layer_norm_eps` = 0.000001"),
        "{err}"
    );

    // text_config_dict overrides text_config, as in Hugging Face: here to an inconsistent width.
    let err = load_error(|d| {
        edit_config(d, |v| {
            v["text_config_dict"] = json!({"num_attention_heads": 3})
        })
    });
    assert!(
        err.contains(
            "text_config.hidden_size = 8 must be divisible by text_config.num_attention_heads = 3"
        ),
        "{err}"
    );

    let err = load_error(|d| {
        let p = d.join("preprocessor_config.json");
        let mut v = preprocessor_json();
        v["resample"] = json!(2);
        std::fs::write(p, v.to_string()).unwrap();
    });
    assert!(
        err.contains("`resample` = 2") && err.contains("preprocessor_config.json"),
        "{err}"
    );
}

#[test]
fn preprocessing_resizes_the_short_side_crops_the_centre_and_normalises() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.json"), preprocessor_json().to_string()).unwrap();
    let pre = hf::Preprocessor::from_file(&dir.path().join("p.json")).unwrap();
    // A flat colour stays flat through the bicubic resize: every value is (v/255 − mean)/std.
    let img = image::RgbImage::from_pixel(30, 12, image::Rgb([200, 100, 50]));
    let (px, h, w) = pre.apply(&img).unwrap();
    assert_eq!((h, w, px.len()), (8, 8, 3 * 64));
    let (mean, std) = pre.mean_std.unwrap();
    for (c, v) in [200.0f32, 100.0, 50.0].iter().enumerate() {
        let want = (v / 255.0 - mean[c]) / std[c];
        assert!(
            px[c * 64..(c + 1) * 64]
                .iter()
                .all(|&x| (x - want).abs() < 1e-5),
            "channel {c}"
        );
    }
    // The crop is the centre: a 30×12 image becomes 20×8, of which columns 6..14 are kept; a
    // left half black and right half white image keeps its edge in the middle of the crop.
    let img = image::RgbImage::from_fn(30, 12, |x, _| {
        if x < 15 {
            image::Rgb([0; 3])
        } else {
            image::Rgb([255; 3])
        }
    });
    let (px, _, _) = pre.apply(&img).unwrap();
    let row: Vec<f32> = px[..8].to_vec();
    let black = (0.0 - mean[0]) / std[0];
    let white = (1.0 - mean[0]) / std[0];
    assert!(
        (row[0] - black).abs() < 1e-5 && (row[7] - white).abs() < 1e-5,
        "{row:?}"
    );
    assert!(row.windows(2).all(|p| p[1] >= p[0] - 0.05), "{row:?}");
}

/// The `model:` section of a `model.kind: clip` run config: the tiny model above.
const CLIP_MODEL: &str = "model:
  kind: clip
  projection_dim: 6
  text_config: {vocab_size: 20, hidden_size: 8, intermediate_size: 16, num_attention_heads: 2,
                num_hidden_layers: 2, max_position_embeddings: 7, eos_token_id: 19,
                hidden_act: quick_gelu}
  vision_config: {hidden_size: 12, intermediate_size: 20, num_attention_heads: 3,
                  num_hidden_layers: 2, image_size: 8, patch_size: 4, hidden_act: gelu}
";

fn clip_config(out_dir: &Path, model: &str) -> String {
    format!(
        "run: {{name: c, out_dir: {}, seed: 5}}\n{model}\
         data: {{source: images, paths: [unused.tis]}}\ntrain: {{steps: 1, batch_size: 2}}\n",
        out_dir.display()
    )
}

/// `trainer init-weights` writes a directory that loads as a Hugging Face one (its
/// `config.json` included), and `trainer debug-state` on it (docs/model.md §4's `clip` row)
/// agrees with the NumPy reference.
#[test]
fn init_weights_and_debug_state_cli_match_numpy_reference() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(p("clip.yaml"), clip_config(&p("run"), CLIP_MODEL)).unwrap();
    let run = support::trainer_ok;
    let (cfg, w, batch, state) = (
        p("clip.yaml"),
        p("model.safetensors"),
        p("batch.safetensors"),
        p("state.safetensors"),
    );
    run(&[
        "init-weights".as_ref(),
        "--config".as_ref(),
        &cfg,
        "--out".as_ref(),
        &w,
    ]);
    std::fs::write(p("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        p("preprocessor_config.json"),
        preprocessor_json().to_string(),
    )
    .unwrap();
    let clip = load_dir(dir.path()).unwrap();
    let ls = clip.model.logit_scale(&clip.params);
    assert!(
        (ls - hf::DEFAULT_LOGIT_SCALE_INIT).abs() < 1e-6,
        "logit_scale {ls}"
    );
    let d = clip.model.dims();
    assert_eq!(
        (d.text_config.hidden_size, d.vision_config.patch_size),
        (8, 4)
    );

    // Captions of 5 positions (S below the context of 7) and random normalised pixels.
    let ids: Vec<i64> = vec![18, 3, 19, 19, 19, 18, 5, 6, 7, 19];
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let pixels: Vec<f32> = (0..2 * 3 * 64)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let ids_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(
        &batch,
        &[entry("pixel_values", vec![2, 3, 8, 8], &pixels)],
        &[("input_ids", Dtype::I64, vec![2, 5], ids_bytes)],
    );
    run(&[
        "debug-state".as_ref(),
        "--config".as_ref(),
        &cfg,
        "--weights".as_ref(),
        &w,
        "--batch".as_ref(),
        &batch,
        "--out".as_ref(),
        &state,
    ]);
    let bytes = std::fs::read(&state).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, shape) in [
        ("text_embeds", vec![2, 6]),
        ("image_embeds", vec![2, 6]),
        ("logits_per_image", vec![2, 2]),
        ("loss", vec![1]),
        ("grad.logit_scale", vec![]),
        (
            "grad.vision_model.embeddings.patch_embedding.weight",
            vec![12, 3, 4, 4],
        ),
    ] {
        assert_eq!(st.tensor(name).unwrap().shape(), shape.as_slice(), "{name}");
    }
    assert_eq!(st.names().len(), 4 + clip.model.table().len());

    if !support::python_ready("the NumPy CLIP debug-state check") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference_clip.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--dir".as_ref(), dir.path().as_os_str()])
        .args(["--inputs".as_ref(), batch.as_os_str()])
        .args(["--outputs".as_ref(), state.as_os_str()])
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the NumPy CLIP reference disagrees with trainer debug-state: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn clip_run_config_is_checked_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg =
        trainer::config::RunConfig::from_yaml_str(&clip_config(dir.path(), CLIP_MODEL), "c.yaml")
            .unwrap();
    assert_eq!(cfg.model.clip().unwrap().vision_config.num_channels, 3);
    let bad = CLIP_MODEL.replace("hidden_size: 8,", "hidden_size: 9,");
    let err = trainer::config::RunConfig::from_yaml_str(&clip_config(dir.path(), &bad), "c.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.text_config.hidden_size = 9 must be divisible by model.text_config.num_attention_heads = 2"), "{err}");
    let bad = CLIP_MODEL.replace("hidden_act: gelu}", "hidden_act: relu}");
    let err = trainer::config::RunConfig::from_yaml_str(&clip_config(dir.path(), &bad), "c.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("relu"), "{err}");
    let bad = CLIP_MODEL.replace("projection_dim: 6", "projection_dim: 6\n  d_model: 4");
    let err = trainer::config::RunConfig::from_yaml_str(&clip_config(dir.path(), &bad), "c.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.d_model does not apply to model.kind: clip"),
        "{err}"
    );
}

/// `trainer train` on a clip config without `data.tokenizer` stops naming the field, before
/// writing any checkpoint.
#[test]
fn train_refuses_a_clip_config_without_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("clip.yaml");
    std::fs::write(&cfg, clip_config(&dir.path().join("run"), CLIP_MODEL)).unwrap();
    let out = support::trainer_command()
        .args(["train".as_ref(), "--config".as_ref(), cfg.as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("data.tokenizer is required to train model.kind: clip"),
        "{err}"
    );
    assert!(!dir.path().join("run/checkpoints").exists());
}

/// `--set` reaches the fields of CLIP's nested tower sections, and names an unknown one.
#[test]
fn set_overrides_reach_the_tower_sections() {
    let dir = tempfile::tempdir().unwrap();
    let text = clip_config(dir.path(), CLIP_MODEL);
    let set = |s: &str| {
        trainer::config::RunConfig::from_yaml_str_with_overrides(&text, "c.yaml", &[s.to_string()])
    };
    let cfg = set("model.text_config.hidden_size=16").unwrap();
    assert_eq!(cfg.model.clip().unwrap().text_config.hidden_size, 16);
    let err = set("model.text_config.hidden_size=9")
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.text_config.hidden_size = 9"), "{err}");
    let err = set("model.vision_config.width=9").unwrap_err().to_string();
    assert!(
        err.contains("unknown field 'width' in 'model.vision_config'"),
        "{err}"
    );
}
