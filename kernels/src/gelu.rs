//! GELU, tanh form: `gelu(u) = 0.5·u·(1 + tanh(sqrt(2/π)·(u + 0.044715·u³)))`, element-wise.
//! Backward overwrites `dinp` (an activation gradient). `tanh` is the branch-free
//! [`crate::simd`] one (absolute error ≈ 2e-7), so the loops vectorise.
//!
//! [`GeluOps`] runs them on a [`Device`], in f32 or with f16 storage (the MLP's hidden
//! activation on GPU, in the paper's scheme): on [`Cpu`] the functions below on the values
//! widened to f32, the result rounded back; on a GPU the kernels of `kernels/cuda/gelu.cu`.
//!
//! CLIP's two other activations, forward only and in f32 (what embedding on a device needs;
//! CLIP trains on the CPU): [`quick_gelu_forward`], `u·σ(1.702·u)` (OpenAI's CLIP), and
//! [`gelu_erf_forward`], the exact `½·u·(1 + erf(u/√2))`.

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, Result};
use crate::simd::{fast_tanh, fmadd, Isa};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// GELU on a [`Device`] (CUDA: `kernels/cuda/gelu.cu`). `T` is the storage type of input,
/// output and gradients alike: f32, or f16 (fc1's f16 matmul output in, fc2's f16 matmul
/// input out); arithmetic is f32 either way.
pub trait GeluOps: Device {
    /// `out = gelu(inp)` (overwritten).
    fn gelu_forward<T: Elem>(&self, out: &mut Self::Buf<T>, inp: &Self::Buf<T>) -> Result<()>;
    /// `dinp = dout · gelu'(inp)` (overwritten).
    fn gelu_backward<T: Elem>(
        &self,
        dinp: &mut Self::Buf<T>,
        dout: &Self::Buf<T>,
        inp: &Self::Buf<T>,
    ) -> Result<()>;
    /// `out = u·σ(1.702·u)` of `inp` (overwritten), f32.
    fn quick_gelu_forward(&self, out: &mut Self::Buf<f32>, inp: &Self::Buf<f32>) -> Result<()>;
    /// `out = ½·u·(1 + erf(u/√2))` of `inp` (overwritten), f32.
    fn gelu_erf_forward(&self, out: &mut Self::Buf<f32>, inp: &Self::Buf<f32>) -> Result<()>;
}

/// The constant of `quick_gelu`.
pub const QUICK_GELU_ALPHA: f32 = 1.702;

/// `out = u·σ(1.702·u)` (OpenAI's CLIP's `quick_gelu`), element-wise; σ(x) = 1/(1 + e⁻ˣ) in f32.
pub fn quick_gelu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("quick_gelu_forward", "out", out.len(), inp.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &u) in o.iter_mut().zip(x) {
                *o = u * quick_gelu_sigmoid(u);
            }
        });
    Ok(())
}

/// σ(1.702·u), the gate of [`quick_gelu_forward`] (its backward pass reads it too).
pub fn quick_gelu_sigmoid(u: f32) -> f32 {
    1.0 / (1.0 + (-QUICK_GELU_ALPHA * u).exp())
}

/// `out = ½·u·(1 + erf(u/√2))`, the exact GELU, element-wise, computed in f64 and rounded.
pub fn gelu_erf_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("gelu_erf_forward", "out", out.len(), inp.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &u) in o.iter_mut().zip(x) {
                let u = u as f64;
                *o = (0.5 * u * (1.0 + libm::erf(u * std::f64::consts::FRAC_1_SQRT_2))) as f32;
            }
        });
    Ok(())
}

impl GeluOps for Cpu {
    fn gelu_forward<T: Elem>(&self, out: &mut Vec<T>, inp: &Vec<T>) -> Result<()> {
        check_len("gelu_forward", "out", out.len(), inp.len())?;
        let mut y = vec![0.0f32; inp.len()];
        gelu_forward(&mut y, &widen(inp))?;
        store(out, y);
        Ok(())
    }

    fn gelu_backward<T: Elem>(&self, dinp: &mut Vec<T>, dout: &Vec<T>, inp: &Vec<T>) -> Result<()> {
        check_len("gelu_backward", "dinp", dinp.len(), inp.len())?;
        let mut dx = vec![0.0f32; inp.len()];
        gelu_backward(&mut dx, &widen(dout), &widen(inp))?;
        store(dinp, dx);
        Ok(())
    }

