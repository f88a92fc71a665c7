//! What the integration tests share: running the `trainer` binary, and the Python cross-checks'
//! readiness check. (Not every test file uses every helper.)
#![allow(dead_code)]

pub mod clip;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

/// The `trainer` binary of this build, logging warnings only.
pub fn trainer_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Runs `trainer ARGS` to its end.
pub fn trainer(args: &[&str]) -> Output {
    trainer_command()
        .args(args)
        .output()
        .expect("the trainer binary runs")
}

/// Runs `trainer ARGS` (paths and words alike) and asserts that it succeeded.
pub fn trainer_ok(args: &[&Path]) {
    let out = trainer_command().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "trainer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `python3` can import numpy and safetensors (tools/requirements.txt). When it cannot:
/// under CI (`CI` set) this panics, since CI installs them; elsewhere it prints why `check` is
/// skipped and returns false.
pub fn python_ready(check: &str) -> bool {
    python_imports(check, "numpy, safetensors.numpy")
}

/// [`python_ready`] for other modules of tools/requirements.txt (`imports`: a Python import
/// list).
pub fn python_imports(check: &str, imports: &str) -> bool {
    let why = match Command::new("python3")
        .args(["-c", &format!("import {imports}")])
        .output()
    {
        Err(e) => format!("cannot run python3: {e}"),
        Ok(out) if !out.status.success() => format!(
            "python3 cannot import {imports} ({}); \
             install them with `python3 -m pip install -r tools/requirements.txt`",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no message")
        ),
        Ok(_) => return true,
    };
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {check} cannot run: {why}");
    }
    eprintln!("skipped: {check}: {why}");
    false
}

/// A one-layer transformer run writing to `out`, its `data:` section given (indented lines).
pub fn small_run_config(out: &Path, data: &str) -> String {
    format!(
        "run:\n  name: bounds\n  out_dir: {}\n  seed: 2\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 16\n  heads: 2\n  layers: 1\n  conv_kernel: 3\n\
         data:\n{data}\
         train:\n  steps: 2\n  batch_size: 2\n  log_every: 1\n\
         checkpoint:\n  every: 0\n",
        out.display()
    )
}

/// Runs `trainer ARGS` with info logs, the memory check on and no launcher's rank count: how a
/// user's one-process run starts.
pub fn trainer_logged(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env_remove("TESSERA_SKIP_MEMORY_CHECK")
        .env_remove("LOCAL_WORLD_SIZE")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

/// stdout then stderr, for failure messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit status 1 with an error, not a signal (an abort is SIGABRT, no exit code).
pub fn assert_error_exit(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        None,
        "{what}: killed by a signal: {}",
        output_text(o)
    );
    assert_eq!(o.status.code(), Some(1), "{what}: {}", output_text(o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("error: "),
        "{what}: {}",
        output_text(o)
    );
}
