//! `data-prep ingest`: image-caption pairs in → filtered, resized image shards + `stats.json` out.
//!
//! - [`sources`]: the input formats (img2dataset `files`, folder + `.txt`, webdataset `.tar`,
//!   JSONL, CSV) as one ordered stream of inputs;
//! - [`filters`]: the per-input checks, decode and resize, run in parallel (rayon);
//! - [`resize`]: box-filter resize of the shorter side + centre crop;
//! - [`writer`]: output shards and their done markers (resume);
//! - [`stats`]: counters per rejection reason.
//!
//! Inputs are processed in batches: a batch is decoded in parallel, then its results are
//! checked for duplicates and written in input order, so the output does not depend on thread
//! timing. Input group `g` of `--shard-size` inputs always becomes shard `g`; a rerun skips the
//! groups whose shard is done (rebuilding the duplicate set from their pixels) and produces the
//! same bytes as an uninterrupted run, provided the input and the options are the same (the
//! options are checked; the input is the user's promise).

pub mod filters;
pub mod resize;
pub mod sources;
pub mod stats;
pub mod writer;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use formats::image_shard::{
    ImageShardError, ImageShardWriter, DEFAULT_CHUNK_RECORDS, DEFAULT_LEVEL,
};
use rayon::prelude::*;
use regex::Regex;

use filters::{pixel_hash, Filters, DEFAULT_REJECT_PATTERNS};
use sources::{Format, Source};
use stats::{Counts, Reason};

/// Errors of `data-prep ingest` that stop the run (bad inputs are counted, not raised).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
    #[error(transparent)]
    Shard(#[from] ImageShardError),
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: tar archive unreadable at entry {entry}: {source}")]
    Tar {
        path: PathBuf,
        entry: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    #[error("--reject-pattern {pattern:?} is not a valid regex: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("--{field} {value}: {reason}")]
    BadParam {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("no inputs found in {path} (format {format})")]
    NoInputs { path: PathBuf, format: &'static str },
    #[error(
        "{marker} was written with other options; use a new --out or the same options.\n  \
         before: {before}\n  now:    {now}"
    )]
    ParamsChanged {
        marker: PathBuf,
        before: String,
        now: String,
    },
    #[error(
        "{marker} covers {expected} inputs but the input now ends after {found}: the input \
         changed since that shard was written"
    )]
    InputChanged {
        marker: PathBuf,
        expected: u64,
        found: u64,
    },
}

impl From<crate::markers::MarkerError> for IngestError {
    fn from(e: crate::markers::MarkerError) -> Self {
        match e {
            crate::markers::MarkerError::Fs(e) => IngestError::Io(e),
            crate::markers::MarkerError::Format { path, message } => IngestError::Format {
                path,
                reason: format!("unreadable done marker: {message}"),
            },
        }
    }
}

/// Command-line options of `data-prep ingest`.
#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// A folder (img2dataset `files` layout, or images with same-named .txt captions), a
    /// webdataset .tar or a folder of them, or a .jsonl / .csv listing.
    #[arg(long)]
    pub input: PathBuf,
    /// Output folder for images-NNNNN.tis shards and stats.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Input format; detected from the input when absent.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Side of the square output images.
    #[arg(long, default_value_t = 256)]
    pub resolution: u32,
    /// Inputs per output shard (a shard holds at most this many records).
    #[arg(long, default_value_t = 5000)]
    pub shard_size: u64,
    /// Minimum shorter side of an input image in pixels [default: the resolution].
    #[arg(long)]
    pub min_side: Option<u32>,
    /// Minimum caption length in characters (after whitespace normalisation).
    #[arg(long, default_value_t = 3)]
    pub min_caption_chars: usize,
    /// Maximum caption length in characters.
    #[arg(long, default_value_t = 1000)]
    pub max_caption_chars: usize,
    /// Extra boilerplate-caption regex (repeatable); added to the defaults.
    #[arg(long = "reject-pattern", value_name = "REGEX")]
    pub reject_patterns: Vec<String>,
    /// Do not use the default boilerplate patterns.
    #[arg(long)]
    pub no_default_patterns: bool,
    /// Records per zstd chunk in the output shards.
    #[arg(long, default_value_t = DEFAULT_CHUNK_RECORDS)]
    pub chunk_records: u32,
    /// zstd level of the output shards (1..=22).
    #[arg(long, default_value_t = DEFAULT_LEVEL)]
    pub level: i32,
    /// Inputs decoded in parallel per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The whole run's counters and what was written (`stats.json`).
