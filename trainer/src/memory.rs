//! The memory a run needs, estimated from its config before anything is allocated, and the
//! start-up check that refuses a run this machine cannot hold ("needs X GiB, this machine has
//! Y GiB") instead of letting an allocation abort the process.
//!
//! The estimate counts the buffers that live for the whole run, per rank, in 4-byte elements
//! (f32 values, u32 token targets); docs/architecture.md ("Memory") writes the formulas out.
//!
//! - parameters P (the model's table), their gradient (P), AdamW's two moments (2P), the weight
//!   EMA (P, when `optim.ema` > 0) and PowerSGD's error feedback (P, when compressing);
//! - the activations one micro-batch of `train.batch_size` keeps for the backward pass, with the
//!   backward pass's gradient scratch: the transformer's `Activations::new` and the dVAE's
//!   `Dvae::new_acts` (plus its Gumbel noise), as formulas of the sizes; unit tests hold the
//!   formulas to the buffers those functions allocate;
//! - the image loader's batches in flight ((`data.prefetch` + 2) batches of B·3·H·W).
//!
//! It leaves out what is small or transient (the kernels' scratch, such as the convolutions'
//! im2col columns; shard maps, which the page cache backs; a checkpoint being written), so it is
//! a lower bound: a run it refuses cannot fit, and a run it admits may still need somewhat more.
//!
//! The memory available is `MemAvailable` of /proc/meminfo, lowered to what the cgroup (v2)
//! allows when the process runs under a memory limit. Several ranks on one node
//! (`LOCAL_WORLD_SIZE`) share it. `TESSERA_SKIP_MEMORY_CHECK=1` skips the check (for a machine
//! whose swap the estimate should not ignore).

use std::fmt;
use std::path::Path;

use crate::config::{DataSource, DvaeDims, ModelConfig, RunConfig, TransformerDims};
use crate::powersgd::CompressionKind;

/// The environment variable that, set to `1`, skips [`check`].
pub const SKIP_ENV: &str = "TESSERA_SKIP_MEMORY_CHECK";

const BYTES: u128 = 4;
const GIB: f64 = (1u64 << 30) as f64;

/// A byte count printed in GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u128);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = self.0 as f64 / GIB;
        if gib >= 0.1 {
            write!(f, "{gib:.1} GiB")
        } else {
            write!(f, "{:.1} MiB", self.0 as f64 / (1u64 << 20) as f64)
        }
    }
}

/// What one rank of a run holds for the whole run, by part (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The model's parameter count P.
    pub params: u128,
    /// Weights, gradient, EMA: (2 or 3)·P·4.
    pub weights: Bytes,
    /// Whether `weights` includes the EMA.
    pub ema: bool,
    /// AdamW's moments (2·P·4) and PowerSGD's error feedback (P·4, when compressing).
    pub optimizer: Bytes,
    /// One micro-batch's saved activations and backward scratch.
    pub activations: Bytes,
    /// Batches in flight in the loader (image batches; token batches are a few KiB).
    pub data: Bytes,
}

impl MemoryEstimate {
    /// The estimate for one rank of `cfg` (sizes only: nothing is allocated).
    pub fn of(cfg: &RunConfig) -> MemoryEstimate {
        let batch = cfg.train.batch_size as u128;
        let (params, acts) = match &cfg.model {
            ModelConfig::Transformer(m) => (transformer_params(m), transformer_acts(m, batch)),
            ModelConfig::Dvae(d) => dvae_sizes(d, batch),
            // Parameters only, from the model's own table; CLIP's activations are not
            // estimated yet.
            ModelConfig::Clip(c) => (
                crate::model::clip::Clip::new(*c)
                    .map(|m| m.table().numel() as u128)
                    .unwrap_or(0),
                0,
            ),
        };
        let data = match &cfg.data {
            DataSource::Images(s) => {
                let side = match (cfg.model.dvae(), cfg.model.clip()) {
                    (Some(d), _) => d.resolution,
                    (None, Some(c)) => c.vision_config.image_size,
                    (None, None) => 0,
                };
                let px = 3u128 * (side as u128).pow(2);
                (s.prefetch as u128 + 2).saturating_mul(batch.saturating_mul(px))
            }
            _ => 0,
        };
        let ema = if cfg.optim.ema > 0.0 { params } else { 0 };
        let feedback = match cfg.compression.kind {
            CompressionKind::Powersgd => params,
            CompressionKind::None => 0,
        };
        let b = |n: u128| Bytes(n.saturating_mul(BYTES));
        MemoryEstimate {
            params,
            weights: b(params.saturating_mul(2).saturating_add(ema)),
            ema: ema > 0,
            optimizer: b(params.saturating_mul(2).saturating_add(feedback)),
            activations: b(acts),
            data: b(data),
        }
    }

