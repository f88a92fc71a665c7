//! Launcher of `kernels/cuda/scale_add.cu`: `y = a·y + b·x`, for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, elementwise, Args, Gpu, Runtime};
use crate::error::Result;
use crate::scale_add::ScaleAddOps;

impl<R: Runtime> ScaleAddOps for Gpu<R> {
    fn scale_add(&self, y: &mut R::Buf<f32>, a: f32, x: &R::Buf<f32>, b: f32) -> Result<()> {
        const K: &str = "scale_add_f32";
        let rt = &self.0;
        let n = rt.len(y);
        check_buf(rt, K, "x", x, n)?;
        let ni = as_i32(K, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(y))
            .ptr(rt.addr(x))
            .f32(a)
            .f32(b)
            .i32(ni);
        // SAFETY: the kernel's arguments; `y` and `x` hold n f32 each.
        unsafe { rt.launch(K, elementwise(n), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;

    /// `y = a·y + b·x` on `dev` for the three uses (a general pair, a = 0 over a y full of NaN,
    /// a = b = 1), chained on one buffer.
    fn run<D: ScaleAddOps>(dev: &D, n: usize) -> Vec<f32> {
        let mut y = dev.upload(&vec![f32::NAN; n]).unwrap();
        let x = dev.upload(&rand_vec(n, 3.0, n as u64)).unwrap();
        dev.scale_add(&mut y, 0.0, &x, 0.0625).unwrap();
        let x2 = dev.upload(&rand_vec(n, 1.0, n as u64 + 1)).unwrap();
        dev.scale_add(&mut y, 1.0 / 3.0, &x2, 1.0).unwrap();
        dev.scale_add(&mut y, 1.0, &x, 1.0).unwrap();
        dev.download(&y).unwrap()
    }

    #[test]
    fn emulated_kernel_matches_the_cpu_reference_bit_for_bit() {
        for n in [1, 255, 257, 3000] {
            let want = run(&Cpu, n);
            assert!(want.iter().all(|v| v.is_finite()), "a = 0 does not read y");
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run(dev, n);
                // Exact: the same roundings in the same order (no fused multiply-add).
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "n={n} {s}");
            });
        }
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let mut y = vec![0.0f32; 4];
        let err = dev
            .scale_add(&mut y, 1.0, &vec![0.0f32; 5], 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scale_add_f32") && err.contains("`x`"),
            "{err}"
        );
    }
}
