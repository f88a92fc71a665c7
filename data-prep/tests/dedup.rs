//! `data-prep dedup` through the binary, on embeddings of synthetic images with planted
//! duplicates (support/clip.rs: the model, the images, the edits, the threshold): every planted
//! copy is removed, within the set and against an evaluation set, and nothing else; the filtered
//! shards, report and picture say so; a rerun reuses the finished shards and the HNSW search finds
//! the same records; bad input is refused naming the file, before any output.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use formats::image_shard::ImageShard;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

#[path = "support/clip.rs"]
mod clip;
mod support;
use clip::*;
use support::{data_prep, ok, text};

/// (shard name, record) of global index `g` in shards of `per_shard` records.
fn addr(prefix: &str, g: usize, per_shard: usize) -> (String, u64) {
    (
        format!("{prefix}-{:05}", g / per_shard),
        (g % per_shard) as u64,
    )
}

/// `removed.jsonl` as (shard, record, reason, kept shard, kept record, similarity).
fn removed(out: &Path) -> Vec<(String, u64, String, String, u64, f64)> {
    std::fs::read_to_string(out.join("removed.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["shard"].as_str().unwrap().to_string(),
                v["record"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_string(),
                v["kept"]["shard"].as_str().unwrap().to_string(),
                v["kept"]["record"].as_u64().unwrap(),
                v["similarity"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The images of every shard in `dir`, in path order.
fn shard_images(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tis"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let sh = ImageShard::open(&p).unwrap();
        for i in 0..sh.len() {
            out.push(sh.record(i).unwrap().pixels);
        }
    }
    out
}

const PER_SHARD: usize = 16;
const BASES: usize = 48;
/// Training bases with an evaluation-set copy (one of each kind).
const IN_EVAL: std::ops::Range<usize> = 40..45;

/// The training set: BASES distinct fields, then two planted copies of each of bases 0..10
/// (kinds k % 5 and (k + 2) % 5); the evaluation set: one copy of each of IN_EVAL (each kind once)
/// and 6 fields of its own. Returns (bases, training images, evaluation images).
fn planted_sets() -> (
    Vec<image::RgbImage>,
    Vec<image::RgbImage>,
    Vec<image::RgbImage>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let bases: Vec<_> = (0..BASES).map(|_| field(&mut rng)).collect();
    let mut train = bases.clone();
    for (k, b) in bases.iter().enumerate().take(10) {
        train.push(edit(b, KINDS[k % 5]));
        train.push(edit(b, KINDS[(k + 2) % 5]));
    }
    let mut eval: Vec<_> = IN_EVAL
        .zip(KINDS)
        .map(|(b, kind)| edit(&bases[b], kind))
        .collect();
    eval.extend((0..6).map(|_| field(&mut rng)));
    (bases, train, eval)
}

#[test]
fn planted_duplicates_are_all_found_and_nothing_else_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let model = write_model(&p("model"), 3, MODEL);
    let (bases, train, eval) = planted_sets();
    write_shards(&p("train"), "images", &train, PER_SHARD);
    write_shards(&p("eval"), "eval", &eval, PER_SHARD);
    ok(embed(&model, &p("train"), &p("emb"), &[]));
    ok(embed(&model, &p("eval"), &p("emb-eval"), &[]));

    // The margin the test relies on, from the embeddings themselves.
    let v = vectors(&p("emb"));
    let ve = vectors(&p("emb-eval"));
    let mut distinct = f32::MIN;
    for i in 0..BASES {
        for j in i + 1..BASES {
            distinct = distinct.max(cos(&v[i], &v[j]));
        }
        for e in &ve[IN_EVAL.len()..] {
            distinct = distinct.max(cos(&v[i], e));
        }
    }
    let planted = (0..20)
        .map(|k| cos(&v[k / 2], &v[BASES + k]))
        .chain(IN_EVAL.enumerate().map(|(e, b)| cos(&v[b], &ve[e])))
        .fold(f32::MAX, f32::min);
    eprintln!(
        "distinct pairs ≤ {distinct:.4}, planted copies ≥ {planted:.4}, threshold {THRESHOLD}"
    );
    assert!(distinct < THRESHOLD && planted >= THRESHOLD);

    let t = THRESHOLD.to_string();
    let (emb, emb_eval) = (p("emb"), p("emb-eval"));
    let dedup = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "dedup",
            "--embeddings",
            s(&emb),
            "--against",
            s(&emb_eval),
            "--threshold",
            &t,
            "--quiet",
        ];
        let o = p(out);
        args.extend(["--out", s(&o)]);
        args.extend_from_slice(extra);
        ok(data_prep(&args))
    };
    dedup("out", &[]);
    let out = p("out");

    // Recall and precision: exactly the planted records go, each for its reason.
    let mut want: Vec<(String, u64, String, String, u64)> = Vec::new();
    for (e, b) in IN_EVAL.enumerate() {
        let (sh, r) = addr("images", b, PER_SHARD);
        want.push((sh, r, "eval".into(), "eval-00000".into(), e as u64));
    }
    for k in 0..20 {
        let (sh, r) = addr("images", BASES + k, PER_SHARD);
        let (ksh, kr) = addr("images", k / 2, PER_SHARD);
        want.push((sh, r, "duplicate".into(), ksh, kr));
    }
    let got = removed(&out);
    for r in &got {
        assert!(r.5 >= THRESHOLD as f64, "{r:?}");
    }
    let got: BTreeSet<_> = got
        .into_iter()
        .map(|(a, b, c, d, e, _)| (a, b, c, d, e))
        .collect();
    assert_eq!(got, want.into_iter().collect::<BTreeSet<_>>());

    // The filtered shards hold the other bases, in order.
    let kept: Vec<Vec<u8>> = bases
        .iter()
        .enumerate()
        .filter(|(i, _)| !IN_EVAL.contains(i))
        .map(|(_, b)| b.as_raw().clone())
        .collect();
    assert!(shard_images(&out.join("shards")) == kept);

    // The report and the picture.
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["records"], 68);
    assert_eq!(report["kept"], 43);
    assert_eq!(report["removed_eval"], 5);
    assert_eq!(report["removed_duplicate"], 20);
    assert_eq!(report["index"], "exact");
    let pairs = report["closest_pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 16);
    let sims: Vec<f64> = pairs
        .iter()
        .map(|q| q["similarity"].as_f64().unwrap())
        .collect();
    assert!(sims.windows(2).all(|w| w[0] >= w[1]), "{sims:?}");
    assert!(
        report["closest_below_threshold"]["similarity"]
            .as_f64()
            .unwrap()
            < THRESHOLD as f64
    );
    // pairs.png: 16 rows of two 128-pixel images 8 apart; with a font, a header, each row's
    // rank and cosine above it and the two addresses below it (at least a 14-pixel line each).
    let png = image::open(out.join("pairs.png")).unwrap().to_rgb8();
    assert_eq!(png.width(), 2 * 128 + 3 * 8);
    let bare = 16 * 128 + 17 * 8;
    match trainer::font::find() {
        Some(_) => assert!(png.height() >= 16 * (128 + 2 * 14) + 14, "{}", png.height()),
        None => assert_eq!(png.height(), bare),
    }

    // A rerun keeps the finished shards; the HNSW search finds the same records.
    let again = dedup("out", &[]);
    assert!(again.contains("0 shards written, 5 reused"), "{again}");
    dedup("out-hnsw", &["--index", "hnsw"]);
    let strip = |v: Vec<(String, u64, String, String, u64, f64)>| -> BTreeSet<_> {
        v.into_iter()
            .map(|(a, b, c, d, e, _)| (a, b, c, d, e))
            .collect()
    };
    assert_eq!(strip(removed(&p("out-hnsw"))), strip(removed(&out)));
}

#[test]
fn bad_input_is_refused_naming_the_file_before_any_output() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let model = write_model(&p("model"), 3, MODEL);
    let other = write_model(&p("model2"), 4, MODEL);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let imgs: Vec<_> = (0..20).map(|_| field(&mut rng)).collect();
    write_shards(&p("train"), "images", &imgs, 8);
    ok(embed(&model, &p("train"), &p("emb"), &[]));
    let dedup = |emb: &Path, against: Option<&Path>, t: &str| {
        let mut args = vec!["dedup", "--embeddings", s(emb), "--threshold", t];
        if let Some(a) = against {
            args.extend(["--against", s(a)]);
        }
        let out = p("out");
        args.extend(["--out", s(&out)]);
        let o = data_prep(&args);
        assert!(!o.status.success());
        text(&o)
    };
    // A threshold outside (-1, 1].
    for t in ["1.5", "-1"] {
        let e = dedup(&p("emb"), None, t);
        assert!(
            e.contains(&format!("--threshold {t}")) && e.contains("(-1, 1]"),
            "{e}"
        );
    }
    // An evaluation set of another embedding size, or another model.
    let small = write_model(
        &p("model16"),
        3,
        Variant {
            projection: 16,
            ..MODEL
        },
    );
    ok(embed(&small, &p("train"), &p("emb16"), &[]));
    let e = dedup(&p("emb"), Some(&p("emb16")), "0.9");
    assert!(
        e.contains("emb16/manifest.json") && e.contains("size 16") && e.contains("size 256"),
        "{e}"
    );
    ok(embed(&other, &p("train"), &p("emb-other"), &[]));
    let e = dedup(&p("emb"), Some(&p("emb-other")), "0.9");
    assert!(
        e.contains("emb-other/manifest.json") && e.contains("not comparable"),
        "{e}"
    );
    // A file of the wrong size: shard 0's vectors cut to D = 16.
    let bytes = std::fs::read(p("emb16/images-00000.safetensors")).unwrap();
    std::fs::write(p("emb-other/images-00000.safetensors"), bytes).unwrap();
    let e = dedup(&p("emb-other"), None, "0.9");
    assert!(e.contains("emb-other/images-00000.safetensors"), "{e}");
    // A missing shard file.
    std::fs::remove_file(p("emb/images-00001.safetensors")).unwrap();
    let e = dedup(&p("emb"), None, "0.9");
    assert!(
        e.contains("emb/images-00001.safetensors") && e.contains("rerun `data-prep embed`"),
        "{e}"
    );
    // Nothing was written by the refused runs.
    assert!(!p("out").join("report.json").exists());
}
