//! The stage-1 discrete VAE of docs/model.md §2: OpenAI's released encoder and decoder
//! (`dall_e.Encoder`, `dall_e.Decoder`), their parameter names, and the training loss (Gumbel-
//! softmax relaxation, logit-Laplace likelihood, KL to the uniform prior), with explicit forward
//! and backward passes.
//!
//! Both networks are a sequence of [`Layer`]s (a convolution, a residual block, a pooling or an
//! upsampling, the ReLU + 1×1 output convolution) run by one small interpreter, [`Net`], which
//! keeps each layer's input for the backward pass. Layout NCHW throughout.
//!
//! Residual block (`n_hid = n_out / 4`, `post_gain = 1 / (group_count · n_blk_per_group)²`):
//! `out = id_path(x) + post_gain · conv_4(relu(conv_3(relu(conv_2(relu(conv_1(relu(x))))))))`,
//! `id_path` a 1×1 convolution where `n_in ≠ n_out`, else the identity. Encoder kernels 3,3,3,1;
//! decoder kernels 1,3,3,3.

use crate::model::scale_add;
use crate::params::{pair_mut, ParamKind, ParamTable};
use kernels::conv2d::{
    conv2d_backward, conv2d_backward_through_relu, conv2d_forward, conv2d_relu_forward, Conv2dDims,
};
use kernels::relu::relu_forward;
use kernels::resample::{
    maxpool2_backward, maxpool2_forward, upsample2_backward, upsample2_forward,
};
use rayon::prelude::*;

pub mod device;
mod infer;
pub use crate::model::transformer::ModelError;
pub use infer::{
    argmax_codes, for_each_argmax, image_resolution, resolve_weights, tensor_shapes, unmap_pixel,
    DvaeWeights, ImagesError, WeightsError,
};
type Result<T> = std::result::Result<T, ModelError>;

/// Pixel squashing of the logit-Laplace likelihood: x' = (1 − 2ε)·x + ε.
pub use kernels::dvae::LOGIT_LAPLACE_EPS;
use kernels::dvae::{self as kernel_dvae, squash, KlTerm, Likelihood};
/// Groups of residual blocks in each network (OpenAI's architecture).
pub const GROUP_COUNT: usize = 4;

/// How the residual branches train (`relaxation.branch_gain`; docs/dvae-training.md, "Fifth
/// round"). The model's math is OpenAI's either way, post_gain included, and so are the weights
/// written: only the initialisation and the learning rate of each block's last convolution
/// (`res_path.conv_4`, weight and bias) differ.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BranchGain {
    /// OpenAI's: conv_4 drawn like every convolution and stepped at the run's learning rate, so
    /// a branch reaches the block's output at post_gain = 1/(4·n_blk_per_group)² of its size.
    #[default]
    Openai,
    /// As if post_gain were 1: conv_4 drawn 1/post_gain times larger and its Adam step taken at
    /// 1/post_gain times the learning rate (its weight decay unchanged). post_gain · conv_4(W)
    /// = conv_4(post_gain · W) and Adam's step does not depend on the gradient's scale, so this
    /// trains, update for update, the model whose branches enter at gain 1 (but for Adam's ε and
    /// gradient clipping), written in OpenAI's parameterisation: OpenAI's modules load it.
    Unit,
}

impl BranchGain {
    pub fn is_openai(&self) -> bool {
        *self == BranchGain::Openai
    }
}

/// What the decoder reads in training (`relaxation.decoder_input`; docs/dvae-training.md, "Ninth
/// round").
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DecoderInput {
    /// The relaxed sample y = softmax((logits + g)/τ) (the paper's): both networks learn.
    #[default]
    Relaxed,
    /// Each position's one-hot argmax code, without noise: what `trainer reconstruct`,
    /// `data-prep encode` and sampling decode. The decoder alone learns: the loss is the
    /// likelihood only (β must be 0) and the encoder's gradient is zero.
    Argmax,
}

impl DecoderInput {
    pub fn is_relaxed(&self) -> bool {
        *self == DecoderInput::Relaxed
    }
}

/// Whether the parameter `name` is a residual branch's last convolution (weight or bias).
fn is_branch_output(name: &str) -> bool {
    name.ends_with(".res_path.conv_4.w") || name.ends_with(".res_path.conv_4.b")
}

/// Fills `out` with standard Gumbel noise g = −ln(−ln u), u uniform in (0, 1), from ChaCha8
/// seeded with `seed` on stream `stream`: the same (seed, stream) always gives the same noise.
pub fn gumbel_noise(seed: u64, stream: u64, out: &mut [f32]) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    for g in out.iter_mut() {
        // (0, 1): the open interval keeps both logarithms finite (u < 1 in f32 gives
        // ln u ≤ −6e-8, so −ln(−ln u) ≤ 16.6).
        let u: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
        *g = -(-u.ln()).ln();
    }
}

