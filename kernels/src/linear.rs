//! Linear layers (PyTorch's `nn.Linear`): `out = inp · weightᵀ + bias`, and the matrix products
//! behind them.
//!
//! Shapes: `inp` [N, C], `weight` [OC, C], `bias` [OC], `out` [N, OC], where N = B·T (or any number
//! of rows). On CPU every product goes through the `gemm` crate, multi-threaded with rayon; the
//! CUDA launcher beside it will call cuBLASLt with the same arguments.
//!
//! Backward: `dinp = dout · weight` (overwritten), `dweight += doutᵀ · inp`, `dbias += Σ_rows dout`.
//!
//! [`BiasOps`] is the bias's part on a [`Device`], for a GPU whose matmul (cuBLAS) leaves it
//! out: on [`Cpu`] the same arithmetic as [`linear_forward`] and [`column_sums_add`], on a GPU
//! the kernels of `kernels/cuda/bias.cu`.

use crate::device::{store, widen, Cpu, Device, Elem};
use crate::error::{check_len, KernelError, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// One dense product, or a batch of them, over row-major operands that may start at an offset
/// into their buffers and whose rows may be further apart than their length: product i computes
/// `c[i] = op(a[i]) · op(b[i])` (or `+=` when `accumulate`), where operand x[i] starts at element
/// `offsets.x + i·strides.x`; `op(a)` is [m, k] (stored [m, k], or [k, m] when `a_t`), `op(b)`
/// is [k, n] (stored [k, n], or [n, k] when `b_t`), `c[i]` is [m, n]. Consecutive stored rows of
/// x are `ld.x` elements apart (BLAS's leading dimension; 0 means packed: the stored row's
/// length), so a product can read one head of an interleaved `qkv` [T, 3, NH, HS] (offset
/// h·HS, ld 3·NH·HS). A stride of 0 shares an input across the batch (a convolution's weight);
/// `c`'s products must not overlap (side by side within a row is fine: per-head outputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
    pub accumulate: bool,
    pub batch: usize,
    /// Element offsets of the first product's a, b and c.
    pub offsets: [usize; 3],
    /// Element distances between consecutive products' a, b and c.
    pub strides: [usize; 3],
    /// Element distances between consecutive stored rows of a, b and c; 0: packed.
    pub ld: [usize; 3],
}

impl GemmSpec {
    /// One product of whole buffers.
    pub fn new(m: usize, n: usize, k: usize) -> GemmSpec {
        GemmSpec {
            m,
            n,
            k,
            a_t: false,
            b_t: false,
            accumulate: false,
            batch: 1,
            offsets: [0; 3],
            strides: [0; 3],
            ld: [0; 3],
        }
    }

    /// The stored (rows, columns) of a, b and c: op(a) is [m, k], so `a` is stored [m, k], or
    /// [k, m] when `a_t`; likewise `b`; `c` is [m, n].
    pub fn stored_shapes(&self) -> [(usize, usize); 3] {
        let (m, n, k) = (self.m, self.n, self.k);
        [
            if self.a_t { (k, m) } else { (m, k) },
            if self.b_t { (n, k) } else { (k, n) },
            (m, n),
        ]
    }

    /// The leading dimensions in effect (`ld`, with 0 replaced by the stored row's length).
    pub fn leading_dims(&self) -> [usize; 3] {
        let shapes = self.stored_shapes();
        [0, 1, 2].map(|i| {
            if self.ld[i] == 0 {
                shapes[i].1
            } else {
                self.ld[i]
            }
        })
    }

    /// Elements from a product's first element to one past its last (0 when empty).
    fn extents(&self) -> [usize; 3] {
        let (shapes, ld) = (self.stored_shapes(), self.leading_dims());
        [0, 1, 2].map(|i| match shapes[i] {
            (0, _) | (_, 0) => 0,
            (rows, cols) => (rows - 1) * ld[i] + cols,
        })
    }

