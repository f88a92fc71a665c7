//! The dVAE's training step on a [`kernels::device::Device`]: the same math as [`Dvae::forward`]
//! and [`Dvae::backward`] (docs/model.md §2), with weights, gradients and activations in device
//! buffers and every operation one of the `kernels` op traits (convolutions as im2col and
//! products, ReLU, max-pool and upsample, the residual additions, the Gumbel-softmax relaxation,
//! the logit-Laplace likelihood and the KL term). On `Gpu<Cuda>` this is the GPU step; on
//! `Gpu<Emu>` the same CUDA sources run on the CPU, which is how CI holds it to the host model.
//!
//! The host prepares what depends on randomness or on the data: the squashed pixels (the
//! encoder's input), the images and the Gumbel noise are uploaded per micro-batch, so that a run
//! on the device sees the noise a run on the CPU sees.
//!
//! Differences from the host model, none of which changes the math: a ReLU after a convolution
//! is its own kernel (the host fuses it); the input gradient through a ReLU is the convolution's
//! input gradient, then the ReLU's mask; the logit-Laplace gradient is computed with the loss
//! (its scale in f32 rather than f64), the KL term's gradient added to the relaxation's in f32
//! (the host adds them in f64 and rounds once), and the softmax and KL kernels work in f32 where
//! the host works in f64. Every buffer has its own shape (device buffers are not sliced), so the
//! backward pass keeps one input gradient per layer and a few scratch buffers per block, about
//! twice the host's activation memory.

use super::{ConvParams, Dvae, DvaeLosses, Layer, Net, Shape};
use crate::model::transformer::device::DeviceTensors;
use crate::model::transformer::{ModelError, Result};
use kernels::conv2d::Conv2dOps;
use kernels::device::Device;
use kernels::dvae::{DvaeLossOps, KlTerm};
use kernels::relu::ReluOps;
use kernels::resample::ResampleOps;
use kernels::scale_add::ScaleAddOps;

/// Everything the dVAE's passes need from a device.
pub trait DvaeDevice:
    Device + Conv2dOps + ReluOps + ResampleOps + DvaeLossOps + ScaleAddOps
{
}

impl<D> DvaeDevice for D where
    D: Device + Conv2dOps + ReluOps + ResampleOps + DvaeLossOps + ScaleAddOps
{
}

/// One layer's buffers besides its input: the ReLU outputs it keeps (a block: the inputs of
/// conv_1..conv_4; the output layer: its ReLU) and its backward scratch.
struct LayerBufs<D: Device> {
    relus: Vec<D::Buf<f32>>,
    /// A block: post_gain · dy (the residual path's incoming gradient), shaped like its output;
    /// in the forward pass, the identity path's convolution.
    out_like: Option<D::Buf<f32>>,
    /// A block: two [B, n_hid, side, side] gradients (ping-pong); in the forward pass the first
    /// holds a convolution's output before its ReLU.
    hid: Vec<D::Buf<f32>>,
    /// A block or the output layer: a gradient shaped like the layer's input.
    in_like: Option<D::Buf<f32>>,
}

/// One network's buffers for one batch size.
struct NetBufs<D: Device> {
    /// inputs[i]: the input of layer i.
    inputs: Vec<D::Buf<f32>>,
    /// dinputs[i]: the gradient of inputs[i] (layer 0's only where the caller asks for it).
    dinputs: Vec<D::Buf<f32>>,
    layers: Vec<LayerBufs<D>>,
    output: D::Buf<f32>,
    /// The gradient of `output`.
    doutput: D::Buf<f32>,
}

/// The dVAE's device activations for one batch size.
pub struct DeviceDvaeActs<D: Device> {
    batch: usize,
    enc: NetBufs<D>,
    dec: NetBufs<D>,
    /// The pixels in [0, 1] [B, 3, H, W] (the loss squashes them again, in f64).
    images: D::Buf<f32>,
    noise: D::Buf<f32>,
}

