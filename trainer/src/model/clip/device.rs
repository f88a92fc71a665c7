//! CLIP's vision tower on a [`kernels::device::Device`], for embedding images
//! (`data-prep embed --device`): the forward pass of [`Clip::image_forward`] in f32 with the
//! encoder's weights and activations in device buffers, inference only (CLIP trains on the CPU).
//!
//! What runs where, per batch:
//! - host: the patches as rows ([`ops::patches`], a copy), then the class token and the position
//!   embedding added to the patch embedding (a few MB, one round trip);
//! - device: the patch embedding (one product), `pre_layrnorm`, and every encoder layer: layer
//!   norm, the `[3C, C]` projection and its bias, dense attention under an all-ones mask
//!   (`kernels::dense_attention::DenseAttention`), the output projection, the residual addition
//!   fused into the next layer norm (`LayerNormOps`'s `x + delta`), `fc1`, the activation
//!   (`GeluOps`: quick-GELU, exact or tanh GELU), `fc2`;
//! - host: the last residual comes back and the head runs as on the CPU (`post_layernorm` of the
//!   class token, `visual_projection`, L2 normalisation: B rows).
//!
//! Against [`Clip::image_forward`] the math is the same; the sums run in another order (cuBLAS's
//! or the emulator's products, the kernels' reductions), so the embeddings agree to round-off,
//! not bit for bit (`tests.rs` holds them within 1e-5).

use super::ops::{self, Activation};
use super::{attention_mask, Clip, ClipError, HeadActs, Result};
use kernels::dense_attention::{DenseAttention, MaskedSoftmaxOps};
use kernels::device::Device;
use kernels::gelu::GeluOps;
use kernels::layernorm::LayerNormOps;
use kernels::linear::{BiasOps, MatmulOps};
use kernels::scale_add::ScaleAddOps;

/// Everything the vision tower's forward pass needs from a device.
pub trait ClipDevice:
    Device + LayerNormOps + MatmulOps + BiasOps + GeluOps + MaskedSoftmaxOps + ScaleAddOps
{
}

impl<D> ClipDevice for D where
    D: Device + LayerNormOps + MatmulOps + BiasOps + GeluOps + MaskedSoftmaxOps + ScaleAddOps
{
}

/// One encoder layer's tensors on the device (`qkv` is the `[3C, C]` of the three projections).
struct LayerWeights<D: Device> {
    ln1_w: D::Buf<f32>,
    ln1_b: D::Buf<f32>,
    qkv_w: D::Buf<f32>,
    qkv_b: D::Buf<f32>,
    out_w: D::Buf<f32>,
    out_b: D::Buf<f32>,
    ln2_w: D::Buf<f32>,
    ln2_b: D::Buf<f32>,
    fc1_w: D::Buf<f32>,
    fc1_b: D::Buf<f32>,
    fc2_w: D::Buf<f32>,
    fc2_b: D::Buf<f32>,
}

/// The activations of one batch on the device.
struct Buffers<D: Device> {
    /// The residual stream before a layer (and after `pre_layrnorm`).
    x: D::Buf<f32>,
    /// The residual stream after a layer's attention block.
    x_mid: D::Buf<f32>,
    /// A block's output (attention, then MLP), added to the residual by the next layer norm.
    delta: D::Buf<f32>,
    ln: D::Buf<f32>,
    mean: D::Buf<f32>,
    rstd: D::Buf<f32>,
    qkv: D::Buf<f32>,
    att: D::Buf<f32>,
    h: D::Buf<f32>,
    a: D::Buf<f32>,
    patch_out: D::Buf<f32>,
}

/// The vision tower of one model on one device, with buffers for batches of `batch` images.
pub struct DeviceImageTower<D: ClipDevice> {
    batch: usize,
    patch_w: D::Buf<f32>,
    pre_ln: (D::Buf<f32>, D::Buf<f32>),
    layers: Vec<LayerWeights<D>>,
    act: Activation,
    attn: DenseAttention<D, f32>,
    bufs: Buffers<D>,
    patches: Vec<f32>,
    emb: Vec<f32>,
    head: HeadActs,
}

