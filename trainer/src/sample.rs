//! `trainer sample`: captions to pictures. Each prompt is encoded as training encodes captions
//! (BPE, truncated to `text_len`, per-position padding), the transformer draws `n` grids of image
//! tokens after it ([`crate::model::transformer::sample`]), and the dVAE decodes them
//! (docs/model.md §2). Written to the output folder: `prompt_NNN.png` (the prompt's pictures in a
//! grid), `prompt_NNN_MM.png` (each picture) and `index.json` (prompts, files, weights and
//! sampling settings). Deterministic for a seed.
//!
//! With `--clip DIR` every picture is scored by CLIP against its prompt ([`crate::rerank`]) and
//! the best `--keep K` (default: all `n`) are kept, best first: the grid and `prompt_NNN_MM.png`
//! (MM the rank) hold only those, and `scores.json` records every picture's score and which were
//! kept. `--keep` needs `--clip` (there is nothing to rank by otherwise).
//!
//! Both models are named by a checkpoint or run directory (or, for the dVAE, a weights file). The
//! EMA weights are used when the checkpoint has them, unless `--no-ema`. The transformer's sizes
//! and tokenizer come from the `config.yaml` saved in its checkpoint.
//!
//! A training run's `samples:` section draws grids with the same [`Painter`]
//! ([`TrainingSamples`]).
//!
//! Each grid carries its prompt as text in a band above its pictures (a training run's grid:
//! above each prompt's row), in the font `trainer plot` uses ([`crate::font`]); without a font,
//! or with `--no-captions`, the grids have no band (and, without a font, one warning says so).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::checkpoint::{self, CONFIG_FILE};
use crate::config::{DataSource, RunConfig, SamplesConfig};
use crate::font::Captioner;
use crate::model::dvae::{resolve_weights, Dvae, DvaeWeights};
use crate::model::transformer::sample::{sample_images, Sampling};
use crate::model::transformer::{Transformer, TransformerDims};
use crate::model::Products;
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
    /// The transformer's weight products (`--precision`).
    pub precision: Products,
    /// The CLIP that re-ranks: a Hugging Face CLIP directory or a Tessera CLIP checkpoint or run.
    pub clip: Option<PathBuf>,
    /// Pictures kept per prompt, the best by CLIP's score (default: all `n`); needs `clip`.
    pub keep: Option<usize>,
    /// Each grid carries its prompt in a band above the pictures (when a font is found).
    pub captions: bool,
    /// The output folder (created if missing).
    pub out: PathBuf,
}

/// One prompt's CLIP scores (`scores.json`).
#[derive(Clone, Debug, Serialize)]
pub struct PromptScores {
    pub prompt: String,
    /// Every picture drawn, in the order drawn: the cosine of its image embedding with the
    /// prompt's text embedding.
    pub scores: Vec<f32>,
    /// The pictures kept, best first.
    pub kept: Vec<Kept>,
}

/// A kept picture: its file, its place among those drawn, its score.
#[derive(Clone, Debug, Serialize)]
pub struct Kept {
    pub file: PathBuf,
    pub drawn: usize,
    pub score: f32,
}

/// What `trainer sample` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SampleSummary {
    pub prompts: Vec<String>,
    /// Pictures kept (and written) per prompt.
    pub per_prompt: usize,
    /// Pictures drawn per prompt.
    pub drawn: usize,
    pub resolution: usize,
    pub transformer_weights: PathBuf,
    pub dvae_weights: PathBuf,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// The transformer's weight products: "fp32" or "bf16".
    pub precision: Products,
    /// The re-ranking CLIP's weights, when `--clip` was given.
    pub clip_weights: Option<PathBuf>,
    /// Per prompt: its grid, then its pictures (best first when re-ranked).
    pub files: Vec<Vec<PathBuf>>,
    /// Per prompt, when re-ranked: every picture's score and those kept.
    #[serde(skip)]
    pub scores: Vec<PromptScores>,
}

