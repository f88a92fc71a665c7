//! Launchers of `kernels/cuda/layernorm.cu`: fused residual-add + layernorm, forward and
//! backward, for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::{KernelError, Result};
use crate::layernorm::LayerNormOps;

/// Rows per block of the row kernels (one warp per row; `LN_ROWS_PER_BLOCK` in the source).
const ROWS_PER_BLOCK: usize = 8;
/// Rows per chunk of the parameter-gradient partials.
const ROWS_PER_CHUNK: usize = 256;
/// Threads per block of the column kernels.
const COL_THREADS: usize = 256;

impl<R: Runtime> LayerNormOps for Gpu<R> {
    fn layernorm_forward<O: Elem>(
        &self,
        x_out: Option<&mut R::Buf<f32>>,
        y: &mut R::Buf<O>,
        mean: &mut R::Buf<f32>,
        rstd: &mut R::Buf<f32>,
        x: &R::Buf<f32>,
        delta: Option<&R::Buf<f32>>,
        weight: &R::Buf<f32>,
        bias: &R::Buf<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for::<O>("layernorm_forward_f32", "layernorm_forward_f16")?;
        let rt = &self.0;
        check_buf(rt, k, "x", x, n * c)?;
        check_buf(rt, k, "y", y, n * c)?;
        check_buf(rt, k, "mean", mean, n)?;
        check_buf(rt, k, "rstd", rstd, n)?;
        check_buf(rt, k, "weight", weight, c)?;
        check_buf(rt, k, "bias", bias, c)?;
        let x_out_addr = match (delta, x_out) {
            (Some(d), Some(xo)) => {
                check_buf(rt, k, "delta", d, n * c)?;
                check_buf(rt, k, "x_out", xo, n * c)?;
                rt.addr_mut(xo)
            }
            (None, _) => 0,
            (Some(_), None) => {
                return Err(KernelError::Shape {
                    op: k,
                    what: "a residual delta needs an x_out buffer for x + delta".into(),
                })
            }
        };
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (ni, ci) = (as_i32(k, "n", n)?, as_i32(k, "c", c)?);
        let args = Args::new()
            .ptr(x_out_addr)
            .ptr(rt.addr_mut(y))
            .ptr(rt.addr_mut(mean))
            .ptr(rt.addr_mut(rstd))
            .ptr(rt.addr(x))
            .ptr(delta.map_or(0, |d| rt.addr(d)))
            .ptr(rt.addr(weight))
            .ptr(rt.addr(bias))
            .i32(ni)
            .i32(ci);
        let blocks = n.div_ceil(ROWS_PER_BLOCK) as u32;
        // SAFETY: the arguments are the kernel's, and every buffer was checked above.
        unsafe {
            rt.launch(
                k,
                LaunchCfg::linear(blocks, 32 * ROWS_PER_BLOCK as u32),
                &args,
            )
        }
    }

    fn layernorm_backward<G: Elem>(
        &self,
        dinp: &mut R::Buf<f32>,
        dweight: &mut R::Buf<f32>,
        dbias: &mut R::Buf<f32>,
        dout: &R::Buf<G>,
        inp: &R::Buf<f32>,
        weight: &R::Buf<f32>,
        mean: &R::Buf<f32>,
        rstd: &R::Buf<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let k = kernel_for::<G>("layernorm_backward_f32", "layernorm_backward_f16")?;
        let kp = kernel_for::<G>(
            "layernorm_param_partials_f32",
            "layernorm_param_partials_f16",
        )?;
        let rt = &self.0;
        for (name, len, want) in [
            ("dinp", rt.len(dinp), n * c),
            ("dout", rt.len(dout), n * c),
            ("inp", rt.len(inp), n * c),
            ("dweight", rt.len(dweight), c),
            ("dbias", rt.len(dbias), c),
            ("weight", rt.len(weight), c),
            ("mean", rt.len(mean), n),
            ("rstd", rt.len(rstd), n),
        ] {
            crate::error::check_len(k, name, len, want)?;
        }
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (ni, ci) = (as_i32(k, "n", n)?, as_i32(k, "c", c)?);
        let args = Args::new()
            .ptr(rt.addr_mut(dinp))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(inp))
            .ptr(rt.addr(weight))
            .ptr(rt.addr(mean))
            .ptr(rt.addr(rstd))
            .i32(ni)
            .i32(ci);
        let blocks = n.div_ceil(ROWS_PER_BLOCK) as u32;
        // SAFETY: as in the forward pass.
        unsafe {
            rt.launch(
                k,
                LaunchCfg::linear(blocks, 32 * ROWS_PER_BLOCK as u32),
                &args,
            )?
        };

