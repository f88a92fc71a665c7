//! The two models' sides of the training loop. An [`Objective`] owns a model definition and its
//! data stream and runs one micro-batch (forward + backward); the loop in `train.rs` does the
//! rest (accumulation, reduction, AdamW, EMA, schedule, metrics, checkpoints) the same way for
//! both.
//!
//! - [`TransformerObjective`]: stage 2 on token sequences (synthetic or token shards).
//! - [`DvaeObjective`]: stage 1 on image shards: Gumbel noise seeded by (seed, update, micro-batch,
//!   rank) so that a resumed run draws the same noise, τ and β from their cosine schedules.
//! - [`ClipObjective`]: the contrastive model on image shards and their captions: symmetric
//!   InfoNCE over each rank's own micro-batch (no all-gather of embeddings), `logit_scale`
//!   clamped after every update.

use crate::config::{DataSource, Device, RunConfig};
use crate::data::loader::CaptionEncoder;
use crate::data::{DataCursor, DataStream, ImageStream};
use crate::model::dvae::device::{DeviceDvae, DeviceDvaeActs, DvaeDevice};
use crate::model::dvae::{
    for_each_argmax, gumbel_noise, unmap_pixel, DecoderInput, Dvae, DvaeActs, DvaeLosses,
};
use crate::model::mixed::BlockScales;
use crate::model::mixed::Precision;
use crate::model::transformer::device::{
    Act, DeviceActs, DeviceScales, DeviceTransformer, HalfWeights, TransformerDevice,
    UnscaleScratch,
};
use crate::model::transformer::{Activations, Losses, Transformer};
use crate::optim::{AdamWParams, StepReport};
use crate::params::ParamTable;
use crate::powersgd::{PowerSgd, PowerSgdDevice, ReduceStats};
use crate::train::resident::ResidentState;
use anyhow::{bail, Context, Result};
use dist::collectives::Collectives;
use half::f16;
use kernels::adamw::AdamWOps;
use kernels::dvae::squash;
use kernels::gpu::{Cuda, Emu, Gpu, Schedule};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// Named values a micro-batch reports (loss terms, averaged over micro-batches by the loop).
pub type Terms = Vec<(&'static str, f64)>;

/// One model's side of the training loop.
pub trait Objective {
    /// Useful floating-point operations of one micro-batch (forward and backward).
    fn micro_flops(&self) -> f64;
    /// Forward and backward on this rank's next micro-batch `micro` of update `t` (1-based):
    /// adds `scale`·∇loss into `grads` and returns the loss (first) and its terms.
    fn micro_step(
        &mut self,
        t: u64,
        micro: usize,
        params: &[f32],
        grads: &mut [f32],
        scale: f32,
        scaling: Option<BlockScales>,
    ) -> Result<Terms>;
    /// The parameter ranges of the resblocks that `scaling` scales, in its order (none for a
    /// model without per-resblock scaling).
    fn resblock_ranges(&self) -> Vec<Range<usize>> {
        Vec::new()
    }
    /// The training state on a device, when the model trains there (the loop then leaves the
    /// host's weights, moments and EMA alone between [`DeviceState::load`] and
    /// [`DeviceState::store`], and `micro_step` ignores its `params` and `grads`).
    fn device_state(&mut self) -> Option<&mut dyn DeviceState> {
        None
    }
    /// Values of the whole update (after every micro-batch), e.g. τ or codebook perplexity;
    /// resets whatever [`Objective::micro_step`] accumulated for them.
    fn update_metrics(&mut self, t: u64) -> Terms;
    /// Throughputs of one update of `secs` seconds (`tokens_per_s`, `images_per_s`, …).
    fn rates(&self, secs: f64) -> Terms;
    /// Where the data stands after the last micro-batch.
    fn cursor(&self) -> DataCursor;
    /// Runs on the host weights after each applied optimizer update (before the EMA), e.g.
    /// CLIP's clamp of `logit_scale`. Default: nothing.
    fn after_update(&mut self, _params: &mut [f32]) {}
}

/// Builds the objective of `cfg`'s model, its data opened for `rank` of `world_size` at `cursor`.
pub fn open(
    cfg: &RunConfig,
    rank: usize,
    world_size: usize,
    cursor: DataCursor,
) -> Result<Box<dyn Objective>> {
    if cfg.model.clip().is_some() {
        return Ok(Box::new(ClipObjective::new(cfg, rank, world_size, cursor)?));
    }
    Ok(match cfg.model.dvae() {
        Some(_) => Box::new(DvaeObjective::new(cfg, rank, world_size, cursor)?),
        None => Box::new(TransformerObjective::new(cfg, rank, world_size, cursor)?),
    })
}

/// The parameter layout of `cfg`'s model and, with `init`, its starting weights: those of
/// `train.init` when set, else fresh ones from `run.seed` (a resumed run skips drawing weights it
/// is about to overwrite).
pub fn model_table(cfg: &RunConfig, init: bool) -> Result<(ParamTable, Option<Vec<f32>>)> {
    let seed = cfg.run.seed;
    let draw = init && cfg.train.init.is_none();
    let (table, params) = if let Some(c) = cfg.model.clip() {
        let m = crate::model::clip::Clip::new(*c)?;
        let logit_scale = crate::model::clip::hf::DEFAULT_LOGIT_SCALE_INIT;
        (
            m.table().clone(),
            draw.then(|| m.init_params(seed, logit_scale)),
        )
    } else if let Some(d) = cfg.model.dvae() {
        let m = cfg.relaxation().configure(Dvae::new(*d)?);
        (m.table().clone(), draw.then(|| m.init_params(seed)))
    } else {
        let m = Transformer::new(*cfg.transformer()?)?;
        (m.table().clone(), draw.then(|| m.init_params(seed)))
    };
    match (&cfg.train.init, init) {
        (Some(source), true) => {
            let params = initial_weights(source, cfg.train.init_ema, &table)
                .with_context(|| format!("train.init: {}", source.display()))?;
            Ok((table, Some(params)))
        }
        _ => Ok((table, params)),
    }
}

/// The weights of `source` (a safetensors file, a checkpoint or a run directory; with `ema`, the
/// checkpoint's EMA), every tensor of `table` checked by name and shape.
fn initial_weights(source: &std::path::Path, ema: bool, table: &ParamTable) -> Result<Vec<f32>> {
    if ema && source.is_file() {
        bail!(
            "train.init_ema reads ema.safetensors of a checkpoint or run directory, but this is a \
             file: name the directory, or set train.init_ema to false"
        );
    }
    let path = crate::model::dvae::resolve_weights(source, ema)?;
    let mut params = vec![0.0f32; table.numel()];
    crate::checkpoint::load_weights(&path, table, &mut params)?;
    tracing::info!(path = %path.display(), "initial weights");
    Ok(params)
}

/// Stage 2: the transformer on token sequences.
pub struct TransformerObjective {
    model: Transformer,
    compute: Compute,
    data: DataStream,
    batch: usize,
}

/// Where the transformer's passes run.
enum Compute {
    /// The host model (`run.device: cpu`).
    Host(Box<Activations>),
    /// A kernels device (`run.device: cuda` or `cuda-emu`).
    Device(Box<dyn DeviceCompute>),
}

/// A transformer whose training state lives on a device (`run.device: cuda` or `cuda-emu`):
/// weights, gradients, AdamW's moments and the EMA. The loop uploads the host state once
/// ([`DeviceState::load`]) and downloads it for checkpoints ([`DeviceState::store`]); the
/// gradients cross to the host only for a reduction over several ranks or through PowerSGD.
pub trait DeviceState {
    /// Uploads the weights, moments and EMA (at the start and after a resume).
    fn load(&mut self, params: &[f32], m: &[f32], v: &[f32], ema: Option<&[f32]>) -> Result<()>;
    /// Downloads them (for a checkpoint).
    fn store(
        &self,
        params: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ema: Option<&mut [f32]>,
    ) -> Result<()>;
    /// The update's accumulated gradient, to the host (flat, by the table) and back.
    fn grads_to_host(&self, out: &mut [f32]) -> Result<()>;
    fn grads_from_host(&mut self, grads: &[f32]) -> Result<()>;
    /// [`crate::optim::AdamW::step`] on the device: global-norm clipping, a non-finite norm
    /// skips the update; `t` is the update number if it is applied.
    fn adam_step(&mut self, hp: &AdamWParams, lr: f32, t: u64) -> Result<StepReport>;
    /// `ema ← decay·ema + (1 − decay)·params`.
    fn ema_update(&mut self, decay: f32) -> Result<()>;
    /// fp16: ends the update's scaled backward passes on the device
    /// ([`DeviceTransformer::unscale_param_grads`] with `scales`, the update's) and raises in
    /// `flags` every resblock flag the device raised during the update.
    fn unscale_grads(&mut self, scales: &[f32], flags: &mut [u32]) -> Result<()>;
    /// The mean over ranks of the update's gradient in device memory, where the transport
    /// reads it (NCCL); `false`: nothing done, the loop reduces a host copy.
    fn all_reduce_grads(&mut self, comm: &mut dyn Collectives) -> Result<bool>;
    /// PowerSGD's reduction of the update's gradient, on the device (`DevicePowerSgd`); on a
    /// non-finite step ([`ReduceStats::non_finite`]) the caller skips the update.
    fn powersgd_reduce(
        &mut self,
        ps: &mut PowerSgd,
        comm: &mut dyn Collectives,
    ) -> Result<ReduceStats>;
    /// Writes the device's PowerSGD state into `ps`, before its snapshot.
    fn powersgd_store(&self, ps: &mut PowerSgd) -> Result<()>;
}

/// One micro-batch's passes on the device state: gradients (and fp16's flags) zeroed at
/// micro-batch 0 and accumulated after; `scales` (fp16) the per-resblock gradient scales.
trait DeviceCompute: DeviceState {
    fn micro_step(
        &mut self,
        micro: usize,
        text: &[u32],
        image: &[u32],
        scale: f32,
        scales: Option<&[f32]>,
    ) -> Result<Losses>;
    fn state(&mut self) -> &mut dyn DeviceState;
}

/// The device state in activation type `A`: f32 (`run.precision: fp32`) or f16 (`fp16`).
struct OnDevice<D: TransformerDevice + AdamWOps + PowerSgdDevice, A: Act> {
    /// The device, weights, gradients, moments and EMA.
    state: ResidentState<D>,
    model: DeviceTransformer<D>,
    acts: DeviceActs<D, A>,
    /// fp16: the f16 copies of the resblocks' matrices, rebuilt by `load`, kept by AdamW.
    half: HalfWeights<D>,
    /// fp16: one flag per resblock for the update, and the spares of the unscaling.
    flags: D::Buf<u32>,
    spare: Option<UnscaleScratch<D>>,
}

impl<D: TransformerDevice + AdamWOps + PowerSgdDevice, A: Act> OnDevice<D, A> {
    fn new(dev: D, model: &Transformer, batch: usize) -> Result<Self> {
        let dm = DeviceTransformer::new(model, &dev)?;
        let half = A::DTYPE == "f16";
        Ok(OnDevice {
            acts: dm.new_acts(&dev, batch)?,
            half: HalfWeights::none(),
            flags: dev.zeros(2 * model.dims().layers)?,
            spare: half.then(|| dm.unscale_scratch(&dev)).transpose()?,
            model: dm,
            state: ResidentState::new(dev, model.table())?,
        })
    }
}

impl<D: TransformerDevice + AdamWOps + PowerSgdDevice, A: Act> DeviceState for OnDevice<D, A> {
    fn load(&mut self, params: &[f32], m: &[f32], v: &[f32], ema: Option<&[f32]>) -> Result<()> {
        self.state.load(params, m, v, ema)?;
        if A::DTYPE == "f16" {
            // The same rounding as AdamW's f16 copy: a resumed run multiplies by the same bits.
            let s = &self.state;
            self.half = HalfWeights::of(&s.dev, self.model.model(), &s.params)?;
        }
        Ok(())
    }

    fn store(
        &self,
        params: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ema: Option<&mut [f32]>,
    ) -> Result<()> {
        self.state.store(params, m, v, ema)
    }

    fn grads_to_host(&self, out: &mut [f32]) -> Result<()> {
        self.state.grads_to_host(out)
    }

    fn grads_from_host(&mut self, grads: &[f32]) -> Result<()> {
        self.state.grads_from_host(grads)
    }

    fn adam_step(&mut self, hp: &AdamWParams, lr: f32, t: u64) -> Result<StepReport> {
        self.state.adam_step(hp, lr, t, &mut self.half.bufs)
    }

    fn ema_update(&mut self, decay: f32) -> Result<()> {
        self.state.ema_update(decay)
    }

    fn unscale_grads(&mut self, scales: &[f32], flags: &mut [u32]) -> Result<()> {
        let Some(spare) = self.spare.as_mut() else {
            bail!("the device state is fp32: it has no gradient scales to remove");
        };
        let scaling = DeviceScales {
            scales,
            flags: &mut self.flags,
        };
        let s = &mut self.state;
        self.model
            .unscale_param_grads(&s.dev, &mut s.grads, spare, scaling)?;
        let raised = s.dev.download(&self.flags)?;
        if raised.len() != flags.len() {
            bail!(
                "{} resblock flags on the device, {} on the host",
                raised.len(),
                flags.len()
            );
        }
        for (f, r) in flags.iter_mut().zip(raised) {
            *f |= r;
        }
        Ok(())
    }

    fn all_reduce_grads(&mut self, comm: &mut dyn Collectives) -> Result<bool> {
        self.state.all_reduce_grads_on_device(comm)
    }

    fn powersgd_reduce(
        &mut self,
        ps: &mut PowerSgd,
        comm: &mut dyn Collectives,
    ) -> Result<ReduceStats> {
        self.state.powersgd_reduce(ps, comm)
    }

    fn powersgd_store(&self, ps: &mut PowerSgd) -> Result<()> {
        self.state.powersgd_store(ps)
    }
}

impl<D: TransformerDevice + AdamWOps + PowerSgdDevice, A: Act> DeviceCompute for OnDevice<D, A> {
    fn micro_step(
        &mut self,
        micro: usize,
        text: &[u32],
        image: &[u32],
        scale: f32,
        scales: Option<&[f32]>,
    ) -> Result<Losses> {
        let s = &mut self.state;
        if micro == 0 {
            s.zero_grads()?;
            s.dev.fill_zero(&mut self.flags)?;
        }
        let dev = &s.dev;
        let l = self.model.forward(
            dev,
            &s.params,
            &self.half,
            &mut self.acts,
            text,
            image,
            Some(scale),
        )?;
        let scaling = scales.map(|scales| DeviceScales {
            scales,
            flags: &mut self.flags,
        });
        self.model.backward(
            dev,
            &s.params,
            &self.half,
            &mut s.grads,
            &mut self.acts,
            text,
            image,
            scaling,
        )?;
        Ok(l)
    }

    fn state(&mut self) -> &mut dyn DeviceState {
        self
    }
}

/// The device state on `dev` in `run.precision`'s activation type.
fn on_device<D: TransformerDevice + AdamWOps + PowerSgdDevice + 'static>(
    dev: D,
    model: &Transformer,
    batch: usize,
) -> Result<Compute> {
    Ok(Compute::Device(match model.precision() {
        Precision::Fp32 => Box::new(OnDevice::<D, f32>::new(dev, model, batch)?),
        Precision::Fp16 => Box::new(OnDevice::<D, f16>::new(dev, model, batch)?),
    }))
}

