//! `data-prep embed`: image shards (`.tis`) + a CLIP model → L2-normalised image embeddings (and,
//! with `--captions`, caption embeddings), stored as f16 vectors aligned with the records; the
//! input of `data-prep dedup`. The format is in docs/dedup.md.
//!
//! - The model is a Hugging Face CLIP directory (`config.json`, `model.safetensors`,
//!   `tokenizer.json`, `preprocessor_config.json`: its own preprocessing and tokeniser) or a
//!   Tessera `model.kind: clip` run or checkpoint directory (the checkpoint's `config.yaml` gives
//!   the sizes and `data.tokenizer`; images must already be `image_size` pixels, normalised with
//!   OpenAI's CLIP statistics as training does).
//! - Output: `DIR/manifest.json` (model, weights hash, dim, shards, counts), written before any
//!   shard, and one `DIR/<input stem>.safetensors` per input shard (`image` [N, D] f16, `caption`
//!   [N, D] f16 with `--captions`; its metadata names the source shard and the weights hash),
//!   written to a temporary name, fsynced and renamed, so a file under its final name is whole.
//! - Resume: a rerun keeps every output whose metadata matches (same source shard, record count,
//!   index checksum, weights and `--captions`) and embeds the others; a manifest written with
//!   other weights, another embedding size or `--captions` setting is refused (use a new `--out`).
//! - Within a shard, records go in batches of `--batch`: the images of a batch are decoded and
//!   preprocessed in parallel (rayon), then one forward pass of the vision tower (whose products
//!   are themselves parallel) embeds them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use formats::image_shard::{ImageShard, EXTENSION as IMAGE_EXTENSION};
use half::f16;
use kernels::device::Device;
use kernels::gpu::{Cuda, Emu, Gpu, Schedule};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use trainer::config::RunConfig;
use trainer::data::loader::{resolve_paths_with, LoaderError};
use trainer::model::clip::device::DeviceImageTower;
use trainer::model::clip::hf::{self, ClipTokenizer, Preprocessor};
use trainer::model::clip::{Activations, Clip, Products};
use trainer::train::objectives::ClipCaptions;

use crate::markers;

/// The manifest's file name in an embeddings folder.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's `format` field.
pub const FORMAT: &str = "tessera-clip-embeddings";
/// The manifest's `version` field.
pub const VERSION: u32 = 1;
/// Tensor names in a shard's embeddings file.
pub const IMAGE_TENSOR: &str = "image";
pub const CAPTION_TENSOR: &str = "caption";

/// Command-line options of `data-prep embed`.
#[derive(clap::Args, Debug, Clone)]
pub struct EmbedArgs {
    /// The CLIP model: a Hugging Face CLIP directory (config.json, model.safetensors,
    /// tokenizer.json, preprocessor_config.json), or a Tessera `model.kind: clip` checkpoint or
    /// run directory (its newest complete checkpoint).
    #[arg(long)]
    pub model: PathBuf,
    /// Image shards: paths or quoted glob patterns ('shards/*.tis').
    #[arg(long, required = true, num_args = 1..)]
    pub images: Vec<String>,
    /// Output folder: manifest.json and one .safetensors per input shard.
    #[arg(long)]
    pub out: PathBuf,
    /// Embed the captions too (the `caption` tensor).
    #[arg(long)]
    pub captions: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// The linear layers' products: `fp32`, or `bf16` (operands rounded to bfloat16, sums in
    /// f32; about 1.6× faster on CPUs with AVX512-BF16, each embedding within cosine 0.999 of
    /// the fp32 one; docs/dedup.md).
    #[arg(long, value_enum, default_value_t = Products::Fp32)]
    pub precision: Products,
    /// Where the vision tower runs: `cpu`, `cuda` (GPU 0, or LOCAL_RANK's), or `cuda-emu` (the
    /// CUDA kernels on the CPU emulator: a test device). The text tower and the head run on the
    /// CPU; fp32 only on a GPU.
    #[arg(long, value_enum, default_value_t = EmbedDevice::Cpu)]
    pub device: EmbedDevice,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `data-prep embed --device`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedDevice {
    Cpu,
    Cuda,
    CudaEmu,
}

/// The vision tower where `--device` puts it.
enum Tower {
    Host,
    Cuda(Box<Gpu<Cuda>>, Box<DeviceImageTower<Gpu<Cuda>>>),
    Emu(Gpu<Emu>, Box<DeviceImageTower<Gpu<Emu>>>),
}

impl Tower {
    fn open(device: EmbedDevice, clip: &LoadedClip, batch: usize) -> Result<Tower> {
        let (model, params) = (&clip.model, &clip.params[..]);
        Ok(match device {
            EmbedDevice::Cpu => Tower::Host,
            EmbedDevice::Cuda => {
                let ordinal = match std::env::var("LOCAL_RANK") {
                    Ok(v) => v
                        .parse()
                        .with_context(|| format!("LOCAL_RANK={v:?} is not a GPU index"))?,
                    Err(_) => 0,
                };
                let dev = Gpu(Cuda::new(ordinal).context("--device cuda")?);
                let tower = DeviceImageTower::new(&dev, model, params, batch)?;
                Tower::Cuda(Box::new(dev), Box::new(tower))
            }
            EmbedDevice::CudaEmu => {
                let dev = Gpu(Emu::new(Schedule::Forward));
                let tower = DeviceImageTower::new(&dev, model, params, batch)?;
                Tower::Emu(dev, Box::new(tower))
            }
        })
    }

