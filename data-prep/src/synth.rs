//! `data-prep synth`: a deterministic captioned shapes dataset, the quickstart's data.
//!
//! Each sample is one or two shapes (seven kinds, ten colours, three sizes) on one of four
//! background colours, with a caption that states what is drawn and where:
//! "a small red circle in the top left on a white background",
//! "a large blue star above a medium yellow cross on a gray background". The relation between two
//! shapes is derived from their drawn positions, and shapes are placed so that it is unambiguous
//! (they do not overlap along the axis the relation names).
//!
//! Shapes are drawn with anti-aliasing (4×4 supersampling of each edge pixel's coverage) straight
//! into an RGB buffer. Sample `i` depends only on `(seed, i)` (a ChaCha8 stream per sample), so the
//! output is the same bytes on every rerun and with any number of threads.
//!
//! Output is img2dataset's `files` layout: `DIR/00000/000000000.png` + `.txt` (the caption) +
//! `.json` (`key`, `caption`, `width`, `height`, `status`, and the drawn `shapes`), 10 000 samples
//! per folder, and `DIR/synth.json` (the parameters) written last.

use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

/// Samples per folder of the `files` layout.
pub const PER_FOLDER: u64 = 10_000;

/// Shape kinds.
pub const KINDS: [&str; 7] = [
    "circle", "square", "triangle", "star", "cross", "diamond", "hexagon",
];

/// Shape colours: name and sRGB value.
pub const COLOURS: [(&str, [u8; 3]); 10] = [
    ("red", [220, 30, 30]),
    ("green", [30, 160, 50]),
    ("blue", [30, 70, 220]),
    ("yellow", [245, 215, 20]),
    ("orange", [245, 140, 20]),
    ("purple", [130, 40, 170]),
    ("pink", [245, 130, 190]),
    ("cyan", [30, 200, 220]),
    ("brown", [120, 70, 30]),
    ("black", [15, 15, 15]),
];

/// Background colours: name and sRGB value.
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] = [
    ("white", [250, 250, 250]),
    ("gray", [128, 128, 128]),
    ("beige", [235, 222, 190]),
    ("black", [10, 10, 10]),
];

/// Size names and the shape's half-extent as a fraction of the image side.
pub const SIZES: [(&str, f32); 3] = [("small", 0.09), ("medium", 0.14), ("large", 0.2)];

/// Position phrases of a lone shape: the cells of a 3×3 grid, by row then column.
pub const POSITIONS: [[&str; 3]; 3] = [
    ["in the top left", "at the top", "in the top right"],
    ["on the left", "in the center", "on the right"],
    ["in the bottom left", "at the bottom", "in the bottom right"],
];

/// Errors of `data-prep synth`; each names the file or the parameter.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
    #[error("cannot encode {path} as PNG: {source}")]
    Png {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("--{field} {value}: {reason}")]
    BadParam {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SynthError {
    let fs_err = formats::fsutil::fs_err(action, path);
    move |source| SynthError::Io(fs_err(source))
}

/// One drawn shape, as recorded in the sample's `.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Shape {
    pub kind: &'static str,
    pub colour: &'static str,
    pub size: &'static str,
    /// Centre in pixels (x to the right, y down).
    pub cx: f32,
    pub cy: f32,
    /// Half-extent in pixels.
    pub radius: f32,
}

/// One generated sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// `[R, R, 3]` RGB, row-major.
    pub pixels: Vec<u8>,
    pub caption: String,
    pub background: &'static str,
    pub shapes: Vec<Shape>,
}

#[derive(Serialize)]
struct SampleJson<'a> {
    key: &'a str,
    caption: &'a str,
    width: u32,
    height: u32,
    status: &'static str,
    background: &'static str,
    shapes: &'a [Shape],
}

/// The sample's file stem: `00000/000000000`-style folder and key.
pub fn key_of(index: u64) -> (String, String) {
    (format!("{:05}", index / PER_FOLDER), format!("{index:09}"))
}