/// The device of `run.device` for the transformer's passes (`None`: the host model).
fn device_compute(cfg: &RunConfig, model: &Transformer, batch: usize) -> Result<Compute> {
    Ok(match cfg.run.device {
        Device::Cpu | Device::Auto => Compute::Host(Box::new(Activations::new(model, batch))),
        Device::CudaEmu => on_device(Gpu(Emu::new(Schedule::Forward)), model, batch)?,
        Device::Cuda => on_device(cuda_gpu()?, model, batch)?,
    })
}

/// This process's GPU for `run.device: cuda`: torchrun's LOCAL_RANK picks it (0 without).
fn cuda_gpu() -> Result<Gpu<Cuda>> {
    let ordinal = match std::env::var("LOCAL_RANK") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("LOCAL_RANK={v:?} is not a GPU index"))?,
        Err(_) => 0,
    };
    Ok(Gpu(Cuda::new(ordinal).context("run.device: cuda")?))
}

impl TransformerObjective {
    fn new(cfg: &RunConfig, rank: usize, world_size: usize, cursor: DataCursor) -> Result<Self> {
        let model = Transformer::new(*cfg.transformer()?)?.with_precision(cfg.run.precision);
        let data = DataStream::open(cfg, rank, world_size, cursor, caption_encoder(cfg)?)
            .context("opening the training data")?;
        let batch = cfg.train.batch_size;
        Ok(TransformerObjective {
            compute: device_compute(cfg, &model, batch)?,
            model,
            data,
            batch,
        })
    }
}

