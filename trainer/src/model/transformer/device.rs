//! The transformer's forward and backward passes on a [`kernels::device::Device`]: the same math
//! as [`Transformer::forward`] / [`Transformer::backward`] (docs/model.md §1), with weights,
//! gradients and activations in device buffers and every operation one of the `kernels` op
//! traits. On `Gpu<Cuda>` this is the GPU step; on `Gpu<Emu>` the same CUDA sources run on the
//! CPU, which is how CI holds it to the CPU model; on `Cpu` it is the references again.
//!
//! fp32 for now: activations and activation gradients are f32 buffers (the fp16 scheme of
//! docs/model.md §5 is [`Transformer::backward_scaled`] on the host).
//!
//! Differences from the host model, none of which changes the math: each linear layer is a
//! product then a bias addition (the host adds the bias inside the product); the residual
//! additions are fused into the next layer normalisation (`x + δ`, as the host adds); the head's
//! two segments are batched products reading the rows of `ln_f`'s output in place instead of
//! gathered copies.

use super::{Losses, ModelError, Result, Transformer, TEXT_LOSS_WEIGHT};
use crate::params::ParamTable;
use kernels::attention::AttentionOps;
use kernels::cross_entropy::CrossEntropyOps;
use kernels::device::Device;
use kernels::embedding::{EmbedGradBufs, EmbedTableBufs, EmbeddingOps};
use kernels::gelu::GeluOps;
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
{
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

/// Per-layer saved activations on the device.
struct LayerBufs<D: Device> {
    ln1: D::Buf<f32>,
    ln1_mean: D::Buf<f32>,
    ln1_rstd: D::Buf<f32>,
    qkv: D::Buf<f32>,
    atty: D::Buf<f32>,
    lse: D::Buf<f32>,
    /// The attention block's output (before the residual addition).
    attn_out: D::Buf<f32>,
    x_mid: D::Buf<f32>,
    ln2: D::Buf<f32>,
    ln2_mean: D::Buf<f32>,
    ln2_rstd: D::Buf<f32>,
    fch: D::Buf<f32>,
    fch_gelu: D::Buf<f32>,
    /// The MLP block's output (before the residual addition).
    mlp_out: D::Buf<f32>,
}

/// The device's activations for one batch size.
pub struct DeviceActs<D: Device> {
    batch: usize,
    /// residual[l]: the input of layer l; residual[L]: the input of ln_f.
    residual: Vec<D::Buf<f32>>,
    layers: Vec<LayerBufs<D>>,
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
    dln: D::Buf<f32>,
    dqkv: D::Buf<f32>,
    datty: D::Buf<f32>,
    dfch: D::Buf<f32>,
    dfch_gelu: D::Buf<f32>,
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

    /// Activations for `batch` sequences.
    pub fn new_acts(&self, dev: &D, batch: usize) -> Result<DeviceActs<D>> {
        let d = self.model.dims;
        let (t, c) = (d.seq_len(), d.d_model);
        let n = batch * t;
        let z = |k: usize| dev.zeros::<f32>(k);
        let nt = batch * (d.text_len - 1);
        let ni = batch * d.image_tokens();
        let mut layers = Vec::with_capacity(d.layers);
        for _ in 0..d.layers {
            layers.push(LayerBufs {
                ln1: z(n * c)?,
                ln1_mean: z(n)?,
                ln1_rstd: z(n)?,
                qkv: z(n * 3 * c)?,
                atty: z(n * c)?,
                lse: z(batch * d.heads * t)?,
                attn_out: z(n * c)?,
                x_mid: z(n * c)?,
                ln2: z(n * c)?,
                ln2_mean: z(n)?,
                ln2_rstd: z(n)?,
                fch: z(n * 4 * c)?,
                fch_gelu: z(n * 4 * c)?,
                mlp_out: z(n * c)?,
            });
        }
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
            dln: z(n * c)?,
            dqkv: z(n * 3 * c)?,
            datty: z(n * c)?,
            dfch: z(n * 4 * c)?,
            dfch_gelu: z(n * 4 * c)?,
        })
    }

    /// `y = x·Wᵀ + b` for `rows` rows: `x` [rows, k], `w` [out, k].
    #[allow(clippy::too_many_arguments)]
    fn linear(
        dev: &D,
        y: &mut D::Buf<f32>,
        x: &D::Buf<f32>,
        w: &D::Buf<f32>,
        b: &D::Buf<f32>,
        rows: usize,
        k: usize,
        out: usize,
    ) -> Result<()> {
        dev.matmul(y, x, false, w, true, (rows, out, k), false)?;
        dev.bias_add(y, b, rows, out)?;
        Ok(())
    }

    /// Backward of [`Self::linear`]: `dx = dy·W` (overwritten), `dW += dyᵀ·x`, `db += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        dev: &D,
        dx: &mut D::Buf<f32>,
        dw: &mut D::Buf<f32>,
        db: &mut D::Buf<f32>,
        dy: &D::Buf<f32>,
        x: &D::Buf<f32>,
        w: &D::Buf<f32>,
        rows: usize,
        k: usize,
        out: usize,
    ) -> Result<()> {
        dev.matmul(dx, dy, false, w, false, (rows, k, out), false)?;
        dev.matmul(dw, dy, true, x, false, (out, k, rows), true)?;
        dev.bias_backward(db, dy, rows, out)?;
        Ok(())
    }

    /// The forward pass and the loss, as [`Transformer::forward`]; with `grad_scale = Some(s)`
    /// the segment logits become the loss gradient times `s`.
    pub fn forward(
        &self,
        dev: &D,
        params: &DeviceTensors<D>,
        acts: &mut DeviceActs<D>,
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
            Self::linear(
                dev,
                &mut la.qkv,
                &la.ln1,
                &p[bp.qkv_w],
                &p[bp.qkv_b],
                n,
                c,
                3 * c,
            )?;
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
                &p[bp.attn_proj_w],
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
            Self::linear(
                dev,
                &mut la.fch,
                &la.ln2,
                &p[bp.fc_w],
                &p[bp.fc_b],
                n,
                c,
                4 * c,
            )?;
            dev.gelu_forward(&mut la.fch_gelu, &la.fch)?;
            Self::linear(
                dev,
                &mut la.mlp_out,
                &la.fch_gelu,
                &p[bp.mlp_proj_w],
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

    /// The backward pass after `forward(.., Some(scale))`: accumulates into `grads`.
    pub fn backward(
        &self,
        dev: &D,
        params: &DeviceTensors<D>,
        grads: &mut DeviceTensors<D>,
        acts: &mut DeviceActs<D>,
        text: &[u32],
        image: &[u32],
    ) -> Result<()> {
        let m = &self.model;
        let d = m.dims;
        let (b, t, c) = (acts.batch, d.seq_len(), d.d_model);
        let n = b * t;
        let (tt, gi) = (d.text_len, d.image_tokens());
        let (vr, vi) = (d.text_rows(), d.image_vocab);
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
            {
                let (dw, db) = pair(gr, bp.mlp_proj_w, bp.mlp_proj_b);
                Self::linear_backward(
                    dev,
                    &mut acts.dfch_gelu,
                    dw,
                    db,
                    &acts.dresidual,
                    &la.fch_gelu,
                    &p[bp.mlp_proj_w],
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
                    dw,
                    db,
                    &acts.dfch,
                    &la.ln2,
                    &p[bp.fc_w],
                    n,
                    c,
                    4 * c,
                )?;
            }
            {
                let (dw, db) = pair(gr, bp.ln2_w, bp.ln2_b);
                dev.layernorm_backward(
                    &mut acts.dresidual,
                    dw,
                    db,
                    &acts.dln,
                    &la.x_mid,
                    &p[bp.ln2_w],
                    &la.ln2_mean,
                    &la.ln2_rstd,
                    n,
                    c,
                )?;
            }
            // Attention block; dresidual holds d(x_mid).
            {
                let (dw, db) = pair(gr, bp.attn_proj_w, bp.attn_proj_b);
                Self::linear_backward(
                    dev,
                    &mut acts.datty,
                    dw,
                    db,
                    &acts.dresidual,
                    &la.atty,
                    &p[bp.attn_proj_w],
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
                    dw,
                    db,
                    &acts.dqkv,
                    &la.ln1,
                    &p[bp.qkv_w],
                    n,
                    c,
                    3 * c,
                )?;
            }
            let (dw, db) = pair(gr, bp.ln1_w, bp.ln1_b);
            dev.layernorm_backward(
                &mut acts.dresidual,
                dw,
                db,
                &acts.dln,
                &acts.residual[l],
                &p[bp.ln1_w],
                &la.ln1_mean,
                &la.ln1_rstd,
                n,
                c,
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
