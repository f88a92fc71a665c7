//! Training data for the trainer, behind one interface: a [`DataStream`] hands out [`Batch`]es
//! for this rank and reports a [`DataCursor`] that `state.json` saves, so that a resumed run
//! continues exactly where it stopped.
//!
//! - [`synthetic`]: a documented generator of captioned token grids (tests, the quickstart);
//! - the `.tts` token shard format itself is [`formats::token_shard`] (its layout for a config:
//!   [`TransformerDims::shard_layout`]);
//! - [`loader`]: the shard loader (global shuffle per epoch, per-rank slices, prefetch thread),
//!   generic over a [`loader::RecordSet`];
//! - [`image_loader`]: the loader of `.tis` image shards ([`formats::image_shard`]) (the dVAE's
//!   `[B, 3, H, W]` batches, a two-level chunk/record shuffle).

pub mod image_loader;
pub mod loader;
pub mod synthetic;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{DataSource, RunConfig, TransformerDims};
use formats::token_shard::{ShardError, ShardLayout};
use loader::{CaptionEncoder, Cursor, Loader, LoaderError, LoaderOptions, ShardSet};
use synthetic::SyntheticData;

/// One batch of token sequences, row-major: `text` [B, Tt], `image` [B, G²].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub text: Vec<u32>,
    pub image: Vec<u32>,
}

/// Where the data of a run stands, saved in `state.json` under `data`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataCursor {
    /// `data.source: synthetic`: the index of the next global batch's first sample.
    Synthetic { next_sample: u64 },
    /// `data.source: shards`: the loader's [`Cursor`], and the number of records it was
    /// counted over (a resume over different data is refused).
    Shards {
        epoch: u64,
        position: u64,
        records: u64,
    },
    /// `data.source: images` (the dVAE): the image loader's [`Cursor`] and record count.
    Images {
        epoch: u64,
        position: u64,
        records: u64,
    },
}

impl TransformerDims {
    /// The token-shard layout this transformer reads (errors name the `model.` field that does
    /// not fit the format).
    pub fn shard_layout(&self) -> Result<ShardLayout, ShardError> {
        ShardLayout::from_sizes(
            self.text_len,
            self.image_tokens(),
            self.text_vocab,
            self.image_vocab,
        )
    }
}

impl DataCursor {
    /// The cursor of a fresh run of `cfg`.
    pub fn start(cfg: &RunConfig) -> DataCursor {
        match cfg.data {
            DataSource::Synthetic(_) => DataCursor::Synthetic { next_sample: 0 },
            // `records` is filled in when the stream opens the shards.
            DataSource::Shards(_) => DataCursor::Shards {
                epoch: 0,
                position: 0,
                records: 0,
            },
            DataSource::Images(_) => DataCursor::Images {
                epoch: 0,
                position: 0,
                records: 0,
            },
        }
    }

    /// The `data.source` this cursor belongs to.
    pub fn source_name(&self) -> &'static str {
        match self {
            DataCursor::Synthetic { .. } => "synthetic",
            DataCursor::Shards { .. } => "shards",
            DataCursor::Images { .. } => "images",
        }
    }
}

/// Errors of opening or reading a run's data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "the checkpoint's data cursor is for data.source: {saved}, but the config has data.source: \
         {config}"
    )]
    SourceChanged {
        saved: &'static str,
        config: &'static str,
    },
    #[error(
        "the checkpoint's data cursor counts {saved} records, but data.paths now matches {now}: \
         the shards changed since the checkpoint, so the run cannot resume exactly; restore them or \
         start a new run.out_dir"
    )]
    RecordsChanged { saved: u64, now: u64 },
}

/// A resumed cursor `(epoch, position, records)` must count the records the shards hold now (a
/// fresh one is all zeros).
fn check_records(cursor: (u64, u64, u64), now: u64) -> Result<(), DataError> {
    let (epoch, position, saved) = cursor;
    if (epoch, position, saved) != (0, 0, 0) && saved != now {
        return Err(DataError::RecordsChanged { saved, now });
    }
    Ok(())
}

/// The loader options of `cfg` for `rank` of `world_size` (no BPE dropout).
fn loader_options(
    cfg: &RunConfig,
    rank: usize,
    world_size: usize,
    prefetch: usize,
) -> LoaderOptions {
    LoaderOptions {
        seed: cfg.run.seed,
        batch_size: cfg.train.batch_size,
        rank,
        world_size,
        prefetch,
        bpe_dropout: 0.0,
    }
}

/// The batches of one rank of a run, from the source its config names.
pub enum DataStream {
    Synthetic {
        data: SyntheticData,
        next_sample: u64,
        batch_size: usize,
        rank: usize,
        world_size: usize,
    },
    Shards(Loader),
}

