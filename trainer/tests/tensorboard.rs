//! A run's TensorBoard event files, read back by TensorBoard's own reader (the Python
//! `tensorboard` package's `EventAccumulator`, what `tensorboard --logdir` uses), hold every
//! number of `metrics.jsonl` at every logged step, also after a resume that redoes updates.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::{output_text, python_imports, small_run_config, trainer};

/// TensorBoard's view of a run directory: {tag: [[step, value], …]} as JSON.
const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

fn train(cfg: &Path) {
    let o = trainer(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", output_text(&o));
}

#[test]
fn event_files_hold_every_metric_of_every_logged_step_across_a_resume() {
    if !python_imports("the TensorBoard event-file check", "tensorboard") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("c.yaml");
    let yaml = small_run_config(&out, "  source: synthetic\n  min_caption_tokens: 2\n")
        .replace("steps: 2", "steps: 4")
        .replace("every: 0", "every: 2");
    fs::write(&cfg, &yaml).unwrap();
    train(&cfg);
    // Resume from step 2 (the step-4 checkpoint gone): updates 3 and 4 are redone, and the
    // first file's values for them must not show.
    fs::remove_dir_all(out.join("checkpoints/step_00000004")).unwrap();
    fs::write(&cfg, yaml.replace("steps: 4", "steps: 6")).unwrap();
    // A second's wait: event files are ordered by the Unix second in their names.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    train(&cfg);
    let files: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(files.len(), 2, "one event file per run: {files:?}");

    let o = Command::new("python3")
        .args(["-c", READ, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let seen: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&o.stdout).unwrap();

    let metrics = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    let mut checked = 0;
    for line in &lines {
        let step = line["step"].as_u64().unwrap();
        for (key, v) in line.as_object().unwrap() {
            if key == "step" {
                continue;
            }
            let want = match v {
                serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
                v => v.as_f64().unwrap(),
            };
            let points = seen[key]
                .as_array()
                .unwrap_or_else(|| panic!("no scalar {key}"));
            let at: Vec<f64> = points
                .iter()
                .filter(|p| p[0].as_u64() == Some(step))
                .map(|p| p[1].as_f64().unwrap())
                .collect();
            // TensorBoard's scalars are f32.
            assert_eq!(at, [want as f32 as f64], "{key} at step {step}");
            checked += 1;
        }
    }
    assert!(checked >= 6 * 9, "only {checked} values compared");
    // Nothing TensorBoard shows that metrics.jsonl lacks.
    for (key, points) in &seen {
        assert_eq!(points.as_array().unwrap().len(), 6, "{key}: {points}");
    }
}
