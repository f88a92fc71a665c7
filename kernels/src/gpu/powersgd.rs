//! Launcher of `kernels/cuda/powersgd.cu`: PowerSGD's orthonormalisation of a batch of P
//! matrices, for [`Gpu`] over either runtime.

use super::{Args, Gpu, LaunchCfg, Runtime};
use crate::error::{KernelError, Result};
use crate::powersgd::{check_batch, OrthMat, PowerSgdOps};

/// Threads per block (one block per matrix; `PS_THREADS` in the source).
const THREADS: u32 = 256;
const K: &str = "powersgd_orthonormalize_f32";

/// `v` as a u32 of the kernel's table, or an error naming what overflowed.
fn as_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| KernelError::Shape {
        op: K,
        what: format!("{what} {v} exceeds the kernel's 32-bit offsets"),
    })
}

impl<R: Runtime> PowerSgdOps for Gpu<R> {
    fn orthonormalize_batch(&self, p: &mut R::Buf<f32>, mats: &[OrthMat], eps: f64) -> Result<()> {
        let rt = &self.0;
        check_batch(K, rt.len(p), mats, eps)?;
        // (offset in p, s, r, offset in the scratch) per non-empty matrix; the scratch holds
        // 2·s·r + r f64 per matrix.
        let mut meta = Vec::with_capacity(4 * mats.len());
        let mut ws_len = 0usize;
        for m in mats.iter().filter(|m| m.r > 0) {
            meta.extend([
                as_u32("offset", m.offset)?,
                as_u32("rows", m.s)?,
                as_u32("rank", m.r)?,
                as_u32("scratch offset", ws_len)?,
            ]);
            ws_len += 2 * m.s * m.r + m.r;
        }
        let count = meta.len() / 4;
        if count == 0 {
            return Ok(());
        }
        let meta = rt.upload(&meta)?;
        let mut ws = rt.zeros::<f64>(ws_len)?;
        let args = Args::new()
            .ptr(rt.addr_mut(p))
            .ptr(rt.addr_mut(&mut ws))
            .ptr(rt.addr(&meta))
            .f64(eps);
        // SAFETY: the arguments are the kernel's; one block per row of `meta`, whose matrices
        // lie inside p (checked) and whose scratch lies inside ws (its length is their sum).
        unsafe {
            rt.launch(
                K,
                LaunchCfg::linear(as_u32("matrix count", count)?, THREADS),
                &args,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Cpu, Device};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;

    /// max |QᵀQ − I| of the s × r matrix at `offset`, in f64.
    fn orthonormality_error(p: &[f32], m: OrthMat) -> f64 {
        let q = &p[m.offset..][..m.s * m.r];
        let mut worst = 0.0f64;
        for a in 0..m.r {
            for b in 0..m.r {
                let dot: f64 = (0..m.s)
                    .map(|i| q[i * m.r + a] as f64 * q[i * m.r + b] as f64)
                    .sum();
                worst = worst.max((dot - if a == b { 1.0 } else { 0.0 }).abs());
            }
        }
        worst
    }

    /// A batch laid out with gaps between the matrices (which must stay untouched).
    fn batch(shapes: &[(usize, usize)]) -> Vec<OrthMat> {
        let mut at = 3;
        shapes
            .iter()
            .map(|&(s, r)| {
                let m = OrthMat { offset: at, s, r };
                at += s * r + 5;
                m
            })
            .collect()
    }

    fn end(mats: &[OrthMat]) -> usize {
        mats.iter().map(|m| m.offset + m.s * m.r).max().unwrap_or(0) + 5
    }

    #[test]
    fn emulated_kernel_matches_the_cpu_reference() {
        // Odd rows (partial warps), more rows than the block's 256 threads, a square matrix, one
        // column, more columns than the block's 8 warps (a warp owns several), an empty one.
        let mats = batch(&[(40, 6), (300, 3), (5, 5), (33, 1), (70, 12), (4, 0), (9, 9)]);
        let mut p0 = rand_vec(end(&mats), 2.0, 70);
        // ε: none, the trainer's default, and one large enough that the shift shows.
        // A nearly rank-deficient matrix: column 1 of the first a copy of column 0 plus 1e-6.
        for i in 0..40 {
            p0[mats[0].offset + i * 6 + 1] = p0[mats[0].offset + i * 6] + 1e-6;
        }
        for eps in [0.0, 1e-6, 0.05] {
            let mut want = p0.clone();
            Cpu.orthonormalize_batch(&mut want, &mats, eps).unwrap();
            crate::gpu::for_each_gpu!(s, dev, {
                let mut got = dev.upload(&p0).unwrap();
                dev.orthonormalize_batch(&mut got, &mats, eps).unwrap();
                let got = dev.download(&got).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Entries of orthonormal columns, |q| ≤ 1: the two f64 computations differ
                    // by f64 round-off (sums in another order), the f32 results by an ulp or so.
                    assert!(
                        (g - w).abs() <= 1e-6,
                        "eps={eps} {s:?} [{i}]: got {g}, reference {w}"
                    );
                }
                for m in &mats {
                    assert!(
                        orthonormality_error(&got, *m) < 1e-6,
                        "{m:?} eps={eps} {s:?}"
                    );
                }
            });
        }
    }

    #[test]
    fn rank_deficient_inputs_give_orthonormal_columns() {
        // Without ε, the columns past the rank come from round-off, which differs between the
        // devices: orthonormality is what must hold, and the zero matrix gives exactly I.
        let mats = batch(&[(30, 5), (30, 5), (17, 4)]);
        let mut p0 = vec![0.0f32; end(&mats)];
        let u = rand_vec(30, 1.0, 71);
        for i in 0..30 {
            for j in 0..5 {
                p0[mats[1].offset + i * 5 + j] = u[i] * (j + 1) as f32;
            }
        }
        for eps in [0.0, 1e-6] {
            let mut want = p0.clone();
            Cpu.orthonormalize_batch(&mut want, &mats, eps).unwrap();
            crate::gpu::for_each_gpu!(s, dev, {
                let mut got = dev.upload(&p0).unwrap();
                dev.orthonormalize_batch(&mut got, &mats, eps).unwrap();
                let got = dev.download(&got).unwrap();
                assert!(got.iter().all(|x| x.is_finite()), "eps={eps} {s:?}");
                for m in &mats {
                    let err = orthonormality_error(&got, *m);
                    assert!(err < 1e-6, "{m:?} eps={eps} {s:?}: |QᵀQ − I| = {err}");
                }
                let zero = mats[0];
                let range = zero.offset..zero.offset + zero.s * zero.r;
                assert_eq!(
                    got[range.clone()],
                    want[range],
                    "zero matrix eps={eps} {s:?}"
                );
            });
        }
    }

    #[test]
    fn bad_batches_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let mut p = vec![1.0f32; 20];
        let m = |offset, s, r| OrthMat { offset, s, r };
        for (mats, eps, want) in [
            (vec![m(0, 2, 3)], 0.0, "rank 3 exceeds its 2 rows"),
            (vec![m(0, 4, 2), m(10, 3, 4)], 0.0, "rank 4"),
            (vec![m(15, 3, 2)], 0.0, "matrix 0 (3×2 at 15) is not inside"),
            (
                vec![m(0, 4, 2), m(7, 4, 1)],
                0.0,
                "matrices 0 and 1 overlap",
            ),
            (vec![m(0, 4, 2)], f64::NAN, "epsilon NaN"),
        ] {
            let err = dev
                .orthonormalize_batch(&mut p, &mats, eps)
                .unwrap_err()
                .to_string();
            assert!(err.contains(K) && err.contains(want), "{err}");
        }
        assert_eq!(p, [1.0; 20]);
    }
}
