//! The sections of a run config, one struct per YAML section, with their defaults: what a file
//! may say. Loading is in `config/mod.rs`, `--set` in `overrides.rs`, the checks in `validate.rs`.

use super::*;

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

/// The device a run uses: defined beside the `distributed:` section, whose transport it picks.
pub use dist::Device;

/// The models' sizes: each model's own struct is the `model:` section of its kind
/// (docs/architecture.md, "The models' sizes are the config's `model:` section").
pub use crate::model::{clip::ClipDims, dvae::DvaeDims, transformer::TransformerDims};

/// The `model:` section: which model a run trains, and its sizes, side by side under `model:`
/// (`kind: dvae` then `n_hid: …`). `kind` defaults to `transformer`; a field of the other kind
/// is an error.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(try_from = "ModelSection")]
pub enum ModelConfig {
    /// The stage-2 sparse transformer (docs/model.md §1).
    Transformer(TransformerDims),
    /// The stage-1 discrete VAE (docs/model.md §2).
    Dvae(DvaeDims),
    /// The contrastive model (docs/model.md §3): Hugging Face's `CLIPConfig` fields.
    Clip(ClipDims),
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
    /// [`ModelConfig::Clip`].
    Clip,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Transformer => "transformer",
            ModelKind::Dvae => "dvae",
            ModelKind::Clip => "clip",
        })
    }
}

impl ModelConfig {
    /// The kind written in `model.kind`.
    pub fn kind(&self) -> ModelKind {
        match self {
            ModelConfig::Transformer(_) => ModelKind::Transformer,
            ModelConfig::Dvae(_) => ModelKind::Dvae,
            ModelConfig::Clip(_) => ModelKind::Clip,
        }
    }

    /// The transformer's sizes, if this is one.
    pub fn transformer(&self) -> Option<&TransformerDims> {
        match self {
            ModelConfig::Transformer(t) => Some(t),
            ModelConfig::Dvae(_) | ModelConfig::Clip(_) => None,
        }
    }

    /// [`ModelConfig::transformer`], mutable.
    pub fn transformer_mut(&mut self) -> Option<&mut TransformerDims> {
        match self {
            ModelConfig::Transformer(t) => Some(t),
            ModelConfig::Dvae(_) | ModelConfig::Clip(_) => None,
        }
    }

    /// The dVAE's sizes, if this is one.
    pub fn dvae(&self) -> Option<&DvaeDims> {
        match self {
            ModelConfig::Dvae(d) => Some(d),
            ModelConfig::Transformer(_) | ModelConfig::Clip(_) => None,
        }
    }

    /// CLIP's sizes, if this is one.
    pub fn clip(&self) -> Option<&ClipDims> {
        match self {
            ModelConfig::Clip(c) => Some(c),
            ModelConfig::Transformer(_) | ModelConfig::Dvae(_) => None,
        }
    }
}

/// The `model:` section as written: `kind` and one optional field per field of the three
/// kinds' structs, in their order, so that serde_yaml's errors carry the field path and the
/// line, unknown fields are refused, and `--set` knows the field names. Only the fields' names and
/// types are repeated here (a test holds the names equal to the structs'); which fields a kind
/// requires, their defaults and their ranges are the model's struct's own.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text_config: Option<crate::model::clip::TextConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vision_config: Option<crate::model::clip::VisionConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    projection_dim: Option<usize>,
}

impl ModelKind {
    /// The fields of this kind's struct, from its serde derive.
    fn fields(self) -> &'static [&'static str] {
        match self {
            ModelKind::Transformer => fields_of::<TransformerDims>(),
            ModelKind::Dvae => fields_of::<DvaeDims>(),
            ModelKind::Clip => fields_of::<ClipDims>(),
        }
        .unwrap_or(&[])
    }
}

impl TryFrom<ModelSection> for ModelConfig {
    type Error = String;

