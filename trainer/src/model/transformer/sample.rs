//! Autoregressive sampling of image tokens (DALL·E §2.4's generation, before the dVAE decodes
//! and CLIP re-ranks), with a key-value cache that follows the sparse layouts.
//!
//! A batch of S sequences is fed position by position: the caption's positions in one pass,
//! then each image position as its token is drawn. Each layer keeps the keys and values of
//! every position fed so far ([`KvCache`]); a new position attends only to the keys its layer's
//! mask allows (docs/model.md §1), listed once per layer kind and position, so the cost of a
//! position does not grow with the positions before it beyond reading the cache entries it may
//! see. The arithmetic is the training forward pass's on a few rows (the same layer
//! normalisation and GELU functions; the weight products through `kernels::rows`, which reads
//! each weight row once for all rows and sums in another order than the training GEMM), so the
//! cached logits equal the full forward pass's to f32 round-off: the test holds them together.
//! Every row's products are computed the same way however many rows share the call, so feeding
//! a caption at once gives the logits of feeding it position by position, bit for bit, and a
//! sequence's tokens do not depend on the batch.
//!
//! [`Products::Bf16`] (`trainer sample --precision bf16`) rounds the weight matrices to bfloat16
//! once per sampler and each product's input rows as it goes, summing in f32, and keeps the
//! cached keys and values in bfloat16 (widened exactly as they are read): half the bytes of
//! weights and cache to read per position (at a few sequences, generation is bound by reading
//! the weights and the cache, not by arithmetic: docs/benchmarks.md, "Sampling").
//!
//! Token choice ([`Sampling`]): logits divided by the temperature, then top-k and top-p
//! (nucleus) filtering, then a draw from a ChaCha8 stream per (seed, sequence), so a sequence's
//! tokens do not depend on the batch it was drawn in.

use super::{ModelError, Result, Transformer};
use crate::model::Products;
use kernels::attention::{allowed_reference, layer_mask_kind, MaskKind};
use kernels::gelu::gelu_forward;
use kernels::layernorm::layernorm_forward;
use kernels::rows::{rows_product, RowsWeight, Stored};
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

/// Keys and values of every layer for the positions fed so far: `[S, T, C]` each, in f32, or in
/// bfloat16 with [`Products::Bf16`] (half the bytes that each position's attention reads).
#[derive(Debug, PartialEq)]
enum KvCache {
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    Bf16 {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
    },
}

/// The weight matrices packed once for `kernels::rows` (in f32, or rounded to bfloat16 for
/// [`Products::Bf16`]): per layer qkv, the attention projection, fc and the MLP projection; then
/// the head's text and image segments.
struct PackedWeights {
    blocks: Vec<[RowsWeight; 4]>,
    head_text: RowsWeight,
    head_image: RowsWeight,
}

