//! The transformer's forward and backward passes on a [`kernels::device::Device`]: the same math
//! as [`Transformer::forward`] / [`Transformer::backward`] (docs/model.md §1), with weights,
//! gradients and activations in device buffers and every operation one of the `kernels` op
//! traits. On `Gpu<Cuda>` this is the GPU step; on `Gpu<Emu>` the same CUDA sources run on the
//! CPU, which is how CI holds it to the CPU model; on `Cpu` it is the references again.
//!
//! The activation type `A` of [`DeviceActs<D, A>`] is the precision (docs/model.md §5): f32, or
//! f16 with the rounding points of the host's `Transformer::with_precision(Precision::Fp16)`:
//! layer-norm outputs, `[q | k | v]`, the attention output, the MLP's pre-activation and its GELU
//! stored as f16, the products reading the f16 copies of the resblocks' four matrices
//! ([`HalfWeights`], kept by AdamW beside the fp32 master weights); the residual stream, gains,
//! biases, embeddings, the head and the logits stay f32. The f16 backward pass runs with one
//! gradient scale per resblock ([`DeviceScales`], the `kernels::gradscale` kernels): each block
//! works on its scaled incoming gradient in f16, its outgoing gradient is rounded to f16 and
//! unscaled into the f32 residual gradient, its parameter gradients accumulate in scaled units
//! until [`DeviceTransformer::unscale_param_grads`].
//!
//! Differences from the host model, none of which changes the math: each linear layer is a
//! product then a bias addition (the host adds the bias inside the product); the residual
//! additions are fused into the next layer normalisation (`x + δ`, as the host adds); the head's
//! two segments are batched products reading the rows of `ln_f`'s output in place instead of
//! gathered copies. In f16 a product writes f32 (bias added in f32) and is then rounded once to
//! f16 (`kernels::cast`), as the host rounds the f32 result of its product.

use super::{Losses, ModelError, Result, Transformer, TEXT_LOSS_WEIGHT};
use crate::params::ParamTable;
use half::f16;
use kernels::attention::AttentionOps;
use kernels::cast::CastOps;
use kernels::cross_entropy::CrossEntropyOps;
use kernels::device::{Device, Elem};
use kernels::embedding::{EmbedGradBufs, EmbedTableBufs, EmbeddingOps};
use kernels::gelu::GeluOps;
use kernels::gradscale::{GradScaleOps, GradScaler};
use kernels::layernorm::LayerNormOps;
use kernels::linear::{BiasOps, GemmSpec, MatmulOps};

/// Everything the transformer's passes need from a device.
pub trait TransformerDevice:
    Device
    + LayerNormOps
    + AttentionOps
    + MatmulOps
    + BiasOps
    + GeluOps
    + EmbeddingOps
    + CrossEntropyOps
    + CastOps
    + GradScaleOps
{
}

impl<D> TransformerDevice for D where
    D: Device
        + LayerNormOps
        + AttentionOps
        + MatmulOps
        + BiasOps
        + GeluOps
        + EmbeddingOps
        + CrossEntropyOps
        + CastOps
        + GradScaleOps
{
}

/// The f16 copies of the resblocks' four matrices (`attn.qkv`, `attn.proj`, `mlp.fc`,
/// `mlp.proj`) that the f16 products read, by parameter-table index (`None` for every other
/// tensor, and for all of them in an f32 run). AdamW rewrites a copy with each update of its
/// master weights (`AdamWOps::adamw_update`'s `params_f16`).
pub struct HalfWeights<D: Device> {
    pub bufs: Vec<Option<D::Buf<f16>>>,
}

impl<D: TransformerDevice> HalfWeights<D> {
    /// No copies: what an f32 model reads.
    pub fn none() -> Self {
        HalfWeights { bufs: Vec::new() }
    }

    /// The four matrices of every resblock of `params`, rounded to f16 on the device.
    pub fn of(dev: &D, model: &Transformer, params: &DeviceTensors<D>) -> Result<Self> {
        let mut bufs: Vec<Option<D::Buf<f16>>> = (0..model.table.len()).map(|_| None).collect();
        for i in resblock_matrices(model) {
            let mut h = dev.zeros::<f16>(dev.len(&params.bufs[i]))?;
            dev.cast_from_f32(&mut h, &params.bufs[i])?;
            bufs[i] = Some(h);
        }
        Ok(HalfWeights { bufs })
    }
}

