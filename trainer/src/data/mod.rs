//! Training data for the trainer. For now one source: [`synthetic`], a documented generator of
//! captioned token grids; the memory-mapped shard loader of the data-pipeline issue replaces it
//! behind the same [`Batch`] interface.

pub mod image_shard;
pub mod synthetic;

/// One batch of token sequences, row-major: `text` [B, Tt], `image` [B, G²].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub text: Vec<u32>,
    pub image: Vec<u32>,
}
