//! The contrastive model of docs/model.md §3: Hugging Face's `CLIPModel`, forward and backward on
//! the CPU, with Hugging Face's parameter names.
//!
//! Dimension letters: B batch, S text positions, Np = (image_size/P)² patches, T = S or Np + 1
//! the sequence of a tower, C a tower's width, I its MLP width, NH heads, D `projection_dim`.
//! Parameters live in one flat buffer laid out by [`Clip::table`]; activations in
//! [`Activations`], sized for one batch size and text length.
//!
//! Both towers are the same pre-LN encoder ([`Encoder`]); the text tower's attention is causal,
//! the vision tower's unmasked. Within a layer the table stores `q_proj`, `k_proj`, `v_proj`
//! weights next to each other, then their three biases, so that the three projections are one
//! `[3C, C]` product whose output is the interleaved `qkv` that `kernels`' attention reads
//! (`kernels::dense_attention`, with a causal or an all-ones mask). The loaded file's tensor
//! order does not matter: tensors are matched by name ([`hf`]).
//!
//! [`Products`]: every linear layer's product in f32 (the default, and what training uses) or,
//! for inference, with its operands rounded to bfloat16 and f32 sums (`kernels::bf16`: twice the
//! multiply rate on CPUs with AVX512-BF16; everything else stays f32).
//!
//! `logit_scale` enters the forward pass as it is (Hugging Face's `CLIPModel` does not clamp it);
//! training clamps the parameter into [0, ln 100] after every update ([`Clip::clamp_logit_scale`]),
//! as OpenAI's CLIP did.

pub mod device;
pub mod hf;
pub mod ops;

use crate::model::scale_add;
pub use crate::model::Products;
use crate::params::{ParamKind, ParamTable};
use kernels::cross_entropy::cross_entropy_fused;
use kernels::dense_attention::DenseAttention;
use kernels::device::Cpu;
use kernels::layernorm::{layernorm_backward, layernorm_forward};
use kernels::linear::{linear_backward, matmul, MatRef};
pub use ops::Activation;
use std::ops::Range;

/// The largest `logit_scale` training keeps: ln 100, so logits are at most 100·cos.
pub const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// The sizes of one tower's encoder (taken from [`TextConfig`] or [`VisionConfig`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TowerDims {
    /// C.
    pub hidden: usize,
    /// I.
    pub intermediate: usize,
    /// NH.
    pub heads: usize,
    /// L.
    pub layers: usize,
    pub act: Activation,
}

/// The text tower's sizes, Hugging Face's `text_config` (the fields and names of its
/// `config.json`, which `model:` of a Tessera config repeats under `text_config:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: usize,
    /// C.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// NH.
    pub num_attention_heads: usize,
    /// L.
    pub num_hidden_layers: usize,
    /// The longest text.
    pub max_position_embeddings: usize,
    /// Where text is pooled (see [`ops::end_positions`]).
    pub eos_token_id: u32,
    pub hidden_act: Activation,
}

/// The vision tower's sizes, Hugging Face's `vision_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// C.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// NH.
    pub num_attention_heads: usize,
    /// L.
    pub num_hidden_layers: usize,
    /// Side of the square input image.
    pub image_size: usize,
    /// P.
    pub patch_size: usize,
    /// Input channels. Default 3.
    #[serde(default = "three")]
    pub num_channels: usize,
    pub hidden_act: Activation,
}

fn three() -> usize {
    3
}

impl TextConfig {
    pub fn tower(&self) -> TowerDims {
        TowerDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            act: self.hidden_act,
        }
    }
}

impl VisionConfig {
    pub fn tower(&self) -> TowerDims {
        TowerDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            act: self.hidden_act,
        }
    }
}

/// The sizes that define a CLIP model: Hugging Face's `CLIPConfig` fields, nested as in its
/// `config.json`. This is also the `model:` section of a `model.kind: clip` run config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipDims {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    /// D.
    pub projection_dim: usize,
}

impl ClipDims {
    /// The one range check of the sizes (the config's `model:` section, a Hugging Face
    /// `config.json` and [`Clip::new`] all use it): the field at fault, with what is wrong, every
    /// field named with `prefix`.
    pub fn check(&self, prefix: &str) -> std::result::Result<(), (String, String)> {
        let err = |field: &str, what: String| Err((format!("{prefix}{field}"), what));
        let (t, v) = (&self.text_config, &self.vision_config);
        for (field, value) in [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.num_channels", v.num_channels),
            ("projection_dim", self.projection_dim),
        ] {
            if value == 0 {
                return err(field, format!("{prefix}{field} = 0 must be ≥ 1"));
            }
        }
        for (tower, c, nh) in [
            ("text_config", t.hidden_size, t.num_attention_heads),
            ("vision_config", v.hidden_size, v.num_attention_heads),
        ] {
            if !c.is_multiple_of(nh) {
                return err(
                    &format!("{tower}.hidden_size"),
                    format!(
                        "{prefix}{tower}.hidden_size = {c} must be divisible by \
                         {prefix}{tower}.num_attention_heads = {nh}"
                    ),
                );
            }
        }
        if v.image_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return err(
                "vision_config.image_size",
                format!(
                    "{prefix}vision_config.image_size = {} must be a positive multiple of \
                     {prefix}vision_config.patch_size = {}",
                    v.image_size, v.patch_size
                ),
            );
        }
        if t.eos_token_id as usize >= t.vocab_size {
            return err(
                "text_config.eos_token_id",
                format!(
                    "{prefix}text_config.eos_token_id = {} must be below \
                     {prefix}text_config.vocab_size = {}",
                    t.eos_token_id, t.vocab_size
                ),
            );
        }
        Ok(())
    }

    /// Np, the patches of one image.
    pub fn num_patches(&self) -> usize {
        let g = self.vision_config.image_size / self.vision_config.patch_size;
        g * g
    }
}

