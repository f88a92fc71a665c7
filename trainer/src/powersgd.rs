//! PowerSGD gradient compression (Vogels et al. 2019) as DALL·E used it (Ramesh et al. 2021,
//! §2.5 and App. E), with torch's `PowerSGDState` parametrisation. The maths, the tensor
//! classification, the bucket rule and the byte accounting are written out in docs/powersgd.md.
//!
//! One call of [`PowerSgd::reduce`] replaces the plain "all-reduce, divide by W" of a
//! data-parallel step. For each compressed matrix M (a rank's local gradient plus its error
//! buffer, oriented so that P is on the shorter side, s ≤ l):
//!
//! ```text
//! M = grad + error                       (error feedback, in the error buffer)
//! P = all_reduce(M·Q)                    s × r, one grouped all-reduce per bucket
//! P = orth(P + ε‖P‖·I)                   Householder QR, f64
//! Q' = all_reduce(Mᵀ·P) / W              l × r, one grouped all-reduce per bucket
//! grad = P·Q'ᵀ                           the decompressed, averaged gradient
//! error = M − grad
//! ```
//!
//! Everything else (embeddings, unembeddings, gains, biases, and matrices too small to gain from
//! compression) goes through one uncompressed fp32 all-reduce, averaged.
//!
//! Invariants:
//!
//! - Every rank issues the same collectives in the same order, and every value that decides a
//!   branch (the non-finite flag, P, Q) is the result of an all-reduce, so all ranks agree
//!   bit-for-bit and take the same branches.
//! - A step with a non-finite gradient on any rank changes no state: error buffers, Q and the
//!   rest are left exactly as they were, `grads` is filled with NaN (so that every rank's
//!   optimizer skips the update) and [`ReduceStats::non_finite`] is set.
//! - The state that matters across steps is the *sum* of the ranks' error buffers (P and Q are
//!   linear in it), which is why checkpoints hold their mean and a restore at any world size
//!   gives every rank that mean (App. E.2, "optimization 4").

mod device;
mod orth;
mod thread_group;

pub use device::{DevicePowerSgd, PowerSgdDevice};
pub use orth::orthonormalize;
pub use thread_group::ThreadGroup;

use crate::checkpoint::{self, CheckpointError, TensorEntry};
use crate::params::{ParamKind, ParamSpec, ParamTable};
use dist::collectives::{CollectiveError, Collectives};
use kernels::linear::{matmul, MatRef};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

/// Conventional file name of the PowerSGD state inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "powersgd.safetensors";

/// How gradients are reduced between ranks, as written in `compression.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionKind {
    /// A plain fp32 all-reduce of the whole gradient.
    #[default]
    None,
    /// PowerSGD with the settings beside `kind`.
    Powersgd,
}

/// The run config's `compression:` section: `kind` and PowerSGD's settings. Field names follow
/// torch's `PowerSGDState` where there is one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerSgdConfig {
    /// `none` (default) or `powersgd`; the other fields apply to `powersgd` only.
    #[serde(default)]
    pub kind: CompressionKind,
    /// Rank r of the approximation P·Qᵀ (torch's `matrix_approximation_rank`). A matrix whose
    /// shorter side is below r is approximated at that side's length. ≥ 1. Default 4. (The paper
    /// used 896 at d_model 3968, i.e. r ≈ d/4.4; torch's default is 1.)
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// A matrix n × m is compressed only if (n + m)·r · this < n·m, i.e. if compression shrinks
    /// its traffic by more than this factor; others are all-reduced uncompressed (torch's
    /// `min_compression_rate`). ≥ 0; 0 compresses every matrix. Default 2 (torch's).
    #[serde(default = "default_min_compression_rate")]
    pub min_compression_rate: f64,
    /// `false` (default, the paper's choice): Q is a random Gaussian matrix drawn once from
    /// `seed` and never updated. `true` (torch's `warm_start`): each step starts from the
    /// previous step's averaged Q, orthonormalised.
    #[serde(default)]
    pub warm_start: bool,
    /// ε of the orthonormalisation: P + ε·‖P‖_F·I is factored (App. E.2 step 5 adds ε·I with
    /// ε = 1e-6 to pre-scaled P; ours is relative to ‖P‖_F because our P is not pre-scaled).
    /// Also used for the warm-started Q. Finite, ≥ 0. Default 1e-6.
    #[serde(default = "default_epsilon")]
    pub orthogonalization_epsilon: f64,
    /// Seed of the random Q. Must be the same on every rank. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// The first `start_step` reductions are plain fp32 all-reduces (torch's
    /// `start_powerSGD_iter`); compression starts at the reduction with index `start_step`
    /// (0-based). Default 0 (the paper compresses from the start; torch's default is 1000).
    #[serde(default)]
    pub start_step: u64,
    /// Error feedback (torch's `use_error_feedback`): carry M − P·Qᵀ into the next step. Turning
    /// it off is for ablations only. Default true.
    #[serde(default = "default_true")]
    pub error_feedback: bool,
}

