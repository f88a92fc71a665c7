//! Image shards (`.tis`): resized RGB images and their captions in zstd-compressed chunks with a
//! chunk index, so that any record is reachable by reading and decompressing only its chunk.
//!
//! The byte layout is documented in docs/formats.md ("Image shards"); in short, all integers
//! little-endian:
//!
//! ```text
//! header (64 bytes)   magic "TESSIMG\0", version, resolution, channels, chunk_records,
//!                     record_count, chunk_count, index_offset, index_crc, zstd level, header_crc
//! chunks              each one zstd frame of its records, back to back from byte 64
//! chunk index         chunk_count entries of 40 bytes: offset, compressed_len, raw_len,
//!                     first_record, record_count, crc32 of the compressed bytes
//! ```
//!
//! A decompressed chunk is its records back to back: `H·W·3` pixel bytes (row-major, RGB),
//! `u32` caption length + UTF-8 caption, `u32` metadata length (`u32::MAX` = no metadata) +
//! UTF-8 metadata (JSON by convention).
//!
//! Invariants:
//!
//! - [`ImageShardWriter`] writes `<path>.tmp`, fsyncs it, renames it to `<path>` and fsyncs the
//!   directory: a file under its final name is always complete. The header is written last (it is
//!   a placeholder of zeros, which never passes the magic check, until then).
//! - [`ImageShard::open`] validates magic, version, channel count, header checksum, file size,
//!   index checksum and the index's consistency (chunks contiguous, records contiguous), so a
//!   truncated or foreign file fails on open. [`ImageShard::verify`] additionally checks every
//!   chunk's checksum, decompressed size and record layout.
//! - The same records pushed with the same parameters give byte-identical files.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The first 8 bytes of every image shard.
pub const MAGIC: [u8; 8] = *b"TESSIMG\0";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Channels per pixel (RGB).
pub const CHANNELS: u32 = 3;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: u64 = 64;
/// Size of one chunk-index entry in bytes.
pub const INDEX_ENTRY_LEN: u64 = 40;
/// Conventional file extension.
pub const EXTENSION: &str = "tis";
/// Default number of records per chunk.
pub const DEFAULT_CHUNK_RECORDS: u32 = 64;
/// Default zstd compression level.
pub const DEFAULT_LEVEL: i32 = 3;
/// Largest accepted resolution (a sanity bound against corrupt headers).
pub const MAX_RESOLUTION: u32 = 16384;
/// Longest caption, and longest metadata string, of one record in bytes (1 MiB). The writer
/// refuses longer ones; a reader refuses a chunk whose declared decompressed length exceeds
/// what its records can hold with fields this long ([`max_chunk_raw_len`]).
pub const MAX_FIELD_LEN: u32 = 1 << 20;

const NO_META: u32 = u32::MAX;

/// Everything that can go wrong reading or writing an image shard. Every variant names the file,
/// and the chunk or record where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ImageShardError {
    /// A file-system operation failed.
    #[error(transparent)]
    Io(#[from] crate::fsutil::FsError),
    /// The file is shorter than its header or index says it must be.
    #[error("{path}: truncated image shard ({found} bytes, expected {expected})")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// The file does not start with the image-shard magic.
    #[error(
        "{path}: not an image shard (magic {found:02x?}, expected {MAGIC:02x?} \"TESSIMG\\0\")"
    )]
    BadMagic { path: PathBuf, found: [u8; 8] },
    /// The shard was written by another version of the format.
    #[error("{path}: image shard version {found}, this build reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    /// A header field is out of range.
    #[error("{path}: bad header field {field}: {value}")]
    BadField {
        path: PathBuf,
        field: &'static str,
        value: u64,
    },
    /// A stored checksum does not match the bytes.
    #[error("{path}: {what} checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        path: PathBuf,
        what: String,
        stored: u32,
        computed: u32,
    },
    /// The chunk index, or a decompressed chunk, is inconsistent.
    #[error("{path}: corrupt image shard: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// A chunk does not decompress.
    #[error("{path}: chunk {chunk} does not decompress: {source}")]
    Decompress {
        path: PathBuf,
        chunk: usize,
        #[source]
        source: std::io::Error,
    },
    /// The shard holds images of another resolution than the caller expects.
    #[error("{path}: image shard resolution is {found}×{found}, expected {expected}×{expected}")]
    Resolution {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    /// A record index past the end.
    #[error("{path}: record {index} out of range (shard has {len} records)")]
    OutOfRange { path: PathBuf, index: u64, len: u64 },
    /// A record pushed to the writer has the wrong number of pixel bytes.
    #[error(
        "{path}: record {record} has {found} pixel bytes, expected {expected} ({res}×{res}×3)"
    )]
    PixelLength {
        path: PathBuf,
        record: u64,
        res: u32,
        expected: usize,
        found: usize,
    },
    /// A caption or metadata string is longer than [`MAX_FIELD_LEN`].
    #[error("{path}: record {record}: {field} of {len} bytes is longer than the limit of {MAX_FIELD_LEN} bytes")]
    FieldTooLong {
        path: PathBuf,
        record: u64,
        field: &'static str,
        len: usize,
    },
    /// A writer parameter is out of range.
    #[error("{path}: invalid writer parameter {field} = {value}")]
    BadParam {
        path: PathBuf,
        field: &'static str,
        value: i64,
    },
}

