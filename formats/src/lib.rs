//! Tessera's file formats, shared by the trainer, `data-prep` and the launcher without the
//! models:
//!
//! - [`token_shard`]: the `.tts` token shard format, its writer and memory-mapped reader;
//! - [`image_shard`]: the `.tis` image shard format, its writer and reader;
//! - [`bpe`]: the caption BPE (a `tokenizers` tokenizer.json) and how captions become the
//!   transformer's text tokens;
//! - [`fsutil`]: crash-safe file writing (temporary name, fsync, rename, directory fsync);
//! - [`report`]: how the binaries print an error.
//!
//! `bpe` and the two shard formats are behind the features of those names (both on by default),
//! so that the launcher, which needs only `fsutil` and `report`, builds without `tokenizers`,
//! `zstd` and `memmap2`.

#[cfg(feature = "bpe")]
pub mod bpe;
pub mod fsutil;
#[cfg(feature = "shards")]
pub mod image_shard;
pub mod report;
#[cfg(feature = "shards")]
pub mod token_shard;
