//! The image-shard loader: batches of images `[B, 3, H, W]` f32 in [0, 1] for one rank, read
//! from image shards (`.tis`, [`formats::image_shard`]) through the generic loader machinery of
//! [`super::loader`] (rank slices, cursor, prefetch thread, recycling, shutdown), for the dVAE
//! and CLIP (which also reads each record's caption).
//!
//! Order: a two-level shuffle. A record-level permutation would make nearly every record land in
//! a different zstd chunk than the one before it, so each record would cost a whole chunk's
//! decompression. Instead, epoch `e` ([`ImageShardSet::epoch_order`], a pure function of
//! (seed, e)):
//!
//! 1. permutes the chunks of all shards together (ChaCha8 Fisher–Yates over the global chunk
//!    list, shards in sorted path order, chunks in file order);
//! 2. cuts that chunk order into consecutive windows of `shuffle_window_chunks` chunks (default
//!    [`DEFAULT_SHUFFLE_WINDOW_CHUNKS`]) and permutes the records of each window among themselves
//!    (same stream, window after window).
//!
//! The result is a permutation of all N records, so an epoch visits each record at most once
//! (the last N mod B·W are skipped, as for tokens), and the cursor `{epoch, position}` resumes
//! exactly. Rank r takes positions r·B .. (r+1)·B of each global batch.
//!
//! Trade-off of the window w: a batch draws its records from the ≤ w chunks of one or two windows,
//! so records written together (one chunk) stay somewhat correlated within an epoch; a larger w
//! mixes better (w = all chunks is a full shuffle) but holds w decompressed chunks in memory
//! (w × chunk_records × H·W·3 bytes: 8 × 64 × 256² × 3 ≈ 100 MB at 256 px). The decompression
//! cost does not depend on w: each reader keeps a least-recently-used cache of w chunks, and since
//! a window's records all come before the next window's, every chunk is decompressed once per
//! epoch per rank ([`ImageShardSet::chunks_decoded`] counts them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::loader::{
    epoch_rng, resolve_paths_with, shuffle, BatchReader, Cursor, Loader, LoaderError,
    LoaderOptions, RecordSet,
};
use formats::image_shard::{DecodedChunk, ImageShard, EXTENSION};

/// Chunks per shuffle window unless set otherwise.
pub const DEFAULT_SHUFFLE_WINDOW_CHUNKS: usize = 8;
/// Keeps the image order's random stream apart from the other streams of the same seed.
const IMAGE_SHUFFLE_SALT: u64 = 0x1a6e_5e7d_0c4a_0003;

/// One rank's batch of images: `pixels` is `[batch, 3, resolution, resolution]` f32, row-major
/// (NCHW), each value the stored u8 divided by 255; `captions` the records' captions in the same
/// order (CLIP trains on them; the dVAE ignores them).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageBatch {
    pub batch: usize,
    pub resolution: u32,
    pub pixels: Vec<f32>,
    pub captions: Vec<String>,
}

/// The image reader on the calling thread.
pub type ImageReader = BatchReader<ImageShardSet>;
/// The image loader with its prefetch thread.
pub type ImageLoader = Loader<ImageShardSet>;

/// One chunk of the global chunk list.
#[derive(Clone, Copy, Debug)]
struct ChunkRef {
    shard: u32,
    chunk: u32,
    /// Global index of the chunk's first record.
    first: u64,
    records: u32,
}

/// Image shards opened together, with one global record index over all of them (shards in the
/// given order, records in file order) and the global list of their chunks.
#[derive(Debug)]
pub struct ImageShardSet {
    shards: Vec<ImageShard>,
    resolution: u32,
    chunks: Vec<ChunkRef>,
    records: u64,
    window: usize,
    decoded: AtomicU64,
}