impl Objective for TransformerObjective {
    fn micro_flops(&self) -> f64 {
        self.model.train_flops(self.batch)
    }
    fn micro_step(
        &mut self,
        _t: u64,
        micro: usize,
        params: &[f32],
        grads: &mut [f32],
        scale: f32,
        scaling: Option<BlockScales>,
    ) -> Result<Terms> {
        let batch = self.data.next_batch().context("reading the next batch")?;
        let (text, image) = (&batch.text, &batch.image);
        let l = match &mut self.compute {
            Compute::Host(acts) => {
                let l = self.model.forward(params, acts, text, image, Some(scale))?;
                match scaling {
                    Some(sc) => self
                        .model
                        .backward_scaled(params, grads, acts, text, image, sc)?,
                    None => self.model.backward(params, grads, acts, text, image)?,
                }
                l
            }
            // The device keeps the flags until `DeviceState::unscale_grads`.
            Compute::Device(dev) => {
                dev.micro_step(micro, text, image, scale, scaling.map(|sc| sc.scales))?
            }
        };
        self.data.recycle(batch);
        Ok(vec![
            ("loss", l.loss),
            ("loss_text", l.text),
            ("loss_image", l.image),
        ])
    }
    fn update_metrics(&mut self, _t: u64) -> Terms {
        Vec::new()
    }
    fn resblock_ranges(&self) -> Vec<Range<usize>> {
        self.model.resblock_ranges()
    }
    fn device_state(&mut self) -> Option<&mut dyn DeviceState> {
        match &mut self.compute {
            Compute::Device(d) => Some(d.state()),
            Compute::Host(_) => None,
        }
    }
    fn rates(&self, secs: f64) -> Terms {
        let d = self.model.dims();
        vec![
            ("tokens_per_s", (self.batch * d.seq_len()) as f64 / secs),
            (
                "image_tokens_per_s",
                (self.batch * d.image_tokens()) as f64 / secs,
            ),
        ]
    }
    fn cursor(&self) -> DataCursor {
        self.data.cursor()
    }
}