impl DataStream {
    /// Opens the data of `cfg` for `rank` of `world_size`, continuing from `cursor`. `encoder`
    /// re-encodes captions when `data.bpe_dropout` > 0 (required then).
    pub fn open(
        cfg: &RunConfig,
        rank: usize,
        world_size: usize,
        cursor: DataCursor,
        encoder: Option<Arc<dyn CaptionEncoder>>,
    ) -> Result<DataStream, DataError> {
        let batch_size = cfg.train.batch_size;
        match (&cfg.data, cursor) {
            (DataSource::Synthetic(_), DataCursor::Synthetic { next_sample }) => {
                Ok(DataStream::Synthetic {
                    data: SyntheticData::from_config(cfg)?,
                    next_sample,
                    batch_size,
                    rank,
                    world_size,
                })
            }
            (
                DataSource::Shards(s),
                DataCursor::Shards {
                    epoch,
                    position,
                    records,
                },
            ) => {
                let layout = cfg.transformer()?.shard_layout()?;
                let mut set = ShardSet::open_patterns(&s.paths, &layout)?;
                if s.verify {
                    set = set.verify_on_first_use();
                }
                check_records((epoch, position, records), set.len())?;
                let opts = LoaderOptions {
                    bpe_dropout: s.bpe_dropout as f32,
                    ..loader_options(cfg, rank, world_size, s.prefetch)
                };
                let start = Cursor { epoch, position };
                Ok(DataStream::Shards(Loader::new(
                    Arc::new(set),
                    opts,
                    start,
                    encoder,
                )?))
            }
            (_, saved) => Err(DataError::SourceChanged {
                saved: saved.source_name(),
                config: DataCursor::start(cfg).source_name(),
            }),
        }
    }

    /// This rank's next batch.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        match self {
            DataStream::Synthetic {
                data,
                next_sample,
                batch_size,
                rank,
                world_size,
            } => {
                let first = *next_sample + (*rank * *batch_size) as u64;
                *next_sample += (*batch_size * *world_size) as u64;
                Ok(data.batch(first, *batch_size))
            }
            DataStream::Shards(loader) => Ok(loader.next_batch()?),
        }
    }

    /// Returns a spent batch's buffers for reuse (shards; a no-op for synthetic data).
    pub fn recycle(&self, batch: Batch) {
        if let DataStream::Shards(loader) = self {
            loader.recycle(batch);
        }
    }

    /// Where the batch after the last one returned starts.
    pub fn cursor(&self) -> DataCursor {
        match self {
            DataStream::Synthetic { next_sample, .. } => DataCursor::Synthetic {
                next_sample: *next_sample,
            },
            DataStream::Shards(loader) => {
                let c = loader.cursor();
                DataCursor::Shards {
                    epoch: c.epoch,
                    position: c.position,
                    records: loader.records(),
                }
            }
        }
    }
}

/// The image batches of one rank of a dVAE or CLIP run (`data.source: images`).
pub struct ImageStream {
    loader: image_loader::ImageLoader,
}

impl ImageStream {
    /// Opens the image shards of `cfg` (each must hold `model.resolution`-pixel images, CLIP's
    /// `model.vision_config.image_size`; the error names the file) for `rank` of `world_size`,
    /// continuing from `cursor`.
    pub fn open(
        cfg: &RunConfig,
        rank: usize,
        world_size: usize,
        cursor: DataCursor,
    ) -> Result<ImageStream, DataError> {
        let resolution = match (cfg.model.dvae(), cfg.model.clip()) {
            (Some(d), _) => d.resolution,
            (None, Some(c)) => c.vision_config.image_size,
            (None, None) => 0,
        };
        let (DataSource::Images(s), true) = (&cfg.data, resolution > 0) else {
            return Err(DataError::SourceChanged {
                saved: cursor.source_name(),
                config: DataCursor::start(cfg).source_name(),
            });
        };
        let DataCursor::Images {
            epoch,
            position,
            records,
        } = cursor
        else {
            return Err(DataError::SourceChanged {
                saved: cursor.source_name(),
                config: "images",
            });
        };
        let set = image_loader::ImageShardSet::open_patterns(&s.paths, resolution as u32)?;
        check_records((epoch, position, records), set.len())?;
        let opts = loader_options(cfg, rank, world_size, s.prefetch);
        let loader =
            image_loader::ImageLoader::images(Arc::new(set), opts, Cursor { epoch, position })?;
        Ok(ImageStream { loader })
    }

    /// This rank's next batch: `[B, 3, H, W]` pixels in [0, 1].
    pub fn next_batch(&mut self) -> Result<image_loader::ImageBatch, DataError> {
        Ok(self.loader.next_batch()?)
    }

    /// Returns a spent batch's buffer for reuse.
    pub fn recycle(&self, batch: image_loader::ImageBatch) {
        self.loader.recycle(batch);
    }

    /// Where the batch after the last one returned starts.
    pub fn cursor(&self) -> DataCursor {
        let c = self.loader.cursor();
        DataCursor::Images {
            epoch: c.epoch,
            position: c.position,
            records: self.loader.records(),
        }
    }
}