    /// The device, for the log (`None`: the CPU).
    fn device_name(&self) -> Option<String> {
        match self {
            Tower::Host => None,
            Tower::Cuda(dev, _) => Some(dev.name()),
            Tower::Emu(dev, _) => Some(dev.name()),
        }
    }

    /// `acts.image_embeds` of `pixels` (a whole batch).
    fn image_forward(
        &mut self,
        clip: &LoadedClip,
        acts: &mut Activations,
        pixels: &[f32],
    ) -> Result<()> {
        let (m, p, e) = (&clip.model, &clip.params[..], &mut acts.image_embeds);
        match self {
            Tower::Host => m.image_forward(p, acts, pixels)?,
            Tower::Cuda(dev, t) => t.forward(&**dev, m, p, pixels, e)?,
            Tower::Emu(dev, t) => t.forward(dev, m, p, pixels, e)?,
        }
        Ok(())
    }
}

/// One input shard in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The input shard's file stem (`images-00003`), the key records are addressed by.
    pub name: String,
    /// The input shard's path as given (made absolute).
    pub source: PathBuf,
    pub records: u64,
    /// The input shard's image side.
    pub resolution: u32,
    /// The input shard's chunk-index checksum (its identity).
    pub source_index_crc: u32,
    /// The embeddings file, relative to the folder.
    pub file: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// `--model` as given.
    pub model: String,
    /// `hugging-face` or `tessera`.
    pub model_kind: String,
    /// xxh3-128 of the model's parameters (f32 little-endian, in [`Clip::table`] order), hex.
    pub weights_xxh3: String,
    /// D, the projection size.
    pub dim: usize,
    /// The vision tower's input side.
    pub image_size: usize,
    pub captions: bool,
    /// `--precision` (absent in folders written before it existed: fp32).
    #[serde(default)]
    pub precision: Products,
    pub records: u64,
    pub shards: Vec<ShardEntry>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedSummary {
    pub records: u64,
    pub shards: usize,
    pub written: usize,
    pub reused: usize,
    pub dim: usize,
    /// Images embedded by this run per second of wall time.
    pub images_per_s: f64,
}

/// How captions become ids.
enum Captioner {
    Hf(ClipTokenizer),
    Tessera(ClipCaptions),
}

impl Captioner {
    fn encode(&self, caption: &str, out: &mut Vec<u32>) -> Result<()> {
        match self {
            Captioner::Hf(t) => {
                out.extend(t.encode(caption).map_err(anyhow::Error::msg)?);
                Ok(())
            }
            Captioner::Tessera(c) => c.encode(caption, out),
        }
    }
}

/// A loaded CLIP, whichever its source.
pub struct LoadedClip {
    pub model: Clip,
    pub params: Vec<f32>,
    /// `hugging-face` or `tessera`.
    pub kind: &'static str,
    preprocessor: Preprocessor,
    captioner: Captioner,
    text_len: usize,
}

// The normalisation a Tessera-trained CLIP sees.
use trainer::model::clip::hf::{IMAGE_MEAN as CLIP_MEAN, IMAGE_STD as CLIP_STD};

impl LoadedClip {
    /// Loads `--model`; see the module doc.
    pub fn load(dir: &Path) -> Result<LoadedClip> {
        if dir.join("config.json").is_file() {
            let m = hf::load_dir(dir)
                .with_context(|| format!("loading the Hugging Face CLIP {}", dir.display()))?;
            let text_len = m.tokenizer.context();
            return Ok(LoadedClip {
                model: m.model,
                params: m.params,
                kind: "hugging-face",
                preprocessor: m.preprocessor,
                captioner: Captioner::Hf(m.tokenizer),
                text_len,
            });
        }
        let weights = trainer::model::dvae::resolve_weights(dir, false).with_context(|| {
            format!(
                "--model {}: neither a Hugging Face CLIP directory (no config.json) nor a \
                 Tessera checkpoint or run",
                dir.display()
            )
        })?;
        let ckpt = weights.parent().unwrap_or(Path::new("."));
        let yaml = trainer::checkpoint::load_checked(ckpt)?.config_yaml()?;
        let cfg_name = ckpt.join(trainer::checkpoint::CONFIG_FILE);
        let cfg = RunConfig::from_yaml_str(&yaml, &cfg_name.display().to_string())?;
        let dims = *cfg.model.clip().with_context(|| {
            format!(
                "{}: model.kind is {}, not clip",
                cfg_name.display(),
                cfg.model.kind()
            )
        })?;
        let model = Clip::new(dims).with_context(|| cfg_name.display().to_string())?;
        let params = hf::read_weights(&weights, &model)?;
        let captioner = Captioner::Tessera(
            ClipCaptions::open(&cfg)
                .with_context(|| format!("the caption tokenizer of {}", cfg_name.display()))?,
        );
        Ok(LoadedClip {
            model,
            params,
            kind: "tessera",
            preprocessor: Preprocessor {
                shortest_edge: None,
                crop: None,
                rescale: 1.0 / 255.0,
                mean_std: Some((CLIP_MEAN, CLIP_STD)),
            },
            captioner,
            text_len: dims.text_config.max_position_embeddings,
        })
    }

