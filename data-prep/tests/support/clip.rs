//! The CLIP and the images of the `embed` and `dedup` tests (included by them with `#[path]`).
//!
//! The model is a CLIP with random weights that the tests write as a Hugging Face directory
//! ([`write_model`], [`MODEL`]): 64×64 images as one 64×64 patch, one 512-wide vision layer,
//! D = 256, `init_params` weights, class and position embeddings zeroed. The class token then
//! attends evenly to itself (zero) and the one patch token, so the embedding is a smooth
//! function of a random projection of the whole image: an image and a lightly edited copy land
//! close together, unrelated images apart, which is what dedup needs (an untrained CLIP of the
//! usual shape, 8×8 patches and a learned class token, does not separate 12% crops from
//! unrelated fields: crops 0.96, distinct pairs up to 0.99).
//!
//! The images are smooth random colour fields (an 8×8 grid of random colours, upsampled), each
//! unrelated to the others; [`edit`] makes the planted copies: exact, resized (64 → 40 → 64),
//! re-encoded (JPEG quality 70), colour-shifted (+10 red, −8 blue) and cropped (56×56 of the
//! centre, resized back).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use formats::image_shard::ImageShardWriter;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use trainer::checkpoint::{entries, write_tensors};
use trainer::model::clip::{hf, Activation, Clip, ClipDims, TextConfig, VisionConfig};

use crate::support::data_prep;

pub const RES: u32 = 64;
/// The similarity threshold of the tests: 0.7, not the 0.94 of a trained CLIP. Measured with
/// [`MODEL`] on 40 fields and 8 planted copies of each kind (seed 1): distinct images ≤ 0.47;
/// copies: exact 1.000, resized 0.9998, JPEG 0.997, colour shift 0.982, crop 0.79 (the
/// lowest). Each test also asserts the margin it relies on.
pub const THRESHOLD: f32 = 0.7;
/// Caption words of the word-level tokenizer.
pub const WORDS: [&str; 4] = ["a", "random", "colour", "field"];

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The vision tower's shape and weight scale of a test model.
#[derive(Clone, Copy, Debug)]
pub struct Variant {
    pub patch: usize,
    pub hidden: usize,
    pub gain: f32,
    /// Zero class and position embeddings.
    pub zero_embeddings: bool,
    pub projection: usize,
}

/// The model of the tests (see the module doc).
pub const MODEL: Variant = Variant {
    patch: 64,
    hidden: 512,
    gain: 1.0,
    zero_embeddings: true,
    projection: 256,
};

pub fn dims(v: Variant) -> ClipDims {
    ClipDims {
        text_config: TextConfig {
            vocab_size: 8,
            hidden_size: 16,
            intermediate_size: 32,
            num_attention_heads: 2,
            num_hidden_layers: 1,
            max_position_embeddings: 8,
            eos_token_id: 7,
            hidden_act: Activation::QuickGelu,
        },
        vision_config: VisionConfig {
            hidden_size: v.hidden,
            intermediate_size: 2 * v.hidden,
            num_attention_heads: 4,
            num_hidden_layers: 1,
            image_size: RES as usize,
            patch_size: v.patch,
            num_channels: 3,
            hidden_act: Activation::QuickGelu,
        },
        projection_dim: v.projection,
    }
}

