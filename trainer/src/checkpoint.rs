//! Atomic, resumable checkpoints.
//!
//! A checkpoint is a directory `<out_dir>/checkpoints/step_<8-digit step>/` holding
//!
//! - one or more safetensors files (`model.safetensors`: fp32 master weights named per
//!   docs/model.md; `optimizer.safetensors`: AdamW moments under the prefixes `m.` and `v.`;
//!   `ema.safetensors`: the weight EMA under the model's names),
//! - `state.json` (step, data cursor, RNG, gradient scales, …: whatever the caller passes),
//! - `config.yaml` (the resolved run config),
//! - `manifest.json`: every file above with its length and xxh3-128 checksum ([`Manifest`]),
//! - `DONE`, written last.
//!
//! Invariants:
//!
//! - **Only directories with `DONE` are ever loaded** ([`latest_complete`], [`load_checked`],
//!   [`read_state`]). A save is written to `checkpoints/.tmp-step_<step>-<pid>/`, every file is
//!   fsynced, `DONE` is written and fsynced, the directory is renamed to its final name and the
//!   parent directory is fsynced; a crash at any point leaves either no `step_…` directory or a
//!   complete one.
//! - **What is read is what was written**: every read through a [`CheckpointDir`] checks the
//!   file's length and checksum against `manifest.json` before using a byte of it. A checkpoint
//!   written before manifests existed (no `manifest.json`) still loads, unverified
//!   ([`CheckpointDir::has_manifest`] says which). xxh3-128, not SHA-256: the checksum guards
//!   against accidental damage (bit rot, torn copies, a stray edit), not against someone who can
//!   rewrite the manifest too, and at ~20 GB/s against SHA-256's ~1.8 GB/s (with SHA-NI; ~0.4
//!   without) it costs seconds instead of minutes on a 12B-parameter run's ~190 GB of weights,
//!   moments and EMA.
//! - **A damaged checkpoint is set aside, never deleted**: [`set_aside`] renames it to
//!   `step_<step>.<label>-<unix seconds>`, a name no listing here matches again.
//! - **Nothing on disk is overwritten**: saving a step that already exists is an error.
//! - **Pruning keeps the newest `keep_last` complete checkpoints** and never deletes the one just
//!   written, nor any `step_…` directory without `DONE`. Stale `.tmp-*` directories (of this
//!   process, or of processes that no longer exist) are removed.
//! - **Files are byte-deterministic**: the same tensors give byte-identical safetensors files
//!   (tensors sorted by name, f32 little-endian, a one-entry `__metadata__`), and `state.json` has
//!   sorted keys.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::params::ParamTable;

/// Name of the marker file written last; a checkpoint directory without it is incomplete.
pub const DONE_FILE: &str = "DONE";
/// Name of the JSON training-state file inside a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// Name of the resolved config inside a checkpoint.
pub const CONFIG_FILE: &str = "config.yaml";
/// Conventional name of the weights file.
pub const MODEL_FILE: &str = "model.safetensors";
/// Conventional name of the optimizer-state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Conventional name of the weight-EMA file (the model's names).
pub const EMA_FILE: &str = "ema.safetensors";
/// Name of the file listing every other file of a checkpoint with its checksum.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the directory under `out_dir` that holds the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The checksum a [`Manifest`] records.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-128";
/// The layout version of `manifest.json`.
pub const MANIFEST_FORMAT: u32 = 1;

const STEP_PREFIX: &str = "step_";
const TMP_PREFIX: &str = ".tmp-";

/// Everything that can go wrong while saving or loading a checkpoint. Every variant names the
/// file or directory, and the tensor where there is one.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
    /// The checkpoint directory for this step exists already; nothing was written.
    #[error("checkpoint {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    /// The directory has no `DONE` marker: an interrupted save, or not a checkpoint.
    #[error("{path} is not a complete checkpoint (no {DONE_FILE} marker); refusing to load it")]
    Incomplete { path: PathBuf },
    /// The file is not a readable safetensors file (truncated, corrupt, not safetensors).
    #[error("{path}: not a valid safetensors file: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// A tensor the parameter table expects is not in the file.
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has a different shape from the one the parameter table expects.
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor is not f32.
    #[error("{path}: tensor '{name}' has dtype {found}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        found: String,
    },
    /// The file holds a tensor under the prefix that the parameter table does not know.
    #[error("{path}: unexpected tensor '{name}' (not a parameter of the model)")]
    UnexpectedTensor { path: PathBuf, name: String },
    /// A tensor entry to save has a data length that does not match its shape.
    #[error("{file}: tensor '{name}' of shape {shape:?} needs {expected} values, got {found}")]
    EntryLength {
        file: String,
        name: String,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    /// Two tensors to save in one file have the same name.
    #[error("{file}: tensor name '{name}' appears twice")]
    DuplicateTensor { file: String, name: String },
    /// A tensor file name is not a plain, unused file name.
    #[error("bad tensor file name '{file}': {reason}")]
    BadFileName { file: String, reason: &'static str },
    /// The flat buffer to load into does not match the parameter table.
    #[error("{path}: flat buffer has {found} values but the parameter table needs {expected}")]
    BufferLength {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    /// `keep_last` must be at least 1.
    #[error("checkpoint.keep_last must be ≥ 1, got {0}")]
    KeepLast(usize),
    /// Serializing or parsing JSON / safetensors failed.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// `manifest.json` is not a manifest this version reads.
    #[error("{path}: invalid checkpoint manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    /// A file's checksum differs from the one its manifest records: it changed after the save.
    #[error(
        "{path}: checksum mismatch ({CHECKSUM_ALGORITHM} {found}, the manifest records \
         {expected}): the file changed after it was written"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    /// A file's length differs from the one its manifest records.
    #[error("{path}: {found} bytes, but the manifest records {expected}: the file changed after it was written")]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// A file the manifest lists is not there.
    #[error("{path}: listed in the checkpoint's {MANIFEST_FILE} but missing")]
    ListedFileMissing { path: PathBuf },
    /// A file was asked for that the checkpoint was not written with.
    #[error("{path}: not part of this checkpoint (its {MANIFEST_FILE} does not list it)")]
    NotInManifest { path: PathBuf },
}

impl CheckpointError {
    /// When the error says that the checkpoint's own bytes are damaged or were never complete (as
    /// opposed to a config that does not fit it, or an I/O failure that a retry may not see), a
    /// short label for it: `checksum`, `unreadable`, `manifest`, `incomplete` or `format`.
    pub fn damage(&self) -> Option<&'static str> {
        match self {
            CheckpointError::Checksum { .. }
            | CheckpointError::Length { .. }
            | CheckpointError::ListedFileMissing { .. } => Some("checksum"),
            CheckpointError::Corrupt { .. } => Some("unreadable"),
            CheckpointError::Manifest { .. } => Some("manifest"),
            CheckpointError::Incomplete { .. } => Some("incomplete"),
            CheckpointError::Format { .. } => Some("format"),
            _ => None,
        }
    }
}

/// `manifest.json`: every file of a checkpoint but itself and `DONE`, with its length and
/// checksum. Keys are sorted, so the same checkpoint gives the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// [`CHECKSUM_ALGORITHM`].
    pub algorithm: String,
    /// File name → length and checksum.
    pub files: BTreeMap<String, FileDigest>,
}

