//! The optimizer's element-wise kernels over flat buffers: AdamW (PyTorch's `torch.optim.AdamW`
//! formulation, decoupled weight decay), the squared norm for global-norm clipping, and the
//! weight EMA.
//!
//! AdamW at update t (1-based), with g = grad_scale · grad:
//! ```text
//! p ← p − lr·wd·p
//! m ← β1·m + (1−β1)·g          v ← β2·v + (1−β2)·g²
//! p ← p − lr · (m / (1−β1ᵗ)) / (sqrt(v / (1−β2ᵗ)) + ε)
//! ```
//!
//! [`AdamWOps`] runs them on a [`Device`]: the functions below on [`Cpu`], the CUDA kernels of
//! `kernels/cuda/adamw.cu` on a GPU, which also write an fp16 copy of the updated parameters
//! (the matmuls' inputs) when given a buffer for it.

use crate::device::{Cpu, Device};
use crate::error::{check_len, Result};
use half::f16;
use rayon::prelude::*;

/// The optimizer's kernels on a [`Device`] (CUDA: `kernels/cuda/adamw.cu`).
pub trait AdamWOps: Device {
    /// [`adamw_update`] of `params`, `m`, `v` in place; when `params_f16` is given it is
    /// overwritten with the updated parameters rounded to f16 (nearest even).
    fn adamw_update(
        &self,
        params: &mut Self::Buf<f32>,
        params_f16: Option<&mut Self::Buf<f16>>,
        grads: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
        h: AdamWStep,
    ) -> Result<()>;

    /// `out[0] += Σ x²`, summed in f64 in a fixed order (deterministic); `out` has one element
    /// and stays on the device.
    fn sum_squares(&self, out: &mut Self::Buf<f64>, x: &Self::Buf<f32>) -> Result<()>;

    /// [`ema_update`]: `ema ← decay·ema + (1 − decay)·params`.
    fn ema_update(
        &self,
        ema: &mut Self::Buf<f32>,
        params: &Self::Buf<f32>,
        decay: f32,
    ) -> Result<()>;
}

impl AdamWOps for Cpu {
    fn adamw_update(
        &self,
        params: &mut Vec<f32>,
        params_f16: Option<&mut Vec<f16>>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: AdamWStep,
    ) -> Result<()> {
        if let Some(p16) = &params_f16 {
            check_len("adamw_update", "params_f16", p16.len(), params.len())?;
        }
        adamw_update(params, grads, m, v, h)?;
        if let Some(p16) = params_f16 {
            for (d, &p) in p16.iter_mut().zip(params.iter()) {
                *d = f16::from_f32(p);
            }
        }
        Ok(())
    }

    fn sum_squares(&self, out: &mut Vec<f64>, x: &Vec<f32>) -> Result<()> {
        check_len("sum_squares", "out", out.len(), 1)?;
        out[0] += sum_squares(x);
        Ok(())
    }

    fn ema_update(&self, ema: &mut Vec<f32>, params: &Vec<f32>, decay: f32) -> Result<()> {
        ema_update(ema, params, decay)
    }
}

/// Elements per parallel task (fixed: results never depend on scheduling).
const CHUNK: usize = 1 << 14;

/// Hyper-parameters of one AdamW update of one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based update number, for bias correction.
    pub t: u64,
    /// Multiplies the gradient first (global-norm clipping, loss-scale removal).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// The bias-corrected step size `lr / (1 − β1ᵗ)` and `sqrt(1 − β2ᵗ)`, computed in f64 and
    /// rounded to f32 (the GPU launcher passes these same two scalars to its kernel).
    pub fn bias_corrections(&self) -> (f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powf(self.t as f64);
        let bc2 = 1.0 - (self.beta2 as f64).powf(self.t as f64);
        ((self.lr as f64 / bc1) as f32, bc2.sqrt() as f32)
    }
}

pub fn adamw_update(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw_update";
    let n = params.len();
    check_len(OP, "grads", grads.len(), n)?;
    check_len(OP, "m", m.len(), n)?;
    check_len(OP, "v", v.len(), n)?;
    let (step, bc2_sqrt) = h.bias_corrections();
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = g[i] * h.grad_scale;
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g;
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + h.eps;
                p[i] -= h.lr * h.weight_decay * p[i];
                p[i] -= step * m[i] / denom;
            }
        });
    Ok(())
}

/// Σ x² in f64, reduced over fixed chunks in a fixed order (deterministic).
pub fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .collect();
    partials.iter().sum()
}

/// `ema ← decay·ema + (1 − decay)·params`.
pub fn ema_update(ema: &mut [f32], params: &[f32], decay: f32) -> Result<()> {
    check_len("ema_update", "params", params.len(), ema.len())?;
    ema.par_chunks_mut(CHUNK)
        .zip(params.par_chunks(CHUNK))
        .for_each(|(e, p)| {
            for (e, &p) in e.iter_mut().zip(p) {
                *e = decay * *e + (1.0 - decay) * p;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's AdamW written out in f64 for one scalar.
    fn reference(p: f64, grads: &[f64], h: AdamWStep) -> f64 {
        let (mut p, mut m, mut v) = (p, 0.0, 0.0);
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        for (t, &g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            p *= 1.0 - h.lr as f64 * h.weight_decay as f64;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mhat = m / (1.0 - b1.powi(t));
            let vhat = v / (1.0 - b2.powi(t));
            p -= h.lr as f64 * mhat / (vhat.sqrt() + h.eps as f64);
        }
        p
    }

    #[test]
    fn matches_the_pytorch_formulation_over_several_steps() {
        let h0 = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.96,
            eps: 1e-8,
            weight_decay: 4.5e-2,
            t: 0,
            grad_scale: 1.0,
        };
        let grads = [0.5, -0.25, 1.5, 0.0, -2.0];
        let (mut p, mut m, mut v) = (vec![0.7f32; 3], vec![0.0; 3], vec![0.0; 3]);
        for (t, &g) in grads.iter().enumerate() {
            let h = AdamWStep {
                t: t as u64 + 1,
                grad_scale: 0.5,
                ..h0
            };
            // grad_scale 0.5 on a doubled gradient gives the reference's gradient.
            adamw_update(&mut p, &[2.0 * g as f32; 3], &mut m, &mut v, h).unwrap();
        }
        let want = reference(0.7, &grads, h0);
        assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
        assert!(adamw_update(&mut p, &[0.0; 2], &mut m, &mut v, h0).is_err());
    }

    #[test]
    fn sum_squares_and_ema() {
        let x: Vec<f32> = (0..40_000).map(|i| (i % 7) as f32).collect();
        let want: f64 = x.iter().map(|&v| (v * v) as f64).sum();
        assert_eq!(sum_squares(&x), want);
        let mut e = vec![1.0f32; 4];
        ema_update(&mut e, &[3.0; 4], 0.75).unwrap();
        assert_eq!(e, vec![1.5; 4]);
    }
}
