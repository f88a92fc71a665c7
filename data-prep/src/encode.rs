//! `data-prep encode`: image shards (`.tis`) + their captions + a caption tokenizer + a dVAE →
//! token shards (`.tts`), the stage-2 transformer's training data.
//!
//! Each record becomes the caption's BPE ids, truncated to `text_len` and padded with the
//! per-position ids `text_vocab + p` (docs/model.md §1, [`encode_caption`] with no dropout), and the
//! image's dVAE codes: the argmax of the encoder's logits, no noise ([`Dvae::encode`]), in raster
//! order. The token shards' layout (text_len, text_vocab, grid², image_vocab = the dVAE's K) is
//! what a stage-2 config with those sizes reads (`data.source: shards` refuses any other).
//!
//! One output shard per input shard, named after it (`images-00003.tis` → `images-00003.tts`),
//! with the records in the same order. Work and resume, as in `ingest`:
//!
//! - everything is checked before any work: the images (3 channels, a resolution divisible by 8,
//!   one resolution for all shards), the tokenizer against `text_vocab`, the dVAE's sizes against
//!   `--image-vocab` or the `--config` model, and the output names;
//! - a shard is written to `<name>.tts.tmp` and renamed when complete, then its done marker
//!   (`<name>.tts.done`: the input shard's identity, the layout, and fingerprints of the dVAE
//!   weights and the tokenizer) is written; a rerun skips shards whose marker matches and whose
//!   file opens with the marker's record count, and rewrites the others. A marker written with
//!   other weights, tokenizer, layout or input is an error (mixing them would corrupt the data
//!   set): use a new `--out`.
//! - within a shard, records go in batches of `--batch` images; `max(1, threads / batch)` batches
//!   run at a time (rayon; the convolutions also run a batch's images in parallel), and results
//!   are written in input order, so the bytes do not depend on thread timing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use formats::bpe::{encode_caption, BpeTokenizer, DEFAULT_VOCAB_SIZE};
use formats::image_shard::{ImageShard, EXTENSION as IMAGE_EXTENSION};
use formats::token_shard::{ShardLayout, TokenShard, TokenShardWriter, EXTENSION};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use trainer::config::RunConfig;
use trainer::data::image_loader::hwc_to_chw;
use trainer::data::loader::{resolve_paths_with, LoaderError};
use trainer::model::dvae::{image_resolution, Dvae, DvaeWeights};

use crate::markers;

/// Command-line options of `data-prep encode`.
#[derive(clap::Args, Debug, Clone)]
pub struct EncodeArgs {
    /// Image shards: paths or quoted glob patterns ('shards/*.tis'), each matching at least one
    /// .tis file.
    #[arg(long, required = true, num_args = 1..)]
    pub images: Vec<String>,
    /// The caption tokenizer (tokenizer.json, `data-prep tokenizer train`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The dVAE: a safetensors file, a checkpoint directory (its model.safetensors) or a run
    /// directory (its newest complete checkpoint).
    #[arg(long)]
    pub dvae: PathBuf,
    /// Read the checkpoint's weight EMA (ema.safetensors) instead of model.safetensors.
    #[arg(long)]
    pub ema: bool,
    /// Output folder for the token shards (one per input shard) and their done markers.
    #[arg(long)]
    pub out: PathBuf,
    /// Caption tokens per record (the stage-2 model's text_len); longer captions are truncated.
    #[arg(long, required_unless_present = "config")]
    pub text_len: Option<usize>,
    /// The stage-2 model's text vocabulary Vt: padding ids are Vt + position; the tokenizer's
    /// ids must be below it [default: 16384].
    #[arg(long)]
    pub text_vocab: Option<usize>,
    /// The image vocabulary the stage-2 model expects: must equal the dVAE's codebook size K
    /// (checked before any work).
    #[arg(long)]
    pub image_vocab: Option<usize>,
    /// A stage-2 run config instead of --text-len/--text-vocab/--image-vocab: its model section
    /// gives text_len and text_vocab, and its grid and image_vocab must match the images and
    /// the dVAE.
    #[arg(long, conflicts_with_all = ["text_len", "text_vocab", "image_vocab"])]
    pub config: Option<PathBuf>,
    /// Override a field of --config, e.g. --set model.text_len=64 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub set: Vec<String>,
    /// Images encoded together; max(batch, threads) images are in flight. On the CPU a batch
    /// of 2 is as fast as any (the convolutions run one image per thread); memory is about
    /// 0.45 GB per 256 px image in flight with OpenAI's dVAE.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct EncodeSummary {
    pub layout: LayoutJson,
    /// Records in all output shards.
    pub records: u64,
    pub shards: usize,
    /// Shards written by this run.
    pub written: usize,
    /// Shards a previous run had finished.
    pub reused: usize,
    /// Input shards with no records (every input of an ingest group rejected): a token shard
    /// cannot be empty, so they have no output.
    pub empty_inputs: usize,
    /// Images encoded by this run per second of wall time.
    pub images_per_s: f64,
}