/// One file's length in bytes and checksum (32 lowercase hex digits of xxh3-128).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub bytes: u64,
    pub xxh3_128: String,
}

impl FileDigest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> FileDigest {
        FileDigest {
            bytes: bytes.len() as u64,
            xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(bytes)),
        }
    }

    /// The digest of the file at `path`, read in pieces (no copy of the whole file in memory).
    pub fn of_file(path: &Path) -> Result<FileDigest, CheckpointError> {
        let mut f = File::open(path).map_err(io("read", path))?;
        let mut hasher = Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(io("read", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        Ok(FileDigest {
            bytes,
            xxh3_128: hex128(hasher.digest128()),
        })
    }

    /// Errors (naming `path`) unless `found` is this digest.
    fn check(&self, path: &Path, found: &FileDigest) -> Result<(), CheckpointError> {
        if found.bytes != self.bytes {
            return Err(CheckpointError::Length {
                path: path.to_path_buf(),
                expected: self.bytes,
                found: found.bytes,
            });
        }
        if found.xxh3_128 != self.xxh3_128 {
            return Err(CheckpointError::Checksum {
                path: path.to_path_buf(),
                expected: self.xxh3_128.clone(),
                found: found.xxh3_128.clone(),
            });
        }
        Ok(())
    }
}

fn hex128(h: u128) -> String {
    format!("{h:032x}")
}

impl Manifest {
    /// Reads `<dir>/manifest.json`: `None` when there is none (a checkpoint written before
    /// manifests), an error when it is unreadable or not a manifest of this version.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, CheckpointError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let bad = |message: String| CheckpointError::Manifest {
            path: path.clone(),
            message,
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != MANIFEST_FORMAT || m.algorithm != CHECKSUM_ALGORITHM {
            return Err(bad(format!(
                "format {} with {}; this version reads format {MANIFEST_FORMAT} with \
                 {CHECKSUM_ALGORITHM}",
                m.format, m.algorithm
            )));
        }
        if let Some(name) = m.files.keys().find(|n| !is_plain_file_name(n)) {
            return Err(bad(format!("'{name}' is not a plain file name")));
        }
        Ok(Some(m))
    }

    /// The manifest's bytes as [`save`] writes them (pretty JSON, sorted keys, a final newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.')
}

/// One tensor to save: a name, a shape, and a view of its f32 values (row-major).
#[derive(Clone, Debug)]
pub struct TensorEntry<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

/// One safetensors file of a checkpoint: its file name (e.g. [`MODEL_FILE`]) and its tensors.
#[derive(Clone, Debug)]
pub struct TensorFile<'a> {
    pub file_name: &'static str,
    pub tensors: Vec<TensorEntry<'a>>,
}

/// One entry per parameter of `table`, named `<prefix><param name>`, viewing `buf` (laid out by
/// `table`). A `buf` shorter than the table gives empty views, which [`save`] then refuses with
/// an error naming the tensor.
pub fn entries<'a>(table: &ParamTable, prefix: &str, buf: &'a [f32]) -> Vec<TensorEntry<'a>> {
    table
        .specs()
        .iter()
        .map(|s| TensorEntry {
            name: format!("{prefix}{}", s.name),
            shape: s.shape.clone(),
            data: buf.get(s.range()).unwrap_or(&[]),
        })
        .collect()
}

/// The directory that holds the checkpoints of a run.
pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join(CHECKPOINTS_DIR)
}

/// The final directory of the checkpoint of `step`.
pub fn step_dir(out_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(out_dir).join(step_dir_name(step))
}

fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

/// The step of a directory named `step_<digits>`, else `None`.
pub fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Saves a checkpoint of `step` atomically (see the module doc), then prunes to the newest
/// `keep_last` complete checkpoints. Returns the final directory.
pub fn save(
    out_dir: &Path,
    step: u64,
    files: &[TensorFile],
    state: &serde_json::Value,
    config_yaml: &str,
    keep_last: usize,
) -> Result<PathBuf, CheckpointError> {
    if keep_last < 1 {
        return Err(CheckpointError::KeepLast(keep_last));
    }
    check_files(files)?;
    let root = checkpoints_dir(out_dir);
    fs::create_dir_all(&root).map_err(io("create directory", &root))?;
    let final_dir = root.join(step_dir_name(step));
    if final_dir.exists() {
        return Err(CheckpointError::Exists { path: final_dir });
    }
    let tmp = root.join(format!(
        "{TMP_PREFIX}{}-{}",
        step_dir_name(step),
        std::process::id()
    ));
    if tmp.exists() {
        // Left by an earlier, interrupted save of this process (or of a dead one with our pid).
        fs::remove_dir_all(&tmp).map_err(io("remove stale directory", &tmp))?;
    }
    fs::create_dir(&tmp).map_err(io("create directory", &tmp))?;

    let written = write_contents(&tmp, step, files, state, config_yaml);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Re-check just before the rename: rename(2) would silently replace an empty directory.
    if final_dir.exists() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(CheckpointError::Exists { path: final_dir });
    }
    if let Err(e) = fs::rename(&tmp, &final_dir) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(CheckpointError::Io(formats::fsutil::FsError {
            action: "rename checkpoint into place at",
            path: final_dir,
            source: e,
        }));
    }
    sync_dir(&root)?;
    prune(out_dir, keep_last, step)?;
    Ok(final_dir)
}

