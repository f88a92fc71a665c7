//! Ingest inputs: the formats `data-prep ingest` reads, turned into one ordered stream of
//! [`InputItem`]s (one per image-caption pair).
//!
//! - `files`: img2dataset's `files` layout (`00000/000000000.jpg` + `.txt` + `.json`);
//! - `folder`: any folder of images (`jpg`, `jpeg`, `png`, `webp`) with same-named `.txt`
//!   captions, searched recursively (the same reader as `files`; a `.json` sidecar is optional);
//! - `tar`: webdataset shards, one `.tar` file or a folder of them: entries grouped by key (the
//!   path up to the first `.` of the file name), `key.jpg|jpeg|png|webp` + `key.txt` (+ `key.json`);
//!   entries with a `..` component or an absolute path are never read and are reported as
//!   `unsafe_path` inputs; nothing from a tar is ever written to disk;
//! - `jsonl`: one `{"image": path, "caption": text}` object per line;
//! - `csv`: a header with `image` and `caption` columns.
//!
//! Image paths in JSONL/CSV are relative to the listing file's folder. The order of the stream
//! is deterministic: sorted paths for folders, archive order for tars, line order for listings.
//! File contents are read by the workers ([`Blob::Path`]), except tar members, which are read
//! here on a background thread ([`Blob::Bytes`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;

use super::stats::Reason;
use super::IngestError;

/// Image file extensions read (lowercase).
pub const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// Largest tar member read into memory; larger members are `bad_record`s.
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// The input formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Files,
    Folder,
    Tar,
    Jsonl,
    Csv,
}

impl Format {
    /// The name used on the command line and in `stats.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Files => "files",
            Format::Folder => "folder",
            Format::Tar => "tar",
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// Bytes of an image, caption or sidecar: still on disk, already read, or absent.
#[derive(Debug)]
pub enum Blob {
    Path(PathBuf),
    Bytes(Vec<u8>),
    Missing,
}

impl Blob {
    /// Reads the bytes (`Ok(None)` when missing).
    pub fn load(self) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            Blob::Path(p) => fs::read(p).map(Some),
            Blob::Bytes(b) => Ok(Some(b)),
            Blob::Missing => Ok(None),
        }
    }
}

/// One input: an image and its caption, and how to name it in reports.
#[derive(Debug)]
pub struct InputItem {
    /// A name that identifies the input: `00000/000000000`, `shard.tar:key`, `list.jsonl:12`.
    pub name: String,
    pub image: Blob,
    pub caption: Blob,
    /// img2dataset / webdataset `.json` sidecar (its `url` goes into the record's metadata).
    pub sidecar: Blob,
    /// Rejected before reading anything (unsafe tar path, malformed listing row).
    pub reject: Option<(Reason, String)>,
}

impl InputItem {
    fn rejected(name: String, reason: Reason, detail: String) -> Self {
        Self {
            name,
            image: Blob::Missing,
            caption: Blob::Missing,
            sidecar: Blob::Missing,
            reject: Some((reason, detail)),
        }
    }
}

