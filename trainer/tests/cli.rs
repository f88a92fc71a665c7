//! The `trainer` binary on bad input: every mistake exits non-zero with an error that names the
//! file and the field, and nothing already on disk is overwritten.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

mod support;
use support::trainer;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a small valid config into `dir` and returns its path.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let yaml = format!(
        "run:\n  name: cli\n  out_dir: {}\n  seed: 1\n  device: cpu\n\
         model:\n  text_len: 4\n  text_vocab: 10\n  grid: 2\n  image_vocab: 6\n  d_model: 8\n  heads: 2\n  layers: 2\n\
         data:\n  source: synthetic\n  min_caption_tokens: 2\n\
         train:\n  steps: 2\n  batch_size: 2\n\
         checkpoint:\n  every: 1\n{extra}",
        dir.join("run").display()
    );
    let path = dir.join("config.yaml");
    fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn unknown_and_missing_fields_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "  colour: red\n");
    let o = trainer(&["train", "--config", cfg.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("config.yaml") && e.contains("colour"),
        "{e}"
    );

    let text = fs::read_to_string(write_config(tmp.path(), "")).unwrap();
    fs::write(&cfg, text.replace("  heads: 2\n", "")).unwrap();
    let o = trainer(&["train", "--config", cfg.to_str().unwrap()]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("heads"), "{e}");

    let absent = tmp.path().join("absent.yaml");
    let o = trainer(&["train", "--config", absent.to_str().unwrap()]);
    assert!(
        !o.status.success() && stderr(&o).contains("absent.yaml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_overrides_and_devices_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let c = cfg.to_str().unwrap();
    let o = trainer(&["train", "--config", c, "--set", "optim.lrr=1"]);
    assert!(
        !o.status.success() && stderr(&o).contains("lrr"),
        "{}",
        stderr(&o)
    );
    let o = trainer(&["train", "--config", c, "--set", "model.d_model=7"]);
    assert!(
        !o.status.success() && stderr(&o).contains("d_model"),
        "{}",
        stderr(&o)
    );
    let o = trainer(&["train", "--config", c, "--set", "run.device=cuda"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("cuda") && e.contains("run.device"),
        "{e}"
    );
    assert!(!tmp.path().join("run").join("checkpoints").exists());
}

#[test]
fn corrupt_checkpoints_are_errors_and_existing_runs_are_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "  keep_last: 5\n");
    let c = cfg.to_str().unwrap();
    let o = trainer(&["train", "--config", c]);
    assert!(o.status.success(), "{}", stderr(&o));
    let newest = tmp.path().join("run/checkpoints/step_00000002");
    let model = newest.join("model.safetensors");
    let saved = fs::read(&model).unwrap();

    // --no-resume over existing checkpoints refuses rather than overwrite.
    let o = trainer(&[
        "train",
        "--config",
        c,
        "--no-resume",
        "--set",
        "train.steps=3",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("already holds checkpoints"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read(&model).unwrap(), saved);

    // A truncated model file in the newest complete checkpoint: set aside (renamed, not deleted)
    // with a warning naming the file, and the run resumes from the checkpoint before it.
    let checkpoints = tmp.path().join("run/checkpoints");
    let older = checkpoints.join("step_00000001/model.safetensors");
    let older_bytes = fs::read(&older).unwrap();
    fs::write(&model, &saved[..saved.len() / 2]).unwrap();
    let o = trainer(&["train", "--config", c, "--set", "train.steps=3"]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("step_00000002") && e.contains("model.safetensors") && e.contains("set aside"),
        "{e}"
    );
    let aside = entries_starting(&checkpoints, "step_00000002.corrupt-checksum-");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(aside[0].join("model.safetensors")).unwrap(),
        &saved[..saved.len() / 2]
    );
    assert_eq!(fs::read(&older).unwrap(), older_bytes);
    assert!(checkpoints.join("step_00000003/DONE").is_file());

    // Every checkpoint damaged: the run stops, naming them, rather than start over at step 0.
    for step in 1..=3 {
        let f = checkpoints.join(format!("step_{step:08}/state.json"));
        fs::write(&f, b"{}").unwrap();
    }
    let metrics = fs::read(tmp.path().join("run/metrics.jsonl")).unwrap();
    let o = trainer(&["train", "--config", c, "--set", "train.steps=4"]);
    let e = stderr(&o);
    assert!(
        !o.status.success()
            && e.contains("no checkpoint")
            && e.contains("step_00000001.corrupt-checksum-"),
        "{e}"
    );
    assert_eq!(
        fs::read(tmp.path().join("run/metrics.jsonl")).unwrap(),
        metrics
    );
    assert!(entries_starting(&checkpoints, "step_00000004").is_empty());
}

/// The entries of `dir` whose names start with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    found.sort();
    found
}

#[test]
fn weights_of_another_shape_are_refused_by_debug_state() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let c = cfg.to_str().unwrap();
    let w = tmp.path().join("w.safetensors");
    let o = trainer(&["init-weights", "--config", c, "--out", w.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let batch = tmp.path().join("b.safetensors"); // never read: the weights fail first
    let out = tmp.path().join("o.safetensors");
    let o = trainer(&[
        "debug-state",
        "--config",
        c,
        "--set",
        "model.d_model=16",
        "--weights",
        w.to_str().unwrap(),
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("w.safetensors") && e.contains("text_emb.weight"),
        "{e}"
    );
    assert!(!out.exists());
}
