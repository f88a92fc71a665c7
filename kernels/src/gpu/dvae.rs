//! Launchers of `kernels/cuda/dvae.cu`: the Gumbel-softmax relaxation and the likelihood
//! (logit-Laplace or logit-Gaussian) of the dVAE's loss, for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, Args, Gpu, LaunchCfg, Runtime};
use crate::dvae::{check_tau, DvaeLossOps, Likelihood};
use crate::error::{KernelError, Result};

/// Positions per block of the softmax kernels (`GS_LANES`), and threads (× `GS_SLICES` = 8).
const GS_LANES: usize = 32;
const GS_THREADS: u32 = 256;
/// Pixels per block of the likelihood kernel (`LL_THREADS`).
const LL_THREADS: usize = 256;
/// The largest grid y dimension.
const GRID_Y: usize = 65_535;

fn check_batch(k: &'static str, batch: usize) -> Result<()> {
    if batch > GRID_Y {
        return Err(KernelError::Shape {
            op: k,
            what: format!("batch {batch} exceeds {GRID_Y} images (grid y)"),
        });
    }
    Ok(())
}

fn softmax_cfg(batch: usize, hw: usize) -> LaunchCfg {
    LaunchCfg {
        grid: [hw.div_ceil(GS_LANES) as u32, batch as u32, 1],
        block: [GS_THREADS, 1, 1],
        shared_bytes: 0,
    }
}

impl<R: Runtime> DvaeLossOps for Gpu<R> {
    fn gumbel_softmax_forward(
        &self,
        y: &mut R::Buf<f32>,
        logits: &R::Buf<f32>,
        noise: Option<&R::Buf<f32>>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()> {
        const K: &str = "dvae_gumbel_softmax_forward_f32";
        let rt = &self.0;
        check_tau(K, tau)?;
        check_buf(rt, K, "logits", logits, batch * k * hw)?;
        check_buf(rt, K, "y", y, batch * k * hw)?;
        if let Some(g) = noise {
            check_buf(rt, K, "noise", g, batch * k * hw)?;
        }
        check_batch(K, batch)?;
        if batch * k * hw == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(y))
            .ptr(rt.addr(logits))
            .ptr(noise.map_or(0, |g| rt.addr(g)))
            .f32(tau)
            .i32(as_i32(K, "k", k)?)
            .i32(as_i32(K, "hw", hw)?);
        // SAFETY: the kernel's arguments; every buffer holds B·K·hw elements (checked above).
        unsafe { rt.launch(K, softmax_cfg(batch, hw), &args) }
    }

    fn gumbel_softmax_backward(
        &self,
        dlogits: &mut R::Buf<f32>,
        y: &R::Buf<f32>,
        dy: &R::Buf<f32>,
        tau: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<()> {
        const K: &str = "dvae_gumbel_softmax_backward_f32";
        let rt = &self.0;
        check_tau(K, tau)?;
        check_buf(rt, K, "dlogits", dlogits, batch * k * hw)?;
        check_buf(rt, K, "y", y, batch * k * hw)?;
        check_buf(rt, K, "dy", dy, batch * k * hw)?;
        check_batch(K, batch)?;
        if batch * k * hw == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(dlogits))
            .ptr(rt.addr(y))
            .ptr(rt.addr(dy))
            .f32(tau)
            .i32(as_i32(K, "k", k)?)
            .i32(as_i32(K, "hw", hw)?);
        // SAFETY: as in the forward pass.
        unsafe { rt.launch(K, softmax_cfg(batch, hw), &args) }
    }

