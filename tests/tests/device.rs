//! `trainer train` with `run.device: cuda-emu`: the transformer's passes as the CUDA kernels on
//! the CPU emulator, through the whole training loop, against the CPU run; resume on the
//! emulated device is bit-exact; devices and models that cannot run say so before any data.

use std::fs;
use std::path::Path;
use tessera_tests::{small_run_yaml, tensors};
use trainer::config::RunConfig;

fn config(out: &Path, steps: u64, device: &str) -> RunConfig {
    let yaml = small_run_yaml(out, steps, "checkpoint:\n  every: 5\n  keep_last: 5\n")
        .replace("device: cpu", &format!("device: {device}"))
        .replace("batch_size: 4", "batch_size: 2\n  grad_accum: 2")
        // Narrower than the shared small config: the emulator runs every CUDA thread.
        .replace("d_model: 32", "d_model: 16");
    RunConfig::from_yaml_str(&yaml, "test config").unwrap()
}

fn losses(out: &Path) -> Vec<f64> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn ten_updates_on_the_emulated_gpu_agree_with_the_cpu_and_resume_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (cpu, emu, resumed) = (
        tmp.path().join("cpu"),
        tmp.path().join("emu"),
        tmp.path().join("resumed"),
    );
    trainer::train::run(&config(&cpu, 10, "cpu"), true).unwrap();
    trainer::train::run(&config(&emu, 10, "cuda-emu"), true).unwrap();
    let (a, b) = (losses(&cpu), losses(&emu));
    assert_eq!((a.len(), b.len()), (10, 10));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    eprintln!("largest relative loss difference, emulated GPU vs CPU: {worst:.2e}");
    for (t, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "update {}: cpu loss {x}, emulated GPU {y}",
            t + 1
        );
    }
    assert!(a[9] < a[0], "the run trained: {a:?}");
    // The weights trained on the device reach the checkpoint (downloaded for it), as the CPU's.
    let model = |out: &Path, step: u64| {
        tensors(&out.join(format!("checkpoints/step_{step:08}/model.safetensors")))
    };
    let (w_cpu, w_emu, w_five) = (model(&cpu, 10), model(&emu, 10), model(&emu, 5));
    for ((name, x), (_, y)) in w_cpu.iter().zip(&w_emu) {
        let worst = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst < 1e-5,
            "{name}: emulated GPU and CPU weights differ by {worst}"
        );
    }
    assert_ne!(
        w_emu, w_five,
        "the device's updates reached the checkpoints"
    );

    trainer::train::run(&config(&resumed, 5, "cuda-emu"), true).unwrap();
    let r = trainer::train::run(&config(&resumed, 10, "cuda-emu"), true).unwrap();
    assert_eq!(r.resumed_from, Some(5));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let x = fs::read(emu.join("checkpoints/step_00000010").join(file)).unwrap();
        let y = fs::read(resumed.join("checkpoints/step_00000010").join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run"
        );
    }
}

#[test]
fn device_runs_that_cannot_work_fail_before_reading_data() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&tmp.path().join("fp16"), 2, "cuda-emu");
    cfg.run.precision = trainer::config::Precision::Fp16;
    let e = format!("{:#}", trainer::train::run(&cfg, true).unwrap_err());
    assert!(e.contains("cuda-emu") && e.contains("fp16"), "{e}");
    assert!(!tmp.path().join("fp16").exists(), "nothing written: {e}");

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/dvae-cpu.yaml");
    let sets = [
        "run.device=cuda-emu".to_string(),
        format!("run.out_dir={}", tmp.path().join("dvae").display()),
    ];
    let cfg = RunConfig::load(&path, &sets).unwrap();
    let e = format!("{:#}", trainer::train::run(&cfg, true).unwrap_err());
    assert!(e.contains("dVAE") && e.contains("cuda-emu"), "{e}");
}
