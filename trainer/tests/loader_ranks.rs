//! Data parallelism through the loader: the ranks of a world read disjoint slices of every
//! global batch, and together they read exactly what one rank with the whole batch reads.

use formats::token_shard::{ShardLayout, TokenShardWriter};
use std::collections::HashSet;
use std::sync::Arc;
use trainer::data::loader::{Cursor, Loader, LoaderOptions, ShardSet};

const LAYOUT: ShardLayout = ShardLayout {
    text_len: 2,
    image_tokens: 3,
    text_vocab: 10,
    image_vocab: 500,
};

fn opts(batch_size: usize, rank: usize, world_size: usize) -> LoaderOptions {
    LoaderOptions {
        seed: 9,
        batch_size,
        rank,
        world_size,
        prefetch: 2,
        bpe_dropout: 0.0,
    }
}

/// Row r of a batch: (text, image) of one record; every record is distinct.
fn rows(b: &trainer::data::Batch) -> Vec<(Vec<u32>, Vec<u32>)> {
    b.text
        .chunks(2)
        .map(<[u32]>::to_vec)
        .zip(b.image.chunks(3).map(<[u32]>::to_vec))
        .collect()
}

#[test]
fn two_ranks_split_each_global_batch_of_one_rank_disjointly() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    let mut g = 0u32;
    for (k, n) in [9u32, 8, 6].into_iter().enumerate() {
        let path = dir.path().join(format!("t-{k}.tts"));
        let mut w = TokenShardWriter::create(&path, LAYOUT).unwrap();
        for _ in 0..n {
            w.push(&[g % 10, 11], &[g, g + 1, g + 2], "c").unwrap();
            g += 1;
        }
        paths.push(w.finish().unwrap());
    }
    let set = Arc::new(ShardSet::open(&paths, &LAYOUT).unwrap());
    let (b, w) = (3, 2);
    let mut one = Loader::new(set.clone(), opts(b * w, 0, 1), Cursor::default(), None).unwrap();
    let mut ranks: Vec<Loader> = (0..w)
        .map(|r| Loader::new(set.clone(), opts(b, r, w), Cursor::default(), None).unwrap())
        .collect();
    // 23 records, global batch 6: 3 global batches per epoch; 8 batches cross two epochs.
    for step in 0..8 {
        let whole = rows(&one.next_batch().unwrap());
        let parts: Vec<_> = ranks
            .iter_mut()
            .map(|l| rows(&l.next_batch().unwrap()))
            .collect();
        let a: HashSet<_> = parts[0].iter().collect();
        let c: HashSet<_> = parts[1].iter().collect();
        assert!(a.is_disjoint(&c), "step {step}: the ranks overlap");
        // Rank r holds positions r·B..(r+1)·B of the global batch, in order.
        assert_eq!(
            [parts[0].clone(), parts[1].clone()].concat(),
            whole,
            "step {step}"
        );
        assert_eq!(ranks[0].cursor(), one.cursor());
        assert_eq!(ranks[1].cursor(), one.cursor());
    }
    assert_eq!(
        one.cursor(),
        Cursor {
            epoch: 2,
            position: 12
        }
    );
}
