//! PowerSGD with the gradient on a device: [`PowerSgd::reduce`]'s algorithm (the module doc of
//! `powersgd.rs`, docs/powersgd.md) where the gradient, the error buffers and Q stay on the
//! device, one buffer per tensor as the training state keeps them.
//!
//! On the device: the error feedback (M = grad + error, error = M − grad'), the products P = M·Q
//! and Q' = Mᵀ·P, the orthonormalisation of P (the batched Householder kernel), the
//! decompression grad' = P·Q'ᵀ and the finiteness check of the compressed gradients.
//!
//! Through the host: what crosses between ranks (the collectives take host slices): each
//! bucket's P and Q' (Σ (s + l)·r values, the compressed traffic), the uncompressed tensors and
//! the non-finite flag. The full gradient of a compressed matrix never leaves the device.
//!
//! The plan (which tensors, which buckets, the order of the collectives), the step counter and
//! the checkpointed state are the host [`PowerSgd`]'s: [`DevicePowerSgd::new`] uploads its error
//! buffers and Q, [`DevicePowerSgd::store`] writes them back before a snapshot. Every rank issues
//! the same collectives in the same order as the host reduction, so a rank on the CPU and a rank
//! on a device can share a run.
//!
//! One difference: a non-finite step leaves the device gradient as it is (partly decompressed)
//! instead of filling it with NaN; [`ReduceStats::non_finite`] is set and the caller must skip
//! the update (the training loop does).

use super::*;
use kernels::device::Device;
use kernels::gradscale::GradScaleOps;
use kernels::linear::MatmulOps;
use kernels::powersgd::{OrthMat, PowerSgdOps};
use kernels::scale_add::ScaleAddOps;

/// The device operations PowerSGD needs.
pub trait PowerSgdDevice: Device + MatmulOps + ScaleAddOps + PowerSgdOps + GradScaleOps {}

impl<D> PowerSgdDevice for D where D: Device + MatmulOps + ScaleAddOps + PowerSgdOps + GradScaleOps {}

/// The device half of a [`PowerSgd`]: per compressed tensor (in [`PowerSgd::compressed`]'s
/// order) its error buffer, Q, P and Q'.
pub struct DevicePowerSgd<D: Device> {
    /// Empty without error feedback.
    error: Vec<D::Buf<f32>>,
    q: Vec<D::Buf<f32>>,
    p: Vec<D::Buf<f32>>,
    qn: Vec<D::Buf<f32>>,
    /// One non-finite flag (the gradient-scaling kernels' convention: set, never cleared).
    flag: D::Buf<u32>,
}

impl<D: PowerSgdDevice> DevicePowerSgd<D> {
    /// Uploads `ps`'s error buffers and Q (fresh, or as restored from a checkpoint).
    pub fn new(dev: &D, ps: &PowerSgd) -> Result<Self> {
        let mut s = DevicePowerSgd {
            error: Vec::new(),
            q: Vec::new(),
            p: Vec::new(),
            qn: Vec::new(),
            flag: dev.zeros(1)?,
        };
        for t in &ps.compressed {
            if ps.cfg.error_feedback {
                s.error.push(dev.upload(&ps.error[t.error_range()])?);
            }
            s.q.push(dev.upload(&ps.q[t.q_range()])?);
            s.p.push(dev.zeros(t.short() * t.rank)?);
            s.qn.push(dev.zeros(t.long() * t.rank)?);
        }
        Ok(s)
    }

    /// Copies the device's error buffers and Q into `ps`, for [`PowerSgd::snapshot`].
    pub fn store(&self, dev: &D, ps: &mut PowerSgd) -> Result<()> {
        for (ci, t) in ps.compressed.iter().enumerate() {
            if let Some(e) = self.error.get(ci) {
                ps.error[t.error_range()].copy_from_slice(&dev.download(e)?);
            }
            ps.q[t.q_range()].copy_from_slice(&dev.download(&self.q[ci])?);
        }
        Ok(())
    }

