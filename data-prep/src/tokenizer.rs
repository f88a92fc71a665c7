//! `data-prep tokenizer train|encode`: train the caption BPE (`formats::bpe`) on caption
//! files and save it as `tokenizer.json`, or print the ids a `tokenizer.json` gives some texts.
//!
//! Captions come from `.txt` files, one caption per file (a folder is walked for `*.txt`, e.g.
//! img2dataset's `files` layout), or with `--lines` from text files holding one caption per line.
//! Files are read in parallel and streamed into the trainer, so memory does not grow with the
//! number of captions; a caption file that is not UTF-8 or is empty is skipped and counted.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use formats::bpe::{encode_caption, BpeTokenizer, DEFAULT_VOCAB_SIZE};
use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Files whose names are listed when captions are skipped.
const NAMED_SKIPS: usize = 5;

/// Caption files read together (in parallel) while streaming captions into the trainer.
const READ_CHUNK: usize = 4096;

#[derive(Subcommand, Debug)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE (NFKC + lowercase) on captions and write tokenizer.json.
    Train {
        /// Caption sources: folders (walked for *.txt, one caption per file), .txt files, or
        /// with --lines, text files of one caption per line.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Input files hold one caption per line (folders are still walked for *.txt).
        #[arg(long)]
        lines: bool,
        /// Largest vocabulary: 256 byte characters plus one token per merge.
        #[arg(long, default_value_t = DEFAULT_VOCAB_SIZE)]
        vocab_size: usize,
        /// A pair is merged only if it occurs at least this many times.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print one JSON line per TEXT: its ids and tokens under the tokenizer.
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        /// Truncate and pad to this many ids, as the loader does (needs --text-vocab).
        #[arg(long, requires = "text_vocab")]
        text_len: Option<usize>,
        /// The model's text vocabulary Vt: padding ids are Vt + position (needs --text-len).
        #[arg(long, requires = "text_len")]
        text_vocab: Option<usize>,
        /// BPE dropout probability, as in training.
        #[arg(long, default_value_t = 0.0)]
        dropout: f32,
        /// Seed of the dropout RNG.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(required = true)]
        text: Vec<String>,
    },
}

pub fn run(cmd: TokenizerCmd) -> Result<()> {
    match cmd {
        TokenizerCmd::Train {
            input,
            lines,
            vocab_size,
            min_frequency,
            out,
        } => train(&input, lines, vocab_size, min_frequency, &out),
        TokenizerCmd::Encode {
            tokenizer,
            text_len,
            text_vocab,
            dropout,
            seed,
            text,
        } => encode(&tokenizer, text_len.zip(text_vocab), dropout, seed, &text),
    }
}

/// The files to read: folders walked (sorted) for `*.txt`, files as given.
fn caption_files(inputs: &[PathBuf], lines: bool) -> Result<Vec<(PathBuf, bool)>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("reading caption input {}", input.display()))?;
        if meta.is_dir() {
            for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
                let entry =
                    entry.with_context(|| format!("walking caption folder {}", input.display()))?;
                let path = entry.path();
                if entry.file_type().is_file() && path.extension().is_some_and(|e| e == "txt") {
                    files.push((path.to_path_buf(), false));
                }
            }
        } else {
            files.push((input.clone(), lines));
        }
    }
    if files.is_empty() {
        bail!(
            "no caption files (*.txt) under {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(files)
}

/// The captions of one file, or why it was skipped.
fn read_captions(path: &Path, lines: bool) -> Result<std::result::Result<Vec<String>, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Err("not UTF-8".into()));
    };
    let captions: Vec<String> = if lines {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    } else if text.trim().is_empty() {
        return Ok(Err("empty caption".into()));
    } else {
        vec![text.trim().to_string()]
    };
    Ok(Ok(captions))
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {what} ({{per_sec}})"
    )) {
        bar.set_style(style);
    }
    bar
}

/// What reading the caption files found, filled in as the trainer pulls captions.
#[derive(Default)]
struct ReadStats {
    captions: usize,
    skipped: Vec<String>,
    failed: Option<anyhow::Error>,
}

fn train(
    inputs: &[PathBuf],
    lines: bool,
    vocab_size: usize,
    min_frequency: u64,
    out: &Path,
) -> Result<()> {
    let files = caption_files(inputs, lines)?;
    eprintln!(
        "training a BPE of at most {vocab_size} tokens on the captions of {} files",
        files.len()
    );
    // Captions stream into the trainer a chunk of files at a time (memory stays bounded), read in
    // parallel on a pool of their own: the trainer pulls them from inside the global rayon pool,
    // where waiting on work queued to that same pool could deadlock.
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .context("starting the caption reading threads")?;
    let progress = bar(files.len() as u64, "caption files");
    let stats = Mutex::new(ReadStats::default());
    let lock = || {
        stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    let captions = files.chunks(READ_CHUNK).flat_map(|chunk| {
        if lock().failed.is_some() {
            return Vec::new();
        }
        let read: Vec<_> = pool.install(|| {
            chunk
                .par_iter()
                .map(|(path, lines)| {
                    let r = read_captions(path, *lines);
                    progress.inc(1);
                    (path, r)
                })
                .collect()
        });
        let mut st = lock();
        let mut out = Vec::new();
        for (path, r) in read {
            match r {
                Ok(Ok(c)) => out.extend(c),
                Ok(Err(why)) => st.skipped.push(format!("{} ({why})", path.display())),
                Err(e) => {
                    st.failed.get_or_insert(e);
                }
            }
        }
        st.captions += out.len();
        out
    });
    let trained = BpeTokenizer::train(captions, vocab_size, min_frequency);
    progress.finish_and_clear();
    let stats = stats
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(e) = stats.failed {
        return Err(e);
    }
    let skipped = &stats.skipped;
    if !skipped.is_empty() {
        let more = skipped.len().saturating_sub(NAMED_SKIPS);
        eprintln!(
            "skipped {} caption files: {}{}",
            skipped.len(),
            skipped[..skipped.len().min(NAMED_SKIPS)].join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            }
        );
    }
    let tok = trained.context("training the tokenizer")?;
    tok.save(out)?;
    eprintln!(
        "trained on {} captions from {} files; wrote {} ({} tokens)",
        stats.captions,
        files.len(),
        out.display(),
        tok.vocab_size()
    );
    Ok(())
}

fn encode(
    path: &Path,
    layout: Option<(usize, usize)>,
    dropout: f32,
    seed: u64,
    texts: &[String],
) -> Result<()> {
    let tok = BpeTokenizer::load(path)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for text in texts {
        let ids = match layout {
            Some((text_len, text_vocab)) => {
                encode_caption(&tok, text, text_len, text_vocab, dropout, &mut rng)?
            }
            None => tok.encode_with_dropout(text, dropout, &mut rng)?,
        };
        let tokens: Vec<Option<String>> =
            ids.iter().map(|&id| tok.inner().id_to_token(id)).collect();
        let line = serde_json::json!({ "text": text, "ids": ids, "tokens": tokens });
        println!("{line}");
    }
    Ok(())
}