fn default_rank() -> usize {
    4
}
fn default_min_compression_rate() -> f64 {
    2.0
}
fn default_epsilon() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

impl Default for PowerSgdConfig {
    fn default() -> Self {
        PowerSgdConfig {
            kind: CompressionKind::None,
            rank: default_rank(),
            min_compression_rate: default_min_compression_rate(),
            warm_start: false,
            orthogonalization_epsilon: default_epsilon(),
            seed: 0,
            start_step: 0,
            error_feedback: true,
        }
    }
}

impl PowerSgdConfig {
    /// Checks every range; the error names the field as `compression.<field>`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message| Err(PowerSgdError::Config { field, message });
        if self.rank < 1 {
            return bad(
                "compression.rank",
                format!("compression.rank = {} must be ≥ 1", self.rank),
            );
        }
        let rate = self.min_compression_rate;
        if !rate.is_finite() || rate < 0.0 {
            return bad(
                "compression.min_compression_rate",
                format!("compression.min_compression_rate = {rate} must be finite and ≥ 0"),
            );
        }
        let eps = self.orthogonalization_epsilon;
        if !eps.is_finite() || eps < 0.0 {
            return bad(
                "compression.orthogonalization_epsilon",
                format!("compression.orthogonalization_epsilon = {eps} must be finite and ≥ 0"),
            );
        }
        Ok(())
    }
}

/// Everything that can go wrong in PowerSGD.
#[derive(Debug, thiserror::Error)]
pub enum PowerSgdError {
    /// A config field is out of range; `field` is `compression.<field>`.
    #[error("{message}")]
    Config {
        field: &'static str,
        message: String,
    },
    /// The gradient buffer does not match the parameter table PowerSGD was built for.
    #[error("gradient buffer has {found} values but the parameter table has {expected}")]
    BufferLength { expected: usize, found: usize },
    /// A state buffer to restore does not match [`PowerSgd::checkpoint_table`].
    #[error("PowerSGD state has {found} values but this configuration needs {expected}")]
    StateLength { expected: usize, found: usize },
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelError),
    #[error("PowerSGD state: {0}")]
    Checkpoint(#[from] CheckpointError),
}

pub type Result<T> = std::result::Result<T, PowerSgdError>;

/// One compressed matrix: a `ParamKind::Matrix` tensor of ≥ 2 dimensions, viewed as
/// `rows × cols` = `shape[0] × (product of the rest)` (a convolution `[out, in, k, k]` as
/// `[out, in·k·k]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedTensor {
    /// Index in the parameter table.
    pub param: usize,
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// Effective rank: min(config rank, rows, cols).
    pub rank: usize,
    /// Index in [`PowerSgd::buckets`].
    pub bucket: usize,
    /// Offset of this tensor in the flat parameter (and gradient) buffer.
    grad_offset: usize,
    /// Offset of this tensor in the error buffer (compressed tensors in table order).
    error_offset: usize,
    /// Offset of this tensor's Q (long × rank, row-major) in the Q buffer.
    q_offset: usize,
    /// Offsets of this tensor's P and new Q in its bucket's communication buffers.
    p_offset: usize,
    qn_offset: usize,
}

