//! The paper's mixed precision on the CPU (DALL·E App. D; DESIGN.md "Precision"): the reference
//! that the GPU's fp16 path is checked against, and the test bed of per-resblock gradient scaling
//! where no GPU exists.
//!
//! Under [`Precision::Fp16`] the models round what the GPU stores in 16 bits through `half`'s
//! f16 (round to nearest even, overflow to ±inf): activations that feed a product and activation
//! gradients inside a resblock. The residual stream and its gradient, gains, biases, embeddings,
//! the head and the logits stay f32, as do parameter gradients.
//!
//! A resblock's backward pass under scaling ([`BlockScales`]) follows `kernels::gradscale`:
//! its incoming gradient is the residual gradient times the block's scale, rounded to the
//! activation type (non-finite values zeroed and the block flagged); its outgoing gradient, rounded
//! the same way, is divided by the scale and added to the residual gradient. Its parameter
//! gradients accumulate in scaled units; [`unscale_param_grads`] divides them once per step.

use half::f16;
use kernels::gradscale::{param_finite_flags, scale_cast, unscale_add};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The numeric format of activations and activation gradients (`run.precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    Fp32,
    /// Activations feeding products and activation gradients inside resblocks rounded to f16.
    Fp16,
}

impl Precision {
    /// Rounds `v` in place to this precision's activation type (nothing for f32).
    pub fn round(self, v: &mut [f32]) {
        if self == Precision::Fp16 {
            for x in v {
                *x = f16::from_f32(*x).to_f32();
            }
        }
    }
}

/// One scale and one flag per resblock, in `kernels::gradscale::GradScaler`'s order (layer l's
/// attention block at 2l, its MLP block at 2l + 1). Flags are raised, never cleared.
#[derive(Debug)]
pub struct BlockScales<'a> {
    pub scales: &'a [f32],
    pub flags: &'a mut [u32],
}

/// Buffers of the scaled backward pass, one residual-gradient size each.
#[derive(Debug)]
pub(crate) struct ScaleScratch {
    /// The block's incoming gradient, then its outgoing one (scaled units).
    pub block: Vec<f32>,
    /// The same values as f16, for the casts.
    pub half: Vec<f16>,
}

impl ScaleScratch {
    pub fn new(len: usize) -> Self {
        ScaleScratch {
            block: vec![0.0; len],
            half: vec![f16::ZERO; len],
        }
    }

    /// `block = round(dresid · scale)`; a non-finite value (f16 overflow included) is stored as 0
    /// and raises `flag`.
    pub fn scale_in(
        &mut self,
        precision: Precision,
        dresid: &[f32],
        scale: f32,
        flag: &mut u32,
    ) -> kernels::Result<()> {
        match precision {
            Precision::Fp32 => scale_cast(&mut self.block, flag, dresid, scale),
            Precision::Fp16 => {
                scale_cast(&mut self.half, flag, dresid, scale)?;
                for (o, h) in self.block.iter_mut().zip(&self.half) {
                    *o = h.to_f32();
                }
                Ok(())
            }
        }
    }

    /// `dresid += round(block) / scale`; a non-finite quotient adds nothing and raises `flag`.
    pub fn unscale_out(
        &mut self,
        precision: Precision,
        dresid: &mut [f32],
        scale: f32,
        flag: &mut u32,
    ) -> kernels::Result<()> {
        match precision {
            Precision::Fp32 => unscale_add(dresid, flag, &self.block, scale),
            Precision::Fp16 => {
                for (h, &x) in self.half.iter_mut().zip(&self.block) {
                    *h = f16::from_f32(x);
                }
                unscale_add(dresid, flag, &self.half, scale)
            }
        }
    }
}

/// Ends a step's scaled backward passes: raises the flag of every resblock whose parameter
/// gradient (`grads[ranges[r]]`, scaled units) is not finite, then divides each block's gradient by
/// its scale (an IEEE division, as the kernels do), leaving true units.
pub fn unscale_param_grads(
    grads: &mut [f32],
    ranges: &[Range<usize>],
    scales: &[f32],
    flags: &mut [u32],
) -> kernels::Result<()> {
    param_finite_flags(flags, grads, ranges)?;
    for (range, &s) in ranges.iter().zip(scales) {
        for g in &mut grads[range.clone()] {
            *g /= s;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
