//! `--set section.field=value`: parsing an override, checking its path against the structs' own
//! field lists, and applying it to the YAML value before it is deserialized.

use super::*;

/// One parsed `--set section.field=value`.
pub(super) struct Override {
    arg: String,
    path: Vec<String>,
    value: Value,
}

impl Override {
    pub(super) fn parse(arg: &str) -> Result<Override, ConfigError> {
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
    pub(super) fn apply(&self, root: &mut Value) -> Result<(), ConfigError> {
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
        "samples" => fields_of::<SamplesConfig>(),
        "compression" => fields_of::<crate::powersgd::PowerSgdConfig>(),
        "distributed" => fields_of::<dist::DistributedConfig>(),
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
            // CLIP's nested tower sections (Hugging Face's text_config / vision_config).
            let sub = match (section, field) {
                ("model", "text_config") => fields_of::<crate::model::clip::TextConfig>(),
                ("model", "vision_config") => fields_of::<crate::model::clip::VisionConfig>(),
                _ => None,
            };
            let Some(sub) = sub.filter(|_| path.len() == 3) else {
                return Err(format!("'{section}.{field}' has no sub-fields"));
            };
            if !sub.contains(&path[2].as_str()) {
                return Err(format!(
                    "unknown field '{}' in '{section}.{field}' (expected one of {})",
                    path[2],
                    sub.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Deserializes the config with overrides applied. The merged value is written back to YAML and
/// read with serde_yaml's text deserializer, whose errors carry the field path. An error at an
/// overridden field is blamed on that override; any other is reported against the file, with the
/// file's own line and column when the file alone shows the same error.
pub(super) fn deserialize_merged(
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
