//! SIGTERM stops a run cleanly: the update in flight finishes, a complete checkpoint is written,
//! the exit status is 143, and resuming from it gives the same bytes as never stopping (and the
//! second run did resume: it keeps the first run's metrics and says where it resumed).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn write_config(path: &Path, out: &Path) {
    let yaml = format!(
        "run:\n  name: sig\n  out_dir: {}\n  seed: 3\n  device: cpu\n\
         model:\n  text_len: 6\n  text_vocab: 30\n  grid: 4\n  image_vocab: 20\n  d_model: 32\n  heads: 2\n  layers: 2\n\
         data:\n  source: synthetic\n  min_caption_tokens: 2\n\
         schedule:\n  kind: plateau\n  warmup_steps: 3\n  plateau_window: 2\n  plateau_patience: 2\n\
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
fn sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (stopped, straight) = (tmp.path().join("stopped"), tmp.path().join("straight"));
    let cfg = tmp.path().join("c.yaml");
    write_config(&cfg, &stopped);
    let exe = env!("CARGO_BIN_EXE_trainer");
    let mut child = Command::new(exe)
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while logged_steps(&stopped) < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run never got going"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status}");

    // The checkpoint of the last completed update exists and is complete.
    let state: serde_json::Value = {
        let dir = fs::read_dir(stopped.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("DONE").exists())
            .expect("a complete checkpoint");
        serde_json::from_slice(&fs::read(dir.join("state.json")).unwrap()).unwrap()
    };
    let k = state["step"].as_u64().unwrap();
    assert!((5..100000).contains(&k), "stopped at {k}");
    // The interrupted run logged exactly the updates 1..=k.
    let interrupted = fs::read_to_string(stopped.join("metrics.jsonl")).unwrap();
    assert_eq!(steps_of(&interrupted), (1..=k).collect::<Vec<_>>());

    // Resume to k + 4, and run k + 4 straight: identical weights.
    let target = format!("train.steps={}", k + 4);
    let o = Command::new(exe)
        .args(["train", "--config", cfg.to_str().unwrap(), "--set", &target])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // It resumed, and said from where: a run that silently started again would be as
    // deterministic, but would rewrite lines 1..=k (their timings differ) and not log this.
    let log = String::from_utf8_lossy(&o.stderr);
    let dir_k = format!("step_{k:08}");
    assert!(
        log.lines().any(|l| l.contains("resumed")
            && l.contains(&format!("step={k}"))
            && l.contains(&dir_k)),
        "no `resumed step={k}` line naming {dir_k} in the log:\n{log}"
    );
    let resumed = fs::read_to_string(stopped.join("metrics.jsonl")).unwrap();
    assert!(
        resumed.starts_with(&interrupted),
        "the resumed run's metrics do not start with the interrupted run's lines"
    );
    assert_eq!(steps_of(&resumed), (1..=k + 4).collect::<Vec<_>>());
    let out_dir = format!("run.out_dir={}", straight.display());
    let o = Command::new(exe)
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &target,
            "--set",
            &out_dir,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let final_dir = format!("checkpoints/step_{:08}/model.safetensors", k + 4);
    assert_eq!(
        fs::read(stopped.join(&final_dir)).unwrap(),
        fs::read(straight.join(&final_dir)).unwrap(),
        "stop at {k} + resume differs from a straight run"
    );
    // And the losses logged along the way are the straight run's.
    let straight_metrics = fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    assert_eq!(losses_of(&resumed), losses_of(&straight_metrics));
}

fn json_lines(text: &str) -> impl Iterator<Item = serde_json::Value> + '_ {
    text.lines().map(|l| serde_json::from_str(l).unwrap())
}

fn steps_of(text: &str) -> Vec<u64> {
    json_lines(text)
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

fn losses_of(text: &str) -> Vec<f64> {
    json_lines(text)
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}
