//! Token shards (`.tts`): the stage-2 transformer's training data on disk, read through `memmap2`
//! so that any record is one slice away. docs/formats.md ("Token shards") describes the bytes;
//! in short, little-endian throughout:
//!
//! ```text
//! header   80 bytes   magic, version, layout (Tt, G², token width, Vt, Vi, record size),
//!                     record count, caption section offset and length, CRC-32s
//! records  count × record_size   [text Tt][image G²] tokens of `width` bytes, caption offset u64,
//!                                caption length u32, 4 reserved zero bytes
//! captions captions_len bytes    UTF-8 caption text, records point into it
//! ```
//!
//! Checksums are CRC-32 (IEEE, `crc32fast`): hardware-accelerated, and a reader in any language
//! can check them with its standard library (Python's `zlib.crc32`); the shards are small enough
//! that a 32-bit check is about detecting corruption, not collisions. One covers the header
//! (including the other two), one the record section, one the caption section. [`TokenShard::open`]
//! checks the header and the sizes against the file length; [`TokenShard::verify`] reads every
//! byte and checks the other two checksums, every caption and every token id.
//!
//! [`TokenShardWriter`] writes to `<path>.tmp`, fsyncs, then renames: a shard under its final
//! name is always complete.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// The first 8 bytes of every token shard.
pub const MAGIC: [u8; 8] = *b"TESSTOK\0";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of the fixed header in bytes; the first record starts here.
pub const HEADER_LEN: usize = 80;
/// Bytes after a record's tokens: caption offset (u64), caption length (u32), reserved (u32).
pub const RECORD_TRAILER_LEN: usize = 16;
/// The file-name extension of token shards.
pub const EXTENSION: &str = "tts";
/// [`TokenShard::verify_checksums_until`] asks whether to stop after each piece of this many
/// bytes (64 MiB: a few milliseconds of CRC-32).
pub const CHECKSUM_PIECE: usize = 64 << 20;

/// Everything that can go wrong reading or writing a token shard. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {} is truncated: {what}", path.display())]
    Truncated { path: PathBuf, what: String },
    #[error("{} is not a token shard: magic {found:?}, expected {:?}", path.display(), MAGIC)]
    BadMagic { path: PathBuf, found: [u8; 8] },
    #[error("shard {} has format version {found}; this build reads version {VERSION}", path.display())]
    BadVersion { path: PathBuf, found: u32 },
    #[error("shard {}: {section} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    Checksum {
        path: PathBuf,
        section: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("shard {}: bad header: {message}", path.display())]
    BadHeader { path: PathBuf, message: String },
    #[error("shard {} has {field} {shard}, the config {config_field} {config}", path.display())]
    LayoutMismatch {
        path: PathBuf,
        field: &'static str,
        shard: u64,
        config_field: &'static str,
        config: u64,
    },
    #[error("shard {}, record {record}: {message}", path.display())]
    BadRecord {
        path: PathBuf,
        record: u64,
        message: String,
    },
    #[error("shard {} has no records", path.display())]
    Empty { path: PathBuf },
    #[error("invalid shard layout: {0}")]
    BadLayout(String),
}

/// What every record of a shard holds, and the vocabularies its ids come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    /// Caption length Tt in tokens, padding included.
    pub text_len: u32,
    /// Image tokens per record, G².
    pub image_tokens: u32,
    /// Text vocabulary Vt; text ids are < Vt + Tt (Vt + p is the padding of position p).
    pub text_vocab: u32,
    /// Image vocabulary Vi; image ids are < Vi.
    pub image_vocab: u32,
}

impl ShardLayout {
    /// The layout of a transformer with these sizes (the config's `model.text_len`, `grid²`,
    /// `model.text_vocab`, `model.image_vocab`, which errors name); the trainer's
    /// `TransformerDims::shard_layout` calls it.
    pub fn from_sizes(
        text_len: usize,
        image_tokens: usize,
        text_vocab: usize,
        image_vocab: usize,
    ) -> Result<Self, ShardError> {
        let to_u32 = |field: &str, v: usize| {
            u32::try_from(v)
                .map_err(|_| ShardError::BadLayout(format!("{field} = {v} exceeds u32")))
        };
        Ok(ShardLayout {
            text_len: to_u32("model.text_len", text_len)?,
            image_tokens: to_u32("model.grid²", image_tokens)?,
            text_vocab: to_u32("model.text_vocab", text_vocab)?,
            image_vocab: to_u32("model.image_vocab", image_vocab)?,
        })
    }

    /// Bytes per token id: 2 when every id fits in a u16 (Vt + Tt ≤ 65535 and Vi ≤ 65535), else 4.
    pub fn token_width(&self) -> usize {
        let text_ids = self.text_vocab as u64 + self.text_len as u64;
        if text_ids <= 65535 && self.image_vocab <= 65535 {
            2
        } else {
            4
        }
    }

    /// Bytes per record: the tokens, then the caption offset and length.
    pub fn record_size(&self) -> usize {
        (self.text_len as usize + self.image_tokens as usize) * self.token_width()
            + RECORD_TRAILER_LEN
    }

    fn check(&self) -> Result<(), ShardError> {
        if self.text_len == 0
            || self.image_tokens == 0
            || self.text_vocab == 0
            || self.image_vocab == 0
        {
            return Err(ShardError::BadLayout(format!(
                "every size must be ≥ 1, got {self:?}"
            )));
        }
        Ok(())
    }