impl<D: ClipDevice> DeviceImageTower<D> {
    /// Uploads the vision tower's weights from `params` (laid out by `model.table()`) and
    /// allocates the activations of `batch` images.
    pub fn new(dev: &D, model: &Clip, params: &[f32], batch: usize) -> Result<Self> {
        model.check_params(params.len())?;
        if batch == 0 {
            return Err(ClipError::Input("batch size 0".into()));
        }
        let d = model.dims();
        let v = &d.vision_config;
        let (c, i, t) = (v.hidden_size, v.intermediate_size, d.num_patches() + 1);
        let n = batch * t;
        let row = v.num_channels * v.patch_size * v.patch_size;
        let up = |r: &std::ops::Range<usize>| dev.upload(&params[r.clone()]);
        let layers = model
            .vision
            .layers
            .iter()
            .map(|lp| {
                Ok(LayerWeights {
                    ln1_w: up(&lp.ln1_w)?,
                    ln1_b: up(&lp.ln1_b)?,
                    qkv_w: up(&lp.qkv_w)?,
                    qkv_b: up(&lp.qkv_b)?,
                    out_w: up(&lp.out_w)?,
                    out_b: up(&lp.out_b)?,
                    ln2_w: up(&lp.ln2_w)?,
                    ln2_b: up(&lp.ln2_b)?,
                    fc1_w: up(&lp.fc1_w)?,
                    fc1_b: up(&lp.fc1_b)?,
                    fc2_w: up(&lp.fc2_w)?,
                    fc2_b: up(&lp.fc2_b)?,
                })
            })
            .collect::<kernels::Result<Vec<_>>>()?;
        let g = &model.g;
        let heads = v.num_attention_heads;
        let z = |k: usize| dev.zeros::<f32>(k);
        Ok(DeviceImageTower {
            batch,
            patch_w: up(&g.patch_w)?,
            pre_ln: (up(&g.pre_ln_w)?, up(&g.pre_ln_b)?),
            layers,
            act: model.vision.dims.act,
            attn: DenseAttention::with_mask(
                dev,
                &attention_mask(t, false),
                t,
                batch,
                heads,
                c / heads,
            )?,
            bufs: Buffers {
                x: z(n * c)?,
                x_mid: z(n * c)?,
                delta: z(n * c)?,
                ln: z(n * c)?,
                mean: z(n)?,
                rstd: z(n)?,
                qkv: z(n * 3 * c)?,
                att: z(n * c)?,
                h: z(n * i)?,
                a: z(n * i)?,
                patch_out: z(batch * (t - 1) * c)?,
            },
            patches: vec![0.0; batch * (t - 1) * row],
            emb: vec![0.0; n * c],
            head: HeadActs::new(batch, c, d.projection_dim),
        })
    }

