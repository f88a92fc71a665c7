//! The dVAE's loss pieces (docs/model.md §2), apart from the model: the Gumbel-softmax relaxation
//! of the encoder's logits, the negative log-likelihood of the pixels under the decoder's
//! statistics ([`Likelihood`]: the paper's logit-Laplace, or a unit Gaussian in logit space) and
//! the KL divergence of the codes from the uniform prior, with their gradients. The arithmetic is the trainer's (`trainer::model::dvae`),
//! the readable reference of the CUDA kernels in `kernels/cuda/dvae.cu`.
//!
//! Shapes: `logits`, `noise`, `y`, `dy`, `dlogits` [B, K, hw] (hw grid positions; the softmax
//! runs over K at each (image, position)); `images` [B, 3, px] in [0, 1]; `stats`, `dstats`
//! [B, 6, px] (μ for the three channels, then ln b). Gradients are overwritten (`=`), except the
//! KL term's, which is added to the relaxation's.

use serde::{Deserialize, Serialize};

use crate::device::{Cpu, Device};
use crate::error::{check_len, KernelError, Result};

/// Pixel squashing of the logit-Laplace likelihood: x' = (1 − 2ε)·x + ε.
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// The pixels' distribution given the decoder's statistics (docs/model.md §2, "Training loss").
/// Both read μ in logit space of the squashed pixel x'; only the Laplace reads ln b.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Likelihood {
    /// The paper's: a Laplace of mean μ and scale b in logit space. Its gradient in μ is
    /// ±1/b whatever the error, and b is learnt per pixel.
    #[default]
    LogitLaplace,
    /// A Gaussian of mean μ and unit variance in logit space (an L2 loss on μ; ln b unused, its
    /// gradient zero). Small dVAEs trained briefly learn with it where the Laplace stalls
    /// (docs/dvae-training.md).
    LogitGaussian,
}

/// Which KL term pulls the codes towards the uniform prior (`relaxation.kl`; docs/model.md §2).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KlTerm {
    /// The paper's: Σ over positions of KL(q ‖ uniform) ([`kl_uniform`]): every position's code
    /// distribution is pulled towards uniform.
    #[default]
    Position,
    /// N·KL(q̄ ‖ uniform), q̄ the average of q over the N positions of the micro-batch
    /// ([`kl_batch`]): the codebook's use is pulled towards uniform while each position may be
    /// sure of its code.
    Batch,
}

/// The dVAE's loss pieces on a [`Device`] (the CUDA kernels: `kernels/cuda/dvae.cu`), f32
/// buffers (logits and decoder statistics stay f32).
pub trait DvaeLossOps: Device {
    /// `y` = softmax over K of (`logits` + `noise`)/τ ([`gumbel_softmax_forward`]).
    #[allow(clippy::too_many_arguments)]
    fn gumbel_softmax_forward(
        &self,
        y: &mut Self::Buf<f32>,
        logits: &Self::Buf<f32>,
        noise: Option<&Self::Buf<f32>>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()>;
    /// `dlogits` (overwritten) = y·(dy − Σ_K y·dy)/τ ([`gumbel_softmax_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn gumbel_softmax_backward(
        &self,
        dlogits: &mut Self::Buf<f32>,
        y: &Self::Buf<f32>,
        dy: &Self::Buf<f32>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()>;
    /// Σ of the negative log-likelihood ([`nll`]; waits for the device), and, when `dstats` is
    /// given, its gradient times `scale` there ([`nll_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn nll(
        &self,
        kind: Likelihood,
        dstats: Option<&mut Self::Buf<f32>>,
        stats: &Self::Buf<f32>,
        images: &Self::Buf<f32>,
        scale: f32,
        batch: usize,
        px: usize,
    ) -> Result<f64>;
    /// Σ over positions of KL(softmax(logits) ‖ uniform) ([`kl_uniform`]; waits for the device),
    /// and, when `dlogits` is given, `dlogits += coef ·` its gradient ([`kl_uniform_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn kl_uniform(
        &self,
        dlogits: Option<&mut Self::Buf<f32>>,
        logits: &Self::Buf<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<f64>;
    /// N·KL(q̄ ‖ uniform) over the N = B·hw positions ([`kl_batch`] of
    /// [`batch_code_distribution`]; waits for the device) and q̄, and, when `dlogits` is given,
    /// `dlogits += coef ·` its gradient ([`kl_batch_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn kl_batch(
        &self,
        dlogits: Option<&mut Self::Buf<f32>>,
        logits: &Self::Buf<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<(f64, Vec<f64>)>;
}