/// The sizes that define the dVAE (docs/model.md §2, OpenAI's hyper-parameter names), and the
/// `model:` section of a run config with `model.kind: dvae` (`config::ModelConfig::Dvae`): one
/// struct for both, one range check ([`DvaeDims::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvaeDims {
    /// Image side H = W in pixels, a positive multiple of 8 (the token grid is resolution / 8).
    /// Required.
    pub resolution: usize,
    /// Base width of both networks, a positive multiple of 4. Required (OpenAI: 256).
    pub n_hid: usize,
    /// Residual blocks per group. ≥ 1. Default 2 (OpenAI's).
    #[serde(default = "default_n_blk_per_group")]
    pub n_blk_per_group: usize,
    /// Codebook size K. ≥ 2. Required (OpenAI: 8192).
    pub vocab_size: usize,
    /// Channels of the decoder's input convolution. ≥ 1. Default 128 (OpenAI's).
    #[serde(default = "default_n_init")]
    pub n_init: usize,
}

fn default_n_blk_per_group() -> usize {
    2
}

fn default_n_init() -> usize {
    128
}

impl DvaeDims {
    /// The one range check of the sizes (the config's validation, [`Dvae::new`] and so
    /// [`DvaeDims::infer`] use it): the field at fault, with what is wrong, every field named
    /// with `prefix` (`"model."` for the config).
    pub fn check(&self, prefix: &str) -> std::result::Result<(), (String, String)> {
        if self.resolution < 8 || !self.resolution.is_multiple_of(8) {
            return Err((
                format!("{prefix}resolution"),
                format!(
                    "{prefix}resolution = {} must be a positive multiple of 8 (the encoder pools \
                     three times)",
                    self.resolution
                ),
            ));
        }
        for (field, value, min) in [
            ("n_hid", self.n_hid, 1),
            ("n_blk_per_group", self.n_blk_per_group, 1),
            ("vocab_size", self.vocab_size, 2),
            ("n_init", self.n_init, 1),
        ] {
            if value < min {
                let field = format!("{prefix}{field}");
                return Err((field.clone(), format!("{field} = {value} must be ≥ {min}")));
            }
        }
        // The first group's residual blocks are n_hid / 4 wide.
        if !self.n_hid.is_multiple_of(4) {
            return Err((
                format!("{prefix}n_hid"),
                format!(
                    "{prefix}n_hid = {} must be a multiple of 4 (the residual blocks' inner \
                     convolutions are n_out / 4 wide)",
                    self.n_hid
                ),
            ));
        }
        Ok(())
    }

    /// Side of the token grid: resolution / 8.
    pub fn grid(&self) -> usize {
        self.resolution / 8
    }
    fn post_gain(&self) -> f32 {
        1.0 / ((GROUP_COUNT * self.n_blk_per_group) as f32).powi(2)
    }
}

/// Indices of one convolution's tensors.
#[derive(Clone, Copy, Debug)]
struct ConvParams {
    w: usize,
    b: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
}

#[derive(Clone, Debug)]
struct BlockSpec {
    id_path: Option<ConvParams>,
    convs: [ConvParams; 4],
}

#[derive(Clone, Debug)]
enum Layer {
    Conv(ConvParams),
    Block(BlockSpec),
    MaxPool,
    Upsample,
    /// ReLU then a convolution (the `output` layer).
    ReluConv(ConvParams),
}

/// Shape of a layer's input: channels and side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    c: usize,
    side: usize,
}

/// One network: its layers, each with its input shape.
#[derive(Clone, Debug)]
struct Net {
    layers: Vec<(Layer, Shape)>,
    out: Shape,
    post_gain: f32,
}

fn push_conv(
    t: &mut ParamTable,
    name: &str,
    c_in: usize,
    c_out: usize,
    kernel: usize,
) -> ConvParams {
    ConvParams {
        w: t.push(
            format!("{name}.w"),
            &[c_out, c_in, kernel, kernel],
            ParamKind::Matrix,
        ),
        b: t.push(format!("{name}.b"), &[c_out], ParamKind::Bias),
        c_in,
        c_out,
        kernel,
    }
}

fn push_block(
    t: &mut ParamTable,
    name: &str,
    n_in: usize,
    n_out: usize,
    kernels: [usize; 4],
) -> BlockSpec {
    let n_hid = n_out / 4;
    let id_path = (n_in != n_out).then(|| push_conv(t, &format!("{name}.id_path"), n_in, n_out, 1));
    let chans = [
        (n_in, n_hid),
        (n_hid, n_hid),
        (n_hid, n_hid),
        (n_hid, n_out),
    ];
    let convs = std::array::from_fn(|i| {
        push_conv(
            t,
            &format!("{name}.res_path.conv_{}", i + 1),
            chans[i].0,
            chans[i].1,
            kernels[i],
        )
    });
    BlockSpec { id_path, convs }
}

