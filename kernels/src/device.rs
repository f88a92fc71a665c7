//! The device seam: where buffers live and who runs the ops.
//!
//! A [`Device`] owns buffers of [`Elem`]s (its associated type [`Device::Buf`]) and copies them
//! to and from the host. The ops are small traits per kernel family on top of it (burn's shape),
//! for example [`crate::layernorm::LayerNormOps`]; each family implements them for
//!
//! - [`Cpu`]: host vectors and the readable Rust references of this crate (unchanged in
//!   behaviour: the CPU training path calls the same functions);
//! - [`crate::gpu::Gpu`] over a [`crate::gpu::Runtime`]: the CUDA C kernels of `kernels/cuda/`,
//!   run either on a GPU through cudarc ([`crate::gpu::Cuda`]) or on the CPU through the emulator
//!   ([`crate::gpu::Emu`], host buffers; what CI runs).
//!
//! Parity tests hold them together: the same inputs through [`Cpu`] and through
//! `Gpu<Emu>` (in CI) or `Gpu<Cuda>` (on a GPU) agree to stated tolerances.

use crate::error::Result;
use half::f16;
use std::borrow::Cow;

/// An element type of device buffers: its name in kernel names (`layernorm_forward_f16`).
pub trait Elem:
    Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    const DTYPE: &'static str;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// Host values as f32 (the references compute in f32): converted here, borrowed for f32.
    fn slice_to_f32(v: &[Self]) -> Cow<'_, [f32]> {
        Cow::Owned(v.iter().map(|x| x.to_f32()).collect())
    }
    /// f32 results as `Self`: rounded here (to nearest even for f16), moved for f32.
    fn vec_from_f32(v: Vec<f32>) -> Vec<Self> {
        v.iter().map(|&x| Self::from_f32(x)).collect()
    }
}

impl Elem for f32 {
    const DTYPE: &'static str = "f32";
    fn slice_to_f32(v: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(v)
    }
    fn vec_from_f32(v: Vec<f32>) -> Vec<f32> {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for f16 {
    const DTYPE: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for f64 {
    const DTYPE: &'static str = "f64";
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
}

impl Elem for u32 {
    const DTYPE: &'static str = "u32";
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as u32
    }
}

/// Buffers and copies; the ops are the family traits built on it.
pub trait Device {
    /// A buffer of `T` on this device.
    type Buf<T: Elem>;
    /// For messages: "cpu", "emulated CUDA (forward schedule)", "CUDA device 0 (NVIDIA H100…)".
    fn name(&self) -> String;
    /// A buffer of `len` zeros.
    fn zeros<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, host: &[T]) -> Result<Self::Buf<T>>;
    /// Waits for the work queued on the buffer and copies it to the host.
    fn download<T: Elem>(&self, buf: &Self::Buf<T>) -> Result<Vec<T>>;
    fn len<T: Elem>(&self, buf: &Self::Buf<T>) -> usize;
    /// Sets every element of `buf` to zero in place (no new allocation).
    fn fill_zero<T: Elem>(&self, buf: &mut Self::Buf<T>) -> Result<()>;
    /// For a collective that reads GPU memory (NCCL): `buf`'s CUDA device address, once the
    /// work queued on this device has finished. `None` where buffers are host memory (the CPU,
    /// the emulator): the caller reduces them on the host.
    fn collective_addr(&self, buf: &mut Self::Buf<f32>) -> Result<Option<u64>> {
        let _ = buf;
        Ok(None)
    }
}

/// The CPU: host vectors, the reference implementations.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Device for Cpu {
    type Buf<T: Elem> = Vec<T>;
    fn name(&self) -> String {
        "cpu".into()
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
    fn fill_zero<T: Elem>(&self, buf: &mut Vec<T>) -> Result<()> {
        buf.fill(T::default());
        Ok(())
    }
    fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
}

/// Host values as f32 (the references compute in f32): borrowed as they are when `T` is f32,
/// converted otherwise.
pub fn widen<T: Elem>(v: &[T]) -> Cow<'_, [f32]> {
    T::slice_to_f32(v)
}

/// Stores f32 results in `dst` as `T`: moved in when `T` is f32, rounded (to nearest even for
/// f16) otherwise.
pub fn store<T: Elem>(dst: &mut Vec<T>, v: Vec<f32>) {
    *dst = T::vec_from_f32(v);
}

/// f32 values stored as `T` (rounded to nearest even for f16).
pub fn narrow<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
