//! What the integration tests share: running the `trainer` binary, and the Python cross-checks'
//! readiness check. (Not every test file uses every helper.)
#![allow(dead_code)]

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

/// Whether `python3` can import numpy and safetensors (tools/requirements.txt). When it cannot:
/// under CI (`CI` set) this panics, since CI installs them; elsewhere it prints why `check` is
/// skipped and returns false.
pub fn python_ready(check: &str) -> bool {
    let why = match Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output()
    {
        Err(e) => format!("cannot run python3: {e}"),
        Ok(out) if !out.status.success() => format!(
            "python3 cannot import numpy and safetensors ({}); \
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
