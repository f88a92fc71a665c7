//! The element-wise and gather/scatter pieces of CLIP that the `kernels` crate does not have
//! (docs/model.md §3); every matrix product, layer norm, softmax and cross-entropy goes through
//! `kernels`. Backward functions follow the kernels' rule: parameter gradients accumulate (`+=`),
//! activation gradients are overwritten (`=`).
//!
//! - [`Activation`]: the MLP activations a Hugging Face CLIP config may name (`quick_gelu`,
//!   `gelu` with erf, and the tanh form under its two Hugging Face names);
//! - [`patches`]: the patch convolution's input as a matrix (stride = kernel = P, so the
//!   convolution is one GEMM over non-overlapping patches);
//! - [`pool_rows`] / [`unpool_rows`]: end-token (text) and class-token (vision) pooling;
//! - [`normalize_rows`] / [`normalize_rows_backward`]: L2 normalisation of the embeddings;
//! - [`end_positions`]: where the text tower pools, as Hugging Face's `CLIPTextTransformer` does.

use kernels::gelu::{quick_gelu_sigmoid, QUICK_GELU_ALPHA};
use rayon::prelude::*;

/// The MLP activation of a tower (`hidden_act` in Hugging Face's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `u·σ(1.702·u)`, OpenAI's CLIP (`quick_gelu`).
    QuickGelu,
    /// `½·u·(1 + erf(u/√2))`, the exact GELU (`gelu`).
    Gelu,
    /// The tanh form of `kernels::gelu` (`gelu_pytorch_tanh`, or `gelu_new`).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
}

impl Activation {
    /// The activation named `name` in a Hugging Face config, or `None` if Tessera lacks it.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    /// The name written to a Hugging Face config.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    /// `out = act(inp)`, element-wise (the references of `kernels::gelu`).
    pub fn forward(self, out: &mut [f32], inp: &[f32]) -> kernels::Result<()> {
        kernels::error::check_len("clip_activation", "out", out.len(), inp.len())?;
        match self {
            Activation::GeluTanh => kernels::gelu::gelu_forward(out, inp),
            Activation::QuickGelu => kernels::gelu::quick_gelu_forward(out, inp),
            Activation::Gelu => kernels::gelu::gelu_erf_forward(out, inp),
        }
    }

