//! Launchers of `kernels/cuda/gelu.cu`: GELU forward and backward in f32 or f16 storage, for
//! [`Gpu`] over either runtime.

use super::{as_i32, check_buf, elementwise, kernel_for, Args, Gpu, Runtime};
use crate::device::Elem;
use crate::error::Result;
use crate::gelu::GeluOps;

impl<R: Runtime> GeluOps for Gpu<R> {
    fn gelu_forward<T: Elem>(&self, out: &mut R::Buf<T>, inp: &R::Buf<T>) -> Result<()> {
        let k = kernel_for::<T>("gelu_forward_f32", "gelu_forward_f16")?;
        self.unary(k, out, inp)
    }

    fn gelu_backward<T: Elem>(
        &self,
        dinp: &mut R::Buf<T>,
        dout: &R::Buf<T>,
        inp: &R::Buf<T>,
    ) -> Result<()> {
        let k = kernel_for::<T>("gelu_backward_f32", "gelu_backward_f16")?;
        let rt = &self.0;
        let n = rt.len(inp);
        check_buf(rt, k, "dinp", dinp, n)?;
        check_buf(rt, k, "dout", dout, n)?;
        let ni = as_i32(k, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(dinp))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(inp))
            .i32(ni);
        // SAFETY: the arguments are the kernel's; all three buffers hold n elements of T.
        unsafe { rt.launch(k, elementwise(n), &args) }
    }

    fn quick_gelu_forward(&self, out: &mut R::Buf<f32>, inp: &R::Buf<f32>) -> Result<()> {
        self.unary("quick_gelu_forward_f32", out, inp)
    }

    fn gelu_erf_forward(&self, out: &mut R::Buf<f32>, inp: &R::Buf<f32>) -> Result<()> {
        self.unary("gelu_erf_forward_f32", out, inp)
    }
}

impl<R: Runtime> Gpu<R> {
    /// Launches the element-wise kernel `k(out, inp, n)` over buffers of `T`.
    fn unary<T: Elem>(&self, k: &'static str, out: &mut R::Buf<T>, inp: &R::Buf<T>) -> Result<()> {
        let rt = &self.0;
        let n = rt.len(inp);
        check_buf(rt, k, "out", out, n)?;
        let ni = as_i32(k, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new().ptr(rt.addr_mut(out)).ptr(rt.addr(inp)).i32(ni);
        // SAFETY: the arguments are the kernel's; both buffers hold n elements of T.
        unsafe { rt.launch(k, elementwise(n), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu, Device};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};
    use half::f16;

    /// Forward and backward on `dev` in storage type `T`; outputs start as garbage (non-zero),
    /// so an element left unwritten shows.
    fn run<D: GeluOps, T: Elem>(dev: &D, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let x = dev.upload(&narrow::<T>(&rand_vec(n, 5.0, seed))).unwrap();
        let dy = dev
            .upload(&narrow::<T>(&rand_vec(n, 1.0, seed + 1)))
            .unwrap();
        let mut y = dev
            .upload(&narrow::<T>(&rand_vec(n, 9.0, seed + 2)))
            .unwrap();
        let mut dx = dev
            .upload(&narrow::<T>(&rand_vec(n, 9.0, seed + 3)))
            .unwrap();
        dev.gelu_forward(&mut y, &x).unwrap();
        dev.gelu_backward(&mut dx, &dy, &x).unwrap();
        (
            widen(&dev.download(&y).unwrap()).into_owned(),
            widen(&dev.download(&dx).unwrap()).into_owned(),
        )
    }

    fn parity<T: Elem>(atol: f32, rtol: f32) {
        for &n in &[1usize, 255, 1000, 4099] {
            let want = run::<_, T>(&Cpu, n, 3 + n as u64);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, n, 3 + n as u64);
                let at = format!("{} n={n} {s:?}", T::DTYPE);
                close(&format!("gelu {at}"), &got.0, &want.0, atol, rtol);
                close(&format!("dgelu {at}"), &got.1, &want.1, atol, rtol);
            });
        }
    }

    #[test]
    fn emulated_gelu_matches_the_cpu_reference_in_f32() {
        // The reference's tanh is a polynomial one (absolute error ≈ 2e-7), the kernel's is
        // tanhf: the difference, times |u|·(1 + 0.13·u²) ≤ 20 for |u| ≤ 5 in the derivative,
        // stays under 5e-6.
        parity::<f32>(5e-6, 1e-5);
    }

    #[test]
    fn emulated_gelu_matches_the_cpu_reference_in_f16() {
        // Both sides round f32 values that differ as above to f16: one f16 step (2⁻¹⁰
        // relative; 6e-8 among subnormals) at most.
        parity::<f16>(5e-6, 1e-3);
    }

    #[test]
    fn emulated_clip_activations_match_the_cpu_references() {
        // expf and erff against the references' f32 exp and f64 erf: a few ulps of values up to
        // |u| = 5.
        for &n in &[1usize, 255, 4099] {
            let x = rand_vec(n, 5.0, 17 + n as u64);
            let mut want = (vec![0.0f32; n], vec![0.0f32; n]);
            Cpu.quick_gelu_forward(&mut want.0, &x).unwrap();
            Cpu.gelu_erf_forward(&mut want.1, &x).unwrap();
            crate::gpu::for_each_gpu!(s, dev, {
                let xd = dev.upload(&x).unwrap();
                let mut y = dev.upload(&rand_vec(n, 9.0, 5)).unwrap();
                dev.quick_gelu_forward(&mut y, &xd).unwrap();
                let got = dev.download(&y).unwrap();
                close(
                    &format!("quick_gelu n={n} {s:?}"),
                    &got,
                    &want.0,
                    2e-6,
                    1e-5,
                );
                dev.gelu_erf_forward(&mut y, &xd).unwrap();
                let got = dev.download(&y).unwrap();
                close(&format!("gelu_erf n={n} {s:?}"), &got, &want.1, 2e-6, 1e-5);
            });
        }
        let dev = Gpu(Emu::new(Schedule::Forward));
        let err = dev
            .quick_gelu_forward(&mut vec![0.0f32; 3], &vec![0.0f32; 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quick_gelu_forward_f32") && err.contains("`out`"),
            "{err}"
        );
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let err = dev
            .gelu_forward(&mut vec![0.0f32; 3], &vec![0.0f32; 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gelu_forward_f32") && err.contains("`out`"),
            "{err}"
        );
        let err = dev
            .gelu_backward(
                &mut vec![f16::ZERO; 4],
                &vec![f16::ZERO; 5],
                &vec![f16::ZERO; 4],
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gelu_backward_f16") && err.contains("`dout`"),
            "{err}"
        );
        let err = dev
            .gelu_forward(&mut vec![0u32; 4], &vec![0u32; 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
    }
}