/// Errors of building or running CLIP.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("invalid CLIP sizes: {0}")]
    Dims(String),
    #[error("invalid CLIP input: {0}")]
    Input(String),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, ClipError>;

/// Ranges in the flat buffer of one encoder layer's tensors.
#[derive(Clone, Debug)]
struct LayerParams {
    ln1_w: Range<usize>,
    ln1_b: Range<usize>,
    /// `q_proj`, `k_proj`, `v_proj` weights, contiguous: [3C, C].
    qkv_w: Range<usize>,
    /// Their biases, contiguous: [3C].
    qkv_b: Range<usize>,
    out_w: Range<usize>,
    out_b: Range<usize>,
    ln2_w: Range<usize>,
    ln2_b: Range<usize>,
    fc1_w: Range<usize>,
    fc1_b: Range<usize>,
    fc2_w: Range<usize>,
    fc2_b: Range<usize>,
}

/// One tower's stack of pre-LN encoder layers (Hugging Face's `CLIPEncoder`).
#[derive(Clone, Debug)]
struct Encoder {
    dims: TowerDims,
    layers: Vec<LayerParams>,
    causal: bool,
}

/// Ranges of the tensors outside the encoders.
#[derive(Clone, Debug)]
struct Globals {
    token_emb: Range<usize>,
    text_pos: Range<usize>,
    final_ln_w: Range<usize>,
    final_ln_b: Range<usize>,
    class_emb: Range<usize>,
    patch_w: Range<usize>,
    vision_pos: Range<usize>,
    pre_ln_w: Range<usize>,
    pre_ln_b: Range<usize>,
    post_ln_w: Range<usize>,
    post_ln_b: Range<usize>,
    visual_proj: Range<usize>,
    text_proj: Range<usize>,
    logit_scale: usize,
}

/// The model definition: sizes and parameter layout. Holds no weights.
#[derive(Clone, Debug)]
pub struct Clip {
    dims: ClipDims,
    table: ParamTable,
    g: Globals,
    text: Encoder,
    vision: Encoder,
    products: Products,
}

/// Two disjoint mutable ranges of `buf`, `a` before `b`.
fn two_mut(buf: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "two_mut expects ordered, disjoint ranges");
    let (lo, hi) = buf.split_at_mut(b.start);
    (&mut lo[a], &mut hi[..b.end - b.start])
}

impl Clip {
    pub fn new(dims: ClipDims) -> Result<Self> {
        dims.check("").map_err(|(_, m)| ClipError::Dims(m))?;
        let mut t = ParamTable::new();
        let push = |t: &mut ParamTable, name: String, shape: &[usize], kind| {
            let i = t.push(name, shape, kind);
            t.spec(i).range()
        };
        let (ct, cv) = (dims.text_config.hidden_size, dims.vision_config.hidden_size);
        let token_emb = push(
            &mut t,
            "text_model.embeddings.token_embedding.weight".into(),
            &[dims.text_config.vocab_size, ct],
            ParamKind::Embedding,
        );
        let text_pos = push(
            &mut t,
            "text_model.embeddings.position_embedding.weight".into(),
            &[dims.text_config.max_position_embeddings, ct],
            ParamKind::Embedding,
        );
        let text = Encoder::build(&mut t, "text_model", dims.text_config.tower(), true);
        let final_ln_w = push(
            &mut t,
            "text_model.final_layer_norm.weight".into(),
            &[ct],
            ParamKind::Gain,
        );
        let final_ln_b = push(
            &mut t,
            "text_model.final_layer_norm.bias".into(),
            &[ct],
            ParamKind::Bias,
        );
        let class_emb = push(
            &mut t,
            "vision_model.embeddings.class_embedding".into(),
            &[cv],
            ParamKind::Embedding,
        );
        let p = dims.vision_config.patch_size;
        let patch_w = push(
            &mut t,
            "vision_model.embeddings.patch_embedding.weight".into(),
            &[cv, dims.vision_config.num_channels, p, p],
            ParamKind::Matrix,
        );
        let vision_pos = push(
            &mut t,
            "vision_model.embeddings.position_embedding.weight".into(),
            &[dims.num_patches() + 1, cv],
            ParamKind::Embedding,
        );
        let pre_ln_w = push(
            &mut t,
            "vision_model.pre_layrnorm.weight".into(),
            &[cv],
            ParamKind::Gain,
        );
        let pre_ln_b = push(
            &mut t,
            "vision_model.pre_layrnorm.bias".into(),
            &[cv],
            ParamKind::Bias,
        );
        let vision = Encoder::build(&mut t, "vision_model", dims.vision_config.tower(), false);
        let post_ln_w = push(
            &mut t,
            "vision_model.post_layernorm.weight".into(),
            &[cv],
            ParamKind::Gain,
        );
        let post_ln_b = push(
            &mut t,
            "vision_model.post_layernorm.bias".into(),
            &[cv],
            ParamKind::Bias,
        );
        let visual_proj = push(
            &mut t,
            "visual_projection.weight".into(),
            &[dims.projection_dim, cv],
            ParamKind::Matrix,
        );
        let text_proj = push(
            &mut t,
            "text_projection.weight".into(),
            &[dims.projection_dim, ct],
            ParamKind::Matrix,
        );
        let logit_scale = push(&mut t, "logit_scale".into(), &[], ParamKind::Bias).start;
        Ok(Clip {
            dims,
            table: t,
            g: Globals {
                token_emb,
                text_pos,
                final_ln_w,
                final_ln_b,
                class_emb,
                patch_w,
                vision_pos,
                pre_ln_w,
                pre_ln_b,
                post_ln_w,
                post_ln_b,
                visual_proj,
                text_proj,
                logit_scale,
            },
            text,
            vision,
            products: Products::Fp32,
        })
    }