    /// Everything, in bytes.
    pub fn total(&self) -> Bytes {
        Bytes(
            self.weights
                .0
                .saturating_add(self.optimizer.0)
                .saturating_add(self.activations.0)
                .saturating_add(self.data.0),
        )
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} parameters: weights, gradient{} {}, optimizer {}, activations {}",
            self.params,
            if self.ema { " and EMA" } else { "" },
            self.weights,
            self.optimizer,
            self.activations
        )?;
        if self.data.0 > 0 {
            write!(f, ", batches in flight {}", self.data)?;
        }
        Ok(())
    }
}

/// The run does not fit in this machine's memory.
#[derive(Debug, thiserror::Error)]
#[error(
    "this run needs about {need} of memory, this machine has {available} ({source_name}): \
     {per_rank} per rank{ranks_note} ({estimate}; train.batch_size {batch}). Use a smaller \
     model or batch (train.batch_size, with train.grad_accum to keep the global batch), fewer \
     ranks per node, or set {SKIP_ENV}=1 to start anyway"
)]
pub struct MemoryError {
    pub need: Bytes,
    pub available: Bytes,
    pub source_name: String,
    pub per_rank: Bytes,
    pub ranks_note: String,
    pub estimate: Box<MemoryEstimate>,
    pub batch: usize,
}

/// Memory this process may still use: `MemAvailable` of /proc/meminfo, or less when a cgroup
/// v2 limit leaves less; with where the number came from. `None` where neither is readable.
pub fn available() -> Option<(u64, String)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_meminfo(&t))
        .map(|b| (b, "MemAvailable in /proc/meminfo".to_string()));
    let cgroup = cgroup_headroom(Path::new("/sys/fs/cgroup"))
        .map(|b| (b, "the memory limit of this process's cgroup".to_string()));
    match (meminfo, cgroup) {
        (Some(m), Some(c)) => Some(if c.0 < m.0 { c } else { m }),
        (m, c) => m.or(c),
    }
}

/// `MemAvailable` in bytes from the text of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// `memory.max − memory.current` of the cgroup v2 mounted at `root` (the process's own cgroup
/// when it is namespaced, as in a container); `None` without a limit.
fn cgroup_headroom(root: &Path) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses `cfg` when its estimate for `ranks_here` ranks on this node exceeds the memory
/// available; returns the per-rank estimate otherwise (also when the memory available is
/// unknown, or the check is skipped with [`SKIP_ENV`]).
pub fn check(cfg: &RunConfig, ranks_here: usize) -> Result<MemoryEstimate, MemoryError> {
    let estimate = MemoryEstimate::of(cfg);
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        return Ok(estimate);
    }
    let Some((available, source_name)) = available() else {
        tracing::debug!("the memory available is unknown; not checking the run's estimate");
        return Ok(estimate);
    };
    check_against(cfg, &estimate, ranks_here, available, source_name)?;
    Ok(estimate)
}

/// [`check`] against a given number of bytes available.
pub fn check_against(
    cfg: &RunConfig,
    estimate: &MemoryEstimate,
    ranks_here: usize,
    available: u64,
    source_name: String,
) -> Result<(), MemoryError> {
    let ranks = ranks_here.max(1);
    let need = Bytes(estimate.total().0.saturating_mul(ranks as u128));
    if need.0 <= available as u128 {
        return Ok(());
    }
    Err(MemoryError {
        need,
        available: Bytes(available as u128),
        source_name,
        per_rank: estimate.total(),
        ranks_note: if ranks > 1 {
            format!(" × {ranks} ranks on this node")
        } else {
            String::new()
        },
        estimate: Box::new(*estimate),
        batch: cfg.train.batch_size,
    })
}

/// Ranks of this run on this node: `LOCAL_WORLD_SIZE` in a multi-process run, else 1.
pub fn ranks_on_this_node() -> usize {
    std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n >= 1)
        .unwrap_or(1)
}

/// A count that saturates at `u128::MAX` instead of overflowing: a config's sizes are
/// arbitrary `usize`s, and an estimate past any machine's memory only needs to stay large.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Sat(u128);

impl std::ops::Add for Sat {
    type Output = Sat;
    fn add(self, o: Sat) -> Sat {
        Sat(self.0.saturating_add(o.0))
    }
}

impl std::ops::Mul for Sat {
    type Output = Sat;
    fn mul(self, o: Sat) -> Sat {
        Sat(self.0.saturating_mul(o.0))
    }
}

