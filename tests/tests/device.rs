//! `trainer train` with `run.device: cuda-emu`: the transformer's passes as the CUDA kernels on
//! the CPU emulator, through the whole training loop, against the CPU run, in fp32 and in fp16
//! (docs/model.md §5); resume on the emulated device is bit-exact, and an fp16 checkpoint moves
//! between the devices; devices and models that cannot run say so before any data.

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

fn fp16_config(out: &Path, steps: u64, device: &str) -> RunConfig {
    let mut cfg = config(out, steps, device);
    cfg.run.precision = trainer::config::Precision::Fp16;
    cfg
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(out: &Path) -> Vec<f64> {
    metrics(out)
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .collect()
}

/// Asserts that two runs' losses agree within 1e-5 relative at every update (`what`: the runs,
/// for the messages), and prints the largest difference.
fn assert_losses_agree(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: updates logged");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    eprintln!("largest relative loss difference, {what}: {worst:.2e}");
    for (t, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{what}, update {}: {x} against {y}",
            t + 1
        );
    }
}

/// 5 updates into `resumed`, then resumed to 10 by `cfg`: its step-10 model, optimizer and
/// state.json are byte-identical to `straight`'s.
fn assert_resumes_bit_exactly(
    straight: &Path,
    resumed: &Path,
    cfg: impl Fn(&Path, u64) -> RunConfig,
) {
    trainer::train::run(&cfg(resumed, 5), true).unwrap();
    let r = trainer::train::run(&cfg(resumed, 10), true).unwrap();
    assert_eq!(r.resumed_from, Some(5));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let x = fs::read(straight.join("checkpoints/step_00000010").join(file)).unwrap();
        let y = fs::read(resumed.join("checkpoints/step_00000010").join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the straight and the resumed run"
        );
    }
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
    assert_eq!(a.len(), 10);
    assert_losses_agree(&a, &b, "emulated GPU vs CPU");
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

    assert_resumes_bit_exactly(&emu, &resumed, |out, steps| config(out, steps, "cuda-emu"));
}

#[test]
fn fp16_on_the_emulated_gpu_tracks_the_cpu_fp16_run_and_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (cpu, emu, resumed, moved) = (
        tmp.path().join("cpu"),
        tmp.path().join("emu"),
        tmp.path().join("resumed"),
        tmp.path().join("moved"),
    );
    trainer::train::run(&fp16_config(&cpu, 10, "cpu"), true).unwrap();
    trainer::train::run(&fp16_config(&emu, 10, "cuda-emu"), true).unwrap();
    let (mc, me) = (metrics(&cpu), metrics(&emu));
    assert_eq!((mc.len(), me.len()), (10, 10));
    let (a, b) = (losses(&cpu), losses(&emu));
    // Both runs round the same values to f16 at the same points; they differ where an f32
    // sum in another order (blocked products, attention tiles) lands on the other side of an
    // f16 rounding boundary: one f16 step (2⁻¹¹ ≈ 4.9e-4 relative) in that one element. The
    // loss averages every position, so such flips move it far less than a step: 3.3e-7
    // measured over these ten updates (5e-7 for one pass in the unit test). 1e-5 leaves 30×
    // that, and stays 15× below what fp16's rounding itself moves the loss (1.5e-4 against
    // fp32, tests/precision.rs): a device run that skipped a rounding point would fail.
    assert_losses_agree(&a, &b, "fp16 emulated GPU vs fp16 CPU");
    for t in 0..10 {
        // The scales follow the same rule from the same flags: equal, not close.
        for key in [
            "grad_scale_min",
            "grad_scale_median",
            "grad_scale_max",
            "skipped_updates",
        ] {
            assert_eq!(mc[t][key], me[t][key], "update {} {key}", t + 1);
        }
    }
    assert_eq!(me[9]["skipped_updates"].as_f64(), Some(0.0));
    assert!(b[9] < b[0], "the run trained: {b:?}");
    let state = |out: &Path, step: u64| -> serde_json::Value {
        let path = out.join(format!("checkpoints/step_{step:08}/state.json"));
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    };
    assert_eq!(
        state(&emu, 10)["grad_scaler"],
        state(&cpu, 10)["grad_scaler"]
    );

    // Stop at 5 and resume on the emulated device: the same bits as the straight run.
    assert_resumes_bit_exactly(&emu, &resumed, |out, steps| {
        fp16_config(out, steps, "cuda-emu")
    });

    // The device's fp16 checkpoint resumes on the CPU (fp32 master weights, the same format),
    // and the CPU's goes on on the device.
    trainer::train::run(&fp16_config(&moved, 5, "cuda-emu"), true).unwrap();
    let r = trainer::train::run(&fp16_config(&moved, 8, "cpu"), true).unwrap();
    assert_eq!(r.resumed_from, Some(5));
    let r = trainer::train::run(&fp16_config(&moved, 10, "cuda-emu"), true).unwrap();
    assert_eq!(r.resumed_from, Some(8));
    let m = losses(&moved);
    assert_eq!(m.len(), 10);
    // Updates 6 to 8 ran on the CPU: the same bound as the CPU against the emulated GPU.
    assert_losses_agree(&b, &m, "straight vs moved between the devices");
    assert_eq!(
        state(&moved, 10)["grad_scaler"],
        state(&emu, 10)["grad_scaler"]
    );
}

#[test]
fn device_runs_that_cannot_work_fail_before_reading_data() {
    let tmp = tempfile::tempdir().unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/dvae-cpu.yaml");
    let sets = [
        "run.device=cuda-emu".to_string(),
        format!("run.out_dir={}", tmp.path().join("dvae").display()),
    ];
    let cfg = RunConfig::load(&path, &sets).unwrap();
    let e = format!("{:#}", trainer::train::run(&cfg, true).unwrap_err());
    assert!(e.contains("dVAE") && e.contains("cuda-emu"), "{e}");
}
