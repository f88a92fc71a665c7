//! One run per run directory: a second `trainer train` on an `out_dir` in use fails at once,
//! naming the first run's pid and host, without touching the first run; after the first run is
//! killed with SIGKILL (no chance to clean up) a new run on that directory starts and finishes.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn write_config(path: &Path, out: &Path) {
    let yaml = format!(
        "run:\n  name: lock\n  out_dir: {}\n  seed: 3\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 32\n  heads: 2\n  layers: 2\n\
         data:\n  source: synthetic\n  min_caption_tokens: 2\n\
         train:\n  steps: 100000\n  batch_size: 4\n  log_every: 1\n\
         checkpoint:\n  every: 0\n  keep_last: 2\n",
        out.display()
    );
    fs::write(path, yaml).unwrap();
}

fn logged_steps(out: &Path) -> usize {
    fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_second_run_on_the_same_out_dir_fails_naming_the_first_and_sigkill_frees_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("c.yaml");
    write_config(&cfg, &out);
    let exe = env!("CARGO_BIN_EXE_trainer");
    let mut first = Command::new(exe)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while logged_steps(&out) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the first run never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let second = Command::new(exe)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("pid {} on host ", first.id()))
            && err.contains(&out.display().to_string())
            && err.contains("run.lock"),
        "the error does not name the holder:\n{err}"
    );
    // The refusal left the first run alone: still training, still the lock's holder.
    assert!(first.try_wait().unwrap().is_none(), "the first run ended");
    let lock = fs::read_to_string(out.join("run.lock")).unwrap();
    assert!(
        lock.starts_with(&format!("pid: {}\n", first.id())),
        "{lock}"
    );

    // SIGKILL: no handler runs, only the kernel releases the lock.
    first.kill().unwrap();
    first.wait().unwrap();
    let third = Command::new(exe)
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.steps=3",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    assert!(out.join("checkpoints/step_00000003/DONE").is_file());
    let lock = fs::read_to_string(out.join("run.lock")).unwrap();
    assert!(!lock.contains(&format!("pid: {}\n", first.id())), "{lock}");
}
