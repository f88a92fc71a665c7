//! The training state that a device keeps between updates, whatever the model: fp32 weights,
//! gradients, AdamW's moments, the EMA and the squared-norm scalar, one device buffer per tensor
//! of the model's [`ParamTable`]. The models' device passes (`objectives.rs`) read the weights
//! and add into the gradients; this module uploads and downloads the state
//! ([`crate::train::objectives::DeviceState`]'s `load` and `store`), runs AdamW with global-norm
//! clipping and the EMA on the device, and moves the gradients to the host for a reduction over
//! ranks.

use crate::model::transformer::device::DeviceTensors;
use crate::optim::{AdamWParams, StepReport};
use crate::params::ParamTable;
use crate::powersgd::{DevicePowerSgd, PowerSgd, PowerSgdDevice, ReduceStats};
use anyhow::{bail, Result};
use dist::collectives::Collectives;
use half::f16;
use kernels::adamw::{AdamWOps, AdamWStep};

/// The device `dev` and a model's state on it, laid out by `table`.
pub struct ResidentState<D: AdamWOps> {
    pub dev: D,
    table: ParamTable,
    pub params: DeviceTensors<D>,
    /// The update's gradient: zeroed by [`Self::zero_grads`], accumulated by the passes.
    pub grads: DeviceTensors<D>,
    m: DeviceTensors<D>,
    v: DeviceTensors<D>,
    ema: Option<DeviceTensors<D>>,
    /// The squared gradient norm, one f64.
    norm_sq: D::Buf<f64>,
    /// PowerSGD's error buffers and factors, from the first compressed reduction on.
    powersgd: Option<DevicePowerSgd<D>>,
}

