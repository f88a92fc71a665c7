//! The `trainer` binary: a thin dispatcher over the library. Every error prints its whole chain
//! and exits non-zero.
//!
//! ```text
//! trainer train --config configs/quickstart-cpu.yaml [--set optim.lr=1e-3] [--no-resume]
//! trainer init-weights --config C --out W.safetensors
//! trainer debug-state --config C --weights W.safetensors --batch B.safetensors --out O.safetensors
//! ```

use anyhow::Result;
use clap::Parser;
use trainer::cli::{Cli, Command};
use trainer::config::RunConfig;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            set,
            no_resume,
        } => {
            let cfg = RunConfig::load(&config, &set)?;
            let summary = trainer::train::run(&cfg, !no_resume)?;
            if let Some(m) = summary.last {
                println!("{}", serde_json::to_string(&m)?);
            }
            Ok(())
        }
        Command::DebugState {
            config,
            set,
            weights,
            batch,
            out,
        } => {
            let cfg = RunConfig::load(&config, &set)?;
            trainer::debug_state::run(&cfg, &weights, &batch, &out)
        }
        Command::InitWeights { config, set, out } => {
            let cfg = RunConfig::load(&config, &set)?;
            trainer::debug_state::init_weights(&cfg, &out)
        }
    }
}