    /// [`PowerSgd::reduce`] of the gradient `grads` (one device buffer per tensor of the table
    /// `ps` was built from, in table order): replaced by the decompressed average over ranks.
    /// Collective. On a non-finite step no state changes and the caller must skip the update.
    pub fn reduce(
        &mut self,
        dev: &D,
        ps: &mut PowerSgd,
        grads: &mut [D::Buf<f32>],
        comm: &mut dyn Collectives,
    ) -> Result<ReduceStats> {
        let tensors = ps.compressed.len() + ps.uncompressed.len();
        if grads.len() != tensors {
            return Err(PowerSgdError::BufferLength {
                expected: tensors,
                found: grads.len(),
            });
        }
        let mut clock = CommClock::start(ps.bytes_uncompressed());
        let inv_w = 1.0 / comm.world_size() as f32;
        let index = ps.iterations;
        ps.iterations += 1;

        if index < ps.cfg.start_step || ps.compressed.is_empty() {
            // A plain all-reduce of the whole gradient, in table order.
            let mut flat = Vec::with_capacity(ps.numel);
            for g in grads.iter() {
                flat.extend_from_slice(&dev.download(g)?);
            }
            clock.all_reduce(comm, &mut flat)?;
            if inv_w != 1.0 {
                flat.iter_mut().for_each(|g| *g *= inv_w);
            }
            let non_finite = !all_finite(&flat);
            let mut at = 0;
            for g in grads.iter_mut() {
                let n = dev.len(g);
                *g = dev.upload(&flat[at..at + n])?;
                at += n;
            }
            return Ok(clock.finish(false, non_finite));
        }

        let PowerSgd {
            cfg,
            compressed,
            uncompressed,
            buckets,
            ubuf,
            pbuf,
            qbuf,
            ..
        } = ps;
        // 1. The uncompressed tensors and the non-finite flag, as on the host: one all-reduce.
        dev.fill_zero(&mut self.flag)?;
        for t in compressed.iter() {
            let g = &grads[t.param];
            flag_non_finite(dev, &mut self.flag, g)?;
        }
        let mut at = 0;
        for &i in uncompressed.iter() {
            let host = dev.download(&grads[i])?;
            ubuf[at..at + host.len()].copy_from_slice(&host);
            at += host.len();
        }
        let n = at;
        let local_bad = dev.download(&self.flag)?[0] != 0 || !all_finite(&ubuf[..n]);
        ubuf[n] = if local_bad { 1.0 } else { 0.0 };
        clock.all_reduce(comm, &mut ubuf[..=n])?;
        if ubuf[n] != 0.0 || !all_finite(&ubuf[..n]) {
            return Ok(clock.finish(true, true));
        }
        let mut at = 0;
        for &i in uncompressed.iter() {
            let len = dev.len(&grads[i]);
            let mean: Vec<f32> = ubuf[at..at + len].iter().map(|u| u * inv_w).collect();
            grads[i] = dev.upload(&mean)?;
            at += len;
        }

        // 2. Error feedback: M = grad + error, in the error buffer.
        if cfg.error_feedback {
            for (ci, t) in compressed.iter().enumerate() {
                dev.scale_add(&mut self.error[ci], 1.0, &grads[t.param], 1.0)?;
            }
        }

        // 3. Per bucket: P, all-reduce, orthonormalise, Q', all-reduce, decompress.
        let eps = cfg.orthogonalization_epsilon;
        let mut compress_failed = false;
        for bucket in buckets.iter() {
            let pb = &mut pbuf[..bucket.p_len];
            for &ci in &bucket.tensors {
                let t = &compressed[ci];
                if cfg.warm_start {
                    dev.orthonormalize_batch(&mut self.q[ci], &[whole(t.long(), t.rank)], eps)?;
                }
                let m = if cfg.error_feedback {
                    &self.error[ci]
                } else {
                    &grads[t.param]
                };
                // P (s × r) = oriented(M) (s × l) · Q (l × r); oriented(M) = Mᵀ when transposed.
                let dims = (t.short(), t.rank, t.long());
                dev.matmul(
                    &mut self.p[ci],
                    m,
                    t.transposed(),
                    &self.q[ci],
                    false,
                    dims,
                    false,
                )?;
                pb[t.p_range()].copy_from_slice(&dev.download(&self.p[ci])?);
            }
            clock.all_reduce(comm, pb)?;

            let qb = &mut qbuf[..bucket.q_len];
            let mut p_ok = Vec::with_capacity(bucket.tensors.len());
            for &ci in &bucket.tensors {
                let t = &compressed[ci];
                let p = &pb[t.p_range()];
                let ok = all_finite(p);
                self.p[ci] = dev.upload(p)?;
                if ok {
                    dev.orthonormalize_batch(&mut self.p[ci], &[whole(t.short(), t.rank)], eps)?;
                }
                p_ok.push(ok);
                let m = if cfg.error_feedback {
                    &self.error[ci]
                } else {
                    &grads[t.param]
                };
                // Q' (l × r) = oriented(M)ᵀ (l × s) · P (s × r).
                let dims = (t.long(), t.rank, t.short());
                let a_t = !t.transposed();
                dev.matmul(&mut self.qn[ci], m, a_t, &self.p[ci], false, dims, false)?;
                qb[t.qn_range()].copy_from_slice(&dev.download(&self.qn[ci])?);
            }
            clock.all_reduce(comm, qb)?;
            if inv_w != 1.0 {
                qb.iter_mut().for_each(|x| *x *= inv_w);
            }

            for (&ci, p_ok) in bucket.tensors.iter().zip(p_ok) {
                let t = &compressed[ci];
                let reduced = &qb[t.qn_range()];
                if !(p_ok && all_finite(reduced)) {
                    // As on the host: keep the error buffer (it holds M) unless M itself is not
                    // finite; the step is reported non-finite and must be skipped.
                    compress_failed = true;
                    if cfg.error_feedback {
                        let e = &mut self.error[ci];
                        dev.fill_zero(&mut self.flag)?;
                        flag_non_finite(dev, &mut self.flag, e)?;
                        if dev.download(&self.flag)?[0] != 0 {
                            dev.fill_zero(e)?;
                        }
                    }
                    continue;
                }
                self.qn[ci] = dev.upload(reduced)?;
                let g = &mut grads[t.param];
                let (p, qn) = (&self.p[ci], &self.qn[ci]);
                if t.transposed() {
                    // M (l × s) ≈ Q'·Pᵀ.
                    dev.matmul(g, qn, false, p, true, (t.long(), t.short(), t.rank), false)?;
                } else {
                    // M (s × l) ≈ P·Q'ᵀ.
                    dev.matmul(g, p, false, qn, true, (t.short(), t.long(), t.rank), false)?;
                }
                if cfg.error_feedback {
                    dev.scale_add(&mut self.error[ci], 1.0, g, -1.0)?;
                }
                if cfg.warm_start {
                    self.q[ci] = dev.upload(reduced)?;
                }
            }
        }
        Ok(clock.finish(true, compress_failed))
    }
}

/// Raises `flag` if `buf` holds a non-finite value.
fn flag_non_finite<D: PowerSgdDevice>(
    dev: &D,
    flag: &mut D::Buf<u32>,
    buf: &D::Buf<f32>,
) -> kernels::Result<()> {
    let whole = 0..dev.len(buf);
    dev.grad_param_finite(flag, buf, std::slice::from_ref(&whole))
}

/// One `s × r` matrix filling a buffer.
fn whole(s: usize, r: usize) -> OrthMat {
    OrthMat { offset: 0, s, r }
}

#[cfg(test)]
mod tests;
