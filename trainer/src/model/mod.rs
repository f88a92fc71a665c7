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
