//! 2-D convolution, stride 1, "same" padding (k−1)/2 for odd kernel widths k: the convolutions of
//! OpenAI's dVAE (docs/model.md §2), with PyTorch's `nn.Conv2d` semantics (cross-correlation).
//!
//! Shapes (NCHW, row-major): `inp` [B, Ci, H, W], `weight` [Co, Ci, k, k], `bias` [Co],
//! `out` [B, Co, H, W].
//!
//! CPU path: per image, im2col (`col` [Ci·k·k, H·W]; skipped when k = 1) and one GEMM,
//! `out_b = weight[Co, Ci·k·k] · col + bias`; images run in parallel. Backward, per image: the
//! input gradient (overwritten) as the "same" convolution of `dout_b` with the flipped kernel
//! (`wflip` [Ci, Co, k, k], im2col of `dout_b`) when Co ≤ Ci, else `dcol = weightᵀ · dout_b` and
//! col2im (whichever writes fewer column rows); `dbias += Σ_pixels dout_b`;
//! and `dweight += dout_b · rows` with the patches laid out pixel-major, `rows` [H·W, k·k·Ci]
//! (im2row of the image in NHWC order; the weight gradient comes out in (co, kh, kw, ci) order and
//! is permuted when added to `dweight`). Pixel-major rows matter for speed: the GEMM wants its
//! vectorised operand contiguous along the output's columns, and `col`'s transpose is not (the
//! matrix product would gather it element by element, which was a third of a dVAE step).
//! Weight gradients are reduced over a fixed grouping of the images (partials added in group
//! order), so results do not depend on thread count or scheduling.
//!
//! ReLU fusions, for networks that put a ReLU before a convolution: [`conv2d_relu_forward`]
//! (`relu(conv(x))`) and [`conv2d_backward_through_relu`] (the input gradient masked by the
//! ReLU), each applied image by image while the data is in cache; tested equal, bit for bit, to
//! the separate ops.
//!
//! Column and row buffers come from a per-thread workspace reused across calls (no allocation or
//! zeroing per call); every function writes each workspace element it reads. A future CUDA
//! launcher takes the same arguments; the layouts here are the CPU path's business.

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use crate::linear::{matmul_serial, MatRef};
use crate::simd::{sum8, Isa};
use rayon::prelude::*;
use std::cell::Cell;

/// Sizes of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub height: usize,
    pub width: usize,
    /// Kernel width (odd).
    pub kernel: usize,
}

impl Conv2dDims {
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        if self.kernel.is_multiple_of(2) {
            return Err(KernelError::Shape {
                op,
                what: format!("kernel width {} must be odd", self.kernel),
            });
        }
        Ok(())
    }
    pub(crate) fn pixels(&self) -> usize {
        self.height * self.width
    }
    pub(crate) fn col_rows(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }
    pub fn in_len(&self) -> usize {
        self.batch * self.c_in * self.pixels()
    }
    pub fn out_len(&self) -> usize {
        self.batch * self.c_out * self.pixels()
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.col_rows()
    }
    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.batch * self.pixels() * self.c_out * self.col_rows()
    }
}

/// The convolution's data movement on a [`Device`] (the CUDA kernels: `kernels/cuda/conv2d.cu`);
/// a convolution is then [`Im2colOps::im2col`] and a dense product per image. Every buffer in the
/// storage type `T` (f32, or f16 for fp16 matmul inputs), arithmetic in f32; `d.c_out` is unused.
pub trait Im2colOps: Device {
    /// `col` [B, Ci·k·k, H·W] (overwritten) = the image-by-image [`im2col`] of `inp`
    /// [B, Ci, H, W].
    fn im2col<T: Elem>(
        &self,
        col: &mut Self::Buf<T>,
        inp: &Self::Buf<T>,
        d: &Conv2dDims,
    ) -> Result<()>;
    /// `dinp` [B, Ci, H, W] += the image-by-image [`col2im_add`] of `col` [B, Ci·k·k, H·W].
    fn col2im_add<T: Elem>(
        &self,
        dinp: &mut Self::Buf<T>,
        col: &Self::Buf<T>,
        d: &Conv2dDims,
    ) -> Result<()>;
}

/// Checks the sizes of an [`Im2colOps`] call: an odd kernel width, `x` [B, Ci, H, W] and `col`
/// [B, Ci·k·k, H·W].
pub(crate) fn check_im2col(
    op: &'static str,
    x_name: &'static str,
    x_len: usize,
    col_len: usize,
    d: &Conv2dDims,
) -> Result<()> {
    d.check(op)?;
    check_len(op, x_name, x_len, d.in_len())?;
    check_len(op, "col", col_len, d.batch * d.col_rows() * d.pixels())
}

