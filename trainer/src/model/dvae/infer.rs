//! Inference with a trained dVAE (Tessera's or OpenAI's released one): finding and checking its
//! weights, and the two maps stage 2 needs (docs/model.md §2):
//!
//! - [`Dvae::encode`]: images → codes, the argmax over K of the encoder's logits (no noise);
//! - [`Dvae::decode_codes`]: codes → images, the decoder on one-hot codes, then
//!   clamp((sigmoid(μ) − ε)/(1 − 2ε), 0, 1).
//!
//! Both run the networks layer by layer through the same [`Net::layer_forward`] as training, but
//! keep only the current layer's input and output ([`Net::infer`]): a 256 px image through
//! OpenAI's encoder costs about 0.45 GB (activations and the convolutions' im2col buffers)
//! instead of the 0.8 GB that a training forward keeps for the encoder's backward pass.
//! The convolutions run the images of a batch in parallel (rayon), and each image's result does
//! not depend on the batch it is in.
//!
//! Weights ([`DvaeWeights`]): a safetensors file, a checkpoint directory (its `model.safetensors`,
//! or `ema.safetensors`), or a run directory (its newest complete checkpoint). The sizes are read
//! from the tensor shapes ([`DvaeDims::infer`]; only the resolution is not in the weights), then
//! every tensor is checked against [`Dvae::table`] of those sizes: a missing, unexpected,
//! misshapen or non-f32 tensor is an error naming the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{relu_lens, squash, Dvae, DvaeDims, ModelError, Net, Result, Shape};
use crate::checkpoint::{self, CheckpointError, DONE_FILE, EMA_FILE, MODEL_FILE};
use formats::image_shard::{ImageShard, CHANNELS};

/// Largest safetensors header read when inferring sizes (the header of OpenAI's dVAE is ~20 kB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// What can go wrong finding, reading or checking dVAE weights. Every variant names the path, and
/// the tensor where there is one.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Io(#[from] formats::fsutil::FsError),
    #[error("{path}: not a safetensors file: {message}")]
    NotSafetensors { path: PathBuf, message: String },
    #[error("{path}: missing tensor '{name}' (needed to infer the dVAE's {what})")]
    Missing {
        path: PathBuf,
        name: String,
        what: &'static str,
    },
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: the tensor shapes give dVAE sizes that are not valid: {source}")]
    Dims {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "{path} is not dVAE weights: expected a safetensors file, a checkpoint directory (with \
         {DONE_FILE}) or a run directory (with checkpoints/)"
    )]
    NotWeights { path: PathBuf },
    #[error("run directory {path} has no complete checkpoint (no checkpoints/step_*/{DONE_FILE})")]
    NoCheckpoint { path: PathBuf },
    #[error(
        "--ema reads {EMA_FILE} of a checkpoint or run directory, but {path} is a file; pass the \
         directory, or drop --ema"
    )]
    EmaOfFile { path: PathBuf },
}

type WResult<T> = std::result::Result<T, WeightsError>;