impl DvaeLossOps for Cpu {
    fn gumbel_softmax_forward(
        &self,
        y: &mut Vec<f32>,
        logits: &Vec<f32>,
        noise: Option<&Vec<f32>>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()> {
        gumbel_softmax_forward(y, logits, noise.map(|g| &g[..]), tau, batch, k, hw)
    }
    fn gumbel_softmax_backward(
        &self,
        dlogits: &mut Vec<f32>,
        y: &Vec<f32>,
        dy: &Vec<f32>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()> {
        gumbel_softmax_backward(dlogits, y, dy, tau, batch, k, hw)
    }
    fn nll(
        &self,
        kind: Likelihood,
        dstats: Option<&mut Vec<f32>>,
        stats: &Vec<f32>,
        images: &Vec<f32>,
        scale: f32,
        batch: usize,
        px: usize,
    ) -> Result<f64> {
        let total = nll(kind, stats, images, batch, px)?;
        if let Some(d) = dstats {
            nll_backward(kind, d, stats, images, scale as f64, batch, px)?;
        }
        Ok(total)
    }
    fn kl_uniform(
        &self,
        dlogits: Option<&mut Vec<f32>>,
        logits: &Vec<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<f64> {
        let kl = kl_uniform(logits, batch, k, hw)?;
        if let Some(d) = dlogits {
            kl_uniform_backward(d, logits, coef, batch, k, hw)?;
        }
        Ok(kl)
    }
    fn kl_batch(
        &self,
        dlogits: Option<&mut Vec<f32>>,
        logits: &Vec<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<(f64, Vec<f64>)> {
        let q_bar = batch_code_distribution(logits, batch, k, hw)?;
        if let Some(d) = dlogits {
            kl_batch_backward(d, logits, &q_bar, coef as f64, batch, k, hw)?;
        }
        Ok((kl_batch(&q_bar, batch * hw), q_bar))
    }
}

/// The weights of the batch KL's gradient: ln(K·q̄) per code, 0 for a code no position uses (its
/// q is 0 everywhere, so its term is 0 whatever the weight).
pub fn kl_batch_weights(q_bar: &[f64]) -> Vec<f64> {
    let k = q_bar.len() as f64;
    (q_bar.iter())
        .map(|&q| if q > 0.0 { (k * q).ln() } else { 0.0 })
        .collect()
}

/// τ must be a positive number.
pub(crate) fn check_tau(op: &'static str, tau: f32) -> Result<()> {
    if tau.is_nan() || tau <= 0.0 {
        return Err(KernelError::Shape {
            op,
            what: format!("tau = {tau} must be > 0"),
        });
    }
    Ok(())
}

/// `y` [B, K, hw] = softmax over K of (`logits` + `noise`)/τ at every (image, position); no noise
/// when `noise` is `None`. The exponentials and their sum in f64, as the trainer computes them.
pub fn gumbel_softmax_forward(
    y: &mut [f32],
    logits: &[f32],
    noise: Option<&[f32]>,
    tau: f32,
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<()> {
    const OP: &str = "gumbel_softmax_forward";
    check_tau(OP, tau)?;
    check_len(OP, "logits", logits.len(), batch * k * hw)?;
    check_len(OP, "y", y.len(), batch * k * hw)?;
    if let Some(g) = noise {
        check_len(OP, "noise", g.len(), batch * k * hw)?;
    }
    for bi in 0..batch {
        for pos in 0..hw {
            let at = |c: usize| (bi * k + c) * hw + pos;
            let s = |c: usize| (logits[at(c)] + noise.map_or(0.0, |g| g[at(c)])) / tau;
            let max = (0..k).map(s).fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0.0f64;
            for c in 0..k {
                let e = ((s(c) - max) as f64).exp();
                y[at(c)] = e as f32;
                z += e;
            }
            for c in 0..k {
                y[at(c)] = (y[at(c)] as f64 / z) as f32;
            }
        }
    }
    Ok(())
}

/// `dlogits` [B, K, hw] (overwritten) = y·(dy − Σ_K y·dy)/τ: the gradient through
/// [`gumbel_softmax_forward`] given its output `y` and the gradient `dy` of `y`, in f64.
pub fn gumbel_softmax_backward(
    dlogits: &mut [f32],
    y: &[f32],
    dy: &[f32],
    tau: f32,
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<()> {
    relaxation_backward(dlogits, y, dy, None, tau, batch, k, hw)
}

/// `dlogits` [B, K, hw] (overwritten) = y·(dy − Σ_K y·dy)/τ, plus, with `kl = Some((logits,
/// coef))`, coef · q·(log q − Σ_K q·log q) (the KL term's gradient, q = softmax of `logits`):
/// summed in f64 and rounded once. The trainer's dVAE backward pass is this function.
#[allow(clippy::too_many_arguments)]
pub fn relaxation_backward(
    dlogits: &mut [f32],
    y: &[f32],
    dy: &[f32],
    kl: Option<(&[f32], f64)>,
    tau: f32,
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<()> {
    const OP: &str = "gumbel_softmax_backward";
    check_tau(OP, tau)?;
    for (name, len) in [("dlogits", dlogits.len()), ("y", y.len()), ("dy", dy.len())] {
        check_len(OP, name, len, batch * k * hw)?;
    }
    if let Some((logits, _)) = kl {
        check_len(OP, "logits", logits.len(), batch * k * hw)?;
    }
    let (mut lq, mut q) = (vec![0.0f64; k], vec![0.0f64; k]);
    for bi in 0..batch {
        for pos in 0..hw {
            let at = |c: usize| (bi * k + c) * hw + pos;
            let ydy: f64 = (0..k).map(|c| y[at(c)] as f64 * dy[at(c)] as f64).sum();
            let neg_entropy = match kl {
                Some((logits, _)) => log_q(logits, k, hw, bi, pos, &mut lq, &mut q),
                None => 0.0,
            };
            for c in 0..k {
                let relax = y[at(c)] as f64 * (dy[at(c)] as f64 - ydy) / tau as f64;
                dlogits[at(c)] = match kl {
                    Some((_, coef)) => (relax + coef * (q[c] * (lq[c] - neg_entropy))) as f32,
                    None => relax as f32,
                };
            }
        }
    }
    Ok(())
}

/// log q = log_softmax over K of the logits at (`bi`, `pos`) into `lq`, q into `q`; returns
/// Σ_K q·log q (the negative entropy), in f64 (the trainer's dVAE loss uses this function).
pub fn log_q(
    logits: &[f32],
    k: usize,
    hw: usize,
    bi: usize,
    pos: usize,
    lq: &mut [f64],
    q: &mut [f64],
) -> f64 {
    let l = |c: usize| logits[(bi * k + c) * hw + pos] as f64;
    let max = (0..k).map(l).fold(f64::NEG_INFINITY, f64::max);
    let mut z = 0.0;
    for (c, e) in q.iter_mut().enumerate() {
        *e = (l(c) - max).exp();
        z += *e;
    }
    let lz = z.ln();
    let mut neg_entropy = 0.0;
    for (c, (out, q)) in lq.iter_mut().zip(q.iter_mut()).enumerate() {
        *out = l(c) - max - lz;
        *q /= z;
        neg_entropy += *q * *out;
    }
    neg_entropy
}

/// Σ over images and positions of Σ_K q·log q + log K, q = softmax over K of `logits`
/// [B, K, hw]: the KL divergence from the uniform prior, in f64.
pub fn kl_uniform(logits: &[f32], batch: usize, k: usize, hw: usize) -> Result<f64> {
    check_len("kl_uniform", "logits", logits.len(), batch * k * hw)?;
    let (mut lq, mut q) = (vec![0.0f64; k], vec![0.0f64; k]);
    let mut total = 0.0;
    for bi in 0..batch {
        for pos in 0..hw {
            total += log_q(logits, k, hw, bi, pos, &mut lq, &mut q) + (k as f64).ln();
        }
    }
    Ok(total)
}

/// `dlogits` [B, K, hw] += `coef` · d[`kl_uniform`]/d logits = coef · q·(log q − Σ_K q·log q)
/// (accumulated: the second term of the logits' gradient, after the relaxation's), in f64.
pub fn kl_uniform_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    coef: f32,
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<()> {
    const OP: &str = "kl_uniform_backward";
    check_len(OP, "logits", logits.len(), batch * k * hw)?;
    check_len(OP, "dlogits", dlogits.len(), batch * k * hw)?;
    let (mut lq, mut q) = (vec![0.0f64; k], vec![0.0f64; k]);
    for bi in 0..batch {
        for pos in 0..hw {
            let neg_entropy = log_q(logits, k, hw, bi, pos, &mut lq, &mut q);
            for c in 0..k {
                let d = &mut dlogits[(bi * k + c) * hw + pos];
                *d = (*d as f64 + coef as f64 * q[c] * (lq[c] - neg_entropy)) as f32;
            }
        }
    }
    Ok(())
}

/// q̄ [K]: the average over the B·hw positions of q = softmax over K of `logits` [B, K, hw], in
/// f64 (summed image by image, position by position).
pub fn batch_code_distribution(
    logits: &[f32],
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<Vec<f64>> {
    check_len(
        "batch_code_distribution",
        "logits",
        logits.len(),
        batch * k * hw,
    )?;
    let (mut lq, mut q) = (vec![0.0f64; k], vec![0.0f64; k]);
    let mut q_bar = vec![0.0f64; k];
    for bi in 0..batch {
        for pos in 0..hw {
            log_q(logits, k, hw, bi, pos, &mut lq, &mut q);
            for (s, q) in q_bar.iter_mut().zip(&q) {
                *s += q;
            }
        }
    }
    let n = (batch * hw).max(1) as f64;
    q_bar.iter_mut().for_each(|s| *s /= n);
    Ok(q_bar)
}

/// N·Σ_K q̄·ln(K·q̄): N = `positions` times the KL divergence of the average code distribution
/// `q_bar` ([`batch_code_distribution`]) from the uniform prior (a code with q̄ = 0 adds 0).
pub fn kl_batch(q_bar: &[f64], positions: usize) -> f64 {
    let k = q_bar.len() as f64;
    let kl: f64 = (q_bar.iter())
        .filter(|&&q| q > 0.0)
        .map(|&q| q * (k * q).ln())
        .sum();
    positions as f64 * kl
}

/// `dlogits` [B, K, hw] += `coef` · d[`kl_batch`]/d logits, in f64, with `q_bar` the average code
/// distribution of the whole micro-batch (these B images may be a slice of it: the gradient at a
/// position depends only on its own logits and q̄). d kl_batch / d q = ln(K·q̄) + 1 at every
/// position, so through the softmax: q·(c − Σ_K q·c) with c = ln(K·q̄) (the 1 cancels).
pub fn kl_batch_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    q_bar: &[f64],
    coef: f64,
    batch: usize,
    k: usize,
    hw: usize,
) -> Result<()> {
    const OP: &str = "kl_batch_backward";
    check_len(OP, "logits", logits.len(), batch * k * hw)?;
    check_len(OP, "dlogits", dlogits.len(), batch * k * hw)?;
    check_len(OP, "q_bar", q_bar.len(), k)?;
    let c = kl_batch_weights(q_bar);
    let (mut lq, mut q) = (vec![0.0f64; k], vec![0.0f64; k]);
    for bi in 0..batch {
        for pos in 0..hw {
            log_q(logits, k, hw, bi, pos, &mut lq, &mut q);
            let mean_c: f64 = q.iter().zip(&c).map(|(q, c)| q * c).sum();
            for ch in 0..k {
                let d = &mut dlogits[(bi * k + ch) * hw + pos];
                *d = (*d as f64 + coef * q[ch] * (c[ch] - mean_c)) as f32;
            }
        }
    }
    Ok(())
}

/// x' = (1 − 2ε)·x + ε in f64.
pub fn squash(x: f32) -> f64 {
    (1.0 - 2.0 * LOGIT_LAPLACE_EPS) * x as f64 + LOGIT_LAPLACE_EPS
}

fn check_laplace(
    op: &'static str,
    stats: usize,
    images: usize,
    batch: usize,
    px: usize,
) -> Result<()> {
    check_len(op, "stats", stats, batch * 6 * px)?;
    check_len(op, "images", images, batch * 3 * px)
}

/// ½·ln(2π), the unit Gaussian's normalising term.
const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

/// One sub-pixel's negative log-likelihood under `kind` and its derivatives in μ and ln b, in
/// f64, for the pixel `x` in [0, 1] and the decoder's μ and ln b:
/// - logit-Laplace: ln(2b) + ln(x'(1−x')) + |t − μ|/b, d/dμ = −sign(t − μ)/b,
///   d/d ln b = 1 − |t − μ|/b;
/// - logit-Gaussian: ½(t − μ)² + ½·ln(2π) + ln(x'(1−x')), d/dμ = −(t − μ), d/d ln b = 0;
///
/// with x' the squashed pixel and t = logit(x') (ln(x'(1−x')) is the logit's Jacobian: both are
/// densities of x').
fn pixel_nll(kind: Likelihood, x: f32, mu: f32, ln_b: f32) -> (f64, f64, f64) {
    let x = squash(x);
    let r = (x / (1.0 - x)).ln() - mu as f64;
    let jacobian = (x * (1.0 - x)).ln();
    match kind {
        Likelihood::LogitLaplace => {
            let lb = ln_b as f64;
            let inv_b = (-lb).exp();
            let nll = std::f64::consts::LN_2 + lb + jacobian + r.abs() * inv_b;
            (nll, -r.signum() * inv_b, 1.0 - r.abs() * inv_b)
        }
        Likelihood::LogitGaussian => (0.5 * r * r + HALF_LN_2PI + jacobian, -r, 0.0),
    }
}

/// The (μ, ln b) indices in `stats` [B, 6, px] of every sub-pixel, with its index in `images`
/// [B, 3, px].
fn sub_pixels(batch: usize, px: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..batch).flat_map(move |bi| {
        (0..3).flat_map(move |ch| {
            (0..px).map(move |i| {
                let mu = (bi * 6 + ch) * px + i;
                ((bi * 3 + ch) * px + i, mu, mu + 3 * px)
            })
        })
    })
}

/// Σ over images, channels and pixels of the negative log-likelihood of `kind` ([`pixel_nll`]),
/// with μ and ln b from `stats` [B, 6, px] and the pixels `images` [B, 3, px], in f64.
pub fn nll(
    kind: Likelihood,
    stats: &[f32],
    images: &[f32],
    batch: usize,
    px: usize,
) -> Result<f64> {
    check_laplace("nll", stats.len(), images.len(), batch, px)?;
    Ok(sub_pixels(batch, px)
        .map(|(x, mu, lnb)| pixel_nll(kind, images[x], stats[mu], stats[lnb]).0)
        .sum())
}

/// `dstats` [B, 6, px] (overwritten) = `scale` · d[`nll`]/d stats, in f64 and rounded once.
pub fn nll_backward(
    kind: Likelihood,
    dstats: &mut [f32],
    stats: &[f32],
    images: &[f32],
    scale: f64,
    batch: usize,
    px: usize,
) -> Result<()> {
    const OP: &str = "nll_backward";
    check_laplace(OP, stats.len(), images.len(), batch, px)?;
    check_len(OP, "dstats", dstats.len(), batch * 6 * px)?;
    for (x, mu, lnb) in sub_pixels(batch, px) {
        let (_, dmu, dlnb) = pixel_nll(kind, images[x], stats[mu], stats[lnb]);
        dstats[mu] = (scale * dmu) as f32;
        dstats[lnb] = (scale * dlnb) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, numeric_grad, rand_vec};

    #[test]
    fn softmax_rows_sum_to_one_and_gradients_match_finite_differences() {
        let (batch, k, hw, tau) = (2, 5, 3, 0.5);
        let mut logits = rand_vec(batch * k * hw, 2.0, 1);
        let noise = rand_vec(batch * k * hw, 1.0, 2);
        let mut y = vec![0.0; logits.len()];
        gumbel_softmax_forward(&mut y, &logits, Some(&noise), tau, batch, k, hw).unwrap();
        for bi in 0..batch {
            for pos in 0..hw {
                let s: f32 = (0..k).map(|c| y[(bi * k + c) * hw + pos]).sum();
                assert!((s - 1.0).abs() < 1e-6, "Σ y = {s}");
            }
        }
        let wy = rand_vec(y.len(), 1.0, 3);
        let mut dl = vec![f32::NAN; y.len()];
        gumbel_softmax_backward(&mut dl, &y, &wy, tau, batch, k, hw).unwrap();
        let num: Vec<f64> = (0..logits.len())
            .map(|i| {
                numeric_grad(&mut logits, i, 1e-3, |l| {
                    let mut y = vec![0.0; l.len()];
                    gumbel_softmax_forward(&mut y, l, Some(&noise), tau, batch, k, hw).unwrap();
                    crate::testutil::dot(&wy, &y)
                })
            })
            .collect();
        let got: Vec<f64> = dl.iter().map(|&v| v as f64).collect();
        assert_close("dlogits", &got, &num, 1e-3, 1e-3);
    }

    #[test]
    fn kl_gradient_matches_finite_differences_and_is_zero_at_uniform() {
        let (batch, k, hw) = (2, 6, 3);
        assert!(
            kl_uniform(&vec![0.5; batch * k * hw], batch, k, hw)
                .unwrap()
                .abs()
                < 1e-12
        );
        let mut logits = rand_vec(batch * k * hw, 2.0, 6);
        let mut d = vec![0.25; logits.len()];
        kl_uniform_backward(&mut d, &logits, 0.5, batch, k, hw).unwrap();
        let num: Vec<f64> = (0..logits.len())
            .map(|i| {
                0.25 + 0.5
                    * numeric_grad(&mut logits, i, 1e-3, |l| {
                        kl_uniform(l, batch, k, hw).unwrap()
                    })
            })
            .collect();
        let got: Vec<f64> = d.iter().map(|&v| v as f64).collect();
        assert_close("dlogits", &got, &num, 1e-3, 1e-3);
    }

    #[test]
    fn batch_kl_gradient_matches_finite_differences_and_is_zero_for_even_use() {
        let (batch, k, hw) = (2, 5, 3);
        // Each position sure of a different code, the codes used evenly overall (k·… positions
        // cycle through the codes): the batch KL is ~0 where the per-position KL is ~ln K.
        let (b2, hw2) = (1, k);
        let mut sure = vec![-30.0f32; b2 * k * hw2];
        for pos in 0..hw2 {
            sure[pos * hw2 + pos] = 30.0;
        }
        let q_bar = batch_code_distribution(&sure, b2, k, hw2).unwrap();
        assert!(kl_batch(&q_bar, b2 * hw2).abs() < 1e-9, "{q_bar:?}");
        let per_position = kl_uniform(&sure, b2, k, hw2).unwrap();
        assert!((per_position - hw2 as f64 * (k as f64).ln()).abs() < 1e-6);

        let mut logits = rand_vec(batch * k * hw, 2.0, 8);
        let q_bar = batch_code_distribution(&logits, batch, k, hw).unwrap();
        assert!((q_bar.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut d = vec![0.25; logits.len()];
        kl_batch_backward(&mut d, &logits, &q_bar, 0.5, batch, k, hw).unwrap();
        let num: Vec<f64> = (0..logits.len())
            .map(|i| {
                0.25 + 0.5
                    * numeric_grad(&mut logits, i, 1e-3, |l| {
                        let q = batch_code_distribution(l, batch, k, hw).unwrap();
                        kl_batch(&q, batch * hw)
                    })
            })
            .collect();
        let got: Vec<f64> = d.iter().map(|&v| v as f64).collect();
        assert_close("dlogits", &got, &num, 1e-3, 1e-3);
        // The gradient of one image's slice with the whole batch's q̄ is that image's part.
        let mut d0 = vec![0.25; k * hw];
        kl_batch_backward(&mut d0, &logits[..k * hw], &q_bar, 0.5, 1, k, hw).unwrap();
        assert_eq!(d0, d[..k * hw]);
    }

    #[test]
    fn likelihood_gradients_match_finite_differences() {
        let (batch, px) = (2, 5);
        let images: Vec<f32> = rand_vec(batch * 3 * px, 0.5, 4)
            .iter()
            .map(|v| v + 0.5)
            .collect();
        for kind in [Likelihood::LogitLaplace, Likelihood::LogitGaussian] {
            let mut stats = rand_vec(batch * 6 * px, 1.0, 5);
            let mut d = vec![f32::NAN; stats.len()];
            nll_backward(kind, &mut d, &stats, &images, 0.5, batch, px).unwrap();
            let num: Vec<f64> = (0..stats.len())
                .map(|i| {
                    numeric_grad(&mut stats, i, 1e-3, |s| {
                        0.5 * nll(kind, s, &images, batch, px).unwrap()
                    })
                })
                .collect();
            let got: Vec<f64> = d.iter().map(|&v| v as f64).collect();
            assert_close(&format!("dstats {kind:?}"), &got, &num, 1e-3, 1e-3);
            assert!(nll(kind, &stats[1..], &images, batch, px).is_err());
        }
    }

    #[test]
    fn gaussian_nll_is_the_unit_normal_density_of_the_logit() {
        // One pixel per channel, μ at logit(x') + 0.5 for channel 0, + 0 and −2 for the others:
        // −ln N(logit(x'); μ, 1) − ln |d logit(x')/dx'| = ½r² + ½ln(2π) + ln(x'(1−x')).
        let images = [0.0f32, 0.25, 1.0];
        let x: Vec<f64> = images.iter().map(|&v| 0.8 * v as f64 + 0.1).collect();
        let offsets = [0.5, 0.0, -2.0];
        let mut stats = vec![7.0f32; 6];
        for c in 0..3 {
            stats[c] = ((x[c] / (1.0 - x[c])).ln() + offsets[c]) as f32;
        }
        let want: f64 = (0..3)
            .map(|c| {
                let density = (-0.5 * offsets[c] * offsets[c]).exp()
                    / (2.0 * std::f64::consts::PI).sqrt()
                    / (x[c] * (1.0 - x[c]));
                -density.ln()
            })
            .sum();
        let got = nll(Likelihood::LogitGaussian, &stats, &images, 1, 1).unwrap();
        assert!((got - want).abs() < 1e-6, "nll {got}, want {want}");
        let mut d = vec![f32::NAN; 6];
        nll_backward(
            Likelihood::LogitGaussian,
            &mut d,
            &stats,
            &images,
            1.0,
            1,
            1,
        )
        .unwrap();
        assert_eq!(&d[3..], &[0.0; 3], "ln b gets no gradient");
        for c in 0..3 {
            assert!(
                (d[c] as f64 - offsets[c]).abs() < 1e-6,
                "dμ {} vs {}",
                d[c],
                offsets[c]
            );
        }
    }
}