impl ImageShardSet {
    /// Opens every shard (header and index checks) and checks that each has `resolution`
    /// (the error names the file and both numbers).
    pub fn open(paths: &[PathBuf], resolution: u32) -> Result<ImageShardSet, LoaderError> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut chunks = Vec::new();
        let mut records = 0u64;
        for (k, path) in paths.iter().enumerate() {
            let shard = ImageShard::open_expecting(path, resolution)?;
            for (c, e) in shard.chunks().iter().enumerate() {
                chunks.push(ChunkRef {
                    shard: k as u32,
                    chunk: c as u32,
                    first: records + e.first_record,
                    records: e.record_count,
                });
            }
            records += shard.len();
            shards.push(shard);
        }
        if records > u32::MAX as u64 {
            return Err(LoaderError::TooManyRecords { records });
        }
        Ok(ImageShardSet {
            shards,
            resolution,
            chunks,
            records,
            window: DEFAULT_SHUFFLE_WINDOW_CHUNKS,
            decoded: AtomicU64::new(0),
        })
    }

    /// Resolves `patterns` (each must match at least one `.tis` file; sorted, de-duplicated,
    /// `.tis.tmp` ignored) and opens the shards.
    pub fn open_patterns(
        patterns: &[String],
        resolution: u32,
    ) -> Result<ImageShardSet, LoaderError> {
        Self::open(&resolve_paths_with(patterns, EXTENSION)?, resolution)
    }

    /// Sets the shuffle window (chunks whose records are shuffled together; ≥ 1), which is also
    /// the readers' chunk-cache capacity. See the module docs for the trade-off.
    pub fn with_shuffle_window(mut self, chunks: usize) -> Result<ImageShardSet, LoaderError> {
        if chunks == 0 {
            return Err(LoaderError::BadShuffleWindow);
        }
        self.window = chunks;
        Ok(self)
    }

    /// Chunks per shuffle window.
    pub fn shuffle_window_chunks(&self) -> usize {
        self.window
    }

    /// Records over all shards, N.
    pub fn len(&self) -> u64 {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Image side length (H = W) of every shard.
    pub fn resolution(&self) -> u32 {
        self.resolution
    }

    pub fn shards(&self) -> &[ImageShard] {
        &self.shards
    }

    /// Chunks over all shards.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Chunks decompressed so far by all readers of this set.
    pub fn chunks_decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }

    /// The global chunk holding global record `g` (< N).
    fn chunk_of(&self, g: u64) -> usize {
        self.chunks.partition_point(|c| c.first <= g) - 1
    }

    /// The shard and local index of global record `g` (< N).
    pub fn locate(&self, g: u64) -> (usize, u64) {
        let c = self.chunks[self.chunk_of(g)];
        let shard = &self.shards[c.shard as usize];
        let local = shard.chunks()[c.chunk as usize].first_record + (g - c.first);
        (c.shard as usize, local)
    }

    /// The visiting order of `epoch`: the two-level shuffle of the module docs, a permutation
    /// of 0..N and a pure function of (seed, epoch, the chunk layout, the window).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32> {
        let mut rng = epoch_rng(seed, IMAGE_SHUFFLE_SALT, epoch);
        let mut chunk_order: Vec<u32> = (0..self.chunks.len() as u32).collect();
        shuffle(&mut rng, &mut chunk_order);
        let mut order = Vec::with_capacity(self.records as usize);
        for window in chunk_order.chunks(self.window) {
            let start = order.len();
            for &c in window {
                let c = self.chunks[c as usize];
                order.extend(c.first as u32..(c.first + c.records as u64) as u32);
            }
            shuffle(&mut rng, &mut order[start..]);
        }
        order
    }

    fn decode(&self, c: usize) -> Result<DecodedChunk, LoaderError> {
        let r = self.chunks[c];
        let chunk = self.shards[r.shard as usize].decode_chunk(r.chunk as usize)?;
        self.decoded.fetch_add(1, Ordering::Relaxed);
        Ok(chunk)
    }
}

/// A reader's chunk cache: the `capacity` most recently used decompressed chunks.
pub struct ImageState {
    capacity: usize,
    /// (global chunk, last use, chunk); at most `capacity` entries.
    slots: Vec<(usize, u64, DecodedChunk)>,
    tick: u64,
    decoded: u64,
}

impl ImageState {
    fn new(capacity: usize) -> ImageState {
        ImageState {
            capacity,
            slots: Vec::with_capacity(capacity),
            tick: 0,
            decoded: 0,
        }
    }

