//! Tessera's op library.
//!
//! One module per kernel family. Each family has a plain Rust CPU reference (f32, readable first,
//! multi-threaded where it matters); families ported to CUDA also have CUDA C source under
//! `kernels/cuda/`, a launcher in [`gpu`] and an op trait on the [`device`] seam that both
//! implement ([`layernorm::LayerNormOps`] first). The CUDA source runs on a GPU through NVRTC
//! ([`gpu::Cuda`]) and, in CI, on the CPU through an emulator ([`gpu::Emu`]); parity tests hold
//! every device to the reference. Every function checks its preconditions and returns
//! [`KernelError`] instead of panicking.
//!
//! The `cuda-libs` crate finds the CUDA libraries (driver, NCCL, NVRTC, cuBLAS) where users have
//! them; [`gpu`] loads them through it.
//!
//! Dimension letters, used throughout: `B` batch, `T` sequence, `C` channels (`d_model`), `OC`
//! output channels, `H` heads, `HS` head size, `V` vocabulary.
//!
//! Invariant shared by every backward function (llm.c's): parameter gradients accumulate (`+=`),
//! activation gradients are overwritten (`=`).

pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod cast;
pub mod conv2d;
pub mod cross_entropy;
pub mod dense_attention;
pub mod device;
pub mod dvae;
pub mod embedding;
pub mod error;
pub mod gelu;
pub mod gpu;
pub mod gradscale;
pub mod layernorm;
pub mod linear;
pub mod powersgd;
pub mod relu;
pub mod resample;
pub mod rows;
pub mod scale_add;
pub(crate) mod simd;

pub use error::{KernelError, Result};

#[cfg(test)]
pub(crate) mod testutil;
