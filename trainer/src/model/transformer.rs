//! The stage-2 sparse transformer of docs/model.md §1, with explicit forward and backward passes.
//!
//! Dimension letters: B batch, T = Tt + G² sequence, C = d_model, NH heads, HS = C/NH, L layers.
//! Parameters live in one flat buffer laid out by [`Transformer::table`] (docs/model.md names, in the
//! spec's order); activations in [`Activations`], sized for one batch size.
//!
//! The output head is applied per vocabulary segment: the text rows of `head.weight` only to the
//! positions that predict text (0..Tt−1), the image rows only to those that predict image tokens
//! (Tt−1..T−1). The loss never needs the other logits, so training never computes them; the full
//! logits tensor of docs/model.md §4 comes from [`Transformer::full_logits`].

use crate::model::mixed::{BlockScales, Precision, ScaleScratch};
use crate::model::scale_add;
use crate::params::{pair_mut, ParamKind, ParamTable};
use kernels::attention::{self, BlockLayout, MaskKind};
use kernels::cross_entropy::{cross_entropy_forward, cross_entropy_fused};
use kernels::embedding::{self, EmbedDims, EmbedGrads, EmbedTables};
use kernels::gelu::{gelu_backward, gelu_forward};
use kernels::gradscale::GradScaler;
use kernels::layernorm::{layernorm_backward, layernorm_forward};
use kernels::linear::{linear_backward, linear_forward};
use std::ops::Range;
use std::sync::Arc;

/// Weight of the text loss; the image loss gets 1 − TEXT_LOSS_WEIGHT (the paper's 1/8 and 7/8).
pub const TEXT_LOSS_WEIGHT: f32 = 1.0 / 8.0;

/// The sizes that define the model (docs/model.md §1), and the `model:` section of a run config
/// with `model.kind: transformer` (`config::ModelConfig::Transformer`): one struct for both, one
/// range check ([`TransformerDims::check`]). Every field but `conv_kernel` is required.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerDims {
    /// Caption length Tt in BPE tokens, padding included. ≥ 2 (the text loss scores positions
    /// 0 … Tt−2).
    pub text_len: usize,
    /// Text BPE vocabulary size Vt (padding ids Vt..Vt+Tt come on top). ≥ 2.
    pub text_vocab: usize,
    /// Side G of the image token grid; the image has G² tokens. ≥ 1.
    pub grid: usize,
    /// Image codebook size Vi (the dVAE's vocabulary). ≥ 2.
    pub image_vocab: usize,
    /// Residual width C = d_model. ≥ 1 and divisible by `heads`.
    pub d_model: usize,
    /// Attention heads NH; head size C/NH. ≥ 1.
    pub heads: usize,
    /// Number of residual blocks L. ≥ 1.
    pub layers: usize,
    /// Side of the convolutional attention mask of the last layer, in grid cells. Odd, ≥ 1.
    /// Default 11.
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: usize,
}

fn default_conv_kernel() -> usize {
    11
}

impl TransformerDims {
    /// The one range check of the sizes (the config's validation and [`Transformer::new`] both
    /// use it): the field at fault, with what is wrong, every field named with `prefix`
    /// (`"model."` for the config).
    pub fn check(&self, prefix: &str) -> std::result::Result<(), (String, String)> {
        // Tt ≥ 2: the text loss scores positions 0 … Tt−2.
        for (field, value, min) in [
            ("text_len", self.text_len, 2),
            ("text_vocab", self.text_vocab, 2),
            ("grid", self.grid, 1),
            ("image_vocab", self.image_vocab, 2),
            ("d_model", self.d_model, 1),
            ("heads", self.heads, 1),
            ("layers", self.layers, 1),
        ] {
            if value < min {
                let field = format!("{prefix}{field}");
                return Err((field.clone(), format!("{field} = {value} must be ≥ {min}")));
            }
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return Err((
                format!("{prefix}d_model"),
                format!(
                    "{prefix}d_model = {} must be divisible by {prefix}heads = {}",
                    self.d_model, self.heads
                ),
            ));
        }
        if self.conv_kernel.is_multiple_of(2) {
            return Err((
                format!("{prefix}conv_kernel"),
                format!(
                    "{prefix}conv_kernel = {} must be odd and ≥ 1",
                    self.conv_kernel
                ),
            ));
        }
        Ok(())
    }