/// An ordered stream of inputs.
pub struct Source {
    /// Number of inputs when known up front (for the progress bar).
    pub total: Option<u64>,
    pub items: Box<dyn Iterator<Item = Result<InputItem, IngestError>> + Send>,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IngestError {
    let fs_err = formats::fsutil::fs_err(action, path);
    move |source| IngestError::Io(fs_err(source))
}

fn ext_lower(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

fn is_image_ext(ext: &str) -> bool {
    IMAGE_EXTS.contains(&ext)
}

/// Guesses the format of `input`: a `.tar`/`.jsonl`/`.csv` file; a folder of `.tar` files; a
/// folder in img2dataset's layout (numbered subfolders with `.json` sidecars); else a folder.
pub fn detect(input: &Path) -> Result<Format, IngestError> {
    let meta = fs::metadata(input).map_err(io_err("read", input))?;
    if meta.is_file() {
        return match ext_lower(input).as_str() {
            "tar" => Ok(Format::Tar),
            "jsonl" | "json" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(IngestError::Format {
                path: input.to_path_buf(),
                reason: format!(
                    "cannot tell the format of a '.{other}' file; expected .tar, .jsonl or .csv \
                     (or pass --format)"
                ),
            }),
        };
    }
    let mut tars = 0;
    let mut numbered_with_json = false;
    for e in fs::read_dir(input).map_err(io_err("list", input))? {
        let e = e.map_err(io_err("list", input))?;
        let p = e.path();
        if p.is_file() && ext_lower(&p) == "tar" {
            tars += 1;
        }
        let name = e.file_name();
        let name = name.to_string_lossy();
        if p.is_dir() && name.len() == 5 && name.bytes().all(|b| b.is_ascii_digit()) {
            let has_json = fs::read_dir(&p)
                .map_err(io_err("list", &p))?
                .filter_map(|e| e.ok())
                .any(|e| ext_lower(&e.path()) == "json");
            numbered_with_json |= has_json;
        }
    }
    Ok(if tars > 0 {
        Format::Tar
    } else if numbered_with_json {
        Format::Files
    } else {
        Format::Folder
    })
}

/// Opens `input` as `format`.
pub fn open(input: &Path, format: Format) -> Result<Source, IngestError> {
    match format {
        Format::Files | Format::Folder => folder(input),
        Format::Tar => tar_source(input),
        Format::Jsonl => jsonl(input),
        Format::Csv => csv_source(input),
    }
}

/// Every file under `dir`, recursively, sorted; hidden entries are skipped.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), IngestError> {
    let mut entries = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err("list", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = e.path();
        let ft = e.file_type().map_err(io_err("stat", &p))?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if ft.is_file() || p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Group {
    image: Option<PathBuf>,
    extra_images: Vec<PathBuf>,
    caption: Option<PathBuf>,
    sidecar: Option<PathBuf>,
}

fn folder(input: &Path) -> Result<Source, IngestError> {
    let mut files = Vec::new();
    walk(input, &mut files)?;
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for p in files {
        let ext = ext_lower(&p);
        let rel = p.strip_prefix(input).unwrap_or(&p).with_extension("");
        let key = rel.to_string_lossy().replace('\\', "/");
        let slot = || -> Group { Group::default() };
        if is_image_ext(&ext) {
            let g = groups.entry(key).or_insert_with(slot);
            if g.image.is_none() {
                g.image = Some(p);
            } else {
                g.extra_images.push(p);
            }
        } else if ext == "txt" {
            groups.entry(key).or_insert_with(slot).caption = Some(p);
        } else if ext == "json" {
            if let Some(g) = groups.get_mut(&key) {
                g.sidecar = Some(p);
            } else {
                groups.insert(
                    key,
                    Group {
                        sidecar: Some(p),
                        ..Group::default()
                    },
                );
            }
        }
    }
    let mut items = Vec::new();
    for (key, g) in groups {
        if g.image.is_none() && g.caption.is_none() {
            continue; // A lone .json (stats, manifests) is not an input.
        }
        for extra in &g.extra_images {
            items.push(InputItem::rejected(
                extra.display().to_string(),
                Reason::BadRecord,
                format!("another image is also named '{key}'"),
            ));
        }
        items.push(InputItem {
            name: key,
            image: g.image.map_or(Blob::Missing, Blob::Path),
            caption: g.caption.map_or(Blob::Missing, Blob::Path),
            sidecar: g.sidecar.map_or(Blob::Missing, Blob::Path),
            reject: None,
        });
    }
    Ok(Source {
        total: Some(items.len() as u64),
        items: Box::new(items.into_iter().map(Ok)),
    })
}

/// Whether a tar member path is safe: relative, without `..`, root or prefix components.
pub fn safe_member_path(raw: &[u8]) -> Result<PathBuf, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "path is not UTF-8".to_string())?;
    if s.starts_with('/') || s.starts_with('\\') || s.contains('\0') {
        return Err("absolute path".into());
    }
    let p = Path::new(s);
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("'..' component".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    if s.split(['/', '\\']).any(|part| part == "..") || s.get(1..2) == Some(":") {
        return Err("'..' component or drive prefix".into());
    }
    Ok(p.to_path_buf())
}

/// The webdataset key and extension of a member: `dir/abc.seg.jpg` → (`dir/abc`, `seg.jpg`).
fn split_key(p: &Path) -> (String, String) {
    let s = p.to_string_lossy().replace('\\', "/");
    let s = s.trim_start_matches("./").to_string();
    let base_start = s.rfind('/').map_or(0, |i| i + 1);
    match s[base_start..].find('.') {
        Some(dot) => (
            s[..base_start + dot].to_string(),
            s[base_start + dot + 1..].to_ascii_lowercase(),
        ),
        None => (s, String::new()),
    }
}

fn tar_source(input: &Path) -> Result<Source, IngestError> {
    let tars = if input.is_dir() {
        let mut t: Vec<PathBuf> = fs::read_dir(input)
            .map_err(io_err("list", input))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && ext_lower(p) == "tar")
            .collect();
        t.sort();
        t
    } else {
        vec![input.to_path_buf()]
    };
    let (tx, rx) = mpsc::sync_channel::<Result<InputItem, IngestError>>(256);
    std::thread::spawn(move || {
        for t in tars {
            if let Err(e) = read_tar(&t, &tx) {
                let _ = tx.send(Err(e));
                return;
            }
        }
    });
    Ok(Source {
        total: None,
        items: Box::new(rx.into_iter()),
    })
}

struct Pending {
    key: String,
    image: Option<Vec<u8>>,
    caption: Option<Vec<u8>>,
    sidecar: Option<Vec<u8>>,
    reject: Option<(Reason, String)>,
}

impl Pending {
    fn into_item(self, tar_name: &str) -> InputItem {
        let bytes = |b: Option<Vec<u8>>| b.map_or(Blob::Missing, Blob::Bytes);
        InputItem {
            name: format!("{tar_name}:{}", self.key),
            image: bytes(self.image),
            caption: bytes(self.caption),
            sidecar: bytes(self.sidecar),
            reject: self.reject,
        }
    }
}

/// Streams one tar's samples into `tx`; returns Err on a read error of the archive itself.
fn read_tar(
    path: &Path,
    tx: &mpsc::SyncSender<Result<InputItem, IngestError>>,
) -> Result<(), IngestError> {
    let tar_name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let tar_err = |entry: usize| {
        let path = path.to_path_buf();
        move |source: std::io::Error| IngestError::Tar {
            path,
            entry,
            source,
        }
    };
    let file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let mut pending: Option<Pending> = None;
    let send = |item: InputItem| tx.send(Ok(item)).is_ok();
    for (n, entry) in archive.entries().map_err(tar_err(0))?.enumerate() {
        let mut entry = entry.map_err(tar_err(n))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        let member = match safe_member_path(&raw) {
            Ok(p) => p,
            Err(why) => {
                let item = InputItem::rejected(
                    format!("{tar_name}:{shown}"),
                    Reason::UnsafePath,
                    format!("rejected tar member: {why}"),
                );
                if !send(item) {
                    return Ok(());
                }
                continue;
            }
        };
        let (key, ext) = split_key(&member);
        if pending.as_ref().is_some_and(|p| p.key != key) {
            if let Some(p) = pending.take() {
                if !send(p.into_item(&tar_name)) {
                    return Ok(());
                }
            }
        }
        let p = pending.get_or_insert_with(|| Pending {
            key: key.clone(),
            image: None,
            caption: None,
            sidecar: None,
            reject: None,
        });
        let last = ext.rsplit('.').next().unwrap_or("").to_string();
        let wanted = is_image_ext(&last) || last == "txt" || last == "json";
        if !wanted {
            continue;
        }
        if !kind.is_file() {
            p.reject
                .get_or_insert((Reason::BadRecord, format!("member {shown} is not a file")));
            continue;
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if size > MAX_MEMBER_BYTES {
            p.reject.get_or_insert((
                Reason::BadRecord,
                format!("member {shown} has {size} bytes (limit {MAX_MEMBER_BYTES})"),
            ));
            continue;
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(tar_err(n))?;
        let slot = if is_image_ext(&last) {
            &mut p.image
        } else if last == "txt" {
            &mut p.caption
        } else {
            &mut p.sidecar
        };
        if slot.is_some() {
            p.reject.get_or_insert((
                Reason::BadRecord,
                format!("two '{last}' members for key '{key}'"),
            ));
        }
        *slot = Some(data);
    }
    if let Some(p) = pending.take() {
        send(p.into_item(&tar_name));
    }
    Ok(())
}

fn jsonl(input: &Path) -> Result<Source, IngestError> {
    let file = fs::File::open(input).map_err(io_err("open", input))?;
    let dir = input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let list = input.file_name().map_or_else(
        || input.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let mut reader = BufReader::new(file);
    let path = input.to_path_buf();
    let mut line_no = 0usize;
    let items = std::iter::from_fn(move || loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(source) => {
                return Some(Err(IngestError::Io(formats::fsutil::FsError {
                    action: "read",
                    path: path.clone(),
                    source,
                })))
            }
        }
        line_no += 1;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let name = format!("{list}:{line_no}");
        return Some(Ok(listing_row(&dir, name, jsonl_fields(&line))));
    });
    Ok(Source {
        total: None,
        items: Box::new(items),
    })
}

/// A listing row: (image path, caption bytes), or why it is unusable.
type RowFields = Result<(String, Option<Vec<u8>>), (Reason, String)>;

/// The fields of a JSONL line.
fn jsonl_fields(line: &[u8]) -> RowFields {
    if std::str::from_utf8(line).is_err() {
        return Err((Reason::NonUtf8Caption, "line is not UTF-8".into()));
    }
    let v: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| (Reason::BadRecord, format!("not a JSON object: {e}")))?;
    let image = v
        .get("image")
        .and_then(|x| x.as_str())
        .ok_or((Reason::BadRecord, "no string field \"image\"".to_string()))?;
    let caption = v
        .get("caption")
        .and_then(|x| x.as_str())
        .map(|c| c.as_bytes().to_vec());
    Ok((image.to_string(), caption))
}

/// An input from a listing row (JSONL or CSV).
fn listing_row(dir: &Path, name: String, fields: RowFields) -> InputItem {
    match fields {
        Err((reason, detail)) => InputItem::rejected(name, reason, detail),
        Ok((image, caption)) => InputItem {
            name: format!("{name} ({image})"),
            image: if image.is_empty() {
                Blob::Missing
            } else {
                Blob::Path(dir.join(image))
            },
            caption: caption.map_or(Blob::Missing, Blob::Bytes),
            sidecar: Blob::Missing,
            reject: None,
        },
    }
}

fn csv_source(input: &Path) -> Result<Source, IngestError> {
    let csv_err = |source| IngestError::Csv {
        path: input.to_path_buf(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_path(input)
        .map_err(csv_err)?;
    let headers = reader.byte_headers().map_err(csv_err)?.clone();
    let col = |want: &str| {
        headers
            .iter()
            .position(|h| h.trim_ascii() == want.as_bytes())
    };
    let (Some(ic), Some(cc)) = (col("image"), col("caption")) else {
        return Err(IngestError::Format {
            path: input.to_path_buf(),
            reason: format!(
                "CSV header must have 'image' and 'caption' columns, found {:?}",
                headers
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect::<Vec<_>>()
            ),
        });
    };
    let dir = input.parent().unwrap_or(Path::new(".")).to_path_buf();
    let list = input.file_name().map_or_else(
        || input.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let path = input.to_path_buf();
    let items = reader.into_byte_records().enumerate().map(move |(n, rec)| {
        let rec = rec.map_err(|source| IngestError::Csv {
            path: path.clone(),
            source,
        })?;
        let name = format!("{list}:{}", n + 2);
        let fields = match (rec.get(ic), rec.get(cc)) {
            (Some(img), cap) => match std::str::from_utf8(img) {
                Ok(img) => Ok((img.to_string(), cap.map(|c| c.to_vec()))),
                Err(_) => Err((Reason::BadRecord, "image path is not UTF-8".into())),
            },
            (None, _) => Err((Reason::BadRecord, "row has no image field".into())),
        };
        Ok(listing_row(&dir, name, fields))
    });
    Ok(Source {
        total: None,
        items: Box::new(items),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_member_paths_are_rejected() {
        for bad in [
            &b"../evil.txt"[..],
            b"/etc/passwd",
            b"a/../../b.jpg",
            b"a/..",
            b"C:evil.txt",
            b"\\abs.txt",
        ] {
            assert!(
                safe_member_path(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for ok in [&b"a/b.jpg"[..], b"./x.txt", b"000001.seg.png"] {
            assert!(safe_member_path(ok).is_ok());
        }
    }

    #[test]
    fn webdataset_keys() {
        assert_eq!(
            split_key(Path::new("dir/abc.seg.JPG")),
            ("dir/abc".into(), "seg.jpg".into())
        );
        assert_eq!(
            split_key(Path::new("./0001.txt")),
            ("0001".into(), "txt".into())
        );
    }
}
