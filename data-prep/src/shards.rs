//! `data-prep inspect` and `data-prep verify` over shard files, dispatched on the file's magic
//! (`.tts` token shards and `.tis` image shards).

use anyhow::{bail, Context, Result};
use formats::image_shard::{self, ImageShard};
use formats::token_shard::{self, TokenShard};
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The kinds of shard file `inspect` and `verify` know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardKind {
    /// `.tts`, [`token_shard::MAGIC`].
    Token,
    /// `.tis`, [`image_shard::MAGIC`].
    Image,
}

/// The kind of `path`, from its first 8 bytes.
pub fn kind_of(path: &Path) -> Result<ShardKind> {
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    if n == 8 && magic == token_shard::MAGIC {
        return Ok(ShardKind::Token);
    }
    if n == 8 && magic == image_shard::MAGIC {
        return Ok(ShardKind::Image);
    }
    bail!(
        "{} is not a shard this build knows: magic {:?} (a token shard starts with {:?}, an \
         image shard with {:?})",
        path.display(),
        &magic[..n],
        token_shard::MAGIC,
        image_shard::MAGIC
    )
}

/// A readable description of a shard: header, counts, and its first `records` records decoded.
pub fn inspect(path: &Path, records: u64) -> Result<String> {
    match kind_of(path)? {
        ShardKind::Token => inspect_tokens(path, records),
        ShardKind::Image => inspect_images(path, records),
    }
}

fn inspect_images(path: &Path, records: u64) -> Result<String> {
    let s = ImageShard::open(path)?;
    let mut out = s.summary();
    out.push('\n');
    for i in 0..records.min(s.len()) {
        let r = s.record(i)?;
        let mean = r.pixels.iter().map(|&p| p as f64).sum::<f64>() / r.pixels.len().max(1) as f64;
        writeln!(
            out,
            "record {i}: caption {}  mean pixel {mean:.1}  meta {}",
            json_string(&r.caption),
            r.meta.as_deref().unwrap_or("-")
        )?;
    }
    Ok(out)
}

fn inspect_tokens(path: &Path, records: u64) -> Result<String> {
    let s = TokenShard::open(path)?;
    let h = s.header();
    let l = h.layout;
    let mut out = String::new();
    writeln!(
        out,
        "{}: token shard, format version {}",
        path.display(),
        h.version
    )?;
    writeln!(
        out,
        "layout: text_len {} image_tokens {} text_vocab {} image_vocab {} token_width {} record_size {}",
        l.text_len, l.image_tokens, l.text_vocab, l.image_vocab, h.token_width, h.record_size
    )?;
    writeln!(
        out,
        "records: {}  captions: {} bytes at offset {}  file: {} bytes",
        h.record_count,
        h.captions_len,
        h.captions_offset,
        s.file_len()
    )?;
    writeln!(
        out,
        "crc32: header {:#010x} records {:#010x} captions {:#010x} (run `data-prep verify` to check)",
        h.header_crc, h.records_crc, h.captions_crc
    )?;
    for i in 0..records.min(s.len()) {
        let r = s.record(i)?;
        let text = r.text.to_vec();
        let used = text.iter().take_while(|&&t| t < l.text_vocab).count();
        let image = r.image.to_vec();
        let shown: Vec<String> = image.iter().take(16).map(u32::to_string).collect();
        writeln!(
            out,
            "record {i}: caption {}\n  text ({used} tokens + {} padding): {:?}\n  image: [{}{}]",
            json_string(r.caption),
            text.len() - used,
            &text[..used],
            shown.join(", "),
            if image.len() > 16 { ", …" } else { "" }
        )?;
    }
    Ok(out)
}

/// `text` as a JSON string literal: quotes, backslashes and control characters escaped as JSON
/// (not Rust's `{:?}`), so a caption can be copied into any JSON tool.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// Verifies every file fully (checksums, every record); returns the failures as (path, error).
pub fn verify(paths: &[PathBuf]) -> Vec<(PathBuf, anyhow::Error)> {
    let mut failures = Vec::new();
    for path in paths {
        let result = kind_of(path).and_then(|kind| match kind {
            ShardKind::Token => {
                let s = TokenShard::open(path)?;
                s.verify()?;
                println!("ok {} ({} records)", path.display(), s.len());
                Ok(())
            }
            ShardKind::Image => {
                let s = ImageShard::open(path)?;
                s.verify()?;
                println!("ok {} ({} records)", path.display(), s.len());
                Ok(())
            }
        });
        if let Err(e) = result {
            println!("FAILED {}: {e:#}", path.display());
            failures.push((path.clone(), e));
        }
    }
    failures
}