    /// T = Tt + G².
    pub fn seq_len(&self) -> usize {
        self.text_len + self.image_tokens()
    }
    /// Image tokens G².
    pub fn image_tokens(&self) -> usize {
        self.grid * self.grid
    }
    /// Rows of the text embedding and of the text segment of the head: Vt + Tt.
    pub fn text_rows(&self) -> usize {
        self.text_vocab + self.text_len
    }
    /// Width of the full logits: Vt + Tt + Vi.
    pub fn vocab_total(&self) -> usize {
        self.text_rows() + self.image_vocab
    }
    /// Head size HS = C/NH.
    pub fn head_size(&self) -> usize {
        self.d_model / self.heads
    }
}

/// Errors of building or running the transformer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model sizes: {0}")]
    Dims(String),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Indices into the parameter table of one block's tensors.
#[derive(Clone, Copy, Debug)]
struct BlockParams {
    ln1_w: usize,
    ln1_b: usize,
    qkv_w: usize,
    qkv_b: usize,
    attn_proj_w: usize,
    attn_proj_b: usize,
    ln2_w: usize,
    ln2_b: usize,
    fc_w: usize,
    fc_b: usize,
    mlp_proj_w: usize,
    mlp_proj_b: usize,
}

/// Indices of the non-block tensors.
#[derive(Clone, Copy, Debug)]
struct GlobalParams {
    text_emb: usize,
    text_pos: usize,
    image_emb: usize,
    image_row: usize,
    image_col: usize,
    lnf_w: usize,
    lnf_b: usize,
    head: usize,
}

/// The model definition: sizes, parameter layout and the attention layouts. Holds no weights.
#[derive(Clone, Debug)]
pub struct Transformer {
    dims: TransformerDims,
    table: ParamTable,
    globals: GlobalParams,
    blocks: Vec<BlockParams>,
    /// One layout per layer (shared between layers of the same kind).
    layouts: Vec<Arc<BlockLayout>>,
    /// What the activations and activation gradients are rounded to (docs: model/mixed.rs).
    precision: Precision,
}