fn sat(v: usize) -> Sat {
    Sat(v as u128)
}

/// P of the transformer (docs/model.md §1): embeddings (Vt+Tt)·C + Tt·C + Vi·C + 2G·C, per layer
/// 12C² + 13C, ln_f 2C, head (Vt+Tt+Vi)·C.
pub fn transformer_params(m: &TransformerDims) -> u128 {
    let [tt, vt, g, vi, c, l] = [
        m.text_len,
        m.text_vocab,
        m.grid,
        m.image_vocab,
        m.d_model,
        m.layers,
    ]
    .map(sat);
    let k = |v: u128| Sat(v);
    let embeddings = (vt + tt) * c + tt * c + vi * c + k(2) * g * c;
    let per_layer = k(12) * c * c + k(13) * c;
    (embeddings + l * per_layer + k(2) * c + (vt + tt + vi) * c).0
}

/// Elements of the transformer's `Activations::new(batch)`, with n = B·T, n_t = B·(Tt − 1),
/// n_i = B·G²: (L+1)·n·C residual stream; per layer 15·n·C + 4n + B·NH·T; ln_f n·C + 2n; the
/// two segments' hidden rows and their gradients 2·(n_t + n_i)·C; logits n_t·(Vt+Tt) + n_i·Vi;
/// targets and losses 2·(n_t + n_i); backward scratch 14·n·C.
pub fn transformer_acts(m: &TransformerDims, batch: u128) -> u128 {
    let [tt, vt, g, vi, c, l, nh] = [
        m.text_len,
        m.text_vocab,
        m.grid,
        m.image_vocab,
        m.d_model,
        m.layers,
        m.heads,
    ]
    .map(sat);
    let k = |v: u128| Sat(v);
    let b = Sat(batch);
    let gi = g * g;
    let t = tt + gi;
    let n = b * t;
    let (nt, ni) = (b * Sat(tt.0.saturating_sub(1)), b * gi);
    let nc = n * c;
    let total = (l + k(1)) * nc
        + l * (k(15) * nc + k(4) * n + b * nh * t)
        + nc
        + k(2) * n
        + k(2) * (nt + ni) * c
        + nt * (vt + tt)
        + ni * vi
        + k(2) * (nt + ni)
        + k(14) * nc;
    total.0
}

