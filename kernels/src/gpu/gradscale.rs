//! Launchers of `kernels/cuda/gradscale.cu`: per-resblock gradient scaling (scale-and-cast,
//! unscale-and-accumulate, parameter-gradient finiteness) for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, elementwise, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::{KernelError, Result};
use crate::gradscale::{check_ranges, check_scale_args, GradScaleOps};
use std::ops::Range;

/// Threads per block.
const THREADS: usize = 256;
/// Most blocks of the parameter-finiteness launch, spread over its ranges.
const MAX_BLOCKS: usize = if cfg!(test) { 3 } else { 4096 };

/// Flag `block` as the `int` the kernels take.
fn block_arg(k: &'static str, block: usize) -> Result<i32> {
    as_i32(k, "resblock index", block)
}

impl<R: Runtime> GradScaleOps for Gpu<R> {
    fn grad_scale<G: Elem>(
        &self,
        g: &mut R::Buf<G>,
        flags: &mut R::Buf<u32>,
        block: usize,
        dresid: &R::Buf<f32>,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for::<G>("gradscale_scale_f32", "gradscale_scale_f16")?;
        let rt = &self.0;
        let n = rt.len(dresid);
        check_scale_args::<G>(k, rt.len(flags), block, scale)?;
        check_buf(rt, k, "g", g, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(g))
            .ptr(rt.addr_mut(flags))
            .ptr(rt.addr(dresid))
            .f32(scale)
            .i32(as_i32(k, "n", n)?)
            .i32(block_arg(k, block)?);
        // SAFETY: the arguments are the kernel's; g and dresid hold n elements, flags block + 1
        // or more.
        unsafe { rt.launch(k, elementwise(n), &args) }
    }

    fn grad_unscale_add<G: Elem>(
        &self,
        dresid: &mut R::Buf<f32>,
        flags: &mut R::Buf<u32>,
        block: usize,
        g: &R::Buf<G>,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for::<G>("gradscale_unscale_add_f32", "gradscale_unscale_add_f16")?;
        let rt = &self.0;
        let n = rt.len(dresid);
        check_scale_args::<G>(k, rt.len(flags), block, scale)?;
        check_buf(rt, k, "g", g, n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(dresid))
            .ptr(rt.addr_mut(flags))
            .ptr(rt.addr(g))
            .f32(scale)
            .i32(as_i32(k, "n", n)?)
            .i32(block_arg(k, block)?);
        // SAFETY: as in grad_scale.
        unsafe { rt.launch(k, elementwise(n), &args) }
    }