impl Transformer {
    pub fn new(dims: TransformerDims) -> Result<Self> {
        let d = dims;
        d.check("")
            .map_err(|(_, message)| ModelError::Dims(message))?;
        let c = d.d_model;
        let mut t = ParamTable::new();
        let globals_head = (
            t.push("text_emb.weight", &[d.text_rows(), c], ParamKind::Embedding),
            t.push("text_pos.weight", &[d.text_len, c], ParamKind::Embedding),
            t.push(
                "image_emb.weight",
                &[d.image_vocab, c],
                ParamKind::Embedding,
            ),
            t.push("image_row.weight", &[d.grid, c], ParamKind::Embedding),
            t.push("image_col.weight", &[d.grid, c], ParamKind::Embedding),
        );
        let mut blocks = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let p = |s: &str| format!("blocks.{l}.{s}");
            blocks.push(BlockParams {
                ln1_w: t.push(p("ln_1.weight"), &[c], ParamKind::Gain),
                ln1_b: t.push(p("ln_1.bias"), &[c], ParamKind::Bias),
                qkv_w: t.push(p("attn.qkv.weight"), &[3 * c, c], ParamKind::Matrix),
                qkv_b: t.push(p("attn.qkv.bias"), &[3 * c], ParamKind::Bias),
                attn_proj_w: t.push(p("attn.proj.weight"), &[c, c], ParamKind::Matrix),
                attn_proj_b: t.push(p("attn.proj.bias"), &[c], ParamKind::Bias),
                ln2_w: t.push(p("ln_2.weight"), &[c], ParamKind::Gain),
                ln2_b: t.push(p("ln_2.bias"), &[c], ParamKind::Bias),
                fc_w: t.push(p("mlp.fc.weight"), &[4 * c, c], ParamKind::Matrix),
                fc_b: t.push(p("mlp.fc.bias"), &[4 * c], ParamKind::Bias),
                mlp_proj_w: t.push(p("mlp.proj.weight"), &[c, 4 * c], ParamKind::Matrix),
                mlp_proj_b: t.push(p("mlp.proj.bias"), &[c], ParamKind::Bias),
            });
        }
        let globals = GlobalParams {
            text_emb: globals_head.0,
            text_pos: globals_head.1,
            image_emb: globals_head.2,
            image_row: globals_head.3,
            image_col: globals_head.4,
            lnf_w: t.push("ln_f.weight", &[c], ParamKind::Gain),
            lnf_b: t.push("ln_f.bias", &[c], ParamKind::Bias),
            head: t.push("head.weight", &[d.vocab_total(), c], ParamKind::Unembedding),
        };
        let mut by_kind: Vec<(MaskKind, Arc<BlockLayout>)> = Vec::new();
        let mut layouts = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let kind = attention::layer_mask_kind(l, d.layers, d.conv_kernel);
            let layout = match by_kind.iter().find(|(k, _)| *k == kind) {
                Some((_, lay)) => lay.clone(),
                None => {
                    let lay = Arc::new(BlockLayout::new(
                        d.text_len,
                        d.grid,
                        kind,
                        attention::DEFAULT_BLOCK,
                    )?);
                    by_kind.push((kind, lay.clone()));
                    lay
                }
            };
            layouts.push(layout);
        }
        Ok(Transformer {
            dims,
            table: t,
            globals,
            blocks,
            layouts,
            precision: Precision::Fp32,
        })
    }

    /// The same model computing in `precision` (f32 by default).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The weights the products read: under fp16 a copy with the resblocks' four matrices
    /// (`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj`) rounded to f16, as the GPU multiplies by
    /// the fp16 copy of the fp32 master weights; under fp32 the weights themselves.
    fn product_weights<'p>(&self, params: &'p [f32]) -> std::borrow::Cow<'p, [f32]> {
        if self.precision == Precision::Fp32 {
            return std::borrow::Cow::Borrowed(params);
        }
        let mut w = params.to_vec();
        for bp in &self.blocks {
            for i in [bp.qkv_w, bp.attn_proj_w, bp.fc_w, bp.mlp_proj_w] {
                self.precision.round(&mut w[self.table.spec(i).range()]);
            }
        }
        std::borrow::Cow::Owned(w)
    }

    pub fn dims(&self) -> &TransformerDims {
        &self.dims
    }

    /// The parameters of each resblock, one range of the flat buffer per scale, in
    /// [`GradScaler`]'s order: layer l's attention block (`ln_1` … `attn.proj`) at 2l, its MLP
    /// block (`ln_2` … `mlp.proj`) at 2l + 1.
    pub fn resblock_ranges(&self) -> Vec<Range<usize>> {
        let r = |i: usize| self.table.spec(i).range();
        self.blocks
            .iter()
            .flat_map(|bp| {
                [
                    r(bp.ln1_w).start..r(bp.attn_proj_b).end,
                    r(bp.ln2_w).start..r(bp.mlp_proj_b).end,
                ]
            })
            .collect()
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    pub fn layout(&self, layer: usize) -> &BlockLayout {
        &self.layouts[layer]
    }

    /// Fresh weights (see [`crate::model::init`]), deterministic in `seed`.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut buf = vec![0.0; self.table.numel()];
        let scale = 1.0 / (2.0 * self.dims.layers as f32).sqrt();
        super::init::init_params(&self.table, &mut buf, seed, |name| {
            if name.ends_with("attn.proj.weight") || name.ends_with("mlp.proj.weight") {
                scale
            } else {
                1.0
            }
        });
        buf
    }

    fn embed_dims(&self, batch: usize) -> EmbedDims {
        let d = &self.dims;
        EmbedDims {
            batch,
            text_len: d.text_len,
            grid: d.grid,
            channels: d.d_model,
            text_rows: d.text_rows(),
            image_vocab: d.image_vocab,
        }
    }

    /// Checks a batch's shapes and token ranges without running anything.
    pub fn check_batch(&self, batch: usize, text: &[u32], image: &[u32]) -> Result<()> {
        Ok(embedding::check_ids(&self.embed_dims(batch), text, image)?)
    }

    /// Runs the forward pass and the loss. With `grad_scale = Some(s)` the segment logits are
    /// overwritten in place by the loss gradient times `s` (ready for [`Self::backward`]); with
    /// `None` they keep the logits. Returns the losses.
    pub fn forward(
        &self,
        params: &[f32],
        acts: &mut Activations,
        text: &[u32],
        image: &[u32],
        grad_scale: Option<f32>,
    ) -> Result<Losses> {
        let d = self.dims;
        let (b, t, c) = (acts.batch, d.seq_len(), d.d_model);
        let n = b * t;
        if params.len() != self.table.numel() {
            return Err(ModelError::Dims(format!(
                "parameter buffer has {} elements, the model needs {}",
                params.len(),
                self.table.numel()
            )));
        }
        let params = self.product_weights(params);
        let p = self.table.split(&params);
        let g = &self.globals;
        embedding::embedding_forward(
            &mut acts.residual[0],
            text,
            image,
            EmbedTables {
                text_emb: p[g.text_emb],
                text_pos: p[g.text_pos],
                image_emb: p[g.image_emb],
                image_row: p[g.image_row],
                image_col: p[g.image_col],
            },
            &self.embed_dims(b),
        )?;
        for (l, bp) in self.blocks.iter().enumerate() {
            let (done, rest) = acts.residual.split_at_mut(l + 1);
            let x = &done[l];
            let x_next = &mut rest[0];
            let la = &mut acts.layers[l];
            layernorm_forward(
                &mut la.ln1,
                &mut la.ln1_mean,
                &mut la.ln1_rstd,
                x,
                p[bp.ln1_w],
                p[bp.ln1_b],
                n,
                c,
            )?;
            self.precision.round(&mut la.ln1);
            linear_forward(
                &mut la.qkv,
                &la.ln1,
                p[bp.qkv_w],
                Some(p[bp.qkv_b]),
                n,
                c,
                3 * c,
            )?;
            self.precision.round(&mut la.qkv);
            attention::attention_forward(
                &mut la.atty,
                &mut la.lse,
                &la.qkv,
                &self.layouts[l],
                b,
                t,
                d.heads,
                d.head_size(),
            )?;
            self.precision.round(&mut la.atty);
            linear_forward(
                &mut la.x_mid,
                &la.atty,
                p[bp.attn_proj_w],
                Some(p[bp.attn_proj_b]),
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
                p[bp.ln2_w],
                p[bp.ln2_b],
                n,
                c,
            )?;
            self.precision.round(&mut la.ln2);
            linear_forward(
                &mut la.fch,
                &la.ln2,
                p[bp.fc_w],
                Some(p[bp.fc_b]),
                n,
                c,
                4 * c,
            )?;
            self.precision.round(&mut la.fch);
            gelu_forward(&mut la.fch_gelu, &la.fch)?;
            self.precision.round(&mut la.fch_gelu);
            linear_forward(
                x_next,
                &la.fch_gelu,
                p[bp.mlp_proj_w],
                Some(p[bp.mlp_proj_b]),
                n,
                4 * c,
                c,
            )?;
            scale_add(x_next, 1.0, &la.x_mid);
        }
        layernorm_forward(
            &mut acts.lnf,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            &acts.residual[d.layers],
            p[g.lnf_w],
            p[g.lnf_b],
            n,
            c,
        )?;
        // Gather the rows that predict each segment, then the two head products.
        let (tt, gi) = (d.text_len, d.image_tokens());
        for bi in 0..b {
            let src = &acts.lnf[bi * t * c..(bi + 1) * t * c];
            acts.text_hidden[bi * (tt - 1) * c..(bi + 1) * (tt - 1) * c]
                .copy_from_slice(&src[..(tt - 1) * c]);
            acts.image_hidden[bi * gi * c..(bi + 1) * gi * c]
                .copy_from_slice(&src[(tt - 1) * c..(t - 1) * c]);
            for pos in 0..tt - 1 {
                acts.text_targets[bi * (tt - 1) + pos] = text[bi * tt + pos + 1];
            }
            acts.image_targets[bi * gi..(bi + 1) * gi].copy_from_slice(&image[bi * gi..][..gi]);
        }
        let head = p[g.head];
        let (head_text, head_image) = head.split_at(d.text_rows() * c);
        let (nt, ni) = (b * (tt - 1), b * gi);
        linear_forward(
            &mut acts.text_logits,
            &acts.text_hidden,
            head_text,
            None,
            nt,
            c,
            d.text_rows(),
        )?;
        linear_forward(
            &mut acts.image_logits,
            &acts.image_hidden,
            head_image,
            None,
            ni,
            c,
            d.image_vocab,
        )?;
        match grad_scale {
            Some(s) => {
                let st = s * TEXT_LOSS_WEIGHT / nt as f32;
                let si = s * (1.0 - TEXT_LOSS_WEIGHT) / ni as f32;
                cross_entropy_fused(
                    &mut acts.text_logits,
                    &mut acts.text_losses,
                    &acts.text_targets,
                    st,
                    nt,
                    d.text_rows(),
                )?;
                cross_entropy_fused(
                    &mut acts.image_logits,
                    &mut acts.image_losses,
                    &acts.image_targets,
                    si,
                    ni,
                    d.image_vocab,
                )?;
            }
            None => {
                cross_entropy_forward(
                    &mut acts.text_losses,
                    &acts.text_logits,
                    &acts.text_targets,
                    nt,
                    d.text_rows(),
                )?;
                cross_entropy_forward(
                    &mut acts.image_losses,
                    &acts.image_logits,
                    &acts.image_targets,
                    ni,
                    d.image_vocab,
                )?;
            }
        }
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let (lt, li) = (mean(&acts.text_losses), mean(&acts.image_losses));
        Ok(Losses {
            loss: TEXT_LOSS_WEIGHT as f64 * lt + (1.0 - TEXT_LOSS_WEIGHT as f64) * li,
            text: lt,
            image: li,
        })
    }

    /// The backward pass after `forward(.., Some(scale))`: accumulates (`+=`) into `grads`.
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        text: &[u32],
        image: &[u32],
    ) -> Result<()> {
        self.backward_impl(params, grads, acts, text, image, None)
    }

    /// [`Self::backward`] with per-resblock gradient scaling (model/mixed.rs): every resblock
    /// works on its incoming gradient times its scale, rounded to the model's precision, and
    /// raises its flag on a non-finite value. The resblocks' parameter gradients (the ranges of
    /// [`Self::resblock_ranges`]) accumulate in scaled units: divide them once per step with
    /// [`crate::model::mixed::unscale_param_grads`]. The other parameters' are in true units.
    pub fn backward_scaled(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        text: &[u32],
        image: &[u32],
        scales: BlockScales,
    ) -> Result<()> {
        let want = 2 * self.dims.layers;
        if scales.scales.len() != want || scales.flags.len() != want {
            return Err(ModelError::Dims(format!(
                "{} scales and {} flags for {want} resblocks",
                scales.scales.len(),
                scales.flags.len()
            )));
        }
        self.backward_impl(params, grads, acts, text, image, Some(scales))
    }

    fn backward_impl(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        text: &[u32],
        image: &[u32],
        mut scaling: Option<BlockScales>,
    ) -> Result<()> {
        let d = self.dims;
        let prec = self.precision;
        let params = self.product_weights(params);
        let params = &params[..];
        let (b, t, c) = (acts.batch, d.seq_len(), d.d_model);
        let n = b * t;
        let (tt, gi) = (d.text_len, d.image_tokens());
        let (nt, ni) = (b * (tt - 1), b * gi);
        let p = self.table.split(params);
        let mut gr = self.table.split_mut(grads);
        let g = self.globals;
        let s = &mut acts.scratch;

        // Head: dhidden for each segment, then scattered into d(lnf); position T−1 gets zero.
        {
            let (dhead_text, dhead_image) = gr[g.head].split_at_mut(d.text_rows() * c);
            let (head_text, head_image) = p[g.head].split_at(d.text_rows() * c);
            linear_backward(
                Some(&mut s.dtext_hidden),
                dhead_text,
                None,
                &acts.text_logits,
                &acts.text_hidden,
                head_text,
                nt,
                c,
                d.text_rows(),
            )?;
            linear_backward(
                Some(&mut s.dimage_hidden),
                dhead_image,
                None,
                &acts.image_logits,
                &acts.image_hidden,
                head_image,
                ni,
                c,
                d.image_vocab,
            )?;
        }
        for bi in 0..b {
            let dst = &mut s.dln[bi * t * c..(bi + 1) * t * c];
            dst[..(tt - 1) * c]
                .copy_from_slice(&s.dtext_hidden[bi * (tt - 1) * c..(bi + 1) * (tt - 1) * c]);
            dst[(tt - 1) * c..(t - 1) * c]
                .copy_from_slice(&s.dimage_hidden[bi * gi * c..(bi + 1) * gi * c]);
            dst[(t - 1) * c..].fill(0.0);
        }
        s.dresidual.fill(0.0);
        {
            let (dw, db) = pair_mut(&mut gr, g.lnf_w, g.lnf_b);
            layernorm_backward(
                &mut s.dresidual,
                dw,
                db,
                &s.dln,
                &acts.residual[d.layers],
                p[g.lnf_w],
                &acts.lnf_mean,
                &acts.lnf_rstd,
                n,
                c,
            )?;
        }
        for (l, bp) in self.blocks.iter().enumerate().rev() {
            let la = &acts.layers[l];
            // x_next = x_mid + proj(gelu(fc(ln2(x_mid)))); dresidual holds d(x_next).
            let i = GradScaler::mlp(l);
            if let Some(sc) = &mut scaling {
                s.scaled
                    .scale_in(prec, &s.dresidual, sc.scales[i], &mut sc.flags[i])?;
            }
            let dout = if scaling.is_some() {
                &s.scaled.block
            } else {
                &s.dresidual
            };
            let (dw, db) = pair_mut(&mut gr, bp.mlp_proj_w, bp.mlp_proj_b);
            linear_backward(
                Some(&mut s.dfch_gelu),
                dw,
                Some(db),
                dout,
                &la.fch_gelu,
                p[bp.mlp_proj_w],
                n,
                4 * c,
                c,
            )?;
            prec.round(&mut s.dfch_gelu);
            gelu_backward(&mut s.dfch, &s.dfch_gelu, &la.fch)?;
            prec.round(&mut s.dfch);
            let (dw, db) = pair_mut(&mut gr, bp.fc_w, bp.fc_b);
            linear_backward(
                Some(&mut s.dln),
                dw,
                Some(db),
                &s.dfch,
                &la.ln2,
                p[bp.fc_w],
                n,
                c,
                4 * c,
            )?;
            prec.round(&mut s.dln);
            let (dw, db) = pair_mut(&mut gr, bp.ln2_w, bp.ln2_b);
            let dinp = match scaling {
                Some(_) => {
                    s.scaled.block.fill(0.0);
                    &mut s.scaled.block
                }
                None => &mut s.dresidual,
            };
            layernorm_backward(
                dinp,
                dw,
                db,
                &s.dln,
                &la.x_mid,
                p[bp.ln2_w],
                &la.ln2_mean,
                &la.ln2_rstd,
                n,
                c,
            )?;
            if let Some(sc) = &mut scaling {
                s.scaled
                    .unscale_out(prec, &mut s.dresidual, sc.scales[i], &mut sc.flags[i])?;
            }
            // x_mid = x + proj(attn(qkv(ln1(x)))); dresidual now holds d(x_mid).
            let i = GradScaler::attn(l);
            if let Some(sc) = &mut scaling {
                s.scaled
                    .scale_in(prec, &s.dresidual, sc.scales[i], &mut sc.flags[i])?;
            }
            let dout = if scaling.is_some() {
                &s.scaled.block
            } else {
                &s.dresidual
            };
            let (dw, db) = pair_mut(&mut gr, bp.attn_proj_w, bp.attn_proj_b);
            linear_backward(
                Some(&mut s.datty),
                dw,
                Some(db),
                dout,
                &la.atty,
                p[bp.attn_proj_w],
                n,
                c,
                c,
            )?;
            prec.round(&mut s.datty);
            attention::attention_backward(
                &mut s.dqkv,
                &s.datty,
                &la.qkv,
                &la.atty,
                &la.lse,
                &self.layouts[l],
                b,
                t,
                d.heads,
                d.head_size(),
            )?;
            prec.round(&mut s.dqkv);
            let (dw, db) = pair_mut(&mut gr, bp.qkv_w, bp.qkv_b);
            linear_backward(
                Some(&mut s.dln),
                dw,
                Some(db),
                &s.dqkv,
                &la.ln1,
                p[bp.qkv_w],
                n,
                c,
                3 * c,
            )?;
            prec.round(&mut s.dln);
            let (dw, db) = pair_mut(&mut gr, bp.ln1_w, bp.ln1_b);
            let dinp = match scaling {
                Some(_) => {
                    s.scaled.block.fill(0.0);
                    &mut s.scaled.block
                }
                None => &mut s.dresidual,
            };
            layernorm_backward(
                dinp,
                dw,
                db,
                &s.dln,
                &acts.residual[l],
                p[bp.ln1_w],
                &la.ln1_mean,
                &la.ln1_rstd,
                n,
                c,
            )?;
            if let Some(sc) = &mut scaling {
                s.scaled
                    .unscale_out(prec, &mut s.dresidual, sc.scales[i], &mut sc.flags[i])?;
            }
        }
        let [te, tp, ie, ir, ic] = five_mut(
            &mut gr,
            [
                g.text_emb,
                g.text_pos,
                g.image_emb,
                g.image_row,
                g.image_col,
            ],
        );
        embedding::embedding_backward(
            EmbedGrads {
                text_emb: te,
                text_pos: tp,
                image_emb: ie,
                image_row: ir,
                image_col: ic,
            },
            &s.dresidual,
            text,
            image,
            &self.embed_dims(b),
        )?;
        Ok(())
    }

    /// The full logits [B, T, Vt+Tt+Vi] of docs/model.md §4, from the activations of the last
    /// `forward` (any grad_scale: only `lnf` is read).
    pub fn full_logits(&self, params: &[f32], acts: &Activations) -> Result<Vec<f32>> {
        let d = self.dims;
        let n = acts.batch * d.seq_len();
        let head = self.table.view(params, self.globals.head);
        let mut out = vec![0.0; n * d.vocab_total()];
        linear_forward(
            &mut out,
            &acts.lnf,
            head,
            None,
            n,
            d.d_model,
            d.vocab_total(),
        )?;
        Ok(out)
    }

    /// Useful floating-point operations of one training step (forward + backward) on `batch`
    /// sequences: 6 per multiply-add of every matrix product that is computed (the head only on
    /// the segments the loss reads), and attention over allowed pairs only.
    pub fn train_flops(&self, batch: usize) -> f64 {
        let d = self.dims;
        let (c, n) = (d.d_model as f64, (batch * d.seq_len()) as f64);
        let per_layer_matmul = 12.0 * c * c; // qkv 3c², proj c², fc 4c², mlp proj 4c²
        let mut flops = 6.0 * n * per_layer_matmul * d.layers as f64;
        let head_rows = (batch * (d.text_len - 1)) as f64 * d.text_rows() as f64
            + (batch * d.image_tokens()) as f64 * d.image_vocab as f64;
        flops += 6.0 * head_rows * c;
        for layout in &self.layouts {
            // QKᵀ and PV forward (2 products), four products backward: 2·2·HS + 2·4·HS per pair.
            flops += 12.0 * (layout.allowed_pairs() as f64) * c * batch as f64;
        }
        flops
    }
}

