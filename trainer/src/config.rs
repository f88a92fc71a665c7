//! Typed YAML run configs.
//!
//! A run config is a [`RunConfig`]: one struct per YAML section, mirrored one-to-one by the file,
//! with `deny_unknown_fields` everywhere so that a misspelt key is an error, not a silent default.
//! Loading goes in three steps:
//!
//! 1. the file is parsed into a YAML value, and each `--set section.field=value` override is
//!    applied to it (the value is parsed as a YAML scalar; the path is checked against the
//!    structs' own field lists, so an override may name a field the file omits);
//! 2. the value is deserialized into the structs (errors name the file and the field, and keep
//!    serde_yaml's line and column);
//! 3. [`RunConfig::validate`] checks ranges and cross-field rules, naming the field and the
//!    allowed range.
//!
//! The resolved config ([`RunConfig::to_yaml`]) is saved in the run directory and in every
//! checkpoint; [`RunConfig::hash`] is the sha256 of that text, used to check that ranks agree.

use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::model::mixed::Precision;
use crate::model::transformer::TransformerDims;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use sha2::{Digest, Sha256};

/// Everything that can go wrong while loading or validating a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML, or does not match the structs (unknown field, missing field,
    /// wrong type, bad enum value). `message` is serde_yaml's, with the field path and, where
    /// known, line and column.
    #[error("{source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    /// A `--set KEY=VALUE` override is malformed, names no known field, or has the wrong type.
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
    /// A field is out of its allowed range, or two fields disagree.
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        /// The offending field, as `section.field`.
        field: String,
        message: String,
    },
}

/// A whole run: one field per YAML section.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Name, output directory, seed and device.
    pub run: RunSection,
    /// The model to train: the stage-2 transformer (docs/model.md §1, `kind: transformer`, the
    /// default) or the stage-1 dVAE (§2, `kind: dvae`).
    pub model: ModelConfig,
    /// Where training batches come from.
    pub data: DataSource,
    /// AdamW hyper-parameters; every field defaults to the DALL·E paper's value.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Length of the run and batch sizes.
    pub train: TrainConfig,
    /// How often to checkpoint and how many checkpoints to keep.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// The dVAE's temperature and KL-weight schedules (docs/model.md §2). Only for `model.kind:
    /// dvae`; absent means the paper's values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relaxation: Option<RelaxationConfig>,
    /// Gradient reduction between ranks: `kind: none` (a plain fp32 all-reduce, the default) or
    /// `kind: powersgd` with its settings (docs/powersgd.md).
    #[serde(default)]
    pub compression: crate::powersgd::PowerSgdConfig,
    /// Multi-process runs: timeouts, heartbeats, workers per node on CPU machines.
    #[serde(default)]
    pub distributed: crate::dist::DistributedConfig,
}

/// The `run:` section.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Name of the run, used in logs. Required, non-empty.
    pub name: String,
    /// Run directory: holds `checkpoints/`, `metrics.jsonl` and the resolved `config.yaml`.
    /// Relative paths are relative to the working directory. Required, non-empty.
    pub out_dir: PathBuf,
    /// Seed of every random stream of the run (initialisation, data, dropout). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Where to run. Default `auto` (CUDA when a GPU and the CUDA libraries are present, else CPU).
    #[serde(default)]
    pub device: Device,
    /// `fp32` (default) or `fp16`: the paper's mixed precision with per-resblock gradient
    /// scaling (docs/model.md §5). The transformer only.
    #[serde(default)]
    pub precision: Precision,
}

/// The device a run uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend; an error at start-up if no GPU or CUDA library is found.
    Cuda,
    /// The CUDA kernels on the CPU emulator (a test device: slow, for checking the device path
    /// against the CPU where no GPU exists; docs/kernels.md).
    #[serde(rename = "cuda-emu")]
    CudaEmu,
    /// CUDA when available, else CPU.
    #[default]
    Auto,
}

/// Sizes of the stage-2 transformer (docs/model.md §1). Every field but `conv_kernel` is required.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Caption length Tt in BPE tokens, padding included. ≥ 1.
    pub text_len: usize,
    /// Text BPE vocabulary size Vt (padding ids Vt..Vt+Tt come on top). ≥ 2.
    pub text_vocab: usize,
    /// Side G of the image token grid; the image has G² tokens. ≥ 1.
    pub grid: usize,
    /// Image codebook size Vi (the dVAE's vocabulary). ≥ 2.
    pub image_vocab: usize,
    /// Residual width d. ≥ 1 and divisible by `heads`.
    pub d_model: usize,
    /// Attention heads h; head size d/h. ≥ 1.
    pub heads: usize,
    /// Number of residual blocks L. ≥ 1.
    pub layers: usize,
    /// Side of the convolutional attention mask of the last layer, in grid cells. Odd, ≥ 1.
    /// Default 11.
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: usize,
}

fn default_conv_kernel() -> usize {
    11
}

impl TransformerConfig {
    /// Number of image tokens G².
    pub fn image_len(&self) -> usize {
        self.grid * self.grid
    }

    /// Sequence length T = Tt + G².
    pub fn seq_len(&self) -> usize {
        self.text_len + self.image_len()
    }

    /// Head size d/h.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }
}

/// The `model:` section: which model a run trains, and its sizes, side by side under `model:`
/// (`kind: dvae` then `n_hid: …`). `kind` defaults to `transformer`; a field of the other kind
/// is an error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "ModelSection", into = "ModelSection")]
pub enum ModelConfig {
    /// The stage-2 sparse transformer (docs/model.md §1).
    Transformer(TransformerConfig),
    /// The stage-1 discrete VAE (docs/model.md §2).
    Dvae(DvaeConfig),
}

/// The kinds of [`ModelConfig`], as written in `model.kind`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// [`ModelConfig::Transformer`].
    #[default]
    Transformer,
    /// [`ModelConfig::Dvae`].
    Dvae,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Transformer => "transformer",
            ModelKind::Dvae => "dvae",
        })
    }
}

impl ModelConfig {
    /// The kind written in `model.kind`.
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::Transformer(_) => ModelKind::Transformer,
            ModelConfig::Dvae(_) => ModelKind::Dvae,
        }
    }

    /// The transformer's sizes, if this is one.
    pub fn transformer(&self) -> Option<&TransformerConfig> {
        match self {
            ModelConfig::Transformer(t) => Some(t),
            ModelConfig::Dvae(_) => None,
        }
    }

    /// [`ModelConfig::transformer`], mutable.
    pub fn transformer_mut(&mut self) -> Option<&mut TransformerConfig> {
        match self {
            ModelConfig::Transformer(t) => Some(t),
            ModelConfig::Dvae(_) => None,
        }
    }

    /// The dVAE's sizes, if this is one.
    pub fn dvae(&self) -> Option<&DvaeConfig> {
        match self {
            ModelConfig::Dvae(d) => Some(d),
            ModelConfig::Transformer(_) => None,
        }
    }
}

/// Sizes of the stage-1 dVAE (docs/model.md §2), with OpenAI's hyper-parameter names.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DvaeConfig {
    /// Image side H = W in pixels; divisible by 8 (the token grid is resolution / 8). Required.
    pub resolution: usize,
    /// Base width of both networks. ≥ 1. Required (OpenAI: 256).
    pub n_hid: usize,
    /// Residual blocks per group. ≥ 1. Default 2 (OpenAI's).
    pub n_blk_per_group: usize,
    /// Codebook size K. ≥ 2. Required (OpenAI: 8192).
    pub vocab_size: usize,
    /// Channels of the decoder's input convolution. ≥ 1. Default 128 (OpenAI's).
    pub n_init: usize,
}

/// The `model:` section as written: one flat struct (see [`ModelConfig`]), so that unknown
/// fields are refused and the field lists are known to `--set`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    /// The model kind. Default `transformer`.
    #[serde(default)]
    kind: ModelKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text_vocab: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grid: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_vocab: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d_model: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conv_kernel: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resolution: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_hid: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_blk_per_group: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vocab_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_init: Option<usize>,
}

impl TryFrom<ModelSection> for ModelConfig {
    type Error = String;

