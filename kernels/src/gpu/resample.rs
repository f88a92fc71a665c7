//! Launchers of `kernels/cuda/resample.cu`: 2×2 max-pooling and nearest ×2 upsampling, forward
//! and backward, for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::Result;
use crate::resample::{check_even, ResampleOps};

/// Threads per block of the element-wise kernels (one thread per output element or window).
const THREADS: usize = 256;

/// One thread per element of `total` (the kernels index in 32 bits: `total` must fit an `int`).
pub(super) fn per_element(k: &'static str, total: usize) -> Result<LaunchCfg> {
    as_i32(k, "the element count", total)?;
    Ok(LaunchCfg::linear(
        total.div_ceil(THREADS) as u32,
        THREADS as u32,
    ))
}

/// Checks the sizes, then launches `k(out, a, [b,] planes, h, w)` with one thread per `threads`.
#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime>(
    rt: &R,
    k: &'static str,
    out: u64,
    ins: &[u64],
    planes: usize,
    h: usize,
    w: usize,
    threads: usize,
) -> Result<()> {
    let cfg = per_element(k, threads)?;
    let mut args = Args::new().ptr(out);
    for &a in ins {
        args = args.ptr(a);
    }
    let args = args
        .i32(as_i32(k, "planes", planes)?)
        .i32(as_i32(k, "h", h)?)
        .i32(as_i32(k, "w", w)?);
    // SAFETY: the caller checked every buffer against (planes, h, w), and the largest of them
    // fits the kernels' 32-bit indices.
    unsafe { rt.launch(k, cfg, &args) }
}

impl<R: Runtime> ResampleOps for Gpu<R> {
    fn maxpool2_forward<T: Elem>(
        &self,
        out: &mut R::Buf<T>,
        inp: &R::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>(
            "resample_maxpool_forward_f32",
            "resample_maxpool_forward_f16",
        )?;
        let rt = &self.0;
        check_even(k, h, w)?;
        check_buf(rt, k, "inp", inp, planes * h * w)?;
        check_buf(rt, k, "out", out, planes * h * w / 4)?;
        as_i32(k, "planes·H·W", planes * h * w)?;
        if planes * h * w == 0 {
            return Ok(());
        }
        let (o, i) = (rt.addr_mut(out), rt.addr(inp));
        launch(rt, k, o, &[i], planes, h, w, planes * h * w / 4)
    }

    fn maxpool2_backward<T: Elem>(
        &self,
        dinp: &mut R::Buf<T>,
        dout: &R::Buf<T>,
        inp: &R::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>(
            "resample_maxpool_backward_f32",
            "resample_maxpool_backward_f16",
        )?;
        let rt = &self.0;
        check_even(k, h, w)?;
        check_buf(rt, k, "inp", inp, planes * h * w)?;
        check_buf(rt, k, "dinp", dinp, planes * h * w)?;
        check_buf(rt, k, "dout", dout, planes * h * w / 4)?;
        as_i32(k, "planes·H·W", planes * h * w)?;
        if planes * h * w == 0 {
            return Ok(());
        }
        let (d, g, i) = (rt.addr_mut(dinp), rt.addr(dout), rt.addr(inp));
        launch(rt, k, d, &[g, i], planes, h, w, planes * h * w / 4)
    }

    fn upsample2_forward<T: Elem>(
        &self,
        out: &mut R::Buf<T>,
        inp: &R::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>(
            "resample_upsample_forward_f32",
            "resample_upsample_forward_f16",
        )?;
        let rt = &self.0;
        check_buf(rt, k, "inp", inp, planes * h * w)?;
        check_buf(rt, k, "out", out, planes * h * w * 4)?;
        if planes * h * w == 0 {
            return Ok(());
        }
        let (o, i) = (rt.addr_mut(out), rt.addr(inp));
        launch(rt, k, o, &[i], planes, h, w, planes * h * w * 4)
    }

