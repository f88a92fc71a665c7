//! Launchers of `kernels/cuda/conv2d.cu`: im2col and col2im (accumulating) for the dVAE's
//! convolutions, for [`Gpu`] over either runtime. The dense product between them is cuBLAS's.

use super::{as_i32, kernel_for, Args, Gpu, LaunchCfg, Runtime};
use crate::conv2d::{check_im2col, Conv2dDims, Im2colOps};
use crate::device::Elem;
use crate::error::{KernelError, Result};
use crate::linear::{GemmSpec, MatmulOps};

/// Threads per block: one per pixel of a column row.
const THREADS: usize = 256;
/// The largest grid y and z dimension.
const GRID_YZ: usize = 65_535;

/// The launch of `k` over `d` with `rows` rows per image (grid: pixel blocks × rows × images) and
/// its arguments, after checking that the grid and the 32-bit in-image indices hold the shape.
fn launch<R: Runtime>(
    rt: &R,
    k: &'static str,
    out: u64,
    inp: u64,
    rows: usize,
    d: &Conv2dDims,
) -> Result<()> {
    if rows > GRID_YZ || d.batch > GRID_YZ {
        return Err(KernelError::Shape {
            op: k,
            what: format!(
                "{rows} rows per image and {} images: each must be at most {GRID_YZ} (grid y, z)",
                d.batch
            ),
        });
    }
    as_i32(k, "Ci·k·k·H·W", d.col_rows() * d.pixels())?;
    let cfg = LaunchCfg {
        grid: [
            d.pixels().div_ceil(THREADS) as u32,
            rows as u32,
            d.batch as u32,
        ],
        block: [THREADS as u32, 1, 1],
        shared_bytes: 0,
    };
    let args = Args::new()
        .ptr(out)
        .ptr(inp)
        .i32(as_i32(k, "c_in", d.c_in)?)
        .i32(as_i32(k, "h", d.height)?)
        .i32(as_i32(k, "w", d.width)?)
        .i32(as_i32(k, "k", d.kernel)?);
    // SAFETY: the kernel's arguments; the caller checked both buffers against `d`.
    unsafe { rt.launch(k, cfg, &args) }
}

impl<R: Runtime> Im2colOps for Gpu<R> {
    fn im2col<T: Elem>(&self, col: &mut R::Buf<T>, inp: &R::Buf<T>, d: &Conv2dDims) -> Result<()> {
        let k = kernel_for::<T>("conv2d_im2col_f32", "conv2d_im2col_f16")?;
        let rt = &self.0;
        check_im2col(k, "inp", rt.len(inp), rt.len(col), d)?;
        if rt.len(col) == 0 {
            return Ok(());
        }
        let (c, x) = (rt.addr_mut(col), rt.addr(inp));
        launch(rt, k, c, x, d.col_rows(), d)
    }

    fn col2im_add<T: Elem>(
        &self,
        dinp: &mut R::Buf<T>,
        col: &R::Buf<T>,
        d: &Conv2dDims,
    ) -> Result<()> {
        let k = kernel_for::<T>("conv2d_col2im_add_f32", "conv2d_col2im_add_f16")?;
        let rt = &self.0;
        check_im2col(k, "dinp", rt.len(dinp), rt.len(col), d)?;
        if rt.len(col) == 0 {
            return Ok(());
        }
        let (dx, c) = (rt.addr_mut(dinp), rt.addr(col));
        launch(rt, k, dx, c, d.c_in, d)
    }
}