    fn try_from(m: ModelSection) -> Result<Self, String> {
        let kind = m.kind;
        let refuse = |fields: &[(&str, bool)]| match fields.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(format!("model.{name} does not apply to model.kind: {kind}")),
            None => Ok(()),
        };
        let required = |name: &str, v: Option<usize>| {
            v.ok_or_else(|| format!("missing field `{name}` (required for model.kind: {kind})"))
        };
        match kind {
            ModelKind::Transformer => {
                refuse(&[
                    ("resolution", m.resolution.is_some()),
                    ("n_hid", m.n_hid.is_some()),
                    ("n_blk_per_group", m.n_blk_per_group.is_some()),
                    ("vocab_size", m.vocab_size.is_some()),
                    ("n_init", m.n_init.is_some()),
                ])?;
                Ok(ModelConfig::Transformer(TransformerConfig {
                    text_len: required("text_len", m.text_len)?,
                    text_vocab: required("text_vocab", m.text_vocab)?,
                    grid: required("grid", m.grid)?,
                    image_vocab: required("image_vocab", m.image_vocab)?,
                    d_model: required("d_model", m.d_model)?,
                    heads: required("heads", m.heads)?,
                    layers: required("layers", m.layers)?,
                    conv_kernel: m.conv_kernel.unwrap_or_else(default_conv_kernel),
                }))
            }
            ModelKind::Dvae => {
                refuse(&[
                    ("text_len", m.text_len.is_some()),
                    ("text_vocab", m.text_vocab.is_some()),
                    ("grid", m.grid.is_some()),
                    ("image_vocab", m.image_vocab.is_some()),
                    ("d_model", m.d_model.is_some()),
                    ("heads", m.heads.is_some()),
                    ("layers", m.layers.is_some()),
                    ("conv_kernel", m.conv_kernel.is_some()),
                ])?;
                Ok(ModelConfig::Dvae(DvaeConfig {
                    resolution: required("resolution", m.resolution)?,
                    n_hid: required("n_hid", m.n_hid)?,
                    n_blk_per_group: m.n_blk_per_group.unwrap_or(2),
                    vocab_size: required("vocab_size", m.vocab_size)?,
                    n_init: m.n_init.unwrap_or(128),
                }))
            }
        }
    }
}

impl From<ModelConfig> for ModelSection {
    fn from(m: ModelConfig) -> Self {
        let empty = ModelSection {
            kind: m.kind(),
            text_len: None,
            text_vocab: None,
            grid: None,
            image_vocab: None,
            d_model: None,
            heads: None,
            layers: None,
            conv_kernel: None,
            resolution: None,
            n_hid: None,
            n_blk_per_group: None,
            vocab_size: None,
            n_init: None,
        };
        match m {
            ModelConfig::Transformer(t) => ModelSection {
                text_len: Some(t.text_len),
                text_vocab: Some(t.text_vocab),
                grid: Some(t.grid),
                image_vocab: Some(t.image_vocab),
                d_model: Some(t.d_model),
                heads: Some(t.heads),
                layers: Some(t.layers),
                conv_kernel: Some(t.conv_kernel),
                ..empty
            },
            ModelConfig::Dvae(d) => ModelSection {
                resolution: Some(d.resolution),
                n_hid: Some(d.n_hid),
                n_blk_per_group: Some(d.n_blk_per_group),
                vocab_size: Some(d.vocab_size),
                n_init: Some(d.n_init),
                ..empty
            },
        }
    }
}

/// The `relaxation:` section (dVAE only): the Gumbel-softmax temperature τ and the KL weight β,
/// each a cosine from its start to its end value over its number of updates, then constant
/// (docs/model.md §2). Defaults are the paper's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelaxationConfig {
    /// τ at update 0. > 0. Default 1.
    #[serde(default = "default_tau_start")]
    pub tau_start: f64,
    /// τ from update `tau_steps` on. > 0. Default 1/16.
    #[serde(default = "default_tau_end")]
    pub tau_end: f64,
    /// Length of τ's cosine. ≥ 1. Default 150 000.
    #[serde(default = "default_tau_steps")]
    pub tau_steps: u64,
    /// β at update 0. ≥ 0. Default 0.
    #[serde(default)]
    pub beta_start: f64,
    /// β from update `beta_steps` on. ≥ 0. Default 6.6.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// Length of β's cosine. ≥ 1. Default 5 000.
    #[serde(default = "default_beta_steps")]
    pub beta_steps: u64,
}

fn default_tau_start() -> f64 {
    1.0
}
fn default_tau_end() -> f64 {
    1.0 / 16.0
}
fn default_tau_steps() -> u64 {
    150_000
}
fn default_beta_end() -> f64 {
    6.6
}
fn default_beta_steps() -> u64 {
    5_000
}

impl Default for RelaxationConfig {
    fn default() -> Self {
        Self {
            tau_start: default_tau_start(),
            tau_end: default_tau_end(),
            tau_steps: default_tau_steps(),
            beta_start: 0.0,
            beta_end: default_beta_end(),
            beta_steps: default_beta_steps(),
        }
    }
}

/// cosine(a → b over n) at update t: b + (a − b)·(1 + cos(π·min(t, n)/n))/2 (docs/model.md §2).
pub fn cosine_anneal(a: f64, b: f64, n: u64, t: u64) -> f64 {
    let x = t.min(n) as f64 / n.max(1) as f64;
    b + (a - b) * (1.0 + (std::f64::consts::PI * x).cos()) / 2.0
}

impl RelaxationConfig {
    /// τ at update `t`.
    pub fn tau(&self, t: u64) -> f64 {
        cosine_anneal(self.tau_start, self.tau_end, self.tau_steps, t)
    }
    /// β at update `t`.
    pub fn beta(&self, t: u64) -> f64 {
        cosine_anneal(self.beta_start, self.beta_end, self.beta_steps, t)
    }
}

/// The `data:` section: which source feeds training, and that source's own fields, side by side
/// under `data:` (`source: synthetic` then `min_caption_tokens: …`; `source: shards` then
/// `paths: […]`, …). A field of the other source is an error.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "DataSection", into = "DataSection")]
pub enum DataSource {
    /// Random captions and images drawn from the run's seed (no files needed).
    Synthetic(SyntheticConfig),
    /// Memory-mapped token shards (`.tts`, docs/formats.md), read by `data::loader`.
    Shards(ShardsConfig),
    /// Image shards (`.tis`, docs/formats.md), read by `data::image_loader`: the dVAE's data.
    Images(ImagesConfig),
}

/// The kinds of [`DataSource`], as written in `data.source`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataSourceKind {
    /// [`DataSource::Synthetic`].
    Synthetic,
    /// [`DataSource::Shards`].
    Shards,
    /// [`DataSource::Images`].
    Images,
}

impl fmt::Display for DataSourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataSourceKind::Synthetic => "synthetic",
            DataSourceKind::Shards => "shards",
            DataSourceKind::Images => "images",
        })
    }
}

/// The `data:` section as written: one flat struct, so that serde_yaml's errors carry the field
/// path (`data.min_caption_tokens: …`) and unknown fields are refused. Converted to and from
/// [`DataSource`]; fields that belong to the other source must be absent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct DataSection {
    /// The source kind. Required.
    source: DataSourceKind,
    /// Synthetic: see [`SyntheticConfig::min_caption_tokens`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_caption_tokens: Option<usize>,
    /// Synthetic: see [`SyntheticConfig::max_caption_tokens`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_caption_tokens: Option<usize>,
    /// Shards: see [`ShardsConfig::paths`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paths: Option<Vec<String>>,
    /// Shards: see [`ShardsConfig::prefetch`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefetch: Option<usize>,
    /// Shards: see [`ShardsConfig::bpe_dropout`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bpe_dropout: Option<f64>,
    /// Shards: see [`ShardsConfig::tokenizer`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokenizer: Option<PathBuf>,
    /// Shards: see [`ShardsConfig::verify`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify: Option<bool>,
}

impl TryFrom<DataSection> for DataSource {
    type Error = String;