    /// The first field that differs from `expected`, as (name, this, expected, config name).
    fn first_difference(
        &self,
        expected: &ShardLayout,
    ) -> Option<(&'static str, u64, u64, &'static str)> {
        [
            (
                "text_len",
                self.text_len,
                expected.text_len,
                "model.text_len",
            ),
            (
                "image_tokens",
                self.image_tokens,
                expected.image_tokens,
                "model.grid² =",
            ),
            (
                "text_vocab",
                self.text_vocab,
                expected.text_vocab,
                "model.text_vocab",
            ),
            (
                "image_vocab",
                self.image_vocab,
                expected.image_vocab,
                "model.image_vocab",
            ),
        ]
        .into_iter()
        .find(|(_, a, b, _)| a != b)
        .map(|(f, a, b, c)| (f, a as u64, b as u64, c))
    }
}

/// The decoded fixed header of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub version: u32,
    pub layout: ShardLayout,
    pub token_width: u32,
    pub record_size: u32,
    pub record_count: u64,
    /// Offset of the caption section from the start of the file.
    pub captions_offset: u64,
    pub captions_len: u64,
    pub records_crc: u32,
    pub captions_crc: u32,
    pub header_crc: u32,
}

impl ShardHeader {
    /// The 80 header bytes (the header CRC is computed here over bytes 0..76).
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        let l = &self.layout;
        for (i, v) in [
            self.version,
            self.token_width,
            l.text_len,
            l.image_tokens,
            l.text_vocab,
            l.image_vocab,
            self.record_size,
            0,
        ]
        .into_iter()
        .enumerate()
        {
            h[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        h[40..48].copy_from_slice(&self.record_count.to_le_bytes());
        h[48..56].copy_from_slice(&self.captions_offset.to_le_bytes());
        h[56..64].copy_from_slice(&self.captions_len.to_le_bytes());
        h[64..68].copy_from_slice(&self.records_crc.to_le_bytes());
        h[68..72].copy_from_slice(&self.captions_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..76]);
        h[76..80].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, header CRC, sizes consistent with each other
    /// and with `file_len`.
    fn decode(path: &Path, h: &[u8], file_len: u64) -> Result<ShardHeader, ShardError> {
        let p = || path.to_path_buf();
        if h.len() < 8 {
            return Err(ShardError::Truncated {
                path: p(),
                what: format!(
                    "{} bytes, shorter than the {HEADER_LEN}-byte header",
                    h.len()
                ),
            });
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[..8]);
        if magic != MAGIC {
            return Err(ShardError::BadMagic {
                path: p(),
                found: magic,
            });
        }
        if h.len() < HEADER_LEN {
            return Err(ShardError::Truncated {
                path: p(),
                what: format!(
                    "{} bytes, shorter than the {HEADER_LEN}-byte header",
                    h.len()
                ),
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(ShardError::BadVersion {
                path: p(),
                found: version,
            });
        }
        let header_crc = u32_at(76);
        let computed = crc32fast::hash(&h[..76]);
        if header_crc != computed {
            return Err(ShardError::Checksum {
                path: p(),
                section: "header",
                stored: header_crc,
                computed,
            });
        }
        let header = ShardHeader {
            version,
            token_width: u32_at(12),
            layout: ShardLayout {
                text_len: u32_at(16),
                image_tokens: u32_at(20),
                text_vocab: u32_at(24),
                image_vocab: u32_at(28),
            },
            record_size: u32_at(32),
            record_count: u64_at(40),
            captions_offset: u64_at(48),
            captions_len: u64_at(56),
            records_crc: u32_at(64),
            captions_crc: u32_at(68),
            header_crc,
        };
        let bad = |message: String| ShardError::BadHeader { path: p(), message };
        header.layout.check().map_err(|e| bad(e.to_string()))?;
        let l = header.layout;
        if header.token_width as usize != l.token_width() {
            return Err(bad(format!(
                "token width {} does not match the layout (expected {})",
                header.token_width,
                l.token_width()
            )));
        }
        if header.record_size as usize != l.record_size() {
            return Err(bad(format!(
                "record size {} does not match the layout (expected {})",
                header.record_size,
                l.record_size()
            )));
        }
        let records_end = header
            .record_count
            .checked_mul(header.record_size as u64)
            .and_then(|n| n.checked_add(HEADER_LEN as u64))
            .ok_or_else(|| bad(format!("record count {} overflows", header.record_count)))?;
        if header.captions_offset != records_end {
            return Err(bad(format!(
                "caption section at {}, expected {records_end} (right after the records)",
                header.captions_offset
            )));
        }
        let expected_len = records_end
            .checked_add(header.captions_len)
            .ok_or_else(|| bad(format!("caption length {} overflows", header.captions_len)))?;
        if file_len < expected_len {
            return Err(ShardError::Truncated {
                path: p(),
                what: format!(
                    "{file_len} bytes, the header describes {expected_len} ({} records of {} bytes and {} caption bytes)",
                    header.record_count, header.record_size, header.captions_len
                ),
            });
        }
        if file_len > expected_len {
            return Err(bad(format!(
                "file has {file_len} bytes, the header describes {expected_len}: trailing bytes"
            )));
        }
        if header.record_count == 0 {
            return Err(ShardError::Empty { path: p() });
        }
        Ok(header)
    }
}

/// A record's token ids as stored (u16 or u32 little-endian), decoded on access.
#[derive(Clone, Copy, Debug)]
pub struct TokenSlice<'a> {
    bytes: &'a [u8],
    width: usize,
}

impl<'a> TokenSlice<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / self.width
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The id at `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        let b = self.bytes.get(i * self.width..(i + 1) * self.width)?;
        Some(match self.width {
            2 => u16::from_le_bytes([b[0], b[1]]) as u32,
            _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        })
    }

    /// Widens every id into `out`, which must have [`TokenSlice::len`] entries.
    pub fn copy_into(&self, out: &mut [u32]) {
        debug_assert_eq!(out.len(), self.len());
        // Records keep their ids aligned to the id width (the header is 80 bytes and record
        // sizes are multiples of 4), so the map's bytes are normally read as u16/u32 directly,
        // which the compiler widens with vector instructions.
        // SAFETY: any bit pattern is a valid u16/u32; `align_to` only yields aligned elements.
        if self.width == 2 {
            if let ([], ids, []) = unsafe { self.bytes.align_to::<u16>() } {
                for (o, &x) in out.iter_mut().zip(ids) {
                    *o = u16::from_le(x) as u32;
                }
                return;
            }
        } else if let ([], ids, []) = unsafe { self.bytes.align_to::<u32>() } {
            for (o, &x) in out.iter_mut().zip(ids) {
                *o = u32::from_le(x);
            }
            return;
        }
        if self.width == 2 {
            for (o, b) in out.iter_mut().zip(self.bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([b[0], b[1]]) as u32;
            }
        } else {
            for (o, b) in out.iter_mut().zip(self.bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = vec![0; self.len()];
        self.copy_into(&mut v);
        v
    }

    /// The raw little-endian bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// One record of a shard, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    /// Tt text ids, padded with Vt + p.
    pub text: TokenSlice<'a>,
    /// G² image ids, raster order.
    pub image: TokenSlice<'a>,
    pub caption: &'a str,
}

/// A memory-mapped, header-checked token shard.
#[derive(Debug)]
pub struct TokenShard {
    path: PathBuf,
    map: Mmap,
    header: ShardHeader,
}

impl TokenShard {
    /// Maps `path` and checks magic, version, header checksum, and sizes against the file length.
    pub fn open(path: &Path) -> Result<TokenShard, ShardError> {
        let io = |source| ShardError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // SAFETY: the map is read-only; a shard is never modified in place once under its final
        // name (writers go through `<path>.tmp` and rename), so the bytes do not change under us.
        // Another process truncating the file would be outside the format's contract.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = ShardHeader::decode(path, &map[..map.len().min(HEADER_LEN)], len)?;
        Ok(TokenShard {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    pub fn layout(&self) -> ShardLayout {
        self.header.layout
    }

    pub fn len(&self) -> u64 {
        self.header.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.header.record_count == 0
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Errors, naming the first field that differs, unless the shard's layout is `expected`.
    pub fn check_layout(&self, expected: &ShardLayout) -> Result<(), ShardError> {
        match self.header.layout.first_difference(expected) {
            None => Ok(()),
            Some((field, shard, config, config_field)) => Err(ShardError::LayoutMismatch {
                path: self.path.clone(),
                field,
                shard,
                config_field,
                config,
            }),
        }
    }

    /// The raw bytes of record `i` (tokens and trailer).
    pub fn record_bytes(&self, i: u64) -> Result<&[u8], ShardError> {
        if i >= self.header.record_count {
            return Err(self.bad_record(i, format!("out of range (the shard has {})", self.len())));
        }
        let rs = self.header.record_size as usize;
        let start = HEADER_LEN + i as usize * rs;
        Ok(&self.map[start..start + rs])
    }

    /// Record `i`: its tokens, and its caption checked to be UTF-8 and inside the caption section.
    pub fn record(&self, i: u64) -> Result<RecordView<'_>, ShardError> {
        let bytes = self.record_bytes(i)?;
        let l = &self.header.layout;
        let w = self.header.token_width as usize;
        let text_end = l.text_len as usize * w;
        let image_end = text_end + l.image_tokens as usize * w;
        let t = &bytes[image_end..];
        let offset = u64::from_le_bytes([t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]]);
        let len = u32::from_le_bytes([t[8], t[9], t[10], t[11]]) as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.header.captions_len)
        {
            return Err(self.bad_record(
                i,
                format!(
                    "caption bytes {offset}..{} lie outside the caption section ({} bytes)",
                    offset.saturating_add(len),
                    self.header.captions_len
                ),
            ));
        }
        let start = (self.header.captions_offset + offset) as usize;
        let caption = std::str::from_utf8(&self.map[start..start + len as usize])
            .map_err(|e| self.bad_record(i, format!("caption is not UTF-8: {e}")))?;
        Ok(RecordView {
            text: TokenSlice {
                bytes: &bytes[..text_end],
                width: w,
            },
            image: TokenSlice {
                bytes: &bytes[text_end..image_end],
                width: w,
            },
            caption,
        })
    }

    /// Widens record `i`'s ids into `text` [Tt] and `image` [G²] in one pass over the map,
    /// checking every id on the way (the rules of [`check_tokens`]: image ids < Vi, text ids < Vt
    /// or the padding id Vt + p of their own position p). The caption is not read. An id out of
    /// range is an error that names the shard, the record and the id's position.
    ///
    /// This is the loader's hot path: each id is loaded, widened, compared and stored by one
    /// loop the compiler turns into vector instructions.
    pub fn read_tokens(
        &self,
        i: u64,
        text: &mut [u32],
        image: &mut [u32],
    ) -> Result<(), ShardError> {
        let l = &self.header.layout;
        assert!(
            text.len() == l.text_len as usize && image.len() == l.image_tokens as usize,
            "read_tokens: rows of {} and {} ids for a layout of {} and {}",
            text.len(),
            image.len(),
            l.text_len,
            l.image_tokens
        );
        let bytes = self.record_bytes(i)?;
        let w = self.header.token_width as usize;
        let text_end = l.text_len as usize * w;
        let (text_bytes, image_bytes) = (&bytes[..text_end], &bytes[text_end..]);
        let image_bytes = &image_bytes[..l.image_tokens as usize * w];
        // Records keep their ids aligned to the id width (80 and the record size are multiples
        // of the width), so the map's bytes are read as u16/u32 directly.
        // SAFETY: any bit pattern is a valid u16/u32; `align_to` only yields aligned elements.
        let valid = match w {
            2 => match unsafe { (text_bytes.align_to::<u16>(), image_bytes.align_to::<u16>()) } {
                (([], t, []), ([], im, [])) => widen_record(l, t, im, text, image),
                _ => widen_unaligned(l, w, text_bytes, image_bytes, text, image),
            },
            _ => match unsafe { (text_bytes.align_to::<u32>(), image_bytes.align_to::<u32>()) } {
                (([], t, []), ([], im, [])) => widen_record(l, t, im, text, image),
                _ => widen_unaligned(l, w, text_bytes, image_bytes, text, image),
            },
        };
        if valid {
            return Ok(());
        }
        // The slow check finds the first bad id and says what is wrong with it.
        let message = check_tokens(l, text, image)
            .err()
            .unwrap_or_else(|| "token id out of range".to_string());
        Err(self.bad_record(i, message))
    }

    /// Asks the CPU to start loading the token ids of record `i` into its caches (x86-64; a
    /// no-op elsewhere and for an index out of range). [`TokenShard::read_tokens`] of a record
    /// hinted a little earlier then reads from cache instead of waiting on memory.
    pub fn prefetch_tokens(&self, i: u64) {
        let Ok(bytes) = self.record_bytes(i) else {
            return;
        };
        let ids = bytes.len() - RECORD_TRAILER_LEN;
        #[cfg(target_arch = "x86_64")]
        for line in (0..ids).step_by(64) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: a prefetch never faults and changes no memory; the address is in the map.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(line).cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ids;
    }

    /// Checks the record and caption checksums (reads both sections once).
    pub fn verify_checksums(&self) -> Result<(), ShardError> {
        self.verify_checksums_until(&|| false).unwrap_or(Ok(()))
    }

    /// [`TokenShard::verify_checksums`], giving up (`None`) as soon as `stop()` is true; it is
    /// asked between pieces of [`CHECKSUM_PIECE`] bytes.
    pub fn verify_checksums_until(
        &self,
        stop: &dyn Fn() -> bool,
    ) -> Option<Result<(), ShardError>> {
        let h = &self.header;
        let records = &self.map[HEADER_LEN..h.captions_offset as usize];
        let captions = &self.map[h.captions_offset as usize..];
        for (section, bytes, stored) in [
            ("records", records, h.records_crc),
            ("captions", captions, h.captions_crc),
        ] {
            let mut crc = crc32fast::Hasher::new();
            for piece in bytes.chunks(CHECKSUM_PIECE) {
                if stop() {
                    return None;
                }
                crc.update(piece);
            }
            let computed = crc.finalize();
            if computed != stored {
                return Some(Err(ShardError::Checksum {
                    path: self.path.clone(),
                    section,
                    stored,
                    computed,
                }));
            }
        }
        Some(Ok(()))
    }

    /// Reads the whole file: checks the record and caption checksums, then every record (caption
    /// in range and UTF-8, token ids in range, padding ids at their own position, and the
    /// caption's ids first, then only padding: [`check_padding`]).
    pub fn verify(&self) -> Result<(), ShardError> {
        self.verify_checksums()?;
        let h = &self.header;
        let mut text = vec![0u32; h.layout.text_len as usize];
        let mut image = vec![0u32; h.layout.image_tokens as usize];
        for i in 0..h.record_count {
            self.record(i)?;
            self.read_tokens(i, &mut text, &mut image)?;
            check_padding(&h.layout, &text).map_err(|m| self.bad_record(i, m))?;
        }
        Ok(())
    }

    fn bad_record(&self, record: u64, message: String) -> ShardError {
        ShardError::BadRecord {
            path: self.path.clone(),
            record,
            message,
        }
    }
}

/// A stored id: u16 or u32, little-endian in the file.
trait StoredId: Copy {
    fn widen(self) -> u32;
}

impl StoredId for u16 {
    #[inline(always)]
    fn widen(self) -> u32 {
        u16::from_le(self) as u32
    }
}

impl StoredId for u32 {
    #[inline(always)]
    fn widen(self) -> u32 {
        u32::from_le(self)
    }
}

/// Widens and checks one record's text and image ids; false when one is out of range.
#[inline(always)]
fn widen_record<T: StoredId>(
    l: &ShardLayout,
    text_ids: &[T],
    image_ids: &[T],
    text: &mut [u32],
    image: &mut [u32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { widen_record_avx2(l, text_ids, image_ids, text, image) };
    }
    widen_text(text_ids, l.text_vocab, text) & widen_image(image_ids, l.image_vocab, image)
}

/// [`widen_record`] compiled for AVX2: 8 or 16 ids an instruction instead of SSE2's 4, which
/// the build's baseline x86-64 target cannot assume.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_record_avx2<T: StoredId>(
    l: &ShardLayout,
    text_ids: &[T],
    image_ids: &[T],
    text: &mut [u32],
    image: &mut [u32],
) -> bool {
    widen_text(text_ids, l.text_vocab, text) & widen_image(image_ids, l.image_vocab, image)
}

/// Widens text ids into `out`; false when one is ≥ Vt and not the padding id Vt + p of its
/// position p. No early exit, so that the loop vectorises.
#[inline(always)]
fn widen_text<T: StoredId>(ids: &[T], vt: u32, out: &mut [u32]) -> bool {
    let mut bad = 0u32;
    for (p, (o, &x)) in out.iter_mut().zip(ids).enumerate() {
        let t = x.widen();
        bad |= ((t >= vt) & (t != vt.wrapping_add(p as u32))) as u32;
        *o = t;
    }
    bad == 0
}

/// Widens image ids into `out`; false when one is ≥ Vi.
#[inline(always)]
fn widen_image<T: StoredId>(ids: &[T], vi: u32, out: &mut [u32]) -> bool {
    let mut bad = 0u32;
    for (o, &x) in out.iter_mut().zip(ids) {
        let t = x.widen();
        bad |= (t >= vi) as u32;
        *o = t;
    }
    bad == 0
}

/// [`TokenShard::read_tokens`] for ids that are not aligned in memory (not seen with a memory
/// map, whose start is page-aligned): decode byte by byte, then check.
fn widen_unaligned(
    layout: &ShardLayout,
    width: usize,
    text_bytes: &[u8],
    image_bytes: &[u8],
    text: &mut [u32],
    image: &mut [u32],
) -> bool {
    for (bytes, out) in [(text_bytes, &mut *text), (image_bytes, &mut *image)] {
        TokenSlice { bytes, width }.copy_into(out);
    }
    check_tokens(layout, text, image).is_ok()
}

/// Checks lengths and id ranges of one record; the message names the position.
pub fn check_tokens(layout: &ShardLayout, text: &[u32], image: &[u32]) -> Result<(), String> {
    if text.len() != layout.text_len as usize {
        return Err(format!(
            "{} text tokens, the layout has text_len {}",
            text.len(),
            layout.text_len
        ));
    }
    if image.len() != layout.image_tokens as usize {
        return Err(format!(
            "{} image tokens, the layout has image_tokens {}",
            image.len(),
            layout.image_tokens
        ));
    }
    let vt = layout.text_vocab;
    for (p, &t) in text.iter().enumerate() {
        if t >= vt && t != vt + p as u32 {
            return Err(format!(
                "text token {p} is {t}: ids ≥ Vt = {vt} must be the padding id of their position, Vt + {p} = {}",
                vt + p as u32
            ));
        }
    }
    if let Some((p, &t)) = image
        .iter()
        .enumerate()
        .find(|(_, &t)| t >= layout.image_vocab)
    {
        return Err(format!(
            "image token {p} is {t}, outside [0, Vi = {})",
            layout.image_vocab
        ));
    }
    Ok(())
}

/// Checks that a record's text ids are the caption's ids (< Vt) followed only by padding: once
/// a position p holds its padding id Vt + p, every later position q holds Vt + q. The ids must
/// already have passed [`check_tokens`].
pub fn check_padding(layout: &ShardLayout, text: &[u32]) -> Result<(), String> {
    let vt = layout.text_vocab;
    let Some(start) = text.iter().position(|&t| t >= vt) else {
        return Ok(());
    };
    match text[start..].iter().position(|&t| t < vt) {
        None => Ok(()),
        Some(k) => {
            let p = start + k;
            Err(format!(
                "text token {p} is {}, a caption id after the padding that starts at position \
                 {start} (the caption's ids come first, then only padding ids Vt + p)",
                text[p]
            ))
        }
    }
}

/// The temporary name a shard is written under: `<path>.tmp`.
pub use crate::fsutil::tmp_path;

/// Writes one token shard: records are streamed to `<path>.tmp`, captions kept in memory until
/// [`TokenShardWriter::finish`] appends them, writes the header, fsyncs and renames.
pub struct TokenShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    layout: ShardLayout,
    count: u64,
    captions: Vec<u8>,
    records_crc: crc32fast::Hasher,
    scratch: Vec<u8>,
}

impl TokenShardWriter {
    /// Starts a shard that will appear at `path` (replacing any file there) when finished.
    pub fn create(path: &Path, layout: ShardLayout) -> Result<Self, ShardError> {
        layout.check()?;
        let tmp = tmp_path(path);
        let io = |source| ShardError::Io {
            path: tmp.clone(),
            source,
        };
        let file = File::create(&tmp).map_err(io)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
        Ok(TokenShardWriter {
            path: path.to_path_buf(),
            tmp,
            out,
            layout,
            count: 0,
            captions: Vec::new(),
            records_crc: crc32fast::Hasher::new(),
            scratch: Vec::with_capacity(layout.record_size()),
        })
    }

    /// Records pushed so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a record: `text` [Tt] already padded (id Vt + p at padding position p), `image`
    /// [G²], and its caption. Lengths and id ranges are checked; on error nothing is written.
    pub fn push(&mut self, text: &[u32], image: &[u32], caption: &str) -> Result<(), ShardError> {
        let record = self.count;
        let bad = |message: String| ShardError::BadRecord {
            path: self.path.clone(),
            record,
            message,
        };
        check_tokens(&self.layout, text, image).map_err(bad)?;
        let len = u32::try_from(caption.len())
            .map_err(|_| bad(format!("caption of {} bytes exceeds 4 GiB", caption.len())))?;
        let offset = self.captions.len() as u64;
        self.scratch.clear();
        if self.layout.token_width() == 2 {
            for &t in text.iter().chain(image) {
                self.scratch.extend_from_slice(&(t as u16).to_le_bytes());
            }
        } else {
            for &t in text.iter().chain(image) {
                self.scratch.extend_from_slice(&t.to_le_bytes());
            }
        }
        self.scratch.extend_from_slice(&offset.to_le_bytes());
        self.scratch.extend_from_slice(&len.to_le_bytes());
        self.scratch.extend_from_slice(&[0u8; 4]);
        self.out
            .write_all(&self.scratch)
            .map_err(|source| ShardError::Io {
                path: self.tmp.clone(),
                source,
            })?;
        self.records_crc.update(&self.scratch);
        self.captions.extend_from_slice(caption.as_bytes());
        self.count += 1;
        Ok(())
    }

    /// Appends the captions, writes the header, fsyncs, renames `<path>.tmp` to `path` and fsyncs
    /// the directory. A shard with no records is refused (and its temporary file removed).
    pub fn finish(self) -> Result<PathBuf, ShardError> {
        let TokenShardWriter {
            path,
            tmp,
            mut out,
            layout,
            count,
            captions,
            records_crc,
            ..
        } = self;
        if count == 0 {
            drop(out);
            let _ = fs::remove_file(&tmp);
            return Err(ShardError::Empty { path });
        }
        let io = |source| ShardError::Io {
            path: tmp.clone(),
            source,
        };
        out.write_all(&captions).map_err(io)?;
        let header = ShardHeader {
            version: VERSION,
            layout,
            token_width: layout.token_width() as u32,
            record_size: layout.record_size() as u32,
            record_count: count,
            captions_offset: HEADER_LEN as u64 + count * layout.record_size() as u64,
            captions_len: captions.len() as u64,
            records_crc: records_crc.finalize(),
            captions_crc: crc32fast::hash(&captions),
            header_crc: 0,
        };
        out.seek(SeekFrom::Start(0)).map_err(io)?;
        out.write_all(&header.encode()).map_err(io)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|source| ShardError::Io {
            path: path.clone(),
            source,
        })?;
        sync_parent(&path)?;
        Ok(path)
    }
}

/// fsyncs the directory holding `path`, so that a rename into it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<(), ShardError> {
    crate::fsutil::sync_parent(path).map_err(|e| ShardError::Io {
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ShardLayout {
        ShardLayout {
            text_len: 4,
            image_tokens: 9,
            text_vocab: 10,
            image_vocab: 20,
        }
    }

    fn sample(i: u32, l: &ShardLayout) -> (Vec<u32>, Vec<u32>, String) {
        let n = 1 + (i as usize % l.text_len as usize);
        let text = (0..l.text_len)
            .map(|p| {
                if (p as usize) < n {
                    (i + p) % l.text_vocab
                } else {
                    l.text_vocab + p
                }
            })
            .collect();
        let image = (0..l.image_tokens)
            .map(|k| (i * 7 + k) % l.image_vocab)
            .collect();
        (text, image, format!("caption {i} é"))
    }

    fn write(path: &Path, l: ShardLayout, n: u32) {
        let mut w = TokenShardWriter::create(path, l).unwrap();
        for i in 0..n {
            let (t, im, c) = sample(i, &l);
            w.push(&t, &im, &c).unwrap();
        }
        assert_eq!(w.finish().unwrap(), path);
    }

    /// Rewrites the header of `path` with `edit` applied, checksum recomputed.
    fn edit_header(path: &Path, edit: impl FnOnce(&mut ShardHeader)) {
        let mut bytes = fs::read(path).unwrap();
        let mut h = ShardHeader::decode(path, &bytes[..HEADER_LEN], bytes.len() as u64).unwrap();
        edit(&mut h);
        bytes[..HEADER_LEN].copy_from_slice(&h.encode());
        fs::write(path, bytes).unwrap();
    }

    fn open_err(path: &Path) -> String {
        TokenShard::open(path).unwrap_err().to_string()
    }

    #[test]
    fn verify_requires_the_caption_ids_then_only_padding() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(); // Tt 4, Vt 10
        let path = dir.path().join("p.tts");
        let mut w = TokenShardWriter::create(&path, l).unwrap();
        // Fine: caption ids then padding; all padding; no padding.
        w.push(&[3, 4, 12, 13], &[0; 9], "a b").unwrap();
        w.push(&[10, 11, 12, 13], &[0; 9], "").unwrap();
        w.push(&[1, 2, 3, 4], &[0; 9], "a b c d").unwrap();
        w.finish().unwrap();
        TokenShard::open(&path).unwrap().verify().unwrap();

        // Each id is the padding of its own position (so the loader's range check passes), but
        // a caption id follows the padding.
        let mut w = TokenShardWriter::create(&path, l).unwrap();
        w.push(&[3, 4, 12, 13], &[0; 9], "a b").unwrap();
        w.push(&[5, 11, 6, 13], &[0; 9], "x y").unwrap();
        w.finish().unwrap();
        let s = TokenShard::open(&path).unwrap();
        let (mut t, mut im) = (vec![0; 4], vec![0; 9]);
        s.read_tokens(1, &mut t, &mut im).unwrap();
        let e = s.verify().unwrap_err().to_string();
        assert!(
            e.contains(
                "p.tts, record 1: text token 2 is 6, a caption id after the padding that \
                        starts at position 1"
            ),
            "{e}"
        );
        assert_eq!(check_padding(&l, &[10, 11, 12, 13]), Ok(()));
        assert!(check_padding(&l, &[0, 11, 12, 3]).is_err());
    }

    #[test]
    fn round_trip_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        for l in [
            layout(),
            ShardLayout {
                text_vocab: 70000,
                ..layout()
            },
        ] {
            let path = dir.path().join(format!("s{}.tts", l.token_width()));
            write(&path, l, 7);
            assert!(!tmp_path(&path).exists());
            let s = TokenShard::open(&path).unwrap();
            assert_eq!(s.len(), 7);
            assert_eq!(s.layout(), l);
            assert_eq!(s.header().token_width as usize, l.token_width());
            s.verify().unwrap();
            s.check_layout(&l).unwrap();
            for i in 0..7 {
                let r = s.record(i as u64).unwrap();
                let (t, im, c) = sample(i, &l);
                assert_eq!(r.text.to_vec(), t);
                assert_eq!(r.image.to_vec(), im);
                assert_eq!(r.caption, c);
                assert_eq!(r.text.get(0), Some(t[0]));
                assert_eq!(r.text.get(4), None);
            }
            assert!(s.record(7).is_err());
            let expected_len = HEADER_LEN
                + 7 * l.record_size()
                + (0..7).map(|i| sample(i, &l).2.len()).sum::<usize>();
            assert_eq!(s.file_len() as usize, expected_len);
        }
        assert_eq!(layout().token_width(), 2);
        assert_eq!(layout().record_size(), 13 * 2 + 16);
    }

    #[test]
    fn header_bytes_are_where_the_docs_say() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tts");
        write(&path, layout(), 3);
        let b = fs::read(&path).unwrap();
        assert_eq!(&b[..8], b"TESSTOK\0");
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(
            [
                u32_at(8),
                u32_at(12),
                u32_at(16),
                u32_at(20),
                u32_at(24),
                u32_at(28),
                u32_at(32)
            ],
            [1, 2, 4, 9, 10, 20, 42]
        );
        assert_eq!(u64_at(40), 3);
        assert_eq!(u64_at(48), 80 + 3 * 42);
        assert_eq!(u64_at(48) + u64_at(56), b.len() as u64);
        assert_eq!(u32_at(64), crc32fast::hash(&b[80..80 + 3 * 42]));
        assert_eq!(u32_at(68), crc32fast::hash(&b[80 + 3 * 42..]));
        assert_eq!(u32_at(76), crc32fast::hash(&b[..76]));
        // Record 1: tokens, then caption offset and length.
        let r1 = &b[80 + 42..80 + 84];
        assert_eq!(
            u64::from_le_bytes(r1[26..34].try_into().unwrap()),
            "caption 0 é".len() as u64
        );
        assert_eq!(
            u32::from_le_bytes(r1[34..38].try_into().unwrap()) as usize,
            "caption 1 é".len()
        );
    }

    #[test]
    fn truncated_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tts");
        write(&path, layout(), 3);
        let full = fs::read(&path).unwrap();
        for cut in [full.len() - 1, 100, 50, 4, 0] {
            fs::write(&path, &full[..cut]).unwrap();
            let e = open_err(&path);
            assert!(
                e.contains("t.tts") && e.contains("truncated"),
                "cut {cut}: {e}"
            );
        }
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.tts");
        write(&path, layout(), 2);
        let mut b = fs::read(&path).unwrap();
        b[0] = b'X';
        fs::write(&path, &b).unwrap();
        let e = open_err(&path);
        assert!(e.contains("m.tts is not a token shard: magic"), "{e}");
        write(&path, layout(), 2);
        edit_header(&path, |h| h.version = 9);
        let e = open_err(&path);
        assert!(
            e.contains("m.tts has format version 9; this build reads version 1"),
            "{e}"
        );
    }

    #[test]
    fn checksum_mismatches_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.tts");
        write(&path, layout(), 3);
        let good = fs::read(&path).unwrap();
        // A flipped header byte fails at open.
        let mut b = good.clone();
        b[44] ^= 1;
        fs::write(&path, &b).unwrap();
        assert!(open_err(&path).contains("header checksum mismatch"));
        // A flipped record byte opens (open reads the header only) and fails verify.
        let mut b = good.clone();
        b[HEADER_LEN + 5] ^= 1;
        fs::write(&path, &b).unwrap();
        let e = TokenShard::open(&path)
            .unwrap()
            .verify()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.tts") && e.contains("records checksum mismatch"),
            "{e}"
        );
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        fs::write(&path, &b).unwrap();
        let e = TokenShard::open(&path)
            .unwrap()
            .verify()
            .unwrap_err()
            .to_string();
        assert!(e.contains("captions checksum mismatch"), "{e}");
    }

    #[test]
    fn layout_mismatch_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tts");
        write(&path, layout(), 2);
        let s = TokenShard::open(&path).unwrap();
        let e = s
            .check_layout(&ShardLayout {
                text_len: 32,
                ..layout()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("x.tts has text_len 4, the config model.text_len 32"),
            "{e}"
        );
        let e = s
            .check_layout(&ShardLayout {
                image_vocab: 8192,
                ..layout()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("has image_vocab 20, the config model.image_vocab 8192"),
            "{e}"
        );
    }

    #[test]
    fn zero_records_are_refused_by_writer_and_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z.tts");
        let w = TokenShardWriter::create(&path, layout()).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("z.tts has no records"), "{e}");
        assert!(!path.exists() && !tmp_path(&path).exists());
        // A hand-made empty shard (valid sizes, zero records) is refused on open.
        let h = ShardHeader {
            version: VERSION,
            layout: layout(),
            token_width: 2,
            record_size: layout().record_size() as u32,
            record_count: 0,
            captions_offset: HEADER_LEN as u64,
            captions_len: 0,
            records_crc: 0,
            captions_crc: 0,
            header_crc: 0,
        };
        fs::write(&path, h.encode()).unwrap();
        assert!(open_err(&path).contains("z.tts has no records"));
    }

    #[test]
    fn non_utf8_caption_is_named_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.tts");
        write(&path, layout(), 2);
        let mut b = fs::read(&path).unwrap();
        let n = b.len();
        b[n - 1] = 0xff; // inside record 1's caption ("…é" ends with a continuation byte)
        fs::write(&path, &b).unwrap();
        edit_header(&path, |h| {
            h.captions_crc = crc32fast::hash(&b[h.captions_offset as usize..])
        });
        let s = TokenShard::open(&path).unwrap();
        assert!(s.record(0).is_ok());
        let e = s.record(1).unwrap_err().to_string();
        assert!(e.contains("u.tts, record 1: caption is not UTF-8"), "{e}");
        assert!(s.verify().unwrap_err().to_string().contains("record 1"));
    }

    #[test]
    fn read_tokens_widens_and_checks_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        for l in [
            layout(),
            ShardLayout {
                text_vocab: 70000,
                ..layout()
            },
        ] {
            let w = l.token_width();
            let path = dir.path().join(format!("r{w}.tts"));
            write(&path, l, 5);
            let s = TokenShard::open(&path).unwrap();
            let (mut text, mut image) = (vec![0; 4], vec![0; 9]);
            for i in 0..5 {
                s.prefetch_tokens(i as u64);
                s.read_tokens(i as u64, &mut text, &mut image).unwrap();
                let (t, im, _) = sample(i, &l);
                assert_eq!((&text, &image), (&t, &im), "width {w}, record {i}");
            }
            s.prefetch_tokens(5); // out of range: ignored
            let e = s.read_tokens(5, &mut text, &mut image).unwrap_err();
            assert!(e.to_string().contains("record 5: out of range"), "{e}");
            // Record 1's caption has 2 tokens, record 0's one (padding at positions 1..4). An
            // id ≥ Vt that is not its position's padding id is named, as is an image id ≥ Vi.
            let mut b = fs::read(&path).unwrap();
            let at = HEADER_LEN + l.record_size() + w; // record 1, text position 1
            b[at..at + w].copy_from_slice(&(l.text_vocab + 2).to_le_bytes()[..w]);
            let at = HEADER_LEN + 4 * l.record_size() + (4 + 8) * w; // record 4, image 8
            b[at..at + w].copy_from_slice(&l.image_vocab.to_le_bytes()[..w]);
            fs::write(&path, &b).unwrap();
            let s = TokenShard::open(&path).unwrap();
            let e = s.read_tokens(1, &mut text, &mut image).unwrap_err();
            let vt = l.text_vocab;
            assert!(
                e.to_string().ends_with(&format!(
                    "r{w}.tts, record 1: text token 1 is {}: ids ≥ Vt = {vt} must be the \
                     padding id of their position, Vt + 1 = {}",
                    vt + 2,
                    vt + 1
                )),
                "{e}"
            );
            let e = s.read_tokens(4, &mut text, &mut image).unwrap_err();
            assert!(
                e.to_string()
                    .ends_with("record 4: image token 8 is 20, outside [0, Vi = 20)"),
                "{e}"
            );
            // Padding ids at their own position are valid.
            s.read_tokens(0, &mut text, &mut image).unwrap();
            assert_eq!(text[1..], [vt + 1, vt + 2, vt + 3]);
        }
    }

    #[test]
    fn writer_refuses_bad_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.tts");
        let l = layout();
        let mut w = TokenShardWriter::create(&path, l).unwrap();
        let (t, im, _) = sample(0, &l);
        let e = w.push(&t[..3], &im, "c").unwrap_err().to_string();
        assert!(e.contains("record 0: 3 text tokens"), "{e}");
        let mut bad = t.clone();
        bad[1] = 10; // Vt + 0, at position 1
        let e = w.push(&bad, &im, "c").unwrap_err().to_string();
        assert!(e.contains("text token 1 is 10"), "{e}");
        let mut bad = im.clone();
        bad[8] = 20;
        let e = w.push(&t, &bad, "c").unwrap_err().to_string();
        assert!(e.contains("image token 8 is 20"), "{e}");
        w.push(&t, &im, "c").unwrap();
        assert_eq!(w.len(), 1);
        // Until finish, the shard exists only under its temporary name.
        assert!(!path.exists() && tmp_path(&path).exists());
        w.finish().unwrap();
        assert_eq!(TokenShard::open(&path).unwrap().len(), 1);
    }
}
