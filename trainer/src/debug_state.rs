//! `trainer debug-state` (docs/model.md §4): one forward and backward pass of the configured
//! model with given weights and batch, writing every result an outside implementation needs to
//! compare against. The transformer: the three losses, the full logits and one gradient per
//! parameter. The dVAE: encoder logits, decoder statistics (decoder applied to softmax(logits/τ),
//! no Gumbel noise), the loss and its two terms, one gradient per parameter.
//! CLIP: the normalised text and image embeddings, `logits_per_image`, the InfoNCE loss, one
//! gradient per parameter.
//! Also `trainer init-weights`, which writes fresh weights for such a check (for CLIP, with the
//! `config.json` of a Hugging Face directory beside them).

use crate::checkpoint::{self, TensorEntry};
use crate::config::RunConfig;
use crate::model::clip::{Activations as ClipActivations, Clip, ClipDims};
use crate::model::dvae::Dvae;
use crate::model::transformer::{Activations, Transformer};
use crate::params::ParamTable;
use crate::train::check_device;
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

/// Reads f32 tensor `name` of a batch file, checking its shape with `check` (which returns the
/// expected shape as text when the shape is wrong).
fn read_f32(
    st: &SafeTensors,
    path: &Path,
    name: &str,
    check: impl Fn(&[usize]) -> Option<String>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
    if t.dtype() != Dtype::F32 {
        bail!(
            "{}: tensor `{name}` has dtype {:?}, expected F32",
            path.display(),
            t.dtype()
        );
    }
    if let Some(expected) = check(t.shape()) {
        bail!(
            "{}: tensor `{name}` has shape {:?}, expected {expected}",
            path.display(),
            t.shape()
        );
    }
    let data = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    Ok((t.shape().to_vec(), data))
}

/// One named output tensor.
fn entry<'a>(name: &str, shape: Vec<usize>, data: &'a [f32]) -> TensorEntry<'a> {
    TensorEntry {
        name: name.into(),
        shape,
        data,
    }
}

/// The weights of `table` from `weights`, and the raw bytes of the batch file (parse them with
/// `SafeTensors::deserialize`, which borrows them).
fn load_inputs(table: &ParamTable, weights: &Path, batch: &Path) -> Result<(Vec<f32>, Vec<u8>)> {
    let mut params = vec![0.0f32; table.numel()];
    checkpoint::load_weights(weights, table, &mut params)?;
    let bytes = std::fs::read(batch).with_context(|| format!("reading {}", batch.display()))?;
    Ok((params, bytes))
}

/// The batch file parsed, or an error naming it.
fn parse_batch<'a>(bytes: &'a [u8], batch: &Path) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes)
        .with_context(|| format!("{}: not a valid safetensors file", batch.display()))
}

/// Writes `tensors` then `grad.<name>` for every parameter of `table` to `out`.
fn write_state<'a>(
    out: &Path,
    mut tensors: Vec<TensorEntry<'a>>,
    table: &ParamTable,
    grads: &'a [f32],
) -> Result<()> {
    tensors.extend(checkpoint::entries(table, "grad.", grads));
    checkpoint::write_tensors(out, &tensors)?;
    Ok(())
}

/// Runs the check of the config's model and writes `out`.
pub fn run(cfg: &RunConfig, weights: &Path, batch: &Path, out: &Path) -> Result<()> {
    check_device(cfg)?;
    if cfg.model.dvae().is_some() {
        run_dvae(cfg, weights, batch, out)
    } else if let Some(c) = cfg.model.clip() {
        run_clip(*c, weights, batch, out)
    } else {
        run_transformer(cfg, weights, batch, out)
    }
}

/// The dVAE's check: batch keys `images` [B, 3, H, W] in [0, 1], `tau` [1], `beta` [1].
fn run_dvae(cfg: &RunConfig, weights: &Path, batch: &Path, out: &Path) -> Result<()> {
    let model = cfg.relaxation().configure(Dvae::new(*cfg.dvae()?)?);
    let d = *model.dims();
    let (params, bytes) = load_inputs(model.table(), weights, batch)?;
    let st = parse_batch(&bytes, batch)?;
    let r = d.resolution;
    let (shape, images) = read_f32(&st, batch, "images", |s| {
        (s.len() != 4 || s[0] == 0 || s[1] != 3 || s[2] != r || s[3] != r)
            .then(|| format!("[B ≥ 1, 3, {r}, {r}] (model.resolution = {r})"))
    })?;
    let scalar = |s: &[usize]| (s != [1]).then(|| "[1]".to_string());
    let (_, tau) = read_f32(&st, batch, "tau", scalar)?;
    let (_, beta) = read_f32(&st, batch, "beta", scalar)?;
    let b = shape[0];
    let mut acts = model.new_acts(b);
    let losses = model
        .forward(&params, &mut acts, &images, None, tau[0], beta[0])
        .with_context(|| format!("forward pass on {}", batch.display()))?;
    let mut grads = vec![0.0f32; params.len()];
    model.backward(&params, &mut grads, &mut acts, 1.0)?;
    let g = d.grid();
    let (l, nll, kl) = (
        [losses.loss as f32],
        [losses.nll as f32],
        [losses.kl as f32],
    );
    let tensors = vec![
        entry("loss", vec![1], &l),
        entry("nll", vec![1], &nll),
        entry("kl", vec![1], &kl),
        entry("encoder_logits", vec![b, d.vocab_size, g, g], acts.logits()),
        entry("decoder_stats", vec![b, 6, r, r], acts.stats()),
    ];
    write_state(out, tensors, model.table(), &grads)?;
    tracing::info!(
        loss = losses.loss,
        nll = losses.nll,
        kl = losses.kl,
        out = %out.display(),
        "debug state written"
    );
    Ok(())
}

