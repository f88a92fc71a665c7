//! Deterministic parameter initialisation (GPT-2's scheme): normal(0, 0.02) for matrices and
//! embeddings, the residual output projections scaled by 1/sqrt(2·layers), gains one, biases zero.

use crate::params::{ParamKind, ParamTable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Standard deviation of the weights that are not residual projections.
pub const INIT_STD: f32 = 0.02;

/// Fills `buf` (laid out by `table`). `residual_scale(name)` returns the extra factor of a tensor
/// (1/sqrt(2L) for the residual output projections, 1 elsewhere). The same seed gives the same
/// weights on every machine: samples come from ChaCha8 and Box–Muller in f64.
pub fn init_params(
    table: &ParamTable,
    buf: &mut [f32],
    seed: u64,
    residual_scale: impl Fn(&str) -> f32,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (spec, view) in table.specs().iter().zip(table.split_mut(buf)) {
        match spec.kind {
            ParamKind::Gain => view.fill(1.0),
            ParamKind::Bias => view.fill(0.0),
            ParamKind::Matrix | ParamKind::Embedding | ParamKind::Unembedding => {
                let std = (INIT_STD * residual_scale(&spec.name)) as f64;
                for x in view.iter_mut() {
                    *x = (std * standard_normal(&mut rng)) as f32;
                }
            }
        }
    }
}

/// One standard normal sample (Box–Muller, the cosine branch).
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_has_the_stated_statistics_and_is_deterministic() {
        let mut t = ParamTable::new();
        t.push("w", &[200, 100], ParamKind::Matrix);
        t.push("p", &[200, 100], ParamKind::Matrix);
        t.push("g", &[10], ParamKind::Gain);
        t.push("b", &[10], ParamKind::Bias);
        let mut a = vec![0.0; t.numel()];
        init_params(&t, &mut a, 7, |n| if n == "p" { 0.5 } else { 1.0 });
        let w = t.view(&a, 0);
        let std = (w.iter().map(|&x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
        let p = t.view(&a, 1);
        let std = (p.iter().map(|&x| (x * x) as f64).sum::<f64>() / p.len() as f64).sqrt();
        assert!((std - 0.01).abs() < 0.0005, "std {std}");
        assert!(t.view(&a, 2).iter().all(|&x| x == 1.0));
        assert!(t.view(&a, 3).iter().all(|&x| x == 0.0));
        let mut b = vec![0.0; t.numel()];
        init_params(&t, &mut b, 7, |n| if n == "p" { 0.5 } else { 1.0 });
        assert_eq!(a, b);
    }
}
