//! Linear layers with bfloat16 products, for inference on the CPU: `out = inp · weightᵀ (+ bias)`
//! where every element of `inp` and `weight` is first rounded to bfloat16 (round to nearest, ties
//! to even) and the products are summed in f32. A bf16 × bf16 product is exact in f32, so the
//! only difference from [`crate::linear::linear_forward`] on the rounded operands is the order of
//! the f32 additions; against the f32 product the error is that of rounding the operands, about
//! 2⁻⁸ of Σ|inp·weight| per output at worst.
//!
//! Shapes as in [`crate::linear`]: `inp` [N, C], `weight` [OC, C], `bias` [OC], `out` [N, OC].
//!
//! Why its own product: the `gemm` crate computes bf16 and f16 products by widening them to f32,
//! so it runs no faster than f32. CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake
//! and Sapphire Rapids) multiply pairs of bf16 values into f32 sums at twice the rate of f32 FMA
//! (`vdpbf16ps`). Where the CPU has it, [`linear_forward_bf16`] packs the operands as pairs along
//! C and runs a 12 × 32 register-blocked kernel on them; elsewhere it rounds the operands and calls
//! the f32 product, which gives the same values up to the order of the additions.
//!
//! Layout of the packed operands (k-pairs: elements 2p and 2p + 1 of a row, as one u32 whose low
//! half is element 2p, zero-padded when C is odd):
//! - `inp`: row-major, ⌈C/2⌉ pairs a row (the kernel broadcasts from [`MR`] rows at once);
//! - `weight`: per panel of [`NR`] output channels, over all of C: `[pair][channel]`.
//!
//! The kernel keeps the [`MR`] × [`NR`] block of `out` in 24 registers and, per k-pair, loads two
//! vectors of the weight panel and broadcasts each row's pair; C is walked in blocks of [`KC`]
//! pairs so that the panel's block stays in L1 across the row blocks. Rows are split into tasks of whole
//! [`MR`] blocks; each output's sum runs over C in one fixed order, so the result does not depend
//! on the number of threads.

use crate::error::Result;
use crate::linear::{check_linear, linear_forward, MatRef};
use rayon::prelude::*;

/// Rows of the register block.
const MR: usize = 12;
/// Output channels of the register block (two vectors of 16 f32).
const NR: usize = 32;
/// k-pairs per block of C: the weight panel's block (KC × NR pairs, 16 KiB) stays in L1.
const KC: usize = 128;