fn check_files(files: &[TensorFile]) -> Result<(), CheckpointError> {
    let mut names = BTreeSet::new();
    for f in files {
        let bad = |reason| CheckpointError::BadFileName {
            file: f.file_name.to_string(),
            reason,
        };
        if !is_plain_file_name(f.file_name) {
            return Err(bad("must be a plain file name"));
        }
        if [DONE_FILE, STATE_FILE, CONFIG_FILE, MANIFEST_FILE].contains(&f.file_name) {
            return Err(bad("reserved for the checkpoint's own files"));
        }
        if !names.insert(f.file_name) {
            return Err(bad("appears twice"));
        }
        let mut tensor_names = BTreeSet::new();
        for t in &f.tensors {
            let expected: usize = t.shape.iter().product();
            if expected != t.data.len() {
                return Err(CheckpointError::EntryLength {
                    file: f.file_name.to_string(),
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    expected,
                    found: t.data.len(),
                });
            }
            if !tensor_names.insert(t.name.as_str()) {
                return Err(CheckpointError::DuplicateTensor {
                    file: f.file_name.to_string(),
                    name: t.name.clone(),
                });
            }
        }
    }
    Ok(())
}

fn write_contents(
    dir: &Path,
    step: u64,
    files: &[TensorFile],
    state: &serde_json::Value,
    config_yaml: &str,
) -> Result<(), CheckpointError> {
    let mut digests = BTreeMap::new();
    for f in files {
        let path = dir.join(f.file_name);
        write_tensors(&path, &f.tensors)?;
        // Read back: the checksum is of the bytes the file holds, not of what we meant to write.
        digests.insert(f.file_name.to_string(), FileDigest::of_file(&path)?);
    }
    let state_path = dir.join(STATE_FILE);
    let mut state_bytes =
        serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::Format {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
    state_bytes.push(b'\n');
    write_synced(&state_path, &state_bytes)?;
    digests.insert(STATE_FILE.to_string(), FileDigest::of(&state_bytes));
    write_synced(&dir.join(CONFIG_FILE), config_yaml.as_bytes())?;
    digests.insert(
        CONFIG_FILE.to_string(),
        FileDigest::of(config_yaml.as_bytes()),
    );
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        algorithm: CHECKSUM_ALGORITHM.to_string(),
        files: digests,
    };
    write_synced(&dir.join(MANIFEST_FILE), &manifest.to_bytes())?;
    // Every other file is on disk before DONE is; DONE is on disk before the rename.
    sync_dir(dir)?;
    write_synced(&dir.join(DONE_FILE), format!("step {step}\n").as_bytes())?;
    sync_dir(dir)
}

/// A view of f32 values as a safetensors tensor (little-endian bytes made one tensor at a time).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes `tensors` as one f32 safetensors file at `path` and fsyncs it (a standalone weights
/// file, e.g. for `init-weights`; checkpoints use [`save`]). Byte-deterministic: tensors are
/// stored sorted by name, with `__metadata__ = {"format": "pt"}`.
pub fn write_tensors(path: &Path, tensors: &[TensorEntry]) -> Result<(), CheckpointError> {
    for t in tensors {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(CheckpointError::EntryLength {
                file: path.display().to_string(),
                name: t.name.clone(),
                shape: t.shape.clone(),
                expected,
                found: t.data.len(),
            });
        }
    }
    let views = tensors.iter().map(|t| {
        (
            t.name.as_str(),
            F32View {
                shape: &t.shape,
                data: t.data,
            },
        )
    });
    // One entry only: a HashMap with a single key serializes deterministically.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(metadata), path).map_err(|e| {
        CheckpointError::Format {
            path: path.to_path_buf(),
            message: format!("cannot write safetensors: {e}"),
        }
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", path))
}

/// Every complete checkpoint (a `step_<digits>` directory with `DONE`) under
/// `<out_dir>/checkpoints`, sorted by step, oldest first. An absent directory gives an empty list.
pub fn list_complete(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found: Vec<(u64, PathBuf)> = step_dirs(out_dir)?
        .into_iter()
        .filter(|(_, p)| p.join(DONE_FILE).is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint directory under `<out_dir>/checkpoints` (by step number), or
/// `None`. Directories without `DONE` and `.tmp-*` directories are never returned.
pub fn latest_complete(out_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Ok(list_complete(out_dir)?.pop().map(|(_, path)| path))
}

/// Every `step_<digits>` directory under `<out_dir>/checkpoints` without `DONE` (never loaded:
/// an interrupted copy, a lost marker), sorted by step.
pub fn list_incomplete(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found: Vec<(u64, PathBuf)> = step_dirs(out_dir)?
        .into_iter()
        .filter(|(_, p)| !p.join(DONE_FILE).is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// Every directory under `<out_dir>/checkpoints` that [`set_aside`] renamed with a label
/// starting `corrupt` (a checkpoint that was complete but failed verification), sorted by name.
pub fn list_set_aside_corrupt(out_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut found: Vec<PathBuf> = read_checkpoints_dir(out_dir)?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(STEP_PREFIX))
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(digits, label)| {
                    digits.bytes().all(|b| b.is_ascii_digit()) && label.starts_with("corrupt")
                })
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Renames the checkpoint directory `dir` to `<dir>.<label>-<unix seconds>` (plus `-<n>` if
/// that exists), which no listing of checkpoints matches, and fsyncs `checkpoints/`. Nothing is
/// deleted. `label` is a short word or two such as `corrupt-checksum` or `incomplete`. Returns
/// the new path.
pub fn set_aside(dir: &Path, label: &str) -> Result<PathBuf, CheckpointError> {
    let name =
        dir.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CheckpointError::BadFileName {
                file: dir.display().to_string(),
                reason: "not a checkpoint directory name",
            })?;
    if label.is_empty()
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(CheckpointError::BadFileName {
            file: label.to_string(),
            reason: "a set-aside label is letters, digits and '-'",
        });
    }
    let root = dir.parent().unwrap_or(Path::new("."));
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{name}.{label}-{secs}");
    let mut target = root.join(&base);
    let mut n = 1;
    // rename(2) would replace an empty directory of that name: never reuse a name.
    while fs::symlink_metadata(&target).is_ok() {
        n += 1;
        target = root.join(format!("{base}-{n}"));
    }
    fs::rename(dir, &target).map_err(io("set aside checkpoint", dir))?;
    sync_dir(root)?;
    Ok(target)
}

/// Every `step_<digits>` directory under `<out_dir>/checkpoints`, complete or not.
fn step_dirs(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    Ok(read_checkpoints_dir(out_dir)?
        .into_iter()
        .filter_map(|p| {
            let step = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_step_dir_name)?;
            p.is_dir().then_some((step, p))
        })
        .collect())
}

/// The entries of `<out_dir>/checkpoints` (none when it does not exist).
fn read_checkpoints_dir(out_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let root = checkpoints_dir(out_dir);
    let read = match fs::read_dir(&root) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("list", &root)(e)),
    };
    let mut paths = Vec::new();
    for entry in read {
        paths.push(entry.map_err(io("list", &root))?.path());
    }
    Ok(paths)
}