    /// xxh3-128 of the parameters, hex.
    pub fn weights_hash(&self) -> String {
        format!("{:032x}", trainer::params::fingerprint(&self.params))
    }

    fn image_size(&self) -> usize {
        self.model.dims().vision_config.image_size
    }

    /// `pixel_values` [3, S, S] of one `[H, W, 3]` record of side `res`.
    fn preprocess(&self, pixels: &[u8], res: u32) -> Result<Vec<f32>, String> {
        let img = image::RgbImage::from_raw(res, res, pixels.to_vec())
            .ok_or_else(|| format!("{} bytes are not a {res}×{res} RGB image", pixels.len()))?;
        let (out, h, w) = self.preprocessor.apply(&img)?;
        let s = self.image_size() as u32;
        if (h, w) != (s, s) {
            return Err(format!(
                "a {res}×{res} image preprocesses to {w}×{h} but the vision tower takes {s}×{s}"
            ));
        }
        Ok(out)
    }
}

/// `DIR/<input stem>.safetensors`.
fn output_name(input: &Path) -> (String, String) {
    let stem = input
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let file = format!("{stem}.safetensors");
    (stem, file)
}

/// The metadata stored in each embeddings file.
fn file_metadata(m: &Manifest, e: &ShardEntry) -> HashMap<String, String> {
    let mut meta = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("source".to_string(), e.name.clone()),
        ("records".to_string(), e.records.to_string()),
        (
            "source_index_crc".to_string(),
            e.source_index_crc.to_string(),
        ),
        ("weights_xxh3".to_string(), m.weights_xxh3.clone()),
        ("dim".to_string(), m.dim.to_string()),
        ("captions".to_string(), m.captions.to_string()),
    ]);
    // Only bf16 files say so, so that fp32 files are those written before the option existed.
    if m.precision != Products::Fp32 {
        meta.insert("precision".into(), "bf16".into());
    }
    meta
}

