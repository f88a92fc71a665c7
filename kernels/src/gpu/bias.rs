//! Launchers of `kernels/cuda/bias.cu`: a linear layer's bias add and its deterministic
//! gradient (column sums), for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, elementwise, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::Result;
use crate::linear::BiasOps;

const THREADS: usize = 256;
/// Rows per chunk of the column-sum partials.
const ROWS_PER_CHUNK: usize = 64;

impl<R: Runtime> BiasOps for Gpu<R> {
    fn bias_add<T: Elem>(
        &self,
        out: &mut R::Buf<T>,
        bias: &R::Buf<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>("bias_add_f32", "bias_add_f16")?;
        let rt = &self.0;
        check_buf(rt, k, "out", out, n * oc)?;
        check_buf(rt, k, "bias", bias, oc)?;
        let (ni, oci) = (as_i32(k, "n", n)?, as_i32(k, "oc", oc)?);
        as_i32(k, "n·oc", n * oc)?;
        if n == 0 || oc == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(out))
            .ptr(rt.addr(bias))
            .i32(ni)
            .i32(oci);
        // SAFETY: the arguments are the kernel's; out is [n, oc], bias [oc] (checked).
        unsafe { rt.launch(k, elementwise(n * oc), &args) }
    }

    fn bias_backward<T: Elem>(
        &self,
        dbias: &mut R::Buf<f32>,
        dout: &R::Buf<T>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>("bias_column_partials_f32", "bias_column_partials_f16")?;
        let rt = &self.0;
        check_buf(rt, k, "dout", dout, n * oc)?;
        check_buf(rt, k, "dbias", dbias, oc)?;
        let (ni, oci) = (as_i32(k, "n", n)?, as_i32(k, "oc", oc)?);
        if n == 0 || oc == 0 {
            return Ok(());
        }
        let chunks = n.div_ceil(ROWS_PER_CHUNK);
        let mut partials = rt.take_scratch::<f32>("bias.partials", chunks * oc)?;
        let col_blocks = oc.div_ceil(THREADS) as u32;
        let args = Args::new()
            .ptr(rt.addr_mut(&mut partials))
            .ptr(rt.addr(dout))
            .i32(ni)
            .i32(oci)
            .i32(ROWS_PER_CHUNK as i32);
        let cfg = LaunchCfg {
            grid: [col_blocks, chunks as u32, 1],
            block: [THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: partials are [chunks, oc], dout [n, oc] (checked).
        unsafe { rt.launch(k, cfg, &args)? };
        let args = Args::new()
            .ptr(rt.addr_mut(dbias))
            .ptr(rt.addr(&partials))
            .i32(chunks as i32)
            .i32(oci);
        // SAFETY: as above; dbias is [oc].
        unsafe {
            rt.launch(
                "bias_column_reduce_f32",
                LaunchCfg::linear(col_blocks, THREADS as u32),
                &args,
            )?
        };
        rt.put_scratch("bias.partials", partials);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};
    use half::f16;

    /// The bias added to a non-zero `out`, and its gradient accumulated into a non-zero
    /// `dbias`.
    fn run<D: BiasOps, T: Elem>(dev: &D, n: usize, oc: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut out = dev
            .upload(&narrow::<T>(&rand_vec(n * oc, 2.0, seed)))
            .unwrap();
        let bias = dev.upload(&rand_vec(oc, 1.0, seed + 1)).unwrap();
        let dout = dev
            .upload(&narrow::<T>(&rand_vec(n * oc, 1.0, seed + 2)))
            .unwrap();
        let mut dbias = dev.upload(&rand_vec(oc, 1.0, seed + 3)).unwrap();
        dev.bias_add(&mut out, &bias, n, oc).unwrap();
        dev.bias_backward(&mut dbias, &dout, n, oc).unwrap();
        (
            widen(&dev.download(&out).unwrap()).into_owned(),
            dev.download(&dbias).unwrap(),
        )
    }

    fn parity<T: Elem>() {
        // Odd sizes: columns that do not fill a warp or a block, rows over several chunks.
        for &(n, oc) in &[(1usize, 1usize), (7, 33), (150, 5), (3, 300)] {
            let want = run::<_, T>(&Cpu, n, oc, 11 + n as u64);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, n, oc, 11 + n as u64);
                let at = format!("{} n={n} oc={oc} {s:?}", T::DTYPE);
                // One f32 addition, then the same rounding to T on both sides: exact.
                close(&format!("out {at}"), &got.0, &want.0, 0.0, 0.0);
                // f32 sums of n ≤ 150 values in [−1, 1) in chunks of 64 rows here, of 64 on
                // the CPU too but added to the accumulator in another order: a few ulps of
                // the running sum (≤ 150 · 2⁻²⁴ absolute).
                close(&format!("dbias {at}"), &got.1, &want.1, 1e-5, 1e-5);
            });
        }
    }

    #[test]
    fn emulated_bias_kernels_match_the_cpu_reference_in_f32() {
        parity::<f32>();
    }

    #[test]
    fn emulated_bias_kernels_match_the_cpu_reference_in_f16() {
        parity::<f16>();
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let err = dev
            .bias_add(&mut vec![0.0f32; 11], &vec![0.0f32; 4], 3, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bias_add_f32") && err.contains("`out`"),
            "{err}"
        );
        let err = dev
            .bias_backward(&mut vec![0.0f32; 3], &vec![f16::ZERO; 12], 3, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bias_column_partials_f16") && err.contains("`dbias`"),
            "{err}"
        );
    }
}
