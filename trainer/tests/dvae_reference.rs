//! The cross-implementation check of the stage-1 dVAE (docs/model.md §2): one forward and backward
//! pass of `Dvae` on a tiny model, against the independent NumPy reference
//! `tools/reference_dvae.py` (logits, decoder stats, loss terms and sampled gradient entries).
//!
//! The reference needs `python3` with numpy and safetensors (`tools/requirements.txt`). Without
//! them the check is skipped with a note on stderr, except under CI (`CI` set), where it fails.

mod support;

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trainer::checkpoint::{entries, write_tensors, TensorEntry};
use trainer::config::{KlTerm, Likelihood};
use trainer::model::dvae::{Dvae, DvaeDims};
use trainer::params::ParamKind;

const BATCH: usize = 2;
const TAU: f32 = 0.7;
const BETA: f32 = 0.5;

fn entry<'a>(name: &str, shape: &[usize], data: &'a [f32]) -> TensorEntry<'a> {
    TensorEntry {
        name: name.to_string(),
        shape: shape.to_vec(),
        data,
    }
}

/// The name of `l` in a config and in the reference's `--likelihood`.
fn name_of(l: Likelihood) -> &'static str {
    match l {
        Likelihood::LogitLaplace => "logit-laplace",
        Likelihood::LogitGaussian => "logit-gaussian",
    }
}

fn check(n_blk_per_group: usize, seed: u64, likelihood: Likelihood) {
    check_with(n_blk_per_group, seed, likelihood, KlTerm::Position);
}

fn check_with(n_blk_per_group: usize, seed: u64, likelihood: Likelihood, kl_term: KlTerm) {
    if !support::python_ready("the NumPy dVAE reference check") {
        return;
    }
    let dims = DvaeDims {
        resolution: 16,
        n_hid: 8,
        n_blk_per_group,
        vocab_size: 6,
        n_init: 4,
    };
    let dvae = Dvae::new(dims)
        .unwrap()
        .with_likelihood(likelihood)
        .with_kl_term(kl_term);
    let table = dvae.table();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd7ae);

    // Weights: PyTorch-style init, then every bias moved by U(±0.2), so that no bias is zero.
    let mut params = dvae.init_params(seed);
    for spec in table.specs() {
        if spec.kind == ParamKind::Bias {
            for x in &mut params[spec.range()] {
                *x += rng.random_range(-0.2f32..0.2);
            }
        }
    }

    // Inputs: images in [0, 1), Gumbel noise −ln(−ln u).
    let (res, k, g) = (dims.resolution, dims.vocab_size, dims.grid());
    let images: Vec<f32> = (0..BATCH * 3 * res * res)
        .map(|_| rng.random::<f32>())
        .collect();
    let noise: Vec<f32> = (0..BATCH * k * g * g)
        .map(|_| {
            let u = rng.random_range(1e-6f32..1.0 - 1e-6);
            -(-u.ln()).ln()
        })
        .collect();

    let mut acts = dvae.new_acts(BATCH);
    let losses = dvae
        .forward(&params, &mut acts, &images, Some(&noise), TAU, BETA)
        .unwrap();
    let mut grads = vec![0.0f32; table.numel()];
    dvae.backward(&params, &mut grads, &mut acts, 1.0).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("weights.safetensors");
    let inputs = dir.path().join("inputs.safetensors");
    let outputs = dir.path().join("outputs.safetensors");
    write_tensors(&weights, &entries(table, "", &params)).unwrap();
    let (tau, beta) = ([TAU], [BETA]);
    write_tensors(
        &inputs,
        &[
            entry("images", &[BATCH, 3, res, res], &images),
            entry("noise", &[BATCH, k, g, g], &noise),
            entry("tau", &[1], &tau),
            entry("beta", &[1], &beta),
        ],
    )
    .unwrap();
    let (loss, nll, kl) = (
        [losses.loss as f32],
        [losses.nll as f32],
        [losses.kl as f32],
    );
    let mut outs = vec![
        entry("logits", &[BATCH, k, g, g], acts.logits()),
        entry("stats", &[BATCH, 6, res, res], acts.stats()),
        entry("loss", &[1], &loss),
        entry("nll", &[1], &nll),
        entry("kl", &[1], &kl),
    ];
    outs.extend(entries(table, "grad.", &grads));
    write_tensors(&outputs, &outs).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference_dvae.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--weights".as_ref(), weights.as_os_str()])
        .args(["--inputs".as_ref(), inputs.as_os_str()])
        .args(["--outputs".as_ref(), outputs.as_os_str()])
        .args(["--n-blk-per-group", &n_blk_per_group.to_string()])
        .args(["--likelihood", name_of(likelihood)])
        .args([
            "--kl",
            if kl_term == KlTerm::Batch {
                "batch"
            } else {
                "position"
            },
        ])
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the NumPy dVAE reference disagrees with Dvae (n_blk_per_group {n_blk_per_group}, \
         {likelihood:?}, {kl_term:?}): \
         status {}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dvae_matches_numpy_reference_one_block_per_group() {
    check(1, 3, Likelihood::LogitLaplace);
}

