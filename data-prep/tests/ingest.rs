//! `data-prep ingest` end to end through the binary: every source format, every filter counted,
//! tar path traversal rejected, resume gives the same bytes.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use formats::image_shard::ImageShard;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_data-prep"))
}

fn ingest(input: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args([
            "ingest",
            "--quiet",
            "--resolution",
            "16",
            "--min-side",
            "16",
            "--input",
        ])
        .arg(input)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn stats(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(out.join("stats.json")).unwrap()).unwrap()
}

/// Every input accounted for: written + Σ rejected = seen.
fn check_accounting(s: &serde_json::Value) {
    let rejected: u64 = s["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        s["records_written"].as_u64().unwrap() + rejected,
        s["inputs_seen"].as_u64().unwrap(),
        "{s:#}"
    );
}

fn all_records(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut shards: Vec<PathBuf> = fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tis"))
        .collect();
    shards.sort();
    let mut recs = Vec::new();
    for p in shards {
        let s = ImageShard::open_expecting(&p, 16).unwrap();
        s.verify().unwrap();
        for i in 0..s.len() {
            let r = s.record(i).unwrap();
            recs.push((r.caption, r.pixels));
        }
    }
    recs
}

/// A 24×20 PNG (or JPEG) with a colour that depends on `seed`.
fn image(seed: u8, jpeg: bool) -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 20, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 10) as u8, (y * 12) as u8 ^ seed])
    });
    let mut out = Vec::new();
    let fmt = if jpeg {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    img.write_to(&mut Cursor::new(&mut out), fmt).unwrap();
    out
}

#[test]
fn synth_folder_every_input_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    let st = bin()
        .args([
            "synth",
            "--quiet",
            "--count",
            "25",
            "--resolution",
            "32",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    // Two extra bad inputs: a caption that is too short, and an image with no caption.
    fs::write(data.join("00000/000000003.txt"), "ab").unwrap();
    fs::remove_file(data.join("00000/000000004.txt")).unwrap();
    ok(&ingest(
        &data,
        &out,
        &["--shard-size", "10", "--chunk-records", "4"],
    ));
    let s = stats(&out);
    check_accounting(&s);
    assert_eq!(s["format"], "files");
    assert_eq!(s["inputs_seen"], 25);
    assert_eq!(s["records_written"], 23);
    assert_eq!(s["rejected"]["caption_too_short"], 1);
    assert_eq!(s["rejected"]["missing_caption"], 1);
    assert_eq!(s["shards"], 3);
    let recs = all_records(&out);
    assert_eq!(recs.len(), 23);
    // Input order is kept: record 3 is input 5.
    let cap5 = fs::read_to_string(data.join("00000/000000005.txt")).unwrap();
    assert_eq!(recs[3].0, cap5);
    // Metadata names the source key.
    let s0 = ImageShard::open(out.join("images-00000.tis")).unwrap();
    assert!(s0.record(0).unwrap().meta.unwrap().contains("000000000"));

    // `inspect` and `verify` read image shards; a flipped byte in a chunk fails verification.
    let shard = out.join("images-00001.tis");
    let o = bin().arg("inspect").arg(&shard).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("image shard") && text.contains("record 0: caption"),
        "{text}"
    );
    assert!(bin().arg("verify").arg(&shard).status().unwrap().success());
    let mut bytes = fs::read(&shard).unwrap();
    bytes[100] ^= 0x40; // inside the first chunk (the header is 64 bytes)
    fs::write(&shard, &bytes).unwrap();
    let o = bin()
        .arg("verify")
        .arg(out.join("images-00000.tis"))
        .arg(&shard)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && text.contains("FAILED") && text.contains("images-00001.tis"),
        "{text}"
    );
    assert!(
        text.contains("ok ") && text.contains("images-00000.tis"),
        "{text}"
    );
}

/// A folder of images + .txt with one of each bad case; returns the folder.
fn bad_folder(root: &Path) -> PathBuf {
    let d = root.join("imgs");
    fs::create_dir_all(d.join("sub")).unwrap();
    let put = |name: &str, img: &[u8], cap: &[u8]| {
        fs::write(d.join(format!("{name}.png")), img).unwrap();
        fs::write(d.join(format!("{name}.txt")), cap).unwrap();
    };
    put("a_ok", &image(1, false), b"a photo of a cat");
    put("b_dup", &image(1, false), b"the same cat again");
    put("c_zero", b"", b"an empty file");
    let mut corrupt = image(2, false);
    corrupt.truncate(corrupt.len() / 2);
    put("d_corrupt", &corrupt, b"half a picture");
    put("e_boiler", &image(3, false), b"IMG_1234.jpg");
    put("f_utf8", &image(4, false), b"caf\xe9 au lait");
    let mut wide = Vec::new();
    image::RgbImage::new(50, 20)
        .write_to(&mut Cursor::new(&mut wide), image::ImageFormat::Png)
        .unwrap();
    put("g_wide", &wide, b"a panorama");
    let mut small = Vec::new();
    image::RgbImage::new(10, 10)
        .write_to(&mut Cursor::new(&mut small), image::ImageFormat::Png)
        .unwrap();
    put("h_small", &small, b"a thumbnail");
    fs::write(d.join("sub/i_jpeg.jpg"), image(5, true)).unwrap();
    fs::write(d.join("sub/i_jpeg.txt"), "a jpeg in a subfolder").unwrap();
    put("j_custom", &image(6, false), b"sponsored content here");
    d
}

