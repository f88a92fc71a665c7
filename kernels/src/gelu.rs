//! GELU, tanh form: `gelu(u) = 0.5·u·(1 + tanh(sqrt(2/π)·(u + 0.044715·u³)))`, element-wise.
//! Backward overwrites `dinp` (an activation gradient).

use crate::error::{check_len, Result};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;
/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) -> Result<()> {
    check_len("gelu_forward", "out", out.len(), inp.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &u) in o.iter_mut().zip(x) {
                let t = (SQRT_2_OVER_PI * (u + COEF * u * u * u)).tanh();
                *o = 0.5 * u * (1.0 + t);
            }
        });
    Ok(())
}

/// `dinp = dout · gelu'(inp)` (overwritten).
pub fn gelu_backward(dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> Result<()> {
    check_len("gelu_backward", "dout", dout.len(), inp.len())?;
    check_len("gelu_backward", "dinp", dinp.len(), inp.len())?;
    dinp.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK).zip(inp.par_chunks(CHUNK)))
        .for_each(|(dx, (dy, x))| {
            for ((dx, &dy), &u) in dx.iter_mut().zip(dy).zip(x) {
                let inner = SQRT_2_OVER_PI * (u + COEF * u * u * u);
                let t = inner.tanh();
                let sech2 = 1.0 - t * t;
                let d =
                    0.5 * (1.0 + t) + 0.5 * u * sech2 * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * u * u);
                *dx = dy * d;
            }
        });
    Ok(())
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