    fn try_from(d: DataSection) -> Result<Self, String> {
        let refuse =
            |fields: &[(&str, bool)], source: &str| match fields.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!(
                    "data.{name} does not apply to data.source: {source}"
                )),
                None => Ok(()),
            };
        match d.source {
            DataSourceKind::Synthetic => {
                refuse(
                    &[
                        ("paths", d.paths.is_some()),
                        ("prefetch", d.prefetch.is_some()),
                        ("bpe_dropout", d.bpe_dropout.is_some()),
                        ("tokenizer", d.tokenizer.is_some()),
                        ("verify", d.verify.is_some()),
                    ],
                    "synthetic",
                )?;
                Ok(DataSource::Synthetic(SyntheticConfig {
                    min_caption_tokens: d
                        .min_caption_tokens
                        .unwrap_or_else(default_min_caption_tokens),
                    max_caption_tokens: d.max_caption_tokens,
                }))
            }
            DataSourceKind::Images => {
                refuse(
                    &[
                        ("min_caption_tokens", d.min_caption_tokens.is_some()),
                        ("max_caption_tokens", d.max_caption_tokens.is_some()),
                        ("bpe_dropout", d.bpe_dropout.is_some()),
                        ("tokenizer", d.tokenizer.is_some()),
                        ("verify", d.verify.is_some()),
                    ],
                    "images",
                )?;
                Ok(DataSource::Images(ImagesConfig {
                    paths: d
                        .paths
                        .ok_or("data.paths is required for data.source: images")?,
                    prefetch: d.prefetch.unwrap_or_else(default_prefetch),
                }))
            }
            DataSourceKind::Shards => {
                refuse(
                    &[
                        ("min_caption_tokens", d.min_caption_tokens.is_some()),
                        ("max_caption_tokens", d.max_caption_tokens.is_some()),
                    ],
                    "shards",
                )?;
                Ok(DataSource::Shards(ShardsConfig {
                    paths: d
                        .paths
                        .ok_or("data.paths is required for data.source: shards")?,
                    prefetch: d.prefetch.unwrap_or_else(default_prefetch),
                    bpe_dropout: d.bpe_dropout.unwrap_or(0.0),
                    tokenizer: d.tokenizer,
                    verify: d.verify.unwrap_or_else(default_verify),
                }))
            }
        }
    }
}

impl From<DataSource> for DataSection {
    fn from(d: DataSource) -> Self {
        let empty = DataSection {
            source: DataSourceKind::Synthetic,
            min_caption_tokens: None,
            max_caption_tokens: None,
            paths: None,
            prefetch: None,
            bpe_dropout: None,
            tokenizer: None,
            verify: None,
        };
        match d {
            DataSource::Synthetic(s) => DataSection {
                min_caption_tokens: Some(s.min_caption_tokens),
                max_caption_tokens: s.max_caption_tokens,
                ..empty
            },
            DataSource::Shards(s) => DataSection {
                source: DataSourceKind::Shards,
                paths: Some(s.paths),
                prefetch: Some(s.prefetch),
                bpe_dropout: Some(s.bpe_dropout),
                tokenizer: s.tokenizer,
                verify: Some(s.verify),
                ..empty
            },
            DataSource::Images(s) => DataSection {
                source: DataSourceKind::Images,
                paths: Some(s.paths),
                prefetch: Some(s.prefetch),
                ..empty
            },
        }
    }
}

impl DataSource {
    /// The kind written in `data.source`.
    pub fn kind(&self) -> DataSourceKind {
        match self {
            DataSource::Synthetic(_) => DataSourceKind::Synthetic,
            DataSource::Shards(_) => DataSourceKind::Shards,
            DataSource::Images(_) => DataSourceKind::Images,
        }
    }
}

/// Fields of `data: {source: images}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// Image shard files or glob patterns (`data/images-*.tis`); each pattern must match at
    /// least one file. Required, non-empty.
    pub paths: Vec<String>,
    /// Batches prepared ahead of the training step on a background thread, at least (small
    /// batches are handed over in parcels of several, so more are). ≥ 1. Default 2.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

/// Fields of `data: {source: shards}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShardsConfig {
    /// Token shard files or glob patterns (`data/tokens-*.tts`), relative to the working
    /// directory. Each pattern must match at least one `.tts` file; matches are sorted and
    /// de-duplicated. Required, non-empty.
    pub paths: Vec<String>,
    /// Batches prepared ahead of the training step on a background thread, at least (small
    /// batches are handed over in parcels of several, so more are). ≥ 1. Default 2.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// BPE dropout probability applied when re-encoding each caption at load time (the paper
    /// used 0.1). In [0, 1). Default 0 (the stored text tokens are used as they are).
    #[serde(default)]
    pub bpe_dropout: f64,
    /// The `tokenizer.json` that re-encodes captions. Required when `bpe_dropout` > 0.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Check each shard's record and caption checksums the first time this rank reads it (on
    /// a background thread; no record of a shard is trained on before its check passed). A
    /// failure stops the run naming the shard. `false` skips the checksums for trusted data
    /// (ids are range-checked as they are read either way). Default true.
    #[serde(default = "default_verify")]
    pub verify: bool,
}

fn default_prefetch() -> usize {
    2
}

fn default_verify() -> bool {
    true
}

/// Fields of `data: {source: synthetic}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Shortest caption in tokens (the rest is padding). Default 4; ≤ the longest.
    #[serde(default = "default_min_caption_tokens")]
    pub min_caption_tokens: usize,
    /// Longest caption in tokens. Default `null`, meaning `model.text_len`; ≤ `model.text_len`.
    #[serde(default)]
    pub max_caption_tokens: Option<usize>,
}

fn default_min_caption_tokens() -> usize {
    4
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            min_caption_tokens: default_min_caption_tokens(),
            max_caption_tokens: None,
        }
    }
}

impl SyntheticConfig {
    /// The longest caption, with `null` resolved to `text_len`.
    pub fn max_caption_tokens(&self, text_len: usize) -> usize {
        self.max_caption_tokens.unwrap_or(text_len)
    }
}

/// The `optim:` section: AdamW. Defaults are the DALL·E paper's (App. B.2).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached at the end of warm-up. > 0. Default 4.5e-4.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// First-moment decay β1, in [0, 1). Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay β2, in [0, 1). Default 0.96.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Denominator term ε. > 0. Default 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not embeddings, gains, biases). ≥ 0.
    /// Default 4.5e-2.
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables. ≥ 0. Default 4.0.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Decay of the weight exponential moving average, in [0, 1); 0 disables. Default 0.99.
    #[serde(default = "default_ema")]
    pub ema: f64,
}

fn default_lr() -> f64 {
    4.5e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.96
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    4.5e-2
}
fn default_grad_clip() -> f64 {
    4.0
}
fn default_ema() -> f64 {
    0.99
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            grad_clip: default_grad_clip(),
            ema: default_ema(),
        }
    }
}

/// The learning-rate schedule after warm-up.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Halve (× `plateau_factor`) whenever the smoothed loss stops improving (the paper's rule).
    #[default]
    Plateau,
    /// Cosine decay from `optim.lr` to `min_lr` over `total_steps`.
    Cosine,
}

/// The `schedule:` section.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// `plateau` or `cosine`. Default `plateau`.
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Updates of linear warm-up from 0 to `optim.lr`. Default 0 (none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Plateau only: updates without improvement of the smoothed loss before the learning rate
    /// is multiplied by `plateau_factor`. ≥ 1. Default 500.
    #[serde(default = "default_plateau_patience")]
    pub plateau_patience: u64,
    /// Plateau only: updates in the loss-smoothing window. ≥ 1. Default 50.
    #[serde(default = "default_plateau_window")]
    pub plateau_window: u64,
    /// Plateau only: multiplier applied at each plateau, in (0, 1). Default 0.5.
    #[serde(default = "default_plateau_factor")]
    pub plateau_factor: f64,
    /// Floor of the learning rate for both schedules, in [0, `optim.lr`]. Default 0.
    #[serde(default)]
    pub min_lr: f64,
    /// Cosine only: the update at which the decay reaches `min_lr`, counted from step 0 with
    /// warm-up included. `null` means `train.steps`. ≥ 1 when set. Default `null`.
    #[serde(default)]
    pub total_steps: Option<u64>,
}