#[test]
fn folder_with_every_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (bad_folder(dir.path()), dir.path().join("out"));
    ok(&ingest(&data, &out, &["--reject-pattern", "(?i)sponsored"]));
    let s = stats(&out);
    check_accounting(&s);
    assert_eq!(s["format"], "folder");
    assert_eq!(s["inputs_seen"], 10);
    assert_eq!(s["records_written"], 2, "{s:#}");
    for (reason, n) in [
        ("duplicate", 1),
        ("undecodable_image", 2),
        ("boilerplate_caption", 2),
        ("non_utf8_caption", 1),
        ("aspect_ratio", 1),
        ("too_small", 1),
    ] {
        assert_eq!(s["rejected"][reason], n, "{reason}: {s:#}");
    }
    let ex = s["examples"]["undecodable_image"].to_string();
    assert!(ex.contains("c_zero") && ex.contains("zero-byte"), "{ex}");
    assert!(s["examples"]["duplicate"].to_string().contains("b_dup"));
    let recs = all_records(&out);
    assert_eq!(recs[0].0, "a photo of a cat");
    assert_eq!(recs[1].0, "a jpeg in a subfolder");
}

fn tar_with(path: &Path, entries: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        // Raw name bytes: the builder's path setters refuse "..", and the point is to test them.
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn tar_shards_and_path_traversal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tars");
    let out = dir.path().join("deep/out");
    fs::create_dir_all(&data).unwrap();
    let (i1, i2, i3) = (image(10, false), image(11, true), image(12, false));
    tar_with(
        &data.join("00000.tar"),
        &[
            ("s1.png", &i1),
            ("s1.txt", b"first sample"),
            ("s1.json", br#"{"url": "http://example.com/1.png"}"#),
            ("../evil.txt", b"escape attempt"),
            ("/tmp/abs.txt", b"absolute"),
            ("s2.jpg", &i2),
            ("s2.txt", b"second sample"),
        ],
    );
    tar_with(
        &data.join("00001.tar"),
        &[("dir/s3.seg.png", &i3), ("dir/s3.seg.txt", b"third sample")],
    );
    ok(&ingest(&data, &out, &[]));
    assert!(!dir.path().join("deep/evil.txt").exists());
    assert!(!dir.path().join("evil.txt").exists());
    assert!(!out.join("evil.txt").exists());
    let s = stats(&out);
    check_accounting(&s);
    assert_eq!(s["format"], "tar");
    assert_eq!(s["records_written"], 3);
    assert_eq!(s["rejected"]["unsafe_path"], 2);
    let ex = s["examples"]["unsafe_path"].to_string();
    assert!(
        ex.contains("../evil.txt") && ex.contains("/tmp/abs.txt"),
        "{ex}"
    );
    let recs = all_records(&out);
    let caps: Vec<_> = recs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(caps, ["first sample", "second sample", "third sample"]);
    let meta = ImageShard::open(out.join("images-00000.tis"))
        .unwrap()
        .record(0)
        .unwrap()
        .meta
        .unwrap();
    assert!(meta.contains("http://example.com/1.png"), "{meta}");
}

#[test]
fn jsonl_and_csv_listings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("list");
    fs::create_dir_all(d.join("img")).unwrap();
    fs::write(d.join("img/a.png"), image(20, false)).unwrap();
    fs::write(d.join("img/b.jpg"), image(21, true)).unwrap();
    let jsonl = d.join("pairs.jsonl");
    fs::write(
        &jsonl,
        "{\"image\": \"img/a.png\", \"caption\": \"a red thing\"}\n\n\
         {\"image\": \"img/b.jpg\", \"caption\": \"a blue thing\"}\n\
         not json\n\
         {\"image\": \"img/missing.png\", \"caption\": \"gone\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out_jsonl");
    ok(&ingest(&jsonl, &out, &[]));
    let s = stats(&out);
    check_accounting(&s);
    assert_eq!(s["format"], "jsonl");
    assert_eq!(
        (s["inputs_seen"].as_u64(), s["records_written"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(s["rejected"]["bad_record"], 1);
    assert_eq!(s["rejected"]["unreadable"], 1);

    let csv = d.join("pairs.csv");
    fs::write(
        &csv,
        "image,caption\nimg/a.png,\"a red thing, quoted\"\nimg/b.jpg,a blue thing\n",
    )
    .unwrap();
    let out = dir.path().join("out_csv");
    ok(&ingest(&csv, &out, &[]));
    let s = stats(&out);
    check_accounting(&s);
    assert_eq!(s["format"], "csv");
    let caps: Vec<_> = all_records(&out).into_iter().map(|r| r.0).collect();
    assert_eq!(caps, ["a red thing, quoted", "a blue thing"]);

    fs::write(&csv, "path,text\nimg/a.png,x\n").unwrap();
    let o = ingest(&csv, &dir.path().join("out_bad"), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("'image' and 'caption'"));
}

#[test]
fn resume_after_deleting_the_last_shard_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("out"));
    assert!(bin()
        .args([
            "synth",
            "--quiet",
            "--count",
            "23",
            "--resolution",
            "24",
            "--seed",
            "9",
            "--out"
        ])
        .arg(&data)
        .status()
        .unwrap()
        .success());
    // A duplicate in the last group of an image in the first: resume must still catch it.
    fs::copy(
        data.join("00000/000000001.png"),
        data.join("00000/000000021.png"),
    )
    .unwrap();
    let args = ["--shard-size", "8", "--chunk-records", "3"];
    ok(&ingest(&data, &out, &args));
    let read = |p: &str| fs::read(out.join(p)).unwrap();
    let before: Vec<_> = ["images-00000.tis", "images-00001.tis", "images-00002.tis"]
        .map(read)
        .into();
    let stats_before = stats(&out);
    assert_eq!(stats_before["rejected"]["duplicate"], 1);

    fs::remove_file(out.join("images-00002.tis")).unwrap();
    ok(&ingest(&data, &out, &args));
    let after: Vec<_> = ["images-00000.tis", "images-00001.tis", "images-00002.tis"]
        .map(read)
        .into();
    assert_eq!(before, after);
    let s = stats(&out);
    assert_eq!(s["resumed_shards"], 2);
    assert_eq!(s["rejected"], stats_before["rejected"]);
    assert_eq!(s["records_written"], stats_before["records_written"]);

    // Other options on the same folder are refused, naming the marker.
    let o = ingest(&data, &out, &["--shard-size", "5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("images-00000.tis.done"));
}

#[test]
fn empty_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let o = ingest(&empty, &dir.path().join("out"), &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no inputs found"));
}

/// A caption limit the image shards cannot hold is refused before any input is read.
#[test]
fn a_caption_limit_beyond_what_a_shard_holds_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("out");
    let o = ingest(&empty, &out, &["--max-caption-chars", "262145"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("max-caption-chars") && e.contains("262144"),
        "{e}"
    );
    assert!(!out.exists());
}

/// A 32×40 PNG, a different asymmetric pattern per `seed` (red and blue grow along x, green
/// along y), so that mixed-up, transposed or flipped pixels cannot pass for it.
fn pattern(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 40, |x, y| {
        image::Rgb([
            (seed * 11 + x * 3) as u8,
            (y * 5 + seed * 2) as u8,
            ((x * 7) ^ (seed * 29)) as u8,
        ])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn every_record_holds_the_pixels_of_the_source_its_caption_names() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("grads"), dir.path().join("out"));
    fs::create_dir_all(&data).unwrap();
    let n = 20u32;
    for i in 0..n {
        fs::write(data.join(format!("{i:03}.png")), pattern(i)).unwrap();
        fs::write(
            data.join(format!("{i:03}.txt")),
            format!("gradient picture number {i}"),
        )
        .unwrap();
    }
    // Several shards and chunks; each batch is decoded in parallel.
    ok(&ingest(
        &data,
        &out,
        &["--shard-size", "7", "--chunk-records", "3", "--batch", "8"],
    ));
    let recs = all_records(&out);
    assert_eq!(recs.len(), n as usize, "{:#}", stats(&out));
    for (k, (caption, pixels)) in recs.iter().enumerate() {
        let i: u32 = caption
            .strip_prefix("gradient picture number ")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("record {k}: caption {caption:?}"));
        // The source decoded here: 32×40, so the centred 32×32 square (rows 4..36) shrinks by 2;
        // each stored pixel is the mean of a 2×2 block.
        let src = image::load_from_memory(&fs::read(data.join(format!("{i:03}.png"))).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(pixels.len(), 16 * 16 * 3);
        for y in 0..16u32 {
            for x in 0..16u32 {
                for c in 0..3 {
                    let mean = [(0, 0), (1, 0), (0, 1), (1, 1)]
                        .iter()
                        .map(|&(dx, dy)| src.get_pixel(2 * x + dx, 4 + 2 * y + dy)[c] as f64)
                        .sum::<f64>()
                        / 4.0;
                    let got = pixels[((y * 16 + x) * 3) as usize + c] as f64;
                    assert!(
                        (got - mean).abs() <= 1.0,
                        "record {k} ({caption:?}) pixel ({x}, {y}) channel {c}: {got}, \
                         source {mean}"
                    );
                }
            }
        }
    }
}
