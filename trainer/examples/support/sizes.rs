//! The benchmark sizes shared by `bench_transformer` and `bench_sample` (and mirrored by
//! tools/bench_pytorch.py): the transformer's dimensions and the training benchmark's batch.

use anyhow::{bail, Result};
use trainer::model::transformer::TransformerDims;

/// `tiny`, `small`, `paperseq` or `paperstack` (the paper-shaped layer stack of the GPU check,
/// `scripts/gpu-check.sh bench`; far too big for a CPU): the dimensions and the batch the
/// training benchmark uses.
pub fn size(name: &str) -> Result<(TransformerDims, usize)> {
    let d = |text_len, text_vocab, grid, image_vocab, d_model, heads, layers| TransformerDims {
        text_len,
        text_vocab,
        grid,
        image_vocab,
        d_model,
        heads,
        layers,
        conv_kernel: 11,
    };
    Ok(match name {
        "tiny" => (d(32, 1024, 8, 512, 256, 8, 8), 16),
        "small" => (d(64, 4096, 16, 1024, 384, 6, 12), 8),
        "paperseq" => (d(256, 16384, 32, 8192, 256, 4, 4), 2),
        "paperstack" => (d(256, 16384, 32, 8192, 2048, 32, 24), 4),
        other => bail!("unknown --size {other}: expected tiny, small, paperseq or paperstack"),
    })
}