    pub fn dims(&self) -> &ClipDims {
        &self.dims
    }

    /// The forward pass's products from now on ([`Products::Fp32`] until set).
    pub fn set_products(&mut self, products: Products) {
        self.products = products;
    }

    pub fn products(&self) -> Products {
        self.products
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Fresh weights, deterministic in `seed`: [`crate::model::init`]'s scheme (the residual
    /// output projections `out_proj` and `fc2` scaled by 1/sqrt(2L) of their tower), and
    /// `logit_scale` = `logit_scale_init` (Hugging Face's `logit_scale_init_value`, ln(1/0.07)
    /// by default).
    pub fn init_params(&self, seed: u64, logit_scale_init: f32) -> Vec<f32> {
        let mut buf = vec![0.0; self.table.numel()];
        let (lt, lv) = (
            self.dims.text_config.num_hidden_layers as f32,
            self.dims.vision_config.num_hidden_layers as f32,
        );
        super::init::init_params(&self.table, &mut buf, seed, |name| {
            let residual =
                name.ends_with("self_attn.out_proj.weight") || name.ends_with("mlp.fc2.weight");
            match (residual, name.starts_with("text_model.")) {
                (false, _) => 1.0,
                (true, true) => 1.0 / (2.0 * lt).sqrt(),
                (true, false) => 1.0 / (2.0 * lv).sqrt(),
            }
        });
        buf[self.g.logit_scale] = logit_scale_init;
        buf
    }

    /// Clamps `logit_scale` into [0, ln 100] in place (after an optimizer step).
    pub fn clamp_logit_scale(&self, params: &mut [f32]) {
        let s = &mut params[self.g.logit_scale];
        *s = s.clamp(0.0, MAX_LOGIT_SCALE);
    }

    /// The current `logit_scale` parameter.
    pub fn logit_scale(&self, params: &[f32]) -> f32 {
        params[self.g.logit_scale]
    }

    fn check_params(&self, len: usize) -> Result<()> {
        if len != self.table.numel() {
            return Err(ClipError::Dims(format!(
                "parameter buffer has {len} elements, the model needs {}",
                self.table.numel()
            )));
        }
        Ok(())
    }

    /// Checks a batch's shapes and ids: `input_ids` [B, S] below `vocab_size`, each row holding
    /// the end token; `pixel_values` [B, ch, image_size, image_size].
    pub fn check_batch(&self, acts: &Activations, input_ids: &[u32], pixels: &[f32]) -> Result<()> {
        let d = &self.dims;
        let (b, s) = (acts.batch, acts.text_len);
        if input_ids.len() != b * s {
            return Err(ClipError::Input(format!(
                "input_ids has {} ids, expected B {b} × S {s}",
                input_ids.len()
            )));
        }
        if let Some(i) = input_ids
            .iter()
            .position(|&v| v as usize >= d.text_config.vocab_size)
        {
            return Err(ClipError::Input(format!(
                "input_ids[{}, {}] = {} is not below text_config.vocab_size = {}",
                i / s,
                i % s,
                input_ids[i],
                d.text_config.vocab_size
            )));
        }
        let px = b
            * d.vision_config.num_channels
            * d.vision_config.image_size
            * d.vision_config.image_size;
        if pixels.len() != px {
            return Err(ClipError::Input(format!(
                "pixel_values has {} values, expected B {b} × {} × {} × {}",
                pixels.len(),
                d.vision_config.num_channels,
                d.vision_config.image_size,
                d.vision_config.image_size
            )));
        }
        Ok(())
    }

    /// The vision tower: `acts.image_embeds` [B, D] (normalised) from `pixels`
    /// [B, ch, image_size, image_size] (already normalised by the preprocessor).
    pub fn image_forward(
        &self,
        params: &[f32],
        acts: &mut Activations,
        pixels: &[f32],
    ) -> Result<()> {
        self.check_params(params.len())?;
        let d = &self.dims;
        let g = &self.g;
        let (b, cv, np) = (acts.batch, d.vision_config.hidden_size, d.num_patches());
        let t = np + 1;
        let row =
            d.vision_config.num_channels * d.vision_config.patch_size * d.vision_config.patch_size;
        let px = b
            * d.vision_config.num_channels
            * d.vision_config.image_size
            * d.vision_config.image_size;
        if pixels.len() != px {
            return Err(ClipError::Input(format!(
                "pixel_values has {} values, expected B {b} × {} × {} × {}",
                pixels.len(),
                d.vision_config.num_channels,
                d.vision_config.image_size,
                d.vision_config.image_size
            )));
        }
        let v = &mut acts.vision;
        ops::patches(
            &mut v.patches,
            pixels,
            b,
            d.vision_config.num_channels,
            d.vision_config.image_size,
            d.vision_config.patch_size,
        );
        self.products.linear(
            &mut v.patch_out,
            &v.patches,
            &params[g.patch_w.clone()],
            None,
            b * np,
            row,
            cv,
        )?;
        let (class, pos) = (&params[g.class_emb.clone()], &params[g.vision_pos.clone()]);
        for bi in 0..b {
            let e = &mut v.emb[bi * t * cv..(bi + 1) * t * cv];
            e[..cv].copy_from_slice(class);
            e[cv..].copy_from_slice(&v.patch_out[bi * np * cv..(bi + 1) * np * cv]);
            scale_add(e, 1.0, pos);
        }
        layernorm_forward(
            &mut v.enc.residual[0],
            &mut v.pre_mean,
            &mut v.pre_rstd,
            &v.emb,
            &params[g.pre_ln_w.clone()],
            &params[g.pre_ln_b.clone()],
            b * t,
            cv,
        )?;
        self.vision.forward(params, &mut v.enc, self.products)?;
        self.vision_head().forward(
            &mut v.head,
            &mut acts.image_embeds,
            params,
            &v.enc.residual[d.vision_config.num_hidden_layers],
            &vec![0; b],
            t,
        )
    }

    /// The text tower's head: `final_layer_norm`, `text_projection`.
    fn text_head(&self) -> Head {
        Head {
            ln_w: self.g.final_ln_w.clone(),
            ln_b: self.g.final_ln_b.clone(),
            proj: self.g.text_proj.clone(),
            c: self.dims.text_config.hidden_size,
            dp: self.dims.projection_dim,
            products: self.products,
        }
    }

    /// The vision tower's head: `post_layernorm`, `visual_projection`.
    fn vision_head(&self) -> Head {
        Head {
            ln_w: self.g.post_ln_w.clone(),
            ln_b: self.g.post_ln_b.clone(),
            proj: self.g.visual_proj.clone(),
            c: self.dims.vision_config.hidden_size,
            dp: self.dims.projection_dim,
            products: self.products,
        }
    }

    /// The text tower: `acts.text_embeds` [B, D] (normalised) from `input_ids` [B, S].
    pub fn text_forward(
        &self,
        params: &[f32],
        acts: &mut Activations,
        input_ids: &[u32],
    ) -> Result<()> {
        self.check_params(params.len())?;
        let d = &self.dims;
        let g = &self.g;
        let (b, s, ct) = (acts.batch, acts.text_len, d.text_config.hidden_size);
        if let Some(i) = input_ids
            .iter()
            .position(|&v| v as usize >= d.text_config.vocab_size)
        {
            return Err(ClipError::Input(format!(
                "input_ids[{}, {}] = {} is not below text_config.vocab_size = {}",
                i / s,
                i % s,
                input_ids[i],
                d.text_config.vocab_size
            )));
        }
        if input_ids.len() != b * s {
            return Err(ClipError::Input(format!(
                "input_ids has {} ids, expected B {b} × S {s}",
                input_ids.len()
            )));
        }
        let tx = &mut acts.text;
        tx.ids.copy_from_slice(input_ids);
        tx.end = ops::end_positions(input_ids, s, d.text_config.eos_token_id)
            .map_err(ClipError::Input)?;
        let (tok, pos) = (&params[g.token_emb.clone()], &params[g.text_pos.clone()]);
        for (i, (x, &id)) in tx.enc.residual[0]
            .chunks_exact_mut(ct)
            .zip(input_ids)
            .enumerate()
        {
            let (id, p) = (id as usize, i % s);
            for ((x, &e), &q) in x
                .iter_mut()
                .zip(&tok[id * ct..(id + 1) * ct])
                .zip(&pos[p * ct..(p + 1) * ct])
            {
                *x = e + q;
            }
        }
        self.text.forward(params, &mut tx.enc, self.products)?;
        self.text_head().forward(
            &mut tx.head,
            &mut acts.text_embeds,
            params,
            &tx.enc.residual[d.text_config.num_hidden_layers],
            &tx.end,
            s,
        )
    }

    /// Both towers, the logits and the symmetric InfoNCE loss: the mean over the batch of the
    /// cross-entropy of each caption against the images (`logits_per_text` rows, target its own
    /// image) and of each image against the captions, halved. Returns the loss; the logits are in
    /// `acts.logits_per_image` / `acts.logits_per_text`.
    pub fn forward(
        &self,
        params: &[f32],
        acts: &mut Activations,
        input_ids: &[u32],
        pixels: &[f32],
    ) -> Result<f32> {
        self.check_batch(acts, input_ids, pixels)?;
        self.image_forward(params, acts, pixels)?;
        self.text_forward(params, acts, input_ids)?;
        let (b, dp) = (acts.batch, self.dims.projection_dim);
        let scale = params[self.g.logit_scale].exp();
        // logits_per_text[i, j] = scale · text_i · image_j.
        matmul(
            &mut acts.logits_per_text,
            MatRef::new(&acts.text_embeds, b, dp),
            MatRef::new(&acts.image_embeds, b, dp).t(),
            false,
        )?;
        acts.logits_per_text.iter_mut().for_each(|x| *x *= scale);
        for i in 0..b {
            for j in 0..b {
                acts.logits_per_image[j * b + i] = acts.logits_per_text[i * b + j];
            }
        }
        // The fused cross-entropy leaves each direction's gradient, already scaled by ½·1/B.
        let targets: Vec<u32> = (0..b as u32).collect();
        let half = 0.5 / b as f32;
        let (mut lt, mut li) = (vec![0.0f32; b], vec![0.0f32; b]);
        acts.dlogits_text.copy_from_slice(&acts.logits_per_text);
        cross_entropy_fused(&mut acts.dlogits_text, &mut lt, &targets, half, b, b)?;
        acts.dlogits_image.copy_from_slice(&acts.logits_per_image);
        cross_entropy_fused(&mut acts.dlogits_image, &mut li, &targets, half, b, b)?;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / b as f64;
        acts.loss = (0.5 * (mean(&lt) + mean(&li))) as f32;
        Ok(acts.loss)
    }

    /// The gradient of the last [`Self::forward`]'s loss, added into `grads` (laid out by
    /// [`Self::table`]).
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
    ) -> Result<()> {
        self.check_params(params.len())?;
        self.check_params(grads.len())?;
        let d = &self.dims;
        let g = &self.g;
        let (b, dp) = (acts.batch, d.projection_dim);
        let scale = params[g.logit_scale].exp();
        // dL/dlogits_per_text, both directions; d logit_scale = Σ dlogits ∘ logits.
        let mut dl = vec![0.0f32; b * b];
        let mut dscale = 0.0f64;
        for i in 0..b {
            for j in 0..b {
                let v = acts.dlogits_text[i * b + j] + acts.dlogits_image[j * b + i];
                dl[i * b + j] = v * scale;
                dscale += v as f64 * acts.logits_per_text[i * b + j] as f64;
            }
        }
        grads[g.logit_scale] += dscale as f32;
        // cos = te·ieᵀ: dte = dcos·ie, die = dcosᵀ·te.
        let mut dte = vec![0.0f32; b * dp];
        let mut die = vec![0.0f32; b * dp];
        matmul(
            &mut dte,
            MatRef::new(&dl, b, b),
            MatRef::new(&acts.image_embeds, b, dp),
            false,
        )?;
        matmul(
            &mut die,
            MatRef::new(&dl, b, b).t(),
            MatRef::new(&acts.text_embeds, b, dp),
            false,
        )?;

        // Text tower.
        let (s, ct) = (acts.text_len, d.text_config.hidden_size);
        let tx = &mut acts.text;
        self.text_head().backward(
            &tx.head,
            &mut tx.enc.dres,
            grads,
            params,
            &dte,
            &acts.text_embeds,
            &tx.end,
            s,
        )?;
        self.text.backward(params, grads, &mut tx.enc)?;
        // Embeddings: d token_embedding[id] += dx, d position_embedding[p] += Σ_b dx.
        for (i, dx) in tx.enc.dres.chunks_exact(ct).enumerate() {
            let id = tx.ids[i] as usize;
            let p = i % s;
            scale_add(
                &mut grads[g.token_emb.start + id * ct..g.token_emb.start + (id + 1) * ct],
                1.0,
                dx,
            );
            scale_add(
                &mut grads[g.text_pos.start + p * ct..g.text_pos.start + (p + 1) * ct],
                1.0,
                dx,
            );
        }

        // Vision tower.
        let (cv, np) = (d.vision_config.hidden_size, d.num_patches());
        let t = np + 1;
        let v = &mut acts.vision;
        self.vision_head().backward(
            &v.head,
            &mut v.enc.dres,
            grads,
            params,
            &die,
            &acts.image_embeds,
            &vec![0; b],
            t,
        )?;
        self.vision.backward(params, grads, &mut v.enc)?;
        let mut demb = vec![0.0f32; b * t * cv];
        {
            let (dw, db) = two_mut(grads, g.pre_ln_w.clone(), g.pre_ln_b.clone());
            layernorm_backward(
                &mut demb,
                dw,
                db,
                &v.enc.dres,
                &v.emb,
                &params[g.pre_ln_w.clone()],
                &v.pre_mean,
                &v.pre_rstd,
                b * t,
                cv,
            )?;
        }
        let mut dpatch_out = vec![0.0f32; b * np * cv];
        for bi in 0..b {
            let e = &demb[bi * t * cv..(bi + 1) * t * cv];
            scale_add(&mut grads[g.class_emb.clone()], 1.0, &e[..cv]);
            scale_add(&mut grads[g.vision_pos.clone()], 1.0, e);
            dpatch_out[bi * np * cv..(bi + 1) * np * cv].copy_from_slice(&e[cv..]);
        }
        let row =
            d.vision_config.num_channels * d.vision_config.patch_size * d.vision_config.patch_size;
        linear_backward(
            None,
            &mut grads[g.patch_w.clone()],
            None,
            &dpatch_out,
            &v.patches,
            &params[g.patch_w.clone()],
            b * np,
            row,
            cv,
        )?;
        Ok(())
    }
}