impl<R: Runtime> crate::conv2d::Conv2dOps for Gpu<R> {
    fn conv2d_forward(
        &self,
        out: &mut R::Buf<f32>,
        inp: &R::Buf<f32>,
        weight: &R::Buf<f32>,
        bias: &R::Buf<f32>,
        d: &Conv2dDims,
    ) -> Result<()> {
        const OP: &str = "conv2d_forward";
        let rt = &self.0;
        d.check(OP)?;
        for (name, len, want) in [
            ("inp", rt.len(inp), d.in_len()),
            ("out", rt.len(out), d.out_len()),
            ("weight", rt.len(weight), d.weight_len()),
            ("bias", rt.len(bias), d.c_out),
        ] {
            crate::error::check_len(OP, name, len, want)?;
        }
        let (hw, rows) = (d.pixels(), d.col_rows());
        if d.batch == 0 || hw == 0 {
            return Ok(());
        }
        // For a 1×1 kernel the columns are the image itself.
        let mut col_buf = None;
        if d.kernel > 1 {
            let mut c = rt.take_scratch::<f32>("conv2d.columns", d.batch * rows * hw)?;
            self.im2col(&mut c, inp, d)?;
            col_buf = Some(c);
        }
        let col = col_buf.as_ref().unwrap_or(inp);
        // out[b] = weight [Co, Ci·k·k] · col[b] [Ci·k·k, HW], every image in one batched call.
        let spec = GemmSpec {
            batch: d.batch,
            strides: [0, rows * hw, d.c_out * hw],
            ..GemmSpec::new(d.c_out, hw, rows)
        };
        self.gemm(out, weight, col, &spec)?;
        // + bias: the rank-1 product bias [Co, 1] · ones [1, HW], accumulated into every image.
        let ones = rt.upload(&vec![1.0f32; hw])?;
        let spec = GemmSpec {
            accumulate: true,
            batch: d.batch,
            strides: [0, 0, d.c_out * hw],
            ..GemmSpec::new(d.c_out, hw, 1)
        };
        self.gemm(out, bias, &ones, &spec)?;
        if let Some(c) = col_buf {
            rt.put_scratch("conv2d.columns", c);
        }
        Ok(())
    }