/// The table indices of the resblocks' four matrices, the ones with f16 copies.
fn resblock_matrices(model: &Transformer) -> impl Iterator<Item = usize> + '_ {
    model
        .blocks
        .iter()
        .flat_map(|bp| [bp.qkv_w, bp.attn_proj_w, bp.fc_w, bp.mlp_proj_w])
}

/// The table indices of each resblock's tensors, in [`GradScaler`]'s order (layer l's attention
/// block `ln_1` … `attn.proj` at 2l, its MLP block `ln_2` … `mlp.proj` at 2l + 1).
fn resblock_tensors(model: &Transformer) -> Vec<std::ops::RangeInclusive<usize>> {
    model
        .blocks
        .iter()
        .flat_map(|bp| [bp.ln1_w..=bp.attn_proj_b, bp.ln2_w..=bp.mlp_proj_b])
        .collect()
}

/// One spare gradient buffer per distinct size of a resblock tensor, for
/// [`DeviceTransformer::unscale_param_grads`].
pub struct UnscaleScratch<D: Device> {
    bufs: Vec<D::Buf<f32>>,
}

/// The per-resblock gradient scales of one backward pass (host values, in
/// [`GradScaler`]'s order) and their flags on the device (raised, never cleared, by the
/// passes; the caller zeroes them once per update).
pub struct DeviceScales<'a, D: Device> {
    pub scales: &'a [f32],
    pub flags: &'a mut D::Buf<u32>,
}

/// An activation type of the device passes: f32 or f16 (docs/model.md §5).
pub trait Act: Elem {
    /// The weight a product reads for tensor `i`: the master weight in f32, its f16 copy in f16.
    fn weight<'a, D: Device>(
        params: &'a DeviceTensors<D>,
        half: &'a HalfWeights<D>,
        i: usize,
    ) -> Result<&'a D::Buf<Self>>;

    /// Runs `product`, which writes an f32 result, and leaves that result in `y`: written in
    /// place in f32; written to `tmp` and rounded into `y` in f16.
    fn from_product<D: TransformerDevice>(
        dev: &D,
        y: &mut D::Buf<Self>,
        tmp: &mut D::Buf<f32>,
        product: impl FnOnce(&mut D::Buf<f32>) -> Result<()>,
    ) -> Result<()>;

    /// The residual gradient as a resblock's incoming gradient without scaling: itself in f32;
    /// in f16 an error (the f16 backward pass runs with per-resblock scales only).
    fn unscaled<D: Device>(dresid: &D::Buf<f32>) -> Result<&D::Buf<Self>>;
}

impl Act for f32 {
    fn weight<'a, D: Device>(
        params: &'a DeviceTensors<D>,
        _half: &'a HalfWeights<D>,
        i: usize,
    ) -> Result<&'a D::Buf<f32>> {
        Ok(&params.bufs[i])
    }

    fn from_product<D: TransformerDevice>(
        _dev: &D,
        y: &mut D::Buf<f32>,
        _tmp: &mut D::Buf<f32>,
        product: impl FnOnce(&mut D::Buf<f32>) -> Result<()>,
    ) -> Result<()> {
        product(y)
    }

    fn unscaled<D: Device>(dresid: &D::Buf<f32>) -> Result<&D::Buf<f32>> {
        Ok(dresid)
    }
}

impl Act for f16 {
    fn weight<'a, D: Device>(
        _params: &'a DeviceTensors<D>,
        half: &'a HalfWeights<D>,
        i: usize,
    ) -> Result<&'a D::Buf<f16>> {
        half.bufs.get(i).and_then(Option::as_ref).ok_or_else(|| {
            ModelError::Dims(format!(
                "parameter tensor {i} has no f16 copy (HalfWeights::of builds them)"
            ))
        })
    }

    fn from_product<D: TransformerDevice>(
        dev: &D,
        y: &mut D::Buf<f16>,
        tmp: &mut D::Buf<f32>,
        product: impl FnOnce(&mut D::Buf<f32>) -> Result<()>,
    ) -> Result<()> {
        product(tmp)?;
        dev.cast_from_f32(y, tmp)?;
        Ok(())
    }

    fn unscaled<D: Device>(_dresid: &D::Buf<f32>) -> Result<&D::Buf<f16>> {
        Err(ModelError::Dims(
            "the f16 backward pass needs per-resblock gradient scales".into(),
        ))
    }
}

/// One device buffer per tensor of a [`ParamTable`] (weights, gradients or moments).
pub struct DeviceTensors<D: Device> {
    pub bufs: Vec<D::Buf<f32>>,
}

