//! Launchers of `kernels/cuda/masked_softmax.cu`: the dense masked softmax forward and backward
//! of [`crate::dense_attention`], for [`Gpu`] over either runtime.

use super::{as_i32, check_buf, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::dense_attention::MaskedSoftmaxOps;
use crate::device::Elem;
use crate::error::{KernelError, Result};

/// Rows per block (`MSM_WARPS`: one warp a row).
const ROWS_PER_BLOCK: usize = 4;

/// Checks `rows` (a multiple of `t`) and returns the launch and the `int` arguments.
fn dims(k: &'static str, rows: usize, t: usize) -> Result<(LaunchCfg, i32, i32, usize)> {
    if t == 0 || !rows.is_multiple_of(t) {
        return Err(KernelError::Shape {
            op: k,
            what: format!("rows {rows} must be a multiple of a non-zero t {t} (B·NH·T rows)"),
        });
    }
    let n = rows.checked_mul(t).ok_or_else(|| KernelError::Shape {
        op: k,
        what: format!("rows {rows} × t {t} overflows"),
    })?;
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    let blocks = u32::try_from(blocks).map_err(|_| KernelError::Shape {
        op: k,
        what: format!("{rows} rows need {blocks} blocks, over a grid's 2³² − 1"),
    })?;
    let cfg = LaunchCfg::linear(blocks, (32 * ROWS_PER_BLOCK) as u32);
    Ok((cfg, as_i32(k, "rows", rows)?, as_i32(k, "t", t)?, n))
}

impl<R: Runtime> MaskedSoftmaxOps for Gpu<R> {
    fn masked_softmax_forward<T: Elem>(
        &self,
        p: &mut R::Buf<T>,
        s: &R::Buf<f32>,
        mask: &R::Buf<u32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for::<T>("masked_softmax_forward_f32", "masked_softmax_forward_f16")?;
        let (cfg, rows_i, t_i, n) = dims(k, rows, t)?;
        let rt = &self.0;
        check_buf(rt, k, "s", s, n)?;
        check_buf(rt, k, "p", p, n)?;
        check_buf(rt, k, "mask", mask, t * t.div_ceil(32))?;
        if rows == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(p))
            .ptr(rt.addr(s))
            .ptr(rt.addr(mask))
            .i32(rows_i)
            .i32(t_i)
            .f32(scale);
        // SAFETY: the kernel's arguments; s and p hold rows × t values, mask t rows of words.
        unsafe { rt.launch(k, cfg, &args) }
    }

    fn masked_softmax_backward<T: Elem>(
        &self,
        ds: &mut R::Buf<T>,
        p: &R::Buf<T>,
        dp: &R::Buf<f32>,
        rows: usize,
        t: usize,
        scale: f32,
    ) -> Result<()> {
        let k = kernel_for::<T>("masked_softmax_backward_f32", "masked_softmax_backward_f16")?;
        let (cfg, rows_i, t_i, n) = dims(k, rows, t)?;
        let rt = &self.0;
        check_buf(rt, k, "p", p, n)?;
        check_buf(rt, k, "dp", dp, n)?;
        check_buf(rt, k, "ds", ds, n)?;
        if rows == 0 {
            return Ok(());
        }
        let args = Args::new()
            .ptr(rt.addr_mut(ds))
            .ptr(rt.addr(p))
            .ptr(rt.addr(dp))
            .i32(rows_i)
            .i32(t_i)
            .f32(scale);
        // SAFETY: the kernel's arguments; p, dp and ds hold rows × t values.
        unsafe { rt.launch(k, cfg, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttentionOps, BlockLayout, MaskKind};
    use crate::dense_attention::{mask_words, DenseAttention};
    use crate::device::{narrow, widen, Cpu, Device};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::{close, rand_vec};

    const KINDS: [MaskKind; 3] = [
        MaskKind::Row,
        MaskKind::Column,
        MaskKind::Conv { kernel: 3 },
    ];

    /// Forward and backward against the CPU reference, every layout kind, every schedule. T = 5 +
    /// 36 = 41 (two mask words a row, the second partial) and 3 (B·NH = 3): rows that end inside
    /// a warp, and a grid whose last block has rows past the end.
    fn parity<T: Elem>(tol: (f32, f32)) {
        let (tt, g, bh) = (5, 6, 3);
        for kind in KINDS {
            let layout = BlockLayout::new(tt, g, kind, 8).unwrap();
            let t = layout.seq_len();
            let rows = bh * t;
            let mask = mask_words(&layout);
            let s = rand_vec(rows * t, 3.0, 41);
            let dp = rand_vec(rows * t, 1.0, 42);
            let scale = 0.7;
            let mut want_p = vec![T::from_f32(7.0); rows * t];
            Cpu.masked_softmax_forward(&mut want_p, &s, &mask, rows, t, scale)
                .unwrap();
            let mut want_ds = vec![T::from_f32(7.0); rows * t];
            Cpu.masked_softmax_backward(&mut want_ds, &want_p, &dp, rows, t, scale)
                .unwrap();
            // The reference's zeros are the mask's: every masked pair, nothing else.
            let pw = widen(&want_p);
            for r in 0..rows {
                for q in 0..t {
                    let allowed = layout.allowed(r % t, q);
                    assert_eq!(pw[r * t + q] > 0.0, allowed, "{kind:?} row {r} key {q}");
                }
            }
            crate::gpu::for_each_gpu!(label, dev, {
                let at = format!("{} {kind:?} {label}", T::DTYPE);
                let (sd, dpd, md) = (
                    dev.upload(&s).unwrap(),
                    dev.upload(&dp).unwrap(),
                    dev.upload(&mask).unwrap(),
                );
                let mut p = dev.upload(&vec![T::from_f32(7.0); rows * t]).unwrap();
                dev.masked_softmax_forward(&mut p, &sd, &md, rows, t, scale)
                    .unwrap();
                let got = dev.download(&p).unwrap();
                close(&format!("p {at}"), &widen(&got), &pw, tol.0, tol.1);
                // The backward from the reference's p, so that only the kernel differs.
                let pd = dev.upload(&want_p).unwrap();
                let mut ds = dev.upload(&vec![T::from_f32(7.0); rows * t]).unwrap();
                dev.masked_softmax_backward(&mut ds, &pd, &dpd, rows, t, scale)
                    .unwrap();
                let got = dev.download(&ds).unwrap();
                close(
                    &format!("ds {at}"),
                    &widen(&got),
                    &widen(&want_ds),
                    tol.0,
                    tol.1,
                );
            });
        }
    }

    #[test]
    fn masked_softmax_matches_the_cpu_reference_in_f32() {
        parity::<f32>((1e-6, 1e-5));
    }

    #[test]
    fn masked_softmax_matches_the_cpu_reference_in_f16() {
        // Both sides round the same f32 values to f16; the f32 values differ by summation order.
        parity::<half::f16>((1e-4, 2e-3));
    }

    /// Dense masked attention on `dev` against the block-sparse attention on the same device.
    fn dense_vs_sparse<D, T>(dev: &D, label: &str, layout: &BlockLayout, tol: (f32, f32))
    where
        D: AttentionOps + crate::linear::MatmulOps + MaskedSoftmaxOps,
        T: Elem,
    {
        let (b, nh, hs) = (2, 2, 8);
        let (t, c) = (layout.seq_len(), nh * hs);
        let qkv: Vec<T> = narrow(&rand_vec(b * t * 3 * c, 2.0, 51));
        let dout: Vec<T> = narrow(&rand_vec(b * t * c, 1.0, 52));
        let at = format!("{} {:?} {label}", T::DTYPE, layout.kind());
        let (q, d) = (dev.upload(&qkv).unwrap(), dev.upload(&dout).unwrap());
        let l = dev.attention_layout(layout).unwrap();
        let mut out = dev.zeros::<T>(b * t * c).unwrap();
        let mut lse = dev.zeros::<f32>(b * nh * t).unwrap();
        dev.attention_forward(&mut out, &mut lse, &q, &l, b, t, nh, hs)
            .unwrap();
        let mut dqkv = dev.zeros::<T>(b * t * 3 * c).unwrap();
        dev.attention_backward(&mut dqkv, &d, &q, &out, &lse, &l, b, t, nh, hs)
            .unwrap();
        let mut dense = DenseAttention::<D, T>::new(dev, layout, b, nh, hs).unwrap();
        // Filled with a value the pipeline must overwrite everywhere.
        let mut d_out = dev.upload(&vec![7.0f32; b * t * c]).unwrap();
        let mut d_dqkv = dev.upload(&vec![7.0f32; b * t * 3 * c]).unwrap();
        dense.forward(dev, &mut d_out, &q).unwrap();
        dense.backward(dev, &mut d_dqkv, &d, &q).unwrap();
        let sparse_out = widen(&dev.download(&out).unwrap()).into_owned();
        let got = dev.download(&d_out).unwrap();
        close(&format!("out {at}"), &got, &sparse_out, tol.0, tol.1);
        let sparse_dqkv = widen(&dev.download(&dqkv).unwrap()).into_owned();
        let got = dev.download(&d_dqkv).unwrap();
        close(&format!("dqkv {at}"), &got, &sparse_dqkv, tol.0, tol.1);
    }

    /// Dense masked attention (products through the device's GEMM, the masked softmax) computes
    /// what block-sparse attention computes: out and every gradient, for every layout kind, on
    /// the CPU (the readable references on both sides), the emulator under every schedule, and a
    /// GPU where one exists.
    fn dense_matches_block_sparse<T: Elem>(tol: (f32, f32)) {
        for kind in KINDS {
            let layout = BlockLayout::new(5, 6, kind, 8).unwrap();
            dense_vs_sparse::<_, T>(&Cpu, "Cpu", &layout, tol);
            crate::gpu::for_each_gpu!(label, dev, {
                dense_vs_sparse::<_, T>(dev, &label, &layout, tol);
            });
        }
    }

    #[test]
    fn dense_attention_matches_block_sparse_in_f32() {
        dense_matches_block_sparse::<f32>((2e-5, 1e-4));
    }

    #[test]
    fn dense_attention_matches_block_sparse_in_f16() {
        // The block-sparse kernels keep P in f32 and round outputs to f16; the dense pipeline
        // rounds P and dS to f16 (the products' inputs) and keeps its outputs in f32.
        dense_matches_block_sparse::<half::f16>((5e-3, 1e-2));
    }

    #[test]
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let (t, rows) = (10, 20);
        let s = vec![0.0f32; rows * t];
        let mask = vec![u32::MAX; t];
        let mut p = vec![0.0f32; rows * t];
        let e = dev
            .masked_softmax_forward(&mut p, &s, &mask, rows + 1, t, 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("masked_softmax_forward_f32") && e.contains("multiple"),
            "{e}"
        );
        let e = dev
            .masked_softmax_forward(&mut p, &s[1..].to_vec(), &mask, rows, t, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`s`"), "{e}");
        let e = dev
            .masked_softmax_forward(&mut p, &s, &mask[1..].to_vec(), rows, t, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mask`"), "{e}");
        let mut ds = vec![0.0f32; rows * t - 1];
        let e = dev
            .masked_softmax_backward(&mut ds, &p, &s, rows, t, 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("masked_softmax_backward_f32") && e.contains("`ds`"),
            "{e}"
        );
        dev.masked_softmax_forward(&mut p, &s, &mask, rows, t, 1.0)
            .unwrap();
    }
}
