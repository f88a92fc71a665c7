//! `y = a·y + b·x`, element-wise in f32: the dVAE's residual additions on a device (the block's
//! output post_gain·residual + identity, the residual path's incoming gradient, the sum of the
//! two paths' input gradients). `y` is overwritten; with `a = 0` it is written only. Each product
//! and the sum are rounded once, in that order (no fused multiply-add), so that with `b = 1` the
//! result is the host model's `a·y + x` bit for bit. CUDA source: `kernels/cuda/scale_add.cu`.

use crate::device::{Cpu, Device};
use crate::error::{check_len, Result};

pub trait ScaleAddOps: Device {
    /// `y = a·y + b·x` (`y = b·x` when `a = 0`); `y` and `x` have the same length.
    fn scale_add(&self, y: &mut Self::Buf<f32>, a: f32, x: &Self::Buf<f32>, b: f32) -> Result<()>;
}

impl ScaleAddOps for Cpu {
    fn scale_add(&self, y: &mut Vec<f32>, a: f32, x: &Vec<f32>, b: f32) -> Result<()> {
        scale_add(y, a, x, b)
    }
}

/// The reference of [`ScaleAddOps::scale_add`].
pub fn scale_add(y: &mut [f32], a: f32, x: &[f32], b: f32) -> Result<()> {
    check_len("scale_add", "x", x.len(), y.len())?;
    for (y, &x) in y.iter_mut().zip(x) {
        let bx = b * x;
        *y = if a == 0.0 { bx } else { a * *y + bx };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_adds_and_ignores_y_when_a_is_zero() {
        let mut y = vec![1.0, f32::NAN, 3.0];
        scale_add(&mut y, 0.0, &[2.0, 4.0, -1.0], 0.5).unwrap();
        assert_eq!(y, [1.0, 2.0, -0.5]);
        scale_add(&mut y, 0.25, &[1.0, 1.0, 1.0], 1.0).unwrap();
        assert_eq!(y, [1.25, 1.5, 0.875]);
        assert!(scale_add(&mut y, 1.0, &[1.0], 1.0).is_err());
    }
}