    /// Refuses the first field written that is not the kind's (in the section's field order),
    /// then lets serde build the kind's struct from the fields written, so that the struct's
    /// defaults apply; the fields' types were checked when the section was read, which leaves a
    /// missing field as the one error.
    fn try_from(m: ModelSection) -> Result<Self, String> {
        let kind = m.kind;
        let mut written = match serde_yaml::to_value(&m) {
            Ok(Value::Mapping(written)) => written,
            Ok(other) => return Err(format!("model: expected a mapping, got {other:?}")),
            Err(e) => return Err(format!("model: {e}")),
        };
        written.shift_remove("kind");
        let own = kind.fields();
        if let Some(name) = written
            .keys()
            .filter_map(Value::as_str)
            .find(|name| !own.contains(name))
        {
            return Err(format!("model.{name} does not apply to model.kind: {kind}"));
        }
        let written = Value::Mapping(written);
        let required = |e: serde_yaml::Error| format!("{e} (required for model.kind: {kind})");
        Ok(match kind {
            ModelKind::Transformer => {
                ModelConfig::Transformer(TransformerDims::deserialize(written).map_err(required)?)
            }
            ModelKind::Dvae => ModelConfig::Dvae(DvaeDims::deserialize(written).map_err(required)?),
            ModelKind::Clip => ModelConfig::Clip(ClipDims::deserialize(written).map_err(required)?),
        })
    }
}

/// Written as `kind`, then the kind's struct's fields: [`ModelSection`]'s form.
impl Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Written<'a, T> {
            kind: ModelKind,
            #[serde(flatten)]
            dims: &'a T,
        }
        let kind = self.kind();
        match self {
            ModelConfig::Transformer(dims) => Written { kind, dims }.serialize(serializer),
            ModelConfig::Dvae(dims) => Written { kind, dims }.serialize(serializer),
            ModelConfig::Clip(dims) => Written { kind, dims }.serialize(serializer),
        }
    }
}

/// The `relaxation:` section (dVAE only): the Gumbel-softmax temperature τ and the KL weight β,
/// each a cosine from its start to its end value over its number of updates, then constant, and
/// the likelihood of the pixels (docs/model.md §2). Defaults are the paper's.
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
    /// `logit-laplace` (the paper's) or `logit-gaussian` (unit variance in logit space: what
    /// small CPU-sized runs train with, docs/dvae-training.md). Default `logit-laplace`.
    #[serde(default)]
    pub likelihood: Likelihood,
    /// `openai` (the released model's training) or `unit`: the residual branches trained as if
    /// their post_gain were 1, the weights still OpenAI's (trainer::model::dvae::BranchGain;
    /// docs/dvae-training.md). Default `openai`; written only when not.
    #[serde(default, skip_serializing_if = "BranchGain::is_openai")]
    pub branch_gain: BranchGain,
    /// `position` (the paper's: every position's code distribution pulled towards uniform) or
    /// `batch` (the micro-batch's average code distribution; `run.device: cpu` only for now).
    /// Default `position`; written only when not.
    #[serde(default, skip_serializing_if = "is_position")]
    pub kl: KlTerm,
    /// Multiplies the initial weights of the decoder's input convolution (initialisation only;
    /// `trainer::model::dvae::Dvae::with_decoder_input_gain`). > 0. Default 1; written only
    /// when not.
    #[serde(default = "default_unit", skip_serializing_if = "is_unit")]
    pub decoder_input_gain: f64,
    /// What the decoder reads: `relaxed` (the Gumbel-softmax sample, the paper's) or `argmax`
    /// (each position's argmax code, what reconstruction, encoding and sampling decode; only the
    /// decoder learns, β must be 0, `run.device: cpu` only; a second run from a trained dVAE's
    /// weights, `train.init`: docs/dvae-training.md, "Ninth round"). Default `relaxed`; written
    /// only when not.
    #[serde(default, skip_serializing_if = "DecoderInput::is_relaxed")]
    pub decoder_input: DecoderInput,
}