#[derive(Debug, serde::Serialize)]
pub struct IngestStats {
    pub input: String,
    pub format: &'static str,
    pub resolution: u32,
    pub shard_size: u64,
    pub shards: u64,
    pub shard_files: Vec<String>,
    /// Groups skipped because a previous run finished them.
    pub resumed_shards: u64,
    #[serde(flatten)]
    pub counts: Counts,
}

/// The parameters a done marker must match for its shard to be reused.
fn params_json(
    a: &IngestArgs,
    format: Format,
    patterns: &[Regex],
    min_side: u32,
) -> serde_json::Value {
    serde_json::json!({
        "format": format.as_str(),
        "resolution": a.resolution,
        "shard_size": a.shard_size,
        "min_side": min_side,
        "min_caption_chars": a.min_caption_chars,
        "max_caption_chars": a.max_caption_chars,
        "reject_patterns": patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "chunk_records": a.chunk_records,
        "level": a.level,
    })
}

fn check(
    ok: bool,
    field: &'static str,
    value: impl ToString,
    reason: &'static str,
) -> Result<(), IngestError> {
    if ok {
        Ok(())
    } else {
        Err(IngestError::BadParam {
            field,
            value: value.to_string(),
            reason,
        })
    }
}

/// Runs the ingest; returns what `stats.json` holds.
pub fn run(a: &IngestArgs) -> Result<IngestStats, IngestError> {
    check(
        (8..=8192).contains(&a.resolution),
        "resolution",
        a.resolution,
        "must be in 8..=8192",
    )?;
    check(
        a.shard_size >= 1,
        "shard-size",
        a.shard_size,
        "must be at least 1",
    )?;
    check(a.batch >= 1, "batch", a.batch, "must be at least 1")?;
    check(
        a.chunk_records >= 1,
        "chunk-records",
        a.chunk_records,
        "must be at least 1",
    )?;
    check(
        (1..=22).contains(&a.level),
        "level",
        a.level,
        "must be in 1..=22",
    )?;
    check(
        a.min_caption_chars <= a.max_caption_chars,
        "min-caption-chars",
        a.min_caption_chars,
        "must not exceed --max-caption-chars",
    )?;
    // A character is at most 4 bytes of UTF-8; image shards hold captions of at most
    // MAX_FIELD_LEN (1 MiB) bytes.
    let max_chars = formats::image_shard::MAX_FIELD_LEN as usize / 4;
    debug_assert_eq!(max_chars, 262144);
    check(
        a.max_caption_chars <= max_chars,
        "max-caption-chars",
        a.max_caption_chars,
        "must be at most 262144 (an image shard's caption is at most 1 MiB of UTF-8, up to 4 \
         bytes a character)",
    )?;
    let defaults: &[&str] = if a.no_default_patterns {
        &[]
    } else {
        &DEFAULT_REJECT_PATTERNS
    };
    let patterns = defaults
        .iter()
        .map(|s| s.to_string())
        .chain(a.reject_patterns.iter().cloned())
        .map(|p| Regex::new(&p).map_err(|source| IngestError::Pattern { pattern: p, source }))
        .collect::<Result<Vec<_>, _>>()?;
    let format = match a.format {
        Some(f) => f,
        None => sources::detect(&a.input)?,
    };
    let min_side = a.min_side.unwrap_or(a.resolution);
    let params = params_json(a, format, &patterns, min_side);
    let filters = Filters {
        resolution: a.resolution,
        min_side,
        min_caption_chars: a.min_caption_chars,
        max_caption_chars: a.max_caption_chars,
        patterns,
    };
    let Source {
        total, mut items, ..
    } = sources::open(&a.input, format)?;
    fs::create_dir_all(&a.out).map_err(formats::fsutil::fs_err("create directory", &a.out))?;
    let bar = crate::markers::progress("ingest", total, "inputs", !a.quiet);
    let mut seen_hashes: HashSet<u128> = HashSet::new();
    let mut totals = Counts::new();
    let mut shard_files = Vec::new();
    let mut resumed = 0;
    let mut group = 0u64;
    loop {
        if let Some((marker, shard)) = writer::load_done(&a.out, group, &params)? {
            // Skip the inputs this shard covers; its records seed the duplicate set.
            let mut n = 0;
            while n < marker.counts.inputs_seen {
                match items.next() {
                    Some(item) => {
                        item?;
                        n += 1;
                    }
                    None => break,
                }
            }
            if n < marker.counts.inputs_seen {
                return Err(IngestError::InputChanged {
                    marker: writer::marker_path(&a.out, group),
                    expected: marker.counts.inputs_seen,
                    found: n,
                });
            }
            for i in 0..shard.len() {
                seen_hashes.insert(pixel_hash(&shard.record(i)?.pixels));
            }
            bar.inc(n);
            totals.merge(&marker.counts);
            shard_files.push(marker.shard);
            resumed += 1;
            group += 1;
            if n < a.shard_size {
                break;
            }
            continue;
        }
        // A fresh group: pull its first batch; stop when the input is exhausted.
        let mut counts = Counts::new();
        let mut shard: Option<ImageShardWriter> = None;
        let path = writer::shard_path(&a.out, group);
        let marker = writer::marker_path(&a.out, group);
        while counts.inputs_seen < a.shard_size {
            let want = a.batch.min((a.shard_size - counts.inputs_seen) as usize);
            let batch = items.by_ref().take(want).collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                break;
            }
            if shard.is_none() {
                // A stale marker of an incomplete group goes first, then the shard is rewritten.
                crate::markers::remove(&marker)?;
                shard = Some(ImageShardWriter::create(
                    &path,
                    a.resolution,
                    a.chunk_records,
                    a.level,
                )?);
            }
            let n = batch.len() as u64;
            let results: Vec<_> = batch
                .into_par_iter()
                .map(|it| filters.process(it))
                .collect();
            let w = shard.as_mut().ok_or_else(|| IngestError::Format {
                path: path.clone(),
                reason: "internal: shard writer missing".into(),
            })?;
            for r in results {
                match r {
                    Ok(acc) if !seen_hashes.insert(acc.hash) => counts.reject(
                        Reason::Duplicate,
                        &acc.name,
                        "same pixels as an earlier record",
                    ),
                    Ok(acc) => {
                        w.push(&acc.pixels, &acc.caption, Some(&acc.meta))?;
                        counts.accept();
                    }
                    Err(rej) => counts.reject(rej.reason, &rej.name, &rej.detail),
                }
            }
            bar.inc(n);
        }
        let Some(w) = shard else { break };
        w.finish()?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let m = writer::Marker {
            shard: name.clone(),
            params: params.clone(),
            counts: counts.clone(),
        };
        crate::markers::write(&marker, &m)?;
        totals.merge(&counts);
        shard_files.push(name);
        group += 1;
        if counts.inputs_seen < a.shard_size {
            break;
        }
    }
    bar.finish_and_clear();
    if totals.inputs_seen == 0 {
        return Err(IngestError::NoInputs {
            path: a.input.clone(),
            format: format.as_str(),
        });
    }
    let stats = IngestStats {
        input: a.input.display().to_string(),
        format: format.as_str(),
        resolution: a.resolution,
        shard_size: a.shard_size,
        shards: shard_files.len() as u64,
        shard_files,
        resumed_shards: resumed,
        counts: totals,
    };
    let path = a.out.join("stats.json");
    let json = serde_json::to_vec_pretty(&stats).map_err(|e| IngestError::Format {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    writer::write_atomic(&path, &json)?;
    Ok(stats)
}

/// `data-prep ingest`: runs and prints a one-line summary.
pub fn main(a: IngestArgs) -> anyhow::Result<()> {
    let s = run(&a)?;
    eprintln!(
        "ingest: {} inputs ({}), {} records in {} shards ({} reused), {} rejected; see {}",
        s.counts.inputs_seen,
        s.format,
        s.counts.records_written,
        s.shards,
        s.resumed_shards,
        s.counts.rejected_total(),
        Path::new(&a.out).join("stats.json").display()
    );
    Ok(())
}