    fn grad_param_finite(
        &self,
        flags: &mut R::Buf<u32>,
        grads: &R::Buf<f32>,
        ranges: &[Range<usize>],
    ) -> Result<()> {
        const K: &str = "gradscale_param_finite_f32";
        let rt = &self.0;
        check_ranges(K, rt.len(flags), rt.len(grads), ranges)?;
        if ranges.is_empty() {
            return Ok(());
        }
        // Offsets and lengths as the kernel's u32s (the gradient buffer's indices must fit).
        let as_u32 = |what: &str, v: usize| {
            u32::try_from(v).map_err(|_| KernelError::Shape {
                op: K,
                what: format!("{what} {v} exceeds the kernel's 32-bit offsets"),
            })
        };
        let mut offsets = Vec::with_capacity(ranges.len());
        let mut lens = Vec::with_capacity(ranges.len());
        for r in ranges {
            offsets.push(as_u32("offset", r.start)?);
            lens.push(as_u32("end", r.end).map(|_| (r.end - r.start) as u32)?);
        }
        let y = u32::try_from(ranges.len())
            .ok()
            .filter(|&y| y <= 65_535)
            .ok_or_else(|| KernelError::Shape {
                op: K,
                what: format!("{} ranges exceed the grid's 65535 rows", ranges.len()),
            })?;
        let longest = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
        // Spread the blocks over the ranges: about MAX_BLOCKS in all.
        let x = longest
            .div_ceil(THREADS)
            .clamp(1, (MAX_BLOCKS / ranges.len()).max(1)) as u32;
        let offsets = rt.upload(&offsets)?;
        let lens = rt.upload(&lens)?;
        let args = Args::new()
            .ptr(rt.addr_mut(flags))
            .ptr(rt.addr(grads))
            .ptr(rt.addr(&offsets))
            .ptr(rt.addr(&lens));
        let cfg = LaunchCfg {
            grid: [x, y, 1],
            block: [THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: one flag, offset and length per grid row; every range lies inside grads.
        unsafe { rt.launch(K, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu, Device};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;
    use half::f16;

    /// Gradients with planted non-finite values: `bad` indices get inf, −inf, NaN or a value that
    /// overflows f16 once scaled, in turn.
    fn planted(n: usize, seed: u64, bad: &[usize]) -> Vec<f32> {
        let mut v = rand_vec(n, 3.0, seed);
        let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e30];
        for (k, &i) in bad.iter().enumerate() {
            v[i] = specials[k % specials.len()];
        }
        v
    }

    /// Scale-and-cast into resblock `block`'s flag, then unscale-and-add of another gradient into
    /// a non-zero residual gradient, flagging resblock `block + 1`. Returns (g, dresid, flags).
    fn run<D: GradScaleOps, G: Elem>(
        dev: &D,
        n: usize,
        bad_in: &[usize],
        bad_out: &[usize],
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let flags0 = [0u32, 0, 0, 1];
        let mut flags = dev.upload(&flags0).unwrap();
        let dresid = dev.upload(&planted(n, 1, bad_in)).unwrap();
        let mut g = dev.upload(&narrow::<G>(&rand_vec(n, 1.0, 2))).unwrap();
        dev.grad_scale(&mut g, &mut flags, 1, &dresid, scale)
            .unwrap();
        let out = narrow::<G>(
            &planted(n, 3, bad_out)
                .iter()
                .map(|x| x * scale)
                .collect::<Vec<_>>(),
        );
        let out = dev.upload(&out).unwrap();
        let mut acc = dev.upload(&rand_vec(n, 1.0, 4)).unwrap();
        dev.grad_unscale_add(&mut acc, &mut flags, 2, &out, scale)
            .unwrap();
        (
            widen(&dev.download(&g).unwrap()).into_owned(),
            dev.download(&acc).unwrap(),
            dev.download(&flags).unwrap(),
        )
    }

    /// Bitwise: the same f32 products, divisions and additions, the same f16 rounding.
    #[track_caller]
    fn same(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{what}[{i}]: got {g}, reference {w}"
            );
        }
    }

    fn parity<G: Elem>() {
        // n: less than a warp, a partial block, more than MAX_BLOCKS blocks (the grid stride).
        for &(n, ref bad_in, ref bad_out) in &[
            (7usize, vec![], vec![]),
            (7, vec![6], vec![]),
            (300, vec![], vec![299]),
            (1000, vec![0, 513, 777, 998], vec![5, 900, 901]),
        ] {
            for scale in [1.0f32, 3000.5, 65536.0] {
                let want = run::<_, G>(&Cpu, n, bad_in, bad_out, scale);
                // Something was flagged exactly where planted.
                let flagged_in = !bad_in.is_empty() || (G::DTYPE == "f16" && scale > 1e4);
                assert_eq!(
                    want.2[1], flagged_in as u32,
                    "reference flags n={n} scale={scale}"
                );
                crate::gpu::for_each_gpu!(s, dev, {
                    let got = run::<_, G>(dev, n, bad_in, bad_out, scale);
                    let at = format!("{} n={n} scale={scale} {s:?}", G::DTYPE);
                    same(&format!("g {at}"), &got.0, &want.0);
                    same(&format!("dresid {at}"), &got.1, &want.1);
                    assert_eq!(got.2, want.2, "flags {at}");
                });
            }
        }
    }

    #[test]
    fn emulated_scaling_matches_the_cpu_reference_in_f16() {
        parity::<f16>();
    }

    #[test]
    fn emulated_scaling_matches_the_cpu_reference_in_f32() {
        parity::<f32>();
    }

    #[test]
    fn emulated_param_finiteness_matches_the_cpu_reference() {
        let n = 2000;
        let grads = planted(n, 5, &[3, 40, 41, 1999, 1200]);
        // Empty, short, long (more than MAX_BLOCKS blocks), overlapping ranges; flags that start
        // raised stay raised.
        let ranges = [
            0..3,
            3..4,
            4..40,
            42..1199,
            1199..1201,
            1201..1999,
            100..100,
            1000..2000,
        ];
        let flags0 = [0u32, 0, 0, 0, 0, 0, 1, 0];
        let mut want = flags0.to_vec();
        Cpu.grad_param_finite(&mut want, &grads, &ranges).unwrap();
        assert_eq!(want, [0, 1, 0, 0, 1, 0, 1, 1]);
        crate::gpu::for_each_gpu!(s, dev, {
            let mut flags = dev.upload(&flags0).unwrap();
            let g = dev.upload(&grads).unwrap();
            dev.grad_param_finite(&mut flags, &g, &ranges).unwrap();
            assert_eq!(dev.download(&flags).unwrap(), want, "{s:?}");
        });
    }

    #[test]
    fn bad_arguments_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let d = vec![0.0f32; 8];
        let mut flags = vec![0u32; 2];
        let mut g = vec![f16::ZERO; 7];
        let err = dev
            .grad_scale(&mut g, &mut flags, 0, &d, 2.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gradscale_scale_f16") && err.contains("`g`"),
            "{err}"
        );
        let mut g = vec![f16::ZERO; 8];
        let err = dev
            .grad_scale(&mut g, &mut flags, 2, &d, 2.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("resblock 2"), "{err}");
        let err = dev
            .grad_scale(&mut g, &mut flags, 0, &d, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scale 0"), "{err}");
        let mut acc = vec![0.0f32; 8];
        let gu = vec![0u32; 8];
        let err = dev
            .grad_unscale_add(&mut acc, &mut flags, 0, &gu, 2.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
        let err = dev
            .grad_param_finite(&mut flags, &d, &[0..4, 4..9])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gradscale_param_finite_f32") && err.contains("4..9"),
            "{err}"
        );
        let err = dev
            .grad_param_finite(&mut flags, &d, std::slice::from_ref(&(0..4)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`flags`"), "{err}");
        assert_eq!(flags, [0, 0]);
    }
}
