//! The `data-prep` binary. `synth-batch` writes synthetic token sequences of a config's model as
//! a safetensors batch file (`text` [B, Tt] and `image` [B, G²], int64), the input format of
//! `trainer debug-state`; `synth-tokens` writes them as token shards ([`synth_tokens`]);
//! `inspect` and `verify` read shards ([`shards`]); `tokenizer train|encode` trains or applies a
//! caption BPE ([`tokenizer`]); `encode` turns image shards into token shards with a dVAE
//! ([`encode`]); `embed` writes CLIP embeddings of image shards ([`embed`]) and `dedup` removes
//! near-duplicates with them ([`dedup`]); `judge` measures whether pictures of the synthetic
//! shapes show what their captions say ([`judge`]).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;
use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;

mod dedup;
mod embed;
mod encode;
mod ingest;
mod judge;
mod markers;
mod shards;
mod synth;
mod synth_tokens;
mod tokenizer;

#[derive(Parser, Debug)]
#[command(version, about = "Prepare data for Tessera")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write `--count` synthetic samples of the config's model as a safetensors batch.
    SynthBatch {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Number of sequences.
        #[arg(long, default_value_t = 4)]
        count: usize,
        /// Index of the first sample (samples are addressable one by one).
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write `--count` synthetic samples of the config's model as token shards in `--out`.
    SynthTokens {
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        count: u64,
        /// Records per shard.
        #[arg(long, default_value_t = 10_000)]
        shard_size: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shard's header, counts and first records.
    Inspect {
        path: PathBuf,
        /// Records to decode.
        #[arg(long, default_value_t = 3)]
        records: u64,
    },
    /// Check shards fully (every checksum and record); exits non-zero on any failure.
    Verify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Train a caption BPE (tokenizer.json) or encode texts with one.
    Tokenizer {
        #[command(subcommand)]
        cmd: tokenizer::TokenizerCmd,
    },
    /// Write the captioned shapes dataset (img2dataset `files` layout); see docs/data-prep.md.
    Synth(synth::SynthArgs),
    /// Filter, resize and pack image-caption pairs into image shards; see docs/data-prep.md.
    Ingest(ingest::IngestArgs),
    /// Image shards + captions → token shards: dVAE codes (argmax, no noise) and caption BPE
    /// ids; see docs/data-prep.md.
    Encode(encode::EncodeArgs),
    /// Image shards → L2-normalised CLIP image (and caption) embeddings, f16, one file per
    /// shard; see docs/dedup.md.
    Embed(embed::EmbedArgs),
    /// Embeddings → the shards without near-duplicates (within the set and of an evaluation
    /// set), a report and a PNG of the closest pairs; see docs/dedup.md.
    Dedup(dedup::DedupArgs),
    /// Do pictures of the synthetic shapes show what their captions say? Colour, shape,
    /// background and position match rates by pixel statistics, beside chance; see
    /// docs/quickstart.md.
    Judge(judge::JudgeArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", formats::report::error_chain(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::SynthBatch {
            config,
            set,
            count,
            first,
            out,
        } => {
            let cfg = RunConfig::load(&config, &set)?;
            let data = SyntheticData::from_config(&cfg)?;
            let m = cfg.transformer()?;
            let b = data.batch(first, count);
            let bytes = |v: &[u32]| -> Vec<u8> {
                v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect()
            };
            let (text, image) = (bytes(&b.text), bytes(&b.image));
            let views = [
                (
                    "text",
                    TensorView::new(Dtype::I64, vec![count, m.text_len], &text)?,
                ),
                (
                    "image",
                    TensorView::new(Dtype::I64, vec![count, m.grid * m.grid], &image)?,
                ),
            ];
            safetensors::serialize_to_file(views, None, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Cmd::SynthTokens {
            config,
            set,
            count,
            shard_size,
            out,
        } => {
            let s = synth_tokens::synth_tokens(
                &RunConfig::load(&config, &set)?,
                count,
                shard_size,
                &out,
            )?;
            println!(
                "{} records in {}: {} shards written, {} already done",
                s.records,
                out.display(),
                s.written,
                s.skipped
            );
            Ok(())
        }
        Cmd::Inspect { path, records } => {
            print!("{}", shards::inspect(&path, records)?);
            Ok(())
        }
        Cmd::Verify { paths } => match shards::verify(&paths).as_slice() {
            [] => Ok(()),
            failed => anyhow::bail!(
                "{} of {} shards failed verification: {}",
                failed.len(),
                paths.len(),
                failed
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        Cmd::Tokenizer { cmd } => tokenizer::run(cmd),
        Cmd::Synth(a) => synth::main(a),
        Cmd::Ingest(a) => ingest::main(a),
        Cmd::Encode(a) => encode::main(a),
        Cmd::Embed(a) => embed::main(a),
        Cmd::Dedup(a) => dedup::main(a),
        Cmd::Judge(a) => judge::main(a),
    }
}