/// Where the weights of `source` are: `source` itself if it is a file; `model.safetensors` (with
/// `ema`, `ema.safetensors`) of a complete checkpoint directory; or that file of the newest
/// complete checkpoint of a run directory. A checkpoint directory without `DONE` is refused.
pub fn resolve_weights(source: &Path, ema: bool) -> WResult<PathBuf> {
    let file = if ema { EMA_FILE } else { MODEL_FILE };
    if source.is_file() {
        return match ema {
            true => Err(WeightsError::EmaOfFile {
                path: source.to_path_buf(),
            }),
            false => Ok(source.to_path_buf()),
        };
    }
    if !source.is_dir() {
        return Err(WeightsError::Io(formats::fsutil::FsError {
            action: "open",
            path: source.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        }));
    }
    // A checkpoint directory, complete or not (an incomplete one is refused by name).
    if source.join(DONE_FILE).exists()
        || source.join(MODEL_FILE).exists()
        || checkpoint::parse_step_dir_name(&dir_name(source)).is_some()
    {
        let dir = checkpoint::load_checked(source)?;
        // Verified against the checkpoint's manifest before anything reads it.
        dir.verify_file(file)?;
        return Ok(dir.path().join(file));
    }
    if checkpoint::checkpoints_dir(source).is_dir() {
        return match checkpoint::latest_complete(source)? {
            Some(dir) => {
                checkpoint::load_checked(&dir)?.verify_file(file)?;
                Ok(dir.join(file))
            }
            None => Err(WeightsError::NoCheckpoint {
                path: source.to_path_buf(),
            }),
        };
    }
    Err(WeightsError::NotWeights {
        path: source.to_path_buf(),
    })
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The name → shape map of a safetensors file, from its header alone (the tensor data is not
/// read).
pub fn tensor_shapes(path: &Path) -> WResult<HashMap<String, Vec<usize>>> {
    let io = |action| {
        let fs_err = formats::fsutil::fs_err(action, path);
        move |source| WeightsError::Io(fs_err(source))
    };
    let bad = |message: String| WeightsError::NotSafetensors {
        path: path.to_path_buf(),
        message,
    };
    let mut f = File::open(path).map_err(io("open"))?;
    let file_len = f.metadata().map_err(io("stat"))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER_BYTES || n > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {n} does not fit in the file ({file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io("read"))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut shapes = HashMap::new();
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid shape")))?;
        shapes.insert(name, shape);
    }
    Ok(shapes)
}

impl DvaeDims {
    /// The sizes of the dVAE whose weights are the safetensors file `path`, at `resolution` (the
    /// one size the weights do not hold). Reads only the file's header: n_hid from
    /// `encoder.blocks.input.w` [n_hid, 3, 7, 7], K from `encoder.blocks.output.conv.w`
    /// [K, 8·n_hid, 1, 1], n_blk_per_group from the `encoder.blocks.group_1.block_<i>` names,
    /// n_init from `decoder.blocks.input.w` [n_init, K, 1, 1]. Every other tensor is checked when
    /// the weights are loaded ([`DvaeWeights::load`]).
    pub fn infer(path: &Path, resolution: usize) -> WResult<DvaeDims> {
        Self::infer_from_shapes(path, &tensor_shapes(path)?, resolution)
    }

    fn infer_from_shapes(
        path: &Path,
        shapes: &HashMap<String, Vec<usize>>,
        resolution: usize,
    ) -> WResult<DvaeDims> {
        let get = |name: &str, what: &'static str| {
            shapes.get(name).ok_or_else(|| WeightsError::Missing {
                path: path.to_path_buf(),
                name: name.to_string(),
                what,
            })
        };
        let bad_shape = |name: &str, found: &[usize], expected: &str| WeightsError::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            found: found.to_vec(),
            expected: expected.to_string(),
        };
        let name = "encoder.blocks.input.w";
        let n_hid = match get(name, "n_hid")?.as_slice() {
            &[n, 3, 7, 7] => n,
            s => return Err(bad_shape(name, s, "[n_hid, 3, 7, 7]")),
        };
        let name = "encoder.blocks.output.conv.w";
        let vocab_size = match get(name, "vocab_size K")?.as_slice() {
            &[k, c, 1, 1] if c == 8 * n_hid => k,
            s => {
                return Err(bad_shape(
                    name,
                    s,
                    &format!("[K, 8·n_hid = {}, 1, 1]", 8 * n_hid),
                ))
            }
        };
        let name = "decoder.blocks.input.w";
        let n_init = match get(name, "n_init")?.as_slice() {
            &[n, k, 1, 1] if k == vocab_size => n,
            s => {
                return Err(bad_shape(
                    name,
                    s,
                    &format!("[n_init, K = {vocab_size}, 1, 1]"),
                ))
            }
        };
        let block = |i: usize| format!("encoder.blocks.group_1.block_{i}.res_path.conv_1.w");
        let n_blk_per_group = (1..)
            .take_while(|&i| shapes.contains_key(&block(i)))
            .count();
        if n_blk_per_group == 0 {
            get(&block(1), "n_blk_per_group")?;
        }
        let dims = DvaeDims {
            resolution,
            n_hid,
            n_blk_per_group,
            vocab_size,
            n_init,
        };
        fits_in_file(path, dims)?;
        // The same checks as `Dvae::new`, with the file named.
        Dvae::new(dims).map_err(|source| WeightsError::Dims {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(dims)
    }
}

/// Errors unless the file at `path` is large enough to hold a dVAE of `dims` as f32: the sizes
/// come from the file's header, so they are checked before a model of them is built or its
/// parameters allocated (the count saturates instead of overflowing).
fn fits_in_file(path: &Path, dims: DvaeDims) -> WResult<()> {
    let (params, _) = crate::memory::dvae_sizes(&dims, 0);
    let file_len = std::fs::metadata(path)
        .map_err(|e| WeightsError::Io(formats::fsutil::fs_err("stat", path)(e)))?
        .len();
    if params.saturating_mul(4) > file_len as u128 {
        return Err(WeightsError::NotSafetensors {
            path: path.to_path_buf(),
            message: format!(
                "its tensor shapes describe a dVAE of {params} parameters, more than its \
                 {file_len} bytes can hold as f32"
            ),
        });
    }
    Ok(())
}

/// A dVAE weights file, found and sized but not yet read: [`DvaeWeights::locate`] is cheap (it
/// reads one header), so callers check the sizes against their inputs before [`DvaeWeights::load`]
/// reads every tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DvaeWeights {
    /// The safetensors file that will be read.
    pub path: PathBuf,
    pub dims: DvaeDims,
}

impl DvaeWeights {
    /// Resolves `source` ([`resolve_weights`]) and infers the sizes ([`DvaeDims::infer`]).
    pub fn locate(source: &Path, ema: bool, resolution: usize) -> WResult<DvaeWeights> {
        let path = resolve_weights(source, ema)?;
        let dims = DvaeDims::infer(&path, resolution)?;
        Ok(DvaeWeights { path, dims })
    }

    /// Reads every tensor, checked against [`Dvae::table`] of the sizes: a missing tensor, an
    /// unexpected one, a wrong shape or a dtype other than F32 is an error naming the file and
    /// the tensor ([`checkpoint::load_weights`]).
    pub fn load(&self) -> WResult<(Dvae, Vec<f32>)> {
        fits_in_file(&self.path, self.dims)?;
        let model = Dvae::new(self.dims).map_err(|source| WeightsError::Dims {
            path: self.path.clone(),
            source,
        })?;
        let mut params = vec![0.0f32; model.table().numel()];
        checkpoint::load_weights(&self.path, model.table(), &mut params)?;
        Ok((model, params))
    }
}

/// Images a dVAE cannot take.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("{path}: images have {found} channels; the dVAE takes {CHANNELS} (RGB)")]
    Channels { path: PathBuf, found: u32 },
    #[error(
        "{path}: images are {found}×{found}, but a dVAE needs a resolution divisible by 8 (its \
         codes form a (resolution/8)² grid); re-ingest them at a multiple of 8"
    )]
    Resolution { path: PathBuf, found: u32 },
}

