//! Tessera's trainer library: models, optimizer, configs, checkpoints and the training loop.
//!
//! - [`params`]: the flat parameter buffer and its table of named views.
//! - [`config`]: typed YAML run configs, validation and `--set` overrides.
//! - [`checkpoint`]: atomic, resumable checkpoint directories (safetensors + state.json + DONE).
//! - [`cli`]: the `trainer` command line (subcommands and flags).
//! - [`model`]: the models, written llm.c-style with explicit forward and backward passes.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod model;
pub mod params;
