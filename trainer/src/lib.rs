//! Tessera's trainer library: models, optimizer, configs, checkpoints and the training loop.
//!
//! - [`params`]: the flat parameter buffer and its table of named views.
//! - [`config`]: typed YAML run configs, validation and `--set` overrides.
//! - [`checkpoint`]: atomic, resumable checkpoint directories (safetensors + state.json + DONE),
//!   checksummed in a manifest and verified on load.
//! - [`run_lock`]: one run per run directory (an advisory lock rank 0 holds).
//! - [`model`]: the models, written llm.c-style with explicit forward and backward passes.
//! - [`optim`]: AdamW, clipping, learning-rate schedules, weight EMA.
//! - [`data`]: training data (for now the synthetic generator).
//! - [`collectives`]: the seam for data-parallel gradient reduction.
//! - [`dist`]: multi-process runs: torchrun's variables, the rendezvous store's protocol and
//!   client, the TCP ring and NCCL collectives, heartbeats.
//! - [`cuda_libs`]: finding the CUDA libraries `cudarc` loads (CUDA installs, NVIDIA's wheels).
//! - [`memory`]: the memory a config needs, checked against the machine before a run starts.
//! - [`powersgd`]: PowerSGD gradient compression (rank-r P/Q all-reduces with error feedback).
//! - [`train`], [`debug_state`], [`reconstruct`]: the `trainer` subcommands; [`cli`] their
//!   command line; [`report`] how the binaries print an error.

pub mod checkpoint;
pub mod cli;
pub mod collectives;
pub mod config;
pub use kernels::cuda_libs;
pub mod data;
pub mod debug_state;
pub mod dist;
pub mod fsutil;
pub mod memory;
pub mod model;
pub mod optim;
pub mod params;
pub mod plot;
pub mod powersgd;
pub mod progress;
pub mod reconstruct;
pub mod report;
pub mod run_lock;
pub mod sample;
pub mod tensorboard;
pub mod train;
