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

pub mod cuda;
pub mod cross_entropy;
pub mod emu;
pub mod gradscale;
pub mod layernorm;
pub mod nvrtc;
pub mod powersgd;

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