impl<D: AdamWOps> ResidentState<D> {
    /// Zeros for every tensor of `table` (the loop's [`Self::load`] fills them).
    pub fn new(dev: D, table: &ParamTable) -> Result<Self> {
        Ok(ResidentState {
            params: DeviceTensors::zeros(&dev, table)?,
            grads: DeviceTensors::zeros(&dev, table)?,
            m: DeviceTensors::zeros(&dev, table)?,
            v: DeviceTensors::zeros(&dev, table)?,
            ema: None,
            norm_sq: dev.zeros(1)?,
            powersgd: None,
            table: table.clone(),
            dev,
        })
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// Uploads the weights, moments and EMA (at the start and after a resume).
    pub fn load(
        &mut self,
        params: &[f32],
        m: &[f32],
        v: &[f32],
        ema: Option<&[f32]>,
    ) -> Result<()> {
        let (dev, table) = (&self.dev, &self.table);
        self.params = DeviceTensors::upload(dev, table, params)?;
        self.m = DeviceTensors::upload(dev, table, m)?;
        self.v = DeviceTensors::upload(dev, table, v)?;
        self.ema = ema
            .map(|e| DeviceTensors::upload(dev, table, e))
            .transpose()?;
        Ok(())
    }

    /// Downloads them (for a checkpoint).
    pub fn store(
        &self,
        params: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ema: Option<&mut [f32]>,
    ) -> Result<()> {
        let (dev, table) = (&self.dev, &self.table);
        params.copy_from_slice(&self.params.download(dev, table)?);
        m.copy_from_slice(&self.m.download(dev, table)?);
        v.copy_from_slice(&self.v.download(dev, table)?);
        if let (Some(host), Some(buf)) = (ema, &self.ema) {
            host.copy_from_slice(&buf.download(dev, table)?);
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        for g in &mut self.grads.bufs {
            self.dev.fill_zero(g)?;
        }
        Ok(())
    }

    pub fn grads_to_host(&self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.grads.download(&self.dev, &self.table)?);
        Ok(())
    }

    pub fn grads_from_host(&mut self, grads: &[f32]) -> Result<()> {
        self.grads = DeviceTensors::upload(&self.dev, &self.table, grads)?;
        Ok(())
    }

    /// The mean over ranks of the update's gradient, in place in device memory, where the
    /// transport reads it (NCCL: one grouped all-reduce over every tensor's buffer). `false`:
    /// nothing was done (the buffers are host memory, or the transport is the TCP ring), and
    /// the caller reduces a host copy.
    pub fn all_reduce_grads_on_device(&mut self, comm: &mut dyn Collectives) -> Result<bool> {
        let mut bufs = Vec::with_capacity(self.grads.bufs.len());
        for g in &mut self.grads.bufs {
            let len = self.dev.len(g);
            match self.dev.collective_addr(g)? {
                Some(addr) => bufs.push((addr, len)),
                None => return Ok(false),
            }
        }
        // SAFETY: `collective_addr` gave each buffer's address on this process's GPU (the
        // context NCCL was opened on, by LOCAL_RANK) after the queued work finished; the
        // buffers belong to `self`, which nothing else touches until the call returns.
        Ok(unsafe { comm.all_reduce_mean_device(&bufs)? })
    }

    /// [`PowerSgd::reduce`] of the update's gradient on the device ([`DevicePowerSgd`]):
    /// `ps`'s error buffers and Q are uploaded at the first call and live on the device after
    /// it. On a non-finite step ([`ReduceStats::non_finite`]) the caller skips the update.
    pub fn powersgd_reduce(
        &mut self,
        ps: &mut PowerSgd,
        comm: &mut dyn Collectives,
    ) -> Result<ReduceStats>
    where
        D: PowerSgdDevice,
    {
        let on_dev = match self.powersgd.as_mut() {
            Some(p) => p,
            None => self.powersgd.insert(DevicePowerSgd::new(&self.dev, ps)?),
        };
        Ok(on_dev.reduce(&self.dev, ps, &mut self.grads.bufs, comm)?)
    }

    /// Writes the device's PowerSGD state into `ps` before its snapshot (nothing to write
    /// before the first reduction: `ps` holds it then).
    pub fn powersgd_store(&self, ps: &mut PowerSgd) -> Result<()>
    where
        D: PowerSgdDevice,
    {
        if let Some(p) = &self.powersgd {
            p.store(&self.dev, ps)?;
        }
        Ok(())
    }

    /// [`crate::optim::AdamW::step`] on the device: global-norm clipping, a non-finite norm
    /// skips the update; `t` is the update number if it is applied. `half[i]`, where present,
    /// is tensor i's f16 copy, rewritten with its weights (fp16; empty in fp32).
    pub fn adam_step(
        &mut self,
        hp: &AdamWParams,
        lr: f32,
        t: u64,
        half: &mut [Option<D::Buf<f16>>],
    ) -> Result<StepReport> {
        let dev = &self.dev;
        // Σ g² over every tensor into one device scalar (`sum_squares` adds), read back once.
        dev.fill_zero(&mut self.norm_sq)?;
        for g in &self.grads.bufs {
            dev.sum_squares(&mut self.norm_sq, g)?;
        }
        let norm = dev.download(&self.norm_sq)?[0].sqrt();
        if !norm.is_finite() {
            return Ok(StepReport {
                grad_norm: norm,
                applied: false,
            });
        }
        let clip = hp.grad_clip as f64;
        let grad_scale = if clip > 0.0 && norm > clip {
            (clip / norm) as f32
        } else {
            1.0
        };
        for (i, spec) in self.table.specs().iter().enumerate() {
            let step = AdamWStep {
                lr: lr * spec.lr_scale,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                // The decay stays lr · weight_decay whatever the tensor's lr_scale.
                weight_decay: if spec.kind.decayed() {
                    hp.weight_decay / spec.lr_scale
                } else {
                    0.0
                },
                t,
                grad_scale,
            };
            dev.adamw_update(
                &mut self.params.bufs[i],
                half.get_mut(i).and_then(Option::as_mut),
                &self.grads.bufs[i],
                &mut self.m.bufs[i],
                &mut self.v.bufs[i],
                step,
            )?;
        }
        Ok(StepReport {
            grad_norm: norm,
            applied: true,
        })
    }

    /// `ema ← decay·ema + (1 − decay)·params`.
    pub fn ema_update(&mut self, decay: f32) -> Result<()> {
        let Some(ema) = self.ema.as_mut() else {
            bail!("the run keeps no EMA (optim.ema: 0)");
        };
        for (e, p) in ema.bufs.iter_mut().zip(&self.params.bufs) {
            self.dev.ema_update(e, p, decay)?;
        }
        Ok(())
    }
}
