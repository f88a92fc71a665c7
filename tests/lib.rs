//! Cross-crate integration tests of Tessera. The tests live under `tests/tests/`; this library
//! holds what they share: small run configs written the way a user writes them, and reading
//! a checkpoint's tensors back.

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

/// Every tensor of a safetensors file (f32, little-endian), sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
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
