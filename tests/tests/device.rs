//! `trainer train` with `run.device: cuda-emu`: the transformer's and the dVAE's passes as the
//! CUDA kernels on the CPU emulator, through the whole training loop, against the CPU run (the
//! transformer in fp32 and in fp16, docs/model.md §5; the dVAE in fp32); resume on the emulated
//! device is bit-exact, and checkpoints move between the devices; a device that cannot run says
//! so before any data, the same way for both models.

use formats::image_shard::ImageShardWriter;
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

/// The files of the step-10 checkpoints of the `cpu` and `emu` runs hold the same tensors, each
/// within `tol` of the other element by element, and the device's step-10 weights differ from
/// its step-5 weights (its updates reached the checkpoints).
fn assert_checkpoints_agree(cpu: &Path, emu: &Path, files: &[&str], tol: f32) {
    let file = |out: &Path, step: u64, name: &str| {
        tensors(&out.join(format!("checkpoints/step_{step:08}/{name}")))
    };
    for name in files {
        let (w_cpu, w_emu) = (file(cpu, 10, name), file(emu, 10, name));
        assert_eq!(w_cpu.len(), w_emu.len(), "{name}: tensor counts");
        for ((tensor, x), (_, y)) in w_cpu.iter().zip(&w_emu) {
            let worst = x
                .iter()
                .zip(y)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < tol,
                "{name} {tensor}: emulated GPU and CPU differ by {worst}"
            );
        }
    }
    assert_ne!(
        file(emu, 10, "model.safetensors"),
        file(emu, 5, "model.safetensors"),
        "the device's updates reached the checkpoints"
    );
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
    assert_checkpoints_agree(&cpu, &emu, &["model.safetensors"], 1e-5);

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

/// PowerSGD with the gradient on the emulated device (`trainer::powersgd::DevicePowerSgd`: the
/// error feedback, the products, the orthonormalisation and the decompression on the device, only
/// the factors and the uncompressed tensors through the host) trains as the CPU's PowerSGD does,
/// checkpoints the same error buffers and Q, and resumes bit-exactly.
#[test]
fn powersgd_on_the_emulated_gpu_agrees_with_the_cpu_and_resumes_bit_exactly() {
    use trainer::powersgd::{CompressionKind, PowerSgdConfig};
    let cfg = |out: &Path, steps: u64, device: &str| {
        let mut c = config(out, steps, device);
        c.compression = PowerSgdConfig {
            kind: CompressionKind::Powersgd,
            rank: 2,
            min_compression_rate: 0.0,
            warm_start: true,
            start_step: 2,
            ..PowerSgdConfig::default()
        };
        c
    };
    let tmp = tempfile::tempdir().unwrap();
    let (cpu, emu, resumed) = (
        tmp.path().join("cpu"),
        tmp.path().join("emu"),
        tmp.path().join("resumed"),
    );
    trainer::train::run(&cfg(&cpu, 10, "cpu"), true).unwrap();
    trainer::train::run(&cfg(&emu, 10, "cuda-emu"), true).unwrap();
    let (mc, me) = (metrics(&cpu), metrics(&emu));
    assert_losses_agree(
        &losses(&cpu),
        &losses(&emu),
        "PowerSGD, emulated GPU vs CPU",
    );
    for t in 0..10 {
        // Updates 1–2 are plain (start_step 2), the rest compressed: the same traffic.
        assert_eq!(mc[t]["bytes_sent"], me[t]["bytes_sent"], "update {}", t + 1);
    }
    assert!(
        me[9]["bytes_sent"].as_f64().unwrap() < 0.5 * me[0]["bytes_sent"].as_f64().unwrap(),
        "the device run compressed: {} then {} bytes",
        me[0]["bytes_sent"],
        me[9]["bytes_sent"]
    );
    assert_checkpoints_agree(
        &cpu,
        &emu,
        &["model.safetensors", "powersgd.safetensors"],
        1e-5,
    );
    assert_resumes_bit_exactly(&emu, &resumed, |out, steps| cfg(out, steps, "cuda-emu"));
    let file = |out: &Path| fs::read(out.join("checkpoints/step_00000010/powersgd.safetensors"));
    assert!(
        file(&emu).unwrap() == file(&resumed).unwrap(),
        "powersgd.safetensors differs between the straight and the resumed run"
    );
}