    /// Checks that every product lies inside its buffer and that `c`'s products do not overlap.
    pub fn check(
        &self,
        op: &'static str,
        (a_len, b_len, c_len): (usize, usize, usize),
    ) -> Result<()> {
        let (shapes, ld, sizes) = (self.stored_shapes(), self.leading_dims(), self.extents());
        for (i, (name, len)) in [("a", a_len), ("b", b_len), ("c", c_len)]
            .into_iter()
            .enumerate()
        {
            if ld[i] < shapes[i].1 {
                return Err(KernelError::Shape {
                    op,
                    what: format!(
                        "leading dimension of `{name}` {} is below its stored row length {} \
                         ({self:?})",
                        ld[i], shapes[i].1
                    ),
                });
            }
            if self.batch == 0 || sizes[i] == 0 {
                continue;
            }
            let end = self.offsets[i] + (self.batch - 1) * self.strides[i] + sizes[i];
            if end > len {
                return Err(KernelError::Shape {
                    op,
                    what: format!(
                        "buffer `{name}` has {len} elements; the products ({self:?}) reach {end}"
                    ),
                });
            }
        }
        // c's products are disjoint when each ends before the next begins, or when they sit side
        // by side within every row (n ≤ stride and the last ends within the first's row).
        let (stride, n) = (self.strides[2], self.n);
        let apart = stride >= sizes[2];
        let side_by_side = || stride >= n && (self.batch - 1) * stride + n <= ld[2];
        if self.batch > 1 && sizes[2] > 0 && !apart && !side_by_side() {
            return Err(KernelError::Shape {
                op,
                what: format!(
                    "c's products overlap: stride {stride} with products of {} elements \
                     (m {}, n {n}, ldc {})",
                    sizes[2], self.m, ld[2]
                ),
            });
        }
        Ok(())
    }
}

/// Dense matrix products on a [`Device`]: the CPU's `gemm` crate, cuBLAS on a GPU (inputs f32
/// or f16, fp32 accumulation), the CPU GEMM again under the emulator.
pub trait MatmulOps: Device {
    /// The products `spec` describes (see [`GemmSpec`]); `c` is f32, `a` and `b` are both `I`
    /// (f32 or f16).
    fn gemm<I: Elem>(
        &self,
        c: &mut Self::Buf<f32>,
        a: &Self::Buf<I>,
        b: &Self::Buf<I>,
        spec: &GemmSpec,
    ) -> Result<()>;

    /// `c[m, n] = op(a) · op(b)` (or `+=` when `accumulate`) of whole buffers.
    #[allow(clippy::too_many_arguments)]
    fn matmul<I: Elem>(
        &self,
        c: &mut Self::Buf<f32>,
        a: &Self::Buf<I>,
        a_t: bool,
        b: &Self::Buf<I>,
        b_t: bool,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        check_matmul("matmul", (self.len(c), self.len(a), self.len(b)), (m, n, k))?;
        let spec = GemmSpec {
            a_t,
            b_t,
            accumulate,
            ..GemmSpec::new(m, n, k)
        };
        self.gemm(c, a, b, &spec)
    }
}

/// The shapes [`MatmulOps::matmul`] requires, checked before anything runs.
pub fn check_matmul(
    op: &'static str,
    (c_len, a_len, b_len): (usize, usize, usize),
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    check_len(op, "c", c_len, m * n)?;
    check_len(op, "a", a_len, m * k)?;
    check_len(op, "b", b_len, k * n)
}

/// [`MatmulOps::gemm`] on host vectors through the CPU GEMM (f16 inputs widened first).
pub fn gemm_host<I: Elem>(c: &mut [f32], a: &[I], b: &[I], spec: &GemmSpec) -> Result<()> {
    spec.check("matmul", (a.len(), b.len(), c.len()))?;
    let (shapes, ld, ext) = (spec.stored_shapes(), spec.leading_dims(), spec.extents());
    if spec.m == 0 || spec.n == 0 {
        return Ok(());
    }
    let (a, b) = (widen(a), widen(b));
    for i in 0..spec.batch {
        let [oa, ob, oc] = [0, 1, 2].map(|j| spec.offsets[j] + i * spec.strides[j]);
        let (ra, rb) = (&a[oa..oa + ext[0]], &b[ob..ob + ext[1]]);
        let av = MatRef::strided(ra, shapes[0].0, shapes[0].1, ld[0]);
        let bv = MatRef::strided(rb, shapes[1].0, shapes[1].1, ld[1]);
        let av = if spec.a_t { av.t() } else { av };
        let bv = if spec.b_t { bv.t() } else { bv };
        matmul_impl(
            &mut c[oc..oc + ext[2]],
            ld[2],
            av,
            bv,
            spec.accumulate,
            true,
        )?;
    }
    Ok(())
}