/// The references image by image, in f32; `T` buffers are widened and the results rounded back.
/// The convolution on a [`Device`]: [`conv2d_forward`] and [`conv2d_backward`] on the CPU; on a
/// GPU, [`Im2colOps`] and batched dense products (cuBLAS), with the bias as a rank-1 product.
pub trait Conv2dOps: Device {
    /// `out` [B, Co, H, W] (overwritten) = conv(`inp`, `weight`) + `bias`.
    fn conv2d_forward(
        &self,
        out: &mut Self::Buf<f32>,
        inp: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        bias: &Self::Buf<f32>,
        d: &Conv2dDims,
    ) -> Result<()>;
    /// `dinp` (overwritten, when given), `dweight += …`, `dbias += …`.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        dinp: Option<&mut Self::Buf<f32>>,
        dweight: &mut Self::Buf<f32>,
        dbias: &mut Self::Buf<f32>,
        dout: &Self::Buf<f32>,
        inp: &Self::Buf<f32>,
        weight: &Self::Buf<f32>,
        d: &Conv2dDims,
    ) -> Result<()>;
}

impl Conv2dOps for Cpu {
    fn conv2d_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        d: &Conv2dDims,
    ) -> Result<()> {
        conv2d_forward(out, inp, weight, bias, d)
    }
    fn conv2d_backward(
        &self,
        dinp: Option<&mut Vec<f32>>,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        d: &Conv2dDims,
    ) -> Result<()> {
        conv2d_backward(
            dinp.map(|v| v.as_mut_slice()),
            dweight,
            dbias,
            dout,
            inp,
            weight,
            d,
        )
    }
}

impl Im2colOps for Cpu {
    fn im2col<T: Elem>(&self, col: &mut Vec<T>, inp: &Vec<T>, d: &Conv2dDims) -> Result<()> {
        check_im2col("im2col", "inp", inp.len(), col.len(), d)?;
        let (x, per_col) = (widen(inp), d.col_rows() * d.pixels());
        let mut c = vec![0.0; col.len()];
        if per_col > 0 {
            for (c, x) in c
                .chunks_exact_mut(per_col)
                .zip(x.chunks_exact(d.c_in * d.pixels()))
            {
                im2col(c, x, d);
            }
        }
        store(col, c);
        Ok(())
    }
    fn col2im_add<T: Elem>(&self, dinp: &mut Vec<T>, col: &Vec<T>, d: &Conv2dDims) -> Result<()> {
        check_im2col("col2im_add", "dinp", dinp.len(), col.len(), d)?;
        let (c, per_col) = (widen(col), d.col_rows() * d.pixels());
        let mut dx = widen(dinp).into_owned();
        if per_col > 0 {
            for (dx, c) in dx
                .chunks_exact_mut(d.c_in * d.pixels())
                .zip(c.chunks_exact(per_col))
            {
                col2im_add(dx, c, d);
            }
        }
        store(dinp, dx);
        Ok(())
    }
}

/// Images per weight-gradient group: fixed, so the reduction order never changes.
const IMAGES_PER_GROUP: usize = 2;

thread_local! {
    /// This thread's column / row buffer, see [`with_workspace`].
    static WORKSPACE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// The calling thread's per-group weight-gradient partials, see [`with_partials`].
    static PARTIALS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `len` elements of the buffer in `cell` (contents left from earlier calls). A nested
/// call on the same thread gets a fresh buffer, never an alias.
fn with_buffer<R>(
    cell: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = cell.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    cell.set(buf);
    r
}

/// A per-thread scratch buffer for im2col / im2row, reused across calls.
fn with_workspace<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&WORKSPACE, len, f)
}

/// A second per-thread buffer, for what the caller of a parallel loop keeps across it.
fn with_partials<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&PARTIALS, len, f)
}

