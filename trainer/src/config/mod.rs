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

pub use crate::model::dvae::{BranchGain, DecoderInput};
pub use crate::model::mixed::Precision;
pub use kernels::dvae::{KlTerm, Likelihood};
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
    /// Sample grids while training (transformer only); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SamplesConfig>,
    /// Gradient reduction between ranks: `kind: none` (a plain fp32 all-reduce, the default) or
    /// `kind: powersgd` with its settings (docs/powersgd.md).
    #[serde(default)]
    pub compression: crate::powersgd::PowerSgdConfig,
    /// Multi-process runs: timeouts, heartbeats, workers per node on CPU machines.
    #[serde(default)]
    pub distributed: dist::DistributedConfig,
}

mod fields;
mod overrides;
mod schema;
mod validate;

use fields::fields_of;
use overrides::{deserialize_merged, Override};
pub use schema::*;

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
    pub fn transformer(&self) -> Result<&TransformerDims, ConfigError> {
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

    /// The dVAE's sizes, or an error naming `model.kind` when the run trains another model.
    pub fn dvae(&self) -> Result<&DvaeDims, ConfigError> {
        self.model.dvae().ok_or_else(|| ConfigError::Invalid {
            source_name: "config".into(),
            field: "model.kind".into(),
            message: format!(
                "this needs a dVAE config, but model.kind is {}",
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

#[cfg(test)]
mod tests;