/// P of the dVAE and the elements of `Dvae::new_acts(batch)` plus its Gumbel noise, from the
/// architecture of docs/model.md §2 (the stages `Net::encoder` and `Net::decoder` build): each
/// stage keeps its input, a residual block the inputs of its four convolutions (after ReLU),
/// the output stage its ReLU'd input; each network its output and two gradient buffers as long
/// as its largest activation.
pub fn dvae_sizes(d: &DvaeDims, batch: u128) -> (u128, u128) {
    let k = |v: u128| Sat(v);
    let r = sat(d.resolution);
    let (n_hid, vocab, n_init, nb) = (
        sat(d.n_hid),
        sat(d.vocab_size),
        sat(d.n_init),
        sat(d.n_blk_per_group),
    );
    let grid = Sat(r.0 / 8);
    let b = Sat(batch);
    let conv = |c_in: Sat, c_out: Sat, kernel: u128| c_out * c_in * k(kernel) * k(kernel) + c_out;
    let px = |side: Sat| b * side * side;
    // One network: (params, saved activations), from its input convolution (c_in, side, c_out,
    // kernel), whether it pools (encoder) or upsamples (decoder), its output channels and its
    // blocks' kernels.
    let net = |(c_in, side_in, c_first, k_first): (Sat, Sat, Sat, u128),
               down: bool,
               out_c: Sat,
               kernels: [u128; 4]| {
        let mut params = conv(c_in, c_first, k_first);
        let mut inputs = px(side_in) * c_in;
        let mut max_len = inputs;
        let mut relus = k(0);
        let (mut c, mut side) = (c_first, side_in);
        let rest = Sat(nb.0.saturating_sub(1));
        for g in 1..=4u32 {
            let shift = if down { g - 1 } else { 4 - g };
            let width = n_hid * Sat(1 << shift);
            let hid = Sat(width.0 / 4);
            let block_params = |c: Sat| {
                (if c != width { conv(c, width, 1) } else { k(0) })
                    + conv(c, hid, kernels[0])
                    + k(2) * conv(hid, hid, kernels[1])
                    + conv(hid, width, kernels[3])
            };
            // The first block of a group widens from the previous group; the others do not.
            params = params + block_params(c) + rest * block_params(width);
            let (first_in, other_in) = (px(side) * c, px(side) * width);
            let hidden = k(3) * px(side) * hid;
            inputs = inputs + first_in + rest * other_in;
            relus = relus + first_in + hidden + rest * (other_in + hidden);
            max_len = max_len.max(first_in).max(other_in);
            c = width;
            if g < 4 {
                inputs = inputs + px(side) * c;
                side = if down { Sat(side.0 / 2) } else { side * k(2) };
            }
        }
        params = params + conv(c, out_c, 1);
        let last_in = px(side) * c;
        let output = px(side) * out_c;
        let max_len = max_len.max(last_in).max(output);
        (
            params,
            inputs + last_in + relus + last_in + output + k(2) * max_len,
        )
    };
    let (pe, ae) = net((k(3), r, n_hid, 7), true, vocab, [3, 3, 3, 1]);
    let (pd, ad) = net((vocab, grid, n_init, 1), false, k(6), [1, 3, 3, 3]);
    let images = k(2) * b * k(3) * r * r;
    let codes = b * vocab * grid * grid;
    // y (the relaxed codes) and the Gumbel noise.
    ((pe + pd).0, (ae + ad + images + k(2) * codes).0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dvae::Dvae;
    use crate::model::transformer::{Activations, Transformer};

    fn transformer(text_len: usize, grid: usize, d_model: usize, heads: usize) -> TransformerDims {
        TransformerDims {
            text_len,
            text_vocab: 37,
            grid,
            image_vocab: 29,
            d_model,
            heads,
            layers: 3,
            conv_kernel: 3,
        }
    }

    #[test]
    fn transformer_formulas_match_the_model() {
        for (m, batch) in [
            (transformer(4, 2, 8, 2), 1),
            (transformer(7, 3, 12, 3), 3),
            (transformer(16, 4, 16, 4), 2),
        ] {
            let model = Transformer::new(m).unwrap();
            assert_eq!(transformer_params(&m), model.table().numel() as u128);
            let acts = Activations::new(&model, batch);
            assert_eq!(transformer_acts(&m, batch as u128), acts.floats() as u128);
        }
    }

    #[test]
    fn dvae_formulas_match_the_model() {
        for (d, batch) in [
            (
                DvaeDims {
                    resolution: 16,
                    n_hid: 4,
                    n_blk_per_group: 1,
                    vocab_size: 8,
                    n_init: 4,
                },
                2,
            ),
            (
                DvaeDims {
                    resolution: 32,
                    n_hid: 8,
                    n_blk_per_group: 2,
                    vocab_size: 16,
                    n_init: 6,
                },
                1,
            ),
        ] {
            let model = Dvae::new(d).unwrap();
            let (params, acts) = dvae_sizes(&d, batch as u128);
            assert_eq!(params, model.table().numel() as u128);
            let noise = batch * d.vocab_size * (d.resolution / 8).pow(2);
            assert_eq!(acts, (model.new_acts(batch).floats() + noise) as u128);
        }
    }

    #[test]
    fn the_paper_model_needs_hundreds_of_gib() {
        let cfg = RunConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/paper-12b.yaml"),
            &[],
        )
        .unwrap();
        let e = MemoryEstimate::of(&cfg);
        // About 12 billion parameters (the paper's name for the model).
        assert!(
            (11.5e9..12.5e9).contains(&(e.params as f64)),
            "{}",
            e.params
        );
        // Weights, gradient, two moments: 16 bytes a parameter before any activation.
        assert!(e.total().0 > 16 * e.params);
        let err = check_against(&cfg, &e, 1, 64 << 30, "test".into()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("this machine has 64.0 GiB (test)"), "{msg}");
        assert!(msg.contains("needs about"), "{msg}");
    }

    #[test]
    fn huge_sizes_saturate_instead_of_overflowing() {
        let mut m = transformer(4, 2, 8, 2);
        m.d_model = usize::MAX / 2;
        m.text_vocab = usize::MAX / 2;
        let params = transformer_params(&m);
        assert!(params > u64::MAX as u128);
        assert!(transformer_acts(&m, u64::MAX as u128) > u64::MAX as u128);
    }

    #[test]
    fn ranks_on_a_node_multiply_the_need() {
        let cfg = RunConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart-cpu.yaml"),
            &[],
        )
        .unwrap();
        let e = MemoryEstimate::of(&cfg);
        let per_rank = e.total().0 as u64;
        check_against(&cfg, &e, 1, per_rank, "test".into()).unwrap();
        let err = check_against(&cfg, &e, 2, per_rank, "test".into()).unwrap_err();
        assert!(err.to_string().contains("× 2 ranks on this node"), "{err}");
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       16315612 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(text), Some(12_000_000 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }
}