/// BPE dropout's caption encoder: the config's `tokenizer.json`, re-encoding each caption with
/// dropout `data.bpe_dropout` from the loader's per-record random stream.
struct BpeCaptions {
    tok: formats::bpe::BpeTokenizer,
    text_len: usize,
    text_vocab: usize,
    dropout: f32,
}

impl CaptionEncoder for BpeCaptions {
    fn encode(
        &self,
        caption: &str,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> std::result::Result<Vec<u32>, crate::data::loader::EncodeError> {
        Ok(formats::bpe::encode_caption(
            &self.tok,
            caption,
            self.text_len,
            self.text_vocab,
            self.dropout,
            rng,
        )?)
    }
}

/// The caption encoder a shard run needs: one when `data.bpe_dropout` > 0, else none (the
/// stored text tokens are used as they are).
fn caption_encoder(cfg: &RunConfig) -> Result<Option<Arc<dyn CaptionEncoder>>> {
    let DataSource::Shards(s) = &cfg.data else {
        return Ok(None);
    };
    if s.bpe_dropout <= 0.0 {
        return Ok(None);
    }
    let m = cfg.transformer()?;
    let path = s
        .tokenizer
        .as_ref()
        .context("data.tokenizer is required when data.bpe_dropout > 0")?;
    let tok = formats::bpe::BpeTokenizer::load(path)?;
    if tok.vocab_size() > m.text_vocab {
        bail!(
            "{}: the tokenizer has {} ids, more than model.text_vocab = {}",
            path.display(),
            tok.vocab_size(),
            m.text_vocab
        );
    }
    Ok(Some(Arc::new(BpeCaptions {
        tok,
        text_len: m.text_len,
        text_vocab: m.text_vocab,
        dropout: s.bpe_dropout as f32,
    })))
}

/// Where the dVAE's passes run.
enum DvaeCompute {
    /// The host model (`run.device: cpu`).
    Host(Box<DvaeActs>),
    /// A kernels device (`run.device: cuda` or `cuda-emu`), fp32.
    Device(Box<dyn DvaeDeviceCompute>),
}

/// One micro-batch of the dVAE on its device state: gradients zeroed at micro-batch 0 and
/// accumulated after. Returns the loss terms and host copies of the logits and the decoder's
/// statistics (for the codebook and reconstruction metrics).
trait DvaeDeviceCompute: DeviceState {
    #[allow(clippy::too_many_arguments)]
    fn micro_step(
        &mut self,
        micro: usize,
        x_mapped: &[f32],
        images: &[f32],
        noise: &[f32],
        tau: f32,
        beta: f32,
        scale: f32,
    ) -> Result<(DvaeLosses, Vec<f32>, Vec<f32>)>;
    fn state(&mut self) -> &mut dyn DeviceState;
}

/// The dVAE's training state and activations on a device.
struct DvaeOnDevice<D: DvaeDevice + AdamWOps + PowerSgdDevice> {
    state: ResidentState<D>,
    model: DeviceDvae,
    acts: DeviceDvaeActs<D>,
}

impl<D: DvaeDevice + AdamWOps + PowerSgdDevice> DeviceState for DvaeOnDevice<D> {
    fn load(&mut self, params: &[f32], m: &[f32], v: &[f32], ema: Option<&[f32]>) -> Result<()> {
        self.state.load(params, m, v, ema)
    }

    fn store(
        &self,
        params: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ema: Option<&mut [f32]>,
    ) -> Result<()> {
        self.state.store(params, m, v, ema)
    }

    fn grads_to_host(&self, out: &mut [f32]) -> Result<()> {
        self.state.grads_to_host(out)
    }

    fn grads_from_host(&mut self, grads: &[f32]) -> Result<()> {
        self.state.grads_from_host(grads)
    }

    fn adam_step(&mut self, hp: &AdamWParams, lr: f32, t: u64) -> Result<StepReport> {
        self.state.adam_step(hp, lr, t, &mut [])
    }

    fn ema_update(&mut self, decay: f32) -> Result<()> {
        self.state.ema_update(decay)
    }

    fn unscale_grads(&mut self, _scales: &[f32], _flags: &mut [u32]) -> Result<()> {
        bail!("the dVAE trains in fp32: it has no gradient scales to remove")
    }

    fn all_reduce_grads(&mut self, comm: &mut dyn Collectives) -> Result<bool> {
        self.state.all_reduce_grads_on_device(comm)
    }

    fn powersgd_reduce(
        &mut self,
        ps: &mut PowerSgd,
        comm: &mut dyn Collectives,
    ) -> Result<ReduceStats> {
        self.state.powersgd_reduce(ps, comm)
    }

    fn powersgd_store(&self, ps: &mut PowerSgd) -> Result<()> {
        self.state.powersgd_store(ps)
    }
}

impl<D: DvaeDevice + AdamWOps + PowerSgdDevice> DvaeDeviceCompute for DvaeOnDevice<D> {
    fn micro_step(
        &mut self,
        micro: usize,
        x_mapped: &[f32],
        images: &[f32],
        noise: &[f32],
        tau: f32,
        beta: f32,
        scale: f32,
    ) -> Result<(DvaeLosses, Vec<f32>, Vec<f32>)> {
        let s = &mut self.state;
        if micro == 0 {
            s.zero_grads()?;
        }
        let l = self.model.train_step(
            &s.dev,
            &s.params,
            &mut s.grads,
            &mut self.acts,
            x_mapped,
            images,
            noise,
            tau,
            beta,
            scale,
        )?;
        let logits = self.acts.logits(&s.dev)?;
        let stats = self.acts.stats(&s.dev)?;
        Ok((l, logits, stats))
    }