/// A word-level tokenizer whose post-processor wraps a caption in start (6) and end (7).
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 1));
    }
    vocab.insert("<|startoftext|>".into(), json!(6));
    vocab.insert("<|endoftext|>".into(), json!(7));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let st = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(6, "<|startoftext|>"), special(7, "<|endoftext|>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [st("<|startoftext|>"), seq("A"), st("<|endoftext|>")],
            "pair": [st("<|startoftext|>"), seq("A"), seq("B"), st("<|endoftext|>")],
            "special_tokens": {
                "<|startoftext|>": {"id": "<|startoftext|>", "ids": [6], "tokens": ["<|startoftext|>"]},
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [7], "tokens": ["<|endoftext|>"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

/// Writes the test's CLIP as a Hugging Face directory (weights from `seed`).
pub fn write_model(dir: &Path, seed: u64, v: Variant) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let d = dims(v);
    hf::write_config(&dir.join("config.json"), &d, hf::DEFAULT_LOGIT_SCALE_INIT).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let pre = json!({
        "crop_size": {"height": RES, "width": RES}, "do_center_crop": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true, "resample": 3,
        "rescale_factor": 1.0 / 255.0, "size": {"shortest_edge": RES}
    });
    std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();
    let m = Clip::new(d).unwrap();
    let mut w = m.init_params(seed, hf::DEFAULT_LOGIT_SCALE_INIT);
    for spec in m.table().specs() {
        let embedding = spec.name.ends_with("class_embedding")
            || spec
                .name
                .ends_with("vision_model.embeddings.position_embedding.weight");
        if embedding && v.zero_embeddings {
            w[spec.range()].fill(0.0);
        } else if spec.shape.len() >= 2 {
            w[spec.range()].iter_mut().for_each(|x| *x *= v.gain);
        }
    }
    write_tensors(&dir.join("model.safetensors"), &entries(m.table(), "", &w)).unwrap();
    dir.to_path_buf()
}

/// A smooth random colour field: an 8×8 grid of random colours, upsampled to RES.
pub fn field(rng: &mut ChaCha8Rng) -> image::RgbImage {
    let small = image::RgbImage::from_fn(8, 8, |_, _| image::Rgb(rng.random::<[u8; 3]>()));
    image::imageops::resize(&small, RES, RES, image::imageops::FilterType::Triangle)
}

/// The kinds of planted copy.
pub const KINDS: [&str; 5] = ["exact", "resized", "jpeg", "colour", "crop"];

pub fn edit(img: &image::RgbImage, kind: &str) -> image::RgbImage {
    use image::imageops::{crop_imm, resize, FilterType};
    match kind {
        "exact" => img.clone(),
        "resized" => resize(
            &resize(img, 40, 40, FilterType::CatmullRom),
            RES,
            RES,
            FilterType::CatmullRom,
        ),
        "jpeg" => {
            let mut bytes = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 70)
                .encode_image(img)
                .unwrap();
            image::load_from_memory(&bytes).unwrap().to_rgb8()
        }
        "colour" => image::RgbImage::from_fn(RES, RES, |x, y| {
            let p = img.get_pixel(x, y);
            image::Rgb([p[0].saturating_add(10), p[1], p[2].saturating_sub(8)])
        }),
        "crop" => resize(
            &crop_imm(img, 4, 4, RES - 8, RES - 8).to_image(),
            RES,
            RES,
            FilterType::CatmullRom,
        ),
        other => panic!("no edit {other}"),
    }
}

/// Writes `images` into shards of `per_shard` records under `dir` (`<prefix>-NNNNN.tis`).
pub fn write_shards(dir: &Path, prefix: &str, images: &[image::RgbImage], per_shard: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, group) in images.chunks(per_shard).enumerate() {
        let path = dir.join(format!("{prefix}-{k:05}.tis"));
        let mut w = ImageShardWriter::create(&path, RES, 4, 3).unwrap();
        for (i, img) in group.iter().enumerate() {
            w.push(img.as_raw(), &format!("a random colour field {i}"), None)
                .unwrap();
        }
        w.finish().unwrap();
    }
}

/// The image vectors of an embeddings folder, shard by shard, as f32 rows.
pub fn vectors(dir: &Path) -> Vec<Vec<f32>> {
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for e in m["shards"].as_array().unwrap() {
        let bytes = std::fs::read(dir.join(e["file"].as_str().unwrap())).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("image").unwrap();
        let d = t.shape()[1];
        let v: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        out.extend(v.chunks_exact(d).map(<[f32]>::to_vec));
    }
    out
}

pub fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `embed --model M --images DIR/*.tis --out OUT [extra]`.
pub fn embed(model: &Path, shards: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let images = format!("{}/*.tis", shards.display());
    let mut args = vec![
        "embed",
        "--model",
        s(model),
        "--images",
        &images,
        "--out",
        s(out),
        "--quiet",
        "--batch",
        "8",
    ];
    args.extend_from_slice(extra);
    data_prep(&args)
}