impl CompressedTensor {
    /// P is computed on the shorter side (App. E.2, optimization 3): the factored matrix is
    /// Mᵀ when rows > cols.
    pub fn transposed(&self) -> bool {
        self.rows > self.cols
    }
    /// Rows of P: min(rows, cols).
    pub fn short(&self) -> usize {
        self.rows.min(self.cols)
    }
    /// Rows of Q: max(rows, cols).
    pub fn long(&self) -> usize {
        self.rows.max(self.cols)
    }
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
    /// Values all-reduced per step for this tensor: (short + long)·rank.
    pub fn factor_len(&self) -> usize {
        (self.short() + self.long()) * self.rank
    }
    fn error_range(&self) -> Range<usize> {
        self.error_offset..self.error_offset + self.numel()
    }
    fn q_range(&self) -> Range<usize> {
        self.q_offset..self.q_offset + self.long() * self.rank
    }
    fn p_range(&self) -> Range<usize> {
        self.p_offset..self.p_offset + self.short() * self.rank
    }
    fn qn_range(&self) -> Range<usize> {
        self.qn_offset..self.qn_offset + self.long() * self.rank
    }
    /// The matrix whose P is computed (s × l), over this tensor's `rows × cols` values.
    fn oriented<'a>(&self, m: &'a [f32]) -> MatRef<'a> {
        let m = MatRef::new(m, self.rows, self.cols);
        if self.transposed() {
            m.t()
        } else {
            m
        }
    }
}

/// The compressed matrices of one resblock, whose P's (and then Q's) go in one all-reduce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// The name prefix shared by the bucket's tensors (see [`bucket_key`]).
    pub key: String,
    /// Indices into [`PowerSgd::compressed`], in table order.
    pub tensors: Vec<usize>,
    /// Values in the bucket's P all-reduce and in its Q all-reduce.
    pub p_len: usize,
    pub q_len: usize,
}

/// The bucket of a parameter: its resblock. A transformer layer `blocks.{l}` holds two
/// resblocks (residual branches), `blocks.{l}.attn` and `blocks.{l}.mlp`, as in the paper, whose
/// 64-layer model has 128 resblocks (App. D, guideline 1); a dVAE residual block
/// `…group_{g}.block_{i}` is one resblock (its `id_path` and `res_path`). The rule, by name
/// segments: up to and including the segment after the first all-digit segment (when that
/// segment is not the last); else up to and including the first `block_<digits>` segment; else
/// `global` (tensors outside any resblock).
pub fn bucket_key(name: &str) -> String {
    let segs: Vec<&str> = name.split('.').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(i) = segs.iter().position(|s| digits(s)) {
        let end = if i + 2 < segs.len() { i + 2 } else { i + 1 };
        return segs[..end].join(".");
    }
    if let Some(i) = segs
        .iter()
        .position(|s| s.strip_prefix("block_").is_some_and(digits))
    {
        return segs[..=i].join(".");
    }
    "global".to_string()
}

/// What one [`PowerSgd::reduce`] did. Byte counts are the payload this rank hands to all-reduce
/// (4 bytes per f32); a ring all-reduce moves 2·(W−1)/W times that per rank, the same factor for
/// both counts, so their ratio is the traffic ratio.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ReduceStats {
    /// False during the first `start_step` plain all-reduces.
    pub compressed: bool,
    /// Some rank's gradient, or a reduced value, was not finite: `grads` is all NaN and the step
    /// must be skipped (no PowerSGD state was changed).
    pub non_finite: bool,
    /// Payload bytes all-reduced this step.
    pub bytes_sent: u64,
    /// Payload bytes of a plain fp32 all-reduce of the whole gradient.
    pub bytes_uncompressed: u64,
    /// Number of all-reduce calls.
    pub all_reduces: usize,
    /// Seconds inside all-reduce calls, and seconds of everything else (the P and Q products,
    /// orthonormalisation, decompression, error feedback, gathers and scatters).
    pub comm_secs: f64,
    pub compute_secs: f64,
}