fn default_plateau_patience() -> u64 {
    500
}
fn default_plateau_window() -> u64 {
    50
}
fn default_plateau_factor() -> f64 {
    0.5
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::default(),
            warmup_steps: 0,
            plateau_patience: default_plateau_patience(),
            plateau_window: default_plateau_window(),
            plateau_factor: default_plateau_factor(),
            min_lr: 0.0,
            total_steps: None,
        }
    }
}

/// The `train:` section.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to run in total (a resumed run continues up to this number). ≥ 1.
    pub steps: u64,
    /// Sequences per micro-batch, per rank. ≥ 1.
    pub batch_size: usize,
    /// Micro-batches accumulated per update. ≥ 1. Default 1.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Log metrics every N updates. ≥ 1. Default 10.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

fn default_one() -> usize {
    1
}
fn default_log_every() -> u64 {
    10
}

/// The `checkpoint:` section.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N updates, and always at the end; 0 saves only at the end. Default 1000.
    #[serde(default = "default_checkpoint_every")]
    pub every: u64,
    /// Keep the newest N complete checkpoints, delete older ones. ≥ 1. Default 3.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
}

fn default_checkpoint_every() -> u64 {
    1000
}
fn default_keep_last() -> usize {
    3
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: default_checkpoint_every(),
            keep_last: default_keep_last(),
        }
    }
}

impl RunConfig {
    /// Parses and validates a config from YAML text. `source_name` (usually the file path) prefixes
    /// every error message.
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<RunConfig, ConfigError> {
        Self::from_yaml_str_with_overrides(text, source_name, &[])
    }

    /// Reads `path`, applies each `section.field=value` override, deserializes and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str_with_overrides(&text, &path.display().to_string(), overrides)
    }

    /// [`RunConfig::from_yaml_str`] with `--set` overrides applied before deserializing.
    pub fn from_yaml_str_with_overrides(
        text: &str,
        source_name: &str,
        overrides: &[String],
    ) -> Result<RunConfig, ConfigError> {
        let parse_error = |e: serde_yaml::Error| ConfigError::Parse {
            source_name: source_name.to_string(),
            message: e.to_string(),
        };
        let config: RunConfig = if overrides.is_empty() {
            // Straight from the text, so that errors keep their line and column.
            serde_yaml::from_str(text).map_err(parse_error)?
        } else {
            let mut value: Value = serde_yaml::from_str(text).map_err(parse_error)?;
            if value.is_null() {
                value = Value::Mapping(Mapping::new());
            }
            let parsed: Vec<Override> = overrides
                .iter()
                .map(|arg| Override::parse(arg))
                .collect::<Result<_, _>>()?;
            for o in &parsed {
                o.apply(&mut value)?;
            }
            deserialize_merged(text, source_name, &value, &parsed)?
        };
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { field, message, .. } => ConfigError::Invalid {
                source_name: source_name.to_string(),
                field,
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Checks every range and cross-field rule; the error names the field and the allowed range.
    /// (The error's `source_name` is `config`; [`RunConfig::load`] replaces it with the path.)
    // `is_multiple_of` is newer than the workspace's rust-version (1.85).
    #[allow(clippy::manual_is_multiple_of)]
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| {
            Err(ConfigError::Invalid {
                source_name: "config".to_string(),
                field: field.to_string(),
                message,
            })
        };
        let r = &self.run;
        if r.name.trim().is_empty() {
            return invalid("run.name", "run.name must not be empty".into());
        }
        if r.out_dir.as_os_str().is_empty() {
            return invalid("run.out_dir", "run.out_dir must not be empty".into());
        }
        if r.precision == Precision::Fp16 && !matches!(self.model, ModelConfig::Transformer(_)) {
            return invalid(
                "run.precision",
                "run.precision: fp16 applies to model.kind: transformer; the dVAE trains in fp32"
                    .into(),
            );
        }

        match &self.model {
            ModelConfig::Transformer(m) => {
                validate_transformer(m).or_else(|(f, msg)| invalid(&f, msg))?;
                if self.relaxation.is_some() {
                    return invalid(
                        "relaxation",
                        "the relaxation section applies to model.kind: dvae only".into(),
                    );
                }
                match &self.data {
                    DataSource::Synthetic(s) => {
                        let max = s.max_caption_tokens(m.text_len);
                        if max > m.text_len {
                            return invalid(
                                "data.max_caption_tokens",
                                format!(
                                    "data.max_caption_tokens = {max} must be ≤ model.text_len = {}",
                                    m.text_len
                                ),
                            );
                        }
                        if s.min_caption_tokens > max {
                            return invalid(
                                "data.min_caption_tokens",
                                format!(
                                    "data.min_caption_tokens = {} must be ≤ data.max_caption_tokens = {max}",
                                    s.min_caption_tokens
                                ),
                            );
                        }
                    }
                    DataSource::Shards(_) => {}
                    DataSource::Images(_) => {
                        return invalid(
                            "data.source",
                            "data.source: images feeds model.kind: dvae; the transformer reads \
                             data.source: shards (token shards, made by `data-prep encode`) or \
                             synthetic"
                                .into(),
                        )
                    }
                }
            }
            ModelConfig::Dvae(d) => {
                validate_dvae(d).or_else(|(f, msg)| invalid(&f, msg))?;
                if let Some(r) = &self.relaxation {
                    validate_relaxation(r).or_else(|(f, msg)| invalid(&f, msg))?;
                }
                if !matches!(self.data, DataSource::Images(_)) {
                    return invalid(
                        "data.source",
                        format!(
                            "model.kind: dvae trains on image shards: data.source must be images, \
                             not {}",
                            self.data.kind()
                        ),
                    );
                }
            }
        }
        match &self.data {
            DataSource::Synthetic(_) => {}
            DataSource::Shards(s) => {
                if s.paths.is_empty() || s.paths.iter().any(|p| p.trim().is_empty()) {
                    return invalid(
                        "data.paths",
                        "data.paths must list at least one shard file or glob pattern, none empty"
                            .into(),
                    );
                }
                if s.prefetch < 1 {
                    return invalid("data.prefetch", "data.prefetch must be ≥ 1".into());
                }
                if !(0.0..1.0).contains(&s.bpe_dropout) {
                    return invalid(
                        "data.bpe_dropout",
                        format!("data.bpe_dropout = {} must be in [0, 1)", s.bpe_dropout),
                    );
                }
                if s.bpe_dropout > 0.0 && s.tokenizer.is_none() {
                    return invalid(
                        "data.tokenizer",
                        format!(
                            "data.tokenizer (a tokenizer.json) is required when data.bpe_dropout = {} > 0",
                            s.bpe_dropout
                        ),
                    );
                }
            }
            DataSource::Images(s) => {
                if s.paths.is_empty() || s.paths.iter().any(|p| p.trim().is_empty()) {
                    return invalid(
                        "data.paths",
                        "data.paths must list at least one image shard file or glob pattern, \
                         none empty"
                            .into(),
                    );
                }
                if s.prefetch < 1 {
                    return invalid("data.prefetch", "data.prefetch must be ≥ 1".into());
                }
            }
        }

        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return invalid("optim.lr", format!("optim.lr = {} must be > 0", o.lr));
        }
        for (field, value) in [
            ("optim.beta1", o.beta1),
            ("optim.beta2", o.beta2),
            ("optim.ema", o.ema),
        ] {
            if !(0.0..1.0).contains(&value) {
                return invalid(field, format!("{field} = {value} must be in [0, 1)"));
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return invalid("optim.eps", format!("optim.eps = {} must be > 0", o.eps));
        }
        for (field, value) in [
            ("optim.weight_decay", o.weight_decay),
            ("optim.grad_clip", o.grad_clip),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(field, format!("{field} = {value} must be ≥ 0"));
            }
        }

        let s = &self.schedule;
        if s.plateau_patience < 1 {
            return invalid(
                "schedule.plateau_patience",
                "schedule.plateau_patience must be ≥ 1".into(),
            );
        }
        if s.plateau_window < 1 {
            return invalid(
                "schedule.plateau_window",
                "schedule.plateau_window must be ≥ 1".into(),
            );
        }
        if !(s.plateau_factor > 0.0 && s.plateau_factor < 1.0) {
            return invalid(
                "schedule.plateau_factor",
                format!(
                    "schedule.plateau_factor = {} must be in (0, 1)",
                    s.plateau_factor
                ),
            );
        }
        if !(s.min_lr >= 0.0 && s.min_lr <= o.lr) {
            return invalid(
                "schedule.min_lr",
                format!(
                    "schedule.min_lr = {} must be in [0, optim.lr = {}]",
                    s.min_lr, o.lr
                ),
            );
        }
        if s.total_steps == Some(0) {
            return invalid(
                "schedule.total_steps",
                "schedule.total_steps must be ≥ 1 or null".into(),
            );
        }

        let t = &self.train;
        if t.steps < 1 {
            return invalid("train.steps", "train.steps must be ≥ 1".into());
        }
        if t.batch_size < 1 {
            return invalid("train.batch_size", "train.batch_size must be ≥ 1".into());
        }
        if t.grad_accum < 1 {
            return invalid("train.grad_accum", "train.grad_accum must be ≥ 1".into());
        }
        if t.log_every < 1 {
            return invalid("train.log_every", "train.log_every must be ≥ 1".into());
        }

        if let Err(crate::powersgd::PowerSgdError::Config { field, message }) =
            self.compression.validate()
        {
            return invalid(field, message);
        }

        if self.checkpoint.keep_last < 1 {
            return invalid(
                "checkpoint.keep_last",
                "checkpoint.keep_last must be ≥ 1".into(),
            );
        }
        if let Err((field, message)) = self.distributed.validate() {
            return invalid(&field, message);
        }
        Ok(())
    }

    /// The resolved config as YAML: every field, defaults filled in, in struct order. Saved as
    /// `config.yaml` in the run directory and in every checkpoint; loads back to an equal config.
    pub fn to_yaml(&self) -> String {
        // Serializing these plain structs (strings, numbers, enums, options) cannot fail.
        serde_yaml::to_string(self).unwrap_or_else(|e| format!("# unserializable config: {e}\n"))
    }

    /// sha256 (lowercase hex) of [`RunConfig::to_yaml`]: equal configs give equal hashes.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.to_yaml().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The transformer's sizes, or an error naming `model.kind` when the run trains another
    /// model (for the commands and data sources that only a transformer has).
    pub fn transformer(&self) -> Result<&TransformerConfig, ConfigError> {
        self.model
            .transformer()
            .ok_or_else(|| ConfigError::Invalid {
                source_name: "config".into(),
                field: "model.kind".into(),
                message: format!(
                    "this needs a stage-2 transformer config, but model.kind is {}",
                    self.model.kind()
                ),
            })
    }

    /// The dVAE's temperature and KL-weight schedules (the paper's when the section is absent).
    pub fn relaxation(&self) -> RelaxationConfig {
        self.relaxation.clone().unwrap_or_default()
    }

    /// Effective cosine decay length: `schedule.total_steps`, or `train.steps` when null.
    pub fn schedule_total_steps(&self) -> u64 {
        self.schedule.total_steps.unwrap_or(self.train.steps)
    }
}