impl Encoder {
    /// Pushes the tensors of `dims.layers` layers named `{prefix}.encoder.layers.{l}.…`.
    fn build(t: &mut ParamTable, prefix: &str, dims: TowerDims, causal: bool) -> Encoder {
        let (c, i) = (dims.hidden, dims.intermediate);
        let layers = (0..dims.layers)
            .map(|l| {
                let mut push = |s: &str, shape: &[usize], kind| {
                    let idx = t.push(format!("{prefix}.encoder.layers.{l}.{s}"), shape, kind);
                    t.spec(idx).range()
                };
                let ln1_w = push("layer_norm1.weight", &[c], ParamKind::Gain);
                let ln1_b = push("layer_norm1.bias", &[c], ParamKind::Bias);
                let q_w = push("self_attn.q_proj.weight", &[c, c], ParamKind::Matrix);
                push("self_attn.k_proj.weight", &[c, c], ParamKind::Matrix);
                let v_w = push("self_attn.v_proj.weight", &[c, c], ParamKind::Matrix);
                let q_b = push("self_attn.q_proj.bias", &[c], ParamKind::Bias);
                push("self_attn.k_proj.bias", &[c], ParamKind::Bias);
                let v_b = push("self_attn.v_proj.bias", &[c], ParamKind::Bias);
                LayerParams {
                    ln1_w,
                    ln1_b,
                    qkv_w: q_w.start..v_w.end,
                    qkv_b: q_b.start..v_b.end,
                    out_w: push("self_attn.out_proj.weight", &[c, c], ParamKind::Matrix),
                    out_b: push("self_attn.out_proj.bias", &[c], ParamKind::Bias),
                    ln2_w: push("layer_norm2.weight", &[c], ParamKind::Gain),
                    ln2_b: push("layer_norm2.bias", &[c], ParamKind::Bias),
                    fc1_w: push("mlp.fc1.weight", &[i, c], ParamKind::Matrix),
                    fc1_b: push("mlp.fc1.bias", &[i], ParamKind::Bias),
                    fc2_w: push("mlp.fc2.weight", &[c, i], ParamKind::Matrix),
                    fc2_b: push("mlp.fc2.bias", &[c], ParamKind::Bias),
                }
            })
            .collect();
        Encoder {
            dims,
            layers,
            causal,
        }
    }