impl Net {
    fn encoder(t: &mut ParamTable, d: &DvaeDims) -> Net {
        let mut layers = Vec::new();
        let mut shape = Shape {
            c: 3,
            side: d.resolution,
        };
        let conv = push_conv(t, "encoder.blocks.input", 3, d.n_hid, 7);
        layers.push((Layer::Conv(conv), shape));
        shape.c = d.n_hid;
        for g in 1..=GROUP_COUNT {
            let width = d.n_hid << (g - 1);
            for i in 1..=d.n_blk_per_group {
                let name = format!("encoder.blocks.group_{g}.block_{i}");
                let block = push_block(t, &name, shape.c, width, [3, 3, 3, 1]);
                layers.push((Layer::Block(block), shape));
                shape.c = width;
            }
            if g < GROUP_COUNT {
                layers.push((Layer::MaxPool, shape));
                shape.side /= 2;
            }
        }
        let out = push_conv(t, "encoder.blocks.output.conv", shape.c, d.vocab_size, 1);
        layers.push((Layer::ReluConv(out), shape));
        shape.c = d.vocab_size;
        Net {
            layers,
            out: shape,
            post_gain: d.post_gain(),
        }
    }

    fn decoder(t: &mut ParamTable, d: &DvaeDims) -> Net {
        let mut layers = Vec::new();
        let mut shape = Shape {
            c: d.vocab_size,
            side: d.grid(),
        };
        let conv = push_conv(t, "decoder.blocks.input", d.vocab_size, d.n_init, 1);
        layers.push((Layer::Conv(conv), shape));
        shape.c = d.n_init;
        for g in 1..=GROUP_COUNT {
            let width = d.n_hid << (GROUP_COUNT - g);
            for i in 1..=d.n_blk_per_group {
                let name = format!("decoder.blocks.group_{g}.block_{i}");
                let block = push_block(t, &name, shape.c, width, [1, 3, 3, 3]);
                layers.push((Layer::Block(block), shape));
                shape.c = width;
            }
            if g < GROUP_COUNT {
                layers.push((Layer::Upsample, shape));
                shape.side *= 2;
            }
        }
        let out = push_conv(t, "decoder.blocks.output.conv", shape.c, 6, 1);
        layers.push((Layer::ReluConv(out), shape));
        shape.c = 6;
        Net {
            layers,
            out: shape,
            post_gain: d.post_gain(),
        }
    }

    /// Multiply-adds of one forward pass on `batch` images.
    fn macs(&self, batch: usize) -> usize {
        (self.layers.iter())
            .map(|(layer, shape)| {
                let conv = |cp: &ConvParams| Net::dims(batch, cp, shape.side).macs();
                match layer {
                    Layer::Conv(cp) | Layer::ReluConv(cp) => conv(cp),
                    Layer::Block(b) => {
                        b.convs.iter().map(conv).sum::<usize>() + b.id_path.as_ref().map_or(0, conv)
                    }
                    Layer::MaxPool | Layer::Upsample => 0,
                }
            })
            .sum()
    }

    fn new_acts(&self, batch: usize) -> NetActs {
        let len = |s: &Shape| batch * s.c * s.side * s.side;
        // Gradient buffers: large enough for any layer's input or output gradient.
        let max_len = self
            .layers
            .iter()
            .map(|(_, s)| len(s))
            .chain([len(&self.out)])
            .max()
            .unwrap_or(0);
        NetActs {
            batch,
            inputs: self.layers.iter().map(|(_, s)| vec![0.0; len(s)]).collect(),
            relus: self
                .layers
                .iter()
                .map(|(layer, s)| {
                    let lens = relu_lens(layer, s, batch);
                    lens.into_iter().map(|n| vec![0.0; n]).collect()
                })
                .collect(),
            output: vec![0.0; len(&self.out)],
            scratch: vec![Vec::new(); 2],
            grads: [vec![0.0; max_len], vec![0.0; max_len]],
        }
    }

    fn dims(batch: usize, cp: &ConvParams, side: usize) -> Conv2dDims {
        Conv2dDims {
            batch,
            c_in: cp.c_in,
            c_out: cp.c_out,
            height: side,
            width: side,
            kernel: cp.kernel,
        }
    }

    /// Runs the network on `acts.inputs[0]` (already filled), writing `acts.output`.
    fn forward(&self, p: &[&[f32]], acts: &mut NetActs) -> Result<()> {
        let b = acts.batch;
        for (i, (layer, shape)) in self.layers.iter().enumerate() {
            let (ins, rest) = acts.inputs.split_at_mut(i + 1);
            let y: &mut Vec<f32> = match rest.first_mut() {
                Some(next) => next,
                None => &mut acts.output,
            };
            let scratch = &mut acts.scratch[0];
            self.layer_forward(layer, shape, b, p, &ins[i], y, &mut acts.relus[i], scratch)?;
        }
        Ok(())
    }

