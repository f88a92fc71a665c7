//! The emulated CUDA runtime: host buffers, and kernels run by the emulator that `build.rs`
//! compiles from the same `.cu` sources (see `kernels/cuda/emu/emu.h` for what it models).
//!
//! A launch runs the blocks one after another on the calling thread, each block's threads as
//! fibers in the runtime's [`Schedule`]; a barrier or warp-intrinsic error (a thread that returns
//! while others wait at `__syncthreads`, lanes at different intrinsics, a partial mask) ends the
//! launch with [`KernelError::Launch`]. Parity tests run every kernel under all three schedules:
//! a missing barrier reads poisoned or stale shared memory under at least one of them.

use super::{Args, LaunchCfg, Runtime};
use crate::device::Elem;
use crate::error::{KernelError, Result};
use std::ffi::{c_char, c_void, CStr};

/// The order in which the emulator runs blocks, and threads within a block between barriers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Forward,
    Reverse,
    /// A seeded shuffle, drawn anew at every barrier.
    Random(u64),
}

impl Schedule {
    /// The three schedules the parity tests use.
    pub const ALL: [Schedule; 3] = [
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Random(0x7e55e7a),
    ];
}

/// The emulated CUDA device.
#[derive(Clone, Copy, Debug)]
pub struct Emu {
    pub schedule: Schedule,
}

impl Emu {
    pub fn new(schedule: Schedule) -> Emu {
        Emu { schedule }
    }
}

