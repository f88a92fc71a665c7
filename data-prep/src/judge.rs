//! `data-prep judge`: do pictures show what their captions ask for? Measured on the synthetic
//! shapes of [`crate::synth`] by pixel statistics, without a model.
//!
//! Per picture: the background is the palette background nearest to most border pixels; every
//! pixel is labelled with the nearest of that background and the shape colours (a shape is never
//! the background's colour, so that colour is left out); the dominant colour is the shape colour
//! with the most pixels, if it has at least `--min-area` of the picture (otherwise the picture
//! has no foreground and matches nothing). Its largest 8-connected region is compared with each
//! of the seven kinds drawn by synth's own [`crate::synth::inside`], placed and sized as the
//! region's bounding box implies for that kind; the kind with the highest intersection over
//! union is the shape class, and for a lone shape its fitted centre gives the position (synth's
//! 3×3 grid).
//!
//! Matches of a picture against a caption: `colour` (the dominant colour is one the caption
//! names), `shape` (its class is a kind the caption names), `both` (the caption names that
//! colour with that kind), `background`, and `position` (one-shape captions only). Beside each
//! rate: `chance`, what a uniform guess scores against these captions (named colours / 10,
//! named kinds / 7, named colour–kind pairs / 70, 1/4, 1/9), and `shuffled`, what these pictures
//! score against the other captions of the set: the rate of a model that draws as this one does
//! but ignores its caption.
//!
//! Inputs: a `trainer sample` output folder (its `index.json` pairs each picture with its
//! prompt), or any folder of `NAME.txt` captions each beside its picture `NAME.png` (the layout
//! `data-prep synth` writes), searched recursively.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::synth::{inside, position_phrase, BACKGROUNDS, COLOURS, KINDS, POSITIONS};

/// Each kind's extent around its centre in units of its radius (synth's `inside`): x from, x to,
/// y from, y to (y down).
const EXTENTS: [(&str, [f32; 4]); 7] = [
    ("circle", [-1.0, 1.0, -1.0, 1.0]),
    ("square", [-0.85, 0.85, -0.85, 0.85]),
    ("triangle", [-0.866, 0.866, -1.0, 0.5]),
    // Outer points at -90° + k·72°: x up to sin 72°, the lower two at y = sin 54°.
    ("star", [-0.951, 0.951, -1.0, 0.809]),
    ("cross", [-1.0, 1.0, -1.0, 1.0]),
    ("diamond", [-1.0, 1.0, -1.0, 1.0]),
    ("hexagon", [-1.0, 1.0, -0.866, 0.866]),
];

/// Captions compared with each picture for the shuffled baseline, at most.
const SHUFFLED_CAPTIONS: usize = 512;

/// Errors of `data-prep judge`; each names the file, and the record where there is one.
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
    #[error("{path}: cannot read the picture: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{caption}: its picture {image} is missing")]
    MissingImage { caption: String, image: PathBuf },
    #[error(
        "{at}: caption {caption:?} names no shape of a known colour and kind (a colour of {} \
         followed by a kind of {})",
        COLOURS.map(|c| c.0).join("/"),
        KINDS.join("/")
    )]
    Caption { at: String, caption: String },
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{0}: nothing to judge (no index.json, no NAME.txt caption beside a NAME.png)")]
    Empty(PathBuf),
    #[error("--min-area {0}: must be in (0, 1)")]
    MinArea(f64),
}

/// Command-line options of `data-prep judge`.
#[derive(clap::Args, Debug, Clone)]
pub struct JudgeArgs {
    /// A `trainer sample` output folder (its index.json pairs each picture with its prompt), or
    /// a folder searched recursively for NAME.txt captions, each beside its picture NAME.png
    /// (`data-prep synth`'s layout).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// Also write the report, every picture's judgement included, as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Smallest dominant colour, as a fraction of the picture's pixels: a picture with less of
    /// every shape colour has no foreground shape and matches nothing.
    #[arg(long, default_value_t = 0.004)]
    pub min_area: f64,
}

/// What a caption asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    /// (colour, kind) of each shape named, in caption order.
    pub shapes: Vec<(&'static str, &'static str)>,
    pub background: Option<&'static str>,
    /// The position phrase of a lone shape ("in the top left").
    pub position: Option<&'static str>,
}