    /// One layer on `x` (its input, shape `shape`), writing `y` (its output). `relus` are the
    /// layer's ReLU outputs (of [`relu_lens`]), `scratch` any buffer.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        shape: &Shape,
        b: usize,
        p: &[&[f32]],
        x: &[f32],
        y: &mut [f32],
        relus: &mut [Vec<f32>],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        let planes = b * shape.c;
        match layer {
            Layer::Conv(cp) => {
                conv2d_forward(y, x, p[cp.w], p[cp.b], &Self::dims(b, cp, shape.side))?
            }
            Layer::MaxPool => maxpool2_forward(y, x, planes, shape.side, shape.side)?,
            Layer::Upsample => upsample2_forward(y, x, planes, shape.side, shape.side)?,
            Layer::ReluConv(cp) => {
                relu_forward(&mut relus[0], x)?;
                conv2d_forward(
                    y,
                    &relus[0],
                    p[cp.w],
                    p[cp.b],
                    &Self::dims(b, cp, shape.side),
                )?;
            }
            Layer::Block(blk) => {
                // Residual path into y, scaled, then the identity path added.
                relu_forward(&mut relus[0], x)?;
                for k in 0..3 {
                    let cp = &blk.convs[k];
                    let (src, dst) = relus.split_at_mut(k + 1);
                    conv2d_relu_forward(
                        &mut dst[0],
                        &src[k],
                        p[cp.w],
                        p[cp.b],
                        &Self::dims(b, cp, shape.side),
                    )?;
                }
                let cp = &blk.convs[3];
                conv2d_forward(
                    y,
                    &relus[3],
                    p[cp.w],
                    p[cp.b],
                    &Self::dims(b, cp, shape.side),
                )?;
                let g = self.post_gain;
                match &blk.id_path {
                    Some(ip) => {
                        let id = grow(scratch, y.len());
                        conv2d_forward(id, x, p[ip.w], p[ip.b], &Self::dims(b, ip, shape.side))?;
                        scale_add(y, g, id);
                    }
                    None => scale_add(y, g, x),
                }
            }
        }
        Ok(())
    }

    /// Backward from `dout` (the gradient of `acts.output`); writes the input gradient into
    /// `dinput` when asked. Parameter gradients accumulate into `g`.
    fn backward(
        &self,
        p: &[&[f32]],
        g: &mut [&mut [f32]],
        acts: &mut NetActs,
        dout: &[f32],
        mut dinput: Option<&mut [f32]>,
    ) -> Result<()> {
        let b = acts.batch;
        let [mut dy_buf, mut dx_buf] = std::mem::take(&mut acts.grads);
        // The buffers go back into `acts` whether or not a kernel fails.
        let result = (|| -> Result<()> {
            let max_len = dy_buf.len();
            for s in acts.scratch.iter_mut() {
                grow(s, max_len);
            }
            let mut dy_len = dout.len();
            dy_buf[..dy_len].copy_from_slice(dout);
            for (i, (layer, shape)) in self.layers.iter().enumerate().rev() {
                let x = &acts.inputs[i];
                let relus = &acts.relus[i];
                let planes = b * shape.c;
                let need_dx = i > 0 || dinput.is_some();
                let dy = &dy_buf[..dy_len];
                let dx = &mut dx_buf[..x.len()];
                match layer {
                    Layer::Conv(cp) => {
                        let (dw, db) = pair_mut(g, cp.w, cp.b);
                        conv2d_backward(
                            need_dx.then_some(&mut dx[..]),
                            dw,
                            db,
                            dy,
                            x,
                            p[cp.w],
                            &Self::dims(b, cp, shape.side),
                        )?;
                    }
                    Layer::MaxPool => maxpool2_backward(dx, dy, x, planes, shape.side, shape.side)?,
                    Layer::Upsample => upsample2_backward(dx, dy, planes, shape.side, shape.side)?,
                    Layer::ReluConv(cp) => {
                        let (dw, db) = pair_mut(g, cp.w, cp.b);
                        conv2d_backward_through_relu(
                            Some(dx),
                            dw,
                            db,
                            dy,
                            &relus[0],
                            p[cp.w],
                            &Self::dims(b, cp, shape.side),
                        )?;
                    }
                    Layer::Block(blk) => {
                        let gain = self.post_gain;
                        let [s0, s1] = &mut acts.scratch[..] else {
                            unreachable!("two scratch buffers")
                        };
                        let (mut s0, mut s1) = (s0, s1);
                        // Residual path: d(conv_4 output) = gain · dy.
                        for (a, &v) in s0.iter_mut().zip(dy) {
                            *a = v * gain;
                        }
                        let mut cur = dy.len();
                        for k in (0..4).rev() {
                            let cp = &blk.convs[k];
                            let (dw, db) = pair_mut(g, cp.w, cp.b);
                            let n = relus[k].len();
                            // Through conv_{k+1} and the ReLU that produced relus[k] (for k = 0, the
                            // block input's).
                            conv2d_backward_through_relu(
                                Some(&mut s1[..n]),
                                dw,
                                db,
                                &s0[..cur],
                                &relus[k],
                                p[cp.w],
                                &Self::dims(b, cp, shape.side),
                            )?;
                            std::mem::swap(&mut s0, &mut s1);
                            cur = n;
                        }
                        // s0 now holds the residual path's input gradient; add the identity path's.
                        match &blk.id_path {
                            Some(ip) => {
                                let (dw, db) = pair_mut(g, ip.w, ip.b);
                                conv2d_backward(
                                    Some(&mut dx[..]),
                                    dw,
                                    db,
                                    dy,
                                    x,
                                    p[ip.w],
                                    &Self::dims(b, ip, shape.side),
                                )?;
                                scale_add(dx, 1.0, &s0[..cur]);
                            }
                            None => {
                                dx.copy_from_slice(dy);
                                scale_add(dx, 1.0, &s0[..cur]);
                            }
                        }
                    }
                }
                if i == 0 {
                    if let Some(d) = dinput.take() {
                        d.copy_from_slice(dx);
                    }
                    break;
                }
                std::mem::swap(&mut dy_buf, &mut dx_buf);
                dy_len = x.len();
            }
            Ok(())
        })();
        acts.grads = [dy_buf, dx_buf];
        result
    }
}

