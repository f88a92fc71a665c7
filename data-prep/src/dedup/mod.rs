//! `data-prep dedup`: CLIP embeddings (`data-prep embed`) → the image shards without
//! near-duplicates, a report and a PNG of the closest pairs. docs/dedup.md has the formats.
//!
//! 1. With `--against EVAL`, every training record whose image has cosine ≥ `--threshold` with
//!    any image of the evaluation set is dropped (exact: blocked products, [`search::best_matches`]).
//! 2. Within the remaining records (unless `--skip-within`), pairs with cosine ≥ `--threshold`
//!    are joined into connected components and each component keeps only its lowest
//!    (shard, record). The pairs come from the exact blocked search up to `--exact-max` records
//!    and from an HNSW index beyond it (`--index` forces either).
//! 3. Output in `--out`: `shards/<name>.tis`, each input shard with the dropped records left out
//!    (same order, same chunking), each with a done marker so that a rerun keeps the finished
//!    ones; `removed.jsonl`, one line per dropped record; `pairs.png`, the closest pairs side by
//!    side; `report.json` (counts, the closest pairs and their similarity), written last.
//!
//! Every input is checked before any output is written: the embeddings' manifests and files,
//! the evaluation set's embedding size, model and image resolution against the training set's,
//! the threshold in (−1, 1], and the source shards (present, unchanged since `embed`).

pub mod search;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use formats::image_shard::{ImageShard, ImageShardWriter, DEFAULT_LEVEL};
use serde::{Deserialize, Serialize};
use serde_json::json;
use xxhash_rust::xxh3::Xxh3;

use crate::embed::Embeddings;
use crate::markers;
use search::{Found, Pair};
use trainer::font::Captioner;

/// Which pair search `dedup` runs within the set.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexKind {
    /// Exact up to --exact-max records, HNSW beyond.
    Auto,
    Exact,
    Hnsw,
}

/// Command-line options of `data-prep dedup`.
#[derive(clap::Args, Debug, Clone)]
pub struct DedupArgs {
    /// The training set's embeddings (a `data-prep embed` output folder).
    #[arg(long)]
    pub embeddings: PathBuf,
    /// An evaluation set's embeddings: training records near any of its images are dropped.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Cosine similarity at and above which two images are duplicates, in (−1, 1].
    #[arg(long, default_value_t = 0.94, allow_hyphen_values = true)]
    pub threshold: f32,
    /// Output folder: shards/, removed.jsonl, pairs.png, report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Only drop records near the evaluation set; no search within the set.
    #[arg(long, requires = "against")]
    pub skip_within: bool,
    /// The within-set search.
    #[arg(long, value_enum, default_value_t = IndexKind::Auto)]
    pub index: IndexKind,
    /// The largest set searched exactly with --index auto (n²/2 similarities: 5·10⁹ at the
    /// default, about 5 minutes at D = 512 on two cores; beyond it the HNSW index is cheaper,
    /// docs/dedup.md).
    #[arg(long, default_value_t = 100_000)]
    pub exact_max: usize,
    /// Neighbours looked up per record in the HNSW index.
    #[arg(long, default_value_t = 16)]
    pub neighbours: usize,
    /// Pairs listed in the report and drawn in pairs.png.
    #[arg(long, default_value_t = 16)]
    pub top: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// A record's address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRef {
    /// `train` or `eval`.
    pub set: String,
    pub shard: String,
    pub record: u64,
}

/// Why a record was dropped: the record it duplicates and their similarity.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Removal {
    pub shard: String,
    pub record: u64,
    /// `eval` (near the evaluation set) or `duplicate` (a kept record of the training set is).
    pub reason: String,
    /// The evaluation image it matches, or the record its component keeps.
    pub kept: RecordRef,
    /// Its highest similarity to the evaluation set, or to any record of its component.
    pub similarity: f32,
}

/// A filtered shard's done marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    source: String,
    source_index_crc: u32,
    records: u64,
    kept: u64,
    /// xxh3-128 of the kept record indices (u64 little-endian), hex.
    kept_xxh3: String,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct DedupSummary {
    pub records: u64,
    pub kept: u64,
    pub removed_eval: u64,
    pub removed_duplicate: u64,
    pub pairs: usize,
    pub compared: u64,
    pub pairs_per_s: f64,
    pub index: &'static str,
    pub shards_written: usize,
    pub shards_reused: usize,
}

