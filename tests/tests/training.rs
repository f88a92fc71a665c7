//! A short synthetic run learns, and learns what only attention between image tokens allows: the
//! image loss falls below the best that the caption and the position alone can give, and stays
//! above the floor that the data's noise sets for any causal model (a mask that lets a position
//! see the token it predicts goes below it).

use tessera_tests::small_run_yaml;
use trainer::config::RunConfig;

/// The least mean image cross-entropy of a predictor that sees the caption and the position but
/// no earlier image token, on the synthetic data at the sizes of `small_run_yaml` (exact, by
/// enumerating the generator: `python3 tools/synthetic_bounds.py`).
const CAPTION_ONLY_BOUND: f64 = 1.2468;
/// 5% of the image cells are uniform noise, independent of everything before them: no causal
/// model's expected image loss is below H(0.95·onehot + 0.05/24) (same script).
const NOISE_FLOOR: f64 = 0.3426;
/// What the run must reach: the bound less a margin (the mean of 10 batches of 16×16 image
/// predictions has a standard error near 0.03).
const IMAGE_TARGET: f64 = CAPTION_ONLY_BOUND - 0.1;

#[test]
fn short_synthetic_run_loss_falls_below_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let extra = "schedule:\n  kind: cosine\n  warmup_steps: 10\ncheckpoint:\n  every: 0\n";
    let yaml = small_run_yaml(&out, STEPS, extra)
        .replace("batch_size: 4", "batch_size: 16")
        .replace("lr: 3.0e-3", "lr: 6.0e-3");
    let cfg = RunConfig::from_yaml_str(&yaml, "test config").unwrap();
    let summary = trainer::train::run(&cfg, true).unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let series =
        |key: &str| -> Vec<f64> { rows.iter().map(|r| r[key].as_f64().unwrap()).collect() };
    let (losses, image) = (series("loss"), series("loss_image"));
    let first = losses[0];
    // Untrained, the loss is about (1/8)·ln(48) + (7/8)·ln(24) ≈ 3.26.
    assert!((first - 3.26).abs() < 0.3, "initial loss {first}");
    let tail = |v: &[f64]| v[v.len() - 10..].iter().sum::<f64>() / 10.0;
    let (last, last_image) = (tail(&losses), tail(&image));
    eprintln!(
        "loss: first {first:.3}, mean of the last 10 {last:.3} (image {last_image:.3}; \
         caption-only bound {CAPTION_ONLY_BOUND}, noise floor {NOISE_FLOOR})"
    );
    assert!(
        last < THRESHOLD,
        "mean loss of the last 10 updates {last} ≥ {THRESHOLD}"
    );
    assert!(
        last_image < IMAGE_TARGET,
        "mean image loss of the last 10 updates {last_image} ≥ {IMAGE_TARGET}: no better than a \
         model that sees only the caption and the position ({CAPTION_ONLY_BOUND})"
    );
    assert!(
        last_image > NOISE_FLOOR,
        "mean image loss of the last 10 updates {last_image} ≤ the noise floor {NOISE_FLOOR}: \
         the model sees the tokens it predicts (a leaking causal mask?)"
    );
    assert_eq!(summary.final_step, STEPS);
}

/// Updates (at lr 6e-3): enough for the image loss to pass the caption-only bound by the margin.
/// Measured: image loss 1.018 after 200 (at lr 3e-3 it was 1.255 after 150, just above the bound,
/// and 0.94 after 400).
const STEPS: u64 = 200;
/// The synthetic data's structure allows far below the untrained 3.26; 1.6 needs real learning
/// of both the captions and the caption-conditioned image layout.
const THRESHOLD: f64 = 1.6;