impl ReduceStats {
    /// bytes_sent / bytes_uncompressed.
    pub fn ratio(&self) -> f64 {
        self.bytes_sent as f64 / self.bytes_uncompressed.max(1) as f64
    }
}

/// The mean of every rank's PowerSGD state, ready to be written (see [`PowerSgd::snapshot`]).
#[derive(Clone, Debug)]
pub struct PowerSgdSnapshot {
    table: ParamTable,
    data: Vec<f32>,
    /// Reductions done so far (for `state.json`; give it back to [`PowerSgd::restore`]).
    pub iterations: u64,
}

impl PowerSgdSnapshot {
    /// One entry per tensor of [`PowerSgd::checkpoint_table`], named `<prefix><name>`, for
    /// [`checkpoint::write_tensors`] or a [`checkpoint::TensorFile`].
    pub fn entries(&self, prefix: &str) -> Vec<TensorEntry<'_>> {
        checkpoint::entries(&self.table, prefix, &self.data)
    }
    /// The values, laid out by [`PowerSgd::checkpoint_table`].
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// PowerSGD state for one rank: the plan (which tensors are compressed, in which buckets), the
/// error buffers, Q, and scratch. Built from the model's parameter table.
#[derive(Debug)]
pub struct PowerSgd {
    cfg: PowerSgdConfig,
    numel: usize,
    compressed: Vec<CompressedTensor>,
    /// Table indices of the tensors all-reduced uncompressed, in table order.
    uncompressed: Vec<usize>,
    /// Where the uncompressed tensors sit in the flat buffer (adjacent ones merged).
    uncompressed_ranges: Vec<Range<usize>>,
    uncompressed_len: usize,
    buckets: Vec<Bucket>,
    /// Error buffers of the compressed tensors, concatenated in table order (empty without
    /// error feedback, where M is the gradient itself).
    error: Vec<f32>,
    /// Q of every compressed tensor (long × rank, row-major), concatenated.
    q: Vec<f32>,
    /// Names and shapes of the checkpointed state: `error.<param>`, then `q.<param>` when
    /// warm-starting.
    checkpoint_table: ParamTable,
    iterations: u64,
    // Scratch, sized once.
    ubuf: Vec<f32>,
    pbuf: Vec<f32>,
    qbuf: Vec<f32>,
    orth_work: Vec<f64>,
}