impl<D: Device> DeviceTensors<D> {
    /// Zeros shaped like `table`.
    pub fn zeros(dev: &D, table: &ParamTable) -> Result<Self> {
        let bufs = table
            .specs()
            .iter()
            .map(|s| dev.zeros(s.numel()))
            .collect::<kernels::Result<_>>()?;
        Ok(DeviceTensors { bufs })
    }

    /// The tensors of the flat host buffer `flat` (laid out by `table`).
    pub fn upload(dev: &D, table: &ParamTable, flat: &[f32]) -> Result<Self> {
        if flat.len() != table.numel() {
            return Err(ModelError::Dims(format!(
                "host buffer has {} elements, the table {}",
                flat.len(),
                table.numel()
            )));
        }
        let bufs = table
            .specs()
            .iter()
            .map(|s| dev.upload(&flat[s.range()]))
            .collect::<kernels::Result<_>>()?;
        Ok(DeviceTensors { bufs })
    }

    /// The flat host buffer laid out by `table`.
    pub fn download(&self, dev: &D, table: &ParamTable) -> Result<Vec<f32>> {
        let mut flat = vec![0.0; table.numel()];
        for (s, buf) in table.specs().iter().zip(&self.bufs) {
            flat[s.range()].copy_from_slice(&dev.download(buf)?);
        }
        Ok(flat)
    }
}

/// Two distinct tensors, mutably.
fn pair<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    let [a, b] = v.get_disjoint_mut([i, j]).expect("two distinct tensors");
    (a, b)
}

/// Per-layer saved activations on the device (`A`: what feeds a product, docs/model.md §5).
struct LayerBufs<D: Device, A: Act> {
    ln1: D::Buf<A>,
    ln1_mean: D::Buf<f32>,
    ln1_rstd: D::Buf<f32>,
    qkv: D::Buf<A>,
    atty: D::Buf<A>,
    lse: D::Buf<f32>,
    /// The attention block's output (before the residual addition).
    attn_out: D::Buf<f32>,
    x_mid: D::Buf<f32>,
    ln2: D::Buf<A>,
    ln2_mean: D::Buf<f32>,
    ln2_rstd: D::Buf<f32>,
    fch: D::Buf<A>,
    fch_gelu: D::Buf<A>,
    /// The MLP block's output (before the residual addition).
    mlp_out: D::Buf<f32>,
}

/// f32 results of products rounded to f16 afterwards, one per width (f16 only: empty in f32).
struct ProductScratch<D: Device> {
    /// [N, C]; also a resblock's outgoing gradient before it is rounded.
    c: D::Buf<f32>,
    /// [N, 3C].
    c3: D::Buf<f32>,
    /// [N, 4C].
    c4: D::Buf<f32>,
}

/// The device's activations for one batch size, in activation type `A` (f32 or f16).
pub struct DeviceActs<D: Device, A: Act = f32> {
    batch: usize,
    /// residual[l]: the input of layer l; residual[L]: the input of ln_f.
    residual: Vec<D::Buf<f32>>,
    layers: Vec<LayerBufs<D, A>>,
    lnf: D::Buf<f32>,
    lnf_mean: D::Buf<f32>,
    lnf_rstd: D::Buf<f32>,
    /// Text-segment logits [B·(Tt−1), Vt+Tt], then their gradient.
    text_logits: D::Buf<f32>,
    /// Image-segment logits [B·G², Vi], then their gradient.
    image_logits: D::Buf<f32>,
    text_losses: D::Buf<f32>,
    image_losses: D::Buf<f32>,
    // Backward scratch.
    dresidual: D::Buf<f32>,
    dlnf: D::Buf<f32>,
    /// A resblock's incoming gradient (scaled), then its outgoing one (scaled, rounded).
    dblock: D::Buf<A>,
    dln: D::Buf<A>,
    dqkv: D::Buf<A>,
    datty: D::Buf<A>,
    dfch: D::Buf<A>,
    dfch_gelu: D::Buf<A>,
    tmp: ProductScratch<D>,
}

/// The transformer for device `D`: the model's definition and its attention layouts on `D`
/// (every pass takes the device itself as its first argument).
pub struct DeviceTransformer<D: TransformerDevice> {
    model: Transformer,
    layouts: Vec<D::Layout>,
}

