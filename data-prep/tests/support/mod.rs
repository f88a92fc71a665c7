//! What the `data-prep` integration tests share: running the binary and reading its output.
//! (Not every test file uses every helper.)
#![allow(dead_code)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use trainer::config::RunConfig;

/// Runs `data-prep ARGS` to its end.
pub fn data_prep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_data-prep"))
        .args(args)
        .output()
        .expect("running data-prep")
}

/// Its stdout and stderr, for assertion messages and searches.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that it succeeded; returns [`text`].
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// A run's `metrics.jsonl`, one JSON object per logged update.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The mean of `key` over `rows`.
pub fn mean(rows: &[serde_json::Value], key: &str) -> f64 {
    rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
}

/// 8 updates straight into `dir/a`, and 3, stop, resume, 5 more into `dir/b`, from `cfg(out,
/// steps)` (which must checkpoint at update 3): the step-8 checkpoints' model, optimizer, EMA and
/// state.json are byte-identical, and so is every logged value but the timings.
pub fn assert_resume_is_bit_exact(dir: &Path, cfg: impl Fn(&Path, u64) -> RunConfig) {
    let (straight, resumed) = (dir.join("a"), dir.join("b"));
    trainer::train::run(&cfg(&straight, 8), true).unwrap();
    trainer::train::run(&cfg(&resumed, 3), true).unwrap();
    let b = trainer::train::run(&cfg(&resumed, 8), true).unwrap();
    assert_eq!((b.final_step, b.resumed_from), (8, Some(3)));
    let step8 = |out: &Path| out.join("checkpoints/step_00000008");
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
        "state.json",
    ] {
        assert!(
            fs::read(step8(&straight).join(file)).unwrap()
                == fs::read(step8(&resumed).join(file)).unwrap(),
            "{file} differs between 8 straight updates and 3 + resume + 5"
        );
    }
    let untimed = |out: &Path| {
        metrics(out)
            .into_iter()
            .map(|mut v| {
                for k in ["step_ms", "gflops_per_s", "mfu", "images_per_s"] {
                    v[k] = serde_json::Value::Null;
                }
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(untimed(&straight), untimed(&resumed));
}