fn known(names: impl IntoIterator<Item = &'static str>, word: &str) -> Option<&'static str> {
    names.into_iter().find(|n| *n == word)
}

/// Reads a caption in synth's wording: every colour word directly followed by a kind word is a
/// shape, `… on a BACKGROUND background` at the end the background, and for a lone shape the
/// words after it the position. `None` when no shape of a known colour and kind is named.
pub fn parse_caption(text: &str) -> Option<Caption> {
    let lower = text.to_lowercase();
    let mut words: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut background = None;
    if let [.., on, a, bg, last] = words.as_slice() {
        if *on == "on" && (*a == "a" || *a == "an") && *last == "background" {
            background = known(BACKGROUNDS.map(|b| b.0), bg);
            if background.is_some() {
                words.truncate(words.len() - 4);
            }
        }
    }
    let mut shapes = Vec::new();
    let mut after_last = 0;
    for i in 0..words.len().saturating_sub(1) {
        if let (Some(c), Some(k)) = (
            known(COLOURS.map(|c| c.0), words[i]),
            known(KINDS, words[i + 1]),
        ) {
            shapes.push((c, k));
            after_last = i + 2;
        }
    }
    if shapes.is_empty() {
        return None;
    }
    let position = match shapes.len() {
        1 => {
            let rest = words[after_last..].join(" ");
            POSITIONS.iter().flatten().copied().find(|p| *p == rest)
        }
        _ => None,
    };
    Some(Caption {
        shapes,
        background,
        position,
    })
}

/// The dominant colour's largest region and the kind that fits it best.
#[derive(Clone, Debug, Serialize)]
pub struct Region {
    pub colour: &'static str,
    pub kind: &'static str,
    /// Pixels of the dominant colour (all regions).
    pub pixels: usize,
    /// Intersection over union of the region with the fitted kind.
    pub iou: f32,
    /// The fitted kind's centre, in pixels.
    pub cx: f32,
    pub cy: f32,
    /// Its position phrase (as a lone shape there would be captioned).
    pub position: &'static str,
}

/// What a picture shows, as far as pixel statistics tell.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub background: &'static str,
    /// `None`: no shape colour covers `min_area` of the picture.
    pub dominant: Option<Region>,
}

fn dist2(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3)
        .map(|c| (a[c] as i32 - b[c] as i32).pow(2))
        .sum::<i32>()
}

fn nearest(rgb: [u8; 3], palette: &[[u8; 3]]) -> usize {
    (0..palette.len())
        .min_by_key(|&i| dist2(rgb, palette[i]))
        .unwrap_or(0)
}

/// Estimates the background, the dominant foreground colour and its shape class of `img`.
pub fn estimate(img: &image::RgbImage, min_area: f64) -> Estimate {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = |x: usize, y: usize| img.get_pixel(x as u32, y as u32).0;
    // Background: the palette background most border pixels are nearest to.
    let bgs = BACKGROUNDS.map(|b| b.1);
    let mut votes = [0usize; BACKGROUNDS.len()];
    for x in 0..w {
        votes[nearest(px(x, 0), &bgs)] += 1;
        votes[nearest(px(x, h - 1), &bgs)] += 1;
    }
    for y in 0..h {
        votes[nearest(px(0, y), &bgs)] += 1;
        votes[nearest(px(w - 1, y), &bgs)] += 1;
    }
    let bg = (0..votes.len())
        .max_by_key(|&i| (votes[i], usize::MAX - i))
        .unwrap_or(0);
    let (bg_name, bg_rgb) = BACKGROUNDS[bg];

    // Labels: 0 the background, 1 + c shape colour c (the background's own name left out).
    let colours: Vec<usize> = (0..COLOURS.len())
        .filter(|&c| COLOURS[c].0 != bg_name)
        .collect();
    let palette: Vec<[u8; 3]> = std::iter::once(bg_rgb)
        .chain(colours.iter().map(|&c| COLOURS[c].1))
        .collect();
    let labels: Vec<usize> = img.pixels().map(|p| nearest(p.0, &palette)).collect();
    let mut counts = vec![0usize; palette.len()];
    for &l in &labels {
        counts[l] += 1;
    }
    let dominant = (1..palette.len()).max_by_key(|&l| (counts[l], usize::MAX - l));
    let dominant = dominant.filter(|&l| counts[l] as f64 >= min_area * (w * h) as f64);
    let Some(label) = dominant else {
        return Estimate {
            background: bg_name,
            dominant: None,
        };
    };
    let region = largest_region(&labels, w, h, label);
    let (kind, iou, cx, cy) = fit_kind(&region, w, h);
    Estimate {
        background: bg_name,
        dominant: Some(Region {
            colour: COLOURS[colours[label - 1]].0,
            kind,
            pixels: counts[label],
            iou,
            cx,
            cy,
            position: position_phrase(cx / w as f32, cy / h as f32, 1.0),
        }),
    }
}