fn check_threshold(t: f32) -> Result<()> {
    ensure!(
        t > -1.0 && t <= 1.0,
        "--threshold {t} is outside (-1, 1]: cosine similarities lie in [-1, 1], and -1 would \
         mark every pair"
    );
    Ok(())
}

/// The sorted distinct image sides of a set.
fn resolutions(e: &Embeddings) -> Vec<u32> {
    let mut r: Vec<u32> = e.manifest.shards.iter().map(|s| s.resolution).collect();
    r.sort_unstable();
    r.dedup();
    r
}

/// Refuses an evaluation set that the training set's embeddings cannot be compared with.
fn check_against(train: &Embeddings, eval: &Embeddings) -> Result<()> {
    let (tm, em) = (
        train.dir.join("manifest.json"),
        eval.dir.join("manifest.json"),
    );
    ensure!(
        train.dim() == eval.dim(),
        "{} has embeddings of size {} but {} has size {}: both sets must be embedded by one model",
        em.display(),
        eval.dim(),
        tm.display(),
        train.dim()
    );
    ensure!(
        train.manifest.weights_xxh3 == eval.manifest.weights_xxh3,
        "{} was embedded by {} (weights xxh3 {}) but {} by {} (weights xxh3 {}): embeddings of \
         two models are not comparable",
        em.display(),
        eval.manifest.model,
        eval.manifest.weights_xxh3,
        tm.display(),
        train.manifest.model,
        train.manifest.weights_xxh3
    );
    let (rt, re) = (resolutions(train), resolutions(eval));
    ensure!(
        rt == re,
        "{} holds images of {re:?} px but {} of {rt:?} px: compare sets of one resolution",
        em.display(),
        tm.display()
    );
    Ok(())
}

/// The source shards of `e`, opened and checked against the manifest.
fn open_sources(e: &Embeddings) -> Result<Vec<ImageShard>> {
    e.manifest
        .shards
        .iter()
        .map(|s| {
            let shard = ImageShard::open(&s.source).with_context(|| {
                format!(
                    "opening {}, the source of shard {} in {}",
                    s.source.display(),
                    s.name,
                    e.dir.join("manifest.json").display()
                )
            })?;
            ensure!(
                shard.len() == s.records && shard.header().index_crc == s.source_index_crc,
                "{} has changed since it was embedded into {} ({} records, index crc {:#010x}; \
                 now {} records, {:#010x}): rerun `data-prep embed`",
                s.source.display(),
                e.dir.display(),
                s.records,
                s.source_index_crc,
                shard.len(),
                shard.header().index_crc
            );
            Ok(shard)
        })
        .collect()
}

