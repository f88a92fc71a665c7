//! Token-shard loader throughput against a plain memcpy of the same bytes, on this machine, in
//! the same run. Builds a temporary set of token shards with the paper's sequence layout
//! (Tt 256, G 32: 1,280 tokens, 2-byte ids, 2,576-byte records), warms the page cache, then
//! prints one JSON line per measurement:
//!
//! - `memcpy_sequential`: the record bytes of every shard copied in batch-sized pieces into a
//!   reused buffer, in file order (the ceiling);
//! - `memcpy_permuted`: the same bytes, record by record, in the epoch's shuffled order;
//! - `loader_sync`: the loader's batch assembly (shuffle, decode to u32) on the calling thread,
//!   a fresh batch each time; `loader_sync_reuse`: the same into one reused batch;
//! - `loader`: the loader as training uses it, prefetching on its background thread (depth 2),
//!   spent batches recycled.
//!
//! Batches of 2 records, one epoch each, no BPE dropout. `records_per_s` counts records,
//! `gb_per_s` the shard bytes they occupy (record size × records / s, 1 GB = 1e9 bytes);
//! `memcpy_over_this` and `memcpy_permuted_over_this` divide the two memcpy rates by this one.
//!
//! Then image shards (`TESSERA_BENCH_IMAGES` records, default 2,000, of 64×64 RGB in 4 shards,
//! 64 records per chunk, zstd level 3, smooth pictures with noise), batches of 32, one epoch:
//!
//! - `image_memcpy`: the decompressed pixel bytes of every record (held in memory) copied into a
//!   batch-sized buffer (the ceiling);
//! - `image_zstd_decode`: every chunk read, checked and decompressed on one thread
//!   (`ImageShard::decode_chunk`), the work the loader cannot avoid;
//! - `image_convert`: the u8 HWC → f32 CHW conversion alone, from memory;
//! - `image_loader_sync`: the image reader on the calling thread (two-level shuffle, chunk cache,
//!   conversion) into one reused batch; `image_loader`: the prefetching loader, batches recycled.
//!
//! For images `gb_per_s` counts decoded pixel bytes (H·W·3 per record); the f32 batch written is
//! 4× that.
//!
//!   cargo run --release -p trainer --example bench_loader
//!   TESSERA_BENCH_RECORDS=100000 cargo run --release -p trainer --example bench_loader

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use formats::image_shard::{ImageShardWriter, DEFAULT_LEVEL};
use formats::token_shard::{ShardLayout, TokenShardWriter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::data::image_loader::{hwc_to_chw, ImageLoader, ImageReader, ImageShardSet};
use trainer::data::loader::{
    epoch_permutation, BatchReader, Cursor, Loader, LoaderOptions, ShardSet,
};

const LAYOUT: ShardLayout = ShardLayout {
    text_len: 256,
    image_tokens: 32 * 32,
    text_vocab: 16384,
    image_vocab: 8192,
};
const BATCH: usize = 2;
const SHARDS: usize = 4;

/// Prints one measurement; `baselines` are the sequential and the shuffled memcpy's GB/s.
fn report(name: &str, records: u64, secs: f64, baselines: &[f64]) -> f64 {
    let rps = records as f64 / secs;
    let gbs = rps * LAYOUT.record_size() as f64 / 1e9;
    let ratio = baselines
        .iter()
        .zip(["memcpy_over_this", "memcpy_permuted_over_this"])
        .map(|(b, key)| format!(", \"{key}\": {:.3}", b / gbs))
        .collect::<String>();
    println!(
        "{{\"bench\": \"{name}\", \"records\": {records}, \"seconds\": {secs:.4}, \"records_per_s\": {rps:.0}, \"gb_per_s\": {gbs:.3}, \"batch\": {BATCH}, \"record_bytes\": {}{ratio}}}",
        LAYOUT.record_size()
    );
    gbs
}

fn main() -> Result<()> {
    let total: usize = std::env::var("TESSERA_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    let dir = tempfile::tempdir()?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (mut text, mut image) = (vec![0u32; 256], vec![0u32; 1024]);
    let mut paths = Vec::new();
    for k in 0..SHARDS {
        let path = dir.path().join(format!("tokens-{k:05}.tts"));
        let mut w = TokenShardWriter::create(&path, LAYOUT)?;
        for i in 0..total / SHARDS {
            let used = rng.random_range(4..256usize);
            for (p, t) in text.iter_mut().enumerate() {
                *t = if p < used {
                    rng.random_range(0..16384)
                } else {
                    16384 + p as u32
                };
            }
            image
                .iter_mut()
                .for_each(|t| *t = rng.random_range(0..8192));
            w.push(
                &text,
                &image,
                &format!("caption of record {i} in shard {k}"),
            )?;
        }
        paths.push(w.finish()?);
    }
    let set = Arc::new(ShardSet::open(&paths, &LAYOUT)?);
    let n = set.len();
    let rs = LAYOUT.record_size();
    // Warm the page cache (and the maps) with one full pass.
    let mut sink = 0u64;
    for s in set.shards() {
        for i in 0..s.len() {
            sink = sink.wrapping_add(s.record_bytes(i)?[0] as u64);
        }
    }

    let epoch_records = n - n % BATCH as u64;
    let mut buf = vec![0u8; BATCH * rs];
    let t = Instant::now();
    let mut copied = 0u64;
    for s in set.shards() {
        let map_bytes = s.record_bytes(0)?.as_ptr();
        let len = s.len() as usize * rs;
        // SAFETY: records are contiguous in the map, from record 0 for `len` bytes.
        let region = unsafe { std::slice::from_raw_parts(map_bytes, len) };
        for chunk in region.chunks(BATCH * rs) {
            buf[..chunk.len()].copy_from_slice(chunk);
            copied += (chunk.len() / rs) as u64;
            sink = sink.wrapping_add(buf[0] as u64);
        }
    }
    let memcpy = report("memcpy_sequential", copied, t.elapsed().as_secs_f64(), &[]);

    let order = epoch_permutation(7, 0, n as u32);
    let t = Instant::now();
    for pair in order[..epoch_records as usize].chunks(BATCH) {
        for (row, &g) in pair.iter().enumerate() {
            let (k, i) = set.locate(g as u64);
            buf[row * rs..(row + 1) * rs].copy_from_slice(set.shards()[k].record_bytes(i)?);
        }
        sink = sink.wrapping_add(buf[0] as u64);
    }
    let permuted = report(
        "memcpy_permuted",
        epoch_records,
        t.elapsed().as_secs_f64(),
        &[memcpy],
    );
    let baselines = [memcpy, permuted];

    let opts = LoaderOptions {
        seed: 7,
        batch_size: BATCH,
        rank: 0,
        world_size: 1,
        prefetch: 2,
        bpe_dropout: 0.0,
    };
    let batches = epoch_records / BATCH as u64;
    let mut reader = BatchReader::new(set.clone(), opts, None)?;
    reader.indices(Cursor::default()); // the epoch's permutation, outside the timing
    let t = Instant::now();
    let mut cursor = Cursor::default();
    for _ in 0..batches {
        let b = reader.read(cursor)?;
        sink = sink.wrapping_add(b.image[0] as u64);
        cursor = cursor.advance(BATCH as u64, n);
    }
    report(
        "loader_sync",
        epoch_records,
        t.elapsed().as_secs_f64(),
        &baselines,
    );
    let mut batch = reader.read(Cursor::default())?;
    let t = Instant::now();
    let mut cursor = Cursor::default();
    for _ in 0..batches {
        reader.read_into(cursor, &mut batch)?;
        sink = sink.wrapping_add(batch.image[0] as u64);
        cursor = cursor.advance(BATCH as u64, n);
    }
    report(
        "loader_sync_reuse",
        epoch_records,
        t.elapsed().as_secs_f64(),
        &baselines,
    );

    let mut loader = Loader::new(set.clone(), opts, Cursor::default(), None)?;
    let first = loader.next_batch()?; // thread started, permutation computed
    sink = sink.wrapping_add(first.image[0] as u64);
    let t = Instant::now();
    for _ in 1..batches {
        let b = loader.next_batch()?;
        sink = sink.wrapping_add(b.image[0] as u64);
        loader.recycle(b);
    }
    report(
        "loader",
        epoch_records - BATCH as u64,
        t.elapsed().as_secs_f64(),
        &baselines,
    );
    eprintln!("(checksum of touched bytes: {sink}; {n} records in {SHARDS} shards)");
    bench_images(dir.path())
}

const IMAGE_RES: usize = 64;
const IMAGE_BATCH: usize = 32;
const IMAGE_CHUNK: u32 = 64;

fn report_images(name: &str, records: u64, secs: f64, baseline: Option<f64>, extra: &str) -> f64 {
    let rps = records as f64 / secs;
    let bytes = (IMAGE_RES * IMAGE_RES * 3) as f64;
    let gbs = rps * bytes / 1e9;
    let ratio = baseline
        .map(|b| format!(", \"memcpy_over_this\": {:.3}", b / gbs))
        .unwrap_or_default();
    println!(
        "{{\"bench\": \"{name}\", \"records\": {records}, \"seconds\": {secs:.4}, \"records_per_s\": {rps:.0}, \"gb_per_s\": {gbs:.3}, \"batch\": {IMAGE_BATCH}, \"resolution\": {IMAGE_RES}, \"chunk_records\": {IMAGE_CHUNK}{extra}{ratio}}}"
    );
    gbs
}

fn bench_images(dir: &std::path::Path) -> Result<()> {
    let total: usize = std::env::var("TESSERA_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let px = IMAGE_RES * IMAGE_RES * 3;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut pixels = vec![0u8; px];
    let mut paths = Vec::new();
    for k in 0..SHARDS {
        let path = dir.join(format!("images-{k:05}.tis"));
        let mut w = ImageShardWriter::create(&path, IMAGE_RES as u32, IMAGE_CHUNK, DEFAULT_LEVEL)?;
        for i in 0..total / SHARDS {
            // A smooth two-colour gradient with a little noise: compresses like a photo, roughly.
            let (a, b) = (rng.random_range(0..3usize), rng.random_range(0..200u32));
            for (j, p) in pixels.iter_mut().enumerate() {
                let (y, x, c) = (j / (3 * IMAGE_RES), (j / 3) % IMAGE_RES, j % 3);
                let base = if c == a { b + x as u32 } else { (y * 2) as u32 };
                *p = (base + rng.random_range(0..8u32)).min(255) as u8;
            }
            w.push(&pixels, &format!("picture {i} of shard {k}"), None)?;
        }
        w.finish()?;
        paths.push(path);
    }
    let set = Arc::new(ImageShardSet::open(&paths, IMAGE_RES as u32)?);
    let n = set.len();
    let epoch_records = n - n % IMAGE_BATCH as u64;
    let batches = epoch_records / IMAGE_BATCH as u64;
    let (packed, raw): (u64, u64) = set
        .shards()
        .iter()
        .flat_map(|s| s.chunks())
        .fold((0, 0), |(p, r), e| (p + e.compressed_len, r + e.raw_len));
    let chunk_info = format!(
        ", \"chunks\": {}, \"compression_ratio\": {:.2}",
        set.chunk_count(),
        raw as f64 / packed as f64
    );
    let mut sink = 0u64;

    // The ceiling: decompressed pixels in memory, copied batch by batch.
    let mut decoded = Vec::with_capacity(n as usize * px);
    for s in set.shards() {
        for c in 0..s.chunks().len() {
            let chunk = s.decode_chunk(c)?;
            for j in 0..chunk.len() {
                decoded.extend_from_slice(chunk.pixels(j));
            }
        }
    }
    let mut buf = vec![0u8; IMAGE_BATCH * px];
    let t = Instant::now();
    let mut copied = 0u64;
    for piece in decoded.chunks_exact(IMAGE_BATCH * px) {
        buf.copy_from_slice(piece);
        copied += IMAGE_BATCH as u64;
        sink = sink.wrapping_add(buf[px / 2] as u64);
    }
    let memcpy = report_images("image_memcpy", copied, t.elapsed().as_secs_f64(), None, "");

    let t = Instant::now();
    let mut records = 0u64;
    for s in set.shards() {
        for c in 0..s.chunks().len() {
            let chunk = s.decode_chunk(c)?;
            records += chunk.len() as u64;
            sink = sink.wrapping_add(chunk.pixels(0)[0] as u64);
        }
    }
    report_images(
        "image_zstd_decode",
        records,
        t.elapsed().as_secs_f64(),
        Some(memcpy),
        &chunk_info,
    );

    let mut out = vec![0f32; IMAGE_BATCH * px];
    let t = Instant::now();
    for piece in decoded.chunks_exact(IMAGE_BATCH * px) {
        for (src, dst) in piece.chunks_exact(px).zip(out.chunks_exact_mut(px)) {
            hwc_to_chw(src, dst);
        }
        sink = sink.wrapping_add(out[px / 2] as u64);
    }
    report_images(
        "image_convert",
        copied,
        t.elapsed().as_secs_f64(),
        Some(memcpy),
        "",
    );

    let opts = LoaderOptions {
        seed: 7,
        batch_size: IMAGE_BATCH,
        rank: 0,
        world_size: 1,
        prefetch: 2,
        bpe_dropout: 0.0,
    };
    let mut reader = ImageReader::images(set.clone(), opts)?;
    reader.indices(Cursor::default()); // the epoch's order, outside the timing
    let mut batch = reader.read(Cursor::default())?;
    let before = set.chunks_decoded();
    let t = Instant::now();
    let mut cursor = Cursor::default();
    for _ in 0..batches {
        reader.read_into(cursor, &mut batch)?;
        sink = sink.wrapping_add(batch.pixels[0] as u64);
        cursor = cursor.advance(IMAGE_BATCH as u64, n);
    }
    let secs = t.elapsed().as_secs_f64();
    let decodes = format!(", \"chunk_decodes\": {}", set.chunks_decoded() - before);
    report_images(
        "image_loader_sync",
        epoch_records,
        secs,
        Some(memcpy),
        &decodes,
    );

    let mut loader = ImageLoader::images(set.clone(), opts, Cursor::default())?;
    let first = loader.next_batch()?; // thread started, order computed
    sink = sink.wrapping_add(first.pixels[0] as u64);
    let t = Instant::now();
    for _ in 1..batches {
        let b = loader.next_batch()?;
        sink = sink.wrapping_add(b.pixels[0] as u64);
        loader.recycle(b);
    }
    report_images(
        "image_loader",
        epoch_records - IMAGE_BATCH as u64,
        t.elapsed().as_secs_f64(),
        Some(memcpy),
        "",
    );
    eprintln!("(image checksum {sink}; {n} records of {IMAGE_RES}x{IMAGE_RES} in {SHARDS} shards)");
    Ok(())
}
