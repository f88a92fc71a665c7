//! A Hugging Face CLIP directory, read as it is published (docs/model.md §3):
//!
//! - `config.json`: the sizes ([`read_config`]; Hugging Face's documented defaults for absent
//!   fields, `text_config_dict` / `vision_config_dict` applied over `text_config` / `vision_config`
//!   as `CLIPConfig` does; a field that would change the model and that Tessera does not
//!   implement, or one it does not know, is an error naming it);
//! - `model.safetensors`: every tensor of [`Clip::table`] by name, f32, f16 or bf16, shape
//!   checked ([`read_weights`]; the `position_ids` buffers some files carry are skipped, any
//!   other extra tensor is an error naming it);
//! - `tokenizer.json`: through the `tokenizers` crate ([`ClipTokenizer`]): the file's own
//!   normaliser, pre-tokeniser and post-processor (which adds the start and end tokens),
//!   truncation to the context keeping the end token, padding with the end token;
//! - `preprocessor_config.json` ([`Preprocessor`]): bicubic resize of the short side to
//!   `size.shortest_edge`, centre crop to `crop_size`, rescale, the config's mean and std.
//!
//! [`write_config`] writes the `config.json` of a model that `trainer init-weights` creates.

use super::{Activation, Clip, ClipDims, TextConfig, VisionConfig};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Errors of reading a Hugging Face CLIP directory; each names the file and the field or tensor.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn file_err(path: &Path, message: impl Into<String>) -> HfError {
    HfError::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

pub type Result<T> = std::result::Result<T, HfError>;

/// Hugging Face's default `logit_scale_init_value`, ln(1/0.07).
pub const DEFAULT_LOGIT_SCALE_INIT: f32 = 2.6592;

/// OpenAI's CLIP image statistics per RGB channel, Hugging Face's defaults for CLIP: what a
/// preprocessor config without `image_mean`/`image_std` and a Tessera-trained CLIP normalise by.
pub const IMAGE_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const IMAGE_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Fields of a (sub-)config that every Hugging Face `PretrainedConfig` carries and that do not
/// change CLIP's forward pass (generation settings, bookkeeping, initialisation and dropout,
/// which Tessera does not apply: its training has no dropout).
const IGNORED: &[&str] = &[
    "_attn_implementation_autoset",
    "_commit_hash",
    "_name_or_path",
    "add_cross_attention",
    "architectures",
    "attention_dropout",
    "bad_words_ids",
    "begin_suppress_tokens",
    "bos_token_id",
    "chunk_size_feed_forward",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "diversity_penalty",
    "do_sample",
    "dropout",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "finetuning_task",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "id2label",
    "initializer_factor",
    "initializer_range",
    "is_decoder",
    "is_encoder_decoder",
    "label2id",
    "length_penalty",
    "max_length",
    "min_length",
    "model_type",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "pad_token_id",
    "prefix",
    "problem_type",
    "pruned_heads",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict",
    "return_dict_in_generate",
    "sep_token_id",
    "suppress_tokens",
    "task_specific_params",
    "temperature",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "top_k",
    "top_p",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "typical_p",
    "use_bfloat16",
];

/// One JSON object of the config with the fields read from it, so that the rest can be checked.
struct Section<'a> {
    path: &'a Path,
    name: &'static str,
    obj: Map<String, Value>,
    read: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn field(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    fn usize(&mut self, key: &'static str, default: usize) -> Result<usize> {
        self.read.push(key);
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                file_err(
                    self.path,
                    format!("`{}` = {v} is not a non-negative integer", self.field(key)),
                )
            }),
        }
    }

    fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        self.read.push(key);
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                file_err(
                    self.path,
                    format!("`{}` = {v} is not a number", self.field(key)),
                )
            }),
        }
    }

    fn act(&mut self, default: Activation) -> Result<Activation> {
        self.read.push("hidden_act");
        match self.obj.get("hidden_act") {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Activation::from_hf(s).ok_or_else(|| {
                file_err(
                    self.path,
                    format!(
                        "`{}` = \"{s}\" is not supported (Tessera has quick_gelu, gelu, \
                         gelu_new, gelu_pytorch_tanh)",
                        self.field("hidden_act")
                    ),
                )
            }),
            Some(v) => Err(file_err(
                self.path,
                format!("`{}` = {v} is not a string", self.field("hidden_act")),
            )),
        }
    }

    /// The fields that must hold the value Tessera implements, then any field nobody read.
    fn finish(mut self) -> Result<()> {
        let eps = self.f64("layer_norm_eps", 1e-5)?;
        if (eps - 1e-5).abs() > 1e-12 {
            return Err(file_err(
                self.path,
                format!(
                    "`{}` = {eps}: Tessera's layer norm uses 1e-5",
                    self.field("layer_norm_eps")
                ),
            ));
        }
        let mut keys: Vec<&String> = self.obj.keys().collect();
        keys.sort();
        for key in keys {
            if !self.read.contains(&key.as_str()) && !IGNORED.contains(&key.as_str()) {
                return Err(file_err(
                    self.path,
                    format!(
                        "unknown field `{}`: Tessera cannot tell whether it changes the model",
                        self.field(key)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A sub-config object (`text_config`), with `<name>_dict` applied over it as Hugging Face does.
fn sub_config<'a>(
    path: &'a Path,
    top: &mut Section<'a>,
    name: &'static str,
    dict: &'static str,
) -> Result<Section<'a>> {
    top.read.push(name);
    top.read.push(dict);
    let mut obj = Map::new();
    for key in [name, dict] {
        match top.obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => obj.extend(o.clone()),
            Some(v) => {
                return Err(file_err(path, format!("`{key}` = {v} is not an object")));
            }
        }
    }
    Ok(Section {
        path,
        name,
        obj,
        read: Vec::new(),
    })
}

/// The sizes and `logit_scale_init_value` of a Hugging Face `config.json`.
pub fn read_config(path: &Path) -> Result<(ClipDims, f32)> {
    let bytes = std::fs::read(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let obj = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err(file_err(path, "not a JSON object")),
        Err(e) => return Err(file_err(path, format!("not valid JSON: {e}"))),
    };
    let mut top = Section {
        path,
        name: "",
        obj,
        read: Vec::new(),
    };
    let mut text = sub_config(path, &mut top, "text_config", "text_config_dict")?;
    let mut vision = sub_config(path, &mut top, "vision_config", "vision_config_dict")?;
    let projection_dim = top.usize("projection_dim", 512)?;
    let logit_scale_init = top.f64("logit_scale_init_value", DEFAULT_LOGIT_SCALE_INIT as f64)?;
    // Old configs repeat projection_dim in each tower; the top-level one is the one used.
    text.read.push("projection_dim");
    vision.read.push("projection_dim");
    let eos = text.usize("eos_token_id", 2)?;
    let dims = ClipDims {
        text_config: TextConfig {
            vocab_size: text.usize("vocab_size", 49408)?,
            hidden_size: text.usize("hidden_size", 512)?,
            intermediate_size: text.usize("intermediate_size", 2048)?,
            num_attention_heads: text.usize("num_attention_heads", 8)?,
            num_hidden_layers: text.usize("num_hidden_layers", 12)?,
            max_position_embeddings: text.usize("max_position_embeddings", 77)?,
            eos_token_id: u32::try_from(eos).map_err(|_| {
                file_err(
                    path,
                    format!("`text_config.eos_token_id` = {eos} is too large"),
                )
            })?,
            hidden_act: text.act(Activation::QuickGelu)?,
        },
        vision_config: VisionConfig {
            hidden_size: vision.usize("hidden_size", 768)?,
            intermediate_size: vision.usize("intermediate_size", 3072)?,
            num_attention_heads: vision.usize("num_attention_heads", 12)?,
            num_hidden_layers: vision.usize("num_hidden_layers", 12)?,
            image_size: vision.usize("image_size", 224)?,
            patch_size: vision.usize("patch_size", 32)?,
            num_channels: vision.usize("num_channels", 3)?,
            hidden_act: vision.act(Activation::QuickGelu)?,
        },
        projection_dim,
    };
    text.finish()?;
    vision.finish()?;
    top.finish()?;
    dims.check("").map_err(|(_, m)| file_err(path, m))?;
    Ok((dims, logit_scale_init as f32))
}

/// The `config.json` Hugging Face's `CLIPModel.from_pretrained` reads for `dims`.
pub fn write_config(path: &Path, dims: &ClipDims, logit_scale_init: f32) -> Result<()> {
    let mut text = serde_json::to_value(dims.text_config).expect("serialisable");
    text["model_type"] = json!("clip_text_model");
    text["layer_norm_eps"] = json!(1e-5);
    let mut vision = serde_json::to_value(dims.vision_config).expect("serialisable");
    vision["model_type"] = json!("clip_vision_model");
    vision["layer_norm_eps"] = json!(1e-5);
    let config = json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": dims.projection_dim,
        "logit_scale_init_value": logit_scale_init,
        "text_config": text,
        "vision_config": vision,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise") + "\n";
    std::fs::write(path, text).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The weights of `model` from a Hugging Face `model.safetensors` (f32, f16 or bf16).
pub fn read_weights(path: &Path, model: &Clip) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
    let table = model.table();
    let mut names: Vec<&str> = st.names();
    names.sort();
    for name in &names {
        if table.find(name).is_none() && !name.ends_with(".position_ids") {
            return Err(file_err(
                path,
                format!("unexpected tensor `{name}`: not a parameter of this CLIP configuration"),
            ));
        }
    }
    let mut params = vec![0.0f32; table.numel()];
    for spec in table.specs() {
        let t = st.tensor(&spec.name).map_err(|_| {
            file_err(
                path,
                format!("missing tensor `{}` (shape {:?})", spec.name, spec.shape),
            )
        })?;
        let scalar_as_one = spec.shape.is_empty() && t.shape() == [1];
        if t.shape() != spec.shape.as_slice() && !scalar_as_one {
            return Err(file_err(
                path,
                format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    spec.name,
                    t.shape(),
                    spec.shape
                ),
            ));
        }
        let dst = &mut params[spec.range()];
        let data = t.data();
        match t.dtype() {
            Dtype::F32 => {
                for (d, b) in dst.iter_mut().zip(data.chunks_exact(4)) {
                    *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                }
            }
            Dtype::F16 => {
                for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                    *d = f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32();
                }
            }
            Dtype::BF16 => {
                for (d, b) in dst.iter_mut().zip(data.chunks_exact(2)) {
                    *d = bf16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32();
                }
            }
            other => {
                return Err(file_err(
                    path,
                    format!(
                        "tensor `{}` has dtype {other:?}; expected F32, F16 or BF16",
                        spec.name
                    ),
                ))
            }
        }
    }
    Ok(params)
}

/// CLIP's tokenisation: the directory's `tokenizer.json`, its start and end tokens, truncation
/// to the context (the end token kept) and padding to it with the end token.
pub struct ClipTokenizer {
    tok: tokenizers::Tokenizer,
    context: usize,
    /// The tokens the file's post-processor puts around a caption.
    pub start_id: u32,
    pub end_id: u32,
}

impl ClipTokenizer {
    /// Reads `path`, for captions of `context` positions (`max_position_embeddings`).
    pub fn from_file(path: &Path, context: usize) -> Result<Self> {
        let mut tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| file_err(path, format!("not a tokenizers file: {e}")))?;
        let empty = tok
            .encode("", true)
            .map_err(|e| file_err(path, format!("cannot encode an empty caption: {e}")))?;
        let ids = empty.get_ids();
        if ids.len() != 2 {
            return Err(file_err(
                path,
                format!(
                    "its post-processor wraps an empty caption in {} tokens ({ids:?}); CLIP \
                     needs a start and an end token",
                    ids.len()
                ),
            ));
        }
        if context < 2 {
            return Err(file_err(
                path,
                format!("context {context} holds no caption"),
            ));
        }
        let (start_id, end_id) = (ids[0], ids[1]);
        let end_token = tok.id_to_token(end_id).unwrap_or_default();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: context,
            ..Default::default()
        }))
        .map_err(|e| file_err(path, format!("cannot truncate to {context}: {e}")))?;
        tok.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(context),
            pad_id: end_id,
            pad_token: end_token,
            ..Default::default()
        }));
        Ok(ClipTokenizer {
            tok,
            context,
            start_id,
            end_id,
        })
    }

    /// The `context` ids of one caption: start token, the caption's tokens (as many as fit),
    /// end token, then end tokens as padding.
    pub fn encode(&self, caption: &str) -> std::result::Result<Vec<u32>, String> {
        let enc = self
            .tok
            .encode(caption, true)
            .map_err(|e| format!("cannot tokenise {caption:?}: {e}"))?;
        let ids = enc.get_ids().to_vec();
        debug_assert_eq!(ids.len(), self.context);
        Ok(ids)
    }

    pub fn context(&self) -> usize {
        self.context
    }
}

