//! Tessera's trainer library: models, optimizer, configs, checkpoints and the training loop.
//! The file formats are the `formats` crate, the multi-process layer (collectives, rendezvous,
//! run lock) the `dist` crate, the ops the `kernels` crate (docs/architecture.md).
//!
//! - [`params`]: the flat parameter buffer and its table of named views.
//! - [`config`]: typed YAML run configs, validation and `--set` overrides.
//! - [`checkpoint`]: atomic, resumable checkpoint directories (safetensors + state.json + DONE),
//!   checksummed in a manifest and verified on load.
//! - [`model`]: the models, written llm.c-style with explicit forward and backward passes.
//! - [`optim`]: AdamW, clipping, learning-rate schedules, weight EMA.
//! - [`data`]: training data: the synthetic generator and the shard loaders.
//! - [`memory`]: the memory a config needs, checked against the machine before a run starts.
//! - [`powersgd`]: PowerSGD gradient compression (rank-r P/Q all-reduces with error feedback).
//! - [`train`], [`debug_state`], [`reconstruct`], [`sample`] (with [`rerank`], CLIP's re-ranking):
//!   the `trainer` subcommands; [`cli`] their command line.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod debug_state;
pub mod font;
pub mod memory;
pub mod model;
pub mod optim;
pub mod params;
pub mod plot;
pub mod powersgd;
pub mod progress;
pub mod reconstruct;
pub mod rerank;
pub mod sample;
pub mod tensorboard;
pub mod train;
