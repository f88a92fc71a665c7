//! The `trainer` binary: a thin dispatcher over the library. Every error prints its whole chain
//! and exits non-zero. A run stopped by SIGTERM or SIGINT writes a checkpoint and exits 143.
//!
//! ```text
//! trainer train --config configs/quickstart-cpu.yaml [--set optim.lr=1e-3] [--no-resume]
//! trainer init-weights --config C --out W.safetensors
//! trainer debug-state --config C --weights W.safetensors --batch B.safetensors --out O.safetensors
//! trainer reconstruct --weights W --images SHARD.tis [--count N] [--out grid.png] [--ema]
//! trainer config --config C [--set K=V]      # checks C, prints it resolved (the launcher's view)
//! trainer cuda-libs [--link-dir DIR]
//! ```

use anyhow::{Context, Result};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use trainer::cli::{Cli, Command};
use trainer::config::RunConfig;

/// Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint (128 + SIGTERM, as
/// a shell reports a process ended by that signal): the run is resumable, not finished.
const EXIT_STOPPED: i32 = 143;

fn main() {
    // Colours only on a terminal: a launcher's rank_N.log or a redirected stderr gets plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {}", formats::report::error_chain(&e));
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
            // SIGTERM and SIGINT ask for a checkpoint and a clean exit after the update in flight.
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [SIGTERM, SIGINT] {
                signal_hook::flag::register(sig, stop.clone())
                    .with_context(|| format!("installing the handler of signal {sig}"))?;
            }
            let summary = trainer::train::run_until(&cfg, !no_resume, &stop)?;
            if let Some(m) = &summary.last {
                println!("{}", serde_json::to_string(m)?);
            }
            if summary.stopped {
                std::process::exit(EXIT_STOPPED);
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
        Command::Config { config, set } => {
            print!("{}", RunConfig::load(&config, &set)?.to_yaml());
            Ok(())
        }
        Command::InitWeights { config, set, out } => {
            let cfg = RunConfig::load(&config, &set)?;
            trainer::debug_state::init_weights(&cfg, &out)
        }
        Command::Reconstruct {
            weights,
            ema,
            images,
            count,
            batch,
            out,
            pictures,
        } => {
            let summary = trainer::reconstruct::run(&trainer::reconstruct::ReconstructOptions {
                weights,
                ema,
                images,
                count,
                batch,
                out,
                pictures,
            })?;
            println!("{}", trainer::reconstruct::describe(&summary));
            Ok(())
        }
        Command::Sample {
            transformer,
            dvae,
            no_ema,
            tokenizer,
            prompt,
            prompts,
            n,
            batch,
            temperature,
            top_k,
            top_p,
            seed,
            precision,
            clip,
            keep,
            no_captions,
            out,
        } => {
            let mut all = prompt;
            if let Some(file) = prompts {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading prompts from {}", file.display()))?;
                all.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            let summary = trainer::sample::run(&trainer::sample::SampleOptions {
                transformer,
                dvae,
                no_ema,
                tokenizer,
                prompts: all,
                n,
                batch,
                sampling: trainer::model::transformer::sample::Sampling {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                },
                precision,
                clip,
                keep,
                captions: !no_captions,
                out,
            })?;
            println!("{}", trainer::sample::describe(&summary));
            Ok(())
        }
        Command::Plot {
            run_dir,
            out,
            width,
            height,
        } => {
            let out = out.unwrap_or_else(|| run_dir.join("plot.png"));
            trainer::plot::plot(&run_dir, &out, width, height)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::CudaLibs { link_dir } => {
            use cuda_libs::{self, Resolution};
            let r = Resolution::from_env();
            print!("{}", r.report());
            println!("In this process (LD_LIBRARY_PATH and the system's search):");
            for lib in cuda_libs::ALL {
                let state = if cuda_libs::loadable(&lib) {
                    "loadable in this process"
                } else {
                    "not loadable in this process"
                };
                println!("{:<16} {state}", lib.what);
            }
            if let Some(dir) = link_dir {
                let existing = std::env::var("LD_LIBRARY_PATH").ok();
                let path = r
                    .library_path(&dir, existing.as_deref())
                    .with_context(|| format!("making links in {}", dir.display()))?;
                println!("export LD_LIBRARY_PATH={path}");
            }
            Ok(())
        }
    }
}