impl<D: Device> DeviceDvaeActs<D> {
    /// Encoder logits [B, K, H/8, W/8] of the last step, to the host (metrics).
    pub fn logits(&self, dev: &D) -> Result<Vec<f32>> {
        Ok(dev.download(&self.enc.output)?)
    }
    /// Decoder statistics [B, 6, H, W] of the last step, to the host (metrics).
    pub fn stats(&self, dev: &D) -> Result<Vec<f32>> {
        Ok(dev.download(&self.dec.output)?)
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// Two distinct tensors of `v`, mutably.
fn pair<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    let [a, b] = v.get_disjoint_mut([i, j]).expect("a weight and its bias");
    (a, b)
}

impl Net {
    fn device_bufs<D: Device>(&self, dev: &D, batch: usize, dinput: bool) -> Result<NetBufs<D>> {
        let len = |s: &Shape| batch * s.c * s.side * s.side;
        let mut inputs = Vec::new();
        let mut dinputs = Vec::new();
        let mut layers = Vec::new();
        for (i, (layer, s)) in self.layers.iter().enumerate() {
            inputs.push(dev.zeros(len(s))?);
            let need = i > 0 || dinput;
            dinputs.push(dev.zeros(if need { len(s) } else { 0 })?);
            let relus = super::relu_lens(layer, s, batch)
                .into_iter()
                .map(|n| dev.zeros(n))
                .collect::<kernels::Result<Vec<_>>>()?;
            let px = batch * s.side * s.side;
            let bufs = match layer {
                Layer::Block(b) => LayerBufs {
                    relus,
                    out_like: Some(dev.zeros(px * b.convs[3].c_out)?),
                    hid: vec![
                        dev.zeros(px * b.convs[0].c_out)?,
                        dev.zeros(px * b.convs[0].c_out)?,
                    ],
                    in_like: Some(dev.zeros(len(s))?),
                },
                Layer::ReluConv(_) => LayerBufs {
                    relus,
                    out_like: None,
                    hid: Vec::new(),
                    in_like: Some(dev.zeros(len(s))?),
                },
                _ => LayerBufs {
                    relus,
                    out_like: None,
                    hid: Vec::new(),
                    in_like: None,
                },
            };
            layers.push(bufs);
        }
        Ok(NetBufs {
            inputs,
            dinputs,
            layers,
            output: dev.zeros(len(&self.out))?,
            doutput: dev.zeros(len(&self.out))?,
        })
    }

