//! `data-prep synth-tokens`: synthetic samples of a config's model (the trainer's
//! [`SyntheticData`] generator, seeded by `run.seed`) written as token shards, with a caption
//! string spelled from each sample's caption tokens ("small red circle above large blue square").
//! They feed the tests and the quickstart until the dVAE can encode real images.
//!
//! Shard k (`DIR/tokens-00000.tts`, …) holds samples k·M .. min((k+1)·M, N). Each finished shard
//! gets a done marker `<shard>.done` (JSON: what the shard holds), written after the shard;
//! a rerun skips shards whose marker matches, rewrites shards without one, and refuses a
//! directory whose markers describe other samples.

use anyhow::{bail, Context, Result};
use formats::token_shard::TokenShardWriter;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::Path;
use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;

/// The generator's word list, in its id order: 4 sizes, 8 colours, 8 shapes, 4 relations.
const WORDS: [&str; 24] = [
    "tiny", "small", "large", "huge", "red", "green", "blue", "yellow", "purple", "orange",
    "black", "white", "circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond",
    "above", "below", "left of", "right of",
];

/// The caption text of caption tokens `text` (padding ids, ≥ `text_vocab`, end it).
pub fn caption_of(text: &[u32], text_vocab: u32) -> String {
    text.iter()
        .take_while(|&&t| t < text_vocab)
        .map(|&t| {
            WORDS
                .get(t as usize)
                .map(|w| w.to_string())
                .unwrap_or_else(|| format!("word{t}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The done marker of a shard: what it holds.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Marker {
    seed: u64,
    first_sample: u64,
    records: u64,
    text_len: u32,
    image_tokens: u32,
    text_vocab: u32,
    image_vocab: u32,
}

/// What a run did.
#[derive(Debug, PartialEq, Eq)]
pub struct SynthSummary {
    pub written: usize,
    pub skipped: usize,
    pub records: u64,
}

/// Writes `count` samples of `cfg`'s generator into shards of `shard_size` records under `out`.
pub fn synth_tokens(
    cfg: &RunConfig,
    count: u64,
    shard_size: u64,
    out: &Path,
) -> Result<SynthSummary> {
    if count == 0 {
        bail!("--count must be ≥ 1");
    }
    if shard_size == 0 {
        bail!("--shard-size must be ≥ 1");
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let gen = SyntheticData::from_config(cfg)?;
    let m = cfg.transformer()?;
    let layout = m.shard_layout()?;
    let (mut text, mut image) = (vec![0; m.text_len], vec![0; m.image_tokens()]);
    let mut summary = SynthSummary {
        written: 0,
        skipped: 0,
        records: count,
    };
    for (k, first) in (0..count).step_by(shard_size as usize).enumerate() {
        let n = shard_size.min(count - first);
        let path = out.join(format!("tokens-{k:05}.tts"));
        let marker = Marker {
            seed: cfg.run.seed,
            first_sample: first,
            records: n,
            text_len: layout.text_len,
            image_tokens: layout.image_tokens,
            text_vocab: layout.text_vocab,
            image_vocab: layout.image_vocab,
        };
        let done = crate::markers::marker_path(&path);
        if let (Some(found), true) = (crate::markers::read::<Marker>(&done)?, path.exists()) {
            if found != marker {
                bail!(
                    "{} holds other samples ({found:?}, this run wants {marker:?}); use an empty --out",
                    path.display()
                );
            }
            summary.skipped += 1;
            continue;
        }
        let mut w = TokenShardWriter::create(&path, layout)?;
        for i in first..first + n {
            gen.sample(i, &mut text, &mut image);
            w.push(&text, &image, &caption_of(&text, layout.text_vocab))?;
        }
        w.finish()?;
        crate::markers::write(&done, &marker)?;
        summary.written += 1;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_spell_the_words_and_stop_at_padding() {
        assert_eq!(
            caption_of(&[1, 6, 12, 20, 0, 4, 15, 107, 108], 100),
            "small blue circle above tiny red star"
        );
        assert_eq!(caption_of(&[30, 100], 100), "word30");
        assert_eq!(caption_of(&[100, 101], 100), "");
    }
}
