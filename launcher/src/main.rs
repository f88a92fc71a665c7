//! The `launcher` binary: starts and supervises training workers with torchrun's conventions.
//!
//! Today it runs one node with one worker (`--nodes 1 --procs-per-node 1`): it sets torchrun's
//! environment variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`, plus `TESSERA_RUN_ID`), starts `trainer train` beside this binary, forwards
//! SIGINT/SIGTERM by being in the same process group, and exits with the worker's status.
//! Several workers or nodes need the rendezvous store and collectives of the distributed issue,
//! and are refused with a clear error until then.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::Command;

/// Launch a Tessera training run.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The run config (YAML).
    config: PathBuf,
    /// Number of nodes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Worker processes per node.
    #[arg(long, default_value_t = 1)]
    procs_per_node: usize,
    /// Config overrides passed to every worker (`key.path=value`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run id shared by every worker (default: derived from the process id and time).
    #[arg(long)]
    run_id: Option<String>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn run(args: Args) -> Result<()> {
    if args.nodes != 1 || args.procs_per_node != 1 {
        bail!(
            "--nodes {} --procs-per-node {}: this build runs one worker on one node; multi-process \
             training (rendezvous, collectives, PowerSGD) is not implemented yet",
            args.nodes,
            args.procs_per_node
        );
    }
    let exe = std::env::current_exe().context("locating the launcher binary")?;
    let trainer = exe.with_file_name(format!("trainer{}", std::env::consts::EXE_SUFFIX));
    if !trainer.exists() {
        bail!(
            "cannot find the trainer binary at {} (build it with `cargo build --release -p trainer`)",
            trainer.display()
        );
    }
    let run_id = args.run_id.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{t}-{}", std::process::id())
    });
    let mut cmd = Command::new(&trainer);
    cmd.arg("train").arg("--config").arg(&args.config);
    for s in &args.set {
        cmd.arg("--set").arg(s);
    }
    cmd.env("RANK", "0")
        .env("LOCAL_RANK", "0")
        .env("WORLD_SIZE", "1")
        .env("LOCAL_WORLD_SIZE", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29500")
        .env("TESSERA_RUN_ID", &run_id);
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", trainer.display()))?;
    if !status.success() {
        bail!("worker rank 0 exited with {status}");
    }
    Ok(())
}