impl MatmulOps for Cpu {
    fn gemm<I: Elem>(
        &self,
        c: &mut Vec<f32>,
        a: &Vec<I>,
        b: &Vec<I>,
        spec: &GemmSpec,
    ) -> Result<()> {
        gemm_host(c, a, b, spec)
    }
}

/// A linear layer's bias on a [`Device`] (CUDA: `kernels/cuda/bias.cu`). `out`/`dout` are
/// [n, oc] in their storage type `T` (f32, or f16 for an f16 matmul output); `bias`, `dbias`
/// [oc] f32.
pub trait BiasOps: Device {
    /// `out[r, j] += bias[j]` for every row (computed in f32, stored as `T`).
    fn bias_add<T: Elem>(
        &self,
        out: &mut Self::Buf<T>,
        bias: &Self::Buf<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()>;
    /// `dbias[j] += Σ_r dout[r, j]` (a parameter gradient: accumulated), in a fixed order.
    fn bias_backward<T: Elem>(
        &self,
        dbias: &mut Self::Buf<f32>,
        dout: &Self::Buf<T>,
        n: usize,
        oc: usize,
    ) -> Result<()>;
}

impl BiasOps for Cpu {
    fn bias_add<T: Elem>(
        &self,
        out: &mut Vec<T>,
        bias: &Vec<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        check_len("bias_add", "out", out.len(), n * oc)?;
        check_len("bias_add", "bias", bias.len(), oc)?;
        let mut y = widen(out).into_owned();
        for row in y.chunks_exact_mut(oc.max(1)) {
            for (o, &b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
        store(out, y);
        Ok(())
    }

    fn bias_backward<T: Elem>(
        &self,
        dbias: &mut Vec<f32>,
        dout: &Vec<T>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        check_len("bias_backward", "dout", dout.len(), n * oc)?;
        check_len("bias_backward", "dbias", dbias.len(), oc)?;
        column_sums_add(dbias, &widen(dout), n, oc);
        Ok(())
    }
}

/// A row-major matrix view with arbitrary strides, so that transposes cost nothing.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Element distance between consecutive rows.
    pub row_stride: usize,
    /// Element distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A row-major `rows × cols` matrix whose rows are `row_stride` elements apart.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The largest element index the view touches, plus one (0 for an empty view).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// `c = a · b` (`accumulate == false`) or `c += a · b`, with `c` contiguous row-major
/// [a.rows, b.cols]. Multi-threaded when large; deterministic for a given thread count.
pub fn matmul(c: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) -> Result<()> {
    matmul_impl(c, b.cols, a, b, accumulate, true)
}

/// [`matmul`] on the calling thread only: for products inside a parallel loop.
pub fn matmul_serial(c: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) -> Result<()> {
    matmul_impl(c, b.cols, a, b, accumulate, false)
}

/// `c = a · b` or `c += a · b` with `c` row-major [a.rows, b.cols], rows `ldc` apart (`c` holds
/// exactly the rows' extent; the elements between rows are left alone).
fn matmul_impl(
    c: &mut [f32],
    ldc: usize,
    a: MatRef,
    b: MatRef,
    accumulate: bool,
    threads: bool,
) -> Result<()> {
    const OP: &str = "matmul";
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(KernelError::Shape {
            op: OP,
            what: format!("inner dimensions differ: a is {m}×{k}, b is {}×{n}", b.rows),
        });
    }
    let c_extent = if m == 0 || n == 0 {
        0
    } else {
        (m - 1) * ldc + n
    };
    if ldc < n {
        return Err(KernelError::Shape {
            op: OP,
            what: format!("c's row stride {ldc} is below its {n} columns"),
        });
    }
    check_len(OP, "c", c.len(), c_extent)?;
    if a.data.len() < a.extent() || b.data.len() < b.extent() {
        return Err(KernelError::Shape {
            op: OP,
            what: "a strided view reaches past the end of its buffer".into(),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let par = if threads && m * n * k >= PARALLEL_MIN_FLOPS {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // A short, wide product (few output rows, e.g. a convolution with few output channels) runs
    // faster as its transpose, cᵀ = bᵀ·aᵀ, which the microkernel tiles along the long side.
    let transpose = m < 32 && n >= 8 * m;
    let (mm, nn, c_cs, c_rs, lhs, rhs) = if transpose {
        (n, m, ldc as isize, 1, b.t(), a.t())
    } else {
        (m, n, 1, ldc as isize, a, b)
    };
    // SAFETY: the extents of `a` and `b` were checked against their buffers above, `c` holds
    // the extent of m rows of n elements with row stride ldc ≥ n (read through the transposed
    // strides when `transpose`), and `c` cannot alias `a` or `b` (it is `&mut`).
    unsafe {
        gemm::gemm(
            mm,
            nn,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// The lengths of a linear layer's buffers, `(out, inp, weight)` and `bias`, for sizes
/// `(n, c, oc)`: an error naming `op` and the buffer otherwise.
pub fn check_linear(
    op: &'static str,
    (out, inp, weight): (usize, usize, usize),
    bias: Option<&[f32]>,
    (n, c, oc): (usize, usize, usize),
) -> Result<()> {
    check_len(op, "inp", inp, n * c)?;
    check_len(op, "weight", weight, oc * c)?;
    check_len(op, "out", out, n * oc)?;
    if let Some(bias) = bias {
        check_len(op, "bias", bias.len(), oc)?;
    }
    Ok(())
}

/// `out[N, OC] = inp[N, C] · weight[OC, C]ᵀ + bias[OC]` (out overwritten).
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    check_linear(
        "linear_forward",
        (out.len(), inp.len(), weight.len()),
        bias,
        (n, c, oc),
    )?;
    if let Some(bias) = bias {
        out.par_chunks_mut(oc.max(1))
            .for_each(|row| row.copy_from_slice(bias));
    }
    matmul(
        out,
        MatRef::new(inp, n, c),
        MatRef::new(weight, oc, c).t(),
        bias.is_some(),
    )
}

/// Backward of [`linear_forward`]: `dinp = dout · weight` (overwritten), `dweight += doutᵀ · inp`,
/// `dbias += Σ_rows dout`. `dinp` may be `None` when the input needs no gradient.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "linear_backward";
    check_len(OP, "dout", dout.len(), n * oc)?;
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "weight", weight.len(), oc * c)?;
    check_len(OP, "dweight", dweight.len(), oc * c)?;
    if let Some(dinp) = dinp {
        check_len(OP, "dinp", dinp.len(), n * c)?;
        matmul(
            dinp,
            MatRef::new(dout, n, oc),
            MatRef::new(weight, oc, c),
            false,
        )?;
    }
    matmul(
        dweight,
        MatRef::new(dout, n, oc).t(),
        MatRef::new(inp, n, c),
        true,
    )?;
    if let Some(dbias) = dbias {
        check_len(OP, "dbias", dbias.len(), oc)?;
        column_sums_add(dbias, dout, n, oc);
    }
    Ok(())
}

/// Rows per task of the column-sum reductions: fixed, so results do not depend on scheduling.
const ROWS_PER_TASK: usize = 64;

/// `acc[j] += Σ_i x[i, j]` over an [n, cols] matrix, reduced in a fixed order (deterministic).
pub fn column_sums_add(acc: &mut [f32], x: &[f32], n: usize, cols: usize) {
    debug_assert_eq!(x.len(), n * cols);
    if cols == 0 {
        return;
    }
    let partials: Vec<Vec<f32>> = x
        .par_chunks(ROWS_PER_TASK * cols)
        .map(|rows| {
            let mut s = vec![0.0f32; cols];
            for row in rows.chunks_exact(cols) {
                for (s, &v) in s.iter_mut().zip(row) {
                    *s += v;
                }
            }
            s
        })
        .collect();
    for p in partials {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// This machine's dense f32 GEMM throughput in GFLOP/s, measured on a square product of side
/// `n` (best of `reps`): the denominator of model FLOPs utilisation on CPU.
pub fn measure_gemm_gflops(n: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        let ok = matmul(&mut c, MatRef::new(&a, n, n), MatRef::new(&a, n, n), false).is_ok();
        if ok {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, dot, numeric_grad, rand_vec};

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_including_transposes_and_accumulate() {
        let (m, k, n) = (37, 129, 71); // large enough to take the parallel path
        let a = rand_vec(m * k, 1.0, 1);
        let b = rand_vec(k * n, 1.0, 2);
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![0.0f32; m * n];
        matmul(&mut c, MatRef::new(&a, m, k), MatRef::new(&b, k, n), false).unwrap();
        let got: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        assert_close("a·b", &got, &want, 1e-4, 1e-4);
        // bᵀ stored as [n, k], read through a transposed view.
        let mut bt = vec![0.0f32; k * n];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        matmul(
            &mut c,
            MatRef::new(&a, m, k),
            MatRef::new(&bt, n, k).t(),
            true,
        )
        .unwrap();
        let got: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        let twice: Vec<f64> = want.iter().map(|x| 2.0 * x).collect();
        assert_close("c += a·(bᵀ)ᵀ", &got, &twice, 1e-4, 1e-4);
    }

    #[test]
    fn short_wide_products_take_the_transposed_path_and_agree() {
        let (m, k, n) = (5, 33, 300); // m < 32 and n ≥ 8m
        let a = rand_vec(m * k, 1.0, 8);
        let b = rand_vec(k * n, 1.0, 9);
        let mut c = vec![1.0f32; m * n];
        matmul(&mut c, MatRef::new(&a, m, k), MatRef::new(&b, k, n), true).unwrap();
        let want: Vec<f64> = naive(&a, &b, m, k, n).iter().map(|x| x + 1.0).collect();
        let got: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        assert_close("short wide a·b + 1", &got, &want, 1e-4, 1e-4);
    }

    #[test]
    fn matmul_rejects_bad_shapes() {
        let a = vec![0.0; 6];
        let mut c = vec![0.0; 4];
        assert!(matmul(&mut c, MatRef::new(&a, 2, 3), MatRef::new(&a, 2, 3), false).is_err());
        assert!(matmul(&mut c, MatRef::new(&a, 2, 3), MatRef::new(&a, 3, 2), false).is_ok());
        let mut c = vec![0.0; 3];
        assert!(matmul(&mut c, MatRef::new(&a, 2, 3), MatRef::new(&a, 3, 2), false).is_err());
        assert!(linear_forward(&mut c, &a, &a, None, 2, 3, 2).is_err());
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        let (n, c, oc) = (5, 7, 4);
        let mut inp = rand_vec(n * c, 1.0, 3);
        let mut w = rand_vec(oc * c, 1.0, 4);
        let mut bias = rand_vec(oc, 1.0, 5);
        let wout = rand_vec(n * oc, 1.0, 6);
        let loss = |inp: &[f32], w: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; n * oc];
            linear_forward(&mut out, inp, w, Some(bias), n, c, oc).unwrap();
            dot(&wout, &out)
        };
        let mut dinp = vec![f32::NAN; n * c];
        let mut dw = vec![0.5; oc * c]; // accumulates onto what is there
        let mut db = vec![0.25; oc];
        linear_backward(
            Some(&mut dinp),
            &mut dw,
            Some(&mut db),
            &wout,
            &inp,
            &w,
            n,
            c,
            oc,
        )
        .unwrap();
        let eps = 1e-2;
        let (i2, b2) = (inp.clone(), bias.clone());
        let num: Vec<f64> = (0..n * c)
            .map(|i| numeric_grad(&mut inp, i, eps, |x| loss(x, &w, &b2)))
            .collect();
        let got: Vec<f64> = dinp.iter().map(|&x| x as f64).collect();
        assert_close("dinp", &got, &num, 1e-3, 1e-3);
        let w2 = w.clone();
        let num: Vec<f64> = (0..oc * c)
            .map(|i| numeric_grad(&mut w, i, eps, |x| loss(&i2, x, &b2)) + 0.5)
            .collect();
        let got: Vec<f64> = dw.iter().map(|&x| x as f64).collect();
        assert_close("dweight", &got, &num, 1e-3, 1e-3);
        let num: Vec<f64> = (0..oc)
            .map(|i| numeric_grad(&mut bias, i, eps, |x| loss(&i2, &w2, x)) + 0.25)
            .collect();
        let got: Vec<f64> = db.iter().map(|&x| x as f64).collect();
        assert_close("dbias", &got, &num, 1e-3, 1e-3);
    }
}