impl<D: TransformerDevice> DeviceTransformer<D> {
    pub fn new(model: &Transformer, dev: &D) -> Result<Self> {
        let layouts = model
            .layouts
            .iter()
            .map(|l| dev.attention_layout(l))
            .collect::<kernels::Result<_>>()?;
        Ok(DeviceTransformer {
            model: model.clone(),
            layouts,
        })
    }

    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// Activations for `batch` sequences, in activation type `A`.
    pub fn new_acts<A: Act>(&self, dev: &D, batch: usize) -> Result<DeviceActs<D, A>> {
        let d = self.model.dims;
        let (t, c) = (d.seq_len(), d.d_model);
        let n = batch * t;
        let z = |k: usize| dev.zeros::<f32>(k);
        let za = |k: usize| dev.zeros::<A>(k);
        let nt = batch * (d.text_len - 1);
        let ni = batch * d.image_tokens();
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(LayerBufs {
                ln1: za(n * c)?,
                ln1_mean: z(n)?,
                ln1_rstd: z(n)?,
                qkv: za(n * 3 * c)?,
                atty: za(n * c)?,
                lse: z(batch * d.heads * t)?,
                attn_out: z(n * c)?,
                x_mid: z(n * c)?,
                ln2: za(n * c)?,
                ln2_mean: z(n)?,
                ln2_rstd: z(n)?,
                fch: za(n * 4 * c)?,
                fch_gelu: za(n * 4 * c)?,
                mlp_out: z(n * c)?,
            });
        }
        // f32 products are written in place: no rounding scratch (one element, not zero: a GPU
        // allocation of nothing is an error).
        let half = A::DTYPE == "f16";
        let zh = |k: usize| z(if half { k } else { 1 });
        Ok(DeviceActs {
            batch,
            residual: (0..=d.layers)
                .map(|_| z(n * c))
                .collect::<kernels::Result<_>>()?,
            layers,
            lnf: z(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: z(n)?,
            text_logits: z(nt * d.text_rows())?,
            image_logits: z(ni * d.image_vocab)?,
            text_losses: z(nt)?,
            image_losses: z(ni)?,
            // Rows T−1 of every sample are never written: they stay zero.
            dresidual: z(n * c)?,
            dlnf: z(n * c)?,
            dblock: za(n * c)?,
            dln: za(n * c)?,
            dqkv: za(n * 3 * c)?,
            datty: za(n * c)?,
            dfch: za(n * 4 * c)?,
            dfch_gelu: za(n * 4 * c)?,
            tmp: ProductScratch {
                c: z(n * c)?,
                c3: zh(n * 3 * c)?,
                c4: zh(n * 4 * c)?,
            },
        })
    }

    /// `y = x·Wᵀ + b` for `rows` rows: `x` [rows, k], `w` [out, k], `y` f32.
    #[allow(clippy::too_many_arguments)]
    fn linear<A: Act>(
        dev: &D,
        y: &mut D::Buf<f32>,
        x: &D::Buf<A>,
        w: &D::Buf<A>,
        b: &D::Buf<f32>,
        rows: usize,
        k: usize,
        out: usize,
    ) -> Result<()> {
        dev.matmul(y, x, false, w, true, (rows, out, k), false)?;
        dev.bias_add(y, b, rows, out)?;
        Ok(())
    }