#[test]
fn dvae_matches_numpy_reference_two_blocks_per_group() {
    check(2, 4, Likelihood::LogitLaplace);
}

#[test]
fn dvae_matches_numpy_reference_gaussian_likelihood() {
    check(1, 5, Likelihood::LogitGaussian);
}

#[test]
fn dvae_matches_numpy_reference_batch_kl() {
    check_with(1, 6, Likelihood::LogitGaussian, KlTerm::Batch);
}

/// `trainer init-weights` and `trainer debug-state` for a `model.kind: dvae` config, end to end
/// through the binary (docs/model.md §4: batch keys `images`, `tau`, `beta`; outputs
/// `encoder_logits`, `decoder_stats` without Gumbel noise, `loss`, `grad.<name>`), against the
/// same NumPy reference; `relaxation.likelihood` reaches the loss.
fn debug_state_cli(likelihood: Likelihood) {
    if !support::python_ready("the NumPy dVAE debug-state check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(
        p("dvae.yaml"),
        format!(
            "run: {{name: d, out_dir: {}, seed: 5}}
model: {{kind: dvae, resolution: 16, n_hid: 8, n_blk_per_group: 1, vocab_size: 6, n_init: 4}}
data: {{source: images, paths: [unused.tis]}}
train: {{steps: 1, batch_size: 2}}
relaxation: {{likelihood: {}}}
",
            p("run").display(),
            name_of(likelihood)
        ),
    )
    .unwrap();
    let run = support::trainer_ok;
    let (cfg, w, batch, state) = (
        p("dvae.yaml"),
        p("w.safetensors"),
        p("b.safetensors"),
        p("s.safetensors"),
    );
    run(&[
        "init-weights".as_ref(),
        "--config".as_ref(),
        &cfg,
        "--out".as_ref(),
        &w,
    ]);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let images: Vec<f32> = (0..2 * 3 * 16 * 16).map(|_| rng.random::<f32>()).collect();
    let (tau, beta) = ([0.8f32], [1.5f32]);
    write_tensors(
        &batch,
        &[
            entry("images", &[2, 3, 16, 16], &images),
            entry("tau", &[1], &tau),
            entry("beta", &[1], &beta),
        ],
    )
    .unwrap();
    run(&[
        "debug-state".as_ref(),
        "--config".as_ref(),
        &cfg,
        "--weights".as_ref(),
        &w,
        "--batch".as_ref(),
        &batch,
        "--out".as_ref(),
        &state,
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/reference_dvae.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(["--weights".as_ref(), w.as_os_str()])
        .args(["--inputs".as_ref(), batch.as_os_str()])
        .args(["--outputs".as_ref(), state.as_os_str()])
        .args(["--n-blk-per-group", "1"])
        .args(["--likelihood", name_of(likelihood)])
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the NumPy reference disagrees with `trainer debug-state`: {}\n--- stdout\n{stdout}\n\
         --- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // A batch of the wrong resolution is refused naming the tensor and the expected shape.
    write_tensors(&batch, &[entry("images", &[2, 3, 8, 8], &images[..384])]).unwrap();
    let out = support::trainer_command()
        .args(["debug-state".as_ref(), "--config".as_ref(), cfg.as_os_str()])
        .args(["--weights".as_ref(), w.as_os_str()])
        .args(["--batch".as_ref(), batch.as_os_str()])
        .args(["--out".as_ref(), state.as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("`images` has shape [2, 3, 8, 8], expected [B ≥ 1, 3, 16, 16]"),
        "{err}"
    );
}

#[test]
fn dvae_debug_state_cli_matches_numpy_reference() {
    debug_state_cli(Likelihood::LogitLaplace);
}

#[test]
fn dvae_debug_state_cli_matches_numpy_reference_gaussian_likelihood() {
    debug_state_cli(Likelihood::LogitGaussian);
}