/// The resolution of `shard`'s images if a dVAE can take them (3 channels, a side divisible by
/// 8), else an error naming the shard. Any such resolution works: the networks are convolutional.
pub fn image_resolution(shard: &ImageShard) -> std::result::Result<usize, ImagesError> {
    let h = shard.header();
    let path = shard.path().to_path_buf();
    if h.channels != CHANNELS {
        return Err(ImagesError::Channels {
            path,
            found: h.channels,
        });
    }
    if h.resolution == 0 || !h.resolution.is_multiple_of(8) {
        return Err(ImagesError::Resolution {
            path,
            found: h.resolution,
        });
    }
    Ok(h.resolution as usize)
}

impl Net {
    /// The shape of layer `i`'s output: the next layer's input, or the network's output.
    fn output_shape(&self, i: usize) -> Shape {
        self.layers.get(i + 1).map_or(self.out, |(_, s)| *s)
    }

    /// The network's output on `input` ([`Net::forward`] without the saved activations: each
    /// layer's input is dropped once its output exists). The buffers are reused from layer to
    /// layer: fresh allocations of this size cost more in page faults than the ReLUs they hold.
    fn infer(&self, p: &[&[f32]], input: Vec<f32>, batch: usize) -> Result<Vec<f32>> {
        let mut x = input;
        let mut y = Vec::new();
        let mut scratch = Vec::new();
        let mut relus: Vec<Vec<f32>> = Vec::new();
        for (i, (layer, shape)) in self.layers.iter().enumerate() {
            let out = self.output_shape(i);
            fit(&mut y, batch * out.c * out.side * out.side);
            let lens = relu_lens(layer, shape, batch);
            relus.resize_with(relus.len().max(lens.len()), Vec::new);
            for (buf, &n) in relus.iter_mut().zip(&lens) {
                fit(buf, n);
            }
            let relus = &mut relus[..lens.len()];
            self.layer_forward(layer, shape, batch, p, &x, &mut y, relus, &mut scratch)?;
            std::mem::swap(&mut x, &mut y);
        }
        Ok(x)
    }
}

