//! `trainer sample`: captions to pictures. Each prompt is encoded as training encodes captions
//! (BPE, truncated to `text_len`, per-position padding), the transformer draws `n` grids of image
//! tokens after it ([`crate::model::transformer::sample`]), and the dVAE decodes them
//! (docs/model.md §2). Written to the output folder: `prompt_NNN.png` (the prompt's `n` pictures
//! in a grid), `prompt_NNN_MM.png` (each picture) and `index.json` (prompts, files, weights and
//! sampling settings). Deterministic for a seed.
//!
//! Both models are named by a checkpoint or run directory (or, for the dVAE, a weights file). The
//! EMA weights are used when the checkpoint has them, unless `--no-ema`. The transformer's sizes
//! and tokenizer come from the `config.yaml` saved in its checkpoint.
//!
//! Not yet: re-ranking with CLIP (keep the best K of N), captions drawn into the grids.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::checkpoint::{self, CONFIG_FILE};
use crate::config::{DataSource, RunConfig};
use crate::model::dvae::{resolve_weights, DvaeWeights};
use crate::model::transformer::sample::{sample_images, Sampling};
use crate::model::transformer::Transformer;
use formats::bpe::{encode_caption, BpeTokenizer};

/// Pixels between pictures and around a grid.
const GAP: u32 = 4;
/// Background of a grid (white).
const BACKGROUND: u8 = 255;

/// What to sample, from the command line.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// The transformer: a checkpoint or run directory.
    pub transformer: PathBuf,
    /// The dVAE: a weights file, a checkpoint or a run directory.
    pub dvae: PathBuf,
    /// Use `model.safetensors` even where the checkpoint has `ema.safetensors`.
    pub no_ema: bool,
    /// The `tokenizer.json` for the prompts; default: the transformer run's `data.tokenizer`.
    pub tokenizer: Option<PathBuf>,
    pub prompts: Vec<String>,
    /// Pictures per prompt.
    pub n: usize,
    /// Sequences drawn together.
    pub batch: usize,
    pub sampling: Sampling,
    /// The output folder (created if missing).
    pub out: PathBuf,
}

/// What `trainer sample` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SampleSummary {
    pub prompts: Vec<String>,
    pub per_prompt: usize,
    pub resolution: usize,
    pub transformer_weights: PathBuf,
    pub dvae_weights: PathBuf,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Per prompt: its grid, then its pictures.
    pub files: Vec<Vec<PathBuf>>,
}

/// The weights of `source` (a checkpoint or run directory): its EMA when it has one and `ema`,
/// else its model.
fn weights_of(source: &Path, ema: bool, what: &str) -> Result<PathBuf> {
    if ema && !source.is_file() {
        let path = resolve_weights(source, true)
            .with_context(|| format!("{what} {}", source.display()))?;
        if path.is_file() {
            return Ok(path);
        }
    }
    resolve_weights(source, false).with_context(|| format!("{what} {}", source.display()))
}

