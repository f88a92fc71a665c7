//! Cross-crate integration tests of Tessera. The tests live under `tests/tests/`; this library
//! holds what they share: small run configs written the way a user writes them.

use std::path::Path;

/// A small transformer run config as YAML (four layers, so every attention layout appears),
/// writing into `out_dir`. `extra` is appended verbatim (more sections, or none).
pub fn small_run_yaml(out_dir: &Path, steps: u64, extra: &str) -> String {
    format!(
        "run:
  name: test
  out_dir: {out}
  seed: 7
  device: cpu
model:
  text_len: 8
  text_vocab: 40
  grid: 4
  image_vocab: 24
  d_model: 32
  heads: 2
  layers: 4
  conv_kernel: 3
data:
  source: synthetic
  min_caption_tokens: 3
optim:
  lr: 3.0e-3
train:
  steps: {steps}
  batch_size: 4
  log_every: 1
{extra}",
        out = out_dir.display()
    )
}
