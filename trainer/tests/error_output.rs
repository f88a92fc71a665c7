//! What the `trainer` binary prints: an OS error once (not once in the message and again as
//! its cause), and log lines without colour escapes when stderr is not a terminal (a launcher's
//! `rank_N.log`, a redirect).

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

fn config(out: &Path, data: &str) -> String {
    format!(
        "run:\n  name: bounds\n  out_dir: {}\n  seed: 2\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 16\n  heads: 2\n  layers: 1\n  conv_kernel: 3\n\
         data:\n{data}\
         train:\n  steps: 2\n  batch_size: 2\n  log_every: 1\n\
         checkpoint:\n  every: 0\n",
        out.display()
    )
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env_remove("TESSERA_SKIP_MEMORY_CHECK")
        .env_remove("LOCAL_WORLD_SIZE")
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Exit status 1 with an error, not a signal (an abort is SIGABRT, no exit code).
fn assert_error_exit(o: &Output, what: &str) {
    assert_eq!(
        o.status.signal(),
        None,
        "{what}: killed by a signal: {}",
        text(o)
    );
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("error: "),
        "{what}: {}",
        text(o)
    );
}

#[test]
fn an_os_error_is_printed_once_and_logs_to_a_file_have_no_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.yaml");
    let o = trainer(&["train", "--config", missing.to_str().unwrap()]);
    assert_error_exit(&o, "missing config");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("missing.yaml"), "{e}");
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");

    // A short run with its stderr going to a pipe, as a launcher's rank_N.log does: the log
    // lines are there, and no ANSI escape is.
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("c.yaml");
    fs::write(&cfg, config(&out, "  source: synthetic\n")).unwrap();
    let o = trainer(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stderr.contains(&b'\n'), "no log lines: {}", text(&o));
    assert!(!o.stderr.contains(&0x1b), "{}", text(&o));
}