impl PowerSgd {
    /// Classifies `table`'s tensors, forms the buckets and allocates the state (error buffers at
    /// zero; Q drawn from `cfg.seed`, identical on every rank).
    pub fn new(table: &ParamTable, cfg: &PowerSgdConfig) -> Result<Self> {
        cfg.validate()?;
        let mut compressed = Vec::new();
        let mut uncompressed = Vec::new();
        let mut bucket_keys: Vec<String> = Vec::new();
        let (mut error_len, mut q_len) = (0, 0);
        for (i, spec) in table.specs().iter().enumerate() {
            let Some((rows, cols, rank)) = compression_shape(spec, cfg) else {
                uncompressed.push(i);
                continue;
            };
            let key = bucket_key(&spec.name);
            let bucket = match bucket_keys.iter().position(|k| *k == key) {
                Some(b) => b,
                None => {
                    bucket_keys.push(key);
                    bucket_keys.len() - 1
                }
            };
            let t = CompressedTensor {
                param: i,
                name: spec.name.clone(),
                rows,
                cols,
                rank,
                bucket,
                grad_offset: spec.offset,
                error_offset: error_len,
                q_offset: q_len,
                p_offset: 0,
                qn_offset: 0,
            };
            error_len += t.numel();
            q_len += t.long() * t.rank;
            compressed.push(t);
        }
        let mut buckets: Vec<Bucket> = bucket_keys
            .into_iter()
            .map(|key| Bucket {
                key,
                tensors: Vec::new(),
                p_len: 0,
                q_len: 0,
            })
            .collect();
        for (ci, t) in compressed.iter_mut().enumerate() {
            let b = &mut buckets[t.bucket];
            t.p_offset = b.p_len;
            t.qn_offset = b.q_len;
            b.p_len += t.short() * t.rank;
            b.q_len += t.long() * t.rank;
            b.tensors.push(ci);
        }

        let mut q = vec![0.0f32; q_len];
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        for x in q.iter_mut() {
            *x = crate::model::init::standard_normal(&mut rng) as f32;
        }

        let mut checkpoint_table = ParamTable::new();
        if cfg.error_feedback {
            for t in &compressed {
                let shape = &table.spec(t.param).shape;
                checkpoint_table.push(format!("error.{}", t.name), shape, ParamKind::Matrix);
            }
        }
        if cfg.warm_start {
            for t in &compressed {
                checkpoint_table.push(
                    format!("q.{}", t.name),
                    &[t.long(), t.rank],
                    ParamKind::Matrix,
                );
            }
        }

        let uncompressed_len = uncompressed.iter().map(|&i| table.spec(i).numel()).sum();
        let mut uncompressed_ranges: Vec<Range<usize>> = Vec::new();
        for &i in &uncompressed {
            let r = table.spec(i).range();
            match uncompressed_ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => uncompressed_ranges.push(r),
            }
        }
        let max_p = buckets.iter().map(|b| b.p_len).max().unwrap_or(0);
        let max_q = buckets.iter().map(|b| b.q_len).max().unwrap_or(0);
        Ok(PowerSgd {
            cfg: cfg.clone(),
            numel: table.numel(),
            compressed,
            uncompressed,
            uncompressed_ranges,
            uncompressed_len,
            buckets,
            error: vec![0.0; if cfg.error_feedback { error_len } else { 0 }],
            q,
            checkpoint_table,
            iterations: 0,
            ubuf: vec![0.0; uncompressed_len + 1],
            pbuf: vec![0.0; max_p],
            qbuf: vec![0.0; max_q],
            orth_work: Vec::new(),
        })
    }

    pub fn config(&self) -> &PowerSgdConfig {
        &self.cfg
    }

    /// The compressed matrices, in table order.
    pub fn compressed(&self) -> &[CompressedTensor] {
        &self.compressed
    }

    /// Table indices of the tensors all-reduced uncompressed in fp32, in table order.
    pub fn uncompressed(&self) -> &[usize] {
        &self.uncompressed
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Reductions done so far (compressed or not, skipped or not).
    pub fn iterations(&self) -> u64 {
        self.iterations
    }

    /// This rank's error buffers, the compressed tensors' in table order (empty without error
    /// feedback).
    pub fn error(&self) -> &[f32] {
        &self.error
    }

    /// The error buffer of compressed tensor `i` (index into [`PowerSgd::compressed`]).
    pub fn error_of(&self, i: usize) -> &[f32] {
        &self.error[self.compressed[i].error_range()]
    }

    /// Q of compressed tensor `i`: long × rank, row-major.
    pub fn q_of(&self, i: usize) -> &[f32] {
        &self.q[self.compressed[i].q_range()]
    }

    /// Payload bytes of one compressed step: 4·(uncompressed values + 1 flag + Σ (s + l)·r).
    pub fn bytes_per_compressed_step(&self) -> u64 {
        let factors: usize = self.compressed.iter().map(|t| t.factor_len()).sum();
        4 * (self.uncompressed_len + 1 + factors) as u64
    }

    /// Payload bytes of a plain fp32 all-reduce of the whole gradient: 4·numel.
    pub fn bytes_uncompressed(&self) -> u64 {
        4 * self.numel as u64
    }

    /// All-reduces `grads` (this rank's local gradient, laid out by the table) and replaces it
    /// by the decompressed average over ranks; see the module doc. Collective: every rank calls
    /// it once per step.
    pub fn reduce(&mut self, grads: &mut [f32], comm: &mut dyn Collectives) -> Result<ReduceStats> {
        if grads.len() != self.numel {
            return Err(PowerSgdError::BufferLength {
                expected: self.numel,
                found: grads.len(),
            });
        }
        let mut clock = CommClock::start(self.bytes_uncompressed());
        let inv_w = 1.0 / comm.world_size() as f32;
        let index = self.iterations;
        self.iterations += 1;

        if index < self.cfg.start_step || self.compressed.is_empty() {
            clock.all_reduce(comm, grads)?;
            if inv_w != 1.0 {
                grads.iter_mut().for_each(|g| *g *= inv_w);
            }
            return Ok(clock.finish(false, !all_finite(grads)));
        }

        let Self {
            cfg,
            compressed,
            uncompressed_ranges,
            uncompressed_len,
            buckets,
            error,
            q,
            ubuf,
            pbuf,
            qbuf,
            orth_work,
            ..
        } = self;
        // 1. Uncompressed tensors and the non-finite flag: one fp32 all-reduce. The flag is
        //    agreed before any state changes, so a bad step can leave the state untouched.
        let local_bad = !all_finite(grads);
        let n = *uncompressed_len;
        {
            let mut at = 0;
            for r in uncompressed_ranges.iter() {
                ubuf[at..at + r.len()].copy_from_slice(&grads[r.clone()]);
                at += r.len();
            }
            debug_assert_eq!(at, n);
        }
        ubuf[n] = if local_bad { 1.0 } else { 0.0 };
        clock.all_reduce(comm, ubuf)?;
        let bad = ubuf[n] != 0.0 || !all_finite(&ubuf[..n]);
        if bad {
            grads.fill(f32::NAN);
            return Ok(clock.finish(true, true));
        }
        {
            let mut at = 0;
            for r in uncompressed_ranges.iter() {
                let len = r.len();
                grads[r.clone()]
                    .iter_mut()
                    .zip(&ubuf[at..at + len])
                    .for_each(|(g, u)| *g = u * inv_w);
                at += len;
            }
        }

        // 2. Error feedback: M = grad + error, formed in the error buffer (the paper accumulates
        //    the gradient into the error buffer, App. E.2 step 2).
        if cfg.error_feedback {
            for t in compressed.iter() {
                let g = &grads[param_range(t)];
                error[t.error_range()]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(e, g)| *e += g);
            }
        }

        // 3. Per bucket: P, all-reduce, orthonormalise, Q, all-reduce, decompress.
        let eps = cfg.orthogonalization_epsilon;
        let mut compress_failed = false;
        for bucket in buckets.iter() {
            let pb = &mut pbuf[..bucket.p_len];
            for &ci in &bucket.tensors {
                let t = &compressed[ci];
                let m = stage_m(t, cfg.error_feedback, error, grads);
                let qt = &mut q[t.q_range()];
                if cfg.warm_start {
                    // Q is always finite: only finite Q' are kept.
                    orthonormalize(qt, t.long(), t.rank, eps, orth_work);
                }
                let qt = MatRef::new(qt, t.long(), t.rank);
                matmul(&mut pb[t.p_range()], t.oriented(m), qt, false)?;
            }
            clock.all_reduce(comm, pb)?;

            let qb = &mut qbuf[..bucket.q_len];
            let mut p_ok = Vec::with_capacity(bucket.tensors.len());
            for &ci in &bucket.tensors {
                let t = &compressed[ci];
                let p = &mut pb[t.p_range()];
                let ok = all_finite(p);
                if ok {
                    orthonormalize(p, t.short(), t.rank, eps, orth_work);
                }
                p_ok.push(ok);
                let m = stage_m(t, cfg.error_feedback, error, grads);
                let p = MatRef::new(&pb[t.p_range()], t.short(), t.rank);
                matmul(&mut qb[t.qn_range()], t.oriented(m).t(), p, false)?;
            }
            clock.all_reduce(comm, qb)?;
            if inv_w != 1.0 {
                qb.iter_mut().for_each(|x| *x *= inv_w);
            }

            for (&ci, p_ok) in bucket.tensors.iter().zip(p_ok) {
                let t = &compressed[ci];
                let qn = &qb[t.qn_range()];
                if !(p_ok && all_finite(qn)) {
                    // App. E.2 step 12: keep the error buffer (it holds M) unless M itself is
                    // not finite; the step is reported non-finite and must be skipped.
                    compress_failed = true;
                    if cfg.error_feedback {
                        let e = &mut error[t.error_range()];
                        if !all_finite(e) {
                            e.fill(0.0);
                        }
                    }
                    continue;
                }
                let p = MatRef::new(&pb[t.p_range()], t.short(), t.rank);
                let qn_m = MatRef::new(qn, t.long(), t.rank);
                let g = &mut grads[param_range(t)];
                if t.transposed() {
                    // M (rows × cols) ≈ (P·Q'ᵀ)ᵀ = Q'·Pᵀ.
                    matmul(g, qn_m, p.t(), false)?;
                } else {
                    matmul(g, p, qn_m.t(), false)?;
                }
                if cfg.error_feedback {
                    error[t.error_range()]
                        .iter_mut()
                        .zip(g.iter())
                        .for_each(|(e, g)| *e -= g);
                }
                if cfg.warm_start {
                    q[t.q_range()].copy_from_slice(qn);
                }
            }
        }
        if compress_failed {
            grads.fill(f32::NAN);
        }
        Ok(clock.finish(true, compress_failed))
    }

    /// Names and shapes of the checkpointed state: `error.<param>` (the parameter's shape) for
    /// every compressed tensor when error feedback is on, then `q.<param>` (`[long, rank]`)
    /// when warm-starting. A fixed Q is not saved: it is a function of `seed`.
    pub fn checkpoint_table(&self) -> &ParamTable {
        &self.checkpoint_table
    }

    /// The state to checkpoint: the mean over ranks of the error buffers, and Q (identical on
    /// every rank). Collective: every rank calls it; any rank (rank 0, by convention) writes
    /// the result. Only the sum of the error buffers affects later steps (App. E.2,
    /// "optimization 4"), so the mean is all a restore needs, at any world size.
    pub fn snapshot(&self, comm: &mut dyn Collectives) -> Result<PowerSgdSnapshot> {
        let mut data = Vec::with_capacity(self.checkpoint_table.numel());
        data.extend_from_slice(&self.error);
        if !self.error.is_empty() {
            comm.all_reduce_sum(&mut data)?;
            let inv_w = 1.0 / comm.world_size() as f32;
            if inv_w != 1.0 {
                data.iter_mut().for_each(|x| *x *= inv_w);
            }
        }
        if self.cfg.warm_start {
            data.extend_from_slice(&self.q);
        }
        debug_assert_eq!(data.len(), self.checkpoint_table.numel());
        Ok(PowerSgdSnapshot {
            table: self.checkpoint_table.clone(),
            data,
            iterations: self.iterations,
        })
    }

    /// Restores a [`PowerSgd::snapshot`] written at any world size: every rank's error buffer
    /// becomes the saved mean, so the ranks' sum is W_new × the old mean and the averaged
    /// M = mean(grad) + mean(error) — all that P and Q depend on — is what the saved run had.
    /// (App. E.2: "divide the error buffers by the total number of machines and broadcast
    /// them".) `data` is laid out by [`PowerSgd::checkpoint_table`].
    pub fn restore_data(&mut self, data: &[f32], iterations: u64) -> Result<()> {
        if data.len() != self.checkpoint_table.numel() {
            return Err(PowerSgdError::StateLength {
                expected: self.checkpoint_table.numel(),
                found: data.len(),
            });
        }
        let (e, q) = data.split_at(self.error.len());
        self.error.copy_from_slice(e);
        if self.cfg.warm_start {
            self.q.copy_from_slice(q);
        }
        self.iterations = iterations;
        Ok(())
    }

    /// [`PowerSgd::restore_data`] from the tensors `<prefix><name>` of a safetensors file (every
    /// rank reads it). Errors name the file and the tensor: a missing or unexpected tensor or a
    /// shape mismatch means the compressed set, the rank (warm start) or `warm_start` /
    /// `error_feedback` changed since the save.
    pub fn restore(&mut self, path: &Path, prefix: &str, iterations: u64) -> Result<()> {
        let mut data = vec![0.0; self.checkpoint_table.numel()];
        checkpoint::load_into(path, &self.checkpoint_table, prefix, &mut data)?;
        self.restore_data(&data, iterations)
    }
}