unsafe extern "C" {
    fn emu_launch(
        entry: unsafe extern "C" fn(*mut *mut c_void),
        params: *mut *mut c_void,
        grid: *const u32,
        block: *const u32,
        dyn_shared_bytes: usize,
        schedule: i32,
        seed: u64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

impl Runtime for Emu {
    type Buf<T: Elem> = Vec<T>;

    fn name(&self) -> String {
        format!("emulated CUDA ({:?} schedule)", self.schedule)
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); len])
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Vec<T>> {
        Ok(host.to_vec())
    }
    fn download<T: Elem>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn fill_zero<T: Elem>(&self, buf: &mut Vec<T>) -> Result<()> {
        buf.fill(T::default());
        Ok(())
    }
    /// The emulator's buffers are host memory.
    fn collective_addr(&self, _buf: &mut Vec<f32>) -> Result<Option<u64>> {
        Ok(None)
    }
    fn addr<T: Elem>(&self, buf: &Vec<T>) -> u64 {
        buf.as_ptr() as u64
    }
    fn addr_mut<T: Elem>(&self, buf: &mut Vec<T>) -> u64 {
        buf.as_mut_ptr() as u64
    }

    fn take_scratch<T: Elem>(&self, _key: &'static str, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::from_f32(f32::NAN); len])
    }
    fn put_scratch<T: Elem>(&self, _key: &'static str, _buf: Vec<T>) {}

    fn gemm<I: Elem>(
        &self,
        c: &mut Vec<f32>,
        a: &Vec<I>,
        b: &Vec<I>,
        spec: &crate::linear::GemmSpec,
    ) -> Result<()> {
        crate::linear::gemm_host(c, a, b, spec)
    }

    unsafe fn launch(&self, name: &'static str, cfg: LaunchCfg, args: &Args) -> Result<()> {
        let Some(&(_, _, entry)) = super::table::EMU_KERNELS
            .iter()
            .find(|(n, _, _)| *n == name)
        else {
            return Err(KernelError::Launch {
                kernel: name,
                message: "no such kernel in kernels/cuda".into(),
            });
        };
        let mut slots = args.slots().to_vec();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        let (schedule, seed) = match self.schedule {
            Schedule::Forward => (0, 0),
            Schedule::Reverse => (1, 0),
            Schedule::Random(s) => (2, s),
        };
        let mut err = [0 as c_char; 1024];
        // SAFETY: `entry` unpacks `params` as the kernel's parameters (the caller's contract),
        // the slots outlive the call, and the emulator writes at most `err.len()` bytes.
        let rc = unsafe {
            emu_launch(
                entry,
                params.as_mut_ptr(),
                cfg.grid.as_ptr(),
                cfg.block.as_ptr(),
                cfg.shared_bytes as usize,
                schedule,
                seed,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            // SAFETY: the emulator NUL-terminates the message within the buffer.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
            Err(KernelError::Launch {
                kernel: name,
                message: msg.to_string_lossy().into_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand_vec;

    fn block_sums(kernel: &'static str, x: &[f32], schedule: Schedule) -> Result<Vec<f32>> {
        let emu = Emu::new(schedule);
        let blocks = x.len() / 128;
        let mut out = vec![0.0f32; blocks];
        let x = emu.upload(x)?;
        let args = Args::new().ptr(emu.addr_mut(&mut out)).ptr(emu.addr(&x));
        // SAFETY: out has one value per block, x 128 per block.
        unsafe { emu.launch(kernel, LaunchCfg::linear(blocks as u32, 128), &args)? };
        Ok(out)
    }

    fn exact_sums(x: &[f32]) -> Vec<f64> {
        x.chunks(128)
            .map(|c| c.iter().map(|&v| v as f64).sum())
            .collect()
    }

    #[test]
    fn block_sum_is_right_under_every_schedule() {
        let x = rand_vec(128 * 6, 1.0, 11);
        for s in Schedule::ALL {
            let got = block_sums("testing_block_sum_f32", &x, s).unwrap();
            for (g, want) in got.iter().zip(exact_sums(&x)) {
                assert!((*g as f64 - want).abs() < 1e-4, "{s:?}: {g} vs {want}");
            }
        }
    }

    /// The planted race: the same kernel with the barrier after the shared-memory writes
    /// removed. At least one schedule must give a wrong (poisoned) sum, or the emulator cannot
    /// catch a missing barrier.
    #[test]
    fn a_missing_barrier_is_caught_by_some_schedule() {
        let x = rand_vec(128 * 6, 1.0, 12);
        let want = exact_sums(&x);
        let caught: Vec<Schedule> = Schedule::ALL
            .into_iter()
            .filter(|&s| {
                let got = block_sums("testing_block_sum_racy_f32", &x, s).unwrap();
                got.iter().zip(&want).any(|(g, w)| {
                    (*g as f64 - w).abs().partial_cmp(&1e-4) != Some(std::cmp::Ordering::Less)
                })
            })
            .collect();
        assert!(
            !caught.is_empty(),
            "no schedule exposed the missing barrier"
        );
        assert!(
            caught.contains(&Schedule::Forward),
            "caught only under {caught:?}"
        );
    }

    #[test]
    fn a_thread_leaving_before_a_barrier_is_an_error() {
        let emu = Emu::new(Schedule::Forward);
        let mut out = vec![0.0f32; 128];
        let args = Args::new().ptr(emu.addr_mut(&mut out)).i32(100);
        // SAFETY: out holds 128 values.
        let err =
            unsafe { emu.launch("testing_early_return_f32", LaunchCfg::linear(1, 128), &args) }
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("testing_early_return_f32")
                && err.contains("returned while others wait at __syncthreads"),
            "{err}"
        );
        // With every thread in range the same kernel is fine.
        let args = Args::new().ptr(emu.addr_mut(&mut out)).i32(128);
        // SAFETY: as above.
        unsafe { emu.launch("testing_early_return_f32", LaunchCfg::linear(1, 128), &args) }
            .unwrap();
        assert_eq!(out[5], 6.0);
        assert_eq!(out[127], 0.0);
    }

    #[test]
    fn shuffles_exchange_within_each_warp() {
        let x: Vec<f32> = (0..128).map(|i| i as f32).collect();
        for s in Schedule::ALL {
            let emu = Emu::new(s);
            for mask in [1, 5, 16, 31] {
                let mut out = vec![0.0f32; 128];
                let args = Args::new()
                    .ptr(emu.addr_mut(&mut out))
                    .ptr(emu.addr(&x))
                    .i32(mask);
                // SAFETY: 128 values in and out.
                unsafe { emu.launch("testing_shfl_xor_f32", LaunchCfg::linear(2, 64), &args) }
                    .unwrap();
                for (i, &v) in out.iter().enumerate() {
                    assert_eq!(v, (i ^ mask as usize) as f32, "{s:?} mask {mask} lane {i}");
                }
            }
        }
        // With a width below 32: a lane reads an earlier group of `width` lanes, and gets its own
        // value back when the partner is in a later group.
        for s in Schedule::ALL {
            let emu = Emu::new(s);
            for (mask, width) in [(8, 8), (4, 8), (16, 16), (3, 4)] {
                let mut out = vec![0.0f32; 64];
                let args = Args::new()
                    .ptr(emu.addr_mut(&mut out))
                    .ptr(emu.addr(&x))
                    .i32(mask)
                    .i32(width);
                // SAFETY: 64 values out, 128 in.
                unsafe {
                    emu.launch(
                        "testing_shfl_xor_width_f32",
                        LaunchCfg::linear(1, 64),
                        &args,
                    )
                }
                .unwrap();
                for (i, &v) in out.iter().enumerate() {
                    let (lane, base) = (i % 32, (i % 32) & !(width as usize - 1));
                    let partner = lane ^ mask as usize;
                    let src = if partner >= base + width as usize {
                        lane
                    } else {
                        partner
                    };
                    let want = (i - lane + src) as f32;
                    assert_eq!(v, want, "{s:?} mask {mask} width {width} lane {i}");
                }
            }
        }
        // A block that is not a whole number of warps cannot shuffle.
        let emu = Emu::new(Schedule::Forward);
        let mut out = vec![0.0f32; 48];
        let args = Args::new()
            .ptr(emu.addr_mut(&mut out))
            .ptr(emu.addr(&x))
            .i32(1);
        // SAFETY: 48 values out, 128 in.
        let err = unsafe { emu.launch("testing_shfl_xor_f32", LaunchCfg::linear(1, 48), &args) }
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a multiple of 32"), "{err}");
    }

    /// Two warps exchange values through shared memory: right with a block barrier under every
    /// schedule; with only `__syncwarp()` the forward schedule runs the first warp on as soon as
    /// its lanes met, before the second warp wrote, and the read shows the poison.
    #[test]
    fn a_read_across_warps_without_a_block_barrier_is_caught() {
        let run = |kernel: &'static str, s: Schedule| {
            let emu = Emu::new(s);
            let mut out = vec![0.0f32; 64];
            let args = Args::new().ptr(emu.addr_mut(&mut out));
            // SAFETY: 64 values out.
            unsafe { emu.launch(kernel, LaunchCfg::linear(1, 64), &args) }.unwrap();
            out
        };
        let want: Vec<f32> = (0..64).map(|t| ((t + 32) % 64) as f32).collect();
        for s in Schedule::ALL {
            assert_eq!(run("testing_cross_warp_f32", s), want, "{s:?}");
        }
        let racy = run("testing_cross_warp_racy_f32", Schedule::Forward);
        assert!(racy[..32].iter().all(|v| v.is_nan()), "{racy:?}");
    }

    /// One m16n16k16 product through the emulated WMMA API, b row- and column-major, against
    /// f64; and the GPU's alignment rule for tile pointers.
    #[test]
    fn wmma_product_matches_f64_and_checks_alignment() {
        use half::f16;
        let a: Vec<f16> = crate::device::narrow(&crate::testutil::rand_vec(256, 1.0, 61));
        let b: Vec<f16> = crate::device::narrow(&crate::testutil::rand_vec(256, 1.0, 62));
        let c0 = crate::testutil::rand_vec(256, 1.0, 63);
        for s in Schedule::ALL {
            let emu = Emu::new(s);
            for col_major in [0, 1] {
                let mut c = c0.clone();
                let args = Args::new()
                    .ptr(emu.addr_mut(&mut c))
                    .ptr(emu.addr(&a))
                    .ptr(emu.addr(&b))
                    .i32(col_major)
                    .i32(0);
                let cfg = LaunchCfg {
                    shared_bytes: 2560,
                    ..LaunchCfg::linear(1, 32)
                };
                // SAFETY: 256 values each; the kernel's 2,560 bytes of shared memory.
                unsafe { emu.launch("testing_wmma_f16", cfg, &args) }.unwrap();
                for i in 0..16 {
                    for j in 0..16 {
                        let bkj = |k: usize| {
                            let at = if col_major == 1 {
                                k + 16 * j
                            } else {
                                16 * k + j
                            };
                            b[at].to_f64()
                        };
                        let want = c0[16 * i + j] as f64
                            + (0..16)
                                .map(|k| a[16 * i + k].to_f64() * bkj(k))
                                .sum::<f64>();
                        let got = c[16 * i + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{s:?} col_major {col_major} [{i}][{j}]: {got} vs {want}"
                        );
                    }
                }
                // A tile 16 bytes off a 32-byte boundary is refused, as the GPU requires.
                let args = Args::new()
                    .ptr(emu.addr_mut(&mut c))
                    .ptr(emu.addr(&a))
                    .ptr(emu.addr(&b))
                    .i32(col_major)
                    .i32(8);
                // SAFETY: as above; the offset tile still lies inside the shared memory.
                let err = unsafe { emu.launch("testing_wmma_f16", cfg, &args) }
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("not 32-byte aligned"), "{err}");
            }
        }
    }

    #[test]
    fn an_unknown_kernel_is_an_error() {
        let emu = Emu::new(Schedule::Forward);
        // SAFETY: nothing is launched.
        let err = unsafe { emu.launch("no_such_kernel", LaunchCfg::linear(1, 32), &Args::new()) }
            .unwrap_err();
        assert!(err.to_string().contains("no_such_kernel"), "{err}");
    }
}