/// Deletes complete checkpoints older than the newest `keep_last` (never `keep_step`, the one
/// just written), and stale `.tmp-*` directories. Directories without `DONE` are left alone.
pub fn prune(out_dir: &Path, keep_last: usize, keep_step: u64) -> Result<(), CheckpointError> {
    let root = checkpoints_dir(out_dir);
    remove_stale_tmp(&root)?;
    let complete = list_complete(out_dir)?;
    let excess = complete.len().saturating_sub(keep_last.max(1));
    for (step, dir) in complete.into_iter().take(excess) {
        if step == keep_step {
            continue;
        }
        // Rename first, so that an interrupted delete leaves a `.tmp-*` directory (removed
        // later), never a half-deleted `step_…` directory that still has DONE.
        let doomed = root.join(format!(
            "{TMP_PREFIX}prune-{}-{}",
            step_dir_name(step),
            std::process::id()
        ));
        fs::rename(&dir, &doomed).map_err(io("move aside old checkpoint", &dir))?;
        fs::remove_dir_all(&doomed).map_err(io("delete old checkpoint", &doomed))?;
    }
    sync_dir(&root)
}

/// Removes `.tmp-*-<pid>` directories left by this process or by processes that no longer run.
fn remove_stale_tmp(root: &Path) -> Result<(), CheckpointError> {
    let read = match fs::read_dir(root) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(CheckpointError::Io(formats::fsutil::FsError {
                action: "list",
                path: root.to_path_buf(),
                source: e,
            }))
        }
    };
    let me = std::process::id();
    for entry in read {
        let entry = entry.map_err(io("list", root))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(TMP_PREFIX) {
            continue;
        }
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        let stale = match pid {
            Some(pid) if pid == me => true,
            Some(pid) => !process_alive(pid),
            None => false,
        };
        if stale && entry.path().is_dir() {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(io("remove stale directory", &path))?;
        }
    }
    Ok(())
}

/// Whether a process with this id exists. Where that cannot be told (no `/proc`), assume it does,
/// so that nothing another process may be writing is removed.
fn process_alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}

/// A complete checkpoint directory (one with `DONE`), from [`load_checked`], and its manifest.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    path: PathBuf,
    manifest: Option<Manifest>,
}

/// Opens a checkpoint directory for loading: refuses a directory without `DONE`, reads its
/// manifest (refusing one that is not valid; a checkpoint without one opens unverified).
pub fn load_checked(dir: &Path) -> Result<CheckpointDir, CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::Io(formats::fsutil::FsError {
            action: "open checkpoint directory",
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        }));
    }
    if !dir.join(DONE_FILE).is_file() {
        return Err(CheckpointError::Incomplete {
            path: dir.to_path_buf(),
        });
    }
    Ok(CheckpointDir {
        path: dir.to_path_buf(),
        manifest: Manifest::read(dir)?,
    })
}

impl CheckpointDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The step, from the directory name (`None` if it is not `step_<digits>`).
    pub fn step(&self) -> Option<u64> {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_step_dir_name)
    }

    /// Whether the checkpoint has a manifest, so that its reads are verified (false for
    /// checkpoints written before manifests existed).
    pub fn has_manifest(&self) -> bool {
        self.manifest.is_some()
    }

    /// Whether the checkpoint holds `file_name` (by its manifest, else by the directory).
    pub fn has_file(&self, file_name: &str) -> bool {
        match &self.manifest {
            Some(m) => m.files.contains_key(file_name),
            None => self.path.join(file_name).is_file(),
        }
    }

    /// The manifest's entry of `file_name`, or the error that it has none; `None` without a
    /// manifest.
    fn expected(&self, file_name: &str) -> Result<Option<&FileDigest>, CheckpointError> {
        let Some(m) = &self.manifest else {
            return Ok(None);
        };
        m.files
            .get(file_name)
            .map(Some)
            .ok_or_else(|| CheckpointError::NotInManifest {
                path: self.path.join(file_name),
            })
    }

    /// Opening `path` failed with `e`: a file the manifest lists is damage, anything else an
    /// I/O error.
    fn read_error(&self, path: &Path, e: std::io::Error) -> CheckpointError {
        if self.manifest.is_some() && e.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::ListedFileMissing {
                path: path.to_path_buf(),
            }
        } else {
            io("read", path)(e)
        }
    }

    /// The bytes of `file_name`, checked against the manifest (length and checksum) when there
    /// is one.
    pub fn read_file(&self, file_name: &str) -> Result<Vec<u8>, CheckpointError> {
        let path = self.path.join(file_name);
        let expected = self.expected(file_name)?;
        let bytes = fs::read(&path).map_err(|e| self.read_error(&path, e))?;
        if let Some(want) = expected {
            want.check(&path, &FileDigest::of(&bytes))?;
        }
        Ok(bytes)
    }

    /// Checks `file_name` against the manifest without keeping it in memory (for files another
    /// module reads by path, such as PowerSGD's state). Without a manifest, only that it exists.
    pub fn verify_file(&self, file_name: &str) -> Result<(), CheckpointError> {
        let path = self.path.join(file_name);
        match self.expected(file_name)? {
            Some(want) => {
                let found = match FileDigest::of_file(&path) {
                    Err(CheckpointError::Io(e)) => return Err(self.read_error(&path, e.source)),
                    r => r?,
                };
                want.check(&path, &found)
            }
            None => fs::metadata(&path)
                .map(|_| ())
                .map_err(|e| self.read_error(&path, e)),
        }
    }

    /// Checks every file the manifest lists (nothing without a manifest).
    pub fn verify(&self) -> Result<(), CheckpointError> {
        let names: Vec<String> = self
            .manifest
            .iter()
            .flat_map(|m| m.files.keys().cloned())
            .collect();
        names.iter().try_for_each(|n| self.verify_file(n))
    }

    /// Loads the tensors `<prefix><param name>` of `file_name` into `buf`; see [`load_into`].
    /// The file is verified first.
    pub fn load_into(
        &self,
        file_name: &str,
        table: &ParamTable,
        prefix: &str,
        buf: &mut [f32],
    ) -> Result<(), CheckpointError> {
        self.load_many(file_name, table, &mut [(prefix, buf)])
    }

    /// [`CheckpointDir::load_into`] for several prefixes of one file (AdamW's `m.` and `v.`),
    /// reading and verifying the file once. Every target is checked before any is written.
    pub fn load_many(
        &self,
        file_name: &str,
        table: &ParamTable,
        targets: &mut [(&str, &mut [f32])],
    ) -> Result<(), CheckpointError> {
        let path = self.path.join(file_name);
        let bytes = self.read_file(file_name)?;
        let st = parse_safetensors(&path, &bytes)?;
        let mut all_views = Vec::with_capacity(targets.len());
        for (prefix, buf) in targets.iter() {
            all_views.push(check_tensors(&path, &st, table, prefix, buf.len())?);
        }
        for ((_, buf), views) in targets.iter_mut().zip(&all_views) {
            copy_tensors(table, views, buf);
        }
        Ok(())
    }

    /// The parsed `state.json` (verified).
    pub fn state(&self) -> Result<serde_json::Value, CheckpointError> {
        let bytes = self.read_file(STATE_FILE)?;
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Format {
            path: self.path.join(STATE_FILE),
            message: format!("invalid JSON: {e}"),
        })
    }

    /// The text of the saved resolved config (verified).
    pub fn config_yaml(&self) -> Result<String, CheckpointError> {
        let bytes = self.read_file(CONFIG_FILE)?;
        String::from_utf8(bytes).map_err(|e| CheckpointError::Format {
            path: self.path.join(CONFIG_FILE),
            message: format!("not UTF-8: {e}"),
        })
    }
}

