//! Image shards (`.tis`) end to end: bit-exact round trip, random access into a middle chunk,
//! and every bad-input case (truncation, wrong magic/version, checksum mismatches, resolution, a
//! chunk length no machine holds).

use std::fs;
use std::path::{Path, PathBuf};

use formats::image_shard::{ImageShard, ImageShardError, ImageShardWriter, HEADER_LEN};

mod support;

const RES: u32 = 16;

fn pixels(i: u32) -> Vec<u8> {
    (0..RES * RES * 3)
        .map(|j| (j.wrapping_mul(31).wrapping_add(i.wrapping_mul(97)) % 251) as u8)
        .collect()
}

/// 50 records in chunks of 8 (7 chunks, the last one short).
fn write_shard(dir: &Path) -> PathBuf {
    let path = dir.join("s.tis");
    let mut w = ImageShardWriter::create(&path, RES, 8, 3).unwrap();
    for i in 0..50 {
        let caption = format!("record {i}: ünïcödé {}", "x".repeat(i as usize));
        let meta = format!("{{\"key\":\"{i}\"}}");
        w.push(&pixels(i), &caption, (i % 3 != 0).then_some(meta.as_str()))
            .unwrap();
    }
    w.finish().unwrap();
    path
}

#[test]
fn round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = ImageShard::open(write_shard(dir.path())).unwrap();
    assert_eq!(s.len(), 50);
    assert_eq!(s.chunks().len(), 7);
    s.verify().unwrap();
    for i in 0..50u32 {
        let r = s.record(i as u64).unwrap();
        assert_eq!(r.pixels, pixels(i), "record {i}");
        assert_eq!(
            r.caption,
            format!("record {i}: ünïcödé {}", "x".repeat(i as usize))
        );
        assert_eq!(r.meta, (i % 3 != 0).then(|| format!("{{\"key\":\"{i}\"}}")));
    }
}

#[test]
fn random_access_reads_only_its_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let s = ImageShard::open(&path).unwrap();
    // Corrupt chunk 0 on disk after opening: record 27 (chunk 3) must still read, since only its
    // own chunk is read and decompressed.
    let first = s.chunks()[0];
    let mut bytes = fs::read(&path).unwrap();
    bytes[first.offset as usize + 2] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let s = ImageShard::open(&path).unwrap();
    assert_eq!(s.record(27).unwrap().pixels, pixels(27));
    assert!(matches!(s.record(3), Err(ImageShardError::Checksum { .. })));
    let e = s.verify().unwrap_err();
    assert!(e.to_string().contains("chunk 0"), "{e}");
}

#[test]
fn truncated_files_fail_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let bytes = fs::read(&path).unwrap();
    for cut in [0, 10, HEADER_LEN as usize, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&path, &bytes[..cut]).unwrap();
        let e = ImageShard::open(&path).unwrap_err();
        assert!(
            matches!(e, ImageShardError::Truncated { .. }),
            "cut {cut}: {e}"
        );
        assert!(e.to_string().contains("s.tis"), "{e}");
    }
}

#[test]
fn wrong_magic_version_and_header_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let good = fs::read(&path).unwrap();

    let mut b = good.clone();
    b[0..8].copy_from_slice(b"TESSTOK\0");
    fs::write(&path, &b).unwrap();
    assert!(matches!(
        ImageShard::open(&path),
        Err(ImageShardError::BadMagic { .. })
    ));

    let mut b = good.clone();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    fs::write(&path, &b).unwrap();
    let e = ImageShard::open(&path).unwrap_err();
    assert!(
        matches!(e, ImageShardError::Version { found: 7, .. }),
        "{e}"
    );

    let mut b = good.clone();
    b[24] ^= 1; // record count
    fs::write(&path, &b).unwrap();
    let e = ImageShard::open(&path).unwrap_err();
    assert!(e.to_string().contains("header checksum"), "{e}");
}