    fn nll(
        &self,
        kind: Likelihood,
        dstats: Option<&mut R::Buf<f32>>,
        stats: &R::Buf<f32>,
        images: &R::Buf<f32>,
        scale: f32,
        batch: usize,
        px: usize,
    ) -> Result<f64> {
        const K: &str = "dvae_laplace_f32";
        let rt = &self.0;
        check_buf(rt, K, "stats", stats, batch * 6 * px)?;
        check_buf(rt, K, "images", images, batch * 3 * px)?;
        let dstats_addr = match dstats {
            Some(d) => {
                check_buf(rt, K, "dstats", d, batch * 6 * px)?;
                rt.addr_mut(d)
            }
            None => 0,
        };
        check_batch(K, batch)?;
        if batch * px == 0 {
            return Ok(0.0);
        }
        let blocks_x = px.div_ceil(LL_THREADS);
        let blocks = blocks_x * batch;
        let mut partials = rt.take_scratch::<f32>("dvae.partials", 2 * blocks)?;
        let args = Args::new()
            .ptr(dstats_addr)
            .ptr(rt.addr_mut(&mut partials))
            .ptr(rt.addr(stats))
            .ptr(rt.addr(images))
            .f32(scale)
            .i32(as_i32(K, "px", px)?)
            .i32(i32::from(kind == Likelihood::LogitGaussian));
        let cfg = LaunchCfg {
            grid: [blocks_x as u32, batch as u32, 1],
            block: [LL_THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: the kernel's arguments; stats and dstats hold B·6·px, images B·3·px, partials
        // two per block.
        unsafe { rt.launch(K, cfg, &args)? };
        let sum = reduce_pairs(rt, &partials, blocks);
        rt.put_scratch("dvae.partials", partials);
        sum
    }

    fn kl_uniform(
        &self,
        dlogits: Option<&mut R::Buf<f32>>,
        logits: &R::Buf<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<f64> {
        const K: &str = "dvae_kl_f32";
        let rt = &self.0;
        check_buf(rt, K, "logits", logits, batch * k * hw)?;
        let dlogits_addr = match dlogits {
            Some(d) => {
                check_buf(rt, K, "dlogits", d, batch * k * hw)?;
                rt.addr_mut(d)
            }
            None => 0,
        };
        check_batch(K, batch)?;
        if batch * k * hw == 0 {
            return Ok(0.0);
        }
        let cfg = softmax_cfg(batch, hw);
        let blocks = cfg.grid[0] as usize * batch;
        let mut partials = rt.take_scratch::<f32>("dvae.partials", 2 * blocks)?;
        let args = Args::new()
            .ptr(dlogits_addr)
            .ptr(rt.addr_mut(&mut partials))
            .ptr(rt.addr(logits))
            .f32(coef)
            .i32(as_i32(K, "k", k)?)
            .i32(as_i32(K, "hw", hw)?);
        // SAFETY: the kernel's arguments; logits and dlogits hold B·K·hw, partials two per block.
        unsafe { rt.launch(K, cfg, &args)? };
        let sum = reduce_pairs(rt, &partials, blocks);
        rt.put_scratch("dvae.partials", partials);
        sum
    }

    fn kl_batch(
        &self,
        dlogits: Option<&mut R::Buf<f32>>,
        logits: &R::Buf<f32>,
        coef: f32,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<(f64, Vec<f64>)> {
        const K: &str = "dvae_kl_batch_backward_f32";
        let rt = &self.0;
        check_buf(rt, K, "logits", logits, batch * k * hw)?;
        if let Some(d) = &dlogits {
            check_buf(rt, K, "dlogits", d, batch * k * hw)?;
        }
        check_batch(K, batch)?;
        if batch * k * hw == 0 {
            return Ok((0.0, vec![0.0; k]));
        }
        // q̄ comes to the host (K values): the KL and the gradient's weights are computed there
        // as in the reference, and the weights go back as f32.
        let q_bar = self.code_distribution(logits, batch, k, hw)?;
        let kl = crate::dvae::kl_batch(&q_bar, batch * hw);
        if let Some(d) = dlogits {
            let w: Vec<f32> = (crate::dvae::kl_batch_weights(&q_bar).iter())
                .map(|&w| w as f32)
                .collect();
            let w = rt.upload(&w)?;
            let args = Args::new()
                .ptr(rt.addr_mut(d))
                .ptr(rt.addr(logits))
                .ptr(rt.addr(&w))
                .f32(coef)
                .i32(as_i32(K, "k", k)?)
                .i32(as_i32(K, "hw", hw)?);
            // SAFETY: logits and dlogits hold B·K·hw (checked above), w holds K.
            unsafe { rt.launch(K, softmax_cfg(batch, hw), &args)? };
        }
        Ok((kl, q_bar))
    }
}

impl<R: Runtime> Gpu<R> {
    /// q̄ (downloaded) of `logits`: `dvae_code_sum_f32`'s per-block partial sums, then
    /// `dvae_code_mean_f64` in block order.
    fn code_distribution(
        &self,
        logits: &R::Buf<f32>,
        batch: usize,
        k: usize,
        hw: usize,
    ) -> Result<Vec<f64>> {
        const K: &str = "dvae_code_sum_f32";
        const M: &str = "dvae_code_mean_f64";
        let rt = &self.0;
        let cfg = softmax_cfg(batch, hw);
        let blocks = cfg.grid[0] as usize * batch;
        let mut partials = rt.take_scratch::<f64>("dvae.code_partials", blocks * k)?;
        let args = Args::new()
            .ptr(rt.addr_mut(&mut partials))
            .ptr(rt.addr(logits))
            .i32(as_i32(K, "k", k)?)
            .i32(as_i32(K, "hw", hw)?);
        // SAFETY: logits hold B·K·hw (checked by the caller), partials K per block.
        unsafe { rt.launch(K, cfg, &args)? };
        let mut q_bar = rt.take_scratch::<f64>("dvae.q_bar", k)?;
        let args = Args::new()
            .ptr(rt.addr_mut(&mut q_bar))
            .ptr(rt.addr(&partials))
            .i32(as_i32(M, "blocks", blocks)?)
            .i32(as_i32(M, "k", k)?)
            .f64((batch * hw) as f64);
        // SAFETY: q_bar holds K, partials K per block.
        unsafe { rt.launch(M, LaunchCfg::linear(k.div_ceil(256) as u32, 256), &args)? };
        let host = rt.download(&q_bar)?;
        rt.put_scratch("dvae.q_bar", q_bar);
        rt.put_scratch("dvae.code_partials", partials);
        Ok(host)
    }
}

/// The sum of `n` (hi, lo) partial pairs (`dvae_laplace_reduce_f32`), downloaded: waits for the
/// device.
fn reduce_pairs<R: Runtime>(rt: &R, partials: &R::Buf<f32>, n: usize) -> Result<f64> {
    const K: &str = "dvae_laplace_reduce_f32";
    check_buf(rt, K, "partials", partials, 2 * n)?;
    let mut out = rt.take_scratch::<f32>("dvae.pair", 2)?;
    let args = Args::new()
        .ptr(rt.addr_mut(&mut out))
        .ptr(rt.addr(partials))
        .i32(as_i32(K, "partials", n)?);
    // SAFETY: out holds one pair, partials n pairs (checked above).
    unsafe { rt.launch(K, LaunchCfg::linear(1, LL_THREADS as u32), &args)? };
    let pair = rt.download(&out)?;
    rt.put_scratch("dvae.pair", out);
    Ok(pair[0] as f64 + pair[1] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    /// y and dlogits on `dev`, the outputs started from garbage.
    fn run_softmax<D: DvaeLossOps>(
        dev: &D,
        (batch, k, hw, tau): (usize, usize, usize, f32),
        noisy: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = batch * k * hw;
        let seed = (k * 100 + hw) as u64;
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let logits = up(&rand_vec(n, 3.0, seed));
        let noise = up(&rand_vec(n, 2.0, seed + 1));
        let mut y = up(&rand_vec(n, 9.0, seed + 2));
        let g = if noisy { Some(&noise) } else { None };
        dev.gumbel_softmax_forward(&mut y, &logits, g, tau, batch, k, hw)
            .unwrap();
        let dy = up(&rand_vec(n, 1.0, seed + 3));
        let mut dl = up(&rand_vec(n, 9.0, seed + 4));
        dev.gumbel_softmax_backward(&mut dl, &y, &dy, tau, batch, k, hw)
            .unwrap();
        (dev.download(&y).unwrap(), dev.download(&dl).unwrap())
    }

    #[test]
    fn emulated_softmax_matches_the_cpu_reference() {
        // K not a multiple of the 8 slices, positions that fill no block, τ from 1 to 1/16 (the
        // schedule's range: scores up to 16× the logits).
        for (case, noisy) in [
            ((2, 13, 5, 1.0), true),
            ((1, 40, 37, 0.0625), true),
            ((3, 7, 64, 0.3), false),
            ((1, 300, 3, 0.0625), true),
        ] {
            let want = run_softmax(&Cpu, case, noisy);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run_softmax(dev, case, noisy);
                let at = format!("{case:?} noise={noisy} {s:?}");
                // y: f32 exponentials and an f32 sum of ≤ K/8 terms per slice against f64 ones:
                // a few ulps of y, relative.
                close(&format!("y {at}"), &got.0, &want.0, 1e-7, 2e-6);
                // dlogits: y·(dy − Σ y·dy)/τ with Σ y·dy in f32 against f64; the difference of
                // two O(1) values loses up to ~1e-6 absolute, then /τ (≤ 16).
                close(&format!("dlogits {at}"), &got.1, &want.1, 2e-5, 1e-5);
            });
        }
    }

    fn run_likelihood<D: DvaeLossOps>(
        dev: &D,
        kind: Likelihood,
        batch: usize,
        px: usize,
    ) -> (f64, Vec<f32>, f64) {
        let seed = (batch * 1000 + px) as u64;
        let up = |v: &[f32]| dev.upload(v).unwrap();
        // Pixels in [0, 1] including both ends, and one exactly where logit(x') = μ is possible.
        let mut img: Vec<f32> = rand_vec(batch * 3 * px, 0.5, seed)
            .iter()
            .map(|v| v + 0.5)
            .collect();
        img[0] = 0.0;
        img[1] = 1.0;
        img[2] = 0.5;
        let mut st = rand_vec(batch * 6 * px, 2.0, seed + 1);
        st[2] = 0.0; // logit(x') = 0 at x = 0.5: r = 0, the sign's edge
        let (images, stats) = (up(&img), up(&st));
        let mut dstats = up(&rand_vec(batch * 6 * px, 9.0, seed + 2));
        let nll = dev
            .nll(kind, Some(&mut dstats), &stats, &images, 0.37, batch, px)
            .unwrap();
        let nll_only = dev
            .nll(kind, None, &stats, &images, 0.37, batch, px)
            .unwrap();
        (nll, dev.download(&dstats).unwrap(), nll_only)
    }

    #[test]
    fn emulated_likelihoods_match_the_cpu_reference() {
        // Pixel counts that fill no block, more than one block per image, several images.
        let kinds = [Likelihood::LogitLaplace, Likelihood::LogitGaussian];
        for ((batch, px), kind) in [(1, 5), (2, 300), (3, 600)]
            .into_iter()
            .flat_map(|c| kinds.map(|k| (c, k)))
        {
            let want = run_likelihood(&Cpu, kind, batch, px);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run_likelihood(dev, kind, batch, px);
                let at = format!("{kind:?} batch={batch} px={px} {s:?}");
                // The same f64 terms summed in another order, returned through an f32 pair
                // (≈ 48 bits): 1e-9 relative to the sum of magnitudes (bounded by 10 per term).
                let tol = 1e-9 * 10.0 * (batch * 3 * px) as f64;
                assert!(
                    (got.0 - want.0).abs() <= tol,
                    "nll {at}: {} vs {}",
                    got.0,
                    want.0
                );
                assert_eq!(got.0, got.2, "nll without dstats {at}");
                // dstats: the same f64 arithmetic (log/exp may differ in the last f64 bit), then
                // one rounding to f32.
                close(&format!("dstats {at}"), &got.1, &want.1, 1e-7, 1e-6);
            });
        }
    }

    fn run_kl<D: DvaeLossOps>(dev: &D, (batch, k, hw): (usize, usize, usize)) -> (f64, Vec<f32>) {
        let n = batch * k * hw;
        let seed = (k * 100 + hw) as u64;
        let mut l = rand_vec(n, 4.0, seed);
        // One position with uniform logits: its KL is 0, a cancellation of log K.
        for c in 0..k {
            l[c * hw] = 0.75;
        }
        let logits = dev.upload(&l).unwrap();
        let mut dl = dev.upload(&rand_vec(n, 1.0, seed + 1)).unwrap();
        let kl = dev
            .kl_uniform(Some(&mut dl), &logits, 0.3, batch, k, hw)
            .unwrap();
        let kl_only = dev.kl_uniform(None, &logits, 0.3, batch, k, hw).unwrap();
        assert_eq!(kl.to_bits(), kl_only.to_bits(), "{}", dev.name());
        (kl, dev.download(&dl).unwrap())
    }

    #[test]
    fn emulated_kl_matches_the_cpu_reference() {
        for case in [(2, 13, 5), (1, 40, 37), (1, 300, 3)] {
            let want = run_kl(&Cpu, case);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run_kl(dev, case);
                let at = format!("{case:?} {s:?}");
                // Per position Σ q·log q in f32 (≈ 1e-7 relative of log K ≤ 6) against f64.
                let tol = 2e-6 * (case.0 * case.2) as f64;
                assert!(
                    (got.0 - want.0).abs() <= tol,
                    "kl {at}: {} vs {}",
                    got.0,
                    want.0
                );
                // dlogits (started from values of order 1) += 0.3·q·(log q − Σ q log q) in f32.
                close(&format!("dlogits {at}"), &got.1, &want.1, 2e-6, 1e-6);
            });
        }
    }

    /// The batch KL, q̄ and the accumulated gradient on `dev`, with one code no position uses
    /// (logits of −200: q underflows to 0 in f32, 1e-87 in f64) and one position of equal
    /// logits for the other codes.
    fn run_kl_batch<D: DvaeLossOps>(
        dev: &D,
        (batch, k, hw): (usize, usize, usize),
    ) -> (f64, Vec<f64>, Vec<f32>) {
        let n = batch * k * hw;
        let seed = (k * 100 + hw) as u64 + 7;
        let mut l = rand_vec(n, 4.0, seed);
        for bi in 0..batch {
            for pos in 0..hw {
                l[(bi * k + k - 1) * hw + pos] = -200.0;
            }
        }
        for c in 0..k - 1 {
            l[c * hw] = 0.75;
        }
        let logits = dev.upload(&l).unwrap();
        let mut dl = dev.upload(&rand_vec(n, 1.0, seed + 1)).unwrap();
        let (kl, q_bar) = dev
            .kl_batch(Some(&mut dl), &logits, 0.3, batch, k, hw)
            .unwrap();
        let (kl_only, q_only) = dev.kl_batch(None, &logits, 0.3, batch, k, hw).unwrap();
        assert_eq!(kl.to_bits(), kl_only.to_bits(), "{}", dev.name());
        assert_eq!(q_bar, q_only, "{}", dev.name());
        (kl, q_bar, dev.download(&dl).unwrap())
    }

    #[test]
    fn emulated_batch_kl_matches_the_cpu_reference() {
        // Blocks of 32 positions with a partial last one, several images, K below and above
        // the 256 threads that share the codes.
        for case in [(2, 13, 5), (3, 40, 37), (1, 300, 70)] {
            let want = run_kl_batch(&Cpu, case);
            let q_sum: f64 = want.1.iter().sum();
            assert!((q_sum - 1.0).abs() < 1e-12, "q̄ sums to {q_sum}");
            assert!(want.0 > 0.0, "uneven use has a positive KL");
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run_kl_batch(dev, case);
                let at = format!("{case:?} {s:?}");
                // q in f32 (expf) summed in f64: ≈ 1e-7 relative per value.
                for (c, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
                    assert!((g - w).abs() <= 1e-6 * w + 1e-15, "q̄[{c}] {at}: {g} vs {w}");
                }
                // The unused code: 0 on the device (f32 underflow), the weight's zero branch.
                assert_eq!(got.1[case.1 - 1], 0.0, "the unused code {at}");
                assert!(want.1[case.1 - 1] < 1e-80);
                // N·Σ q̄·ln(Kq̄): N up to 111 times a relative 1e-6 of each term.
                let tol = 1e-6 * (case.0 * case.2) as f64 * (case.1 as f64).ln();
                assert!(
                    (got.0 - want.0).abs() <= tol,
                    "kl {at}: {} vs {}",
                    got.0,
                    want.0
                );
                close(&format!("dlogits {at}"), &got.2, &want.2, 2e-6, 1e-6);
            });
        }
    }

    #[test]
    fn bad_arguments_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let l = vec![0.0f32; 2 * 3 * 4];
        let mut y = vec![0.0f32; 23];
        let err = dev
            .gumbel_softmax_forward(&mut y, &l, None, 1.0, 2, 3, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dvae_gumbel_softmax_forward_f32") && err.contains("`y`"),
            "{err}"
        );
        let mut y = vec![0.0f32; 24];
        let err = dev
            .gumbel_softmax_forward(&mut y, &l, None, 0.0, 2, 3, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tau"), "{err}");
        let err = dev
            .nll(Likelihood::LogitLaplace, None, &l, &l, 1.0, 2, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dvae_laplace_f32") && err.contains("`images`"),
            "{err}"
        );
    }
}
