//! One run per run directory: an exclusive advisory lock (flock(2), through std's
//! [`File::try_lock`]) on `<run.out_dir>/run.lock`, held by rank 0 of a run for as long as its
//! process lives.
//!
//! The kernel drops the lock when the holder's last descriptor of the file closes: on a normal
//! exit, on an error, and after SIGKILL alike, so a stale lock never needs a person. The file
//! itself is never deleted (deleting a lock file races with a process that has just opened it);
//! the holder rewrites it with its pid and host, which a refused run names in its error.
//!
//! Why rank 0 and not the launcher: the trainer also runs under srun or any launcher that sets
//! torchrun's variables, and only rank 0 writes the run directory. A gang restart stops every
//! worker (and reaps it) before it starts the next generation, so the new rank 0 finds the lock
//! free. On several nodes the lock is only as good as the shared filesystem's flock: NFSv4 and
//! most cluster filesystems honour it across nodes (Lustre needs the `flock` mount option).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Name of the lock file inside `run.out_dir`.
pub const LOCK_FILE: &str = "run.lock";

/// Set to `1` by the launcher in its workers' environment when the launcher itself holds the
/// lock (node 0's launcher does, for the whole run): rank 0 then does not take it.
pub const HELD_ENV: &str = "TESSERA_RUN_LOCK_HELD";

/// Whether this process must take the lock: rank 0 (or a process outside a multi-process run),
/// unless its launcher holds it.
pub fn this_process_locks(rank: Option<usize>) -> bool {
    rank.is_none_or(|r| r == 0) && std::env::var(HELD_ENV).as_deref() != Ok("1")
}

/// Errors of taking the run directory's lock.
#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    /// Another process holds the lock.
    #[error(
        "run.out_dir {dir} is in use by another run ({holder} holds {lock}); wait for it to end, \
         stop it, or choose another run.out_dir"
    )]
    Held {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    /// The lock file could not be created, locked or written.
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
}

/// The lock on a run directory; dropping it (or the process ending, however it ends) releases
/// it.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock of `out_dir` (creating the directory and the lock file as needed) without
    /// waiting, and records this process's pid and host in it. Fails at once, naming the
    /// holder's pid and host, when another process holds it.
    pub fn acquire(out_dir: &Path) -> Result<RunLock, RunLockError> {
        let fs_err = formats::fsutil::fs_err;
        std::fs::create_dir_all(out_dir).map_err(fs_err("create directory", out_dir))?;
        let path = out_dir.join(LOCK_FILE);
        // Not truncated on open: the holder's record must survive a refused attempt.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(fs_err("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(RunLockError::Held {
                    dir: out_dir.to_path_buf(),
                    lock: path,
                    holder: describe_holder(&text),
                });
            }
            Err(TryLockError::Error(e)) => return Err(fs_err("lock", &path)(e).into()),
        }
        let record = format!("pid: {}\nhost: {}\n", std::process::id(), hostname());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(record.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(fs_err("write", &path))?;
        Ok(RunLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// "pid P on host H" from a lock file's text, as far as it tells.
fn describe_holder(text: &str) -> String {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    match (field("pid:"), field("host:")) {
        (Some(pid), Some(host)) => format!("pid {pid} on host {host}"),
        (Some(pid), None) => format!("pid {pid}"),
        _ => "a process that has not recorded its pid yet".to_string(),
    }
}

/// This machine's host name (`unknown-host` when it cannot be told).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`, which we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
        _ => "unknown-host".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_a_released_one_is_free_again() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let first = RunLock::acquire(&out).unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(
            text,
            format!("pid: {}\nhost: {}\n", std::process::id(), hostname())
        );
        // flock locks belong to the open file, so a second open in this same process conflicts
        // just as another process would.
        let e = RunLock::acquire(&out).unwrap_err();
        assert!(matches!(e, RunLockError::Held { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "pid {} on host {}",
                std::process::id(),
                hostname()
            )) && msg.contains("run.lock")
                && msg.contains(&out.display().to_string()),
            "{msg}"
        );
        // The refused attempt left the holder's record alone.
        assert_eq!(std::fs::read_to_string(first.path()).unwrap(), text);
        drop(first);
        let again = RunLock::acquire(&out).unwrap();
        assert!(again.path().is_file());
    }

    #[test]
    fn holder_descriptions() {
        assert_eq!(describe_holder("pid: 12\nhost: n1\n"), "pid 12 on host n1");
        assert_eq!(describe_holder("pid: 12\n"), "pid 12");
        assert!(describe_holder("").contains("not recorded"));
    }
}