/// Range checks of `model:` for a transformer: `Err((field, message))`.
#[allow(clippy::manual_is_multiple_of)]
fn validate_transformer(m: &TransformerConfig) -> Result<(), (String, String)> {
    // The model's own check, so that the config accepts exactly what the model can build.
    TransformerDims::from(m).check("model.")
}

impl From<&TransformerConfig> for TransformerDims {
    fn from(m: &TransformerConfig) -> Self {
        TransformerDims {
            text_len: m.text_len,
            text_vocab: m.text_vocab,
            grid: m.grid,
            image_vocab: m.image_vocab,
            d_model: m.d_model,
            heads: m.heads,
            layers: m.layers,
            conv_kernel: m.conv_kernel,
        }
    }
}

/// Range checks of `model:` for a dVAE.
#[allow(clippy::manual_is_multiple_of)]
fn validate_dvae(d: &DvaeConfig) -> Result<(), (String, String)> {
    if d.resolution < 8 || d.resolution % 8 != 0 {
        return Err((
            "model.resolution".into(),
            format!(
                "model.resolution = {} must be a positive multiple of 8 (the encoder pools three \
                 times)",
                d.resolution
            ),
        ));
    }
    for (field, value, min) in [
        ("model.n_hid", d.n_hid, 1),
        ("model.n_blk_per_group", d.n_blk_per_group, 1),
        ("model.vocab_size", d.vocab_size, 2),
        ("model.n_init", d.n_init, 1),
    ] {
        if value < min {
            return Err((field.into(), format!("{field} = {value} must be ≥ {min}")));
        }
    }
    Ok(())
}

/// Range checks of `relaxation:`.
fn validate_relaxation(r: &RelaxationConfig) -> Result<(), (String, String)> {
    for (field, value) in [
        ("relaxation.tau_start", r.tau_start),
        ("relaxation.tau_end", r.tau_end),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err((field.into(), format!("{field} = {value} must be > 0")));
        }
    }
    for (field, value) in [
        ("relaxation.beta_start", r.beta_start),
        ("relaxation.beta_end", r.beta_end),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err((field.into(), format!("{field} = {value} must be ≥ 0")));
        }
    }
    for (field, value) in [
        ("relaxation.tau_steps", r.tau_steps),
        ("relaxation.beta_steps", r.beta_steps),
    ] {
        if value < 1 {
            return Err((field.into(), format!("{field} must be ≥ 1")));
        }
    }
    Ok(())
}

/// One parsed `--set section.field=value`.
struct Override {
    arg: String,
    path: Vec<String>,
    value: Value,
}

impl Override {
    fn parse(arg: &str) -> Result<Override, ConfigError> {
        let err = |message: String| ConfigError::Override {
            arg: arg.to_string(),
            message,
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| err("expected KEY=VALUE, e.g. optim.lr=1e-3".into()))?;
        let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(err(format!("bad key '{key}': expected section.field")));
        }
        let value: Value = serde_yaml::from_str(raw)
            .map_err(|e| err(format!("value '{raw}' is not a YAML scalar: {e}")))?;
        check_path(&path).map_err(err)?;
        Ok(Override {
            arg: arg.to_string(),
            path,
            value,
        })
    }

    fn key(&self) -> String {
        self.path.join(".")
    }

    /// Writes the value at the path, creating (or replacing non-mapping) sections on the way.
    fn apply(&self, root: &mut Value) -> Result<(), ConfigError> {
        let mut node = root;
        for (i, part) in self.path.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = node else {
                return Err(ConfigError::Override {
                    arg: self.arg.clone(),
                    message: format!("'{}' is not a section", self.path[..i].join(".")),
                });
            };
            let key = Value::String(part.clone());
            if i + 1 == self.path.len() {
                map.insert(key, self.value.clone());
                return Ok(());
            }
            node = map.entry(key).or_insert(Value::Null);
        }
        Ok(())
    }
}

/// Checks an override path against the structs' own field lists (from their serde derives).
fn check_path(path: &[String]) -> Result<(), String> {
    let sections = fields_of::<RunConfig>().unwrap_or(&[]);
    let section = path[0].as_str();
    if !sections.contains(&section) {
        return Err(format!(
            "unknown section '{section}' (expected one of {})",
            sections.join(", ")
        ));
    }
    if path.len() < 2 {
        return Err(format!(
            "'{section}' is a section: name a field, as {section}.<field>"
        ));
    }
    let fields = match section {
        "run" => fields_of::<RunSection>(),
        "model" => fields_of::<ModelConfig>(),
        "relaxation" => fields_of::<RelaxationConfig>(),
        "compression" => fields_of::<crate::powersgd::PowerSgdConfig>(),
        "distributed" => fields_of::<crate::dist::DistributedConfig>(),
        "data" => fields_of::<DataSource>(),
        "optim" => fields_of::<OptimConfig>(),
        "schedule" => fields_of::<ScheduleConfig>(),
        "train" => fields_of::<TrainConfig>(),
        "checkpoint" => fields_of::<CheckpointConfig>(),
        _ => None,
    };
    if let Some(fields) = fields {
        let field = path[1].as_str();
        if !fields.contains(&field) {
            return Err(format!(
                "unknown field '{field}' in section '{section}' (expected one of {})",
                fields.join(", ")
            ));
        }
        if path.len() > 2 {
            return Err(format!("'{section}.{field}' has no sub-fields"));
        }
    }
    Ok(())
}