/// CLIP's image preprocessing from `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    /// The short side after resizing (`size.shortest_edge`), `None` when `do_resize` is false.
    pub shortest_edge: Option<u32>,
    /// (height, width) of the centre crop (`crop_size`), `None` when `do_center_crop` is false.
    pub crop: Option<(u32, u32)>,
    /// `rescale_factor` (1/255), 1 when `do_rescale` is false.
    pub rescale: f32,
    /// `image_mean` and `image_std`, `None` when `do_normalize` is false.
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl Preprocessor {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| HfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| file_err(path, format!("not valid JSON: {e}")))?;
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(true);
        // A size is an integer (old files) or an object with the given keys.
        let size = |k: &str, keys: &[&str]| -> Result<Vec<u32>> {
            let bad = || file_err(path, format!("`{k}` = {} is not a size", v[k]));
            match v.get(k) {
                Some(Value::Number(n)) => {
                    let n = n.as_u64().ok_or_else(bad)? as u32;
                    Ok(vec![n; keys.len()])
                }
                Some(Value::Object(o)) => keys
                    .iter()
                    .map(|key| {
                        o.get(*key)
                            .and_then(Value::as_u64)
                            .map(|n| n as u32)
                            .ok_or_else(|| file_err(path, format!("`{k}.{key}` is missing")))
                    })
                    .collect(),
                _ => Err(file_err(path, format!("`{k}` is missing"))),
            }
        };
        if let Some(r) = v.get("resample") {
            if r.as_u64() != Some(3) {
                return Err(file_err(
                    path,
                    format!("`resample` = {r}: Tessera resizes bicubically (3) only"),
                ));
            }
        }
        let shortest_edge = if flag("do_resize") {
            Some(size("size", &["shortest_edge"])?[0])
        } else {
            None
        };
        let crop = if flag("do_center_crop") {
            let c = size("crop_size", &["height", "width"])?;
            Some((c[0], c[1]))
        } else {
            None
        };
        let rescale = if flag("do_rescale") {
            v.get("rescale_factor")
                .map(|r| {
                    r.as_f64().ok_or_else(|| {
                        file_err(path, format!("`rescale_factor` = {r} is not a number"))
                    })
                })
                .transpose()?
                .unwrap_or(1.0 / 255.0) as f32
        } else {
            1.0
        };
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None => Ok(default),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([0, 1, 2].map(|i| a[i].as_f64().expect("a number") as f32))
                }
                Some(x) => Err(file_err(path, format!("`{k}` = {x} is not three numbers"))),
            }
        };
        let mean_std = if flag("do_normalize") {
            // OpenAI's CLIP statistics, Hugging Face's defaults for CLIP.
            let mean = triple("image_mean", IMAGE_MEAN)?;
            let std = triple("image_std", IMAGE_STD)?;
            if let Some(i) = std.iter().position(|&s| s <= 0.0) {
                return Err(file_err(
                    path,
                    format!("`image_std[{i}]` = {} must be > 0", std[i]),
                ));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Preprocessor {
            shortest_edge,
            crop,
            rescale,
            mean_std,
        })
    }

    /// `pixel_values` [3, H, W] of one RGB image: resize (bicubic, Catmull–Rom, on 8-bit values
    /// as PIL does; the short side to `shortest_edge`, the long side scaled and truncated), centre
    /// crop (offsets rounded down), rescale, normalise.
    pub fn apply(
        &self,
        img: &image::RgbImage,
    ) -> std::result::Result<(Vec<f32>, u32, u32), String> {
        let (w, h) = img.dimensions();
        let resized;
        let img = match self.shortest_edge {
            Some(s) => {
                let (nw, nh) = if w <= h {
                    (s, (s as u64 * h as u64 / w.max(1) as u64) as u32)
                } else {
                    ((s as u64 * w as u64 / h.max(1) as u64) as u32, s)
                };
                resized =
                    image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
                &resized
            }
            None => img,
        };
        let (w, h) = img.dimensions();
        let (ch, cw, top, left) = match self.crop {
            Some((ch, cw)) => {
                if ch > h || cw > w {
                    return Err(format!(
                        "a {w}×{h} image is smaller than the {cw}×{ch} crop"
                    ));
                }
                (ch, cw, (h - ch) / 2, (w - cw) / 2)
            }
            None => (h, w, 0, 0),
        };
        let mut out = vec![0.0f32; 3 * (ch * cw) as usize];
        let plane = (ch * cw) as usize;
        for y in 0..ch {
            for x in 0..cw {
                let p = img.get_pixel(left + x, top + y);
                for c in 0..3 {
                    let mut v = p[c] as f32 * self.rescale;
                    if let Some((mean, std)) = &self.mean_std {
                        v = (v - mean[c]) / std[c];
                    }
                    out[c * plane + (y * cw + x) as usize] = v;
                }
            }
        }
        Ok((out, ch, cw))
    }
}

/// A Hugging Face CLIP directory, loaded.
pub struct HfClip {
    pub model: Clip,
    pub params: Vec<f32>,
    pub logit_scale_init: f32,
    pub tokenizer: ClipTokenizer,
    pub preprocessor: Preprocessor,
}

/// Loads `dir`'s `config.json`, `model.safetensors`, `tokenizer.json` and
/// `preprocessor_config.json`.
pub fn load_dir(dir: &Path) -> Result<HfClip> {
    let (dims, logit_scale_init) = read_config(&dir.join("config.json"))?;
    let model = Clip::new(dims).map_err(|e| file_err(&dir.join("config.json"), e.to_string()))?;
    let params = read_weights(&dir.join("model.safetensors"), &model)?;
    let tokenizer = ClipTokenizer::from_file(
        &dir.join("tokenizer.json"),
        dims.text_config.max_position_embeddings,
    )?;
    let preprocessor = Preprocessor::from_file(&dir.join("preprocessor_config.json"))?;
    Ok(HfClip {
        model,
        params,
        logit_scale_init,
        tokenizer,
        preprocessor,
    })
}