/// The weights of `source` (a checkpoint or run directory): its EMA when it has one and `ema`,
/// else its model.
pub fn weights_of(source: &Path, ema: bool, what: &str) -> Result<PathBuf> {
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
    let keep = match (o.keep, &o.clip) {
        (Some(k), None) => {
            bail!("--keep {k} needs --clip DIR: the pictures are kept by their CLIP score")
        }
        (Some(0), _) => bail!("--keep 0 keeps no picture; give 1 ..= -n ({})", o.n),
        (Some(k), _) if k > o.n => bail!(
            "--keep {k} is larger than -n {}: only {} pictures are drawn per prompt",
            o.n,
            o.n
        ),
        (Some(k), _) => k,
        (None, _) => o.n,
    };
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
    let model = Transformer::new(*cfg.transformer()?)?;
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
    let d_path = match o.dvae.is_file() {
        true => o.dvae.clone(),
        false => weights_of(&o.dvae, !o.no_ema, "--dvae")?,
    };
    let painter = Painter::open(&d_path, &tok_path, &d)
        .with_context(|| format!("--dvae {}", o.dvae.display()))?;
    painter.warn_too_long(&o.prompts, d.text_len, "prompt")?;
    // Loaded before drawing, so that a bad directory fails before the long part.
    let clip = o
        .clip
        .as_ref()
        .map(|dir| crate::rerank::Reranker::open(dir, !o.no_ema))
        .transpose()?;
    let captioner = match o.captions {
        true => Captioner::open("the grids are drawn")?,
        false => None,
    };
    let resolution = painter.resolution;
    let px = 3 * resolution * resolution;
    let bar = crate::progress::bar((o.prompts.len() * o.n) as u64, "sample");
    let pixels = painter.draw(
        &model,
        &params,
        &o.prompts,
        o.n,
        (&o.sampling, o.precision),
        o.batch,
        &bar,
    )?;
    bar.finish_and_clear();

    // Each prompt's pictures to keep, in order; scored before anything is written.
    let mut orders = Vec::new();
    let mut scores = Vec::new();
    for (i, chunk) in pixels.chunks(o.n * px).enumerate() {
        let Some(clip) = &clip else {
            orders.push((0..o.n).collect::<Vec<_>>());
            continue;
        };
        let pictures: Vec<image::RgbImage> = chunk
            .chunks(px)
            .map(|one| grid_image(one, 1, resolution, None))
            .collect();
        let s = clip
            .scores(&o.prompts[i], &pictures)
            .with_context(|| format!("scoring the pictures of prompt {i} with CLIP"))?;
        let order = crate::rerank::ranking(&s)[..keep].to_vec();
        scores.push(PromptScores {
            prompt: o.prompts[i].clone(),
            kept: order
                .iter()
                .enumerate()
                .map(|(rank, &j)| Kept {
                    file: PathBuf::from(format!("prompt_{i:03}_{rank:02}.png")),
                    drawn: j,
                    score: s[j],
                })
                .collect(),
            scores: s,
        });
        orders.push(order);
    }

    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("creating the output folder {}", o.out.display()))?;
    let mut files = Vec::new();
    for (i, (chunk, order)) in pixels.chunks(o.n * px).zip(&orders).enumerate() {
        let kept: Vec<f32> = order
            .iter()
            .flat_map(|&j| chunk[j * px..(j + 1) * px].iter().copied())
            .collect();
        let grid = o.out.join(format!("prompt_{i:03}.png"));
        let caption = captioner.as_ref().map(|c| (c, o.prompts[i].as_str()));
        write_png(&grid, &grid_image(&kept, keep, resolution, caption))?;
        let mut these = vec![grid];
        for (rank, one) in kept.chunks(px).enumerate() {
            let path = o.out.join(format!("prompt_{i:03}_{rank:02}.png"));
            write_png(&path, &grid_image(one, 1, resolution, None))?;
            these.push(path);
        }
        files.push(these);
    }
    if clip.is_some() {
        let path = o.out.join("scores.json");
        formats::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&scores)?, false)?;
    }
    let summary = SampleSummary {
        prompts: o.prompts.clone(),
        per_prompt: keep,
        drawn: o.n,
        resolution,
        transformer_weights: t_path,
        dvae_weights: painter.dvae_path,
        temperature: o.sampling.temperature,
        top_k: o.sampling.top_k,
        top_p: o.sampling.top_p,
        seed: o.sampling.seed,
        precision: o.precision,
        clip_weights: clip.map(|c| c.weights),
        files,
        scores,
    };
    let index = o.out.join("index.json");
    formats::fsutil::write_atomic(&index, &serde_json::to_vec_pretty(&summary)?, false)?;
    Ok(summary)
}