    fn upsample2_backward<T: Elem>(
        &self,
        dinp: &mut R::Buf<T>,
        dout: &R::Buf<T>,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let k = kernel_for::<T>(
            "resample_upsample_backward_f32",
            "resample_upsample_backward_f16",
        )?;
        let rt = &self.0;
        check_buf(rt, k, "dinp", dinp, planes * h * w)?;
        check_buf(rt, k, "dout", dout, planes * h * w * 4)?;
        as_i32(k, "planes·2H·2W", planes * h * w * 4)?;
        if planes * h * w == 0 {
            return Ok(());
        }
        let (d, g) = (rt.addr_mut(dinp), rt.addr(dout));
        launch(rt, k, d, &[g], planes, h, w, planes * h * w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;

    /// Every output of the four ops on `dev`, as f32. Inputs are rounded to a coarse grid (steps
    /// of 1/4 in [-2, 2]) so that windows hold ties, which must go to the first maximum; the
    /// outputs start from NaN-free garbage so that a skipped element shows.
    fn run<D: ResampleOps, T: Elem>(dev: &D, planes: usize, h: usize, w: usize) -> Vec<Vec<f32>> {
        let seed = (planes * 100 + h * 10 + w) as u64;
        let coarse = |v: Vec<f32>| {
            v.iter()
                .map(|x| (x * 4.0).round() / 4.0)
                .collect::<Vec<_>>()
        };
        let up = |v: &[f32]| dev.upload(&narrow::<T>(v)).unwrap();
        let down = |b: &D::Buf<T>| widen(&dev.download(b).unwrap()).into_owned();
        let n = planes * h * w;
        let x = up(&coarse(rand_vec(n, 2.0, seed)));
        let mut pooled = up(&rand_vec(n / 4, 9.0, seed + 1));
        dev.maxpool2_forward(&mut pooled, &x, planes, h, w).unwrap();
        let dpool = up(&rand_vec(n / 4, 1.0, seed + 2));
        let mut dx = up(&rand_vec(n, 9.0, seed + 3));
        dev.maxpool2_backward(&mut dx, &dpool, &x, planes, h, w)
            .unwrap();
        let mut upsampled = up(&rand_vec(4 * n, 9.0, seed + 4));
        dev.upsample2_forward(&mut upsampled, &x, planes, h, w)
            .unwrap();
        let dup = up(&rand_vec(4 * n, 1.0, seed + 5));
        let mut dxu = up(&rand_vec(n, 9.0, seed + 6));
        dev.upsample2_backward(&mut dxu, &dup, planes, h, w)
            .unwrap();
        vec![down(&pooled), down(&dx), down(&upsampled), down(&dxu)]
    }

    fn parity<T: Elem>() {
        // Odd plane counts and sizes whose element counts fill no block evenly.
        for &(planes, h, w) in &[(3, 6, 10), (1, 2, 2), (7, 14, 4), (5, 34, 22)] {
            let want = run::<_, T>(&Cpu, planes, h, w);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, planes, h, w);
                for (name, (g, r)) in ["maxpool", "dmaxpool", "upsample", "dupsample"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    // Exact: selections and copies, and the same four f32 additions in the same
                    // order (then the same rounding to f16).
                    assert_eq!(g.len(), r.len());
                    for (i, (a, b)) in g.iter().zip(r).enumerate() {
                        assert!(
                            a.to_bits() == b.to_bits(),
                            "{name} {} planes={planes} {h}×{w} {s:?} [{i}]: got {a}, reference {b}",
                            T::DTYPE
                        );
                    }
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
    fn ties_go_to_the_first_maximum_in_row_major_order() {
        // Every window a tie between two or more positions.
        #[rustfmt::skip]
        let x: Vec<f32> = vec![
            1.0, 1.0,   0.0, 2.0,   3.0, 0.0,
            1.0, 1.0,   0.0, 2.0,   0.0, 3.0,
        ];
        let dev = Gpu(Emu::new(Schedule::Reverse));
        let mut dx = vec![9.0f32; 12];
        dev.maxpool2_backward(&mut dx, &vec![1.0, 2.0, 3.0], &x, 1, 2, 6)
            .unwrap();
        #[rustfmt::skip]
        assert_eq!(dx, vec![
            1.0, 0.0,   0.0, 2.0,   3.0, 0.0,
            0.0, 0.0,   0.0, 0.0,   0.0, 0.0,
        ]);
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let x = vec![0.0f32; 2 * 3 * 4];
        let mut y = vec![0.0f32; 6];
        let err = dev
            .maxpool2_forward(&mut y, &x, 2, 3, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resample_maxpool_forward_f32") && err.contains("even"),
            "{err}"
        );
        let x = vec![0.0f32; 2 * 4 * 4];
        let mut y = vec![0.0f32; 7];
        let err = dev
            .maxpool2_forward(&mut y, &x, 2, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`out`"), "{err}");
        let mut dx = vec![0.0f32; 2 * 4 * 4];
        let err = dev
            .upsample2_backward(&mut dx, &x, 2, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resample_upsample_backward_f32") && err.contains("`dout`"),
            "{err}"
        );
        let mut yu = vec![0u32; 8];
        let xu = vec![0u32; 32];
        let err = dev
            .maxpool2_forward(&mut yu, &xu, 2, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
    }
}