    /// Runs the network on `bufs.inputs[0]` (already filled), writing `bufs.output`.
    fn device_forward<D: DvaeDevice>(
        &self,
        dev: &D,
        p: &DeviceTensors<D>,
        bufs: &mut NetBufs<D>,
        b: usize,
    ) -> Result<()> {
        let p = &p.bufs;
        for (i, (layer, shape)) in self.layers.iter().enumerate() {
            let (ins, rest) = bufs.inputs.split_at_mut(i + 1);
            let x = &ins[i];
            let y = match rest.first_mut() {
                Some(next) => next,
                None => &mut bufs.output,
            };
            let lb = &mut bufs.layers[i];
            let planes = b * shape.c;
            let dims = |cp: &ConvParams| Net::dims(b, cp, shape.side);
            match layer {
                Layer::Conv(cp) => dev.conv2d_forward(y, x, &p[cp.w], &p[cp.b], &dims(cp))?,
                Layer::MaxPool => dev.maxpool2_forward(y, x, planes, shape.side, shape.side)?,
                Layer::Upsample => dev.upsample2_forward(y, x, planes, shape.side, shape.side)?,
                Layer::ReluConv(cp) => {
                    dev.relu_forward(&mut lb.relus[0], x)?;
                    dev.conv2d_forward(y, &lb.relus[0], &p[cp.w], &p[cp.b], &dims(cp))?;
                }
                Layer::Block(blk) => {
                    dev.relu_forward(&mut lb.relus[0], x)?;
                    let pre = &mut lb.hid[0];
                    for k in 0..3 {
                        let cp = &blk.convs[k];
                        dev.conv2d_forward(pre, &lb.relus[k], &p[cp.w], &p[cp.b], &dims(cp))?;
                        dev.relu_forward(&mut lb.relus[k + 1], pre)?;
                    }
                    let cp = &blk.convs[3];
                    dev.conv2d_forward(y, &lb.relus[3], &p[cp.w], &p[cp.b], &dims(cp))?;
                    // y = post_gain · residual + identity.
                    let g = self.post_gain;
                    match &blk.id_path {
                        Some(ip) => {
                            let id = lb.out_like.as_mut().expect("a block's buffers");
                            dev.conv2d_forward(id, x, &p[ip.w], &p[ip.b], &dims(ip))?;
                            dev.scale_add(y, g, id, 1.0)?;
                        }
                        None => dev.scale_add(y, g, x, 1.0)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// Backward from `bufs.doutput`; the input gradient goes to `bufs.dinputs[0]` when it was
    /// allocated. Parameter gradients accumulate into `g`.
    fn device_backward<D: DvaeDevice>(
        &self,
        dev: &D,
        p: &DeviceTensors<D>,
        g: &mut DeviceTensors<D>,
        bufs: &mut NetBufs<D>,
        b: usize,
    ) -> Result<()> {
        let (p, g) = (&p.bufs, &mut g.bufs);
        let n = self.layers.len();
        for (i, (layer, shape)) in self.layers.iter().enumerate().rev() {
            let x = &bufs.inputs[i];
            let (dins, drest) = bufs.dinputs.split_at_mut(i + 1);
            let dy = if i + 1 < n { &drest[0] } else { &bufs.doutput };
            let need_dx = dev.len(&dins[i]) > 0;
            let dx = &mut dins[i];
            let lb = &mut bufs.layers[i];
            let planes = b * shape.c;
            let dims = |cp: &ConvParams| Net::dims(b, cp, shape.side);
            match layer {
                Layer::Conv(cp) => {
                    let (dw, db) = pair(g, cp.w, cp.b);
                    let dx = need_dx.then_some(dx);
                    dev.conv2d_backward(dx, dw, db, dy, x, &p[cp.w], &dims(cp))?;
                }
                Layer::MaxPool => {
                    dev.maxpool2_backward(dx, dy, x, planes, shape.side, shape.side)?
                }
                Layer::Upsample => {
                    dev.upsample2_backward(dx, dy, planes, shape.side, shape.side)?
                }
                Layer::ReluConv(cp) => {
                    let (dw, db) = pair(g, cp.w, cp.b);
                    let drelu = lb.in_like.as_mut().expect("the output layer's buffers");
                    let r = &lb.relus[0];
                    dev.conv2d_backward(Some(drelu), dw, db, dy, r, &p[cp.w], &dims(cp))?;
                    dev.relu_backward(dx, drelu, r)?;
                }
                Layer::Block(blk) => {
                    let dres = lb.out_like.as_mut().expect("a block's buffers");
                    // The residual path's incoming gradient: post_gain · dy.
                    dev.scale_add(dres, 0.0, dy, self.post_gain)?;
                    let [h0, h1] = &mut lb.hid[..] else {
                        unreachable!("two hidden-width gradients")
                    };
                    // conv_4 … conv_2, each then the ReLU that produced its input: h1 ends as the
                    // gradient of conv_1's output.
                    for k in (1..4).rev() {
                        let cp = &blk.convs[k];
                        let (dw, db) = pair(g, cp.w, cp.b);
                        let r = &lb.relus[k];
                        let dout = if k == 3 { &*dres } else { &*h1 };
                        dev.conv2d_backward(Some(h0), dw, db, dout, r, &p[cp.w], &dims(cp))?;
                        dev.relu_backward(h1, h0, r)?;
                    }
                    // conv_1 and the block input's ReLU: the residual path's input gradient.
                    let cp = &blk.convs[0];
                    let (dw, db) = pair(g, cp.w, cp.b);
                    let dr0 = lb.in_like.as_mut().expect("a block's buffers");
                    let r = &lb.relus[0];
                    dev.conv2d_backward(Some(dr0), dw, db, h1, r, &p[cp.w], &dims(cp))?;
                    dev.relu_backward(dx, dr0, r)?;
                    // Plus the identity path's.
                    match &blk.id_path {
                        Some(ip) => {
                            let (dw, db) = pair(g, ip.w, ip.b);
                            dev.conv2d_backward(Some(dr0), dw, db, dy, x, &p[ip.w], &dims(ip))?;
                            dev.scale_add(dx, 1.0, dr0, 1.0)?;
                        }
                        None => dev.scale_add(dx, 1.0, dy, 1.0)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// The dVAE for device `D`: its definition (every pass takes the device as its first argument).
pub struct DeviceDvae {
    model: Dvae,
}

impl DeviceDvae {
    pub fn new(model: &Dvae) -> Self {
        DeviceDvae {
            model: model.clone(),
        }
    }

    pub fn model(&self) -> &Dvae {
        &self.model
    }

    pub fn new_acts<D: Device>(&self, dev: &D, batch: usize) -> Result<DeviceDvaeActs<D>> {
        let d = self.model.dims;
        let px = d.resolution * d.resolution;
        Ok(DeviceDvaeActs {
            batch,
            // The decoder's input gradient is the relaxation's dy; the encoder needs none.
            enc: self.model.encoder.device_bufs(dev, batch, false)?,
            dec: self.model.decoder.device_bufs(dev, batch, true)?,
            images: dev.zeros(batch * 3 * px)?,
            noise: dev.zeros(batch * d.vocab_size * d.grid() * d.grid())?,
        })
    }

    /// One micro-batch: forward, loss and backward, adding the gradient of `loss · scale` into
    /// `grads`. `x_mapped` are the squashed pixels (`squash(images)` in f32, the encoder's
    /// input), `images` the pixels in [0, 1] and `noise` the Gumbel noise, all [B, …] on the
    /// host; τ and β as in [`Dvae::forward`].
    #[allow(clippy::too_many_arguments)]
    pub fn train_step<D: DvaeDevice>(
        &self,
        dev: &D,
        params: &DeviceTensors<D>,
        grads: &mut DeviceTensors<D>,
        acts: &mut DeviceDvaeActs<D>,
        x_mapped: &[f32],
        images: &[f32],
        noise: &[f32],
        tau: f32,
        beta: f32,
        scale: f32,
    ) -> Result<DvaeLosses> {
        let d = self.model.dims;
        let b = acts.batch;
        let px = d.resolution * d.resolution;
        let npx = b * 3 * px;
        for (what, got) in [("images", images.len()), ("x_mapped", x_mapped.len())] {
            if got != npx {
                return Err(ModelError::Dims(format!(
                    "{what} hold {got} values, expected B·3·H·W = {b}·3·{r}·{r} = {npx}",
                    r = d.resolution
                )));
            }
        }
        if tau.is_nan() || tau <= 0.0 {
            return Err(ModelError::Dims(format!("tau = {tau} must be > 0")));
        }
        let (k, hw) = (d.vocab_size, d.grid() * d.grid());
        if noise.len() != b * k * hw {
            return Err(ModelError::Dims(format!(
                "noise holds {} values, the logits {}",
                noise.len(),
                b * k * hw
            )));
        }
        acts.enc.inputs[0] = dev.upload(x_mapped)?;
        acts.images = dev.upload(images)?;
        acts.noise = dev.upload(noise)?;
        let enc = &self.model.encoder;
        let dec = &self.model.decoder;
        enc.device_forward(dev, params, &mut acts.enc, b)?;
        // y = softmax over K of (logits + g)/τ: the decoder's input.
        let (logits, noise) = (&acts.enc.output, &acts.noise);
        dev.gumbel_softmax_forward(&mut acts.dec.inputs[0], logits, Some(noise), tau, b, k, hw)?;
        dec.device_forward(dev, params, &mut acts.dec, b)?;
        // The likelihood and d loss / d stats together; the mean's 1/(B·3·H·W) in `s`.
        let s = scale as f64 / npx as f64;
        let (stats, dstats) = (&acts.dec.output, &mut acts.dec.doutput);
        let kind = self.model.likelihood();
        let nll = dev.nll(kind, Some(dstats), stats, &acts.images, s as f32, b, px)?;
        dec.device_backward(dev, params, grads, &mut acts.dec, b)?;
        // Through y into d logits, then the KL term's gradient added (and its value).
        let dlogits = &mut acts.enc.doutput;
        let (y, dy) = (&acts.dec.inputs[0], &acts.dec.dinputs[0]);
        dev.gumbel_softmax_backward(dlogits, y, dy, tau, b, k, hw)?;
        let coef = (s * beta as f64) as f32;
        let logits = &acts.enc.output;
        let kl = match self.model.kl_term() {
            KlTerm::Position => dev.kl_uniform(Some(dlogits), logits, coef, b, k, hw)?,
            KlTerm::Batch => dev.kl_batch(Some(dlogits), logits, coef, b, k, hw)?.0,
        };
        enc.device_backward(dev, params, grads, &mut acts.enc, b)?;
        Ok(DvaeLosses {
            loss: (nll + beta as f64 * kl) / npx as f64,
            nll,
            kl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dvae::{gumbel_noise, DvaeDims};
    use kernels::device::Cpu;
    use kernels::dvae::squash;
    use kernels::gpu::{Emu, Gpu, Schedule};

    const BATCH: usize = 2;
    const TAU: f32 = 0.7;
    const BETA: f32 = 0.3;
    const SCALE: f32 = 0.5;

    /// A tiny dVAE: blocks with and without an identity convolution, every layer kind.
    fn tiny() -> Dvae {
        Dvae::new(DvaeDims {
            resolution: 16,
            n_hid: 8,
            n_blk_per_group: 1,
            vocab_size: 16,
            n_init: 8,
        })
        .unwrap()
    }

    fn inputs() -> (Vec<f32>, Vec<f32>) {
        let npx = BATCH * 3 * 16 * 16;
        let images: Vec<f32> = (0..npx).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let mut noise = vec![0.0; BATCH * 16 * 2 * 2];
        gumbel_noise(3, 1, &mut noise);
        (images, noise)
    }

    /// One step on `dev`: the loss terms, the logits and the gradient.
    fn device_step<D: DvaeDevice>(
        dev: &D,
        m: &Dvae,
        params: &[f32],
    ) -> (DvaeLosses, Vec<f32>, Vec<f32>) {
        let (images, noise) = inputs();
        let table = m.table();
        let dm = DeviceDvae::new(m);
        let p = DeviceTensors::upload(dev, table, params).unwrap();
        let mut g = DeviceTensors::zeros(dev, table).unwrap();
        let mut acts = dm.new_acts(dev, BATCH).unwrap();
        let x_mapped: Vec<f32> = images.iter().map(|&x| squash(x) as f32).collect();
        let l = dm
            .train_step(
                dev, &p, &mut g, &mut acts, &x_mapped, &images, &noise, TAU, BETA, SCALE,
            )
            .unwrap();
        (
            l,
            acts.logits(dev).unwrap(),
            g.download(dev, table).unwrap(),
        )
    }

    /// The step on `dev` against the host model's: the loss terms within `rtol` relative, the
    /// logits and every gradient within 1e-4 of their tensor's largest value.
    fn assert_agree(
        what: &str,
        m: &Dvae,
        got: &(DvaeLosses, Vec<f32>, Vec<f32>),
        want: &(DvaeLosses, Vec<f32>, Vec<f32>),
        rtol: f64,
    ) {
        let ((l, logits, grads), (host, host_logits, want)) = (got, want);
        // The KL kernel sums each position's Σ q·log q (about −ln K) in f32 where the host sums
        // in f64, and the KL is that sum plus ln K: near the uniform start it is small, so its
        // error is bounded in units of the terms that cancel, not of the result.
        let positions = (BATCH * 2 * 2) as f64;
        let kl_tol = 1e-6 * positions * 16f64.ln();
        for (term, h, d, tol) in [
            ("loss", host.loss, l.loss, rtol * host.loss.abs()),
            ("nll", host.nll, l.nll, rtol * host.nll.abs()),
            ("kl", host.kl, l.kl, kl_tol),
        ] {
            assert!((h - d).abs() <= tol, "{what} {term}: host {h}, device {d}");
        }
        for (i, (a, b)) in logits.iter().zip(host_logits).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{what} logit {i}: {a} vs {b}"
            );
        }
        // A block's two-channel hidden layer can be dead (every ReLU off) at this init: its
        // gradient is then zero on both sides; most tensors' are not.
        let table = m.table();
        let mut live = 0;
        for spec in table.specs() {
            let (h, d) = (&want[spec.range()], &grads[spec.range()]);
            let norm = h.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            live += usize::from(norm > 0.0);
            for (i, (a, b)) in d.iter().zip(h).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * norm,
                    "{what} {}[{i}]: device {a}, host {b} (largest {norm})",
                    spec.name
                );
            }
        }
        assert!(
            live * 4 >= table.len() * 3,
            "{live} of {} gradients are not zero",
            table.len()
        );
    }

    /// One step on the CPU device, the emulated GPU under every schedule and the GPU where there
    /// is one, against the host model; with the per-position KL and with the batch KL.
    #[test]
    fn a_step_on_every_device_matches_the_host_model() {
        for kl in [KlTerm::Position, KlTerm::Batch] {
            let m = tiny().with_kl_term(kl);
            let params = m.init_params(5);
            let (images, noise) = inputs();
            let mut acts = m.new_acts(BATCH);
            let mut grads = vec![0.0f32; params.len()];
            let host = m
                .forward(&params, &mut acts, &images, Some(&noise), TAU, BETA)
                .unwrap();
            m.backward(&params, &mut grads, &mut acts, SCALE).unwrap();
            let want = (host, acts.logits().to_vec(), grads);
            let what = |dev: &str| format!("{dev}, {kl:?} KL");
            assert_agree(
                &what("cpu"),
                &m,
                &device_step(&Cpu, &m, &params),
                &want,
                1e-6,
            );
            for s in Schedule::ALL {
                let dev = Gpu(Emu::new(s));
                let got = device_step(&dev, &m, &params);
                assert_agree(&what(&dev.name()), &m, &got, &want, 1e-6);
            }
            // cuBLAS sums the convolutions' products in its own order.
            match kernels::gpu::cuda_for_tests() {
                Some(dev) => {
                    let got = device_step(dev, &m, &params);
                    assert_agree(&what(&dev.name()), &m, &got, &want, 1e-5)
                }
                None => eprintln!("skipped on CUDA: no GPU here (the CPU and the emulator ran)"),
            }
        }
    }
}
