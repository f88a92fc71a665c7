//! Output shards of `data-prep ingest` and their done markers.
//!
//! Input group `g` (inputs `g·S … g·S+S−1` of the stream, `S = --shard-size`) becomes
//! `images-<g:05>.tis`, whatever the filters drop, and then `images-<g:05>.tis.done`: a JSON file
//! with the group's counters and the run's parameters, written (tmp, fsync, rename) only after
//! the shard itself is durable. A group is done only if its marker exists, its parameters equal
//! this run's and its shard opens with the marker's record count; a rerun skips done groups and
//! rewrites the others, so it produces the same bytes as an uninterrupted run.

use std::path::{Path, PathBuf};

use formats::image_shard::ImageShard;
use serde::{Deserialize, Serialize};

use super::stats::Counts;
use super::IngestError;

/// `DIR/images-<g:05>.tis`.
pub fn shard_path(out: &Path, group: u64) -> PathBuf {
    out.join(format!("images-{group:05}.tis"))
}

/// `DIR/images-<g:05>.tis.done`.
pub fn marker_path(out: &Path, group: u64) -> PathBuf {
    crate::markers::marker_path(&shard_path(out, group))
}

/// What a done marker holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Marker {
    pub shard: String,
    pub params: serde_json::Value,
    pub counts: Counts,
}

/// Writes `bytes` to `path` via `<path>.tmp`, fsync and rename, then fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IngestError> {
    formats::fsutil::write_atomic(path, bytes, true).map_err(IngestError::Io)
}

/// The finished shard of `group`, if its marker and shard are complete and were written with
/// `params`. A marker written with other parameters is an error (mixing runs would corrupt the
/// dataset); a marker without a valid shard is not done (the group is rewritten).
pub fn load_done(
    out: &Path,
    group: u64,
    params: &serde_json::Value,
) -> Result<Option<(Marker, ImageShard)>, IngestError> {
    let path = marker_path(out, group);
    let Some(marker) = crate::markers::read::<Marker>(&path)? else {
        return Ok(None);
    };
    if &marker.params != params {
        return Err(IngestError::ParamsChanged {
            marker: path,
            before: marker.params.to_string(),
            now: params.to_string(),
        });
    }
    match ImageShard::open(shard_path(out, group)) {
        Ok(s) if s.len() == marker.counts.records_written => Ok(Some((marker, s))),
        _ => Ok(None),
    }
}