    /// Chunks this reader decompressed.
    pub fn chunks_decoded(&self) -> u64 {
        self.decoded
    }

    /// Global chunk `c`, decompressed on a miss (evicting the least recently used chunk).
    fn get(&mut self, set: &ImageShardSet, c: usize) -> Result<&DecodedChunk, LoaderError> {
        self.tick += 1;
        let slot = match self.slots.iter().position(|s| s.0 == c) {
            Some(i) => i,
            None => {
                let chunk = set.decode(c)?;
                self.decoded += 1;
                if self.slots.len() < self.capacity {
                    self.slots.push((c, 0, chunk));
                    self.slots.len() - 1
                } else {
                    let lru = (0..self.slots.len())
                        .min_by_key(|&i| self.slots[i].1)
                        .unwrap_or(0);
                    self.slots[lru] = (c, 0, chunk);
                    lru
                }
            }
        };
        self.slots[slot].1 = self.tick;
        Ok(&self.slots[slot].2)
    }
}

impl Clone for ImageState {
    /// A clone starts with an empty cache (decoded chunks are not shared).
    fn clone(&self) -> Self {
        ImageState::new(self.capacity)
    }
}

/// Writes one `[H, W, 3]` u8 image as `[3, H, W]` f32 values v / 255 into `dst` (3·H·W).
pub fn hwc_to_chw(src: &[u8], dst: &mut [f32]) {
    let hw = src.len() / 3;
    let (r, rest) = dst.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    // Zipped iterators without index arithmetic let the compiler vectorise the de-interleave.
    for (((px, r), g), b) in src.chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = px[0] as f32 / 255.0;
        *g = px[1] as f32 / 255.0;
        *b = px[2] as f32 / 255.0;
    }
}

impl RecordSet for ImageShardSet {
    type Batch = ImageBatch;
    type State = ImageState;

    fn records(&self) -> u64 {
        self.records
    }

    fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<u32> {
        ImageShardSet::epoch_order(self, seed, epoch)
    }

    fn empty_batch(&self) -> ImageBatch {
        ImageBatch {
            batch: 0,
            resolution: self.resolution,
            pixels: Vec::new(),
            captions: Vec::new(),
        }
    }

    fn batch_bytes(&self, batch_size: usize) -> usize {
        let r = self.resolution as usize;
        batch_size * 3 * r * r * std::mem::size_of::<f32>()
    }

    fn fill(
        &self,
        state: &mut ImageState,
        _opts: &LoaderOptions,
        _epoch: u64,
        indices: &[u32],
        batch: &mut ImageBatch,
    ) -> Result<(), LoaderError> {
        let per = 3 * self.resolution as usize * self.resolution as usize;
        batch.batch = indices.len();
        batch.resolution = self.resolution;
        // Every value is overwritten below; resizing only zero-fills a new buffer once.
        batch.pixels.resize(indices.len() * per, 0.0);
        batch.captions.clear();
        for (&g, dst) in indices.iter().zip(batch.pixels.chunks_exact_mut(per)) {
            let c = self.chunk_of(g as u64);
            let j = (g as u64 - self.chunks[c].first) as usize;
            let chunk = state.get(self, c)?;
            hwc_to_chw(chunk.pixels(j), dst);
            batch.captions.push(chunk.caption(j).to_string());
        }
        Ok(())
    }
}

impl BatchReader<ImageShardSet> {
    /// A synchronous image reader of `set` for the rank and batch of `opts` (`bpe_dropout` is
    /// ignored), with a chunk cache of the set's shuffle window.
    pub fn images(set: Arc<ImageShardSet>, opts: LoaderOptions) -> Result<Self, LoaderError> {
        let state = ImageState::new(set.shuffle_window_chunks());
        BatchReader::with_state(set, opts, state)
    }
}

