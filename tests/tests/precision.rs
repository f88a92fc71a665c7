//! `run.precision: fp16` end to end on the CPU (docs/model.md §5): the paper's rounding through
//! f16 with one gradient scale per resblock, against the fp32 run; its scales in the metrics and
//! in state.json; bit-exact resume; an fp32 checkpoint resumed in fp16.

use std::fs;
use std::path::Path;
use tessera_tests::small_run_yaml;
use trainer::config::RunConfig;

fn config(out: &Path, steps: u64, precision: &str) -> RunConfig {
    let yaml = small_run_yaml(out, steps, "checkpoint:\n  every: 3\n  keep_last: 5\n").replace(
        "device: cpu",
        &format!("device: cpu\n  precision: {precision}"),
    );
    RunConfig::from_yaml_str(&yaml, "test config").unwrap()
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn state(out: &Path, step: u64) -> serde_json::Value {
    let path = out.join(format!("checkpoints/step_{step:08}/state.json"));
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// The scale every resblock has after `applied` clean updates from the start (one replica).
fn scale_after(applied: u32) -> f64 {
    (2f64.powf(13.0 + applied as f64 / 1000.0)) as f32 as f64
}

#[test]
fn fp16_tracks_fp32_and_reports_its_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("fp32"), tmp.path().join("fp16"));
    trainer::train::run(&config(&a, 12, "fp32"), true).unwrap();
    trainer::train::run(&config(&b, 12, "fp16"), true).unwrap();
    let (m32, m16) = (metrics(&a), metrics(&b));
    assert_eq!((m32.len(), m16.len()), (12, 12));
    let rel = |x: &serde_json::Value, y: &serde_json::Value| {
        let (a, b) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        (a - b).abs() / a
    };
    let worst = m32
        .iter()
        .zip(&m16)
        .map(|(x, y)| rel(x, y))
        .fold(0.0, f64::max);
    eprintln!("largest relative loss difference, fp16 vs fp32: {worst:.2e}");
    for (t, (x, y)) in m32.iter().zip(&m16).enumerate() {
        let (l32, l16) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        // f16 keeps 11 significant bits (relative rounding 2^-12 ≈ 2.4e-4 per value). The
        // loss averages many rounded values, so its error stays near one rounding unit (1.5e-4
        // measured over these 12 updates); 2e-3 is 8 units, room for the drift of 12 AdamW
        // updates. A run that did not round would match to 1e-7 (checked below).
        assert!(
            (l16 - l32).abs() < 2e-3 * l32,
            "step {}: fp16 loss {l16} vs fp32 {l32}",
            t + 1
        );
        assert!(x.get("grad_scale_min").is_none(), "fp32 has no scales");
        // No update skipped, so every scale grew by 2^(1/1000) per update: step t used the
        // scale of t − 1 clean updates.
        let want = scale_after(t as u32);
        for key in ["grad_scale_min", "grad_scale_median", "grad_scale_max"] {
            assert_eq!(y[key].as_f64().unwrap(), want, "step {} {key}", t + 1);
        }
        assert_eq!(y["skipped_updates"].as_f64().unwrap(), 0.0);
    }
    let differs = m32
        .iter()
        .zip(&m16)
        .any(|(x, y)| x["loss"].as_f64() != y["loss"].as_f64());
    assert!(differs, "the fp16 run rounded nothing");
    let s = state(&b, 12);
    assert_eq!(s["grad_scaler"]["replicas"], 1);
    assert_eq!(
        s["grad_scaler"]["log2_milli"],
        serde_json::json!(vec![13_012; 8])
    );
    assert!(state(&a, 12).get("grad_scaler").is_none());
}

#[test]
fn fp16_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, resumed) = (tmp.path().join("straight"), tmp.path().join("resumed"));
    trainer::train::run(&config(&straight, 12, "fp16"), true).unwrap();
    trainer::train::run(&config(&resumed, 6, "fp16"), true).unwrap();
    let r = trainer::train::run(&config(&resumed, 12, "fp16"), true).unwrap();
    assert_eq!(r.resumed_from, Some(6));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let x = fs::read(straight.join("checkpoints/step_00000012").join(file)).unwrap();
        let y = fs::read(resumed.join("checkpoints/step_00000012").join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run"
        );
    }
}

#[test]
fn an_fp32_checkpoint_resumes_in_fp16_with_fresh_scales() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    trainer::train::run(&config(&out, 6, "fp32"), true).unwrap();
    let r = trainer::train::run(&config(&out, 9, "fp16"), true).unwrap();
    assert_eq!((r.resumed_from, r.final_step), (Some(6), 9));
    // Three fp16 updates from M·2^13.
    assert_eq!(
        state(&out, 9)["grad_scaler"]["log2_milli"],
        serde_json::json!(vec![13_003; 8])
    );
    let m = metrics(&out);
    assert_eq!(m[6]["grad_scale_min"].as_f64().unwrap(), scale_after(0));
    // And back to fp32: the scales are dropped.
    trainer::train::run(&config(&out, 12, "fp32"), true).unwrap();
    assert!(state(&out, 12).get("grad_scaler").is_none());
}

#[test]
fn fp16_is_refused_for_the_dvae_naming_the_field() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/dvae-cpu.yaml");
    let e = RunConfig::load(&path, &["run.precision=fp16".to_string()]).unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("run.precision") && e.contains("dvae"), "{e}");
    RunConfig::load(&path, &["run.precision=fp32".to_string()]).unwrap();
}
