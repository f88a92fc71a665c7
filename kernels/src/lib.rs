//! Tessera's op library.
//!
//! One module per kernel family. Each family has a plain Rust CPU reference (f32, readable first,
//! multi-threaded where it matters) and, beside it, room for the CUDA launcher that a later issue
//! adds: the CPU functions already take what a launcher takes (flat row-major buffers plus explicit
//! dimensions) and check their preconditions, returning [`KernelError`] instead of panicking.
//!
//! Dimension letters, used throughout: `B` batch, `T` sequence, `C` channels (`d_model`), `OC`
//! output channels, `H` heads, `HS` head size, `V` vocabulary.
//!
//! Invariant shared by every backward function (llm.c's): parameter gradients accumulate (`+=`),
//! activation gradients are overwritten (`=`).

pub mod adamw;
pub mod attention;
pub mod conv2d;
pub mod cross_entropy;
pub mod embedding;
pub mod error;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod relu;
pub mod resample;
pub(crate) mod simd;

pub use error::{KernelError, Result};

#[cfg(test)]
pub(crate) mod testutil;
