//! Helpers for the finite-difference gradient checks of every op family.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-scale, scale), deterministic in `seed`.
pub fn rand_vec(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Central finite difference of the scalar `f` with respect to `x[i]`, in f64 around an f32 point.
pub fn numeric_grad(x: &mut [f32], i: usize, eps: f32, mut f: impl FnMut(&[f32]) -> f64) -> f64 {
    let orig = x[i];
    x[i] = orig + eps;
    let plus = f(x);
    x[i] = orig - eps;
    let minus = f(x);
    x[i] = orig;
    (plus - minus) / (2.0 * eps as f64)
}

/// Asserts `|a - b| <= atol + rtol * |b|` element-wise, naming the first index that fails.
#[track_caller]
pub fn assert_close(what: &str, a: &[f64], b: &[f64], atol: f64, rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}[{i}]: got {x}, expected {y} (atol {atol}, rtol {rtol})"
        );
    }
}

/// Sum of `w[i] * y[i]`: a random projection that turns an output tensor into a scalar loss, so
/// that `w` is the upstream gradient the backward pass receives.
pub fn dot(w: &[f32], y: &[f32]) -> f64 {
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Asserts `|got − want| ≤ atol + rtol·|want|` element-wise for f32 results (a parity test's
/// comparison), naming the first index that fails.
#[track_caller]
pub fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, reference {w} (atol {atol}, rtol {rtol})"
        );
    }
}