/// Deserializes the config with overrides applied. The merged value is written back to YAML and
/// read with serde_yaml's text deserializer, whose errors carry the field path. An error at an
/// overridden field is blamed on that override; any other is reported against the file, with the
/// file's own line and column when the file alone shows the same error.
fn deserialize_merged(
    text: &str,
    source_name: &str,
    merged: &Value,
    overrides: &[Override],
) -> Result<RunConfig, ConfigError> {
    let merged_text = serde_yaml::to_string(merged).map_err(|e| ConfigError::Parse {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })?;
    let err = match serde_yaml::from_str::<RunConfig>(&merged_text) {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let message = strip_location(&err.to_string());
    let error_path = message.split_once(": ").map(|(p, _)| p).unwrap_or("");
    // The last override of a key wins, so blame the last one.
    if let Some(o) = overrides.iter().rev().find(|o| o.key() == error_path) {
        let detail = message[error_path.len() + 2..].to_string();
        return Err(ConfigError::Override {
            arg: o.arg.clone(),
            message: format!("{}: {detail}", o.key()),
        });
    }
    if let Err(file_err) = serde_yaml::from_str::<RunConfig>(text) {
        let file_message = file_err.to_string();
        if strip_location(&file_message) == message {
            return Err(ConfigError::Parse {
                source_name: source_name.to_string(),
                message: file_message,
            });
        }
    }
    Err(ConfigError::Parse {
        source_name: source_name.to_string(),
        message: format!("{message} (after applying --set overrides)"),
    })
}

/// Drops serde_yaml's trailing " at line L column C" (which would point into regenerated text).
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message.to_string(),
    }
}

/// The field names of a struct, from its `Deserialize` derive (`None` for non-structs).
fn fields_of<'de, T: Deserialize<'de>>() -> Option<&'static [&'static str]> {
    let mut fields = None;
    // The introspector always stops with an error once it has seen the field list.
    let _ = T::deserialize(FieldNames { out: &mut fields });
    fields
}

/// A deserializer that records the field list a struct asks for, then stops.
struct FieldNames<'a> {
    out: &'a mut Option<&'static [&'static str]>,
}

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field-name introspection stops here")
    }
}

impl std::error::Error for Stop {}