/// Feeds positions of S sequences through the transformer, one or several at a time.
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
    weights: PackedWeights,
    /// The residual stream of the rows being fed, [S·P, C] (sequence-major), and scratch of the
    /// same or wider shape; resized to the rows of each call.
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
    /// A sampler for `seqs` sequences with weights `params`, f32 products.
    pub fn new(model: &'a Transformer, params: &'a [f32], seqs: usize) -> Result<Self> {
        Self::with_products(model, params, seqs, Products::Fp32)
    }

    /// A sampler whose weight products are `products`. The weight matrices are packed here, once
    /// (`kernels::rows::RowsWeight`: a copy of them, rounded to bfloat16 for
    /// [`Products::Bf16`], which rounds each product's input rows too; embeddings, layer norms
    /// and attention stay f32).
    pub fn with_products(
        model: &'a Transformer,
        params: &'a [f32],
        seqs: usize,
        products: Products,
    ) -> Result<Self> {
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
        let pack = |w: &[f32], n, k| match products {
            Products::Fp32 => RowsWeight::f32(w, n, k),
            Products::Bf16 => RowsWeight::bf16(w, n, k),
        };
        let w = model.table.split(params);
        let blocks = model
            .blocks
            .iter()
            .map(|bp| {
                Ok([
                    pack(w[bp.qkv_w], 3 * c, c)?,
                    pack(w[bp.attn_proj_w], c, c)?,
                    pack(w[bp.fc_w], 4 * c, c)?,
                    pack(w[bp.mlp_proj_w], c, 4 * c)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let (head, text) = (w[model.globals.head], d.text_rows());
        let weights = PackedWeights {
            blocks,
            head_text: pack(&head[..text * c], text, c)?,
            head_image: pack(&head[text * c..], d.image_vocab, c)?,
        };
        let z = |n: usize| vec![0.0f32; n];
        Ok(KvSampler {
            model,
            params,
            seqs,
            cache: match products {
                Products::Fp32 => KvCache::F32 {
                    keys: (0..d.layers).map(|_| z(seqs * t * c)).collect(),
                    values: (0..d.layers).map(|_| z(seqs * t * c)).collect(),
                },
                Products::Bf16 => KvCache::Bf16 {
                    keys: (0..d.layers).map(|_| vec![0; seqs * t * c]).collect(),
                    values: (0..d.layers).map(|_| vec![0; seqs * t * c]).collect(),
                },
            },
            pos: 0,
            allowed,
            layer_kind,
            weights,
            x: Vec::new(),
            ln: Vec::new(),
            mean: Vec::new(),
            rstd: Vec::new(),
            qkv: Vec::new(),
            att: Vec::new(),
            proj: Vec::new(),
            fc: Vec::new(),
            fc_gelu: Vec::new(),
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
        self.feed_positions(tokens, 1)
    }

    /// Feeds the next `count` positions of every sequence at once, `tokens` [S, count]
    /// (sequence-major), and returns the logits after the last of them, as [`Self::feed`] does.
    /// The logits, and the cache, are bit for bit those of feeding the positions one at a time:
    /// every row goes through the same arithmetic (`kernels::rows`), only more of them per
    /// weight read (a caption costs one pass over the weights instead of one per position).
    pub fn feed_positions(&mut self, tokens: &[u32], count: usize) -> Result<Vec<f32>> {
        let m = self.model;
        let d = m.dims;
        let (t, c, s) = (d.seq_len(), d.d_model, self.seqs);
        let p0 = self.pos;
        if count == 0 || p0 + count > t {
            return Err(ModelError::Dims(format!(
                "cannot feed {count} positions from position {p0}: the sequence has {t}"
            )));
        }
        if tokens.len() != s * count {
            return Err(ModelError::Dims(format!(
                "{} tokens for {s} sequences of {count} positions",
                tokens.len()
            )));
        }
        let rows = s * count;
        for (buf, width) in [
            (&mut self.x, c),
            (&mut self.ln, c),
            (&mut self.mean, 1),
            (&mut self.rstd, 1),
            (&mut self.qkv, 3 * c),
            (&mut self.att, c),
            (&mut self.proj, c),
            (&mut self.fc, 4 * c),
            (&mut self.fc_gelu, 4 * c),
        ] {
            buf.resize(rows * width, 0.0);
        }
        let w = m.table.split(self.params);
        let g = &m.globals;
        // Embedding of each row: sequence r / count, position p0 + r % count.
        for (r, &tok) in tokens.iter().enumerate() {
            let p = p0 + r % count;
            let x = &mut self.x[r * c..(r + 1) * c];
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
        let hs = d.head_size();
        for (l, bp) in m.blocks.iter().enumerate() {
            let packed = &self.weights.blocks[l];
            let product = |out: &mut [f32], x: &[f32], i: usize, bias: usize| {
                rows_product(out, x, &packed[i], Some(w[bias]), rows)
            };
            layernorm_forward(
                &mut self.ln,
                &mut self.mean,
                &mut self.rstd,
                &self.x,
                w[bp.ln1_w],
                w[bp.ln1_b],
                rows,
                c,
            )?;
            product(&mut self.qkv, &self.ln, 0, bp.qkv_b)?;
            let rows_at = Rows {
                allowed: &self.allowed[self.layer_kind[l]],
                count,
                p0,
                t,
                c,
                hs,
            };
            match &mut self.cache {
                KvCache::F32 { keys, values } => {
                    rows_at.attend(&mut keys[l], &mut values[l], &self.qkv, &mut self.att)
                }
                KvCache::Bf16 { keys, values } => {
                    rows_at.attend(&mut keys[l], &mut values[l], &self.qkv, &mut self.att)
                }
            }
            product(&mut self.proj, &self.att, 1, bp.attn_proj_b)?;
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
                rows,
                c,
            )?;
            product(&mut self.fc, &self.ln, 2, bp.fc_b)?;
            gelu_forward(&mut self.fc_gelu, &self.fc)?;
            product(&mut self.proj, &self.fc_gelu, 3, bp.mlp_proj_b)?;
            for (x, &y) in self.x.iter_mut().zip(&self.proj) {
                *x += y;
            }
        }
        // The logits of the last position fed: its rows only.
        let last: Vec<f32> = self
            .x
            .chunks_exact(count * c)
            .flat_map(|seq| &seq[(count - 1) * c..])
            .copied()
            .collect();
        let (ln, mean, rstd) = (
            &mut self.ln[..s * c],
            &mut self.mean[..s],
            &mut self.rstd[..s],
        );
        layernorm_forward(ln, mean, rstd, &last, w[g.lnf_w], w[g.lnf_b], s, c)?;
        let head = match p0 + count < d.text_len {
            true => &self.weights.head_text,
            false => &self.weights.head_image,
        };
        let mut logits = vec![0.0f32; s * head.rows()];
        rows_product(&mut logits, ln, head, None, s)?;
        self.pos += count;
        Ok(logits)
    }
}

/// The rows of one `feed_positions` call as one layer's attention sees them: row r is sequence
/// r / count at position p0 + r % count, and may attend to the keys `allowed[p]`.
struct Rows<'b> {
    allowed: &'b [Vec<usize>],
    count: usize,
    p0: usize,
    t: usize,
    c: usize,
    hs: usize,
}

impl Rows<'_> {
    /// Stores each row's key and value (from `qkv`, [R, 3C]) in the cache (`keys`, `values`:
    /// [S, T, C]), then writes each row's attention over the cache under its mask row into
    /// `att` ([R, C]); rows in parallel. The keys a row may see are read in order, all heads of
    /// a key at once (one contiguous row of the cache), and each output element sums its
    /// weighted values in the order of the keys.
    fn attend<E: Stored>(&self, keys: &mut [E], values: &mut [E], qkv: &[f32], att: &mut [f32]) {
        let (count, p0, t, c, hs) = (self.count, self.p0, self.t, self.c, self.hs);
        for (r, row) in qkv.chunks_exact(3 * c).enumerate() {
            let at = ((r / count) * t + p0 + r % count) * c;
            for (dst, &v) in keys[at..at + c].iter_mut().zip(&row[c..2 * c]) {
                *dst = E::store(v);
            }
            for (dst, &v) in values[at..at + c].iter_mut().zip(&row[2 * c..]) {
                *dst = E::store(v);
            }
        }
        let (keys, values) = (&*keys, &*values);
        let heads = c / hs;
        let inv_sqrt = 1.0 / (hs as f32).sqrt();
        att.par_chunks_mut(c).enumerate().for_each(|(r, out)| {
            let (si, p) = (r / count, p0 + r % count);
            let allowed = &self.allowed[p];
            let n = allowed.len();
            let q = &qkv[r * 3 * c..][..c];
            // scores[h · n + j]: head h's score of the j-th allowed key, then its weight.
            let mut scores = vec![0.0f32; heads * n];
            for (j, &key) in allowed.iter().enumerate() {
                let k = &keys[(si * t + key) * c..][..c];
                for (h, (q, k)) in q.chunks_exact(hs).zip(k.chunks_exact(hs)).enumerate() {
                    scores[h * n + j] = dot(q, k) * inv_sqrt;
                }
            }
            for head in scores.chunks_exact_mut(n) {
                let max = head.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut total = 0.0f32;
                for sc in head.iter_mut() {
                    *sc = (*sc - max).exp();
                    total += *sc;
                }
                head.iter_mut().for_each(|sc| *sc /= total);
            }
            out.fill(0.0);
            for (j, &key) in allowed.iter().enumerate() {
                let v = &values[(si * t + key) * c..][..c];
                for (h, (out, v)) in out.chunks_exact_mut(hs).zip(v.chunks_exact(hs)).enumerate() {
                    let weight = scores[h * n + j];
                    for (o, &v) in out.iter_mut().zip(v) {
                        *o += weight * v.widen();
                    }
                }
            }
        });
    }
}

/// Σ a·b with 16 running sums, so that it vectorises (a plain `sum` adds in sequence).
fn dot<E: Stored>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.widen())
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i].widen();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Draws the image tokens of `seqs` sequences, [S, G²], after their captions `text` ([S, Tt],
/// padded with the per-position padding ids as training does). Sequence i draws from stream
/// `first + i` of `how.seed`: a sequence's tokens do not depend on the batch it is drawn in. The
/// captions are fed in one pass ([`KvSampler::feed_positions`]), the image one position at a
/// time; `products` as in [`KvSampler::with_products`].
pub fn sample_images(
    model: &Transformer,
    params: &[f32],
    text: &[u32],
    how: &Sampling,
    first: u64,
    products: Products,
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
    let mut sampler = KvSampler::with_products(model, params, s, products)?;
    let mut logits = sampler.feed_positions(text, tt)?;
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
