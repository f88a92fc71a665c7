//! Launcher of `kernels/cuda/cast.cu`: f32 values stored as f32 or f16, for [`Gpu`] over either
//! runtime.

use super::{as_i32, check_buf, elementwise, kernel_for, Args, Gpu, Runtime};
use crate::cast::CastOps;
use crate::device::Elem;
use crate::error::Result;

impl<R: Runtime> CastOps for Gpu<R> {
    fn cast_from_f32<T: Elem>(&self, out: &mut R::Buf<T>, inp: &R::Buf<f32>) -> Result<()> {
        let k = kernel_for::<T>("cast_from_f32_f32", "cast_from_f32_f16")?;
        let rt = &self.0;
        let n = rt.len(inp);
        check_buf(rt, k, "out", out, n)?;
        let ni = as_i32(k, "n", n)?;
        if n == 0 {
            return Ok(());
        }
        let args = Args::new().ptr(rt.addr_mut(out)).ptr(rt.addr(inp)).i32(ni);
        // SAFETY: the arguments are the kernel's; `out` holds n elements of T, `inp` n f32.
        unsafe { rt.launch(k, elementwise(n), &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;
    use half::f16;

    /// Values that exercise every case of the rounding: ordinary ones over a wide range, ties
    /// between two f16 values, subnormals, values that overflow f16, ±inf and NaN.
    fn inputs(n: usize, seed: u64) -> Vec<f32> {
        let mut x = rand_vec(n, 1.0, seed);
        for (i, v) in x.iter_mut().enumerate() {
            *v = match i % 8 {
                0 => *v * 7e4,  // around and beyond f16's max (65504)
                1 => *v * 1e-6, // f16 subnormals
                2 => 1.0 + (2 * (i % 5) + 1) as f32 * 2f32.powi(-11), // exact ties
                3 => [f32::INFINITY, f32::NEG_INFINITY, f32::NAN][i % 3],
                _ => *v * 100.0,
            };
        }
        x
    }

    /// The cast on `dev`; `out` starts as garbage, so an element left unwritten shows.
    fn run<D: CastOps, T: Elem>(dev: &D, x: &[f32]) -> Vec<T> {
        let inp = dev.upload(x).unwrap();
        let mut out = dev.upload(&narrow::<T>(&vec![3.25; x.len()])).unwrap();
        dev.cast_from_f32(&mut out, &inp).unwrap();
        dev.download(&out).unwrap()
    }

    /// Bit for bit (NaN as NaN): rounding to nearest even has one answer.
    fn parity<T: Elem>(bits: impl Fn(T) -> u32, is_nan: impl Fn(T) -> bool) {
        for &n in &[1usize, 255, 1000, 4099] {
            let x = inputs(n, 11 + n as u64);
            let want = run::<_, T>(&Cpu, &x);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, &x);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (is_nan(g) && is_nan(w)) || bits(g) == bits(w),
                        "cast {} n={n} {s}: [{i}] of {} gave {g:?}, reference {w:?}",
                        T::DTYPE,
                        x[i]
                    );
                }
            });
        }
    }

    #[test]
    fn emulated_cast_matches_the_cpu_reference_bit_for_bit() {
        parity::<f16>(|v| v.to_bits() as u32, |v| v.is_nan());
        parity::<f32>(|v| v.to_bits(), |v| v.is_nan());
    }

    #[test]
    fn the_reference_rounds_to_nearest_even_and_overflows_to_inf() {
        let x = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            65520.0,
            -1e6,
            65519.0,
        ];
        let got = run::<_, f16>(&Cpu, &x);
        assert_eq!(got[0], f16::from_f32(1.0)); // tie: down to the even mantissa
        assert_eq!(got[1], f16::from_f32(1.0 + 2.0 * 2f32.powi(-10))); // tie: up to the even one
        assert_eq!(got[2], f16::INFINITY);
        assert_eq!(got[3], f16::NEG_INFINITY);
        assert_eq!(got[4], f16::MAX);
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let err = dev
            .cast_from_f32(&mut vec![f16::ZERO; 3], &vec![0.0f32; 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cast_from_f32_f16") && err.contains("`out`"),
            "{err}"
        );
        let err = dev
            .cast_from_f32(&mut vec![0u32; 4], &vec![0.0f32; 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
    }
}