/// What turns captions into pictures with a transformer's weights: the prompts' tokenizer and
/// the dVAE that decodes. `trainer sample` and a training run's sample grids (`samples:`) share it.
pub struct Painter {
    tok: BpeTokenizer,
    dvae: Dvae,
    dvae_params: Vec<f32>,
    /// The dVAE's weights file.
    pub dvae_path: PathBuf,
    /// Pixels per side: 8 × the transformer's grid.
    pub resolution: usize,
}

impl Painter {
    /// Loads the dVAE weights file `dvae` (its codebook must be the transformer's image
    /// vocabulary, its resolution 8 × the grid) and the prompts' `tokenizer`.
    pub fn open(dvae: &Path, tokenizer: &Path, d: &TransformerDims) -> Result<Self> {
        let tok = BpeTokenizer::load(tokenizer)
            .with_context(|| format!("loading tokenizer {}", tokenizer.display()))?;
        let resolution = 8 * d.grid;
        let weights = DvaeWeights::locate(dvae, false, resolution)?;
        let (model, dvae_params) = weights.load()?;
        ensure!(
            model.dims().vocab_size == d.image_vocab,
            "{}: codebook of {} codes, the transformer draws from {}",
            dvae.display(),
            model.dims().vocab_size,
            d.image_vocab
        );
        Ok(Painter {
            tok,
            dvae: model,
            dvae_params,
            dvae_path: weights.path,
            resolution,
        })
    }

    /// The prompts longer than the transformer's `text_len` tokens, which are truncated to their
    /// first `text_len` as training truncates captions: (prompt index, its token count).
    fn too_long(&self, prompts: &[String], text_len: usize) -> Result<Vec<(usize, usize)>> {
        let mut long = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let n = self
                .tok
                .encode(prompt)
                .with_context(|| format!("prompt {i} ({prompt:?})"))?
                .len();
            if n > text_len {
                long.push((i, n));
            }
        }
        Ok(long)
    }

    /// Warns once for each prompt [`Painter::too_long`] finds; `what` names where the prompts
    /// come from (`--prompt`, `samples.prompts`).
    pub fn warn_too_long(&self, prompts: &[String], text_len: usize, what: &str) -> Result<()> {
        for (i, n) in self.too_long(prompts, text_len)? {
            tracing::warn!(
                "{what} {i} ({:?}) is {n} tokens, longer than the text context of {text_len}: \
                 truncated to its first {text_len} tokens",
                prompts[i]
            );
        }
        Ok(())
    }

    /// `n` pictures `[3, r, r]` in [0, 1] for each prompt, prompt by prompt, drawn `batch`
    /// sequences at a time; `bar` advances by the pictures drawn.
    #[allow(clippy::too_many_arguments)]
    pub fn draw(
        &self,
        model: &Transformer,
        params: &[f32],
        prompts: &[String],
        n: usize,
        (how, products): (&Sampling, Products),
        batch: usize,
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<f32>> {
        let d = model.dims();
        let mut no_dropout = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let mut text = Vec::with_capacity(prompts.len() * n * d.text_len);
        for (i, prompt) in prompts.iter().enumerate() {
            let ids = encode_caption(
                &self.tok,
                prompt,
                d.text_len,
                d.text_vocab,
                0.0,
                &mut no_dropout,
            )
            .with_context(|| format!("prompt {i} ({prompt:?})"))?;
            for _ in 0..n {
                text.extend_from_slice(&ids);
            }
        }
        let seqs = prompts.len() * n;
        let (tt, gi) = (d.text_len, d.image_tokens());
        let mut pixels = Vec::with_capacity(seqs * 3 * self.resolution * self.resolution);
        for first in (0..seqs).step_by(batch.max(1)) {
            let last = (first + batch.max(1)).min(seqs);
            let codes = sample_images(
                model,
                params,
                &text[first * tt..last * tt],
                how,
                first as u64,
                products,
            )?;
            debug_assert_eq!(codes.len(), (last - first) * gi);
            pixels.extend(self.dvae.decode_codes(&self.dvae_params, &codes)?);
            bar.inc((last - first) as u64);
        }
        Ok(pixels)
    }
}