    fn conv2d_backward(
        &self,
        dinp: Option<&mut R::Buf<f32>>,
        dweight: &mut R::Buf<f32>,
        dbias: &mut R::Buf<f32>,
        dout: &R::Buf<f32>,
        inp: &R::Buf<f32>,
        weight: &R::Buf<f32>,
        d: &Conv2dDims,
    ) -> Result<()> {
        const OP: &str = "conv2d_backward";
        let rt = &self.0;
        d.check(OP)?;
        for (name, len, want) in [
            ("inp", rt.len(inp), d.in_len()),
            ("dout", rt.len(dout), d.out_len()),
            ("weight", rt.len(weight), d.weight_len()),
            ("dweight", rt.len(dweight), d.weight_len()),
            ("dbias", rt.len(dbias), d.c_out),
        ] {
            crate::error::check_len(OP, name, len, want)?;
        }
        if let Some(dx) = &dinp {
            crate::error::check_len(OP, "dinp", rt.len(dx), d.in_len())?;
        }
        let (hw, rows) = (d.pixels(), d.col_rows());
        if d.batch == 0 || hw == 0 {
            return Ok(());
        }
        // For a 1×1 kernel the columns are the image itself.
        let mut col_buf = None;
        if d.kernel > 1 {
            let mut c = rt.take_scratch::<f32>("conv2d.columns", d.batch * rows * hw)?;
            self.im2col(&mut c, inp, d)?;
            col_buf = Some(c);
        }
        let col = col_buf.as_ref().unwrap_or(inp);
        let ones = rt.upload(&vec![1.0f32; hw])?;
        // dweight += dout[b] [Co, HW] · col[b]ᵀ and dbias += dout[b] · ones, image by image in
        // order (one accumulator, so the products cannot be one batched call).
        for b in 0..d.batch {
            let spec = GemmSpec {
                b_t: true,
                accumulate: true,
                offsets: [b * d.c_out * hw, b * rows * hw, 0],
                ..GemmSpec::new(d.c_out, rows, hw)
            };
            self.gemm(dweight, dout, col, &spec)?;
            let spec = GemmSpec {
                accumulate: true,
                offsets: [b * d.c_out * hw, 0, 0],
                ..GemmSpec::new(d.c_out, 1, hw)
            };
            self.gemm(dbias, dout, &ones, &spec)?;
        }
        if let Some(dinp) = dinp {
            // dcol[b] = weightᵀ [Ci·k·k, Co] · dout[b] [Co, HW] (batched); for a 1×1 kernel that
            // is dinp itself (overwritten), otherwise col2im adds it into dinp zeroed in place.
            let spec = GemmSpec {
                a_t: true,
                batch: d.batch,
                strides: [0, d.c_out * hw, rows * hw],
                ..GemmSpec::new(rows, hw, d.c_out)
            };
            match col_buf.as_mut() {
                None => self.gemm(dinp, weight, dout, &spec)?,
                Some(dcol) => {
                    self.gemm(dcol, weight, dout, &spec)?;
                    rt.fill_zero(dinp)?;
                    self.col2im_add(dinp, dcol, d)?;
                }
            }
        }
        if let Some(c) = col_buf {
            rt.put_scratch("conv2d.columns", c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen, Cpu};
    use crate::gpu::{Emu, Schedule};
    use crate::testutil::rand_vec;

    /// im2col of a random image, and col2im of a random column buffer into a non-zero gradient
    /// (so that `+=` is checked), on `dev`, as f32. The column buffer starts from garbage, so an
    /// element im2col skips (a zero of the padding) shows.
    fn run<D: Im2colOps, T: Elem>(dev: &D, d: &Conv2dDims) -> (Vec<f32>, Vec<f32>) {
        let seed = (d.c_in * 1000 + d.height * 10 + d.width + d.kernel * 7) as u64;
        let col_len = d.batch * d.col_rows() * d.pixels();
        let up = |v: &[f32]| dev.upload(&narrow::<T>(v)).unwrap();
        let x = up(&rand_vec(d.in_len(), 1.0, seed));
        let mut col = up(&rand_vec(col_len, 9.0, seed + 1));
        dev.im2col(&mut col, &x, d).unwrap();
        let dcol = up(&rand_vec(col_len, 1.0, seed + 2));
        let mut dx = up(&rand_vec(d.in_len(), 1.0, seed + 3));
        dev.col2im_add(&mut dx, &dcol, d).unwrap();
        let down = |b: &D::Buf<T>| widen(&dev.download(b).unwrap()).into_owned();
        (down(&col), down(&dx))
    }

    fn parity<T: Elem>() {
        // Every kernel width of the dVAE; sizes that fill no block (H·W = 35, 300), images
        // smaller than the kernel (every tap of a row outside), and a batch.
        let cases = [
            (2, 3, 5, 7, 3),
            (1, 3, 12, 25, 7),
            (3, 4, 2, 1, 7),
            (2, 5, 3, 2, 5),
            (1, 2, 20, 15, 1),
        ];
        for (batch, c_in, height, width, kernel) in cases {
            let d = Conv2dDims {
                batch,
                c_in,
                c_out: 1,
                height,
                width,
                kernel,
            };
            let want = run::<_, T>(&Cpu, &d);
            crate::gpu::for_each_gpu!(s, dev, {
                let got = run::<_, T>(dev, &d);
                // Exact: im2col copies, and col2im adds the same f32 values in the reference's
                // order into the same starting value (then rounds once to T).
                for (what, g, r) in [("col", &got.0, &want.0), ("dinp", &got.1, &want.1)] {
                    assert_eq!(g.len(), r.len());
                    for (i, (a, b)) in g.iter().zip(r.iter()).enumerate() {
                        assert!(
                            a.to_bits() == b.to_bits(),
                            "{what} {} {d:?} {s:?} [{i}]: got {a}, reference {b}",
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
    fn bad_shapes_are_errors_before_any_launch() {
        let dev = Gpu(Emu::new(Schedule::Forward));
        let d = Conv2dDims {
            batch: 2,
            c_in: 3,
            c_out: 4,
            height: 5,
            width: 6,
            kernel: 3,
        };
        let x = vec![0.0f32; d.in_len()];
        let mut col = vec![0.0f32; d.batch * 27 * 30 - 1];
        let err = dev.im2col(&mut col, &x, &d).unwrap_err().to_string();
        assert!(
            err.contains("conv2d_im2col_f32") && err.contains("`col`"),
            "{err}"
        );
        let mut col = vec![0.0f32; d.batch * 27 * 30];
        let even = Conv2dDims { kernel: 4, ..d };
        let err = dev.im2col(&mut col, &x, &even).unwrap_err().to_string();
        assert!(err.contains("odd"), "{err}");
        let mut dx = vec![0.0f32; d.in_len() + 1];
        let err = dev.col2im_add(&mut dx, &col, &d).unwrap_err().to_string();
        assert!(
            err.contains("conv2d_col2im_add_f32") && err.contains("`dinp`"),
            "{err}"
        );
        let huge = Conv2dDims {
            batch: 70_000,
            c_in: 1,
            height: 1,
            width: 1,
            kernel: 1,
            ..d
        };
        let (x, mut col) = (vec![0.0f32; 70_000], vec![0.0f32; 70_000]);
        let err = dev.im2col(&mut col, &x, &huge).unwrap_err().to_string();
        assert!(err.contains("65535"), "{err}");
    }

    /// Forward and backward of a convolution on `dev`: (out, dinp, dweight, dbias), with
    /// dweight and dbias starting from non-zero values (they accumulate) and dinp from garbage
    /// (it is overwritten).
    fn conv_run<D: crate::conv2d::Conv2dOps>(dev: &D, d: &Conv2dDims, seed: u64) -> [Vec<f32>; 4] {
        let up = |v: Vec<f32>| dev.upload(&v).unwrap();
        let inp = up(rand_vec(d.in_len(), 1.0, seed));
        let w = up(rand_vec(d.weight_len(), 0.5, seed + 1));
        let b = up(rand_vec(d.c_out, 1.0, seed + 2));
        let mut out = up(rand_vec(d.out_len(), 9.0, seed + 3));
        dev.conv2d_forward(&mut out, &inp, &w, &b, d).unwrap();
        let dout = up(rand_vec(d.out_len(), 1.0, seed + 4));
        let mut dinp = up(rand_vec(d.in_len(), 9.0, seed + 5));
        let mut dw = up(rand_vec(d.weight_len(), 1.0, seed + 6));
        let mut db = up(rand_vec(d.c_out, 1.0, seed + 7));
        dev.conv2d_backward(Some(&mut dinp), &mut dw, &mut db, &dout, &inp, &w, d)
            .unwrap();
        [&out, &dinp, &dw, &db].map(|x| dev.download(x).unwrap())
    }

    #[test]
    fn convolution_through_im2col_and_batched_products_matches_the_cpu_reference() {
        for (i, &(batch, c_in, c_out, height, width, kernel)) in [
            (2, 3, 5, 5, 3, 3), // Co > Ci: the CPU's col2im path
            (3, 4, 2, 4, 6, 3), // Co ≤ Ci: the CPU's flipped-kernel path
            (2, 3, 4, 3, 2, 1), // 1×1
            (1, 2, 3, 2, 2, 7), // an image narrower than half the kernel
        ]
        .iter()
        .enumerate()
        {
            let d = Conv2dDims {
                batch,
                c_in,
                c_out,
                height,
                width,
                kernel,
            };
            let want = conv_run(&Cpu, &d, 60 + i as u64);
            // One schedule on the emulator (the products run on the CPU GEMM there), and cuBLAS's
            // strided batched products on a GPU where there is one.
            let emulated = Gpu(Emu::new(Schedule::Forward));
            let mut runs = vec![(
                "emulated".to_string(),
                conv_run(&emulated, &d, 60 + i as u64),
            )];
            if let Some(g) = crate::gpu::cuda_for_tests() {
                runs.push(("GPU".to_string(), conv_run(g, &d, 60 + i as u64)));
            }
            for (dev, got) in runs {
                for (name, (g, w)) in ["out", "dinp", "dweight", "dbias"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    for (j, (&g, &w)) in g.iter().zip(w).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 + 1e-4 * w.abs(),
                            "{dev} {d:?} {name}[{j}]: got {g}, reference {w}"
                        );
                    }
                }
            }
        }
        let d = Conv2dDims {
            batch: 1,
            c_in: 1,
            c_out: 1,
            height: 2,
            width: 2,
            kernel: 3,
        };
        let dev = Gpu(Emu::new(Schedule::Forward));
        let (mut out, inp, w) = (vec![0.0f32; 4], vec![0.0f32; 4], vec![0.0f32; 8]);
        let err =
            crate::conv2d::Conv2dOps::conv2d_forward(&dev, &mut out, &inp, &w, &vec![0.0], &d)
                .unwrap_err();
        assert!(err.to_string().contains("`weight`"), "{err}");
    }
}