/// Runs the dedup; see the module doc.
pub fn run(a: &DedupArgs) -> Result<DedupSummary> {
    check_threshold(a.threshold)?;
    ensure!(a.neighbours >= 1, "--neighbours must be at least 1");
    let train = Embeddings::open(&a.embeddings)
        .with_context(|| format!("--embeddings {}", a.embeddings.display()))?;
    let eval = match &a.against {
        Some(dir) => {
            let e =
                Embeddings::open(dir).with_context(|| format!("--against {}", dir.display()))?;
            check_against(&train, &e)?;
            Some(e)
        }
        None => None,
    };
    let sources = open_sources(&train)?;
    let eval_sources = match &eval {
        Some(e) => open_sources(e)?,
        None => Vec::new(),
    };
    let (n, d, t) = (train.len(), train.dim(), a.threshold);
    let name = |e: &Embeddings, g: usize, set: &str| {
        let (s, r) = e.locate(g);
        RecordRef {
            set: set.into(),
            shard: e.manifest.shards[s].name.clone(),
            record: r,
        }
    };

    // 1. Against the evaluation set.
    let start = Instant::now();
    let mut removed: Vec<Option<Removal>> = vec![None; n];
    let mut closest: Vec<(RecordRef, RecordRef, f32)> = Vec::new();
    let mut closest_below: Option<(RecordRef, RecordRef, f32)> = None;
    let mut compared = 0u64;
    if let Some(e) = &eval {
        let best = search::best_matches(&train.vectors, &e.vectors, d);
        compared += (n * e.len()) as u64;
        for (g, b) in best.into_iter().enumerate() {
            let Some((j, sim)) = b else { continue };
            let (me, other) = (name(&train, g, "train"), name(e, j as usize, "eval"));
            if sim >= t {
                closest.push((me.clone(), other.clone(), sim));
                removed[g] = Some(Removal {
                    shard: me.shard,
                    record: me.record,
                    reason: "eval".into(),
                    kept: other,
                    similarity: sim,
                });
            } else if closest_below.as_ref().is_none_or(|c| sim > c.2) {
                closest_below = Some((me, other, sim));
            }
        }
    }
    let removed_eval = removed.iter().filter(|r| r.is_some()).count() as u64;

    // 2. Within the set, over the records still kept.
    let survivors: Vec<usize> = (0..n).filter(|&g| removed[g].is_none()).collect();
    let use_hnsw = match a.index {
        IndexKind::Exact => false,
        IndexKind::Hnsw => true,
        IndexKind::Auto => survivors.len() > a.exact_max,
    };
    let index = if a.skip_within {
        "none"
    } else if use_hnsw {
        "hnsw"
    } else {
        "exact"
    };
    let mut pairs_found = 0;
    if !a.skip_within {
        let mut x = Vec::with_capacity(survivors.len() * d);
        for &g in &survivors {
            x.extend_from_slice(&train.vectors[g * d..(g + 1) * d]);
        }
        let found: Found = if use_hnsw {
            search::hnsw_pairs(&x, d, t, a.neighbours)?
        } else {
            search::exact_pairs(&x, d, t)
        };
        compared += found.compared;
        pairs_found = found.pairs.len();
        let global = |p: &Pair| (survivors[p.a as usize], survivors[p.b as usize]);
        if let Some(p) = found.closest_below {
            let (ga, gb) = global(&p);
            if closest_below.as_ref().is_none_or(|c| p.sim > c.2) {
                closest_below = Some((name(&train, ga, "train"), name(&train, gb, "train"), p.sim));
            }
        }
        let roots = search::components(survivors.len(), &found.pairs);
        // Each dropped record's highest similarity within its component.
        let mut best = vec![f32::NEG_INFINITY; survivors.len()];
        for p in &found.pairs {
            let (ga, gb) = global(p);
            closest.push((name(&train, ga, "train"), name(&train, gb, "train"), p.sim));
            for i in [p.a, p.b] {
                best[i as usize] = best[i as usize].max(p.sim);
            }
        }
        for (i, &root) in roots.iter().enumerate() {
            if root as usize != i {
                let me = name(&train, survivors[i], "train");
                removed[survivors[i]] = Some(Removal {
                    shard: me.shard,
                    record: me.record,
                    reason: "duplicate".into(),
                    kept: name(&train, survivors[root as usize], "train"),
                    similarity: best[i],
                });
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    closest.sort_by(|x, y| y.2.total_cmp(&x.2));
    closest.truncate(a.top);
    let removed_total = removed.iter().filter(|r| r.is_some()).count() as u64;

    // 3. Outputs: the filtered shards, resumable; then the lists, the picture and the report.
    let shard_dir = a.out.join("shards");
    std::fs::create_dir_all(&shard_dir)
        .with_context(|| format!("creating {}", shard_dir.display()))?;
    let bar = markers::progress("dedup", Some(n as u64), "records", !a.quiet);
    let (mut written, mut reused) = (0, 0);
    let mut per_shard = Vec::new();
    for (si, (src, entry)) in sources.iter().zip(&train.manifest.shards).enumerate() {
        let first = train.offsets[si] as usize;
        let keep: Vec<u64> = (0..entry.records)
            .filter(|&r| removed[first + r as usize].is_none())
            .collect();
        let mut h = Xxh3::new();
        for r in &keep {
            h.update(&r.to_le_bytes());
        }
        let marker = Marker {
            source: entry.name.clone(),
            source_index_crc: entry.source_index_crc,
            records: entry.records,
            kept: keep.len() as u64,
            kept_xxh3: format!("{:032x}", h.digest128()),
        };
        let out = shard_dir.join(format!(
            "{}.{}",
            entry.name,
            formats::image_shard::EXTENSION
        ));
        let mpath = markers::marker_path(&out);
        let done = markers::read::<Marker>(&mpath)?.as_ref() == Some(&marker)
            && ImageShard::open(&out).is_ok_and(|s| s.len() == marker.kept);
        if done {
            reused += 1;
        } else {
            markers::remove(&mpath)?;
            let mut w = ImageShardWriter::create(
                &out,
                src.resolution(),
                src.header().chunk_records,
                DEFAULT_LEVEL,
            )?;
            for &r in &keep {
                let rec = src.record(r)?;
                w.push(&rec.pixels, &rec.caption, rec.meta.as_deref())?;
            }
            w.finish()?;
            markers::write(&mpath, &marker)?;
            written += 1;
        }
        per_shard.push(json!({"name": entry.name, "records": entry.records, "kept": keep.len()}));
        bar.inc(entry.records);
    }
    bar.finish_and_clear();

    let mut lines = String::new();
    for r in removed.iter().flatten() {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    formats::fsutil::write_atomic(&a.out.join("removed.jsonl"), lines.as_bytes(), true)?;

    let png = if closest.is_empty() {
        None
    } else {
        let captioner = match trainer::font::find() {
            Some(path) => Some(Captioner::from_file(&path)?),
            None => {
                eprintln!(
                    "note: no TrueType font found (set {}): pairs.png without labels",
                    trainer::font::FONT_VAR
                );
                None
            }
        };
        let img = pairs_png(
            &closest,
            &train,
            &sources,
            eval.as_ref(),
            &eval_sources,
            captioner.as_ref(),
        )?;
        let path = a.out.join("pairs.png");
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding pairs.png")?;
        formats::fsutil::write_atomic(&path, &bytes, true)?;
        Some("pairs.png")
    };

    let pair_json =
        |(x, y, s): &(RecordRef, RecordRef, f32)| json!({"a": x, "b": y, "similarity": s});
    let summary = DedupSummary {
        records: n as u64,
        kept: n as u64 - removed_total,
        removed_eval,
        removed_duplicate: removed_total - removed_eval,
        pairs: pairs_found,
        compared,
        pairs_per_s: if secs > 0.0 {
            compared as f64 / secs
        } else {
            0.0
        },
        index,
        shards_written: written,
        shards_reused: reused,
    };
    let report = json!({
        "embeddings": a.embeddings,
        "against": a.against,
        "threshold": t,
        "index": index,
        "records": summary.records,
        "eval_records": eval.as_ref().map(Embeddings::len),
        "kept": summary.kept,
        "removed_eval": summary.removed_eval,
        "removed_duplicate": summary.removed_duplicate,
        "pairs_at_or_above_threshold": pairs_found,
        "similarities_computed": compared,
        "search_seconds": secs,
        "similarities_per_second": summary.pairs_per_s,
        "closest_pairs": closest.iter().map(pair_json).collect::<Vec<_>>(),
        "closest_below_threshold": closest_below.as_ref().map(pair_json),
        "pairs_png": png,
        "shards": per_shard,
    });
    markers::write(&a.out.join("report.json"), &report)?;
    Ok(summary)
}

/// Side of each image in pairs.png, and the gaps between them.
const CELL: u32 = 128;
const GAP: u32 = 8;

/// pairs.png: a header band, then per pair a band with its rank and cosine (shown at most 1), the
/// training image left and its match right (each scaled to `CELL`), each image's address under
/// it, and a `GAP` before the next pair. Without a font (`captioner` `None`) only the images,
/// `GAP` apart.
fn pairs_png(
    pairs: &[(RecordRef, RecordRef, f32)],
    train: &Embeddings,
    sources: &[ImageShard],
    eval: Option<&Embeddings>,
    eval_sources: &[ImageShard],
    captioner: Option<&Captioner>,
) -> Result<image::RgbImage> {
    let index = |e: &Embeddings| -> BTreeMap<String, usize> {
        e.manifest
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect()
    };
    let (ti, ei) = (index(train), eval.map(index).unwrap_or_default());
    let picture = |r: &RecordRef| -> Result<image::RgbImage> {
        let (shards, idx) = match r.set.as_str() {
            "eval" => (eval_sources, &ei),
            _ => (sources, &ti),
        };
        let Some(&s) = idx.get(&r.shard) else {
            bail!("no shard {} in the {} set", r.shard, r.set);
        };
        let shard = &shards[s];
        let rec = shard.record(r.record)?;
        let res = shard.resolution();
        let img = image::RgbImage::from_raw(res, res, rec.pixels)
            .with_context(|| format!("{} record {}", shard.path().display(), r.record))?;
        Ok(cell(&img))
    };
    let label = |r: &RecordRef| match r.set.as_str() {
        "eval" => format!("{} #{} (eval)", r.shard, r.record),
        _ => format!("{} #{}", r.shard, r.record),
    };
    let width = 2 * CELL + 3 * GAP;
    // Everything top to bottom, each piece at its left offset, then pasted onto one canvas.
    let mut pieces: Vec<(u32, image::RgbImage)> = Vec::new();
    let push_row = |pieces: &mut Vec<(u32, image::RgbImage)>, row: Vec<(u32, image::RgbImage)>| {
        let h = row.iter().map(|(_, img)| img.height()).max().unwrap_or(0);
        let mut band = image::RgbImage::from_pixel(width, h, image::Rgb([255; 3]));
        for (x, img) in row {
            image::imageops::replace(&mut band, &img, x as i64, 0);
        }
        pieces.push((0, band));
    };
    let gap = || image::RgbImage::from_pixel(width, GAP, image::Rgb([255; 3]));
    if let Some(c) = captioner {
        push_row(
            &mut pieces,
            vec![(
                GAP / 2,
                c.band(
                    "left: a training record; right: its match (eval: the evaluation set)",
                    width - GAP,
                ),
            )],
        );
    } else {
        pieces.push((0, gap()));
    }
    for (i, (x, y, sim)) in pairs.iter().enumerate() {
        if let Some(c) = captioner {
            // f16 vectors are unit length to 2·10⁻³, so a copy's cosine can read 1.0001.
            let title = format!("{}. cosine {:.4}", i + 1, sim.min(1.0));
            push_row(&mut pieces, vec![(GAP / 2, c.band(&title, width - GAP))]);
        }
        push_row(
            &mut pieces,
            vec![(GAP, picture(x)?), (2 * GAP + CELL, picture(y)?)],
        );
        match captioner {
            Some(c) => {
                push_row(
                    &mut pieces,
                    vec![
                        (GAP / 2, c.band(&label(x), CELL + GAP)),
                        (CELL + 3 * GAP / 2, c.band(&label(y), CELL + GAP)),
                    ],
                );
                pieces.push((0, gap()));
            }
            None => pieces.push((0, gap())),
        }
    }
    let height = pieces.iter().map(|(_, p)| p.height()).sum();
    let mut out = image::RgbImage::from_pixel(width, height, image::Rgb([255; 3]));
    let mut top = 0;
    for (x, p) in pieces {
        image::imageops::replace(&mut out, &p, x as i64, top as i64);
        top += p.height();
    }
    Ok(out)
}

/// `img` scaled to `CELL` × `CELL`: pixels repeated when enlarging (a small image stays sharp,
/// so exact and near copies can be told apart), averaged when shrinking.
fn cell(img: &image::RgbImage) -> image::RgbImage {
    let filter = match img.width() <= CELL {
        true => image::imageops::FilterType::Nearest,
        false => image::imageops::FilterType::Triangle,
    };
    image::imageops::resize(img, CELL, CELL, filter)
}

/// `data-prep dedup`: runs and prints a one-line summary.
pub fn main(a: DedupArgs) -> Result<()> {
    let s = run(&a)?;
    eprintln!(
        "dedup: {} records, {} kept, {} near the evaluation set, {} duplicates ({} pairs ≥ {}, \
         {} search, {:.3e} similarities/s); {} shards written, {} reused, in {}",
        s.records,
        s.kept,
        s.removed_eval,
        s.removed_duplicate,
        s.pairs,
        a.threshold,
        s.index,
        s.pairs_per_s,
        s.shards_written,
        s.shards_reused,
        a.out.display()
    );
    Ok(())
}