/// The `state.json` of a complete checkpoint directory (verified against its manifest);
/// refuses a directory without `DONE`.
pub fn read_state(dir: &Path) -> Result<serde_json::Value, CheckpointError> {
    load_checked(dir)?.state()
}

/// Loads the safetensors file `path` and copies every tensor `<prefix><param name>` of `table`
/// into `buf` (laid out by `table`). Checks everything before writing into `buf`, and errors
/// (naming the file, and the tensor) on a missing or unreadable file, a truncated or corrupt
/// file, a missing tensor, a shape mismatch, a dtype other than F32, or a tensor under `prefix`
/// that the table does not know. Tensors outside `prefix` are ignored. Does not check for `DONE`
/// nor checksums: use [`load_checked`] for checkpoint directories.
pub fn load_into(
    path: &Path,
    table: &ParamTable,
    prefix: &str,
    buf: &mut [f32],
) -> Result<(), CheckpointError> {
    if buf.len() != table.numel() {
        return Err(CheckpointError::BufferLength {
            path: path.to_path_buf(),
            expected: table.numel(),
            found: buf.len(),
        });
    }
    let bytes = fs::read(path).map_err(io("read", path))?;
    let st = parse_safetensors(path, &bytes)?;
    let views = check_tensors(path, &st, table, prefix, buf.len())?;
    copy_tensors(table, &views, buf);
    Ok(())
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The views of the tensors `<prefix><param name>` of `table` in `st`, in table order, after
/// checking the buffer length, every name, dtype and shape, and that nothing else is under
/// `prefix`.
fn check_tensors<'a>(
    path: &Path,
    st: &'a SafeTensors<'a>,
    table: &ParamTable,
    prefix: &str,
    buf_len: usize,
) -> Result<Vec<safetensors::tensor::TensorView<'a>>, CheckpointError> {
    if buf_len != table.numel() {
        return Err(CheckpointError::BufferLength {
            path: path.to_path_buf(),
            expected: table.numel(),
            found: buf_len,
        });
    }
    let mut views = Vec::with_capacity(table.len());
    for spec in table.specs() {
        let name = format!("{prefix}{}", spec.name);
        let view = st
            .tensor(&name)
            .map_err(|_| CheckpointError::MissingTensor {
                path: path.to_path_buf(),
                name: name.clone(),
            })?;
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype {
                path: path.to_path_buf(),
                name,
                found: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != spec.shape.as_slice() {
            return Err(CheckpointError::ShapeMismatch {
                path: path.to_path_buf(),
                name,
                expected: spec.shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        views.push(view);
    }
    let mut unexpected: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| {
            n.strip_prefix(prefix)
                .is_some_and(|rest| table.find(rest).is_none())
        })
        .collect();
    unexpected.sort_unstable();
    if let Some(name) = unexpected.first() {
        return Err(CheckpointError::UnexpectedTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    Ok(views)
}

fn copy_tensors(table: &ParamTable, views: &[safetensors::tensor::TensorView], buf: &mut [f32]) {
    for (dst, view) in table.split_mut(buf).into_iter().zip(views) {
        for (d, chunk) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }
}

/// Loads a standalone weights file (no prefix; e.g. `debug-state --weights`, or the
/// `model.safetensors` of a checkpoint) into `buf`, with the checks of [`load_into`].
pub fn load_weights(
    path: &Path,
    table: &ParamTable,
    buf: &mut [f32],
) -> Result<(), CheckpointError> {
    load_into(path, table, "", buf)
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let fs_err = formats::fsutil::fs_err(action, path);
    move |source| CheckpointError::Io(fs_err(source))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

/// Fsyncs a directory, so that the entries created or renamed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    formats::fsutil::sync_dir(dir).map_err(CheckpointError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamKind;
    use serde_json::json;

    fn table() -> ParamTable {
        let mut t = ParamTable::new();
        t.push("emb.weight", &[4, 3], ParamKind::Embedding);
        t.push("blocks.0.fc.weight", &[2, 3], ParamKind::Matrix);
        t.push("blocks.0.fc.bias", &[2], ParamKind::Bias);
        t
    }

    /// Values that only a bit-exact path preserves: signed zero, subnormals, NaN payloads, ±inf.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 * 1e-7 - 3.0)
            .collect();
        v[0] = -0.0;
        v[1] = f32::from_bits(1);
        v[2] = f32::from_bits(0x7fc0_1234);
        v[3] = f32::NEG_INFINITY;
        v
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Saves a checkpoint with model weights and two optimizer moments.
    fn save_step(
        out: &Path,
        step: u64,
        seed: u32,
        keep_last: usize,
    ) -> Result<PathBuf, CheckpointError> {
        let t = table();
        let w = values(t.numel(), seed);
        let m = values(t.numel(), seed + 1);
        let v = values(t.numel(), seed + 2);
        let mut opt = entries(&t, "m.", &m);
        opt.extend(entries(&t, "v.", &v));
        save(
            out,
            step,
            &[
                TensorFile {
                    file_name: MODEL_FILE,
                    tensors: entries(&t, "", &w),
                },
                TensorFile {
                    file_name: OPTIMIZER_FILE,
                    tensors: opt,
                },
            ],
            &json!({"step": step, "rng": [1, 2, 3], "cursor": {"shard": 0, "offset": 17}}),
            "run:\n  name: t\n",
            keep_last,
        )
    }

    fn dir_names(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn save_then_load_round_trips_bit_for_bit() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 100, 5, 3).unwrap();
        assert_eq!(dir, out.path().join("checkpoints/step_00000100"));
        assert_eq!(
            dir_names(&dir),
            vec![
                "DONE",
                "config.yaml",
                "manifest.json",
                "model.safetensors",
                "optimizer.safetensors",
                "state.json"
            ]
        );
        assert_eq!(latest_complete(out.path()).unwrap(), Some(dir.clone()));

        let t = table();
        let ck = load_checked(&dir).unwrap();
        assert_eq!(ck.step(), Some(100));
        let mut w = vec![0.0; t.numel()];
        ck.load_into(MODEL_FILE, &t, "", &mut w).unwrap();
        assert_eq!(bits(&w), bits(&values(t.numel(), 5)));
        let mut v = vec![0.0; t.numel()];
        ck.load_into(OPTIMIZER_FILE, &t, "v.", &mut v).unwrap();
        assert_eq!(bits(&v), bits(&values(t.numel(), 7)));
        let mut w2 = vec![0.0; t.numel()];
        load_weights(&dir.join(MODEL_FILE), &t, &mut w2).unwrap();
        assert_eq!(bits(&w2), bits(&w));

        let state = read_state(&dir).unwrap();
        assert_eq!(state["step"], 100);
        assert_eq!(state["cursor"]["offset"], 17);
        assert_eq!(ck.config_yaml().unwrap(), "run:\n  name: t\n");
    }

    #[test]
    fn identical_inputs_give_byte_identical_files() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let da = save_step(a.path(), 3, 9, 3).unwrap();
        let db = save_step(b.path(), 3, 9, 3).unwrap();
        for f in [
            MODEL_FILE,
            OPTIMIZER_FILE,
            STATE_FILE,
            CONFIG_FILE,
            MANIFEST_FILE,
            DONE_FILE,
        ] {
            assert_eq!(
                fs::read(da.join(f)).unwrap(),
                fs::read(db.join(f)).unwrap(),
                "{f}"
            );
        }
        // The entry order does not matter either: tensors are stored sorted by name.
        let t = table();
        let w = values(t.numel(), 9);
        let mut reversed = entries(&t, "", &w);
        reversed.reverse();
        let path = a.path().join("w.safetensors");
        write_tensors(&path, &reversed).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            fs::read(da.join(MODEL_FILE)).unwrap()
        );
    }

    #[test]
    fn dir_without_done_is_never_loaded() {
        let out = tempfile::tempdir().unwrap();
        save_step(out.path(), 100, 1, 3).unwrap();
        let partial = save_step(out.path(), 200, 2, 3).unwrap();
        fs::remove_file(partial.join(DONE_FILE)).unwrap();
        assert_eq!(
            latest_complete(out.path()).unwrap(),
            Some(step_dir(out.path(), 100))
        );
        let e = load_checked(&partial).unwrap_err();
        assert!(matches!(e, CheckpointError::Incomplete { .. }), "{e}");
        assert!(e.to_string().contains("step_00000200"), "{e}");
        assert!(read_state(&partial).is_err());
        // A later save never prunes it.
        save_step(out.path(), 300, 3, 1).unwrap();
        assert!(partial.exists());
    }

    #[test]
    fn stale_tmp_dirs_are_ignored_and_cleaned() {
        let out = tempfile::tempdir().unwrap();
        assert_eq!(latest_complete(out.path()).unwrap(), None);
        let root = checkpoints_dir(out.path());
        // A temporary dir that even has DONE (crash between DONE and rename).
        let dead = root.join(format!(".tmp-step_00000900-{}", u32::MAX));
        let mine = root.join(format!(".tmp-step_00000800-{}", std::process::id()));
        for d in [&dead, &mine] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join(DONE_FILE), "").unwrap();
        }
        assert_eq!(latest_complete(out.path()).unwrap(), None);
        save_step(out.path(), 5, 1, 3).unwrap();
        assert_eq!(
            latest_complete(out.path()).unwrap(),
            Some(step_dir(out.path(), 5))
        );
        assert!(!dead.exists() && !mine.exists());
        assert_eq!(dir_names(&root), vec!["step_00000005"]);
    }

    #[test]
    fn truncated_and_garbage_files_error_naming_the_file() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 1, 1, 3).unwrap();
        let t = table();
        let mut buf = vec![0.0; t.numel()];
        let model = dir.join(MODEL_FILE);
        let bytes = fs::read(&model).unwrap();
        fs::write(&model, &bytes[..bytes.len() - 5]).unwrap();
        let e = load_into(&model, &t, "", &mut buf).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        fs::write(&model, b"this is not a safetensors file at all").unwrap();
        let e = load_into(&model, &t, "", &mut buf).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
        fs::write(&model, b"").unwrap();
        let e = load_into(&model, &t, "", &mut buf).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let e = load_into(&dir.join("nope.safetensors"), &t, "", &mut buf)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        assert!(buf.iter().all(|&x| x == 0.0), "nothing is copied on error");
    }

    #[test]
    fn shape_missing_dtype_and_extra_tensor_errors_name_the_tensor() {
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("w.safetensors");
        let t = table();
        let w = values(t.numel(), 1);
        let mut buf = vec![0.0; t.numel()];

        // Shape mismatch.
        let mut e = entries(&t, "", &w);
        e[1].shape = vec![3, 2];
        write_tensors(&path, &e).unwrap();
        let err = load_weights(&path, &t, &mut buf).unwrap_err().to_string();
        assert!(
            err.contains("'blocks.0.fc.weight' has shape [3, 2], expected [2, 3]"),
            "{err}"
        );

        // Missing tensor.
        let mut e = entries(&t, "", &w);
        e.remove(2);
        write_tensors(&path, &e).unwrap();
        let err = load_weights(&path, &t, &mut buf).unwrap_err().to_string();
        assert!(err.contains("missing tensor 'blocks.0.fc.bias'"), "{err}");
        assert!(err.contains("w.safetensors"), "{err}");

        // Unexpected extra tensor under the prefix; tensors outside the prefix are fine.
        let extra = [1.0f32, 2.0];
        let mut e = entries(&t, "m.", &w);
        e.push(TensorEntry {
            name: "m.stray".into(),
            shape: vec![2],
            data: &extra,
        });
        e.push(TensorEntry {
            name: "other".into(),
            shape: vec![2],
            data: &extra,
        });
        write_tensors(&path, &e).unwrap();
        let err = load_into(&path, &t, "m.", &mut buf)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unexpected tensor 'm.stray'"), "{err}");

        // Not F32.
        let half = [0u8; 4];
        let le: Vec<Vec<u8>> = t
            .specs()
            .iter()
            .map(|s| w[s.range()].iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = t
            .specs()
            .iter()
            .zip(&le)
            .map(|(s, data)| {
                let view = safetensors::tensor::TensorView::new(Dtype::F32, s.shape.clone(), data);
                (s.name.clone(), view.unwrap())
            })
            .collect();
        tensors[2] = (
            "blocks.0.fc.bias".into(),
            safetensors::tensor::TensorView::new(Dtype::F16, vec![2], &half).unwrap(),
        );
        safetensors::tensor::serialize_to_file(tensors, None, &path).unwrap();
        let err = load_weights(&path, &t, &mut buf).unwrap_err().to_string();
        assert!(
            err.contains("'blocks.0.fc.bias' has dtype F16, expected F32"),
            "{err}"
        );

        // Wrong buffer length.
        let err = load_weights(&path, &t, &mut buf[1..])
            .unwrap_err()
            .to_string();
        assert!(err.contains("flat buffer"), "{err}");
    }

    #[test]
    fn keep_last_prunes_oldest_complete_checkpoints() {
        let out = tempfile::tempdir().unwrap();
        for step in 1..=5 {
            save_step(out.path(), step, step as u32, 2).unwrap();
        }
        let root = checkpoints_dir(out.path());
        assert_eq!(dir_names(&root), vec!["step_00000004", "step_00000005"]);
        // A save older than the newest ones (a restart) is kept: never delete the one just written.
        save_step(out.path(), 3, 3, 2).unwrap();
        assert_eq!(
            dir_names(&root),
            vec!["step_00000003", "step_00000004", "step_00000005"]
        );
        save_step(out.path(), 6, 6, 2).unwrap();
        assert_eq!(dir_names(&root), vec!["step_00000005", "step_00000006"]);
        let e = save_step(out.path(), 7, 7, 0).unwrap_err();
        assert!(matches!(e, CheckpointError::KeepLast(0)));
    }

    #[test]
    fn saving_an_existing_step_errors_and_keeps_the_old_one() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 10, 1, 3).unwrap();
        let before = fs::read(dir.join(MODEL_FILE)).unwrap();
        let e = save_step(out.path(), 10, 2, 3).unwrap_err();
        assert!(matches!(e, CheckpointError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("step_00000010"), "{e}");
        assert_eq!(fs::read(dir.join(MODEL_FILE)).unwrap(), before);
        assert!(dir.join(DONE_FILE).is_file());
        assert_eq!(
            dir_names(&checkpoints_dir(out.path())),
            vec!["step_00000010"]
        );
    }

    #[test]
    fn bad_entries_are_refused_before_anything_is_written() {
        let out = tempfile::tempdir().unwrap();
        let t = table();
        let short = vec![0.0; t.numel() - 1];
        let e = save(
            out.path(),
            1,
            &[TensorFile {
                file_name: MODEL_FILE,
                tensors: entries(&t, "", &short),
            }],
            &json!({}),
            "",
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'blocks.0.fc.bias'") && e.contains("needs 2 values, got 0"),
            "{e}"
        );
        let e = save(
            out.path(),
            1,
            &[TensorFile {
                file_name: STATE_FILE,
                tensors: vec![],
            }],
            &json!({}),
            "",
            1,
        )
        .unwrap_err();
        assert!(matches!(e, CheckpointError::BadFileName { .. }), "{e}");
        assert_eq!(latest_complete(out.path()).unwrap(), None);
        assert!(!step_dir(out.path(), 1).exists());
    }

    #[test]
    fn the_manifest_lists_every_file_with_its_length_and_checksum() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 4, 1, 3).unwrap();
        let m = Manifest::read(&dir).unwrap().unwrap();
        assert_eq!((m.format, m.algorithm.as_str()), (1, "xxh3-128"));
        let names: Vec<&str> = m.files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
        );
        for (name, digest) in &m.files {
            let bytes = fs::read(dir.join(name)).unwrap();
            assert_eq!(digest.bytes, bytes.len() as u64, "{name}");
            assert_eq!(
                digest.xxh3_128,
                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)),
                "{name}"
            );
            assert_eq!(&FileDigest::of_file(&dir.join(name)).unwrap(), digest);
        }
        let ck = load_checked(&dir).unwrap();
        assert!(ck.has_manifest());
        ck.verify().unwrap();
    }

    #[test]
    fn a_flipped_byte_or_a_truncation_is_refused_naming_the_file() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 4, 1, 3).unwrap();
        let t = table();
        let opt = dir.join(OPTIMIZER_FILE);
        let good = fs::read(&opt).unwrap();
        // A byte inside the tensor data (the end of the file), where the safetensors header
        // cannot notice.
        let mut bad = good.clone();
        let at = bad.len() - 3;
        bad[at] ^= 0x10;
        fs::write(&opt, &bad).unwrap();
        let ck = load_checked(&dir).unwrap();
        let (mut m, mut v) = (vec![0.0; t.numel()], vec![0.0; t.numel()]);
        let e = ck
            .load_many(OPTIMIZER_FILE, &t, &mut [("m.", &mut m), ("v.", &mut v)])
            .unwrap_err();
        assert!(matches!(e, CheckpointError::Checksum { .. }), "{e}");
        assert_eq!(e.damage(), Some("checksum"));
        assert!(e.to_string().contains("optimizer.safetensors"), "{e}");
        assert!(m.iter().chain(&v).all(|&x| x == 0.0), "nothing is copied");
        assert!(ck.verify().is_err());
        assert!(ck.verify_file(OPTIMIZER_FILE).is_err());
        // The unverified path still reads it: the damage is invisible without the manifest.
        load_into(&opt, &t, "m.", &mut m).unwrap();

        fs::write(&opt, &good[..good.len() - 1]).unwrap();
        let e = ck.load_into(OPTIMIZER_FILE, &t, "m.", &mut m).unwrap_err();
        assert!(matches!(e, CheckpointError::Length { .. }), "{e}");
        assert_eq!(e.damage(), Some("checksum"));

        fs::write(&opt, &good).unwrap();
        ck.load_many(OPTIMIZER_FILE, &t, &mut [("m.", &mut m), ("v.", &mut v)])
            .unwrap();
        assert_eq!(bits(&v), bits(&values(t.numel(), 3)));
        assert_eq!(bits(&m), bits(&values(t.numel(), 2)));

        // state.json and config.yaml are covered too.
        fs::write(dir.join(STATE_FILE), b"{\"step\": 5}\n").unwrap();
        let e = read_state(&dir).unwrap_err();
        assert_eq!(e.damage(), Some("checksum"), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
    }

    #[test]
    fn missing_unlisted_and_invalid_manifest_files() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 4, 1, 3).unwrap();
        let t = table();
        let mut w = vec![0.0; t.numel()];
        // A file the checkpoint was not written with (an EMA asked of a run without one): not
        // damage, the config does not fit.
        let ck = load_checked(&dir).unwrap();
        let e = ck.load_into(EMA_FILE, &t, "", &mut w).unwrap_err();
        assert!(matches!(e, CheckpointError::NotInManifest { .. }), "{e}");
        assert_eq!(e.damage(), None);
        assert!(!ck.has_file(EMA_FILE) && ck.has_file(MODEL_FILE));
        // A listed file that is gone: damage.
        fs::remove_file(dir.join(MODEL_FILE)).unwrap();
        let e = ck.load_into(MODEL_FILE, &t, "", &mut w).unwrap_err();
        assert!(
            matches!(e, CheckpointError::ListedFileMissing { .. }),
            "{e}"
        );
        assert_eq!(e.damage(), Some("checksum"));
        assert!(ck.verify_file(MODEL_FILE).unwrap_err().damage().is_some());
        // A manifest that is not one.
        fs::write(dir.join(MANIFEST_FILE), b"{\"format\": 1").unwrap();
        let e = load_checked(&dir).unwrap_err();
        assert_eq!(e.damage(), Some("manifest"), "{e}");
        assert!(e.to_string().contains("manifest.json"), "{e}");
        fs::write(
            dir.join(MANIFEST_FILE),
            b"{\"format\": 2, \"algorithm\": \"xxh3-128\", \"files\": {}}",
        )
        .unwrap();
        let e = load_checked(&dir).unwrap_err().to_string();
        assert!(e.contains("format 2"), "{e}");
        fs::write(
            dir.join(MANIFEST_FILE),
            b"{\"format\": 1, \"algorithm\": \"xxh3-128\", \"files\": {\"../x\": {\"bytes\": 1, \"xxh3_128\": \"0\"}}}",
        )
        .unwrap();
        let e = load_checked(&dir).unwrap_err().to_string();
        assert!(e.contains("'../x' is not a plain file name"), "{e}");
    }

    #[test]
    fn a_checkpoint_without_a_manifest_loads_unverified() {
        let out = tempfile::tempdir().unwrap();
        let dir = save_step(out.path(), 4, 1, 3).unwrap();
        fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        let ck = load_checked(&dir).unwrap();
        assert!(!ck.has_manifest());
        ck.verify().unwrap();
        let t = table();
        let mut w = vec![0.0; t.numel()];
        ck.load_into(MODEL_FILE, &t, "", &mut w).unwrap();
        assert_eq!(bits(&w), bits(&values(t.numel(), 1)));
        assert_eq!(ck.state().unwrap()["step"], 4);
        // A missing file is then an I/O error, not damage: nothing says it should be there.
        let e = ck.load_into(EMA_FILE, &t, "", &mut w).unwrap_err();
        assert!(matches!(e, CheckpointError::Io(_)), "{e}");
        assert_eq!(e.damage(), None);
    }

    #[test]
    fn set_aside_renames_and_never_reuses_a_name() {
        let out = tempfile::tempdir().unwrap();
        let a = save_step(out.path(), 1, 1, 5).unwrap();
        let b = save_step(out.path(), 2, 2, 5).unwrap();
        let c = save_step(out.path(), 3, 3, 5).unwrap();
        fs::remove_file(c.join(DONE_FILE)).unwrap();
        assert_eq!(list_incomplete(out.path()).unwrap(), vec![(3, c.clone())]);
        let model_b = fs::read(b.join(MODEL_FILE)).unwrap();

        let b2 = set_aside(&b, "corrupt-checksum").unwrap();
        let name = b2.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("step_00000002.corrupt-checksum-"),
            "{name}"
        );
        assert_eq!(fs::read(b2.join(MODEL_FILE)).unwrap(), model_b);
        let c2 = set_aside(&c, "incomplete").unwrap();
        assert_eq!(list_complete(out.path()).unwrap(), vec![(1, a.clone())]);
        assert!(list_incomplete(out.path()).unwrap().is_empty());
        assert_eq!(
            list_set_aside_corrupt(out.path()).unwrap(),
            vec![b2.clone()]
        );

        // The same step set aside twice in one second gets a fresh name.
        let again = save_step(out.path(), 2, 2, 5).unwrap();
        let b3 = set_aside(&again, "corrupt-checksum").unwrap();
        assert_ne!(b3, b2);
        assert!(b2.is_dir() && b3.is_dir() && c2.is_dir());
        assert_eq!(list_set_aside_corrupt(out.path()).unwrap().len(), 2);
        // Pruning never touches them.
        for step in 4..=7 {
            save_step(out.path(), step, step as u32, 1).unwrap();
        }
        assert!(b2.is_dir() && b3.is_dir() && c2.is_dir());
        assert!(set_aside(&a.with_file_name("step_00000004"), "bad label!").is_err());
    }

    #[test]
    fn step_dir_names_parse() {
        assert_eq!(parse_step_dir_name("step_00000042"), Some(42));
        assert_eq!(parse_step_dir_name("step_123456789"), Some(123456789));
        assert_eq!(parse_step_dir_name("step_"), None);
        assert_eq!(parse_step_dir_name("step_12a"), None);
        assert_eq!(parse_step_dir_name(".tmp-step_00000001-5"), None);
    }
}