    /// Backward of [`Self::linear`]: `dx = dy·W` (overwritten, through `tmp` in f16),
    /// `dW += dyᵀ·x`, `db += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward<A: Act>(
        dev: &D,
        dx: &mut D::Buf<A>,
        tmp: &mut D::Buf<f32>,
        dw: &mut D::Buf<f32>,
        db: &mut D::Buf<f32>,
        dy: &D::Buf<A>,
        x: &D::Buf<A>,
        w: &D::Buf<A>,
        rows: usize,
        k: usize,
        out: usize,
    ) -> Result<()> {
        A::from_product(dev, dx, tmp, |dx| {
            Ok(dev.matmul(dx, dy, false, w, false, (rows, k, out), false)?)
        })?;
        dev.matmul(dw, dy, true, x, false, (out, k, rows), true)?;
        dev.bias_backward(db, dy, rows, out)?;
        Ok(())
    }

    /// A resblock's input gradient, written by `grad` (which accumulates into the buffer it is
    /// given): straight into `dresid` without scaling; with it, into a zeroed `tmp` (scaled
    /// units), rounded to `A` in `dblock` and divided by block `i`'s scale into `dresid` (a
    /// non-finite quotient adds nothing and raises the flag).
    #[allow(clippy::too_many_arguments)]
    fn block_input_grad<A: Act>(
        dev: &D,
        dresid: &mut D::Buf<f32>,
        dblock: &mut D::Buf<A>,
        tmp: &mut D::Buf<f32>,
        scaling: &mut Option<DeviceScales<D>>,
        i: usize,
        grad: impl FnOnce(&mut D::Buf<f32>) -> Result<()>,
    ) -> Result<()> {
        let Some(sc) = scaling else {
            return grad(dresid);
        };
        dev.fill_zero(tmp)?;
        grad(tmp)?;
        dev.cast_from_f32(dblock, tmp)?;
        dev.grad_unscale_add(dresid, sc.flags, i, dblock, sc.scales[i])?;
        Ok(())
    }

    /// Spare buffers for [`Self::unscale_param_grads`].
    pub fn unscale_scratch(&self, dev: &D) -> Result<UnscaleScratch<D>> {
        let mut lens: Vec<usize> = resblock_tensors(&self.model)
            .into_iter()
            .flatten()
            .map(|i| self.model.table.spec(i).numel())
            .collect();
        lens.sort_unstable();
        lens.dedup();
        let bufs = lens
            .into_iter()
            .map(|k| dev.zeros(k))
            .collect::<kernels::Result<_>>()?;
        Ok(UnscaleScratch { bufs })
    }

    /// Ends an update's scaled backward passes, as `crate::model::mixed::unscale_param_grads`:
    /// every resblock tensor's gradient divided by its block's scale (an IEEE division), and
    /// the block's flag raised where a quotient is not finite (a non-finite gradient included).
    /// Each quotient is written into a zeroed spare of the same size, which then takes the
    /// tensor's place (`kernels::gradscale`'s unscale-and-add, `0 + g/s` being `g/s`).
    pub fn unscale_param_grads(
        &self,
        dev: &D,
        grads: &mut DeviceTensors<D>,
        spare: &mut UnscaleScratch<D>,
        scaling: DeviceScales<D>,
    ) -> Result<()> {
        let blocks = resblock_tensors(&self.model);
        if scaling.scales.len() != blocks.len() || dev.len(scaling.flags) != blocks.len() {
            return Err(ModelError::Dims(format!(
                "{} scales and {} flags for {} resblocks",
                scaling.scales.len(),
                dev.len(scaling.flags),
                blocks.len()
            )));
        }
        for (r, tensors) in blocks.into_iter().enumerate() {
            for i in tensors {
                let g = &mut grads.bufs[i];
                let len = dev.len(g);
                let s = spare
                    .bufs
                    .iter_mut()
                    .find(|b| dev.len(*b) == len)
                    .ok_or_else(|| ModelError::Dims(format!("no spare of {len} elements")))?;
                dev.fill_zero(s)?;
                dev.grad_unscale_add(s, scaling.flags, r, g, scaling.scales[r])?;
                std::mem::swap(g, s);
            }
        }
        Ok(())
    }

    /// The forward pass and the loss, as [`Transformer::forward`]; with `grad_scale = Some(s)`
    /// the segment logits become the loss gradient times `s`. In f16 the products read `half`
    /// (in f32 it is not read: [`HalfWeights::none`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<A: Act>(
        &self,
        dev: &D,
        params: &DeviceTensors<D>,
        half: &HalfWeights<D>,
        acts: &mut DeviceActs<D, A>,
        text: &[u32],
        image: &[u32],
        grad_scale: Option<f32>,
    ) -> Result<Losses> {
        let m = &self.model;
        let d = m.dims;
        let (b, t, c) = (acts.batch, d.seq_len(), d.d_model);
        let n = b * t;
        if params.bufs.len() != m.table.len() {
            return Err(ModelError::Dims(format!(
                "{} parameter tensors, the model has {}",
                params.bufs.len(),
                m.table.len()
            )));
        }
        m.check_batch(b, text, image)?;
        let p = &params.bufs;
        let g = &m.globals;
        dev.embedding_forward(
            &mut acts.residual[0],
            text,
            image,
            EmbedTableBufs {
                text_emb: &p[g.text_emb],
                text_pos: &p[g.text_pos],
                image_emb: &p[g.image_emb],
                image_row: &p[g.image_row],
                image_col: &p[g.image_col],
            },
            &m.embed_dims(b),
        )?;
        for (l, bp) in m.blocks.iter().enumerate() {
            let (before, here) = acts.layers.split_at_mut(l);
            let la = &mut here[0];
            // ln_1, with layer l−1's residual addition x_l = x_mid + mlp_out fused in.
            match before.last() {
                None => dev.layernorm_forward(
                    None,
                    &mut la.ln1,
                    &mut la.ln1_mean,
                    &mut la.ln1_rstd,
                    &acts.residual[0],
                    None,
                    &p[bp.ln1_w],
                    &p[bp.ln1_b],
                    n,
                    c,
                )?,
                Some(prev) => dev.layernorm_forward(
                    Some(&mut acts.residual[l]),
                    &mut la.ln1,
                    &mut la.ln1_mean,
                    &mut la.ln1_rstd,
                    &prev.x_mid,
                    Some(&prev.mlp_out),
                    &p[bp.ln1_w],
                    &p[bp.ln1_b],
                    n,
                    c,
                )?,
            }
            A::from_product(dev, &mut la.qkv, &mut acts.tmp.c3, |y| {
                Self::linear(
                    dev,
                    y,
                    &la.ln1,
                    A::weight(params, half, bp.qkv_w)?,
                    &p[bp.qkv_b],
                    n,
                    c,
                    3 * c,
                )
            })?;
            dev.attention_forward(
                &mut la.atty,
                &mut la.lse,
                &la.qkv,
                &self.layouts[l],
                b,
                t,
                d.heads,
                d.head_size(),
            )?;
            Self::linear(
                dev,
                &mut la.attn_out,
                &la.atty,
                A::weight(params, half, bp.attn_proj_w)?,
                &p[bp.attn_proj_b],
                n,
                c,
                c,
            )?;
            // ln_2, with x_mid = x_l + attn_out fused in.
            dev.layernorm_forward(
                Some(&mut la.x_mid),
                &mut la.ln2,
                &mut la.ln2_mean,
                &mut la.ln2_rstd,
                &acts.residual[l],
                Some(&la.attn_out),
                &p[bp.ln2_w],
                &p[bp.ln2_b],
                n,
                c,
            )?;
            A::from_product(dev, &mut la.fch, &mut acts.tmp.c4, |y| {
                Self::linear(
                    dev,
                    y,
                    &la.ln2,
                    A::weight(params, half, bp.fc_w)?,
                    &p[bp.fc_b],
                    n,
                    c,
                    4 * c,
                )
            })?;
            dev.gelu_forward(&mut la.fch_gelu, &la.fch)?;
            Self::linear(
                dev,
                &mut la.mlp_out,
                &la.fch_gelu,
                A::weight(params, half, bp.mlp_proj_w)?,
                &p[bp.mlp_proj_b],
                n,
                4 * c,
                c,
            )?;
        }
        // ln_f, with the last layer's residual addition fused in.
        let last = &acts.layers[d.layers - 1];
        dev.layernorm_forward(
            Some(&mut acts.residual[d.layers]),
            &mut acts.lnf,
            &mut acts.lnf_mean,
            &mut acts.lnf_rstd,
            &last.x_mid,
            Some(&last.mlp_out),
            &p[g.lnf_w],
            &p[g.lnf_b],
            n,
            c,
        )?;
        // The head, per segment: batched products over the samples, reading ln_f's rows that
        // predict each segment in place.
        let (tt, gi) = (d.text_len, d.image_tokens());
        let (vr, vi) = (d.text_rows(), d.image_vocab);
        let head = &p[g.head];
        let text_spec = GemmSpec {
            b_t: true,
            batch: b,
            offsets: [0, 0, 0],
            strides: [t * c, 0, (tt - 1) * vr],
            ..GemmSpec::new(tt - 1, vr, c)
        };
        dev.gemm(&mut acts.text_logits, &acts.lnf, head, &text_spec)?;
        let image_spec = GemmSpec {
            b_t: true,
            batch: b,
            offsets: [(tt - 1) * c, vr * c, 0],
            strides: [t * c, 0, gi * vi],
            ..GemmSpec::new(gi, vi, c)
        };
        dev.gemm(&mut acts.image_logits, &acts.lnf, head, &image_spec)?;
        let (nt, ni) = (b * (tt - 1), b * gi);
        let mut text_targets = vec![0u32; nt];
        for bi in 0..b {
            for pos in 0..tt - 1 {
                text_targets[bi * (tt - 1) + pos] = text[bi * tt + pos + 1];
            }
        }
        let text_targets = dev.upload(&text_targets)?;
        let image_targets = dev.upload(image)?;
        match grad_scale {
            Some(s) => {
                let st = s * TEXT_LOSS_WEIGHT / nt as f32;
                let si = s * (1.0 - TEXT_LOSS_WEIGHT) / ni as f32;
                dev.cross_entropy_fused(
                    &mut acts.text_logits,
                    &mut acts.text_losses,
                    &text_targets,
                    st,
                    nt,
                    vr,
                )?;
                dev.cross_entropy_fused(
                    &mut acts.image_logits,
                    &mut acts.image_losses,
                    &image_targets,
                    si,
                    ni,
                    vi,
                )?;
            }
            None => {
                dev.cross_entropy_forward(
                    &mut acts.text_losses,
                    &acts.text_logits,
                    &text_targets,
                    nt,
                    vr,
                )?;
                dev.cross_entropy_forward(
                    &mut acts.image_losses,
                    &acts.image_logits,
                    &image_targets,
                    ni,
                    vi,
                )?;
            }
        }
        let mean = |v: Vec<f32>| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let lt = mean(dev.download(&acts.text_losses)?);
        let li = mean(dev.download(&acts.image_losses)?);
        Ok(Losses {
            loss: TEXT_LOSS_WEIGHT as f64 * lt + (1.0 - TEXT_LOSS_WEIGHT as f64) * li,
            text: lt,
            image: li,
        })
    }

    /// The backward pass after `forward(.., Some(scale))`: accumulates into `grads`. With
    /// `scaling`, as [`Transformer::backward_scaled`]: each resblock runs on its incoming
    /// gradient times its scale (stored as `A`; non-finite values zeroed and the block's flag
    /// raised), its outgoing gradient, rounded to `A`, is divided by the scale into the residual
    /// gradient, and its parameter gradients accumulate in scaled units (end the update with
    /// [`Self::unscale_param_grads`]). f16 needs `scaling`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<A: Act>(
        &self,
        dev: &D,
        params: &DeviceTensors<D>,
        half: &HalfWeights<D>,
        grads: &mut DeviceTensors<D>,
        acts: &mut DeviceActs<D, A>,
        text: &[u32],
        image: &[u32],
        mut scaling: Option<DeviceScales<D>>,
    ) -> Result<()> {
        let m = &self.model;
        let d = m.dims;
        let (b, t, c) = (acts.batch, d.seq_len(), d.d_model);
        let n = b * t;
        let (tt, gi) = (d.text_len, d.image_tokens());
        let (vr, vi) = (d.text_rows(), d.image_vocab);
        if let Some(sc) = &scaling {
            let want = 2 * d.layers;
            if sc.scales.len() != want || dev.len(sc.flags) != want {
                return Err(ModelError::Dims(format!(
                    "{} scales and {} flags for {want} resblocks",
                    sc.scales.len(),
                    dev.len(sc.flags)
                )));
            }
        }
        let p = &params.bufs;
        let gr = &mut grads.bufs;
        let g = m.globals;

        // Head: d(ln_f output) per segment (rows T−1 stay zero), then d(head).
        let text_spec = GemmSpec {
            batch: b,
            offsets: [0, 0, 0],
            strides: [(tt - 1) * vr, 0, t * c],
            ..GemmSpec::new(tt - 1, c, vr)
        };
        dev.gemm(&mut acts.dlnf, &acts.text_logits, &p[g.head], &text_spec)?;
        let image_spec = GemmSpec {
            batch: b,
            offsets: [0, vr * c, (tt - 1) * c],
            strides: [gi * vi, 0, t * c],
            ..GemmSpec::new(gi, c, vi)
        };
        dev.gemm(&mut acts.dlnf, &acts.image_logits, &p[g.head], &image_spec)?;
        for bi in 0..b {
            let text_dw = GemmSpec {
                a_t: true,
                accumulate: true,
                offsets: [bi * (tt - 1) * vr, bi * t * c, 0],
                ..GemmSpec::new(vr, c, tt - 1)
            };
            dev.gemm(&mut gr[g.head], &acts.text_logits, &acts.lnf, &text_dw)?;
            let image_dw = GemmSpec {
                a_t: true,
                accumulate: true,
                offsets: [bi * gi * vi, bi * t * c + (tt - 1) * c, vr * c],
                ..GemmSpec::new(vi, c, gi)
            };
            dev.gemm(&mut gr[g.head], &acts.image_logits, &acts.lnf, &image_dw)?;
        }
        // Accumulated into by every layer normalisation below: zeroed in place, not reallocated.
        dev.fill_zero(&mut acts.dresidual)?;
        {
            let (dw, db) = pair(gr, g.lnf_w, g.lnf_b);
            dev.layernorm_backward(
                &mut acts.dresidual,
                dw,
                db,
                &acts.dlnf,
                &acts.residual[d.layers],
                &p[g.lnf_w],
                &acts.lnf_mean,
                &acts.lnf_rstd,
                n,
                c,
            )?;
        }
        for (l, bp) in m.blocks.iter().enumerate().rev() {
            let la = &acts.layers[l];
            // MLP block; dresidual holds d(x_next).
            let i = GradScaler::mlp(l);
            if let Some(sc) = &mut scaling {
                dev.grad_scale(&mut acts.dblock, sc.flags, i, &acts.dresidual, sc.scales[i])?;
            }
            {
                let dout = match scaling {
                    Some(_) => &acts.dblock,
                    None => A::unscaled::<D>(&acts.dresidual)?,
                };
                let (dw, db) = pair(gr, bp.mlp_proj_w, bp.mlp_proj_b);
                Self::linear_backward(
                    dev,
                    &mut acts.dfch_gelu,
                    &mut acts.tmp.c4,
                    dw,
                    db,
                    dout,
                    &la.fch_gelu,
                    A::weight(params, half, bp.mlp_proj_w)?,
                    n,
                    4 * c,
                    c,
                )?;
            }
            dev.gelu_backward(&mut acts.dfch, &acts.dfch_gelu, &la.fch)?;
            {
                let (dw, db) = pair(gr, bp.fc_w, bp.fc_b);
                Self::linear_backward(
                    dev,
                    &mut acts.dln,
                    &mut acts.tmp.c,
                    dw,
                    db,
                    &acts.dfch,
                    &la.ln2,
                    A::weight(params, half, bp.fc_w)?,
                    n,
                    c,
                    4 * c,
                )?;
            }
            {
                let (dw, db) = pair(gr, bp.ln2_w, bp.ln2_b);
                Self::block_input_grad(
                    dev,
                    &mut acts.dresidual,
                    &mut acts.dblock,
                    &mut acts.tmp.c,
                    &mut scaling,
                    i,
                    |dinp| {
                        Ok(dev.layernorm_backward(
                            dinp,
                            dw,
                            db,
                            &acts.dln,
                            &la.x_mid,
                            &p[bp.ln2_w],
                            &la.ln2_mean,
                            &la.ln2_rstd,
                            n,
                            c,
                        )?)
                    },
                )?;
            }
            // Attention block; dresidual holds d(x_mid).
            let i = GradScaler::attn(l);
            if let Some(sc) = &mut scaling {
                dev.grad_scale(&mut acts.dblock, sc.flags, i, &acts.dresidual, sc.scales[i])?;
            }
            {
                let dout = match scaling {
                    Some(_) => &acts.dblock,
                    None => A::unscaled::<D>(&acts.dresidual)?,
                };
                let (dw, db) = pair(gr, bp.attn_proj_w, bp.attn_proj_b);
                Self::linear_backward(
                    dev,
                    &mut acts.datty,
                    &mut acts.tmp.c,
                    dw,
                    db,
                    dout,
                    &la.atty,
                    A::weight(params, half, bp.attn_proj_w)?,
                    n,
                    c,
                    c,
                )?;
            }
            dev.attention_backward(
                &mut acts.dqkv,
                &acts.datty,
                &la.qkv,
                &la.atty,
                &la.lse,
                &self.layouts[l],
                b,
                t,
                d.heads,
                d.head_size(),
            )?;
            {
                let (dw, db) = pair(gr, bp.qkv_w, bp.qkv_b);
                Self::linear_backward(
                    dev,
                    &mut acts.dln,
                    &mut acts.tmp.c,
                    dw,
                    db,
                    &acts.dqkv,
                    &la.ln1,
                    A::weight(params, half, bp.qkv_w)?,
                    n,
                    c,
                    3 * c,
                )?;
            }
            let (dw, db) = pair(gr, bp.ln1_w, bp.ln1_b);
            Self::block_input_grad(
                dev,
                &mut acts.dresidual,
                &mut acts.dblock,
                &mut acts.tmp.c,
                &mut scaling,
                i,
                |dinp| {
                    Ok(dev.layernorm_backward(
                        dinp,
                        dw,
                        db,
                        &acts.dln,
                        &acts.residual[l],
                        &p[bp.ln1_w],
                        &la.ln1_mean,
                        &la.ln1_rstd,
                        n,
                        c,
                    )?)
                },
            )?;
        }
        let [te, tp, ie, ir, ic] = gr
            .get_disjoint_mut([
                g.text_emb,
                g.text_pos,
                g.image_emb,
                g.image_row,
                g.image_col,
            ])
            .expect("five distinct tensors");
        dev.embedding_backward(
            EmbedGradBufs {
                text_emb: te,
                text_pos: tp,
                image_emb: ie,
                image_row: ir,
                image_col: ic,
            },
            &acts.dresidual,
            text,
            image,
            &m.embed_dims(b),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
