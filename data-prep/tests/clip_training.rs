//! CLIP end to end on `data-prep synth` images: `synth` → `ingest` → `tokenizer train` →
//! `trainer train` with a `model.kind: clip` config. A short run learns to match captions to
//! images (caption → image top-1 accuracy within batches of 32 well above chance, 1/32), keeps
//! `logit_scale` in its clamp, a stopped and resumed run writes the same checkpoint files byte
//! for byte as a straight one, and shards of another size than the vision tower's are refused.

use std::path::{Path, PathBuf};

use support::{data_prep, mean, metrics, ok};
use trainer::config::RunConfig;

mod support;

/// Updates of the learning run (about 15 s in the test profile on two cores).
const STEPS: u64 = 2000;
/// The caption → image top-1 accuracy in batches of 32 that the last 20 updates must beat on
/// average: 0.4, about 13× chance (1/32 ≈ 0.031). Measured: 0.028 over the first 10 updates,
/// 0.66 over the last 20 (loss 3.47 → 0.88).
const THRESHOLD: f64 = 0.4;

/// `count` synthetic 64×64 captioned images in shards, and a BPE tokenizer of their captions:
/// (shard folder, tokenizer.json).
fn synth_data(dir: &Path, count: usize) -> (PathBuf, PathBuf) {
    let files = dir.join("files");
    let shards = dir.join("shards");
    let tok = dir.join("tokenizer.json");
    let (f, s, t) = (
        files.to_str().unwrap(),
        shards.to_str().unwrap(),
        tok.to_str().unwrap(),
    );
    let n = count.to_string();
    ok(data_prep(&[
        "synth",
        "--count",
        &n,
        "--resolution",
        "64",
        "--seed",
        "5",
        "--out",
        f,
        "--quiet",
    ]));
    ok(data_prep(&[
        "ingest",
        "--input",
        f,
        "--out",
        s,
        "--resolution",
        "64",
        "--shard-size",
        "256",
        "--chunk-records",
        "32",
        "--quiet",
    ]));
    ok(data_prep(&[
        "tokenizer",
        "train",
        "--input",
        f,
        "--vocab-size",
        "400",
        "--out",
        t,
    ]));
    (shards, tok)
}

fn clip_yaml(out: &Path, shards: &Path, tok: &Path, steps: u64, extra: &str) -> String {
    format!(
        "run:
  name: clip-test
  out_dir: {out}
  seed: 21
  device: cpu
model:
  kind: clip
  projection_dim: 32
  text_config:
    vocab_size: 402
    hidden_size: 32
    intermediate_size: 64
    num_attention_heads: 2
    num_hidden_layers: 1
    max_position_embeddings: 12
    eos_token_id: 401
    hidden_act: quick_gelu
  vision_config:
    hidden_size: 32
    intermediate_size: 64
    num_attention_heads: 2
    num_hidden_layers: 1
    image_size: 64
    patch_size: 16
    hidden_act: quick_gelu
data:
  source: images
  paths: [\"{shards}/*.tis\"]
  tokenizer: {tok}
optim:
  lr: 2.0e-3
  beta2: 0.98
  eps: 1.0e-6
  weight_decay: 0.1
  grad_clip: 1.0
  ema: 0.999
train:
  steps: {steps}
  batch_size: 32
  log_every: 1
{extra}",
        out = out.display(),
        shards = shards.display(),
        tok = tok.display(),
    )
}

#[test]
fn short_clip_run_retrieves_captions_far_above_chance() {
    let tmp = tempfile::tempdir().unwrap();
    let (shards, tok) = synth_data(tmp.path(), 512);
    let out = tmp.path().join("run");
    let steps = STEPS;
    let extra = "checkpoint:\n  every: 0\n";
    let cfg = RunConfig::from_yaml_str(&clip_yaml(&out, &shards, &tok, steps, extra), "t").unwrap();
    let summary = trainer::train::run(&cfg, true).unwrap();
    assert_eq!(summary.final_step, steps);
    let rows = metrics(&out);
    assert_eq!(rows.len(), steps as usize);
    for r in &rows {
        assert!(r["loss"].as_f64().unwrap().is_finite(), "{r}");
        let s = r["logit_scale"].as_f64().unwrap();
        assert!(
            (0.0..=4.605_170_2).contains(&s),
            "logit_scale out of its clamp: {r}"
        );
    }
    let (head, tail) = (&rows[..10], &rows[rows.len() - 20..]);
    let (acc0, acc1) = (mean(head, "retrieval_top1"), mean(tail, "retrieval_top1"));
    let (loss0, loss1) = (mean(head, "loss"), mean(tail, "loss"));
    let chance = 1.0 / 32.0;
    eprintln!(
        "caption → image top-1 in batches of 32: {acc0:.3} → {acc1:.3} (chance {chance:.3}); \
         loss {loss0:.3} → {loss1:.3}"
    );
    assert!(
        acc1 > THRESHOLD,
        "mean caption → image top-1 of the last 20 updates {acc1:.3} ≤ {THRESHOLD} (chance \
         {chance:.3}, first 10 updates {acc0:.3})"
    );
    assert!(loss1 < loss0, "loss {loss0:.3} → {loss1:.3}");
}

#[test]
fn clip_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (shards, tok) = synth_data(tmp.path(), 96);
    let extra = "checkpoint:\n  every: 3\n  keep_last: 5\n";
    let cfg = |out: &Path, steps: u64| {
        let yaml = clip_yaml(out, &shards, &tok, steps, extra)
            .replace("batch_size: 32", "batch_size: 8\n  grad_accum: 2");
        RunConfig::from_yaml_str(&yaml, "t").unwrap()
    };
    support::assert_resume_is_bit_exact(tmp.path(), cfg);

    // 64×64 shards for a 32×32 vision tower: refused before any checkpoint, naming the file and
    // both sizes.
    let out = tmp.path().join("c");
    let yaml = clip_yaml(&out, &shards, &tok, 2, "").replace("image_size: 64", "image_size: 32");
    let e = format!(
        "{:#}",
        trainer::train::run(&RunConfig::from_yaml_str(&yaml, "t").unwrap(), true).unwrap_err()
    );
    assert!(
        e.contains("images-00000.tis") && e.contains("resolution is 64×64, expected 32×32"),
        "{e}"
    );
    assert!(trainer::checkpoint::latest_complete(&out)
        .unwrap()
        .is_none());
}