    /// `dinp = act'(inp) · dout` (overwritten).
    pub fn backward(self, dinp: &mut [f32], dout: &[f32], inp: &[f32]) -> kernels::Result<()> {
        kernels::error::check_len("clip_activation", "dinp", dinp.len(), inp.len())?;
        kernels::error::check_len("clip_activation", "dout", dout.len(), inp.len())?;
        match self {
            Activation::GeluTanh => return kernels::gelu::gelu_backward(dinp, dout, inp),
            Activation::QuickGelu => dinp
                .par_chunks_mut(CHUNK)
                .zip(dout.par_chunks(CHUNK).zip(inp.par_chunks(CHUNK)))
                .for_each(|(d, (g, x))| {
                    for ((d, &g), &u) in d.iter_mut().zip(g).zip(x) {
                        let s = quick_gelu_sigmoid(u);
                        *d = g * (s + QUICK_GELU_ALPHA * u * s * (1.0 - s));
                    }
                }),
            Activation::Gelu => dinp
                .par_chunks_mut(CHUNK)
                .zip(dout.par_chunks(CHUNK).zip(inp.par_chunks(CHUNK)))
                .for_each(|(d, (g, x))| {
                    for ((d, &g), &u) in d.iter_mut().zip(g).zip(x) {
                        let u = u as f64;
                        let cdf = 0.5 * (1.0 + libm::erf(u * std::f64::consts::FRAC_1_SQRT_2));
                        let pdf = (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt();
                        *d = (g as f64 * (cdf + u * pdf)) as f32;
                    }
                }),
        }
        Ok(())
    }
}

/// Elements per parallel task of the element-wise loops (fixed: results never depend on
/// scheduling).
const CHUNK: usize = 1 << 14;

/// The non-overlapping `p × p` patches of `pixels` ([B, ch, s, s], s = g·p) as rows: `out`
/// [B·g², ch·p·p], row `b·g² + gy·g + gx`, column `(c·p + ky)·p + kx` — the layout of a
/// `[C, ch, p, p]` convolution weight read as a `[C, ch·p·p]` matrix, so that the stride-p
/// convolution is `out · weightᵀ`.
pub fn patches(out: &mut [f32], pixels: &[f32], b: usize, ch: usize, s: usize, p: usize) {
    let g = s / p;
    let row = ch * p * p;
    debug_assert_eq!(pixels.len(), b * ch * s * s);
    debug_assert_eq!(out.len(), b * g * g * row);
    out.par_chunks_mut(row).enumerate().for_each(|(r, dst)| {
        let (bi, n) = (r / (g * g), r % (g * g));
        let (gy, gx) = (n / g, n % g);
        for c in 0..ch {
            for ky in 0..p {
                let src = ((bi * ch + c) * s + gy * p + ky) * s + gx * p;
                dst[(c * p + ky) * p..(c * p + ky + 1) * p].copy_from_slice(&pixels[src..src + p]);
            }
        }
    });
}

/// `out[b] = x[b, pos[b]]`: one row of each sample's [T, C] block.
pub fn pool_rows(out: &mut [f32], x: &[f32], pos: &[usize], t: usize, c: usize) {
    for (bi, (dst, &p)) in out.chunks_exact_mut(c).zip(pos).enumerate() {
        dst.copy_from_slice(&x[(bi * t + p) * c..(bi * t + p + 1) * c]);
    }
}

/// The gradient of [`pool_rows`]: `dx` (overwritten) is zero except `dx[b, pos[b]] = dout[b]`.
pub fn unpool_rows(dx: &mut [f32], dout: &[f32], pos: &[usize], t: usize, c: usize) {
    dx.fill(0.0);
    for (bi, (src, &p)) in dout.chunks_exact(c).zip(pos).enumerate() {
        dx[(bi * t + p) * c..(bi * t + p + 1) * c].copy_from_slice(src);
    }
}

/// `y[i] = x[i] / ‖x[i]‖` for each row of [N, D]; `norms[i] = ‖x[i]‖` (summed in f64).
pub fn normalize_rows(y: &mut [f32], norms: &mut [f32], x: &[f32], d: usize) {
    for ((y, n), x) in y
        .chunks_exact_mut(d)
        .zip(norms.iter_mut())
        .zip(x.chunks_exact(d))
    {
        let norm = x
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt();
        *n = norm as f32;
        for (y, &v) in y.iter_mut().zip(x) {
            *y = (v as f64 / norm) as f32;
        }
    }
}

/// The gradient of [`normalize_rows`]: `dx = (dy − y·(y·dy)) / ‖x‖` (overwritten).
pub fn normalize_rows_backward(dx: &mut [f32], dy: &[f32], y: &[f32], norms: &[f32], d: usize) {
    for (((dx, dy), y), &n) in dx
        .chunks_exact_mut(d)
        .zip(dy.chunks_exact(d))
        .zip(y.chunks_exact(d))
        .zip(norms)
    {
        let dot: f64 = y.iter().zip(dy).map(|(&a, &b)| a as f64 * b as f64).sum();
        for ((dx, &dy), &y) in dx.iter_mut().zip(dy).zip(y) {
            *dx = ((dy as f64 - y as f64 * dot) / n as f64) as f32;
        }
    }
}

/// The position each text row is pooled at, as Hugging Face's current `CLIPTextTransformer`
/// does: with `eos_token_id == 2` (the legacy configs, whose real end token is the largest id)
/// the first position of the row's largest id; otherwise the first position holding
/// `eos_token_id`. A row without the end token is an error naming it (Hugging Face would pool
/// position 0 silently).
pub fn end_positions(ids: &[u32], s: usize, eos_token_id: u32) -> Result<Vec<usize>, String> {
    ids.chunks_exact(s)
        .enumerate()
        .map(|(row, r)| {
            if eos_token_id == 2 {
                let max = *r.iter().max().expect("s >= 1");
                Ok(r.iter().position(|&v| v == max).expect("max is in the row"))
            } else {
                r.iter().position(|&v| v == eos_token_id).ok_or_else(|| {
                    format!("input_ids row {row} has no end token (eos_token_id {eos_token_id})")
                })
            }
        })
        .collect()
}