    /// The batch size the buffers hold.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// `embeds` [B, D] (L2-normalised `image_embeds`) of `pixels` [B, 3, S, S] for this tower's
    /// batch size B, as [`Clip::image_forward`] computes them. `params` are the host weights the
    /// tower was built from (the embeddings and the head read them).
    pub fn forward(
        &mut self,
        dev: &D,
        model: &Clip,
        params: &[f32],
        pixels: &[f32],
        embeds: &mut [f32],
    ) -> Result<()> {
        let d = model.dims();
        let v = &d.vision_config;
        let (b, c, i, np) = (
            self.batch,
            v.hidden_size,
            v.intermediate_size,
            d.num_patches(),
        );
        let (t, row) = (np + 1, v.num_channels * v.patch_size * v.patch_size);
        let n = b * t;
        let px = b * v.num_channels * v.image_size * v.image_size;
        if pixels.len() != px || embeds.len() != b * d.projection_dim {
            return Err(ClipError::Input(format!(
                "pixel_values has {} values and embeds {}, expected {px} and {} (batch {b})",
                pixels.len(),
                embeds.len(),
                b * d.projection_dim
            )));
        }
        let g = &model.g;
        let bf = &mut self.bufs;
        ops::patches(
            &mut self.patches,
            pixels,
            b,
            v.num_channels,
            v.image_size,
            v.patch_size,
        );
        let patches = dev.upload(&self.patches)?;
        dev.matmul(
            &mut bf.patch_out,
            &patches,
            false,
            &self.patch_w,
            true,
            (b * np, c, row),
            false,
        )?;
        let patch_host = dev.download(&bf.patch_out)?;
        let (class, pos) = (&params[g.class_emb.clone()], &params[g.vision_pos.clone()]);
        for bi in 0..b {
            let e = &mut self.emb[bi * t * c..(bi + 1) * t * c];
            e[..c].copy_from_slice(class);
            e[c..].copy_from_slice(&patch_host[bi * np * c..(bi + 1) * np * c]);
            super::scale_add(e, 1.0, pos);
        }
        let emb = dev.upload(&self.emb)?;
        // residual[0] = pre_layrnorm(emb), in x.
        dev.layernorm_forward(
            None,
            &mut bf.x,
            &mut bf.mean,
            &mut bf.rstd,
            &emb,
            None,
            &self.pre_ln.0,
            &self.pre_ln.1,
            n,
            c,
        )?;
        for (l, lw) in self.layers.iter().enumerate() {
            // ln1 of the residual: x, or from the second layer on x = x_mid + delta (the previous
            // layer's MLP output added here).
            if l == 0 {
                dev.layernorm_forward(
                    None,
                    &mut bf.ln,
                    &mut bf.mean,
                    &mut bf.rstd,
                    &bf.x,
                    None,
                    &lw.ln1_w,
                    &lw.ln1_b,
                    n,
                    c,
                )?;
            } else {
                dev.layernorm_forward(
                    Some(&mut bf.x),
                    &mut bf.ln,
                    &mut bf.mean,
                    &mut bf.rstd,
                    &bf.x_mid,
                    Some(&bf.delta),
                    &lw.ln1_w,
                    &lw.ln1_b,
                    n,
                    c,
                )?;
            }
            linear(
                dev,
                &mut bf.qkv,
                &bf.ln,
                &lw.qkv_w,
                &lw.qkv_b,
                (n, c, 3 * c),
            )?;
            self.attn.forward(dev, &mut bf.att, &bf.qkv)?;
            linear(dev, &mut bf.delta, &bf.att, &lw.out_w, &lw.out_b, (n, c, c))?;
            // x_mid = x + attention; ln2 of it.
            dev.layernorm_forward(
                Some(&mut bf.x_mid),
                &mut bf.ln,
                &mut bf.mean,
                &mut bf.rstd,
                &bf.x,
                Some(&bf.delta),
                &lw.ln2_w,
                &lw.ln2_b,
                n,
                c,
            )?;
            linear(dev, &mut bf.h, &bf.ln, &lw.fc1_w, &lw.fc1_b, (n, c, i))?;
            match self.act {
                Activation::QuickGelu => dev.quick_gelu_forward(&mut bf.a, &bf.h)?,
                Activation::Gelu => dev.gelu_erf_forward(&mut bf.a, &bf.h)?,
                Activation::GeluTanh => dev.gelu_forward(&mut bf.a, &bf.h)?,
            }
            linear(dev, &mut bf.delta, &bf.a, &lw.fc2_w, &lw.fc2_b, (n, i, c))?;
        }
        // The last residual: x_mid + delta (x itself when there are no layers).
        let last = if self.layers.is_empty() {
            dev.download(&bf.x)?
        } else {
            dev.scale_add(&mut bf.x_mid, 1.0, &bf.delta, 1.0)?;
            dev.download(&bf.x_mid)?
        };
        model
            .vision_head()
            .forward(&mut self.head, embeds, params, &last, &vec![0; b], t)
    }
}

/// `out[N, OC] = inp[N, K] · weight[OC, K]ᵀ + bias` on the device.
fn linear<D: ClipDevice>(
    dev: &D,
    out: &mut D::Buf<f32>,
    inp: &D::Buf<f32>,
    weight: &D::Buf<f32>,
    bias: &D::Buf<f32>,
    (n, k, oc): (usize, usize, usize),
) -> Result<()> {
    dev.matmul(out, inp, false, weight, true, (n, oc, k), false)?;
    dev.bias_add(out, bias, n, oc)?;
    Ok(())
}