    fn state(&mut self) -> &mut dyn DeviceState {
        self
    }
}

/// The dVAE's passes on `dev`.
fn dvae_on_device<D: DvaeDevice + AdamWOps + PowerSgdDevice + 'static>(
    dev: D,
    model: &Dvae,
    batch: usize,
) -> Result<DvaeCompute> {
    let dm = DeviceDvae::new(model);
    Ok(DvaeCompute::Device(Box::new(DvaeOnDevice {
        acts: dm.new_acts(&dev, batch)?,
        model: dm,
        state: ResidentState::new(dev, model.table())?,
    })))
}

/// Where `run.device` runs the dVAE's passes.
fn dvae_compute(cfg: &RunConfig, model: &Dvae, batch: usize) -> Result<DvaeCompute> {
    let host = matches!(cfg.run.device, Device::Cpu | Device::Auto);
    if !host && model.decoder_input() == DecoderInput::Argmax {
        bail!("relaxation.decoder_input: argmax has no device step yet: use run.device: cpu");
    }
    // `auto` runs the dVAE on the host.
    Ok(match cfg.run.device {
        Device::Cpu | Device::Auto => DvaeCompute::Host(Box::new(model.new_acts(batch))),
        Device::CudaEmu => dvae_on_device(Gpu(Emu::new(Schedule::Forward)), model, batch)?,
        Device::Cuda => dvae_on_device(cuda_gpu()?, model, batch)?,
    })
}

/// Stage 1: the dVAE on image shards.
pub struct DvaeObjective {
    model: Dvae,
    compute: DvaeCompute,
    /// The squashed pixels, the device's encoder input (the host model squashes its own).
    x_mapped: Vec<f32>,
    data: ImageStream,
    noise: Vec<f32>,
    relax: crate::config::RelaxationConfig,
    seed: u64,
    rank: usize,
    batch: usize,
    /// Argmax-code counts over the update's micro-batches (codebook perplexity).
    code_counts: Vec<u64>,
    /// Σ squared pixel error and pixel count over the update's micro-batches.
    sq_err: f64,
    pixels: u64,
}

/// Keeps the Gumbel noise's random stream apart from the other streams of the same seed.
const GUMBEL_SALT: u64 = 0x6a3b_9e1f_57c2_0004;

impl DvaeObjective {
    fn new(cfg: &RunConfig, rank: usize, world_size: usize, cursor: DataCursor) -> Result<Self> {
        // The noise stream packs (update, micro-batch, rank) into 64 bits, 16 bits for each of
        // the last two.
        if world_size > 1 << 16 || cfg.train.grad_accum > 1 << 16 {
            bail!("the dVAE's noise streams allow at most 65536 ranks and 65536 micro-batches");
        }
        let dims = *cfg.dvae()?;
        let model = cfg.relaxation().configure(Dvae::new(dims)?);
        let data = ImageStream::open(cfg, rank, world_size, cursor)
            .context("opening the training images")?;
        let batch = cfg.train.batch_size;
        let g = dims.grid();
        Ok(DvaeObjective {
            compute: dvae_compute(cfg, &model, batch)?,
            x_mapped: Vec::new(),
            noise: vec![0.0; batch * dims.vocab_size * g * g],
            code_counts: vec![0; dims.vocab_size],
            model,
            data,
            relax: cfg.relaxation(),
            seed: cfg.run.seed,
            rank,
            batch,
            sq_err: 0.0,
            pixels: 0,
        })
    }

    /// τ and β of update `t` (1-based): the schedules at the number of updates done before it,
    /// so the first update uses the start values.
    fn tau_beta(&self, t: u64) -> (f64, f64) {
        let done = t.saturating_sub(1);
        (self.relax.tau(done), self.relax.beta(done))
    }
}

impl Objective for DvaeObjective {
    fn micro_flops(&self) -> f64 {
        self.model.train_flops(self.batch)
    }
    fn micro_step(
        &mut self,
        t: u64,
        micro: usize,
        params: &[f32],
        grads: &mut [f32],
        scale: f32,
        _scaling: Option<BlockScales>,
    ) -> Result<Terms> {
        let batch = self.data.next_batch().context("reading the next batch")?;
        let (tau, beta) = self.tau_beta(t);
        // One stream per (update, micro-batch, rank): the same noise after a resume, different
        // noise on every rank.
        let stream = ((t << 16 | micro as u64) << 16) | self.rank as u64;
        // The argmax codes read no noise.
        if self.model.decoder_input() == DecoderInput::Relaxed {
            gumbel_noise(self.seed ^ GUMBEL_SALT, stream, &mut self.noise);
        }
        let d = *self.model.dims();
        let (tau, beta) = (tau as f32, beta as f32);
        let (l, logits, stats) = match &mut self.compute {
            DvaeCompute::Host(acts) => {
                let l = (self.model).forward(
                    params,
                    acts,
                    &batch.pixels,
                    Some(&self.noise),
                    tau,
                    beta,
                )?;
                self.model.backward(params, grads, acts, scale)?;
                (l, Cow::Borrowed(acts.logits()), Cow::Borrowed(acts.stats()))
            }
            DvaeCompute::Device(dev) => {
                // The host's checks and squashing (Dvae::forward's), then the device's passes.
                let px = &batch.pixels;
                if let Some(i) = px.iter().position(|v| !(0.0..=1.0).contains(v)) {
                    bail!("pixel {i} = {} is outside [0, 1]", px[i]);
                }
                self.x_mapped.clear();
                self.x_mapped.extend(px.iter().map(|&x| squash(x) as f32));
                let (l, logits, stats) =
                    dev.micro_step(micro, &self.x_mapped, px, &self.noise, tau, beta, scale)?;
                (l, Cow::Owned(logits), Cow::Owned(stats))
            }
        };
        // A metric only: a non-finite logit ends the count (the update itself is then skipped
        // by the optimizer's non-finite check), it does not fail the run.
        let counts = &mut self.code_counts;
        let _ = for_each_argmax(&logits, d.vocab_size, d.grid() * d.grid(), |_, _, c| {
            counts[c] += 1
        });
        self.sq_err += reconstruction_sq_err(&stats, &batch.pixels, self.batch);
        self.pixels += batch.pixels.len() as u64;
        self.data.recycle(batch);
        let npx = (self.batch * 3 * d.resolution * d.resolution) as f64;
        let positions = (self.batch * d.grid() * d.grid()) as f64;
        Ok(vec![
            ("loss", l.loss),
            // Per sub-pixel and per grid position, so that runs of any size compare.
            ("nll", l.nll / npx),
            ("kl", l.kl / positions),
        ])
    }
    fn update_metrics(&mut self, t: u64) -> Terms {
        let (tau, beta) = self.tau_beta(t);
        let mse = self.sq_err / self.pixels.max(1) as f64;
        let ppl = perplexity(&self.code_counts);
        self.code_counts.fill(0);
        self.sq_err = 0.0;
        self.pixels = 0;
        vec![
            ("tau", tau),
            ("beta", beta),
            ("codebook_perplexity", ppl),
            ("recon_mse", mse),
        ]
    }
    fn device_state(&mut self) -> Option<&mut dyn DeviceState> {
        match &mut self.compute {
            DvaeCompute::Device(d) => Some(d.state()),
            DvaeCompute::Host(_) => None,
        }
    }
    fn rates(&self, secs: f64) -> Terms {
        vec![("images_per_s", self.batch as f64 / secs)]
    }
    fn cursor(&self) -> DataCursor {
        self.data.cursor()
    }
}

