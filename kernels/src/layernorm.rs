//! Layer normalisation over the last dimension (biased variance, eps 1e-5, as PyTorch's
//! `nn.LayerNorm`): `out = (inp − mean) · rstd · weight + bias`, with `mean` and `rstd` per row
//! saved for the backward pass.
//!
//! Shapes: `inp`, `out` [N, C]; `weight`, `bias` [C]; `mean`, `rstd` [N].
//!
//! The backward pass *adds* into `dinp`: layernorm always reads the residual stream, and its input
//! gradient is one more term of the residual gradient (llm.c's exception to "activation gradients
//! are overwritten"). Statistics are accumulated in f64 on CPU so the reference is exact to f32.

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use crate::linear::column_sums_add;
use rayon::prelude::*;

/// Fused residual-add + layernorm on a [`Device`] (the CUDA kernels: `kernels/cuda/layernorm.cu`).
pub trait LayerNormOps: Device {
    /// `x_out = x + delta` when `delta` is given (then `x_out` is required), and
    /// `y = layernorm(x_out or x)` stored as `O` (f32, or f16 for the matmul that follows), with
    /// `mean`, `rstd` per row. Shapes as the module doc says.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward<O: Elem>(
        &self,
        x_out: Option<&mut Self::Buf<f32>>,
        y: &mut Self::Buf<O>,
        mean: &mut Self::Buf<f32>,
        rstd: &mut Self::Buf<f32>,
        x: &Self::Buf<f32>,
        delta: Option<&Self::Buf<f32>>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// Backward of [`LayerNormOps::layernorm_forward`] given `dout` as `G` (f32 or f16):
    /// `dinp += …`, `dweight += …`, `dbias += …`; `inp` is the normalised input (`x_out` when
    /// the forward pass added a delta).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward<G: Elem>(
        &self,
        dinp: &mut Self::Buf<f32>,
        dweight: &mut Self::Buf<f32>,
        dbias: &mut Self::Buf<f32>,
        dout: &Self::Buf<G>,
        inp: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        mean: &Self::Buf<f32>,
        rstd: &Self::Buf<f32>,
        n: usize,
        c: usize,
    ) -> Result<()>;
}

impl LayerNormOps for Cpu {
    fn layernorm_forward<O: Elem>(
        &self,
        x_out: Option<&mut Vec<f32>>,
        y: &mut Vec<O>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        delta: Option<&Vec<f32>>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        const OP: &str = "layernorm_forward";
        check_len(OP, "y", y.len(), n * c)?;
        let mut out = vec![0.0f32; n * c];
        match (delta, x_out) {
            (Some(d), Some(xo)) => {
                check_len(OP, "x", x.len(), n * c)?;
                check_len(OP, "delta", d.len(), n * c)?;
                check_len(OP, "x_out", xo.len(), n * c)?;
                for ((o, &a), &b) in xo.iter_mut().zip(x.iter()).zip(d.iter()) {
                    *o = a + b;
                }
                layernorm_forward(&mut out, mean, rstd, xo, weight, bias, n, c)?;
            }
            (None, _) => layernorm_forward(&mut out, mean, rstd, x, weight, bias, n, c)?,
            (Some(_), None) => {
                return Err(KernelError::Shape {
                    op: OP,
                    what: "a residual delta needs an x_out buffer for x + delta".into(),
                })
            }
        }
        store(y, out);
        Ok(())
    }

    fn layernorm_backward<G: Elem>(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<G>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm_backward(
            dinp,
            dweight,
            dbias,
            &widen(dout),
            inp,
            weight,
            mean,
            rstd,
            n,
            c,
        )
    }
}

pub const LN_EPS: f32 = 1e-5;

/// Rows per parallel task (fixed, so that reductions are deterministic).
const ROWS_PER_TASK: usize = 32;

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "out", out.len(), n * c)?;
    check_len(OP, "mean", mean.len(), n)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    check_len(OP, "weight", weight.len(), c)?;
    check_len(OP, "bias", bias.len(), c)?;
    if c == 0 {
        return Ok(());
    }
    out.par_chunks_mut(c)
        .zip(inp.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((o, x), (m, r))| {
            let mu = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
            let s = 1.0 / (var + LN_EPS as f64).sqrt();
            let (mu32, s32) = (mu as f32, s as f32);
            for ((o, &x), (&w, &b)) in o.iter_mut().zip(x).zip(weight.iter().zip(bias)) {
                *o = (x - mu32) * s32 * w + b;
            }
            *m = mu32;
            *r = s32;
        });
    Ok(())
}