/// The largest 8-connected set of pixels labelled `label`, as a mask.
fn largest_region(labels: &[usize], w: usize, h: usize, label: usize) -> Vec<bool> {
    let mut seen = vec![false; labels.len()];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || labels[start] != label {
            continue;
        }
        seen[start] = true;
        let (mut stack, mut members) = (vec![start], Vec::new());
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for (dx, dy) in [
                (-1, -1),
                (0, -1),
                (1, -1),
                (-1, 0),
                (1, 0),
                (-1, 1),
                (0, 1),
                (1, 1),
            ] {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if !seen[j] && labels[j] == label {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        if members.len() > best.len() {
            best = members;
        }
    }
    let mut mask = vec![false; labels.len()];
    for i in best {
        mask[i] = true;
    }
    mask
}

/// The kind whose outline, placed and sized to the mask's bounding box, overlaps the mask best:
/// (kind, intersection over union, centre x, centre y).
fn fit_kind(mask: &[bool], w: usize, h: usize) -> (&'static str, f32, f32, f32) {
    let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
    let mut area = 0usize;
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i % w, i / w);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        area += 1;
    }
    const SS: usize = 4;
    let mut best = ("circle", -1.0f32, 0.0, 0.0);
    for (kind, [ex0, ex1, ey0, ey1]) in EXTENTS {
        let (bw, bh) = ((x1 + 1 - x0) as f32, (y1 + 1 - y0) as f32);
        let r = (bw / (ex1 - ex0) + bh / (ey1 - ey0)) / 2.0;
        let cx = (x0 + x1 + 1) as f32 / 2.0 - (ex0 + ex1) / 2.0 * r;
        let cy = (y0 + y1 + 1) as f32 / 2.0 - (ey0 + ey1) / 2.0 * r;
        // The template cannot reach past 1.2 r of its centre; the mask lies in its bounding box.
        let lo = |c: f32, m: usize| (c - 1.2 * r - 1.0).floor().max(0.0).min(m as f32) as usize;
        let hi = |c: f32, m: usize| ((c + 1.2 * r + 1.0).ceil().max(0.0) as usize).min(m);
        let (wx0, wx1) = (lo(cx, x0).min(x0), hi(cx, w).max(x1 + 1));
        let (wy0, wy1) = (lo(cy, y0).min(y0), hi(cy, h).max(y1 + 1));
        let (mut inter, mut template) = (0usize, 0usize);
        for py in wy0..wy1 {
            for px in wx0..wx1 {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let x = (px as f32 + (sx as f32 + 0.5) / SS as f32 - cx) / r;
                        let y = (py as f32 + (sy as f32 + 0.5) / SS as f32 - cy) / r;
                        hits += inside(kind, x, y) as usize;
                    }
                }
                if 2 * hits >= SS * SS {
                    template += 1;
                    inter += mask[py * w + px] as usize;
                }
            }
        }
        let iou = inter as f32 / (template + area - inter).max(1) as f32;
        if iou > best.1 {
            best = (kind, iou, cx, cy);
        }
    }
    best
}

/// A picture's matches against one caption (`None`: the caption does not say).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Matches {
    pub colour: bool,
    pub shape: bool,
    pub both: bool,
    pub background: Option<bool>,
    pub position: Option<bool>,
}

