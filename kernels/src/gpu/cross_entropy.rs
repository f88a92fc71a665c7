//! Launchers of `kernels/cuda/cross_entropy.cu`: fused softmax cross-entropy over one vocabulary
//! segment, for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, Args, Gpu, LaunchCfg, Runtime};
use crate::cross_entropy::CrossEntropyOps;
use crate::error::{KernelError, Result};

/// Threads per block (one block per row; `CE_THREADS` in the source).
const THREADS: u32 = 512;

/// Checks the shapes of one segment; `Ok(false)` when there is nothing to launch.
fn check<R: Runtime>(
    rt: &R,
    k: &'static str,
    logits: &R::Buf<f32>,
    losses: &R::Buf<f32>,
    targets: &R::Buf<u32>,
    n: usize,
    v: usize,
) -> Result<bool> {
    check_buf(rt, k, "logits", logits, n * v)?;
    check_buf(rt, k, "losses", losses, n)?;
    check_buf(rt, k, "targets", targets, n)?;
    if n > 0 && v == 0 {
        return Err(KernelError::Shape {
            op: k,
            what: format!("{n} rows over an empty vocabulary: no target can be in it"),
        });
    }
    as_i32(k, "v", v)?;
    if n > i32::MAX as usize {
        return Err(KernelError::Shape {
            op: k,
            what: format!("{n} rows exceed the grid"),
        });
    }
    Ok(n > 0)
}

impl<R: Runtime> CrossEntropyOps for Gpu<R> {
    fn cross_entropy_fused(
        &self,
        logits: &mut R::Buf<f32>,
        losses: &mut R::Buf<f32>,
        targets: &R::Buf<u32>,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const K: &str = "cross_entropy_fused_f32";
        let rt = &self.0;
        if !check(rt, K, logits, losses, targets, n, v)? {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(logits))
            .ptr(rt.addr_mut(losses))
            .ptr(rt.addr(targets))
            .f32(scale)
            .i32(v as i32);
        // SAFETY: the arguments are the kernel's; logits hold n·v values, losses and targets n,
        // and the grid has one block per row.
        unsafe { rt.launch(K, LaunchCfg::linear(n as u32, THREADS), &args) }
    }

    fn cross_entropy_forward(
        &self,
        losses: &mut R::Buf<f32>,
        logits: &R::Buf<f32>,
        targets: &R::Buf<u32>,
        n: usize,
        v: usize,
    ) -> Result<()> {
        const K: &str = "cross_entropy_forward_f32";
        let rt = &self.0;
        if !check(rt, K, logits, losses, targets, n, v)? {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(losses))
            .ptr(rt.addr(logits))
            .ptr(rt.addr(targets))
            .i32(v as i32);
        // SAFETY: as in the fused launch; the logits are only read.
        unsafe { rt.launch(K, LaunchCfg::linear(n as u32, THREADS), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    /// Logits of `n` rows over `v` with a spread of `spread`, row 0 shifted far up (a softmax that
    /// needs its maximum), targets spread over the vocabulary including both ends.
    fn inputs(n: usize, v: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut logits = rand_vec(n * v, spread, seed);
        for x in &mut logits[..v] {
            *x += 1000.0;
        }
        let targets = (0..n)
            .map(|i| match i % 3 {
                0 => 0,
                1 => (v - 1) as u32,
                _ => ((i * 7919) % v) as u32,
            })
            .collect();
        (logits, targets)
    }

    /// (losses, dlogits) of the fused op, and the losses of the forward-only op, on `dev`; the
    /// outputs start from non-zero values so that a row left unwritten shows.
    fn run<D: CrossEntropyOps>(
        dev: &D,
        logits: &[f32],
        targets: &[u32],
        scale: f32,
        n: usize,
        v: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let t = dev.upload(targets).unwrap();
        let x = dev.upload(logits).unwrap();
        let mut fwd = dev.upload(&vec![-7.0f32; n]).unwrap();
        dev.cross_entropy_forward(&mut fwd, &x, &t, n, v).unwrap();
        let mut d = dev.upload(logits).unwrap();
        let mut losses = dev.upload(&vec![-7.0f32; n]).unwrap();
        dev.cross_entropy_fused(&mut d, &mut losses, &t, scale, n, v)
            .unwrap();
        (
            dev.download(&losses).unwrap(),
            dev.download(&d).unwrap(),
            dev.download(&fwd).unwrap(),
        )
    }

    #[test]
    fn emulated_kernels_match_the_cpu_reference() {
        // v: one logit, a partial warp, more than one pass of the block's 512 threads; the scales
        // of the transformer's two segments (text 1/8 over its rows, image 7/8 over its rows).
        for &(n, v, spread, scale) in &[
            (3usize, 1usize, 1.0f32, 1.0f32),
            (4, 33, 4.0, 0.125 / 4.0),
            (3, 700, 8.0, 0.875 / 3.0),
            (2, 1030, 20.0, 3000.0),
        ] {
            let (logits, targets) = inputs(n, v, spread, 60 + v as u64);
            let want = run(&Cpu, &logits, &targets, scale, n, v);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run(dev, &logits, &targets, scale, n, v);
                let at = format!("n={n} v={v} scale={scale} {s:?}");
                // f32 expf and an f32 block sum against the reference's fast_exp and f64 sum:
                // a few 1e-6 relative on the sum; the loss is O(log V + spread).
                close(&format!("loss {at}"), &got.0, &want.0, 1e-5, 1e-5);
                close(&format!("forward loss {at}"), &got.2, &want.0, 1e-5, 1e-5);
                // Gradients are probabilities times the scale: relative error of a few 1e-6 on
                // each, and the target's p − 1 loses it absolutely (against the scale).
                close(
                    &format!("dlogits {at}"),
                    &got.1,
                    &want.1,
                    4e-6 * scale,
                    1e-5,
                );
            });
        }
    }

    #[test]
    fn bad_shapes_are_errors_and_bad_targets_give_nan_losses() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let (n, v) = (2, 5);
        let mut x = vec![0.0f32; n * v];
        let mut l = vec![0.0f32; n];
        let err = dev
            .cross_entropy_fused(&mut x, &mut l, &vec![0u32; n + 1], 1.0, n, v)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cross_entropy_fused_f32") && err.contains("`targets`"),
            "{err}"
        );
        let err = dev
            .cross_entropy_forward(&mut l, &vec![0.0; 9], &vec![0u32; n], n, v)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cross_entropy_forward_f32") && err.contains("`logits`"),
            "{err}"
        );
        let err = dev
            .cross_entropy_fused(&mut vec![], &mut l, &vec![0u32; n], 1.0, n, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty vocabulary"), "{err}");
        // The CPU refuses an out-of-range target; the device cannot see it before the launch and
        // reports it as a NaN loss, with no one-hot term in that row's gradient.
        dev.cross_entropy_fused(&mut x, &mut l, &vec![1, 5], 1.0, n, v)
            .unwrap();
        assert!(l[0].is_finite() && l[1].is_nan(), "{l:?}");
        assert_eq!(&x[v..], &[0.2; 5]);
        assert!((x[1] - (0.2 - 1.0)).abs() < 1e-6, "{x:?}");
    }
}