/// (rows, cols, effective rank) if `spec` is compressed under `cfg`: a matrix of ≥ 2
/// dimensions whose factors are more than `min_compression_rate` times smaller.
fn compression_shape(spec: &ParamSpec, cfg: &PowerSgdConfig) -> Option<(usize, usize, usize)> {
    if spec.kind != ParamKind::Matrix || spec.shape.len() < 2 {
        return None;
    }
    let rows = spec.shape[0];
    let cols: usize = spec.shape[1..].iter().product();
    let rank = cfg.rank.min(rows).min(cols);
    if rank == 0 {
        return None;
    }
    let compressed = ((rows + cols) * rank) as f64;
    (compressed * cfg.min_compression_rate < (rows * cols) as f64).then_some((rows, cols, rank))
}

/// The compressed tensor's values in the flat gradient.
fn param_range(t: &CompressedTensor) -> Range<usize> {
    t.grad_offset..t.grad_offset + t.numel()
}

/// The M of tensor `t`: its error buffer (error feedback on, where M was formed), or its
/// gradient (off). A bucket's gradients are overwritten only by its own decompression, after
/// both of its products have read M.
fn stage_m<'a>(
    t: &CompressedTensor,
    feedback: bool,
    error: &'a [f32],
    grads: &'a [f32],
) -> &'a [f32] {
    if feedback {
        &error[t.error_range()]
    } else {
        &grads[param_range(t)]
    }
}

fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

/// Times and counts the all-reduces of one step, and makes its [`ReduceStats`].
struct CommClock {
    started: Instant,
    bytes_uncompressed: u64,
    calls: usize,
    bytes: u64,
    secs: f64,
}

impl CommClock {
    /// The clock of a step that starts now (`bytes_uncompressed`: a plain all-reduce's payload).
    fn start(bytes_uncompressed: u64) -> Self {
        CommClock {
            started: Instant::now(),
            bytes_uncompressed,
            calls: 0,
            bytes: 0,
            secs: 0.0,
        }
    }

    /// The step's statistics: the all-reduces counted so far, the rest of the time as compute.
    fn finish(&self, compressed: bool, non_finite: bool) -> ReduceStats {
        ReduceStats {
            compressed,
            non_finite,
            bytes_sent: self.bytes,
            bytes_uncompressed: self.bytes_uncompressed,
            all_reduces: self.calls,
            comm_secs: self.secs,
            compute_secs: (self.started.elapsed().as_secs_f64() - self.secs).max(0.0),
        }
    }

    fn all_reduce(
        &mut self,
        comm: &mut dyn Collectives,
        buf: &mut [f32],
    ) -> std::result::Result<(), CollectiveError> {
        let t0 = Instant::now();
        comm.all_reduce_sum(buf)?;
        self.secs += t0.elapsed().as_secs_f64();
        self.calls += 1;
        self.bytes += 4 * buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
