//! Launchers of `kernels/cuda/adamw.cu`: AdamW with an optional fp16 parameter copy, the squared
//! norm (deterministic, f64, left on the device) and the weight EMA, for [`Gpu`] over either
//! runtime.

use super::{as_i32, check_buf, elementwise, Args, Gpu, LaunchCfg, Runtime};
use crate::adamw::{AdamWOps, AdamWStep};
use crate::error::Result;
use half::f16;

/// Threads per block of every kernel here (`ADAMW_SUM_THREADS` in the source).
const THREADS: usize = 256;
/// Elements each thread of the squared-norm partials adds, at least (sets the grid).
const SUM_PER_THREAD: usize = 16;
/// Most partials of the squared norm.
const MAX_SUM_BLOCKS: usize = 1024;

/// Blocks of the squared-norm partials: a function of `n` only, so the summation order (and the
/// result's bits) never depends on the device.
pub fn sum_squares_blocks(n: usize) -> usize {
    n.div_ceil(THREADS * SUM_PER_THREAD)
        .clamp(1, MAX_SUM_BLOCKS)
}

impl<R: Runtime> AdamWOps for Gpu<R> {
    fn adamw_update(
        &self,
        params: &mut R::Buf<f32>,
        params_f16: Option<&mut R::Buf<f16>>,
        grads: &R::Buf<f32>,
        m: &mut R::Buf<f32>,
        v: &mut R::Buf<f32>,
        h: AdamWStep,
    ) -> Result<()> {
        const K: &str = "adamw_update_f32";
        let rt = &self.0;
        let n = rt.len(params);
        check_buf(rt, K, "grads", grads, n)?;
        check_buf(rt, K, "m", m, n)?;
        check_buf(rt, K, "v", v, n)?;
        let p16 = match params_f16 {
            Some(b) => {
                check_buf(rt, K, "params_f16", b, n)?;
                rt.addr_mut(b)
            }
            None => 0,
        };
        let ni = as_i32(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let (step, bc2_sqrt) = h.bias_corrections();
        let args = Args::new()
            .ptr(rt.addr_mut(params))
            .ptr(p16)
            .ptr(rt.addr_mut(m))
            .ptr(rt.addr_mut(v))
            .ptr(rt.addr(grads))
            .i32(ni)
            .f32(h.lr)
            .f32(h.beta1)
            .f32(h.beta2)
            .f32(h.eps)
            .f32(h.weight_decay)
            .f32(step)
            .f32(bc2_sqrt)
            .f32(h.grad_scale);
        // SAFETY: the arguments are the kernel's; every buffer holds n elements (checked).
        unsafe { rt.launch(K, elementwise(n), &args) }
    }

    fn sum_squares(&self, out: &mut R::Buf<f64>, x: &R::Buf<f32>) -> Result<()> {
        const K: &str = "adamw_sum_squares_partials_f32";
        let rt = &self.0;
        check_buf(rt, K, "out", out, 1)?;
        let n = rt.len(x);
        let ni = as_i32(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let blocks = sum_squares_blocks(n);
        let mut partials = rt.take_scratch::<f64>("adamw.sum_squares_partials", blocks)?;
        let args = Args::new()
            .ptr(rt.addr_mut(&mut partials))
            .ptr(rt.addr(x))
            .i32(ni);
        let cfg = LaunchCfg::linear(blocks as u32, THREADS as u32);
        // SAFETY: partials has one element per block, x has n.
        unsafe { rt.launch(K, cfg, &args)? };
        let args = Args::new()
            .ptr(rt.addr_mut(out))
            .ptr(rt.addr(&partials))
            .i32(blocks as i32);
        // SAFETY: out has one element, partials `blocks`.
        unsafe {
            rt.launch(
                "adamw_sum_squares_reduce_f64",
                LaunchCfg::linear(1, THREADS as u32),
                &args,
            )?
        };
        rt.put_scratch("adamw.sum_squares_partials", partials);
        Ok(())
    }

    fn ema_update(&self, ema: &mut R::Buf<f32>, params: &R::Buf<f32>, decay: f32) -> Result<()> {
        const K: &str = "adamw_ema_update_f32";
        let rt = &self.0;
        let n = rt.len(ema);
        check_buf(rt, K, "params", params, n)?;
        let ni = as_i32(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(ema))
            .ptr(rt.addr(params))
            .i32(ni)
            .f32(decay);
        // SAFETY: ema and params hold n elements (checked).
        unsafe { rt.launch(K, elementwise(n), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    /// Three AdamW updates (the second without the fp16 copy, so a stale copy stays from the
    /// first), then the EMA: params, the fp16 copy, m, v, ema.
    fn run<D: AdamWOps>(dev: &D, n: usize, seed: u64) -> [Vec<f32>; 5] {
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let mut p = up(&rand_vec(n, 1.0, seed));
        let mut m = up(&rand_vec(n, 0.1, seed + 1));
        let mut v: D::Buf<f32> = up(&rand_vec(n, 0.01, seed + 2)
            .iter()
            .map(|x| x.abs())
            .collect::<Vec<_>>());
        let mut p16 = dev.zeros::<f16>(n).unwrap();
        let mut ema = up(&rand_vec(n, 1.0, seed + 3));
        for t in 1..=3u64 {
            let g = up(&rand_vec(n, 4.0, seed + 10 + t));
            let h = AdamWStep {
                lr: 3e-3,
                beta1: 0.9,
                beta2: 0.96,
                eps: 1e-8,
                weight_decay: 0.045,
                t,
                grad_scale: 0.37,
            };
            let copy = if t == 2 { None } else { Some(&mut p16) };
            dev.adamw_update(&mut p, copy, &g, &mut m, &mut v, h)
                .unwrap();
        }
        dev.ema_update(&mut ema, &p, 0.99).unwrap();
        let down = |b: &D::Buf<f32>| dev.download(b).unwrap();
        [
            down(&p),
            widen(&dev.download(&p16).unwrap()).into_owned(),
            down(&m),
            down(&v),
            down(&ema),
        ]
    }

    #[test]
    fn emulated_adamw_and_ema_match_the_cpu_reference() {
        // Odd sizes: a partial block, one element, several blocks.
        for &n in &[1usize, 300, 2049] {
            let want = run(&Cpu, n, 7 + n as u64);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run(dev, n, 7 + n as u64);
                let at = format!("n={n} {s:?}");
                // The same f32 operations in the same order; on a GPU, NVRTC contracts a·b + c
                // into fused multiply-adds (one rounding fewer): a few ulps, the step's
                // division and square root included.
                close(&format!("params {at}"), &got[0], &want[0], 1e-6, 1e-6);
                // The copy is the rounding of (nearly) the same f32: one f16 step at most.
                close(&format!("params_f16 {at}"), &got[1], &want[1], 1e-6, 1e-3);
                close(&format!("m {at}"), &got[2], &want[2], 1e-7, 1e-6);
                close(&format!("v {at}"), &got[3], &want[3], 1e-8, 1e-6);
                close(&format!("ema {at}"), &got[4], &want[4], 1e-7, 1e-6);
                // The fp16 copy is the final parameters rounded (the third update wrote it).
                let rounded: Vec<f32> = got[0].iter().map(|&p| f16::from_f32(p).to_f32()).collect();
                assert_eq!(got[1], rounded, "params_f16 {at}");
            });
        }
    }

    fn sum_squares_on<D: AdamWOps>(dev: &D, x: &[f32], start: f64) -> f64 {
        let mut out = dev.upload(&[start]).unwrap();
        dev.sum_squares(&mut out, &dev.upload(x).unwrap()).unwrap();
        dev.download(&out).unwrap()[0]
    }

    #[test]
    fn emulated_sum_squares_matches_the_cpu_reference_and_is_deterministic() {
        // Sizes: one element; a partial block; more partials than the reduce block's threads
        // (1024 > 256), so its strided loop runs more than once.
        for &n in &[1usize, 1000, 4099, THREADS * SUM_PER_THREAD * 300 + 7] {
            let x = rand_vec(n, 3.0, 100 + n as u64);
            let want = sum_squares_on(&Cpu, &x, 2.5);
            let schedules: &[Schedule] = if n > 100_000 {
                &Schedule::ALL[..1] // large: one schedule keeps the test fast
            } else {
                &Schedule::ALL
            };
            let mut first = None;
            for &s in schedules {
                let got = sum_squares_on(&Gpu(Emu::new(s)), &x, 2.5);
                // Exact squares summed in f64 in another order than the CPU's: relative
                // round-off of about log2(n)·2⁻⁵³; 1e-12 leaves room, and an f32 sum (1e-7)
                // would not fit.
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs(),
                    "n={n} {s:?}: got {got}, reference {want}"
                );
                // The order is fixed: every schedule gives the same bits.
                assert_eq!(*first.get_or_insert(got), got, "n={n} {s:?}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let h = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 1,
            grad_scale: 1.0,
        };
        let (mut p, mut m, mut v) = (vec![0.0f32; 8], vec![0.0f32; 8], vec![0.0f32; 8]);
        let mut p16 = vec![f16::ZERO; 7];
        let err = dev
            .adamw_update(&mut p, Some(&mut p16), &vec![0.0; 8], &mut m, &mut v, h)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adamw_update_f32") && err.contains("`params_f16`"),
            "{err}"
        );
        let err = dev
            .adamw_update(&mut p, None, &vec![0.0; 9], &mut m, &mut v, h)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`grads`"), "{err}");
        let err = dev
            .sum_squares(&mut vec![0.0f64; 2], &vec![1.0; 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`out`"), "{err}");
        let err = dev
            .ema_update(&mut vec![0.0; 3], &vec![0.0; 4], 0.5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("adamw_ema_update_f32") && err.contains("`params`"),
            "{err}"
        );
    }
}
