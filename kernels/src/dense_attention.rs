//! Dense masked attention: the `T × T` way, the baseline that block-sparse attention
//! ([`crate::attention`]) is measured against on the GPU (`examples/bench_attention_gpu.rs`).
//!
//! Provides:
//! - [`mask_words`]: a [`BlockLayout`]'s mask as dense bits, `[T, ceil(T/32)]` u32 words;
//! - [`masked_softmax_forward`] / [`masked_softmax_backward`]: the row-wise softmax over `T`
//!   scores with that mask, and its gradient (the readable CPU references);
//! - [`MaskedSoftmaxOps`]: both on a [`Device`] (the CUDA kernels: `kernels/cuda/masked_softmax.cu`);
//! - [`DenseAttention`]: the whole forward and backward pass as a PyTorch user writes it, with the
//!   products through [`MatmulOps`] (cuBLAS on a GPU) reading the heads of the interleaved `qkv`
//!   in place (leading dimensions), and the masked softmax between them:
//!   `S = Q Kᵀ`, `P = softmax(scale·S, mask)`, `O = P V`; backward `dP = dO Vᵀ`,
//!   `dS = scale · P ∘ (dP − rowsum(P ∘ dP))`, `dQ = dS K`, `dK = dSᵀ Q`, `dV = Pᵀ dO`.
//!
//! It computes the same function as [`crate::attention::AttentionOps`] (a test holds the two
//! together); unlike it, it materialises `S` and `P` for every (batch, head): `B·NH·T²` values
//! each. Shapes as in [`crate::attention`]: `qkv` `[B, T, 3C]`, `out` `[B, T, C]`; the outputs
//! here (`out`, `dqkv`) are f32, as cuBLAS writes them. Rows of `S` are `(b, h, p)`, row
//! `r = (b·NH + h)·T + p`.

use crate::attention::BlockLayout;
use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use crate::linear::{GemmSpec, MatmulOps};

/// The layout's allowed pairs as bits: word `p·W + q/32` (`W = ceil(T/32)`) has bit `q mod 32`
/// set iff query `p` may attend key `q`.
pub fn mask_words(layout: &BlockLayout) -> Vec<u32> {
    let t = layout.seq_len();
    let w = t.div_ceil(32);
    let mut words = vec![0u32; t * w];
    for p in 0..t {
        for q in 0..t {
            if layout.allowed(p, q) {
                words[p * w + q / 32] |= 1 << (q % 32);
            }
        }
    }
    words
}

fn is_allowed(mask: &[u32], words: usize, p: usize, q: usize) -> bool {
    mask[p * words + q / 32] >> (q % 32) & 1 == 1
}

/// Checks `rows` rows of `t` values, rows a multiple of `t`, and a `[t, ceil(t/32)]` mask.
fn check_rows(op: &'static str, rows: usize, t: usize) -> Result<usize> {
    if t == 0 || !rows.is_multiple_of(t) {
        return Err(KernelError::Shape {
            op,
            what: format!("rows {rows} must be a multiple of a non-zero t {t} (B·NH·T rows)"),
        });
    }
    rows.checked_mul(t).ok_or_else(|| KernelError::Shape {
        op,
        what: format!("rows {rows} × t {t} overflows"),
    })
}

/// `p[r, q] = softmax over the allowed q of scale·s[r, ·]` (0 where masked), row `r` being query
/// position `r mod t`; `p` overwritten. A row with nothing allowed is all zeros.
pub fn masked_softmax_forward(
    p: &mut [f32],
    s: &[f32],
    mask: &[u32],
    rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "masked_softmax_forward";
    let n = check_rows(OP, rows, t)?;
    let words = t.div_ceil(32);
    check_len(OP, "s", s.len(), n)?;
    check_len(OP, "p", p.len(), n)?;
    check_len(OP, "mask", mask.len(), t * words)?;
    for (r, (p_row, s_row)) in p.chunks_exact_mut(t).zip(s.chunks_exact(t)).enumerate() {
        let pos = r % t;
        let ok = |q: usize| is_allowed(mask, words, pos, q);
        let m = (0..t)
            .filter(|&q| ok(q))
            .map(|q| scale * s_row[q])
            .fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = (0..t)
            .filter(|&q| ok(q))
            .map(|q| (scale * s_row[q] - m).exp())
            .sum();
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        for (q, v) in p_row.iter_mut().enumerate() {
            *v = if ok(q) {
                (scale * s_row[q] - m).exp() * inv
            } else {
                0.0
            };
        }
    }
    Ok(())
}