type Result<T> = std::result::Result<T, ImageShardError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageShardError {
    let fs_err = crate::fsutil::fs_err(action, path);
    move |source| ImageShardError::Io(fs_err(source))
}

/// One record: `pixels` is `[H, W, 3]` RGB u8, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub pixels: Vec<u8>,
    pub caption: String,
    pub meta: Option<String>,
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShardHeader {
    pub version: u32,
    pub resolution: u32,
    pub channels: u32,
    pub chunk_records: u32,
    pub record_count: u64,
    pub chunk_count: u64,
    pub index_offset: u64,
    pub index_crc: u32,
    pub level: i32,
}

impl ImageShardHeader {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.resolution.to_le_bytes());
        b[16..20].copy_from_slice(&self.channels.to_le_bytes());
        b[20..24].copy_from_slice(&self.chunk_records.to_le_bytes());
        b[24..32].copy_from_slice(&self.record_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.index_crc.to_le_bytes());
        b[52..56].copy_from_slice(&self.level.to_le_bytes());
        // 56..60 reserved, zero.
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN as usize]) -> Result<Self> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(ImageShardError::BadMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(ImageShardError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let stored = u32_at(b, 60);
        let computed = crc32fast::hash(&b[0..60]);
        if stored != computed {
            return Err(ImageShardError::Checksum {
                path: path.to_path_buf(),
                what: "header".into(),
                stored,
                computed,
            });
        }
        let h = Self {
            version,
            resolution: u32_at(b, 12),
            channels: u32_at(b, 16),
            chunk_records: u32_at(b, 20),
            record_count: u64_at(b, 24),
            chunk_count: u64_at(b, 32),
            index_offset: u64_at(b, 40),
            index_crc: u32_at(b, 48),
            level: u32_at(b, 52) as i32,
        };
        let bad = |field, value: u64| ImageShardError::BadField {
            path: path.to_path_buf(),
            field,
            value,
        };
        if h.channels != CHANNELS {
            return Err(bad("channels", h.channels as u64));
        }
        if h.resolution == 0 || h.resolution > MAX_RESOLUTION {
            return Err(bad("resolution", h.resolution as u64));
        }
        if h.chunk_records == 0 {
            return Err(bad("chunk_records", 0));
        }
        if h.index_offset < HEADER_LEN {
            return Err(bad("index_offset", h.index_offset));
        }
        if h.chunk_count > h.record_count {
            return Err(bad("chunk_count", h.chunk_count));
        }
        Ok(h)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// One chunk-index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Byte offset of the compressed chunk in the file.
    pub offset: u64,
    /// Length of the compressed chunk.
    pub compressed_len: u64,
    /// Length of the chunk once decompressed.
    pub raw_len: u64,
    /// Index of the chunk's first record in the shard.
    pub first_record: u64,
    /// Records in the chunk.
    pub record_count: u32,
    /// crc32 of the compressed bytes.
    pub crc: u32,
}

impl ChunkEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.compressed_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.first_record.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        Self {
            offset: u64_at(b, 0),
            compressed_len: u64_at(b, 8),
            raw_len: u64_at(b, 16),
            first_record: u64_at(b, 24),
            record_count: u32_at(b, 32),
            crc: u32_at(b, 36),
        }
    }
}

/// Writes one image shard; see the module docs for the crash-safety guarantees.
pub struct ImageShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    resolution: u32,
    chunk_records: u32,
    level: i32,
    pending: Vec<u8>,
    pending_count: u32,
    index: Vec<ChunkEntry>,
    records: u64,
    offset: u64,
}