    fn quick_gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> Result<()> {
        quick_gelu_forward(out, inp)
    }

    fn gelu_erf_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>) -> Result<()> {
        gelu_erf_forward(out, inp)
    }
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("gelu_forward", "out", out.len(), inp.len())?;
    let isa = Isa::best();
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::best` only returns instruction sets this CPU has.
            Isa::Avx2 | Isa::Avx512 => unsafe { forward_fma(o, x) },
            _ => forward_body::<false>(o, x),
        });
    Ok(())
}

/// `dinp = dout · gelu'(inp)` (overwritten).
pub fn gelu_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    check_len("gelu_backward", "dout", dout.len(), inp.len())?;
    check_len("gelu_backward", "dinp", dinp.len(), inp.len())?;
    let isa = Isa::best();
    dinp.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK).zip(inp.par_chunks(CHUNK)))
        .for_each(|(dx, (dy, x))| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::best` only returns instruction sets this CPU has.
            Isa::Avx2 | Isa::Avx512 => unsafe { backward_fma(dx, dy, x) },
            _ => backward_body::<false>(dx, dy, x),
        });
    Ok(())
}

#[inline(always)]
fn forward_body<const FMA: bool>(out: &mut [f32], inp: &[f32]) {
    for (o, &u) in out.iter_mut().zip(inp) {
        let t = fast_tanh::<FMA>(SQRT_2_OVER_PI * fmadd::<FMA>(COEF * u * u, u, u));
        *o = 0.5 * u * (1.0 + t);
    }
}

#[inline(always)]
fn backward_body<const FMA: bool>(dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
    for ((dx, &dy), &u) in dinp.iter_mut().zip(dout).zip(inp) {
        let t = fast_tanh::<FMA>(SQRT_2_OVER_PI * fmadd::<FMA>(COEF * u * u, u, u));
        let sech2 = 1.0 - t * t;
        let d = 0.5 * (1.0 + t) + 0.5 * u * sech2 * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * u * u);
        *dx = dy * d;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_fma(out: &mut [f32], inp: &[f32]) {
    forward_body::<true>(out, inp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_fma(dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
    backward_body::<true>(dinp, dout, inp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    #[test]
    fn known_values() {
        let x = [0.0f32, 1.0, -1.0, 3.0];
        let mut y = [0.0f32; 4];
        gelu_forward(&mut y, &x).unwrap();
        // Values of PyTorch's gelu(approximate='tanh').
        let want = [0.0, 0.841_192, -0.158_808, 2.996_363];
        let got: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        assert_close("gelu", &got, &want, 1e-5, 1e-5);
    }

    #[test]
    fn generic_and_fused_paths_agree() {
        let x = rand_vec(1000, 6.0, 3);
        let (mut a, mut b) = (vec![0.0; 1000], vec![0.0; 1000]);
        gelu_forward(&mut a, &x).unwrap();
        forward_body::<false>(&mut b, &x);
        let (a, b): (Vec<f64>, Vec<f64>) = (
            a.iter().map(|&v| v as f64).collect(),
            b.iter().map(|&v| v as f64).collect(),
        );
        assert_close("gelu paths", &a, &b, 1e-6, 1e-6);
        let (mut da, mut db) = (vec![0.0; 1000], vec![0.0; 1000]);
        gelu_backward(&mut da, &x, &x).unwrap();
        backward_body::<false>(&mut db, &x, &x);
        let (da, db): (Vec<f64>, Vec<f64>) = (
            da.iter().map(|&v| v as f64).collect(),
            db.iter().map(|&v| v as f64).collect(),
        );
        assert_close("dgelu paths", &da, &db, 1e-5, 1e-5);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut x = rand_vec(200, 4.0, 1);
        let w = rand_vec(200, 1.0, 2);
        let mut dx = vec![0.0; 200];
        gelu_backward(&mut dx, &w, &x).unwrap();
        let num: Vec<f64> = (0..200)
            .map(|i| {
                numeric_grad(&mut x, i, 1e-2, |x| {
                    let mut y = vec![0.0; 200];
                    gelu_forward(&mut y, x).unwrap();
                    dot(&w, &y)
                })
            })
            .collect();
        let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
        assert_close("dgelu", &got, &num, 1e-3, 1e-3);
    }
}
