//! Autoregressive sampling of image tokens (DALL·E §2.4's generation, before the dVAE decodes
//! and CLIP re-ranks), with a key-value cache that follows the sparse layouts.
//!
//! Positions are fed one at a time for a batch of S sequences. Each layer keeps the keys and
//! values of every position fed so far ([`KvCache`]); a new position attends only to the keys
//! its layer's mask allows (docs/model.md §1), listed once per layer kind and position, so the
//! cost of a position does not grow with the positions before it beyond reading the cache
//! entries it may see. The arithmetic is the training forward pass's on one row per sequence
//! (the same layer normalisation and GELU functions; the weight products through
//! [`rows_product`], which reads each weight row once for all sequences, summing in another
//! order than the training GEMM), so the cached logits equal the full forward pass's to f32
//! round-off: the test holds them together.
//!
//! Token choice ([`Sampling`]): logits divided by the temperature, then top-k and top-p
//! (nucleus) filtering, then a draw from a ChaCha8 stream per (seed, sequence), so a sequence's
//! tokens do not depend on the batch it was drawn in.

use super::{ModelError, Result, Transformer};
use kernels::attention::{allowed_reference, layer_mask_kind, MaskKind};
use kernels::gelu::gelu_forward;
use kernels::layernorm::layernorm_forward;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// How the next token is chosen from its logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits; > 0.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    fn check(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::Dims(format!(
                "temperature {} must be a positive number",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Dims(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }

    /// One token from `logits` with the random number `u` in [0, 1).
    pub fn choose(&self, logits: &[f32], u: f64) -> usize {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let t = self.temperature as f64;
        let top = logits[order[0]] as f64 / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (logits[i] as f64 / t - top).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= self.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            order.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let mut acc = 0.0;
        for (&i, &p) in order.iter().zip(&probs) {
            acc += p;
            if u < acc {
                return i;
            }
        }
        *order.last().expect("at least one token")
    }
}

/// Keys and values of every layer for the positions fed so far: `[S, T, C]` each.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

/// Feeds positions of S sequences one at a time through the transformer.
pub struct KvSampler<'a> {
    model: &'a Transformer,
    params: &'a [f32],
    seqs: usize,
    cache: KvCache,
    /// Next position to feed.
    pos: usize,
    /// The keys query p may attend, per mask kind (row, column, conv) and position.
    allowed: Vec<Vec<Vec<usize>>>,
    /// Index into `allowed` of each layer.
    layer_kind: Vec<usize>,
    /// The residual stream of the position being fed, [S, C], and scratch of the same or
    /// wider shape.
    x: Vec<f32>,
    ln: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    fc: Vec<f32>,
    fc_gelu: Vec<f32>,
}