    /// `acts.residual[L]` from `acts.residual[0]`, saving what the backward pass reads.
    fn forward(&self, params: &[f32], acts: &mut EncoderActs, products: Products) -> Result<()> {
        let (n, c, i) = (acts.b * acts.t, self.dims.hidden, self.dims.intermediate);
        let p = |r: &Range<usize>| &params[r.clone()];
        for (l, lp) in self.layers.iter().enumerate() {
            let (done, rest) = acts.residual.split_at_mut(l + 1);
            let (x, x_next) = (&done[l], &mut rest[0]);
            let la = &mut acts.layers[l];
            layernorm_forward(
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                x,
                p(&lp.ln1_w),
                p(&lp.ln1_b),
                n,
                c,
            )?;
            products.linear(
                &mut la.qkv,
                &la.ln1,
                p(&lp.qkv_w),
                Some(p(&lp.qkv_b)),
                n,
                c,
                3 * c,
            )?;
            acts.attn[l].forward(&Cpu, &mut la.att, &la.qkv)?;
            products.linear(
                &mut la.x_mid,
                &la.att,
                p(&lp.out_w),
                Some(p(&lp.out_b)),
                n,
                c,
                c,
            )?;
            scale_add(&mut la.x_mid, 1.0, x);
            layernorm_forward(
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                &la.x_mid,
                p(&lp.ln2_w),
                p(&lp.ln2_b),
                n,
                c,
            )?;
            products.linear(
                &mut la.h,
                &la.ln2,
                p(&lp.fc1_w),
                Some(p(&lp.fc1_b)),
                n,
                c,
                i,
            )?;
            self.dims.act.forward(&mut la.a, &la.h)?;
            products.linear(x_next, &la.a, p(&lp.fc2_w), Some(p(&lp.fc2_b)), n, i, c)?;
            scale_add(x_next, 1.0, &la.x_mid);
        }
        Ok(())
    }