pub fn run(o: &SampleOptions) -> Result<SampleSummary> {
    ensure!(
        !o.prompts.is_empty(),
        "no prompt: give --prompt TEXT or --prompts FILE"
    );
    ensure!(o.n >= 1, "-n must be at least 1");
    ensure!(o.batch >= 1, "--batch must be at least 1");
    if o.transformer.is_file() {
        bail!(
            "--transformer {}: give its checkpoint or run directory (whose {CONFIG_FILE} holds the \
             model's sizes and tokenizer), not the weights file",
            o.transformer.display()
        );
    }
    let t_path = weights_of(&o.transformer, !o.no_ema, "--transformer")?;
    let dir = t_path.parent().unwrap_or(Path::new("."));
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = RunConfig::load(&cfg_path, &[])
        .with_context(|| format!("the transformer's config {}", cfg_path.display()))?;
    ensure!(
        cfg.model.dvae().is_none(),
        "--transformer {}: a dVAE run (model.kind: dvae), not a transformer",
        o.transformer.display()
    );
    let model = Transformer::new(crate::train::dims_of(&cfg)?)?;
    let d = *model.dims();
    let mut params = vec![0.0f32; model.table().numel()];
    checkpoint::load_weights(&t_path, model.table(), &mut params)?;

    let tok_path = match (&o.tokenizer, &cfg.data) {
        (Some(p), _) => p.clone(),
        (None, DataSource::Shards(s)) if s.tokenizer.is_some() => s.tokenizer.clone().unwrap(),
        _ => bail!(
            "the transformer run {} names no tokenizer (data.tokenizer); give --tokenizer \
             tokenizer.json",
            o.transformer.display()
        ),
    };
    let tok = BpeTokenizer::load(&tok_path)
        .with_context(|| format!("loading tokenizer {}", tok_path.display()))?;
    let mut no_dropout = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut text = Vec::with_capacity(o.prompts.len() * o.n * d.text_len);
    for (i, prompt) in o.prompts.iter().enumerate() {
        let ids = encode_caption(&tok, prompt, d.text_len, d.text_vocab, 0.0, &mut no_dropout)
            .with_context(|| format!("prompt {i} ({prompt:?})"))?;
        for _ in 0..o.n {
            text.extend_from_slice(&ids);
        }
    }

    // The dVAE for this grid: resolution 8·G.
    let resolution = 8 * d.grid;
    let d_path = match o.dvae.is_file() {
        true => o.dvae.clone(),
        false => weights_of(&o.dvae, !o.no_ema, "--dvae")?,
    };
    let dvae_weights = DvaeWeights::locate(&d_path, false, resolution)
        .with_context(|| format!("--dvae {}", o.dvae.display()))?;
    let (dvae, dvae_params) = dvae_weights.load()?;
    ensure!(
        dvae.dims().vocab_size == d.image_vocab,
        "--dvae {}: codebook of {} codes, the transformer draws from {}",
        d_path.display(),
        dvae.dims().vocab_size,
        d.image_vocab
    );

    let seqs = o.prompts.len() * o.n;
    let (tt, gi) = (d.text_len, d.image_tokens());
    let px = 3 * resolution * resolution;
    let mut pixels = Vec::with_capacity(seqs * px);
    let bar = crate::progress::bar(seqs as u64, "sample");
    for first in (0..seqs).step_by(o.batch) {
        let last = (first + o.batch).min(seqs);
        let codes = sample_images(
            &model,
            &params,
            &text[first * tt..last * tt],
            &o.sampling,
            first as u64,
        )?;
        debug_assert_eq!(codes.len(), (last - first) * gi);
        pixels.extend(dvae.decode_codes(&dvae_params, &codes)?);
        bar.inc((last - first) as u64);
    }
    bar.finish_and_clear();

    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("creating the output folder {}", o.out.display()))?;
    let mut files = Vec::new();
    for (i, chunk) in pixels.chunks(o.n * px).enumerate() {
        let grid = o.out.join(format!("prompt_{i:03}.png"));
        write_png(&grid, &grid_image(chunk, o.n, resolution))?;
        let mut these = vec![grid];
        for (j, one) in chunk.chunks(px).enumerate() {
            let path = o.out.join(format!("prompt_{i:03}_{j:02}.png"));
            write_png(&path, &grid_image(one, 1, resolution))?;
            these.push(path);
        }
        files.push(these);
    }
    let summary = SampleSummary {
        prompts: o.prompts.clone(),
        per_prompt: o.n,
        resolution,
        transformer_weights: t_path,
        dvae_weights: dvae_weights.path,
        temperature: o.sampling.temperature,
        top_k: o.sampling.top_k,
        top_p: o.sampling.top_p,
        seed: o.sampling.seed,
        files,
    };
    let index = o.out.join("index.json");
    formats::fsutil::write_atomic(&index, &serde_json::to_vec_pretty(&summary)?, false)?;
    Ok(summary)
}

/// `n` pictures `[3, r, r]` in [0, 1] side by side in rows of ⌈√n⌉ (one picture: no border).
fn grid_image(pixels: &[f32], n: usize, r: usize) -> image::RgbImage {
    let (gap, per_row) = match n {
        1 => (0, 1),
        _ => (GAP, (n as f64).sqrt().ceil() as u32),
    };
    let rows = (n as u32).div_ceil(per_row);
    let r32 = r as u32;
    let mut img = image::RgbImage::from_pixel(
        per_row * r32 + (per_row + 1) * gap,
        rows * r32 + (rows + 1) * gap,
        image::Rgb([BACKGROUND; 3]),
    );
    let px = 3 * r * r;
    for i in 0..n {
        let chw = &pixels[i * px..(i + 1) * px];
        let x0 = gap + (i as u32 % per_row) * (r32 + gap);
        let y0 = gap + (i as u32 / per_row) * (r32 + gap);
        for y in 0..r {
            for x in 0..r {
                let v = |c: usize| {
                    (chw[c * r * r + y * r + x] * 255.0)
                        .round()
                        .clamp(0.0, 255.0) as u8
                };
                img.put_pixel(x0 + x as u32, y0 + y as u32, image::Rgb([v(0), v(1), v(2)]));
            }
        }
    }
    img
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding a PNG")?;
    formats::fsutil::write_atomic(path, &bytes, false)?;
    Ok(())
}

/// The summary line `trainer sample` prints.
pub fn describe(s: &SampleSummary) -> String {
    let dir = s.files[0][0].parent().unwrap_or(Path::new("."));
    format!(
        "sampled {n} pictures of {r}×{r} for each of {p} prompts ({t} with {d}) into {dir}",
        n = s.per_prompt,
        r = s.resolution,
        p = s.prompts.len(),
        t = s.transformer_weights.display(),
        d = s.dvae_weights.display(),
        dir = dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_places_each_picture_in_its_cell() {
        let r = 2;
        // Picture i is uniformly i/4.
        let pixels: Vec<f32> = (0..3)
            .flat_map(|i| vec![i as f32 / 4.0; 3 * r * r])
            .collect();
        let img = grid_image(&pixels, 3, r);
        // 3 pictures: 2 per row, 2 rows.
        assert_eq!(img.dimensions(), (2 * 2 + 3 * GAP, 2 * 2 + 3 * GAP));
        let at = |i: u32| {
            let (x, y) = (GAP + (i % 2) * (2 + GAP), GAP + (i / 2) * (2 + GAP));
            img.get_pixel(x + 1, y + 1).0[0]
        };
        assert_eq!([at(0), at(1), at(2)], [0, 64, 128]);
        assert_eq!(img.get_pixel(0, 0).0, [BACKGROUND; 3]);
        let one = grid_image(&pixels[..3 * r * r], 1, r);
        assert_eq!(one.dimensions(), (2, 2));
    }
}