/// 16 images of 16×16 pixels (smooth gradients and stripes, different in every image) in one
/// shard under `dir`.
fn write_images(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let res = 16usize;
    let mut w = ImageShardWriter::create(dir.join("images.tis"), res as u32, 4, 3).unwrap();
    for i in 0..16 {
        let px: Vec<u8> = (0..res * res * 3)
            .map(|j| {
                let (y, x, c) = (j / (3 * res), (j / 3) % res, j % 3);
                ((x * (3 + i) + y * (7 + c) * (i % 3 + 1) + 40 * c) % 256) as u8
            })
            .collect();
        w.push(&px, &format!("image {i}"), None).unwrap();
    }
    w.finish().unwrap();
}

/// A tiny dVAE (resolution 16, n_hid 8, K 16) on the images under `images`: 2 images × 2
/// micro-batches per update, τ and β moving over the ten updates, an EMA, checkpoints every 5.
fn dvae_config(out: &Path, images: &Path, steps: u64, device: &str) -> RunConfig {
    let yaml = format!(
        "run: {{ name: dvae, out_dir: {out}, seed: 7, device: {device} }}
model: {{ kind: dvae, resolution: 16, n_hid: 8, n_blk_per_group: 1, vocab_size: 16, n_init: 8 }}
relaxation: {{ tau_start: 1.0, tau_end: 0.25, tau_steps: 10, beta_start: 0.0, beta_end: 1.0, beta_steps: 10 }}
data: {{ source: images, paths: [\"{images}/*.tis\"] }}
optim: {{ lr: 3.0e-3, ema: 0.9 }}
train: {{ steps: {steps}, batch_size: 2, grad_accum: 2, log_every: 1 }}
checkpoint: {{ every: 5, keep_last: 5 }}
",
        out = out.display(),
        images = images.display(),
    );
    RunConfig::from_yaml_str(&yaml, "test config").unwrap()
}

#[test]
fn the_dvae_on_the_emulated_gpu_agrees_with_the_cpu_resumes_bit_exactly_and_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let [cpu, emu, resumed, moved] = ["cpu", "emu", "resumed", "moved"].map(|d| tmp.path().join(d));
    let cfg = |out: &Path, steps: u64, device: &str| dvae_config(out, &images, steps, device);
    trainer::train::run(&cfg(&cpu, 10, "cpu"), true).unwrap();
    trainer::train::run(&cfg(&emu, 10, "cuda-emu"), true).unwrap();
    let (a, b) = (losses(&cpu), losses(&emu));
    assert_eq!(a.len(), 10);
    // (Ten updates of different images and noise do not make a falling loss; a device that
    // skipped its updates shows as a disagreement from update 2 on, and in the checkpoints.)
    assert_losses_agree(&a, &b, "dVAE, emulated GPU vs CPU");
    // The metrics read back from the device (codes, reconstructions) are the CPU's. The KL per
    // position is a small difference of terms about ln K = 2.8 that the device sums in f32:
    // an absolute bound, 1e-5 (ten times f32's rounding of those terms).
    let (mc, me) = (metrics(&cpu), metrics(&emu));
    for t in 0..10 {
        for (key, rel, abs) in [
            ("codebook_perplexity", 1e-4, 0.0),
            ("recon_mse", 1e-4, 0.0),
            ("nll", 1e-4, 0.0),
            ("kl", 0.0, 1e-5),
        ] {
            let (x, y) = (mc[t][key].as_f64().unwrap(), me[t][key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= abs + rel * x.abs(),
                "update {} {key}: CPU {x}, emulated GPU {y}",
                t + 1
            );
        }
    }
    // The device's weights and EMA reach the checkpoints (downloaded for them), as the CPU's.
    assert_checkpoints_agree(&cpu, &emu, &["model.safetensors", "ema.safetensors"], 1e-4);

    assert_resumes_bit_exactly(&emu, &resumed, |out, steps| cfg(out, steps, "cuda-emu"));

    // The device's checkpoint resumes on the CPU, and the CPU's goes on on the device.
    trainer::train::run(&cfg(&moved, 5, "cuda-emu"), true).unwrap();
    let r = trainer::train::run(&cfg(&moved, 8, "cpu"), true).unwrap();
    assert_eq!(r.resumed_from, Some(5));
    let r = trainer::train::run(&cfg(&moved, 10, "cuda-emu"), true).unwrap();
    assert_eq!(r.resumed_from, Some(8));
    let m = losses(&moved);
    assert_eq!(m.len(), 10);
    assert_losses_agree(&b, &m, "dVAE, straight vs moved between the devices");
}

/// The CPU recipe of configs/dvae-cpu.yaml on the emulated device: the batch KL (its CUDA
/// kernels), the logit-Gaussian likelihood, unit-gain branches (per-tensor learning rates in the
/// device's AdamW) and the decoder input gain: ten updates as on the CPU. (Resume holds no
/// state of the batch KL's: q̄ is each micro-batch's own; the test above covers it.)
#[test]
fn the_batch_kl_recipe_on_the_emulated_gpu_agrees_with_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    write_images(&images);
    let [cpu, emu] = ["cpu", "emu"].map(|d| tmp.path().join(d));
    let cfg = |out: &Path, steps: u64, device: &str| {
        let mut c = dvae_config(out, &images, steps, device);
        let r = c
            .relaxation
            .as_mut()
            .expect("the config has a relaxation section");
        r.kl = trainer::config::KlTerm::Batch;
        r.likelihood = trainer::config::Likelihood::LogitGaussian;
        r.branch_gain = trainer::model::dvae::BranchGain::Unit;
        r.decoder_input_gain = 4.0;
        c
    };
    trainer::train::run(&cfg(&cpu, 10, "cpu"), true).unwrap();
    trainer::train::run(&cfg(&emu, 10, "cuda-emu"), true).unwrap();
    let (a, b) = (losses(&cpu), losses(&emu));
    assert_eq!(a.len(), 10);
    assert_losses_agree(&a, &b, "batch-KL dVAE, emulated GPU vs CPU");
    // The batch KL is N·KL(q̄ ‖ uniform): its per-update values agree as the loss does.
    let (mc, me) = (metrics(&cpu), metrics(&emu));
    for t in 0..10 {
        let (x, y) = (mc[t]["kl"].as_f64().unwrap(), me[t]["kl"].as_f64().unwrap());
        assert!(
            (x - y).abs() <= 1e-5 + 1e-4 * x.abs(),
            "update {} kl: CPU {x}, emulated GPU {y}",
            t + 1
        );
    }
    assert_checkpoints_agree(&cpu, &emu, &["model.safetensors", "ema.safetensors"], 1e-4);
}

/// `run.device: cuda` on a machine without a usable GPU: the dVAE fails before any data is read
/// (its shards, relative to `configs/dvae-cpu.yaml`'s working directory, do not exist here) with
/// the transformer's error, naming what is missing.
#[test]
fn device_runs_that_cannot_work_fail_before_reading_data() {
    let tmp = tempfile::tempdir().unwrap();
    let transformer = config(&tmp.path().join("t"), 2, "cuda");
    let te = format!("{:#}", trainer::train::run(&transformer, true).unwrap_err());
    if !te.starts_with("run.device = cuda") {
        eprintln!("a GPU is usable here ({te}): the missing-GPU error is not checked");
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/dvae-cpu.yaml");
    let sets = [
        "run.device=cuda".to_string(),
        format!("run.out_dir={}", tmp.path().join("dvae").display()),
    ];
    let cfg = RunConfig::load(&path, &sets).unwrap();
    let e = format!("{:#}", trainer::train::run(&cfg, true).unwrap_err());
    assert_eq!(e, te, "the dVAE's error is the transformer's");
    assert!(!tmp.path().join("dvae").exists(), "nothing was written");
}