/// The first `len` elements of `buf`, growing it when shorter (never shrinking it, so that a
/// buffer reused across layers and steps is zero-filled and faulted in only once).
fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// The lengths of the ReLU outputs a layer keeps (blocks: the inputs of conv_1..conv_4; the
/// output layer: its ReLU), for `batch` images of input shape `s`.
fn relu_lens(layer: &Layer, s: &Shape, batch: usize) -> Vec<usize> {
    let px = batch * s.side * s.side;
    match layer {
        Layer::Block(b) => {
            let hid = b.convs[0].c_out;
            vec![px * s.c, px * hid, px * hid, px * hid]
        }
        Layer::ReluConv(_) => vec![px * s.c],
        _ => Vec::new(),
    }
}

/// Saved activations of one network for one batch size.
#[derive(Debug)]
struct NetActs {
    batch: usize,
    /// inputs[i]: the input of layer i (inputs[0] is the network's input).
    inputs: Vec<Vec<f32>>,
    /// Per layer: the ReLU outputs it keeps (blocks: the inputs of conv_1..conv_4).
    relus: Vec<Vec<Vec<f32>>>,
    output: Vec<f32>,
    scratch: Vec<Vec<f32>>,
    /// The backward pass's output and input gradients of a layer, each as long as the largest
    /// activation (kept between steps: no allocation or page faults per step).
    grads: [Vec<f32>; 2],
}

/// The dVAE definition: sizes, parameter layout and the two networks. Holds no weights.
#[derive(Clone, Debug)]
pub struct Dvae {
    dims: DvaeDims,
    /// The pixels' likelihood in the training loss (logit-Laplace unless set).
    likelihood: Likelihood,
    /// How the residual branches train (OpenAI's unless set).
    branch_gain: BranchGain,
    /// The KL term of the training loss (the paper's per-position one unless set).
    kl_term: KlTerm,
    /// Multiplies the initial draw of `decoder.blocks.input.w` (1 unless set).
    decoder_input_gain: f32,
    /// What the decoder reads in training (the relaxed sample unless set).
    decoder_input: DecoderInput,
    table: ParamTable,
    encoder: Net,
    decoder: Net,
}

/// The terms of one batch's loss (all per-batch sums unless noted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DvaeLosses {
    /// (nll + β·kl) / (B·3·H·W).
    pub loss: f64,
    /// Σ over pixels and channels of the logit-Laplace negative log-likelihood.
    pub nll: f64,
    /// Σ over grid positions of KL(q ‖ uniform).
    pub kl: f64,
}

/// Everything the forward pass keeps for the backward pass, for one batch size.
#[derive(Debug)]
pub struct DvaeActs {
    batch: usize,
    enc: NetActs,
    dec: NetActs,
    /// Squashed pixels x' [B, 3, H, W] in f32: the encoder's input.
    x_mapped: Vec<f32>,
    /// The input pixels in [0, 1]; the loss squashes them again in f64.
    images: Vec<f32>,
    /// The relaxed codes y = softmax((logits + g)/τ) [B, K, h, w] (the decoder's input).
    y: Vec<f32>,
    tau: f32,
    beta: f32,
    /// With `relaxation.kl: batch`, the batch's average code distribution q̄ [K] (f64).
    q_bar: Vec<f64>,
    /// Backward-pass buffers kept between steps: d loss / d stats, / d y, / d logits.
    dstats: Vec<f32>,
    dy: Vec<f32>,
    dlogits: Vec<f32>,
}

impl NetActs {
    /// f32 elements held by the buffers allocated up front (not the lazily sized scratch).
    fn floats(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum::<usize>()
            + self.relus.iter().flatten().map(Vec::len).sum::<usize>()
            + self.output.len()
            + self.grads.iter().map(Vec::len).sum::<usize>()
    }
}