/// The caption's position phrase of a lone shape centred at `(cx, cy)`: its cell of a 3×3 grid.
pub fn position_phrase(cx: f32, cy: f32, res: f32) -> &'static str {
    let col = ((cx / res * 3.0) as usize).min(2);
    let row = ((cy / res * 3.0) as usize).min(2);
    POSITIONS[row][col]
}

/// The relation of shape `a` to shape `b` from their centres: the axis with the larger offset.
pub fn relation(a: &Shape, b: &Shape) -> &'static str {
    let (dx, dy) = (a.cx - b.cx, a.cy - b.cy);
    if dy.abs() >= dx.abs() {
        if dy < 0.0 {
            "above"
        } else {
            "below"
        }
    } else if dx < 0.0 {
        "to the left of"
    } else {
        "to the right of"
    }
}

fn describe(s: &Shape) -> String {
    format!("a {} {} {}", s.size, s.colour, s.kind)
}

/// Generates sample `index` of the dataset with this `seed` at `resolution` (pure function).
pub fn sample(seed: u64, index: u64, resolution: u32) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let res = resolution as f32;
    let bg = rng.random_range(0..BACKGROUNDS.len());
    let two = rng.random_bool(0.6);
    let mut shapes: Vec<Shape> = Vec::new();
    let mut used_colours = Vec::new();
    for n in 0..(1 + two as usize) {
        let mut colour;
        loop {
            colour = rng.random_range(0..COLOURS.len());
            // Not the background's colour and not the first shape's colour.
            if COLOURS[colour].0 != BACKGROUNDS[bg].0 && !used_colours.contains(&colour) {
                break;
            }
        }
        used_colours.push(colour);
        let size = rng.random_range(0..SIZES.len());
        let kind = rng.random_range(0..KINDS.len());
        let radius = SIZES[size].1 * res;
        let margin = radius + 0.02 * res;
        let place = |rng: &mut ChaCha8Rng| {
            (
                rng.random_range(margin..=res - margin),
                rng.random_range(margin..=res - margin),
            )
        };
        let (mut cx, mut cy) = place(&mut rng);
        if n == 1 {
            let a = &shapes[0];
            // Retry until the shapes are apart along the dominant axis (an unambiguous relation).
            let mut ok = false;
            for _ in 0..200 {
                let (dx, dy) = ((cx - a.cx).abs(), (cy - a.cy).abs());
                let need = a.radius + radius + 0.02 * res;
                if dx.max(dy) >= need && (dx - dy).abs() >= 0.1 * res {
                    ok = true;
                    break;
                }
                (cx, cy) = place(&mut rng);
            }
            if !ok {
                // Fall back to a fixed side-by-side layout that always fits.
                (cx, cy) = (res - margin, a.cy);
                if (cx - a.cx).abs() < a.radius + radius {
                    cx = margin;
                }
            }
        }
        shapes.push(Shape {
            kind: KINDS[kind],
            colour: COLOURS[colour].0,
            size: SIZES[size].0,
            cx,
            cy,
            radius,
        });
    }
    let background = BACKGROUNDS[bg].0;
    let caption = match shapes.as_slice() {
        [a] => format!(
            "{} {} on a {background} background",
            describe(a),
            position_phrase(a.cx, a.cy, res)
        ),
        [a, b] => format!(
            "{} {} {} on a {background} background",
            describe(a),
            relation(a, b),
            describe(b)
        ),
        _ => unreachable!("one or two shapes"),
    };
    let mut pixels = Vec::with_capacity((resolution * resolution * 3) as usize);
    for _ in 0..resolution * resolution {
        pixels.extend_from_slice(&BACKGROUNDS[bg].1);
    }
    for s in &shapes {
        let rgb = COLOURS
            .iter()
            .find(|c| c.0 == s.colour)
            .map_or([0, 0, 0], |c| c.1);
        draw(&mut pixels, resolution, s, rgb);
    }
    Sample {
        pixels,
        caption,
        background,
        shapes,
    }
}

