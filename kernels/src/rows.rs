//! Products of a few rows with a weight matrix, for generation: `out[R, N] = x[R, K] · w[N, K]ᵀ
//! (+ bias[N])`, the weight given row-major as in [`crate::linear`] and packed once into a
//! [`RowsWeight`], in f32 or rounded to bfloat16.
//!
//! Why not the GEMM: the sampler feeds one position of each of a few sequences at a time, and a
//! general GEMM packs its weight operand on every call, which at a few rows costs as much as the
//! product. A [`RowsWeight`] is packed once per model, so a call costs one pass over it: at a
//! few rows generation is bound by reading the weights, and bf16 weights are half the bytes.
//!
//! Packing: panels of [`NR`] output columns, each `[K][NR]` (the weight transposed, the last
//! panel padded with zero columns). The kernel keeps an `MR × NR` block of `out` in registers
//! (AVX-512: 8 rows × 32 columns in 16 registers; elsewhere 2 × 32) and, for each k, loads the
//! panel's row of NR weights once and multiplies it with each row's `x[i, k]`.
//!
//! **Every output is computed the same way, whatever R, N, the blocking or the thread count:**
//! `out[i, j] = (…((0 + x[i,0]·w[j,0]) + x[i,1]·w[j,1]) + …) + bias[j]`, one multiply-add per k in
//! order (fused where the CPU has FMA). So a row's result does not depend on the rows it is
//! computed with: the sampler gets the same logits whether it feeds a caption one position at a
//! time or all at once, and a sequence draws the same tokens in any batch. The AVX-512 kernel
//! and the portable one (with FMA) agree bit for bit; the test holds them together.

use crate::bf16::round_bf16;
use crate::error::{check_len, KernelError, Result};
use crate::linear::check_linear;
use crate::simd::{fmadd, Isa};
use rayon::prelude::*;

/// Output columns of a panel (two AVX-512 registers of f32).
pub const NR: usize = 32;
/// Panels per parallel task.
const PANELS_PER_TASK: usize = 2;

/// The packed elements of a [`RowsWeight`].
#[derive(Clone, Debug)]
enum Panels {
    F32(Vec<f32>),
    /// bfloat16 bits.
    Bf16(Vec<u16>),
}

/// A weight matrix [N, K] packed for [`rows_product`]: in f32, or rounded to bfloat16 (nearest,
/// ties to even), which halves the bytes each product reads.
#[derive(Clone, Debug)]
pub struct RowsWeight {
    panels: Panels,
    n: usize,
    k: usize,
}

impl RowsWeight {
    /// `w` [N, K] row-major, packed in f32.
    pub fn f32(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Ok(RowsWeight {
            panels: Panels::F32(pack(w, n, k)?),
            n,
            k,
        })
    }

    /// `w` [N, K] row-major, rounded to bfloat16 and packed.
    pub fn bf16(w: &[f32], n: usize, k: usize) -> Result<Self> {
        Ok(RowsWeight {
            panels: Panels::Bf16(pack(w, n, k)?),
            n,
            k,
        })
    }

    /// N, the output columns.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// K, the length of a row of the unpacked matrix.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Whether the weights were rounded to bfloat16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.panels, Panels::Bf16(_))
    }
}

/// Panels of `w` [N, K]: panel p holds `[K][NR]` = w[p·NR + jj, e] at `e·NR + jj`.
fn pack<T: Stored>(w: &[f32], n: usize, k: usize) -> Result<Vec<T>> {
    check_len("RowsWeight", "w", w.len(), n * k)?;
    if n == 0 || k == 0 {
        return Err(KernelError::Shape {
            op: "RowsWeight",
            what: format!("an empty matrix ({n} × {k})"),
        });
    }
    let mut out = vec![T::default(); n.div_ceil(NR) * NR * k];
    out.par_chunks_mut(NR * k)
        .enumerate()
        .for_each(|(p, panel)| {
            for jj in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + jj) * k..][..k];
                for (e, &v) in row.iter().enumerate() {
                    panel[e * NR + jj] = T::store(v);
                }
            }
        });
    Ok(out)
}

/// `out[R, N] = x[R, K] · w[N, K]ᵀ (+ bias)` (out overwritten); with a bf16 weight, `x` is
/// rounded to bfloat16 too (both operands bf16, sums in f32, as
/// [`crate::bf16::linear_forward_bf16`] computes). See the module doc for the order of the sums.
pub fn rows_product(
    out: &mut [f32],
    x: &[f32],
    w: &RowsWeight,
    bias: Option<&[f32]>,
    r: usize,
) -> Result<()> {
    rows_product_on(Isa::best(), out, x, w, bias, r)
}