/// Compares what a picture shows with what a caption asks for.
pub fn judge(e: &Estimate, c: &Caption) -> Matches {
    let d = e.dominant.as_ref();
    Matches {
        colour: d.is_some_and(|d| c.shapes.iter().any(|s| s.0 == d.colour)),
        shape: d.is_some_and(|d| c.shapes.iter().any(|s| s.1 == d.kind)),
        both: d.is_some_and(|d| c.shapes.contains(&(d.colour, d.kind))),
        background: c.background.map(|b| b == e.background),
        position: c.position.map(|p| d.is_some_and(|d| d.position == p)),
    }
}

/// Metric names, in report order.
pub const METRICS: [&str; 5] = ["colour", "shape", "both", "background", "position"];

fn distinct<T: PartialEq>(items: impl Iterator<Item = T>) -> usize {
    let mut seen = Vec::new();
    for i in items {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    seen.len()
}

/// Per metric: (whether the caption says, matched, uniform chance of a match).
fn per_metric(m: &Matches, c: &Caption) -> [(bool, bool, f64); 5] {
    let named = |n: usize, of: usize| n as f64 / of as f64;
    [
        (
            true,
            m.colour,
            named(distinct(c.shapes.iter().map(|s| s.0)), COLOURS.len()),
        ),
        (
            true,
            m.shape,
            named(distinct(c.shapes.iter().map(|s| s.1)), KINDS.len()),
        ),
        (
            true,
            m.both,
            named(distinct(c.shapes.iter()), COLOURS.len() * KINDS.len()),
        ),
        (
            m.background.is_some(),
            m.background == Some(true),
            1.0 / BACKGROUNDS.len() as f64,
        ),
        (
            m.position.is_some(),
            m.position == Some(true),
            1.0 / POSITIONS.len().pow(2) as f64,
        ),
    ]
}

/// One metric's rate with its chance levels.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rate {
    /// Pictures whose caption says (every picture, but background and position).
    pub judged: usize,
    pub matched: usize,
    /// matched / judged (0 when nothing was judged).
    pub rate: f64,
    /// A uniform guess's expected rate against the same captions.
    pub chance: f64,
    /// The rate of the same pictures against the set's other captions (`None`: one caption).
    pub shuffled: Option<f64>,
}

/// One picture's judgement.
#[derive(Clone, Debug, Serialize)]
pub struct Judged {
    pub file: PathBuf,
    pub caption: String,
    #[serde(flatten)]
    pub estimate: Estimate,
    pub matches: Matches,
}

/// The report `data-prep judge` prints and writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub images: PathBuf,
    pub pictures: usize,
    /// Distinct captions.
    pub captions: usize,
    /// Pictures without a foreground shape (no shape colour covers `min_area`).
    pub undrawn: usize,
    pub min_area: f64,
    /// Keyed by [`METRICS`].
    pub rates: std::collections::BTreeMap<String, Rate>,
    pub judged: Vec<Judged>,
}

/// The (picture, caption, where the caption came from) pairs under `dir`.
fn pairs(dir: &Path) -> Result<Vec<(PathBuf, String, String)>, JudgeError> {
    let index = dir.join("index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            prompts: Vec<String>,
            files: Vec<Vec<PathBuf>>,
        }
        let bytes = std::fs::read(&index).map_err(formats::fsutil::fs_err("read", &index))?;
        let idx: Index = serde_json::from_slice(&bytes).map_err(|e| JudgeError::Index {
            path: index.clone(),
            message: format!("not a `trainer sample` index: {e}"),
        })?;
        if idx.prompts.len() != idx.files.len() {
            return Err(JudgeError::Index {
                path: index,
                message: format!(
                    "{} prompts but {} lists of files",
                    idx.prompts.len(),
                    idx.files.len()
                ),
            });
        }
        let mut out = Vec::new();
        for (i, (prompt, files)) in idx.prompts.iter().zip(&idx.files).enumerate() {
            // The first file is the prompt's grid; the rest are its pictures, named relative to
            // wherever `trainer sample` ran, so they are looked up in `dir` by name.
            for f in files.iter().skip(1) {
                let name = f.file_name().ok_or_else(|| JudgeError::Index {
                    path: index.clone(),
                    message: format!("prompt {i}: file {} has no name", f.display()),
                })?;
                let at = format!("{}, prompt {i}", index.display());
                out.push((dir.join(name), prompt.clone(), at));
            }
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(|e| {
            let io = e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("filesystem loop"));
            formats::fsutil::fs_err("walk", dir)(io)
        })?;
        let path = entry.path();
        if !entry.file_type().is_file() || path.extension().is_none_or(|e| e != "txt") {
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(formats::fsutil::fs_err("read", path))?;
        out.push((
            path.with_extension("png"),
            text.trim().to_string(),
            path.display().to_string(),
        ));
    }
    Ok(out)
}