/// A training run's sample grids (the `samples:` section, rank 0 only): the transformer of the
/// run's sizes, the painter, and where the grids go.
pub struct TrainingSamples {
    model: Transformer,
    painter: Painter,
    captioner: Option<Captioner>,
    cfg: SamplesConfig,
    dir: PathBuf,
}

impl TrainingSamples {
    /// The run's sampler, or `None` when the config has no `samples:` section. Loads the dVAE
    /// and the tokenizer now, so that a wrong path fails before the first update.
    pub fn open(run: &RunConfig) -> Result<Option<Self>> {
        let Some(cfg) = run.samples.clone() else {
            return Ok(None);
        };
        let model = Transformer::new(*run.transformer()?)?;
        let tokenizer = match (&cfg.tokenizer, &run.data) {
            (Some(p), _) => p.clone(),
            (None, DataSource::Shards(s)) if s.tokenizer.is_some() => s.tokenizer.clone().unwrap(),
            _ => bail!("samples.tokenizer: no tokenizer.json for the prompts"),
        };
        let dvae = match cfg.dvae.is_file() {
            true => cfg.dvae.clone(),
            false => weights_of(&cfg.dvae, true, "samples.dvae")?,
        };
        let painter = Painter::open(&dvae, &tokenizer, model.dims())
            .with_context(|| format!("samples.dvae {}", cfg.dvae.display()))?;
        painter.warn_too_long(&cfg.prompts, model.dims().text_len, "samples.prompts")?;
        let dir = run.run.out_dir.join("samples");
        let captioner = Captioner::open("the sample grids are drawn")?;
        Ok(Some(TrainingSamples {
            model,
            painter,
            captioner,
            cfg,
            dir,
        }))
    }

    /// Whether update `step` of a run of `last` updates draws a grid.
    pub fn due(&self, step: u64, last: u64) -> bool {
        step.is_multiple_of(self.cfg.every) || step == last
    }

    /// Draws the grid of update `step` with `params` (the transformer's, flat by its table),
    /// writes `samples/step_<step>.png` and, given `events`, a TensorBoard image `samples`.
    pub fn draw(
        &self,
        step: u64,
        params: &[f32],
        events: Option<&mut crate::tensorboard::EventWriter>,
    ) -> Result<PathBuf> {
        let c = &self.cfg;
        let how = Sampling {
            temperature: c.temperature as f32,
            top_k: c.top_k,
            top_p: c.top_p as f32,
            seed: c.seed,
        };
        let hidden = indicatif::ProgressBar::hidden();
        let pixels = self.painter.draw(
            &self.model,
            params,
            &c.prompts,
            c.n,
            (&how, Products::Fp32),
            c.n,
            &hidden,
        )?;
        let captions = self.captioner.as_ref().map(|cap| (cap, &c.prompts[..]));
        let img = rows_image(
            &pixels,
            c.prompts.len() * c.n,
            c.n,
            self.painter.resolution,
            captions,
        );
        let png = png_bytes(&img)?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.dir.join(format!("step_{step:08}.png"));
        formats::fsutil::write_atomic(&path, &png, false)?;
        if let Some(ev) = events {
            ev.image(step, "samples", png, img.width(), img.height())?;
        }
        Ok(path)
    }
}

/// `n` pictures `[3, r, r]` in [0, 1] side by side in rows of ⌈√n⌉ (one picture: no border),
/// with `caption` above them when there is a captioner.
fn grid_image(
    pixels: &[f32],
    n: usize,
    r: usize,
    caption: Option<(&Captioner, &str)>,
) -> image::RgbImage {
    let per_row = match n {
        1 => 1,
        _ => (n as f64).sqrt().ceil() as usize,
    };
    let captions: Vec<String> = caption.iter().map(|(_, t)| t.to_string()).collect();
    rows_image(
        pixels,
        n,
        per_row,
        r,
        caption.map(|(c, _)| (c, &captions[..])),
    )
}