        let chunks = n.div_ceil(ROWS_PER_CHUNK);
        if chunks > 65_535 {
            return Err(KernelError::Shape {
                op: kp,
                what: format!("n = {n} rows: {chunks} row chunks exceed the grid's 65535 in y"),
            });
        }
        let mut pw = rt.take_scratch::<f32>("layernorm.dweight_partials", chunks * c)?;
        let mut pb = rt.take_scratch::<f32>("layernorm.dbias_partials", chunks * c)?;
        let col_blocks = c.div_ceil(COL_THREADS) as u32;
        let args = Args::new()
            .ptr(rt.addr_mut(&mut pw))
            .ptr(rt.addr_mut(&mut pb))
            .ptr(rt.addr(dout))
            .ptr(rt.addr(inp))
            .ptr(rt.addr(mean))
            .ptr(rt.addr(rstd))
            .i32(ni)
            .i32(ci)
            .i32(ROWS_PER_CHUNK as i32);
        let cfg = LaunchCfg {
            grid: [col_blocks, chunks as u32, 1],
            block: [COL_THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: partials are [chunks, c]; the rest was checked above.
        unsafe { rt.launch(kp, cfg, &args)? };
        let args = Args::new()
            .ptr(rt.addr_mut(dweight))
            .ptr(rt.addr_mut(dbias))
            .ptr(rt.addr(&pw))
            .ptr(rt.addr(&pb))
            .i32(chunks as i32)
            .i32(ci);
        // SAFETY: as above.
        unsafe {
            rt.launch(
                "layernorm_param_reduce_f32",
                LaunchCfg::linear(col_blocks, COL_THREADS as u32),
                &args,
            )?
        };
        rt.put_scratch("layernorm.dweight_partials", pw);
        rt.put_scratch("layernorm.dbias_partials", pb);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    /// Every output of one forward and backward pass, as f32.
    #[derive(Debug)]
    struct Outputs {
        x_out: Vec<f32>,
        y: Vec<f32>,
        mean: Vec<f32>,
        rstd: Vec<f32>,
        dinp: Vec<f32>,
        dweight: Vec<f32>,
        dbias: Vec<f32>,
    }

    /// Forward (with a residual delta when `fused`) and backward on `dev`, output and gradient in
    /// `T`. The accumulating gradients start from non-zero values, so `+=` is checked too.
    fn run<D: LayerNormOps, T: Elem>(
        dev: &D,
        n: usize,
        c: usize,
        fused: bool,
        offset: f32,
        seed: u64,
    ) -> Outputs {
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let x: Vec<f32> = rand_vec(n * c, 2.0, seed)
            .iter()
            .map(|v| v + offset)
            .collect();
        let x = up(&x);
        let delta = up(&rand_vec(n * c, 1.0, seed + 1));
        let w = up(&rand_vec(c, 1.0, seed + 2));
        let b = up(&rand_vec(c, 1.0, seed + 3));
        let mut x_out = dev.zeros::<f32>(n * c).unwrap();
        let mut y = dev.zeros::<T>(n * c).unwrap();
        let mut mean = dev.zeros::<f32>(n).unwrap();
        let mut rstd = dev.zeros::<f32>(n).unwrap();
        let (xo, d) = if fused {
            (Some(&mut x_out), Some(&delta))
        } else {
            (None, None)
        };
        dev.layernorm_forward(xo, &mut y, &mut mean, &mut rstd, &x, d, &w, &b, n, c)
            .unwrap();
        let dy = dev
            .upload(&narrow::<T>(&rand_vec(n * c, 1.0, seed + 4)))
            .unwrap();
        let mut dinp = up(&rand_vec(n * c, 1.0, seed + 5));
        let mut dw = up(&rand_vec(c, 1.0, seed + 6));
        let mut db = up(&rand_vec(c, 1.0, seed + 7));
        let inp = if fused { &x_out } else { &x };
        dev.layernorm_backward(
            &mut dinp, &mut dw, &mut db, &dy, inp, &w, &mean, &rstd, n, c,
        )
        .unwrap();
        let down = |b: &D::Buf<f32>| dev.download(b).unwrap();
        Outputs {
            x_out: down(&x_out),
            y: widen(&dev.download(&y).unwrap()).into_owned(),
            mean: down(&mean),
            rstd: down(&rstd),
            dinp: down(&dinp),
            dweight: down(&dw),
            dbias: down(&db),
        }
    }

    fn parity<T: Elem>(y_tol: f32, g_tol: f32) {
        // Odd sizes: rows that do not fill a block, columns that do not fill a warp, more rows
        // than one partial chunk; and a wide row far from zero (f32 warp sums of 1024 values
        // around 100, where a one-pass variance or a sloppy reduction loses the spread).
        for &(n, c, fused, offset) in &[
            (5, 40, true, 0.0),
            (19, 33, false, 0.0),
            (300, 7, true, 0.0),
            (2, 96, true, 0.0),
            (9, 1024, true, 100.0),
        ] {
            let want = run::<_, T>(&Cpu, n, c, fused, offset, 40 + n as u64);
            let emulated = Schedule::ALL.map(|s| {
                (
                    format!("{s:?}"),
                    run::<_, T>(&Gpu(Emu::new(s)), n, c, fused, offset, 40 + n as u64),
                )
            });
            let gpu = crate::gpu::cuda_for_tests().map(|g| {
                (
                    "GPU".to_string(),
                    run::<_, T>(g, n, c, fused, offset, 40 + n as u64),
                )
            });
            for (s, got) in emulated.into_iter().chain(gpu) {
                let at = format!("{} n={n} c={c} fused={fused} offset={offset} {s}", T::DTYPE);
                if fused {
                    close(&format!("x_out {at}"), &got.x_out, &want.x_out, 0.0, 0.0);
                }
                close(&format!("y {at}"), &got.y, &want.y, y_tol, y_tol);
                close(&format!("mean {at}"), &got.mean, &want.mean, 1e-5, 1e-5);
                close(&format!("rstd {at}"), &got.rstd, &want.rstd, 1e-5, 1e-4);
                close(&format!("dinp {at}"), &got.dinp, &want.dinp, g_tol, g_tol);
                close(
                    &format!("dweight {at}"),
                    &got.dweight,
                    &want.dweight,
                    g_tol,
                    g_tol,
                );
                close(
                    &format!("dbias {at}"),
                    &got.dbias,
                    &want.dbias,
                    g_tol,
                    g_tol,
                );
            }
        }
    }

    #[test]
    fn emulated_kernels_match_the_cpu_reference_in_f32() {
        parity::<f32>(2e-5, 2e-4);
    }

    #[test]
    fn emulated_kernels_match_the_cpu_reference_in_f16() {
        // y is rounded to f16 on both sides from f32 values that differ by round-off: one f16
        // step (2⁻¹⁰ relative) at most.
        parity::<half::f16>(2e-3, 2e-4);
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let (n, c) = (4, 8);
        let x = vec![0.0f32; n * c];
        let wb = vec![0.0f32; c];
        let mut y = vec![0.0f32; n * c - 1];
        let (mut m, mut r) = (vec![0.0f32; n], vec![0.0f32; n]);
        let err = dev
            .layernorm_forward(None, &mut y, &mut m, &mut r, &x, None, &wb, &wb, n, c)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layernorm_forward_f32") && err.contains("`y`"),
            "{err}"
        );
        let mut y = vec![0.0f32; n * c];
        let err = dev
            .layernorm_forward(None, &mut y, &mut m, &mut r, &x, Some(&x), &wb, &wb, n, c)
            .unwrap_err()
            .to_string();
        assert!(err.contains("x_out"), "{err}");
        let mut yu = vec![0u32; n * c];
        let err = dev
            .layernorm_forward(None, &mut yu, &mut m, &mut r, &x, None, &wb, &wb, n, c)
            .unwrap_err()
            .to_string();
        assert!(err.contains("u32"), "{err}");
    }
}