/// `ds[r, q] = scale · p[r, q] · (dp[r, q] − Σ_q' p[r, q'] dp[r, q'])`, overwritten: the
/// gradient of [`masked_softmax_forward`] with respect to its unscaled scores.
pub fn masked_softmax_backward(
    ds: &mut [f32],
    p: &[f32],
    dp: &[f32],
    rows: usize,
    t: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "masked_softmax_backward";
    let n = check_rows(OP, rows, t)?;
    check_len(OP, "p", p.len(), n)?;
    check_len(OP, "dp", dp.len(), n)?;
    check_len(OP, "ds", ds.len(), n)?;
    for ((ds_row, p_row), dp_row) in ds
        .chunks_exact_mut(t)
        .zip(p.chunks_exact(t))
        .zip(dp.chunks_exact(t))
    {
        let d: f32 = p_row.iter().zip(dp_row).map(|(a, b)| a * b).sum();
        for ((g, &pv), &dpv) in ds_row.iter_mut().zip(p_row).zip(dp_row) {
            *g = scale * pv * (dpv - d);
        }
    }
    Ok(())
}

/// The masked softmax on a [`Device`]. `s` and `dp` are f32 (what the products write); `p` and
/// `ds` are stored as `T` (the next products' inputs). Shapes as the functions above say.
pub trait MaskedSoftmaxOps: Device {
    /// [`masked_softmax_forward`]; `mask` from [`mask_words`].
    #[allow(clippy::too_many_arguments)]
    fn masked_softmax_forward<T: Elem>(
        &self,
        p: &mut Self::Buf<T>,
        s: &Self::Buf<f32>,
        mask: &Self::Buf<u32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;

    /// [`masked_softmax_backward`].
    #[allow(clippy::too_many_arguments)]
    fn masked_softmax_backward<T: Elem>(
        &self,
        ds: &mut Self::Buf<T>,
        p: &Self::Buf<T>,
        dp: &Self::Buf<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()>;
}

impl MaskedSoftmaxOps for Cpu {
    fn masked_softmax_forward<T: Elem>(
        &self,
        p: &mut Vec<T>,
        s: &Vec<f32>,
        mask: &Vec<u32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let mut y = vec![0.0f32; p.len()];
        masked_softmax_forward(&mut y, s, mask, rows, t, scale)?;
        store(p, y);
        Ok(())
    }

    fn masked_softmax_backward<T: Elem>(
        &self,
        ds: &mut Vec<T>,
        p: &Vec<T>,
        dp: &Vec<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let mut y = vec![0.0f32; ds.len()];
        masked_softmax_backward(&mut y, &widen(p), dp, rows, t, scale)?;
        store(ds, y);
        Ok(())
    }
}

/// Dense masked attention on a device, with its `B·NH·T²` buffers allocated once: `s` (f32:
/// the scores, then dP), `p` and `ds` (`T`: inputs of the next products), and the mask.
pub struct DenseAttention<D: MatmulOps + MaskedSoftmaxOps, T: Elem> {
    s: D::Buf<f32>,
    p: D::Buf<T>,
    ds: D::Buf<T>,
    mask: D::Buf<u32>,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
}

impl<D: MatmulOps + MaskedSoftmaxOps, T: Elem> DenseAttention<D, T> {
    /// Buffers for batch `b`, `nh` heads of size `hs`, over `layout`'s sequence and mask.
    pub fn new(
        dev: &D,
        layout: &BlockLayout,
        b: usize,
        nh: usize,
        hs: usize,
    ) -> Result<DenseAttention<D, T>> {
        Self::with_mask(dev, &mask_words(layout), layout.seq_len(), b, nh, hs)
    }

    /// Buffers for batch `b`, `nh` heads of size `hs`, over `t` positions with the mask given as
    /// [`mask_words`] writes it (`[t, ceil(t/32)]` words): for masks that no [`BlockLayout`]
    /// describes, such as the unmasked (bidirectional) attention of a vision encoder.
    pub fn with_mask(
        dev: &D,
        mask: &[u32],
        t: usize,
        b: usize,
        nh: usize,
        hs: usize,
    ) -> Result<DenseAttention<D, T>> {
        check_len("dense_attention", "mask", mask.len(), t * t.div_ceil(32))?;
        let n = b
            .checked_mul(nh)
            .and_then(|n| n.checked_mul(t))
            .and_then(|n| n.checked_mul(t))
            .filter(|_| nh > 0 && hs > 0)
            .ok_or_else(|| KernelError::Shape {
                op: "dense_attention",
                what: format!("B {b} × NH {nh} × T {t} × T overflows, or NH or HS {hs} is 0"),
            })?;
        Ok(DenseAttention {
            s: dev.zeros(n)?,
            p: dev.zeros(n)?,
            ds: dev.zeros(n)?,
            mask: dev.upload(mask)?,
            b,
            t,
            nh,
            hs,
        })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.hs as f32).sqrt()
    }

    /// One product per batch element, batched over heads: `c = op(a) · op(b)` with each
    /// operand given as (offset of batch element 0's head 0, distance between batch elements,
    /// distance between heads, leading dimension).
    #[allow(clippy::too_many_arguments)]
    fn per_head<I: Elem>(
        dev: &D,
        (batch, nh): (usize, usize),
        c: &mut D::Buf<f32>,
        a: &D::Buf<I>,
        b: &D::Buf<I>,
        (m, n, k): (usize, usize, usize),
        (a_t, b_t): (bool, bool),
        geometry: [(usize, usize, usize, usize); 3],
    ) -> Result<()> {
        for bi in 0..batch {
            let spec = GemmSpec {
                a_t,
                b_t,
                batch: nh,
                offsets: geometry.map(|(o, per_b, _, _)| o + bi * per_b),
                strides: geometry.map(|(_, _, per_h, _)| per_h),
                ld: geometry.map(|(_, _, _, ld)| ld),
                ..GemmSpec::new(m, n, k)
            };
            dev.gemm(c, a, b, &spec)?;
        }
        Ok(())
    }

    /// `out[B, T, C]` (f32, overwritten) from `qkv[B, T, 3C]`; keeps P for the backward pass.
    pub fn forward(&mut self, dev: &D, out: &mut D::Buf<f32>, qkv: &D::Buf<T>) -> Result<()> {
        let (t, hs, c) = (self.t, self.hs, self.nh * self.hs);
        check_len("dense_attention", "qkv", dev.len(qkv), self.b * t * 3 * c)?;
        check_len("dense_attention", "out", dev.len(out), self.b * t * c)?;
        let (tt, row) = (t * t, 3 * c);
        let bh = (self.b, self.nh);
        // S[b, h] = Q Kᵀ (unscaled; the softmax scales).
        Self::per_head(
            dev,
            bh,
            &mut self.s,
            qkv,
            qkv,
            (t, t, hs),
            (false, true),
            [
                (0, t * row, hs, row),
                (c, t * row, hs, row),
                (0, self.nh * tt, tt, 0),
            ],
        )?;
        let (rows, scale) = (self.b * self.nh * t, self.scale());
        dev.masked_softmax_forward(&mut self.p, &self.s, &self.mask, rows, t, scale)?;
        // O[b, :, h] = P[b, h] V[b, h], the heads side by side in each row of out.
        Self::per_head(
            dev,
            bh,
            out,
            &self.p,
            qkv,
            (t, hs, t),
            (false, false),
            [
                (0, self.nh * tt, tt, 0),
                (2 * c, t * row, hs, row),
                (0, t * c, hs, c),
            ],
        )
    }

    /// `dqkv[B, T, 3C]` (f32, overwritten) from `dout[B, T, C]` and the `qkv` of the last
    /// [`forward`](Self::forward).
    pub fn backward(
        &mut self,
        dev: &D,
        dqkv: &mut D::Buf<f32>,
        dout: &D::Buf<T>,
        qkv: &D::Buf<T>,
    ) -> Result<()> {
        let (t, hs, c, nh) = (self.t, self.hs, self.nh * self.hs, self.nh);
        check_len("dense_attention", "qkv", dev.len(qkv), self.b * t * 3 * c)?;
        check_len("dense_attention", "dqkv", dev.len(dqkv), self.b * t * 3 * c)?;
        check_len("dense_attention", "dout", dev.len(dout), self.b * t * c)?;
        let (tt, row) = (t * t, 3 * c);
        let heads = (0, nh * tt, tt, 0);
        // dP = dO Vᵀ, into s.
        let bh = (self.b, nh);
        Self::per_head(
            dev,
            bh,
            &mut self.s,
            dout,
            qkv,
            (t, t, hs),
            (false, true),
            [(0, t * c, hs, c), (2 * c, t * row, hs, row), heads],
        )?;
        let (rows, scale) = (self.b * nh * t, self.scale());
        dev.masked_softmax_backward(&mut self.ds, &self.p, &self.s, rows, t, scale)?;
        let at = |col: usize| (col, t * row, hs, row);
        // dQ = dS K, dK = dSᵀ Q, dV = Pᵀ dO, each into its third of dqkv.
        let (ds, p) = (&self.ds, &self.p);
        let dims = (t, hs, t);
        Self::per_head(
            dev,
            bh,
            dqkv,
            ds,
            qkv,
            dims,
            (false, false),
            [heads, at(c), at(0)],
        )?;
        Self::per_head(
            dev,
            bh,
            dqkv,
            ds,
            qkv,
            dims,
            (true, false),
            [heads, at(0), at(c)],
        )?;
        Self::per_head(
            dev,
            bh,
            dqkv,
            p,
            dout,
            (t, hs, t),
            (true, false),
            [heads, (0, t * c, hs, c), at(2 * c)],
        )
    }
}
