//! Resume is bit-exact: 2N updates straight and N updates + stop + resume + N updates give
//! byte-identical weights, optimizer state and EMA. And resume is verified: a checkpoint whose
//! bytes changed, that holds a NaN, whose state.json does not add up, or that has no `DONE` is
//! set aside (renamed, never deleted) and the run resumes from the newest one that verifies.

use std::fs;
use std::path::Path;
use tessera_tests::{small_run_yaml, tensors};
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
fn an_incomplete_newer_checkpoint_is_set_aside_and_its_step_can_be_saved_again() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 6), true).unwrap();
    let before = snapshot(&out);
    // A step_* directory without DONE (a copy cut short, a lost marker), with a truncated model.
    let partial = step_dir(&out, 9);
    fs::create_dir_all(&partial).unwrap();
    fs::write(partial.join("model.safetensors"), b"trunc").unwrap();
    let s = trainer::train::run(&config(&out, 7), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(6), 7));
    // Set aside with its contents, not deleted; the complete ones untouched.
    let aside = set_aside_dirs(&out, 9, "incomplete");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        fs::read(aside[0].join("model.safetensors")).unwrap(),
        b"trunc"
    );
    assert_unchanged(&before);
    // Step 9 is free again: the run goes on through it (it used to refuse "already exists").
    let s = trainer::train::run(&config(&out, 9), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(7), 9));
    assert!(step_dir(&out, 9).join("DONE").is_file());
}

/// Every file of every complete checkpoint of `out`, with its bytes.
fn snapshot(out: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for (_, dir) in trainer::checkpoint::list_complete(out).unwrap() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            files.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    files.sort();
    files
}

fn assert_unchanged(files: &[(std::path::PathBuf, Vec<u8>)]) {
    for (p, bytes) in files {
        assert!(
            fs::read(p).ok().as_ref() == Some(bytes),
            "{} changed or went away",
            p.display()
        );
    }
}

/// The directories `step_<step>.<label>-*` under `out/checkpoints`.
fn set_aside_dirs(out: &Path, step: u64, label: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("step_{step:08}.{label}-");
    let mut found: Vec<_> = fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&prefix)
        })
        .collect();
    found.sort();
    found
}

/// Rewrites `file` of checkpoint `dir` through `edit`, then records its new checksum in the
/// manifest, so that only the checks beyond the checksum can catch the change.
fn rewrite_with_valid_checksum(dir: &Path, file: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    use trainer::checkpoint::{FileDigest, Manifest, MANIFEST_FILE};
    let path = dir.join(file);
    let mut bytes = fs::read(&path).unwrap();
    edit(&mut bytes);
    fs::write(&path, &bytes).unwrap();
    let mut m = Manifest::read(dir).unwrap().unwrap();
    m.files.insert(file.to_string(), FileDigest::of(&bytes));
    fs::write(dir.join(MANIFEST_FILE), m.to_bytes()).unwrap();
    trainer::checkpoint::load_checked(dir)
        .unwrap()
        .verify()
        .unwrap();
}

#[test]
fn a_flipped_byte_sets_the_checkpoint_aside_and_the_run_resumes_from_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, out) = (tmp.path().join("straight"), tmp.path().join("run"));
    trainer::train::run(&config(&straight, 12), true).unwrap();
    trainer::train::run(&config(&out, 9), true).unwrap();
    // One bit of one weight, inside the tensor data: the file still parses.
    let model = step_dir(&out, 9).join("model.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x04;
    fs::write(&model, &bytes).unwrap();
    let before = snapshot(&out)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(step_dir(&out, 9)))
        .collect::<Vec<_>>();

    let s = trainer::train::run(&config(&out, 12), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(6), 12));
    let aside = set_aside_dirs(&out, 9, "corrupt-checksum");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(aside[0].join("model.safetensors")).unwrap(), bytes);
    assert_unchanged(&before);
    // The run went on from step 6 as if nothing had happened.
    for file in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
    ] {
        assert!(
            fs::read(step_dir(&straight, 12).join(file)).unwrap()
                == fs::read(step_dir(&out, 12).join(file)).unwrap(),
            "{file} differs from the straight run"
        );
    }
}

