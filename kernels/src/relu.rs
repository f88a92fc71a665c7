//! ReLU, element-wise. The backward pass overwrites `dinp` (an activation gradient); the
//! derivative at exactly 0 is taken as 0, as PyTorch does.

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, Result};
use rayon::prelude::*;

/// ReLU on a [`Device`] (the CUDA kernels: `kernels/cuda/relu.cu`), every buffer in the storage
/// type `T` (f32, or f16 for fp16 activations), arithmetic in f32.
pub trait ReluOps: Device {
    /// `out = max(inp, 0)`.
    fn relu_forward<T: Elem>(&self, out: &mut Self::Buf<T>, inp: &Self::Buf<T>) -> Result<()>;
    /// `dinp = dout · [inp > 0]` (overwritten).
    fn relu_backward<T: Elem>(
        &self,
        dinp: &mut Self::Buf<T>,
        dout: &Self::Buf<T>,
        inp: &Self::Buf<T>,
    ) -> Result<()>;
}

/// The references in f32; `T` buffers are widened and the results rounded back to `T`.
impl ReluOps for Cpu {
    fn relu_forward<T: Elem>(&self, out: &mut Vec<T>, inp: &Vec<T>) -> Result<()> {
        let mut o = vec![0.0; out.len()];
        relu_forward(&mut o, &widen(inp))?;
        store(out, o);
        Ok(())
    }
    fn relu_backward<T: Elem>(&self, dinp: &mut Vec<T>, dout: &Vec<T>, inp: &Vec<T>) -> Result<()> {
        let mut d = vec![0.0; dinp.len()];
        relu_backward(&mut d, &widen(dout), &widen(inp))?;
        store(dinp, d);
        Ok(())
    }
}

const CHUNK: usize = 1 << 14;

pub fn relu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("relu_forward", "out", out.len(), inp.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v.max(0.0);
            }
        });
    Ok(())
}

/// `dinp = dout · [inp > 0]` (overwritten).
pub fn relu_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    check_len("relu_backward", "dout", dout.len(), inp.len())?;
    check_len("relu_backward", "dinp", dinp.len(), inp.len())?;
    dinp.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK).zip(inp.par_chunks(CHUNK)))
        .for_each(|(dx, (dy, x))| {
            for ((dx, &dy), &v) in dx.iter_mut().zip(dy).zip(x) {
                *dx = if v > 0.0 { dy } else { 0.0 };
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_and_backward() {
        let x = [-1.0, 0.0, 2.0];
        let mut y = [9.0; 3];
        relu_forward(&mut y, &x).unwrap();
        assert_eq!(y, [0.0, 0.0, 2.0]);
        let mut dx = [9.0; 3];
        relu_backward(&mut dx, &[1.0, 1.0, 3.0], &x).unwrap();
        assert_eq!(dx, [0.0, 0.0, 3.0]);
        assert!(relu_forward(&mut y, &x[..2]).is_err());
    }
}