/// Whether the point `(x, y)`, relative to the shape's centre in units of its radius, is inside.
pub fn inside(kind: &str, x: f32, y: f32) -> bool {
    match kind {
        "circle" => x * x + y * y <= 1.0,
        "square" => x.abs() <= 0.85 && y.abs() <= 0.85,
        "diamond" => x.abs() + y.abs() <= 1.0,
        "cross" => (x.abs() <= 1.0 && y.abs() <= 0.33) || (y.abs() <= 1.0 && x.abs() <= 0.33),
        "triangle" => {
            // Equilateral, pointing up, centroid at the origin, circumradius 1: apex (0, -1),
            // base at y = 0.5 from x = -0.866 to 0.866.
            (-1.0..=0.5).contains(&y) && x.abs() <= (y + 1.0) / 1.5 * 0.866
        }
        "hexagon" => {
            let (ax, ay) = (x.abs(), y.abs());
            ay <= 0.866 && 0.866 * ax + 0.5 * ay <= 0.866
        }
        "star" => star_inside(x, y),
        _ => false,
    }
}

fn star_inside(x: f32, y: f32) -> bool {
    // Five-pointed star: a polygon of 10 vertices, outer radius 1, inner 0.45, point up.
    let mut pts = [(0.0f32, 0.0f32); 10];
    for (i, p) in pts.iter_mut().enumerate() {
        let r = if i % 2 == 0 { 1.0 } else { 0.45 };
        let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
        *p = (r * a.cos(), r * a.sin());
    }
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let ((xi, yi), (xj, yj)) = (pts[i], pts[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Draws `s` in `rgb` over `pixels` with 4×4 supersampled coverage (anti-aliased edges).
pub fn draw(pixels: &mut [u8], res: u32, s: &Shape, rgb: [u8; 3]) {
    const SS: usize = 4;
    let lo = |c: f32| ((c - s.radius - 1.0).floor().max(0.0)) as u32;
    let hi = |c: f32| ((c + s.radius + 1.0).ceil().min(res as f32)) as u32;
    for py in lo(s.cy)..hi(s.cy) {
        for px in lo(s.cx)..hi(s.cx) {
            let mut hits = 0;
            for sy in 0..SS {
                for sx in 0..SS {
                    let x = (px as f32 + (sx as f32 + 0.5) / SS as f32 - s.cx) / s.radius;
                    let y = (py as f32 + (sy as f32 + 0.5) / SS as f32 - s.cy) / s.radius;
                    hits += inside(s.kind, x, y) as u32;
                }
            }
            if hits == 0 {
                continue;
            }
            let a = hits as f32 / (SS * SS) as f32;
            let at = ((py * res + px) * 3) as usize;
            for c in 0..3 {
                let old = pixels[at + c] as f32;
                pixels[at + c] = (old + (rgb[c] as f32 - old) * a).round() as u8;
            }
        }
    }
}

/// Encodes `[R, R, 3]` RGB pixels as PNG bytes (deterministic).
pub fn encode_png(pixels: &[u8], res: u32, path: &Path) -> Result<Vec<u8>, SynthError> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(pixels, res, res, image::ExtendedColorType::Rgb8)
        .map_err(|source| SynthError::Png {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

/// Writes `bytes` to `path` through `<path>.tmp` and a rename (no partial file under the name).
fn write_atomic(path: &Path, bytes: &[u8], sync: bool) -> Result<(), SynthError> {
    formats::fsutil::write_atomic(path, bytes, sync).map_err(SynthError::Io)
}

/// What `synth` was asked for.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub count: u64,
    pub resolution: u32,
    pub seed: u64,
    pub out: PathBuf,
    pub progress: bool,
}

/// Command-line options of `data-prep synth`.
#[derive(clap::Args, Debug, Clone)]
pub struct SynthArgs {
    /// Number of samples.
    #[arg(long)]
    pub count: u64,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 256)]
    pub resolution: u32,
    /// Seed; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (img2dataset `files` layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `data-prep synth`: writes the dataset and prints a one-line summary.
pub fn main(a: SynthArgs) -> anyhow::Result<()> {
    let n = run(&SynthOptions {
        count: a.count,
        resolution: a.resolution,
        seed: a.seed,
        out: a.out.clone(),
        progress: !a.quiet,
    })?;
    eprintln!(
        "synth: {n} samples at {r}x{r} in {}",
        a.out.display(),
        r = a.resolution
    );
    Ok(())
}

/// Writes the dataset; returns the number of samples written.
pub fn run(opts: &SynthOptions) -> Result<u64, SynthError> {
    if !(16..=4096).contains(&opts.resolution) {
        return Err(SynthError::BadParam {
            field: "resolution",
            value: opts.resolution as u64,
            reason: "must be between 16 and 4096",
        });
    }
    fs::create_dir_all(&opts.out).map_err(io_err("create directory", &opts.out))?;
    for folder in 0..opts.count.div_ceil(PER_FOLDER) {
        let dir = opts.out.join(format!("{folder:05}"));
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    }
    let bar = crate_progress(opts.count, opts.progress, "synth");
    (0..opts.count).into_par_iter().try_for_each(|i| {
        let s = sample(opts.seed, i, opts.resolution);
        let (folder, key) = key_of(i);
        let stem = opts.out.join(folder).join(&key);
        let png = stem.with_extension("png");
        write_atomic(&png, &encode_png(&s.pixels, opts.resolution, &png)?, false)?;
        write_atomic(&stem.with_extension("txt"), s.caption.as_bytes(), false)?;
        let json = serde_json::to_vec(&SampleJson {
            key: &key,
            caption: &s.caption,
            width: opts.resolution,
            height: opts.resolution,
            status: "success",
            background: s.background,
            shapes: &s.shapes,
        })
        .map_err(|e| io_err("serialise", &stem)(e.into()))?;
        write_atomic(&stem.with_extension("json"), &json, false)?;
        bar.inc(1);
        Ok::<(), SynthError>(())
    })?;
    bar.finish_and_clear();
    let manifest = serde_json::json!({
        "count": opts.count,
        "resolution": opts.resolution,
        "seed": opts.seed,
        "per_folder": PER_FOLDER,
    });
    let path = opts.out.join("synth.json");
    write_atomic(&path, manifest.to_string().as_bytes(), true)?;
    Ok(opts.count)
}

/// A progress bar on stderr (hidden when `show` is false or stderr is not a terminal).
pub fn crate_progress(len: u64, show: bool, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_differ() {
        let (a, b, c) = (sample(7, 3, 32), sample(7, 3, 32), sample(7, 4, 32));
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.caption, b.caption);
        assert_ne!(a.pixels, c.pixels);
    }

    #[test]
    fn shape_centres_have_the_shape_colour() {
        for i in 0..40 {
            let s = sample(1, i, 64);
            for sh in &s.shapes {
                let at = ((sh.cy as usize) * 64 + sh.cx as usize) * 3;
                let rgb = COLOURS.iter().find(|c| c.0 == sh.colour).unwrap().1;
                // The first shape may be covered by the second; only check uncovered centres.
                let covered = s.shapes.iter().any(|o| {
                    o != sh && (o.cx - sh.cx).abs() < o.radius && (o.cy - sh.cy).abs() < o.radius
                });
                if !covered {
                    assert_eq!(&s.pixels[at..at + 3], &rgb, "sample {i}: {}", s.caption);
                }
            }
        }
    }

    #[test]
    fn every_kind_covers_its_centre() {
        for k in KINDS {
            assert!(inside(k, 0.0, 0.0), "{k}");
            assert!(!inside(k, 1.01, 1.01), "{k}");
        }
    }
}