impl Loader<ImageShardSet> {
    /// The prefetching image loader of `set`, starting at `start` (a saved
    /// [`Loader::cursor`], or the default for a fresh run).
    pub fn images(
        set: Arc<ImageShardSet>,
        opts: LoaderOptions,
        start: Cursor,
    ) -> Result<Self, LoaderError> {
        Loader::from_reader(ImageReader::images(set, opts)?, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use formats::image_shard::{ImageShardWriter, DEFAULT_LEVEL};
    use std::collections::HashSet;
    use std::path::Path;

    const RES: u32 = 8;

    /// The pixels of global record g: bytes 0 and 1 hold g (little-endian), the rest vary.
    fn pixels(g: u32) -> Vec<u8> {
        let n = (RES * RES * 3) as usize;
        let mut p: Vec<u8> = (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(g * 7) >> 11) as u8)
            .collect();
        p[0] = g as u8;
        p[1] = (g >> 8) as u8;
        p
    }

    /// Shards of `sizes` records with `chunk` records per chunk; record g is `pixels(g)`.
    fn write_shards(dir: &Path, sizes: &[u32], res: u32, chunk: u32) -> Vec<PathBuf> {
        let mut g = 0;
        let mut paths = Vec::new();
        for (k, &n) in sizes.iter().enumerate() {
            let path = dir.join(format!("img-{k:02}.tis"));
            let mut w = ImageShardWriter::create(&path, res, chunk, DEFAULT_LEVEL).unwrap();
            for _ in 0..n {
                let mut p = pixels(g);
                p.resize((res * res * 3) as usize, 0);
                w.push(&p, &format!("r{g}"), None).unwrap();
                g += 1;
            }
            w.finish().unwrap();
            paths.push(path);
        }
        paths
    }

    fn open(dir: &Path, sizes: &[u32], window: usize) -> Arc<ImageShardSet> {
        let paths = write_shards(dir, sizes, RES, 4);
        let set = ImageShardSet::open(&paths, RES).unwrap();
        Arc::new(set.with_shuffle_window(window).unwrap())
    }

    fn opts(batch_size: usize, rank: usize, world_size: usize) -> LoaderOptions {
        LoaderOptions {
            seed: 5,
            batch_size,
            rank,
            world_size,
            prefetch: 2,
            bpe_dropout: 0.0,
        }
    }

    /// The global record index of each row, read back from the red and green values of its
    /// first pixel (stored bytes 0 and 1).
    fn ids(b: &ImageBatch) -> Vec<u32> {
        let hw = (b.resolution * b.resolution) as usize;
        b.pixels
            .chunks(3 * hw)
            .map(|p| (p[0] * 255.0).round() as u32 + 256 * (p[hw] * 255.0).round() as u32)
            .collect()
    }

    #[test]
    fn order_is_a_pure_function_of_seed_and_epoch_and_a_permutation() {
        let dir = tempfile::tempdir().unwrap();
        // 3 shards, 46 records, chunks of 4 (the last chunk of each shard shorter): 13 chunks.
        let set = open(dir.path(), &[17, 9, 20], 3);
        assert_eq!(set.chunk_count(), 5 + 3 + 5);
        let o = set.epoch_order(1, 0);
        let mut sorted = o.clone();
        sorted.sort();
        assert_eq!(sorted, (0..46).collect::<Vec<_>>());
        assert_eq!(o, set.epoch_order(1, 0));
        assert_ne!(o, set.epoch_order(1, 1));
        assert_ne!(o, set.epoch_order(2, 0));
        assert_ne!(o, sorted);
        // Each window of 3 chunks is a contiguous stretch of the order: the first window's
        // records are exactly the records of 3 chunks.
        let chunk_of = |g: u32| set.chunk_of(g as u64);
        let mut first = 0;
        let mut chunks = HashSet::new();
        while chunks.len() < 3 || chunks.contains(&chunk_of(o[first])) {
            chunks.insert(chunk_of(o[first]));
            first += 1;
        }
        let size: u32 = chunks.iter().map(|&c| set.chunks[c].records).sum();
        assert_eq!(first as u32, size);
    }

    #[test]
    fn an_epoch_visits_each_record_at_most_once_and_then_reshuffles() {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), &[13, 10], 2);
        let mut l = ImageLoader::images(set.clone(), opts(5, 0, 1), Cursor::default()).unwrap();
        // 23 records, batches of 5: 4 batches per epoch, 3 records left out.
        let mut epoch0 = Vec::new();
        for _ in 0..4 {
            let b = l.next_batch().unwrap();
            assert_eq!((b.batch, b.resolution), (5, RES));
            epoch0.extend(ids(&b));
        }
        assert_eq!(
            l.cursor(),
            Cursor {
                epoch: 1,
                position: 0
            }
        );
        assert_eq!(epoch0, set.epoch_order(5, 0)[..20].to_vec());
        assert_eq!(epoch0.iter().collect::<HashSet<_>>().len(), 20);
        let next = ids(&l.next_batch().unwrap());
        assert_eq!(next, set.epoch_order(5, 1)[..5].to_vec());
        assert_ne!(next, epoch0[..5].to_vec());
    }

    #[test]
    fn resuming_from_a_cursor_continues_the_same_stream() {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), &[11, 8], 3);
        let mut straight =
            ImageLoader::images(set.clone(), opts(3, 0, 1), Cursor::default()).unwrap();
        let all: Vec<ImageBatch> = (0..14).map(|_| straight.next_batch().unwrap()).collect();
        let mut first = ImageLoader::images(set.clone(), opts(3, 0, 1), Cursor::default()).unwrap();
        for b in &all[..8] {
            let got = first.next_batch().unwrap();
            assert_eq!(&got, b);
            // Recycled buffers are refilled completely.
            first.recycle(got);
        }
        let saved = first.cursor();
        assert_eq!(
            saved,
            Cursor {
                epoch: 1,
                position: 6
            }
        );
        drop(first); // with batches still prefetched: the shutdown must not hang
        let mut resumed = ImageLoader::images(set, opts(3, 0, 1), saved).unwrap();
        for b in &all[8..] {
            assert_eq!(&resumed.next_batch().unwrap(), b);
        }
    }

    #[test]
    fn two_ranks_read_disjoint_halves_of_one_ranks_batch() {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), &[15, 15], 2);
        let mut one = ImageReader::images(set.clone(), opts(6, 0, 1)).unwrap();
        let mut r0 = ImageReader::images(set.clone(), opts(3, 0, 2)).unwrap();
        let mut r1 = ImageReader::images(set, opts(3, 1, 2)).unwrap();
        let mut cursor = Cursor::default();
        for _ in 0..7 {
            let whole = one.read(cursor).unwrap();
            let (a, b) = (r0.read(cursor).unwrap(), r1.read(cursor).unwrap());
            let (ia, ib) = (ids(&a), ids(&b));
            assert!(ia.iter().all(|g| !ib.contains(g)), "{ia:?} {ib:?}");
            let half = whole.pixels.len() / 2;
            assert_eq!(whole.pixels[..half], a.pixels[..]);
            assert_eq!(whole.pixels[half..], b.pixels[..]);
            cursor = cursor.advance(6, 30);
        }
        assert_eq!(cursor.epoch, 1);
    }

    #[test]
    fn pixels_are_value_over_255_in_chw_order() {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), &[6], 1);
        let mut r = ImageReader::images(set.clone(), opts(2, 0, 1)).unwrap();
        let at = Cursor {
            epoch: 3,
            position: 2,
        };
        let gs = r.indices(at).to_vec();
        let b = r.read(at).unwrap();
        let res = RES as usize;
        assert_eq!(b.pixels.len(), 2 * 3 * res * res);
        for (row, &g) in gs.iter().enumerate() {
            let src = pixels(g);
            for c in 0..3 {
                for y in 0..res {
                    for x in 0..res {
                        let got = b.pixels[((row * 3 + c) * res + y) * res + x];
                        let want = src[(y * res + x) * 3 + c] as f32 / 255.0;
                        assert_eq!(got.to_bits(), want.to_bits(), "row {row} c {c} y {y} x {x}");
                    }
                }
            }
        }
        // The stored record is what the shard's own reader returns.
        let (k, i) = set.locate(gs[0] as u64);
        assert_eq!(set.shards()[k].record(i).unwrap().pixels, pixels(gs[0]));
    }

    #[test]
    fn prefetching_loader_matches_the_synchronous_reader() {
        let dir = tempfile::tempdir().unwrap();
        let set = open(dir.path(), &[9, 12, 7], 2);
        let o = opts(4, 1, 2);
        let start = Cursor {
            epoch: 2,
            position: 8,
        };
        let mut l = ImageLoader::images(set.clone(), o, start).unwrap();
        let mut r = ImageReader::images(set, o).unwrap();
        let mut cursor = start;
        for _ in 0..9 {
            let got = l.next_batch().unwrap();
            assert_eq!(got, r.read(cursor).unwrap());
            l.recycle(got);
            cursor = cursor.advance(8, 28);
            assert_eq!(l.cursor(), cursor);
        }
    }

    #[test]
    fn each_chunk_is_decompressed_at_most_once_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        // 3 shards, 15 chunks of ≤ 4 records; windows of 3 chunks.
        let set = open(dir.path(), &[20, 18, 17], 3);
        let chunks = set.chunk_count() as u64;
        assert_eq!(chunks, 5 + 5 + 5);
        for world in [1, 2] {
            for rank in 0..world {
                let mut r = ImageReader::images(set.clone(), opts(2, rank, world)).unwrap();
                let mut cursor = Cursor::default();
                let mut touched = HashSet::new();
                while cursor.epoch == 0 {
                    for &g in r.indices(cursor) {
                        touched.insert(set.chunk_of(g as u64));
                    }
                    r.read(cursor).unwrap();
                    cursor = cursor.advance(2 * world as u64, set.len());
                }
                // Every chunk the rank needed, once.
                let decoded = r.state().chunks_decoded();
                assert_eq!(decoded, touched.len() as u64, "rank {rank}/{world}");
                assert!(decoded <= chunks);
            }
        }
        // A window of one chunk with a one-chunk cache: still once per chunk.
        let set = open(dir.path(), &[20, 18, 17], 1);
        let mut r = ImageReader::images(set.clone(), opts(5, 0, 1)).unwrap();
        let mut cursor = Cursor::default();
        let mut touched = HashSet::new();
        while cursor.epoch == 0 {
            for &g in r.indices(cursor) {
                touched.insert(set.chunk_of(g as u64));
            }
            r.read(cursor).unwrap();
            cursor = cursor.advance(5, set.len());
        }
        assert_eq!(r.state().chunks_decoded(), touched.len() as u64);
        // Through the prefetching loader (tiny batches: parcels of several), at most once per
        // chunk per epoch the thread reached; it reads at most `read_ahead_limit` batches past
        // the 11 of epoch 0 handed out.
        let before = set.chunks_decoded();
        let mut l = ImageLoader::images(set.clone(), opts(5, 0, 1), Cursor::default()).unwrap();
        for _ in 0..11 {
            l.next_batch().unwrap();
        }
        let epochs = (11 + l.read_ahead_limit() as u64).div_ceil(11);
        drop(l);
        let decoded = set.chunks_decoded() - before;
        assert!(decoded <= chunks * epochs, "{decoded}");
    }

    #[test]
    fn resolution_mismatch_and_empty_globs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = write_shards(dir.path(), &[3], RES, 4);
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        paths.extend(write_shards(&other, &[3], 16, 4));
        let e = ImageShardSet::open(&paths, RES).unwrap_err().to_string();
        assert!(e.contains("other/img-00.tis"), "{e}");
        assert!(e.contains("resolution is 16×16, expected 8×8"), "{e}");
        let e = ImageShardSet::open(&paths[..1], 16)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("img-00.tis: image shard resolution is 8×8, expected 16×16"),
            "{e}"
        );
        // Globs: only .tis files, a pattern matching none is named.
        std::fs::write(dir.path().join("img-09.tis.tmp"), b"half").unwrap();
        let all = format!("{}/img-*", dir.path().display());
        let set = ImageShardSet::open_patterns(std::slice::from_ref(&all), RES).unwrap();
        assert_eq!(set.len(), 3);
        let none = format!("{}/img-09*", dir.path().display());
        let e = ImageShardSet::open_patterns(&[all, none.clone()], RES)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("data.paths pattern '{none}' matches no .tis shard")
        );
        assert!(ImageShardSet::open(&paths[..1], RES)
            .unwrap()
            .with_shuffle_window(0)
            .is_err());
    }
}