/// Judges every picture under `dir` against its caption.
pub fn run(dir: &Path, min_area: f64) -> Result<Report, JudgeError> {
    if !(min_area > 0.0 && min_area < 1.0) {
        return Err(JudgeError::MinArea(min_area));
    }
    let pairs = pairs(dir)?;
    if pairs.is_empty() {
        return Err(JudgeError::Empty(dir.to_path_buf()));
    }
    // Every caption is read, and every picture found, before any is judged.
    let mut texts: Vec<String> = Vec::new();
    let mut caption_of: HashMap<String, usize> = HashMap::new();
    let mut captions = Vec::new();
    let mut which = Vec::with_capacity(pairs.len());
    for (image, text, at) in &pairs {
        let id = match caption_of.get(text) {
            Some(&id) => id,
            None => {
                let c = parse_caption(text).ok_or_else(|| JudgeError::Caption {
                    at: at.clone(),
                    caption: text.clone(),
                })?;
                captions.push(c);
                texts.push(text.clone());
                caption_of.insert(text.clone(), captions.len() - 1);
                captions.len() - 1
            }
        };
        if !image.is_file() {
            return Err(JudgeError::MissingImage {
                caption: at.clone(),
                image: image.clone(),
            });
        }
        which.push(id);
    }
    let estimates: Vec<Estimate> = pairs
        .par_iter()
        .map(|(image, _, _)| {
            let img = image::open(image).map_err(|source| JudgeError::Image {
                path: image.clone(),
                source,
            })?;
            Ok(estimate(&img.to_rgb8(), min_area))
        })
        .collect::<Result<_, JudgeError>>()?;

    // [metric] → (judged, matched, chance sum, shuffled judged, shuffled matched)
    let mut tally = [(0usize, 0usize, 0f64, 0usize, 0usize); 5];
    let mut judged = Vec::with_capacity(pairs.len());
    let others = (captions.len() - 1).min(SHUFFLED_CAPTIONS);
    for ((e, &id), (image, text, _)) in estimates.iter().zip(&which).zip(&pairs) {
        let c = &captions[id];
        let m = judge(e, c);
        for (t, (says, hit, chance)) in tally.iter_mut().zip(per_metric(&m, c)) {
            if says {
                t.0 += 1;
                t.1 += hit as usize;
                t.2 += chance;
            }
        }
        for k in 1..=others {
            let other = &captions[(id + k) % captions.len()];
            let m = judge(e, other);
            for (t, (says, hit, _)) in tally.iter_mut().zip(per_metric(&m, other)) {
                if says {
                    t.3 += 1;
                    t.4 += hit as usize;
                }
            }
        }
        judged.push(Judged {
            file: image.clone(),
            caption: text.clone(),
            estimate: e.clone(),
            matches: m,
        });
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let rates = METRICS
        .iter()
        .zip(tally)
        .map(|(name, (n, hit, chance, sn, shit))| {
            let rate = Rate {
                judged: n,
                matched: hit,
                rate: ratio(hit, n),
                chance: if n == 0 { 0.0 } else { chance / n as f64 },
                shuffled: (others > 0 && sn > 0).then(|| ratio(shit, sn)),
            };
            (name.to_string(), rate)
        })
        .collect();
    Ok(Report {
        images: dir.to_path_buf(),
        pictures: pairs.len(),
        captions: captions.len(),
        undrawn: estimates.iter().filter(|e| e.dominant.is_none()).count(),
        min_area,
        rates,
        judged,
    })
}

/// The report's rates as a table, one metric a line.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "judge: {} pictures of {} captions in {} ({} without a foreground shape)\n",
        r.pictures,
        r.captions,
        r.images.display(),
        r.undrawn
    );
    s += "  metric       rate           chance  shuffled\n";
    for name in METRICS {
        let Some(m) = r.rates.get(name) else { continue };
        let shuffled = m
            .shuffled
            .map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
        s += &format!(
            "  {name:<10} {:>6.1}% {:>9}  {:>6.1}%  {shuffled:>7}\n",
            100.0 * m.rate,
            format!("({}/{})", m.matched, m.judged),
            100.0 * m.chance,
        );
    }
    s
}

