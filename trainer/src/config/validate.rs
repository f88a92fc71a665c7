//! [`RunConfig::validate`]: every range and cross-section rule of a config, naming the field.

use super::*;

impl RunConfig {
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
                m.check("model.").or_else(|(f, msg)| invalid(&f, msg))?;
                if let Some(samples) = &self.samples {
                    let known =
                        matches!(&self.data, DataSource::Shards(s) if s.tokenizer.is_some());
                    validate_samples(samples, known).or_else(|(f, msg)| invalid(&f, msg))?;
                }
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
            ModelConfig::Clip(c) => {
                c.check("model.").or_else(|(f, msg)| invalid(&f, msg))?;
                if self.samples.is_some() {
                    return invalid(
                        "samples",
                        "the samples section applies to model.kind: transformer only".into(),
                    );
                }
                if self.relaxation.is_some() {
                    return invalid(
                        "relaxation",
                        "the relaxation section applies to model.kind: dvae only".into(),
                    );
                }
                // data.tokenizer is checked when training opens it: `trainer init-weights` and
                // `trainer debug-state` read no captions.
                if !matches!(self.data, DataSource::Images(_)) {
                    return invalid(
                        "data.source",
                        format!(
                            "model.kind: clip trains on image shards with captions: data.source \
                             must be images, not {}",
                            self.data.kind()
                        ),
                    );
                }
            }
            ModelConfig::Dvae(d) => {
                if self.samples.is_some() {
                    return invalid(
                        "samples",
                        "the samples section applies to model.kind: transformer only (see \
                         `trainer reconstruct` for a dVAE)"
                            .into(),
                    );
                }
                d.check("model.").or_else(|(f, msg)| invalid(&f, msg))?;
                if let Some(r) = &self.relaxation {
                    validate_relaxation(r).or_else(|(f, msg)| invalid(&f, msg))?;
                    let decay = self.optim.weight_decay;
                    if r.decoder_input == DecoderInput::Argmax && decay != 0.0 {
                        return invalid(
                            "optim.weight_decay",
                            format!(
                                "relaxation.decoder_input: argmax leaves the encoder (and so \
                                 the codes) as it is, but optim.weight_decay = {decay} would \
                                 shrink its weights: set it to 0"
                            ),
                        );
                    }
                    if r.decoder_input == DecoderInput::Argmax
                        && !matches!(self.run.device, Device::Cpu | Device::Auto)
                    {
                        return invalid(
                            "relaxation.decoder_input",
                            format!(
                                "relaxation.decoder_input: argmax runs on the host for now; \
                                 run.device is {}: use cpu",
                                match self.run.device {
                                    Device::Cuda => "cuda",
                                    _ => "cuda-emu",
                                }
                            ),
                        );
                    }
                }
                if matches!(&self.data, DataSource::Images(s) if s.tokenizer.is_some()) {
                    return invalid(
                        "data.tokenizer",
                        "model.kind: dvae reads no captions: data.tokenizer applies to \
                         model.kind: clip"
                            .into(),
                    );
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
        if t.init_ema && t.init.is_none() {
            return invalid(
                "train.init_ema",
                "train.init_ema reads a checkpoint's EMA: it needs train.init".into(),
            );
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
}

/// Range checks of `samples:`; `tokenizer_known`: whether `data.tokenizer` names one.
fn validate_samples(s: &SamplesConfig, tokenizer_known: bool) -> Result<(), (String, String)> {
    let fail = |f: &str, m: String| Err((f.to_string(), m));
    if s.every < 1 {
        return fail("samples.every", "samples.every must be ≥ 1".into());
    }
    if s.prompts.is_empty() || s.prompts.iter().any(|p| p.trim().is_empty()) {
        return fail(
            "samples.prompts",
            "samples.prompts must list at least one caption, none empty".into(),
        );
    }
    if s.dvae.as_os_str().is_empty() {
        return fail("samples.dvae", "samples.dvae must name the dVAE".into());
    }
    if s.tokenizer.is_none() && !tokenizer_known {
        return fail(
            "samples.tokenizer",
            "samples.tokenizer (a tokenizer.json for the prompts) is required when \
             data.tokenizer names none"
                .into(),
        );
    }
    if s.n < 1 {
        return fail("samples.n", "samples.n must be ≥ 1".into());
    }
    if !(s.temperature.is_finite() && s.temperature > 0.0) {
        return fail(
            "samples.temperature",
            format!("samples.temperature = {} must be > 0", s.temperature),
        );
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return fail(
            "samples.top_p",
            format!("samples.top_p = {} must be in (0, 1]", s.top_p),
        );
    }
    Ok(())
}

/// Range checks of `relaxation:`.
fn validate_relaxation(r: &RelaxationConfig) -> Result<(), (String, String)> {
    for (field, value) in [
        ("relaxation.tau_start", r.tau_start),
        ("relaxation.tau_end", r.tau_end),
        ("relaxation.decoder_input_gain", r.decoder_input_gain),
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
    if r.decoder_input == DecoderInput::Argmax && (r.beta_start != 0.0 || r.beta_end != 0.0) {
        let field = match r.beta_start != 0.0 {
            true => "relaxation.beta_start",
            false => "relaxation.beta_end",
        };
        return Err((
            field.into(),
            format!(
                "relaxation.decoder_input: argmax trains the decoder alone on fixed codes, and \
                 the KL term would move the encoder: relaxation.beta_start ({}) and \
                 relaxation.beta_end ({}) must be 0",
                r.beta_start, r.beta_end
            ),
        ));
    }
    Ok(())
}