/// CLIP on image shards and their captions (docs/model.md §3, "Training").
pub struct ClipObjective {
    model: crate::model::clip::Clip,
    acts: crate::model::clip::Activations,
    data: ImageStream,
    captions: ClipCaptions,
    ids: Vec<u32>,
    pixels: Vec<f32>,
    /// One micro-batch's gradient, before `scale`.
    grad: Vec<f32>,
    batch: usize,
    /// `logit_scale` after the last update (a metric).
    logit_scale: f64,
}

use crate::model::clip::hf::{IMAGE_MEAN as CLIP_MEAN, IMAGE_STD as CLIP_STD};

/// A trained-from-scratch CLIP's captions: the BPE of `data.tokenizer` (no special tokens) and
/// two ids past it, the last two of `text_config.vocab_size`: start V − 2 and end V − 1
/// (`eos_token_id` must be V − 1). A caption is `start, tokens (at most S − 2), end`, padded
/// to S with the end token, as Hugging Face's CLIP tokenizer pads.
pub struct ClipCaptions {
    tok: formats::bpe::BpeTokenizer,
    len: usize,
    start: u32,
    end: u32,
}

impl ClipCaptions {
    /// The tokenizer of `cfg` (`data.tokenizer`), checked against `model.text_config`.
    pub fn open(cfg: &RunConfig) -> Result<Self> {
        let c = cfg
            .model
            .clip()
            .with_context(|| format!("model.kind is {}, not clip", cfg.model.kind()))?;
        let DataSource::Images(s) = &cfg.data else {
            bail!("model.kind: clip reads data.source: images");
        };
        let path = s.tokenizer.as_ref().context(
            "data.tokenizer is required to train model.kind: clip (a tokenizer.json, e.g. \
                 from `data-prep tokenizer train` on the captions)",
        )?;
        let tok = formats::bpe::BpeTokenizer::load(path)
            .with_context(|| format!("loading data.tokenizer {}", path.display()))?;
        let t = &c.text_config;
        if tok.vocab_size() + 2 > t.vocab_size {
            bail!(
                "{}: the tokenizer has {} ids; model.text_config.vocab_size = {} must be at least \
                 {} (its last two ids are the start and end tokens)",
                path.display(),
                tok.vocab_size(),
                t.vocab_size,
                tok.vocab_size() + 2
            );
        }
        let end = (t.vocab_size - 1) as u32;
        if t.eos_token_id != end {
            bail!(
                "model.text_config.eos_token_id = {} must be the end token, vocab_size − 1 = {end}, \
                 for a CLIP trained on a data.tokenizer BPE",
                t.eos_token_id
            );
        }
        if t.max_position_embeddings < 2 {
            bail!("model.text_config.max_position_embeddings must hold a start and an end token");
        }
        Ok(ClipCaptions {
            tok,
            len: t.max_position_embeddings,
            start: end - 1,
            end,
        })
    }

    /// The S ids of one caption, appended to `out`.
    pub fn encode(&self, caption: &str, out: &mut Vec<u32>) -> Result<()> {
        let ids = self.tok.encode(caption)?;
        let keep = ids.len().min(self.len - 2);
        out.push(self.start);
        out.extend_from_slice(&ids[..keep]);
        out.resize(out.len() + self.len - 1 - keep, self.end);
        Ok(())
    }
}

impl ClipObjective {
    fn new(cfg: &RunConfig, rank: usize, world_size: usize, cursor: DataCursor) -> Result<Self> {
        let c = *cfg
            .model
            .clip()
            .with_context(|| format!("model.kind is {}, not clip", cfg.model.kind()))?;
        if !matches!(cfg.run.device, Device::Cpu | Device::Auto) {
            bail!("model.kind: clip trains on run.device: cpu only");
        }
        if c.vision_config.num_channels != 3 {
            bail!(
                "model.vision_config.num_channels = {}: image shards hold RGB images (3)",
                c.vision_config.num_channels
            );
        }
        let captions = ClipCaptions::open(cfg)?;
        let model = crate::model::clip::Clip::new(c)?;
        let batch = cfg.train.batch_size;
        let acts = crate::model::clip::Activations::new(&model, batch, captions.len)?;
        let data = ImageStream::open(cfg, rank, world_size, cursor)
            .context("opening the training images")?;
        Ok(ClipObjective {
            model,
            acts,
            data,
            captions,
            ids: Vec::new(),
            pixels: Vec::new(),
            grad: Vec::new(),
            batch,
            logit_scale: f64::NAN,
        })
    }
}

/// Caption → image top-1 accuracy of a [B, B] `logits_per_text`: the share of rows whose
/// largest logit (the first, on a tie) is on the diagonal.
pub fn top1_caption_to_image(logits_per_text: &[f32], b: usize) -> f64 {
    let hits = logits_per_text
        .chunks_exact(b)
        .enumerate()
        .filter(|(i, row)| {
            let best = row
                .iter()
                .enumerate()
                .fold(0, |m, (j, &v)| if v > row[m] { j } else { m });
            best == *i
        })
        .count();
    hits as f64 / b.max(1) as f64
}

