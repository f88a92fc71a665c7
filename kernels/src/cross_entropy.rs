//! Fused softmax + cross-entropy over one vocabulary segment.
//!
//! For each of N rows of logits [N, V] with target `targets[i]`:
//! `loss[i] = logsumexp(logits[i]) − logits[i, target]`. The fused backward overwrites the logits
//! in place with `dlogits = scale · (softmax(logits[i]) − onehot(target))`, so no probability
//! tensor is ever kept beside the logits (llm.c's fused classifier). `scale` carries the loss
//! weighting (for the transformer: 1/8 over the text rows' count, 7/8 over the image rows').

use crate::device::{Cpu, Device};
use crate::error::{check_len, KernelError, Result};
use crate::simd::{fast_exp, max8, Isa};
use rayon::prelude::*;

/// Fused softmax cross-entropy on a [`Device`] (the CUDA kernels: `kernels/cuda/cross_entropy.cu`),
/// one vocabulary segment per call: logits [N, V], losses [N], targets [N].
pub trait CrossEntropyOps: Device {
    /// [`cross_entropy_fused`]: per-row losses, and the logits overwritten in place by
    /// `scale · (softmax − onehot(target))`.
    fn cross_entropy_fused(
        &self,
        logits: &mut Self::Buf<f32>,
        losses: &mut Self::Buf<f32>,
        targets: &Self::Buf<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()>;

    /// [`cross_entropy_forward`]: per-row losses only.
    fn cross_entropy_forward(
        &self,
        losses: &mut Self::Buf<f32>,
        logits: &Self::Buf<f32>,
        targets: &Self::Buf<u32>,
        n: usize,
        v: usize,
    ) -> Result<()>;
}

impl CrossEntropyOps for Cpu {
    fn cross_entropy_fused(
        &self,
        logits: &mut Vec<f32>,
        losses: &mut Vec<f32>,
        targets: &Vec<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        cross_entropy_fused(logits, losses, targets, scale, n, v)
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<u32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        cross_entropy_forward(losses, logits, targets, n, v)
    }
}

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 8;

fn check(
    op: &'static str,
    logits: usize,
    losses: usize,
    targets: &[u32],
    n: usize,
    v: usize,
) -> Result<()> {
    check_len(op, "logits", logits, n * v)?;
    check_len(op, "losses", losses, n)?;
    check_len(op, "targets", targets.len(), n)?;
    if let Some(i) = targets.iter().position(|&t| t as usize >= v) {
        return Err(KernelError::Shape {
            op,
            what: format!(
                "target {} of row {i} is outside the vocabulary [0, {v})",
                targets[i]
            ),
        });
    }
    Ok(())
}

/// Row maximum and Σ exp(x − max), accumulated in f64.
fn max_and_sum(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (max, sum)
}

/// Per-row losses only (evaluation; logits untouched).
pub fn cross_entropy_forward(
    losses: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    n: usize,
    v: usize,
) -> Result<()> {
    check(
        "cross_entropy_forward",
        logits.len(),
        losses.len(),
        targets,
        n,
        v,
    )?;
    if v == 0 {
        return Ok(());
    }
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((loss, row), &t)| {
            let (max, sum) = max_and_sum(row);
            *loss = (max as f64 + sum.ln() - row[t as usize] as f64) as f32;
        });
    Ok(())
}

/// Per-row losses, and the logits overwritten with `scale · (softmax − onehot(target))`.
pub fn cross_entropy_fused(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    scale: f32,
    n: usize,
    v: usize,
) -> Result<()> {
    check(
        "cross_entropy_fused",
        logits.len(),
        losses.len(),
        targets,
        n,
        v,
    )?;
    if v == 0 {
        return Ok(());
    }
    let isa = Isa::best();
    logits
        .par_chunks_mut(v)
        .zip(losses.par_iter_mut())
        .zip(targets.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((row, loss), &t)| {
            *loss = match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::best` only returns instruction sets this CPU has.
                Isa::Avx2 | Isa::Avx512 => unsafe { fused_row_fma(row, t as usize, scale) },
                _ => fused_row::<false>(row, t as usize, scale),
            }
        });
    Ok(())
}

/// One row of the fused loss: the exponentials are written over the logits (vectorised
/// [`fast_exp`]), summed in f64, then scaled into the gradient. Returns the row's loss.
#[inline(always)]
fn fused_row<const FMA: bool>(row: &mut [f32], t: usize, scale: f32) -> f32 {
    let max = max8(row);
    let target_logit = row[t];
    for x in row.iter_mut() {
        *x = fast_exp::<FMA>(*x - max);
    }
    let sum: f64 = row.iter().map(|&e| e as f64).sum();
    let inv = (scale as f64 / sum) as f32;
    for x in row.iter_mut() {
        *x *= inv;
    }
    row[t] -= scale;
    (max as f64 + sum.ln() - target_logit as f64) as f32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fused_row_fma(row: &mut [f32], t: usize, scale: f32) -> f32 {
    fused_row::<true>(row, t, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, numeric_grad, rand_vec};

    #[test]
    fn loss_matches_definition_and_gradient_matches_finite_differences() {
        let (n, v) = (5, 13);
        let mut logits = rand_vec(n * v, 4.0, 1);
        let targets = [0u32, 12, 3, 3, 7];
        let scale = 0.3;
        let mut losses = vec![0.0; n];
        cross_entropy_forward(&mut losses, &logits, &targets, n, v).unwrap();
        for i in 0..n {
            let row = &logits[i * v..][..v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let want = lse - row[targets[i] as usize] as f64;
            assert!((losses[i] as f64 - want).abs() < 1e-5);
        }
        let total = |l: &[f32]| {
            let mut out = vec![0.0; n];
            cross_entropy_forward(&mut out, l, &targets, n, v).unwrap();
            out.iter().map(|&x| scale as f64 * x as f64).sum::<f64>()
        };
        let mut d = logits.clone();
        let mut losses2 = vec![0.0; n];
        cross_entropy_fused(&mut d, &mut losses2, &targets, scale, n, v).unwrap();
        for (a, b) in losses.iter().zip(&losses2) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "{a} vs {b}");
        }
        let mut generic = logits.clone();
        let mut l3 = vec![0.0; n];
        for (i, row) in generic.chunks_mut(v).enumerate() {
            l3[i] = fused_row::<false>(row, targets[i] as usize, scale);
        }
        let (g, f): (Vec<f64>, Vec<f64>) = (
            generic.iter().map(|&x| x as f64).collect(),
            d.iter().map(|&x| x as f64).collect(),
        );
        assert_close("generic vs dispatched path", &g, &f, 1e-7, 1e-5);
        let num: Vec<f64> = (0..n * v)
            .map(|i| numeric_grad(&mut logits, i, 1e-2, total))
            .collect();
        let got: Vec<f64> = d.iter().map(|&x| x as f64).collect();
        assert_close("dlogits", &got, &num, 1e-4, 1e-3);
    }

    #[test]
    fn large_logits_do_not_overflow_and_bad_targets_are_errors() {
        let mut logits = vec![1000.0, 0.0, -1000.0];
        let mut loss = [0.0];
        cross_entropy_fused(&mut logits, &mut loss, &[0], 1.0, 1, 3).unwrap();
        assert!(loss[0].abs() < 1e-6 && logits.iter().all(|x| x.is_finite()));
        assert!(cross_entropy_fused(&mut logits, &mut loss, &[3], 1.0, 1, 3).is_err());
    }
}