fn rows_product_on(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    w: &RowsWeight,
    bias: Option<&[f32]>,
    r: usize,
) -> Result<()> {
    let (n, k) = (w.n, w.k);
    // The packed weight's own length was checked when it was packed.
    check_linear("rows_product", (out.len(), x.len(), n * k), bias, (r, k, n))?;
    match &w.panels {
        Panels::F32(p) => product(isa, out, x, p, bias, r, k, n),
        Panels::Bf16(p) => {
            let rounded: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            product(isa, out, &rounded, p, bias, r, k, n)
        }
    }
    Ok(())
}

/// How a packed weight (or the sampler's key-value cache) keeps a number: f32, or bfloat16 as
/// its bits, rounded to nearest (ties to even) when stored and widened exactly when read.
pub trait Stored: Copy + Default + Send + Sync {
    const BF16: bool;
    fn store(v: f32) -> Self;
    fn widen(self) -> f32;
}

impl Stored for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Stored for u16 {
    const BF16: bool = true;
    #[inline(always)]
    fn store(v: f32) -> Self {
        half::bf16::from_f32(v).to_bits()
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

#[allow(clippy::too_many_arguments)]
fn product<W: Stored>(
    isa: Isa,
    out: &mut [f32],
    x: &[f32],
    panels: &[W],
    bias: Option<&[f32]>,
    r: usize,
    k: usize,
    n: usize,
) {
    if r == 0 {
        return;
    }
    let cols = PANELS_PER_TASK * NR;
    // Per task, its columns of every row: [R, cols].
    let mut t = vec![0.0f32; n.div_ceil(cols) * r * cols];
    let task = |(b, block): (usize, &mut [f32])| {
        let first = b * PANELS_PER_TASK * NR * k;
        let last = (first + PANELS_PER_TASK * NR * k).min(panels.len());
        run_task(isa, block, x, &panels[first..last], r, k);
    };
    if n * k * r >= 1 << 16 {
        t.par_chunks_mut(r * cols).enumerate().for_each(task);
    } else {
        t.chunks_mut(r * cols).enumerate().for_each(task);
    }
    for (i, o) in out.chunks_exact_mut(n).enumerate() {
        for (j, o) in o.iter_mut().enumerate() {
            let (b, jj) = (j / cols, j % cols);
            *o = t[(b * r + i) * cols + jj] + bias.map_or(0.0, |b| b[j]);
        }
    }
}

/// One task: `t[i, p·NR + jj]` for the task's panels (each `[K][NR]`), all R rows.
fn run_task<W: Stored>(isa: Isa, t: &mut [f32], x: &[f32], panels: &[W], r: usize, k: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::best` found AVX-512F, AVX-512VL, AVX2 and FMA on this CPU.
        Isa::Avx512 => unsafe { task_avx512(t, x, panels, r, k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::best` found AVX2 and FMA on this CPU.
        Isa::Avx2 => unsafe { task_avx2(t, x, panels, r, k) },
        _ => task_body::<W, false, false, 2>(t, x, panels, r, k),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn task_avx512<W: Stored>(t: &mut [f32], x: &[f32], panels: &[W], r: usize, k: usize) {
    task_body::<W, true, true, 8>(t, x, panels, r, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn task_avx2<W: Stored>(t: &mut [f32], x: &[f32], panels: &[W], r: usize, k: usize) {
    task_body::<W, true, false, 2>(t, x, panels, r, k)
}

/// The register blocks of one task: MR rows by one panel, then the rows left over one at a
/// time (computed the same way).
#[inline(always)]
fn task_body<W: Stored, const FMA: bool, const AVX512: bool, const MR: usize>(
    t: &mut [f32],
    x: &[f32],
    panels: &[W],
    r: usize,
    k: usize,
) {
    let width = PANELS_PER_TASK * NR;
    for (p, panel) in panels.chunks_exact(NR * k).enumerate() {
        let mut i = 0;
        while i + MR <= r {
            let sums = block::<W, FMA, AVX512, MR>(x, panel, i, k);
            for (a, sums) in sums.iter().enumerate() {
                t[(i + a) * width + p * NR..][..NR].copy_from_slice(sums);
            }
            i += MR;
        }
        while i < r {
            let [sums] = block::<W, FMA, AVX512, 1>(x, panel, i, k);
            t[i * width + p * NR..][..NR].copy_from_slice(&sums);
            i += 1;
        }
    }
}

/// Rows `i..i + M` of `x` times one panel: `[M][NR]` sums.
#[inline(always)]
fn block<W: Stored, const FMA: bool, const AVX512: bool, const M: usize>(
    x: &[f32],
    panel: &[W],
    i: usize,
    k: usize,
) -> [[f32; NR]; M] {
    let xs = &x[i * k..(i + M) * k];
    assert_eq!(panel.len(), NR * k);
    #[cfg(target_arch = "x86_64")]
    if AVX512 {
        // SAFETY: AVX512 is only instantiated inside `task_avx512`, whose CPU check the caller
        // made; `xs` holds M rows of k and the panel k rows of NR (asserted above).
        return unsafe { block_avx512::<W, M>(xs, panel, k) };
    }
    let mut acc = [[0.0f32; NR]; M];
    for e in 0..k {
        let mut wv = [0.0f32; NR];
        for jj in 0..NR {
            wv[jj] = panel[e * NR + jj].widen();
        }
        for a in 0..M {
            let xv = xs[a * k + e];
            for jj in 0..NR {
                acc[a][jj] = fmadd::<FMA>(xv, wv[jj], acc[a][jj]);
            }
        }
    }
    acc
}

/// [`block`] with AVX-512 intrinsics: two registers of sums per row (the compiler does not keep
/// an 8 × 32 array in registers by itself).
///
/// # Safety
/// The CPU supports AVX-512F and FMA; `xs` holds M rows of `k`, `panel` `k` rows of [`NR`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn block_avx512<W: Stored, const M: usize>(
    xs: &[f32],
    panel: &[W],
    k: usize,
) -> [[f32; NR]; M] {
    use std::arch::x86_64::{
        __m512i, _mm512_castsi512_ps, _mm512_castsi512_si256, _mm512_cvtepu16_epi32,
        _mm512_extracti64x4_epi64, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_set1_ps, _mm512_setzero_ps, _mm512_slli_epi32, _mm512_storeu_ps,
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let (xp, wp) = (xs.as_ptr(), panel.as_ptr());
    for e in 0..k {
        let (w0, w1) = if W::BF16 {
            let bits = _mm512_loadu_si512(wp.add(e * NR).cast::<__m512i>());
            let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits));
            let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(bits));
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
            )
        } else {
            let p = wp.add(e * NR).cast::<f32>();
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        };
        for (a, acc) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*xp.add(a * k + e));
            acc[0] = _mm512_fmadd_ps(xv, w0, acc[0]);
            acc[1] = _mm512_fmadd_ps(xv, w1, acc[1]);
        }
    }
    let mut out = [[0.0f32; NR]; M];
    for a in 0..M {
        _mm512_storeu_ps(out[a].as_mut_ptr(), acc[a][0]);
        _mm512_storeu_ps(out[a].as_mut_ptr().add(16), acc[a][1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;

    /// (R, K, N): a single output, odd edges of the row block and the panel, more rows than a
    /// block, more columns than a task.
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (3, 17, 5),
        (8, 384, 130),
        (5, 33, 67),
        (37, 70, 9),
        (2, 1536, 64),
    ];

    /// Random `x` [R, K], `w` [N, K] and `bias` [N] for shape number `s`.
    fn operands(s: usize, (r, k, n): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = s as u64;
        (
            rand_vec(r * k, 1.0, s),
            rand_vec(n * k, 1.0, 100 + s),
            rand_vec(n, 1.0, 200 + s),
        )
    }

    fn run(isa: Isa, x: &[f32], w: &RowsWeight, bias: Option<&[f32]>, r: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; r * w.rows()];
        rows_product_on(isa, &mut out, x, w, bias, r).unwrap();
        out
    }

    #[test]
    fn rows_product_matches_the_f64_sums() {
        for (s, &(r, k, n)) in SHAPES.iter().enumerate() {
            let (x, w, bias) = operands(s, (r, k, n));
            let packed = RowsWeight::f32(&w, n, k).unwrap();
            assert_eq!(
                (packed.rows(), packed.cols(), packed.is_bf16()),
                (n, k, false)
            );
            for bias in [None, Some(&bias[..])] {
                let got = run(Isa::best(), &x, &packed, bias, r);
                for i in 0..r {
                    for j in 0..n {
                        let (mut want, mut size) = (bias.map_or(0.0, |b| b[j] as f64), 0.0f64);
                        for e in 0..k {
                            let p = x[i * k + e] as f64 * w[j * k + e] as f64;
                            want += p;
                            size += p.abs();
                        }
                        // The bound of a sum of k + 1 terms in f32, in sequence.
                        let err = (got[i * n + j] as f64 - want).abs();
                        let bound = (k + 1) as f64 * f32::EPSILON as f64 / 2.0;
                        assert!(
                            err <= bound * (size + 1.0),
                            "R {r} K {k} N {n}: out[{i}, {j}] = {}, expected {want}",
                            got[i * n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rows_or_threads_beside_it() {
        for (s, &(r, k, n)) in SHAPES.iter().enumerate() {
            let (x, w, _) = operands(s, (r, k, n));
            for w in [RowsWeight::f32(&w, n, k), RowsWeight::bf16(&w, n, k)] {
                let w = w.unwrap();
                let all = run(Isa::best(), &x, &w, None, r);
                for i in 0..r {
                    let alone = run(Isa::best(), &x[i * k..(i + 1) * k], &w, None, 1);
                    assert_eq!(alone, all[i * n..(i + 1) * n], "R {r} K {k} N {n}: row {i}");
                }
                let rest = run(Isa::best(), &x[k..], &w, None, r - 1);
                assert_eq!(rest, all[n..], "R {r} K {k} N {n}: rows 1..");
                let one_thread = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap()
                    .install(|| run(Isa::best(), &x, &w, None, r));
                assert_eq!(one_thread, all, "R {r} K {k} N {n}: one thread");
            }
        }
    }

    #[test]
    fn the_avx512_kernel_sums_as_the_portable_code_does() {
        // Both fuse the multiply-adds in the same order, so they agree bit for bit.
        if !(Isa::Avx512.available() && Isa::Avx2.available()) {
            println!("skipped: this CPU lacks AVX-512, so there is no second kernel to compare");
            return;
        }
        for (s, &(r, k, n)) in SHAPES.iter().enumerate() {
            let (x, w, _) = operands(s, (r, k, n));
            for w in [RowsWeight::f32(&w, n, k), RowsWeight::bf16(&w, n, k)] {
                let w = w.unwrap();
                assert_eq!(
                    run(Isa::Avx512, &x, &w, None, r),
                    run(Isa::Avx2, &x, &w, None, r),
                    "R {r} K {k} N {n}, bf16 {}",
                    w.is_bf16()
                );
            }
        }
    }

    #[test]
    fn bf16_products_are_the_f32_products_of_the_rounded_operands() {
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        for (s, &(r, k, n)) in SHAPES.iter().enumerate() {
            let (x, w, bias) = operands(s, (r, k, n));
            let bf16 = RowsWeight::bf16(&w, n, k).unwrap();
            assert!(bf16.is_bf16());
            let got = run(Isa::best(), &x, &bf16, Some(&bias), r);
            let rounded = RowsWeight::f32(&round(&w), n, k).unwrap();
            let want = run(Isa::best(), &round(&x), &rounded, Some(&bias), r);
            assert_eq!(got, want, "R {r} K {k} N {n}");
            let exact = run(
                Isa::best(),
                &x,
                &RowsWeight::f32(&w, n, k).unwrap(),
                Some(&bias),
                r,
            );
            assert!(
                got.iter().zip(&exact).any(|(a, b)| a != b),
                "R {r} K {k} N {n}: rounding changed nothing"
            );
        }
    }

    #[test]
    fn rows_products_reject_bad_lengths() {
        let w = RowsWeight::f32(&[0.0; 9], 3, 3).unwrap();
        let mut out = vec![0.0; 6];
        assert!(rows_product(&mut out, &[0.0; 5], &w, None, 2).is_err());
        assert!(rows_product(&mut out, &[0.0; 6], &w, Some(&[0.0; 2]), 2).is_err());
        assert!(rows_product(&mut out[..5], &[0.0; 6], &w, None, 2).is_err());
        assert!(RowsWeight::f32(&[0.0; 8], 3, 3).is_err());
        assert!(RowsWeight::bf16(&[0.0; 8], 3, 3).is_err());
        assert!(RowsWeight::f32(&[], 0, 3).is_err());
    }
}