/// `n` pictures `[3, r, r]` in [0, 1], `per_row` to a row, with a white border between them
/// (one picture: no border). With `captions` (a captioner and texts), row i has the band of
/// `texts[i]` above it, as wide as the grid (rows past the texts have none). A training run's
/// sample grid is one row per prompt, each under its prompt.
pub fn rows_image(
    pixels: &[f32],
    n: usize,
    per_row: usize,
    r: usize,
    captions: Option<(&Captioner, &[String])>,
) -> image::RgbImage {
    let (gap, per_row) = match n {
        1 => (0, 1),
        _ => (GAP, per_row as u32),
    };
    let rows = (n as u32).div_ceil(per_row);
    let r32 = r as u32;
    let width = per_row * r32 + (per_row + 1) * gap;
    let bands: Vec<Option<image::RgbImage>> = (0..rows as usize)
        .map(|i| captions.and_then(|(c, texts)| texts.get(i).map(|t| c.band(t, width))))
        .collect();
    let height = gap
        + bands
            .iter()
            .map(|b| b.as_ref().map_or(0, |b| b.height()) + r32 + gap)
            .sum::<u32>();
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([BACKGROUND; 3]));
    // The top of each row's pictures.
    let mut row_y = Vec::with_capacity(bands.len());
    let mut y = gap;
    for band in &bands {
        if let Some(b) = band {
            image::imageops::replace(&mut img, b, 0, y as i64);
            y += b.height();
        }
        row_y.push(y);
        y += r32 + gap;
    }
    let px = 3 * r * r;
    for i in 0..n {
        let chw = &pixels[i * px..(i + 1) * px];
        let x0 = gap + (i as u32 % per_row) * (r32 + gap);
        let y0 = row_y[i / per_row as usize];
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

/// `img` as PNG bytes.
pub fn png_bytes(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding a PNG")?;
    Ok(bytes)
}

fn write_png(path: &Path, img: &image::RgbImage) -> Result<()> {
    formats::fsutil::write_atomic(path, &png_bytes(img)?, false)?;
    Ok(())
}

/// What `trainer sample` prints: the summary line, then, when re-ranked, each prompt's kept
/// pictures and their scores.
pub fn describe(s: &SampleSummary) -> String {
    let dir = s.files[0][0].parent().unwrap_or(Path::new("."));
    let mut text = format!(
        "sampled {n} pictures of {r}×{r} for each of {p} prompts ({t} with {d}) into {dir}",
        n = s.drawn,
        r = s.resolution,
        p = s.prompts.len(),
        t = s.transformer_weights.display(),
        d = s.dvae_weights.display(),
        dir = dir.display(),
    );
    if let Some(clip) = &s.clip_weights {
        text += &format!(
            "; CLIP ({}) kept the best {} of each (scores.json)",
            clip.display(),
            s.per_prompt
        );
        for (i, p) in s.scores.iter().enumerate() {
            let kept: Vec<String> = p
                .kept
                .iter()
                .map(|k| format!("#{} {:.4}", k.drawn, k.score))
                .collect();
            text += &format!("\nprompt {i} {:?}: {}", p.prompt, kept.join(", "));
        }
    }
    text
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
        let img = grid_image(&pixels, 3, r, None);
        // 3 pictures: 2 per row, 2 rows.
        assert_eq!(img.dimensions(), (2 * 2 + 3 * GAP, 2 * 2 + 3 * GAP));
        let at = |i: u32| {
            let (x, y) = (GAP + (i % 2) * (2 + GAP), GAP + (i / 2) * (2 + GAP));
            img.get_pixel(x + 1, y + 1).0[0]
        };
        assert_eq!([at(0), at(1), at(2)], [0, 64, 128]);
        assert_eq!(img.get_pixel(0, 0).0, [BACKGROUND; 3]);
        let one = grid_image(&pixels[..3 * r * r], 1, r, None);
        assert_eq!(one.dimensions(), (2, 2));
    }
}