/// Writes `xt` [P, C], the pixel-major (NHWC) copy of one image `x` [C, P]: 8 × 8 blocks with AVX
/// shuffles where the CPU has them, the rest element by element.
fn to_pixel_major(xt: &mut [f32], x: &[f32], c: usize, p: usize) {
    assert!(xt.len() >= c * p && x.len() >= c * p);
    let (c8, p8) = (c / 8 * 8, p / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    let blocked = if Isa::best() != Isa::Generic {
        for c0 in (0..c8).step_by(8) {
            for p0 in (0..p8).step_by(8) {
                // SAFETY: AVX2 is available (Isa::best); rows c0..c0+8 of `x` hold columns
                // p0..p0+8 and rows p0..p0+8 of `xt` hold columns c0..c0+8 (c8 ≤ c, p8 ≤ p and
                // both buffers hold c·p elements, asserted above).
                unsafe {
                    transpose8x8(
                        x.as_ptr().add(c0 * p + p0),
                        p,
                        xt.as_mut_ptr().add(p0 * c + c0),
                        c,
                    )
                };
            }
        }
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let blocked = false;
    let transpose = |xt: &mut [f32], cs: std::ops::Range<usize>, ps: std::ops::Range<usize>| {
        for ci in cs {
            for pi in ps.clone() {
                xt[pi * c + ci] = x[ci * p + pi];
            }
        }
    };
    if blocked {
        transpose(xt, c8..c, 0..p);
        transpose(xt, 0..c8, p8..p);
    } else {
        transpose(xt, 0..c, 0..p);
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for i, j < 8.
///
/// # Safety
/// AVX2 must be available; `src` must hold 8 rows of 8 floats `src_stride` apart and `dst` 8
/// rows of 8 floats `dst_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // No closures here: they would not inherit the target feature.
    let r0 = _mm256_loadu_ps(src);
    let r1 = _mm256_loadu_ps(src.add(src_stride));
    let r2 = _mm256_loadu_ps(src.add(2 * src_stride));
    let r3 = _mm256_loadu_ps(src.add(3 * src_stride));
    let r4 = _mm256_loadu_ps(src.add(4 * src_stride));
    let r5 = _mm256_loadu_ps(src.add(5 * src_stride));
    let r6 = _mm256_loadu_ps(src.add(6 * src_stride));
    let r7 = _mm256_loadu_ps(src.add(7 * src_stride));
    // Rows interleaved in pairs: t0 = (r0[0], r1[0], r0[1], r1[1] | r0[4], r1[4], r0[5], r1[5]).
    let t0 = _mm256_unpacklo_ps(r0, r1);
    let t1 = _mm256_unpackhi_ps(r0, r1);
    let t2 = _mm256_unpacklo_ps(r2, r3);
    let t3 = _mm256_unpackhi_ps(r2, r3);
    let t4 = _mm256_unpacklo_ps(r4, r5);
    let t5 = _mm256_unpackhi_ps(r4, r5);
    let t6 = _mm256_unpacklo_ps(r6, r7);
    let t7 = _mm256_unpackhi_ps(r6, r7);
    // Then in fours: s0 = (r0[0], r1[0], r2[0], r3[0] | the same for column 4).
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    // Low halves are columns 0..4, high halves columns 4..8.
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(s0, s4));
    _mm256_storeu_ps(dst.add(dst_stride), _mm256_permute2f128_ps::<0x20>(s1, s5));
    _mm256_storeu_ps(
        dst.add(2 * dst_stride),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
    );
    _mm256_storeu_ps(
        dst.add(3 * dst_stride),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
    );
    _mm256_storeu_ps(
        dst.add(4 * dst_stride),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
    );
    _mm256_storeu_ps(
        dst.add(5 * dst_stride),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
    );
    _mm256_storeu_ps(
        dst.add(6 * dst_stride),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
    );
    _mm256_storeu_ps(
        dst.add(7 * dst_stride),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    );
}

/// Writes `rows` [H·W, k·k·Ci] for one pixel-major image `xt` [H·W, Ci]: row y·W + x holds the
/// k × k patch centred on (y, x) in (kh, kw, ci) order, zero outside the image.
fn im2row(rows: &mut [f32], xt: &[f32], d: &Conv2dDims) {
    let (h, w, k, c) = (d.height, d.width, d.kernel, d.c_in);
    let pad = k / 2;
    let kc = k * c;
    for (p, row) in rows.chunks_exact_mut(k * kc).enumerate() {
        let (y, x) = (p / w, p % w);
        // Valid kw: 0 ≤ x + kw − pad < w.
        let lo = pad.saturating_sub(x);
        let hi = (w + pad - x).min(k);
        for (kh, seg) in row.chunks_exact_mut(kc).enumerate() {
            if y + kh < pad || y + kh >= h + pad {
                seg.fill(0.0);
                continue;
            }
            let sy = y + kh - pad;
            seg[..lo * c].fill(0.0);
            seg[lo * c..hi * c]
                .copy_from_slice(&xt[(sy * w + x + lo - pad) * c..][..(hi - lo) * c]);
            seg[hi * c..].fill(0.0);
        }
    }
}

/// Writes `col` [Ci·k·k, H·W] for one image `x` [Ci, H, W] (`d.batch` and `d.c_out` unused).
/// Panics if a slice is shorter than that.
pub fn im2col(col: &mut [f32], x: &[f32], d: &Conv2dDims) {
    let (h, w, k) = (d.height, d.width, d.kernel);
    let pad = (k / 2) as isize;
    for ci in 0..d.c_in {
        let plane = &x[ci * h * w..][..h * w];
        for kh in 0..k {
            for kw in 0..k {
                let row = &mut col[((ci * k + kh) * k + kw) * h * w..][..h * w];
                let (dy, dx) = (kh as isize - pad, kw as isize - pad);
                for y in 0..h {
                    let dst = &mut row[y * w..][..w];
                    let sy = y as isize + dy;
                    if sy < 0 || sy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[sy as usize * w..][..w];
                    // dst[x] = src[x + dx] where 0 ≤ x + dx < w, else 0.
                    let lo = (-dx).max(0) as usize;
                    let hi = (w as isize - dx.max(0)).max(0) as usize;
                    dst[..lo.min(w)].fill(0.0);
                    if hi > lo {
                        dst[lo..hi].copy_from_slice(
                            &src[(lo as isize + dx) as usize..(hi as isize + dx) as usize],
                        );
                    }
                    dst[hi.max(lo).min(w)..].fill(0.0);
                }
            }
        }
    }
}

/// Adds `col` [Ci·k·k, H·W] back into one image's gradient `dx` [Ci, H, W] (`d.batch`, `d.c_out`
/// unused). Panics if a slice is shorter than that.
pub fn col2im_add(dx: &mut [f32], col: &[f32], d: &Conv2dDims) {
    let (h, w, k) = (d.height, d.width, d.kernel);
    let pad = (k / 2) as isize;
    for ci in 0..d.c_in {
        let plane = &mut dx[ci * h * w..][..h * w];
        for kh in 0..k {
            for kw in 0..k {
                let row = &col[((ci * k + kh) * k + kw) * h * w..][..h * w];
                let (dy, ddx) = (kh as isize - pad, kw as isize - pad);
                for y in 0..h {
                    let sy = y as isize + dy;
                    if sy < 0 || sy >= h as isize {
                        continue;
                    }
                    let src = &row[y * w..][..w];
                    let dst = &mut plane[sy as usize * w..][..w];
                    // dst[x + ddx] += src[x] for lo ≤ x < hi: where 0 ≤ x < w and 0 ≤ x + ddx < w
                    // (none when the image is narrower than the shift).
                    let lo = (-ddx).max(0);
                    let hi = (w as isize).min(w as isize - ddx);
                    if hi <= lo {
                        continue;
                    }
                    let (lo, hi) = (lo as usize, hi as usize);
                    let dst = &mut dst[(lo as isize + ddx) as usize..(hi as isize + ddx) as usize];
                    for (d, &s) in dst.iter_mut().zip(&src[lo..hi]) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// Writes `wflip` [Ci, Co, k, k] with `wflip[ci, co, kh, kw] = weight[co, ci, k−1−kh, k−1−kw]`:
/// the kernel of the convolution that maps an output gradient to the input gradient.
fn flip_kernel(wflip: &mut [f32], weight: &[f32], d: &Conv2dDims) {
    let k = d.kernel;
    let kk = k * k;
    for (ci, dst) in wflip.chunks_exact_mut(d.c_out * kk).enumerate() {
        for (co, dst) in dst.chunks_exact_mut(kk).enumerate() {
            let src = &weight[(co * d.c_in + ci) * kk..][..kk];
            for (i, v) in dst.iter_mut().enumerate() {
                *v = src[kk - 1 - i];
            }
        }
    }
}

/// `out = weight ⋆ inp + bias` (overwritten).
pub fn conv2d_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    d: &Conv2dDims,
) -> Result<()> {
    forward_impl("conv2d_forward", out, inp, weight, bias, d, false)
}

/// `out = relu(conv(inp))`: [`conv2d_forward`] followed by a ReLU, applied image by image while the
/// output is still in cache.
pub fn conv2d_relu_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    d: &Conv2dDims,
) -> Result<()> {
    forward_impl("conv2d_relu_forward", out, inp, weight, bias, d, true)
}

fn forward_impl(
    op: &'static str,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    d: &Conv2dDims,
    relu: bool,
) -> Result<()> {
    d.check(op)?;
    check_len(op, "inp", inp.len(), d.in_len())?;
    check_len(op, "out", out.len(), d.out_len())?;
    check_len(op, "weight", weight.len(), d.weight_len())?;
    check_len(op, "bias", bias.len(), d.c_out)?;
    let (hw, rows) = (d.pixels(), d.col_rows());
    if d.batch == 0 || hw == 0 || d.c_out == 0 {
        return Ok(());
    }
    let wmat = MatRef::new(weight, d.c_out, rows);
    out.par_chunks_mut(d.c_out * hw)
        .zip(inp.par_chunks(d.c_in * hw))
        .try_for_each(|(y, x)| {
            for (co, plane) in y.chunks_exact_mut(hw).enumerate() {
                plane.fill(bias[co]);
            }
            if d.kernel == 1 {
                matmul_serial(y, wmat, MatRef::new(x, d.c_in, hw), true)?;
            } else {
                with_workspace(rows * hw, |col| {
                    im2col(col, x, d);
                    matmul_serial(y, wmat, MatRef::new(col, rows, hw), true)
                })?;
            }
            if relu {
                for v in y.iter_mut() {
                    *v = v.max(0.0);
                }
            }
            Ok(())
        })
}

/// Backward of [`conv2d_forward`]: `dinp` overwritten (when given), `dweight` and `dbias`
/// accumulated.
pub fn conv2d_backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    d: &Conv2dDims,
) -> Result<()> {
    backward_impl(
        "conv2d_backward",
        dinp,
        dweight,
        dbias,
        dout,
        inp,
        weight,
        d,
        false,
    )
}

/// [`conv2d_backward`] for a convolution whose input `inp` is the output of a ReLU: `dinp` is the
/// gradient with respect to the ReLU's input, `(weightᵀ ⋆ dout) · [inp > 0]`, masked image by
/// image while it is still in cache.
pub fn conv2d_backward_through_relu(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    d: &Conv2dDims,
) -> Result<()> {
    backward_impl(
        "conv2d_backward_through_relu",
        dinp,
        dweight,
        dbias,
        dout,
        inp,
        weight,
        d,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    op: &'static str,
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    d: &Conv2dDims,
    relu: bool,
) -> Result<()> {
    d.check(op)?;
    check_len(op, "inp", inp.len(), d.in_len())?;
    check_len(op, "dout", dout.len(), d.out_len())?;
    check_len(op, "weight", weight.len(), d.weight_len())?;
    check_len(op, "dweight", dweight.len(), d.weight_len())?;
    check_len(op, "dbias", dbias.len(), d.c_out)?;
    let (hw, rows) = (d.pixels(), d.col_rows());
    if d.batch == 0 || hw == 0 {
        return Ok(());
    }
    let wmat = MatRef::new(weight, d.c_out, rows);
    // Input gradient, image by image in parallel.
    if let Some(dinp) = dinp {
        check_len(op, "dinp", dinp.len(), d.in_len())?;
        // With no more output than input channels, the input gradient is a "same" convolution of
        // dout with the flipped, transposed kernel (`wflip` [Ci, Co, k, k]): im2col of dout, at
        // Co·k·k rows, and a GEMM that writes dinp directly. Otherwise `dcol` [Ci·k·k, H·W] and
        // col2im, which has fewer rows to write then.
        let as_conv = d.kernel > 1 && d.c_out <= d.c_in;
        let td = Conv2dDims {
            c_in: d.c_out,
            c_out: d.c_in,
            ..*d
        };
        let wflip_len = if as_conv { d.weight_len() } else { 0 };
        with_partials(wflip_len, |wflip| -> Result<()> {
            if as_conv {
                flip_kernel(wflip, weight, d);
            }
            let wflip = MatRef::new(wflip, d.c_in, td.col_rows());
            dinp.par_chunks_mut(d.c_in * hw)
                .zip(dout.par_chunks(d.c_out * hw))
                .zip(inp.par_chunks(d.c_in * hw))
                .try_for_each(|((dx, dy), x)| {
                    let dym = MatRef::new(dy, d.c_out, hw);
                    if d.kernel == 1 {
                        matmul_serial(dx, wmat.t(), dym, false)?;
                    } else if as_conv {
                        with_workspace(td.col_rows() * hw, |col| {
                            im2col(col, dy, &td);
                            matmul_serial(dx, wflip, MatRef::new(col, td.col_rows(), hw), false)
                        })?;
                    } else {
                        with_workspace(rows * hw, |dcol| {
                            matmul_serial(dcol, wmat.t(), dym, false)?;
                            dx.fill(0.0);
                            col2im_add(dx, dcol, d);
                            Ok(())
                        })?;
                    }
                    if relu {
                        for (g, &v) in dx.iter_mut().zip(x) {
                            *g = if v > 0.0 { *g } else { 0.0 };
                        }
                    }
                    Ok(())
                })
        })?;
    }
    // Weight and bias gradients: one partial sum per fixed group of images, then reduced in group
    // order. A partial weight gradient is in (co, kh, kw, ci) order, the order of `rows`.
    let (k, kk, wlen) = (d.kernel, d.kernel * d.kernel, d.weight_len());
    let groups = d.batch.div_ceil(IMAGES_PER_GROUP);
    let im2row_len = if k == 1 { 0 } else { hw * rows };
    with_partials(groups * (wlen + d.c_out), |partials| -> Result<()> {
        let (pw, pb) = partials.split_at_mut(groups * wlen);
        pw.par_chunks_mut(wlen)
            .zip(pb.par_chunks_mut(d.c_out))
            .zip(inp.par_chunks(IMAGES_PER_GROUP * d.c_in * hw))
            .zip(dout.par_chunks(IMAGES_PER_GROUP * d.c_out * hw))
            .try_for_each(|(((dw, db), xs), dys)| {
                with_workspace(hw * d.c_in + im2row_len, |ws| -> Result<()> {
                    let (xt, patches) = ws.split_at_mut(hw * d.c_in);
                    let images = xs
                        .chunks_exact(d.c_in * hw)
                        .zip(dys.chunks_exact(d.c_out * hw));
                    for (i, (x, dy)) in images.enumerate() {
                        to_pixel_major(xt, x, d.c_in, hw);
                        let patch_mat = if k == 1 {
                            MatRef::new(xt, hw, d.c_in)
                        } else {
                            im2row(patches, xt, d);
                            MatRef::new(patches, hw, rows)
                        };
                        let dym = MatRef::new(dy, d.c_out, hw);
                        matmul_serial(dw, dym, patch_mat, i > 0)?;
                        for (b, plane) in db.iter_mut().zip(dy.chunks_exact(hw)) {
                            *b = if i > 0 { *b + sum8(plane) } else { sum8(plane) };
                        }
                    }
                    Ok(())
                })
            })?;
        // dweight[co, ci, kh, kw] += dw_g[co, kh, kw, ci] for each group g in order, output
        // channels in parallel.
        dweight
            .par_chunks_mut(rows)
            .enumerate()
            .for_each(|(co, dst)| {
                for dw in pw.chunks_exact(wlen) {
                    let src = &dw[co * rows..][..rows];
                    for (ci, dst) in dst.chunks_exact_mut(kk).enumerate() {
                        for (khw, a) in dst.iter_mut().enumerate() {
                            *a += src[khw * d.c_in + ci];
                        }
                    }
                }
            });
        for db in pb.chunks_exact(d.c_out) {
            for (a, v) in dbias.iter_mut().zip(db) {
                *a += v;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    /// The definition, in f64: out[b,co,y,x] = bias[co] + Σ w[co,ci,kh,kw]·in[b,ci,y+kh−p,x+kw−p].
    fn naive(inp: &[f32], w: &[f32], bias: &[f32], d: &Conv2dDims) -> Vec<f64> {
        let (h, wd, k) = (d.height as isize, d.width as isize, d.kernel as isize);
        let p = k / 2;
        let mut out = vec![0.0f64; d.out_len()];
        for b in 0..d.batch {
            for co in 0..d.c_out {
                for y in 0..h {
                    for x in 0..wd {
                        let mut s = bias[co] as f64;
                        for ci in 0..d.c_in {
                            for kh in 0..k {
                                for kw in 0..k {
                                    let (sy, sx) = (y + kh - p, x + kw - p);
                                    if sy < 0 || sy >= h || sx < 0 || sx >= wd {
                                        continue;
                                    }
                                    let wi = ((co * d.c_in + ci) as isize * k + kh) * k + kw;
                                    let xi = ((b * d.c_in + ci) as isize * h + sy) * wd + sx;
                                    s += w[wi as usize] as f64 * inp[xi as usize] as f64;
                                }
                            }
                        }
                        out[((b * d.c_out + co) as isize * h + y) as usize * wd as usize
                            + x as usize] = s;
                    }
                }
            }
        }
        out
    }

    fn dims(kernel: usize, batch: usize) -> Conv2dDims {
        Conv2dDims {
            batch,
            c_in: 3,
            c_out: 4,
            height: 5,
            width: 6,
            kernel,
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for k in [1, 3, 5, 7] {
            let d = dims(k, 3);
            let x = rand_vec(d.in_len(), 1.0, 1);
            let w = rand_vec(d.weight_len(), 1.0, 2);
            let b = rand_vec(d.c_out, 1.0, 3);
            let mut y = vec![0.0; d.out_len()];
            conv2d_forward(&mut y, &x, &w, &b, &d).unwrap();
            let got: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            assert_close(
                &format!("conv k={k}"),
                &got,
                &naive(&x, &w, &b, &d),
                1e-4,
                1e-4,
            );
        }
    }

    /// Images narrower and shorter than half the kernel: every tap of a row may fall outside.
    #[test]
    fn forward_matches_the_definition_on_images_smaller_than_the_kernel() {
        for (h, w) in [(1, 1), (1, 2), (2, 1), (3, 2)] {
            let d = Conv2dDims {
                height: h,
                width: w,
                ..dims(7, 2)
            };
            let x = rand_vec(d.in_len(), 1.0, 4);
            let wt = rand_vec(d.weight_len(), 1.0, 5);
            let b = rand_vec(d.c_out, 1.0, 6);
            let mut y = vec![0.0; d.out_len()];
            conv2d_forward(&mut y, &x, &wt, &b, &d).unwrap();
            let got: Vec<f64> = y.iter().map(|&v| v as f64).collect();
            assert_close(
                &format!("conv {h}×{w}"),
                &got,
                &naive(&x, &wt, &b, &d),
                1e-4,
                1e-4,
            );
        }
    }

    /// col2im on images narrower and shorter than half the kernel used to slice past the row
    /// (a panic); it must add each column entry where its tap falls inside the image.
    #[test]
    fn col2im_on_images_smaller_than_the_kernel_matches_the_definition() {
        for (h, w, k) in [(1, 1, 7), (1, 2, 7), (2, 1, 7), (3, 2, 5), (5, 6, 3)] {
            let d = Conv2dDims {
                height: h,
                width: w,
                ..dims(k, 1)
            };
            let col = rand_vec(d.col_rows() * h * w, 1.0, 16);
            let mut dx = rand_vec(d.c_in * h * w, 1.0, 17);
            let mut want: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
            let p = (k / 2) as isize;
            for ci in 0..d.c_in {
                for kh in 0..k {
                    for kw in 0..k {
                        for y in 0..h {
                            for x in 0..w {
                                let (sy, sx) =
                                    (y as isize + kh as isize - p, x as isize + kw as isize - p);
                                if sy < 0 || sy >= h as isize || sx < 0 || sx >= w as isize {
                                    continue;
                                }
                                let row = (ci * k + kh) * k + kw;
                                want[(ci * h + sy as usize) * w + sx as usize] +=
                                    col[row * h * w + y * w + x] as f64;
                            }
                        }
                    }
                }
            }
            col2im_add(&mut dx, &col, &d);
            let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
            assert_close(&format!("col2im {h}×{w} k={k}"), &got, &want, 1e-5, 1e-5);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // More output than input channels (the input gradient through col2im), and no more (as a
        // convolution with the flipped kernel).
        for (k, c_in, c_out) in [(1, 3, 4), (3, 3, 4), (7, 3, 4), (3, 5, 2), (5, 4, 4)] {
            let d = Conv2dDims {
                c_in,
                c_out,
                ..dims(k, 3)
            };
            let mut x = rand_vec(d.in_len(), 1.0, 4);
            let mut w = rand_vec(d.weight_len(), 1.0, 5);
            let mut b = rand_vec(d.c_out, 1.0, 6);
            let wout = rand_vec(d.out_len(), 1.0, 7);
            let loss = |x: &[f32], w: &[f32], b: &[f32]| {
                let mut y = vec![0.0; d.out_len()];
                conv2d_forward(&mut y, x, w, b, &d).unwrap();
                dot(&wout, &y)
            };
            let mut dx = vec![f32::NAN; d.in_len()];
            let mut dw = vec![0.5; d.weight_len()];
            let mut db = vec![0.25; d.c_out];
            conv2d_backward(Some(&mut dx), &mut dw, &mut db, &wout, &x, &w, &d).unwrap();
            let (x0, w0, b0) = (x.clone(), w.clone(), b.clone());
            let eps = 1e-2;
            let num: Vec<f64> = (0..x.len())
                .map(|i| numeric_grad(&mut x, i, eps, |x| loss(x, &w0, &b0)))
                .collect();
            let got: Vec<f64> = dx.iter().map(|&v| v as f64).collect();
            assert_close(
                &format!("dinp k={k} {c_in}→{c_out}"),
                &got,
                &num,
                2e-3,
                2e-3,
            );
            let num: Vec<f64> = (0..w.len())
                .map(|i| 0.5 + numeric_grad(&mut w, i, eps, |w| loss(&x0, w, &b0)))
                .collect();
            let got: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
            assert_close(&format!("dweight k={k}"), &got, &num, 2e-3, 2e-3);
            let num: Vec<f64> = (0..b.len())
                .map(|i| 0.25 + numeric_grad(&mut b, i, eps, |b| loss(&x0, &w0, b)))
                .collect();
            let got: Vec<f64> = db.iter().map(|&v| v as f64).collect();
            assert_close(&format!("dbias k={k}"), &got, &num, 2e-3, 2e-3);
        }
    }

    /// dweight[co,ci,kh,kw] = Σ dout[b,co,y,x]·in[b,ci,y+kh−p,x+kw−p], in f64: the pixel-major
    /// rows and the permutation back to [Co, Ci, k, k], at sizes with every border case and an
    /// image count that leaves the last group short.
    #[test]
    fn weight_gradient_matches_the_definition() {
        for k in [1, 3, 5, 7] {
            let d = Conv2dDims {
                batch: 3,
                c_in: 5,
                c_out: 7,
                height: 9,
                width: 4,
                kernel: k,
            };
            let x = rand_vec(d.in_len(), 1.0, 8);
            let w = rand_vec(d.weight_len(), 1.0, 9);
            let dy = rand_vec(d.out_len(), 1.0, 10);
            let mut dw = vec![0.0; d.weight_len()];
            let mut db = vec![0.0; d.c_out];
            conv2d_backward(None, &mut dw, &mut db, &dy, &x, &w, &d).unwrap();
            let (h, wd, p) = (d.height as isize, d.width as isize, (k / 2) as isize);
            let mut want = vec![0.0f64; d.weight_len()];
            for b in 0..d.batch {
                for co in 0..d.c_out {
                    for ci in 0..d.c_in {
                        for kh in 0..k as isize {
                            for kw in 0..k as isize {
                                let mut s = 0.0;
                                for y in 0..h {
                                    for xx in 0..wd {
                                        let (sy, sx) = (y + kh - p, xx + kw - p);
                                        if sy < 0 || sy >= h || sx < 0 || sx >= wd {
                                            continue;
                                        }
                                        let o = (((b * d.c_out + co) as isize * h + y) * wd + xx)
                                            as usize;
                                        let i = (((b * d.c_in + ci) as isize * h + sy) * wd + sx)
                                            as usize;
                                        s += dy[o] as f64 * x[i] as f64;
                                    }
                                }
                                want[(((co * d.c_in + ci) * k) as isize + kh) as usize * k
                                    + kw as usize] += s;
                            }
                        }
                    }
                }
            }
            let got: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
            assert_close(&format!("dweight k={k}"), &got, &want, 1e-4, 1e-4);
        }
    }

    #[test]
    fn pixel_major_is_the_transpose() {
        for (c, p) in [(3, 5), (8, 8), (11, 21), (16, 64), (24, 9)] {
            let x = rand_vec(c * p, 1.0, 11);
            let mut xt = vec![f32::NAN; c * p];
            to_pixel_major(&mut xt, &x, c, p);
            for ci in 0..c {
                for pi in 0..p {
                    assert_eq!(
                        xt[pi * c + ci],
                        x[ci * p + pi],
                        "c={c} p={p} at ({ci}, {pi})"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_relu_variants_equal_the_separate_ops() {
        for (k, c_in, c_out) in [(1, 3, 4), (3, 3, 4), (3, 5, 2)] {
            let d = Conv2dDims {
                c_in,
                c_out,
                ..dims(k, 3)
            };
            // A ReLU output as the input: about half zeros.
            let x: Vec<f32> = rand_vec(d.in_len(), 1.0, 12)
                .iter()
                .map(|v| v.max(0.0))
                .collect();
            let w = rand_vec(d.weight_len(), 1.0, 13);
            let b = rand_vec(d.c_out, 1.0, 14);
            let (mut y, mut y_fused) = (vec![0.0; d.out_len()], vec![0.0; d.out_len()]);
            conv2d_forward(&mut y, &x, &w, &b, &d).unwrap();
            conv2d_relu_forward(&mut y_fused, &x, &w, &b, &d).unwrap();
            let relu_y: Vec<f32> = y.iter().map(|v| v.max(0.0)).collect();
            assert_eq!(y_fused, relu_y, "forward k={k}");

            let dy = rand_vec(d.out_len(), 1.0, 15);
            let (mut dx, mut dw, mut db) = (
                vec![0.0; d.in_len()],
                vec![0.0; d.weight_len()],
                vec![0.0; d.c_out],
            );
            conv2d_backward(Some(&mut dx), &mut dw, &mut db, &dy, &x, &w, &d).unwrap();
            let (mut dx_f, mut dw_f, mut db_f) = (
                vec![0.0; d.in_len()],
                vec![0.0; d.weight_len()],
                vec![0.0; d.c_out],
            );
            conv2d_backward_through_relu(Some(&mut dx_f), &mut dw_f, &mut db_f, &dy, &x, &w, &d)
                .unwrap();
            let masked: Vec<f32> = dx
                .iter()
                .zip(&x)
                .map(|(&g, &v)| if v > 0.0 { g } else { 0.0 })
                .collect();
            assert_eq!(dx_f, masked, "dinp k={k}");
            assert_eq!((dw_f, db_f), (dw, db), "dweight, dbias k={k}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let d = dims(4, 1);
        let mut y = vec![0.0; d.out_len()];
        let x = vec![0.0; d.in_len()];
        let w = vec![0.0; d.weight_len()];
        assert!(conv2d_forward(&mut y, &x, &w, &[0.0; 4], &d).is_err());
        let d = dims(3, 1);
        assert!(conv2d_forward(&mut y, &x, &w[1..], &[0.0; 4], &d).is_err());
    }
}