fn is_unit(x: &f64) -> bool {
    *x == 1.0
}

fn is_position(kl: &KlTerm) -> bool {
    *kl == KlTerm::Position
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

/// The `samples:` section (transformer only): every `every` updates (and after the last), rank 0
/// draws `n` pictures for each prompt with the weights of that moment (the EMA when the run keeps
/// one), decodes them with `dvae`, and writes one grid (a row per prompt) to
/// `<out_dir>/samples/step_<N>.png` and to TensorBoard. Sampling has its own random stream
/// (`seed`), so the same noise is drawn at every step and training is not changed by it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplesConfig {
    /// Updates between grids. ≥ 1.
    pub every: u64,
    /// The captions, one row of the grid each. At least one.
    pub prompts: Vec<String>,
    /// The dVAE that decodes: a weights file, a checkpoint or a run directory.
    pub dvae: PathBuf,
    /// The prompts' `tokenizer.json`. Default: `data.tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Pictures per prompt. ≥ 1. Default 4.
    #[serde(default = "default_samples_n")]
    pub n: usize,
    /// Divides the logits. > 0. Default 1.
    #[serde(default = "default_unit")]
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all). Default 0.
    #[serde(default)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this probability, in (0, 1]. Default 1.
    #[serde(default = "default_unit")]
    pub top_p: f64,
    /// Seeds the sampling's random stream. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_samples_n() -> usize {
    4
}
fn default_unit() -> f64 {
    1.0
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
            likelihood: Likelihood::default(),
            branch_gain: BranchGain::default(),
            kl: KlTerm::default(),
            decoder_input_gain: 1.0,
            decoder_input: DecoderInput::default(),
        }
    }
}

/// cosine(a → b over n) at update t: b + (a − b)·(1 + cos(π·min(t, n)/n))/2 (docs/model.md §2).
pub fn cosine_anneal(a: f64, b: f64, n: u64, t: u64) -> f64 {
    let x = t.min(n) as f64 / n.max(1) as f64;
    b + (a - b) * (1.0 + (std::f64::consts::PI * x).cos()) / 2.0
}

impl RelaxationConfig {
    /// `model` with this section's training recipe: the likelihood, the KL term, the branch gain
    /// and the decoder's input gain (τ and β are passed to each forward pass instead). Every
    /// place that builds a dVAE from a config goes through here.
    pub fn configure(&self, model: crate::model::dvae::Dvae) -> crate::model::dvae::Dvae {
        model
            .with_likelihood(self.likelihood)
            .with_kl_term(self.kl)
            .with_branch_gain(self.branch_gain)
            .with_decoder_input_gain(self.decoder_input_gain as f32)
            .with_decoder_input(self.decoder_input)
    }

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
                        ("verify", d.verify.is_some()),
                    ],
                    "images",
                )?;
                Ok(DataSource::Images(ImagesConfig {
                    paths: d
                        .paths
                        .ok_or("data.paths is required for data.source: images")?,
                    prefetch: d.prefetch.unwrap_or_else(default_prefetch),
                    tokenizer: d.tokenizer,
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
                tokenizer: s.tokenizer,
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
    /// The `tokenizer.json` (a BPE from `data-prep tokenizer train`) that tokenises the captions
    /// of a `model.kind: clip` run. Required for CLIP, refused for the dVAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
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
    /// Start from these weights instead of drawing fresh ones: a safetensors file, a checkpoint
    /// directory (its model.safetensors) or a run directory (its newest complete checkpoint).
    /// Every tensor of the model must be there with its shape. The optimizer starts fresh. A run
    /// that resumes from its own checkpoint ignores it. Default none; written only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// With `init`: read the checkpoint's weight EMA (ema.safetensors) instead. Default false;
    /// written only when set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init_ema: bool,
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
