//! Launchers of `kernels/cuda/relu.cu`: ReLU forward and backward, for [`Gpu`] over either
//! runtime.

use super::kernel_for;
use super::resample::per_element;
use super::{as_i32, check_buf, Args, Gpu, Runtime};
use crate::device::Elem;
use crate::error::Result;
use crate::relu::ReluOps;

impl<R: Runtime> ReluOps for Gpu<R> {
    fn relu_forward<T: Elem>(&self, out: &mut R::Buf<T>, inp: &R::Buf<T>) -> Result<()> {
        let k = kernel_for::<T>("relu_forward_f32", "relu_forward_f16")?;
        let rt = &self.0;
        let n = rt.len(inp);
        check_buf(rt, k, "out", out, n)?;
        if n == 0 {
            return Ok(());
        }
        let cfg = per_element(k, n)?;
        let args = Args::new()
            .ptr(rt.addr_mut(out))
            .ptr(rt.addr(inp))
            .i32(as_i32(k, "n", n)?);
        // SAFETY: the kernel's arguments; both buffers hold n elements.
        unsafe { rt.launch(k, cfg, &args) }
    }

    fn relu_backward<T: Elem>(
        &self,
        dinp: &mut R::Buf<T>,
        dout: &R::Buf<T>,
        inp: &R::Buf<T>,
    ) -> Result<()> {
        let k = kernel_for::<T>("relu_backward_f32", "relu_backward_f16")?;
        let rt = &self.0;
        let n = rt.len(inp);
        check_buf(rt, k, "dout", dout, n)?;
        check_buf(rt, k, "dinp", dinp, n)?;
        if n == 0 {
            return Ok(());
        }
        let cfg = per_element(k, n)?;
        let args = Args::new()
            .ptr(rt.addr_mut(dinp))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(inp))
            .i32(as_i32(k, "n", n)?);
        // SAFETY: the kernel's arguments; all three buffers hold n elements.
        unsafe { rt.launch(k, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;

    /// Forward and backward on `dev`, as f32. The input holds exact zeros (the derivative's edge)
    /// and a NaN; outputs start from garbage so that a skipped element shows.
    fn run<D: ReluOps, T: Elem>(dev: &D, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut x = rand_vec(n, 2.0, n as u64);
        for i in (0..n).step_by(7) {
            x[i] = 0.0;
        }
        x[n / 2] = f32::NAN;
        let up = |v: &[f32]| dev.upload(&narrow::<T>(v)).unwrap();
        let x = up(&x);
        let mut y = up(&rand_vec(n, 9.0, 1));
        dev.relu_forward(&mut y, &x).unwrap();
        let dy = up(&rand_vec(n, 1.0, 2));
        let mut dx = up(&rand_vec(n, 9.0, 3));
        dev.relu_backward(&mut dx, &dy, &x).unwrap();
        let down = |b: &D::Buf<T>| widen(&dev.download(b).unwrap()).into_owned();
        (down(&y), down(&dx))
    }

    fn parity<T: Elem>() {
        for n in [1, 31, 257, 1000] {
            let want = run::<_, T>(&Cpu, n);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, n);
                // Exact: a selection, no arithmetic.
                for (what, g, r) in [("y", &got.0, &want.0), ("dx", &got.1, &want.1)] {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(g), bits(r), "{what} {} n={n} {s:?}", T::DTYPE);
                }
            });
        }
    }

    #[test]
    fn emulated_kernels_match_the_cpu_reference_in_f32() {
        parity::<f32>();
    }

    #[test]
    fn emulated_kernels_match_the_cpu_reference_in_f16() {
        parity::<half::f16>();
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let x = vec![1.0f32; 5];
        let mut y = vec![0.0f32; 4];
        let err = dev.relu_forward(&mut y, &x).unwrap_err().to_string();
        assert!(
            err.contains("relu_forward_f32") && err.contains("`out`"),
            "{err}"
        );
        let mut dx = vec![0.0f32; 5];
        let err = dev.relu_backward(&mut dx, &y, &x).unwrap_err().to_string();
        assert!(
            err.contains("relu_backward_f32") && err.contains("`dout`"),
            "{err}"
        );
    }
}