/// The layout of the output shards, as stored in the done markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutJson {
    pub text_len: u32,
    pub image_tokens: u32,
    pub text_vocab: u32,
    pub image_vocab: u32,
}

impl From<ShardLayout> for LayoutJson {
    fn from(l: ShardLayout) -> Self {
        LayoutJson {
            text_len: l.text_len,
            image_tokens: l.image_tokens,
            text_vocab: l.text_vocab,
            image_vocab: l.image_vocab,
        }
    }
}

/// A done marker: what the output shard was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// The input shard's file name, record count and chunk-index checksum.
    source: String,
    source_records: u64,
    source_index_crc: u32,
    layout: LayoutJson,
    /// xxh3-128 of the dVAE's parameters (f32 little-endian) and of the tokenizer file, hex.
    dvae: String,
    tokenizer: String,
}

/// One input shard and where its tokens go.
struct Job {
    shard: ImageShard,
    out: PathBuf,
    marker: Marker,
}

/// Everything the per-shard work needs.
struct Encoder<'a> {
    dvae: &'a Dvae,
    params: &'a [f32],
    tokenizer: &'a BpeTokenizer,
    layout: ShardLayout,
    batch: usize,
    /// Batches run at a time.
    parallel: usize,
}

/// The sizes the arguments ask for, before the images and the dVAE are known.
struct Wanted {
    text_len: usize,
    text_vocab: usize,
    /// The config's grid, if a config was given.
    grid: Option<usize>,
    /// The config's image_vocab, or --image-vocab.
    image_vocab: Option<usize>,
    /// The config they come from, if any (for naming them in errors).
    config: Option<PathBuf>,
}

impl Wanted {
    fn from_args(a: &EncodeArgs) -> Result<Wanted> {
        if let Some(path) = &a.config {
            let cfg = RunConfig::load(path, &a.set)?;
            let m = cfg.transformer().with_context(|| {
                format!(
                    "--config {}: data-prep encode writes token shards for a stage-2 transformer",
                    path.display()
                )
            })?;
            return Ok(Wanted {
                text_len: m.text_len,
                text_vocab: m.text_vocab,
                grid: Some(m.grid),
                image_vocab: Some(m.image_vocab),
                config: Some(path.clone()),
            });
        }
        Ok(Wanted {
            text_len: a
                .text_len
                .context("--text-len is required without --config")?,
            text_vocab: a.text_vocab.unwrap_or(DEFAULT_VOCAB_SIZE),
            grid: None,
            image_vocab: a.image_vocab,
            config: None,
        })
    }

    /// Where size `field` (e.g. `text_vocab`) was given: `--text-vocab`, or `--config C:
    /// model.text_vocab`.
    fn name(&self, field: &str) -> String {
        match &self.config {
            Some(c) => format!("--config {}: model.{field}", c.display()),
            None => format!("--{}", field.replace('_', "-")),
        }
    }
}

/// `DIR/<input stem>.tts`.
fn output_path(out: &Path, input: &Path) -> PathBuf {
    let stem = input.file_stem().unwrap_or_default();
    out.join(Path::new(stem).with_extension(EXTENSION))
}

