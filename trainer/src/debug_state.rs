//! `trainer debug-state` (MODEL-SPEC.md §4): one forward and backward pass of the configured
//! model with given weights and batch, writing every result an outside implementation needs to
//! compare against: the three losses, the full logits and one gradient per parameter.
//! Also `trainer init-weights`, which writes fresh weights for such a check.

use crate::checkpoint::{self, TensorEntry};
use crate::config::RunConfig;
use crate::model::transformer::{Activations, Transformer};
use crate::train::{check_device, dims_of};
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Reads integer tensor `name` (i64 or i32) of shape [rows, cols] from a batch file as u32.
fn read_ids(st: &SafeTensors, path: &Path, name: &str, cols: usize) -> Result<(usize, Vec<u32>)> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
    let shape = t.shape();
    if shape.len() != 2 || shape[1] != cols {
        bail!(
            "{}: tensor `{name}` has shape {shape:?}, expected [B, {cols}]",
            path.display()
        );
    }
    let data = t.data();
    let ids: Vec<i64> = match t.dtype() {
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => bail!(
            "{}: tensor `{name}` has dtype {other:?}, expected I64 or I32",
            path.display()
        ),
    };
    let ids = ids
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            u32::try_from(v).map_err(|_| {
                anyhow::anyhow!(
                    "{}: `{name}`[{}, {}] = {v} is negative or too large",
                    path.display(),
                    i / cols,
                    i % cols
                )
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((shape[0], ids))
}

/// Runs the check and writes `out`.
pub fn run(cfg: &RunConfig, weights: &Path, batch: &Path, out: &Path) -> Result<()> {
    check_device(cfg)?;
    let model = Transformer::new(dims_of(cfg))?;
    let d = *model.dims();
    let mut params = vec![0.0f32; model.table().numel()];
    checkpoint::load_into(weights, model.table(), "", &mut params)?;
    let bytes = std::fs::read(batch).with_context(|| format!("reading {}", batch.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", batch.display()))?;
    let (bt, text) = read_ids(&st, batch, "text", d.text_len)?;
    let (bi, image) = read_ids(&st, batch, "image", d.image_tokens())?;
    if bt != bi || bt == 0 {
        bail!(
            "{}: `text` has {bt} rows and `image` {bi}; they must agree and be ≥ 1",
            batch.display()
        );
    }
    let mut acts = Activations::new(&model, bt);
    let losses = model
        .forward(&params, &mut acts, &text, &image, Some(1.0))
        .with_context(|| format!("forward pass on {}", batch.display()))?;
    let logits = model.full_logits(&params, &acts)?;
    let mut grads = vec![0.0f32; params.len()];
    model.backward(&params, &mut grads, &mut acts, &text, &image)?;

    let (l, lt, li) = (
        [losses.loss as f32],
        [losses.text as f32],
        [losses.image as f32],
    );
    let mut tensors = vec![
        TensorEntry {
            name: "loss".into(),
            shape: vec![1],
            data: &l,
        },
        TensorEntry {
            name: "loss_text".into(),
            shape: vec![1],
            data: &lt,
        },
        TensorEntry {
            name: "loss_image".into(),
            shape: vec![1],
            data: &li,
        },
        TensorEntry {
            name: "logits".into(),
            shape: vec![bt, d.seq_len(), d.vocab_total()],
            data: &logits,
        },
    ];
    tensors.extend(checkpoint::entries(model.table(), "grad.", &grads));
    checkpoint::write_tensors(out, &tensors)?;
    tracing::info!(
        loss = losses.loss,
        loss_text = losses.text,
        loss_image = losses.image,
        out = %out.display(),
        "debug state written"
    );
    Ok(())
}

/// `trainer init-weights`: the config's model, freshly initialised from `run.seed`.
pub fn init_weights(cfg: &RunConfig, out: &Path) -> Result<()> {
    let model = Transformer::new(dims_of(cfg))?;
    let params = model.init_params(cfg.run.seed);
    checkpoint::write_tensors(out, &checkpoint::entries(model.table(), "", &params))?;
    Ok(())
}