    /// With `acts.dres` holding d(residual[L]): adds the layers' parameter gradients into `grads`
    /// and leaves d(residual[0]) in `acts.dres`.
    fn backward(&self, params: &[f32], grads: &mut [f32], acts: &mut EncoderActs) -> Result<()> {
        let (n, c, i) = (acts.b * acts.t, self.dims.hidden, self.dims.intermediate);
        let p = |r: &Range<usize>| &params[r.clone()];
        let s = &mut acts.scratch;
        for (l, lp) in self.layers.iter().enumerate().rev() {
            let la = &acts.layers[l];
            // x_next = x_mid + fc2(act(fc1(ln2(x_mid)))).
            let (dw, db) = two_mut(grads, lp.fc2_w.clone(), lp.fc2_b.clone());
            linear_backward(
                Some(&mut s.da),
                dw,
                Some(db),
                &acts.dres,
                &la.a,
                p(&lp.fc2_w),
                n,
                i,
                c,
            )?;
            self.dims.act.backward(&mut s.dh, &s.da, &la.h)?;
            let (dw, db) = two_mut(grads, lp.fc1_w.clone(), lp.fc1_b.clone());
            linear_backward(
                Some(&mut s.dln),
                dw,
                Some(db),
                &s.dh,
                &la.ln2,
                p(&lp.fc1_w),
                n,
                c,
                i,
            )?;
            let (dw, db) = two_mut(grads, lp.ln2_w.clone(), lp.ln2_b.clone());
            layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &s.dln,
                &la.x_mid,
                p(&lp.ln2_w),
                &la.ln2_mean,
                &la.ln2_rstd,
                n,
                c,
            )?;
            // x_mid = x + out_proj(attn(qkv(ln1(x)))).
            let (dw, db) = two_mut(grads, lp.out_w.clone(), lp.out_b.clone());
            linear_backward(
                Some(&mut s.datt),
                dw,
                Some(db),
                &acts.dres,
                &la.att,
                p(&lp.out_w),
                n,
                c,
                c,
            )?;
            acts.attn[l].backward(&Cpu, &mut s.dqkv, &s.datt, &la.qkv)?;
            let (dw, db) = two_mut(grads, lp.qkv_w.clone(), lp.qkv_b.clone());
            linear_backward(
                Some(&mut s.dln),
                dw,
                Some(db),
                &s.dqkv,
                &la.ln1,
                p(&lp.qkv_w),
                n,
                c,
                3 * c,
            )?;
            let (dw, db) = two_mut(grads, lp.ln1_w.clone(), lp.ln1_b.clone());
            layernorm_backward(
                &mut acts.dres,
                dw,
                db,
                &s.dln,
                &acts.residual[l],
                p(&lp.ln1_w),
                &la.ln1_mean,
                &la.ln1_rstd,
                n,
                c,
            )?;
        }
        Ok(())
    }
}

