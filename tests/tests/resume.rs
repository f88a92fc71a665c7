//! Resume is bit-exact: 2N updates straight and N updates + stop + resume + N updates give
//! byte-identical weights, optimizer state and EMA.

use std::fs;
use std::path::Path;
use tessera_tests::small_run_yaml;
use trainer::config::RunConfig;

const CHECKPOINT: &str = "checkpoint:\n  every: 3\n  keep_last: 5\n";
/// Warm-up, then a plateau rule tight enough to halve during the run, so its state crosses the
/// resume; two micro-batches per update, so the data cursor is not just the step.
const SCHEDULE: &str =
    "schedule:\n  kind: plateau\n  warmup_steps: 2\n  plateau_window: 2\n  plateau_patience: 1\n";

fn config(out: &Path, steps: u64) -> RunConfig {
    let extra = format!("{CHECKPOINT}{SCHEDULE}");
    let yaml = small_run_yaml(out, steps, &extra)
        .replace("batch_size: 4", "batch_size: 4\n  grad_accum: 2");
    RunConfig::from_yaml_str(&yaml, "test config").unwrap()
}

fn step_dir(out: &Path, step: u64) -> std::path::PathBuf {
    out.join(format!("checkpoints/step_{step:08}"))
}

#[test]
fn n_steps_resume_n_steps_equals_2n_steps_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));

    let a = trainer::train::run(&config(&straight, 12), true).unwrap();
    assert_eq!((a.final_step, a.resumed_from), (12, None));

    let b1 = trainer::train::run(&config(&resumed, 6), true).unwrap();
    assert_eq!(b1.final_step, 6);
    let b2 = trainer::train::run(&config(&resumed, 12), true).unwrap();
    assert_eq!((b2.final_step, b2.resumed_from), (12, Some(6)));

    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
        "state.json",
    ] {
        let x = fs::read(step_dir(&straight, 12).join(file)).unwrap();
        let y = fs::read(step_dir(&resumed, 12).join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run"
        );
    }
    // The plateau rule acted, so its state really crossed the resume.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(step_dir(&straight, 12).join("state.json")).unwrap())
            .unwrap();
    assert!(
        state["schedule"]["halvings"].as_u64().unwrap() >= 1,
        "{state}"
    );
    // And the weights moved at all (a run that did nothing would also be bit-identical).
    let first = fs::read(step_dir(&straight, 3).join("model.safetensors")).unwrap();
    assert_ne!(
        first,
        fs::read(step_dir(&straight, 12).join("model.safetensors")).unwrap()
    );

    // The metrics log of the resumed run has each step once, in order.
    let text = fs::read_to_string(resumed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn resume_skips_an_incomplete_newer_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 6), true).unwrap();
    // A crash while writing step 9: a directory without DONE, with a truncated model file.
    let partial = step_dir(&out, 9);
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("model.safetensors"), b"trunc").unwrap();
    let s = trainer::train::run(&config(&out, 7), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(6), 7));
    // The partial directory was neither loaded nor deleted.
    assert!(partial.join("model.safetensors").exists());
}

#[test]
fn resume_refuses_a_checkpoint_of_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 3), true).unwrap();
    let mut other = config(&out, 6);
    other.model.transformer_mut().unwrap().d_model = 64;
    let err = format!("{:#}", trainer::train::run(&other, true).unwrap_err());
    assert!(
        err.contains("step_00000003") && err.contains("d_model"),
        "{err}"
    );
}

/// Every tensor of a safetensors file, by name, as f32s.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let data = st.tensor(&n).unwrap().data().to_vec();
            let values = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, values)
        })
        .collect()
}

#[test]
fn ema_is_decay_times_ema_plus_the_rest_times_the_model_every_update() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // A short decay, so that one update moves the EMA well above round-off; a checkpoint after
    // every update, all kept.
    let d = 0.75f32;
    let yaml = small_run_yaml(&out, 4, "checkpoint:\n  every: 1\n  keep_last: 10\n")
        .replace("lr: 3.0e-3", &format!("lr: 3.0e-3\n  ema: {d}"));
    let cfg = RunConfig::from_yaml_str(&yaml, "test config").unwrap();
    trainer::train::run(&cfg, true).unwrap();
    let read = |step, file| tensors(&step_dir(&out, step).join(file));
    for t in 2..=4u64 {
        let (prev, ema, model) = (
            read(t - 1, "ema.safetensors"),
            read(t, "ema.safetensors"),
            read(t, "model.safetensors"),
        );
        assert_eq!(ema.len(), model.len());
        let (mut moved, mut off_model) = (0.0f32, 0.0f32);
        for (((name, e), (_, p)), (_, m)) in ema.iter().zip(&prev).zip(&model) {
            for i in 0..e.len() {
                let want = d * p[i] + (1.0 - d) * m[i];
                let tol = 1e-7 + 1e-6 * want.abs();
                assert!(
                    (e[i] - want).abs() <= tol,
                    "step {t} {name}[{i}]: ema {} but d·ema + (1−d)·model = {want}",
                    e[i]
                );
                moved = moved.max((e[i] - p[i]).abs());
                off_model = off_model.max((e[i] - m[i]).abs());
            }
        }
        // The EMA moved this update, and is not the model itself.
        assert!(moved > 1e-5, "step {t}: the EMA moved by only {moved}");
        assert!(off_model > 1e-5, "step {t}: the EMA equals the model");
    }
}