#[test]
fn index_and_chunk_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let good = fs::read(&path).unwrap();

    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0x55; // last index entry's crc field
    fs::write(&path, &b).unwrap();
    let e = ImageShard::open(&path).unwrap_err();
    assert!(e.to_string().contains("chunk index checksum"), "{e}");

    let s = ImageShard::open({
        fs::write(&path, &good).unwrap();
        &path
    })
    .unwrap();
    let mid = s.chunks()[4];
    let mut b = good.clone();
    b[(mid.offset + mid.compressed_len / 2) as usize] ^= 0x10;
    fs::write(&path, &b).unwrap();
    let s = ImageShard::open(&path).unwrap();
    let e = s.verify().unwrap_err();
    assert!(
        matches!(&e, ImageShardError::Checksum { what, .. } if what == "chunk 4"),
        "{e}"
    );
}

#[test]
fn resolution_mismatch_names_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let e = ImageShard::open_expecting(&path, 256).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("16×16") && msg.contains("256×256"), "{msg}");
    ImageShard::open_expecting(&path, RES).unwrap();
}

#[test]
fn unfinished_writer_leaves_nothing_under_the_final_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.tis");
    let mut w = ImageShardWriter::create(&path, RES, 4, 3).unwrap();
    for i in 0..9 {
        w.push(&pixels(i), "c", None).unwrap();
    }
    assert!(!path.exists());
    drop(w);
    assert!(!path.exists());
}

/// Sets chunk `chunk`'s `raw_len` in the index of the shard at `path` and rewrites the index and
/// header checksums, so that only the length itself is wrong.
fn set_raw_len(path: &Path, chunk: usize, raw_len: u64) {
    let mut b = fs::read(path).unwrap();
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let index = u64_at(&b, 40) as usize;
    let at = index + 40 * chunk + 16;
    b[at..at + 8].copy_from_slice(&raw_len.to_le_bytes());
    let index_crc = crc32fast::hash(&b[index..]);
    b[48..52].copy_from_slice(&index_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&header_crc.to_le_bytes());
    fs::write(path, b).unwrap();
}

#[test]
fn an_enormous_declared_chunk_length_is_an_error_not_an_abort() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(dir.path());
    let good = fs::read(&path).unwrap();

    // Far beyond any machine: refused against the documented maximum, before any allocation.
    set_raw_len(&path, 3, 1 << 60);
    let s = ImageShard::open(&path).unwrap();
    let e = s.verify().unwrap_err().to_string();
    assert!(
        e.contains("s.tis") && e.contains("chunk 3") && e.contains("exceeds"),
        "{e}"
    );
    for args in [
        vec!["verify", path.to_str().unwrap()],
        vec!["inspect", path.to_str().unwrap(), "--records", "50"],
    ] {
        let o = support::data_prep(&args);
        assert_eq!(o.status.signal(), None, "{args:?}: {}", support::text(&o));
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", support::text(&o));
        let t = support::text(&o);
        assert!(t.contains("chunk 3") && t.contains("raw length"), "{t}");
    }

    // Within the maximum but not what the zstd frame says it holds.
    fs::write(&path, &good).unwrap();
    let s = ImageShard::open(&path).unwrap();
    let raw = s.chunks()[2].raw_len;
    set_raw_len(&path, 2, raw + 1000);
    let e = ImageShard::open(&path)
        .unwrap()
        .verify()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chunk 2") && e.contains(&format!("its zstd frame holds {raw} bytes")),
        "{e}"
    );
}

#[test]
fn captions_longer_than_the_field_limit_are_refused_by_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.tis");
    let mut w = ImageShardWriter::create(&path, RES, 8, 3).unwrap();
    let long = "x".repeat(formats::image_shard::MAX_FIELD_LEN as usize + 1);
    let e = w.push(&pixels(0), &long, None).unwrap_err().to_string();
    assert!(e.contains("record 0") && e.contains("caption"), "{e}");
    w.push(&pixels(0), "fits", Some(&long[1..])).unwrap();
}
