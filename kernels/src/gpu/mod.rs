//! The CUDA C kernels of `kernels/cuda/` and the two runtimes that run them.
//!
//! - [`Cuda`]: a GPU through cudarc; sources compiled at run time by NVRTC to a cubin for the
//!   device's architecture ([`nvrtc`]), cached on disk, modules loaded once per process.
//! - [`Emu`]: the same sources compiled for the CPU by `build.rs` against the emulation header
//!   (`kernels/cuda/emu/emu.h`), run one block at a time with the block's threads as fibers, in a
//!   chosen [`Schedule`]; buffers are host vectors. What CI runs.
//!
//! [`Gpu<R>`] is the [`Device`](crate::device::Device) over either runtime; each kernel
//! family's launcher (`gpu::layernorm`, …) is written once against [`Runtime`], checks shapes
//! before anything is launched, and returns [`KernelError`] naming the kernel and the shapes.

pub mod adamw;
pub mod attention;
pub mod bias;
pub mod cast;
pub mod conv2d;
pub mod cross_entropy;
pub mod cuda;
pub mod dvae;
pub mod embedding;
pub mod emu;
pub mod gelu;
pub mod gradscale;
pub mod layernorm;
pub mod masked_softmax;
pub mod nvrtc;
pub mod powersgd;
pub mod relu;
pub mod resample;
pub mod scale_add;

pub use cuda::Cuda;
pub use emu::{Emu, Schedule};

use crate::device::{Device, Elem};
use crate::error::{KernelError, Result};

mod table {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}
pub use table::SOURCES;

/// The portability header every kernel includes (`#include "common.cuh"`).
pub const COMMON_HEADER: &str = include_str!("../../cuda/common.cuh");

/// The `.cu` file that defines kernel `name`.
pub fn kernel_file(name: &str) -> Option<&'static str> {
    table::EMU_KERNELS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, f, _)| *f)
}

/// Every kernel's name.
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    table::EMU_KERNELS.iter().map(|(n, _, _)| *n)
}