/// Sets `buf`'s length to `n` (every layer overwrites its buffers whole), allocating anew rather
/// than growing in place, which would copy the old contents.
fn fit(buf: &mut Vec<f32>, n: usize) {
    if buf.capacity() < n {
        *buf = vec![0.0; n];
    } else {
        buf.resize(n, 0.0);
    }
}

/// A reconstructed pixel in [0, 1] from the decoder's μ (logit space): docs/model.md §2's
/// clamp((sigmoid(μ) − ε)/(1 − 2ε), 0, 1).
pub fn unmap_pixel(mu: f32) -> f32 {
    let eps = super::LOGIT_LAPLACE_EPS as f32;
    let s = 1.0 / (1.0 + (-mu).exp());
    ((s - eps) / (1.0 - 2.0 * eps)).clamp(0.0, 1.0)
}

/// Calls `f(image, position, code)` for every image and grid position of `logits` [B, K, P] with
/// the code of the largest logit (the first on a tie); stops at the first non-finite logit and
/// returns it as `Err((image, position, code, value))`.
pub fn for_each_argmax(
    logits: &[f32],
    k: usize,
    positions: usize,
    mut f: impl FnMut(usize, usize, usize),
) -> std::result::Result<(), (usize, usize, usize, f32)> {
    let hw = positions;
    for (bi, l) in logits.chunks_exact((k * hw).max(1)).enumerate() {
        for pos in 0..hw {
            let mut best = 0;
            for c in 0..k {
                let v = l[c * hw + pos];
                if !v.is_finite() {
                    return Err((bi, pos, c, v));
                }
                if v > l[best * hw + pos] {
                    best = c;
                }
            }
            f(bi, pos, best);
        }
    }
    Ok(())
}

/// Per image and grid position of `logits` [B, K, P], the code with the largest logit (the first
/// on a tie): codes [B, P]. A non-finite logit is an error naming image, position and code.
pub fn argmax_codes(logits: &[f32], k: usize, positions: usize) -> Result<Vec<u32>> {
    let b = logits.len() / (k * positions).max(1);
    let mut codes = vec![0u32; b * positions];
    for_each_argmax(logits, k, positions, |bi, pos, c| {
        codes[bi * positions + pos] = c as u32
    })
    .map_err(|(bi, pos, c, v)| {
        ModelError::Dims(format!(
            "the encoder's logit of code {c} at image {bi}, position {pos} is {v}"
        ))
    })?;
    Ok(codes)
}