/// The metadata of a safetensors file's header, without reading its tensors.
fn read_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match safetensors::SafeTensors::read_metadata(&bytes) {
        Ok((_, meta)) => Ok(meta.metadata().clone()),
        // A damaged file is redone, as if absent.
        Err(_) => Ok(None),
    }
}

/// Runs the embed; see the module doc.
pub fn run(a: &EmbedArgs) -> Result<EmbedSummary> {
    ensure!(a.batch >= 1, "--batch must be at least 1");
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
    ensure!(
        a.precision == Products::Fp32 || a.device == EmbedDevice::Cpu,
        "--precision {} runs on the CPU only; with a GPU --device use --precision fp32",
        a.precision
    );
    let mut clip = LoadedClip::load(&a.model)?;
    clip.model.set_products(a.precision);
    let dims = *clip.model.dims();
    ensure!(
        dims.vision_config.num_channels == 3,
        "{}: vision_config.num_channels = {}; image shards hold RGB images (3)",
        a.model.display(),
        dims.vision_config.num_channels
    );
    // Every resolution present must preprocess to the tower's input size (checked on a blank
    // image of each, before any work).
    let mut seen = Vec::new();
    for s in &shards {
        let r = s.resolution();
        if !seen.contains(&r) {
            let blank = vec![0u8; (r * r * 3) as usize];
            clip.preprocess(&blank, r)
                .map_err(anyhow::Error::msg)
                .with_context(|| {
                    format!("{} with --model {}", s.path().display(), a.model.display())
                })?;
            seen.push(r);
        }
    }
    let mut names: HashMap<String, &Path> = HashMap::new();
    let mut entries = Vec::with_capacity(shards.len());
    for s in &shards {
        let (name, file) = output_name(s.path());
        if let Some(other) = names.insert(name.clone(), s.path()) {
            bail!(
                "{} and {} would both be embedded to {}; give the inputs distinct file names",
                other.display(),
                s.path().display(),
                a.out.join(&file).display()
            );
        }
        let source = std::path::absolute(s.path())
            .with_context(|| format!("resolving {}", s.path().display()))?;
        entries.push(ShardEntry {
            name,
            source,
            records: s.len(),
            resolution: s.resolution(),
            source_index_crc: s.header().index_crc,
            file,
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: a.model.display().to_string(),
        model_kind: clip.kind.into(),
        weights_xxh3: clip.weights_hash(),
        dim: dims.projection_dim,
        image_size: clip.image_size(),
        captions: a.captions,
        precision: a.precision,
        records: entries.iter().map(|e| e.records).sum(),
        shards: entries,
    };

    // A folder written with another model (or D, or --captions) is refused.
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mpath = a.out.join(MANIFEST);
    if let Some(old) = markers::read::<Manifest>(&mpath)? {
        if (&old.weights_xxh3, old.dim, old.captions, old.precision)
            != (
                &manifest.weights_xxh3,
                manifest.dim,
                manifest.captions,
                manifest.precision,
            )
        {
            bail!(
                "{} was written with model {} (weights xxh3 {}, dim {}, captions {}); --model {} \
                 has weights xxh3 {}, dim {}, captions {}; precision {} then, {} now: \
                 embeddings of two models or precisions do not mix, use a new --out",
                mpath.display(),
                old.model,
                old.weights_xxh3,
                old.dim,
                old.captions,
                a.model.display(),
                manifest.weights_xxh3,
                manifest.dim,
                manifest.captions,
                old.precision,
                manifest.precision
            );
        }
    }
    markers::write(&mpath, &manifest)?;

    let bar = markers::progress("embed", Some(manifest.records), "images", !a.quiet);
    let start = Instant::now();
    let (mut written, mut reused, mut embedded) = (0, 0, 0u64);
    let mut acts = None;
    let mut tower = None;
    for (shard, entry) in shards.iter().zip(&manifest.shards) {
        let path = a.out.join(&entry.file);
        if read_metadata(&path)?.as_ref() == Some(&file_metadata(&manifest, entry)) {
            bar.inc(entry.records);
            reused += 1;
            continue;
        }
        let acts = match &mut acts {
            Some(x) => x,
            None => acts.insert(Activations::new(&clip.model, a.batch, clip.text_len)?),
        };
        let tower = match &mut tower {
            Some(t) => t,
            None => {
                let t = Tower::open(a.device, &clip, a.batch)?;
                if let Some(name) = t.device_name() {
                    bar.suspend(|| eprintln!("embed: the vision tower runs on {name}"));
                }
                tower.insert(t)
            }
        };
        let bytes = embed_shard(&clip, tower, acts, shard, a.captions, &bar)
            .with_context(|| format!("embedding {}", shard.path().display()))?;
        let file = serialize(&manifest, entry, &bytes)?;
        formats::fsutil::write_atomic(&path, &file, true)?;
        written += 1;
        embedded += entry.records;
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    Ok(EmbedSummary {
        records: manifest.records,
        shards: manifest.shards.len(),
        written,
        reused,
        dim: manifest.dim,
        images_per_s: if secs > 0.0 {
            embedded as f64 / secs
        } else {
            0.0
        },
    })
}

/// One shard's embeddings: f16 little-endian bytes of the image [N, D] and caption [N, D] rows.
struct ShardVectors {
    image: Vec<u8>,
    caption: Option<Vec<u8>>,
}

fn f16_bytes(out: &mut Vec<u8>, v: &[f32]) {
    out.extend(v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()));
}

fn embed_shard(
    clip: &LoadedClip,
    tower: &mut Tower,
    acts: &mut Activations,
    shard: &ImageShard,
    captions: bool,
    bar: &indicatif::ProgressBar,
) -> Result<ShardVectors> {
    let b = acts.batch();
    let s = clip.image_size();
    let d = clip.model.dims().projection_dim;
    let px = 3 * s * s;
    let res = shard.resolution();
    let n = shard.len();
    let mut out = ShardVectors {
        image: Vec::with_capacity(n as usize * d * 2),
        caption: captions.then(|| Vec::with_capacity(n as usize * d * 2)),
    };
    let mut pixels = vec![0.0f32; b * px];
    let mut ids = Vec::with_capacity(b * clip.text_len);
    let mut first = 0u64;
    while first < n {
        let count = (b as u64).min(n - first) as usize;
        // Records in order (each chunk is decompressed once), preprocessing in parallel.
        let records = (first..first + count as u64)
            .map(|i| shard.record(i))
            .collect::<Result<Vec<_>, _>>()?;
        let images: Vec<Vec<f32>> = records
            .par_iter()
            .enumerate()
            .map(|(i, r)| {
                clip.preprocess(&r.pixels, res)
                    .map_err(|e| anyhow::anyhow!("record {}: {e}", first + i as u64))
            })
            .collect::<Result<_>>()?;
        // A short last batch is padded with zeros; their rows are not kept.
        pixels.fill(0.0);
        for (dst, img) in pixels.chunks_exact_mut(px).zip(&images) {
            dst.copy_from_slice(img);
        }
        tower.image_forward(clip, acts, &pixels)?;
        f16_bytes(&mut out.image, &acts.image_embeds[..count * d]);
        if let Some(cap) = &mut out.caption {
            ids.clear();
            for (i, r) in records.iter().enumerate() {
                clip.captioner
                    .encode(&r.caption, &mut ids)
                    .with_context(|| format!("the caption of record {}", first + i as u64))?;
            }
            let end = ids[ids.len() - clip.text_len..].to_vec();
            for _ in count..b {
                ids.extend_from_slice(&end);
            }
            clip.model.text_forward(&clip.params, acts, &ids)?;
            f16_bytes(cap, &acts.text_embeds[..count * d]);
        }
        bar.inc(count as u64);
        first += count as u64;
    }
    Ok(out)
}

fn serialize(m: &Manifest, e: &ShardEntry, v: &ShardVectors) -> Result<Vec<u8>> {
    let shape = vec![e.records as usize, m.dim];
    let mut views = vec![(
        IMAGE_TENSOR,
        TensorView::new(Dtype::F16, shape.clone(), &v.image)?,
    )];
    if let Some(c) = &v.caption {
        views.push((CAPTION_TENSOR, TensorView::new(Dtype::F16, shape, c)?));
    }
    Ok(safetensors::serialize(views, Some(file_metadata(m, e)))?)
}

/// An embeddings folder, read and checked: the manifest and every shard's image vectors.
pub struct Embeddings {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// [N, D] f32, records in manifest order (shard by shard).
    pub vectors: Vec<f32>,
    /// The first global index of each shard, and N at the end.
    pub offsets: Vec<u64>,
}

impl Embeddings {
    /// Reads `dir`: a missing manifest or shard file, a file of another size, dtype or weights
    /// than the manifest says is an error naming the file.
    pub fn open(dir: &Path) -> Result<Embeddings> {
        let mpath = dir.join(MANIFEST);
        let manifest: Manifest = markers::read(&mpath)?.with_context(|| {
            format!(
                "{} is missing: {} is not a `data-prep embed` output",
                mpath.display(),
                dir.display()
            )
        })?;
        ensure!(
            manifest.format == FORMAT && manifest.version == VERSION,
            "{}: format {:?} version {}, expected {FORMAT:?} version {VERSION}",
            mpath.display(),
            manifest.format,
            manifest.version
        );
        let d = manifest.dim;
        ensure!(d >= 1, "{}: dim must be at least 1", mpath.display());
        let mut vectors = Vec::with_capacity(manifest.records as usize * d);
        let mut offsets = vec![0u64];
        for e in &manifest.shards {
            let path = dir.join(&e.file);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "reading {} (shard {} of {}); rerun `data-prep embed` to finish it",
                    path.display(),
                    e.name,
                    mpath.display()
                )
            })?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                .with_context(|| format!("{}: not a safetensors file", path.display()))?;
            let weights = meta
                .metadata()
                .as_ref()
                .and_then(|m| m.get("weights_xxh3").cloned())
                .unwrap_or_default();
            ensure!(
                weights == manifest.weights_xxh3,
                "{} was embedded with weights xxh3 {weights:?} but {} says {}: rerun `data-prep \
                 embed` into a new folder",
                path.display(),
                mpath.display(),
                manifest.weights_xxh3
            );
            let t = st
                .tensor(IMAGE_TENSOR)
                .with_context(|| format!("{}: no `{IMAGE_TENSOR}` tensor", path.display()))?;
            ensure!(
                t.dtype() == Dtype::F16,
                "{}: `{IMAGE_TENSOR}` has dtype {:?}, expected F16",
                path.display(),
                t.dtype()
            );
            ensure!(
                t.shape() == [e.records as usize, d],
                "{}: `{IMAGE_TENSOR}` has shape {:?}, but {} says {} records of dim {d}",
                path.display(),
                t.shape(),
                mpath.display(),
                e.records
            );
            vectors.extend(
                t.data()
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            );
            offsets.push(offsets.last().copied().unwrap_or(0) + e.records);
        }
        Ok(Embeddings {
            dir: dir.to_path_buf(),
            manifest,
            vectors,
            offsets,
        })
    }

    pub fn len(&self) -> usize {
        *self.offsets.last().unwrap_or(&0) as usize
    }

    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    /// (shard index, record) of global index `g`.
    pub fn locate(&self, g: usize) -> (usize, u64) {
        let s = self.offsets.partition_point(|&o| o <= g as u64) - 1;
        (s, g as u64 - self.offsets[s])
    }
}

/// `data-prep embed`: runs and prints a one-line summary.
pub fn main(a: EmbedArgs) -> Result<()> {
    let s = run(&a)?;
    eprintln!(
        "embed: {} records in {} shards in {} ({} written, {} reused); dim {}; {:.2} images/s",
        s.records,
        s.shards,
        a.out.display(),
        s.written,
        s.reused,
        s.dim,
        s.images_per_s
    );
    Ok(())
}