/// Grid and block sizes (x, y, z) and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchCfg {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> LaunchCfg {
        LaunchCfg {
            grid: [blocks.max(1), 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// Kernel arguments as cuLaunchKernel takes them: one 8-byte slot per argument holding a device
/// address or a scalar's bits (little-endian, so an `int` argument reads the slot's low bytes).
#[derive(Debug, Default)]
pub struct Args {
    slots: Vec<u64>,
}

impl Args {
    pub fn new() -> Args {
        Args::default()
    }
    /// A device address (0 for a null pointer).
    pub fn ptr(mut self, addr: u64) -> Args {
        self.slots.push(addr);
        self
    }
    pub fn i32(mut self, v: i32) -> Args {
        self.slots.push(v as u32 as u64);
        self
    }
    pub fn f32(mut self, v: f32) -> Args {
        self.slots.push(v.to_bits() as u64);
        self
    }
    pub fn f64(mut self, v: f64) -> Args {
        self.slots.push(v.to_bits());
        self
    }
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }
}

/// What a GPU-like device provides: buffers with addresses, and kernel launches by name.
pub trait Runtime {
    type Buf<T: Elem>;
    fn name(&self) -> String;
    fn zeros<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// Sets every element of `buf` to zero, in place.
    fn fill_zero<T: Elem>(&self, buf: &mut Self::Buf<T>) -> Result<()>;
    /// [`Device::collective_addr`]: the GPU address after the queued work, or `None` for a
    /// runtime whose buffers are host memory.
    fn collective_addr(&self, buf: &mut Self::Buf<f32>) -> Result<Option<u64>>;
    /// The buffer's address, for a kernel that reads it.
    fn addr<T: Elem>(&self, buf: &Self::Buf<T>) -> u64;
    /// The buffer's address, for a kernel that writes it.
    fn addr_mut<T: Elem>(&self, buf: &mut Self::Buf<T>) -> u64;
    /// Launches kernel `name`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type, and every address must
    /// point at a live buffer of this runtime at least as long as the kernel reads or writes.
    /// The family launchers check the shapes that make this so.
    unsafe fn launch(&self, name: &'static str, cfg: LaunchCfg, args: &Args) -> Result<()>;
    /// A scratch buffer of `len` elements for a launcher's intermediate results (partial sums,
    /// columns), its contents undefined: the kernels write every element they read. On a GPU it
    /// is the buffer the last call with this `key` gave back, when its type and length match,
    /// else a new one (no allocation per call at a fixed shape); in the emulator a new one full
    /// of NaNs (zeros for integers), so that a kernel reading scratch nobody wrote shows.
    fn take_scratch<T: Elem>(&self, key: &'static str, len: usize) -> Result<Self::Buf<T>>;
    /// Gives back a buffer of [`take_scratch`](Self::take_scratch) once the launches that use it
    /// are queued (launches on the one stream run in order, so the next call may reuse it).
    fn put_scratch<T: Elem>(&self, key: &'static str, buf: Self::Buf<T>);
    /// The dense products of [`crate::linear::MatmulOps::gemm`] (`spec` already checked
    /// against the buffers): cuBLAS on a GPU, the CPU GEMM in the emulator.
    fn gemm<I: Elem>(
        &self,
        c: &mut Self::Buf<f32>,
        a: &Self::Buf<I>,
        b: &Self::Buf<I>,
        spec: &crate::linear::GemmSpec,
    ) -> Result<()>;
}

impl<R: Runtime> crate::linear::MatmulOps for Gpu<R> {
    fn gemm<I: Elem>(
        &self,
        c: &mut R::Buf<f32>,
        a: &R::Buf<I>,
        b: &R::Buf<I>,
        spec: &crate::linear::GemmSpec,
    ) -> Result<()> {
        let op = kernel_for::<I>("matmul_f32", "matmul_f16")?;
        let rt = &self.0;
        spec.check(op, (rt.len(a), rt.len(b), rt.len(c)))?;
        for (what, v) in [
            ("m", spec.m),
            ("n", spec.n),
            ("k", spec.k),
            ("batch", spec.batch),
            ("lda", spec.leading_dims()[0]),
            ("ldb", spec.leading_dims()[1]),
            ("ldc", spec.leading_dims()[2]),
        ] {
            as_i32(op, what, v)?;
        }
        rt.gemm(c, a, b, spec)
    }
}

/// The [`Device`] over a [`Runtime`]: CUDA kernels on a GPU or in the emulator.
#[derive(Debug)]
pub struct Gpu<R: Runtime>(pub R);

impl<R: Runtime> Device for Gpu<R> {
    type Buf<T: Elem> = R::Buf<T>;
    fn name(&self) -> String {
        self.0.name()
    }
    fn zeros<T: Elem>(&self, len: usize) -> Result<R::Buf<T>> {
        self.0.zeros(len)
    }
    fn upload<T: Elem>(&self, host: &[T]) -> Result<R::Buf<T>> {
        self.0.upload(host)
    }
    fn download<T: Elem>(&self, buf: &R::Buf<T>) -> Result<Vec<T>> {
        self.0.download(buf)
    }
    fn len<T: Elem>(&self, buf: &R::Buf<T>) -> usize {
        self.0.len(buf)
    }
    fn fill_zero<T: Elem>(&self, buf: &mut R::Buf<T>) -> Result<()> {
        self.0.fill_zero(buf)
    }
    fn collective_addr(&self, buf: &mut R::Buf<f32>) -> Result<Option<u64>> {
        self.0.collective_addr(buf)
    }
}

/// Opens the file the library search found for `lib` by its path, with RTLD_GLOBAL, and keeps it
/// open: `cudarc` opens libraries by name only, and the dynamic loader hands it this one for its
/// soname. Returns the path opened, or `None` when the search found nothing (the library may
/// still load by name through the loader's own search).
pub(crate) fn preload(
    lib: &cuda_libs::Library,
    res: &cuda_libs::Resolution,
) -> Option<std::path::PathBuf> {
    let found = res.get(lib)?;
    let path = found.path();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: CUDA's libraries have benign initialisers; the handle is leaked on purpose.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    (!h.is_null()).then_some(path)
}

/// Threads per block of the grid-stride element-wise kernels.
pub(crate) const ELEMENTWISE_THREADS: usize = 256;
/// Most blocks of one grid-stride element-wise launch (the kernels stride over the rest): many
/// waves of an H100's 132 SMs × 8 blocks. Three in tests, so that the emulator runs every
/// grid-stride loop more than once with odd sizes.
const ELEMENTWISE_MAX_BLOCKS: usize = if cfg!(test) { 3 } else { 16_384 };

/// The launch shape of a grid-stride element-wise kernel over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchCfg {
    LaunchCfg::linear(
        n.div_ceil(ELEMENTWISE_THREADS)
            .clamp(1, ELEMENTWISE_MAX_BLOCKS) as u32,
        ELEMENTWISE_THREADS as u32,
    )
}

/// The f32 or f16 kernel of a pair, by the element type `T`; an error naming the kernel for any
/// other type.
pub(crate) fn kernel_for<T: Elem>(
    f32_name: &'static str,
    f16_name: &'static str,
) -> Result<&'static str> {
    match T::DTYPE {
        "f32" => Ok(f32_name),
        "f16" => Ok(f16_name),
        other => Err(KernelError::Shape {
            op: f32_name,
            what: format!("element type {other} (f32 or f16 only)"),
        }),
    }
}

/// Checks that a device buffer holds exactly `want` elements.
pub(crate) fn check_buf<R: Runtime, T: Elem>(
    rt: &R,
    kernel: &'static str,
    buffer: &'static str,
    buf: &R::Buf<T>,
    want: usize,
) -> Result<()> {
    crate::error::check_len(kernel, buffer, rt.len(buf), want)
}

/// `n` as the `int` a kernel takes, or an error naming the kernel.
pub(crate) fn as_i32(kernel: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| KernelError::Shape {
        op: kernel,
        what: format!("{what} = {n} exceeds the kernels' 32-bit index range"),
    })
}

/// True when `TESSERA_REQUIRE_GPU=1` (the GPU check sets it): a test or benchmark that would
/// skip for want of a GPU, NVRTC or CUDA header fails instead.
pub fn gpu_required() -> bool {
    std::env::var("TESSERA_REQUIRE_GPU").as_deref() == Ok("1")
}

/// The GPU that parity tests compare against the CPU reference, where one exists: `None` (and a
/// line saying why the GPU half is skipped) without a driver or device, unless
/// `TESSERA_REQUIRE_GPU=1` (the GPU check sets it), which turns a missing GPU into a failure.
pub fn cuda_for_tests() -> Option<&'static Gpu<Cuda>> {
    static DEVICE: std::sync::OnceLock<std::result::Result<Gpu<Cuda>, String>> =
        std::sync::OnceLock::new();
    let dev = DEVICE.get_or_init(|| {
        if !cuda_libs::loadable(&cuda_libs::DRIVER) {
            return Err("no CUDA driver on this machine".into());
        }
        Cuda::new(0).map(Gpu).map_err(|e| e.to_string())
    });
    match dev {
        Ok(d) => Some(d),
        Err(e) if gpu_required() => {
            panic!("TESSERA_REQUIRE_GPU=1 but the GPU is not usable: {e}")
        }
        Err(e) => {
            eprintln!("GPU half of the parity test skipped: {e}");
            None
        }
    }
}

