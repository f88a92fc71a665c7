//! A tiny CLIP in Hugging Face's layout, written by a test: `config.json` with the usual extra
//! fields, `model.safetensors` with random weights and the `position_ids` buffer, a word-level
//! `tokenizer.json` and `preprocessor_config.json` (8×8 pictures).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;
use trainer::checkpoint::{entries, TensorEntry};
use trainer::model::clip::hf;
use trainer::model::clip::Clip;

pub const WORDS: [&str; 14] = [
    "a", "photo", "of", "cat", "dog", "red", "blue", "square", "circle", "on", "the", "green",
    "big", "small",
];
pub const START: u32 = 18;
pub const END: u32 = 19;

/// config.json as Hugging Face publishes it: the sizes, plus fields that do not change the model.
pub fn config(eos_token_id: u32, text_act: &str, vision_act: &str) -> Value {
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "projection_dim": 6,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": 20,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "max_position_embeddings": 7,
            "hidden_act": text_act,
            "layer_norm_eps": 1e-5,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "bos_token_id": START,
            "eos_token_id": eos_token_id,
            "pad_token_id": 1,
            "projection_dim": 6
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 12,
            "intermediate_size": 20,
            "num_attention_heads": 3,
            "num_hidden_layers": 2,
            "image_size": 8,
            "patch_size": 4,
            "num_channels": 3,
            "hidden_act": vision_act,
            "layer_norm_eps": 1e-5,
            "initializer_range": 0.02
        }
    })
}

/// A word-level tokenizer whose post-processor wraps a caption in the start and end tokens.
pub fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert((*w).into(), json!(i + 1));
    }
    vocab.insert("<|startoftext|>".into(), json!(START));
    vocab.insert("<|endoftext|>".into(), json!(END));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let st = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    let seq = |s: &str| json!({"Sequence": {"id": s, "type_id": 0}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(START, "<|startoftext|>"), special(END, "<|endoftext|>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [st("<|startoftext|>"), seq("A"), st("<|endoftext|>")],
            "pair": [st("<|startoftext|>"), seq("A"), seq("B"), st("<|endoftext|>")],
            "special_tokens": {
                "<|startoftext|>": {"id": "<|startoftext|>", "ids": [START], "tokens": ["<|startoftext|>"]},
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [END], "tokens": ["<|endoftext|>"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
}

pub fn preprocessor_json() -> Value {
    json!({
        "crop_size": {"height": 8, "width": 8},
        "do_center_crop": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 8}
    })
}

/// A safetensors file of f32 tensors plus extra raw tensors (dtype, shape, bytes).
pub fn write_safetensors(
    path: &Path,
    f32s: &[TensorEntry],
    raw: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
) {
    let bytes: Vec<Vec<u8>> = f32s
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views: Vec<(String, TensorView)> = f32s
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name.clone(),
                TensorView::new(Dtype::F32, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    for (name, dtype, shape, b) in raw {
        views.push((
            name.to_string(),
            TensorView::new(*dtype, shape.clone(), b).unwrap(),
        ));
    }
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// Writes a tiny CLIP directory with random weights into `dir`; returns the weights.
pub fn write_dir(dir: &Path, config: &Value, seed: u64) -> Vec<f32> {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        dir.join("preprocessor_config.json"),
        preprocessor_json().to_string(),
    )
    .unwrap();
    let (dims, _) = hf::read_config(&dir.join("config.json")).unwrap();
    let model = Clip::new(dims).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w: Vec<f32> = (0..model.table().numel())
        .map(|_| rng.random_range(-0.4f32..0.4))
        .collect();
    for spec in model.table().specs() {
        if spec.name.ends_with("norm.weight")
            || spec.name.ends_with("norm1.weight")
            || spec.name.ends_with("norm2.weight")
            || spec.name.ends_with("layrnorm.weight")
        {
            w[spec.range()].iter_mut().for_each(|x| *x += 1.0);
        }
    }
    let ls = model.table().find("logit_scale").unwrap().offset;
    w[ls] = 2.0;
    let pos_ids: Vec<u8> = (0..7i64).flat_map(|v| v.to_le_bytes()).collect();
    write_safetensors(
        &dir.join("model.safetensors"),
        &entries(model.table(), "", &w),
        &[(
            "text_model.embeddings.position_ids",
            Dtype::I64,
            vec![1, 7],
            pos_ids,
        )],
    );
    w
}