/// `data-prep judge`: prints the rates (and writes the report with `--out`).
pub fn main(a: JudgeArgs) -> anyhow::Result<()> {
    let report = run(&a.images, a.min_area)?;
    if let Some(out) = &a.out {
        let json = serde_json::to_vec_pretty(&report)?;
        formats::fsutil::write_atomic(out, &json, true)?;
    }
    print!("{}", summary(&report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_are_read_as_synth_writes_them() {
        let c = parse_caption("a small red circle in the top left on a white background").unwrap();
        assert_eq!(c.shapes, vec![("red", "circle")]);
        assert_eq!(c.background, Some("white"));
        assert_eq!(c.position, Some("in the top left"));
        let c = parse_caption("a large blue star above a medium black cross on a gray background")
            .unwrap();
        assert_eq!(c.shapes, vec![("blue", "star"), ("black", "cross")]);
        assert_eq!((c.background, c.position), (Some("gray"), None));
        // A black background is not a shape's colour.
        let c = parse_caption("A pink hexagon on a black background").unwrap();
        assert_eq!(c.shapes, vec![("pink", "hexagon")]);
        assert_eq!(c.background, Some("black"));
        assert_eq!(c.position, None);
        assert_eq!(parse_caption("a photo of a dog"), None);
        assert_eq!(
            parse_caption("a red square-ish blob").map(|c| c.shapes.len()),
            Some(1)
        );
        assert_eq!(parse_caption("red"), None);
    }

    #[test]
    fn every_kind_is_told_from_the_others_at_64_px() {
        // Every kind, colour and size drawn alone by synth's own `draw`, on every background it
        // allows: the estimate names the colour and background always, and the kind nearly
        // always (the misses, where there are any, are small shapes a dozen pixels across).
        let (mut n, mut kinds) = (0, 0);
        for (k, kind) in KINDS.iter().enumerate() {
            for (c, (colour, rgb)) in COLOURS.iter().enumerate() {
                for (z, (_, size)) in crate::synth::SIZES.iter().enumerate() {
                    let (bg_name, bg) = BACKGROUNDS[(k + c + z) % BACKGROUNDS.len()];
                    if bg_name == *colour {
                        continue;
                    }
                    let mut pixels = bg.repeat(64 * 64);
                    let shape = crate::synth::Shape {
                        kind,
                        colour,
                        size: "small",
                        // Off the pixel grid, a large one's margin inside the picture.
                        cx: 14.5 + 35.0 * (c * 3 + z) as f32 / 29.0,
                        cy: 20.3 + 23.0 * k as f32 / 6.0,
                        radius: size * 64.0,
                    };
                    crate::synth::draw(&mut pixels, 64, &shape, *rgb);
                    let img = image::RgbImage::from_raw(64, 64, pixels).unwrap();
                    let e = estimate(&img, 0.004);
                    let d = e.dominant.as_ref().unwrap();
                    assert_eq!((d.colour, e.background), (*colour, bg_name), "{shape:?}");
                    n += 1;
                    kinds += (d.kind == *kind) as usize;
                }
            }
        }
        assert!(n >= 190, "{n}");
        assert!(
            kinds as f64 >= 0.97 * n as f64,
            "{kinds} of {n} kinds recognised"
        );
    }

    #[test]
    fn a_blank_picture_has_no_foreground_and_matches_nothing() {
        let img = image::RgbImage::from_pixel(32, 32, image::Rgb(BACKGROUNDS[2].1));
        let e = estimate(&img, 0.004);
        assert_eq!(e.background, "beige");
        assert!(e.dominant.is_none());
        let c = parse_caption("a large green square on a beige background").unwrap();
        let m = judge(&e, &c);
        assert!(!m.colour && !m.shape && !m.both);
        assert_eq!(m.background, Some(true));
    }
}
