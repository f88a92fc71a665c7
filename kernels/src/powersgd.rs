//! PowerSGD's helpers (the algorithm itself is `trainer::powersgd`; docs/powersgd.md).
//!
//! Orthonormalisation of the low-rank factor P: Householder QR in f64, after adding a small
//! multiple of the identity (DALL·E App. E.2, step 5). Householder's Q is a product of
//! reflections, so its columns are orthonormal to round-off whatever the input: a zero,
//! rank-deficient or nearly rank-deficient P gives no NaN and no short column (Gram–Schmidt's
//! failure mode, which the paper found unstable).
//!
//! [`PowerSgdOps::orthonormalize_batch`] runs it on a [`Device`] over a batch of matrices in one
//! flat buffer (the CUDA kernel: `kernels/cuda/powersgd.cu`, one block per matrix).

use crate::device::{Cpu, Device};
use crate::error::{KernelError, Result};

/// One matrix of a batch: `s × r`, row-major, at `offset` in the flat buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrthMat {
    pub offset: usize,
    pub s: usize,
    pub r: usize,
}

/// PowerSGD's helpers on a [`Device`].
pub trait PowerSgdOps: Device {
    /// [`orthonormalize`] of every matrix of `mats` in `p`, in place. The matrices must lie
    /// inside `p` without overlapping, with `r ≤ s`; `p` must be finite.
    fn orthonormalize_batch(
        &self,
        p: &mut Self::Buf<f32>,
        mats: &[OrthMat],
        eps: f64,
    ) -> Result<()>;
}

/// Checks a batch: `r ≤ s`, every matrix inside `len` values, no two overlapping, ε finite.
pub(crate) fn check_batch(op: &'static str, len: usize, mats: &[OrthMat], eps: f64) -> Result<()> {
    let bad = |what: String| Err(KernelError::Shape { op, what });
    if !(eps.is_finite() && eps >= 0.0) {
        return bad(format!("epsilon {eps} is not a finite number ≥ 0"));
    }
    let mut spans = Vec::with_capacity(mats.len());
    for (b, m) in mats.iter().enumerate() {
        if m.r > m.s {
            return bad(format!("matrix {b}: rank {} exceeds its {} rows", m.r, m.s));
        }
        let end = m.s.checked_mul(m.r).and_then(|n| n.checked_add(m.offset));
        match end {
            Some(end) if end <= len => spans.push((m.offset, end, b)),
            _ => {
                return bad(format!(
                    "matrix {b} ({}×{} at {}) is not inside the buffer of {len}",
                    m.s, m.r, m.offset
                ))
            }
        }
    }
    spans.retain(|&(start, end, _)| start < end);
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return bad(format!("matrices {} and {} overlap", w[0].2, w[1].2));
    }
    Ok(())
}

impl PowerSgdOps for Cpu {
    fn orthonormalize_batch(&self, p: &mut Vec<f32>, mats: &[OrthMat], eps: f64) -> Result<()> {
        check_batch("orthonormalize_batch", p.len(), mats, eps)?;
        let mut work = Vec::new();
        for m in mats {
            orthonormalize(&mut p[m.offset..][..m.s * m.r], m.s, m.r, eps, &mut work);
        }
        Ok(())
    }
}

/// Replaces the `s × r` row-major matrix `p` (`r ≤ s`) by the Q factor of the thin QR
/// decomposition of `p + ε·‖p‖_F·I_{s×r}`, where `I_{s×r}` holds the `r × r` identity in its top
/// rows and zeros below. The shift is relative to `p`'s Frobenius norm, so the result does not
/// depend on the scale of the gradients (or on the world size, by which the all-reduced P grows).
///
/// `p` must be finite (the caller checks); `work` is scratch, grown as needed.
pub fn orthonormalize(p: &mut [f32], s: usize, r: usize, eps: f64, work: &mut Vec<f64>) {
    assert!(r <= s, "orthonormalize: rank {r} exceeds the {s} rows");
    assert_eq!(p.len(), s * r, "orthonormalize: buffer is not {s}×{r}");
    if r == 0 {
        return;
    }
    work.clear();
    work.resize(2 * s * r + r, 0.0);
    let (a, rest) = work.split_at_mut(s * r);
    let (q, beta) = rest.split_at_mut(s * r);

    // Column-major copy: column j is a[j·s .. (j+1)·s].
    let mut norm2 = 0.0f64;
    for i in 0..s {
        for j in 0..r {
            let x = p[i * r + j] as f64;
            a[j * s + i] = x;
            norm2 += x * x;
        }
    }
    let shift = eps * norm2.sqrt();
    for j in 0..r {
        a[j * s + j] += shift;
    }

    // Householder vectors, stored in place of the columns they annihilate (rows k..s of column k).
    for k in 0..r {
        let (done, todo) = a.split_at_mut((k + 1) * s);
        let v = &mut done[k * s + k..];
        let sigma = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if sigma == 0.0 {
            beta[k] = 0.0; // H_k = I: nothing left to annihilate.
            continue;
        }
        let alpha = if v[0] >= 0.0 { -sigma } else { sigma };
        v[0] -= alpha;
        // ‖v‖² = 2σ(σ + |x₀|) > 0.
        beta[k] = 1.0 / (sigma * (sigma + (v[0] + alpha).abs()));
        for col in todo.chunks_exact_mut(s) {
            reflect(&mut col[k..], v, beta[k]);
        }
    }

    // Q = H_0 · H_1 ⋯ H_{r−1} · I_{s×r}, applied right to left.
    q.fill(0.0);
    for j in 0..r {
        q[j * s + j] = 1.0;
    }
    for k in (0..r).rev() {
        if beta[k] == 0.0 {
            continue;
        }
        let v = &a[k * s + k..(k + 1) * s];
        for col in q.chunks_exact_mut(s) {
            reflect(&mut col[k..], v, beta[k]);
        }
    }

    for i in 0..s {
        for j in 0..r {
            p[i * r + j] = q[j * s + i] as f32;
        }
    }
}