impl Objective for ClipObjective {
    fn micro_flops(&self) -> f64 {
        // 6 FLOPs per weight per token (forward and backward) of each tower.
        let d = self.model.dims();
        let (mut text, mut vision) = (0usize, 0usize);
        for spec in self.model.table().specs() {
            if spec.name.starts_with("text_model.") {
                text += spec.numel();
            } else if spec.name.starts_with("vision_model.") {
                vision += spec.numel();
            }
        }
        let b = self.batch as f64;
        6.0 * b
            * (text as f64 * self.captions.len as f64
                + vision as f64 * (d.num_patches() + 1) as f64)
    }
    fn micro_step(
        &mut self,
        _t: u64,
        _micro: usize,
        params: &[f32],
        grads: &mut [f32],
        scale: f32,
        _scaling: Option<BlockScales>,
    ) -> Result<Terms> {
        let batch = self.data.next_batch().context("reading the next batch")?;
        self.ids.clear();
        for (i, caption) in batch.captions.iter().enumerate() {
            self.captions
                .encode(caption, &mut self.ids)
                .with_context(|| format!("tokenising the caption of batch record {i}"))?;
        }
        self.pixels.clear();
        self.pixels.extend_from_slice(&batch.pixels);
        let plane = (batch.resolution * batch.resolution) as usize;
        for img in self.pixels.chunks_exact_mut(3 * plane) {
            for (c, ch) in img.chunks_exact_mut(plane).enumerate() {
                ch.iter_mut()
                    .for_each(|v| *v = (*v - CLIP_MEAN[c]) / CLIP_STD[c]);
            }
        }
        self.data.recycle(batch);
        let loss = self
            .model
            .forward(params, &mut self.acts, &self.ids, &self.pixels)?;
        // The model adds the gradient of the mean loss; `scale` (the loop's 1/accumulation)
        // applies to this micro-batch's share only.
        self.grad.clear();
        self.grad.resize(grads.len(), 0.0);
        self.model
            .backward(params, &mut self.grad, &mut self.acts)?;
        for (g, d) in grads.iter_mut().zip(&self.grad) {
            *g += scale * d;
        }
        self.logit_scale = self.model.logit_scale(params) as f64;
        Ok(vec![
            ("loss", loss as f64),
            (
                "retrieval_top1",
                top1_caption_to_image(&self.acts.logits_per_text, self.batch),
            ),
        ])
    }
    fn update_metrics(&mut self, _t: u64) -> Terms {
        vec![("logit_scale", self.logit_scale)]
    }
    fn rates(&self, secs: f64) -> Terms {
        vec![("images_per_s", self.batch as f64 / secs)]
    }
    fn cursor(&self) -> DataCursor {
        self.data.cursor()
    }
    fn after_update(&mut self, params: &mut [f32]) {
        self.model.clamp_logit_scale(params);
        self.logit_scale = self.model.logit_scale(params) as f64;
    }
}