/// Runs the encode; see the module doc.
pub fn run(a: &EncodeArgs) -> Result<EncodeSummary> {
    ensure!(a.batch >= 1, "--batch must be at least 1");
    let want = Wanted::from_args(a)?;
    let field = |name: &str| want.name(name);
    ensure!(
        want.text_len >= 1,
        "{} must be at least 1",
        field("text_len")
    );

    // The images: one resolution a dVAE can take.
    let paths = resolve_paths_with(&a.images, IMAGE_EXTENSION).map_err(|e| match e {
        LoaderError::NoMatch { pattern, extension } => {
            anyhow::anyhow!("--images {pattern:?} matches no .{extension} file")
        }
        e => anyhow::Error::new(e).context("--images"),
    })?;
    let mut shards = Vec::with_capacity(paths.len());
    for p in &paths {
        shards.push(
            ImageShard::open(p).with_context(|| format!("reading images from {}", p.display()))?,
        );
    }
    let resolution = image_resolution(&shards[0])?;
    for s in &shards[1..] {
        image_resolution(s)?;
        ensure!(
            s.resolution() as usize == resolution,
            "{} holds {r}×{r} images but {} holds {resolution}×{resolution}: one token-shard set \
             has one grid; encode them separately",
            s.path().display(),
            shards[0].path().display(),
            r = s.resolution()
        );
    }
    let grid = resolution / 8;

    // The tokenizer: every id below text_vocab.
    let tokenizer = BpeTokenizer::load(&a.tokenizer)?;
    ensure!(
        tokenizer.vocab_size() <= want.text_vocab,
        "the tokenizer {} has {} ids but {} is {}: its ids must be below the text vocabulary \
         (padding ids start there); raise it or use a smaller tokenizer",
        a.tokenizer.display(),
        tokenizer.vocab_size(),
        field("text_vocab"),
        want.text_vocab
    );

    // The dVAE: its sizes (from the weights' header) against what the model wants.
    let weights = DvaeWeights::locate(&a.dvae, a.ema, resolution)?;
    let k = weights.dims.vocab_size;
    if let Some(v) = want.image_vocab {
        ensure!(
            v == k,
            "{} is {v} but the dVAE {} has a codebook of K = {k} codes: a stage-2 model reading \
             these shards must have image_vocab = {k}",
            field("image_vocab"),
            weights.path.display()
        );
    }
    if let Some(g) = want.grid {
        ensure!(
            g == grid,
            "{} is {g} but the images ({}) are {resolution}×{resolution}, which the dVAE encodes \
             to a {grid}×{grid} grid; use images of {} px or a model with grid {grid}",
            field("grid"),
            shards[0].path().display(),
            g * 8
        );
    }
    let u32_of = |v: usize, name: &str| {
        u32::try_from(v).with_context(|| format!("{} = {v} does not fit in u32", field(name)))
    };
    let layout = ShardLayout {
        text_len: u32_of(want.text_len, "text_len")?,
        image_tokens: u32::try_from(grid * grid).context("the grid² does not fit in u32")?,
        text_vocab: u32_of(want.text_vocab, "text_vocab")?,
        image_vocab: u32_of(k, "image_vocab")?,
    };

    // Output names: one per input, distinct.
    let mut names: HashMap<PathBuf, &Path> = HashMap::new();
    for s in &shards {
        let out = output_path(&a.out, s.path());
        if let Some(other) = names.insert(out.clone(), s.path()) {
            bail!(
                "{} and {} would both be encoded to {}; give the inputs distinct file names",
                other.display(),
                s.path().display(),
                out.display()
            );
        }
    }

    // Every check passed: read the weights and the tokenizer's bytes, then work.
    let (dvae, params) = weights.load()?;
    let dvae_fp = format!("{:032x}", trainer::params::fingerprint(&params));
    let tok_bytes = std::fs::read(&a.tokenizer)
        .with_context(|| format!("reading {}", a.tokenizer.display()))?;
    let tok_fp = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&tok_bytes));
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;

    let jobs: Vec<Job> = shards
        .into_iter()
        .map(|shard| {
            let name = shard.path().file_name().unwrap_or_default();
            Job {
                out: output_path(&a.out, shard.path()),
                marker: Marker {
                    source: name.to_string_lossy().into_owned(),
                    source_records: shard.len(),
                    source_index_crc: shard.header().index_crc,
                    layout: layout.into(),
                    dvae: dvae_fp.clone(),
                    tokenizer: tok_fp.clone(),
                },
                shard,
            }
        })
        .collect();
    let total: u64 = jobs.iter().map(|j| j.shard.len()).sum();
    let enc = Encoder {
        dvae: &dvae,
        params: &params,
        tokenizer: &tokenizer,
        layout,
        batch: a.batch,
        parallel: (rayon::current_num_threads() / a.batch).max(1),
    };
    let bar = markers::progress("encode", Some(total), "images", !a.quiet);
    let start = Instant::now();
    let (mut written, mut reused, mut encoded) = (0, 0, 0u64);
    let empty_inputs = jobs.iter().filter(|j| j.shard.is_empty()).count();
    for job in jobs.iter().filter(|j| !j.shard.is_empty()) {
        if is_done(job, &layout)? {
            bar.inc(job.shard.len());
            reused += 1;
        } else {
            enc.encode_shard(job, &bar)?;
            written += 1;
            encoded += job.shard.len();
        }
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    Ok(EncodeSummary {
        layout: layout.into(),
        records: total,
        shards: jobs.len() - empty_inputs,
        written,
        reused,
        empty_inputs,
        images_per_s: if secs > 0.0 {
            encoded as f64 / secs
        } else {
            0.0
        },
    })
}

