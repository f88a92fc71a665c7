//! Ingest throughput: synthesises ~400 images (512×384, half JPEG and half PNG, shapes drawn by
//! `synth`, plus pixel noise) with captions into a temporary folder, ingests them at resolution 256 and prints one
//! JSON line with images/s overall and per core (cores = rayon threads; set RAYON_NUM_THREADS).
//!
//! `cargo run --release -p data-prep --example bench_ingest [-- COUNT]`

#[allow(dead_code)]
#[path = "../src/ingest/mod.rs"]
mod ingest;
#[allow(dead_code)]
#[path = "../src/markers.rs"]
mod markers;
#[allow(dead_code)]
#[path = "../src/synth.rs"]
mod synth;

use std::io::Cursor;
use std::time::Instant;

use rayon::prelude::*;

fn main() -> anyhow::Result<()> {
    let count: u64 = std::env::args().nth(1).map_or(Ok(400), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let (w, h) = (512u32, 384u32);
    let t = Instant::now();
    let bytes: u64 = (0..count)
        .into_par_iter()
        .map(|i| -> anyhow::Result<u64> {
            let s = synth::sample(42, i, w);
            // Rows 64..448 of the square sample: a 512×384 landscape image.
            let rows = &s.pixels[(64 * w * 3) as usize..((64 + h) * w * 3) as usize];
            // Add pixel noise so that the files have photo-like entropy (flat shapes alone decode
            // unrealistically fast).
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ i;
            let noisy: Vec<u8> = rows
                .iter()
                .map(|&v| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    v.saturating_add((state % 24) as u8).saturating_sub(12)
                })
                .collect();
            let img = image::RgbImage::from_raw(w, h, noisy)
                .ok_or_else(|| anyhow::anyhow!("bad buffer"))?;
            let (ext, fmt) = if i % 2 == 0 {
                ("jpg", image::ImageFormat::Jpeg)
            } else {
                ("png", image::ImageFormat::Png)
            };
            let mut enc = Vec::new();
            img.write_to(&mut Cursor::new(&mut enc), fmt)?;
            std::fs::write(data.join(format!("{i:06}.{ext}")), &enc)?;
            std::fs::write(data.join(format!("{i:06}.txt")), &s.caption)?;
            Ok(enc.len() as u64)
        })
        .sum::<anyhow::Result<u64>>()?;
    eprintln!(
        "synthesised {count} images ({:.1} MB encoded) in {:.2} s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let args = ingest::IngestArgs {
        input: data.clone(),
        out: dir.path().join("out"),
        format: None,
        resolution: 256,
        shard_size: 5000,
        min_side: None,
        min_caption_chars: 3,
        max_caption_chars: 1000,
        reject_patterns: vec![],
        no_default_patterns: false,
        chunk_records: 64,
        level: 3,
        batch: 256,
        quiet: true,
    };
    let t = Instant::now();
    let stats = ingest::run(&args)?;
    let secs = t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    let shard_bytes: u64 = std::fs::metadata(dir.path().join("out/images-00000.tis"))?.len();
    let rate = stats.counts.inputs_seen as f64 / secs;
    println!(
        "{}",
        serde_json::json!({
            "bench": "ingest",
            "images": stats.counts.inputs_seen,
            "written": stats.counts.records_written,
            "input": "512x384 shapes + noise, half JPEG half PNG",
            "resolution": 256,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "threads": threads,
            "images_per_s": (rate * 10.0).round() / 10.0,
            "images_per_s_per_core": (rate / threads as f64 * 10.0).round() / 10.0,
            "shard_mb": shard_bytes as f64 / 1e6,
        })
    );
    Ok(())
}
