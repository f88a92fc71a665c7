//! CLIP re-ranking of sampled pictures (DALL·E §2.5): each picture of a prompt is scored by the
//! cosine of its CLIP image embedding and the prompt's text embedding, and `trainer sample
//! --clip DIR --keep K` keeps the best K in score order.
//!
//! The CLIP comes from either
//! - a Hugging Face CLIP directory (`config.json`, `model.safetensors`, `tokenizer.json`,
//!   `preprocessor_config.json`; [`crate::model::clip::hf::load_dir`]): the caption is tokenised
//!   by its `tokenizer.json` and the picture preprocessed by its `preprocessor_config.json`
//!   (bicubic resize of the short side, centre crop, CLIP's mean and std); or
//! - a Tessera CLIP checkpoint or run directory (`model.kind: clip`): the caption is encoded as
//!   that run trained ([`ClipCaptions`], its `data.tokenizer`), and the picture resized
//!   bicubically to `vision_config.image_size` and normalised with CLIP's statistics, as its
//!   training normalised its image shards. The EMA weights are used when the checkpoint has them.
//!
//! A picture is scored from its 8-bit RGB form (what its PNG holds), so that scoring the written
//! PNG gives the same number.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::{self, CONFIG_FILE};
use crate::config::RunConfig;
use crate::model::clip::hf::{self, ClipTokenizer, Preprocessor};
use crate::model::clip::{Activations, Clip};
use crate::train::objectives::ClipCaptions;

/// Pictures scored in one forward pass of the vision tower.
const BATCH: usize = 8;

// OpenAI's CLIP image statistics, what a Tessera CLIP run normalises its images with.
use crate::model::clip::hf::{IMAGE_MEAN as CLIP_MEAN, IMAGE_STD as CLIP_STD};

/// How captions become CLIP's input ids.
enum Captions {
    Hf(ClipTokenizer),
    Tessera(ClipCaptions),
}

/// A loaded CLIP that scores pictures against captions.
pub struct Reranker {
    model: Clip,
    params: Vec<f32>,
    captions: Captions,
    preprocessor: Preprocessor,
    /// Positions of a caption.
    text_len: usize,
    /// The weights file (Hugging Face's `model.safetensors` or the checkpoint's).
    pub weights: PathBuf,
}

impl Reranker {
    /// Loads the CLIP at `source`: a Hugging Face CLIP directory (it has a `config.json`), else a
    /// Tessera CLIP checkpoint or run directory (its EMA weights when it has them and `ema`).
    pub fn open(source: &Path, ema: bool) -> Result<Self> {
        if !source.is_dir() {
            bail!(
                "--clip {}: not a directory (a Hugging Face CLIP directory or a Tessera CLIP \
                 checkpoint or run directory)",
                source.display()
            );
        }
        if source.join("config.json").exists() {
            let c = hf::load_dir(source).with_context(|| {
                format!("--clip {}: loading a Hugging Face CLIP", source.display())
            })?;
            let text_len = c.tokenizer.context();
            return Ok(Reranker {
                model: c.model,
                params: c.params,
                captions: Captions::Hf(c.tokenizer),
                preprocessor: c.preprocessor,
                text_len,
                weights: source.join("model.safetensors"),
            });
        }
        let weights = crate::sample::weights_of(source, ema, "--clip").with_context(|| {
            format!(
                "--clip {}: no config.json (a Hugging Face CLIP) and not a Tessera checkpoint \
                 or run directory",
                source.display()
            )
        })?;
        let dir = weights.parent().unwrap_or(Path::new("."));
        let cfg_path = dir.join(CONFIG_FILE);
        let cfg = RunConfig::load(&cfg_path, &[]).with_context(|| {
            format!(
                "--clip {}: its config {}",
                source.display(),
                cfg_path.display()
            )
        })?;
        let Some(dims) = cfg.model.clip() else {
            bail!(
                "--clip {}: a model.kind: {} run, not a CLIP",
                source.display(),
                cfg.model.kind()
            );
        };
        let model = Clip::new(*dims)?;
        let mut params = vec![0.0f32; model.table().numel()];
        checkpoint::load_weights(&weights, model.table(), &mut params)
            .with_context(|| format!("--clip {}", source.display()))?;
        let captions = ClipCaptions::open(&cfg)
            .with_context(|| format!("--clip {}: the captions' tokenizer", source.display()))?;
        let size = dims.vision_config.image_size as u32;
        Ok(Reranker {
            model,
            params,
            captions: Captions::Tessera(captions),
            preprocessor: Preprocessor {
                shortest_edge: Some(size),
                crop: Some((size, size)),
                rescale: 1.0 / 255.0,
                mean_std: Some((CLIP_MEAN, CLIP_STD)),
            },
            text_len: dims.text_config.max_position_embeddings,
            weights,
        })
    }

    /// The caption's `text_len` input ids.
    fn encode(&self, caption: &str) -> Result<Vec<u32>> {
        match &self.captions {
            Captions::Hf(t) => t.encode(caption).map_err(anyhow::Error::msg),
            Captions::Tessera(c) => {
                let mut ids = Vec::with_capacity(self.text_len);
                c.encode(caption, &mut ids)?;
                Ok(ids)
            }
        }
    }

    /// The cosine of each picture's image embedding with `caption`'s text embedding.
    pub fn scores(&self, caption: &str, pictures: &[image::RgbImage]) -> Result<Vec<f32>> {
        let ids = self
            .encode(caption)
            .with_context(|| format!("CLIP's tokenisation of {caption:?}"))?;
        let mut acts = Activations::new(&self.model, 1, self.text_len)?;
        self.model.text_forward(&self.params, &mut acts, &ids)?;
        let text = acts.text_embeds.clone();
        let mut scores = Vec::with_capacity(pictures.len());
        for chunk in pictures.chunks(BATCH) {
            let mut pixels = Vec::new();
            for (i, img) in chunk.iter().enumerate() {
                let (px, _, _) = self.preprocessor.apply(img).map_err(|e| {
                    anyhow::anyhow!("CLIP's preprocessing of picture {}: {e}", scores.len() + i)
                })?;
                pixels.extend(px);
            }
            let mut acts = Activations::new(&self.model, chunk.len(), self.text_len)?;
            self.model.image_forward(&self.params, &mut acts, &pixels)?;
            for e in acts.image_embeds.chunks_exact(text.len()) {
                scores.push(e.iter().zip(&text).map(|(a, b)| a * b).sum());
            }
        }
        Ok(scores)
    }
}

/// The indices of `scores`, best first (a tie keeps the earlier picture first).
pub fn ranking(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_is_best_first_and_stable_on_ties() {
        assert_eq!(ranking(&[0.1, 0.5, -0.2, 0.5]), [1, 3, 0, 2]);
        assert_eq!(ranking(&[]), Vec::<usize>::new());
    }
}