/// Per-layer saved activations of an encoder.
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    /// fc1's output (the activation's input) and the activation's output, [N, I].
    h: Vec<f32>,
    a: Vec<f32>,
}

/// Activation-gradient scratch of an encoder's backward pass.
struct EncoderScratch {
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    dh: Vec<f32>,
    da: Vec<f32>,
}

/// One encoder's activations for `b` sequences of `t` positions.
struct EncoderActs {
    b: usize,
    t: usize,
    /// residual[l] is the input of layer l, residual[L] the encoder's output. [B, T, C] each.
    residual: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    /// One dense attention per layer (it keeps the probabilities for the backward pass).
    attn: Vec<DenseAttention<Cpu, f32>>,
    /// The residual stream's gradient, [B, T, C].
    dres: Vec<f32>,
    scratch: EncoderScratch,
}

/// A tower's attention mask over `t` positions as `kernels::dense_attention::mask_words` lays
/// it out: every key (vision) or the keys up to the query (text, `causal`).
fn attention_mask(t: usize, causal: bool) -> Vec<u32> {
    let words = t.div_ceil(32);
    let mut mask = vec![0u32; t * words];
    for p in 0..t {
        for q in 0..t {
            if !causal || q <= p {
                mask[p * words + q / 32] |= 1 << (q % 32);
            }
        }
    }
    mask
}

impl EncoderActs {
    fn new(enc: &Encoder, b: usize, t: usize) -> Result<Self> {
        let (d, causal) = (&enc.dims, enc.causal);
        let (n, c, i) = (b * t, d.hidden, d.intermediate);
        let z = |k: usize| vec![0.0f32; k];
        let mask = attention_mask(t, causal);
        let attn = (0..d.layers)
            .map(|_| DenseAttention::with_mask(&Cpu, &mask, t, b, d.heads, c / d.heads))
            .collect::<kernels::Result<Vec<_>>>()?;
        Ok(EncoderActs {
            b,
            t,
            residual: (0..=d.layers).map(|_| z(n * c)).collect(),
            layers: (0..d.layers)
                .map(|_| LayerActs {
                    ln1: z(n * c),
                    ln1_mean: z(n),
                    ln1_rstd: z(n),
                    qkv: z(n * 3 * c),
                    att: z(n * c),
                    x_mid: z(n * c),
                    ln2: z(n * c),
                    ln2_mean: z(n),
                    ln2_rstd: z(n),
                    h: z(n * i),
                    a: z(n * i),
                })
                .collect(),
            attn,
            dres: z(n * c),
            scratch: EncoderScratch {
                dln: z(n * c),
                dqkv: z(n * 3 * c),
                datt: z(n * c),
                dh: z(n * i),
                da: z(n * i),
            },
        })
    }
}

/// The text tower's activations beyond its encoder.
struct TextActs {
    enc: EncoderActs,
    ids: Vec<u32>,
    /// The pooled position of each row.
    end: Vec<usize>,
    head: HeadActs,
}

/// The vision tower's activations beyond its encoder.
struct VisionActs {
    enc: EncoderActs,
    patches: Vec<f32>,
    patch_out: Vec<f32>,
    /// Embeddings before `pre_layrnorm`, [B, Np+1, C].
    emb: Vec<f32>,
    pre_mean: Vec<f32>,
    pre_rstd: Vec<f32>,
    head: HeadActs,
}

/// A tower's head (one pooled row per pair: its layer norm, the projection, the L2
/// normalisation), what the backward pass reads.
struct HeadActs {
    pooled_in: Vec<f32>,
    pooled: Vec<f32>,
    post_mean: Vec<f32>,
    post_rstd: Vec<f32>,
    proj: Vec<f32>,
    norms: Vec<f32>,
}

impl HeadActs {
    fn new(batch: usize, c: usize, dp: usize) -> Self {
        let z = |k: usize| vec![0.0f32; k];
        HeadActs {
            pooled_in: z(batch * c),
            pooled: z(batch * c),
            post_mean: z(batch),
            post_rstd: z(batch),
            proj: z(batch * dp),
            norms: z(batch),
        }
    }
}

