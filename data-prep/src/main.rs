//! The `data-prep` binary. Today: `synth-batch`, which writes synthetic token sequences of a
//! config's model as a safetensors batch file (`text` [B, Tt] and `image` [B, G²], int64), the
//! input format of `trainer debug-state`. Ingest, tokenizer, dedup and encode arrive with the
//! data-pipeline issue.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;
use trainer::config::RunConfig;
use trainer::data::synthetic::SyntheticData;

mod ingest;
mod synth;

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
    /// Write the captioned shapes dataset (img2dataset `files` layout); see docs/data-prep.md.
    Synth(synth::SynthArgs),
    /// Filter, resize and pack image-caption pairs into image shards; see docs/data-prep.md.
    Ingest(ingest::IngestArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
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
            let data = SyntheticData::from_config(&cfg);
            let m = &cfg.model;
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
        Cmd::Synth(a) => synth::main(a),
        Cmd::Ingest(a) => ingest::main(a),
    }
}