/// Five distinct mutable views, given in increasing table order.
fn five_mut<'a>(v: &'a mut [&mut [f32]], idx: [usize; 5]) -> [&'a mut [f32]; 5] {
    assert!(
        idx.windows(2).all(|w| w[0] < w[1]),
        "five_mut expects table order"
    );
    let mut out: Vec<&'a mut [f32]> = Vec::with_capacity(5);
    let mut rest: &'a mut [&mut [f32]] = v;
    let mut base = 0;
    for &i in &idx {
        let (_, tail) = rest.split_at_mut(i - base);
        let (first, tail) = tail.split_first_mut().expect("index in range");
        out.push(&mut **first);
        rest = tail;
        base = i + 1;
    }
    out.try_into().unwrap_or_else(|_| unreachable!())
}

/// The three losses of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Losses {
    /// (1/8)·text + (7/8)·image.
    pub loss: f64,
    pub text: f64,
    pub image: f64,
}

/// Per-layer saved activations.
#[derive(Debug)]
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    fch: Vec<f32>,
    fch_gelu: Vec<f32>,
}

/// Gradient scratch of the backward pass (activation gradients, overwritten each use).
#[derive(Debug)]
struct Scratch {
    dresidual: Vec<f32>,
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    datty: Vec<f32>,
    dfch: Vec<f32>,
    dfch_gelu: Vec<f32>,
    dtext_hidden: Vec<f32>,
    dimage_hidden: Vec<f32>,
    /// The scaled backward pass's block gradients.
    scaled: ScaleScratch,
}