/// exp(entropy) of the code histogram: the number of codes in use, weighted by frequency
/// (1 when one code takes every position, K when all are used equally).
pub fn perplexity(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Σ over pixels of (x̂ − x)², x̂ = [`unmap_pixel`]`(μ)` the reconstruction read from decoder
/// `stats` [B, 6, H·W] (μ in channels 0..3), `images` [B, 3, H·W] in [0, 1].
pub fn reconstruction_sq_err(stats: &[f32], images: &[f32], batch: usize) -> f64 {
    let plane = images.len() / (3 * batch.max(1));
    let mut sum = 0.0f64;
    for (x_img, s_img) in images
        .chunks_exact(3 * plane)
        .zip(stats.chunks_exact(6 * plane))
    {
        for (&x, &mu) in x_img.iter().zip(&s_img[..3 * plane]) {
            let d = (unmap_pixel(mu) - x) as f64;
            sum += d * d;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use formats::image_shard::ImageShardWriter;

    /// A clip run config over `dir` with `text_config.vocab_size` `vocab`, `eos_token_id` `eos`
    /// and a tokenizer trained on a few captions (saved in `dir`).
    fn clip_cfg(dir: &std::path::Path, vocab: usize, eos: u32, tokenizer: bool) -> RunConfig {
        let tok = formats::bpe::BpeTokenizer::train(
            ["a red circle", "a blue square", "a red square"]
                .iter()
                .map(|s| s.to_string()),
            300,
            1,
        )
        .unwrap();
        tok.save(dir.join("tokenizer.json")).unwrap();
        let tokenizer = match tokenizer {
            true => format!(", tokenizer: {}", dir.join("tokenizer.json").display()),
            false => String::new(),
        };
        let yaml = format!(
            "run: {{ name: t, out_dir: {out}, seed: 7 }}\n\
             model: {{ kind: clip, projection_dim: 8,\n  \
               text_config: {{ vocab_size: {vocab}, hidden_size: 8, intermediate_size: 16, \
                 num_attention_heads: 2, num_hidden_layers: 1, max_position_embeddings: 6, \
                 eos_token_id: {eos}, hidden_act: quick_gelu }},\n  \
               vision_config: {{ hidden_size: 8, intermediate_size: 16, num_attention_heads: 2, \
                 num_hidden_layers: 1, image_size: 16, patch_size: 8, hidden_act: quick_gelu }} }}\n\
             data: {{ source: images, paths: [\"{dir}/*.tis\"]{tokenizer} }}\n\
             train: {{ steps: 2, batch_size: 2 }}\n",
            out = dir.join("run").display(),
            dir = dir.display(),
        );
        RunConfig::from_yaml_str(&yaml, "test").unwrap()
    }

    /// Captions are start, BPE tokens, end, padded with end to S (6 here), truncated to S − 2
    /// tokens; the start and end tokens are the last two ids of `text_config.vocab_size`.
    #[test]
    fn clip_captions_wrap_truncate_and_pad() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = clip_cfg(tmp.path(), 302, 301, true);
        let c = ClipCaptions::open(&cfg).unwrap();
        let bpe = formats::bpe::BpeTokenizer::load(tmp.path().join("tokenizer.json")).unwrap();
        let short = bpe.encode("red").unwrap();
        assert!(!short.is_empty() && short.len() <= 4, "{short:?}");
        let mut ids = Vec::new();
        c.encode("red", &mut ids).unwrap();
        let mut want = vec![300];
        want.extend(&short);
        want.resize(6, 301);
        assert_eq!(ids, want);
        let long_text = "a red circle and a blue square and a red square";
        let long = bpe.encode(long_text).unwrap();
        assert!(long.len() > 4, "{long:?}");
        ids.clear();
        c.encode(long_text, &mut ids).unwrap();
        assert_eq!(ids[0], 300);
        assert_eq!(&ids[1..5], &long[..4]);
        assert_eq!(ids[5], 301);
        // Every caption's row pools at its end token.
        let pos = crate::model::clip::ops::end_positions(&ids, 6, 301).unwrap();
        assert_eq!(pos, vec![5]);
    }

    /// A vocabulary without room for the start and end tokens, an end token other than
    /// vocab_size − 1, and a missing data.tokenizer are refused naming the field; the dVAE
    /// refuses data.tokenizer.
    #[test]
    fn clip_tokenizer_mismatches_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let ids = formats::bpe::BpeTokenizer::train(
            ["a red circle", "a blue square", "a red square"]
                .iter()
                .map(|s| s.to_string()),
            300,
            1,
        )
        .unwrap()
        .vocab_size();
        let err = |cfg: RunConfig| format!("{:#}", ClipCaptions::open(&cfg).err().unwrap());
        let e = err(clip_cfg(tmp.path(), ids + 1, ids as u32, true));
        assert!(
            e.contains("model.text_config.vocab_size")
                && e.contains(&format!("at least {}", ids + 2)),
            "{e}"
        );
        let e = err(clip_cfg(tmp.path(), 302, 300, true));
        assert!(e.contains("model.text_config.eos_token_id = 300"), "{e}");
        let e = err(clip_cfg(tmp.path(), 302, 301, false));
        assert!(e.contains("data.tokenizer is required"), "{e}");
        let yaml = format!(
            "run: {{ name: t, out_dir: {out}, seed: 7 }}\n\
             model: {{ kind: dvae, resolution: 16, n_hid: 4, n_blk_per_group: 1, vocab_size: 16, n_init: 4 }}\n\
             data: {{ source: images, paths: [x.tis], tokenizer: t.json }}\n\
             train: {{ steps: 2, batch_size: 2 }}\n",
            out = tmp.path().display()
        );
        let e = RunConfig::from_yaml_str(&yaml, "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.tokenizer"), "{e}");
    }

    /// Top-1 counts a row whose largest logit is on the diagonal; the first of equal maxima wins.
    #[test]
    fn top1_counts_diagonal_maxima() {
        #[rustfmt::skip]
        let logits = [
            3.0, 1.0, 0.0,
            2.0, 1.0, 0.5,
            1.0, 1.0, 1.0,
        ];
        assert_eq!(top1_caption_to_image(&logits, 3), 1.0 / 3.0);
        let eye = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(top1_caption_to_image(&eye, 2), 1.0);
    }

    /// τ read back from what the forward pass computed, not from the schedule: at every grid
    /// position y = softmax((logits + g)/τ), so for two codes a, b,
    /// τ = ((l_a + g_a) − (l_b + g_b)) / ln(y_a / y_b). A τ that does not reach the forward pass
    /// (a constant, another update's value) fails here while the logged column stays right.
    #[test]
    fn the_forward_pass_relaxes_with_the_scheduled_tau() {
        let tmp = tempfile::tempdir().unwrap();
        let res = 32usize;
        let mut w =
            ImageShardWriter::create(tmp.path().join("images.tis"), res as u32, 4, 3).unwrap();
        for i in 0..4 {
            let px: Vec<u8> = (0..res * res * 3)
                .map(|j| ((i * 37 + j * 11) % 251) as u8)
                .collect();
            w.push(&px, &format!("image {i}"), None).unwrap();
        }
        w.finish().unwrap();
        let yaml = format!(
            "run: {{ name: t, out_dir: {out}, seed: 7 }}\n\
             model: {{ kind: dvae, resolution: {res}, n_hid: 4, n_blk_per_group: 1, vocab_size: 16, n_init: 4 }}\n\
             relaxation: {{ tau_start: 1.0, tau_end: 0.0625, tau_steps: 10, beta_start: 0.0, beta_end: 1.0, beta_steps: 10 }}\n\
             data: {{ source: images, paths: [\"{dir}/*.tis\"] }}\n\
             train: {{ steps: 20, batch_size: 2 }}\n",
            out = tmp.path().join("run").display(),
            dir = tmp.path().display(),
        );
        let cfg = RunConfig::from_yaml_str(&yaml, "test").unwrap();
        let mut objective = DvaeObjective::new(&cfg, 0, 1, DataCursor::start(&cfg)).unwrap();
        let params = objective.model.init_params(3);
        let mut grads = vec![0.0f32; params.len()];
        let d = objective.model.dims();
        let (k, hw) = (d.vocab_size, d.grid() * d.grid());
        for t in [1u64, 4, 8, 11] {
            objective
                .micro_step(t, 0, &params, &mut grads, 1.0, None)
                .unwrap();
            let want = objective.relax.tau(t - 1);
            let DvaeCompute::Host(acts) = &objective.compute else {
                panic!("run.device: cpu trains on the host")
            };
            let (logits, y, g) = (acts.logits(), acts.relaxed(), &objective.noise);
            let mut checked = 0;
            for pos in [0, hw / 2, hw - 1] {
                let at = |c: usize| c * hw + pos;
                let s = |c: usize| logits[at(c)] as f64 + g[at(c)] as f64;
                // The most and least likely codes: the widest, best-conditioned ratio.
                let a = (0..k)
                    .max_by(|&i, &j| y[at(i)].total_cmp(&y[at(j)]))
                    .unwrap();
                let b = (0..k)
                    .min_by(|&i, &j| y[at(i)].total_cmp(&y[at(j)]))
                    .unwrap();
                let ratio = (y[at(a)] as f64 / y[at(b)] as f64).ln();
                if ratio < 1e-3 || y[at(b)] < 1e-30 {
                    continue;
                }
                let tau = (s(a) - s(b)) / ratio;
                assert!(
                    (tau - want).abs() <= 1e-3 * want,
                    "update {t}, position {pos}: the forward pass relaxed with τ = {tau}, the \
                     schedule says {want}"
                );
                checked += 1;
            }
            assert!(checked > 0, "update {t}: no position with a usable ratio");
        }
    }
}
