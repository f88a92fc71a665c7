//! Image shards (`.tis`) end to end: bit-exact round trip, random access into a middle chunk,
//! and every bad-input case (truncation, wrong magic/version, checksum mismatches, resolution).

use std::fs;
use std::path::{Path, PathBuf};

use trainer::data::image_shard::{ImageShard, ImageShardError, ImageShardWriter, HEADER_LEN};

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