/// Everything the forward pass keeps for the backward pass, for one batch size.
#[derive(Debug)]
pub struct Activations {
    batch: usize,
    /// residual[l] is the input of layer l; residual[L] the input of ln_f. [B, T, C] each.
    residual: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    text_hidden: Vec<f32>,
    image_hidden: Vec<f32>,
    text_targets: Vec<u32>,
    image_targets: Vec<u32>,
    /// Text-segment logits [B·(Tt−1), Vt+Tt], or their gradient after a fused loss.
    text_logits: Vec<f32>,
    /// Image-segment logits [B·G², Vi], or their gradient after a fused loss.
    image_logits: Vec<f32>,
    text_losses: Vec<f32>,
    image_losses: Vec<f32>,
    scratch: Scratch,
}

impl Activations {
    pub fn new(model: &Transformer, batch: usize) -> Self {
        let d = model.dims;
        let (t, c) = (d.seq_len(), d.d_model);
        let n = batch * t;
        let z = |k: usize| vec![0.0f32; k];
        let nt = batch * (d.text_len - 1);
        let ni = batch * d.image_tokens();
        Activations {
            batch,
            residual: (0..=d.layers).map(|_| z(n * c)).collect(),
            layers: (0..d.layers)
                .map(|_| LayerActs {
                    ln1: z(n * c),
                    ln1_mean: z(n),
                    ln1_rstd: z(n),
                    qkv: z(n * 3 * c),
                    atty: z(n * c),
                    lse: z(batch * d.heads * t),
                    x_mid: z(n * c),
                    ln2: z(n * c),
                    ln2_mean: z(n),
                    ln2_rstd: z(n),
                    fch: z(n * 4 * c),
                    fch_gelu: z(n * 4 * c),
                })
                .collect(),
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            text_hidden: z(nt * c),
            image_hidden: z(ni * c),
            text_targets: vec![0; nt],
            image_targets: vec![0; ni],
            text_logits: z(nt * d.text_rows()),
            image_logits: z(ni * d.image_vocab),
            text_losses: z(nt),
            image_losses: z(ni),
            scratch: Scratch {
                dresidual: z(n * c),
                dln: z(n * c),
                dqkv: z(n * 3 * c),
                datty: z(n * c),
                dfch: z(n * 4 * c),
                dfch_gelu: z(n * 4 * c),
                dtext_hidden: z(nt * c),
                dimage_hidden: z(ni * c),
                scaled: ScaleScratch::new(n * c),
            },
        }
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Elements (4 bytes each: f32 activations, u32 targets) held by these buffers: what
    /// `crate::memory` estimates from the config before anything is allocated.
    pub fn floats(&self) -> usize {
        let layer = |l: &LayerActs| {
            [
                &l.ln1,
                &l.ln1_mean,
                &l.ln1_rstd,
                &l.qkv,
                &l.atty,
                &l.lse,
                &l.x_mid,
                &l.ln2,
                &l.ln2_mean,
                &l.ln2_rstd,
                &l.fch,
                &l.fch_gelu,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
        };
        let s = &self.scratch;
        self.residual.iter().map(Vec::len).sum::<usize>()
            + self.layers.iter().map(layer).sum::<usize>()
            + [
                &self.lnf,
                &self.lnf_mean,
                &self.lnf_rstd,
                &self.text_hidden,
                &self.image_hidden,
                &self.text_logits,
                &self.image_logits,
                &self.text_losses,
                &self.image_losses,
                &s.dresidual,
                &s.dln,
                &s.dqkv,
                &s.datty,
                &s.dfch,
                &s.dfch_gelu,
                &s.dtext_hidden,
                &s.dimage_hidden,
            ]
            .iter()
            .map(|v| v.len())
            .sum::<usize>()
            + self.text_targets.len()
            + self.image_targets.len()
    }
}

pub mod device;
pub mod sample;

#[cfg(test)]
mod tests;
