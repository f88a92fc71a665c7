//! Spatial resampling by a factor of two, NCHW: 2×2 max-pooling (stride 2, PyTorch's
//! `nn.MaxPool2d(2)`: the first maximum in row-major window order wins ties) and nearest-neighbour
//! upsampling (`nn.Upsample(scale_factor=2, mode='nearest')`).
//!
//! Shapes: `planes` = B·C independent H×W planes. Pooling needs even H and W.
//! Backward passes overwrite `dinp` (activation gradients).

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use rayon::prelude::*;

/// Max-pooling and nearest upsampling on a [`Device`] (the CUDA kernels:
/// `kernels/cuda/resample.cu`), every buffer in the storage type `T` (f32, or f16 for fp16
/// activations), arithmetic in f32. Shapes and semantics as the functions of this module.
pub trait ResampleOps: Device {
    /// `out` [planes, H/2, W/2] = max over each 2×2 window of `inp` [planes, H, W].
    fn maxpool2_forward<T: Elem>(
        &self,
        out: &mut Self::Buf<T>,
        inp: &Self::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()>;
    /// `dinp` [planes, H, W] (overwritten): each `dout` value at its window's first maximum in
    /// `inp` (the forward pass's input), zero elsewhere.
    fn maxpool2_backward<T: Elem>(
        &self,
        dinp: &mut Self::Buf<T>,
        dout: &Self::Buf<T>,
        inp: &Self::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()>;
    /// `out` [planes, 2H, 2W]: each pixel of `inp` [planes, H, W] copied into a 2×2 square.
    fn upsample2_forward<T: Elem>(
        &self,
        out: &mut Self::Buf<T>,
        inp: &Self::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()>;
    /// `dinp` [planes, H, W] (overwritten) = sum of `dout` [planes, 2H, 2W] over each square.
    fn upsample2_backward<T: Elem>(
        &self,
        dinp: &mut Self::Buf<T>,
        dout: &Self::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()>;
}

/// The references in f32; `T` buffers are widened and the results rounded back to `T`.
impl ResampleOps for Cpu {
    fn maxpool2_forward<T: Elem>(
        &self,
        out: &mut Vec<T>,
        inp: &Vec<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let mut o = vec![0.0; out.len()];
        maxpool2_forward(&mut o, &widen(inp), planes, h, w)?;
        store(out, o);
        Ok(())
    }
    fn maxpool2_backward<T: Elem>(
        &self,
        dinp: &mut Vec<T>,
        dout: &Vec<T>,
        inp: &Vec<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let mut d = vec![0.0; dinp.len()];
        maxpool2_backward(&mut d, &widen(dout), &widen(inp), planes, h, w)?;
        store(dinp, d);
        Ok(())
    }
    fn upsample2_forward<T: Elem>(
        &self,
        out: &mut Vec<T>,
        inp: &Vec<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let mut o = vec![0.0; out.len()];
        upsample2_forward(&mut o, &widen(inp), planes, h, w)?;
        store(out, o);
        Ok(())
    }
    fn upsample2_backward<T: Elem>(
        &self,
        dinp: &mut Vec<T>,
        dout: &Vec<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let mut d = vec![0.0; dinp.len()];
        upsample2_backward(&mut d, &widen(dout), planes, h, w)?;
        store(dinp, d);
        Ok(())
    }
}

pub(crate) fn check_even(op: &'static str, h: usize, w: usize) -> Result<()> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(KernelError::Shape {
            op,
            what: format!("height {h} and width {w} must both be even"),
        });
    }
    Ok(())
}

/// The first maximum, in row-major window order, of the 2×2 window (`a`, `b` on top, `c`, `d`
/// below) and its position 0..4 there. Selects, not branches: on real activations the branches
/// were mispredicted about half the time.
#[inline(always)]
fn first_max4(a: f32, b: f32, c: f32, d: f32) -> (f32, u8) {
    let (mut m, mut i) = (a, 0u8);
    (m, i) = if b > m { (b, 1) } else { (m, i) };
    (m, i) = if c > m { (c, 2) } else { (m, i) };
    (m, i) = if d > m { (d, 3) } else { (m, i) };
    (m, i)
}

/// `out` [planes, H/2, W/2] = max over each 2×2 window of `inp` [planes, H, W].
pub fn maxpool2_forward(
    out: &mut [f32],
    inp: &[f32],
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    const OP: &str = "maxpool2_forward";
    check_even(OP, h, w)?;
    check_len(OP, "inp", inp.len(), planes * h * w)?;
    check_len(OP, "out", out.len(), planes * h * w / 4)?;
    if h == 0 || w == 0 {
        return Ok(());
    }
    let (oh, ow) = (h / 2, w / 2);
    out.par_chunks_mut(oh * ow)
        .zip(inp.par_chunks(h * w))
        .for_each(|(o, x)| {
            for (orow, rows) in o.chunks_exact_mut(ow).zip(x.chunks_exact(2 * w)) {
                let (top, bot) = rows.split_at(w);
                let windows = top.chunks_exact(2).zip(bot.chunks_exact(2));
                for (o, (t, b)) in orow.iter_mut().zip(windows) {
                    *o = first_max4(t[0], t[1], b[0], b[1]).0;
                }
            }
        });
    Ok(())
}

/// `dinp` (overwritten) receives each `dout` value at its window's maximum, zero elsewhere.
pub fn maxpool2_backward(
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    const OP: &str = "maxpool2_backward";
    check_even(OP, h, w)?;
    check_len(OP, "inp", inp.len(), planes * h * w)?;
    check_len(OP, "dinp", dinp.len(), planes * h * w)?;
    check_len(OP, "dout", dout.len(), planes * h * w / 4)?;
    if h == 0 || w == 0 {
        return Ok(());
    }
    let (oh, ow) = (h / 2, w / 2);
    dinp.par_chunks_mut(h * w)
        .zip(inp.par_chunks(h * w).zip(dout.par_chunks(oh * ow)))
        .for_each(|(dx, (x, dy))| {
            let rows = dx.chunks_exact_mut(2 * w).zip(x.chunks_exact(2 * w));
            for ((drows, rows), dyrow) in rows.zip(dy.chunks_exact(ow)) {
                let (dtop, dbot) = drows.split_at_mut(w);
                let (top, bot) = rows.split_at(w);
                let windows = top.chunks_exact(2).zip(bot.chunks_exact(2));
                let dwindows = dtop.chunks_exact_mut(2).zip(dbot.chunks_exact_mut(2));
                for ((&g, (t, b)), (dt, db)) in dyrow.iter().zip(windows).zip(dwindows) {
                    let i = first_max4(t[0], t[1], b[0], b[1]).1;
                    dt[0] = if i == 0 { g } else { 0.0 };
                    dt[1] = if i == 1 { g } else { 0.0 };
                    db[0] = if i == 2 { g } else { 0.0 };
                    db[1] = if i == 3 { g } else { 0.0 };
                }
            }
        });
    Ok(())
}

/// `out` [planes, 2H, 2W]: each input pixel copied into a 2×2 square.
pub fn upsample2_forward(
    out: &mut [f32],
    inp: &[f32],
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    const OP: &str = "upsample2_forward";
    check_len(OP, "inp", inp.len(), planes * h * w)?;
    check_len(OP, "out", out.len(), planes * h * w * 4)?;
    if h == 0 || w == 0 {
        return Ok(());
    }
    out.par_chunks_mut(4 * h * w)
        .zip(inp.par_chunks(h * w))
        .for_each(|(o, x)| {
            for y in 0..2 * h {
                let src = &x[(y / 2) * w..][..w];
                let dst = &mut o[y * 2 * w..][..2 * w];
                for (pair, &v) in dst.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
            }
        });
    Ok(())
}

/// `dinp` [planes, H, W] (overwritten) = sum of `dout` over each 2×2 square.
pub fn upsample2_backward(
    dinp: &mut [f32],
    dout: &[f32],
    planes: usize,
    h: usize,
    w: usize,
) -> Result<()> {
    const OP: &str = "upsample2_backward";
    check_len(OP, "dinp", dinp.len(), planes * h * w)?;
    check_len(OP, "dout", dout.len(), planes * h * w * 4)?;
    if h == 0 || w == 0 {
        return Ok(());
    }
    dinp.par_chunks_mut(h * w)
        .zip(dout.par_chunks(4 * h * w))
        .for_each(|(dx, dy)| {
            for y in 0..h {
                for x in 0..w {
                    let r0 = &dy[2 * y * 2 * w..];
                    let r1 = &dy[(2 * y + 1) * 2 * w..];
                    dx[y * w + x] = r0[2 * x] + r0[2 * x + 1] + r1[2 * x] + r1[2 * x + 1];
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    #[test]
    fn maxpool_picks_window_maxima_and_first_on_ties() {
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 2.0, 2.0,
            3.0, 4.0, 2.0, 2.0,
        ];
        let mut y = [0.0; 2];
        maxpool2_forward(&mut y, &x, 1, 2, 4).unwrap();
        assert_eq!(y, [5.0, 2.0]);
        let mut dx = [9.0; 8];
        maxpool2_backward(&mut dx, &[1.0, 2.0], &x, 1, 2, 4).unwrap();
        assert_eq!(dx, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!(maxpool2_forward(&mut y, &x[..6], 1, 2, 3).is_err());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (planes, h, w) = (3, 4, 6);
        // Distinct values, so that no window has a tie under the ±eps perturbation.
        let mut x: Vec<f32> = rand_vec(planes * h * w, 1.0, 1)
            .iter()
            .enumerate()
            .map(|(i, v)| v + i as f32 * 0.1)
            .collect();
        let wq = rand_vec(planes * h * w / 4, 1.0, 2);
        let mut dx = vec![0.0; x.len()];
        maxpool2_backward(&mut dx, &wq, &x, planes, h, w).unwrap();
        let num: Vec<f64> = (0..x.len())
            .map(|i| {
                numeric_grad(&mut x, i, 1e-3, |x| {
                    let mut y = vec![0.0; planes * h * w / 4];
                    maxpool2_forward(&mut y, x, planes, h, w).unwrap();
                    dot(&wq, &y)
                })
            })
            .collect();
        let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
        assert_close("dmaxpool", &got, &num, 1e-3, 1e-3);

        let wu = rand_vec(planes * h * w * 4, 1.0, 3);
        let mut du = vec![0.0; x.len()];
        upsample2_backward(&mut du, &wu, planes, h, w).unwrap();
        let num: Vec<f64> = (0..x.len())
            .map(|i| {
                numeric_grad(&mut x, i, 1e-2, |x| {
                    let mut y = vec![0.0; planes * h * w * 4];
                    upsample2_forward(&mut y, x, planes, h, w).unwrap();
                    dot(&wu, &y)
                })
            })
            .collect();
        let got: Vec<f64> = du.iter().map(|&v| v as f64).collect();
        assert_close("dupsample", &got, &num, 1e-3, 1e-3);
    }

    #[test]
    fn upsample_copies_each_pixel_into_a_square() {
        let mut y = [0.0; 8];
        upsample2_forward(&mut y, &[1.0, 2.0], 1, 1, 2).unwrap();
        assert_eq!(y, [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
    }
}