impl<'a> KvSampler<'a> {
    /// A sampler for `seqs` sequences with weights `params`.
    pub fn new(model: &'a Transformer, params: &'a [f32], seqs: usize) -> Result<Self> {
        let d = model.dims;
        if params.len() != model.table.numel() {
            return Err(ModelError::Dims(format!(
                "parameter buffer has {} elements, the model needs {}",
                params.len(),
                model.table.numel()
            )));
        }
        let (t, c) = (d.seq_len(), d.d_model);
        let kinds: Vec<MaskKind> = (0..d.layers)
            .map(|l| layer_mask_kind(l, d.layers, d.conv_kernel))
            .collect();
        let mut distinct: Vec<MaskKind> = Vec::new();
        let layer_kind = kinds
            .iter()
            .map(|k| match distinct.iter().position(|x| x == k) {
                Some(i) => i,
                None => {
                    distinct.push(*k);
                    distinct.len() - 1
                }
            })
            .collect();
        let allowed = distinct
            .iter()
            .map(|&kind| {
                (0..t)
                    .map(|p| {
                        (0..=p)
                            .filter(|&q| allowed_reference(d.text_len, d.grid, kind, p, q))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let z = |n: usize| vec![0.0f32; n];
        Ok(KvSampler {
            model,
            params,
            seqs,
            cache: KvCache {
                keys: (0..d.layers).map(|_| z(seqs * t * c)).collect(),
                values: (0..d.layers).map(|_| z(seqs * t * c)).collect(),
            },
            pos: 0,
            allowed,
            layer_kind,
            x: z(seqs * c),
            ln: z(seqs * c),
            mean: z(seqs),
            rstd: z(seqs),
            qkv: z(seqs * 3 * c),
            att: z(seqs * c),
            proj: z(seqs * c),
            fc: z(seqs * 4 * c),
            fc_gelu: z(seqs * 4 * c),
        })
    }

    /// The next position to feed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Feeds one token per sequence at the next position and returns the logits of what comes
    /// after it, [S, V] over its segment: the text segment (Vt + Tt ids) while the next position
    /// is text, the image segment (Vi ids) from position Tt − 1 on.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let m = self.model;
        let d = m.dims;
        let (t, c, s) = (d.seq_len(), d.d_model, self.seqs);
        let p = self.pos;
        if p >= t {
            return Err(ModelError::Dims(format!("all {t} positions are fed")));
        }
        if tokens.len() != s {
            return Err(ModelError::Dims(format!(
                "{} tokens for {s} sequences",
                tokens.len()
            )));
        }
        let w = m.table.split(self.params);
        let g = &m.globals;
        // Embedding of position p.
        for (si, &tok) in tokens.iter().enumerate() {
            let x = &mut self.x[si * c..(si + 1) * c];
            let rows: [(&[f32], usize); 3] = if p < d.text_len {
                if tok as usize >= d.text_rows() {
                    return Err(ModelError::Dims(format!(
                        "text token {tok} at position {p} is not below {}",
                        d.text_rows()
                    )));
                }
                [(w[g.text_emb], tok as usize), (w[g.text_pos], p), (&[], 0)]
            } else {
                if tok as usize >= d.image_vocab {
                    return Err(ModelError::Dims(format!(
                        "image token {tok} at position {p} is not below {}",
                        d.image_vocab
                    )));
                }
                let i = p - d.text_len;
                [
                    (w[g.image_emb], tok as usize),
                    (w[g.image_row], i / d.grid),
                    (w[g.image_col], i % d.grid),
                ]
            };
            x.fill(0.0);
            // The training embedding adds the rows in this order.
            for (table, row) in rows.iter().filter(|(t, _)| !t.is_empty()) {
                for (x, &e) in x.iter_mut().zip(&table[row * c..(row + 1) * c]) {
                    *x += e;
                }
            }
        }
        let (nh, hs) = (d.heads, d.head_size());
        let inv_sqrt = 1.0 / (hs as f32).sqrt();
        for (l, bp) in m.blocks.iter().enumerate() {
            layernorm_forward(
                &mut self.ln,
                &mut self.mean,
                &mut self.rstd,
                &self.x,
                w[bp.ln1_w],
                w[bp.ln1_b],
                s,
                c,
            )?;
            rows_product(
                &mut self.qkv,
                &self.ln,
                w[bp.qkv_w],
                Some(w[bp.qkv_b]),
                s,
                c,
                3 * c,
            )?;
            let (keys, values) = (&mut self.cache.keys[l], &mut self.cache.values[l]);
            for si in 0..s {
                let row = &self.qkv[si * 3 * c..(si + 1) * 3 * c];
                let at = (si * t + p) * c;
                keys[at..at + c].copy_from_slice(&row[c..2 * c]);
                values[at..at + c].copy_from_slice(&row[2 * c..]);
            }
            let allowed = &self.allowed[self.layer_kind[l]][p];
            let mut scores = vec![0.0f32; allowed.len()];
            for si in 0..s {
                for h in 0..nh {
                    let q = &self.qkv[si * 3 * c + h * hs..][..hs];
                    let mut max = f32::NEG_INFINITY;
                    for (sc, &key) in scores.iter_mut().zip(allowed) {
                        let k = &keys[(si * t + key) * c + h * hs..][..hs];
                        *sc = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * inv_sqrt;
                        max = max.max(*sc);
                    }
                    let mut total = 0.0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        total += *sc;
                    }
                    let out = &mut self.att[si * c + h * hs..][..hs];
                    out.fill(0.0);
                    for (&sc, &key) in scores.iter().zip(allowed) {
                        let weight = sc / total;
                        let v = &values[(si * t + key) * c + h * hs..][..hs];
                        for (o, &v) in out.iter_mut().zip(v) {
                            *o += weight * v;
                        }
                    }
                }
            }
            rows_product(
                &mut self.proj,
                &self.att,
                w[bp.attn_proj_w],
                Some(w[bp.attn_proj_b]),
                s,
                c,
                c,
            )?;
            for (x, &y) in self.x.iter_mut().zip(&self.proj) {
                *x += y;
            }
            layernorm_forward(
                &mut self.ln,
                &mut self.mean,
                &mut self.rstd,
                &self.x,
                w[bp.ln2_w],
                w[bp.ln2_b],
                s,
                c,
            )?;
            rows_product(
                &mut self.fc,
                &self.ln,
                w[bp.fc_w],
                Some(w[bp.fc_b]),
                s,
                c,
                4 * c,
            )?;
            gelu_forward(&mut self.fc_gelu, &self.fc)?;
            rows_product(
                &mut self.proj,
                &self.fc_gelu,
                w[bp.mlp_proj_w],
                Some(w[bp.mlp_proj_b]),
                s,
                4 * c,
                c,
            )?;
            for (x, &y) in self.x.iter_mut().zip(&self.proj) {
                *x += y;
            }
        }
        layernorm_forward(
            &mut self.ln,
            &mut self.mean,
            &mut self.rstd,
            &self.x,
            w[g.lnf_w],
            w[g.lnf_b],
            s,
            c,
        )?;
        let head = w[g.head];
        let (rows, segment) = if p + 1 < d.text_len {
            (d.text_rows(), &head[..d.text_rows() * c])
        } else {
            (d.image_vocab, &head[d.text_rows() * c..])
        };
        let mut logits = vec![0.0f32; s * rows];
        rows_product(&mut logits, &self.ln, segment, None, s, c, rows)?;
        self.pos += 1;
        Ok(logits)
    }
}

/// Output columns per parallel task of [`rows_product`].
const COLUMNS_PER_TASK: usize = 64;

/// `out` [S, N] = `x` [S, K] · `w`ᵀ (+ `bias`), `w` [N, K] row-major, for the few rows (one per
/// sequence) the sampler feeds: each weight row is read once and multiplied with every sequence
/// while it is in cache, so the cost is one pass over the weights. (A general GEMM packs the
/// weight operand on every call, which at a few rows costs as much as the product.)
pub fn rows_product(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    s: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    if out.len() != s * n
        || x.len() != s * k
        || w.len() != n * k
        || bias.is_some_and(|b| b.len() != n)
    {
        return Err(ModelError::Dims(format!(
            "rows_product: out {}, x {}, w {} for S {s}, K {k}, N {n}",
            out.len(),
            x.len(),
            w.len()
        )));
    }
    // Column-major result, [N, S], so that each task owns a contiguous block of columns.
    let mut t = vec![0.0f32; n * s];
    let block = |(b, cols): (usize, &mut [f32])| {
        for (jj, col) in cols.chunks_exact_mut(s).enumerate() {
            let j = b * COLUMNS_PER_TASK + jj;
            let row = &w[j * k..(j + 1) * k];
            for (si, o) in col.iter_mut().enumerate() {
                *o = dot(&x[si * k..(si + 1) * k], row);
            }
        }
    };
    if n * k * s >= 1 << 16 {
        t.par_chunks_mut(COLUMNS_PER_TASK * s)
            .enumerate()
            .for_each(block);
    } else {
        t.chunks_mut(COLUMNS_PER_TASK * s)
            .enumerate()
            .for_each(block);
    }
    for si in 0..s {
        let o = &mut out[si * n..(si + 1) * n];
        for (j, o) in o.iter_mut().enumerate() {
            *o = t[j * s + si] + bias.map_or(0.0, |b| b[j]);
        }
    }
    Ok(())
}

/// Σ a·b with 16 running sums (vectorised by the compiler).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Draws the image tokens of `seqs` sequences, [S, G²], after their captions `text` ([S, Tt],
/// padded with the per-position padding ids as training does). Sequence i draws from stream
/// `first + i` of `how.seed`: a sequence's tokens do not depend on the batch it is drawn in.
pub fn sample_images(
    model: &Transformer,
    params: &[f32],
    text: &[u32],
    how: &Sampling,
    first: u64,
) -> Result<Vec<u32>> {
    how.check()?;
    let d = model.dims;
    let tt = d.text_len;
    if text.is_empty() || !text.len().is_multiple_of(tt) {
        return Err(ModelError::Dims(format!(
            "{} text ids is not a whole number of {tt}-token captions",
            text.len()
        )));
    }
    let s = text.len() / tt;
    let mut sampler = KvSampler::new(model, params, s)?;
    let mut logits = Vec::new();
    for p in 0..tt {
        let col: Vec<u32> = (0..s).map(|si| text[si * tt + p]).collect();
        logits = sampler.feed(&col)?;
    }
    let gi = d.image_tokens();
    let vi = d.image_vocab;
    let mut rngs: Vec<ChaCha8Rng> = (0..s)
        .map(|si| {
            let mut r = ChaCha8Rng::seed_from_u64(how.seed);
            r.set_stream(first + si as u64);
            r
        })
        .collect();
    let mut image = vec![0u32; s * gi];
    for i in 0..gi {
        let next: Vec<u32> = (0..s)
            .map(|si| {
                let u: f64 = rngs[si].random();
                how.choose(&logits[si * vi..(si + 1) * vi], u) as u32
            })
            .collect();
        for (si, &tok) in next.iter().enumerate() {
            image[si * gi + i] = tok;
        }
        if i + 1 < gi {
            logits = sampler.feed(&next)?;
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests;