/// Whether `job`'s output is finished: its marker matches and its shard opens with the
/// marker's record count and `layout`. A marker written from other inputs is an error.
fn is_done(job: &Job, layout: &ShardLayout) -> Result<bool> {
    let path = markers::marker_path(&job.out);
    let Some(found) = markers::read::<Marker>(&path)? else {
        return Ok(false);
    };
    if found != job.marker {
        bail!(
            "{} was written from other inputs or options; use a new --out, or the same images, \
             dVAE, tokenizer and layout.\n  before: {}\n  now:    {}",
            path.display(),
            serde_json::to_string(&found)?,
            serde_json::to_string(&job.marker)?
        );
    }
    Ok(match TokenShard::open(&job.out) {
        Ok(s) => s.len() == job.shard.len() && s.check_layout(layout).is_ok(),
        Err(_) => false,
    })
}

impl Encoder<'_> {
    /// Encodes one input shard into its output shard, then writes the marker.
    fn encode_shard(&self, job: &Job, bar: &indicatif::ProgressBar) -> Result<()> {
        let marker = markers::marker_path(&job.out);
        markers::remove(&marker)?;
        let shard = &job.shard;
        let res = shard.resolution() as usize;
        let px = 3 * res * res;
        let mut w = TokenShardWriter::create(&job.out, self.layout)?;
        let window = (self.batch * self.parallel) as u64;
        let mut first = 0u64;
        while first < shard.len() {
            let n = window.min(shard.len() - first);
            // Read the window's records in order (zstd chunks are decoded once each).
            let mut pixels = vec![0.0f32; n as usize * px];
            let mut captions = Vec::with_capacity(n as usize);
            for (i, dst) in pixels.chunks_exact_mut(px).enumerate() {
                let r = shard.record(first + i as u64)?;
                hwc_to_chw(&r.pixels, dst);
                captions.push(r.caption);
            }
            let batches: Vec<(&[f32], &[String])> = pixels
                .chunks(self.batch * px)
                .zip(captions.chunks(self.batch))
                .collect();
            let results: Vec<(Vec<u32>, Vec<Vec<u32>>)> = batches
                .into_par_iter()
                .map(|(img, caps)| self.encode_batch(img, caps))
                .collect::<Result<_>>()
                .with_context(|| {
                    format!("encoding records {first}.. of {}", shard.path().display())
                })?;
            let grid2 = self.layout.image_tokens as usize;
            for ((codes, texts), caps) in results.iter().zip(captions.chunks(self.batch)) {
                for ((image, text), caption) in codes.chunks_exact(grid2).zip(texts).zip(caps) {
                    w.push(text, image, caption)?;
                }
            }
            bar.inc(n);
            first += n;
        }
        w.finish()?;
        markers::write(&marker, &job.marker)?;
        Ok(())
    }

    /// The codes [B, G²] and caption ids [B][Tt] of one batch.
    fn encode_batch(
        &self,
        images: &[f32],
        captions: &[String],
    ) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
        let codes = self.dvae.encode(self.params, images)?;
        // No dropout: the RNG is never drawn from.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let texts = captions
            .iter()
            .map(|c| {
                encode_caption(
                    self.tokenizer,
                    c,
                    self.layout.text_len as usize,
                    self.layout.text_vocab as usize,
                    0.0,
                    &mut rng,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((codes, texts))
    }
}

/// `data-prep encode`: runs and prints a one-line summary.
pub fn main(a: EncodeArgs) -> Result<()> {
    let s = run(&a)?;
    let l = s.layout;
    let empty = match s.empty_inputs {
        0 => String::new(),
        n => format!(", {n} empty input shards skipped"),
    };
    eprintln!(
        "encode: {} records in {} token shards in {} ({} written, {} reused{empty}); layout \
         text_len {} text_vocab {} image_tokens {} image_vocab {}; {:.2} images/s",
        s.records,
        s.shards,
        a.out.display(),
        s.written,
        s.reused,
        l.text_len,
        l.text_vocab,
        l.image_tokens,
        l.image_vocab,
        s.images_per_s
    );
    Ok(())
}
