//! The models, written llm.c-style: a parameter table over one flat buffer, an activation
//! struct, and explicit `forward` / `backward` passes that call the ops of the `kernels` crate.
//!
//! - [`transformer`]: the stage-2 sparse transformer of docs/model.md §1;
//! - [`dvae`]: the stage-1 discrete VAE of docs/model.md §2;
//! - [`clip`]: the contrastive model of docs/model.md §3 (Hugging Face's `CLIPModel`).

pub mod clip;
pub mod dvae;
pub mod init;
pub mod mixed;
pub mod transformer;

/// How a forward pass for inference computes its linear layers' products: CLIP's towers
/// (`data-prep embed --precision`) and the sampler's transformer (`trainer sample --precision`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Products {
    /// f32 operands and sums: training's arithmetic (to round-off of Hugging Face's `CLIPModel`
    /// in f32).
    #[default]
    Fp32,
    /// Operands rounded to bfloat16, sums in f32 (`kernels::bf16::linear_forward_bf16`, and
    /// `kernels::rows` with a `RowsWeight::bf16` for the sampler's few rows): inference only;
    /// the backward pass is that of the f32 products.
    Bf16,
}

impl std::fmt::Display for Products {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Products::Fp32 => "fp32",
            Products::Bf16 => "bf16",
        })
    }
}

impl Products {
    /// `out[N, OC] = inp[N, C] · weight[OC, C]ᵀ + bias` with these products.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear(
        self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> kernels::Result<()> {
        match self {
            Products::Fp32 => kernels::linear::linear_forward(out, inp, weight, bias, n, c, oc),
            Products::Bf16 => kernels::bf16::linear_forward_bf16(out, inp, weight, bias, n, c, oc),
        }
    }
}

/// `y = a·y + x`, element-wise: the residual additions of both models (a = 1 for a plain
/// residual, a = post-gain for the dVAE's blocks). Fixed chunks, so results never depend on
/// scheduling.
pub(crate) fn scale_add(y: &mut [f32], a: f32, x: &[f32]) {
    use rayon::prelude::*;
    debug_assert_eq!(y.len(), x.len());
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = a * *y + x;
            }
        });
}