#[test]
fn a_nan_weight_with_a_valid_checksum_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 6), true).unwrap();
    let dir = step_dir(&out, 6);
    rewrite_with_valid_checksum(&dir, "model.safetensors", |bytes| {
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let data = st.tensor("ln_f.weight").unwrap().data();
        let offset = data.as_ptr() as usize - bytes.as_ptr() as usize + 4;
        bytes[offset..offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let before = snapshot(&out)
        .into_iter()
        .filter(|(p, _)| !p.starts_with(&dir))
        .collect::<Vec<_>>();
    let s = trainer::train::run(&config(&out, 7), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(3), 7));
    assert_eq!(set_aside_dirs(&out, 6, "corrupt-nonfinite").len(), 1);
    assert_unchanged(&before);
    assert!(s.last.unwrap().loss.is_finite());
}

#[test]
fn state_json_with_an_inconsistent_step_adam_step_or_data_cursor_is_refused() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 3] = [
        ("step", |v| v["step"] = 5.into(), "step is 5"),
        (
            "adam_t",
            |v| v["adam_t"] = (v["adam_t"].as_u64().unwrap() - 1).into(),
            "adam_t 5 + skipped_updates 0",
        ),
        (
            "data",
            |v| {
                let n = v["data"]["next_sample"].as_u64().unwrap();
                v["data"]["next_sample"] = (n + 4).into();
            },
            "next_sample is 52",
        ),
    ];
    for (what, edit, says) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        trainer::train::run(&config(&out, 6), true).unwrap();
        let dir = step_dir(&out, 6);
        let mut edited = None;
        rewrite_with_valid_checksum(&dir, "state.json", |bytes| {
            let mut v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            edit(&mut v);
            *bytes = serde_json::to_vec_pretty(&v).unwrap();
            edited = Some(v);
        });
        // What the check says about it.
        let state: trainer::train::TrainState = serde_json::from_value(edited.unwrap()).unwrap();
        let why = trainer::train::resume::check_state(&state, 6).unwrap_err();
        assert!(why.contains(says), "{what}: {why}");

        let s = trainer::train::run(&config(&out, 7), true).unwrap();
        assert_eq!((s.resumed_from, s.final_step), (Some(3), 7), "{what}");
        assert_eq!(set_aside_dirs(&out, 6, "corrupt-state").len(), 1, "{what}");
    }
}

#[test]
fn a_checkpoint_written_before_manifests_and_ledgers_still_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, out) = (tmp.path().join("straight"), tmp.path().join("run"));
    trainer::train::run(&config(&straight, 9), true).unwrap();
    trainer::train::run(&config(&out, 6), true).unwrap();
    // What an older Tessera wrote: no manifest.json, no `batches` in state.json.
    let dir = step_dir(&out, 6);
    fs::remove_file(dir.join("manifest.json")).unwrap();
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert!(v.as_object_mut().unwrap().remove("batches").is_some());
    fs::write(
        dir.join("state.json"),
        serde_json::to_vec_pretty(&v).unwrap(),
    )
    .unwrap();

    let s = trainer::train::run(&config(&out, 9), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(6), 9));
    assert_eq!(
        fs::read(step_dir(&straight, 9).join("model.safetensors")).unwrap(),
        fs::read(step_dir(&out, 9).join("model.safetensors")).unwrap()
    );
    // The new checkpoint has both again; its ledger starts where the old one was loaded.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(step_dir(&out, 9).join("state.json")).unwrap()).unwrap();
    assert_eq!(state["batches"]["since_step"], 6, "{state}");
    assert!(step_dir(&out, 9).join("manifest.json").is_file());
}

#[test]
fn a_changed_batch_size_on_resume_starts_a_new_ledger_instead_of_failing_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 6), true).unwrap();
    let smaller = |steps| {
        let mut c = config(&out, steps);
        c.train.batch_size = 2;
        c
    };
    let s = trainer::train::run(&smaller(9), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(6), 9));
    let s = trainer::train::run(&smaller(12), true).unwrap();
    assert_eq!((s.resumed_from, s.final_step), (Some(9), 12));
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(step_dir(&out, 12).join("state.json")).unwrap()).unwrap();
    assert_eq!(state["batches"]["since_step"], 6, "{state}");
    assert_eq!(state["batches"]["batch_size"], 2, "{state}");
    // 6 updates × 2 micro-batches × 4 + 6 × 2 × 2.
    assert_eq!(state["data"]["next_sample"], 72, "{state}");
}

#[test]
fn when_no_checkpoint_verifies_the_run_does_not_start_over_on_top_of_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 3), true).unwrap();
    let metrics = fs::read(out.join("metrics.jsonl")).unwrap();
    let model = step_dir(&out, 3).join("model.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 0x80;
    fs::write(&model, &bytes).unwrap();
    for attempt in 0..2 {
        let err = format!(
            "{:#}",
            trainer::train::run(&config(&out, 6), true).unwrap_err()
        );
        assert!(
            err.contains("no checkpoint") && err.contains("step_00000003.corrupt-checksum-"),
            "attempt {attempt}: {err}"
        );
        assert_eq!(set_aside_dirs(&out, 3, "corrupt-checksum").len(), 1);
        // Nothing was started over: the run's metrics are as they were.
        assert_eq!(fs::read(out.join("metrics.jsonl")).unwrap(), metrics);
    }
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