/// Backward of [`layernorm_forward`]: `dinp += …` (see the module doc), `dweight += …`,
/// `dbias += …`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward";
    for (name, len, want) in [
        ("dinp", dinp.len(), n * c),
        ("dout", dout.len(), n * c),
        ("inp", inp.len(), n * c),
        ("dweight", dweight.len(), c),
        ("dbias", dbias.len(), c),
        ("weight", weight.len(), c),
        ("mean", mean.len(), n),
        ("rstd", rstd.len(), n),
    ] {
        check_len(OP, name, len, want)?;
    }
    if c == 0 {
        return Ok(());
    }
    // dweight += Σ dout · xhat ; dbias += Σ dout, reduced per fixed chunk of rows.
    let partials: Vec<Vec<f32>> = dout
        .par_chunks(ROWS_PER_TASK * c)
        .zip(inp.par_chunks(ROWS_PER_TASK * c))
        .enumerate()
        .map(|(chunk, (dy, x))| {
            let mut dw = vec![0.0f32; c];
            for (r, (dy, x)) in dy.chunks_exact(c).zip(x.chunks_exact(c)).enumerate() {
                let row = chunk * ROWS_PER_TASK + r;
                let (mu, s) = (mean[row], rstd[row]);
                for ((dw, &dy), &x) in dw.iter_mut().zip(dy).zip(x) {
                    *dw += dy * (x - mu) * s;
                }
            }
            dw
        })
        .collect();
    for p in partials {
        for (a, v) in dweight.iter_mut().zip(p) {
            *a += v;
        }
    }
    column_sums_add(dbias, dout, n, c);
    // dinp += rstd · (g − mean(g) − xhat · mean(g · xhat)), g = dout · weight.
    dinp.par_chunks_mut(c)
        .zip(dout.par_chunks(c).zip(inp.par_chunks(c)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((dx, (dy, x)), (&mu, &s))| {
            let (mut g_mean, mut gx_mean) = (0.0f32, 0.0f32);
            for ((&dy, &x), &w) in dy.iter().zip(x).zip(weight) {
                let g = dy * w;
                g_mean += g;
                gx_mean += g * (x - mu) * s;
            }
            g_mean /= c as f32;
            gx_mean /= c as f32;
            for (((dx, &dy), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(weight) {
                let xhat = (x - mu) * s;
                *dx += s * (dy * w - g_mean - xhat * gx_mean);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    #[test]
    fn forward_normalises_each_row() {
        let (n, c) = (3, 8);
        let x = rand_vec(n * c, 3.0, 1);
        let (w, b) = (vec![1.0; c], vec![0.0; c]);
        let (mut y, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut y, &mut m, &mut r, &x, &w, &b, n, c).unwrap();
        for row in y.chunks(c) {
            let mu: f32 = row.iter().sum::<f32>() / c as f32;
            let var: f32 = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / c as f32;
            assert!(
                mu.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
                "mean {mu} var {var}"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (n, c) = (4, 10);
        let mut x = rand_vec(n * c, 2.0, 2);
        let mut w = rand_vec(c, 1.0, 3);
        let mut b = rand_vec(c, 1.0, 4);
        let wout = rand_vec(n * c, 1.0, 5);
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let (mut y, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut y, &mut m, &mut r, x, w, b, n, c).unwrap();
            dot(&wout, &y)
        };
        let (mut y, mut m, mut r) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut y, &mut m, &mut r, &x, &w, &b, n, c).unwrap();
        let mut dx = vec![1.0; n * c]; // accumulates onto the residual gradient
        let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &wout, &x, &w, &m, &r, n, c).unwrap();
        let eps = 1e-2;
        let (x0, w0, b0) = (x.clone(), w.clone(), b.clone());
        let num: Vec<f64> = (0..n * c)
            .map(|i| 1.0 + numeric_grad(&mut x, i, eps, |x| loss(x, &w0, &b0)))
            .collect();
        let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
        assert_close("dinp", &got, &num, 2e-3, 2e-3);
        let num: Vec<f64> = (0..c)
            .map(|i| numeric_grad(&mut w, i, eps, |w| loss(&x0, w, &b0)))
            .collect();
        let got: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
        assert_close("dweight", &got, &num, 2e-3, 2e-3);
        let num: Vec<f64> = (0..c)
            .map(|i| numeric_grad(&mut b, i, eps, |b| loss(&x0, &w0, b)))
            .collect();
        let got: Vec<f64> = db.iter().map(|&v| v as f64).collect();
        assert_close("dbias", &got, &num, 2e-3, 2e-3);
    }
}