/// `x` rounded to bfloat16 (nearest, ties to even), as its bits.
fn bf16_bits(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

/// `x` rounded to bfloat16 and widened back: the value [`linear_forward_bf16`] multiplies.
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Whether this CPU multiplies bf16 pairs in hardware (AVX512-BF16).
pub fn has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[N, OC] = round(inp)[N, C] · round(weight)[OC, C]ᵀ + bias[OC]` (out overwritten), the
/// operands rounded to bfloat16 and the products summed in f32; see the module doc.
pub fn linear_forward_bf16(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    linear_bf16_on(has_bf16_dot(), out, inp, weight, bias, n, c, oc)
}

/// [`linear_forward_bf16`] through the packed kernel (`hardware`, which needs AVX512-BF16) or
/// the portable path.
#[allow(clippy::too_many_arguments)]
fn linear_bf16_on(
    hardware: bool,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let lens = (out.len(), inp.len(), weight.len());
    check_linear("linear_forward_bf16", lens, bias, (n, c, oc))?;
    if !hardware || n == 0 || oc == 0 || c == 0 {
        return linear_forward_rounded(out, inp, weight, bias, n, c, oc);
    }
    assert!(has_bf16_dot(), "the packed kernel needs AVX512-BF16");
    let kp = c.div_ceil(2);
    let panels = pack_weight(weight, oc, c);
    let threads = rayon::current_num_threads().max(1);
    // Whole MR blocks per task, about four tasks a thread (the last task may be short).
    let rows_per_task = n.div_ceil(4 * threads).div_ceil(MR).max(1) * MR;
    out.par_chunks_mut(rows_per_task * oc)
        .enumerate()
        .for_each(|(task, out)| {
            let r0 = task * rows_per_task;
            let rows = out.len() / oc;
            // The rows' pairs, row-major (the kernel broadcasts from MR rows at once).
            let mut packed = vec![0u32; rows.div_ceil(MR) * MR * kp];
            for (r, dst) in packed.chunks_exact_mut(kp).take(rows).enumerate() {
                pairs(dst, &inp[(r0 + r) * c..][..c]);
            }
            for p0 in (0..kp).step_by(KC) {
                let kc = KC.min(kp - p0);
                let first = p0 == 0;
                for (panel, ch0) in (0..oc).step_by(NR).enumerate() {
                    let cols = NR.min(oc - ch0);
                    let b = &panels[(panel * kp + p0) * NR..][..kc * NR];
                    for (block, r) in (0..rows).step_by(MR).enumerate() {
                        let a = &packed[block * MR * kp + p0..];
                        let tile = Tile {
                            rows: MR.min(rows - r),
                            cols,
                            ld: oc,
                            bias: bias.filter(|_| first).map(|b| &b[ch0..ch0 + cols]),
                            overwrite: first,
                        };
                        let o = &mut out[r * oc + ch0..];
                        // SAFETY: the CPU has AVX512-BF16 (checked above); `a` holds MR rows of
                        // `kp` pairs from p0 (the last row's kc of them), `b` kc × NR, and `o`
                        // reaches tile.rows − 1 rows of `oc` past its start plus tile.cols (the
                        // row block and panel lie inside `out`).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            avx512::kernel(kc, a, kp, b, o, &tile)
                        };
                    }
                }
            }
        });
    Ok(())
}

/// The portable path: the operands rounded to bf16, then the f32 product.
fn linear_forward_rounded(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let inp: Vec<f32> = inp.par_iter().map(|&x| round_bf16(x)).collect();
    let weight: Vec<f32> = weight.par_iter().map(|&x| round_bf16(x)).collect();
    linear_forward(out, &inp, &weight, bias, n, c, oc)
}

/// The f32 product of the bf16-rounded operands through the `gemm` crate: the reference the
/// packed kernel is held to (and the portable path).
pub fn matmul_rounded_reference(a: MatRef, b: MatRef) -> Vec<f32> {
    let round = |m: &MatRef| -> Vec<f32> {
        let mut v = Vec::with_capacity(m.rows * m.cols);
        for i in 0..m.rows {
            for j in 0..m.cols {
                v.push(round_bf16(m.data[i * m.row_stride + j * m.col_stride]));
            }
        }
        v
    };
    let (ra, rb) = (round(&a), round(&b));
    let mut c = vec![0.0; a.rows * b.cols];
    crate::linear::matmul(
        &mut c,
        MatRef::new(&ra, a.rows, a.cols),
        MatRef::new(&rb, b.rows, b.cols),
        false,
    )
    .expect("shapes agree");
    c
}

/// What the kernel writes: a `rows × cols` corner of an MR × NR block of `out`, whose rows are
/// `ld` apart; `overwrite` on the first block of C (else it adds), `bias` added then.
struct Tile<'a> {
    rows: usize,
    cols: usize,
    ld: usize,
    bias: Option<&'a [f32]>,
    overwrite: bool,
}

/// The weight [OC, C] as panels of NR channels, each `[pair][channel]` over all ⌈C/2⌉ pairs,
/// channels past OC zero.
fn pack_weight(weight: &[f32], oc: usize, c: usize) -> Vec<u32> {
    let kp = c.div_ceil(2);
    let mut panels = vec![0u32; oc.div_ceil(NR) * kp * NR];
    panels
        .par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(panel, dst)| {
            let mut row = vec![0u32; kp];
            for j in 0..NR.min(oc - panel * NR) {
                pairs(&mut row, &weight[(panel * NR + j) * c..][..c]);
                for (p, &v) in row.iter().enumerate() {
                    dst[p * NR + j] = v;
                }
            }
        });
    panels
}

/// `src` as ⌈len/2⌉ bf16 pairs into `dst` (the last pair's high half zero when len is odd).
fn pairs(dst: &mut [u32], src: &[f32]) {
    let full = src.len() / 2;
    #[cfg(target_arch = "x86_64")]
    let done = if has_bf16_dot() {
        // SAFETY: the CPU has AVX512-BF16; the function reads whole chunks of `src` only.
        unsafe { avx512::pairs(dst, src) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for p in done..full {
        dst[p] = bf16_bits(src[2 * p]) | bf16_bits(src[2 * p + 1]) << 16;
    }
    if src.len() % 2 == 1 {
        dst[full] = bf16_bits(src[src.len() - 1]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Tile, MR, NR};
    use std::arch::x86_64::*;

    /// The pairs of the whole 32-element chunks of `src` into `dst`, rounded by the hardware (the
    /// same rounding as [`super::bf16_bits`] but for subnormals, which it flushes to zero);
    /// returns how many pairs it wrote.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pairs(dst: &mut [u32], src: &[f32]) -> usize {
        let chunks = src.len() / 32;
        for i in 0..chunks {
            let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            debug_assert!(dst.len() >= 16 * (i + 1));
            _mm512_storeu_si512(dst.as_mut_ptr().add(16 * i) as *mut _, v);
        }
        16 * chunks
    }

    /// `out` (the tile's corner) = or += Σ over `kc` pairs of a's rows × b's channels.
    ///
    /// # Safety
    /// AVX512-BF16; `a` holds MR × kc pairs, `b` kc × NR; `out` reaches (rows − 1)·ld + cols.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: &[u32],
        lda: usize,
        b: &[u32],
        out: &mut [f32],
        t: &Tile,
    ) {
        debug_assert!(a.len() >= (MR - 1) * lda + kc && b.len() >= NR * kc);
        debug_assert!(t.rows >= 1 && out.len() >= (t.rows - 1) * t.ld + t.cols);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*ap.add(i * lda + p) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
            }
        }
        let masks = [mask(t.cols.min(16)), mask(t.cols.saturating_sub(16))];
        let bias = t.bias.map(|b| {
            [0, 1].map(|h| _mm512_maskz_loadu_ps(masks[h], b.as_ptr().wrapping_add(16 * h)))
        });
        for (i, acc) in acc.iter().enumerate().take(t.rows) {
            let row = out.as_mut_ptr().add(i * t.ld);
            for h in 0..2 {
                let ptr = row.wrapping_add(16 * h);
                let mut v = acc[h];
                if let Some(bias) = &bias {
                    v = _mm512_add_ps(v, bias[h]);
                }
                if !t.overwrite {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], ptr));
                }
                _mm512_mask_storeu_ps(ptr, masks[h], v);
            }
        }
    }

    /// The first `n` (≤ 16) lanes.
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Σ_k |a_ik·w_jk| in f64, per output: the scale of each output's rounding error.
    fn abs_sums(inp: &[f32], w: &[f32], n: usize, c: usize, oc: usize) -> Vec<f64> {
        let mut s = vec![0.0; n * oc];
        for i in 0..n {
            for j in 0..oc {
                s[i * oc + j] = (0..c)
                    .map(|k| (inp[i * c + k] as f64 * w[j * c + k] as f64).abs())
                    .sum();
            }
        }
        s
    }

    #[test]
    fn bf16_products_match_the_rounded_f32_product_at_every_edge() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Rows across and inside one register block, channels across a panel, C odd and even,
        // across a block of C, and 1.
        for &(n, c, oc) in &[
            (1, 1, 1),
            (13, 3, 33),
            (12, 64, 32),
            (25, 257, 70),
            (50, 300, 31),
            (7, 600, 96),
            (130, 77, 5),
        ] {
            let inp = random(&mut rng, n * c);
            let w = random(&mut rng, oc * c);
            let bias = random(&mut rng, oc);
            let reference =
                matmul_rounded_reference(MatRef::new(&inp, n, c), MatRef::new(&w, oc, c).t());
            let sums = abs_sums(&inp, &w, n, c, oc);
            let paths = if has_bf16_dot() {
                &[true, false][..]
            } else {
                eprintln!("no AVX512-BF16 on this CPU: only the portable path is checked");
                &[false][..]
            };
            for (&hardware, with_bias) in paths.iter().flat_map(|h| [(h, false), (h, true)]) {
                let mut out = vec![f32::NAN; n * oc];
                let b = with_bias.then_some(&bias[..]);
                linear_bf16_on(hardware, &mut out, &inp, &w, b, n, c, oc).unwrap();
                let mut exact = vec![0.0f32; n * oc];
                linear_forward(&mut exact, &inp, &w, b, n, c, oc).unwrap();
                for i in 0..n * oc {
                    let expect = reference[i] + if with_bias { bias[i % oc] } else { 0.0 };
                    let tol = 1e-6 * (sums[i] + 1.0);
                    assert!(
                        (out[i] - expect).abs() as f64 <= tol,
                        "n {n} c {c} oc {oc} bias {with_bias} hardware {hardware}: out[{i}] {} \
                         vs rounded {expect}",
                        out[i]
                    );
                    // Against the f32 product: within the operands' rounding (2⁻⁸ relative each).
                    let tol = 2.0f64.powi(-7) * sums[i] + 1e-6;
                    assert!(
                        (out[i] - exact[i]).abs() as f64 <= tol,
                        "n {n} c {c} oc {oc}: out[{i}] {} vs f32 {}",
                        out[i],
                        exact[i]
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_products_differ_from_f32_by_the_rounding_and_no_more() {
        // Operands that bf16 holds exactly give the f32 product to round-off; operands it does
        // not hold give a visibly different one (so the rounding really happens).
        let (n, c, oc) = (40, 96, 48);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let exact_inp: Vec<f32> = (0..n * c)
            .map(|_| rng.random_range(-8i32..8) as f32 / 4.0)
            .collect();
        let exact_w: Vec<f32> = (0..oc * c)
            .map(|_| rng.random_range(-8i32..8) as f32 / 8.0)
            .collect();
        let mut a = vec![0.0; n * oc];
        let mut b = vec![0.0; n * oc];
        linear_forward_bf16(&mut a, &exact_inp, &exact_w, None, n, c, oc).unwrap();
        linear_forward(&mut b, &exact_inp, &exact_w, None, n, c, oc).unwrap();
        assert_eq!(
            a, b,
            "small multiples of powers of two are exact in bf16 and in the sums"
        );
        let fine: Vec<f32> = exact_inp.iter().map(|x| x + 1.0 / 1024.0).collect();
        linear_forward_bf16(&mut a, &fine, &exact_w, None, n, c, oc).unwrap();
        linear_forward(&mut b, &fine, &exact_w, None, n, c, oc).unwrap();
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
    }

    #[test]
    fn bf16_products_do_not_depend_on_the_thread_count() {
        let (n, c, oc) = (203, 130, 70);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (inp, w) = (random(&mut rng, n * c), random(&mut rng, oc * c));
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0; n * oc];
            pool.install(|| linear_forward_bf16(&mut out, &inp, &w, None, n, c, oc))
                .unwrap();
            out
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bf16_linear_rejects_bad_lengths() {
        let mut out = vec![0.0; 6];
        assert!(linear_forward_bf16(&mut out, &[0.0; 5], &[0.0; 9], None, 2, 3, 3).is_err());
        assert!(
            linear_forward_bf16(&mut out, &[0.0; 6], &[0.0; 9], Some(&[0.0; 2]), 2, 3, 3).is_err()
        );
    }
}