/// The one-hot [B, K, P] of `codes` [B, P] into `out` (of that length, zeroed first): the
/// decoder's input for reconstruction and for `relaxation.decoder_input: argmax`. A code ≥ K is
/// an error naming it.
pub(super) fn write_one_hot(out: &mut [f32], codes: &[u32], k: usize, hw: usize) -> Result<()> {
    out.fill(0.0);
    for (i, &c) in codes.iter().enumerate() {
        let (bi, pos) = (i / hw, i % hw);
        if c as usize >= k {
            return Err(ModelError::Dims(format!(
                "code {i} (image {bi}, position {pos}) is {c}, outside [0, K = {k})"
            )));
        }
        out[(bi * k + c as usize) * hw + pos] = 1.0;
    }
    Ok(())
}

impl Dvae {
    /// Images per call of `values` values of `per_item` each; an error unless it divides.
    fn batch_of(values: usize, per_item: usize, what: &str) -> Result<usize> {
        if !values.is_multiple_of(per_item) {
            return Err(ModelError::Dims(format!(
                "{what} hold {values} values, not a multiple of {per_item}"
            )));
        }
        Ok(values / per_item)
    }

    /// The encoder's logits [B, K, H/8, W/8] on `images` [B, 3, H, W] in [0, 1] (pixels mapped
    /// to x' = (1 − 2ε)·x + ε first, as in training).
    pub fn encoder_logits(&self, params: &[f32], images: &[f32]) -> Result<Vec<f32>> {
        let r = self.dims.resolution;
        let b = Self::batch_of(images.len(), 3 * r * r, "images [B, 3, H, W]")?;
        if let Some(i) = images.iter().position(|v| !(0.0..=1.0).contains(v)) {
            return Err(ModelError::Dims(format!(
                "pixel {i} = {} is outside [0, 1]",
                images[i]
            )));
        }
        let x: Vec<f32> = images.iter().map(|&v| squash(v) as f32).collect();
        self.encoder.infer(&self.table.split(params), x, b)
    }

    /// The codes [B, H/8, W/8] of `images` [B, 3, H, W] in [0, 1]: per grid position, the argmax
    /// over K of the encoder's logits (the first on a tie; no noise). Non-finite logits (broken
    /// weights) are an error, not a code.
    pub fn encode(&self, params: &[f32], images: &[f32]) -> Result<Vec<u32>> {
        let logits = self.encoder_logits(params, images)?;
        argmax_codes(
            &logits,
            self.dims.vocab_size,
            self.dims.grid() * self.dims.grid(),
        )
    }

    /// The decoder's statistics [B, 6, H, W] (μ, then ln b) on the one-hot of `codes`
    /// [B, H/8, W/8], each < K.
    pub fn decoder_stats(&self, params: &[f32], codes: &[u32]) -> Result<Vec<f32>> {
        let (k, hw) = (self.dims.vocab_size, self.dims.grid() * self.dims.grid());
        let b = Self::batch_of(codes.len(), hw, "codes [B, h, w]")?;
        let mut one_hot = vec![0.0f32; b * k * hw];
        write_one_hot(&mut one_hot, codes, k, hw)?;
        self.decoder.infer(&self.table.split(params), one_hot, b)
    }

    /// The images [B, 3, H, W] in [0, 1] that `codes` [B, H/8, W/8] decode to: the decoder on
    /// their one-hot, then [`unmap_pixel`] of μ (docs/model.md §2's reconstruction).
    pub fn decode_codes(&self, params: &[f32], codes: &[u32]) -> Result<Vec<f32>> {
        let stats = self.decoder_stats(params, codes)?;
        let px = 3 * self.dims.resolution * self.dims.resolution;
        let b = stats.len() / (2 * px);
        let mut images = Vec::with_capacity(b * px);
        for bi in 0..b {
            images.extend(stats[bi * 2 * px..][..px].iter().map(|&m| unmap_pixel(m)));
        }
        Ok(images)
    }
}

#[cfg(test)]
mod tests;