/// The head both towers share: pool one row per pair (the end token, the class token), layer
/// norm (`final_layer_norm` / `post_layernorm`), bias-free projection to D, L2 normalisation.
struct Head {
    ln_w: Range<usize>,
    ln_b: Range<usize>,
    proj: Range<usize>,
    /// The tower's width C and the projection's D.
    c: usize,
    dp: usize,
    products: Products,
}

impl Head {
    /// `embeds` [B, D] from the last residual [B, T, C], pooled at `pos[b]` of each row.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        h: &mut HeadActs,
        embeds: &mut [f32],
        params: &[f32],
        last: &[f32],
        pos: &[usize],
        t: usize,
    ) -> Result<()> {
        let b = pos.len();
        ops::pool_rows(&mut h.pooled_in, last, pos, t, self.c);
        layernorm_forward(
            &mut h.pooled,
            &mut h.post_mean,
            &mut h.post_rstd,
            &h.pooled_in,
            &params[self.ln_w.clone()],
            &params[self.ln_b.clone()],
            b,
            self.c,
        )?;
        self.products.linear(
            &mut h.proj,
            &h.pooled,
            &params[self.proj.clone()],
            None,
            b,
            self.c,
            self.dp,
        )?;
        ops::normalize_rows(embeds, &mut h.norms, &h.proj, self.dp);
        Ok(())
    }

    /// From d`embeds`: adds the head's parameter gradients into `grads` and writes
    /// d(last residual) into `dres` (zero but at the pooled rows).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        h: &HeadActs,
        dres: &mut [f32],
        grads: &mut [f32],
        params: &[f32],
        dembeds: &[f32],
        embeds: &[f32],
        pos: &[usize],
        t: usize,
    ) -> Result<()> {
        let (b, c, dp) = (pos.len(), self.c, self.dp);
        let mut dproj = vec![0.0f32; b * dp];
        ops::normalize_rows_backward(&mut dproj, dembeds, embeds, &h.norms, dp);
        let mut dpooled = vec![0.0f32; b * c];
        linear_backward(
            Some(&mut dpooled),
            &mut grads[self.proj.clone()],
            None,
            &dproj,
            &h.pooled,
            &params[self.proj.clone()],
            b,
            c,
            dp,
        )?;
        let mut dpooled_in = vec![0.0f32; b * c];
        let (dw, db) = two_mut(grads, self.ln_w.clone(), self.ln_b.clone());
        layernorm_backward(
            &mut dpooled_in,
            dw,
            db,
            &dpooled,
            &h.pooled_in,
            &params[self.ln_w.clone()],
            &h.post_mean,
            &h.post_rstd,
            b,
            c,
        )?;
        ops::unpool_rows(dres, &dpooled_in, pos, t, c);
        Ok(())
    }
}

/// Everything the forward pass keeps for the backward pass, for B pairs of S text positions.
pub struct Activations {
    batch: usize,
    text_len: usize,
    text: TextActs,
    vision: VisionActs,
    /// [B, D], normalised.
    pub text_embeds: Vec<f32>,
    /// [B, D], normalised.
    pub image_embeds: Vec<f32>,
    /// [B, B]: row i is image i against every caption.
    pub logits_per_image: Vec<f32>,
    /// [B, B]: row i is caption i against every image (the transpose).
    pub logits_per_text: Vec<f32>,
    /// The two directions' loss gradients (½·1/B·(softmax − onehot)), each in its own rows.
    dlogits_text: Vec<f32>,
    dlogits_image: Vec<f32>,
    pub loss: f32,
}

impl Activations {
    /// Buffers for `batch` pairs of `text_len` positions (1 ..= `max_position_embeddings`).
    pub fn new(model: &Clip, batch: usize, text_len: usize) -> Result<Self> {
        let d = &model.dims;
        if text_len == 0 || text_len > d.text_config.max_position_embeddings {
            return Err(ClipError::Input(format!(
                "text length {text_len} must be in 1 ..= text_config.max_position_embeddings = {}",
                d.text_config.max_position_embeddings
            )));
        }
        if batch == 0 {
            return Err(ClipError::Input("batch size 0".into()));
        }
        let z = |k: usize| vec![0.0f32; k];
        let (ct, cv, dp, np) = (
            d.text_config.hidden_size,
            d.vision_config.hidden_size,
            d.projection_dim,
            d.num_patches(),
        );
        let row =
            d.vision_config.num_channels * d.vision_config.patch_size * d.vision_config.patch_size;
        Ok(Activations {
            batch,
            text_len,
            text: TextActs {
                enc: EncoderActs::new(&model.text, batch, text_len)?,
                ids: vec![0; batch * text_len],
                end: vec![0; batch],
                head: HeadActs::new(batch, ct, dp),
            },
            vision: VisionActs {
                enc: EncoderActs::new(&model.vision, batch, np + 1)?,
                patches: z(batch * np * row),
                patch_out: z(batch * np * cv),
                emb: z(batch * (np + 1) * cv),
                pre_mean: z(batch * (np + 1)),
                pre_rstd: z(batch * (np + 1)),
                head: HeadActs::new(batch, cv, dp),
            },
            text_embeds: z(batch * dp),
            image_embeds: z(batch * dp),
            logits_per_image: z(batch * batch),
            logits_per_text: z(batch * batch),
            dlogits_text: z(batch * batch),
            dlogits_image: z(batch * batch),
            loss: 0.0,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn text_len(&self) -> usize {
        self.text_len
    }
}

#[cfg(test)]
mod tests;
