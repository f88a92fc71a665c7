//! Done markers and progress bars, shared by the commands that write one output shard per unit
//! of work (`ingest`, `synth-tokens`, `encode`) so that an interrupted run resumes.
//!
//! A done marker is `<shard>.done`: a small JSON file written through a temporary name, fsynced
//! and renamed ([`formats::fsutil::write_atomic`]) only after its shard is itself durable. A shard
//! without its marker is not done, whatever is on disk: a rerun rewrites it (shard writers also
//! write `<shard>.tmp` and rename, so a shard under its final name is never partial).

use std::fs;
use std::path::{Path, PathBuf};

use formats::fsutil::FsError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Reading or writing a done marker failed.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("{path}: unreadable done marker: {message}")]
    Format { path: PathBuf, message: String },
}

/// `<shard>.done`.
pub fn marker_path(shard: &Path) -> PathBuf {
    let mut s = shard.as_os_str().to_owned();
    s.push(".done");
    PathBuf::from(s)
}

/// The marker at `path`, or `None` when there is none.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, MarkerError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(formats::fsutil::fs_err("read", path)(e).into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| MarkerError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Writes `value` as the marker at `path` (pretty JSON; tmp, fsync, rename, fsync the folder).
pub fn write<T: Serialize>(path: &Path, value: &T) -> Result<(), MarkerError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| MarkerError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    formats::fsutil::write_atomic(path, &json, true)?;
    Ok(())
}

/// Removes the marker at `path` if there is one (before its shard is rewritten).
pub fn remove(path: &Path) -> Result<(), MarkerError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(formats::fsutil::fs_err("remove stale marker", path)(e).into()),
    }
}

/// A progress bar labelled `label` over `total` `unit` (a spinner when the total is unknown), or
/// a hidden one when `show` is false.
pub fn progress(label: &str, total: Option<u64>, unit: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        format!("{label} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})")
    } else {
        format!("{label} [{{elapsed_precise}}] {{spinner}} {{pos}} {unit} ({{per_sec}})")
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct M {
        records: u64,
    }

    #[test]
    fn markers_round_trip_and_absent_or_broken_ones_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let m = marker_path(&d.path().join("tokens-00001.tts"));
        assert!(m.ends_with("tokens-00001.tts.done"));
        assert_eq!(read::<M>(&m).unwrap(), None);
        write(&m, &M { records: 7 }).unwrap();
        assert_eq!(read::<M>(&m).unwrap(), Some(M { records: 7 }));
        fs::write(&m, b"{").unwrap();
        let e = read::<M>(&m).unwrap_err().to_string();
        assert!(
            e.contains("tokens-00001.tts.done") && e.contains("unreadable"),
            "{e}"
        );
        remove(&m).unwrap();
        remove(&m).unwrap();
        assert!(!m.exists());
    }
}