impl DvaeActs {
    /// f32 elements allocated by [`Dvae::new_acts`] (the convolutions' im2col scratch and the
    /// backward buffers sized on first use are not included): what `crate::memory` estimates
    /// from the config before anything is allocated.
    pub fn floats(&self) -> usize {
        self.enc.floats()
            + self.dec.floats()
            + self.x_mapped.len()
            + self.images.len()
            + self.y.len()
    }

    /// Encoder logits [B, K, H/8, W/8] of the last forward pass.
    pub fn logits(&self) -> &[f32] {
        &self.enc.output
    }
    /// The relaxed codes y = softmax((logits + g)/τ) [B, K, H/8, W/8] of the last forward pass
    /// (what the decoder read).
    pub fn relaxed(&self) -> &[f32] {
        &self.y
    }
    /// Decoder statistics [B, 6, H, W] (μ, then ln b) of the last forward pass.
    pub fn stats(&self) -> &[f32] {
        &self.dec.output
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl Dvae {
    pub fn new(dims: DvaeDims) -> Result<Self> {
        let d = dims;
        d.check("")
            .map_err(|(_, message)| ModelError::Dims(message))?;
        let mut table = ParamTable::new();
        let encoder = Net::encoder(&mut table, &d);
        let decoder = Net::decoder(&mut table, &d);
        Ok(Dvae {
            dims,
            likelihood: Likelihood::LogitLaplace,
            branch_gain: BranchGain::Openai,
            kl_term: KlTerm::Position,
            decoder_input_gain: 1.0,
            decoder_input: DecoderInput::Relaxed,
            table,
            encoder,
            decoder,
        })
    }

    pub fn dims(&self) -> &DvaeDims {
        &self.dims
    }

    /// The same model with `likelihood` in its training loss.
    pub fn with_likelihood(mut self, likelihood: Likelihood) -> Self {
        self.likelihood = likelihood;
        self
    }

    pub fn likelihood(&self) -> Likelihood {
        self.likelihood
    }

    /// The same model with its residual branches trained as `gain` says: sets the learning-rate
    /// multiplier of every `res_path.conv_4` tensor in [`Dvae::table`] (1/post_gain for
    /// [`BranchGain::Unit`]), and [`Dvae::init_params`] draws them that much larger.
    pub fn with_branch_gain(mut self, gain: BranchGain) -> Self {
        self.branch_gain = gain;
        let scale = self.branch_init_scale();
        let branch: Vec<usize> = (self.table.specs().iter().enumerate())
            .filter(|(_, s)| is_branch_output(&s.name))
            .map(|(i, _)| i)
            .collect();
        for i in branch {
            self.table.set_lr_scale(i, scale);
        }
        self
    }

    pub fn branch_gain(&self) -> BranchGain {
        self.branch_gain
    }

    /// The same model with `kl` as the KL term of its training loss.
    pub fn with_kl_term(mut self, kl: KlTerm) -> Self {
        self.kl_term = kl;
        self
    }

    pub fn kl_term(&self) -> KlTerm {
        self.kl_term
    }

    /// The same model with [`Dvae::init_params`] drawing the decoder's input convolution
    /// (`decoder.blocks.input.w`) `gain` times larger. Its input is one code's one-hot vector, so
    /// its output is one column of that weight, U(±1/√K) at gain 1: small beside the biases
    /// when K is large; √K makes the columns U(±1).
    pub fn with_decoder_input_gain(mut self, gain: f32) -> Self {
        self.decoder_input_gain = gain;
        self
    }

    /// The same model training its decoder on `input` ([`DecoderInput`]).
    pub fn with_decoder_input(mut self, input: DecoderInput) -> Self {
        self.decoder_input = input;
        self
    }

    pub fn decoder_input(&self) -> DecoderInput {
        self.decoder_input
    }

    /// 1/post_gain for [`BranchGain::Unit`], else 1.
    fn branch_init_scale(&self) -> f32 {
        match self.branch_gain {
            BranchGain::Openai => 1.0,
            BranchGain::Unit => 1.0 / self.dims.post_gain(),
        }
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Useful floating-point operations of one training step on `batch` images: 6 per
    /// multiply-add of every convolution (forward, input gradient, weight gradient); 2 for the
    /// encoder's when only the decoder learns ([`DecoderInput::Argmax`]: no encoder backward).
    pub fn train_flops(&self, batch: usize) -> f64 {
        let encoder = match self.decoder_input {
            DecoderInput::Relaxed => 6.0,
            DecoderInput::Argmax => 2.0,
        };
        encoder * self.encoder.macs(batch) as f64 + 6.0 * self.decoder.macs(batch) as f64
    }

    pub fn new_acts(&self, batch: usize) -> DvaeActs {
        let d = &self.dims;
        let codes = batch * d.vocab_size * d.grid() * d.grid();
        DvaeActs {
            batch,
            enc: self.encoder.new_acts(batch),
            dec: self.decoder.new_acts(batch),
            x_mapped: vec![0.0; batch * 3 * d.resolution * d.resolution],
            images: vec![0.0; batch * 3 * d.resolution * d.resolution],
            y: vec![0.0; codes],
            tau: 1.0,
            beta: 0.0,
            q_bar: Vec::new(),
            dstats: Vec::new(),
            dy: Vec::new(),
            dlogits: Vec::new(),
        }
    }

    /// PyTorch's default initialisation of a convolution (kaiming-uniform weights with a = √5,
    /// i.e. U(±1/√fan_in), and biases U(±1/√fan_in)), deterministic in `seed`.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut buf = vec![0.0; self.table.numel()];
        let specs = self.table.specs().to_vec();
        for (i, view) in self.table.split_mut(&mut buf).into_iter().enumerate() {
            // A bias shares its convolution's fan-in: the weight just before it in the table.
            let w = if specs[i].kind == ParamKind::Bias {
                &specs[i - 1]
            } else {
                &specs[i]
            };
            let fan_in: usize = w.shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let scale = match specs[i].name.as_str() {
                "decoder.blocks.input.w" => self.decoder_input_gain,
                name if is_branch_output(name) => self.branch_init_scale(),
                _ => 1.0,
            };
            for x in view.iter_mut() {
                *x = rng.random_range(-bound..bound) * scale;
            }
        }
        buf
    }

    /// Forward pass and loss on `images` [B, 3, H, W] in [0, 1]. `noise`, when given, is the
    /// Gumbel noise g [B, K, h, w] added to the logits before the relaxation; `None` means no
    /// noise (debug-state and evaluation).
    pub fn forward(
        &self,
        params: &[f32],
        acts: &mut DvaeActs,
        images: &[f32],
        noise: Option<&[f32]>,
        tau: f32,
        beta: f32,
    ) -> Result<DvaeLosses> {
        let d = self.dims;
        let b = acts.batch;
        let npx = b * 3 * d.resolution * d.resolution;
        if images.len() != npx {
            return Err(ModelError::Dims(format!(
                "images hold {} values, expected B·3·H·W = {b}·3·{r}·{r} = {npx}",
                images.len(),
                r = d.resolution
            )));
        }
        if let Some(i) = images.iter().position(|v| !(0.0..=1.0).contains(v)) {
            return Err(ModelError::Dims(format!(
                "pixel {i} = {} is outside [0, 1]",
                images[i]
            )));
        }
        if tau.is_nan() || tau <= 0.0 {
            return Err(ModelError::Dims(format!("tau = {tau} must be > 0")));
        }
        if self.decoder_input == DecoderInput::Argmax && beta != 0.0 {
            return Err(ModelError::Dims(format!(
                "beta = {beta}: with the argmax codes as the decoder's input only the decoder \
                 learns, and the KL term would move the encoder; beta must be 0"
            )));
        }
        let p = self.table.split(params);
        for (m, &x) in acts.x_mapped.iter_mut().zip(images) {
            *m = squash(x) as f32;
        }
        acts.images.copy_from_slice(images);
        acts.enc.inputs[0].copy_from_slice(&acts.x_mapped);
        self.encoder.forward(&p, &mut acts.enc)?;
        let (k, hw) = (d.vocab_size, d.grid() * d.grid());
        // y = softmax over K of (logits + g)/τ, per position.
        let logits = &acts.enc.output;
        if let Some(g) = noise {
            if g.len() != logits.len() {
                return Err(ModelError::Dims(format!(
                    "noise holds {} values, the logits {}",
                    g.len(),
                    logits.len()
                )));
            }
        }
        match self.decoder_input {
            // Images in parallel (kernels::dvae's reference, image by image).
            DecoderInput::Relaxed => {
                acts.y
                    .par_chunks_mut(k * hw)
                    .enumerate()
                    .try_for_each(|(bi, y)| {
                        let logits = &logits[bi * k * hw..][..k * hw];
                        let noise = noise.map(|g| &g[bi * k * hw..][..k * hw]);
                        kernel_dvae::gumbel_softmax_forward(y, logits, noise, tau, 1, k, hw)
                    })?
            }
            DecoderInput::Argmax => match argmax_codes(logits, k, hw) {
                Ok(codes) => infer::write_one_hot(&mut acts.y, &codes, k, hw)?,
                // A non-finite logit has no argmax: the loss is then NaN, as the relaxed sample
                // makes it, and the optimizer skips the update.
                Err(_) => acts.y.fill(f32::NAN),
            },
        }
        acts.dec.inputs[0].copy_from_slice(&acts.y);
        self.decoder.forward(&p, &mut acts.dec)?;
        acts.tau = tau;
        acts.beta = beta;
        acts.q_bar = match self.kl_term {
            KlTerm::Position => Vec::new(),
            KlTerm::Batch => kernel_dvae::batch_code_distribution(&acts.enc.output, b, k, hw)?,
        };
        let (nll, kl) = (self.nll(acts), self.kl(acts));
        Ok(DvaeLosses {
            loss: (nll + beta as f64 * kl) / npx as f64,
            nll,
            kl,
        })
    }

    /// Σ over pixels and channels of the likelihood's negative log (logit-Laplace: log(2b) +
    /// log(x'(1−x')) + |logit(x') − μ| / b): one partial sum per image (images in parallel,
    /// kernels::dvae's reference), added in image order.
    fn nll(&self, acts: &DvaeActs) -> f64 {
        let px = self.dims.resolution * self.dims.resolution;
        let per_image: Vec<f64> = (0..acts.batch)
            .into_par_iter()
            .map(|bi| {
                let images = &acts.images[bi * 3 * px..][..3 * px];
                let stats = &acts.dec.output[bi * 6 * px..][..6 * px];
                kernel_dvae::nll(self.likelihood, stats, images, 1, px)
                    .expect("sizes of the model's own buffers")
            })
            .collect();
        per_image.iter().sum()
    }

    /// Σ over positions of Σ_k q log q + log K, q = softmax(logits) (no noise): one partial sum per
    /// image (images in parallel, kernels::dvae's reference), added in image order.
    /// With `relaxation.kl: batch`, N·KL(q̄ ‖ uniform) over the batch's N positions instead.
    fn kl(&self, acts: &DvaeActs) -> f64 {
        let (k, hw) = (self.dims.vocab_size, self.dims.grid() * self.dims.grid());
        if self.kl_term == KlTerm::Batch {
            return kernel_dvae::kl_batch(&acts.q_bar, acts.batch * hw);
        }
        let per_image: Vec<f64> = (0..acts.batch)
            .into_par_iter()
            .map(|bi| {
                let logits = &acts.enc.output[bi * k * hw..][..k * hw];
                kernel_dvae::kl_uniform(logits, 1, k, hw).expect("sizes of the model's own buffers")
            })
            .collect();
        per_image.iter().sum()
    }

    /// The backward pass after [`Self::forward`]: accumulates (`+=`) the gradient of
    /// `loss · scale` into `grads` (the noise is already inside the saved relaxed codes).
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut DvaeActs,
        scale: f32,
    ) -> Result<()> {
        let d = self.dims;
        let b = acts.batch;
        let px = d.resolution * d.resolution;
        let npx = (b * 3 * px) as f64;
        let p = self.table.split(params);
        let mut g = self.table.split_mut(grads);
        let s = scale as f64 / npx;
        // d loss / d stats, images in parallel.
        let mut dstats = std::mem::take(&mut acts.dstats);
        dstats.resize(acts.dec.output.len(), 0.0);
        dstats
            .par_chunks_mut(6 * px)
            .enumerate()
            .try_for_each(|(bi, dstats)| {
                let images = &acts.images[bi * 3 * px..][..3 * px];
                let stats = &acts.dec.output[bi * 6 * px..][..6 * px];
                kernel_dvae::nll_backward(self.likelihood, dstats, stats, images, s, 1, px)
            })?;
        if self.decoder_input == DecoderInput::Argmax {
            // The codes are the logits' argmax, a step function of them: nothing reaches the
            // encoder (its gradient stays as it was), and the decoder's input needs none.
            self.decoder
                .backward(&p, &mut g, &mut acts.dec, &dstats, None)?;
            acts.dstats = dstats;
            return Ok(());
        }
        let mut dy = std::mem::take(&mut acts.dy);
        dy.resize(acts.y.len(), 0.0);
        self.decoder
            .backward(&p, &mut g, &mut acts.dec, &dstats, Some(&mut dy))?;
        // Through y = softmax((l + g)/τ) and the KL term, into d logits; images in parallel.
        let (k, hw) = (d.vocab_size, d.grid() * d.grid());
        let mut dlogits = std::mem::take(&mut acts.dlogits);
        dlogits.resize(acts.enc.output.len(), 0.0);
        let beta = acts.beta as f64;
        dlogits
            .par_chunks_mut(k * hw)
            .enumerate()
            .try_for_each(|(bi, dlogits)| {
                let r = bi * k * hw..(bi + 1) * k * hw;
                let logits = &acts.enc.output[r.clone()];
                let (y, dy) = (&acts.y[r.clone()], &dy[r]);
                match self.kl_term {
                    KlTerm::Position => {
                        let kl = Some((logits, s * beta));
                        kernel_dvae::relaxation_backward(dlogits, y, dy, kl, acts.tau, 1, k, hw)
                    }
                    KlTerm::Batch => {
                        kernel_dvae::relaxation_backward(dlogits, y, dy, None, acts.tau, 1, k, hw)?;
                        let q_bar = &acts.q_bar;
                        kernel_dvae::kl_batch_backward(dlogits, logits, q_bar, s * beta, 1, k, hw)
                    }
                }
            })?;
        self.encoder
            .backward(&p, &mut g, &mut acts.enc, &dlogits, None)?;
        (acts.dstats, acts.dy, acts.dlogits) = (dstats, dy, dlogits);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
