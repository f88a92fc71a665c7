//! Crash-safe file writing shared by every writer in Tessera: a file is written under
//! `<name>.tmp`, fsynced, renamed to its name, and the directory fsynced, so a reader never sees
//! a partial file under the final name, and a finished one survives a crash.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An I/O failure, with what was being done and to which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct FsError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Attaches `action` and `path` to an `io::Error`.
pub fn fs_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FsError {
    let path = path.to_path_buf();
    move |source| FsError {
        action,
        path,
        source,
    }
}

/// `<path>.tmp`: where a file is written before it is renamed to `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `bytes` to `path` through [`tmp_path`] and a rename. With `durable`, the file and its
/// directory are fsynced too (markers, shards, tokenizers); without, only the rename protects
/// readers (bulk outputs that a rerun regenerates anyway).
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), FsError> {
    let tmp = tmp_path(path);
    let mut f = File::create(&tmp).map_err(fs_err("create", &tmp))?;
    f.write_all(bytes).map_err(fs_err("write", &tmp))?;
    if durable {
        f.sync_all().map_err(fs_err("fsync", &tmp))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(fs_err("rename", &tmp))?;
    if durable {
        sync_parent(path)?;
    }
    Ok(())
}

/// Fsyncs the directory holding `path`, so that a rename into it is durable.
pub fn sync_parent(path: &Path) -> Result<(), FsError> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => sync_dir(d),
        _ => sync_dir(Path::new(".")),
    }
}

/// Fsyncs a directory, so that the entries created or renamed in it are durable (a no-op where
/// directories cannot be opened as files).
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(fs_err("fsync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_only_and_names_failures() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        write_atomic(&p, b"{}", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}");
        assert!(!tmp_path(&p).exists());
        write_atomic(&p, b"[1]", false).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"[1]");
        let bad = d.path().join("missing/dir/b.json");
        let e = write_atomic(&bad, b"x", true).unwrap_err().to_string();
        assert!(e.contains("create") && e.contains("b.json.tmp"), "{e}");
    }
}
