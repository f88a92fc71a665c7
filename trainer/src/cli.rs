//! The `trainer` command line (clap derive): the subcommands and their flags, no dispatch.
//!
//! The binary (`src/main.rs`) parses a [`Cli`] and runs the [`Command`]. Every subcommand that
//! needs a run config takes `--config FILE` and any number of `--set section.field=value`
//! overrides, applied in order (see [`crate::config`]).
//!
//! ```text
//! trainer train --config configs/quickstart-cpu.yaml --set optim.lr=1e-3
//! trainer init-weights --config configs/quickstart-cpu.yaml --out weights.safetensors
//! trainer debug-state --config c.yaml --weights w.safetensors --batch b.safetensors --out state.safetensors
//! trainer reconstruct --weights runs/dvae --images 'shards/images-*.tis' --count 16 --out recon.png
//! trainer sample --transformer runs/small --dvae runs/dvae --prompt 'a red circle' -n 4 --out samples
//! trainer cuda-libs [--link-dir /tmp/tessera-libs]
//! ```

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, RunConfig};
use crate::model::Products;

/// Tessera's trainer: trains DALL·E-style text-to-image models.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(name = "trainer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum Command {
    /// Train the model named by the config (resumes from the newest complete checkpoint in
    /// run.out_dir).
    Train {
        /// The run config (YAML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override a config field, e.g. --set optim.lr=1e-3 (repeatable, applied in order).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Start from fresh weights even if run.out_dir holds a complete checkpoint.
        #[arg(long)]
        no_resume: bool,
    },
    /// One forward and backward pass with given weights and batch; writes every result
    /// (docs/model.md §4).
    DebugState {
        /// The run config (YAML); its model section must match the weights.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override a config field, e.g. --set model.layers=2 (repeatable, applied in order).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The weights (safetensors, parameter names per docs/model.md).
        #[arg(long, value_name = "FILE")]
        weights: PathBuf,
        /// The batch of inputs (safetensors, docs/model.md §4).
        #[arg(long, value_name = "FILE")]
        batch: PathBuf,
        /// Where to write the results (safetensors).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Writes freshly initialised weights of the config's model as safetensors (for debug-state
    /// and outside checks).
    InitWeights {
        /// The run config (YAML); run.seed seeds the initialisation.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override a config field, e.g. --set run.seed=7 (repeatable, applied in order).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Where to write the weights (safetensors).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Encodes images with a dVAE and decodes their codes again: writes originals beside their
    /// reconstructions as one PNG grid and prints the reconstruction MSE.
    Reconstruct {
        /// The dVAE: a safetensors file, a checkpoint directory (its model.safetensors) or a run
        /// directory (its newest complete checkpoint).
        #[arg(long, value_name = "PATH")]
        weights: PathBuf,
        /// Read the checkpoint's weight EMA (ema.safetensors) instead of model.safetensors.
        #[arg(long)]
        ema: bool,
        /// Image shards (.tis) or glob patterns ('data/images-*.tis', quoted so that the shell
        /// leaves it alone), one or more: the first --count images of the matches, in sorted
        /// path order, are reconstructed.
        #[arg(long, value_name = "SHARD", required = true, num_args = 1..)]
        images: Vec<String>,
        /// Images to reconstruct.
        #[arg(long, default_value_t = 16)]
        count: usize,
        /// Images encoded and decoded together (on the CPU 2 is as fast as any; memory grows
        /// with it, about 0.45 GB per 256 px image with OpenAI's dVAE).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// The PNG to write.
        #[arg(long, value_name = "FILE", default_value = "reconstructions.png")]
        out: PathBuf,
        /// Also write each reconstruction alone as DIR/NNNNNN.png beside its caption
        /// DIR/NNNNNN.txt, the layout `data-prep judge --images DIR` reads.
        #[arg(long, value_name = "DIR")]
        pictures: Option<PathBuf>,
    },
    /// Draws pictures for captions: the transformer samples image tokens after each prompt and
    /// the dVAE decodes them; writes one grid per prompt, each picture, and index.json.
    Sample {
        /// The transformer: a checkpoint directory or a run directory (its newest complete
        /// checkpoint), whose config.yaml gives the sizes and the tokenizer.
        #[arg(long, value_name = "DIR")]
        transformer: PathBuf,
        /// The dVAE: a safetensors file, a checkpoint directory or a run directory.
        #[arg(long, value_name = "PATH")]
        dvae: PathBuf,
        /// Use model.safetensors even where the checkpoint has ema.safetensors.
        #[arg(long)]
        no_ema: bool,
        /// The tokenizer.json for the prompts (default: the transformer run's data.tokenizer).
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// A caption (repeat for several).
        #[arg(long, value_name = "TEXT")]
        prompt: Vec<String>,
        /// A file of captions, one per line (blank lines skipped).
        #[arg(long, value_name = "FILE")]
        prompts: Option<PathBuf>,
        /// Pictures per prompt.
        #[arg(short = 'n', long = "num", default_value_t = 4)]
        n: usize,
        /// Sequences drawn together.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Divides the logits (lower: safer choices).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Keep only the k most likely tokens at each step (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Keep the most likely tokens up to this total probability (1: all).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The transformer's weight products and cache: fp32, or bf16 (the weights, each
        /// product's inputs and the cached keys and values rounded to bfloat16, sums in f32:
        /// fewer bytes read per token, so faster on a CPU; other pictures for the same seed;
        /// docs/benchmarks.md).
        #[arg(long, value_enum, default_value_t = Products::Fp32)]
        precision: Products,
        /// Re-rank each prompt's pictures with this CLIP: a Hugging Face CLIP directory
        /// (config.json, model.safetensors, tokenizer.json, preprocessor_config.json) or a
        /// Tessera CLIP checkpoint or run directory. Writes scores.json.
        #[arg(long, value_name = "DIR")]
        clip: Option<PathBuf>,
        /// Keep the best K of each prompt's -n pictures by CLIP score (needs --clip; default:
        /// all, best first).
        #[arg(long, value_name = "K")]
        keep: Option<usize>,
        /// Grids without their prompt written above them (by default each grid carries its
        /// caption, in the font TESSERA_FONT names or a system one).
        #[arg(long)]
        no_captions: bool,
        /// The output folder (created if missing).
        #[arg(long, value_name = "DIR", default_value = "samples")]
        out: PathBuf,
    },
    /// Draws a run's loss curves and learning rate (from its metrics.jsonl) as a PNG.
    Plot {
        /// The run directory (run.out_dir).
        #[arg(value_name = "RUN_DIR")]
        run_dir: PathBuf,
        /// The PNG to write (default: RUN_DIR/plot.png).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 1200)]
        width: u32,
        #[arg(long, default_value_t = 800)]
        height: u32,
    },
    /// Checks a run config and prints it resolved (every field, defaults filled in, the --set
    /// overrides applied): what the launcher reads its sections from.
    Config {
        /// The run config (YAML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override a config field, e.g. --set optim.lr=1e-3 (repeatable, applied in order).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Shows where the CUDA libraries a GPU run loads (driver, NCCL, NVRTC, cuBLAS) are found
    /// and whether this process can load them; with --link-dir, makes them loadable and prints
    /// the LD_LIBRARY_PATH to start workers with (what `launcher` does by itself).
    CudaLibs {
        /// A directory for links under the names cudarc loads (created if needed).
        #[arg(long, value_name = "DIR")]
        link_dir: Option<PathBuf>,
    },
}

impl Command {
    /// The config file and the `--set` overrides of this subcommand (`None`: it takes no
    /// config).
    pub fn config_args(&self) -> Option<(&Path, &[String])> {
        match self {
            Command::Train { config, set, .. }
            | Command::DebugState { config, set, .. }
            | Command::InitWeights { config, set, .. }
            | Command::Config { config, set } => Some((config, set)),
            Command::Reconstruct { .. }
            | Command::Sample { .. }
            | Command::Plot { .. }
            | Command::CudaLibs { .. } => None,
        }
    }

    /// Loads, overrides and validates this subcommand's run config (`None`: it takes no config).
    pub fn load_config(&self) -> Option<Result<RunConfig, ConfigError>> {
        self.config_args()
            .map(|(path, set)| RunConfig::load(path, set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn train_parses_repeated_set() {
        let cli = Cli::try_parse_from([
            "trainer", "train", "--config", "x.yaml", "--set", "a.b=1", "--set", "c=2",
        ])
        .unwrap();
        assert_eq!(
            cli.command,
            Command::Train {
                config: PathBuf::from("x.yaml"),
                set: vec!["a.b=1".to_string(), "c=2".to_string()],
                no_resume: false,
            }
        );
        let (path, set) = cli.command.config_args().unwrap();
        assert_eq!((path, set.len()), (Path::new("x.yaml"), 2));
        let cli =
            Cli::try_parse_from(["trainer", "train", "--config", "x.yaml", "--no-resume"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Train {
                no_resume: true,
                ..
            }
        ));
    }

    #[test]
    fn debug_state_and_init_weights_parse() {
        let cli = Cli::try_parse_from([
            "trainer",
            "debug-state",
            "--config",
            "c.yaml",
            "--weights",
            "w.safetensors",
            "--batch",
            "b.safetensors",
            "--out",
            "o.safetensors",
            "--set",
            "model.layers=2",
        ])
        .unwrap();
        assert_eq!(
            cli.command,
            Command::DebugState {
                config: "c.yaml".into(),
                set: vec!["model.layers=2".into()],
                weights: "w.safetensors".into(),
                batch: "b.safetensors".into(),
                out: "o.safetensors".into(),
            }
        );
        let cli = Cli::try_parse_from([
            "trainer",
            "init-weights",
            "--config",
            "c.yaml",
            "--out",
            "w.safetensors",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::InitWeights { ref set, .. } if set.is_empty()));
    }

    #[test]
    fn reconstruct_parses_with_defaults() {
        let cli = Cli::try_parse_from([
            "trainer",
            "reconstruct",
            "--weights",
            "runs/dvae",
            "--images",
            "s.tis",
        ])
        .unwrap();
        assert_eq!(
            cli.command,
            Command::Reconstruct {
                weights: "runs/dvae".into(),
                ema: false,
                images: vec!["s.tis".to_string()],
                count: 16,
                batch: 2,
                out: "reconstructions.png".into(),
                pictures: None,
            }
        );
        assert!(cli.command.config_args().is_none());
        assert!(Cli::try_parse_from(["trainer", "reconstruct", "--images", "s.tis"]).is_err());
        let several = Cli::try_parse_from([
            "trainer",
            "reconstruct",
            "--weights",
            "w",
            "--images",
            "a.tis",
            "data/*.tis",
        ])
        .unwrap();
        let Command::Reconstruct { images, .. } = several.command else {
            panic!("not reconstruct");
        };
        assert_eq!(images, ["a.tis", "data/*.tis"]);
    }

    #[test]
    fn sample_parses_prompts_and_settings() {
        let cli = Cli::try_parse_from([
            "trainer",
            "sample",
            "--transformer",
            "runs/t",
            "--dvae",
            "d.safetensors",
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "-n",
            "2",
            "--top-k",
            "5",
        ])
        .unwrap();
        let Command::Sample {
            prompt,
            n,
            top_k,
            top_p,
            temperature,
            precision,
            out,
            ..
        } = cli.command
        else {
            panic!("not sample: {:?}", cli.command);
        };
        assert_eq!(prompt, ["a red circle", "a blue square"]);
        assert_eq!((n, top_k, top_p, temperature), (2, 5, 1.0, 1.0));
        assert_eq!(precision, Products::Fp32);
        let bf16 = Cli::try_parse_from([
            "trainer",
            "sample",
            "--transformer",
            "t",
            "--dvae",
            "d",
            "--prompt",
            "a red circle",
            "--precision",
            "bf16",
        ])
        .unwrap();
        let Command::Sample { precision, .. } = bf16.command else {
            panic!("not sample");
        };
        assert_eq!(precision, Products::Bf16);
        assert_eq!(out, PathBuf::from("samples"));
        assert!(Cli::try_parse_from(["trainer", "sample", "--dvae", "d"]).is_err());
    }

    #[test]
    fn missing_required_flags_are_errors() {
        assert!(Cli::try_parse_from(["trainer", "train"]).is_err());
        assert!(Cli::try_parse_from(["trainer", "debug-state", "--config", "c.yaml"]).is_err());
        assert!(Cli::try_parse_from(["trainer", "init-weights", "--config", "c.yaml"]).is_err());
        assert!(Cli::try_parse_from(["trainer", "fly"]).is_err());
    }

    #[test]
    fn load_config_applies_overrides() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart-cpu.yaml");
        let cli = Cli::try_parse_from([
            "trainer".as_ref(),
            "train".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--set".as_ref(),
            "train.steps=7".as_ref(),
        ])
        .unwrap();
        let config = cli.command.load_config().unwrap().unwrap();
        assert_eq!(config.train.steps, 7);
        assert_eq!(config.run.name, "quickstart");
    }
}