impl ImageShardWriter {
    /// Starts writing `<path>.tmp`; `chunk_records` ≥ 1 records per chunk, zstd `level` 1..=22.
    pub fn create(
        path: impl AsRef<Path>,
        resolution: u32,
        chunk_records: u32,
        level: i32,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bad = |field, value: i64| ImageShardError::BadParam {
            path: path.clone(),
            field,
            value,
        };
        if resolution == 0 || resolution > MAX_RESOLUTION {
            return Err(bad("resolution", resolution as i64));
        }
        if chunk_records == 0 {
            return Err(bad("chunk_records", 0));
        }
        if !(1..=22).contains(&level) {
            return Err(bad("level", level as i64));
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        // Placeholder header: zeros never pass the magic check.
        file.write_all(&[0u8; HEADER_LEN as usize])
            .map_err(io_err("write", &tmp))?;
        Ok(Self {
            path,
            tmp,
            file: Some(file),
            resolution,
            chunk_records,
            level,
            pending: Vec::new(),
            pending_count: 0,
            index: Vec::new(),
            records: 0,
            offset: HEADER_LEN,
        })
    }

    /// Bytes of pixels per record (`H·W·3`).
    pub fn pixel_len(&self) -> usize {
        self.resolution as usize * self.resolution as usize * CHANNELS as usize
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.records
    }

    /// Whether nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Appends one record: `pixels` `[H, W, 3]` RGB u8 row-major, a caption, optional metadata.
    pub fn push(&mut self, pixels: &[u8], caption: &str, meta: Option<&str>) -> Result<()> {
        if pixels.len() != self.pixel_len() {
            return Err(ImageShardError::PixelLength {
                path: self.path.clone(),
                record: self.records,
                res: self.resolution,
                expected: self.pixel_len(),
                found: pixels.len(),
            });
        }
        let too_long = |field, len| ImageShardError::FieldTooLong {
            path: self.path.clone(),
            record: self.records,
            field,
            len,
        };
        let cap_len = u32::try_from(caption.len())
            .ok()
            .filter(|&n| n <= MAX_FIELD_LEN)
            .ok_or_else(|| too_long("caption", caption.len()))?;
        let meta_len = match meta {
            Some(m) => u32::try_from(m.len())
                .ok()
                .filter(|&n| n <= MAX_FIELD_LEN)
                .ok_or_else(|| too_long("metadata", m.len()))?,
            None => NO_META,
        };
        self.pending.extend_from_slice(pixels);
        self.pending.extend_from_slice(&cap_len.to_le_bytes());
        self.pending.extend_from_slice(caption.as_bytes());
        self.pending.extend_from_slice(&meta_len.to_le_bytes());
        if let Some(m) = meta {
            self.pending.extend_from_slice(m.as_bytes());
        }
        self.pending_count += 1;
        self.records += 1;
        if self.pending_count == self.chunk_records {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if self.pending_count == 0 {
            return Ok(());
        }
        let compressed = zstd::bulk::compress(&self.pending, self.level)
            .map_err(io_err("compress a chunk of", &self.tmp))?;
        let entry = ChunkEntry {
            offset: self.offset,
            compressed_len: compressed.len() as u64,
            raw_len: self.pending.len() as u64,
            first_record: self.records - self.pending_count as u64,
            record_count: self.pending_count,
            crc: crc32fast::hash(&compressed),
        };
        let file = self.file.as_mut().ok_or_else(|| ImageShardError::Corrupt {
            path: self.tmp.clone(),
            message: "writer used after an error".into(),
        })?;
        file.write_all(&compressed)
            .map_err(io_err("write", &self.tmp))?;
        self.offset += compressed.len() as u64;
        self.index.push(entry);
        self.pending.clear();
        self.pending_count = 0;
        Ok(())
    }

    /// Writes the last chunk, the index and the header, fsyncs, renames `<path>.tmp` to `<path>`
    /// and fsyncs the directory. Returns the number of records written.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_chunk()?;
        let mut index = Vec::with_capacity(self.index.len() * INDEX_ENTRY_LEN as usize);
        for e in &self.index {
            e.encode(&mut index);
        }
        let header = ImageShardHeader {
            version: VERSION,
            resolution: self.resolution,
            channels: CHANNELS,
            chunk_records: self.chunk_records,
            record_count: self.records,
            chunk_count: self.index.len() as u64,
            index_offset: self.offset,
            index_crc: crc32fast::hash(&index),
            level: self.level,
        };
        let tmp = self.tmp.clone();
        let Some(mut file) = self.file.take() else {
            return Err(ImageShardError::Corrupt {
                path: tmp,
                message: "writer used after an error".into(),
            });
        };
        file.write_all(&index).map_err(io_err("write", &tmp))?;
        file.seek(SeekFrom::Start(0))
            .map_err(io_err("seek in", &tmp))?;
        file.write_all(&header.encode())
            .map_err(io_err("write", &tmp))?;
        let file = file
            .into_inner()
            .map_err(|e| io_err("flush", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(io_err("rename", &tmp))?;
        sync_parent(&self.path)?;
        Ok(self.records)
    }
}

impl Drop for ImageShardWriter {
    fn drop(&mut self) {
        // An unfinished writer leaves no file behind (best effort; a `.tmp` is never read).
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// fsyncs the directory holding `path` so that a rename into it is durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    crate::fsutil::sync_parent(path).map_err(ImageShardError::Io)
}

/// Byte ranges of one record inside a decompressed chunk: caption start and end, metadata range.
type RecordSpan = (usize, usize, Option<(usize, usize)>);

/// A decompressed, validated chunk and where each record's fields lie in it.
pub struct DecodedChunk {
    chunk: usize,
    raw: Vec<u8>,
    /// Per record: (caption start, caption end, metadata range or None); pixels precede the caption
    /// length at `caption start - 4 - pixel_len`.
    records: Vec<RecordSpan>,
    pixel_len: usize,
}

impl DecodedChunk {
    /// The chunk's index in its shard.
    pub fn index(&self) -> usize {
        self.chunk
    }

    /// Records in the chunk.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the chunk holds no records (never true for a chunk of a valid shard).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The `[H, W, 3]` pixels of the chunk's record `j` (< [`DecodedChunk::len`]), borrowed.
    pub fn pixels(&self, j: usize) -> &[u8] {
        let cs = self.records[j].0;
        &self.raw[cs - 4 - self.pixel_len..cs - 4]
    }

    /// The caption of the chunk's record `j` (validated as UTF-8 when the chunk was decoded).
    pub fn caption(&self, j: usize) -> &str {
        let (cs, ce, _) = self.records[j];
        std::str::from_utf8(&self.raw[cs..ce]).unwrap_or_default()
    }
}

/// The most bytes a decompressed chunk of `records` records at `resolution` can hold: every
/// record's pixels, its two length prefixes, and a caption and metadata of [`MAX_FIELD_LEN`]
/// bytes each.
pub fn max_chunk_raw_len(resolution: u32, records: u32) -> u64 {
    let pixels = resolution as u64 * resolution as u64 * CHANNELS as u64;
    (records as u64).saturating_mul(pixels + 8 + 2 * MAX_FIELD_LEN as u64)
}

/// A validated, open image shard. `record` is safe to call from several threads; it keeps the
/// most recently decompressed chunk cached.
pub struct ImageShard {
    path: PathBuf,
    file: Mutex<File>,
    header: ImageShardHeader,
    index: Vec<ChunkEntry>,
    file_len: u64,
    cache: Mutex<Option<Arc<DecodedChunk>>>,
}

impl std::fmt::Debug for ImageShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageShard")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl ImageShard {
    /// Opens and validates a shard (header, file size, chunk index); see the module docs.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path).map_err(io_err("open", &path))?;
        let file_len = file.metadata().map_err(io_err("stat", &path))?.len();
        if file_len < HEADER_LEN {
            return Err(ImageShardError::Truncated {
                path,
                expected: HEADER_LEN,
                found: file_len,
            });
        }
        let mut hb = [0u8; HEADER_LEN as usize];
        file.read_exact(&mut hb).map_err(io_err("read", &path))?;
        let header = ImageShardHeader::decode(&path, &hb)?;
        let index_len = header
            .chunk_count
            .checked_mul(INDEX_ENTRY_LEN)
            .and_then(|n| n.checked_add(header.index_offset))
            .ok_or_else(|| ImageShardError::BadField {
                path: path.clone(),
                field: "chunk_count",
                value: header.chunk_count,
            })?;
        if file_len != index_len {
            if file_len < index_len {
                return Err(ImageShardError::Truncated {
                    path,
                    expected: index_len,
                    found: file_len,
                });
            }
            return Err(ImageShardError::Corrupt {
                path,
                message: format!(
                    "file has {file_len} bytes but its header accounts for {index_len}"
                ),
            });
        }
        let mut ib = vec![0u8; (header.chunk_count * INDEX_ENTRY_LEN) as usize];
        file.seek(SeekFrom::Start(header.index_offset))
            .map_err(io_err("seek in", &path))?;
        file.read_exact(&mut ib).map_err(io_err("read", &path))?;
        let computed = crc32fast::hash(&ib);
        if computed != header.index_crc {
            return Err(ImageShardError::Checksum {
                path,
                what: "chunk index".into(),
                stored: header.index_crc,
                computed,
            });
        }
        let index: Vec<ChunkEntry> = ib
            .chunks_exact(INDEX_ENTRY_LEN as usize)
            .map(ChunkEntry::decode)
            .collect();
        // Chunks must tile [HEADER_LEN, index_offset) and records [0, record_count).
        let (mut offset, mut record) = (HEADER_LEN, 0u64);
        for (i, e) in index.iter().enumerate() {
            if e.offset != offset || e.first_record != record || e.record_count == 0 {
                return Err(ImageShardError::Corrupt {
                    path,
                    message: format!(
                        "chunk {i}: offset {} / first record {} / {} records do not follow the \
                         previous chunk (expected offset {offset}, first record {record})",
                        e.offset, e.first_record, e.record_count
                    ),
                });
            }
            if e.record_count > header.chunk_records {
                return Err(ImageShardError::Corrupt {
                    path,
                    message: format!(
                        "chunk {i} holds {} records, more than the header's chunk_records {}",
                        e.record_count, header.chunk_records
                    ),
                });
            }
            offset = offset.saturating_add(e.compressed_len);
            record += e.record_count as u64;
        }
        if offset != header.index_offset || record != header.record_count {
            return Err(ImageShardError::Corrupt {
                path,
                message: format!(
                    "chunks end at byte {offset} with {record} records; header says index at \
                     {} and {} records",
                    header.index_offset, header.record_count
                ),
            });
        }
        Ok(Self {
            path,
            file: Mutex::new(file),
            header,
            index,
            file_len,
            cache: Mutex::new(None),
        })
    }

    /// Opens a shard and checks that its resolution is `resolution`.
    pub fn open_expecting(path: impl AsRef<Path>, resolution: u32) -> Result<Self> {
        let shard = Self::open(path)?;
        shard.expect_resolution(resolution)?;
        Ok(shard)
    }

    /// Errors, naming both numbers, if the shard's resolution is not `resolution`.
    pub fn expect_resolution(&self, resolution: u32) -> Result<()> {
        if self.header.resolution != resolution {
            return Err(ImageShardError::Resolution {
                path: self.path.clone(),
                expected: resolution,
                found: self.header.resolution,
            });
        }
        Ok(())
    }

    /// The file this shard was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded header.
    pub fn header(&self) -> &ImageShardHeader {
        &self.header
    }

    /// The chunk index.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.index
    }

    /// Image side length (H = W).
    pub fn resolution(&self) -> u32 {
        self.header.resolution
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.header.record_count
    }

    /// Whether the shard holds no records.
    pub fn is_empty(&self) -> bool {
        self.header.record_count == 0
    }

    fn pixel_len(&self) -> usize {
        self.header.resolution as usize * self.header.resolution as usize * CHANNELS as usize
    }

    /// Record `i`, decompressing only its chunk (cached until another chunk is needed).
    pub fn record(&self, i: u64) -> Result<ImageRecord> {
        if i >= self.len() {
            return Err(ImageShardError::OutOfRange {
                path: self.path.clone(),
                index: i,
                len: self.len(),
            });
        }
        let chunk = self.index.partition_point(|e| e.first_record <= i) - 1;
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().filter(|d| d.chunk == chunk).cloned());
        let decoded = match cached {
            Some(d) => d,
            None => {
                let d = Arc::new(self.decode_chunk(chunk)?);
                if let Ok(mut c) = self.cache.lock() {
                    *c = Some(d.clone());
                }
                d
            }
        };
        let (cs, ce, meta) = decoded.records[(i - self.index[chunk].first_record) as usize];
        let ps = cs - 4 - self.pixel_len();
        let text = |s: usize, e: usize| String::from_utf8_lossy(&decoded.raw[s..e]).into_owned();
        Ok(ImageRecord {
            pixels: decoded.raw[ps..cs - 4].to_vec(),
            caption: text(cs, ce),
            meta: meta.map(|(s, e)| text(s, e)),
        })
    }