/// CLIP's check: batch keys `input_ids` [B, S] (S ≤ `max_position_embeddings`, each row
/// holding the end token) and `pixel_values` [B, C, H, W] (already normalised); outputs
/// `text_embeds`, `image_embeds` [B, D] (normalised), `logits_per_image` [B, B], `loss` [1] and
/// `grad.<name>` (docs/model.md §4).
fn run_clip(dims: ClipDims, weights: &Path, batch: &Path, out: &Path) -> Result<()> {
    let model = Clip::new(dims)?;
    let (params, bytes) = load_inputs(model.table(), weights, batch)?;
    let st = parse_batch(&bytes, batch)?;
    let s = match st.tensor("input_ids").map(|t| t.shape().to_vec()) {
        Ok(shape) if shape.len() == 2 => shape[1],
        Ok(shape) => bail!(
            "{}: tensor `input_ids` has shape {shape:?}, expected [B, S]",
            batch.display()
        ),
        Err(_) => bail!("{}: no tensor `input_ids`", batch.display()),
    };
    let (b, ids) = read_ids(&st, batch, "input_ids", s)?;
    let v = &dims.vision_config;
    let (ch, r) = (v.num_channels, v.image_size);
    let (_, pixels) = read_f32(&st, batch, "pixel_values", |sh| {
        (sh.len() != 4 || sh[0] != b || sh[1] != ch || sh[2] != r || sh[3] != r).then(|| {
            format!("[B = {b} (the rows of input_ids), {ch}, {r}, {r}] (model.vision_config)")
        })
    })?;
    if b == 0 {
        bail!("{}: the batch is empty", batch.display());
    }
    let mut acts = ClipActivations::new(&model, b, s)
        .with_context(|| format!("{}: tensor `input_ids`", batch.display()))?;
    let loss = model
        .forward(&params, &mut acts, &ids, &pixels)
        .with_context(|| format!("forward pass on {}", batch.display()))?;
    let mut grads = vec![0.0f32; params.len()];
    model.backward(&params, &mut grads, &mut acts)?;
    let dp = dims.projection_dim;
    let l = [loss];
    let tensors = vec![
        entry("text_embeds", vec![b, dp], &acts.text_embeds),
        entry("image_embeds", vec![b, dp], &acts.image_embeds),
        entry("logits_per_image", vec![b, b], &acts.logits_per_image),
        entry("loss", vec![1], &l),
    ];
    write_state(out, tensors, model.table(), &grads)?;
    tracing::info!(loss, out = %out.display(), "debug state written");
    Ok(())
}

/// The transformer's check: batch keys `text` [B, Tt], `image` [B, G²].
fn run_transformer(cfg: &RunConfig, weights: &Path, batch: &Path, out: &Path) -> Result<()> {
    let model = Transformer::new(*cfg.transformer()?)?;
    let d = *model.dims();
    let (params, bytes) = load_inputs(model.table(), weights, batch)?;
    let st = parse_batch(&bytes, batch)?;
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
    let tensors = vec![
        entry("loss", vec![1], &l),
        entry("loss_text", vec![1], &lt),
        entry("loss_image", vec![1], &li),
        entry("logits", vec![bt, d.seq_len(), d.vocab_total()], &logits),
    ];
    write_state(out, tensors, model.table(), &grads)?;
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
    // Fresh weights even when the config starts its runs from others (`train.init`).
    let mut fresh = cfg.clone();
    (fresh.train.init, fresh.train.init_ema) = (None, false);
    let (table, params) = crate::train::objectives::model_table(&fresh, true)?;
    let params = params.expect("model_table(init = true) draws weights");
    checkpoint::write_tensors(out, &checkpoint::entries(&table, "", &params))?;
    if let Some(c) = cfg.model.clip() {
        // Beside the weights, the config.json that makes the directory a Hugging Face CLIP one.
        let dir = out.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        crate::model::clip::hf::write_config(
            &dir.join("config.json"),
            c,
            crate::model::clip::hf::DEFAULT_LOGIT_SCALE_INIT,
        )?;
    }
    Ok(())
}
