//! The models, written llm.c-style: a parameter table over one flat buffer, an activation
//! struct, and explicit `forward` / `backward` passes that call the ops of the `kernels` crate.
//!
//! - [`transformer`]: the stage-2 sparse transformer of MODEL-SPEC.md §1.

pub mod dvae;
pub mod init;
pub mod transformer;