    fn read_chunk(&self, chunk: usize) -> Result<Vec<u8>> {
        let e = self.index[chunk];
        let mut buf = vec![0u8; e.compressed_len as usize];
        let mut f = self.file.lock().map_err(|_| ImageShardError::Corrupt {
            path: self.path.clone(),
            message: "file lock poisoned by a panicking reader".into(),
        })?;
        f.seek(SeekFrom::Start(e.offset))
            .map_err(io_err("seek in", &self.path))?;
        f.read_exact(&mut buf).map_err(io_err("read", &self.path))?;
        Ok(buf)
    }

    /// Reads, checks (crc, size, record layout, UTF-8) and decompresses chunk `chunk`
    /// (< `chunks().len()`), bypassing the one-chunk cache of [`ImageShard::record`].
    pub fn decode_chunk(&self, chunk: usize) -> Result<DecodedChunk> {
        let Some(&e) = self.index.get(chunk) else {
            return Err(ImageShardError::OutOfRange {
                path: self.path.clone(),
                index: chunk as u64,
                len: self.index.len() as u64,
            });
        };
        let compressed = self.read_chunk(chunk)?;
        let computed = crc32fast::hash(&compressed);
        if computed != e.crc {
            return Err(ImageShardError::Checksum {
                path: self.path.clone(),
                what: format!("chunk {chunk}"),
                stored: e.crc,
                computed,
            });
        }
        let corrupt = |message: String| ImageShardError::Corrupt {
            path: self.path.clone(),
            message: format!("chunk {chunk}: {message}"),
        };
        // The declared length is data: it is checked against what the records can hold and
        // against the zstd frame's own header before anything that size is allocated, and the
        // allocation itself is fallible.
        let min_len = e.record_count as u64 * (self.pixel_len() as u64 + 8);
        if e.raw_len < min_len {
            return Err(corrupt(format!(
                "raw length {} is below the {min_len} bytes its {} records need",
                e.raw_len, e.record_count
            )));
        }
        let max_len = max_chunk_raw_len(self.header.resolution, e.record_count);
        if e.raw_len > max_len {
            return Err(corrupt(format!(
                "raw length {} exceeds the {max_len} bytes its {} records can hold (pixels, and \
                 captions and metadata of at most {MAX_FIELD_LEN} bytes each)",
                e.raw_len, e.record_count
            )));
        }
        match zstd::zstd_safe::get_frame_content_size(&compressed) {
            Ok(Some(n)) if n != e.raw_len => {
                return Err(corrupt(format!(
                    "raw length {} in the index, but its zstd frame holds {n} bytes",
                    e.raw_len
                )))
            }
            Ok(_) => {}
            Err(_) => {
                return Err(corrupt(
                    "the compressed bytes do not start with a zstd frame header".into(),
                ))
            }
        }
        let mut raw = Vec::new();
        raw.try_reserve_exact(e.raw_len as usize).map_err(|_| {
            corrupt(format!(
                "cannot allocate its raw length of {} bytes",
                e.raw_len
            ))
        })?;
        // Decompresses into `raw`'s reserved capacity: at most raw_len bytes.
        zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(&compressed, &mut raw))
            .map_err(|source| ImageShardError::Decompress {
                path: self.path.clone(),
                chunk,
                source,
            })?;
        if raw.len() as u64 != e.raw_len {
            return Err(corrupt(format!(
                "decompresses to {} bytes, index says {}",
                raw.len(),
                e.raw_len
            )));
        }
        let mut records = Vec::with_capacity(e.record_count as usize);
        let mut at = 0usize;
        let take_len = |at: &mut usize, what: &str, r: usize| -> Result<u32> {
            if *at + 4 > raw.len() {
                return Err(corrupt(format!(
                    "record {r}: {what} length runs past the end"
                )));
            }
            let n = u32_at(&raw, *at);
            *at += 4;
            Ok(n)
        };
        for r in 0..e.record_count as usize {
            at += self.pixel_len();
            let cap = take_len(&mut at, "caption", r)? as usize;
            let (cs, ce) = (at, at.saturating_add(cap));
            if ce > raw.len() || std::str::from_utf8(&raw[cs..ce]).is_err() {
                return Err(corrupt(format!(
                    "record {r}: caption is not valid UTF-8 in bounds"
                )));
            }
            at = ce;
            let meta_len = take_len(&mut at, "metadata", r)?;
            let meta = if meta_len == NO_META {
                None
            } else {
                let (ms, me) = (at, at.saturating_add(meta_len as usize));
                if me > raw.len() || std::str::from_utf8(&raw[ms..me]).is_err() {
                    return Err(corrupt(format!(
                        "record {r}: metadata is not valid UTF-8 in bounds"
                    )));
                }
                at = me;
                Some((ms, me))
            };
            records.push((cs, ce, meta));
        }
        if at != raw.len() {
            return Err(corrupt(format!(
                "{} trailing bytes after its {} records",
                raw.len() - at,
                e.record_count
            )));
        }
        Ok(DecodedChunk {
            chunk,
            raw,
            records,
            pixel_len: self.pixel_len(),
        })
    }

    /// Checks every chunk: checksum, decompressed size, record layout, UTF-8 captions.
    pub fn verify(&self) -> Result<()> {
        for chunk in 0..self.index.len() {
            self.decode_chunk(chunk)?;
        }
        Ok(())
    }

    /// A few lines for `data-prep inspect`: header fields and sizes.
    pub fn summary(&self) -> String {
        let h = &self.header;
        let raw: u64 = self.index.iter().map(|e| e.raw_len).sum();
        let packed: u64 = self.index.iter().map(|e| e.compressed_len).sum();
        format!(
            "image shard {}\n  version {}  resolution {}x{}x{}  records {}  chunks {} \
             ({} records/chunk, zstd level {})\n  file {} bytes, chunks {} bytes compressed from \
             {} ({:.2}x)",
            self.path.display(),
            h.version,
            h.resolution,
            h.resolution,
            h.channels,
            h.record_count,
            h.chunk_count,
            h.chunk_records,
            h.level,
            self.file_len,
            packed,
            raw,
            if packed > 0 {
                raw as f64 / packed as f64
            } else {
                0.0
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(res: u32, seed: u32) -> Vec<u8> {
        let n = (res * res * 3) as usize;
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    fn write(dir: &Path, n: u32, res: u32, chunk: u32) -> PathBuf {
        let path = dir.join("a.tis");
        let mut w = ImageShardWriter::create(&path, res, chunk, DEFAULT_LEVEL).unwrap();
        for i in 0..n {
            let meta = (i % 2 == 0).then(|| format!("{{\"key\":\"{i:09}\"}}"));
            w.push(&pixels(res, i), &format!("caption {i} é"), meta.as_deref())
                .unwrap();
        }
        assert_eq!(w.finish().unwrap(), n as u64);
        path
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 10, 8, 3);
        assert!(!dir.path().join("a.tis.tmp").exists());
        let s = ImageShard::open(&path).unwrap();
        assert_eq!((s.len(), s.chunks().len(), s.resolution()), (10, 4, 8));
        s.verify().unwrap();
        for i in [9u64, 0, 4, 5, 3] {
            let r = s.record(i).unwrap();
            assert_eq!(r.pixels, pixels(8, i as u32));
            assert_eq!(r.caption, format!("caption {i} é"));
            assert_eq!(r.meta.is_some(), i % 2 == 0);
        }
        assert!(matches!(
            s.record(10),
            Err(ImageShardError::OutOfRange { index: 10, .. })
        ));
        assert!(s.summary().contains("records 10"));
    }

    #[test]
    fn same_records_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pa, pb) = (write(a.path(), 7, 4, 2), write(b.path(), 7, 4, 2));
        assert_eq!(fs::read(pa).unwrap(), fs::read(pb).unwrap());
    }

    #[test]
    fn writer_rejects_wrong_pixel_count_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tis");
        let mut w = ImageShardWriter::create(&path, 4, 2, 3).unwrap();
        let e = w.push(&[0u8; 10], "x", None).unwrap_err();
        assert!(e.to_string().contains("48"), "{e}");
        drop(w);
        assert!(!path.exists());
        assert!(!dir.path().join("b.tis.tmp").exists());
    }

    #[test]
    fn empty_shard_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 0, 4, 2);
        let s = ImageShard::open(&path).unwrap();
        assert!(s.is_empty());
        s.verify().unwrap();
    }
}