impl serde::de::Error for Stop {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Stop
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.out = Some(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "\
run:
  name: t
  out_dir: runs/t
  seed: 7
  device: cpu
model:
  text_len: 8
  text_vocab: 64
  grid: 4
  image_vocab: 32
  d_model: 32
  heads: 4
  layers: 2
  conv_kernel: 3
data:
  source: synthetic
  min_caption_tokens: 2
  max_caption_tokens: 6
optim:
  lr: 1.0e-3
  beta1: 0.9
  beta2: 0.95
  eps: 1.0e-8
  weight_decay: 0.01
  grad_clip: 1.0
  ema: 0.0
schedule:
  kind: cosine
  warmup_steps: 5
  plateau_patience: 10
  plateau_window: 5
  plateau_factor: 0.5
  min_lr: 1.0e-5
  total_steps: 40
train:
  steps: 20
  batch_size: 2
  grad_accum: 2
  log_every: 1
checkpoint:
  every: 10
  keep_last: 2
";

    /// Only the required fields.
    const MINIMAL: &str = "\
run:
  name: m
  out_dir: runs/m
model:
  text_len: 8
  text_vocab: 64
  grid: 4
  image_vocab: 32
  d_model: 32
  heads: 4
  layers: 2
data:
  source: synthetic
train:
  steps: 20
  batch_size: 2
";

    fn sets(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn load_err(text: &str, overrides: &[&str]) -> String {
        match RunConfig::from_yaml_str_with_overrides(text, "test.yaml", &sets(overrides)) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_config_round_trips_through_to_yaml() {
        let c = RunConfig::from_yaml_str(FULL, "full.yaml").unwrap();
        assert_eq!(c.run.device, Device::Cpu);
        assert_eq!(c.schedule.kind, ScheduleKind::Cosine);
        assert_eq!(c.transformer().unwrap().conv_kernel, 3);
        assert_eq!(
            c.data,
            DataSource::Synthetic(SyntheticConfig {
                min_caption_tokens: 2,
                max_caption_tokens: Some(6)
            })
        );
        let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved.yaml").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.to_yaml(), c.to_yaml());
        assert_eq!(back.hash(), c.hash());
        assert_eq!(c.hash().len(), 64);
        let mut other = c.clone();
        other.optim.lr = 2e-3;
        assert_ne!(other.hash(), c.hash());
    }

    #[test]
    fn defaults_fill_in() {
        let c = RunConfig::from_yaml_str(MINIMAL, "minimal.yaml").unwrap();
        assert_eq!(c.run.seed, 0);
        assert_eq!(c.run.device, Device::Auto);
        assert_eq!(c.transformer().unwrap().conv_kernel, 11);
        assert_eq!(c.data, DataSource::Synthetic(SyntheticConfig::default()));
        let DataSource::Synthetic(s) = &c.data else {
            panic!("synthetic expected")
        };
        assert_eq!(s.min_caption_tokens, 4);
        assert_eq!(s.max_caption_tokens(c.transformer().unwrap().text_len), 8);
        assert_eq!(c.optim, OptimConfig::default());
        assert_eq!(c.optim.lr, 4.5e-4);
        assert_eq!(c.optim.beta2, 0.96);
        assert_eq!(c.optim.weight_decay, 4.5e-2);
        assert_eq!(c.schedule, ScheduleConfig::default());
        assert_eq!(c.schedule_total_steps(), 20);
        assert_eq!(c.train.grad_accum, 1);
        assert_eq!(c.train.log_every, 10);
        assert_eq!(c.checkpoint, CheckpointConfig::default());
        assert_eq!(c.transformer().unwrap().seq_len(), 8 + 16);
        assert_eq!(c.transformer().unwrap().head_dim(), 8);
    }

    #[test]
    fn unknown_field_is_named_with_file_and_line() {
        let text = FULL.replace("  grad_clip: 1.0", "  grad_clip: 1.0\n  lrr: 1.0");
        let e = load_err(&text, &[]);
        assert!(e.starts_with("test.yaml: "), "{e}");
        assert!(
            e.contains("optim") && e.contains("unknown field `lrr`"),
            "{e}"
        );
        assert!(e.contains("line"), "{e}");
        let e = load_err(&format!("{FULL}extra:\n  a: 1\n"), &[]);
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = load_err(&MINIMAL.replace("  heads: 4\n", ""), &[]);
        assert!(e.starts_with("test.yaml: "), "{e}");
        assert!(
            e.contains("model") && e.contains("missing field `heads`"),
            "{e}"
        );
        let e = load_err(&MINIMAL.replace("  steps: 20\n", ""), &[]);
        assert!(e.contains("missing field `steps`"), "{e}");
    }

    #[test]
    fn wrong_type_keeps_path_and_line() {
        let e = load_err(&FULL.replace("lr: 1.0e-3", "lr: fast"), &[]);
        assert!(e.starts_with("test.yaml: optim.lr: "), "{e}");
        assert!(e.contains("invalid type") && e.contains("line 20"), "{e}");
    }

    #[test]
    fn bad_enum_value_is_named() {
        let e = load_err(&FULL.replace("device: cpu", "device: tpu"), &[]);
        assert!(e.contains("run.device") && e.contains("tpu"), "{e}");
        let e = load_err(&FULL.replace("kind: cosine", "kind: linear"), &[]);
        assert!(e.contains("schedule.kind") && e.contains("linear"), "{e}");
        let e = load_err(
            &FULL.replace("source: synthetic", "source: webdataset"),
            &[],
        );
        assert!(e.contains("data.source") && e.contains("webdataset"), "{e}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (from, to, expected) in [
            (
                "d_model: 32",
                "d_model: 30",
                "model.d_model = 30 must be divisible by model.heads = 4",
            ),
            (
                "beta2: 0.95",
                "beta2: 1.5",
                "optim.beta2 = 1.5 must be in [0, 1)",
            ),
            (
                "conv_kernel: 3",
                "conv_kernel: 4",
                "model.conv_kernel = 4 must be odd and ≥ 1",
            ),
            (
                "keep_last: 2",
                "keep_last: 0",
                "checkpoint.keep_last must be ≥ 1",
            ),
            (
                "batch_size: 2",
                "batch_size: 0",
                "train.batch_size must be ≥ 1",
            ),
            ("lr: 1.0e-3", "lr: 0.0", "optim.lr = 0 must be > 0"),
            ("ema: 0.0", "ema: 1.0", "optim.ema = 1 must be in [0, 1)"),
            (
                "text_vocab: 64",
                "text_vocab: 1",
                "model.text_vocab = 1 must be ≥ 2",
            ),
            (
                "max_caption_tokens: 6",
                "max_caption_tokens: 9",
                "data.max_caption_tokens = 9 must be ≤ model.text_len = 8",
            ),
            (
                "plateau_factor: 0.5",
                "plateau_factor: 1.0",
                "schedule.plateau_factor = 1 must be in (0, 1)",
            ),
        ] {
            assert!(FULL.contains(from), "{from}");
            let e = load_err(&FULL.replace(from, to), &[]);
            assert_eq!(e, format!("test.yaml: {expected}"));
        }
    }

    #[test]
    fn the_config_accepts_exactly_the_transformer_sizes_the_model_builds() {
        // One check for both (TransformerDims::check): a one-token caption leaves the text loss
        // nothing to score, and the config said so too late (the model refused it at start-up).
        let e = load_err(&FULL.replace("text_len: 8", "text_len: 1"), &[]);
        assert_eq!(e, "test.yaml: model.text_len = 1 must be ≥ 2");
        let two = FULL
            .replace("text_len: 8", "text_len: 2")
            .replace("max_caption_tokens: 6", "max_caption_tokens: 2");
        let c = RunConfig::from_yaml_str(&two, "t").unwrap();
        let dims = crate::train::dims_of(&c).unwrap();
        crate::model::transformer::Transformer::new(dims).unwrap();
    }

    #[test]
    fn invalid_error_carries_the_field() {
        let err =
            RunConfig::from_yaml_str(&FULL.replace("heads: 4", "heads: 5"), "f.yaml").unwrap_err();
        match err {
            ConfigError::Invalid { field, .. } => assert_eq!(field, "model.d_model"),
            other => panic!("wrong error {other:?}"),
        }
    }

    #[test]
    fn overrides_apply_with_yaml_scalar_types() {
        let c = RunConfig::from_yaml_str_with_overrides(
            FULL,
            "full.yaml",
            &sets(&[
                "optim.lr=1e-3",
                "optim.lr=2.5e-3",
                "run.device=auto",
                "run.name=1234",
                "train.steps=99",
                "schedule.total_steps=null",
                "data.max_caption_tokens=7",
            ]),
        )
        .unwrap();
        assert_eq!(c.optim.lr, 2.5e-3);
        assert_eq!(c.run.device, Device::Auto);
        assert_eq!(c.run.name, "1234");
        assert_eq!(c.train.steps, 99);
        assert_eq!(c.schedule.total_steps, None);
        let DataSource::Synthetic(s) = &c.data else {
            panic!("synthetic expected")
        };
        assert_eq!(s.max_caption_tokens, Some(7));
    }

    #[test]
    fn override_of_field_absent_from_file_uses_the_struct() {
        let c = RunConfig::from_yaml_str_with_overrides(
            MINIMAL,
            "minimal.yaml",
            &sets(&[
                "model.conv_kernel=5",
                "checkpoint.keep_last=7",
                "optim.ema=0",
            ]),
        )
        .unwrap();
        assert_eq!(c.transformer().unwrap().conv_kernel, 5);
        assert_eq!(c.checkpoint.keep_last, 7);
        assert_eq!(c.checkpoint.every, 1000);
        assert_eq!(c.optim.ema, 0.0);
        // An override can also supply a required field the file lacks.
        let c = RunConfig::from_yaml_str_with_overrides(
            &MINIMAL.replace("  layers: 2\n", ""),
            "minimal.yaml",
            &sets(&["model.layers=3"]),
        )
        .unwrap();
        assert_eq!(c.transformer().unwrap().layers, 3);
    }

    #[test]
    fn unknown_override_path_is_named() {
        let e = load_err(FULL, &["optim.lrr=1"]);
        assert!(
            e.starts_with("--set optim.lrr=1: unknown field 'lrr' in section 'optim'"),
            "{e}"
        );
        let e = load_err(FULL, &["optimizer.lr=1"]);
        assert!(e.contains("unknown section 'optimizer'"), "{e}");
        let e = load_err(FULL, &["optim=1"]);
        assert!(e.contains("'optim' is a section"), "{e}");
        let e = load_err(FULL, &["optim.lr.x=1"]);
        assert!(e.contains("'optim.lr' has no sub-fields"), "{e}");
        let e = load_err("run: 3\n", &["run.name=x"]);
        assert!(e.contains("'run' is not a section"), "{e}");
        let e = load_err(FULL, &["optim.lr"]);
        assert!(e.contains("expected KEY=VALUE"), "{e}");
        let e = load_err(FULL, &["data.colour=1"]);
        assert!(
            e.contains("unknown field 'colour' in section 'data'"),
            "{e}"
        );
        let text = FULL.replace(
            "  min_caption_tokens: 2",
            "  min_caption_tokens: 2\n  colour: 1",
        );
        let e = load_err(&text, &[]);
        assert!(
            e.contains("data: unknown field `colour`") && e.contains("line"),
            "{e}"
        );
    }

    #[test]
    fn override_type_mismatch_is_blamed_on_the_override() {
        let e = load_err(FULL, &["train.steps=10", "optim.lr=fast"]);
        assert!(
            e.starts_with("--set optim.lr=fast: optim.lr: invalid type"),
            "{e}"
        );
        assert!(!e.contains("line"), "{e}");
        let e = load_err(FULL, &["run.device=tpu"]);
        assert!(
            e.starts_with("--set run.device=tpu: run.device: unknown variant"),
            "{e}"
        );
        let e = load_err(FULL, &["data.min_caption_tokens=abc"]);
        assert!(
            e.starts_with(
                "--set data.min_caption_tokens=abc: data.min_caption_tokens: invalid type"
            ),
            "{e}"
        );
        // Range errors after overrides are still validation errors naming the field.
        let e = load_err(FULL, &["optim.beta1=1.0"]);
        assert_eq!(e, "test.yaml: optim.beta1 = 1 must be in [0, 1)");
    }

    #[test]
    fn file_errors_keep_their_line_when_overrides_are_given() {
        let text = FULL.replace("beta1: 0.9", "beta1: high");
        let e = load_err(&text, &["train.steps=3"]);
        assert!(e.starts_with("test.yaml: optim.beta1: invalid type"), "{e}");
        assert!(e.contains("line 21"), "{e}");
    }

    #[test]
    fn load_reads_files_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, FULL).unwrap();
        let c = RunConfig::load(&path, &sets(&["train.steps=5"])).unwrap();
        assert_eq!(c.train.steps, 5);
        let missing = dir.path().join("nope.yaml");
        let e = RunConfig::load(&missing, &[]).unwrap_err().to_string();
        assert!(e.contains("nope.yaml"), "{e}");
        std::fs::write(&path, FULL.replace("d_model: 32", "d_model: 30")).unwrap();
        let e = RunConfig::load(&path, &[]).unwrap_err().to_string();
        assert!(e.starts_with(&path.display().to_string()), "{e}");
    }

    #[test]
    fn shards_source_parses_round_trips_and_is_validated() {
        let shards = "data:\n  source: shards\n  paths: [data/tokens-*.tts, extra.tts]\n";
        let text = MINIMAL.replace("data:\n  source: synthetic\n", shards);
        let c = RunConfig::from_yaml_str(&text, "s.yaml").unwrap();
        let DataSource::Shards(s) = &c.data else {
            panic!("shards expected")
        };
        assert_eq!(s.paths, vec!["data/tokens-*.tts", "extra.tts"]);
        assert_eq!(
            (s.prefetch, s.bpe_dropout, s.tokenizer.clone()),
            (2, 0.0, None)
        );
        assert_eq!(c.data.kind(), DataSourceKind::Shards);
        let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved").unwrap();
        assert_eq!(back, c);
        for (overrides, expected) in [
            (
                &["data.bpe_dropout=0.1"][..],
                "data.tokenizer (a tokenizer.json) is required when data.bpe_dropout = 0.1 > 0",
            ),
            (
                &["data.bpe_dropout=1.0"][..],
                "data.bpe_dropout = 1 must be in [0, 1)",
            ),
            (&["data.prefetch=0"][..], "data.prefetch must be ≥ 1"),
            (
                &["data.paths=[]"][..],
                "data.paths must list at least one shard file or glob pattern, none empty",
            ),
        ] {
            let e = load_err(&text, overrides);
            assert_eq!(e, format!("test.yaml: {expected}"));
        }
        let c = RunConfig::from_yaml_str_with_overrides(
            &text,
            "s.yaml",
            &sets(&["data.bpe_dropout=0.1", "data.tokenizer=tok/tokenizer.json"]),
        )
        .unwrap();
        let DataSource::Shards(s) = &c.data else {
            panic!("shards expected")
        };
        assert_eq!(
            s.tokenizer.as_deref(),
            Some(Path::new("tok/tokenizer.json"))
        );
        // Fields of the other source, or none of the required ones, are refused by name.
        let e = load_err(&text, &["data.min_caption_tokens=3"]);
        assert!(
            e.contains("data.min_caption_tokens does not apply to data.source: shards"),
            "{e}"
        );
        let e = load_err(
            &FULL.replace("  min_caption_tokens: 2", "  paths: [x.tts]"),
            &[],
        );
        assert!(
            e.contains("data.paths does not apply to data.source: synthetic"),
            "{e}"
        );
        let e = load_err(&MINIMAL.replace("source: synthetic", "source: shards"), &[]);
        assert!(
            e.contains("data.paths is required for data.source: shards"),
            "{e}"
        );
    }

    #[test]
    fn every_shipped_config_loads_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let c = RunConfig::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved").unwrap();
            assert_eq!(back, c, "{}", path.display());
            count += 1;
        }
        assert!(
            count >= 3,
            "expected the three shipped configs in {}",
            dir.display()
        );
    }

    const DVAE: &str = "\
run:
  name: d
  out_dir: runs/d