/// y ← (I − β·v·vᵀ)·y.
fn reflect(y: &mut [f64], v: &[f64], beta: f64) {
    let t = beta * v.iter().zip(y.iter()).map(|(a, b)| a * b).sum::<f64>();
    if t != 0.0 {
        y.iter_mut().zip(v).for_each(|(y, v)| *y -= t * v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// max |QᵀQ − I| over the r × r entries, in f64.
    fn orthonormality_error(q: &[f32], s: usize, r: usize) -> f64 {
        let mut worst = 0.0f64;
        for a in 0..r {
            for b in 0..r {
                let dot: f64 = (0..s)
                    .map(|i| q[i * r + a] as f64 * q[i * r + b] as f64)
                    .sum();
                let want = if a == b { 1.0 } else { 0.0 };
                worst = worst.max((dot - want).abs());
            }
        }
        worst
    }

    fn random(s: usize, r: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..s * r).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    #[test]
    fn powersgd_orthonormal_columns_spanning_a_full_rank_input() {
        let (s, r) = (40, 6);
        let p0 = random(s, r, 1);
        let mut q = p0.clone();
        let mut work = Vec::new();
        orthonormalize(&mut q, s, r, 0.0, &mut work);
        assert!(orthonormality_error(&q, s, r) < 1e-6);
        // span(Q) = span(P): the projection Q·Qᵀ·P gives P back.
        for j in 0..r {
            for i in 0..s {
                let proj: f64 = (0..r)
                    .map(|k| {
                        let qk_dot_p: f64 = (0..s)
                            .map(|t| q[t * r + k] as f64 * p0[t * r + j] as f64)
                            .sum();
                        q[i * r + k] as f64 * qk_dot_p
                    })
                    .sum();
                assert!((proj - p0[i * r + j] as f64).abs() < 1e-5, "({i},{j})");
            }
        }
    }

    #[test]
    fn powersgd_orthonormal_columns_for_rank_deficient_input() {
        let (s, r) = (30, 5);
        let mut work = Vec::new();
        // Zero; rank one; two equal columns; one tiny column; a square matrix.
        let zero = vec![0.0f32; s * r];
        let u = random(s, 1, 2);
        let rank1: Vec<f32> = (0..s * r).map(|k| u[k / r] * (k % r + 1) as f32).collect();
        let mut dup = random(s, r, 3);
        for i in 0..s {
            dup[i * r + 1] = dup[i * r];
        }
        let mut tiny = random(s, r, 4);
        for i in 0..s {
            tiny[i * r + 2] *= 1e-30;
        }
        for (name, input, eps) in [
            ("zero", zero.clone(), 1e-6),
            ("zero without eps", zero, 0.0),
            ("rank one", rank1.clone(), 1e-6),
            ("rank one without eps", rank1, 0.0),
            ("duplicate columns", dup, 1e-6),
            ("tiny column", tiny, 1e-6),
        ] {
            let mut q = input;
            orthonormalize(&mut q, s, r, eps, &mut work);
            assert!(q.iter().all(|x| x.is_finite()), "{name}: non-finite output");
            let err = orthonormality_error(&q, s, r);
            assert!(err < 1e-6, "{name}: |QᵀQ − I| = {err}");
        }
        let mut square = random(r, r, 5);
        orthonormalize(&mut square, r, r, 1e-6, &mut work);
        assert!(orthonormality_error(&square, r, r) < 1e-6);
    }
}