/// In a parity test: runs `$body` with `$dev` bound to the emulated device under each
/// [`Schedule`], then to the GPU where one exists ([`cuda_for_tests`]), and `$label` (a
/// `String`) naming which, for messages.
#[cfg(test)]
macro_rules! for_each_gpu {
    ($label:ident, $dev:ident, $body:block) => {{
        for s in $crate::gpu::Schedule::ALL {
            let $label = format!("{s:?}");
            let $dev = &$crate::gpu::Gpu($crate::gpu::Emu::new(s));
            $body
        }
        if let Some($dev) = $crate::gpu::cuda_for_tests() {
            let $label = "GPU".to_string();
            $body
        }
    }};
}
#[cfg(test)]
pub(crate) use for_each_gpu;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{narrow, widen};
    use crate::linear::MatmulOps;
    use crate::testutil::rand_vec;
    use half::f16;

    /// op(a)·op(b) in f64 from the stored (row-major) operands: an independent reference for
    /// the transpose conventions of every backend.
    fn naive(
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        (m, n, k): (usize, usize, usize),
    ) -> Vec<f64> {
        let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] } as f64;
        let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] } as f64;
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
            }
        }
        c
    }

    fn check_device<D: MatmulOps, I: Elem>(dev: &D, atol: f64, rtol: f64) {
        let dims = (7, 5, 33);
        let (m, n, k) = dims;
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            // Values exactly representable in f16, so both precisions see the same inputs.
            let a: Vec<f32> = widen(&narrow::<f16>(&rand_vec(m * k, 1.0, 1))).into_owned();
            let b: Vec<f32> = widen(&narrow::<f16>(&rand_vec(k * n, 1.0, 2))).into_owned();
            let c0 = rand_vec(m * n, 1.0, 3);
            let want0 = naive(&a, a_t, &b, b_t, dims);
            for accumulate in [false, true] {
                let mut c = dev.upload(&c0).unwrap();
                let (ad, bd) = (
                    dev.upload(&narrow::<I>(&a)).unwrap(),
                    dev.upload(&narrow::<I>(&b)).unwrap(),
                );
                dev.matmul(&mut c, &ad, a_t, &bd, b_t, dims, accumulate)
                    .unwrap();
                let got = dev.download(&c).unwrap();
                for (i, (&g, &w)) in got.iter().zip(&want0).enumerate() {
                    let w = w + if accumulate { c0[i] as f64 } else { 0.0 };
                    assert!(
                        (g as f64 - w).abs() <= atol + rtol * w.abs(),
                        "{} {} a_t={a_t} b_t={b_t} acc={accumulate} [{i}]: {g} vs {w}",
                        dev.name(),
                        I::DTYPE
                    );
                }
            }
        }
        let mut c = dev.zeros::<f32>(m * n).unwrap();
        let a = dev.zeros::<I>(m * k + 1).unwrap();
        let b = dev.zeros::<I>(k * n).unwrap();
        let err = dev
            .matmul(&mut c, &a, false, &b, false, dims, false)
            .unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
    }

    /// A batch with a shared (stride 0) transposed `a`, `b` at an offset with a gap between
    /// products, accumulated into `c` at an offset with gaps that must stay untouched: what the
    /// convolution asks of cuBLAS's strided batched product.
    fn check_batched<D: MatmulOps>(dev: &D, tol: f32) {
        let (m, n, k, batch) = (3, 4, 5, 3);
        let spec = crate::linear::GemmSpec {
            a_t: true,
            accumulate: true,
            batch,
            offsets: [0, 1, 2],
            strides: [0, k * n + 2, m * n + 1],
            ..crate::linear::GemmSpec::new(m, n, k)
        };
        let a = rand_vec(k * m, 1.0, 21);
        let b = rand_vec(1 + batch * (k * n + 2), 1.0, 22);
        let c0 = rand_vec(2 + batch * (m * n + 1), 1.0, 23);
        let mut want: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
        for i in 0..batch {
            let bo = 1 + i * (k * n + 2);
            let prod = naive(&a, true, &b[bo..bo + k * n], false, (m, n, k));
            let co = 2 + i * (m * n + 1);
            for (w, p) in want[co..co + m * n].iter_mut().zip(prod) {
                *w += p;
            }
        }
        let mut c = dev.upload(&c0).unwrap();
        let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        dev.gemm(&mut c, &ad, &bd, &spec).unwrap();
        let got = dev.download(&c).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= (tol * (1.0 + w.abs() as f32)) as f64,
                "{} batched [{i}]: {g} vs {w}",
                dev.name()
            );
        }
        // c's products may not overlap.
        let bad = crate::linear::GemmSpec {
            strides: [0, k * n, m * n - 1],
            ..spec
        };
        assert!(dev
            .gemm(&mut c, &ad, &bd, &bad)
            .unwrap_err()
            .to_string()
            .contains("overlap"));
    }

    /// Products over one head at a time of an interleaved [t, 3, nh, hs] buffer (rows 3·nh·hs
    /// apart), batched over heads: `q·kᵀ` into packed [nh, t, t], then that times `v` into an
    /// [t, nh, hs] output whose heads sit side by side in every row (ldc = nh·hs), with a
    /// column of gaps that must stay untouched (ldc one wider). What dense attention asks.
    fn check_leading_dims<D: MatmulOps, I: Elem>(dev: &D, tol: f64) {
        let (t, nh, hs) = (5, 3, 4);
        let row = 3 * nh * hs;
        let qkv: Vec<f32> = widen(&narrow::<f16>(&rand_vec(t * row, 1.0, 31))).into_owned();
        let at = |p: usize, which: usize, h: usize, x: usize| {
            qkv[p * row + which * nh * hs + h * hs + x] as f64
        };
        let mut want_s = vec![0.0f64; nh * t * t];
        for h in 0..nh {
            for p in 0..t {
                for q in 0..t {
                    want_s[(h * t + p) * t + q] =
                        (0..hs).map(|x| at(p, 0, h, x) * at(q, 1, h, x)).sum();
                }
            }
        }
        let spec_s = crate::linear::GemmSpec {
            b_t: true,
            batch: nh,
            offsets: [0, nh * hs, 0],
            strides: [hs, hs, t * t],
            ld: [row, row, 0],
            ..crate::linear::GemmSpec::new(t, t, hs)
        };
        let d_qkv = dev.upload(&narrow::<I>(&qkv)).unwrap();
        let mut s = dev.zeros::<f32>(nh * t * t).unwrap();
        dev.gemm(&mut s, &d_qkv, &d_qkv, &spec_s).unwrap();
        let got = dev.download(&s).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want_s).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "{} q·kᵀ [{i}]: {g} vs {w}",
                dev.name()
            );
        }
        // o[p, h, :] += s[h, p, :] · v[:, h, :]; s as I (its values are exact in f16 only up to
        // rounding, so round them first and use the rounded values in the reference too).
        let s_in: Vec<f32> = widen(&narrow::<f16>(&got)).into_owned();
        let ldc = nh * hs + 1;
        let o0 = rand_vec(t * ldc, 1.0, 32);
        let mut want_o: Vec<f64> = o0.iter().map(|&v| v as f64).collect();
        for h in 0..nh {
            for p in 0..t {
                for x in 0..hs {
                    want_o[p * ldc + h * hs + x] += (0..t)
                        .map(|q| s_in[(h * t + p) * t + q] as f64 * at(q, 2, h, x))
                        .sum::<f64>();
                }
            }
        }
        let spec_o = crate::linear::GemmSpec {
            accumulate: true,
            batch: nh,
            offsets: [0, 2 * nh * hs, 0],
            strides: [t * t, hs, hs],
            ld: [0, row, ldc],
            ..crate::linear::GemmSpec::new(t, hs, t)
        };
        let d_s = dev.upload(&narrow::<I>(&s_in)).unwrap();
        let mut o = dev.upload(&o0).unwrap();
        dev.gemm(&mut o, &d_s, &d_qkv, &spec_o).unwrap();
        let got = dev.download(&o).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want_o).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "{} s·v [{i}]: {g} vs {w}",
                dev.name()
            );
        }
        // Heads one column closer would overlap; a leading dimension below the row is refused.
        let bad = crate::linear::GemmSpec {
            strides: [t * t, hs, hs - 1],
            ..spec_o
        };
        let e = dev
            .gemm(&mut o, &d_s, &d_qkv, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlap"), "{e}");
        let bad = crate::linear::GemmSpec {
            ld: [0, hs - 1, ldc],
            ..spec_o
        };
        let e = dev
            .gemm(&mut o, &d_s, &d_qkv, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("leading dimension of `b`"), "{e}");
        let bad = crate::linear::GemmSpec {
            offsets: [0, 2 * nh * hs + 1, 0],
            ..spec_o
        };
        let e = dev
            .gemm(&mut o, &d_s, &d_qkv, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`b`"), "{e}");
    }

    /// Scratch: poisoned in the emulator (a kernel reading what nobody wrote shows); on a GPU the
    /// same buffer again for the same key, type and length, and a new one otherwise.
    #[test]
    fn scratch_is_poisoned_in_the_emulator_and_reused_on_a_gpu() {
        let emu = Emu::new(Schedule::Forward);
        let s = emu.take_scratch::<f32>("test.scratch", 5).unwrap();
        assert!(s.len() == 5 && s.iter().all(|v| v.is_nan()), "{s:?}");
        let h = emu.take_scratch::<f16>("test.scratch", 3).unwrap();
        assert!(h.iter().all(|v| v.is_nan()), "{h:?}");
        let Some(gpu) = cuda_for_tests() else {
            return;
        };
        let rt = &gpu.0;
        let a = rt.take_scratch::<f32>("test.scratch", 100).unwrap();
        let addr = rt.addr(&a);
        rt.put_scratch("test.scratch", a);
        let b = rt.take_scratch::<f32>("test.scratch", 100).unwrap();
        assert_eq!(rt.addr(&b), addr, "the kept buffer comes back");
        rt.put_scratch("test.scratch", b);
        let c = rt.take_scratch::<f32>("test.scratch", 101).unwrap();
        assert_eq!(rt.len(&c), 101, "another length is another buffer");
        let d = rt.take_scratch::<f32>("test.scratch", 100).unwrap();
        assert_eq!(rt.len(&d), 100);
    }

    #[test]
    fn leading_dimensions_on_every_device() {
        check_leading_dims::<_, f32>(&crate::device::Cpu, 1e-5);
        for s in Schedule::ALL {
            check_leading_dims::<_, f32>(&Gpu(Emu::new(s)), 1e-5);
            check_leading_dims::<_, f16>(&Gpu(Emu::new(s)), 1e-5);
        }
        if let Some(gpu) = cuda_for_tests() {
            check_leading_dims::<_, f32>(gpu, 1e-4);
            check_leading_dims::<_, f16>(gpu, 1e-3);
        }
    }

    #[test]
    fn batched_products_at_offsets_and_strides_on_every_device() {
        check_batched(&crate::device::Cpu, 1e-5);
        check_batched(&Gpu(Emu::new(Schedule::Forward)), 1e-5);
        if let Some(gpu) = cuda_for_tests() {
            check_batched(gpu, 1e-4);
        }
    }

    #[test]
    fn matmul_follows_the_transpose_conventions_on_every_device() {
        check_device::<_, f32>(&crate::device::Cpu, 1e-5, 1e-5);
        for s in Schedule::ALL {
            check_device::<_, f32>(&Gpu(Emu::new(s)), 1e-5, 1e-5);
            check_device::<_, f16>(&Gpu(Emu::new(s)), 1e-5, 1e-5);
        }
        if let Some(gpu) = cuda_for_tests() {
            // cuBLAS may use TF32 for f32 inputs only if asked; the default math mode does not.
            check_device::<_, f32>(gpu, 1e-4, 1e-4);
            check_device::<_, f16>(gpu, 1e-3, 1e-3);
        }
    }
}