model:
  kind: dvae
  resolution: 64
  n_hid: 16
  vocab_size: 128
data:
  source: images
  paths: [\"img/*.tis\"]
train:
  steps: 20
  batch_size: 2
";

    #[test]
    fn dvae_model_kind_parses_defaults_and_round_trips() {
        let c = RunConfig::from_yaml_str(DVAE, "dvae.yaml").unwrap();
        assert_eq!(c.model.kind(), ModelKind::Dvae);
        let d = c.model.dvae().unwrap();
        assert_eq!((d.resolution, d.n_hid, d.vocab_size), (64, 16, 128));
        assert_eq!((d.n_blk_per_group, d.n_init), (2, 128));
        assert_eq!(c.relaxation(), RelaxationConfig::default());
        assert!(c.transformer().is_err());
        let back = RunConfig::from_yaml_str(&c.to_yaml(), "resolved.yaml").unwrap();
        assert_eq!(back, c);
        assert!(c.to_yaml().contains("kind: dvae"), "{}", c.to_yaml());
        // A transformer config without `kind` is still a transformer (configs written before
        // the switch load unchanged).
        let t = RunConfig::from_yaml_str(MINIMAL, "t.yaml").unwrap();
        assert_eq!(t.model.kind(), ModelKind::Transformer);
        let over = RunConfig::from_yaml_str_with_overrides(
            DVAE,
            "dvae.yaml",
            &sets(&["model.n_hid=8", "relaxation.tau_steps=100"]),
        )
        .unwrap();
        assert_eq!(over.model.dvae().unwrap().n_hid, 8);
        assert_eq!(over.relaxation().tau_steps, 100);
    }

    #[test]
    fn dvae_config_errors_name_the_field() {
        let e = load_err(&DVAE.replace("  n_hid: 16\n", ""), &[]);
        assert!(
            e.contains("missing field `n_hid`") && e.contains("dvae"),
            "{e}"
        );
        let e = load_err(
            &DVAE.replace("  n_hid: 16\n", "  n_hid: 16\n  heads: 4\n"),
            &[],
        );
        assert!(
            e.contains("model.heads does not apply to model.kind: dvae"),
            "{e}"
        );
        let e = load_err(
            &MINIMAL.replace("  layers: 2\n", "  layers: 2\n  n_hid: 4\n"),
            &[],
        );
        assert!(
            e.contains("model.n_hid does not apply to model.kind: transformer"),
            "{e}"
        );
        let e = load_err(DVAE, &["model.resolution=60"]);
        assert!(
            e.contains("model.resolution = 60 must be a positive multiple of 8"),
            "{e}"
        );
        let e = load_err(DVAE, &["model.vocab_size=1"]);
        assert!(e.contains("model.vocab_size = 1 must be ≥ 2"), "{e}");
        let e = load_err(DVAE, &["relaxation.tau_end=0"]);
        assert!(e.contains("relaxation.tau_end = 0 must be > 0"), "{e}");
        let e = load_err(DVAE, &["relaxation.beta_steps=0"]);
        assert!(e.contains("relaxation.beta_steps must be ≥ 1"), "{e}");
        let e = load_err(DVAE, &["relaxation.tau_stpes=3"]);
        assert!(e.contains("unknown field 'tau_stpes'"), "{e}");
        // Each model reads its own data.
        let e = load_err(
            &DVAE.replace(
                "  source: images\n  paths: [\"img/*.tis\"]\n",
                "  source: synthetic\n",
            ),
            &[],
        );
        assert!(
            e.contains("data.source must be images, not synthetic"),
            "{e}"
        );
        let e = load_err(
            &MINIMAL.replace(
                "  source: synthetic\n",
                "  source: images\n  paths: [a.tis]\n",
            ),
            &[],
        );
        assert!(
            e.contains("data.source: images feeds model.kind: dvae"),
            "{e}"
        );
        let e = load_err(&format!("{MINIMAL}relaxation:\n  tau_steps: 5\n"), &[]);
        assert!(
            e.contains("relaxation section applies to model.kind: dvae only"),
            "{e}"
        );
        let e = load_err(
            &DVAE.replace(
                "  paths: [\"img/*.tis\"]\n",
                "  paths: [x]\n  bpe_dropout: 0.1\n",
            ),
            &[],
        );
        assert!(
            e.contains("data.bpe_dropout does not apply to data.source: images"),
            "{e}"
        );
    }

    #[test]
    fn cosine_anneal_matches_the_spec_formula() {
        let r = RelaxationConfig::default();
        assert_eq!(r.tau(0), 1.0);
        assert!((r.tau(75_000) - (1.0 / 16.0 + (1.0 - 1.0 / 16.0) / 2.0)).abs() < 1e-12);
        assert_eq!(r.tau(150_000), 1.0 / 16.0);
        assert_eq!(r.tau(10_000_000), 1.0 / 16.0);
        assert_eq!(r.beta(0), 0.0);
        assert!((r.beta(2_500) - 3.3).abs() < 1e-12);
        assert_eq!(r.beta(5_000), 6.6);
    }
}
